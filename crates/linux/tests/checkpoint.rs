//! Checkpoint and restore of real linux sandboxes with the CRIU `scripts/install-criu.sh`
//! builds, through the backend alone (the control plane and CLI are tested in
//! crates/cli/tests/checkpoint.rs). Needs root, /bin/busybox and CRIU 4.x; without one of
//! them every test says why it skips.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use warren_image::ImageStore;
use warren_linux::{LinuxBackend, LinuxConfig};
use warren_runtime::{Backend, BackendStatus, SandboxConfig, logs};
use warren_spec::{BackendKind, SandboxSpec};

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("SKIP: checkpoints need root".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("SKIP: /bin/busybox (Debian busybox-static) is not installed".into());
    }
    if let Err(e) = warren_linux::criu::Criu::find(None) {
        return Some(format!(
            "SKIP: {} (run scripts/install-criu.sh)",
            warren_linux::error_chain(&e)
        ));
    }
    None
}

/// A backend on a temp dir with a busybox image and a cgroup parent of its own; on drop,
/// every workload left is killed and the cgroups removed.
struct Env {
    backend: LinuxBackend,
    dir: tempfile::TempDir,
    cgroup_parent: String,
    _events: tokio::sync::mpsc::UnboundedReceiver<warren_runtime::BackendEvent>,
}

impl Env {
    fn new() -> Env {
        Env::with(|_| {})
    }

    /// An environment whose backend's config `tweak` changed.
    fn with(tweak: impl FnOnce(&mut LinuxConfig)) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("warren-ckpt-")
            .tempdir()
            .unwrap();
        let images = ImageStore::open(&dir.path().join("images")).unwrap();
        let layout = warren_image::testing::busybox_layout(dir.path(), "busybox").unwrap();
        images.import(&layout, None).unwrap();
        let cgroup_parent = format!("warren-ckpt-{}-{}", std::process::id(), seq());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut config = LinuxConfig {
            dir: dir.path().join("linux"),
            images,
            supervisor: vec![env!("CARGO_BIN_EXE_warren-supervise").into()],
            cgroup_parent: cgroup_parent.clone(),
            log_max_bytes: None,
            default_stop_grace: Duration::from_secs(2),
            warm: Vec::new(),
            criu: None,
            restore_timeout: warren_linux::DEFAULT_RESTORE_TIMEOUT,
            // No egress sandboxes here; a range is required all the same.
            egress_range: warren_linux::egress::parse_range("198.18.0.0/15").unwrap(),
        };
        tweak(&mut config);
        let backend = LinuxBackend::new(config, tx).unwrap();
        Env {
            backend,
            dir,
            cgroup_parent,
            _events: rx,
        }
    }

    fn config(&self, id: &str, name: &str, command: &[&str]) -> SandboxConfig {
        SandboxConfig {
            id: id.into(),
            spec: SandboxSpec {
                name: name.into(),
                backend: BackendKind::Linux,
                image: Some("busybox".into()),
                command: command.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    async fn run(&self, config: &SandboxConfig) {
        self.backend.create(config).await.unwrap();
        self.backend.start(&config.id).await.unwrap();
    }

    fn checkpoint_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join("checkpoints").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The sandbox's stdout lines so far.
    fn lines(&self, id: &str) -> Vec<String> {
        let path = self.backend.log_path(id).unwrap();
        match logs::read_logs_from(&path, None, None) {
            Ok((records, _)) => records
                .into_iter()
                .map(|r| String::from_utf8_lossy(&r.content).into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Waits until the sandbox's log has a line `want` answers true for.
    fn wait_line(&self, id: &str, want: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let lines = self.lines(id);
            if lines.iter().any(|l| want(l)) {
                return lines;
            }
            assert!(Instant::now() < deadline, "{id}: no such line in {lines:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn seq() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl Drop for Env {
    fn drop(&mut self) {
        use warren_linux::cgroup::{Cgroup, CgroupLayout};
        let Ok(layout) = CgroupLayout::detect() else {
            return;
        };
        let bundles = self.dir.path().join("linux");
        for e in std::fs::read_dir(&bundles).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Ok(text) = std::fs::read_to_string(e.path().join("state.json"))
                && let Ok(state) = serde_json::from_str::<warren_linux::config::State>(&text)
                && state.supervisor_alive()
            {
                // Only while it is still the process that wrote the state: pids are reused.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(state.supervisor_pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let cg = Cgroup::open(&layout, &self.cgroup_parent, &id);
            let _ = cg.kill_all();
            let _ = cg.remove();
        }
        let parent = Cgroup::open(&layout, "", &self.cgroup_parent);
        let _ = parent.remove();
    }
}

/// The last `count N` line's N.
fn last_count(lines: &[String]) -> u64 {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("count ")?.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

const COUNTER: &str =
    "exec 3>/tmp/held; i=0; while true; do i=$((i+1)); echo count $i; echo $i >&3; sleep 0.1; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_kill_restore_continues_counting_with_its_files_and_output() {
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return;
    }
    let env = Env::new();
    let config = env.config("src1", "counter", &["sh", "-c", COUNTER]);
    env.run(&config).await;
    env.wait_line("src1", |l| l == "count 5");

    let ckpt = env.checkpoint_dir("c1");
    let info = env.backend.checkpoint(&config, &ckpt, false).await.unwrap();
    assert_eq!(info["engine"], "criu");
    assert!(info["criuVersion"].starts_with("4."), "{info:?}");
    // Not left running: the workload is gone and the sandbox Stopped (not killed).
    assert_eq!(
        env.backend.status("src1").await.unwrap(),
        BackendStatus::Stopped
    );
    let at_dump = last_count(&env.lines("src1"));
    for f in [
        "linux.json",
        "rootfs.tar",
        "container.log",
        "images/inventory.img",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing from the checkpoint");
    }

    let restored = env.config("dst1", "counter", &["sh", "-c", COUNTER]);
    let info = env.backend.restore(&restored, &ckpt).await.unwrap();
    assert!(info.contains_key("pid"), "{info:?}");
    assert_eq!(
        env.backend.status("dst1").await.unwrap(),
        BackendStatus::Running
    );
    // The count continues from where it was (the log starts with the old output), and the
    // shell's fd 3 still writes the file it opened before the dump.
    let want = at_dump + 5;
    let lines = env.wait_line("dst1", |l| l == format!("count {want}"));
    let numbers: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
        .collect();
    assert_eq!(numbers.first(), Some(&1), "{lines:?}");
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1 || w[1] == w[0]),
        "the count does not continue: {numbers:?}"
    );
    let exec = env
        .backend
        .exec(
            "dst1",
            warren_runtime::ExecRequest {
                argv: vec![
                    "sh".into(),
                    "-c".into(),
                    "tail -n 1 /tmp/held; ls -l /proc/1/fd/3".into(),
                ],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let out = read_all(exec).await;
    let held: u64 = out
        .lines()
        .next()
        .unwrap_or("0")
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        held > at_dump,
        "/tmp/held stopped at {held} (dumped at {at_dump}): {out}"
    );
    assert!(out.contains("/tmp/held"), "fd 3 is not the file: {out}");

    env.backend.stop("dst1", Duration::ZERO).await.unwrap();
    env.backend.delete("dst1").await.unwrap();
    env.backend.delete("src1").await.unwrap();
}

async fn read_all(mut p: warren_runtime::ExecProcess) -> String {
    use tokio::io::AsyncReadExt;
    drop(p.stdin);
    let mut out = String::new();
    p.stdout.read_to_string(&mut out).await.unwrap();
    let _ = p.wait.await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_running_and_a_copy_beside_the_original() {
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return;
    }
    let env = Env::new();
    let config = env.config("orig", "orig", &["sh", "-c", COUNTER]);
    env.run(&config).await;
    env.wait_line("orig", |l| l == "count 3");
    let ckpt = env.checkpoint_dir("c2");
    env.backend.checkpoint(&config, &ckpt, true).await.unwrap();
    assert_eq!(
        env.backend.status("orig").await.unwrap(),
        BackendStatus::Running
    );
    let at_dump = last_count(&env.lines("orig"));
    // Same pids inside (a pid namespace of its own), another cgroup, overlay and log.
    let copy = env.config("copy", "copy", &["sh", "-c", COUNTER]);
    env.backend.restore(&copy, &ckpt).await.unwrap();
    let want = at_dump + 4;
    env.wait_line("copy", |l| l == format!("count {want}"));
    env.wait_line("orig", |l| l == format!("count {want}"));
    // Both run: the original keeps its own log, the copy its own.
    let orig_pid = env.backend.info("orig").unwrap()["pid"].clone();
    let copy_pid = env.backend.info("copy").unwrap()["pid"].clone();
    assert_ne!(orig_pid, copy_pid);
    for id in ["orig", "copy"] {
        env.backend.stop(id, Duration::ZERO).await.unwrap();
        env.backend.delete(id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_leaves_nothing() {
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return;
    }
    let env = Env::new();
    let config = env.config("s", "s", &["sh", "-c", COUNTER]);
    env.run(&config).await;
    env.wait_line("s", |l| l == "count 2");
    let ckpt = env.checkpoint_dir("c3");
    env.backend.checkpoint(&config, &ckpt, true).await.unwrap();
    // Damage CRIU's images (the control plane's digest would catch this first; the backend
    // must still clean up when CRIU itself fails).
    let pstree = ckpt.join("images/pstree.img");
    std::fs::write(&pstree, b"garbage").unwrap();
    let copy = env.config("broken", "broken", &["sh", "-c", COUNTER]);
    let err = env.backend.restore(&copy, &ckpt).await.unwrap_err();
    assert!(err.to_string().contains("criu restore failed"), "{err}");
    assert!(!env.dir.path().join("linux/broken").exists(), "bundle left");
    let layout = warren_linux::cgroup::CgroupLayout::detect().unwrap();
    let cg = warren_linux::cgroup::Cgroup::open(&layout, &env.cgroup_parent, "broken");
    assert!(!cg.exists(), "cgroup left");
    assert!(env.backend.status("broken").await.is_err());
    env.backend.stop("s", Duration::ZERO).await.unwrap();
    env.backend.delete("s").await.unwrap();
}

/// A CRIU that hangs is killed at the restore timeout: the restore fails saying so, soon,
/// and leaves no bundle, cgroup or process behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_past_its_timeout_is_killed_and_leaves_nothing() {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return;
    }
    let real = warren_linux::criu::Criu::find(None).unwrap().path;
    let scripts = tempfile::tempdir().unwrap();
    // The real CRIU for everything but a restore, which hangs (the sleep's odd length marks
    // it among the machine's processes).
    let fake = scripts.path().join("criu");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n[ \"$1\" = restore ] && exec sleep 987.654\nexec '{}' \"$@\"\n",
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let env = Env::with(|c| {
        c.criu = Some(fake.clone());
        c.restore_timeout = Duration::from_secs(1);
    });
    let config = env.config("s", "s", &["sh", "-c", COUNTER]);
    env.run(&config).await;
    env.wait_line("s", |l| l == "count 2");
    let ckpt = env.checkpoint_dir("c4");
    env.backend.checkpoint(&config, &ckpt, true).await.unwrap();

    let copy = env.config("hung", "hung", &["sh", "-c", COUNTER]);
    let started = Instant::now();
    // Bounded here too: without the timeout the restore would wait for the sleep.
    let err = tokio::time::timeout(Duration::from_secs(30), env.backend.restore(&copy, &ckpt))
        .await
        .expect("the restore ends at its timeout")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("criu did not finish the restore within 1s"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(!env.dir.path().join("linux/hung").exists(), "bundle left");
    let layout = warren_linux::cgroup::CgroupLayout::detect().unwrap();
    let cg = warren_linux::cgroup::Cgroup::open(&layout, &env.cgroup_parent, "hung");
    assert!(!cg.exists(), "cgroup left");
    assert!(env.backend.status("hung").await.is_err());
    let hung: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| c.windows(7).any(|w| w == b"987.654"))
        })
        .map(|e| e.file_name())
        .collect();
    assert!(hung.is_empty(), "the hung criu lives on: {hung:?}");
    env.backend.stop("s", Duration::ZERO).await.unwrap();
    env.backend.delete("s").await.unwrap();
}

/// A checkpoint that does not say what confined its workload (one an older warren took) is
/// not restored: its confinement cannot be checked, and CRIU would bring back the
/// capabilities of its day. Nothing is left of the attempt.
#[tokio::test]
async fn a_checkpoint_without_its_confinement_is_not_restored() {
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return;
    }
    let env = Env::with(|_| {});
    let config = env.config("s", "s", &["sh", "-c", COUNTER]);
    env.run(&config).await;
    env.wait_line("s", |l| l == "count 2");
    let ckpt = env.checkpoint_dir("old");
    env.backend.checkpoint(&config, &ckpt, true).await.unwrap();
    let linux = ckpt.join("linux.json");
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&linux).unwrap()).unwrap();
    assert!(saved["confinement"].is_object(), "{saved}");
    saved.as_object_mut().unwrap().remove("confinement");
    std::fs::write(&linux, serde_json::to_vec(&saved).unwrap()).unwrap();
    let copy = env.config("old", "old", &["sh", "-c", COUNTER]);
    let err = env.backend.restore(&copy, &ckpt).await.unwrap_err();
    assert!(
        err.to_string().contains("taken by an older warren"),
        "{err}"
    );
    assert!(!env.dir.path().join("linux/old").exists(), "bundle left");
    assert!(env.backend.status("old").await.is_err());
    env.backend.stop("s", Duration::ZERO).await.unwrap();
    env.backend.delete("s").await.unwrap();
}
