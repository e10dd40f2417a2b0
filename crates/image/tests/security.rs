//! Hostile layers: nothing may be written or linked outside the layer directory, the error must
//! name the entry, and a failed unpack must leave nothing behind.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use warren_image::testing::{self, Config, Entry, Layer, Malicious};
use warren_image::{ImageError, ImageStore};

fn assert_sentinel_untouched(dir: &Path, kind: Malicious) {
    let sentinel = testing::sentinel_dir(dir);
    let names: Vec<String> = fs::read_dir(&sentinel)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["victim"], "{kind:?}: sentinel dir changed");
    let victim = sentinel.join("victim");
    assert_eq!(fs::read(&victim).unwrap(), b"untouched\n", "{kind:?}");
    assert_eq!(
        fs::metadata(&victim).unwrap().nlink(),
        1,
        "{kind:?}: victim was hard-linked"
    );
}

fn assert_store_clean(store: &ImageStore, kind: Malicious) {
    assert!(store.list().unwrap().is_empty(), "{kind:?}");
    for sub in ["layers", "tmp"] {
        let left: Vec<_> = fs::read_dir(store.root().join(sub)).unwrap().collect();
        assert!(left.is_empty(), "{kind:?}: {sub}/ not empty: {left:?}");
    }
}

#[test]
fn malicious_layers_are_rejected_and_write_nothing_outside() {
    for kind in Malicious::ALL {
        for as_tar in [false, true] {
            let tmp = tempfile::tempdir().unwrap();
            let store = ImageStore::open(&tmp.path().join("store")).unwrap();
            let layout = testing::malicious_layout(tmp.path(), kind).unwrap();
            let source = if as_tar {
                testing::tar_layout(&layout).unwrap()
            } else {
                layout
            };
            let err = store
                .import(&source, None)
                .expect_err(&format!("{kind:?} was accepted"));
            let text = err.to_string();
            assert!(
                matches!(err, ImageError::UnsafeEntry { .. }),
                "{kind:?}: {text}"
            );
            assert!(
                text.starts_with("layer sha256:") && text.contains(" entry \""),
                "{kind:?}: {text}"
            );
            let expected = match kind {
                Malicious::DotDot | Malicious::HardlinkOutside => "escapes the rootfs",
                Malicious::Absolute | Malicious::HardlinkAbsolute => "absolute path",
                Malicious::SymlinkParent => "has a symlink \"etc\" as a parent directory",
                Malicious::HardlinkThroughSymlink => "has a symlink \"s\" as a parent directory",
            };
            assert!(text.contains(expected), "{kind:?}: {text}");
            assert_sentinel_untouched(tmp.path(), kind);
            assert_store_clean(&store, kind);
            assert!(!Path::new("/pwned").exists());
        }
    }
}

#[test]
fn dot_dot_error_names_the_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let layout = testing::write_layout(
        &tmp.path().join("dotdot"),
        Some("dotdot"),
        &[Layer::gzip(vec![Entry::file(
            "../../etc/passwd",
            0o644,
            b"x",
        )])],
        &Config::default(),
    )
    .unwrap();
    let text = store.import(&layout, None).unwrap_err().to_string();
    assert!(
        text.contains("entry \"../../etc/passwd\" escapes the rootfs"),
        "{text}"
    );
}

#[test]
fn symlink_to_a_directory_then_a_file_beneath_it_is_refused() {
    // `etc -> /etc` followed by `etc/passwd` must not overwrite the host's /etc/passwd. (The
    // entry goes through the symlink; the store must refuse rather than follow.)
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let before = fs::read("/etc/passwd").unwrap();
    let layout = testing::write_layout(
        &tmp.path().join("etc"),
        Some("etc"),
        &[Layer::gzip(vec![
            Entry::symlink("etc", "/etc"),
            Entry::file("etc/passwd", 0o644, b"root::0:0::/:/bin/sh\n"),
        ])],
        &Config::default(),
    )
    .unwrap();
    let err = store.import(&layout, None).unwrap_err();
    assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
    assert_eq!(fs::read("/etc/passwd").unwrap(), before);
}

#[test]
fn whiteout_cannot_escape_either() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let sentinel = testing::sentinel_dir(tmp.path());
    fs::create_dir_all(&sentinel).unwrap();
    fs::write(sentinel.join("victim"), b"untouched\n").unwrap();
    let abs = fs::canonicalize(&sentinel).unwrap();
    for (label, entries) in [
        (
            "wh-symlink",
            vec![
                Entry::symlink("s", abs.to_str().unwrap()),
                Entry::file("s/.wh.victim", 0o644, b""),
            ],
        ),
        (
            "wh-opaque",
            vec![
                Entry::symlink("s", abs.to_str().unwrap()),
                Entry::file("s/.wh..wh..opq", 0o644, b""),
            ],
        ),
        (
            "wh-dotdot",
            vec![Entry::file("a/../../.wh.victim", 0o644, b"")],
        ),
    ] {
        let layout = testing::write_layout(
            &tmp.path().join(label),
            Some(label),
            &[Layer::gzip(entries)],
            &Config::default(),
        )
        .unwrap();
        let err = store.import(&layout, None).unwrap_err();
        assert!(
            matches!(err, ImageError::UnsafeEntry { .. }),
            "{label}: {err}"
        );
        assert_eq!(fs::read(sentinel.join("victim")).unwrap(), b"untouched\n");
        assert!(
            rustix::fs::getxattr(abs.as_path(), "trusted.overlay.opaque", &mut [0u8; 8]).is_err()
        );
    }
}
