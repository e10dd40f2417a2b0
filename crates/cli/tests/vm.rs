//! The vm backend end to end: the real server and CLI booting real qemu VMs (TCG on this
//! kind of machine, KVM where it works) with the project's kernel and initramfs
//! (`scripts/vm-assets.sh`, run once here if needed). Needs root and qemu; without them
//! every test prints why it skips. Each test bounds its waits.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;
#[allow(unused_macros)] // linux_or_skip is not used here
#[path = "common/linux.rs"]
mod linux_harness;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{TestServer, json, stderr};

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The kernel and initramfs, built (or found up to date) once per test binary.
fn assets() -> &'static Result<(PathBuf, PathBuf), String> {
    static ASSETS: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new("bash")
            .arg(root.join("scripts/vm-assets.sh"))
            .output()
            .map_err(|e| format!("run scripts/vm-assets.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "scripts/vm-assets.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let dir = std::env::var_os("WARREN_VM_ASSETS")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/vm-assets"));
        Ok((dir.join("vmlinux"), dir.join("initramfs.cpio")))
    })
}

fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("SKIP: the vm backend needs root".into());
    }
    None
}

macro_rules! vm_or_skip {
    ($($extra:tt)*) => {
        match skip_reason() {
            Some(reason) => {
                eprintln!("{reason}");
                return;
            }
            None => Vm::start($($extra)*),
        }
    };
}

/// A server whose vm backend boots the project's assets, with health checks that fail a
/// silent guest in ~10 s (a TCG guest on a loaded 2-core machine can be starved for
/// seconds), unless `vm_section` sets its own (the hang test's short ones). On drop
/// (pass or fail) every qemu it started is killed: VMs outlive a killed server by design.
struct Vm {
    server: TestServer,
    cgroup_parent: String,
    /// The config file and the templates (guest RAM files), removed with the test.
    config_dir: tempfile::TempDir,
    /// Dropped last: the next test's VMs start once this one's are gone.
    _turn: Turn,
}

/// How many tests run VMs at once. Under TCG every vCPU is a busy host thread: with all
/// seven tests' VMs (one test alone boots ten clones, another spins a hung guest) on two
/// cores, a guest once took over 30 s to answer its first call.
const VM_TESTS_AT_ONCE: usize = 2;

static RUNNING: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());

/// One of the [`VM_TESTS_AT_ONCE`] turns, held while a test's VMs run.
struct Turn;

impl Turn {
    fn take() -> Turn {
        let (count, freed) = &RUNNING;
        let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= VM_TESTS_AT_ONCE {
            n = freed.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        Turn
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let (count, freed) = &RUNNING;
        *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        freed.notify_one();
    }
}

impl Vm {
    fn start(vm_section: &str) -> Vm {
        Self::start_with(vm_section, "")
    }

    fn start_with(vm_section: &str, hypervisor_extra: &str) -> Vm {
        Self::start_with_args(vm_section, hypervisor_extra, &[])
    }

    /// With more arguments for `warren server`.
    fn start_with_args(vm_section: &str, hypervisor_extra: &str, server_args: &[&str]) -> Vm {
        let (kernel, initrd) = assets().as_ref().unwrap_or_else(|e| panic!("{e}"));
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let turn = Turn::take();
        let cgroup_parent = format!("warren-vm-it-{}-{n}", std::process::id());
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_dir.path().join("vm.toml");
        let health = if vm_section.contains("health_") {
            ""
        } else {
            "health_interval_ms = 1000\nhealth_timeout_ms = 2000\nhealth_failures = 4\n"
        };
        std::fs::write(
            &config,
            format!(
                "[hypervisor]\nkernel_path = {kernel:?}\ninitrd_path = {initrd:?}\nmemory_in_mb = 192\n{hypervisor_extra}\n\
                 [vm]\n{health}template_dir = {:?}\n{vm_section}\n",
                config_dir.path().join("templates")
            ),
        )
        .unwrap();
        let mut args = vec![
            "--cgroup-parent",
            &cgroup_parent,
            "--vm-config",
            config.to_str().unwrap(),
        ];
        args.extend_from_slice(server_args);
        let server = TestServer::start_with(&args, None);
        Vm {
            server,
            cgroup_parent,
            config_dir,
            _turn: turn,
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        self.server.ok(args)
    }

    fn warren(&self, args: &[&str]) -> std::process::Output {
        self.server.warren(args)
    }

    fn get(&self, name: &str) -> serde_json::Value {
        json(&self.ok(&["get", name, "-o", "json"]))
    }

    /// `warren run --name NAME FLAGS... --wait` of a command that tells busybox's image from
    /// the initramfs; checks it ran in the image, and returns the sandbox.
    fn run_in_busybox(&self, name: &str, flags: &[&str]) -> serde_json::Value {
        let mut args = vec!["run", "--name", name];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--wait", "--", "sh", "-c", NOBODY]);
        let out = self.warren(&args);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), "1\n", "busybox's image is the root of {name}");
        self.get(name)
    }

    /// Calls `attempt` every `pause` until it gives `Ok`, for `patience`; then fails with the
    /// last `Err` and the server's log.
    fn poll<T>(
        &self,
        patience: Duration,
        pause: Duration,
        mut attempt: impl FnMut() -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + patience;
        loop {
            match attempt() {
                Ok(value) => return value,
                Err(why) => assert!(
                    Instant::now() < deadline,
                    "{why}, after {patience:?}\nserver log:\n{}",
                    self.server.log()
                ),
            }
            std::thread::sleep(pause);
        }
    }

    /// Waits until `name`'s phase is `phase`; returns the object.
    fn wait_phase(&self, name: &str, phase: &str, patience: Duration) -> serde_json::Value {
        self.poll(patience, Duration::from_millis(100), || {
            let got = self.get(name);
            if got["status"]["phase"] == phase {
                Ok(got)
            } else {
                Err(format!("{name} is not {phase}: {got}"))
            }
        })
    }

    /// `warren run -b vm --name NAME RUN...` until the sandbox's object satisfies `wanted`
    /// (each that does not is removed), for `patience`; returns the object that did (kept)
    /// and that run's stdout.
    fn run_until(
        &self,
        name: &str,
        run: &[&str],
        wanted: impl Fn(&serde_json::Value) -> bool,
        what: &str,
        patience: Duration,
    ) -> (serde_json::Value, String) {
        let mut args = vec!["run", "-b", "vm", "--name", name];
        args.extend_from_slice(run);
        self.poll(patience, Duration::from_millis(500), || {
            let out = self.warren(&args);
            assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
            let got = self.get(name);
            if wanted(&got) {
                return Ok((got, stdout(&out)));
            }
            self.ok(&["rm", name]);
            Err(format!("{what}: not yet: {got}"))
        })
    }

    /// Waits until `warren info` says the vm backend's pool holds `n` clones; returns what
    /// it says.
    fn wait_pool(&self, n: usize, patience: Duration) -> String {
        self.wait_info(&format!("{n} clone(s) ready"), patience)
    }

    /// Waits until the vm backend's `warren info` detail contains `wanted`; returns it.
    fn wait_info(&self, wanted: &str, patience: Duration) -> String {
        self.poll(patience, Duration::from_millis(100), || {
            let info = json(&self.ok(&["info", "-o", "json"]));
            let vm = info["backends"]
                .as_array()
                .and_then(|b| b.iter().find(|b| b["name"] == "vm"))
                .map(|b| b["detail"].as_str().unwrap_or_default().to_string())
                .unwrap_or_default();
            if vm.contains(wanted) {
                Ok(vm)
            } else {
                Err(format!("no {wanted:?} in {vm:?}"))
            }
        })
    }

    /// qemu processes started for this server's VMs and templates (found by their
    /// directories).
    fn qemus(&self) -> Vec<i32> {
        let dir = self.server.dir.path().display().to_string();
        let templates = self.config_dir.path().display().to_string();
        processes(|cmdline| {
            cmdline.contains("qemu-system")
                && (cmdline.contains(&dir) || cmdline.contains(&templates))
        })
    }
}

/// The pids of the host's processes whose command line (arguments joined by NULs)
/// satisfies `matches`.
fn processes(matches: impl Fn(&str) -> bool) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if matches(&String::from_utf8_lossy(&cmdline)) {
            found.push(pid);
        }
    }
    found
}

impl Vm {
    /// `warren run -b vm --name echo --wait` of a shell that prints `text` (and a line on
    /// stderr) and exits 3: checks the exit code, the output streamed and the logs; returns
    /// the sandbox.
    fn run_echo(&self, text: &str) -> serde_json::Value {
        let script = format!("echo {text}; echo err >&2; exit 3");
        let out = self.warren(&[
            "run", "-b", "vm", "--name", "echo", "--wait", "--", "/bin/sh", "-c", &script,
        ]);
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        assert_eq!(stdout(&out), format!("{text}\n"));
        assert_eq!(self.ok(&["logs", "echo"]), format!("{text}\n"));
        self.get("echo")
    }

    /// vhost-user vsock device processes started for this server's VMs.
    fn vsock_devices(&self) -> Vec<i32> {
        let dir = self.server.dir.path().display().to_string();
        processes(|cmdline| cmdline.contains("vhost-device-vsock") && cmdline.contains(&dir))
            .into_iter()
            .filter(|&pid| alive(pid))
            .collect()
    }

    /// Waits (10 s at most) until `n` vsock devices run; `when` says when, for the error.
    fn wait_vsock_devices(&self, n: usize, when: &str) {
        self.poll(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || match self.vsock_devices() {
                found if found.len() == n => Ok(()),
                found => Err(format!("vsock devices {when}: {found:?}, not {n}")),
            },
        );
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.server.kill9();
        for pid in self.qemus().into_iter().chain(self.vsock_devices()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Killed qemus leave their cgroups only once they have exited.
        linux_harness::kill_cgroups(&self.cgroup_parent);
    }
}

fn pid_of(obj: &serde_json::Value) -> i32 {
    obj["status"]["backendInfo"]["pid"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no qemu pid in {obj}"))
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn echo_in_a_vm_logs_exit_code_exec_and_delete() {
    let vm = vm_or_skip!("templates = false");
    let info = vm.ok(&["info"]);
    assert!(
        info.contains("vm") && info.contains("available: "),
        "{info}"
    );

    let got = vm.run_echo("hello from a vm");
    assert_eq!(got["status"]["phase"], "Exited", "{got}");
    assert_eq!(got["status"]["exitCode"], 3);
    assert_eq!(got["status"]["backendInfo"]["boot"], "cold");
    // The VM is gone once its workload ended.
    let qemu = pid_of(&got);
    let deadline = Instant::now() + Duration::from_secs(15);
    while alive(qemu) {
        assert!(Instant::now() < deadline, "qemu {qemu} still runs");
        std::thread::sleep(Duration::from_millis(50));
    }

    // exec into a running VM: output, exit code, stdin, env (what the policy's env.allow
    // lists) and the sandbox's identity.
    let policy = vm.server.dir.path().join("envs.yaml");
    std::fs::write(
        &policy,
        "apiVersion: warren.dev/v1\nkind: Policy\nmetadata:\n  name: envs\nspec:\n  env:\n    \
         allow: [FOO]\n",
    )
    .unwrap();
    vm.ok(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    vm.ok(&[
        "run",
        "-b",
        "vm",
        "--name",
        "box",
        "--policy",
        "envs",
        "-e",
        "FOO=bar",
        "-e",
        "SECRET=hidden",
        "--",
        "sleep",
        "600",
    ]);
    vm.wait_phase("box", "Running", Duration::from_secs(60));
    let out = vm.warren(&[
        "exec",
        "box",
        "--",
        "sh",
        "-c",
        "echo $FOO ${SECRET:-unset} $(hostname) $(cat /run/warren/id | wc -c); exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let words: Vec<String> = stdout(&out)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(words[..3], ["bar", "unset", "box"], "{words:?}");
    assert_ne!(words[3], "0", "{words:?}");
    let out = vm
        .server
        .warren_stdin(&["exec", "-i", "box", "--", "cat"], Some("piped in\n"));
    assert_eq!(stdout(&out), "piped in\n", "{}", stderr(&out));
    // The initramfs root is a root like any other: another user can run things in it.
    let out = vm.warren(&[
        "exec",
        "-u",
        "1000:1000",
        "box",
        "--",
        "sh",
        "-c",
        "id -u; ls -ld / /tmp /root | cut -c1-10",
    ]);
    assert_eq!(
        stdout(&out),
        "1000\ndrwxr-xr-x\ndrwx------\ndrwxrwxrwt\n",
        "{}",
        stderr(&out)
    );
    // A missing working directory is named as such, not as a missing program.
    let out = vm.warren(&["exec", "-w", "/nonexistent", "box", "--", "/bin/pwd"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("working directory \"/nonexistent\": No such file or directory"),
        "{}",
        stderr(&out)
    );
    let missing = vm.warren(&["exec", "box", "--", "/no/such/thing"]);
    assert_ne!(missing.status.code(), Some(0));
    assert!(
        stderr(&missing).contains("/no/such/thing"),
        "{}",
        stderr(&missing)
    );

    // A client that goes away ends its process in the guest too.
    common::exec_ends_with_its_client(&vm.server, "box", &[], "1361");
    common::exec_ends_with_its_client(&vm.server, "box", &["-t"], "1362");

    // `warren top`: the guest's processes with the guest's pids, an exec's among them.
    std::thread::scope(|s| {
        let exec = s.spawn(|| vm.warren(&["exec", "box", "--", "sleep", "5"]));
        let list = vm.poll(Duration::from_secs(30), Duration::from_millis(100), || {
            let list = json(&vm.ok(&["top", "box", "-o", "json"]));
            let commands: Vec<&str> = list
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["command"].as_str().unwrap())
                .collect();
            if commands.contains(&"sleep 600") && commands.contains(&"sleep 5") {
                Ok(list)
            } else {
                Err(format!("no workload and exec in {list}"))
            }
        });
        for p in list.as_array().unwrap() {
            assert!(p["sandboxPid"].is_null(), "{p}");
            assert!(
                p["pid"].as_u64().unwrap() > 1,
                "not PID 1, the guest agent: {p}"
            );
            assert_eq!(p["ppid"], 1, "started by the guest agent: {p}");
        }
        let table = vm.ok(&["top", "box"]);
        let line = table
            .lines()
            .find(|l| l.ends_with("sleep 600"))
            .unwrap_or_else(|| panic!("{table}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[1], "-", "no host pid: {line}");
        assert_eq!(exec.join().unwrap().status.code(), Some(0));
    });

    // `warren stats`: qemu's cgroup, guest RAM and all.
    let stats = vm.server.stats("box");
    assert_eq!(stats["measured"], true, "{stats}");
    assert!(stats["memoryBytes"].as_u64().unwrap() > 16 << 20, "{stats}");
    assert!(stats["pids"].as_u64().unwrap() >= 1, "{stats}");

    // `warren cp` works over the same exec: a directory in, and back out.
    let here = tempfile::tempdir().unwrap();
    let src = here.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/f.txt"), "into a vm\n").unwrap();
    vm.ok(&["cp", src.to_str().unwrap(), "box:/tmp/in"]);
    assert_eq!(
        vm.ok(&["exec", "box", "--", "cat", "/tmp/in/sub/f.txt"]),
        "into a vm\n"
    );
    let back = here.path().join("back");
    vm.ok(&["cp", "box:/tmp/in", back.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(back.join("sub/f.txt")).unwrap(),
        "into a vm\n"
    );

    // Delete: the VM, its cgroup and its files go.
    let obj = vm.get("box");
    let qemu = pid_of(&obj);
    let dir = PathBuf::from(obj["status"]["backendInfo"]["dir"].as_str().unwrap());
    assert!(dir.join("qmp.sock").exists());
    vm.ok(&["rm", "box", "echo"]);
    assert!(!alive(qemu), "qemu {qemu} survived its sandbox");
    assert!(!dir.exists(), "{} survived its sandbox", dir.display());
    assert!(vm.qemus().is_empty(), "stray qemu: {:?}", vm.qemus());
}

#[test]
fn memory_limit_inside_the_guest_is_enforced() {
    let vm = vm_or_skip!("templates = false");
    // 8 MiB fits in 48 MiB; 96 MiB does not: dd's buffer is killed by the guest's OOM
    // killer, and the sandbox ends OOMKilled.
    let out = vm.warren(&[
        "run",
        "-b",
        "vm",
        "--name",
        "hog",
        "-m",
        "48Mi",
        "--wait",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/dev/null bs=8M count=2 2>/dev/null && echo small-ok; \
         dd if=/dev/zero of=/dev/null bs=96M count=1 2>/dev/null; echo big=$?",
    ]);
    let text = vm.ok(&["logs", "hog"]);
    assert!(text.contains("small-ok"), "{text}\n{}", stderr(&out));
    assert!(text.contains("big=137"), "{text}");
    let got = vm.get("hog");
    assert_eq!(got["status"]["phase"], "Failed", "{got}");
    assert_eq!(got["status"]["reason"], "OOMKilled", "{got}");
    // The VM got the sandbox's memory plus the guest's own.
    assert_eq!(got["status"]["backendInfo"]["memory_mb"], "144", "{got}");
    // Below the minimum: refused at create, nothing started.
    let out = vm.warren(&[
        "run", "-b", "vm", "--name", "tiny", "-m", "8Mi", "--", "true",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("resources.limits.memory") && stderr(&out).contains("minimum"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn panics_hangs_and_killed_qemu_are_failed() {
    let vm = vm_or_skip!(
        "templates = false\nhealth_interval_ms = 500\nhealth_timeout_ms = 3000\nhealth_failures = 3"
    );
    for name in ["panic", "hang", "killed"] {
        vm.ok(&["run", "-b", "vm", "--name", name, "--", "sleep", "600"]);
    }
    for name in ["panic", "hang", "killed"] {
        vm.wait_phase(name, "Running", Duration::from_secs(60));
    }
    // A guest kernel panic reboots, which ends qemu (-no-reboot).
    let _ = vm.warren(&[
        "exec",
        "panic",
        "--",
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger",
    ]);
    let got = vm.wait_phase("panic", "Failed", Duration::from_secs(30));
    assert!(
        got["status"]["reason"].as_str().unwrap().contains("panic"),
        "{got}"
    );
    // A frozen guest stops answering health pings.
    let dir = PathBuf::from(
        vm.get("hang")["status"]["backendInfo"]["dir"]
            .as_str()
            .unwrap(),
    );
    qmp(&dir.join("qmp.sock"), "stop");
    let got = vm.wait_phase("hang", "Failed", Duration::from_secs(30));
    assert!(
        got["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("stopped answering"),
        "{got}"
    );
    // qemu killed from outside.
    let pid = pid_of(&vm.get("killed"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let got = vm.wait_phase("killed", "Failed", Duration::from_secs(30));
    assert!(
        got["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("signal 9"),
        "{got}"
    );
    vm.ok(&["rm", "panic", "hang", "killed"]);
    assert!(vm.qemus().is_empty(), "stray qemu: {:?}", vm.qemus());
}

/// One QMP command on a VM's socket.
fn qmp(path: &Path, command: &str) {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let mut w = stream;
    for cmd in ["qmp_capabilities", command] {
        writeln!(w, "{{\"execute\": \"{cmd}\"}}").unwrap();
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.contains("\"return\"") || line.contains("\"error\"") {
                break;
            }
        }
    }
}

#[test]
fn a_server_killed_with_sigkill_readopts_its_vms() {
    let mut vm = vm_or_skip!("templates = false");
    // Strong: acknowledged only once recorded, so a kill -9 right after cannot lose them
    // (a fast create's record is written behind; one lost that way is an orphan, removed).
    vm.ok(&[
        "run", "-b", "vm", "--mode", "strong", "--name", "victim", "--", "sleep", "600",
    ]);
    let victim = pid_of(&vm.wait_phase("victim", "Running", Duration::from_secs(60)));
    // `run` returns once the workload started: the server dies while it prints.
    vm.ok(&[
        "run",
        "-b",
        "vm",
        "--mode",
        "strong",
        "--name",
        "ticker",
        "--",
        "sh",
        "-c",
        "i=0; while [ $i -lt 40 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done",
    ]);
    vm.server.kill9();
    // While no server watches: the ticker keeps running, the victim's VM dies.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    vm.server.spawn();
    let got = vm.wait_phase("ticker", "Exited", Duration::from_secs(60));
    assert_eq!(got["status"]["exitCode"], 0);
    let text = vm.ok(&["logs", "ticker"]);
    let want: String = (0..40).map(|i| format!("tick {i}\n")).collect();
    assert_eq!(text, want, "every line once, in order, across the restart");
    let got = vm.get("victim");
    assert_eq!(got["status"]["phase"], "Failed", "{got}");
    assert!(
        got["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("no server watched"),
        "{got}"
    );
    vm.ok(&["rm", "ticker", "victim"]);
    assert!(vm.qemus().is_empty(), "stray qemu: {:?}", vm.qemus());
}

#[test]
fn bad_configs_are_clear_errors_at_create_and_start_no_qemu() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    for (hypervisor, want) in [
        (
            "kernel_path = \"/nonexistent/vmlinux\"",
            "hypervisor.kernel_path: \"/nonexistent/vmlinux\" does not exist",
        ),
        (
            "memory_in_mb = 64",
            "hypervisor.memory_in_mb: \"64\" is below the minimum of 128",
        ),
        (
            "machine = \"pc-bogus-9.9\"",
            "hypervisor.machine: \"pc-bogus-9.9\" is not a machine type",
        ),
        ("accel = \"hvf\"", "accel"),
        (
            "path = \"/bin/false\"",
            "hypervisor.path: /bin/false is not a qemu-system binary",
        ),
        (
            "entropy_source = \"/tmp\"",
            "hypervisor.entropy_source: \"/tmp\" is not a regular file or a character device",
        ),
        // (templates are on by default; the device's path is checked by config's unit tests)
        (
            "channel = \"vhost-user-vsock\"",
            "vm.templates: \"true\" cannot be used with hypervisor.channel = \"vhost-user-vsock\"",
        ),
    ] {
        let bad = Vm::start_bad(hypervisor);
        let out = bad.warren(&["run", "-b", "vm", "--name", "x", "--", "true"]);
        assert_ne!(out.status.code(), Some(0));
        assert!(
            stderr(&out).contains(want),
            "{hypervisor}: {}",
            stderr(&out)
        );
        let info = bad.ok(&["info"]);
        assert!(info.contains("unavailable"), "{info}");
        assert!(bad.qemus().is_empty(), "{hypervisor}: stray qemu");
    }
}

impl Vm {
    /// A server whose vm config has `line` in `[hypervisor]` in place of a good default.
    fn start_bad(line: &str) -> Vm {
        let key = line.split('=').next().unwrap().trim();
        let (kernel, initrd) = assets().as_ref().unwrap_or_else(|e| panic!("{e}"));
        let mut hypervisor = String::new();
        if key != "kernel_path" {
            hypervisor.push_str(&format!("kernel_path = {kernel:?}\n"));
        }
        hypervisor.push_str(&format!("initrd_path = {initrd:?}\n{line}\n"));
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_dir.path().join("vm.toml");
        std::fs::write(&config, format!("[hypervisor]\n{hypervisor}")).unwrap();
        let turn = Turn::take();
        let cgroup_parent = format!("warren-vm-it-bad-{}", std::process::id());
        let server = TestServer::start_with(
            &[
                "--cgroup-parent",
                &cgroup_parent,
                "--vm-config",
                config.to_str().unwrap(),
            ],
            None,
        );
        Vm {
            server,
            cgroup_parent,
            config_dir,
            _turn: turn,
        }
    }
}

#[test]
fn an_image_is_the_root_of_its_vm() {
    let vm = vm_or_skip!("templates = false");
    let layout = warren_image::testing::busybox_layout(vm.server.dir.path(), "busybox").unwrap();
    vm.ok(&["image", "import", layout.to_str().unwrap()]);
    // While the first create of the image is still booting (its disk is made first, then a
    // cold boot: seconds under TCG), the image is in use: `image rm` is refused.
    std::thread::scope(|s| {
        let create = s.spawn(|| {
            vm.warren(&[
                "run", "-b", "vm", "-i", "busybox", "--name", "booting", "--", "sleep", "60",
            ])
        });
        vm.poll(Duration::from_secs(30), Duration::from_millis(5), || {
            let out = vm.warren(&["get", "booting", "-o", "json"]);
            if out.status.success() {
                Ok(())
            } else {
                Err("the create is not listed yet".to_string())
            }
        });
        let out = vm.warren(&["image", "rm", "busybox"]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stderr(&out).contains("is in use by sandbox booting: remove it first"),
            "{}",
            stderr(&out)
        );
        let out = create.join().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    });
    vm.ok(&["rm", "-f", "booting"]);
    let out = vm.warren(&[
        "run",
        "-b",
        "vm",
        "-i",
        "busybox",
        "--name",
        "img",
        "--storage",
        "8Mi",
        "--wait",
        "--",
        "sh",
        "-c",
        "grep -c nobody /etc/passwd; echo written > /new-file && cat /new-file; \
         dd if=/dev/zero of=/big bs=1M count=6 2>/dev/null && echo 6M-root; \
         dd if=/dev/zero of=/tmp/big bs=1M count=6 2>/dev/null || echo tmp-full; \
         rm /big; dd if=/dev/zero of=/tmp/big bs=1M count=6 2>/dev/null && echo 6M-tmp",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The image's passwd has a nobody line; the initramfs's has none. The root and /tmp
    // share the 8 MiB storage limit: 6 MiB fit in either, not in both.
    assert_eq!(stdout(&out), "1\nwritten\n6M-root\ntmp-full\n6M-tmp\n");
    let info = vm.ok(&["info"]);
    assert!(info.contains("templates off"), "{info}");

    // An image removed while no server ran: the next server removes its disk at start.
    vm.ok(&["rm", "img"]);
    assert_eq!(image_disks(&vm).len(), 1, "busybox's disk");
    let mut vm = vm;
    vm.server.kill9();
    warren_image::ImageStore::open(&vm.server.state_dir().join("images"))
        .unwrap()
        .remove("busybox")
        .unwrap();
    vm.server.spawn();
    vm.poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || match image_disks(&vm)[..] {
            [] => Ok(()),
            ref left => Err(format!("left behind: {left:?}")),
        },
    );
}

/// The image disks the server's vm backend has made (`<dir>/vm/.images/*.ext4`).
fn image_disks(vm: &Vm) -> Vec<PathBuf> {
    std::fs::read_dir(vm.server.state_dir().join("vm/.images"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "ext4"))
        .collect()
}

/// Prints 1 in busybox's image (its passwd has a nobody line), 0 in the initramfs.
const NOBODY: &str = "grep -c nobody /etc/passwd || true";

#[test]
fn image_sandboxes_clone_from_a_template_of_their_image() {
    let vm = vm_or_skip!("templates = true\npool = 1");
    let layout = warren_image::testing::busybox_layout(vm.server.dir.path(), "busybox").unwrap();
    vm.ok(&["image", "import", layout.to_str().unwrap()]);
    // The first create of the image boots cold and builds its template behind it.
    let (_, out) = vm.run_until(
        "probe",
        &["-i", "busybox", "--wait", "--", "sh", "-c", NOBODY],
        |got| got["status"]["backendInfo"]["boot"] == "clone",
        "a clone of the image",
        Duration::from_secs(120),
    );
    assert_eq!(out, "1\n", "{}", vm.server.log());
    vm.ok(&["rm", "probe"]);
    // Two clones of the image: each has the image as its root and its own writable layer.
    // "a" is a hand-out from the pool (`warren info` says it is ready), whose warm-up mounted
    // the root before the create.
    let info = vm.wait_pool(1, Duration::from_secs(60));
    assert!(
        info.contains("templates on") && info.contains("1 kept per shape"),
        "{info}"
    );
    let args: Vec<&str> = "run -b vm -i busybox --name a --storage 4Mi -- sleep 600"
        .split(' ')
        .collect();
    vm.ok(&args);
    let got = vm.get("a");
    assert_eq!(got["status"]["backendInfo"]["boot"], "clone", "{got}");
    assert_eq!(got["status"]["backendInfo"]["clone_from"], "pool", "{got}");
    vm.ok(&[
        "run", "-b", "vm", "-i", "busybox", "--name", "b", "--", "sleep", "600",
    ]);
    let got = vm.wait_phase("b", "Running", Duration::from_secs(60));
    assert_eq!(got["status"]["backendInfo"]["boot"], "clone", "{got}");
    vm.ok(&["exec", "a", "--", "sh", "-c", "echo from-a > /etc/mine"]);
    assert_eq!(vm.ok(&["exec", "a", "--", "cat", "/etc/mine"]), "from-a\n");
    let seen = vm.warren(&["exec", "b", "--", "cat", "/etc/mine"]);
    assert_ne!(
        seen.status.code(),
        Some(0),
        "b sees a's file: {}",
        stdout(&seen)
    );
    for name in ["a", "b"] {
        assert_eq!(vm.ok(&["exec", name, "--", "sh", "-c", NOBODY]), "1\n");
    }
    // a's storage limit (4 MiB) holds in a clone whose root was mounted before the create;
    // b has none.
    let fill = ["dd", "if=/dev/zero", "of=/big", "bs=1M", "count=8"];
    let full = vm.warren(&[&["exec", "a", "--"][..], &fill].concat());
    assert_ne!(full.status.code(), Some(0), "a wrote 8 MiB");
    assert!(
        stderr(&full).contains("No space left on device"),
        "{}",
        stderr(&full)
    );
    vm.ok(&[&["exec", "b", "--"][..], &fill].concat());
    // A sandbox of the same size without the image is not one of its clones.
    let out = vm.warren(&[
        "run", "-b", "vm", "--name", "plain", "--wait", "--", "sh", "-c", NOBODY,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "0\n");
    vm.ok(&["rm", "a", "b", "plain"]);

    // What the vm backend made of the image (its disk, its template, its pool clone) goes
    // with it; the plain shape's template and pool stay.
    let ext4 = || image_disks(&vm);
    let templates = vm.config_dir.path().join("templates");
    let template_disks = || -> Vec<Option<String>> {
        std::fs::read_dir(&templates)
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| std::fs::read_to_string(e.path().join("disk")).ok())
            .collect()
    };
    let disk = ext4();
    assert_eq!(disk.len(), 1, "busybox's disk: {disk:?}");
    let disk = disk[0].display().to_string();
    assert!(
        template_disks().contains(&Some(disk.clone())),
        "{:?}",
        template_disks()
    );
    // The plain shape's template is built behind its first create.
    vm.poll(
        Duration::from_secs(60),
        Duration::from_millis(100),
        || match template_disks() {
            t if t.contains(&None) => Ok(()),
            t => Err(format!("no template of the plain shape: {t:?}")),
        },
    );
    vm.wait_info("2 shape(s) in use", Duration::from_secs(10));

    // Imported again under its name: the name's creates get the new image, so the pool no
    // longer keeps a clone of the old one (still in the store, by id, with its disk).
    let release = warren_image::testing::Entry::file("etc/release", 0o644, b"2\n");
    let again = warren_image::testing::busybox_layout_with(
        &vm.server.dir.path().join("v2"),
        "busybox",
        vec![release],
    )
    .unwrap();
    vm.ok(&["image", "import", again.to_str().unwrap()]);
    vm.wait_info(
        "pool: 1 clone(s) ready, 1 kept per shape, 1 shape(s) in use",
        Duration::from_secs(30),
    );
    vm.poll(
        Duration::from_secs(30),
        Duration::from_millis(100),
        || match vm.qemus().len() {
            1 => Ok(()),
            n => Err(format!("{n} qemus: the old image's clone lives on")),
        },
    );
    assert_eq!(ext4(), [PathBuf::from(&disk)], "the old image's disk stays");

    // Removed (by id, as `image prune` does for images without names): its disk and its
    // template go too.
    vm.ok(&["image", "prune"]);
    vm.poll(Duration::from_secs(30), Duration::from_millis(100), || {
        let (left, kept) = (ext4(), template_disks());
        // The plain shape's pool clone is the one qemu left.
        if left.is_empty() && !kept.contains(&Some(disk.clone())) && vm.qemus().len() == 1 {
            Ok(())
        } else {
            Err(format!(
                "left behind: disks {left:?}, templates {kept:?}, qemus {:?}",
                vm.qemus()
            ))
        }
    });
    assert!(template_disks().contains(&None), "{:?}", template_disks());
    vm.wait_info(
        "pool: 1 clone(s) ready, 1 kept per shape, 1 shape(s) in use",
        Duration::from_secs(60),
    );
    assert!(
        vm.server
            .log()
            .contains("removed the disk of a removed image"),
        "{}",
        vm.server.log()
    );
}

/// `--warm vm:busybox=1`: the image's template is built at start once the image is in the
/// store, and a clone of it kept ready, so the image's very first create is a hand-out.
#[test]
fn a_warm_image_is_a_clone_from_its_first_create() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let vm = Vm::start_with_args(
        "templates = true\npool = 0",
        "",
        &["--warm", "vm:busybox=1"],
    );
    // Listed before its image exists.
    vm.wait_info("; warm: busybox 0/1 ready", Duration::from_secs(10));
    let layout = warren_image::testing::busybox_layout(vm.server.dir.path(), "busybox").unwrap();
    vm.ok(&["image", "import", layout.to_str().unwrap()]);
    let info = vm.wait_info("; warm: busybox 1/1 ready", Duration::from_secs(120));
    assert!(
        info.contains("pool: 1 clone(s) ready, 0 kept per shape"),
        "{info}"
    );
    let got = vm.run_in_busybox("first", &["-b", "vm", "-i", "busybox"]);
    assert_eq!(got["status"]["backendInfo"]["boot"], "clone", "{got}");
    assert_eq!(got["status"]["backendInfo"]["clone_from"], "pool", "{got}");
    // And the pool is refilled for the next.
    vm.wait_info("; warm: busybox 1/1 ready", Duration::from_secs(60));
    vm.ok(&["rm", "first"]);

    // A pool clone whose qemu was killed (by hand, by the OOM killer) does not run the
    // sandbox: the create restores a fresh clone instead of booting cold, and the pool
    // replaces it.
    let pooled = vm.poll(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || match vm.qemus()[..] {
            [one] => Ok(one),
            ref all => Err(format!("not one qemu (the pool clone): {all:?}")),
        },
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pooled),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    vm.poll(Duration::from_secs(10), Duration::from_millis(20), || {
        if alive(pooled) {
            Err(format!("qemu {pooled} still runs"))
        } else {
            Ok(())
        }
    });
    let got = vm.run_in_busybox("second", &["-b", "vm", "-i", "busybox"]);
    assert_eq!(got["status"]["backendInfo"]["boot"], "clone", "{got}");
    vm.ok(&["rm", "second"]);
    vm.poll(Duration::from_secs(60), Duration::from_millis(100), || {
        let qemus = vm.qemus();
        let info = vm.wait_info("; warm: busybox ", Duration::from_secs(1));
        if info.contains("busybox 1/1 ready") && qemus.len() == 1 && !qemus.contains(&pooled) {
            Ok(())
        } else {
            Err(format!(
                "the killed clone was not replaced: {info}, qemus {qemus:?}"
            ))
        }
    });
    // Usually the hand-out sees the dead clone; rarely (once in CI, not understood yet) it
    // is handed out and its start fails, and the create runs in another clone instead.
    // Either way the server says why.
    let log = vm.server.log();
    assert!(
        log.contains("qemu had ended") || log.contains("trying once more in another VM"),
        "the server says why: {log}"
    );
}

/// A pool of vm sandboxes (`warren pool create -b vm`): clones of its image's template are
/// kept ready on the server's own node, a create from it is a hit, and removing the pool
/// ends its clones.
#[test]
fn a_pool_of_vm_sandboxes() {
    let vm = vm_or_skip!("templates = true\npool = 0");
    let layout = warren_image::testing::busybox_layout(vm.server.dir.path(), "busybox").unwrap();
    vm.ok(&["image", "import", layout.to_str().unwrap()]);
    assert_eq!(
        vm.ok(&[
            "pool",
            "create",
            "vms",
            "-b",
            "vm",
            "--image",
            "busybox",
            "--buffer-min",
            "1"
        ]),
        "pool vms created\n"
    );
    let status = |vm: &Vm| json(&vm.ok(&["pool", "get", "vms", "-o", "json"]))["status"].clone();
    vm.poll(Duration::from_secs(120), Duration::from_millis(200), || {
        let s = status(&vm);
        if s["ready"] == 1 {
            Ok(())
        } else {
            Err(format!("the pool is not ready: {s}"))
        }
    });
    let got = vm.run_in_busybox("hit", &["--pool", "vms"]);
    assert_eq!(got["spec"]["backend"], "vm", "{got}");
    assert_eq!(got["status"]["backendInfo"]["warm"], "true", "{got}");
    assert_eq!(got["status"]["backendInfo"]["clone_from"], "pool", "{got}");
    assert_eq!(status(&vm)["hits"], 1);
    vm.ok(&["rm", "hit"]);
    assert_eq!(vm.ok(&["pool", "rm", "vms"]), "pool vms deleted\n");
    let info = vm.wait_info("pool: 0 clone(s) ready", Duration::from_secs(30));
    assert!(!info.contains("warm:"), "{info}");
}

/// `warren vm template build` ahead of the first create, for the size `-m` gives (as `run`
/// takes it): the first create of that size is a clone; another size still boots cold.
#[test]
fn a_template_built_ahead_makes_the_first_create_a_clone() {
    let vm = vm_or_skip!("templates = true\npool = 1");
    let config = vm.config_dir.path().join("vm.toml");
    let config = config.to_str().unwrap();
    let build_with = |args: &[&str]| {
        let mut all = vec!["vm", "template", "build", "--vm-config", config];
        all.extend_from_slice(args);
        vm.warren(&all)
    };
    let build = |memory: &str| build_with(&["-m", memory]);
    let bad = build("lots");
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("--memory \"lots\""),
        "{}",
        stderr(&bad)
    );

    let out = build("256Mi");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let built = stdout(&out);
    let dir = built
        .strip_prefix("template ")
        .and_then(|rest| rest.split(" ready in ").next())
        .unwrap_or_else(|| panic!("{built}"));
    assert!(
        Path::new(dir).starts_with(vm.config_dir.path().join("templates"))
            && Path::new(dir).is_dir(),
        "{built}"
    );
    let sized = vm.warren(&[
        "run", "-b", "vm", "--name", "sized", "-m", "256Mi", "--wait", "--", "true",
    ]);
    assert_eq!(sized.status.code(), Some(0), "{}", stderr(&sized));
    let got = vm.get("sized");
    assert_eq!(
        got["status"]["backendInfo"]["boot"],
        "clone",
        "{got}\n{}",
        vm.server.log()
    );
    let other = vm.warren(&[
        "run", "-b", "vm", "--name", "other", "-m", "300Mi", "--wait", "--", "true",
    ]);
    assert_eq!(other.status.code(), Some(0), "{}", stderr(&other));
    assert_eq!(vm.get("other")["status"]["backendInfo"]["boot"], "cold");
    vm.ok(&["rm", "sized", "other"]);

    // An image's template, from the server's image store (`--dir`): the image's first
    // create of that size is a clone too.
    let state = vm.server.state_dir();
    let state = state.to_str().unwrap();
    let build_image =
        |image: &str, dir: &str| build_with(&["-m", "256Mi", "-i", image, "--dir", dir]);
    let nowhere = vm.config_dir.path().join("nowhere");
    let out = build_image("busybox", nowhere.to_str().unwrap());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no image store there"),
        "{}",
        stderr(&out)
    );
    let layout = warren_image::testing::busybox_layout(vm.server.dir.path(), "busybox").unwrap();
    vm.ok(&["image", "import", layout.to_str().unwrap()]);
    let out = build_image("nope", state);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("-i nope") && stderr(&out).contains("not found"),
        "{}",
        stderr(&out)
    );
    let out = build_image("busybox", state);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_ne!(stdout(&out), built, "another template than the plain one");
    let got = vm.run_in_busybox("imaged", &["-b", "vm", "-i", "busybox", "-m", "256Mi"]);
    assert_eq!(
        got["status"]["backendInfo"]["boot"],
        "clone",
        "{got}\n{}",
        vm.server.log()
    );
    vm.ok(&["rm", "imaged"]);
}

#[test]
fn ten_clones_at_once_each_with_its_own_identity_and_entropy() {
    let mut vm = vm_or_skip!("templates = true\npool = 2");
    let first = vm.warren(&[
        "run", "-b", "vm", "--name", "warmup", "--wait", "--", "true",
    ]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    // The first create of a shape boots cold and builds the template behind it.
    vm.run_until(
        "probe",
        &["--wait", "--", "true"],
        |got| got["status"]["backendInfo"]["boot"] == "clone",
        "a clone",
        Duration::from_secs(120),
    );
    vm.ok(&["rm", "probe"]);
    // Some creates are hand-outs from a full pool (the restart below must reach those).
    vm.wait_pool(2, Duration::from_secs(60));
    let names: Vec<String> = (0..10).map(|i| format!("clone{i}")).collect();
    std::thread::scope(|s| {
        for name in &names {
            let vm = &vm;
            s.spawn(move || {
                vm.ok(&["run", "-b", "vm", "--name", name, "--", "sleep", "600"]);
            });
        }
    });
    let mut seen = std::collections::HashSet::new();
    let mut randoms = std::collections::HashSet::new();
    let mut handed_out = 0;
    for name in &names {
        let got = vm.wait_phase(name, "Running", Duration::from_secs(60));
        assert_eq!(
            got["status"]["backendInfo"]["boot"],
            "clone",
            "{got}\n{}",
            vm.server.log()
        );
        // Handed out from the pool, or restored for this create when the pool ran dry.
        let from = &got["status"]["backendInfo"]["clone_from"];
        assert!(from == "pool" || from == "restore", "{got}");
        handed_out += usize::from(from == "pool");
        // Its qemu is in the sandbox's cgroup once the create has answered.
        let dir = got["status"]["backendInfo"]["dir"].as_str().unwrap();
        let id = Path::new(dir).file_name().unwrap().to_string_lossy();
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", pid_of(&got))).unwrap();
        assert!(
            cgroups.contains(&format!("{}/{id}", vm.cgroup_parent)),
            "{cgroups}"
        );
        let out = vm.ok(&[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "hostname; cat /run/warren/id; echo; head -c 16 /dev/urandom | od -An -tx1",
        ]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], name, "{out}");
        assert!(seen.insert(lines[1].to_string()), "id {} twice", lines[1]);
        assert!(
            randoms.insert(lines[2].trim().to_string()),
            "same random bytes: {out}"
        );
    }
    assert!(handed_out >= 1, "no create was a pool hand-out");
    // A restarted server reaches every clone again, pool hand-outs included (their
    // directories were renamed from the pool's to their sandboxes').
    vm.server.kill9();
    vm.server.spawn();
    for name in &names {
        let got = vm.wait_phase(name, "Running", Duration::from_secs(60));
        assert_eq!(
            vm.ok(&["exec", name, "--", "hostname"]),
            format!("{name}\n"),
            "{got}"
        );
    }
    let mut rm = vec!["rm", "warmup"];
    rm.extend(names.iter().map(String::as_str));
    vm.ok(&rm);
}

/// `warren pause` stops a VM's vCPUs: its workload writes nothing, the health pings that
/// would find a silent guest unhealthy are not sent, exec is refused; a server killed
/// meanwhile adopts it paused; `unpause` lets it run on, and `stop` resumes it first so
/// that its SIGTERM lands.
#[test]
fn a_paused_vm_runs_nothing_and_is_not_failed() {
    let mut vm = vm_or_skip!(
        "templates = false\nhealth_interval_ms = 500\nhealth_timeout_ms = 3000\nhealth_failures = 3"
    );
    let ticker = "trap 'echo got-term; exit 0' TERM; while :; do echo tick; sleep 0.1; done";
    vm.ok(&["run", "-b", "vm", "--name", "p", "--", "sh", "-c", ticker]);
    vm.wait_phase("p", "Running", Duration::from_secs(60));
    fn ticks(vm: &Vm) -> usize {
        vm.ok(&["logs", "p"]).matches("tick").count()
    }
    fn grows(vm: &Vm) {
        let before = ticks(vm);
        vm.poll(Duration::from_secs(30), Duration::from_millis(100), || {
            (ticks(vm) > before)
                .then_some(())
                .ok_or_else(|| "p does not run".to_string())
        });
    }
    grows(&vm);
    assert_eq!(vm.ok(&["pause", "p"]), "p\n");
    assert_eq!(vm.get("p")["status"]["paused"], true);
    // Longer than its health checks take to fail a silent guest (3 pings, each given
    // 3 s, every 0.5 s): still Running, and silent.
    std::thread::sleep(Duration::from_millis(500));
    let before = ticks(&vm);
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(ticks(&vm), before, "the paused VM wrote");
    let got = vm.get("p");
    assert_eq!(got["status"]["phase"], "Running", "{got}");
    let out = vm.warren(&["exec", "p", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("\"p\" is paused"), "{}", stderr(&out));
    let out = vm.warren(&["update", "p", "--pids", "50"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("is paused: unpause it"),
        "{}",
        stderr(&out)
    );
    // `top` neither waits for a guest that cannot answer nor unpauses it.
    let out = vm.warren(&["top", "p"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("sandbox \"p\" is paused: unpause it first"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ticks(&vm), before, "top resumed the paused VM");
    // A new server adopts it, paused still.
    vm.server.kill9();
    vm.server.spawn();
    let got = vm.wait_phase("p", "Running", Duration::from_secs(60));
    assert_eq!(got["status"]["paused"], true, "{got}");
    let before = ticks(&vm);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(ticks(&vm), before, "the adopted VM runs");
    assert_eq!(vm.ok(&["unpause", "p"]), "p\n");
    grows(&vm);
    assert_eq!(vm.ok(&["exec", "p", "--", "echo", "in"]), "in\n");
    let top = vm.ok(&["top", "p"]);
    assert!(top.contains(&format!("sh -c {ticker}")), "{top}");
    vm.ok(&["pause", "p"]);
    vm.ok(&["stop", "-t", "20", "p"]);
    assert_eq!(vm.get("p")["status"]["phase"], "Stopped");
    assert!(vm.ok(&["logs", "p"]).contains("got-term"));
    vm.ok(&["rm", "p"]);
}

/// A server killed while it builds a template leaves the build's qemu idling on: the next
/// server (sharing the template directory) ends it and removes the half-built template.
#[test]
fn a_killed_servers_template_build_is_ended_at_the_next_start() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    // The build's "qemu" is a `sleep` that never boots a guest, so the build is still under
    // way at the kill however fast or slow this host is (racing a real build's few seconds
    // failed both ways); every other qemu runs as usual. (Not a stopped process: when its
    // server dies, a process group holding a stopped process can be sent SIGHUP.)
    let wrapper_dir = tempfile::tempdir().unwrap();
    let wrapper = wrapper_dir.path().join("qemu");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\ncase \"$*\" in *'/templates/'*'.tmp/'*) exec sleep 300 ;; esac\nexec qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut vm = Vm::start_with(
        "templates = true\npool = 0\nboot_timeout_ms = 300000",
        &format!("path = {:?}", wrapper.display().to_string()),
    );
    let templates = vm.config_dir.path().join("templates");
    // The first create of a shape boots cold and builds its template beside it.
    vm.ok(&["run", "-b", "vm", "--name", "first", "--", "sleep", "600"]);
    let building = vm.poll(Duration::from_secs(30), Duration::from_millis(20), || {
        std::fs::read_dir(&templates)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(".tmp"))
                    && p.join("build.json").is_file()
            })
            .ok_or_else(|| "no template build under way".to_string())
    });
    let owner = vm.poll(Duration::from_secs(5), Duration::from_millis(20), || {
        std::fs::read_to_string(building.join("build.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .ok_or_else(|| "build.json unreadable".to_string())
    });
    let qemu = owner[0][0].as_i64().expect("the build's qemu") as i32;
    // Not a qemu by its command line (the harness's clean-up looks for those): killed here
    // if the test fails before the next server ends it.
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            if alive(self.0) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.0),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _kill = Kill(qemu);
    vm.server.kill9();
    assert!(
        building.is_dir() && alive(qemu),
        "the build ended before the kill (its directory there: {}, its qemu alive: {}):\n{}",
        building.is_dir(),
        alive(qemu),
        vm.server.log()
    );
    vm.server.spawn();
    vm.poll(Duration::from_secs(10), Duration::from_millis(50), || {
        if alive(qemu) || building.exists() {
            Err(format!(
                "the build's qemu {qemu} or {} is left",
                building.display()
            ))
        } else {
            Ok(())
        }
    });
    assert!(
        vm.server
            .log()
            .contains("ending a template build whose server is gone"),
        "{}",
        vm.server.log()
    );
    vm.ok(&["rm", "-f", "first"]);
}

/// rust-vmm's vhost-device-vsock, which `scripts/install-deps.sh` installs.
fn vhost_device_vsock() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("vhost-device-vsock"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("vhost-device-vsock is not in PATH: run scripts/install-vhost-vsock.sh")
        })
}

#[test]
fn a_vm_over_vhost_user_vsock_runs_execs_and_is_readopted() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let device = vhost_device_vsock();
    let mut vm = Vm::start_with(
        "templates = false",
        &format!(
            "channel = \"vhost-user-vsock\"\nvhost_user_vsock_path = {:?}",
            device.display().to_string()
        ),
    );
    let got = vm.run_echo("hello over vsock");
    assert_eq!(got["status"]["backendInfo"]["channel"], "vhost-user-vsock");
    assert_eq!(got["status"]["backendInfo"]["boot"], "cold");
    // The VM's vsock device ends with it.
    vm.wait_vsock_devices(0, "after the VM ended");

    // A running VM: no virtio-serial port on its command line, exec over vsock.
    vm.ok(&["run", "-b", "vm", "--name", "box", "--", "sleep", "600"]);
    let obj = vm.wait_phase("box", "Running", Duration::from_secs(60));
    let qemu = pid_of(&obj);
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{qemu}/cmdline")).unwrap())
        .replace('\0', " ");
    assert!(
        cmdline.contains("vhost-user-vsock-device") && !cmdline.contains("virtserialport"),
        "{cmdline}"
    );
    assert_eq!(vm.vsock_devices().len(), 1, "one device per VM");
    let out = vm.warren(&[
        "exec",
        "box",
        "--",
        "sh",
        "-c",
        "echo in $(hostname); exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stdout(&out), "in box\n");
    // Paused and resumed: the host's connection over vsock outlives the stopped vCPUs.
    assert_eq!(vm.ok(&["pause", "box"]), "box\n");
    assert_eq!(vm.get("box")["status"]["paused"], true);
    let out = vm.warren(&["exec", "box", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("\"box\" is paused"),
        "{}",
        stderr(&out)
    );
    assert_eq!(vm.ok(&["unpause", "box"]), "box\n");
    assert_eq!(
        vm.ok(&["exec", "box", "--", "echo", "resumed"]),
        "resumed\n"
    );

    // kill -9 of the server: the VMs and their devices run on, and the next server
    // reconnects over vsock; a VM whose qemu died meanwhile is Failed, its device ended.
    vm.ok(&["run", "-b", "vm", "--name", "victim", "--", "sleep", "600"]);
    let victim = pid_of(&vm.wait_phase("victim", "Running", Duration::from_secs(60)));
    vm.server.kill9();
    assert!(alive(qemu), "qemu {qemu} died with its server");
    assert_eq!(vm.vsock_devices().len(), 2, "a device died with its server");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    vm.server.spawn();
    let got = vm.wait_phase("victim", "Failed", Duration::from_secs(30));
    assert!(
        got["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("no server watched"),
        "{got}"
    );
    vm.wait_vsock_devices(1, "once the victim was found dead (box's only)");
    let got = vm.wait_phase("box", "Running", Duration::from_secs(30));
    assert_eq!(got["status"]["backendInfo"]["channel"], "vhost-user-vsock");
    assert_eq!(
        vm.ok(&["exec", "box", "--", "sh", "-c", "echo again in $(hostname)"]),
        "again in box\n"
    );
    let obj = vm.get("box");
    let dir = PathBuf::from(obj["status"]["backendInfo"]["dir"].as_str().unwrap());
    vm.ok(&["rm", "-f", "box", "echo", "victim"]);
    assert!(!alive(qemu), "qemu {qemu} survived its sandbox");
    assert!(!dir.exists(), "{} survived its sandbox", dir.display());
    vm.wait_vsock_devices(0, "after rm");
    assert!(vm.qemus().is_empty(), "stray qemu: {:?}", vm.qemus());
}
