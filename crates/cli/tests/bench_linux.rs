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
    bench_with(Path::new(WARREN), extra)
}

/// [`bench`] with the `warren` at `program` (its private server runs that binary, and the
/// supervisor beside it when there is a fresh one).
fn bench_with(program: &Path, extra: &[&str]) -> (serde_json::Value, u32) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = warren_image::testing::busybox_layout(tmp.path(), "busybox").expect("layout");
    let child = Command::new(program)
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

/// Directories named `warren-bench-PID` left in any cgroup hierarchy: under each v1
/// hierarchy in `/sys/fs/cgroup`, or in it on a pure v2 host.
fn leftover_cgroups(pid: u32) -> Vec<std::path::PathBuf> {
    cgroups_named(&format!("warren-bench-{pid}"))
}

/// `/sys/fs/cgroup/NAME` and `/sys/fs/cgroup/*/NAME` that exist.
fn cgroups_named(name: &str) -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let hierarchies = std::fs::read_dir(root).into_iter().flatten().flatten();
    std::iter::once(root.to_path_buf())
        .chain(hierarchies.map(|h| h.path()))
        .map(|h| h.join(name))
        .filter(|dir| dir.exists())
        .collect()
}

#[test]
fn runs_deletes_and_cleans_up_without_peers() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    // Its private server keeps its sandboxes under a --linux-dir, in a directory of its own
    // that goes with the run.
    let under = tempfile::tempdir().expect("tempdir");
    let dir = under.path().to_str().expect("utf-8");
    let (json, pid) = bench(&["--peer-runs", "0", "--linux-dir", dir]);
    assert_eq!(json["linux_dir"], dir, "{json}");
    let left: Vec<_> = std::fs::read_dir(under.path())
        .expect("read --linux-dir")
        .collect();
    assert!(left.is_empty(), "left under --linux-dir: {left:?}");
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

/// Whether the ELF executable at `path` asks for a program interpreter (the dynamic loader):
/// a `PT_INTERP` program header. Static executables have none.
fn has_interpreter(path: &Path) -> bool {
    let elf = std::fs::read(path).expect("read the executable");
    assert_eq!(&elf[..4], b"\x7fELF", "{}: not an ELF file", path.display());
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).any(|i| {
        let at = phoff + i * size;
        u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes")) == 3
    })
}

/// The static `warren-supervise` that `scripts/build-supervisor.sh` makes (installs ship it):
/// a sandbox's whole life through it. `scripts/test.sh` builds it and names it in
/// `WARREN_STATIC_SUPERVISOR`; a plain `cargo test` has not built it, and says so.
#[test]
fn the_static_supervisor_runs_sandboxes() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let Some(built) = std::env::var_os("WARREN_STATIC_SUPERVISOR") else {
        eprintln!(
            "SKIP: WARREN_STATIC_SUPERVISOR is not set (scripts/test.sh builds the static \
             supervisor with scripts/build-supervisor.sh --dev - and sets it)"
        );
        return;
    };
    let built = Path::new(&built);
    assert!(!has_interpreter(built), "{} is not static", built.display());
    assert!(
        has_interpreter(Path::new(WARREN)),
        "the ELF check reads headers"
    );
    // `warren` and the static supervisor side by side, as an install lays them out.
    let dir = tempfile::tempdir().expect("tempdir");
    let warren = dir.path().join("warren");
    std::fs::copy(WARREN, &warren).expect("copy warren");
    std::fs::copy(built, dir.path().join("warren-supervise")).expect("copy the supervisor");
    let (json, pid) = bench_with(&warren, &["--peer-runs", "0"]);
    assert_eq!(
        json["supervisor"],
        dir.path().join("warren-supervise").display().to_string(),
        "the server took the static supervisor: {json}"
    );
    assert_eq!(json["warren"]["ok"], 3, "{json}");
    assert_eq!(json["running"]["ok"], 3, "{json}");
    assert_eq!(json["delete"]["ok"], 3, "{json}");
    assert!(
        leftover_cgroups(pid).is_empty(),
        "{:?}",
        leftover_cgroups(pid)
    );
}

/// `warren bench pause`: its rounds and runc's are counted, and nothing is left (its
/// sandbox, runc's container, either's cgroup).
#[test]
fn bench_pause_counts_its_rounds_and_runcs_and_cleans_up() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let layout = warren_image::testing::busybox_layout(tmp.path(), "busybox").expect("layout");
    let child = Command::new(WARREN)
        .args(["bench", "pause", "-i", "busybox", "--image-layout"])
        .arg(&layout)
        .args(["-n", "3", "--peer-runs", "3", "--json"])
        .env_remove("WARREN_SERVER")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn warren bench");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for warren bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().last().unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    for what in ["pause", "unpause"] {
        assert_eq!(json[what]["ok"], 3, "{json}");
        assert_eq!(json[what]["failed"], 0, "{json}");
    }
    match json["runc"]["failed"].as_str() {
        Some(why) if why.contains("not installed") => eprintln!("NOTE: runc skipped: {why}"),
        Some(why) => panic!("runc failed: {why}"),
        None => {
            assert_eq!(json["runc"]["pause"]["ok"], 3, "{json}");
            assert_eq!(json["runc"]["resume"]["ok"], 3, "{json}");
        }
    }
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let left = cgroups_named(&format!("warren-bench-pause-{pid}"));
    assert!(left.is_empty(), "{left:?}");
}
