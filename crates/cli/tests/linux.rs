//! The linux backend end to end: the real server and CLI running busybox containers, with
//! real namespaces, cgroups, seccomp and overlayfs. Needs root (this machine's CI runs as
//! root); without it every test prints why it skips.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;
#[macro_use]
#[path = "common/linux.rs"]
mod linux_harness;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{json, stderr};
use linux_harness::{Linux, cgroup_of, cgroup_parents, skip_reason, stdout, wait_gone, wait_warm};
use warren_image::testing::{Entry, layer_tar};

#[test]
fn output_exit_code_env_cwd_hostname_and_user() {
    let l = linux_or_skip!();
    let out = l.run("echo", &["--wait"], &["echo", "hello from busybox"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello from busybox\n");
    assert_eq!(l.ok(&["logs", "echo"]), "hello from busybox\n");
    let got = l.get("echo");
    assert_eq!(got["status"]["phase"], "Exited");
    assert_eq!(got["status"]["exitCode"], 0);

    let out = l.run(
        "seven",
        &["--wait"],
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert_eq!(stdout(&out), "out\n");
    assert!(stderr(&out).contains("err"), "{}", stderr(&out));
    assert_eq!(l.get("seven")["status"]["exitCode"], 7);

    let out = l.run(
        "env",
        &[
            "--wait",
            "-e",
            "FOO=bar baz",
            "-w",
            "/tmp",
            "--hostname",
            "box1",
        ],
        &["sh", "-c", "echo \"$FOO|$(pwd)|$(hostname)|$HOSTNAME\""],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "bar baz|/tmp|box1|box1\n");

    let out = l.run("user", &["--wait", "-u", "1000:1001"], &["id"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("uid=1000 gid=1001"),
        "{}",
        stdout(&out)
    );

    // Without --stdin the workload reads end of file at once.
    let out = l.run("no-input", &["--wait"], &["sh", "-c", "cat; echo done"]);
    assert_eq!(stdout(&out), "done\n");

    // The default hostname is the sandbox's name.
    let out = l.run("named-box", &["--wait"], &["hostname"]);
    assert_eq!(stdout(&out), "named-box\n");

    let out = l.run("caps", &["--wait"], &CAPS_OF_THE_WORKLOAD);
    assert_default_caps(&stdout(&out));

    // No device node of the host can be made (a loop device here; a disk elsewhere), in
    // its own /dev or anywhere; the ones it has work.
    let out = l.run(
        "mknod",
        &["--wait"],
        &[
            "sh",
            "-c",
            "mknod /dev/blk b 7 0 || echo dev-refused; mknod /tmp/mem c 1 1 || echo tmp-refused; \
             echo ok > /dev/null && head -c 1 /dev/zero | wc -c",
        ],
    );
    assert_eq!(
        stdout(&out),
        "dev-refused\ntmp-refused\n1\n",
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("Operation not permitted"),
        "{}",
        stderr(&out)
    );
}

/// A command printing the workload's own status, capability sets included.
const CAPS_OF_THE_WORKLOAD: [&str; 2] = ["cat", "/proc/self/status"];

/// Docker's default set without MKNOD, which a root workload gets (CHOWN, DAC_OVERRIDE,
/// FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT,
/// AUDIT_WRITE, SETFCAP: bits 0, 1, 3-8, 10, 13, 18, 29, 31).
const DEFAULT_CAPS: &str = "00000000a00425fb";

/// `/proc/self/status` of a root workload: the default set is its bounding,
/// permitted and effective set; it inherits and carries no ambient capability.
fn assert_default_caps(status: &str) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in {status:?}"))
            .to_string()
    };
    for (name, want) in [
        ("CapBnd", DEFAULT_CAPS),
        ("CapPrm", DEFAULT_CAPS),
        ("CapEff", DEFAULT_CAPS),
        ("CapInh", "0000000000000000"),
        ("CapAmb", "0000000000000000"),
    ] {
        assert_eq!(field(name), want, "{name} in {status:?}");
    }
}

#[test]
fn pids_memory_and_cpu_limits_are_enforced() {
    let l = linux_or_skip!();
    // An inner shell starts 40 background sleeps under pids.max=20 and dies at the first
    // fork that fails; the outer one then counts processes with builtins only (a fork would
    // fail at the limit): at most 20 exist at once.
    let out = l.run(
        "pids",
        &["--wait", "--pids", "20"],
        &[
            "sh",
            "-c",
            "sh -c 'for i in $(seq 40); do sleep 3 & done' 2>/dev/null; set -- /proc/[0-9]*; echo $#",
        ],
    );
    let count: usize = stdout(&out).trim().parse().unwrap_or_else(|_| {
        panic!(
            "no count: {:?} / {} / {}",
            out.status,
            stdout(&out),
            stderr(&out)
        )
    });
    assert!(
        (10..=20).contains(&count),
        "{count} processes under pids.max=20"
    );

    // 200M held in memory under a 50M limit: the kernel OOM-kills it and the status says so.
    let out = l.run(
        "oom",
        &["--wait", "-m", "50M"],
        &["sh", "-c", "head -c 200m /dev/zero | tail > /dev/null"],
    );
    assert_ne!(out.status.code(), Some(0));
    let got = l.get("oom");
    assert_eq!(got["status"]["phase"], "Failed", "{got}");
    assert_eq!(got["status"]["reason"], "OOMKilled", "{got}");

    // Two busy loops under cpu 0.2 get about 20% of one CPU between them, and the kernel's
    // throttle counter shows the quota is what holds them back. Measured from the host's
    // side of the cgroup. The lower bound is loose (5%): on this shared 2-core machine the
    // other tests may leave the loops less than their quota; the upper bound is the limit.
    l.run_running(
        "cpu",
        &["--cpu", "0.2"],
        &["sh", "-c", "yes > /dev/null & yes > /dev/null & wait"],
    );
    let cgroup = cgroup_of(&l, "cpu");
    let layout = warren_linux::cgroup::CgroupLayout::detect().unwrap();
    // (cpu seconds used, periods throttled)
    let sample = || -> (f64, u64) {
        let field = |text: &str, key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
                .unwrap_or(0)
        };
        match &layout {
            warren_linux::cgroup::CgroupLayout::V1 { mounts } => {
                let dir = |c: &str| mounts[c].join(&l.cgroup_parent).join(&cgroup);
                let usage: u64 = std::fs::read_to_string(dir("cpuacct").join("cpuacct.usage"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                let stat = std::fs::read_to_string(dir("cpu").join("cpu.stat")).unwrap();
                (usage as f64 / 1e9, field(&stat, "nr_throttled "))
            }
            warren_linux::cgroup::CgroupLayout::V2 { root } => {
                let stat = std::fs::read_to_string(
                    root.join(&l.cgroup_parent).join(&cgroup).join("cpu.stat"),
                )
                .unwrap();
                (
                    field(&stat, "usage_usec ") as f64 / 1e6,
                    field(&stat, "nr_throttled "),
                )
            }
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    let (used0, _) = sample();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let (used1, throttled) = sample();
    let share = (used1 - used0) / t0.elapsed().as_secs_f64();
    l.ok(&["rm", "cpu"]);
    assert!(
        (0.05..=0.30).contains(&share),
        "cpu share {share:.3} under a 0.2 limit"
    );
    assert!(throttled > 0, "the quota never throttled the loops");
}

#[test]
fn seccomp_default_profile_and_denied_syscalls() {
    let l = linux_or_skip!();
    let out = l.run(
        "mkdir-ok",
        &["--wait"],
        &["sh", "-c", "mkdir /tmp/made && echo made"],
    );
    assert_eq!(stdout(&out), "made\n", "{}", stderr(&out));

    let out = l.run(
        "mkdir-denied",
        &[
            "--wait",
            "--deny-syscall",
            "mkdir",
            "--deny-syscall",
            "mkdirat",
        ],
        &["mkdir", "/tmp/made"],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("Operation not permitted"),
        "{}",
        stderr(&out)
    );

    let out = l.run(
        "mount",
        &["--wait"],
        &["mount", "-t", "tmpfs", "none", "/mnt"],
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).to_lowercase().contains("permission denied")
            || stderr(&out).contains("Operation not permitted"),
        "{}",
        stderr(&out)
    );

    let out = l.run("bad-syscall", &["--deny-syscall", "mkdri"], &["true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("mkdri"), "{}", stderr(&out));
}

#[test]
fn the_sandbox_sees_neither_host_processes_nor_host_files() {
    let l = linux_or_skip!();
    let out = l.run(
        "iso",
        &["--wait"],
        &[
            "sh",
            "-c",
            "set -- /proc/[0-9]*; echo procs=$#; \
             test -e /work -o -e /root/.cargo -o -e /etc/debian_version && echo host-visible; \
             ls /; \
             echo x > /proc/sys/kernel/hostname 2>/dev/null && echo wrote-proc-sys; \
             cat /proc/kcore 2>/dev/null | head -c 1 | wc -c",
        ],
    );
    let text = stdout(&out);
    assert!(
        text.starts_with("procs=1\n") || text.starts_with("procs=2\n"),
        "{text}"
    );
    assert!(!text.contains("host-visible"), "{text}");
    assert!(!text.contains("wrote-proc-sys"), "{text}");
    assert!(text.ends_with("0\n"), "/proc/kcore is masked: {text}");

    let out = l.run(
        "ro",
        &["--wait", "--read-only"],
        &["sh", "-c", "touch /x || touch /tmp/x || echo read-only"],
    );
    assert!(
        stdout(&out).contains("read-only"),
        "{} {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );

    // A host directory mapped read-only is readable, not writable.
    let shared = l.server.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("f"), "from host").unwrap();
    let map = format!("/data::{}:ro", shared.display());
    let out = l.run(
        "map",
        &["--wait", "--mapdir", &map],
        &[
            "sh",
            "-c",
            "cat /data/f; echo; echo x > /data/g || echo denied",
        ],
    );
    assert_eq!(stdout(&out), "from host\ndenied\n", "{}", stderr(&out));
    assert!(!shared.join("g").exists());
}

#[test]
fn stop_kills_after_the_grace_period() {
    let l = linux_or_skip!();
    // pid 1 of a pid namespace gets no SIGTERM it has not asked for, so `sleep` ignores it.
    l.run_running("stubborn", &["--stop-timeout", "1"], &["sleep", "1000"]);
    let started = Instant::now();
    l.ok(&["rm", "stubborn"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "rm took {took:?} with a 1 s grace"
    );

    // A kill during a stop's grace period ends the stop early, as `docker kill` during
    // `docker stop` does; meanwhile, rm says what it waits for and how to end it.
    l.run_running("long", &[], &["sleep", "1000"]);
    std::thread::scope(|s| {
        let started = Instant::now();
        let stop = s.spawn(|| l.warren(&["stop", "-t", "600", "long"]));
        l.wait_phase("long", "Stopping");
        let out = l.warren(&["rm", "long"]);
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(
                "is stopping (SIGKILL follows its grace period); `warren kill long` ends it now"
            ),
            "{}",
            stderr(&out)
        );
        l.ok(&["kill", "long"]);
        let out = stop.join().expect("stop thread");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a 600 s stop ended by kill took {:?}",
            started.elapsed()
        );
    });
    l.wait_phase("long", "Stopped");
    l.ok(&["rm", "long"]);

    // A workload that handles SIGTERM ends at once, well before the 10 s default grace.
    let out = l.run(
        "polite",
        &[],
        &[
            "sh",
            "-c",
            "trap 'exit 0' TERM; echo up; while :; do sleep 0.1; done",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Its trap is set once it says so: a SIGTERM before that would be ignored.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !l.ok(&["logs", "polite"]).contains("up") {
        assert!(Instant::now() < deadline, "polite never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    l.ok(&["rm", "polite"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        l.leftover_cgroups().is_empty(),
        "{:?}",
        l.leftover_cgroups()
    );

    // --timeout kills the workload and says why.
    let started = Instant::now();
    let out = l.run("slow", &["--timeout", "300ms", "--wait"], &["sleep", "100"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let got = l.get("slow");
    assert_eq!(got["status"]["phase"], "Failed", "{got}");
    assert_eq!(got["status"]["reason"], "Timeout", "{got}");
}

/// A line longer than a log record (16 KiB) is one line to `--tail` and `-t`; a `logs -f`
/// whose client went away lets go of the log at once (not when the sandbox next writes);
/// one the server's shutdown ends says so and fails, unlike a sandbox's end.
#[test]
fn logs_count_whole_lines_and_followers_end_with_their_client_or_the_server() {
    let mut l = linux_or_skip!();
    let out = l.run(
        "long",
        &[],
        &[
            "sh",
            "-c",
            "echo first; head -c 50000 /dev/zero | tr '\\0' x; echo; echo end",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    l.wait_phase("long", "Exited");
    let long_line = "x".repeat(50000);
    // (Line lengths, not the lines: a failure would print 50 kB of x.)
    let shape = |text: &str| -> Vec<usize> { text.lines().map(str::len).collect() };
    assert_eq!(
        shape(&l.ok(&["logs", "--tail", "2", "long"])),
        [long_line.len(), 3]
    );
    let stamped = l.ok(&["logs", "-t", "long"]);
    let lines: Vec<&str> = stamped.lines().collect();
    assert_eq!(lines.len(), 3, "{:?}", shape(&stamped));
    for (line, text) in lines.iter().zip(["first", long_line.as_str(), "end"]) {
        let (time, rest) = line.split_once(' ').expect("a timestamp");
        assert!(time.ends_with('Z') && time.contains('T'), "{time}");
        assert!(rest == text, "{} bytes, not {}", rest.len(), text.len());
    }

    l.run_running("silent", &[], &["sleep", "600"]);
    let log = l.server.state_dir().join("linux");
    let server_pid = l.server.pid();
    // The server's open files under its linux directory: the followers' logs.
    let held = || {
        std::fs::read_dir(format!("/proc/{server_pid}/fd"))
            .map(|fds| {
                fds.flatten()
                    .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                    .filter(|target| target.starts_with(&log) && target.ends_with("container.log"))
                    .count()
            })
            .unwrap_or(0)
    };
    let before = held();
    let follow = || {
        l.server
            .command(&["logs", "-f", "silent"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("logs -f")
    };
    let mut followers: Vec<_> = (0..5).map(|_| follow()).collect();
    let wait_for = |want: &dyn Fn(usize) -> bool, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !want(held()) {
            assert!(Instant::now() < deadline, "{what}: {} held", held());
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(&|n| n >= before + 5, "five followers open the log");
    for f in &mut followers {
        let _ = f.kill();
        let _ = f.wait();
    }
    wait_for(&|n| n <= before, "the followers' files closed");

    let last = follow();
    let mut watch = l
        .server
        .command(&["watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    // Subscribed once it has printed the sandboxes there are.
    let events = common::lines_of(watch.stdout.take().expect("stdout"));
    events
        .recv_timeout(Duration::from_secs(10))
        .expect("watch lists the sandboxes");
    wait_for(&|n| n > before, "the last follower opens the log");
    assert!(l.server.terminate().success());
    for (what, child) in [("logs -f", last), ("watch", watch)] {
        let out = child.wait_with_output().expect("wait");
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: {:?} {}",
            out.status,
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("the server is shutting down"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn exec_runs_inside_the_sandbox() {
    let l = linux_or_skip!();
    l.run_running("host", &["-e", "GREETING=hi"], &["sleep", "1000"]);
    let text = l.ok(&[
        "exec",
        "host",
        "--",
        "sh",
        "-c",
        "echo $GREETING $(hostname); cat /proc/1/cmdline | tr '\\0' ' '",
    ]);
    assert_eq!(text, "hi host\nsleep 1000 ");
    let out = l.warren(&["exec", "host", "--", "sh", "-c", "echo oops >&2; exit 5"]);
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(stderr(&out), "oops\n");
    let out = l
        .server
        .warren_stdin(&["exec", "-i", "host", "--", "cat"], Some("piped stdin\n"));
    assert_eq!(stdout(&out), "piped stdin\n", "{}", stderr(&out));
    let out = l.warren(&["exec", "host", "--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        stderr(&out).contains("No such file or directory"),
        "{}",
        stderr(&out)
    );
    // Found but not runnable is 126, as in a shell and `docker exec`.
    for args in [
        &["exec", "host", "--", "/etc/passwd"][..],
        &["exec", "-w", "/no/such/dir", "host", "--", "true"],
    ] {
        let out = l.warren(args);
        assert_eq!(out.status.code(), Some(126), "{args:?}: {}", stderr(&out));
    }
    let out = l.warren(&["exec", "-t", "host", "--", "busybox", "tty"]);
    assert!(stdout(&out).starts_with("/dev/pts/"), "{}", stdout(&out));
    // A terminal has a type (xterm, as docker gives), unless -e says otherwise.
    let term = ["sh", "-c", "echo ${TERM:-none}"];
    let out = l.warren(&[&["exec", "-t", "host", "--"][..], &term[..]].concat());
    assert_eq!(stdout(&out), "xterm\r\n");
    let out = l.warren(
        &[
            &["exec", "-t", "-e", "TERM=vt100", "host", "--"][..],
            &term[..],
        ]
        .concat(),
    );
    assert_eq!(stdout(&out), "vt100\r\n");
    let out = l.warren(&[&["exec", "host", "--"][..], &term[..]].concat());
    assert_eq!(stdout(&out), "none\n");
    // A terminal's input ends as a user ends it, with ^D, so its reader finishes: at once
    // without -i, and where the piped input ends with -i (its unfinished last line handed
    // over first).
    let out = l
        .server
        .warren_within(30, &["exec", "-t", "host", "--", "cat"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = l.server.warren_within(
        30,
        &["exec", "-it", "host", "--", "busybox", "wc", "-c"],
        Some("one\ntwo"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The terminal echoes the input; wc counted all 7 bytes.
    assert_eq!(stdout(&out), "one\r\ntwo7\r\n");
    // A client that goes away takes its process with it, terminal or not.
    common::exec_ends_with_its_client(&l.server, "host", &[], "1357");
    common::exec_ends_with_its_client(&l.server, "host", &["-t"], "1358");

    // A relative working directory is refused, as run refuses it.
    let out = l.warren(&["exec", "-w", "tmp", "host", "--", "true"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(r#"exec: workingDir: "tmp" must be an absolute path"#),
        "{}",
        stderr(&out)
    );
    l.ok(&["rm", "host"]);
    let out = l.warren(&["exec", "host", "--", "true"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn sandboxes_survive_a_server_kill_and_are_adopted() {
    // Its sandboxes in a --linux-dir of their own (made by the server, inside a temp dir),
    // which the restarted server finds again.
    let parent = tempfile::tempdir().unwrap();
    let linux_dir = parent.path().join("linux");
    let mut l = match skip_reason() {
        Some(reason) => {
            eprintln!("{reason}");
            return;
        }
        None => Linux::start_with(&["--linux-dir", linux_dir.to_str().unwrap()]),
    };
    // Bundles hold sandboxes' writable layers (set-id files a sandbox made among them):
    // nobody but root may reach them.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&linux_dir).unwrap().permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o700, "--linux-dir mode {mode:o}");
    // Strong: acknowledged only once recorded, so a kill -9 right after cannot lose it.
    let out = l.run(
        "survivor",
        &["--mode", "strong"],
        &["sh", "-c", "echo before; sleep 1000"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    l.wait_phase("survivor", "Running");
    let bundle = PathBuf::from(
        l.get("survivor")["status"]["backendInfo"]["bundle"]
            .as_str()
            .expect("bundle"),
    );
    assert!(
        bundle.starts_with(&linux_dir),
        "{} is not under --linux-dir",
        bundle.display()
    );
    let state = json(&std::fs::read_to_string(bundle.join("state.json")).unwrap());
    let pid = state["pid"].as_i64().expect("pid").to_string();
    l.server.kill9();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "the workload outlived the server"
    );
    l.server.spawn();
    let got = l.get("survivor");
    assert_eq!(got["status"]["phase"], "Running", "{got}");
    assert_eq!(
        l.ok(&["exec", "survivor", "--", "echo", "still here"]),
        "still here\n"
    );
    assert_eq!(l.ok(&["logs", "survivor"]), "before\n");
    // Its end is still noticed: through the pidfd, not a child handle.
    let out = l.run("short", &["--mode", "strong"], &["sleep", "1"]);
    assert_eq!(out.status.code(), Some(0));
    l.server.kill9();
    l.server.spawn();
    l.wait_phase("short", "Exited");
    l.ok(&["rm", "survivor"]);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!bundle.exists(), "{} left behind", bundle.display());
}

#[test]
fn bad_input_gets_clear_errors() {
    let l = linux_or_skip!();
    let out = l.warren(&[
        "run", "-b", "linux", "-i", "nope", "--name", "a", "--", "true",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    let out = l.run("b", &[], &["/no/such/program"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/no/such/program") && stderr(&out).contains("No such file"),
        "{}",
        stderr(&out)
    );
    let out = l.run("c", &[], &["nosuchcommand"]);
    assert!(
        stderr(&out).contains("not found in $PATH"),
        "{}",
        stderr(&out)
    );
    let out = l.run("d", &["-u", "root"], &["true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("spec.user"), "{}", stderr(&out));
    let out = l.warren(&["run", "-b", "linux", "--name", "e", "--", "true"]);
    assert!(stderr(&out).contains("spec.image"), "{}", stderr(&out));
    // A bind mount over the root, /proc or /dev itself is refused, naming it; under /dev
    // is fine.
    let host = l.server.dir.path().to_str().unwrap().to_string();
    for (guest, why) in [
        ("/", "is the root"),
        ("/proc", "is /proc or under it"),
        ("/proc/sys/x", "is /proc or under it"),
        ("/dev/", "is /dev, which the runtime makes"),
    ] {
        let mapdir = format!("{guest}::{host}");
        let out = l.run("f", &["--mapdir", &mapdir], &["true"]);
        assert_eq!(out.status.code(), Some(1), "{guest}");
        assert!(
            stderr(&out).contains(&format!("spec.mounts[0].guest: {guest:?} {why}")),
            "{guest}: {}",
            stderr(&out)
        );
    }
    let out = l.run(
        "g",
        &["--mapdir", &format!("/dev/hostdir::{host}:ro"), "--wait"],
        &["ls", "-d", "/dev/hostdir"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    l.ok(&["rm", "g"]);
    // Nothing of the failed creates is left.
    assert!(
        l.leftover_cgroups().is_empty(),
        "{:?}",
        l.leftover_cgroups()
    );
    let ls = l.ok(&["ls", "-o", "name"]);
    assert_eq!(ls, "", "failed creates are not listed");

    // A CPU limit above the node's CPUs limits nothing: refused at create and at update.
    let too_many = "1000";
    let out = l.run("f", &["--cpu", too_many], &["true"]);
    assert_eq!(out.status.code(), Some(1));
    let said = "spec.resources.limits.cpu: 1000 is more than this node's";
    assert!(stderr(&out).contains(said), "{}", stderr(&out));
    let out = l.run("g", &["--cpu", "500m"], &["sleep", "100"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = l.warren(&["update", "g", "--cpu", too_many]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(said), "{}", stderr(&out));
    let g = l.get("g");
    assert_eq!(g["spec"]["resources"]["limits"]["cpu"], "500m", "{g}");
    assert_eq!(g["status"]["resources"]["cpu_limit"], 0.5, "{g}");
    l.ok(&["rm", "-f", "g"]);

    // Layers that try to escape the rootfs are refused at import, and touch nothing.
    let evil = l.server.dir.path().join("evil");
    for kind in warren_image::testing::Malicious::ALL {
        let layout = warren_image::testing::malicious_layout(&evil, kind).expect("layout");
        let out = l.warren(&[
            "image",
            "import",
            layout.to_str().unwrap(),
            "--name",
            "evil",
        ]);
        assert_eq!(out.status.code(), Some(1), "{kind:?} was imported");
        assert!(stderr(&out).contains("layer"), "{kind:?}: {}", stderr(&out));
    }
    let sentinel = warren_image::testing::sentinel_dir(&evil);
    let names: Vec<_> = std::fs::read_dir(&sentinel)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        names,
        ["victim"],
        "something was written next to the victim"
    );
    assert_eq!(
        std::fs::read_to_string(sentinel.join("victim")).unwrap(),
        "untouched\n"
    );
    assert!(!l.ok(&["image", "ls", "-o", "name"]).contains("evil"));
}

#[test]
fn two_hundred_cycles_leave_nothing_behind() {
    let l = linux_or_skip!();
    let state = l.server.state_dir();
    for i in 0..200 {
        let name = format!("cycle-{i}");
        let out = l.run(
            &name,
            &["--wait", "--rm", "--pids", "50", "-m", "64Mi"],
            &["true"],
        );
        assert_eq!(out.status.code(), Some(0), "cycle {i}: {}", stderr(&out));
    }
    assert_eq!(l.ok(&["ls", "-o", "name"]), "");
    assert!(
        l.leftover_cgroups().is_empty(),
        "{:?}",
        l.leftover_cgroups()
    );
    let bundles: Vec<_> = std::fs::read_dir(state.join("linux"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.ends_with(".warm"))
        .collect();
    assert!(bundles.is_empty(), "{bundles:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let state_text = state.display().to_string();
    assert!(
        !mounts.contains(&state_text),
        "mounts left under {state_text}"
    );
    // No process of ours is left: no supervisor names this state dir.
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline);
            assert!(
                !(cmdline.contains("supervise") && cmdline.contains(&state_text)),
                "left running: {cmdline}"
            );
        }
    }
}

#[test]
fn pull_from_a_local_registry_and_run() {
    if let Some(tool) = warren_image::testing::Registry::missing_tool() {
        eprintln!("SKIP: {tool} not installed (apt-get install docker-registry skopeo)");
        return;
    }
    let l = linux_or_skip!();
    let tmp = l.server.dir.path();
    let registry = warren_image::testing::Registry::start(&tmp.join("registry")).expect("registry");
    let layout = warren_image::testing::busybox_layout(&tmp.join("pushed"), "pushed").unwrap();
    registry
        .push(&layout, "tools/busybox:1.0", false)
        .expect("push");
    let reference = format!("127.0.0.1:{}/tools/busybox:1.0", registry.port);

    let out = l.warren(&["pull", &reference]);
    assert_eq!(out.status.code(), Some(1), "plain http needs --insecure");
    let out = l.warren(&["pull", "--insecure", &reference]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stderr(&out),
        registry.log()
    );
    assert!(stdout(&out).starts_with("pulled "), "{}", stdout(&out));
    assert!(l.ok(&["image", "ls", "-o", "name"]).contains(&reference));
    let out = l.warren(&[
        "run",
        "-b",
        "linux",
        "-i",
        &reference,
        "--name",
        "pulled",
        "--wait",
        "--",
        "echo",
        "pulled ok",
    ]);
    assert_eq!(stdout(&out), "pulled ok\n", "{}", stderr(&out));

    let missing = format!("127.0.0.1:{}/tools/busybox:nope", registry.port);
    let out = l.warren(&["pull", "--insecure", &missing]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));

    l.ok(&["image", "rm", &reference]);
    assert!(!l.ok(&["image", "ls", "-o", "name"]).contains(&reference));
}

/// `warren image rm` does not pull the layers from under a sandbox or a warm pool: removing
/// the image's last name (or its id) is refused, naming what uses it; dropping one of
/// several names is not. Once the sandbox is gone, the image is removed.
#[test]
fn an_image_in_use_is_not_removed() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start();
    let image_id = || {
        json(&l.ok(&["image", "ls", "-o", "json"]))[0]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let id = image_id();
    let layout = warren_image::testing::busybox_layout(l.server.dir.path(), "other").unwrap();
    l.ok(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--name",
        "bb:2",
    ]);
    assert_eq!(image_id(), id, "the same image under two names");
    let out = l.run("user", &[], &["sleep", "1000"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let out = l.warren(&["image", "rm", "bb:2"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "one of two names: {}",
        stderr(&out)
    );
    for target in ["busybox", id.as_str()] {
        let out = l.warren(&["image", "rm", target]);
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        assert!(
            stderr(&out).contains("is in use by sandbox user: remove it first"),
            "{}",
            stderr(&out)
        );
    }
    let out = l.warren(&["exec", "user", "--", "ls", "/bin/busybox"]);
    assert_eq!(
        stdout(&out),
        "/bin/busybox\n",
        "the root is intact: {}",
        stderr(&out)
    );

    l.ok(&["rm", "-f", "user"]);
    l.ok(&["image", "rm", "busybox"]);
    assert_eq!(l.ok(&["image", "ls", "-o", "json"]).trim(), "[]");

    // A warm pool of the image keeps it too.
    let warm = Linux::start_with(&["--warm", "linux:busybox=1"]);
    let out = warm.warren(&["image", "rm", "busybox"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("is in use by the linux warm pool of busybox: remove it first"),
        "{}",
        stderr(&out)
    );
}

/// The supervisor and workload pids of the warm shells now in the pool.
fn warm_pids(l: &Linux) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(dir) = std::fs::read_dir(l.server.state_dir().join("linux/.warm")) {
        for e in dir.flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path().join("state.json")) {
                let state = json(&text);
                pids.push(state["supervisorPid"].as_i64().unwrap() as i32);
                pids.push(state["pid"].as_i64().unwrap() as i32);
            }
        }
    }
    pids
}

/// Waits (20 s at most) until the busybox pool is full again (2 shells) with none of
/// `old` (its shells' pids, from [`warm_pids`]) in it, then until those have ended.
fn wait_replaced(l: &Linux, old: &[i32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = l.ok(&["info"]);
        let now = warm_pids(l);
        if info.contains("warm shells: busybox 2/2 ready")
            && now.len() == 4
            && !now.iter().any(|p| old.contains(p))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pool did not replace {what}: {info} {now:?} (old {old:?})\n{}",
            l.server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_gone(old, what);
}

/// `bench run -b linux` against a server with a warm pool counts and times the hand-outs.
#[test]
fn bench_times_warm_hand_outs_apart() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start_with(&["--warm", "linux:busybox=4"]);
    wait_warm(&l, 4);
    // Its warm-up run and the two create->exit runs take three shells: the first
    // create->running run finds the fourth, whatever the refill does meanwhile.
    let out = l.warren(&[
        "bench",
        "run",
        "-b",
        "linux",
        "-i",
        "busybox",
        "-n",
        "2",
        "--peer-runs",
        "0",
        "--json",
        "--",
        "/bin/true",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let got = json(text.lines().last().unwrap_or_default());
    let hits = got["running_warm_hits"]
        .as_u64()
        .expect("running_warm_hits");
    assert!((1..=2).contains(&hits), "{got}");
    let p50 = got["running"]["warm_hit_p50_us"]
        .as_u64()
        .expect("a hand-out time");
    assert!(p50 > 0, "{got}");
    // Then one hand-out per run from a full pool, each a warm shell.
    let ready = &got["ready_pool"];
    assert_eq!(ready["hand_outs"], 2, "{got}");
    assert_eq!(ready["cold"], 0, "{got}");
    assert!(ready["p50_us"].as_u64().is_some_and(|t| t > 0), "{got}");
    assert!(text.contains("warm ready p50"), "{text}");
}

/// A warm shell whose supervisor was killed (by hand, by the OOM killer) is never handed
/// out: a create still runs, `warren info` stops counting the dead shells, and the pool
/// replaces them and removes what they left (processes, cgroups, bundles).
#[test]
fn dead_warm_shells_are_replaced_not_handed_out() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start_with(&["--warm", "linux:busybox=2"]);
    wait_warm(&l, 2);
    let warm = l.server.state_dir().join("linux/.warm");
    let mut killed = Vec::new();
    let mut cgroups = Vec::new();
    let mut bundles = Vec::new();
    for e in std::fs::read_dir(&warm).unwrap().flatten() {
        let state = json(&std::fs::read_to_string(e.path().join("state.json")).unwrap());
        let supervisor = state["supervisorPid"].as_i64().unwrap() as i32;
        // Only the supervisor: its workload is left for the clean-up to find.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(supervisor),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        killed.push(supervisor);
        killed.push(state["pid"].as_i64().unwrap() as i32);
        cgroups.push(state["cgroup"].as_str().unwrap().to_string());
        bundles.push(e.path());
    }
    assert_eq!(cgroups.len(), 2, "two warm shells");

    let out = l.run("after", &["--wait"], &["echo", "still works"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "still works\n");
    assert!(
        !cgroups.contains(&cgroup_of(&l, "after")),
        "a killed shell was handed out"
    );

    wait_replaced(&l, &killed, "the killed shells");
    // Their clean-up runs in a task of its own: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = l
            .leftover_cgroups()
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(String::from))
            .collect();
        let kept: Vec<&String> = cgroups.iter().filter(|c| left.contains(c)).collect();
        let bundles_left: Vec<&PathBuf> = bundles.iter().filter(|b| b.exists()).collect();
        if kept.is_empty() && bundles_left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: {kept:?} {bundles_left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        l.server.log().contains("supervisor had ended"),
        "the server says why: {}",
        l.server.log()
    );

    // A shell that cannot be reached at its claim (its socket gone, its supervisor alive)
    // is dropped there, and the create starts cold.
    wait_warm(&l, 2);
    let mut cgroups = Vec::new();
    let mut pids = Vec::new();
    for e in std::fs::read_dir(&warm).unwrap().flatten() {
        let state = json(&std::fs::read_to_string(e.path().join("state.json")).unwrap());
        cgroups.push(state["cgroup"].as_str().unwrap().to_string());
        pids.push(state["supervisorPid"].as_i64().unwrap() as i32);
        pids.push(state["pid"].as_i64().unwrap() as i32);
        std::fs::remove_file(e.path().join("ctl.sock")).unwrap();
    }
    for name in ["unreachable-1", "unreachable-2"] {
        let out = l.run(name, &["--wait"], &["echo", "cold"]);
        assert_eq!(stdout(&out), "cold\n", "{}", stderr(&out));
        assert!(
            !cgroups.contains(&cgroup_of(&l, name)),
            "{name} ran in a shell"
        );
    }
    assert!(
        l.server.log().contains("gone at its claim; starting cold"),
        "{}",
        l.server.log()
    );
    wait_gone(&pids, "the unreachable shells' processes");
    let left = format!("{:?}", l.leftover_cgroups());
    for cgroup in &cgroups {
        assert!(
            !left.contains(cgroup.as_str()),
            "{cgroup} left behind: {left}"
        );
    }
}

/// A warm pool follows its image's name: imported again as another image, the name's
/// shells are replaced by shells of the new one (the old ones are ended, never handed out),
/// and a create from the pool runs the new image.
#[test]
fn a_warm_pool_follows_its_image_when_imported_again() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start_with(&["--warm", "linux:busybox=2"]);
    wait_warm(&l, 2);
    let old = warm_pids(&l);
    assert_eq!(old.len(), 4, "two shells: {old:?}");
    let release = warren_image::testing::Entry::file("etc/release", 0o644, b"2\n");
    let layout = warren_image::testing::busybox_layout_with(
        &l.server.dir.path().join("v2"),
        "busybox",
        vec![release],
    )
    .unwrap();
    l.ok(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--name",
        "busybox",
    ]);

    // The first create after the import finds no shell of the new image and starts cold.
    let out = l.run("first", &["--wait"], &["cat", "/etc/release"]);
    assert_eq!(stdout(&out), "2\n", "{}", stderr(&out));
    wait_replaced(&l, &old, "the old image's shells");
    // The old image has no name now: `image prune` removes it; `--all` keeps busybox, which
    // the pool and a sandbox use.
    let out = l.ok(&["image", "prune"]);
    assert!(
        out.ends_with("1 image(s) removed, 0 in use kept\n"),
        "{out}"
    );
    let out = l.ok(&["image", "prune", "--all"]);
    assert!(
        out.contains("(busybox:latest): ")
            && out.contains("in use by sandbox first, the linux warm pool of busybox")
            && out.ends_with("0 image(s) removed, 1 in use kept\n"),
        "{out}"
    );
    let images = json(&l.ok(&["image", "ls", "-o", "json"]));
    assert_eq!(images.as_array().map(Vec::len), Some(1), "{images}");
    let out = l.run("warm", &["--wait"], &["cat", "/etc/release"]);
    assert_eq!(stdout(&out), "2\n", "{}", stderr(&out));
    assert!(cgroup_of(&l, "warm").starts_with("warm-"), "from the pool");
}

/// A supervisor killed while its sandbox runs (by hand, by the OOM killer) leaves the
/// workload unwatched: the sandbox is Failed, says why, and its processes are killed.
#[test]
fn a_killed_supervisor_fails_its_sandbox_and_ends_the_workload() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start();
    let out = l.run("victim", &[], &["sleep", "1000"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let bundle = PathBuf::from(
        l.get("victim")["status"]["backendInfo"]["bundle"]
            .as_str()
            .expect("bundle"),
    );
    let state = json(&std::fs::read_to_string(bundle.join("state.json")).unwrap());
    let supervisor = state["supervisorPid"].as_i64().unwrap() as i32;
    let workload = state["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let got = l.wait_phase("victim", "Failed");
    let reason = got["status"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("supervisor ended without recording")
            && reason.contains("its processes were killed"),
        "{got}"
    );
    wait_gone(&[workload], "the workload of a killed supervisor");
    l.ok(&["rm", "victim"]);
    assert_eq!(l.leftover_cgroups(), Vec::<PathBuf>::new());
}

/// A claim whose sandbox cannot be recorded (its `container.json`, written by the shell's
/// supervisor while the workload starts, is in the way here) fails the create with the
/// reason, and the shell goes whole: its processes, its cgroup, its bundle.
#[test]
fn a_claim_that_cannot_record_its_sandbox_fails_it_and_leaves_nothing() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start_with(&["--warm", "linux:busybox=1"]);
    wait_warm(&l, 1);
    let shells: Vec<PathBuf> = std::fs::read_dir(l.server.state_dir().join("linux/.warm"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(shells.len(), 1, "{shells:?}");
    let pids = warm_pids(&l);
    let state = json(&std::fs::read_to_string(shells[0].join("state.json")).unwrap());
    let cgroup = state["cgroup"].as_str().unwrap().to_string();
    let record = shells[0].join("container.json");
    let _ = std::fs::remove_file(&record);
    std::fs::create_dir_all(record.join("in-the-way")).unwrap();

    let out = l.run("unrecorded", &["--wait"], &["echo", "ran"]);
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("write container.json"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "", "the workload ran");
    wait_gone(&pids, "the shell whose claim failed");
    let bundle = l.server.state_dir().join("linux/unrecorded");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<PathBuf> = cgroup_parents(&l.cgroup_parent)
            .into_iter()
            .map(|p| p.join(&cgroup))
            .filter(|p| p.exists())
            .chain(bundle.exists().then(|| bundle.clone()))
            .chain(shells[0].exists().then(|| shells[0].clone()))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The pool makes a new shell, which serves the next create.
    wait_warm(&l, 1);
    let out = l.run("recorded", &["--wait"], &["echo", "ran"]);
    assert_eq!(stdout(&out), "ran\n", "{}", stderr(&out));
    assert!(cgroup_of(&l, "recorded").starts_with("warm-"));
}

/// `logs -f` follows a sandbox through `warren restart` (a new run under a new uid, with a
/// log of its own), as `docker logs -f` follows a restarted container, and ends when it is
/// removed, even when another sandbox takes its name at once.
#[test]
fn a_follower_goes_on_into_the_next_run() {
    let l = linux_or_skip!();
    // Ends at SIGTERM (an init without a handler would wait out the grace period).
    let script = "trap 'exit 0' TERM; echo run; sleep 600 & wait";
    l.run_running("again", &[], &["sh", "-c", script]);
    let mut follower = l
        .server
        .command(&["logs", "-f", "again"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("logs -f");
    let lines = common::lines_of(follower.stdout.take().expect("stdout"));
    let first = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the first run's line");
    assert_eq!(first, "run");
    l.ok(&["restart", "again"]);
    let second = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("the second run's line, through the same follower");
    assert_eq!(second, "run");
    // Removed, and another sandbox made under its name at once: that is no next run.
    l.ok(&["rm", "-f", "again"]);
    l.run_running("again", &[], &["sh", "-c", "echo other; exec sleep 600"]);
    let out = follower.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        lines.recv_timeout(Duration::from_secs(1)).is_err(),
        "nothing more"
    );
}

/// `run --wait --rm` removes its sandbox even when it does not see the end: interrupted
/// (SIGTERM here, a ^C alike), or with its stdout closed (`| head -1`).
#[test]
fn run_rm_removes_the_sandbox_when_interrupted_or_cut_off() {
    use std::io::BufRead as _;
    let l = linux_or_skip!();
    let gone = |name: &str| !l.warren(&["get", name]).status.success();
    // The child, and the first line of its stdout read through a reader that is then
    // dropped: the pipe's read end closes, as `| head -1` closes it.
    let spawn = |name: &str, script: &str| {
        let mut child = l
            .server
            .command(&[
                "run", "-b", "linux", "-i", "busybox", "--name", name, "--wait", "--rm", "--",
                "sh", "-c", script,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run --wait --rm");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut first)
            .expect("the first line");
        (child, first)
    };

    let (child, first) = spawn(
        "interrupted",
        "trap 'exit 0' TERM; echo up; sleep 600 & wait",
    );
    assert_eq!(first, "up\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert!(stderr(&out).contains("removed"), "{}", stderr(&out));
    assert!(gone("interrupted"), "the interrupted sandbox is left");

    // Output goes on after the reader has gone.
    let (child, first) = spawn("cut", "for i in 1 2 3 4 5; do echo $i; sleep 0.2; done");
    assert_eq!(first, "1\n");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(gone("cut"), "the cut-off sandbox is left");
}

/// Output that does not end with a newline comes back without one: `run --wait` and
/// `logs` give the workload's bytes, not lines made whole.
#[test]
fn output_without_a_final_newline_is_kept_as_it_was() {
    let l = linux_or_skip!();
    let out = l.run(
        "bytes",
        &["--wait"],
        &["sh", "-c", "printf abc; printf err >&2"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "abc");
    assert_eq!(stderr(&out), "err");
    assert_eq!(l.ok(&["logs", "bytes"]), "abc");
}

/// `run --wait` of a sandbox stopped meanwhile is not a success a script would take for
/// one: 143, and it says why.
#[test]
fn run_wait_of_a_sandbox_stopped_meanwhile_exits_143() {
    let l = linux_or_skip!();
    let waiter = l
        .server
        .command(&[
            "run",
            "-b",
            "linux",
            "-i",
            "busybox",
            "--name",
            "halted",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo up; exec sleep 600",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run --wait");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !l.warren(&["get", "halted"]).status.success() {
        assert!(Instant::now() < deadline, "run --wait never created it");
        std::thread::sleep(Duration::from_millis(20));
    }
    l.wait_phase("halted", "Running");
    l.ok(&["stop", "-t", "0", "halted"]);
    let out = waiter.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert_eq!(stdout(&out), "up\n");
    assert!(
        stderr(&out).contains("sandbox/halted was stopped before its workload ended"),
        "{}",
        stderr(&out)
    );
}

/// `warren stop`, as `docker stop`: SIGTERM, SIGKILL after the grace period; the sandbox
/// stays, Stopped, with its logs, until `rm`.
#[test]
fn stop_ends_the_workload_and_keeps_the_sandbox() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start();
    let up = |name: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !l.ok(&["logs", name]).contains("up") {
            assert!(Instant::now() < deadline, "{name} never started");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let loop_with = |trap: &str| format!("trap {trap} TERM; echo up; while :; do sleep 0.1; done");
    // Ends on SIGTERM by itself: stopped at once.
    let polite = loop_with("'echo got-term; exit 0'");
    let out = l.run("polite", &[], &["sh", "-c", &polite]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    up("polite");
    let started = Instant::now();
    assert_eq!(l.ok(&["stop", "polite"]), "polite\n");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(l.get("polite")["status"]["phase"], "Stopped");
    assert!(l.ok(&["logs", "polite"]).contains("got-term"));
    // Ignores it: killed once the grace period is over.
    let stubborn = loop_with("''");
    let out = l.run("stubborn", &[], &["sh", "-c", &stubborn]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    up("stubborn");
    let cgroup = cgroup_of(&l, "stubborn");
    let started = Instant::now();
    l.ok(&["stop", "-t", "1", "stubborn"]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(8),
        "{took:?}"
    );
    assert_eq!(l.get("stubborn")["status"]["phase"], "Stopped");
    for parent in cgroup_parents(&l.cgroup_parent) {
        let procs = std::fs::read_to_string(parent.join(&cgroup).join("cgroup.procs"));
        assert!(procs.unwrap_or_default().trim().is_empty(), "still runs");
    }
    // Not running: left as it is. Missing: an error naming it.
    assert_eq!(l.ok(&["stop", "polite"]), "polite\n");
    assert_eq!(l.get("polite")["status"]["phase"], "Stopped");
    let out = l.warren(&["stop", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
    l.ok(&["rm", "polite", "stubborn"]);
    assert_eq!(l.leftover_cgroups(), Vec::<PathBuf>::new());
}

/// `warren wait NAME...`, as `docker wait`: blocks until each sandbox finishes and prints
/// its exit code, one line per name in order; a missing name or `--timeout` is an error
/// naming the sandbox, the others still printed.
#[test]
fn wait_prints_each_sandboxs_exit_code_in_order() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start();
    for (name, script) in [
        ("seven", "sleep 1; exit 7"),
        ("zero", "exit 0"),
        ("forever", "sleep 600"),
    ] {
        let out = l.run(name, &[], &["sh", "-c", script]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    // `seven` sleeps 1 s first: the wait most likely blocks for it (`forever` below surely).
    let out = l.warren(&["wait", "seven", "zero"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "7\n0\n");
    assert_eq!(l.get("seven")["status"]["phase"], "Exited");
    // Still running after the timeout; a missing name: both errors, the finished one printed.
    let out = l.warren(&["wait", "--timeout", "300ms", "forever", "nope", "zero"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out), "0\n");
    let err = stderr(&out);
    assert!(err.contains("forever") && err.contains("300ms"), "{err}");
    assert!(err.contains("nope"), "{err}");
    assert_eq!(l.get("forever")["status"]["phase"], "Running");
    // A wait under way returns once the sandbox is killed.
    std::thread::scope(|scope| {
        let waiting = scope.spawn(|| l.warren(&["wait", "forever"]));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !waiting.is_finished(),
            "the wait returned while forever ran"
        );
        l.ok(&["kill", "forever"]);
        let out = waiting.join().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), "137\n");
    });
    let out = l.warren(&["wait", "--timeout", "60d", "zero"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--timeout: \"60d\""),
        "{}",
        stderr(&out)
    );
    let out = l.warren(&["wait", "--timeout", "soon", "zero"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--timeout: \"soon\""),
        "{}",
        stderr(&out)
    );
    l.ok(&["rm", "seven", "zero", "forever"]);
    assert_eq!(l.leftover_cgroups(), Vec::<PathBuf>::new());
}

/// `warren pause` / `unpause`, as docker's: the workload is frozen (no output, no CPU)
/// and runs on after; exec is refused while paused; the pause survives a restart of the
/// server; stop and kill resume a paused workload so that their signal lands.
#[test]
fn pause_freezes_the_workload_until_unpause() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let mut l = Linux::start();
    let ticker = "trap 'echo got-term; exit 0' TERM; while :; do echo tick; sleep 0.05; done";
    for name in ["p1", "p2"] {
        let out = l.run(name, &[], &["sh", "-c", ticker]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    fn ticks(l: &Linux, name: &str) -> usize {
        l.ok(&["logs", name]).matches("tick").count()
    }
    fn grows(l: &Linux, name: &str) {
        let before = ticks(l, name);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ticks(l, name) <= before {
            assert!(Instant::now() < deadline, "{name} does not run");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Frozen: once a line in flight at the freeze is logged, nothing more comes.
    fn still(l: &Linux, name: &str) {
        std::thread::sleep(Duration::from_millis(300));
        let before = ticks(l, name);
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(ticks(l, name), before, "{name} ran while paused");
    }
    grows(&l, "p1");
    assert_eq!(l.ok(&["pause", "p1"]), "p1\n");
    let got = l.get("p1");
    assert_eq!(got["status"]["phase"], "Running");
    assert_eq!(got["status"]["paused"], true);
    assert!(l.ok(&["ls"]).contains("Running (Paused)"));
    still(&l, "p1");
    // Pausing again changes nothing; exec is refused, naming the sandbox.
    assert_eq!(l.ok(&["pause", "p1"]), "p1\n");
    let out = l.warren(&["exec", "p1", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("\"p1\" is paused"),
        "{}",
        stderr(&out)
    );
    // Still paused after the server is killed and restarted.
    l.server.kill9();
    l.server.spawn();
    assert_eq!(l.get("p1")["status"]["paused"], true);
    still(&l, "p1");
    assert_eq!(l.ok(&["unpause", "p1"]), "p1\n");
    assert_eq!(l.get("p1")["status"].get("paused"), None);
    grows(&l, "p1");
    assert_eq!(l.ok(&["exec", "p1", "--", "echo", "in"]), "in\n");
    // At a restart the workload, not the record, says whether it is paused: a freeze the
    // record missed (a server killed between the two) is found, and so is a thaw.
    l.ok(&["pause", "p2"]);
    let (freezer1, freezer2) = (freezer_of(&l, "p1"), freezer_of(&l, "p2"));
    l.server.kill9();
    freezer1.set(true);
    freezer2.set(false);
    l.server.spawn();
    assert_eq!(l.get("p1")["status"]["paused"], true);
    assert_eq!(l.get("p2")["status"].get("paused"), None);
    still(&l, "p1");
    grows(&l, "p2");
    assert_eq!(l.ok(&["unpause", "p1"]), "p1\n");
    grows(&l, "p1");
    // stop resumes it first: the trap answers SIGTERM at once.
    l.ok(&["pause", "p1"]);
    let started = Instant::now();
    l.ok(&["stop", "p1"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(l.get("p1")["status"]["phase"], "Stopped");
    assert!(l.ok(&["logs", "p1"]).contains("got-term"));
    // Not running: refused, naming it. A SIGKILL reaches a paused workload.
    let out = l.warren(&["pause", "p1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("\"p1\" is Stopped"),
        "{}",
        stderr(&out)
    );
    l.ok(&["pause", "p2"]);
    l.ok(&["kill", "p2"]);
    assert_eq!(l.ok(&["wait", "--timeout", "10s", "p2"]), "137\n");
    l.ok(&["rm", "p1", "p2"]);
    assert_eq!(l.leftover_cgroups(), Vec::<PathBuf>::new());
}

/// `warren restart`, as `docker restart`: a running workload is stopped and started again,
/// an ended one started again, a paused one too (unpaused); each under a new uid.
#[test]
fn restart_runs_the_workload_again_under_a_new_uid() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start();
    let uid = |name: &str| l.get(name)["metadata"]["uid"].as_str().unwrap().to_string();
    let out = l.run("once", &["--wait"], &["sh", "-c", "echo ran; exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = l.run(
        "long",
        &["--stop-timeout", "1"],
        &["sh", "-c", "echo up; exec sleep 600"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (once, long) = (uid("once"), uid("long"));
    let long_pid = l.get("long")["status"]["backendInfo"]["pid"]
        .as_str()
        .unwrap()
        .parse::<i32>()
        .unwrap();
    l.ok(&["pause", "long"]);
    assert_eq!(l.ok(&["restart", "once", "long"]), "once\nlong\n");
    assert_ne!(uid("once"), once);
    assert_ne!(uid("long"), long);
    // The ended one ran again, logging anew; the running one is a new process, not paused.
    assert_eq!(l.ok(&["wait", "--timeout", "20s", "once"]), "3\n");
    assert_eq!(l.ok(&["logs", "once"]), "ran\n");
    let got = l.get("long");
    assert_eq!(got["status"]["phase"], "Running", "{got}");
    assert_eq!(got["status"].get("paused"), None, "{got}");
    assert!(
        !std::path::Path::new(&format!("/proc/{long_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{long_pid}/cmdline"))
                .unwrap_or_default()
                .is_empty(),
        "the old workload still runs"
    );
    let out = l.warren(&["restart", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
    l.ok(&["rm", "-f", "once", "long"]);
    assert_eq!(l.leftover_cgroups(), Vec::<PathBuf>::new());
}

#[test]
fn warm_pool_serves_creates_with_their_own_settings() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let mut l = Linux::start_with(&["--warm", "linux:busybox=2"]);
    wait_warm(&l, 2);
    let out = l.run(
        "w1",
        &[
            "--wait",
            "-e",
            "A=1",
            "--hostname",
            "first",
            "-u",
            "1000:1000",
            "-w",
            "/tmp",
            "--pids",
            "20",
        ],
        &["sh", "-c", "echo $A $(hostname) $(id -u) $(pwd)"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("1 first 1000 /tmp\n"),
        "{}",
        stdout(&out)
    );
    assert!(
        cgroup_of(&l, "w1").starts_with("warm-"),
        "w1 came from the pool"
    );
    // A warm shell drops the bounding set before its claim; the rest at the claim.
    wait_warm(&l, 2);
    let out = l.run("w-caps", &["--wait"], &CAPS_OF_THE_WORKLOAD);
    assert_default_caps(&stdout(&out));
    assert!(cgroup_of(&l, "w-caps").starts_with("warm-"));
    let out = l.run(
        "w2",
        &["--wait", "-m", "50M"],
        &["sh", "-c", "head -c 200m /dev/zero | tail"],
    );
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(
        l.get("w2")["status"]["reason"],
        "OOMKilled",
        "limits set at claim time hold"
    );
    assert!(cgroup_of(&l, "w2").starts_with("warm-"));

    // The pool refills; a bad command from a warm shell fails like a cold one.
    wait_warm(&l, 2);
    let out = l.run("w3", &[], &["/no/such/program"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("No such file or directory"),
        "{}",
        stderr(&out)
    );
    // Bind mounts need a cold start.
    wait_warm(&l, 2);
    let shared = l.server.dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let map = format!("/data::{}", shared.display());
    let out = l.run("cold", &["--wait", "--mapdir", &map], &["touch", "/data/x"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        !cgroup_of(&l, "cold").starts_with("warm-"),
        "a sandbox with mounts starts cold"
    );
    assert!(shared.join("x").exists());
    // So does input: the workload reads it, then end of file.
    let out = l.server.warren_stdin(
        &[
            "run",
            "-b",
            "linux",
            "-i",
            "busybox",
            "--name",
            "input",
            "--stdin",
            "-",
            "--wait",
            "--",
            "sh",
            "-c",
            "cat; echo end",
        ],
        Some("piped in\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "piped in\nend\n");
    assert!(
        !cgroup_of(&l, "input").starts_with("warm-"),
        "a sandbox with input starts cold"
    );
    // And a storage limit: the writable layer is a file system made for the sandbox.
    let out = l.run("sized", &["--wait", "--storage", "16Mi"], &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        !cgroup_of(&l, "sized").starts_with("warm-"),
        "a sandbox with a storage limit starts cold"
    );
    l.ok(&["rm", "w1", "w-caps", "w2", "cold", "input", "sized"]);

    // Killed, the server leaves its shells; the next one removes them and makes its own.
    wait_warm(&l, 2);
    let old = warm_pids(&l);
    assert_eq!(old.len(), 4);
    l.server.kill9();
    l.server.spawn();
    wait_gone(&old, "the previous server's warm shells");
    wait_warm(&l, 2);
    // A graceful stop ends the pool with the server.
    let new = warm_pids(&l);
    assert!(l.server.terminate().success());
    wait_gone(&new, "warm shells after the server stopped");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !l.leftover_cgroups().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", l.leftover_cgroups());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn update_resizes_a_running_sandbox() {
    let l = linux_or_skip!();
    l.run_running(
        "resize",
        &["-m", "64Mi", "--pids", "30"],
        &["sleep", "1000"],
    );
    let cgroup = cgroup_of(&l, "resize");
    let file = |controller: &str, name: &str| {
        use warren_linux::cgroup::CgroupLayout;
        let path = match CgroupLayout::detect().unwrap() {
            CgroupLayout::V1 { mounts } => mounts[controller]
                .join(&l.cgroup_parent)
                .join(&cgroup)
                .join(name),
            CgroupLayout::V2 { root } => root.join(&l.cgroup_parent).join(&cgroup).join(name),
        };
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let (memory, pids) = match warren_linux::cgroup::CgroupLayout::detect()
        .unwrap()
        .version()
    {
        1 => ("memory.limit_in_bytes", "pids.max"),
        _ => ("memory.max", "pids.max"),
    };
    assert_eq!(file("memory", memory).trim(), (64u64 << 20).to_string());
    l.ok(&["update", "resize", "--memory", "128Mi", "--pids", "40"]);
    assert_eq!(file("memory", memory).trim(), (128u64 << 20).to_string());
    assert_eq!(file("pids", pids).trim(), "40");
    assert_eq!(
        l.get("resize")["status"]["resources"]["memory_limit"],
        128u64 << 20,
        "the record says so too"
    );
    l.ok(&["rm", "resize"]);
}

#[test]
fn kill_signals_the_workload() {
    let l = linux_or_skip!();
    // A workload with a handler sees the signal and decides: here, exit 7 on SIGUSR1.
    l.run_running(
        "trapper",
        &[],
        &[
            "sh",
            "-c",
            "trap 'exit 7' USR1; while :; do sleep 0.05; done",
        ],
    );
    // The shell installs its trap a moment after it starts; resend until it answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while l.get("trapper")["status"]["phase"] == "Running" {
        let out = l.warren(&["kill", "--signal", "USR1", "trapper"]);
        // Refused only because it ended meanwhile.
        assert!(
            out.status.success() || stderr(&out).contains("not Running"),
            "{}",
            stderr(&out)
        );
        assert!(Instant::now() < deadline, "USR1 never ended it");
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = l.wait_phase("trapper", "Exited");
    assert_eq!(got["status"]["exitCode"], 7, "{got}");

    // SIGKILL (the default) ends even an init that handles nothing: 128 + 9.
    l.run_running("victim", &[], &["sleep", "1000"]);
    l.ok(&["kill", "victim"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let got = l.get("victim");
        if got["status"]["phase"] != "Running" {
            break got;
        }
        assert!(Instant::now() < deadline, "SIGKILL did not end it: {got}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(got["status"]["exitCode"], 137, "{got}");

    // Bad input names the flag; a sandbox that is not running is refused.
    let out = l.warren(&["kill", "--signal", "NOPE", "victim"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--signal"), "{}", stderr(&out));
    let out = l.warren(&["kill", "victim"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not Running"), "{}", stderr(&out));
    let out = l.warren(&["kill", "nosuch"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    l.ok(&["rm", "trapper", "victim"]);
}

/// An image of 80 layers (docker allows 127): the one-string overlay mount options are one
/// page, which ~40 layer paths fill, so they are given one by one where the kernel can.
#[test]
fn an_image_of_many_layers_runs() {
    use warren_image::testing::Layer;
    let l = linux_or_skip!();
    if !kernel_at_least(6, 8) {
        eprintln!("SKIP an_image_of_many_layers_runs: Linux before 6.8 has no overlay lowerdir+");
        return;
    }
    let layers: Vec<Layer> = (0..80)
        .map(|i| {
            Layer::gzip(vec![
                Entry::dir("layers", 0o755),
                Entry::file(
                    &format!("layers/{i:02}"),
                    0o644,
                    format!("{i}\n").as_bytes(),
                ),
                Entry::file("layers/top", 0o644, format!("{i}\n").as_bytes()),
            ])
        })
        .collect();
    let layout = warren_image::testing::busybox_layout_stacked(
        &l.server.dir.path().join("tall"),
        "tall",
        Vec::new(),
        layers,
    )
    .unwrap();
    l.ok(&["image", "import", layout.to_str().unwrap()]);
    let out = l.warren(&[
        "run",
        "-b",
        "linux",
        "-i",
        "tall",
        "--name",
        "tall",
        "--wait",
        "--",
        "sh",
        "-c",
        "ls /layers | wc -l; cat /layers/00 /layers/79 /layers/top",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // 80 files and `top`, each layer's own; `top` from the uppermost.
    let text = stdout(&out);
    let words: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(words, ["81", "0", "79", "79"], "{text}");
    l.ok(&["rm", "tall"]);
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

#[test]
fn a_root_directory_runs_in_place() {
    let l = linux_or_skip!();
    // A prepared root: the busybox image's layer, unpacked by hand into a directory.
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.path().join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "cat"] {
        std::os::unix::fs::symlink("busybox", root.path().join("bin").join(applet)).unwrap();
    }
    for d in ["proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.path().join(d)).unwrap();
    }
    let dir = root.path().to_str().unwrap();
    let out = l.warren(&[
        "run",
        "-b",
        "linux",
        "-i",
        dir,
        "--name",
        "inplace",
        "--wait",
        "--",
        "/bin/sh",
        "-c",
        "echo written >/tmp/mark; cat /tmp/mark",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "written\n");
    // Written in place, as runc writes a bundle's rootfs.
    assert_eq!(
        std::fs::read_to_string(root.path().join("tmp/mark")).unwrap(),
        "written\n"
    );
    l.ok(&["rm", "inplace"]);
    // Sandboxes sharing the root start side by side: each parks the host's root under a
    // name of its own there while it pivots.
    let outs: Vec<_> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..8)
            .map(|i| {
                let l = &l;
                s.spawn(move || {
                    let name = format!("shared{i}");
                    let out = l.warren(&[
                        "run",
                        "-b",
                        "linux",
                        "-i",
                        dir,
                        "--name",
                        &name,
                        "--wait",
                        "--rm",
                        "--",
                        "/bin/echo",
                        "up",
                    ]);
                    (name, out)
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (name, out) in outs {
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        assert_eq!(stdout(&out), "up\n", "{name}");
    }
    let left: Vec<_> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".warren-old-root"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A root on a read-only file system runs when it has a `.warren-old-root` of its own
    // (nothing can be made in it).
    std::fs::create_dir(root.path().join(".warren-old-root")).unwrap();
    let read_only = tempfile::tempdir().unwrap();
    struct Unbind(PathBuf);
    impl Drop for Unbind {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let ro = read_only.path().to_str().unwrap();
    let _unbind = Unbind(read_only.path().to_path_buf());
    for args in [&["--bind", dir, ro][..], &["-o", "remount,bind,ro", ro][..]] {
        let ok = std::process::Command::new("mount")
            .args(args)
            .status()
            .unwrap();
        assert!(ok.success(), "mount {args:?}");
    }
    let out = l.warren(&[
        "run",
        "-b",
        "linux",
        "-i",
        ro,
        "--name",
        "ro-root",
        "--wait",
        "--rm",
        "--",
        "/bin/echo",
        "read-only",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "read-only\n");
    // What is not a directory is refused, naming the field.
    let out = l.warren(&["run", "-b", "linux", "-i", "/etc/hostname", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("spec.image") && stderr(&out).contains("not a directory"),
        "{}",
        stderr(&out)
    );
    let out = l.warren(&["run", "-b", "linux", "-i", "/no/such/root", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("/no/such/root"), "{}", stderr(&out));
    // The host's own root, however spelt or wherever bind-mounted, is never a sandbox's.
    // The bind mount is read-only and outside every temp dir, and its guard only unmounts
    // and `rmdir`s: nothing recursive may ever walk into the host's root.
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let elsewhere =
        std::env::temp_dir().join(format!("warren-hostroot-bind-{}", std::process::id()));
    std::fs::create_dir(&elsewhere).unwrap();
    let _unmount = Unmount(elsewhere.clone());
    for args in [&["--bind", "/"][..], &["-o", "remount,bind,ro"][..]] {
        let done = std::process::Command::new("mount")
            .args(args)
            .arg(&elsewhere)
            .status()
            .unwrap();
        assert!(done.success(), "mount {args:?} {}", elsewhere.display());
    }
    for host_root in ["/", "//", "/./", elsewhere.to_str().unwrap()] {
        let out = l.warren(&["run", "-b", "linux", "-i", host_root, "--", "true"]);
        assert_ne!(out.status.code(), Some(0), "{host_root}");
        assert!(
            stderr(&out).contains("is the host's root directory"),
            "{host_root}: {}",
            stderr(&out)
        );
    }
    // Under a policy, a root directory is a host path and must lie under its hostPaths.
    let policy = root.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: warren.dev/v1\nkind: Policy\nmetadata:\n  name: hp\nspec:\n  \
         filesystem:\n    hostPaths: [/srv/sandboxes]\n",
    )
    .unwrap();
    l.ok(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    let out = l.warren(&[
        "run", "-b", "linux", "-i", dir, "--policy", "hp", "--", "true",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains(&format!(
            "spec.image: \"{dir}\" violates filesystem.hostPaths"
        )),
        "{}",
        stderr(&out)
    );
    l.ok(&["policy", "rm", "hp"]);
    // A host path is checked where it leads on the node: a symlink under an allowed
    // directory (one a sandbox could make in a writable mount) reaches nothing outside it.
    let shared = tempfile::tempdir().unwrap();
    let allowed = std::fs::canonicalize(shared.path())
        .unwrap()
        .join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    std::os::unix::fs::symlink(root.path(), allowed.join("link")).unwrap();
    let link = allowed.join("link");
    let link = link.to_str().unwrap();
    std::fs::write(
        &policy,
        format!(
            "apiVersion: warren.dev/v1\nkind: Policy\nmetadata:\n  name: hp2\nspec:\n  \
             filesystem:\n    hostPaths: [{}]\n    writable: [/]\n",
            allowed.display()
        ),
    )
    .unwrap();
    l.ok(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    let target = std::fs::canonicalize(root.path()).unwrap();
    let resolves = format!(
        "{link:?} resolves to {:?}, outside the policy's filesystem.hostPaths",
        target.display().to_string()
    );
    let out = l.warren(&[
        "run", "-b", "linux", "-i", link, "--policy", "hp2", "--", "true",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains(&format!("spec.image: {resolves}")),
        "{}",
        stderr(&out)
    );
    let map = format!("/mnt::{link}");
    let out = l.run("linked", &["--policy", "hp2", "--mapdir", &map], &["true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains(&format!("spec.mounts[0].host: {resolves}")),
        "{}",
        stderr(&out)
    );
    l.ok(&["policy", "rm", "hp2"]);
}

/// `--storage` bounds what a sandbox can write: its writable layer is a file system of that
/// size (loop-mounted in the sandbox's mount namespace only), so filling it fails with
/// ENOSPC inside instead of filling the host's disk. Nothing stays mounted or attached.
#[test]
fn a_storage_limit_bounds_the_writable_layer() {
    let l = linux_or_skip!();
    let fill = "dd if=/dev/zero of=/fill bs=1M count=64 2>&1; echo rc=$?; \
                dd if=/dev/zero of=/tmp/more bs=1M count=1 2>&1 | tail -1";
    let out = l.run(
        "small",
        &["--storage", "16Mi", "--wait"],
        &["sh", "-c", fill],
    );
    let text = stdout(&out);
    assert!(
        text.contains("No space left on device"),
        "{text}{}",
        stderr(&out)
    );
    assert!(text.contains("rc=1"), "{text}");
    let out = l.run(
        "fits",
        &["--storage", "16Mi", "--wait"],
        &[
            "sh",
            "-c",
            "dd if=/dev/zero of=/f bs=1M count=4 2>/dev/null && wc -c < /f",
        ],
    );
    assert_eq!(stdout(&out), "4194304\n", "{}", stderr(&out));
    // Without a limit the same write goes through.
    let out = l.run("free", &["--wait"], &["sh", "-c", fill]);
    assert!(stdout(&out).contains("rc=0"), "{}", stdout(&out));

    let out = l.run("tiny", &["--storage", "1Mi"], &["true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("spec.resources.limits.storage: 1048576 bytes is below the 8Mi"),
        "{}",
        stderr(&out)
    );
    let out = l.run("running", &["--storage", "16Mi"], &["sleep", "100"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = l.warren(&["update", "running", "--storage", "32Mi"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("spec.resources.limits.storage: sandbox"),
        "{}",
        stderr(&out)
    );
    let out = l.warren(&["checkpoint", "running"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("storage limit"), "{}", stderr(&out));

    let state = l.server.state_dir();
    l.ok(&["rm", "-f", "small", "fits", "free", "running"]);
    // The loop devices are released with the sandboxes' mount namespaces.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attached: Vec<String> = std::fs::read_dir("/sys/block")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
            .filter(|f| f.starts_with(state.to_str().unwrap()))
            .collect();
        if attached.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still attached: {attached:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(state.to_str().unwrap()),
        "mounted on the host: {mounts}"
    );
}

/// An HTTP GET of `/` on the node's `port`: the response, or empty when nothing answered.
fn http_get(port: u16) -> String {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut got = String::new();
    let _ = conn.read_to_string(&mut got);
    got
}

/// `-p HOST:CONTAINER` publishes the sandbox's port on the node, as `docker run -p` does:
/// busybox's httpd in the sandbox answers on the host's port, through a warm shell or a
/// cold start, again after the server is killed and restarted, and the port is free once
/// the workload ends. A port another process holds fails the create, naming it.
#[test]
fn published_ports_reach_the_sandbox_until_its_end() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let mut l = Linux::start_with(&["--warm", "linux:busybox=1"]);
    wait_warm(&l, 1);
    let free_port = || {
        std::net::TcpListener::bind(("0.0.0.0", 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let serve = "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && \
                 exec httpd -f -p 8080 -h /www";
    let answers = |port: u16, name: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = http_get(port);
            if got.contains(&format!("hello-from-{name}")) {
                return;
            }
            assert!(Instant::now() < deadline, "{name} on {port}: {got:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Without an address: every IPv4 and IPv6 address, as docker.
    let ipv6 = std::net::TcpListener::bind(("::1", 0)).is_ok();
    let everywhere = |port: u16| {
        if ipv6 {
            format!("0.0.0.0:{port}->8080/tcp, [::]:{port}->8080/tcp")
        } else {
            format!("0.0.0.0:{port}->8080/tcp")
        }
    };
    let (warm, cold) = (free_port(), free_port());
    let host_dir = tempfile::tempdir().unwrap();
    let mapdir = format!("/mnt::{}", host_dir.path().display());
    for (name, published, shown, extra) in [
        ("web-warm", format!("{warm}:8080"), everywhere(warm), vec![]),
        (
            "web-cold",
            format!("127.0.0.1:{cold}:8080"),
            format!("127.0.0.1:{cold}->8080/tcp"),
            vec!["--mapdir", &mapdir],
        ),
    ] {
        let port = if name == "web-warm" { warm } else { cold };
        let mut flags = vec!["-p", &published];
        flags.extend(extra);
        let got = l.run_running(name, &flags, &["sh", "-c", serve]);
        assert_eq!(got["status"]["backendInfo"]["ports"], shown, "{got}");
        assert_eq!(cgroup_of(&l, name).starts_with("warm-"), name == "web-warm");
        answers(port, name);
    }

    // Held by another process: the create fails and says which port.
    let taken = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = l.run("clash", &["-p", &format!("{port}:80")], &["true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains(&format!(
            "spec.ports[0].hostPort: {port}/tcp cannot be published on this node"
        )),
        "{}",
        stderr(&out)
    );

    // The server held the ports: killed, they close; restarted, it publishes them again.
    l.server.kill9();
    assert!(http_get(warm).is_empty(), "answered with no server");
    l.server.spawn();
    answers(warm, "web-warm");
    assert_eq!(
        l.get("web-warm")["status"]["backendInfo"]["ports"],
        everywhere(warm)
    );
    // The cold one's, on 127.0.0.1 alone: another local address finds nothing.
    answers(cold, "web-cold");
    assert!(std::net::TcpStream::connect(("127.0.0.2", cold)).is_err());

    // The workload's end frees the port, before the sandbox is removed.
    l.ok(&["kill", "web-warm"]);
    l.wait_phase("web-warm", "Exited");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpListener::bind(("0.0.0.0", warm)).is_err() {
        assert!(Instant::now() < deadline, "port {warm} still bound");
        std::thread::sleep(Duration::from_millis(20));
    }
    l.ok(&["rm", "web-warm", "web-cold"]);
    assert!(std::net::TcpListener::bind(("0.0.0.0", cold)).is_ok());
}

/// `warren cp` copies into and out of a running sandbox as `docker cp` does (into an
/// existing directory under the source's name, else as the destination; modes, times and
/// symlinks kept; root-owned inside), and what a sandbox sends back stays in the
/// destination: `..`, absolute paths, links leading out, devices and set-id bits are not
/// written.
#[test]
fn cp_copies_both_ways_and_a_sandboxs_archive_stays_in_its_destination() {
    let l = linux_or_skip!();
    l.run_running("box", &[], &["sleep", "600"]);
    let here = tempfile::tempdir().unwrap();
    let src = here.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(src.join("sub/b.txt"), "beta\n").unwrap();
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(
        src.join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("a.txt", src.join("link")).unwrap();
    // Larger than any one message: it crosses in many.
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("big.bin"), &big).unwrap();
    let cp = |from: &str, to: &str| l.warren(&["cp", from, to]);
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // In: as a new path, then into an existing directory under its own name.
    let out = cp(&s(&src), "box:/tmp/copied");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cp(&s(&src.join("a.txt")), "box:/tmp");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let inside = l.ok(&[
        "exec",
        "box",
        "--",
        "sh",
        "-c",
        "cat /tmp/copied/a.txt /tmp/copied/sub/b.txt /tmp/a.txt; readlink /tmp/copied/link; \
         /tmp/copied/run.sh; stat -c '%u:%g' /tmp/copied/sub/b.txt",
    ]);
    assert_eq!(inside, "alpha\nbeta\nalpha\na.txt\nran\n0:0\n");

    // Out: as a new path, then into an existing directory.
    let back = here.path().join("back");
    let out = cp("box:/tmp/copied", &s(&back));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(back.join("sub/b.txt")).unwrap(),
        "beta\n"
    );
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        Path::new("a.txt")
    );
    assert!(
        std::fs::read(back.join("big.bin")).unwrap() == big,
        "big.bin differs"
    );
    let mode = std::fs::metadata(back.join("run.sh"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777,
        0o755
    );
    let out = cp("box:/tmp/a.txt", &s(here.path()));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(here.path().join("a.txt")).unwrap(),
        "alpha\n"
    );

    // Mistakes are named.
    let out = cp("box:/no/such", &s(&here.path().join("x")));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("cp: packing box:/no/such failed"),
        "{}",
        stderr(&out)
    );
    let out = cp(&s(&here.path().join("missing")), "box:/tmp");
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("missing"), "{}", stderr(&out));

    // A hostile sandbox: its `tar` answers with a crafted archive.
    let outside = tempfile::tempdir().unwrap();
    let escape = format!("{}/escaped", outside.path().display());
    let evil = layer_tar(&[
        Entry::file("x/ok.txt", 0o4755, b"ok\n"),
        Entry::file("x/../../escaped.txt", 0o4755, b"no\n"),
        Entry::file(&escape, 0o4755, b"no\n"),
        Entry::file("elsewhere.txt", 0o4755, b"no\n"),
        Entry::symlink("x/out", outside.path().to_str().unwrap()),
        Entry::file("x/out/pwned.txt", 0o4755, b"no\n"),
        Entry::CharDevice {
            path: "x/null".into(),
            major: 1,
            minor: 3,
        },
    ])
    .unwrap();
    l.hostile_tar("box", &evil);
    let landed = here.path().join("deep/er");
    std::fs::create_dir_all(&landed).unwrap();
    let got = landed.join("got");
    let out = cp("box:/tmp/x", &s(&got));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(got.join("ok.txt")).unwrap(), "ok\n");
    let mode = std::fs::metadata(got.join("ok.txt")).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7000,
        0,
        "set-id bits kept"
    );
    assert!(!got.join("null").exists(), "a device node was made");
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "written outside the destination"
    );
    for stray in [
        here.path().join("deep/escaped.txt"),
        landed.join("escaped.txt"),
        landed.join("elsewhere.txt"),
    ] {
        assert!(!stray.exists(), "{} written", stray.display());
    }
    let said = stderr(&out);
    eprintln!("{said}");
    for skipped in [
        "x/../../escaped.txt (a path out of the destination)",
        "elsewhere.txt (not under the path asked for)",
        "x/null (not a file, directory or link)",
        "x/out/pwned.txt (",
    ] {
        assert!(said.contains(&format!("cp: skipped {skipped}")), "{said}");
    }
    l.ok(&["rm", "box"]);
}

/// What `warren cp` brings out of a sandbox is the copy's own: a hard link in the archive
/// joins a file the copy made (as a sandbox's own `tar` sends them), never a file the
/// destination directory already held (`warren cp ev:/x ~` with `x/key` linked to
/// `.ssh/id_rsa` would make the copy the user's key), and nothing is written or linked
/// through a symlink the sandbox sent (`x/up` → `..`, then `x/up/secret`).
#[test]
fn cp_out_links_only_to_what_the_copy_made() {
    use std::os::unix::fs::MetadataExt as _;
    let l = linux_or_skip!();
    l.run_running("hl", &[], &["sleep", "600"]);
    let cp = |from: &str, to: &str| l.warren(&["cp", from, to]);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let here = tempfile::tempdir().unwrap();
    let dest = here.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let secret = dest.join("secret");
    std::fs::write(&secret, "private\n").unwrap();

    // The sandbox's own tar: a hard link inside the copy stays one.
    l.ok(&[
        "exec",
        "hl",
        "--",
        "sh",
        "-c",
        "mkdir -p /tmp/y/sub && echo data > /tmp/y/sub/f && ln /tmp/y/sub/f /tmp/y/g",
    ]);
    let out = cp("hl:/tmp/y", &s(&dest));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("skipped"), "{}", stderr(&out));
    let f = std::fs::metadata(dest.join("y/sub/f")).unwrap();
    let g = std::fs::metadata(dest.join("y/g")).unwrap();
    assert_eq!((f.dev(), f.ino()), (g.dev(), g.ino()), "not one file");
    assert_eq!(std::fs::read_to_string(dest.join("y/g")).unwrap(), "data\n");

    // A hostile sandbox's archive.
    let evil = layer_tar(&[
        Entry::file("x/data", 0o4755, b"data\n"),
        Entry::hardlink("x/hl_inside", "x/data"),
        Entry::hardlink("x/hl_sibling", "secret"),
        Entry::symlink("x/up", ".."),
        Entry::file("x/up/secret", 0o4755, b"pwned\n"),
        Entry::hardlink("x/hl_via", "x/up/secret"),
    ])
    .unwrap();
    l.hostile_tar("hl", &evil);
    let out = cp("hl:/x", &s(&dest));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let said = stderr(&out);
    eprintln!("{said}");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "private\n");
    let s_meta = std::fs::metadata(&secret).unwrap();
    assert_eq!(s_meta.nlink(), 1, "the user's file was hard-linked");
    let sibling = std::fs::symlink_metadata(dest.join("x/hl_sibling"));
    assert!(
        sibling.is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound),
        "x/hl_sibling made"
    );
    assert!(!dest.join("x/hl_via").exists(), "x/hl_via made");
    let data = std::fs::metadata(dest.join("x/data")).unwrap();
    let inside = std::fs::metadata(dest.join("x/hl_inside")).unwrap();
    assert_eq!((data.dev(), data.ino()), (inside.dev(), inside.ino()));
    assert_ne!((s_meta.dev(), s_meta.ino()), (inside.dev(), inside.ino()));
    assert_eq!(
        std::fs::read_to_string(dest.join("x/hl_inside")).unwrap(),
        "data\n"
    );
    for skipped in [
        "x/hl_sibling (a hard link to secret, not to a file this copy made)",
        "x/up/secret (under a symlink from the sandbox)",
        "x/hl_via (a hard link to x/up/secret, not to a file this copy made)",
    ] {
        assert!(said.contains(&format!("cp: skipped {skipped}\n")), "{said}");
    }
    l.ok(&["rm", "hl"]);
}

/// `warren stats`: CPU as a share of a core between two readings (a busy loop under
/// `--cpu 0.5` shows about half a core, a sleeping one about none), memory against the
/// limit, processes; backends that measure nothing say so; a sandbox named that is not
/// running is an error.
#[test]
fn stats_show_what_running_sandboxes_use() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start();
    let out = l.run(
        "busy",
        &["--cpu", "0.5", "-m", "64Mi"],
        &["sh", "-c", "while :; do :; done"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = l.run("idle", &[], &["sh", "-c", "sleep 600 & sleep 600 & wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    l.ok(&["run", "--name", "record"]);
    for name in ["busy", "idle"] {
        l.wait_phase(name, "Running");
    }
    let text = l.ok(&[
        "stats",
        "busy",
        "idle",
        "record",
        "--no-stream",
        "--interval",
        "1s",
        "-o",
        "json",
    ]);
    eprintln!("{text}");
    let lines: Vec<serde_json::Value> = text.lines().map(json).collect();
    assert_eq!(lines.len(), 3, "{text}");
    let (busy, idle, record) = (&lines[0], &lines[1], &lines[2]);
    let cpu = |v: &serde_json::Value| v["cpuPercent"].as_f64().unwrap();
    assert!((5.0..70.0).contains(&cpu(busy)), "{busy}");
    assert!(cpu(idle) < 5.0, "{idle}");
    assert_eq!(busy["memoryLimitBytes"], 64 << 20, "{busy}");
    assert!(busy["memoryBytes"].as_u64().unwrap() > 0, "{busy}");
    // sh and its two sleeps.
    assert_eq!(idle["pids"], 3, "{idle}");
    assert_eq!(record["measured"], false, "{record}");
    assert!(record["cpuPercent"].is_null(), "{record}");

    // Streaming: one reading per interval, each refresh's CPU against the one before.
    struct Ends(std::process::Child);
    impl Drop for Ends {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut stream = Ends(
        std::process::Command::new(common::WARREN)
            .args(["stats", "busy", "-o", "json", "--interval", "300ms"])
            .env("WARREN_SERVER", &l.server.address)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("stats"),
    );
    let rx = common::lines_of(stream.0.stdout.take().expect("stdout"));
    let readings: Vec<serde_json::Value> = (0..4)
        .map(|_| json(&rx.recv_timeout(Duration::from_secs(10)).expect("a reading")))
        .collect();
    drop(stream);
    for pair in readings.windows(2) {
        assert!((5.0..70.0).contains(&cpu(&pair[1])), "{}", pair[1]);
        let gap = pair[1]["timeMs"].as_i64().unwrap() - pair[0]["timeMs"].as_i64().unwrap();
        assert!((250..2000).contains(&gap), "{gap} ms between readings");
    }

    let table = l.ok(&["stats", "--no-stream", "--interval", "200ms"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("MEM USAGE / LIMIT"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("busy") && l.contains("/ 64Mi")),
        "{table}"
    );

    l.ok(&["kill", "idle"]);
    l.wait_phase("idle", "Exited");
    let out = l.warren(&["stats", "idle", "--no-stream"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr(&out).contains("idle"), "{}", stderr(&out));
    l.ok(&["rm", "busy", "idle", "record"]);
}

/// A running sandbox's freezer file (v1 `freezer.state`, v2 `cgroup.freeze`), found from its
/// workload's `/proc/PID/cgroup`, to freeze or thaw it behind the server's back.
struct Freezer {
    file: PathBuf,
    v1: bool,
}

fn freezer_of(l: &Linux, name: &str) -> Freezer {
    let got = l.get(name);
    let pid = got["status"]["backendInfo"]["pid"].as_str().expect("pid");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("its cgroups");
    let v1 = cgroups.lines().find_map(|line| {
        line.split_once(":freezer:")
            .map(|(_, path)| path.to_string())
    });
    match v1 {
        Some(path) => Freezer {
            file: PathBuf::from(format!("/sys/fs/cgroup/freezer{path}/freezer.state")),
            v1: true,
        },
        None => {
            let path = cgroups
                .lines()
                .find_map(|line| line.strip_prefix("0::"))
                .expect("a v1 freezer or a v2 cgroup");
            Freezer {
                file: PathBuf::from(format!("/sys/fs/cgroup{path}/cgroup.freeze")),
                v1: false,
            }
        }
    }
}

impl Freezer {
    /// Freezes (and waits until the kernel says so) or thaws.
    fn set(&self, frozen: bool) {
        let value = match (self.v1, frozen) {
            (true, true) => "FROZEN",
            (true, false) => "THAWED",
            (false, true) => "1",
            (false, false) => "0",
        };
        std::fs::write(&self.file, value).expect("write the freezer");
        if !frozen {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let done = if self.v1 {
                std::fs::read_to_string(&self.file)
                    .unwrap_or_default()
                    .trim()
                    == "FROZEN"
            } else {
                let events = self.file.with_file_name("cgroup.events");
                std::fs::read_to_string(events)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l == "frozen 1")
            };
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not frozen",
                self.file.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `warren top NAME`, as `docker top`: every process in the sandbox, with its pid inside the
/// sandbox and on the host, its parent, user, state, memory and command line.
#[test]
fn top_lists_every_process_in_the_sandbox() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start();
    const SH: &str = "sh -c sleep 600 & sleep 601 & wait";
    let out = l.run("t", &[], &["sh", "-c", "sleep 600 & sleep 601 & wait"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let init: u64 = l.get("t")["status"]["backendInfo"]["pid"]
        .as_str()
        .expect("pid")
        .parse()
        .expect("a number");
    // Polled until both sleeps have exec'd and sleep: the create answers at the workload's
    // exec, and a child forked but not yet exec'd shows its parent's command line.
    let settled = |list: &serde_json::Value, commands: &[&str]| {
        let items = list.as_array().map(Vec::as_slice).unwrap_or_default();
        items.len() == commands.len()
            && commands.iter().all(|c| {
                items
                    .iter()
                    .any(|p| p["command"] == *c && (c.starts_with("sh ") || p["state"] == "S"))
            })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let list = loop {
        let list = json(&l.ok(&["top", "t", "-o", "json"]));
        if settled(&list, &[SH, "sleep 600", "sleep 601"]) {
            break list;
        }
        assert!(Instant::now() < deadline, "not 3 processes: {list}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let by_command = |c: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|p| p["command"] == c)
            .unwrap_or_else(|| panic!("no {c:?} in {list}"))
            .clone()
    };
    let sh = by_command(SH);
    assert_eq!(sh["pid"], init, "{sh}");
    assert_eq!(sh["sandboxPid"], 1, "{sh}");
    for c in ["sleep 600", "sleep 601"] {
        let p = by_command(c);
        assert_eq!(p["ppid"], init, "{p}");
        assert_eq!(p["uid"], 0, "{p}");
        assert_eq!(p["state"], "S", "{p}");
        assert!(p["sandboxPid"].as_u64().is_some_and(|n| n > 1), "{p}");
        assert!(p["rssBytes"].as_u64().is_some_and(|n| n > 0), "{p}");
    }
    // A process `warren exec` started is listed; warren's own exec helper (in the cgroup,
    // outside the pid namespace) is not. Its environment (a secret, say) shows in no
    // command line on the host.
    let mut exec = std::process::Command::new(common::WARREN)
        .args(["exec", "-e", "TOKEN=hunter2-top", "t", "--", "sleep", "602"])
        .env("WARREN_SERVER", &l.server.address)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("warren exec");
    let deadline = Instant::now() + Duration::from_secs(10);
    let with_exec = loop {
        let list = json(&l.ok(&["top", "t", "-o", "json"]));
        if settled(&list, &[SH, "sleep 600", "sleep 601", "sleep 602"]) {
            break list;
        }
        assert!(Instant::now() < deadline, "not 4 processes: {list}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = exec.kill();
    let _ = exec.wait();
    assert!(
        with_exec
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["command"] == "sleep 602" && p["sandboxPid"].as_u64().is_some()),
        "{with_exec}"
    );
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("hunter2-top"),
            "an exec's environment in a command line: {}",
            String::from_utf8_lossy(&cmdline)
        );
    }
    // The table: a header, then one line per process (the exec's `sleep` ends with its
    // client, a moment after it), the sandbox's pids first: the sleeps' parent is pid 1;
    // the init's is outside the sandbox, 0.
    let deadline = Instant::now() + Duration::from_secs(10);
    let table = loop {
        let table = l.ok(&["top", "t"]);
        // Gone and reaped (a zombie would show as `[sleep]`).
        if !table.contains("sleep 602") && table.lines().count() == 4 {
            break table;
        }
        assert!(
            Instant::now() < deadline,
            "the exec outlived its client: {table}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(table.lines().count(), 4, "{table}");
    for line in table.lines().skip(1) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        let parent = match cells[7..].join(" ").as_str() {
            "sleep 600" | "sleep 601" => "1",
            _ => "0",
        };
        assert_eq!(cells[2], parent, "{table}");
    }
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("PID"), "{table}");
    assert!(
        lines[1..]
            .iter()
            .any(|line| line.starts_with("1 ") && line.ends_with("wait")),
        "{table}"
    );
    assert!(table.contains("sleep 601"), "{table}");
    // Arguments that are not UTF-8 show as they can (U+FFFD), never as a kernel thread's
    // `[comm]` a workload could hide behind.
    l.ok(&[
        "exec",
        "t",
        "--",
        "sh",
        "-c",
        "sh -c 'sleep 603; true' \"$(printf 'x\\377')\" >/dev/null 2>&1 &",
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = json(&l.ok(&["top", "t", "-o", "json"]));
        let commands: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["command"].as_str())
            .collect();
        if commands.contains(&"sh -c sleep 603; true x\u{fffd}") {
            assert!(!commands.iter().any(|c| c.starts_with('[')), "{list}");
            break;
        }
        assert!(Instant::now() < deadline, "{list}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Only a running sandbox has processes; a missing one is named.
    l.ok(&["stop", "-t", "0", "t"]);
    let out = l.warren(&["top", "t"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("\"t\" is Stopped"),
        "{}",
        stderr(&out)
    );
    let out = l.warren(&["top", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("\"nope\" not found"),
        "{}",
        stderr(&out)
    );
}

/// Expired sandboxes are deleted side by side: one waiting out its grace period does not
/// hold back the others (one after another, each went a grace period later than the last).
#[test]
fn expired_sandboxes_are_deleted_side_by_side() {
    let l = linux_or_skip!();
    let started = Instant::now();
    let names = ["expiring1", "expiring2", "expiring3"];
    for name in names {
        // pid 1 of its namespace: sleep ignores SIGTERM, so each waits out its 3 s.
        l.run_running(
            name,
            &["--stop-timeout", "3", "--expire-in", "2s"],
            &["sleep", "1000"],
        );
    }
    let gone = || {
        let listed = l.ok(&["ls", "-o", "name"]);
        names
            .iter()
            .all(|n| !listed.lines().any(|l| l.ends_with(n)))
    };
    while !gone() {
        // Side by side: ~2 s + 3 s (+ a 1 s sweep); one by one it was 2 s + 3 × 3 s.
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "still there after {:?}: {}",
            started.elapsed(),
            l.ok(&["ls"])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}
