use super::*;

fn base(name: &str) -> ManifestBase {
    ManifestBase {
        name: name.into(),
        sandbox: "web".into(),
        sandbox_id: "abc".into(),
        backend: BackendKind::Linux,
        spec: SandboxSpec {
            name: "web".into(),
            ..Default::default()
        },
        resources: ResourceInfo::default(),
        created_at_ms: 1,
        leave_running: false,
        engine: BTreeMap::from([("criuVersion".to_string(), "4.1.1".to_string())]),
    }
}

fn key() -> CheckpointKey {
    CheckpointKey::from_bytes([7; 32], Path::new("/srv/warren/checkpoint.key"))
}

/// Writes `bytes` as the manifest, sealed with the test key (a checkpoint whose
/// writer had the key).
fn reseal(dir: &Path, bytes: &[u8]) {
    std::fs::write(dir.join(MANIFEST), bytes).unwrap();
    std::fs::write(dir.join(SEAL), key().seal(bytes)).unwrap();
}

fn payload(dir: &Path) {
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("images/pages-1.img"), vec![7u8; 5000]).unwrap();
    std::fs::write(dir.join("linux.json"), b"{}").unwrap();
}

#[test]
fn seal_then_verify_and_every_kind_of_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    payload(&dir);
    let m = Manifest::seal(&dir, base("c1"), &key()).unwrap();
    assert_eq!(m.size, 5002);
    assert_eq!(m.files.len(), 2);
    assert_eq!(m.criu_version.as_deref(), Some("4.1.1"));
    assert_eq!(Manifest::verify(&dir, "c1", &key()).unwrap(), m);

    // One byte changed.
    let pages = dir.join("images/pages-1.img");
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&pages, &bytes).unwrap();
    let err = Manifest::verify(&dir, "c1", &key())
        .unwrap_err()
        .to_string();
    assert!(err.contains("images/pages-1.img has sha256"), "{err}");
    bytes[100] ^= 1;
    // Truncated.
    std::fs::write(&pages, &bytes[..4000]).unwrap();
    let err = Manifest::verify(&dir, "c1", &key())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has 4000 bytes, the manifest says 5000"),
        "{err}"
    );
    std::fs::write(&pages, &bytes).unwrap();
    // Missing and extra files.
    std::fs::remove_file(dir.join("linux.json")).unwrap();
    let err = Manifest::verify(&dir, "c1", &key())
        .unwrap_err()
        .to_string();
    assert!(err.contains("linux.json is missing"), "{err}");
    std::fs::write(dir.join("linux.json"), b"{}").unwrap();
    std::fs::write(dir.join("images/extra.img"), b"x").unwrap();
    let err = Manifest::verify(&dir, "c1", &key())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("images/extra.img is not in the manifest"),
        "{err}"
    );
    std::fs::remove_file(dir.join("images/extra.img")).unwrap();
    assert!(Manifest::verify(&dir, "c1", &key()).is_ok());
    // A manifest whose list was edited without its digest (by someone with the key).
    let mut edited = m.clone();
    edited.files[0].size += 1;
    reseal(&dir, &serde_json::to_vec(&edited).unwrap());
    let err = Manifest::verify(&dir, "c1", &key())
        .unwrap_err()
        .to_string();
    assert!(err.contains("its file list has digest"), "{err}");
    // A truncated manifest.
    reseal(&dir, b"{\"format\":1,");
    let err = Manifest::verify(&dir, "c1", &key())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("checkpoint c1 is corrupt or incomplete: manifest.json:"),
        "{err}"
    );
}

#[test]
fn only_a_seal_made_with_the_servers_key_is_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    payload(&dir);
    let m = Manifest::seal(&dir, base("c1"), &key()).unwrap();
    let seal = std::fs::read_to_string(dir.join(SEAL)).unwrap();
    assert!(seal.starts_with("hmac-sha256:"), "{seal}");
    assert_eq!(Manifest::verify(&dir, "c1", &key()).unwrap(), m);

    // Another server's key.
    let other = CheckpointKey::from_bytes([8; 32], Path::new("/other.key"));
    let err = Manifest::verify(&dir, "c1", &other).unwrap_err();
    assert!(matches!(err, CheckpointError::Untrusted { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("has a seal made with another key") && msg.contains("/other.key"),
        "{msg}"
    );

    // A crafted manifest with a matching digest: a new spec and payload, the list and
    // its digest recomputed, but no key to seal it with.
    let mut crafted = m.clone();
    crafted.spec.command = vec!["/bin/evil".into()];
    std::fs::write(dir.join("linux.json"), b"{\"evil\":1}").unwrap();
    crafted.files = payload_files(&dir, "c1")
        .unwrap()
        .iter()
        .map(|rel| file_entry(&dir, rel).unwrap())
        .collect();
    crafted.digest = list_digest(&crafted.files);
    std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&crafted).unwrap()).unwrap();
    let err = Manifest::verify(&dir, "c1", &key())
        .unwrap_err()
        .to_string();
    assert!(err.contains("a manifest changed after sealing"), "{err}");
    // The same with a seal of garbage, and with none.
    std::fs::write(dir.join(SEAL), b"hmac-sha256:zz").unwrap();
    assert!(matches!(
        Manifest::verify(&dir, "c1", &key()),
        Err(CheckpointError::Untrusted { .. })
    ));
    std::fs::remove_file(dir.join(SEAL)).unwrap();
    let err = Manifest::verify(&dir, "c1", &key())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is not sealed (it has no manifest.mac)"),
        "{err}"
    );
}

#[test]
fn a_key_file_is_made_once_private_and_must_be_hex() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("checkpoint.key");
    let made = CheckpointKey::load_or_create(&path).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.trim().len(), 64, "{text:?}");
    let again = CheckpointKey::load_or_create(&path).unwrap();
    assert_eq!(again.key, made.key);
    assert_ne!(made.key, [0u8; 32]);
    // The key never shows in debug output.
    assert!(!format!("{made:?}").contains(text.trim()));

    // Two servers making the default key at once end with one key.
    let raced = tmp.path().join("raced.key");
    let keys: Vec<[u8; 32]> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| CheckpointKey::load_or_create(&raced).unwrap().key))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(keys.windows(2).all(|w| w[0] == w[1]));
    let strays: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".checkpoint-key-")
        })
        .collect();
    assert!(strays.is_empty(), "{strays:?}");
    // A named key is never made.
    assert!(matches!(
        CheckpointKey::load(&tmp.path().join("typo.key")),
        Err(CheckpointError::Io { .. })
    ));
    assert!(!tmp.path().join("typo.key").exists());

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = CheckpointKey::load_or_create(&path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("others may read or write it (mode 0644)"),
        "{err}"
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&path, "not hex\n").unwrap();
    let err = CheckpointKey::load_or_create(&path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("it must hold 64 hex digits"), "{err}");
    assert!(!err.contains("not hex"), "the content is not echoed: {err}");
}

#[test]
fn exports_start_with_the_seal_and_directories_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    payload(&dir);
    Manifest::seal(&dir, base("c"), &key()).unwrap();
    let out = tmp.path().join("x.tar");
    export(&dir, &out).unwrap();
    let mut a = tar::Archive::new(std::fs::File::open(&out).unwrap());
    let names: Vec<String> = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names[..2], [MANIFEST, SEAL], "{names:?}");
    // A directory output (here an existing empty one) is made private and whole.
    let to = tmp.path().join("empty");
    std::fs::create_dir(&to).unwrap();
    export(&dir, &to).unwrap();
    let mode = std::fs::metadata(&to).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    assert!(Manifest::verify(&to, "to", &key()).is_ok());
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".warren-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn checkpoints_stored_before_seals_are_sealed_when_the_store_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ck");
    let old = root.join("old");
    payload(&old);
    Manifest::seal(&old, base("old"), &key()).unwrap();
    std::fs::remove_file(old.join(SEAL)).unwrap();
    assert!(Manifest::verify(&old, "old", &key()).is_err());
    let _store = CheckpointStore::open(&root, key()).unwrap();
    assert!(Manifest::verify(&old, "old", &key()).is_ok());
    // Once only: an unsealed one copied in later is not blessed by the next start.
    let later = root.join("later");
    payload(&later);
    Manifest::seal(&later, base("later"), &key()).unwrap();
    std::fs::remove_file(later.join(SEAL)).unwrap();
    let _store = CheckpointStore::open(&root, key()).unwrap();
    assert!(matches!(
        Manifest::verify(&later, "later", &key()),
        Err(CheckpointError::Untrusted { .. })
    ));
}

#[test]
fn store_publish_list_lease_delete() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(CheckpointStore::open(&tmp.path().join("ck"), key()).unwrap());
    let scratch = store.scratch().unwrap();
    payload(&scratch.path);
    Manifest::seal(&scratch.path, base("one"), &key()).unwrap();
    let dir = store.publish(scratch, "one").unwrap();
    assert!(dir.join(MANIFEST).is_file());
    let dropped = store.scratch().unwrap();
    let left = dropped.path.clone();
    drop(dropped);
    assert!(!left.exists());
    assert!(matches!(
        store.check_free("one"),
        Err(CheckpointError::AlreadyExists { .. })
    ));
    assert!(matches!(
        store.check_free("../x"),
        Err(CheckpointError::Invalid(_))
    ));
    let names: Vec<String> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|(_, m)| m.name)
        .collect();
    assert_eq!(names, vec!["one"]);
    let lease = store.lease("one").unwrap();
    assert!(matches!(
        store.delete("one"),
        Err(CheckpointError::InUse { .. })
    ));
    drop(lease);
    assert!(store.delete("one").unwrap().is_some());
    assert!(matches!(
        store.delete("one"),
        Err(CheckpointError::NotFound { .. })
    ));
}

#[test]
fn outputs_that_are_links_or_unknown_archives_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dangling = tmp.path().join("dangling");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
    let err = check_output(&dangling).unwrap_err().to_string();
    assert!(err.contains("is a symlink"), "{err}");
    let to_dir = tmp.path().join("to-dir");
    std::os::unix::fs::symlink(tmp.path(), &to_dir).unwrap();
    assert!(check_output(&to_dir).is_err());
    let err = check_output(&tmp.path().join("x.zip"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ends in .zip: the output is a directory, or a .tar"),
        "{err}"
    );
    for fine in ["x.tar", "x.tar.gz", "x.tgz", "plain-dir"] {
        check_output(&tmp.path().join(fine)).unwrap();
    }
}

#[test]
fn export_and_import_as_tar_gzip_and_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    payload(&dir);
    let m = Manifest::seal(&dir, base("c"), &key()).unwrap();
    for name in ["x.tar", "x.tar.gz"] {
        let out = tmp.path().join(name);
        export(&dir, &out).unwrap();
        let into = tmp.path().join(format!("in-{name}"));
        std::fs::create_dir(&into).unwrap();
        import(&out, &into, &key()).unwrap();
        assert_eq!(Manifest::verify(&into, name, &key()).unwrap(), m);
        // Truncated archives: refused by the unpack or by the verify.
        let bytes = std::fs::read(&out).unwrap();
        let cut = tmp.path().join(format!("cut-{name}"));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let into = tmp.path().join(format!("cut-in-{name}"));
        std::fs::create_dir(&into).unwrap();
        let refused = import(&cut, &into, &key())
            .and_then(|()| Manifest::verify(&into, name, &key()).map(|_| ()));
        assert!(refused.is_err(), "{name}");
    }
    let out = tmp.path().join("copy");
    export(&dir, &out).unwrap();
    assert_eq!(Manifest::verify(&out, "copy", &key()).unwrap(), m);
    assert!(
        export(&dir, &out).is_err(),
        "a non-empty directory is refused"
    );
    assert!(export(&dir, Path::new("rel.tar")).is_err());
}

#[test]
fn hostile_archives_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let evil = tmp.path().join("evil.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&evil).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_link_name("/etc/passwd").unwrap();
    b.append_data(&mut h, "link", std::io::empty()).unwrap();
    b.finish().unwrap();
    drop(b);
    let into = tmp.path().join("in");
    std::fs::create_dir(&into).unwrap();
    let err = import(&evil, &into, &key()).unwrap_err().to_string();
    assert!(err.contains("not a file or directory"), "{err}");
    std::fs::write(
        tmp.path().join("junk.tar"),
        b"not a tar at all, just some words",
    )
    .unwrap();
    assert!(import(&tmp.path().join("junk.tar"), &into, &key()).is_err());

    // A tar of a checkpoint's files whose payload comes before the seal, and one with a
    // file the manifest does not list: nothing of the payload is unpacked.
    let dir = tmp.path().join("c");
    payload(&dir);
    Manifest::seal(&dir, base("c"), &key()).unwrap();
    let unsealed_first = tmp.path().join("first.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&unsealed_first).unwrap());
    for f in ["linux.json", MANIFEST, SEAL] {
        b.append_path_with_name(dir.join(f), f).unwrap();
    }
    b.finish().unwrap();
    drop(b);
    let into = tmp.path().join("in-first");
    std::fs::create_dir(&into).unwrap();
    let err = import(&unsealed_first, &into, &key()).unwrap_err();
    assert!(matches!(err, CheckpointError::Untrusted { .. }), "{err}");
    assert!(std::fs::read_dir(&into).unwrap().next().is_none());
    let extra = tmp.path().join("extra.tar");
    let mut b = tar::Builder::new(std::fs::File::create(&extra).unwrap());
    for f in [MANIFEST, SEAL, "linux.json"] {
        b.append_path_with_name(dir.join(f), f).unwrap();
    }
    b.append_path_with_name(dir.join("linux.json"), "unlisted.bin")
        .unwrap();
    b.finish().unwrap();
    drop(b);
    let into = tmp.path().join("in-extra");
    std::fs::create_dir(&into).unwrap();
    let err = import(&extra, &into, &key()).unwrap_err().to_string();
    assert!(err.contains("unlisted.bin is not in the manifest"), "{err}");
    assert!(!into.join("unlisted.bin").exists());
}

#[test]
fn imports_refuse_what_they_would_read_unbounded_or_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    payload(&dir);
    Manifest::seal(&dir, base("c"), &key()).unwrap();
    let archive = |name: &str, build: &dyn Fn(&mut tar::Builder<std::fs::File>)| {
        let path = tmp.path().join(name);
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        build(&mut b);
        b.finish().unwrap();
        drop(b);
        let into = tmp.path().join(format!("in-{name}"));
        std::fs::create_dir(&into).unwrap();
        (path, into)
    };
    // A GNU long name (its body is a name the tar crate would read whole into memory).
    let long = "x".repeat(300);
    let (path, into) = archive("long.tar", &|b| {
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, &long, &b"z"[..]).unwrap();
    });
    let err = import(&path, &into, &key()).unwrap_err().to_string();
    assert!(err.contains("not a file or directory"), "{err}");
    // A PAX header (its size record would override the entry's).
    let (path, into) = archive("pax.tar", &|b| {
        b.append_pax_extensions([("size", &b"314572800"[..])])
            .unwrap();
        b.append_path_with_name(dir.join(MANIFEST), MANIFEST)
            .unwrap();
    });
    let err = import(&path, &into, &key()).unwrap_err().to_string();
    assert!(err.contains("not a file or directory"), "{err}");
    // A listed file twice.
    let (path, into) = archive("twice.tar", &|b| {
        for f in [MANIFEST, SEAL, "linux.json", "linux.json"] {
            b.append_path_with_name(dir.join(f), f).unwrap();
        }
    });
    let err = import(&path, &into, &key()).unwrap_err().to_string();
    assert!(err.contains("linux.json appears twice"), "{err}");
}

#[test]
fn a_directory_restore_copies_listed_regular_files_and_refuses_others() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("c");
    payload(&dir);
    let m = Manifest::seal(&dir, base("c"), &key()).unwrap();
    // A file the manifest does not list, or one grown since, is damage: said, nothing
    // copied.
    std::fs::write(dir.join("images/extra.img"), vec![0u8; 4096]).unwrap();
    let refused = tmp.path().join("refused");
    std::fs::create_dir(&refused).unwrap();
    let err = copy_in(&dir, &refused, &key()).unwrap_err().to_string();
    assert!(
        err.contains("images/extra.img is not in the manifest"),
        "{err}"
    );
    assert!(std::fs::read_dir(&refused).unwrap().next().is_none());
    std::fs::remove_file(dir.join("images/extra.img")).unwrap();
    let listed = std::fs::read(dir.join("linux.json")).unwrap();
    std::fs::write(dir.join("linux.json"), [&listed[..], b" "].concat()).unwrap();
    let err = copy_in(&dir, &refused, &key()).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "linux.json has {} bytes, the manifest says {}",
            listed.len() + 1,
            listed.len()
        )),
        "{err}"
    );
    std::fs::write(dir.join("linux.json"), &listed).unwrap();
    let into = tmp.path().join("in");
    std::fs::create_dir(&into).unwrap();
    copy_in(&dir, &into, &key()).unwrap();
    assert_eq!(Manifest::verify(&into, "in", &key()).unwrap(), m);
    // A seal that is a link (to anything, however large) is not followed.
    std::fs::rename(dir.join(SEAL), tmp.path().join("mac")).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("mac"), dir.join(SEAL)).unwrap();
    let into = tmp.path().join("in2");
    std::fs::create_dir(&into).unwrap();
    let err = copy_in(&dir, &into, &key()).unwrap_err().to_string();
    assert!(err.contains("manifest.mac is a symlink"), "{err}");
    assert!(std::fs::read_dir(&into).unwrap().next().is_none());
}
