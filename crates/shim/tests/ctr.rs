//! containerd 1.6 (Debian's, on a private root, state dir and socket) driving
//! `containerd-shim-warren-v1` against a real `warren server`. Skips, loudly, only when
//! containerd cannot be installed. Everything is torn down at the end, pass or fail: the
//! containerd process, the shims it started, mounts under its root, the temp dir.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-warren-v1");
const RUNTIME: &str = "io.containerd.warren.v1";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/containerd.sh")
}

/// `warren` from crates/cli, next to this test's `deps/` dir; built when missing.
fn warren_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("warren");
    if !bin.exists() {
        let target = profile_dir.parent().expect("target dir");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "warren-cli", "--bin", "warren"])
            .env("CARGO_TARGET_DIR", target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p warren-cli");
        assert!(status.success(), "cargo build -p warren-cli failed");
    }
    bin
}

/// Installs containerd once per test binary; `Err` says why it cannot be.
fn containerd_available() -> Result<(), String> {
    static INSTALL: Mutex<Option<Result<(), String>>> = Mutex::new(None);
    let mut done = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    done.get_or_insert_with(|| {
        let out = Command::new(script())
            .arg("install")
            .output()
            .map_err(|e| format!("run containerd.sh install: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .clone()
}

macro_rules! require_containerd {
    () => {
        if let Err(why) = containerd_available() {
            eprintln!("SKIPPED: containerd cannot be installed here: {why}");
            return;
        }
    };
}

/// A warren server and a private containerd that finds the shim on its PATH.
struct Env {
    dir: tempfile::TempDir,
    warren: PathBuf,
    server: Option<Child>,
    address: String,
    started: bool,
}

impl Env {
    fn start() -> Env {
        // Short: the shim's socket path (<dir>/ctd/s/<64 hex>) must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("wsh")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut env = Env {
            dir,
            warren: warren_bin(),
            server: None,
            address: String::new(),
            started: false,
        };
        env.start_server();
        env.start_containerd();
        env
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn start_server(&mut self) {
        let log = std::fs::File::create(self.path("server.log")).expect("server log");
        let mut child = Command::new(&self.warren)
            .arg("server")
            .arg("--dir")
            .arg(self.path("warren"))
            .arg("--listen")
            .arg(format!("unix://{}", self.path("w.sock").display()))
            .env_remove("WARREN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn warren server");
        let stdout = child.stdout.take().expect("stdout");
        self.server = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "warren server did not start:\n{}",
                    std::fs::read_to_string(self.path("server.log")).unwrap_or_default()
                )
            });
        self.address = line
            .strip_prefix("warren server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .to_string();
    }

    fn start_containerd(&mut self) {
        let bin = self.path("bin");
        std::fs::create_dir_all(&bin).expect("bin dir");
        let link = bin.join("containerd-shim-warren-v1");
        if !link.exists() {
            std::os::unix::fs::symlink(SHIM, &link).expect("symlink");
        }
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new(script())
            .arg("start")
            .arg(self.path("ctd"))
            .env("PATH", path)
            .env("WARREN_SERVER", &self.address)
            .env_remove("WARREN_TOKEN")
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .output()
            .expect("containerd.sh start");
        self.started = true;
        assert!(
            out.status.success(),
            "containerd.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.path("ctd/containerd.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed ({}): {}{}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.containerd_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn containerd_log(&self) -> String {
        std::fs::read_to_string(self.path("ctd/containerd.log")).unwrap_or_default()
    }

    fn warren(&self, args: &[&str]) -> Output {
        Command::new(&self.warren)
            .args(args)
            .env("WARREN_SERVER", &self.address)
            .env_remove("WARREN_TOKEN")
            .output()
            .expect("run warren")
    }

    fn warren_ok(&self, args: &[&str]) -> String {
        let out = self.warren(args);
        assert!(
            out.status.success(),
            "warren {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn sandbox(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.warren_ok(&["get", name, "-o", "json"])).expect("json")
    }

    fn sandbox_names(&self) -> Vec<String> {
        let out = self.warren_ok(&["ls", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ls json");
        v.as_array()
            .or_else(|| v["items"].as_array())
            .map(|items| {
                items
                    .iter()
                    .filter_map(|s| s["metadata"]["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Imports the project's busybox image; returns its name in containerd.
    fn import_busybox(&self) -> String {
        let layout = self.path("layout");
        warren_image::testing::busybox_layout(&layout, "busybox").expect("busybox layout");
        let tar = self.path("busybox.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("tar");
        assert!(status.success());
        // --index-name: the layout's own ref name (`busybox:latest`) is not a full reference,
        // so `--base-name` would import nothing.
        let name = "docker.io/library/busybox:latest";
        self.ctr_ok(&[
            "images",
            "import",
            "--index-name",
            name,
            tar.to_str().expect("utf-8"),
        ]);
        name.to_string()
    }

    fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.last().map(|s| s.to_string()).unwrap_or_default())
        })
    }

    fn wait_task_status(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.task_status(id);
            if got.as_deref() == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "task {id}: {got:?}, want {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Shim processes this containerd started (they outlive a killed containerd).
    fn shim_pids(&self) -> Vec<u32> {
        let needle = self.path("ctd").display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd-shim-warren-v1") && cmdline.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.started {
            let _ = Command::new(script())
                .arg("stop")
                .arg(self.path("ctd"))
                .output();
        }
        for pid in self.shim_pids() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn slot_task_runs_until_killed_and_delete_removes_the_sandbox() {
    require_containerd!();
    let env = Env::start();
    let image = env.import_busybox();
    let fifo = env.path("ctd/fifo").display().to_string();

    env.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--fifo-dir",
        &fifo,
        "--memory-limit",
        "268435456",
        "--cpus",
        "0.5",
        &image,
        "c1",
    ]);
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
    env.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--fifo-dir",
        &fifo,
        &image,
        "c3",
    ]);
    env.wait_task_status("c3", "RUNNING");
    env.warren_ok(&["rm", "c3"]);
    env.wait_task_status("c3", "STOPPED");
    env.ctr_ok(&["task", "rm", "c3"]);
    env.ctr_ok(&["container", "rm", "c3"]);

    // Every shim exited once its task was deleted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.shim_pids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "shims left: {:?}",
            env.shim_pids()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn malformed_annotation_fails_naming_the_key_and_leaves_nothing() {
    require_containerd!();
    let env = Env::start();
    let image = env.import_busybox();
    let fifo = env.path("ctd/fifo").display().to_string();
    let out = env.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--fifo-dir",
        &fifo,
        "--annotation",
        "resources.limits.cpu=abc",
        &image,
        "bad",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ctr run should fail");
    assert!(stderr.contains("resources.limits.cpu"), "{stderr}");
    eprintln!("ctr run with a malformed annotation: {}", stderr.trim());
    assert!(env.sandbox_names().is_empty(), "{:?}", env.sandbox_names());
    assert_eq!(env.task_status("bad"), None);
    // The shim of the failed task went away.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.shim_pids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "shim left: {:?}",
            env.shim_pids()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn containerd_restart_keeps_the_task() {
    require_containerd!();
    let mut env = Env::start();
    let image = env.import_busybox();
    let fifo = env.path("ctd/fifo").display().to_string();
    env.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--fifo-dir",
        &fifo,
        "--cpus",
        "0.5",
        &image,
        "r1",
    ]);
    env.wait_task_status("r1", "RUNNING");

    // containerd goes away; the shim and the sandbox stay.
    let out = Command::new(script())
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
