//! Checkpoint and restore end to end: the real server and CLI, busybox containers, and the
//! CRIU `scripts/install-criu.sh` builds. Needs root, /bin/busybox and CRIU 4.x (installed
//! by scripts/install-deps.sh); without one of them every test says why it skips.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;
#[macro_use]
#[path = "common/linux.rs"]
mod linux_harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{TestServer, json, stderr};
use linux_harness::{Linux, stdout};

/// Counts, and holds a file open on fd 3 that it writes each count to.
const COUNTER: &str =
    "exec 3>/tmp/held; i=0; while true; do i=$((i+1)); echo count $i; echo $i >&3; sleep 0.1; done";

/// Why CRIU cannot be used here (root and busybox are `linux_or_skip!`'s to check).
fn skip() -> Option<String> {
    warren_linux::criu::Criu::find(None).err().map(|e| {
        format!(
            "SKIP: {} (run scripts/install-criu.sh)",
            warren_linux::error_chain(&e)
        )
    })
}

macro_rules! criu_or_skip {
    () => {
        match skip() {
            Some(reason) => {
                eprintln!("{reason}");
                return;
            }
            None => linux_or_skip!(),
        }
    };
}

fn counts(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("count ")?.trim().parse().ok())
        .collect()
}

/// Waits until `warren logs NAME` shows `count N` for some N >= `at_least`; returns the
/// counts so far.
fn wait_count(l: &Linux, name: &str, at_least: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = l.warren(&["logs", name]);
        let got = counts(&stdout(&out));
        if got.last().is_some_and(|&n| n >= at_least) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never counted to {at_least}: {got:?} {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A count from 1 upwards without gaps (a line may repeat: output in flight at the dump).
fn assert_continuous(counts: &[u64]) {
    assert_eq!(counts.first(), Some(&1), "{counts:?}");
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1 || w[1] == w[0]),
        "the count does not continue: {counts:?}"
    );
}

fn start_counter(l: &Linux, name: &str) {
    let out = l.run(name, &[], &["sh", "-c", COUNTER]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn dump_kill_restore_counts_on_with_its_logs_and_open_file() {
    let l = criu_or_skip!();
    start_counter(&l, "counter");
    wait_count(&l, "counter", 5);

    assert_eq!(l.ok(&["checkpoint", "counter", "--name", "ck1"]), "ck1\n");
    // Not --leave-running: the workload is gone, the sandbox Stopped.
    assert_eq!(l.get("counter")["status"]["phase"], "Stopped");
    assert!(
        l.leftover_cgroups().is_empty(),
        "{:?}",
        l.leftover_cgroups()
    );
    let at_dump = *counts(&l.ok(&["logs", "counter"])).last().unwrap();

    let listed = json(&l.ok(&["checkpoint", "ls", "-o", "json"]));
    let item = &listed["items"][0];
    assert_eq!(item["metadata"]["name"], "ck1");
    assert_eq!(item["sandbox"]["name"], "counter");
    assert!(
        item["criuVersion"].as_str().unwrap().starts_with("4."),
        "{item}"
    );
    assert!(item["size"].as_u64().unwrap() > 10_000, "{item}");
    assert!(l.ok(&["checkpoint", "ls"]).contains("ck1"));

    // The same name: the stopped sandbox is replaced by its continuation.
    assert_eq!(l.ok(&["restore", "ck1"]), "counter\n");
    let got = l.get("counter");
    assert_eq!(got["status"]["phase"], "Running", "{got}");
    assert_eq!(got["status"]["backendInfo"]["checkpoint"], "ck1", "{got}");
    let all = wait_count(&l, "counter", at_dump + 5);
    assert_continuous(&all);

    // The file the shell opened before the dump is still open on fd 3, and still written.
    let out = l.ok(&[
        "exec",
        "counter",
        "--",
        "sh",
        "-c",
        "ls -l /proc/1/fd/3; tail -n 1 /tmp/held",
    ]);
    assert!(out.contains("-> /tmp/held"), "{out}");
    let held: u64 = out.lines().last().unwrap().trim().parse().unwrap();
    assert!(held > at_dump, "/tmp/held at {held}, dumped at {at_dump}");

    l.ok(&["rm", "counter"]);
    // The checkpoint needs its image: removing it is refused, naming the checkpoint.
    let out = l.warren(&["image", "rm", "busybox"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("is in use by checkpoint ck1: remove it first"),
        "{}",
        stderr(&out)
    );
    assert_eq!(l.ok(&["checkpoint", "rm", "ck1"]), "ck1\n");
    assert!(!l.ok(&["checkpoint", "ls"]).contains("ck1"));
    let out = l.warren(&["restore", "ck1"]);
    assert!(
        stderr(&out).contains("checkpoint \"ck1\" not found"),
        "{}",
        stderr(&out)
    );
    l.ok(&["image", "rm", "busybox"]);
}

/// A restore that would fail (here: a mapped host directory gone since the checkpoint)
/// fails before it touches the finished sandbox it would replace: that one, its logs and
/// its files stay. Once the directory is back, the same restore continues it.
#[test]
fn a_failing_restore_leaves_the_sandbox_it_would_replace() {
    let l = criu_or_skip!();
    let host = tempfile::tempdir().unwrap();
    let data = host.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mapdir = format!("/data::{}", data.display());
    let out = l.run(
        "mapped",
        &["--mapdir", &mapdir],
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /data/n; sleep 0.1; done",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    l.wait_phase("mapped", "Running");
    let written = || std::fs::read_to_string(data.join("n")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while written().trim().parse::<u64>().unwrap_or(0) < 3 {
        assert!(
            Instant::now() < deadline,
            "never wrote to /data: {:?}",
            written()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    l.ok(&["checkpoint", "mapped", "--name", "ckm"]);
    assert_eq!(l.get("mapped")["status"]["phase"], "Stopped");
    let uid = l.get("mapped")["metadata"]["uid"].clone();

    std::fs::remove_file(data.join("n")).unwrap();
    std::fs::remove_dir(&data).unwrap();
    let out = l.warren(&["restore", "ckm"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("spec.mounts"), "{}", stderr(&out));
    let kept = l.get("mapped");
    assert_eq!(kept["status"]["phase"], "Stopped", "{kept}");
    assert_eq!(
        kept["metadata"]["uid"], uid,
        "the same sandbox, not replaced"
    );

    std::fs::create_dir(&data).unwrap();
    assert_eq!(l.ok(&["restore", "ckm"]), "mapped\n");
    let got = l.get("mapped");
    assert_eq!(got["status"]["phase"], "Running", "{got}");
    assert_ne!(got["metadata"]["uid"], uid, "replaced by its continuation");
    let deadline = Instant::now() + Duration::from_secs(10);
    while written().trim().parse::<u64>().unwrap_or(0) < 3 {
        assert!(
            Instant::now() < deadline,
            "the restore does not write to /data"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    l.ok(&["rm", "mapped"]);
    l.ok(&["checkpoint", "rm", "ckm"]);
}

#[test]
fn leave_running_and_a_copy_under_a_new_name_beside_the_original() {
    let l = criu_or_skip!();
    start_counter(&l, "orig");
    wait_count(&l, "orig", 3);
    l.ok(&["checkpoint", "orig", "--leave-running", "--name", "lr"]);
    assert_eq!(l.get("orig")["status"]["phase"], "Running");
    let at_dump = *counts(&l.ok(&["logs", "orig"])).last().unwrap();

    assert_eq!(l.ok(&["restore", "lr", "--name", "copy"]), "copy\n");
    let copy = wait_count(&l, "copy", at_dump + 5);
    assert_continuous(&copy);
    let orig = wait_count(&l, "orig", at_dump + 5);
    assert_continuous(&orig);
    let pid = |name: &str| l.get(name)["status"]["backendInfo"]["pid"].clone();
    assert_ne!(pid("orig"), pid("copy"));
    // Both are pid 1 of a pid namespace of their own.
    for name in ["orig", "copy"] {
        let out = l.ok(&[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "cat /proc/1/cmdline | tr '\\0' ' '",
        ]);
        assert!(out.starts_with("sh -c exec 3>/tmp/held"), "{name}: {out}");
    }
    // The original's name is taken by a running sandbox.
    let out = l.warren(&["restore", "lr"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("exists and has not finished"),
        "{}",
        stderr(&out)
    );
    l.ok(&["rm", "orig", "copy"]);
}

#[test]
fn an_exported_checkpoint_restores_on_another_server() {
    let l = criu_or_skip!();
    start_counter(&l, "mover");
    wait_count(&l, "mover", 3);
    let out_dir = tempfile::tempdir().unwrap();
    let tarball = out_dir.path().join("mover.tar.gz");
    let tar_text = tarball.to_str().unwrap();
    assert_eq!(
        l.ok(&["checkpoint", "mover", "--leave-running", "-o", tar_text]),
        format!("{tar_text}\n")
    );
    assert!(tarball.is_file());
    // An -o checkpoint is not stored.
    assert!(!l.ok(&["checkpoint", "ls"]).contains("mover"));
    // A stored one exported as a directory.
    l.ok(&["checkpoint", "mover", "--name", "m2"]);
    let dir = out_dir.path().join("m2-dir");
    l.ok(&["checkpoint", "export", "m2", dir.to_str().unwrap()]);
    assert!(dir.join("manifest.json").is_file());
    let at_dump = *counts(&l.ok(&["logs", "mover"])).last().unwrap();

    // A server with a key of its own refuses both: a seal it cannot check is no better
    // than none, and the archive could be anyone's.
    let stranger = Linux::start();
    for (what, path) in [("archive", tar_text), ("directory", dir.to_str().unwrap())] {
        let o = stranger.warren(&["restore", path, "--name", "moved"]);
        assert_eq!(o.status.code(), Some(1), "{what}");
        let err = stderr(&o);
        assert!(
            err.contains("has a seal made with another key")
                && err.contains(&format!(
                    "{}",
                    stranger.server.state_dir().join("checkpoint.key").display()
                )),
            "{what}: {err}"
        );
        assert!(stderr(&stranger.warren(&["get", "moved"])).contains("not found"));
    }
    drop(stranger);

    // Another server, another state dir (its own image store with the same image), sharing
    // the first one's key.
    let key = l.server.state_dir().join("checkpoint.key");
    let other = Linux::start_with(&["--checkpoint-key", key.to_str().unwrap()]);
    assert_eq!(
        other.ok(&["restore", tar_text, "--name", "moved"]),
        "moved\n"
    );
    assert_continuous(&wait_count(&other, "moved", at_dump + 3));
    assert_eq!(other.ok(&["restore", dir.to_str().unwrap()]), "mover\n");
    assert_continuous(&wait_count(&other, "mover", at_dump + 3));
    other.ok(&["rm", "moved", "mover"]);
    l.ok(&["rm", "mover"]);
}

/// Processes whose command line names `dir` (the supervisors of its sandboxes).
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .chars()
            .all(|c| c.is_ascii_digit())
        {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) && !cmd.contains("warren server") {
                found.push(cmd);
            }
        }
    }
    found
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

#[test]
fn corrupt_and_truncated_checkpoints_are_refused_leaving_nothing() {
    let l = criu_or_skip!();
    start_counter(&l, "src");
    wait_count(&l, "src", 2);
    let out = tempfile::tempdir().unwrap();
    let good = out.path().join("good");
    l.ok(&[
        "checkpoint",
        "src",
        "--leave-running",
        "-o",
        good.to_str().unwrap(),
    ]);
    let state = l.server.state_dir();
    let cgroups_before = l.leftover_cgroups();
    let supervisors_before = processes_under(&state);

    let pages = std::fs::read_dir(good.join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pages-")
        })
        .unwrap();
    let rel = pages.strip_prefix(&good).unwrap().to_path_buf();
    let variants: Vec<(&str, PathBuf, &str)> = {
        // One flipped byte in the memory pages.
        let flipped = out.path().join("flipped");
        copy_tree(&good, &flipped);
        let mut bytes = std::fs::read(flipped.join(&rel)).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(flipped.join(&rel), &bytes).unwrap();
        // The root filesystem's changes cut short.
        let cut = out.path().join("cut");
        copy_tree(&good, &cut);
        let tar = std::fs::read(cut.join("rootfs.tar")).unwrap();
        std::fs::write(cut.join("rootfs.tar"), &tar[..tar.len() / 2]).unwrap();
        // No manifest at all.
        let bare = out.path().join("bare");
        copy_tree(&good, &bare);
        std::fs::remove_file(bare.join("manifest.json")).unwrap();
        // A tarball cut in half.
        let whole = out.path().join("whole.tar");
        l.ok(&[
            "checkpoint",
            "src",
            "--leave-running",
            "-o",
            whole.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&whole).unwrap();
        let half = out.path().join("half.tar");
        std::fs::write(&half, &bytes[..bytes.len() / 2]).unwrap();
        vec![
            ("flipped", flipped, "has sha256"),
            ("cut", cut, "rootfs.tar has"),
            ("bare", bare, "has no manifest.json"),
            ("half", half, "is corrupt or incomplete"),
        ]
    };
    for (name, path, why) in &variants {
        let o = l.warren(&["restore", path.to_str().unwrap(), "--name", name]);
        assert_ne!(o.status.code(), Some(0), "{name} was restored");
        let err = stderr(&o);
        assert!(err.contains("is corrupt or incomplete"), "{name}: {err}");
        assert!(err.contains(why), "{name}: {err}");
        let missing = l.warren(&["get", name]);
        assert!(
            stderr(&missing).contains("not found"),
            "{name}: a record is left"
        );
    }
    // A manifest rewritten to run something else: its seal no longer matches.
    let forged = out.path().join("forged");
    copy_tree(&good, &forged);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(forged.join("manifest.json")).unwrap()).unwrap();
    manifest["spec"]["command"] = serde_json::json!(["/bin/sh", "-c", "echo forged"]);
    std::fs::write(
        forged.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let o = l.warren(&["restore", forged.to_str().unwrap(), "--name", "forged"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o)
            .contains("has a seal made with another key, or a manifest changed after sealing"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&l.warren(&["get", "forged"])).contains("not found"));

    // Nothing half-restored: no cgroup, bundle, supervisor or mount beyond the original's.
    assert_eq!(l.leftover_cgroups(), cgroups_before);
    assert_eq!(processes_under(&state), supervisors_before);
    assert!(
        mounts_under(&state).is_empty(),
        "{:?}",
        mounts_under(&state)
    );
    let bundles: Vec<_> = std::fs::read_dir(state.join("linux"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(bundles.len(), 1, "{bundles:?}");
    // No scratch copy left (the store holds only its marker of sealed old checkpoints).
    let scratch: Vec<_> = std::fs::read_dir(state.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".sealed")
        .collect();
    assert!(scratch.is_empty(), "{scratch:?}");

    // The good one still restores.
    l.ok(&["restore", good.to_str().unwrap(), "--name", "fine"]);
    wait_count(&l, "fine", 4);
    l.ok(&["rm", "src", "fine"]);
}

/// A restore runs under the policy that applies now: one with what a restored sandbox
/// cannot have (an exec list, enforced by a seccomp listener CRIU does not restore) refuses
/// the restore, leaving the checkpointed sandbox as it was.
#[test]
fn a_restore_under_a_policy_it_cannot_keep_is_refused() {
    let l = criu_or_skip!();
    // A named command, as an exec list needs to admit it.
    let out = l.run("gated", &["--entrypoint", "/bin/sh"], &["-c", COUNTER]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_count(&l, "gated", 2);
    l.ok(&["checkpoint", "gated", "--name", "g1"]);
    let path = l.server.dir.path().join("default.yaml");
    std::fs::write(
        &path,
        "apiVersion: warren.dev/v1\nkind: Policy\nmetadata:\n  name: default\nspec:\n  exec:\n    allow: [\"/bin/*\"]\n",
    )
    .unwrap();
    l.ok(&["policy", "apply", "-f", path.to_str().unwrap()]);
    let out = l.warren(&["restore", "g1"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("restore: its policy has an exec list"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        json(&l.ok(&["get", "gated", "-o", "json"]))["status"]["phase"],
        "Stopped"
    );
    l.ok(&["policy", "rm", "default"]);
    assert_eq!(l.ok(&["restore", "g1"]), "gated\n");
    l.ok(&["rm", "gated"]);
}

/// A tmpfs mounted for the test, unmounted when dropped (pass or fail).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Option<Tmpfs> {
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// An output that fails after the dump stopped the sandbox (here: a file system with no
/// room for a new file) keeps the checkpoint, the only copy of its state, in the store.
#[test]
fn a_failed_output_keeps_the_checkpoint_of_the_stopped_sandbox() {
    let server = TestServer::start();
    server.ok(&["run", "--name", "full", "--cpu", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let Some(_full) = Tmpfs::mount(dir.path(), "size=64k,nr_inodes=1") else {
        eprintln!("SKIP: cannot mount a tmpfs here (not root?)");
        return;
    };
    let to = dir.path().join("full.tar");
    let out = server.warren(&["checkpoint", "full", "-o", to.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("No space left on device")
            && err.contains(
                "the sandbox stopped at the checkpoint, so the checkpoint is kept as \"full-"
            ),
        "{err}"
    );
    let name = err
        .split("kept as \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    assert!(server.ok(&["checkpoint", "ls"]).contains(&name));
    assert_eq!(
        json(&server.ok(&["get", "full", "-o", "json"]))["status"]["phase"],
        "Stopped"
    );
    // What was kept continues the sandbox.
    server.ok(&["restore", &name]);
    assert_eq!(
        json(&server.ok(&["get", "full", "-o", "json"]))["status"]["phase"],
        "Running"
    );
}

#[test]
fn slot_sandboxes_checkpoint_their_record_and_wasm_says_unsupported() {
    let mut server = TestServer::start();
    server.ok(&["run", "--name", "acct", "--cpu", "1", "-m", "1Gi"]);
    assert_eq!(server.ok(&["checkpoint", "acct", "--name", "sk"]), "sk\n");
    assert_eq!(
        json(&server.ok(&["get", "acct", "-o", "json"]))["status"]["phase"],
        "Stopped"
    );
    assert_eq!(server.ok(&["restore", "sk", "--name", "acct2"]), "acct2\n");
    let got = json(&server.ok(&["get", "acct2", "-o", "json"]));
    assert_eq!(got["status"]["phase"], "Running");
    assert_eq!(got["status"]["resources"]["memory_limit"], 1u64 << 30);
    let out = server.warren(&["checkpoint", "nosuch"]);
    assert!(
        stderr(&out).contains("\"nosuch\" not found"),
        "{}",
        stderr(&out)
    );
    let out = server.warren(&["checkpoint", "acct", "--name", "../x"]);
    assert!(stderr(&out).contains("not Running"), "{}", stderr(&out));
    let out = server.warren(&["checkpoint", "acct2", "--name", "../x"]);
    assert!(stderr(&out).contains("checkpoint name"), "{}", stderr(&out));
    let out = server.warren(&["restore", "/no/such/ckpt"]);
    assert!(
        stderr(&out).contains("is not a checkpoint directory or archive"),
        "{}",
        stderr(&out)
    );
    // A file that is not a checkpoint: refused without quoting its content.
    let secret = server.dir.path().join("shadow");
    std::fs::write(
        &secret,
        "root:hunter2-marker:19000:0:99999:7:::\n".repeat(20),
    )
    .unwrap();
    let out = server.warren(&["restore", secret.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not a checkpoint archive"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("hunter2"), "{}", stderr(&out));
    // A checkpoint kept past its sandbox's expiry is not restored only to be deleted.
    server.ok(&["run", "--name", "brief", "--expire-in", "1s"]);
    assert_eq!(server.ok(&["checkpoint", "brief", "--name", "bk"]), "bk\n");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let out = server.warren(&["restore", "bk", "--name", "brief2"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("spec.expireTime") && stderr(&out).contains("in the past"),
        "{}",
        stderr(&out)
    );
    assert!(!server.warren(&["get", "brief2"]).status.success());
    // A wasm sandbox (a module that spins until its timeout) has no checkpoint.
    let wat = server.dir.path().join("spin.wat");
    std::fs::write(&wat, "(module (func (export \"_start\") (loop br 0)))").unwrap();
    server.ok(&[
        "run",
        "-b",
        "wasm",
        "--module",
        wat.to_str().unwrap(),
        "--name",
        "spin",
        "--timeout",
        "30s",
    ]);
    let out = server.warren(&["checkpoint", "spin"]);
    assert!(
        stderr(&out).contains("backend wasm does not support checkpoint"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        json(&server.ok(&["get", "spin", "-o", "json"]))["status"]["phase"],
        "Running"
    );
    server.ok(&["rm", "spin"]);
    // A restart keeps stored checkpoints.
    server.kill9();
    server.spawn();
    assert!(server.ok(&["checkpoint", "ls"]).contains("sk"));
}

/// Applies a `default` policy with `spec` (YAML, indented two spaces).
fn apply_default_policy(l: &Linux, spec: &str) {
    let path = l.server.dir.path().join("default.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: warren.dev/v1\nkind: Policy\nmetadata:\n  name: default\nspec:\n{spec}"
        ),
    )
    .unwrap();
    l.ok(&["policy", "apply", "-f", path.to_str().unwrap()]);
}

/// Asserts a refused command: exit 1, `expect` in its stderr.
fn assert_refused(out: &std::process::Output, expect: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    assert!(stderr(out).contains(expect), "{}", stderr(out));
}

const IDLE: &str = "while :; do sleep 1; done";

/// CRIU binds the overlay read-write as the restored root, so a read-only root or read-only
/// paths (`--read-only`, a policy's `filesystem.readOnly` or `filesystem.writable`) would
/// come back writable: such a sandbox is not checkpointed, and a checkpoint is not restored
/// under a policy that asks for them.
#[test]
fn read_only_roots_and_paths_are_neither_checkpointed_nor_restored() {
    let l = criu_or_skip!();
    let writer = "while :; do sleep 1; echo x > /x 2>/dev/null && echo WROTE-ROOT; done";
    l.run_running("roc", &["--read-only"], &["sh", "-c", writer]);
    let refused = "its read-only root/paths would come back writable (CRIU restores the root \
                   read-write); checkpoints of such sandboxes are not supported";
    assert_refused(
        &l.warren(&["checkpoint", "roc", "--name", "ckroc"]),
        refused,
    );
    for (name, fs) in [
        ("rop", "    readOnly: [/etc]\n"),
        ("wrp", "    writable: [/tmp]\n"),
    ] {
        apply_default_policy(&l, &format!("  filesystem:\n{fs}"));
        l.run_running(name, &[], &["sh", "-c", IDLE]);
        assert_refused(
            &l.warren(&["checkpoint", name, "--name", &format!("ck{name}")]),
            refused,
        );
        assert_eq!(l.get(name)["status"]["phase"], "Running");
        l.ok(&["rm", name]);
        l.ok(&["policy", "rm", "default"]);
    }
    assert_eq!(l.get("roc")["status"]["phase"], "Running");
    assert!(!l.ok(&["checkpoint", "ls"]).contains("ck"));
    assert!(!stdout(&l.warren(&["logs", "roc"])).contains("WROTE-ROOT"));

    // A checkpoint taken before such a policy applied is not restored under it.
    start_counter(&l, "late");
    wait_count(&l, "late", 2);
    l.ok(&["checkpoint", "late", "--name", "cklate"]);
    let cgroups = l.leftover_cgroups();
    apply_default_policy(&l, "  filesystem:\n    readOnly: [/etc]\n");
    assert_refused(
        &l.warren(&["restore", "cklate"]),
        "restore: its read-only root/paths would come back writable",
    );
    assert_eq!(l.get("late")["status"]["phase"], "Stopped");
    assert_refused(
        &l.warren(&["restore", "cklate", "--name", "late2"]),
        "restore it under a policy without it",
    );
    assert!(stderr(&l.warren(&["get", "late2"])).contains("not found"));
    assert_eq!(l.leftover_cgroups(), cgroups);
    l.ok(&["policy", "rm", "default"]);
    assert_eq!(l.ok(&["restore", "cklate"]), "late\n");
    l.ok(&["rm", "roc", "late"]);
    l.ok(&["checkpoint", "rm", "cklate"]);
}

/// A restore runs under the policy that applies now, but CRIU brings the workload's seccomp
/// filter, masks and network back as they were dumped: a policy that confines otherwise than
/// the checkpointed workload was refuses the restore, creating nothing.
#[test]
fn a_restore_under_a_policy_that_confines_otherwise_is_refused() {
    let l = criu_or_skip!();
    start_counter(&l, "pw");
    wait_count(&l, "pw", 2);
    l.ok(&["checkpoint", "pw", "--name", "ckpw"]);
    let cgroups = l.leftover_cgroups();
    apply_default_policy(&l, "  syscalls:\n    deny: [getcwd]\n");
    assert_refused(
        &l.warren(&["restore", "ckpw", "--name", "pw2"]),
        "the policy now denies syscalls the checkpointed workload was not confined by: \
         getcwd; restore refused",
    );
    apply_default_policy(
        &l,
        "  filesystem:\n    masked: [/etc/hostname]\n  network:\n    mode: none\n",
    );
    let out = l.warren(&["restore", "ckpw", "--name", "pw2"]);
    assert_refused(
        &out,
        "the policy now masks paths the checkpointed workload was not confined by: \
         /etc/hostname",
    );
    assert_refused(&out, "network.mode is now none");
    assert!(stderr(&l.warren(&["get", "pw2"])).contains("not found"));
    assert_eq!(l.leftover_cgroups(), cgroups);

    // Checkpointed under a policy, restored under the same one.
    apply_default_policy(&l, "  syscalls:\n    deny: [getcwd]\n");
    start_counter(&l, "pc");
    wait_count(&l, "pc", 2);
    l.ok(&["checkpoint", "pc", "--name", "ckpc"]);
    assert_eq!(l.ok(&["restore", "ckpc", "--name", "pc2"]), "pc2\n");
    // ... and not under one without that list: its filter would deny what the policy allows.
    apply_default_policy(&l, "  mode: enforce\n");
    assert_refused(
        &l.warren(&["restore", "ckpc", "--name", "pc3"]),
        "the checkpointed workload was denied syscalls the policy no longer denies (CRIU \
         restores its filter as it was): getcwd",
    );
    assert_eq!(l.ok(&["restore", "ckpw", "--name", "pw2"]), "pw2\n");
    l.ok(&["rm", "pw", "pw2", "pc", "pc2"]);
    l.ok(&["checkpoint", "rm", "ckpw", "ckpc"]);
}

/// CRIU dumps the init's process tree only; a process `warren exec` started is outside it,
/// so a checkpoint is refused while one runs rather than drop it.
#[test]
fn a_sandbox_with_a_running_exec_is_not_checkpointed() {
    let l = criu_or_skip!();
    start_counter(&l, "pz");
    wait_count(&l, "pz", 2);
    let mut exec = l
        .server
        .command(&["exec", "pz", "--", "sh", "-c", "sleep 30"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sleeping = || {
        json(&l.ok(&["top", "pz", "-o", "json"]))
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["command"] == "sleep 30")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sleeping() {
        assert!(Instant::now() < deadline, "the exec never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = l.warren(&["checkpoint", "pz", "--leave-running", "--name", "ckpz"]);
    let _ = exec.kill();
    let _ = exec.wait();
    assert_refused(&out, "has processes started by warren exec (pids ");
    assert_refused(&out, "a checkpoint would drop them: wait for them to end");
    assert!(!l.ok(&["checkpoint", "ls"]).contains("ckpz"));
    assert_eq!(l.get("pz")["status"]["phase"], "Running");
    let deadline = Instant::now() + Duration::from_secs(20);
    while sleeping() {
        assert!(Instant::now() < deadline, "the exec outlived its caller");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Its helper may outlive it by a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = l.warren(&["checkpoint", "pz", "--leave-running", "--name", "ckpz"]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline && stderr(&out).contains("started by warren exec"),
            "{}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    l.ok(&["rm", "pz"]);
    l.ok(&["checkpoint", "rm", "ckpz"]);

    // A sandbox from a warm shell has nothing else in its cgroup either.
    let warm = Linux::start_with(&["--warm", "linux:busybox=1"]);
    linux_harness::wait_warm(&warm, 1);
    start_counter(&warm, "pw");
    assert!(linux_harness::cgroup_of(&warm, "pw").starts_with("warm-"));
    wait_count(&warm, "pw", 2);
    warm.ok(&["checkpoint", "pw", "--leave-running", "--name", "ckw"]);
    warm.ok(&["rm", "pw"]);
    warm.ok(&["checkpoint", "rm", "ckw"]);
}

/// No exec or signal while a checkpoint is taken: an exec's process would be outside the
/// tree CRIU dumps (and dropped), a signal would race the freeze. Both are refused as busy
/// until it is done. (A CRIU that waits 2 s before its dump holds the checkpoint open.)
#[test]
fn no_exec_or_signal_while_a_checkpoint_is_taken() {
    if let Some(reason) = skip().or_else(linux_harness::skip_reason) {
        eprintln!("{reason}");
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let real = warren_linux::criu::Criu::find(None).unwrap().path;
    let scripts = tempfile::tempdir().unwrap();
    let fake = scripts.path().join("criu");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n[ \"$1\" = dump ] && sleep 2\nexec '{}' \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let l = Linux::start_with(&["--criu", fake.to_str().unwrap()]);
    l.run_running("box", &[], &["sh", "-c", COUNTER]);
    wait_count(&l, "box", 2);
    let checkpoint = l
        .server
        .command(&["checkpoint", "box", "--leave-running", "--name", "held"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    for args in [&["exec", "box", "--", "true"][..], &["kill", "box"][..]] {
        let out = l.warren(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("in progress"), "{}", stderr(&out));
    }
    let done = checkpoint.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let out = l.warren(&["exec", "box", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    l.ok(&["rm", "-f", "box"]);
    l.ok(&["checkpoint", "rm", "held"]);
}
