//! `warren run --wait [--rm]` while something else happens to its sandbox: removed, restarted,
//! or this command signalled (or started with signals ignored). On the wasm backend (a module
//! that spins for ever), so these need no root.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;

use std::io::Read as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{TestServer, ignoring, json};
use nix::sys::signal::Signal::{self, SIGHUP, SIGINT, SIGTERM};

/// A test module's path (the server names a module file where it is).
fn module(name: &str) -> String {
    let path = format!(
        "{}/../wasm/tests/modules/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::canonicalize(&path)
        .map(|p| p.display().to_string())
        .unwrap_or(path)
}

/// A client process, killed and reaped if the test fails before it ends, and the lines of
/// its stdout as they come.
struct Client(Child, std::sync::mpsc::Receiver<String>);

impl Client {
    /// `warren run -b wasm --module loop.wat --name NAME FLAGS...` (spins for ever), its
    /// stdout and stderr piped.
    fn run_loop(server: &TestServer, name: &str, flags: &[&str]) -> Client {
        Client::spawn(server.command(&loop_args(name, flags)))
    }

    fn spawn(mut cmd: Command) -> Client {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = common::lines_of(child.stdout.take().unwrap());
        Client(child, lines)
    }

    /// Waits for its next line of output: it is past its create, streaming (and waiting).
    fn line(&self) -> String {
        self.1.recv_timeout(Duration::from_secs(30)).unwrap()
    }

    fn signal(&self, signal: Signal) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Its exit status (30 s at most), the rest of its stdout, and its stderr.
    fn end(&mut self, what: &str) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{what} did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at the end of the output.
        let out = self.1.iter().map(|l| format!("{l}\n")).collect();
        let mut err = String::new();
        self.0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status, out, err)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn loop_args<'a>(name: &'a str, flags: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "-b", "wasm", "--module", &LOOP, "--name", name];
    args.extend_from_slice(flags);
    args
}

static LOOP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| module("loop.wat"));

/// The sandbox's record, `None` once it is gone.
fn get(server: &TestServer, name: &str) -> Option<serde_json::Value> {
    let out = server.warren(&["get", name, "-o", "json"]);
    out.status
        .success()
        .then(|| json(&String::from_utf8_lossy(&out.stdout)))
}

/// Waits (30 s at most) until `ready` holds.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the sandbox runs, and returns its id.
fn running(server: &TestServer, name: &str) -> String {
    let mut id = String::new();
    wait_until(&format!("{name} Running"), || {
        get(server, name).is_some_and(|got| {
            id = got["metadata"]["uid"].as_str().unwrap_or_default().into();
            got["status"]["phase"] == "Running"
        })
    });
    id
}

/// `warren restart NAME`, then waits until it runs again under a new id.
fn restart(server: &TestServer, name: &str, id: &str) {
    server.ok(&["restart", name]);
    let again = running(server, name);
    assert_ne!(again, id, "a restart runs it under a new id");
}

#[test]
fn a_sandbox_removed_during_run_wait_ends_it_with_143() {
    let server = TestServer::start();
    for (name, flags) in [("plain", &["--wait"][..]), ("rm", &["--wait", "--rm"])] {
        let mut run = Client::run_loop(&server, name, flags);
        running(&server, name);
        assert_eq!(run.line(), "looping", "{flags:?}");
        server.ok(&["rm", name]);
        let (status, out, err) = run.end(&format!("run {flags:?}"));
        assert_eq!(status.code(), Some(143), "{flags:?}: {status}: {err}");
        assert_eq!(out, "", "{flags:?}");
        assert_eq!(
            err,
            format!("sandbox/{name} was deleted before its workload ended\n"),
            "{flags:?}"
        );
        assert!(get(&server, name).is_none());
    }
}

#[test]
fn run_wait_rm_removes_its_sandbox_after_a_restart() {
    let server = TestServer::start();
    let mut run = Client::run_loop(&server, "again", &["--wait", "--rm"]);
    let id = running(&server, "again");
    assert_eq!(run.line(), "looping");
    restart(&server, "again", &id);
    // The restarted run's output too: the stream follows the sandbox across its restart.
    assert_eq!(run.line(), "looping");
    // The restarted run ends as a killed process does: 128 + 9.
    server.ok(&["kill", "again"]);
    let (status, out, err) = run.end("run --wait --rm after a restart");
    assert_eq!(status.code(), Some(137), "{status}: {err}");
    assert_eq!(err, "");
    assert_eq!(out, "");
    assert!(get(&server, "again").is_none(), "--rm removed it");
}

#[test]
fn run_wait_rm_signalled_after_a_restart_removes_its_sandbox() {
    let server = TestServer::start();
    for (signal, code) in [(SIGTERM, 143), (SIGINT, 130), (SIGHUP, 129)] {
        let name = format!("again-{}", signal as i32);
        let mut run = Client::run_loop(&server, &name, &["--wait", "--rm"]);
        let id = running(&server, &name);
        restart(&server, &name, &id);
        run.signal(signal);
        let (status, _, err) = run.end(&format!("run --wait --rm after {signal}"));
        assert_eq!(status.code(), Some(code), "{signal}: {status}: {err}");
        assert_eq!(
            err,
            format!("run --rm (sandbox/{name} removed): stopped by {signal}\n")
        );
        assert!(get(&server, &name).is_none(), "{signal} removed it");
    }
}

#[test]
fn run_wait_rm_leaves_a_sandbox_of_its_name_made_since() {
    let server = TestServer::start();
    let mut run = Client::run_loop(&server, "taken", &["--wait", "--rm"]);
    running(&server, "taken");
    assert_eq!(run.line(), "looping");
    // Removed, and another sandbox made under the name before this command looks again.
    server.ok(&["rm", "taken"]);
    server.ok(&["run", "-b", "wasm", "--module", &LOOP, "--name", "taken"]);
    let (status, _, err) = run.end("run --wait --rm");
    assert_eq!(status.code(), Some(143), "{status}: {err}");
    assert_eq!(err, "sandbox/taken was deleted before its workload ended\n");
    let other = get(&server, "taken").expect("the new sandbox is left");
    assert_eq!(other["status"]["phase"], "Running");
}

#[test]
fn run_wait_rm_started_with_signals_ignored_outlives_them() {
    let server = TestServer::start();
    let cli = server.command(&loop_args("nohup", &["--wait", "--rm"]));
    let mut run = Client::spawn(ignoring("HUP INT", cli));
    running(&server, "nohup");
    assert_eq!(run.line(), "looping");
    run.signal(SIGHUP);
    run.signal(SIGINT);
    // Time for a handler to act, if one were installed.
    std::thread::sleep(Duration::from_millis(500));
    assert!(run.0.try_wait().unwrap().is_none(), "the command ended");
    assert_eq!(get(&server, "nohup").unwrap()["status"]["phase"], "Running");
    // SIGTERM, not ignored, still removes it.
    run.signal(SIGTERM);
    let (status, out, err) = run.end("run --wait --rm after SIGTERM");
    assert_eq!(status.code(), Some(143), "{status}: {err}");
    assert_eq!(out, "");
    assert_eq!(
        err,
        "run --rm (sandbox/nohup removed): stopped by SIGTERM\n"
    );
    assert!(get(&server, "nohup").is_none());
}

#[test]
fn run_wait_rm_signalled_during_its_create_removes_what_it_made() {
    let server = TestServer::start();
    // Thousands of functions: compiling them keeps the create under way for a while (about
    // a second on the project's machine), during which the signal comes.
    let mut wat = String::from("(module (memory (export \"memory\") 1)\n");
    for i in 0..3000 {
        wat.push_str(&format!("(func $f{i} (param i32) (result i32)"));
        for j in 0..20 {
            let k = i + j;
            wat.push_str(&format!(
                " (local.set 0 (i32.add (local.get 0) (i32.mul (local.get 0) (i32.const {k}))))"
            ));
        }
        wat.push_str(" (local.get 0))\n");
    }
    wat.push_str("(func (export \"_start\") (loop $forever (br $forever))))\n");
    let big = server.dir.path().join("big.wat");
    std::fs::write(&big, wat).unwrap();
    let big = big.to_str().unwrap();
    let args = [
        "run", "-b", "wasm", "--module", big, "--name", "slow", "--wait", "--rm",
    ];
    let mut run = Client::spawn(server.command(&args));
    // The server has the create (so the command has sent it); the module still compiles.
    let mut phase = serde_json::Value::Null;
    wait_until("the create under way", || {
        phase =
            get(&server, "slow").map_or(serde_json::Value::Null, |g| g["status"]["phase"].clone());
        !phase.is_null()
    });
    assert_eq!(
        phase, "Creating",
        "the create was over before the test could signal"
    );
    run.signal(SIGTERM);
    let (status, _, err) = run.end("run --wait --rm after SIGTERM during its create");
    assert_eq!(status.code(), Some(143), "{status}: {err}");
    assert_eq!(err, "run --rm (sandbox/slow removed): stopped by SIGTERM\n");
    assert!(
        get(&server, "slow").is_none(),
        "left: {:?}",
        get(&server, "slow")
    );
}

#[test]
fn run_wait_rm_says_how_it_ended_to_a_closed_stderr_without_a_panic() {
    let server = TestServer::start();
    // `2>&-`-like: a pipe whose reader is gone (this mode keeps SIGPIPE ignored, so each
    // write fails with EPIPE).
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let trap = module("trap.wat");
    let status = server
        .command(&[
            "run", "-b", "wasm", "--module", &trap, "--name", "trap", "--wait", "--rm",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(write))
        .status()
        .unwrap();
    // 1 as a failed workload's, not 101 as a panic's.
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(get(&server, "trap").is_none(), "--rm removed it");
}
