//! Import, naming, resolution, removal and garbage collection against real layouts.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};
use warren_image::testing::{self, Compression, Config, Entry, Layer};
use warren_image::{ImageError, ImageStore};

fn setup() -> (tempfile::TempDir, ImageStore) {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    (tmp, store)
}

fn dir_count(dir: &Path) -> usize {
    fs::read_dir(dir).unwrap().count()
}

fn layers_dir(store: &ImageStore) -> PathBuf {
    store.root().join("layers")
}

fn blobs_dir(store: &ImageStore) -> PathBuf {
    store.root().join("blobs/sha256")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn write_blob(layout: &Path, value: &Value) -> (String, usize) {
    let bytes = serde_json::to_vec(value).unwrap();
    let hex = format!("{:x}", Sha256::digest(&bytes));
    fs::write(layout.join("blobs/sha256").join(&hex), &bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Rewrites a layout's (single) manifest through `edit_manifest` and `edit_config`,
/// re-hashing both and updating index.json, as a tool that builds a bad image would.
fn rewrite(
    layout: &Path,
    edit_config: impl FnOnce(&mut Value),
    edit_manifest: impl FnOnce(&mut Value),
) {
    let mut index = read_json(&layout.join("index.json"));
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let mut manifest = read_json(&blob_path(layout, &manifest_digest));
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let mut config = read_json(&blob_path(layout, &config_digest));
    edit_config(&mut config);
    let (digest, size) = write_blob(layout, &config);
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = size.into();
    edit_manifest(&mut manifest);
    let (digest, size) = write_blob(layout, &manifest);
    index["manifests"][0]["digest"] = digest.into();
    index["manifests"][0]["size"] = size.into();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

fn set_ref_name(layout: &Path, ref_name: &str) {
    let mut index = read_json(&layout.join("index.json"));
    index["manifests"][0]["annotations"] =
        serde_json::json!({ "org.opencontainers.image.ref.name": ref_name });
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

#[test]
fn import_busybox_directory_layout() {
    let (tmp, store) = setup();
    let layout = testing::busybox_layout(&tmp.path().join("busybox"), "busybox").unwrap();
    let summaries = store.import(&layout, None).unwrap();
    assert_eq!(summaries.len(), 1);
    let summary = &summaries[0];
    assert_eq!(summary.names, vec!["busybox:latest"]);
    assert_eq!(summary.layers, 1);
    assert!(summary.size > 100_000, "{summary:?}");
    assert!(summary.id.starts_with("sha256:") && summary.id.len() == 71);
    assert_eq!(summary.created.as_deref(), Some("2024-01-01T00:00:00Z"));

    let image = store.resolve("busybox").unwrap();
    assert_eq!(image.id, summary.id);
    assert_eq!(image.config.env, vec!["PATH=/usr/bin:/bin"]);
    assert_eq!(image.config.cmd, vec!["sh"]);
    assert!(image.config.entrypoint.is_empty());
    let root = &image.layers[0];
    let busybox = fs::metadata(root.join("bin/busybox")).unwrap();
    assert!(busybox.is_file());
    assert_eq!(busybox.permissions().mode() & 0o7777, 0o755);
    assert_eq!(busybox.len(), fs::metadata("/bin/busybox").unwrap().len());
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::read_link(root.join("bin/mount")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(
        fs::metadata(root.join("tmp")).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        fs::metadata(root.join("root"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o700
    );
    for dir in ["etc", "proc", "sys", "dev"] {
        assert!(root.join(dir).is_dir(), "{dir}");
    }
    assert!(
        fs::read_to_string(root.join("etc/passwd"))
            .unwrap()
            .starts_with("root:x:0:0:")
    );
    assert!(root.join("etc/group").is_file());
    assert_eq!(busybox.uid(), 0);
    assert_eq!(busybox.mtime(), 1_700_000_000);
    // Nothing left behind in tmp/.
    assert_eq!(dir_count(&store.root().join("tmp")), 0);
}

#[test]
fn import_tar_and_gzipped_tar() {
    let (tmp, store) = setup();
    let layout = testing::busybox_layout(&tmp.path().join("busybox"), "busybox").unwrap();
    let tar = testing::tar_layout(&layout).unwrap();
    let tgz = testing::tar_gz_layout(&layout).unwrap();
    let from_tar = store.import(&tar, Some("bb:v1")).unwrap();
    assert_eq!(from_tar[0].names, vec!["bb:v1"]);
    let from_tgz = store.import(&tgz, Some("bb:v2")).unwrap();
    assert_eq!(from_tgz[0].id, from_tar[0].id);
    let from_dir = store.import(&layout, None).unwrap();
    assert_eq!(from_dir[0].id, from_tar[0].id);
    assert_eq!(from_dir[0].names, vec!["bb:v1", "bb:v2", "busybox:latest"]);
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(dir_count(&layers_dir(&store)), 1);
    assert_eq!(dir_count(&store.root().join("tmp")), 0);

    let junk = tmp.path().join("junk.tar");
    fs::write(
        &junk,
        testing::layer_tar(&[Entry::file("hello", 0o644, b"hi")]).unwrap(),
    )
    .unwrap();
    let err = store.import(&junk, Some("x")).unwrap_err().to_string();
    assert!(
        err.contains("junk.tar") && err.contains("index.json"),
        "{err}"
    );
    let err = store
        .import(&tmp.path().join("missing"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn names_and_tags() {
    let (tmp, store) = setup();
    let unnamed = testing::write_layout(
        &tmp.path().join("unnamed"),
        None,
        &[Layer::gzip(vec![Entry::file("f", 0o644, b"1")])],
        &Config::default(),
    )
    .unwrap();
    let err = store.import(&unnamed, None).unwrap_err().to_string();
    assert!(
        err.contains("org.opencontainers.image.ref.name") && err.contains("give a name"),
        "{err}"
    );
    assert_eq!(
        store.import(&unnamed, Some("app")).unwrap()[0].names,
        vec!["app:latest"]
    );
    assert_eq!(
        store.import(&unnamed, Some("app:v2")).unwrap()[0].names,
        vec!["app:latest", "app:v2"]
    );

    // skopeo's `oci:DIR:TAG` writes a bare tag: it needs a repository, and keeps its tag.
    set_ref_name(&unnamed, "v3");
    let err = store.import(&unnamed, None).unwrap_err().to_string();
    assert!(
        err.contains("\"v3\"") && err.contains("no repository"),
        "{err}"
    );
    let names = &store
        .import(&unnamed, Some("registry.example:5000/team/app"))
        .unwrap()[0]
        .names;
    assert!(
        names.contains(&"registry.example:5000/team/app:v3".to_string()),
        "{names:?}"
    );

    // A full reference in the annotation is normalized; a name without tag replaces its repository.
    set_ref_name(&unnamed, "docker.io/library/tool:1.0");
    assert!(
        store.import(&unnamed, None).unwrap()[0]
            .names
            .contains(&"tool:1.0".to_string())
    );
    assert!(
        store.import(&unnamed, Some("other")).unwrap()[0]
            .names
            .contains(&"other:1.0".to_string())
    );

    // A name moves to the newest image that claims it; the old image keeps its other names.
    let second = testing::write_layout(
        &tmp.path().join("second"),
        None,
        &[Layer::gzip(vec![Entry::file("f", 0o644, b"2")])],
        &Config::default(),
    )
    .unwrap();
    let new = store.import(&second, Some("app")).unwrap();
    let old = store.resolve("app:v2").unwrap();
    assert!(!old.names.contains(&"app:latest".to_string()));
    assert_eq!(store.resolve("app").unwrap().id, new[0].id);

    let err = store.import(&second, Some("Bad Name")).unwrap_err();
    assert!(matches!(err, ImageError::InvalidName { .. }), "{err}");
    assert!(err.to_string().contains("\"Bad Name\""));
}

#[test]
fn resolve_by_name_id_and_prefix() {
    let (tmp, store) = setup();
    let layout = testing::busybox_layout(&tmp.path().join("busybox-1-36"), "busybox:1.36").unwrap();
    let id = store.import(&layout, None).unwrap()[0].id.clone();
    let hex = id.trim_start_matches("sha256:");
    for query in [
        "busybox:1.36",
        "docker.io/library/busybox:1.36",
        "index.docker.io/library/busybox:1.36",
        id.as_str(),
        hex,
        &hex[..4],
        &hex[..12],
        &format!("sha256:{}", &hex[..8]),
    ] {
        assert_eq!(store.resolve(query).unwrap().id, id, "{query}");
    }
    let err = store.resolve("busybox").unwrap_err();
    assert_eq!(err.to_string(), "image \"busybox:latest\" not found");
    // Too short to be a prefix (and not a name of ours).
    assert!(matches!(
        store.resolve(&hex[..3]),
        Err(ImageError::NotFound(_))
    ));
    let other = if hex.starts_with("ffff") {
        "eeee"
    } else {
        "ffff"
    };
    let err = store
        .resolve(&format!("sha256:{other}"))
        .unwrap_err()
        .to_string();
    assert_eq!(err, format!("image \"sha256:{other}\" not found"));
}

/// Readers keep the parsed index between calls; a change to the file, from this store, from
/// another handle on the same directory (another process) or by hand, is seen at the next
/// read.
#[test]
fn a_changed_index_is_read_again() {
    let (tmp, store) = setup();
    let layout = testing::busybox_layout(&tmp.path().join("bb"), "busybox:1.36").unwrap();
    let id = store.import(&layout, None).unwrap()[0].id.clone();
    assert_eq!(store.resolve("busybox:1.36").unwrap().id, id);
    // Another handle (as another process would) adds a name and then removes the image.
    let other = ImageStore::open(&tmp.path().join("store")).unwrap();
    other.import(&layout, Some("mine:v1")).unwrap();
    assert_eq!(store.resolve("mine:v1").unwrap().id, id);
    assert_eq!(store.list().unwrap()[0].names.len(), 2);
    other.remove(&id).unwrap();
    assert!(matches!(
        store.resolve("busybox:1.36"),
        Err(ImageError::NotFound(_))
    ));
    assert!(store.list().unwrap().is_empty());
    // Damaged by hand: the next read says so rather than answering from memory.
    store.import(&layout, None).unwrap();
    assert_eq!(store.resolve("busybox:1.36").unwrap().id, id);
    fs::write(tmp.path().join("store/index.json"), b"{ not json").unwrap();
    let err = store.resolve("busybox:1.36").unwrap_err().to_string();
    assert!(err.contains("index.json does not parse"), "{err}");
}

#[test]
fn remove_and_garbage_collect_keeps_shared_layers() {
    let (tmp, store) = setup();
    let base = vec![
        Entry::dir("etc", 0o755),
        Entry::file("etc/base", 0o644, b"base layer\n"),
    ];
    let a = testing::write_layout(
        &tmp.path().join("a"),
        Some("a"),
        &[Layer::gzip(base.clone())],
        &Config::default(),
    )
    .unwrap();
    let b = testing::write_layout(
        &tmp.path().join("b"),
        Some("b"),
        &[
            Layer::gzip(base),
            Layer::gzip(vec![Entry::file("top", 0o644, b"top layer\n")]),
        ],
        &Config::default(),
    )
    .unwrap();
    let a_id = store.import(&a, None).unwrap()[0].id.clone();
    let b_id = store.import(&b, None).unwrap()[0].id.clone();
    let listed: Vec<Vec<String>> = store.list().unwrap().into_iter().map(|s| s.names).collect();
    assert_eq!(listed, vec![vec!["a:latest"], vec!["b:latest"]]);
    // Layers: base (shared) + top. Blobs: 2 manifests, 2 configs, 2 layers.
    assert_eq!(dir_count(&layers_dir(&store)), 2);
    assert_eq!(dir_count(&blobs_dir(&store)), 6);
    let b_layers = store.resolve("b").unwrap().layers;
    assert_eq!(store.resolve("a").unwrap().layers[0], b_layers[0]);

    let removed = store.remove("a").unwrap();
    assert_eq!(removed.id, a_id);
    assert_eq!(removed.names, vec!["a:latest"]);
    assert!(matches!(store.resolve("a"), Err(ImageError::NotFound(_))));
    assert_eq!(
        dir_count(&layers_dir(&store)),
        2,
        "the shared base layer must survive"
    );
    assert_eq!(dir_count(&blobs_dir(&store)), 4);
    let b_image = store.resolve("b").unwrap();
    assert!(b_image.layers.iter().all(|l| l.is_dir()));
    assert!(b_image.layers[0].join("etc/base").is_file());

    // Removing one of two names keeps the image.
    store.import(&b, Some("b2")).unwrap();
    let removed = store.remove("b:latest").unwrap();
    assert_eq!(removed.names, vec!["b:latest"]);
    assert_eq!(store.resolve("b2").unwrap().id, b_id);
    assert_eq!(dir_count(&layers_dir(&store)), 2);

    // By id prefix: everything goes.
    let removed = store.remove(&b_id[7..19]).unwrap();
    assert_eq!(removed.names, vec!["b2:latest"]);
    assert!(store.list().unwrap().is_empty());
    assert_eq!(dir_count(&layers_dir(&store)), 0);
    assert_eq!(dir_count(&blobs_dir(&store)), 0);
    assert!(matches!(store.remove("b2"), Err(ImageError::NotFound(_))));

    // gc() also sweeps leftovers of interrupted work.
    fs::create_dir(store.root().join("tmp/layer-crashed")).unwrap();
    fs::write(blobs_dir(&store).join("0".repeat(64)), b"orphan").unwrap();
    let stats = store.gc().unwrap();
    assert_eq!((stats.blobs, stats.layers, stats.temp), (1, 0, 1));
}

#[test]
fn corrupted_blob_is_rejected() {
    let (tmp, store) = setup();
    let layout = testing::busybox_layout(&tmp.path().join("busybox"), "busybox").unwrap();
    let manifest = read_json(&blob_path(
        &layout,
        read_json(&layout.join("index.json"))["manifests"][0]["digest"]
            .as_str()
            .unwrap(),
    ));
    let layer_digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let path = blob_path(&layout, &layer_digest);
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let err = store.import(&layout, None).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer_digest), "{err}");
    assert!(store.list().unwrap().is_empty());
    assert_eq!(dir_count(&layers_dir(&store)), 0);
    assert_eq!(dir_count(&store.root().join("tmp")), 0);

    // A truncated blob fails the size check first.
    bytes.truncate(middle);
    fs::write(&path, &bytes).unwrap();
    let err = store.import(&layout, None).unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");

    // A manifest whose bytes do not hash to the index's digest.
    let layout = testing::busybox_layout(&tmp.path().join("busybox2"), "busybox2").unwrap();
    let index = read_json(&layout.join("index.json"));
    let manifest_path = blob_path(&layout, index["manifests"][0]["digest"].as_str().unwrap());
    let mut text = fs::read_to_string(&manifest_path).unwrap();
    text = text.replacen("\"schemaVersion\":2", "\"schemaVersion\": 2", 1);
    fs::write(&manifest_path, text).unwrap();
    let err = store.import(&layout, None).unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::SizeMismatch { .. } | ImageError::DigestMismatch { .. }
        ),
        "{err}"
    );
}

#[test]
fn diff_id_mismatch_is_rejected() {
    let (tmp, store) = setup();
    let layout = testing::write_layout(
        &tmp.path().join("x"),
        Some("x"),
        &[Layer::gzip(vec![Entry::file("f", 0o644, b"x")])],
        &Config::default(),
    )
    .unwrap();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    rewrite(
        &layout,
        |config| config["rootfs"]["diff_ids"][0] = wrong.clone().into(),
        |_| {},
    );
    let err = store.import(&layout, None).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            ImageError::DigestMismatch {
                what: "layer diff_id",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains(&wrong), "{text}");
    assert_eq!(dir_count(&layers_dir(&store)), 0, "no partial layer dir");
    assert_eq!(dir_count(&store.root().join("tmp")), 0);

    // A config with fewer diff_ids than layers.
    rewrite(
        &layout,
        |config| config["rootfs"]["diff_ids"] = serde_json::json!([]),
        |_| {},
    );
    let err = store.import(&layout, None).unwrap_err().to_string();
    assert!(
        err.contains("1 layers") && err.contains("diff_ids has 0"),
        "{err}"
    );

    // A digest that would be a path.
    let valid = format!("sha256:{}", "cd".repeat(32));
    rewrite(
        &layout,
        |config| config["rootfs"]["diff_ids"] = serde_json::json!([valid]),
        |manifest| manifest["layers"][0]["digest"] = "sha256:../../../etc/passwd".into(),
    );
    let err = store.import(&layout, None).unwrap_err();
    assert!(matches!(err, ImageError::InvalidDigest { .. }), "{err}");
}

#[test]
fn whiteouts_links_and_compressions() {
    let (tmp, store) = setup();
    let entries = vec![
        Entry::dir("a", 0o755),
        Entry::file("a/.wh.gone", 0o644, b""),
        Entry::dir("opq", 0o755),
        Entry::file("opq/.wh..wh..opq", 0o644, b""),
        Entry::file("opq/keep", 0o600, b"kept"),
        // A whiteout of something this very layer has: the layer's file wins.
        Entry::file("a/both", 0o644, b"mine"),
        Entry::file("a/.wh.both", 0o644, b""),
        // Implicit parent directories.
        Entry::file("deep/er/file", 0o640, b"deep"),
        Entry::file("data", 0o644, b"shared inode"),
        Entry::hardlink("data-link", "data"),
        Entry::hardlink("./deep/link", "./data"),
        Entry::symlink("abs", "/etc/passwd"),
        Entry::symlink("up", "../../../../etc"),
        Entry::CharDevice {
            path: "dev-null".to_string(),
            major: 1,
            minor: 3,
        },
        // A later entry replaces an earlier one.
        Entry::file("data2", 0o644, b"old"),
        Entry::file("data2", 0o644, b"new"),
        Entry::dir("ro", 0o555),
        Entry::file(
            "ro/inside",
            0o444,
            b"written before the dir became read-only",
        ),
    ];
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let label = format!("{compression:?}");
        let layout = testing::write_layout(
            &tmp.path().join(&label),
            Some(&label.to_lowercase()),
            &[Layer {
                entries: entries.clone(),
                compression,
            }],
            &Config::default(),
        )
        .unwrap();
        store.import(&layout, None).unwrap();
        let root = store
            .resolve(&label.to_lowercase())
            .unwrap()
            .layers
            .remove(0);

        let gone = fs::symlink_metadata(root.join("a/gone")).unwrap();
        assert!(gone.file_type().is_char_device(), "{label}");
        assert_eq!(gone.rdev(), 0);
        assert!(!root.join("a/.wh.gone").exists());
        assert_eq!(fs::read(root.join("a/both")).unwrap(), b"mine");
        let opaque = rustix::fs::getxattr(
            root.join("opq").as_path(),
            "trusted.overlay.opaque",
            &mut [0u8; 8],
        )
        .unwrap();
        assert_eq!(opaque, 1);
        assert!(!root.join("opq/.wh..wh..opq").exists());
        assert_eq!(fs::read(root.join("opq/keep")).unwrap(), b"kept");
        assert_eq!(
            fs::metadata(root.join("opq/keep"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(fs::read(root.join("deep/er/file")).unwrap(), b"deep");
        let data = fs::metadata(root.join("data")).unwrap();
        assert_eq!(data.nlink(), 3);
        assert_eq!(
            fs::metadata(root.join("deep/link")).unwrap().ino(),
            data.ino()
        );
        assert_eq!(
            fs::read_link(root.join("abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            fs::read_link(root.join("up")).unwrap(),
            Path::new("../../../../etc")
        );
        assert!(!root.join("dev-null").exists(), "device nodes are skipped");
        assert_eq!(fs::read(root.join("data2")).unwrap(), b"new");
        assert_eq!(
            fs::metadata(root.join("ro")).unwrap().permissions().mode() & 0o777,
            0o555
        );
        assert!(root.join("ro/inside").is_file());
    }
}

#[test]
fn concurrent_imports_of_the_same_image() {
    let (tmp, store) = setup();
    let layout = testing::busybox_layout(&tmp.path().join("busybox"), "busybox").unwrap();
    let tar = testing::tar_layout(&layout).unwrap();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            // Half share the handle, half open the directory again (like another process).
            let store = if i % 2 == 0 {
                store.clone()
            } else {
                ImageStore::open(store.root()).unwrap()
            };
            let source = if i < 2 { layout.clone() } else { tar.clone() };
            std::thread::spawn(move || store.import(&source, None))
        })
        .collect();
    let ids: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().unwrap().unwrap()[0].id.clone())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(dir_count(&layers_dir(&store)), 1);
    assert_eq!(dir_count(&store.root().join("tmp")), 0);
    let image = store.resolve("busybox").unwrap();
    assert!(image.layers[0].join("bin/busybox").is_file());
}

#[test]
fn nested_index_picks_linux_amd64() {
    let (tmp, store) = setup();
    let layout = testing::busybox_layout(&tmp.path().join("busybox"), "busybox").unwrap();
    testing::nest_in_index(&layout).unwrap();
    let summary = store.import(&layout, None).unwrap().remove(0);
    let index = read_json(&layout.join("index.json"));
    let nested = read_json(&blob_path(
        &layout,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ));
    let amd64 = nested["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "amd64")
        .unwrap();
    assert_eq!(summary.id, amd64["digest"].as_str().unwrap());
    assert_eq!(summary.names, vec!["busybox:latest"]);
}

#[test]
fn removals_racing_imports_never_break_an_image() {
    let (tmp, store) = setup();
    let base = vec![
        Entry::dir("etc", 0o755),
        Entry::file("etc/base", 0o644, b"base\n"),
    ];
    let a = testing::write_layout(
        &tmp.path().join("a"),
        Some("a"),
        &[Layer::gzip(base.clone())],
        &Config::default(),
    )
    .unwrap();
    let b = testing::write_layout(
        &tmp.path().join("b"),
        Some("b"),
        &[
            Layer::gzip(base),
            Layer::gzip(vec![Entry::file("top", 0o644, b"top\n")]),
        ],
        &Config::default(),
    )
    .unwrap();
    let handles: Vec<_> = [(a, "a"), (b, "b")]
        .into_iter()
        .map(|(layout, name)| {
            let store = store.clone();
            std::thread::spawn(move || {
                for _ in 0..8 {
                    store.import(&layout, None).unwrap();
                    // Between import and remove the image is whole, whatever the other thread's
                    // removals collect meanwhile.
                    let image = store.resolve(name).unwrap();
                    assert!(image.layers[0].join("etc/base").is_file(), "{name}");
                    assert!(image.layers.iter().all(|l| l.is_dir()), "{name}");
                    store.remove(name).unwrap();
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    assert!(store.list().unwrap().is_empty());
    store.gc().unwrap();
    assert_eq!(dir_count(&layers_dir(&store)), 0);
    assert_eq!(dir_count(&blobs_dir(&store)), 0);
    assert_eq!(dir_count(&store.root().join("tmp")), 0);
}

/// Runs `import` on another thread and fails the test if it has not returned within a minute
/// (a FIFO opened for reading blocks until a writer comes).
fn import_or_hang(store: &ImageStore, path: &Path, name: Option<&str>) -> Result<(), ImageError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (store, path, name) = (store.clone(), path.to_path_buf(), name.map(str::to_string));
    std::thread::spawn(move || {
        let _ = tx.send(store.import(&path, name.as_deref()).map(drop));
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("import still waiting on a FIFO after a minute")
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
}

#[test]
fn fifos_devices_and_misdeclared_sizes_are_refused() {
    let (tmp, store) = setup();
    // Layers keep set-id files and images may hold secrets: the store is root's alone.
    let mode = fs::metadata(store.root()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "store root mode {mode:o}");

    // A FIFO or a device as the thing to import.
    let fifo = tmp.path().join("fifo");
    mkfifo(&fifo);
    for path in [fifo.as_path(), Path::new("/dev/zero")] {
        let err = import_or_hang(&store, path, Some("x")).unwrap_err();
        assert!(
            err.to_string()
                .contains("is neither a directory nor a regular file"),
            "{}: {err}",
            path.display()
        );
    }

    // A FIFO inside a layout, as index.json or as a layer blob.
    let layout = testing::busybox_layout(&tmp.path().join("bb"), "busybox").unwrap();
    let index = layout.join("index.json");
    let saved = fs::read(&index).unwrap();
    fs::remove_file(&index).unwrap();
    mkfifo(&index);
    let err = import_or_hang(&store, &layout, None).unwrap_err();
    assert!(err.to_string().contains("index.json"), "{err}");
    assert!(
        std::error::Error::source(&err)
            .is_some_and(|s| s.to_string().contains("not a regular file")),
        "{err}"
    );
    fs::remove_file(&index).unwrap();
    fs::write(&index, &saved).unwrap();
    let manifest = read_json(&blob_path(
        &layout,
        read_json(&index)["manifests"][0]["digest"]
            .as_str()
            .unwrap(),
    ));
    let layer = blob_path(&layout, manifest["layers"][0]["digest"].as_str().unwrap());
    let layer_bytes = fs::read(&layer).unwrap();
    fs::remove_file(&layer).unwrap();
    mkfifo(&layer);
    let err = import_or_hang(&store, &layout, None).unwrap_err();
    assert!(
        std::error::Error::source(&err)
            .is_some_and(|s| s.to_string().contains("not a regular file")),
        "{err}"
    );
    assert!(store.list().unwrap().is_empty());
    fs::remove_file(&layer).unwrap();
    fs::write(&layer, &layer_bytes).unwrap();
    store.import(&layout, None).unwrap();

    // A manifest that reuses a stored layer under a size it does not have: refused, not
    // recorded (the sizes summed to an overflow).
    rewrite(
        &layout,
        |_| {},
        |manifest| manifest["layers"][0]["size"] = (i64::MAX).into(),
    );
    set_ref_name(&layout, "liar:latest");
    let err = store.import(&layout, None).unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
    let names: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .flat_map(|image| image.names)
        .collect();
    assert!(!names.iter().any(|n| n.contains("liar")), "{names:?}");
}

#[test]
fn a_checked_removal_fails_when_the_image_changed_meanwhile() {
    let (tmp, store) = setup();
    let layout = testing::busybox_layout(&tmp.path().join("bb"), "busybox").unwrap();
    let id = store.import(&layout, Some("app:v1")).unwrap()[0].id.clone();
    store.import(&layout, Some("app:v2")).unwrap();
    // Checked as an untag, done as one.
    store.remove_checked("app:v1", &id, false).unwrap();
    // Checked as an untag, but the name is now the image's last: refused, nothing removed.
    let err = store.remove_checked("app:v2", &id, false).unwrap_err();
    assert!(matches!(err, ImageError::Changed { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("changed while it was being removed"),
        "{err}"
    );
    assert_eq!(store.resolve("app:v2").unwrap().id, id);
    // Checked against another image: refused.
    let other = format!("sha256:{}", "0".repeat(64));
    let err = store.remove_checked("app:v2", &other, true).unwrap_err();
    assert!(matches!(err, ImageError::Changed { .. }), "{err}");
    // As checked: deleted.
    store.remove_checked("app:v2", &id, true).unwrap();
    assert!(store.list().unwrap().is_empty());
}
