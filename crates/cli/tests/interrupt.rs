//! Client commands stopped by SIGINT, SIGTERM or SIGHUP clean up after themselves and exit
//! with 128 + the signal's number: `warren cp` out of a sandbox removes its staging
//! directory, `warren exec -it` gives the terminal back as it found it, and both stop even
//! while nobody reads their output; `run --wait --rm` cuts its removal's grace period short
//! on a second signal. A signal ignored when the command started (`nohup`) stays ignored.
//! Needs root and busybox, as linux.rs does; without them every test prints why it skips.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;
#[macro_use]
#[path = "common/linux.rs"]
mod linux_harness;

use std::io::Read as _;
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal::{self, SIGHUP, SIGINT, SIGTERM};
use nix::sys::termios::{self, LocalFlags};

use common::ignoring;
use linux_harness::Linux;

/// A client process, killed and reaped if the test fails before it ends.
struct Client(Child);

impl Client {
    fn signal(&self, signal: Signal) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Its exit status, 30 s at most after it was signalled.
    fn exit(&mut self, what: &str) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{what} did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (30 s at most) until `ready` holds.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `warren top NAME` no longer shows `command`: the server ended the process
/// when its client went.
fn wait_process_gone(l: &Linux, name: &str, command: &str) {
    wait_until(&format!("{command} in {name} ended"), || {
        !l.ok(&["top", name]).contains(command)
    });
}

/// What `dir` holds whose name starts with `.warren-cp-`.
fn staging(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".warren-cp-"))
        .map(|e| e.path())
        .collect()
}

const SIGNALS: [(Signal, i32); 3] = [(SIGTERM, 143), (SIGINT, 130), (SIGHUP, 129)];

#[test]
fn a_cp_out_stopped_by_a_signal_leaves_no_staging_directory() {
    let l = linux_or_skip!();
    l.run_running("box", &[], &["sleep", "600"]);
    // 1 GB that takes no room in the sandbox (busybox tar sends every zero), so the copy is
    // still going when the signal comes.
    sparse_gigabyte(&l);
    let here = tempfile::tempdir().unwrap();
    for (signal, code) in SIGNALS {
        let dest = here.path().join(format!("got-{signal}"));
        let mut cp = Client(
            l.server
                .command(&["cp", "box:/tmp/big", dest.to_str().unwrap()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        // Bytes have landed in the staging directory, the sandbox's tar sends more: the
        // copy is under way (it takes seconds).
        wait_until("a partial copy in a staging directory", || {
            staging(here.path())
                .iter()
                .any(|s| std::fs::metadata(s.join("big")).is_ok_and(|m| m.len() > 0))
        });
        let tar = "tar -c -f - -C /tmp big";
        wait_until("tar in the sandbox", || l.ok(&["top", "box"]).contains(tar));
        cp.signal(signal);
        let status = cp.exit(&format!("cp after {signal}"));
        let mut err = String::new();
        cp.0.stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(
            status.code(),
            Some(code),
            "cp after {signal}: {status}: {err}"
        );
        assert_eq!(err, format!("cp: stopped by {signal}\n"));
        assert_eq!(staging(here.path()), Vec::<std::path::PathBuf>::new());
        assert!(!dest.exists(), "a partial copy at {}", dest.display());
        wait_process_gone(&l, "box", tar);
    }
}

#[test]
fn a_cp_in_stopped_by_a_signal_ends_the_sandboxs_tar() {
    let l = linux_or_skip!();
    l.run_running("box", &[], &["sleep", "600"]);
    let here = tempfile::tempdir().unwrap();
    let big = here.path().join("big");
    // 1 GB that takes no room here.
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1_000_000_000)
        .unwrap();
    let mut cp = Client(
        l.server
            .command(&["cp", big.to_str().unwrap(), "box:/tmp/in"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let tar = "tar -x -f - -C /tmp";
    wait_until("tar in the sandbox", || l.ok(&["top", "box"]).contains(tar));
    cp.signal(SIGTERM);
    let status = cp.exit("cp in after SIGTERM");
    let mut err = String::new();
    cp.0.stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(143), "{status}: {err}");
    assert_eq!(err, "cp: stopped by SIGTERM\n");
    wait_process_gone(&l, "box", tar);
}

#[test]
fn an_exec_it_stopped_by_a_signal_gives_the_terminal_back() {
    let l = linux_or_skip!();
    l.run_running("box", &[], &["sleep", "600"]);
    for (signal, code) in SIGNALS {
        // A terminal set up as a shell's is: canonical input, echo on.
        let size = nix::pty::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(&size, None).unwrap();
        let mut cooked = termios::tcgetattr(&pty.slave).unwrap();
        cooked.local_flags |= LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG;
        termios::tcsetattr(&pty.slave, termios::SetArg::TCSANOW, &cooked).unwrap();
        // What the client writes to the terminal, read as it comes (a full terminal
        // would stop it).
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut master = std::fs::File::from(pty.master);
        let sink = written.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once no one has the terminal open.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let seconds = format!("{}", 1000 + signal as i32);
        let tty = || Stdio::from(pty.slave.try_clone().unwrap());
        let mut exec = Client(
            l.server
                .command(&["exec", "-it", "box", "--", "sleep", &seconds])
                .stdin(tty())
                .stdout(tty())
                .stderr(tty())
                .spawn()
                .unwrap(),
        );
        let sleeping = format!("sleep {seconds}");
        wait_until("the process runs", || {
            l.ok(&["top", "box"]).contains(&sleeping)
        });
        let raw = || {
            let now = termios::tcgetattr(&pty.slave).unwrap().local_flags;
            !now.intersects(LocalFlags::ICANON | LocalFlags::ECHO)
        };
        wait_until("the terminal in raw mode", raw);
        exec.signal(signal);
        let status = exec.exit(&format!("exec -it after {signal}"));
        let shown = || String::from_utf8_lossy(&written.lock().unwrap()).into_owned();
        assert_eq!(
            status.code(),
            Some(code),
            "after {signal}: {status}: {}",
            shown()
        );
        let now = termios::tcgetattr(&pty.slave).unwrap().local_flags;
        assert!(
            now.contains(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG),
            "after {signal} the terminal is left {now:?}"
        );
        let said = format!("exec: stopped by {signal}");
        wait_until(&format!("{said:?} on the terminal"), || {
            shown().contains(&said)
        });
        wait_process_gone(&l, "box", &sleeping);
    }
}

/// Whether a thread of process `pid` is blocked writing to a full pipe.
fn blocked_on_a_pipe(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|task| {
            std::fs::read_to_string(task.path().join("wchan"))
                .is_ok_and(|w| w.contains("pipe_write"))
        })
}

/// A pipe nobody reads: its read end, kept open (so writes block, not fail), and its write
/// end for a client's stdout.
fn unread_pipe() -> (std::os::fd::OwnedFd, Stdio) {
    let (read, write) = nix::unistd::pipe().unwrap();
    (read, Stdio::from(write))
}

/// The client's exit status after `signal`, and its stderr.
fn stopped_by(client: &mut Client, signal: Signal, what: &str) -> (ExitStatus, String) {
    client.signal(signal);
    let status = client.exit(&format!("{what} after {signal}"));
    let mut err = String::new();
    client
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, err)
}

#[test]
fn an_exec_whose_output_is_not_read_still_stops_on_a_signal() {
    let l = linux_or_skip!();
    l.run_running("box", &[], &["sleep", "600"]);
    let (_unread, stdout) = unread_pipe();
    let mut exec = Client(
        l.server
            .command(&["exec", "box", "--", "cat", "/dev/zero"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let cat = "cat /dev/zero";
    wait_until("cat in the sandbox", || l.ok(&["top", "box"]).contains(cat));
    wait_until("exec held up by its stdout", || {
        blocked_on_a_pipe(exec.0.id())
    });
    let (status, err) = stopped_by(&mut exec, SIGTERM, "exec with a full stdout");
    assert_eq!(status.code(), Some(143), "{status}: {err}");
    assert_eq!(err, "exec: stopped by SIGTERM\n");
    wait_process_gone(&l, "box", cat);
}

#[test]
fn a_cp_to_a_stdout_not_read_still_stops_on_a_signal() {
    let l = linux_or_skip!();
    l.run_running("box", &[], &["sleep", "600"]);
    // 1 GB that takes no room in the sandbox.
    sparse_gigabyte(&l);
    let (_unread, stdout) = unread_pipe();
    let mut cp = Client(
        l.server
            .command(&["cp", "box:/tmp/big", "-"])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let tar = "tar -c -f - -C /tmp big";
    wait_until("tar in the sandbox", || l.ok(&["top", "box"]).contains(tar));
    wait_until("cp held up by its stdout", || blocked_on_a_pipe(cp.0.id()));
    let (status, err) = stopped_by(&mut cp, SIGTERM, "cp to a full stdout");
    assert_eq!(status.code(), Some(143), "{status}: {err}");
    assert_eq!(err, "cp: stopped by SIGTERM\n");
    wait_process_gone(&l, "box", tar);
}

#[test]
fn an_exec_started_with_signals_ignored_outlives_them() {
    let l = linux_or_skip!();
    l.run_running("box", &[], &["sleep", "600"]);
    let cli = l
        .server
        .command(&["exec", "box", "--", "sh", "-c", "sleep 3; echo done"]);
    let mut exec = Client(
        ignoring("HUP INT", cli)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_until("the process runs", || {
        l.ok(&["top", "box"]).contains("sleep 3")
    });
    // As `nohup warren exec ... &` gets when its terminal closes, and ^C typed in the shell.
    exec.signal(SIGHUP);
    exec.signal(SIGINT);
    let status = exec.exit("exec with SIGHUP and SIGINT ignored");
    let mut out = String::new();
    let mut err = String::new();
    exec.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    exec.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status}: {err}");
    assert_eq!(out, "done\n", "the process ran to its end");
}

#[test]
fn a_second_signal_cuts_short_the_grace_period_of_run_rms_removal() {
    let l = linux_or_skip!();
    // A workload that outlives SIGTERM, given an hour before SIGKILL.
    let mut run = Client(
        l.server
            .command(&[
                "run",
                "-b",
                "linux",
                "-i",
                "busybox",
                "--name",
                "stubborn",
                "--stop-timeout",
                "3600",
                "--wait",
                "--rm",
                "--",
                "sh",
                "-c",
                "trap '' TERM; sleep 600",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_until("the sandbox runs", || {
        let got = l.warren(&["get", "stubborn", "-o", "json"]);
        got.status.success()
            && common::json(&linux_harness::stdout(&got))["status"]["phase"] == "Running"
    });
    wait_until("the workload runs", || {
        l.ok(&["top", "stubborn"]).contains("sleep 600")
    });
    run.signal(SIGTERM);
    // The removal waits out the sandbox's grace period...
    l.wait_phase("stubborn", "Stopping");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        run.0.try_wait().unwrap().is_none(),
        "ended during the grace period"
    );
    // ...until a second signal (^C again) ends the workload at once.
    let (status, err) = stopped_by(&mut run, SIGINT, "run --wait --rm stopping");
    assert_eq!(status.code(), Some(143), "{status}: {err}");
    assert_eq!(
        err,
        "run --rm (sandbox/stubborn removed): stopped by SIGTERM\n"
    );
    assert_eq!(
        l.warren(&["get", "stubborn"]).status.code(),
        Some(1),
        "removed"
    );
}

/// Makes /tmp/big in sandbox `box`: 1 GB that takes no room (busybox tar sends every zero).
fn sparse_gigabyte(l: &Linux) {
    l.ok(&[
        "exec",
        "box",
        "--",
        "dd",
        "if=/dev/zero",
        "of=/tmp/big",
        "bs=1",
        "count=0",
        "seek=1000000000",
    ]);
}
