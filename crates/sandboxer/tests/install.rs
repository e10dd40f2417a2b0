//! `scripts/install.sh` into temp directories: the binaries and units land where asked, the
//! units run the installed binaries, and `systemd-analyze verify` accepts them.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const BINS: [&str; 4] = [
    "warren",
    "warren-supervise",
    "containerd-shim-warren-v1",
    "resource-slot-sandboxer",
];
const UNITS: [&str; 3] = [
    "warren.service",
    "warren-sandboxer.service",
    "kuasar-resource-slot.service",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A --bin-dir as `cargo build --release` would leave it: the real sandboxer binary, and
/// stand-ins for the binaries of other crates (this test checks the installer, not them).
fn bin_dir(root: &Path) -> PathBuf {
    let dir = root.join("built");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_resource-slot-sandboxer"),
        dir.join("resource-slot-sandboxer"),
    )
    .unwrap();
    for b in ["warren", "warren-supervise", "containerd-shim-warren-v1"] {
        let p = dir.join(b);
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

fn install(args: &[&str]) -> std::process::Output {
    let out = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .args(args)
        .env_remove("DESTDIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn installs_into_a_destdir_and_nowhere_else() {
    let tmp = tempfile::tempdir().unwrap();
    let bins = bin_dir(tmp.path());
    let dest = tmp.path().join("root");
    install(&[
        "--no-build",
        "--bin-dir",
        bins.to_str().unwrap(),
        "--destdir",
        dest.to_str().unwrap(),
    ]);
    for b in BINS {
        let p = dest.join("usr/local/bin").join(b);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755, "{}", p.display());
    }
    for u in UNITS {
        let p = dest.join("etc/systemd/system").join(u);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains("@BINDIR@"), "{u}: {text}");
        assert!(text.contains("ExecStart=/usr/local/bin/"), "{u}: {text}");
        assert!(text.contains("After=network.target") && text.contains("Restart=always"));
    }
    let unit =
        std::fs::read_to_string(dest.join("etc/systemd/system/kuasar-resource-slot.service"))
            .unwrap();
    assert!(unit.contains(
        "ExecStart=/usr/local/bin/resource-slot-sandboxer --listen /run/resource-slot-sandboxer.sock --dir /var/lib/kuasar-resource-slot --log-level info"
    ));
    let unit =
        std::fs::read_to_string(dest.join("etc/systemd/system/warren-sandboxer.service")).unwrap();
    assert!(unit.contains("Type=notify"), "{unit}");
}

#[test]
fn installed_units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let bins = bin_dir(tmp.path());
    let prefix = tmp.path().join("usr");
    let units = tmp.path().join("units");
    install(&[
        "--no-build",
        "--bin-dir",
        bins.to_str().unwrap(),
        "--prefix",
        prefix.to_str().unwrap(),
        "--unit-dir",
        units.to_str().unwrap(),
    ]);
    let files: Vec<PathBuf> = UNITS.iter().map(|u| units.join(u)).collect();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            text.contains(&format!("ExecStart={}/bin/", prefix.display())),
            "{text}"
        );
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze is not installed on this machine: the units were NOT verified");
        return;
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "systemd-analyze verify: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And it does catch a unit whose binary is missing.
    std::fs::remove_file(prefix.join("bin/resource-slot-sandboxer")).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.join("kuasar-resource-slot.service"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "verify passed a unit without its binary"
    );
}

#[test]
fn bad_arguments_are_refused_before_touching_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let bins = bin_dir(tmp.path());
    for args in [
        vec!["--no-build", "--prefix", "relative"],
        vec!["--no-build", "--bogus"],
        vec!["--no-build", "--destdir", "/tmp/x", "--enable"],
    ] {
        let out = Command::new("bash")
            .arg(repo().join("scripts/install.sh"))
            .args(&args)
            .args(["--bin-dir", bins.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let out = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .args([
            "--no-build",
            "--bin-dir",
            tmp.path().join("empty").to_str().unwrap(),
        ])
        .args(["--destdir", tmp.path().join("root").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such executable"));
    assert!(!tmp.path().join("root").exists());
}
