//! A real `warren server` and containerd 1.6 (Debian's, on a private root, state dir and
//! socket) driving `containerd-shim-warren-v1`. Everything is torn down when the `Env` drops,
//! pass or fail: the containerd process, the shims it started, mounts under its root, the
//! warren server, its cgroup parent, the temp dir.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-warren-v1");
pub const RUNTIME: &str = "io.containerd.warren.v1";

pub fn script() -> PathBuf {
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
pub fn containerd_available() -> Result<(), String> {
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
        if let Err(why) = common::containerd_available() {
            eprintln!("SKIPPED: containerd cannot be installed here: {why}");
            return;
        }
    };
}

/// A warren server and a private containerd that finds the shim on its PATH.
pub struct Env {
    /// The CRI sandbox image, when containerd runs with its CRI plugin.
    cri: Option<String>,
    dir: tempfile::TempDir,
    warren: PathBuf,
    server: Option<Child>,
    address: String,
    started: bool,
    /// The server's `--cgroup-parent`, one per `Env`: removed on drop.
    cgroup_parent: String,
}

impl Env {
    pub fn start() -> Env {
        Env::start_with(None)
    }

    /// With containerd's CRI plugin on, warren its default runtime and `image` the pods'
    /// sandbox image.
    pub fn start_cri(image: &str) -> Env {
        Env::start_with(Some(image.to_string()))
    }

    fn start_with(cri: Option<String>) -> Env {
        // Short: the shim's socket path (<dir>/ctd/s/<64 hex>) must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("wsh")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut env = Env {
            cri,
            dir,
            warren: warren_bin(),
            server: None,
            address: String::new(),
            started: false,
            cgroup_parent: format!("warren-shim-it-{}-{}", std::process::id(), next_env()),
        };
        env.start_server();
        env.start_containerd();
        env
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// The warren server's address.
    #[allow(dead_code)]
    pub fn server_address(&self) -> &str {
        &self.address
    }

    pub fn start_server(&mut self) {
        let log = std::fs::File::create(self.path("server.log")).expect("server log");
        let mut child = Command::new(&self.warren)
            .arg("server")
            .arg("--dir")
            .arg(self.path("warren"))
            .arg("--listen")
            .arg(format!("unix://{}", self.path("w.sock").display()))
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
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

    pub fn start_containerd(&mut self) {
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
        let mut cmd = Command::new(script());
        cmd.arg("start").arg(self.path("ctd"));
        if let Some(image) = &self.cri {
            cmd.arg("--cri").arg(image);
        }
        let out = cmd
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

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.path("ctd/containerd.sock"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ctr")
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
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

    pub fn containerd_log(&self) -> String {
        std::fs::read_to_string(self.path("ctd/containerd.log")).unwrap_or_default()
    }

    pub fn warren(&self, args: &[&str]) -> Output {
        Command::new(&self.warren)
            .args(args)
            .env("WARREN_SERVER", &self.address)
            .env_remove("WARREN_TOKEN")
            .output()
            .expect("run warren")
    }

    pub fn warren_ok(&self, args: &[&str]) -> String {
        let out = self.warren(args);
        assert!(
            out.status.success(),
            "warren {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn sandbox(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.warren_ok(&["get", name, "-o", "json"])).expect("json")
    }

    pub fn sandbox_names(&self) -> Vec<String> {
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
    pub fn import_busybox(&self) -> String {
        self.import_busybox_into("default")
    }

    /// Imports the project's busybox image into containerd namespace `ns`.
    pub fn import_busybox_into(&self, ns: &str) -> String {
        let layout = self.path(&format!("layout-{ns}"));
        warren_image::testing::busybox_layout(&layout, "busybox").expect("busybox layout");
        let tar = self.path(&format!("busybox-{ns}.tar"));
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
            "-n",
            ns,
            "images",
            "import",
            "--index-name",
            name,
            tar.to_str().expect("utf-8"),
        ]);
        name.to_string()
    }

    /// `ctr run -d --runtime io.containerd.warren.v1 --fifo-dir ... FLAGS IMAGE ID CMD...`
    pub fn run_detached(&self, flags: &[&str], image: &str, id: &str, cmd: &[&str]) -> Output {
        let fifo = self.path("ctd/fifo").display().to_string();
        let mut args = vec!["run", "-d", "--runtime", RUNTIME, "--fifo-dir", &fifo];
        args.extend_from_slice(flags);
        args.push(image);
        args.push(id);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    /// As [`Env::run_detached`], failing the test if ctr fails.
    pub fn run_detached_ok(&self, flags: &[&str], image: &str, id: &str, cmd: &[&str]) {
        let out = self.run_detached(flags, image, id, cmd);
        assert!(
            out.status.success(),
            "ctr run {id} failed ({}): {}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.containerd_log()
        );
    }

    /// Waits (10 s at most) until every shim this containerd started has exited.
    pub fn wait_no_shims(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.shim_pids().is_empty() {
            assert!(
                Instant::now() < deadline,
                "shims left: {:?}",
                self.shim_pids()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn task_status(&self, id: &str) -> Option<String> {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.last().map(|s| s.to_string()).unwrap_or_default())
        })
    }

    pub fn wait_task_status(&self, id: &str, want: &str) {
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
    pub fn shim_pids(&self) -> Vec<u32> {
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
        remove_cgroup_parent(&self.cgroup_parent);
    }
}

fn next_env() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Removes `parent` (emptied of processes by then) and the cgroups under it, depth first, in
/// every v1 hierarchy and in a v2 root. Best effort: a test teardown must not panic.
fn remove_cgroup_parent(parent: &str) {
    fn remove_tree(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let root = Path::new("/sys/fs/cgroup");
    remove_tree(&root.join(parent));
    if let Ok(hierarchies) = std::fs::read_dir(root) {
        for h in hierarchies.flatten() {
            remove_tree(&h.path().join(parent));
        }
    }
}
