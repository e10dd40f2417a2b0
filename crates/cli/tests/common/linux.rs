//! The linux backend harness shared by linux.rs and linux_policy.rs: a real server with a
//! busybox image, torn down (supervisors, workloads, cgroups) on drop.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::{TestServer, json, stderr};

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A server with a busybox image imported, and a cgroup parent of its own so the leak checks
/// see only its sandboxes. On drop (pass or fail) every supervisor and workload it started is
/// killed and its cgroups removed: sandboxes outlive a killed server by design.
pub struct Linux {
    pub server: TestServer,
    pub cgroup_parent: String,
}

pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("SKIP: the linux backend needs root".into());
    }
    if !Path::new("/bin/busybox").exists() {
        return Some("SKIP: /bin/busybox (Debian busybox-static) is not installed".into());
    }
    None
}

macro_rules! linux_or_skip {
    () => {
        match $crate::linux_harness::skip_reason() {
            Some(reason) => {
                eprintln!("{reason}");
                return;
            }
            None => $crate::linux_harness::Linux::start(),
        }
    };
}

impl Linux {
    pub fn start() -> Linux {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Linux {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cgroup_parent = format!("warren-it-{}-{n}", std::process::id());
        let mut flags = vec!["--cgroup-parent", &cgroup_parent];
        flags.extend_from_slice(extra);
        let server = TestServer::start_with(&flags, None);
        let linux = Linux {
            server,
            cgroup_parent,
        };
        let layout = warren_image::testing::busybox_layout(linux.server.dir.path(), "busybox")
            .expect("busybox layout");
        linux
            .server
            .ok(&["image", "import", layout.to_str().expect("utf-8")]);
        linux
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.server.ok(args)
    }

    pub fn warren(&self, args: &[&str]) -> Output {
        self.server.warren(args)
    }

    /// `warren run -b linux -i busybox --name NAME FLAGS... -- CMD...`
    pub fn run(&self, name: &str, flags: &[&str], cmd: &[&str]) -> Output {
        let mut args = vec!["run", "-b", "linux", "-i", "busybox", "--name", name];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(cmd);
        self.warren(&args)
    }

    /// [`Linux::run`] that must succeed, waited until the sandbox is Running.
    pub fn run_running(&self, name: &str, flags: &[&str], cmd: &[&str]) -> serde_json::Value {
        let out = self.run(name, flags, cmd);
        assert_eq!(out.status.code(), Some(0), "run {name}: {}", stderr(&out));
        self.wait_phase(name, "Running")
    }

    /// Makes the sandbox's `tar` answer every `warren cp` out of it with `archive`: what a
    /// hostile sandbox can do.
    pub fn hostile_tar(&self, name: &str, archive: &[u8]) {
        let scratch = tempfile::tempdir().expect("tempdir");
        let local = scratch.path().join("evil.tar");
        std::fs::write(&local, archive).expect("write evil.tar");
        self.ok(&[
            "cp",
            local.to_str().expect("utf-8"),
            &format!("{name}:/evil.tar"),
        ]);
        self.ok(&[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "rm /bin/tar && printf '#!/bin/sh\\ncat /evil.tar\\n' > /bin/tar && chmod +x /bin/tar",
        ]);
    }

    pub fn get(&self, name: &str) -> serde_json::Value {
        json(&self.ok(&["get", name, "-o", "json"]))
    }

    pub fn wait_phase(&self, name: &str, phase: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.get(name);
            if got["status"]["phase"] == phase {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached {phase}: {got}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cgroup directories left under this server's parent, in every hierarchy.
    pub fn leftover_cgroups(&self) -> Vec<PathBuf> {
        let mut left = Vec::new();
        for parent in cgroup_parents(&self.cgroup_parent) {
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        left.push(e.path());
                    }
                }
            }
        }
        left
    }
}

/// `<hierarchy>/<parent>` for every cgroup hierarchy the backend uses.
pub fn cgroup_parents(parent: &str) -> Vec<PathBuf> {
    use warren_linux::cgroup::CgroupLayout;
    match CgroupLayout::detect() {
        Ok(CgroupLayout::V1 { mounts }) => mounts.values().map(|m| m.join(parent)).collect(),
        Ok(CgroupLayout::V2 { root }) => vec![root.join(parent)],
        Err(_) => Vec::new(),
    }
}

impl Drop for Linux {
    fn drop(&mut self) {
        self.server.kill9();
        let bundles = self.server.state_dir().join("linux");
        let warm = bundles.join(".warm");
        let dirs = [bundles, warm]
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|entries| entries.flatten().collect::<Vec<_>>())
            .collect::<Vec<_>>();
        // A supervisor is killed only while it is still the process that wrote its state (a
        // recorded pid may since belong to anything, another test's child included); the
        // workloads are killed through their cgroups.
        for e in dirs {
            if let Ok(text) = std::fs::read_to_string(e.path().join("state.json"))
                && let Ok(state) = serde_json::from_str::<warren_linux::config::State>(&text)
                && state.supervisor_alive()
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(state.supervisor_pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        kill_cgroups(&self.cgroup_parent);
    }
}

/// Kills every process in the cgroups under `parent` (every hierarchy) and in `parent`
/// itself, and removes them all: sandboxes outlive the server or agent that started them,
/// by design. Retries while killed processes are still leaving.
pub fn kill_cgroups(parent: &str) {
    let kill_in = |dir: &Path| {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    };
    // A frozen task acts on no signal (a v1 freezer holds even SIGKILL back): every
    // cgroup is thawed first (a test that failed with a sandbox paused leaves it frozen).
    let thaw = |dir: &Path| {
        for (file, value) in [("freezer.state", "THAWED"), ("cgroup.freeze", "0")] {
            if dir.join(file).exists() {
                let _ = std::fs::write(dir.join(file), value);
            }
        }
    };
    let parents = cgroup_parents(parent);
    for parent in &parents {
        thaw(parent);
        for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            thaw(&e.path());
        }
    }
    for parent in parents {
        for _ in 0..250 {
            if !parent.exists() {
                break;
            }
            kill_in(&parent);
            if let Ok(entries) = std::fs::read_dir(&parent) {
                for e in entries.flatten().filter(|e| e.path().is_dir()) {
                    kill_in(&e.path());
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            if std::fs::remove_dir(&parent).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Warm shells ready in the server's pool (each has written its state once prepared).
pub fn warm_ready(l: &Linux) -> usize {
    std::fs::read_dir(l.server.state_dir().join("linux/.warm"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("state.json").exists())
                .count()
        })
        .unwrap_or(0)
}

pub fn wait_warm(l: &Linux, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while warm_ready(l) < n {
        assert!(
            Instant::now() < deadline,
            "{n} warm shells never got ready: {}",
            l.server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroup a sandbox runs in: `warm-...` when it came from the pool.
pub fn cgroup_of(l: &Linux, name: &str) -> String {
    let bundle = PathBuf::from(
        l.get(name)["status"]["backendInfo"]["bundle"]
            .as_str()
            .expect("bundle"),
    );
    let state = json(&std::fs::read_to_string(bundle.join("state.json")).unwrap());
    state["cgroup"].as_str().unwrap().to_string()
}

/// Kills what the linux sandboxes under this cgroup parent left and removes their cgroups,
/// on drop: for agents and servers whose sandboxes outlive them by design.
pub struct Cgroups(pub String);

impl Drop for Cgroups {
    fn drop(&mut self) {
        kill_cgroups(&self.0);
    }
}

/// Imports the busybox test image into the image store at `images`, built under `scratch`.
pub fn import_busybox(scratch: &Path, images: &Path) {
    let layout = warren_image::testing::busybox_layout(scratch, "busybox").expect("busybox layout");
    warren_image::ImageStore::open(images)
        .expect("image store")
        .import(&layout, None)
        .expect("import busybox");
}

/// Waits (10 s at most) until none of `pids` runs; a zombie (reaped late by init) counts
/// as gone.
pub fn wait_gone(pids: &[i32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let alive = |p: &i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    };
    while pids.iter().any(alive) {
        assert!(Instant::now() < deadline, "{what}: {pids:?} still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}
