//! Pulling from a real registry: Debian's `docker-registry` on a loopback port, fed by `skopeo`.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;

use warren_image::testing;
use warren_image::{ImageError, ImageStore, PullOptions, PullProgress};

fn pull_with_events(
    store: &ImageStore,
    reference: &str,
) -> (
    Result<warren_image::ImageSummary, ImageError>,
    Vec<PullProgress>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let events = Mutex::new(Vec::new());
    let record = |p: PullProgress| events.lock().unwrap().push(p);
    let result = runtime.block_on(store.pull(reference, &PullOptions { insecure: true }, &record));
    (result, events.into_inner().unwrap())
}

fn layer_paths(store: &ImageStore, name: &str) -> Vec<PathBuf> {
    store.resolve(name).unwrap().layers
}

#[test]
fn pull_from_a_local_registry() {
    if let Some(tool) = testing::Registry::missing_tool() {
        println!("SKIP: {tool} not installed (apt-get install docker-registry skopeo)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = testing::Registry::start(&tmp.path().join("registry")).unwrap();
    let layout = testing::busybox_layout(&tmp.path().join("busybox-t1"), "busybox:t1").unwrap();
    registry.push(&layout, "busybox:t1", false).unwrap();

    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let reference = format!("127.0.0.1:{}/busybox:t1", registry.port);
    let (summary, events) = pull_with_events(&store, &reference);
    let summary = summary.unwrap_or_else(|e| panic!("pull failed: {e:?}\n{}", registry.log()));
    assert_eq!(summary.names, vec![reference.clone()]);
    assert_eq!(summary.layers, 1);

    // Events: Resolved, Layer byte counts ending complete, Unpacking, Done.
    let Some(PullProgress::Resolved {
        layers: 1,
        total_bytes,
        ..
    }) = events.first().cloned()
    else {
        panic!("first event: {events:?}");
    };
    assert_eq!(total_bytes, summary.size);
    let last_layer = events.iter().rev().find_map(|e| match e {
        PullProgress::Layer { done, total, .. } => Some((*done, *total)),
        _ => None,
    });
    assert_eq!(last_layer, Some((total_bytes, total_bytes)));
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, PullProgress::Unpacking { .. }))
            .count(),
        1
    );
    assert_eq!(
        events.last(),
        Some(&PullProgress::Done {
            id: summary.id.clone()
        })
    );

    let image = store.resolve(&reference).unwrap();
    assert_eq!(image.config.cmd, vec!["sh"]);
    assert_eq!(image.config.env, vec!["PATH=/usr/bin:/bin"]);
    assert!(image.layers[0].join("bin/busybox").is_file());
    assert!(image.layers[0].join("bin/sh").is_symlink());

    // Pulling again reuses blobs and layers.
    let (again, events) = pull_with_events(&store, &reference);
    assert_eq!(again.unwrap().id, summary.id);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, PullProgress::Unpacking { .. })),
        "{events:?}"
    );

    // The same layer imported from the layout is shared with the pulled image.
    store.import(&layout, None).unwrap();
    assert_eq!(
        layer_paths(&store, "busybox:t1"),
        layer_paths(&store, &reference)
    );
    assert_eq!(
        fs::read_dir(store.root().join("layers")).unwrap().count(),
        1
    );

    // A multi-platform index: the linux/amd64 image is chosen.
    let multi = testing::busybox_layout(&tmp.path().join("multi"), "multi").unwrap();
    testing::nest_in_index(&multi).unwrap();
    registry.push(&multi, "busybox:multi", true).unwrap();
    let multi_ref = format!("127.0.0.1:{}/busybox:multi", registry.port);
    let (pulled, _) = pull_with_events(&store, &multi_ref);
    let pulled =
        pulled.unwrap_or_else(|e| panic!("pull of index failed: {e:?}\n{}", registry.log()));
    let imported = store.import(&multi, Some("local-multi")).unwrap().remove(0);
    assert_eq!(pulled.id, imported.id, "the amd64 manifest, byte for byte");

    // Errors name the reference.
    let missing = format!("127.0.0.1:{}/busybox:nope", registry.port);
    let (result, _) = pull_with_events(&store, &missing);
    let err = result.unwrap_err();
    assert!(matches!(err, ImageError::Registry { .. }), "{err:?}");
    assert!(err.to_string().contains(&missing), "{err}");
}

#[test]
fn pull_a_wasm_artifact() {
    if let Some(tool) = testing::Registry::missing_tool() {
        println!("SKIP: {tool} not installed (apt-get install docker-registry skopeo)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = testing::Registry::start(&tmp.path().join("registry")).unwrap();
    let module = b"\0asm\x01\0\0\0";
    let layout = testing::wasm_layout(&tmp.path().join("hello"), "hello:v1", module).unwrap();
    registry.push(&layout, "hello:v1", false).unwrap();

    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let reference = format!("127.0.0.1:{}/hello:v1", registry.port);
    let (summary, events) = pull_with_events(&store, &reference);
    let summary = summary.unwrap_or_else(|e| panic!("pull failed: {e:?}\n{}", registry.log()));
    assert_eq!(summary.kind, warren_image::ImageKind::Wasm);
    assert_eq!((summary.layers, summary.size), (1, 8));
    assert!(
        matches!(
            events.first(),
            Some(PullProgress::Resolved {
                layers: 1,
                total_bytes: 8,
                ..
            })
        ),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, PullProgress::Unpacking { .. })),
        "a module is not unpacked: {events:?}"
    );

    let image = store.resolve(&reference).unwrap();
    assert!(image.layers.is_empty());
    assert_eq!(
        fs::read(image.wasm_module().unwrap().unwrap()).unwrap(),
        module
    );
    assert_eq!(
        fs::read_dir(store.root().join("layers")).unwrap().count(),
        0
    );
    // The manifest went through the registry unchanged: the same image as importing it.
    assert_eq!(store.import(&layout, None).unwrap()[0].id, summary.id);
}

/// A registry that lies: its manifest declares `declared` bytes for the layer, and for the
/// config too when `config_lies` (else the config is a true one), and it sends `sent` bytes
/// for each lie (then closes). Serves until the test process ends (the thread waits in
/// `accept` on its own copy of the socket).
fn lying_registry(declared: usize, sent: usize, config_lies: bool) -> (std::net::TcpListener, u16) {
    use sha2::{Digest as _, Sha256};
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = vec![b'z'; sent];
    let digest = format!("sha256:{:x}", Sha256::digest(&body));
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [digest]},
    }))
    .unwrap();
    let config_digest = format!("sha256:{:x}", Sha256::digest(&config));
    let (config_digest, config_size) = if config_lies {
        (digest.clone(), declared)
    } else {
        (config_digest, config.len())
    };
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest, "size": declared}],
    }))
    .unwrap();
    let manifest_digest = format!("sha256:{:x}", Sha256::digest(&manifest));
    let server = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        for stream in server.incoming() {
            let Ok(mut stream) = stream else { return };
            // The whole request head is read: closing with some of it unread would reset the
            // connection under the response.
            let mut reader = BufReader::new(&stream);
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let (kind, payload): (&str, &[u8]) = if path.contains("/manifests/") {
                ("application/vnd.oci.image.manifest.v1+json", &manifest)
            } else if path.ends_with(&config_digest) && !config_lies {
                ("application/octet-stream", &config)
            } else if path.contains("/blobs/") {
                ("application/octet-stream", &body)
            } else {
                ("application/json", b"{}")
            };
            // The digest header only for the manifest (a client checks a blob against it).
            let digest_header = if path.contains("/manifests/") {
                format!("Docker-Content-Digest: {manifest_digest}\r\n")
            } else {
                String::new()
            };
            // No Content-Length: the body ends when the connection does.
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\n{digest_header}\
                 Docker-Distribution-API-Version: registry/2.0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(payload);
        }
    });
    (listener, port)
}

#[test]
fn a_registry_sending_more_than_declared_is_cut_off() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    // 64 MiB sent for a config or a layer declared as 100 bytes: the pull stops early.
    for config_lies in [true, false] {
        let (_listener, port) = lying_registry(100, 64 << 20, config_lies);
        let (result, _) = pull_with_events(&store, &format!("127.0.0.1:{port}/liar:latest"));
        let err = result.unwrap_err();
        assert!(
            matches!(err, ImageError::SizeMismatch { expected: 100, actual, .. } if actual < 1 << 20),
            "config lies: {config_lies}: {err:?}"
        );
        assert_eq!(
            fs::read_dir(store.root().join("tmp")).unwrap().count(),
            0,
            "nothing left behind"
        );
    }
    // A size of 0 (or none) is refused before any download (into a store of its own).
    let store = ImageStore::open(&tmp.path().join("store2")).unwrap();
    let (_listener, port) = lying_registry(0, 10, false);
    let (result, _) = pull_with_events(&store, &format!("127.0.0.1:{port}/liar:latest"));
    let err = result.unwrap_err().to_string();
    assert!(
        err.contains("its size is 0, not a positive number of bytes"),
        "{err}"
    );
    assert!(store.list().unwrap().is_empty());
    // Refused before anything was stored, the manifest and config included.
    assert_eq!(
        fs::read_dir(store.root().join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}
