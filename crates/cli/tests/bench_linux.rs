//! `warren bench run -b linux` end to end, as a smoke test: it runs, counts what it ran, and
//! leaves no cgroup or peer state behind. No figure is checked (the machine is shared).
//! Needs root; without it each test prints why it skips.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::WARREN;

fn skip_reason() -> Option<&'static str> {
    if !nix::unistd::geteuid().is_root() {
        return Some("SKIP: the linux backend needs root");
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("SKIP: /bin/busybox (Debian busybox-static) is not installed");
    }
    None
}

/// Runs `warren bench run -b linux ... --json -- /bin/true` on a private server; returns the
/// JSON line and the bench's pid (which names its cgroup parent).
fn bench(extra: &[&str]) -> (serde_json::Value, u32) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = warren_image::testing::busybox_layout(tmp.path(), "busybox").expect("layout");
    let child = Command::new(WARREN)
        .args([
            "bench",
            "run",
            "-b",
            "linux",
            "-i",
            "busybox",
            "--image-layout",
        ])
        .arg(&layout)
        .args(["-n", "3", "--json"])
        .args(extra)
        .args(["--", "/bin/true"])
        .env_remove("WARREN_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn warren bench");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for warren bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    (json, pid)
}

/// Directories named `warren-bench-PID` left in any cgroup hierarchy.
fn leftover_cgroups(pid: u32) -> Vec<std::path::PathBuf> {
    let name = format!("warren-bench-{pid}");
    let mut left = Vec::new();
    for h in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let dir = h.path().join(&name);
        if dir.exists() {
            left.push(dir);
        }
    }
    left
}

#[test]
fn runs_deletes_and_cleans_up_without_peers() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let (json, pid) = bench(&["--peer-runs", "0"]);
    assert_eq!(json["backend"], "linux", "{json}");
    assert_eq!(json["warren"]["ok"], 3, "{json}");
    assert_eq!(json["warren"]["failed"], 0, "{json}");
    assert_eq!(json["delete"]["ok"], 3, "{json}");
    // Create -> running too: its sandboxes were counted, and deleted (the server holds none
    // after the run: the bench checks that on its private server).
    assert_eq!(json["running"]["ok"], 3, "{json}");
    assert_eq!(json["running"]["failed"], 0, "{json}");
    assert_eq!(json["running_warm_hits"], 0, "no warm pool: {json}");
    for peer in ["crun", "runc"] {
        assert_eq!(json["peers"][peer]["skipped"], "--peer-runs 0", "{json}");
    }
    assert!(
        leftover_cgroups(pid).is_empty(),
        "{:?}",
        leftover_cgroups(pid)
    );
}

#[test]
fn runs_the_installed_peers_and_removes_their_state() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let (json, pid) = bench(&["--peer-runs", "2"]);
    for peer in ["crun", "runc"] {
        let got = &json["peers"][peer];
        if let Some(why) = got["skipped"].as_str() {
            eprintln!("NOTE: {peer} skipped: {why}");
            continue;
        }
        assert_eq!(got["ok"], 2, "{peer}: {json}");
        assert!(got["warren_over_peer_p50"].as_f64().is_some(), "{json}");
    }
    assert!(
        leftover_cgroups(pid).is_empty(),
        "{:?}",
        leftover_cgroups(pid)
    );
}
