//! containerd 1.6 (Debian's, on a private root, state dir and socket) driving
//! `containerd-shim-warren-v1` against a real `warren server`. Skips, loudly, only when
//! containerd cannot be installed. Everything is torn down at the end, pass or fail.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, RUNTIME};

#[test]
fn slot_task_runs_until_killed_and_delete_removes_the_sandbox() {
    require_containerd!();
    let env = Env::start();
    let image = env.import_busybox();
    let fifo = env.path("ctd/fifo").display().to_string();

    env.run_detached_ok(
        &["--memory-limit", "268435456", "--cpus", "0.5"],
        &image,
        "c1",
        &[],
    );
    let sb = env.sandbox("c1");
    assert_eq!(sb["status"]["phase"], "Running", "{sb}");
    assert_eq!(
        sb["metadata"]["labels"]["containerd.io/namespace"], "default",
        "{sb}"
    );
    let resources = PathBuf::from(
        sb["status"]["backendInfo"]["resources_path"]
            .as_str()
            .expect("resources_path"),
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&resources).expect("resources.json"))
            .expect("resources.json is JSON");
    assert_eq!(json["memory_limit"], 268435456, "{json}");
    assert_eq!(json["cpu_limit"], 0.5, "{json}");
    env.wait_task_status("c1", "RUNNING");
    let pids = env.ctr_ok(&["task", "ps", "c1"]);
    assert!(pids.lines().count() >= 2, "{pids}");

    env.ctr_ok(&["task", "kill", "-s", "SIGKILL", "c1"]);
    env.wait_task_status("c1", "STOPPED");
    // warren's record ended with it; its resources.json stays until containerd deletes.
    let sb = env.sandbox("c1");
    assert_eq!(sb["status"]["phase"], "Exited", "{sb}");
    assert_eq!(sb["status"]["exitCode"], 137, "{sb}");
    assert!(resources.exists());
    // The exit status reaches containerd: `ctr task rm` reports it.
    let rm = env.ctr(&["task", "rm", "c1"]);
    let rm_err = String::from_utf8_lossy(&rm.stderr);
    assert!(rm.status.success(), "ctr task rm: {rm_err}");
    assert!(rm_err.contains("exit code 137"), "ctr task rm: {rm_err}");
    env.ctr_ok(&["container", "rm", "c1"]);
    assert!(!env.sandbox_names().contains(&"c1".to_string()));
    assert!(!resources.exists(), "{} still there", resources.display());

    // Attached: `ctr run` waits for the exit event and exits with 128 + SIGTERM.
    let mut run = Command::new("ctr")
        .arg("--address")
        .arg(env.path("ctd/containerd.sock"))
        .args([
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--fifo-dir",
            &fifo,
            &image,
            "c2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr run c2");
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.task_status("c2").as_deref() != Some("RUNNING") {
        assert!(Instant::now() < deadline, "c2 never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    env.ctr_ok(&["task", "kill", "-s", "SIGTERM", "c2"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = run.try_wait().expect("wait ctr run") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            panic!("ctr run did not return after the task was killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143), "ctr run c2");
    // --rm removed it everywhere.
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.sandbox_names().contains(&"c2".to_string()) {
        assert!(Instant::now() < deadline, "c2 left in warren");
        std::thread::sleep(Duration::from_millis(20));
    }

    // warren is the source of truth: a sandbox removed there ends containerd's task.
    env.run_detached_ok(&[], &image, "c3", &[]);
    env.wait_task_status("c3", "RUNNING");
    env.warren_ok(&["rm", "c3"]);
    env.wait_task_status("c3", "STOPPED");
    env.ctr_ok(&["task", "rm", "c3"]);
    env.ctr_ok(&["container", "rm", "c3"]);

    // Every shim exited once its task was deleted.
    env.wait_no_shims();
}

/// The first file under `dir` whose path ends with `tail`.
fn find(dir: &std::path::Path, tail: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.ends_with(tail) {
            return Some(path);
        }
        if entry.file_type().is_ok_and(|t| t.is_dir())
            && let Some(found) = find(&path, tail)
        {
            return Some(found);
        }
    }
    None
}

#[test]
fn a_dead_shims_cleanup_leaves_another_namespaces_sandbox_of_the_same_id() {
    require_containerd!();
    let env = Env::start();
    let image = env.import_busybox();
    env.run_detached_ok(&[], &image, "shared", &[]);
    env.wait_task_status("shared", "RUNNING");
    // containerd's `shim delete` for a task "shared" of namespace "other" whose shim died
    // (its create refused: warren's names are global): it must not remove default's.
    let config = find(&env.path("ctd"), "default/shared/config.json").expect("bundle");
    let bundle = tempfile::tempdir().unwrap();
    std::fs::copy(&config, bundle.path().join("config.json")).unwrap();
    let out = Command::new(common::SHIM)
        .args(["-namespace", "other", "-id", "shared", "-address"])
        .arg(env.path("ctd/containerd.sock"))
        .arg("-bundle")
        .arg(bundle.path())
        .arg("delete")
        .env("WARREN_SERVER", env.server_address())
        .env_remove("WARREN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("belongs to containerd namespace \"default\", not \"other\""),
        "{err}"
    );
    assert_eq!(env.sandbox("shared")["status"]["phase"], "Running");
    env.ctr_ok(&["task", "kill", "-s", "SIGKILL", "shared"]);
    env.wait_task_status("shared", "STOPPED");
    env.ctr_ok(&["task", "rm", "shared"]);
    env.ctr_ok(&["container", "rm", "shared"]);
}

#[test]
fn malformed_annotation_fails_naming_the_key_and_leaves_nothing() {
    require_containerd!();
    let env = Env::start();
    let image = env.import_busybox();
    let out = env.run_detached(
        &["--annotation", "resources.limits.cpu=abc"],
        &image,
        "bad",
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ctr run should fail");
    assert!(stderr.contains("resources.limits.cpu"), "{stderr}");
    eprintln!("ctr run with a malformed annotation: {}", stderr.trim());
    assert!(env.sandbox_names().is_empty(), "{:?}", env.sandbox_names());
    assert_eq!(env.task_status("bad"), None);
    // The shim of the failed task went away.
    env.wait_no_shims();
}

#[test]
fn containerd_restart_keeps_the_task() {
    require_containerd!();
    let mut env = Env::start();
    let image = env.import_busybox();
    env.run_detached_ok(&["--cpus", "0.5"], &image, "r1", &[]);
    env.wait_task_status("r1", "RUNNING");

    // containerd goes away; the shim and the sandbox stay.
    let out = Command::new(common::script())
        .arg("stop")
        .arg(env.path("ctd"))
        .output()
        .expect("containerd.sh stop");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(env.shim_pids().len(), 1, "the shim outlives containerd");
    assert_eq!(env.sandbox("r1")["status"]["phase"], "Running");

    // A new containerd finds the shim through the bundle's address file.
    env.start_containerd();
    env.wait_task_status("r1", "RUNNING");
    env.ctr_ok(&["task", "kill", "-s", "SIGKILL", "r1"]);
    env.wait_task_status("r1", "STOPPED");
    env.ctr_ok(&["task", "rm", "r1"]);
    env.ctr_ok(&["container", "rm", "r1"]);
    assert!(env.sandbox_names().is_empty(), "{:?}", env.sandbox_names());
}

/// `ctr run` of a command with an attached client: (exit code, stdout, stderr).
fn ctr_run_linux(env: &Env, image: &str, id: &str, cmd: &[&str]) -> (Option<i32>, String, String) {
    let fifo = env.path("ctd/fifo").display().to_string();
    let mut args = vec![
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--fifo-dir",
        &fifo,
        "--annotation",
        "warren.dev/backend=linux",
        image,
        id,
    ];
    args.extend_from_slice(cmd);
    let out = env.ctr(&args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Mounts under the private containerd's dir that are not its snapshotter's own.
fn rootfs_mounts(env: &Env) -> Vec<String> {
    let dir = env.path("ctd").display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&dir) && m.ends_with("/rootfs"))
        .map(str::to_string)
        .collect()
}

#[test]
fn linux_task_prints_through_ctr_and_its_exit_code_propagates() {
    require_containerd!();
    let env = Env::start();
    let image = env.import_busybox();

    let (code, out, err) = ctr_run_linux(&env, &image, "l1", &["echo", "hello"]);
    assert_eq!(
        code,
        Some(0),
        "stdout {out:?} stderr {err:?}\n{}",
        env.containerd_log()
    );
    assert_eq!(out, "hello\n", "stderr {err:?}");

    let (code, out, err) = ctr_run_linux(
        &env,
        &image,
        "l2",
        &["sh", "-c", "echo to-out; echo to-err >&2; hostname; exit 3"],
    );
    assert_eq!(code, Some(3), "stdout {out:?} stderr {err:?}");
    assert_eq!(out, "to-out\nl2\n");
    assert_eq!(err, "to-err\n");

    // --rm took everything away: sandboxes, the rootfs mounts the shim made, the shims.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.sandbox_names().is_empty() || !env.shim_pids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "left: sandboxes {:?}, shims {:?}",
            env.sandbox_names(),
            env.shim_pids()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rootfs_mounts(&env), Vec::<String>::new());
}

#[test]
fn linux_task_is_killed_through_containerd() {
    require_containerd!();
    let env = Env::start();
    let image = env.import_busybox();
    env.run_detached_ok(
        &[
            "--annotation",
            "warren.dev/backend=linux",
            "--memory-limit",
            "67108864",
        ],
        &image,
        "k1",
        &["sleep", "600"],
    );
    env.wait_task_status("k1", "RUNNING");
    let sb = env.sandbox("k1");
    assert_eq!(sb["status"]["phase"], "Running", "{sb}");
    assert_eq!(sb["spec"]["backend"], "linux", "{sb}");
    // containerd sees the workload's own pid, a process running `sleep 600`.
    let ps = env.ctr_ok(&["task", "ps", "k1"]);
    let pid = ps
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .expect("a pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert_eq!(cmdline, b"sleep\x00600\x00", "pid {pid}");
    assert_eq!(rootfs_mounts(&env).len(), 1, "{:?}", rootfs_mounts(&env));

    // A detached task that writes more than a pipe holds, with no client reading, still
    // ends with its own exit code.
    env.run_detached_ok(
        &["--annotation", "warren.dev/backend=linux"],
        &image,
        "big",
        &["sh", "-c", "yes 0123456789 | head -c 300000; exit 4"],
    );
    let deadline = Instant::now() + Duration::from_secs(40);
    while env.task_status("big").as_deref() != Some("STOPPED") {
        assert!(
            Instant::now() < deadline,
            "big: {:?}",
            env.task_status("big")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rm = env.ctr(&["task", "rm", "big"]);
    let rm_err = String::from_utf8_lossy(&rm.stderr);
    assert!(rm_err.contains("exit code 4"), "ctr task rm: {rm_err}");
    env.ctr_ok(&["container", "rm", "big"]);

    // `ctr task pause` pauses the sandbox in warren, and `resume` lets it run on.
    env.ctr_ok(&["task", "pause", "k1"]);
    env.wait_task_status("k1", "PAUSED");
    assert_eq!(env.sandbox("k1")["status"]["paused"], true);
    env.ctr_ok(&["task", "resume", "k1"]);
    env.wait_task_status("k1", "RUNNING");
    assert_eq!(env.sandbox("k1")["status"].get("paused"), None);
    env.ctr_ok(&["task", "pause", "k1"]);
    env.wait_task_status("k1", "PAUSED");

    // sleep, the container's init, has no SIGTERM handler: only SIGKILL ends it (paused:
    // warren resumes it for the signal).
    env.ctr_ok(&["task", "kill", "-s", "SIGKILL", "k1"]);
    env.wait_task_status("k1", "STOPPED");
    let rm = env.ctr(&["task", "rm", "k1"]);
    let rm_err = String::from_utf8_lossy(&rm.stderr);
    assert!(rm.status.success(), "ctr task rm: {rm_err}");
    assert!(rm_err.contains("exit code 137"), "ctr task rm: {rm_err}");
    env.ctr_ok(&["container", "rm", "k1"]);
    assert!(env.sandbox_names().is_empty(), "{:?}", env.sandbox_names());
    assert_eq!(rootfs_mounts(&env), Vec::<String>::new());
}
