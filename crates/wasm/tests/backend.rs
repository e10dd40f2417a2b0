//! The wasm backend end to end: real modules (tests/modules/*.wat) in a real engine.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::sync::mpsc::UnboundedReceiver;
use warren_runtime::logs::{Stream, read_logs};
use warren_runtime::{Backend, BackendError, BackendEvent, BackendStatus, SandboxConfig};
use warren_spec::{Mount, ResourceInfo, SandboxSpec};
use warren_wasm::{CacheStats, WasmBackend, WasmConfig};

fn module(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/modules")
        .join(name)
        .display()
        .to_string()
}

/// Fields drop in order: the backend (which finishes its file work) before the directory.
struct Harness {
    backend: WasmBackend,
    events: UnboundedReceiver<BackendEvent>,
    /// Events received while waiting for another sandbox's.
    early: HashMap<String, BackendStatus>,
    dir: TempDir,
}

fn small() -> WasmConfig {
    WasmConfig {
        pool_instances: 8,
        max_memory_bytes: 16 << 20,
        ..WasmConfig::default()
    }
}

fn harness(config: WasmConfig) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let backend = WasmBackend::new(dir.path().join("wasm"), config, tx).expect("backend");
    backend.is_available().expect("available");
    Harness {
        dir,
        backend,
        events,
        early: HashMap::new(),
    }
}

fn sandbox(id: &str, image: &str) -> SandboxConfig {
    SandboxConfig {
        id: id.into(),
        spec: SandboxSpec {
            name: id.into(),
            image: Some(image.into()),
            ..SandboxSpec::default()
        },
        resources: ResourceInfo::default(),
        stdin: None,
        policy: None,
    }
}

impl Harness {
    fn root(&self) -> PathBuf {
        self.dir.path().join("wasm")
    }

    /// Waits for the event of `id`, keeping the others' for later.
    /// The sandbox's next end, once its files (log, `status.json`), written behind the
    /// event, are there too.
    async fn event(&mut self, id: &str) -> BackendStatus {
        let status = self.event_only(id).await;
        if let Some(mut done) = self.backend.done_signal(id) {
            let _ = done.wait_for(|d| *d).await;
        }
        self.backend.logs_settled(id).await;
        status
    }

    async fn event_only(&mut self, id: &str) -> BackendStatus {
        if let Some(status) = self.early.remove(id) {
            return status;
        }
        let wait = async {
            loop {
                let event = self.events.recv().await.expect("events open");
                if event.id == id {
                    return event.status;
                }
                self.early.insert(event.id, event.status);
            }
        };
        tokio::time::timeout(Duration::from_secs(20), wait)
            .await
            .unwrap_or_else(|_| panic!("no event for {id}"))
    }

    /// Creates, starts and waits for the end of a sandbox.
    async fn run(&mut self, config: &SandboxConfig) -> BackendStatus {
        self.backend.create(config).await.expect("create");
        self.backend.start(&config.id).await.expect("start");
        let status = self.event(&config.id).await;
        assert_eq!(
            self.backend.status(&config.id).await.expect("status"),
            status
        );
        status
    }

    fn output(&self, id: &str, stream: Stream) -> String {
        let path = self.backend.log_path(id).expect("log path");
        let mut out = Vec::new();
        for record in read_logs(&path, None, None).expect("read logs") {
            if record.stream == stream {
                out.extend_from_slice(&record.content);
                if !record.partial {
                    out.push(b'\n');
                }
            }
        }
        String::from_utf8(out).expect("utf-8 output")
    }
}

fn failed(reason: &str) -> BackendStatus {
    BackendStatus::Failed {
        reason: reason.into(),
    }
}

#[tokio::test]
async fn hello_world_logs_and_exits_zero() {
    let mut h = harness(small());
    let config = sandbox("hello", &module("hello.wat"));
    let info = h.backend.create(&config).await.expect("create");
    assert_eq!(info["module"], module("hello.wat"));
    assert_eq!(info["cache"], "compiled");
    assert!(info["log_path"].ends_with("hello/output.log"));
    assert_eq!(
        h.backend.status("hello").await.expect("status"),
        BackendStatus::Created
    );
    h.backend.start("hello").await.expect("start");
    assert_eq!(h.event("hello").await, BackendStatus::Exited { code: 0 });
    assert_eq!(h.output("hello", Stream::Stdout), "hello\n");
    assert_eq!(h.output("hello", Stream::Stderr), "");
    let persisted = std::fs::read_to_string(h.root().join("hello/status.json")).expect("status");
    assert_eq!(persisted, r#"{"status":"exited","code":0}"#);
    let log = h.root().join("hello/output.log");
    assert_log_closed(&log).await;
    // An ended sandbox can run again; its log goes on.
    h.backend.start("hello").await.expect("start again");
    assert_eq!(h.event("hello").await, BackendStatus::Exited { code: 0 });
    assert_eq!(h.output("hello", Stream::Stdout), "hello\nhello\n");
    assert_log_closed(&log).await;
}

/// Waits (a little: the log file is made behind the start) until this process holds no
/// descriptor on `log`: a finished sandbox keeps none, however many a server holds.
async fn assert_log_closed(log: &Path) {
    let held = || {
        std::fs::read_dir("/proc/self/fd")
            .expect("fds")
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == log))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while held() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} is still open after the sandbox ended",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn exit_code_from_proc_exit() {
    let mut h = harness(small());
    let status = h.run(&sandbox("exit3", &module("exit3.wat"))).await;
    assert_eq!(status, BackendStatus::Exited { code: 3 });
    assert_eq!(h.output("exit3", Stream::Stderr), "bye\n");
}

#[tokio::test]
async fn trap_is_reported() {
    let mut h = harness(small());
    let status = h.run(&sandbox("trap", &module("trap.wat"))).await;
    let BackendStatus::Failed { reason } = status else {
        panic!("{status:?}")
    };
    assert!(
        reason.starts_with("Trap: ") && reason.contains("unreachable"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_ends_an_infinite_loop_on_time_and_output_streams_while_running() {
    let mut h = harness(small());
    let mut config = sandbox("loop", &module("loop.wat"));
    config.spec.timeout_seconds = Some(1.0);
    h.backend.create(&config).await.expect("create");
    let started = Instant::now();
    h.backend.start("loop").await.expect("start");
    // Output reaches the log while the guest still runs (well before its timeout, however
    // slow this machine is at the moment).
    let log = h.backend.log_path("loop").expect("log path");
    while !log.exists() || h.output("loop", Stream::Stdout).is_empty() {
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "no output yet"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        h.backend.status("loop").await.expect("status"),
        BackendStatus::Running
    );
    assert_eq!(h.output("loop", Stream::Stdout), "looping\n");
    assert_eq!(h.event("loop").await, failed("Timeout"));
    // On time: not before it, and not a whole second late (a loaded 2-core machine).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed <= Duration::from_secs(2),
        "timed out after {elapsed:?}"
    );
}

/// `warren pause`: the guest stops at its next epoch tick and writes nothing until it is
/// resumed; a paused guest still stops at once and still times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_guest_runs_nothing_until_resumed_and_still_ends() {
    let mut h = harness(small());
    h.backend
        .create(&sandbox("spam", &module("chatty.wat")))
        .await
        .expect("create");
    h.backend.start("spam").await.expect("start");
    let log = h.backend.log_path("spam").expect("log path");
    let size = || std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let grows = || async {
        let before = size();
        let deadline = Instant::now() + Duration::from_secs(5);
        while size() <= before {
            assert!(Instant::now() < deadline, "the guest does not run");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    grows().await;
    h.backend.pause("spam").await.expect("pause");
    // Its next tick, then nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = size();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(size(), before, "the paused guest wrote");
    assert_eq!(
        h.backend.status("spam").await.expect("status"),
        BackendStatus::Running
    );
    h.backend.resume("spam").await.expect("resume");
    grows().await;
    h.backend.pause("spam").await.expect("pause");
    let asked = Instant::now();
    let status = h
        .backend
        .stop("spam", Duration::from_secs(10))
        .await
        .expect("stop");
    assert_eq!(status, BackendStatus::Stopped);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    let err = h.backend.pause("spam").await.expect_err("not running");
    assert!(err.to_string().contains("no guest to pause"), "{err}");

    let mut config = sandbox("late", &module("loop.wat"));
    config.spec.timeout_seconds = Some(0.5);
    h.backend.create(&config).await.expect("create");
    h.backend.start("late").await.expect("start");
    h.backend.pause("late").await.expect("pause");
    assert_eq!(h.event("late").await, failed("Timeout"));
}

#[tokio::test]
async fn default_timeout_applies_when_the_spec_has_none() {
    let mut h = harness(WasmConfig {
        default_timeout: Some(Duration::from_millis(50)),
        ..small()
    });
    let status = h.run(&sandbox("loop", &module("loop.wat"))).await;
    assert_eq!(status, failed("Timeout"));
}

#[tokio::test]
async fn a_guest_cannot_fill_the_disk_through_its_log() {
    let mut h = harness(WasmConfig {
        default_timeout: Some(Duration::from_millis(300)),
        log_max_bytes: Some(64 << 10),
        ..small()
    });
    let status = h.run(&sandbox("chatty", &module("chatty.wat"))).await;
    assert_eq!(status, failed("Timeout"));
    let path = h.backend.log_path("chatty").expect("log path");
    let size = std::fs::metadata(&path).expect("log").len();
    assert!(
        size <= (64 << 10) + 512,
        "log held to its limit: {size} bytes"
    );
    assert!(
        h.output("chatty", Stream::Stdout)
            .starts_with("spam spam spam\n")
    );
    assert!(
        h.output("chatty", Stream::Stderr)
            .contains("limit of 65536 bytes")
    );
}

#[tokio::test]
async fn memory_growth_past_the_limit_fails_with_memory_limit() {
    let mut h = harness(small());
    let mut config = sandbox("grow", &module("grow.wat"));
    config.resources.memory_limit = Some(2 << 20);
    assert_eq!(h.run(&config).await, failed("MemoryLimit"));
    // Without a limit, the backend's per-instance cap (16 MiB here) stops it the same way.
    assert_eq!(
        h.run(&sandbox("grow-cap", &module("grow.wat"))).await,
        failed("MemoryLimit")
    );
}

#[tokio::test]
async fn memory_limit_above_the_cap_is_refused() {
    let h = harness(small());
    let mut config = sandbox("big", &module("hello.wat"));
    config.resources.memory_limit = Some(1 << 30);
    let err = h.backend.create(&config).await.unwrap_err();
    assert!(matches!(err, BackendError::Capacity { .. }), "{err}");
}

#[tokio::test]
async fn fuel_bounds_work() {
    let mut h = harness(WasmConfig {
        fuel: Some(100_000),
        ..small()
    });
    assert_eq!(
        h.run(&sandbox("loop", &module("loop.wat"))).await,
        failed("OutOfFuel")
    );
    assert_eq!(
        h.run(&sandbox("hello", &module("hello.wat"))).await,
        BackendStatus::Exited { code: 0 }
    );
}

fn data_dir(h: &Harness) -> PathBuf {
    let data = h.dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("input.txt"), "from the host\n").expect("write input");
    std::fs::write(h.dir.path().join("secret.txt"), "secret\n").expect("write secret");
    data
}

#[tokio::test]
async fn read_only_mount_reads_but_cannot_write() {
    let mut h = harness(small());
    let data = data_dir(&h);
    let mut config = sandbox("ro", &module("files.wat"));
    config.spec.mounts = vec![Mount {
        guest: "/data".into(),
        host: data.display().to_string(),
        read_only: true,
    }];
    // 40: opening the file for writing failed.
    assert_eq!(h.run(&config).await, BackendStatus::Exited { code: 40 });
    assert_eq!(h.output("ro", Stream::Stdout), "from the host\n");
    let host = std::fs::read_to_string(data.join("input.txt")).expect("read");
    assert_eq!(host, "from the host\n");
}

#[tokio::test]
async fn read_write_mount_can_write() {
    let mut h = harness(small());
    let data = data_dir(&h);
    let mut config = sandbox("rw", &module("files.wat"));
    config.spec.mounts = vec![Mount {
        guest: "/data".into(),
        host: data.display().to_string(),
        read_only: false,
    }];
    // 41: the write went through: the same module is refused only by the read-only mount.
    assert_eq!(h.run(&config).await, BackendStatus::Exited { code: 41 });
    let host = std::fs::read_to_string(data.join("input.txt")).expect("read");
    assert_eq!(host, "X");
}

#[tokio::test]
async fn unmapped_host_paths_are_unreachable() {
    let mut h = harness(small());
    let data = data_dir(&h);
    let mut config = sandbox("escape", &module("escape.wat"));
    config.spec.mounts = vec![Mount {
        guest: "/data".into(),
        host: data.display().to_string(),
        read_only: false,
    }];
    assert_eq!(h.run(&config).await, BackendStatus::Exited { code: 0 });
}

#[tokio::test]
async fn missing_mount_directory_is_refused_at_create() {
    let h = harness(small());
    let mut config = sandbox("m", &module("hello.wat"));
    config.spec.mounts = vec![Mount {
        guest: "/data".into(),
        host: "/nonexistent/warren-test".into(),
        read_only: true,
    }];
    let err = h.backend.create(&config).await.unwrap_err().to_string();
    assert!(
        err.contains("spec.mounts[0].host") && err.contains("/nonexistent/warren-test"),
        "{err}"
    );
}

#[tokio::test]
async fn argv_and_env_are_the_specs_only() {
    let mut h = harness(small());
    let mut config = sandbox("echo", &module("echo.wat"));
    config.spec.args = vec!["a b".into(), "c".into()];
    config.spec.env = BTreeMap::from([("GREETING".into(), "hi".into())]);
    assert_eq!(h.run(&config).await, BackendStatus::Exited { code: 0 });
    // argv[0] is the module's file name when no command is given; no host variable leaks.
    assert_eq!(
        h.output("echo", Stream::Stdout),
        "echo.wat\na b\nc\nGREETING=hi\n"
    );

    let mut config = sandbox("cmd", &module("echo.wat"));
    config.spec.command = vec!["prog".into(), "-v".into()];
    config.spec.args = vec!["x".into()];
    assert_eq!(h.run(&config).await, BackendStatus::Exited { code: 0 });
    assert_eq!(h.output("cmd", Stream::Stdout), "prog\n-v\nx\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_sandboxes() {
    let mut h = harness(WasmConfig {
        pool_instances: 256,
        max_memory_bytes: 1 << 20,
        ..WasmConfig::default()
    });
    let n = 200;
    let configs: Vec<SandboxConfig> = (0..n)
        .map(|i| {
            let mut c = sandbox(&format!("s{i}"), &module("echo.wat"));
            c.spec.command = vec![format!("s{i}")];
            c.spec.env = BTreeMap::from([("N".into(), i.to_string())]);
            c
        })
        .collect();
    let started = Instant::now();
    for c in &configs {
        h.backend.create(c).await.expect("create");
    }
    for c in &configs {
        h.backend.start(&c.id).await.expect("start");
    }
    let mut ended = HashMap::new();
    while ended.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(30), h.events.recv())
            .await
            .expect("all end")
            .expect("events open");
        ended.insert(event.id, event.status);
    }
    eprintln!(
        "200 sandboxes created, run and ended in {:?}",
        started.elapsed()
    );
    for (i, c) in configs.iter().enumerate() {
        assert_eq!(ended[&c.id], BackendStatus::Exited { code: 0 }, "{}", c.id);
        h.backend.logs_settled(&c.id).await;
        assert_eq!(h.output(&c.id, Stream::Stdout), format!("s{i}\nN={i}\n"));
    }
    let stats = h.backend.cache_stats();
    assert_eq!(stats.compiles, 1);
    assert_eq!(stats.memory_hits, n as u64 - 1);
}

#[tokio::test]
async fn pool_exhaustion_is_a_capacity_error() {
    let h = harness(WasmConfig {
        pool_instances: 2,
        ..small()
    });
    for id in ["a", "b", "c"] {
        h.backend
            .create(&sandbox(id, &module("loop.wat")))
            .await
            .expect("create");
    }
    h.backend.start("a").await.expect("start a");
    h.backend.start("b").await.expect("start b");
    let err = h.backend.start("c").await.unwrap_err();
    assert!(matches!(err, BackendError::Capacity { .. }), "{err}");
    h.backend.stop("a", Duration::ZERO).await.expect("stop");
    h.backend.start("c").await.expect("room again");
}

#[tokio::test]
async fn module_cache_hits_in_memory_then_on_disk() {
    let mut h = harness(small());
    let first = h
        .backend
        .create(&sandbox("one", &module("hello.wat")))
        .await
        .expect("create");
    let second = h
        .backend
        .create(&sandbox("two", &module("hello.wat")))
        .await
        .expect("create");
    assert_eq!(
        (first["cache"].as_str(), second["cache"].as_str()),
        ("compiled", "memory")
    );
    assert_eq!(
        h.backend.cache_stats(),
        CacheStats {
            memory_hits: 1,
            disk_hits: 0,
            compiles: 1,
            memory_evictions: 0,
        }
    );
    let cached: Vec<_> = std::fs::read_dir(h.root().join("cache"))
        .expect("cache dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].ends_with(".cwasm"), "{cached:?}");

    // A fresh backend on the same directory (a server restart) reads the compiled module.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let fresh = WasmBackend::new(h.root(), small(), tx).expect("backend");
    let info = fresh
        .create(&sandbox("three", &module("hello.wat")))
        .await
        .expect("create");
    assert_eq!(info["cache"], "disk");
    assert_eq!(
        fresh.cache_stats(),
        CacheStats {
            memory_hits: 0,
            disk_hits: 1,
            compiles: 0,
            memory_evictions: 0,
        }
    );
    fresh.start("three").await.expect("start");
    // Directories are made behind the creates.
    fresh.logs_settled("three").await;
    drop(fresh);
    for id in ["one", "two"] {
        h.backend.logs_settled(id).await;
    }
    assert_eq!(h.list().await, ["one", "three", "two"]);
    let _ = h.events.try_recv();
}

/// Writes `n` modules that differ only in a comment (different files, different digests,
/// the same compiled size) and returns their paths.
fn variants(dir: &Path, n: usize) -> Vec<String> {
    let hello = std::fs::read_to_string(module("hello.wat")).expect("hello.wat");
    (0..n)
        .map(|i| {
            let path = dir.join(format!("variant{i}.wat"));
            std::fs::write(&path, format!("{hello}\n;; variant {i}\n")).expect("write");
            path.display().to_string()
        })
        .collect()
}

/// Creates sandbox `id` of the module at `path`; where its program came from.
async fn cache_source(backend: &WasmBackend, id: &str, path: &str) -> String {
    let info = backend.create(&sandbox(id, path)).await.expect("create");
    info["cache"].clone()
}

/// The names of the compiled files in a backend's disk cache.
fn cached_files(root: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(root.join("cache"))
        .expect("cache dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".cwasm"))
        .collect()
}

#[tokio::test]
async fn module_caches_keep_the_most_recently_used() {
    // Memory: two programs. Re-using v2 before v1 comes back makes v0, not v2, the one to
    // go; a first-in-first-out cache would drop v2 instead.
    let h = harness(WasmConfig {
        cache_modules: 2,
        cache_max_bytes: None,
        ..small()
    });
    let v = variants(h.dir.path(), 3);
    let mut n = 0;
    let mut load = async |path: &str| {
        n += 1;
        cache_source(&h.backend, &format!("s{n}"), path).await
    };
    let mut sources = Vec::new();
    for path in [&v[0], &v[1], &v[2], &v[0], &v[2], &v[1], &v[2]] {
        sources.push(load(path).await);
    }
    assert_eq!(
        sources,
        [
            "compiled", "compiled", "compiled", "disk", "memory", "disk", "memory"
        ]
    );
    assert_eq!(
        h.backend.cache_stats(),
        CacheStats {
            memory_hits: 2,
            disk_hits: 2,
            compiles: 3,
            memory_evictions: 3,
        }
    );
    let sizes: Vec<u64> = cached_files(&h.root())
        .iter()
        .map(|name| {
            std::fs::metadata(h.root().join("cache").join(name))
                .expect("stat")
                .len()
        })
        .collect();
    assert_eq!(sizes.len(), 3, "unlimited: every compiled file stays");

    // Disk: room for two files. A disk hit marks v0 used, so v1 is the one a third compile
    // pushes out.
    let biggest = sizes.iter().copied().max().expect("sizes");
    let d = harness(WasmConfig {
        cache_modules: 1,
        cache_max_bytes: Some(biggest * 5 / 2),
        ..small()
    });
    let mut n = 0;
    let mut load = async |path: &str| {
        n += 1;
        cache_source(&d.backend, &format!("d{n}"), path).await
    };
    assert_eq!(load(&v[0]).await, "compiled");
    let first = cached_files(&d.root());
    assert_eq!(load(&v[1]).await, "compiled");
    let second: Vec<_> = cached_files(&d.root())
        .difference(&first)
        .cloned()
        .collect();
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(load(&v[0]).await, "disk");
    assert_eq!(load(&v[2]).await, "compiled");
    let now = cached_files(&d.root());
    assert_eq!(now.len(), 2, "{now:?}");
    assert!(now.is_superset(&first), "v0 was used last: {now:?}");
    assert!(
        !now.contains(&second[0]),
        "v1 is the least recently used: {now:?}"
    );
    // What left the disk compiles again, and the limit holds.
    assert_eq!(load(&v[1]).await, "compiled");
    assert_eq!(cached_files(&d.root()).len(), 2);
}

impl Harness {
    async fn list(&self) -> Vec<String> {
        self.backend.list().await.expect("list")
    }
}

#[tokio::test]
async fn bad_modules_are_clear_errors_naming_the_path() {
    let h = harness(small());
    let not_wasm = h.dir.path().join("notwasm.wasm");
    std::fs::write(&not_wasm, "this is not wasm").expect("write");
    let component = h.dir.path().join("component.wasm");
    std::fs::write(&component, b"\0asm\x0d\x00\x01\x00").expect("write");
    let missing = h.dir.path().join("missing.wasm");
    let unlinkable = h.dir.path().join("imports.wat");
    std::fs::write(
        &unlinkable,
        r#"(module (import "env" "launch" (func)) (func (export "_start")))"#,
    )
    .expect("write");
    let cases = [
        (unlinkable.display().to_string(), "cannot be linked: "),
        (
            not_wasm.display().to_string(),
            "is not a WebAssembly module (no \\0asm header, and not WAT text)",
        ),
        (module("nostart.wat"), "has no `_start` function"),
        (
            component.display().to_string(),
            "is a component but not a WASI command",
        ),
        (missing.display().to_string(), "does not exist"),
    ];
    for (path, want) in cases {
        let err = h.backend.create(&sandbox("bad", &path)).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&path) && text.contains(want), "{text}");
        assert!(
            !text.contains("this is not wasm"),
            "file content is never echoed: {text}"
        );
    }
    let err = h
        .backend
        .create(&sandbox("bad", &missing.display().to_string()))
        .await
        .unwrap_err();
    // A module file that is not there is a bad spec, as a mount's host path is.
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    let mut no_image = sandbox("bad", "");
    no_image.spec.image = None;
    let err = h.backend.create(&no_image).await.unwrap_err().to_string();
    assert!(err.contains("spec.image"), "{err}");
    // Nothing was left behind.
    assert!(h.list().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_ends_an_infinite_loop_promptly() {
    let mut h = harness(small());
    h.backend
        .create(&sandbox("loop", &module("loop.wat")))
        .await
        .expect("create");
    h.backend.start("loop").await.expect("start");
    tokio::time::sleep(Duration::from_millis(30)).await;
    let asked = Instant::now();
    let status = h
        .backend
        .stop("loop", Duration::from_secs(10))
        .await
        .expect("stop");
    let took = asked.elapsed();
    assert_eq!(status, BackendStatus::Stopped);
    // Promptly: at the guest's next epoch tick, not after the 10 s grace (the bound leaves
    // room for a loaded machine).
    assert!(took < Duration::from_secs(1), "stop took {took:?}");
    assert_eq!(
        h.backend.status("loop").await.expect("status"),
        BackendStatus::Stopped
    );
    // A requested stop is not an event: the caller has the answer.
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(h.events.try_recv().is_err());
    // Stopping again, or stopping an ended sandbox, reports the status as it is.
    assert_eq!(
        h.backend.stop("loop", Duration::ZERO).await.expect("stop"),
        BackendStatus::Stopped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_stops_and_removes_everything() {
    let h = harness(small());
    h.backend
        .create(&sandbox("loop", &module("loop.wat")))
        .await
        .expect("create");
    h.backend.start("loop").await.expect("start");
    let done = h.backend.done_signal("loop").expect("started");
    let dir = h.root().join("loop");
    h.backend.logs_settled("loop").await;
    assert!(dir.join("output.log").is_file(), "made behind the start");
    h.backend.delete("loop").await.expect("delete");
    assert!(!dir.exists());
    assert!(done.has_changed().is_err() || *done.borrow());
    let err = h.backend.delete("loop").await.unwrap_err();
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
    let err = h.backend.status("loop").await.unwrap_err();
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
    assert!(h.list().await.is_empty());
    // Creating the same id again starts clean.
    h.backend
        .create(&sandbox("loop", &module("hello.wat")))
        .await
        .expect("create again");
}

#[tokio::test]
async fn adopt_after_restart_reports_how_sandboxes_ended() {
    let mut h = harness(small());
    let exited = sandbox("exited", &module("exit3.wat"));
    assert_eq!(h.run(&exited).await, BackendStatus::Exited { code: 3 });
    let created = sandbox("created", &module("hello.wat"));
    h.backend.create(&created).await.expect("create");
    let lost = sandbox("lost", &module("hello.wat"));
    h.backend.create(&lost).await.expect("create");
    // The directories are made behind the creates.
    h.backend.logs_settled("created").await;
    h.backend.logs_settled("lost").await;
    // As if the server died while it ran.
    std::fs::write(h.root().join("lost/status.json"), r#"{"status":"running"}"#).expect("write");

    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let fresh = WasmBackend::new(h.root(), small(), tx).expect("backend");
    let (status, info) = fresh.adopt(&exited).await.expect("adopt");
    assert_eq!(status, BackendStatus::Exited { code: 3 });
    assert_eq!(info["cache"], "disk");
    let (status, _) = fresh.adopt(&lost).await.expect("adopt");
    assert_eq!(
        status,
        failed(
            "lost: the process running it (the server or its node agent) restarted while it ran"
        )
    );
    let (status, _) = fresh.adopt(&created).await.expect("adopt");
    assert_eq!(status, BackendStatus::Created);
    fresh.start("created").await.expect("start adopted");
    let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
        .await
        .expect("event")
        .expect("open");
    assert_eq!(event.status, BackendStatus::Exited { code: 0 });
    let err = fresh
        .adopt(&sandbox("never", &module("hello.wat")))
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::NotFound { .. }), "{err}");
    assert_eq!(
        fresh.list().await.expect("list"),
        ["created", "exited", "lost"]
    );
}

/// Not a benchmark (debug build, shared CI machine); prints the in-process cost of a warm
/// hello world through the backend's API so regressions are visible in test output.
#[tokio::test]
async fn warm_hello_create_to_exit_latency() {
    let mut h = harness(small());
    h.run(&sandbox("warm", &module("hello.wat"))).await;
    let mut samples = Vec::new();
    let mut creates = Vec::new();
    for i in 0..50 {
        let config = sandbox(&format!("h{i}"), &module("hello.wat"));
        let t = Instant::now();
        h.backend.create(&config).await.expect("create");
        creates.push(t.elapsed());
        h.backend.start(&config.id).await.expect("start");
        let status = h.event(&config.id).await;
        samples.push(t.elapsed());
        assert_eq!(status, BackendStatus::Exited { code: 0 });
        h.backend.delete(&config.id).await.expect("delete");
    }
    samples.sort();
    creates.sort();
    eprintln!(
        "warm hello create→exit: median {:?}, p90 {:?} (create alone: median {:?})",
        samples[samples.len() / 2],
        samples[samples.len() * 9 / 10],
        creates[creates.len() / 2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_guests_do_not_starve_the_runtime() {
    let mut h = harness(small());
    // Twice as many spinning guests as workers.
    for i in 0..4 {
        let mut config = sandbox(&format!("spin{i}"), &module("loop.wat"));
        config.spec.timeout_seconds = Some(0.3);
        h.backend.create(&config).await.expect("create");
        h.backend.start(&config.id).await.expect("start");
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut worst = Duration::ZERO;
    for _ in 0..100 {
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(1)).await;
        worst = worst.max(t.elapsed());
    }
    eprintln!("worst 1 ms sleep with 4 spinning guests on 2 workers: {worst:?}");
    // A starved runtime waits for a guest's whole timeslice (300 ms here); the bound leaves
    // room for the OS scheduler on a loaded 2-core machine.
    assert!(worst < Duration::from_millis(200), "{worst:?}");
    for i in 0..4 {
        assert_eq!(h.event(&format!("spin{i}")).await, failed("Timeout"));
    }
}

#[tokio::test]
async fn component_command_prints_and_exits_zero() {
    let mut h = harness(small());
    let config = sandbox("p2hello", &module("component_hello.wat"));
    let info = h.backend.create(&config).await.expect("create");
    assert_eq!(info["cache"], "compiled");
    h.backend.start("p2hello").await.expect("start");
    assert_eq!(h.event("p2hello").await, BackendStatus::Exited { code: 0 });
    assert_eq!(h.output("p2hello", Stream::Stdout), "hello\n");
    let persisted = std::fs::read_to_string(h.root().join("p2hello/status.json")).expect("status");
    assert_eq!(persisted, r#"{"status":"exited","code":0}"#);
    // Cached like a module: in memory, then on disk for a new backend on the same directory.
    let again = h
        .backend
        .create(&sandbox("p2again", &module("component_hello.wat")))
        .await;
    assert_eq!(again.expect("create")["cache"], "memory");
    let (tx, _events) = tokio::sync::mpsc::unbounded_channel();
    let restarted = WasmBackend::new(h.root(), small(), tx).expect("backend");
    let info = restarted
        .create(&sandbox("p2disk", &module("component_hello.wat")))
        .await
        .expect("create");
    assert_eq!(info["cache"], "disk");
}

#[tokio::test]
async fn component_run_err_is_exit_code_one() {
    let mut h = harness(small());
    let status = h.run(&sandbox("p2err", &module("component_err.wat"))).await;
    assert_eq!(status, BackendStatus::Exited { code: 1 });
}

#[tokio::test]
async fn component_memory_limit_and_timeout() {
    let mut h = harness(small());
    let status = h
        .run(&sandbox("p2grow", &module("component_loop.wat")))
        .await;
    assert_eq!(status, failed("MemoryLimit"));

    let mut h = harness(WasmConfig {
        max_memory_bytes: 128 << 20,
        ..small()
    });
    let mut config = sandbox("p2spin", &module("component_loop.wat"));
    config.spec.timeout_seconds = Some(0.2);
    let started = Instant::now();
    let status = h.run(&config).await;
    assert_eq!(status, failed("Timeout"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_stop_ends_it_promptly() {
    let h = harness(WasmConfig {
        max_memory_bytes: 128 << 20,
        ..small()
    });
    let config = sandbox("p2stop", &module("component_loop.wat"));
    h.backend.create(&config).await.expect("create");
    h.backend.start("p2stop").await.expect("start");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let status = h
        .backend
        .stop("p2stop", Duration::ZERO)
        .await
        .expect("stop");
    assert_eq!(status, BackendStatus::Stopped);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bench_instantiate_returns_n_samples() {
    let h = harness(small());
    for name in ["hello.wat", "component_hello.wat"] {
        let bench = h
            .backend
            .bench_instantiate(&module(name), 5)
            .await
            .expect("bench");
        assert_eq!(bench.instantiate.len(), 5, "{name}");
        assert_eq!(bench.instantiate_and_run.len(), 5, "{name}");
        assert!(
            bench.instantiate_and_run.iter().all(|d| !d.is_zero()),
            "{name}"
        );
    }
    // Output is discarded and no sandbox is left behind.
    assert!(h.list().await.is_empty());
    let err = h
        .backend
        .bench_instantiate(&module("trap.wat"), 1)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("trap.wat") && err.contains("did not exit 0"),
        "{err}"
    );
}

/// A module file rewritten in place is read again: the cache skips reading a file only while
/// its identity (inode, size, times) is unchanged.
#[tokio::test]
async fn a_rewritten_module_file_is_loaded_again() {
    let mut h = harness(small());
    let path = h.root().join("app.wat");
    std::fs::copy(module("hello.wat"), &path).expect("copy");
    let app = path.display().to_string();
    assert_eq!(
        h.run(&sandbox("a", &app)).await,
        BackendStatus::Exited { code: 0 }
    );
    let info = h.backend.create(&sandbox("b", &app)).await.expect("create");
    assert_eq!(info["cache"], "memory");
    // Same size is not needed to notice; rewrite it with another program.
    std::fs::write(&path, std::fs::read(module("exit3.wat")).expect("read")).expect("rewrite");
    assert_eq!(
        h.run(&sandbox("c", &app)).await,
        BackendStatus::Exited { code: 3 }
    );
    let stats = h.backend.cache_stats();
    assert_eq!((stats.compiles, stats.memory_hits), (2, 1), "{stats:?}");
}

fn with_policy(config: &mut SandboxConfig, spec: warren_spec::PolicySpec) {
    let policy = warren_spec::Policy::compile("p", spec).expect("policy");
    let decision = policy.evaluate(&config.spec, &config.resources);
    config.policy = Some(warren_runtime::AppliedPolicy {
        policy: std::sync::Arc::new(policy),
        decision,
    });
}

fn fs_policy(read_only: &[&str], writable: &[&str]) -> warren_spec::PolicySpec {
    warren_spec::PolicySpec {
        filesystem: Some(warren_spec::FilesystemPolicy {
            read_only: read_only.iter().map(|s| s.to_string()).collect(),
            writable: writable.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A module file is checked where it is: through a symlink under the policy's hostPaths
/// that leads outside them, or to a module exec.allow does not list, it is refused at
/// create (an exec.allow glob counts also with its directories resolved); a relative path
/// is refused (the server's working directory is nobody's).
#[tokio::test]
async fn a_module_is_checked_where_its_symlinks_lead() {
    let h = harness(small());
    let allowed = h.dir.path().join("allowed");
    let outside = h.dir.path().join("outside");
    for dir in [&allowed, &outside] {
        std::fs::create_dir_all(dir).expect("mkdir");
    }
    for file in [
        allowed.join("hello.wat"),
        allowed.join("other.wat"),
        outside.join("evil.wat"),
    ] {
        std::fs::copy(module("hello.wat"), file).expect("copy");
    }
    std::os::unix::fs::symlink(outside.join("evil.wat"), allowed.join("out.wat")).expect("link");
    std::os::unix::fs::symlink(allowed.join("other.wat"), allowed.join("listed.wat"))
        .expect("link");
    // A release directory reached through a link: listed by the link's glob.
    std::fs::create_dir(allowed.join("v3")).expect("mkdir");
    std::fs::copy(module("hello.wat"), allowed.join("v3/app.wat")).expect("copy");
    std::os::unix::fs::symlink(allowed.join("v3"), allowed.join("current")).expect("link");
    let policy = || warren_spec::PolicySpec {
        filesystem: Some(warren_spec::FilesystemPolicy {
            host_paths: Some(vec![allowed.display().to_string()]),
            ..Default::default()
        }),
        exec: Some(warren_spec::ExecPolicy {
            allow: vec![
                allowed.join("hello.wat").display().to_string(),
                allowed.join("out.wat").display().to_string(),
                allowed.join("listed.wat").display().to_string(),
                format!("{}/*.wat", allowed.join("current").display()),
            ],
        }),
        ..Default::default()
    };
    let config = |name: &str, path: PathBuf| {
        let mut config = sandbox(name, &path.display().to_string());
        with_policy(&mut config, policy());
        config
    };
    let backend = &h.backend;
    let create = |config: SandboxConfig| async move {
        backend
            .create(&config)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    create(config("ok", allowed.join("hello.wat")))
        .await
        .expect("a listed module");
    create(config("release", allowed.join("current/app.wat")))
        .await
        .expect("a module under a listed glob's directory, as it resolves");
    let err = create(config("out", allowed.join("out.wat")))
        .await
        .unwrap_err();
    assert!(
        err.contains("resolves to") && err.contains("outside the policy's filesystem.hostPaths"),
        "{err}"
    );
    let err = create(config("alias", allowed.join("listed.wat")))
        .await
        .unwrap_err();
    assert!(
        err.contains("other.wat") && err.contains("exec.allow does not list"),
        "{err}"
    );
    let err = h
        .backend
        .create(&sandbox("relative", "hello.wat"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("relative module path"), "{err}");
    assert!(h.backend.status("ok").await.is_ok());
    for refused in ["out", "alias", "relative"] {
        assert!(h.backend.status(refused).await.is_err(), "{refused}");
    }
}

/// An error that ends a run is one line: wasmtime's wasm backtrace is not the reason.
/// (`proc_exit` above 125 is such an error: WASI's exit statuses are 0 to 125.)
#[tokio::test]
async fn a_failed_runs_reason_is_one_line() {
    let mut h = harness(small());
    let path = h.dir.path().join("exit200.wat");
    std::fs::write(
        &path,
        r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func $inner (call $exit (i32.const 200)))
  (func (export "_start") (call $inner)))"#,
    )
    .expect("write");
    let status = h
        .run(&sandbox("exit200", &path.display().to_string()))
        .await;
    let BackendStatus::Failed { reason } = status else {
        panic!("{status:?}")
    };
    assert!(reason.contains("exit status"), "{reason}");
    assert!(
        !reason.contains('\n') && !reason.contains("backtrace"),
        "{reason}"
    );
}

/// A read-write mount holding a path the policy keeps read-only is preopened read-only
/// (whole directories are preopened; admission refuses such a spec, this holds for one
/// admitted in audit mode).
#[tokio::test]
async fn a_read_only_path_inside_a_mount_makes_it_read_only() {
    let mut h = harness(small());
    let data = data_dir(&h);
    let mut config = sandbox("nested", &module("files.wat"));
    config.spec.mounts = vec![Mount {
        guest: "/data".into(),
        host: data.display().to_string(),
        read_only: false,
    }];
    let mut spec = fs_policy(&["/data/cfg"], &["/data"]);
    spec.mode = warren_spec::PolicyMode::Audit;
    with_policy(&mut config, spec);
    // 40: opening for writing was refused (41 would be a write that went through).
    assert_eq!(h.run(&config).await, BackendStatus::Exited { code: 40 });
    assert_eq!(
        std::fs::read_to_string(data.join("input.txt")).expect("read"),
        "from the host\n"
    );
}

#[tokio::test]
async fn a_directory_the_policy_does_not_allow_is_not_mapped() {
    let mut h = harness(small());
    let data = data_dir(&h);
    let mount = Mount {
        guest: "/data".into(),
        host: data.display().to_string(),
        read_only: true,
    };
    // Without a policy the module sees the preopen and the file in it.
    let mut config = sandbox("open", &module("preopen.wat"));
    config.spec.mounts = vec![mount.clone()];
    assert_eq!(h.run(&config).await, BackendStatus::Exited { code: 0 });
    assert_eq!(h.output("open", Stream::Stdout), "preopen /data\nopen ok\n");

    // The policy allows /tmp only: nothing is mapped, the file cannot be reached.
    let mut config = sandbox("denied", &module("preopen.wat"));
    config.spec.mounts = vec![mount];
    with_policy(&mut config, fs_policy(&[], &["/tmp"]));
    assert!(!config.policy.as_ref().expect("policy").decision.admitted);
    assert_eq!(h.run(&config).await, BackendStatus::Exited { code: 0 });
    assert_eq!(
        h.output("denied", Stream::Stdout),
        "no preopen\nopen failed\n"
    );
}

#[tokio::test]
async fn a_read_only_policy_path_is_mapped_read_only() {
    let mut h = harness(small());
    let data = data_dir(&h);
    let mut config = sandbox("forced-ro", &module("files.wat"));
    // Asked read-write; the policy lists /data as read-only.
    config.spec.mounts = vec![Mount {
        guest: "/data".into(),
        host: data.display().to_string(),
        read_only: false,
    }];
    with_policy(&mut config, fs_policy(&["/data"], &[]));
    // 40: opening the file for writing failed.
    assert_eq!(h.run(&config).await, BackendStatus::Exited { code: 40 });
    let host = std::fs::read_to_string(data.join("input.txt")).expect("read");
    assert_eq!(host, "from the host\n");
}

#[tokio::test]
async fn a_host_port_is_refused_not_ignored() {
    let h = harness(small());
    let mut config = sandbox("web", &module("hello.wat"));
    config.spec.ports.push("8080:80".parse().expect("port"));
    let err = h.backend.create(&config).await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("spec.ports[0].hostPort: 8080/tcp: the wasm backend publishes no ports"),
        "{err}"
    );
    assert!(h.list().await.is_empty());
}

/// The server reads any file a client names: what it says of one that is not a module is
/// which check failed and where, never the file's text; and text that is WAT but that the
/// engine refuses says so, not that it is no WAT.
#[tokio::test]
async fn module_errors_tell_syntax_from_compiling_without_quoting_the_file() {
    let h = harness(small());
    let cases = [
        (
            "secret.wasm",
            "TOP-SECRET password=x\n",
            "is not a WebAssembly module (no \\0asm header, and not WAT text)",
        ),
        (
            "names.wat",
            "(module (func (call $secret_token_xyz)))",
            "is not a WebAssembly module (invalid WAT text): line 1, column 21: unknown func: \
             failed to find name",
        ),
        (
            "comment.wat",
            ";; secret\n(module (func $secret) (func $secret))",
            "(invalid WAT text): line 2, column 30: duplicate func identifier",
        ),
        (
            "block.wat",
            "(; secret ;)\n  (module (memory 70000) (func (export \"_start\")))",
            "cannot be compiled as a WebAssembly module: ",
        ),
        // 300 pages is more than the 16 MiB (256 pages) of `small()`'s instances.
        (
            "pool.wat",
            "\n\t(module (memory 300) (func (export \"_start\")))",
            "cannot be compiled as a WebAssembly module: ",
        ),
        (
            "component.wat",
            ";; c\n(component (core module $secret (func (call $nope))))",
            "(invalid WAT text): line 2, column ",
        ),
    ];
    for (file, text, want) in cases {
        let path = h.dir.path().join(file);
        std::fs::write(&path, text).expect("write");
        let path = path.display().to_string();
        let err = h
            .backend
            .create(&sandbox("bad", &path))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&path) && err.contains(want), "{err}");
        let rest = err.replacen(&path, "", 1);
        for secret in ["secret", "SECRET", "password", "nope"] {
            assert!(!rest.contains(secret), "{err}");
        }
    }
    assert!(h.list().await.is_empty());
}

/// A cause the error's context already ends with is said once: WASI's pointer errors repeat
/// theirs.
#[tokio::test]
async fn a_failed_runs_reason_says_its_cause_once() {
    let mut h = harness(small());
    let path = h.dir.path().join("unaligned.wat");
    // fd_write with where to store the count written at an odd address.
    std::fs::write(
        &path,
        r#"(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start") (drop (call $write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 65)))))"#,
    )
    .expect("write");
    let status = h
        .run(&sandbox("unaligned", &path.display().to_string()))
        .await;
    let BackendStatus::Failed { reason } = status else {
        panic!("{status:?}")
    };
    assert!(reason.contains("not aligned"), "{reason}");
    assert_eq!(reason.matches("not aligned").count(), 1, "{reason}");
}
