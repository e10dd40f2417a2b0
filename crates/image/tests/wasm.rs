//! WebAssembly images: Wasm OCI artifacts (imported as layouts or bare modules) kept as blobs,
//! and runwasi-style images whose entrypoint is a `.wasm` file in their layers.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use warren_image::testing::{self, Config, Entry, Layer};
use warren_image::{ImageError, ImageKind, ImageStore};

/// The smallest valid module: magic and version 1, no sections.
const MODULE: &[u8] = b"\0asm\x01\0\0\0";

fn setup() -> (tempfile::TempDir, ImageStore) {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    (tmp, store)
}

fn dir_count(dir: &Path) -> usize {
    fs::read_dir(dir).unwrap().count()
}

fn blobs_dir(store: &ImageStore) -> PathBuf {
    store.root().join("blobs/sha256")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn write_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = format!("{:x}", Sha256::digest(bytes));
    fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

/// The (single) manifest of a layout.
fn manifest(layout: &Path) -> Value {
    let index = read_json(&layout.join("index.json"));
    read_json(&blob_path(
        layout,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
}

/// Replaces a layout's config blob with `config` and edits its manifest, re-hashing both.
fn rewrite(layout: &Path, config: &[u8], edit_manifest: impl FnOnce(&mut Value)) {
    let mut index = read_json(&layout.join("index.json"));
    let mut manifest = manifest(layout);
    let (digest, size) = write_blob(layout, config);
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = size.into();
    edit_manifest(&mut manifest);
    let (digest, size) = write_blob(layout, &serde_json::to_vec(&manifest).unwrap());
    index["manifests"][0]["digest"] = digest.into();
    index["manifests"][0]["size"] = size.into();
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
}

fn scratch_image(dir: &Path, name: &str, layers: Vec<Vec<Entry>>, config: Config) -> PathBuf {
    let layers: Vec<Layer> = layers.into_iter().map(Layer::gzip).collect();
    testing::write_layout(&dir.join(name), Some(name), &layers, &config).unwrap()
}

fn entrypoint(path: &str) -> Config {
    Config {
        env: Vec::new(),
        cmd: Vec::new(),
        entrypoint: vec![path.to_string()],
        working_dir: None,
        user: None,
    }
}

fn cmd_in(dir: &str, path: &str) -> Config {
    Config {
        cmd: vec![path.to_string()],
        working_dir: Some(dir.to_string()),
        entrypoint: Vec::new(),
        ..entrypoint("")
    }
}

#[test]
fn wasm_artifact_layout_is_kept_as_a_blob() {
    let (tmp, store) = setup();
    let layout = testing::wasm_layout(&tmp.path().join("hello"), "hello", MODULE).unwrap();
    let manifest = manifest(&layout);
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.wasm.config.v0+json"
    );
    assert_eq!(manifest["layers"][0]["mediaType"], "application/wasm");

    let summary = store.import(&layout, None).unwrap().remove(0);
    assert_eq!(summary.names, vec!["hello:latest"]);
    assert_eq!(summary.kind, ImageKind::Wasm);
    assert_eq!(summary.layers, 1);
    assert_eq!(summary.size, MODULE.len() as u64);
    assert_eq!(summary.created, None);

    let image = store.resolve("hello").unwrap();
    assert_eq!(image.id, summary.id);
    assert!(image.layers.is_empty());
    let module = image.wasm.clone().unwrap();
    assert_eq!(fs::read(&module).unwrap(), MODULE);
    assert_eq!(module.parent().unwrap(), blobs_dir(&store));
    assert_eq!(image.wasm_module().unwrap(), Some(module));
    assert_eq!(
        dir_count(&store.root().join("layers")),
        0,
        "nothing unpacked"
    );
    assert_eq!(dir_count(&blobs_dir(&store)), 3, "manifest, config, module");
    assert_eq!(dir_count(&store.root().join("tmp")), 0);

    // The same artifact from a tar and a gzipped tar of the layout.
    let tar = testing::tar_layout(&layout).unwrap();
    let tgz = testing::tar_gz_layout(&layout).unwrap();
    assert_eq!(store.import(&tar, Some("t")).unwrap()[0].id, summary.id);
    assert_eq!(store.import(&tgz, Some("tgz")).unwrap()[0].id, summary.id);
    assert_eq!(dir_count(&blobs_dir(&store)), 3);

    // Ordinary images say they are not Wasm.
    let busybox = testing::busybox_layout(&tmp.path().join("busybox"), "busybox").unwrap();
    let summary = store.import(&busybox, None).unwrap().remove(0);
    assert_eq!(summary.kind, ImageKind::Container);
    let image = store.resolve("busybox").unwrap();
    assert_eq!(image.wasm, None);
    assert_eq!(image.wasm_module().unwrap(), None);
}

#[test]
fn old_wasm_to_oci_media_types_and_lenient_configs() {
    let (tmp, store) = setup();
    for (n, config) in [
        &b"{}"[..],
        b"",
        br#"{"created":"2023-05-06T07:08:09Z","extra":[1]}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let layout =
            testing::wasm_layout(&tmp.path().join(format!("old{n}")), "old", MODULE).unwrap();
        rewrite(&layout, config, |manifest| {
            manifest["config"]["mediaType"] = "application/vnd.wasm.config.v1+json".into();
            manifest["layers"][0]["mediaType"] =
                "application/vnd.wasm.content.layer.v1+wasm".into();
            manifest.as_object_mut().unwrap().remove("artifactType");
        });
        let summary = store
            .import(&layout, Some(&format!("old{n}")))
            .unwrap()
            .remove(0);
        assert_eq!(summary.kind, ImageKind::Wasm, "config {n}");
        let image = store.resolve(&format!("old{n}")).unwrap();
        assert_eq!(fs::read(image.wasm.unwrap()).unwrap(), MODULE);
        let created = (n == 2).then(|| "2023-05-06T07:08:09Z".to_string());
        assert_eq!(summary.created, created, "config {n}");
    }
}

#[test]
fn bare_wasm_and_wat_modules_import_under_names() {
    let (tmp, store) = setup();
    let wasm = tmp.path().join("hello.wasm");
    fs::write(&wasm, MODULE).unwrap();
    let summary = store.import_wasm(&wasm, "hello").unwrap();
    assert_eq!(summary.names, vec!["hello:latest"]);
    assert_eq!(summary.kind, ImageKind::Wasm);
    let image = store.resolve("hello").unwrap();
    assert_eq!(
        fs::read(image.wasm_module().unwrap().unwrap()).unwrap(),
        MODULE
    );

    // The same blobs as a Wasm artifact layout of the same module: the same image.
    let layout = testing::wasm_layout(&tmp.path().join("layout"), "from-layout", MODULE).unwrap();
    assert_eq!(store.import(&layout, None).unwrap()[0].id, summary.id);

    // WAT text is compiled; `(module)` is the same 8 bytes, so the same image again.
    let wat = tmp.path().join("hello.wat");
    fs::write(&wat, "(module)").unwrap();
    let from_wat = store.import_wasm(&wat, "registry.example/app:v2").unwrap();
    assert_eq!(from_wat.id, summary.id);
    assert_eq!(
        from_wat.names,
        vec![
            "from-layout:latest",
            "hello:latest",
            "registry.example/app:v2"
        ]
    );
    assert_eq!(dir_count(&blobs_dir(&store)), 3, "content addressed");

    // A real WAT module, through `import` (which takes any `.wat`/`.wasm` file for a module).
    let wat2 = tmp.path().join("answer.wat");
    fs::write(
        &wat2,
        r#"(module (func (export "answer") (result i32) i32.const 42))"#,
    )
    .unwrap();
    let answer = store.import(&wat2, Some("answer")).unwrap().remove(0);
    assert_ne!(answer.id, summary.id);
    let bytes = fs::read(store.resolve("answer").unwrap().wasm.unwrap()).unwrap();
    assert!(bytes.starts_with(b"\0asm\x01\0\0\0") && bytes.len() > 8);
    assert_eq!(answer.size, bytes.len() as u64);

    // `import` detects a binary module by its magic, whatever its name.
    let renamed = tmp.path().join("module.bin");
    fs::write(&renamed, MODULE).unwrap();
    assert_eq!(
        store.import(&renamed, Some("bin")).unwrap()[0].id,
        summary.id
    );
    let err = store.import(&renamed, None).unwrap_err();
    assert!(matches!(err, ImageError::InvalidName { .. }), "{err}");
    assert!(err.to_string().contains("module.bin"), "{err}");
}

#[test]
fn files_that_are_not_modules_are_refused() {
    let (tmp, store) = setup();
    let text = tmp.path().join("notes.txt");
    fs::write(&text, "hello, world\n").unwrap();
    let err = store.import_wasm(&text, "x").unwrap_err();
    assert!(matches!(err, ImageError::InvalidModule { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("notes.txt") && message.contains("\\0asm") && message.contains("WAT"),
        "{message}"
    );
    assert!(
        std::error::Error::source(&err).is_some(),
        "the WAT error is the cause"
    );

    let short = tmp.path().join("short.wasm");
    fs::write(&short, b"\0asm").unwrap();
    let err = store.import(&short, Some("x")).unwrap_err().to_string();
    assert!(
        err.contains("short.wasm") && err.contains("8-byte"),
        "{err}"
    );

    let bad_wat = tmp.path().join("bad.wat");
    fs::write(&bad_wat, "(module (func $f (unknown_instruction)))").unwrap();
    let err = store.import_wasm(&bad_wat, "x").unwrap_err().to_string();
    assert!(err.contains("bad.wat"), "{err}");

    let err = store
        .import_wasm(&tmp.path().join("missing.wasm"), "x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.wasm"), "{err}");
    assert!(store.list().unwrap().is_empty());
    assert_eq!(dir_count(&blobs_dir(&store)), 0);
}

#[test]
fn bad_wasm_artifacts_are_refused() {
    let (tmp, store) = setup();

    // A module blob that does not hash to its digest (same size).
    let layout = testing::wasm_layout(&tmp.path().join("corrupt"), "corrupt", MODULE).unwrap();
    let digest = manifest(&layout)["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    fs::write(blob_path(&layout, &digest), b"\0asm\x02\0\0\0").unwrap();
    let err = store.import(&layout, None).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&digest), "{err}");
    // And one of another size.
    fs::write(blob_path(&layout, &digest), b"\0asm\x01\0\0\0\0").unwrap();
    let err = store.import(&layout, None).unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");

    // A Wasm layer beside a tar layer.
    let mixed = testing::wasm_layout(&tmp.path().join("mixed"), "mixed", MODULE).unwrap();
    rewrite(&mixed, b"{}", |manifest| {
        let layers = manifest["layers"].as_array_mut().unwrap();
        layers.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", "ab".repeat(32)),
            "size": 10,
        }));
    });
    let err = store.import(&mixed, None).unwrap_err();
    assert!(matches!(err, ImageError::InvalidManifest { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("\"application/wasm\"")
            && message.contains("\"application/vnd.oci.image.layer.v1.tar+gzip\""),
        "{message}"
    );

    // Two Wasm layers.
    let two = testing::wasm_layout(&tmp.path().join("two"), "two", MODULE).unwrap();
    rewrite(&two, b"{}", |manifest| {
        let layer = manifest["layers"][0].clone();
        manifest["layers"].as_array_mut().unwrap().push(layer);
    });
    let err = store.import(&two, None).unwrap_err().to_string();
    assert!(
        err.contains("2 layers") && err.contains("exactly one"),
        "{err}"
    );

    // A Wasm config over a tar layer.
    let tarred = scratch_image(
        tmp.path(),
        "tarred",
        vec![vec![Entry::file("app.wasm", 0o644, MODULE)]],
        entrypoint("/app.wasm"),
    );
    rewrite(&tarred, b"{}", |manifest| {
        manifest["config"]["mediaType"] = "application/vnd.wasm.config.v0+json".into();
    });
    let err = store.import(&tarred, None).unwrap_err().to_string();
    assert!(
        err.contains("application/vnd.wasm.config.v0+json") && err.contains("no layer"),
        "{err}"
    );

    // A "Wasm" layer that is a gzip.
    let gz = testing::wasm_layout(
        &tmp.path().join("gz"),
        "gz",
        &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0],
    )
    .unwrap();
    let err = store.import(&gz, None).unwrap_err().to_string();
    assert!(err.contains("not a Wasm binary"), "{err}");

    assert!(store.list().unwrap().is_empty());
    assert_eq!(dir_count(&store.root().join("tmp")), 0);
}

#[test]
fn runwasi_style_image_resolves_its_module() {
    let (tmp, store) = setup();
    let layout =
        testing::wasm_in_scratch_layout(&tmp.path().join("scratch"), "app", MODULE).unwrap();
    let summary = store.import(&layout, None).unwrap().remove(0);
    assert_eq!(summary.kind, ImageKind::Container);
    let image = store.resolve("app").unwrap();
    assert_eq!(image.wasm, None);
    assert_eq!(image.config.entrypoint, vec!["/app.wasm"]);
    let module = image.wasm_module().unwrap().unwrap();
    assert_eq!(module, image.layers[0].join("app.wasm"));
    assert_eq!(fs::read(&module).unwrap(), MODULE);

    // The top layer's copy wins; a relative cmd is taken from the working directory.
    // A module with one (function) type section.
    let newer = b"\0asm\x01\0\0\0\x01\x04\x01\x60\0\0";
    let layered = scratch_image(
        tmp.path(),
        "layered",
        vec![
            vec![Entry::file("srv/bin/app.wasm", 0o755, MODULE)],
            vec![Entry::file("srv/bin/app.wasm", 0o755, newer)],
            vec![Entry::file("srv/other", 0o644, b"")],
        ],
        cmd_in("/srv", "bin/app.wasm"),
    );
    store.import(&layered, None).unwrap();
    let image = store.resolve("layered").unwrap();
    let module = image.wasm_module().unwrap().unwrap();
    assert_eq!(module, image.layers[1].join("srv/bin/app.wasm"));
    assert_eq!(fs::read(&module).unwrap(), newer);

    // An entrypoint that is not a .wasm file: not a Wasm image.
    let plain = scratch_image(
        tmp.path(),
        "plain",
        vec![vec![Entry::file("app.wasm", 0o644, MODULE)]],
        entrypoint("/bin/sh"),
    );
    store.import(&plain, None).unwrap();
    assert_eq!(store.resolve("plain").unwrap().wasm_module().unwrap(), None);
}

#[test]
fn runwasi_style_module_must_be_a_visible_regular_file() {
    let (tmp, store) = setup();
    let cases: Vec<(&str, Vec<Vec<Entry>>, &str, &str)> = vec![
        (
            "symlink",
            vec![vec![
                Entry::file("real.wasm", 0o755, MODULE),
                Entry::symlink("app.wasm", "real.wasm"),
            ]],
            "/app.wasm",
            "is a symlink",
        ),
        (
            "parent-symlink",
            vec![vec![
                Entry::file("real/app.wasm", 0o755, MODULE),
                Entry::symlink("bin", "real"),
            ]],
            "/bin/app.wasm",
            "through a symlink (/bin)",
        ),
        (
            "missing",
            vec![vec![Entry::file("other.wasm", 0o755, MODULE)]],
            "/app.wasm",
            "is not in the image's layers",
        ),
        (
            "whiteout",
            vec![
                vec![Entry::file("app.wasm", 0o755, MODULE)],
                vec![Entry::file(".wh.app.wasm", 0o644, b"")],
            ],
            "/app.wasm",
            "deleted by a whiteout",
        ),
        (
            "parent-whiteout",
            vec![
                vec![Entry::file("bin/app.wasm", 0o755, MODULE)],
                vec![Entry::file(".wh.bin", 0o644, b"")],
            ],
            "/bin/app.wasm",
            "/bin is whited out",
        ),
        (
            "opaque",
            vec![
                vec![Entry::file("bin/app.wasm", 0o755, MODULE)],
                vec![
                    Entry::file("bin/.wh..wh..opq", 0o644, b""),
                    Entry::file("bin/other", 0o644, b""),
                ],
            ],
            "/bin/app.wasm",
            "is not in the image's layers",
        ),
        (
            "directory",
            vec![vec![Entry::dir("app.wasm", 0o755)]],
            "/app.wasm",
            "is a directory",
        ),
        (
            "dotdot",
            vec![vec![Entry::file("app.wasm", 0o755, MODULE)]],
            "/tmp/../app.wasm",
            "\"..\"",
        ),
    ];
    for (name, layers, path, reason) in cases {
        let layout = scratch_image(tmp.path(), name, layers, entrypoint(path));
        store.import(&layout, None).unwrap();
        let err = store.resolve(name).unwrap().wasm_module().unwrap_err();
        assert!(
            matches!(err, ImageError::WasmModule { .. }),
            "{name}: {err}"
        );
        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "image {name}:latest: config.entrypoint[0] \"{path}\" "
            )) && message.contains(reason),
            "{name}: {message}"
        );
    }
}

#[test]
fn removing_a_wasm_image_collects_its_module() {
    let (tmp, store) = setup();
    let wasm = tmp.path().join("hello.wasm");
    fs::write(&wasm, MODULE).unwrap();
    let hello = store.import_wasm(&wasm, "hello").unwrap();
    store.import_wasm(&wasm, "hello2").unwrap();
    let other = tmp.path().join("other.wat");
    fs::write(&other, r#"(module (memory 1))"#).unwrap();
    store.import_wasm(&other, "other").unwrap();
    let module = store.resolve("hello").unwrap().wasm.unwrap();
    assert_eq!(dir_count(&blobs_dir(&store)), 6);

    // One of two names: the image and its module stay.
    store.remove("hello").unwrap();
    assert!(module.is_file());
    assert_eq!(store.resolve("hello2").unwrap().id, hello.id);

    let removed = store.remove("hello2").unwrap();
    assert_eq!(removed.id, hello.id);
    assert_eq!(removed.kind, ImageKind::Wasm);
    assert!(!module.exists(), "the module blob is collected");
    assert_eq!(
        dir_count(&blobs_dir(&store)),
        3,
        "the other image's blobs stay"
    );
    assert!(store.resolve("other").unwrap().wasm.unwrap().is_file());

    store.remove("other").unwrap();
    assert_eq!(dir_count(&blobs_dir(&store)), 0);
    assert_eq!(store.gc().unwrap().blobs, 0);
}

#[test]
fn index_records_of_container_images_are_unchanged() {
    let (tmp, store) = setup();
    let layout = testing::busybox_layout(&tmp.path().join("busybox"), "busybox").unwrap();
    store.import(&layout, None).unwrap();
    let wasm = tmp.path().join("hello.wasm");
    fs::write(&wasm, MODULE).unwrap();
    let hello = store.import_wasm(&wasm, "hello").unwrap();
    let index = read_json(&store.root().join("index.json"));
    assert_eq!(index["version"], 1);
    for (id, record) in index["images"].as_object().unwrap() {
        let keys: Vec<&String> = record.as_object().unwrap().keys().collect();
        if *id == hello.id {
            assert_eq!(record["layers"], json!([]));
            assert_eq!(record["wasm"]["size"], 8);
        } else {
            // What earlier versions wrote and read: no new keys.
            assert_eq!(
                keys,
                vec!["config", "created", "image_config", "layers", "names"]
            );
        }
    }
}
