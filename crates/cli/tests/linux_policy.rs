//! Policies enforced by the linux backend, end to end: a policy applied with
//! `warren policy apply -f` and named by `warren run --policy` narrows what busybox containers
//! can do (seccomp, network, filesystem). Needs root and /bin/busybox; without them every test
//! prints why it skips.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

mod common;
#[macro_use]
#[path = "common/linux.rs"]
mod linux_harness;

use common::stderr;
use linux_harness::{Linux, cgroup_of, skip_reason, stdout, wait_warm};

/// Applies a policy named `name` whose `spec:` is `spec` (YAML, indented by two spaces).
fn apply(l: &Linux, name: &str, spec: &str) {
    let path = l.server.dir.path().join(format!("{name}.yaml"));
    let text = format!(
        "apiVersion: warren.dev/v1\nkind: Policy\nmetadata:\n  name: {name}\nspec:\n{spec}"
    );
    std::fs::write(&path, text).unwrap();
    l.ok(&["policy", "apply", "-f", path.to_str().unwrap()]);
}

#[test]
fn a_denied_syscall_fails_with_eperm_and_an_allow_list_stops_the_rest() {
    let l = linux_or_skip!();
    apply(&l, "nomkdir", "  syscalls:\n    deny: [mkdir, mkdirat]\n");
    let mkdir = ["sh", "-c", "mkdir /tmp/made 2>&1 && echo made"];

    let out = l.run("free", &["--wait"], &mkdir);
    assert_eq!(stdout(&out), "made\n", "{}", stderr(&out));

    let out = l.run("denied", &["--wait", "--policy", "nomkdir"], &mkdir);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stdout(&out).contains("Operation not permitted"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    // A second sandbox under the same policy (the compiled filter comes from the cache).
    let out = l.run("denied-again", &["--wait", "--policy", "nomkdir"], &mkdir);
    assert!(stdout(&out).contains("Operation not permitted"));

    // `warren exec` into a sandbox under the policy runs under the same filter.
    l.run_running("held", &["--policy", "nomkdir"], &["sleep", "1000"]);
    let mut exec = vec!["exec", "held", "--"];
    exec.extend_from_slice(&mkdir);
    let out = l.warren(&exec);
    assert!(
        stdout(&out).contains("Operation not permitted"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );

    // Without execve in the allow-list the workload cannot even start.
    apply(
        &l,
        "tiny",
        "  syscalls:\n    allow: [read, write, exit, exit_group]\n",
    );
    let out = l.run("starved", &["--wait", "--policy", "tiny"], &["echo", "hi"]);
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    assert_ne!(stdout(&out), "hi\n");
    assert!(
        stderr(&out).contains(r#"exec "echo": Operation not permitted"#),
        "{}",
        stderr(&out)
    );

    // An unknown name is refused when the policy is applied, naming the field.
    let path = l.server.dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: warren.dev/v1\nkind: Policy\nmetadata:\n  name: bad\n\
         spec:\n  syscalls:\n    deny: [Mkdir]\n",
    )
    .unwrap();
    let out = l.warren(&["policy", "apply", "-f", path.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("spec.syscalls.deny[0].name"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn network_none_takes_loopback_down_and_loopback_keeps_the_host_out() {
    let l = linux_or_skip!();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    apply(&l, "offline", "  network:\n    mode: none\n");
    apply(&l, "local", "  network:\n    mode: loopback\n");
    // lo's flags: IFF_UP is bit 0. Then try the host's listener and the sandbox's own
    // 127.0.0.1 (nothing listens there: refused when lo is up, unreachable when it is down).
    let probe = format!(
        "cat /sys/class/net/lo/flags; \
         busybox nc -w 2 127.0.0.1 {port} </dev/null 2>&1; echo nc=$?"
    );
    let cmd = ["sh", "-c", probe.as_str()];

    let out = l.run("offline", &["--wait", "--policy", "offline"], &cmd);
    let text = stdout(&out);
    assert!(
        text.starts_with("0x8\n"),
        "lo is down: {text}{}",
        stderr(&out)
    );
    assert!(!text.contains("nc=0"), "{text}");
    // Nothing answers, not even a refusal from the sandbox's own stack (lo drops the packet).
    assert!(!text.contains("Connection refused"), "{text}");

    let out = l.run("local", &["--wait", "--policy", "local"], &cmd);
    let text = stdout(&out);
    assert!(
        text.starts_with("0x9\n"),
        "lo is up: {text}{}",
        stderr(&out)
    );
    // The sandbox's own loopback, not the host's: the host listener is not reachable.
    assert!(!text.contains("nc=0"), "{text}");
    assert!(text.contains("Connection refused"), "{text}");
    drop(listener);
}

#[test]
fn read_only_paths_cannot_be_written_and_masked_paths_read_empty() {
    let l = linux_or_skip!();
    apply(
        &l,
        "fs",
        "  filesystem:\n    readOnly: [/tmp]\n    masked: [/etc/passwd]\n",
    );
    let probe = [
        "sh",
        "-c",
        "touch /tmp/x 2>&1; echo touch=$?; echo passwd=$(busybox wc -c < /etc/passwd)",
    ];
    let out = l.run("fs-free", &["--wait"], &probe);
    let text = stdout(&out);
    assert!(text.contains("touch=0"), "{text}{}", stderr(&out));
    assert!(!text.contains("passwd=0"), "{text}");

    let out = l.run("fs", &["--wait", "--policy", "fs"], &probe);
    let text = stdout(&out);
    assert!(
        text.contains("Read-only file system"),
        "{text}{}",
        stderr(&out)
    );
    assert!(!text.contains("touch=0"), "{text}");
    assert!(text.contains("passwd=0\n"), "{text}");
}

#[test]
fn a_warm_shell_applies_the_policy_after_the_claim() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start_with(&["--warm", "linux:busybox=1"]);
    apply(
        &l,
        "warm",
        "  syscalls:\n    deny: [mkdir, mkdirat]\n  network:\n    mode: none\n  \
         filesystem:\n    masked: [/etc/passwd]\n",
    );
    wait_warm(&l, 1);
    let out = l.run(
        "w",
        &["--wait", "--policy", "warm"],
        &[
            "sh",
            "-c",
            "cat /sys/class/net/lo/flags; busybox wc -c < /etc/passwd; mkdir /tmp/d 2>&1",
        ],
    );
    assert!(
        cgroup_of(&l, "w").starts_with("warm-"),
        "came from the pool"
    );
    let text = stdout(&out);
    assert!(text.starts_with("0x8\n0\n"), "{text}{}", stderr(&out));
    assert!(text.contains("Operation not permitted"), "{text}");
}

#[test]
fn a_name_the_architecture_lacks_is_refused_at_create() {
    let l = linux_or_skip!();
    apply(&l, "typo", "  syscalls:\n    deny: [ptrace, mkdri]\n");
    let out = l.run("typo", &["--wait", "--policy", "typo"], &["true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains(r#"policy.syscalls.deny[1].name: "mkdri" is not a syscall"#),
        "{}",
        stderr(&out)
    );
}

/// An exec list for the busybox image: its applets (all one file, /bin/busybox, reached
/// through the /bin symlinks and the shell's /proc/self/exe), what the workloads copy into
/// /tmp/a, and one script.
const EXEC_POLICY: &str = "  exec:\n    allow: [\"/bin/*\", \"/tmp/a/*\", /tmp/c/script-ok]\n";

/// Makes /tmp/a/busybox and /tmp/b/busybox (two copies of busybox, named so for its applet
/// dispatch: different files the list tells apart) and two scripts, then runs them every
/// way a shell can.
const EXEC_PROBE: &str = "exec 2>&1; mkdir /tmp/a /tmp/b /tmp/c; \
    cp /bin/busybox /tmp/a/; cp /bin/busybox /tmp/b/; \
    /tmp/a/busybox echo listed; \
    /tmp/b/busybox echo unlisted; echo rc=$?; \
    cd /tmp/b && ./busybox echo relative; echo rc=$?; cd /; \
    ln -s /tmp/b/busybox /tmp/c/busybox; /tmp/c/busybox echo link; echo rc=$?; \
    printf '#!/bin/sh\\necho from-script\\n' >/tmp/c/script-ok; \
    cp /tmp/c/script-ok /tmp/c/script-no; chmod +x /tmp/c/script-ok /tmp/c/script-no; \
    /tmp/c/script-ok; /tmp/c/script-no; echo rc=$?; \
    PATH=/tmp/c:$PATH script-no; echo rc=$?; \
    /tmp/nothere; echo rc=$?; grep Seccomp_filters /proc/self/status";

/// `warren run` flags for `/bin/sh -c SCRIPT`: under an exec list the command must be named
/// (the image's own cannot be checked at admission).
const SH: [&str; 2] = ["--entrypoint", "/bin/sh"];

fn bundle_of(l: &Linux, name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(
        l.get(name)["status"]["backendInfo"]["bundle"]
            .as_str()
            .unwrap(),
    )
}

#[test]
fn an_exec_list_stops_unlisted_programs_in_the_kernel_even_from_a_shell() {
    let l = linux_or_skip!();
    apply(&l, "execs", EXEC_POLICY);
    apply(&l, "nochroot", "  syscalls:\n    deny: [chroot]\n");
    let run = |name: &str, policy: Option<&str>, script: &str| {
        let mut flags = vec!["--wait"];
        flags.extend(SH);
        if let Some(p) = policy {
            flags.extend(["--policy", p]);
        }
        let out = l.run(name, &flags, &["-c", script]);
        (stdout(&out), stderr(&out))
    };

    // Without an exec list nothing changes: every program runs, and the process has only
    // the sandbox's own seccomp filter (no gate).
    for (name, policy) in [("free", None), ("syscalls-only", Some("nochroot"))] {
        let (text, err) = run(name, policy, EXEC_PROBE);
        assert!(
            text.starts_with("listed\nunlisted\nrc=0\nrelative\nrc=0\nlink\nrc=0\n"),
            "{text}{err}"
        );
        assert!(
            text.contains("from-script\nfrom-script\nrc=0\nfrom-script\nrc=0\n"),
            "{text}"
        );
        assert!(text.contains("Seccomp_filters:\t1\n"), "{text}");
        assert!(!bundle_of(&l, name).join("gate.sock").exists());
    }

    let (text, err) = run("gated", Some("execs"), EXEC_PROBE);
    // Listed files run (the applets too: the shell re-executes /proc/self/exe for them).
    assert!(text.starts_with("listed\n"), "{text}{err}");
    // Unlisted ones fail with EPERM, as a shell reports it: message and status 126; by a
    // relative path, through a symlink, a script, a script found on $PATH.
    for denied in [
        "/tmp/b/busybox",
        "./busybox",
        "/tmp/c/busybox",
        "/tmp/c/script-no",
        "script-no",
    ] {
        assert!(
            text.contains(&format!(
                "/bin/sh: {denied}: Operation not permitted\nrc=126\n"
            )),
            "{denied}: {text}"
        );
    }
    assert!(
        !text.contains("unlisted") && !text.contains("relative") && !text.contains("link\n"),
        "{text}"
    );
    // A listed script runs with its interpreter (which the kernel loads, unchecked).
    assert_eq!(text.matches("from-script").count(), 1, "{text}");
    // A missing file is still "not found" (PATH searches go on).
    assert!(text.contains("/tmp/nothere: not found\nrc=127\n"), "{text}");
    // One more filter: the gate.
    assert!(text.contains("Seccomp_filters:\t2\n"), "{text}");
    assert!(bundle_of(&l, "gated").join("gate.sock").exists());

    // The workload's own exec is checked too (here a shell replacing itself).
    let (text, err) = run(
        "exec-self",
        Some("execs"),
        "exec 2>&1; mkdir /tmp/b; cp /bin/busybox /tmp/b/; exec /tmp/b/busybox echo hi",
    );
    assert!(!text.contains("hi\n"), "{text}");
    assert!(text.contains("Operation not permitted"), "{text}{err}");
}

#[test]
fn warren_exec_and_warm_shells_are_gated_too() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let l = Linux::start_with(&["--warm", "linux:busybox=1"]);
    apply(&l, "execs", EXEC_POLICY);
    wait_warm(&l, 1);
    let mut flags = vec!["--policy", "execs"];
    flags.extend(SH);
    let out = l.run(
        "held",
        &flags,
        &[
            "-c",
            "mkdir /tmp/a /tmp/b; cp /bin/busybox /tmp/a/; cp /bin/busybox /tmp/b/; \
             touch /tmp/ready; sleep 1000",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    l.wait_phase("held", "Running");
    assert!(
        cgroup_of(&l, "held").starts_with("warm-"),
        "came from the pool"
    );
    let ready = bundle_of(&l, "held").join("upper/tmp/ready");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the workload never got ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    // `warren exec` of an unlisted program fails; of a listed one, runs.
    let out = l.warren(&["exec", "held", "--", "/tmp/b/busybox", "echo", "hi"]);
    assert_ne!(out.status.code(), Some(0));
    assert_ne!(stdout(&out), "hi\n");
    assert!(
        stderr(&out).contains("Operation not permitted"),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let out = l.warren(&["exec", "held", "--", "/tmp/a/busybox", "echo", "hi"]);
    assert_eq!(stdout(&out), "hi\n", "{}", stderr(&out));
    // A shell started by exec is held to the list as well.
    let out = l.warren(&[
        "exec",
        "held",
        "--",
        "/bin/sh",
        "-c",
        "/tmp/b/busybox echo no 2>&1; echo rc=$?; /tmp/a/busybox echo yes",
    ]);
    let text = stdout(&out);
    assert!(
        text.contains("Operation not permitted\nrc=126\nyes\n"),
        "{text}{}",
        stderr(&out)
    );
    // The warm shell's workload (pid 1) carries the gate.
    let out = l.warren(&["exec", "held", "--", "/bin/cat", "/proc/1/status"]);
    assert!(
        stdout(&out).contains("Seccomp_filters:\t2\n"),
        "{}",
        stdout(&out)
    );

    // A checkpoint would restore it without its gate: refused, and it keeps running.
    let out = l.warren(&["checkpoint", "held", "--name", "ck"]);
    assert_ne!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("its policy has an exec list"),
        "{}",
        stderr(&out)
    );
    assert_eq!(l.get("held")["status"]["phase"], "Running");
    let out = l.warren(&["checkpoint", "ls", "-o", "json"]);
    assert!(!stdout(&out).contains("\"ck\""), "{}", stdout(&out));
}

#[test]
fn a_dead_supervisor_fails_execs_closed_with_enosys() {
    let mut l = linux_or_skip!();
    apply(&l, "execs", EXEC_POLICY);
    // Execs /bin/true every 50 ms, recording each status in /tmp/rcs; writes nothing to
    // stdout or stderr, whose reader (the supervisor) is about to die.
    let script = "exec >/dev/null 2>/tmp/err; mkfifo /tmp/f; exec 3<>/tmp/f; i=0; \
        while [ $i -lt 600 ]; do /bin/true; echo $? >>/tmp/rcs; read -t 0.05 x <&3; \
        i=$((i+1)); done";
    l.run_running(
        "orphan",
        &["--policy", "execs", "--entrypoint", "/bin/sh"],
        &["-c", script],
    );
    let bundle = bundle_of(&l, "orphan");
    let rcs = bundle.join("upper/tmp/rcs");
    let wait_for = |line: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let text = std::fs::read_to_string(&rcs).unwrap_or_default();
            if text.lines().any(|l| l == line) {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {line:?} in {}: {text}",
                rcs.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait_for("0");
    let state = common::json(&std::fs::read_to_string(bundle.join("state.json")).unwrap());
    let supervisor = state["supervisorPid"].as_i64().unwrap() as i32;
    // The server first: a running server ends a sandbox whose supervisor was killed, and
    // this is about the time before anyone does.
    l.server.kill9();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The workload lives on, and its execs fail: the kernel answers ENOSYS when no listener
    // is left. Nothing hangs.
    wait_for("126");
    let err = std::fs::read_to_string(bundle.join("upper/tmp/err")).unwrap();
    assert!(err.contains("/bin/true: Function not implemented"), "{err}");
    // The restarted server finds the supervisor gone: the sandbox is Failed and its
    // workload killed.
    l.server.spawn();
    let got = l.wait_phase("orphan", "Failed");
    assert!(
        got["status"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("its processes were killed")),
        "{got}"
    );
    linux_harness::wait_gone(
        &[state["pid"].as_i64().unwrap() as i32],
        "the orphaned workload",
    );
}

#[test]
fn writable_paths_are_the_only_writable_part_of_the_rootfs() {
    let l = linux_or_skip!();
    apply(&l, "wr", "  filesystem:\n    writable: [/tmp, /out]\n");
    let probe = [
        "/bin/sh",
        "-c",
        "exec 2>&1; touch /tmp/x && echo tmp=ok; touch /out/x && echo out=ok; \
         touch /etc/x; echo etc=$?; mkdir /newdir; echo root=$?; \
         echo shm >/dev/shm/x && echo shm=ok",
    ];
    let out = l.run("wr-free", &["--wait"], &probe);
    let text = stdout(&out);
    assert!(
        text.contains("etc=0") && text.contains("root=0"),
        "{text}{}",
        stderr(&out)
    );

    let out = l.run("wr", &["--wait", "--policy", "wr"], &probe);
    let text = stdout(&out);
    // Listed paths are writable (a missing one is made), the rest of the rootfs is not;
    // /dev/shm is a mount of its own and stays writable.
    assert!(text.contains("tmp=ok\nout=ok\n"), "{text}{}", stderr(&out));
    assert!(text.contains("Read-only file system\netc=1\n"), "{text}");
    assert!(text.contains("root=1\n"), "{text}");
    assert!(text.contains("shm=ok\n"), "{text}");
}

/// A network namespace of the test's own (never an outside address): a veth pair whose
/// host end is `.1` of a /29 of TEST-NET-2 (198.51.100.0/24, documentation only) and whose
/// namespace end holds `.2` and `.3`; listeners bound in it on any port. Removed on drop,
/// with the warren range's nftables table.
struct OtherNetns {
    name: String,
    host_if: String,
    net: [u8; 4],
    table: String,
}

fn sh(cmd: &str) -> std::process::Output {
    std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap()
}

fn sh_ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(out.status.success(), "{cmd}: {}", stderr(&out));
    stdout(&out)
}

impl OtherNetns {
    fn new(table: &str) -> OtherNetns {
        let pid = std::process::id();
        let base = (pid % 31) as u8 * 8;
        let n = OtherNetns {
            name: format!("wt-egress-{pid}"),
            host_if: format!("wte{}", pid % 100_000),
            net: [198, 51, 100, base],
            table: table.to_string(),
        };
        let (ns, hif) = (&n.name, &n.host_if);
        let [a, b, c, d] = n.net;
        sh_ok(&format!(
            "ip netns add {ns} && ip link add {hif} type veth peer name eth0 netns {ns} && \
             ip addr add {a}.{b}.{c}.{}/29 dev {hif} && ip link set {hif} up && \
             ip -n {ns} addr add {a}.{b}.{c}.{}/29 dev eth0 && \
             ip -n {ns} addr add {a}.{b}.{c}.{}/29 dev eth0 && \
             ip -n {ns} link set eth0 up && ip -n {ns} link set lo up",
            d + 1,
            d + 2,
            d + 3
        ));
        n
    }

    fn addr(&self, host: u8) -> String {
        let [a, b, c, d] = self.net;
        format!("{a}.{b}.{c}.{}", d + host)
    }

    /// Two listeners in the namespace (on every address), each answering "hello\n".
    fn listen(&self) -> (u16, u16) {
        let path = format!("/run/netns/{}", self.name);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // This thread only: the test's other threads stay in the host's namespace.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let listeners: Vec<_> = (0..2)
                .map(|_| std::net::TcpListener::bind("0.0.0.0:0").unwrap())
                .collect();
            tx.send(
                listeners
                    .iter()
                    .map(|l| l.local_addr().unwrap().port())
                    .collect::<Vec<_>>(),
            )
            .unwrap();
            for l in listeners {
                std::thread::spawn(move || {
                    for mut conn in l.incoming().flatten() {
                        let _ = std::io::Write::write_all(&mut conn, b"hello\n");
                    }
                });
            }
        });
        let ports = rx.recv().unwrap();
        (ports[0], ports[1])
    }
}

impl OtherNetns {
    /// Two listeners in the namespace for `bytes` each way: `sink` reads them and sends how
    /// long they took (from the first byte to the last), `source` sends them and closes.
    fn transfer_listeners(
        &self,
        bytes: usize,
    ) -> (u16, u16, std::sync::mpsc::Receiver<std::time::Duration>) {
        use std::io::{Read, Write};
        let path = format!("/run/netns/{}", self.name);
        let (ports_tx, ports_rx) = std::sync::mpsc::channel();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let sink = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
            let source = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
            let port = |l: &std::net::TcpListener| l.local_addr().unwrap().port();
            ports_tx.send((port(&sink), port(&source))).unwrap();
            std::thread::spawn(move || {
                for mut conn in source.incoming().flatten() {
                    let _ = conn.write_all(&vec![7u8; bytes]);
                }
            });
            for mut conn in sink.incoming().flatten() {
                let mut buf = vec![0u8; 64 << 10];
                let (mut got, mut first) = (0, None);
                while got < bytes {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            first.get_or_insert_with(std::time::Instant::now);
                            got += n;
                        }
                    }
                }
                let took = match first {
                    Some(t) if got >= bytes => t.elapsed(),
                    _ => std::time::Duration::MAX,
                };
                let _ = tx.send(took);
            }
        });
        let (sink, source) = ports_rx.recv().unwrap();
        (sink, source, rx)
    }
}

/// The seconds of busybox's `time` report (`real\t0m 1.08s`) in `text`.
fn busybox_real_time(text: &str) -> std::time::Duration {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("real"))
        .unwrap_or_else(|| panic!("no `time` report in {text:?}"));
    let (minutes, seconds) = line.trim().split_once('m').expect("minutes");
    let seconds: f64 = seconds
        .trim()
        .trim_end_matches('s')
        .parse()
        .expect("seconds");
    std::time::Duration::from_secs_f64(minutes.parse::<f64>().expect("minutes") * 60.0 + seconds)
}

impl Drop for OtherNetns {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "ip netns del {}; ip link del {} 2>/dev/null; nft delete table inet {}",
            self.name, self.host_if, self.table
        ));
    }
}

#[test]
fn egress_reaches_the_listed_destinations_and_ports_only() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    for tool in ["ip", "nft", "nsenter", "tc"] {
        if sh(&format!("command -v {tool}")).stdout.is_empty() {
            panic!("{tool} is missing: run scripts/install-egress.sh (install-deps.sh does)");
        }
    }
    // A range of this server's own (parallel test servers must not share one).
    let k = std::process::id() % 250;
    let range = format!("198.19.{k}.0/24");
    let table = format!("warren_198_19_{k}_0_24");
    let other = OtherNetns::new(&table);
    let (open, closed) = other.listen();
    let mut l = Linux::start_with(&["--linux-egress-cidr", &range, "--warm", "linux:busybox=1"]);
    apply(
        &l,
        "out",
        &format!(
            "  network:\n    mode: egress\n    egress:\n      - {{cidr: {}, ports: [{open}]}}\n",
            other.addr(2)
        ),
    );
    let probe = format!(
        "exec 2>&1; cat /sys/class/net/lo/flags; ip -4 addr show eth0 | grep -o 'inet [0-9./]*'; \
         for to in '{a} {open}' '{a} {closed}' '{b} {open}'; do \
         echo \"try $to\"; nc -w 3 $to </dev/null; echo rc=$?; done",
        a = other.addr(2),
        b = other.addr(3)
    );
    // From the warm pool (the pair is made at the claim), then cold (a bind mount keeps a
    // sandbox out of the pool; the pair is made while the child waits).
    wait_warm(&l, 1);
    let host_dir = tempfile::tempdir().unwrap();
    let mapdir = format!("/mnt::{}", host_dir.path().display());
    for (name, extra) in [
        ("egress-warm", vec![]),
        ("egress-cold", vec!["--mapdir", &mapdir]),
    ] {
        let mut flags = vec!["--wait", "--policy", "out"];
        flags.extend(extra);
        let out = l.run(name, &flags, &["sh", "-c", &probe]);
        let text = stdout(&out);
        assert!(
            text.starts_with("0x9\ninet 198.19."),
            "{name}: {text}{}",
            stderr(&out)
        );
        assert_eq!(
            cgroup_of(&l, name).starts_with("warm-"),
            name == "egress-warm"
        );
        let parts: Vec<&str> = text.split("try ").skip(1).collect();
        assert_eq!(parts.len(), 3, "{text}");
        // The listed address and port answer; another port or address of the same listener
        // does not (rejected at once, not timed out).
        assert!(parts[0].contains("hello\nrc=0"), "{name}: {text}");
        for denied in &parts[1..] {
            assert!(
                !denied.contains("hello") && !denied.contains("rc=0"),
                "{name}: {text}"
            );
            assert!(denied.contains("No route to host"), "{name}: {text}");
        }
    }

    // `--network-bandwidth` holds each way: 1 MiB at 8 Mbit/s takes about a second, where
    // the same sandbox without it moves the MiB in a few milliseconds. A sandbox given a
    // limit after its start gets it then.
    const MIB: usize = 1 << 20;
    let (sink, source, measured) = other.transfer_listeners(MIB);
    apply(
        &l,
        "bulk",
        &format!(
            "  network:\n    mode: egress\n    egress:\n      - {{cidr: {}, ports: [{sink}, {source}]}}\n",
            other.addr(2)
        ),
    );
    let a = other.addr(2);
    // Up: the sink times it. Down: `time` in the sandbox (the source cannot tell when the
    // sandbox has read the last byte).
    let transfer = format!(
        "dd if=/dev/zero bs=64k count=16 2>/dev/null | nc -w 10 {a} {sink}; \
         {{ time nc -w 10 {a} {source} </dev/null | wc -c; }} 2>&1"
    );
    let timed = |name: &str, text: &str| -> [std::time::Duration; 2] {
        let up = measured
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the upload's time");
        assert!(
            text.lines().any(|l| l == MIB.to_string()),
            "{name}: the download: {text}"
        );
        [up, busybox_real_time(text)]
    };
    let run = |name: &str, flags: &[&str]| -> [std::time::Duration; 2] {
        let mut all = vec!["--wait", "--policy", "bulk"];
        all.extend_from_slice(flags);
        let out = l.run(name, &all, &["sh", "-c", &transfer]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        timed(name, &stdout(&out))
    };
    let free = run("bw-free", &[]);
    let limited = run("bw-limited", &["--network-bandwidth", "8M"]);
    eprintln!("1 MiB up, down: unlimited {free:?}, at 8 Mbit/s {limited:?}");
    let slow = |way: &str, took: std::time::Duration| {
        assert!(
            took >= std::time::Duration::from_millis(700)
                && took <= std::time::Duration::from_secs(5),
            "{way}: 1 MiB at 8 Mbit/s took {took:?}"
        );
    };
    for (way, (free, limited)) in ["up", "down"].iter().zip(free.iter().zip(limited)) {
        slow(way, limited);
        assert!(
            *free * 2 < limited,
            "{way}: unlimited {free:?} against {limited:?} limited"
        );
    }
    // Set on a running sandbox, it holds from then on.
    let out = l.run(
        "bw-later",
        &["--policy", "bulk"],
        &[
            "sh",
            "-c",
            &format!("until [ -e /tmp/go ]; do sleep 0.05; done; {transfer}"),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    l.wait_phase("bw-later", "Running");
    l.ok(&["update", "bw-later", "--network-bandwidth", "8M"]);
    l.ok(&["exec", "bw-later", "--", "touch", "/tmp/go"]);
    l.wait_phase("bw-later", "Exited");
    let later = timed("bw-later", &l.ok(&["logs", "bw-later"]));
    eprintln!("1 MiB up, down, limited after the start: {later:?}");
    slow("up after the update", later[0]);
    slow("down after the update", later[1]);
    l.ok(&["rm", "bw-free", "bw-limited", "bw-later"]);

    // A running egress sandbox has its chain and its veth pair; delete removes both.
    l.run_running("held", &["--policy", "out"], &["sleep", "1000"]);
    let chains = || sh_ok(&format!("nft list table inet {table} 2>/dev/null || true"));
    let prefix = format!(" wrc613{k:02x}");
    let links = || {
        sh_ok(&format!(
            "ip -o link show | grep -o '{prefix}[0-9a-f]*' || true"
        ))
    };
    assert_eq!(chains().matches("chain sb_wr").count(), 1, "{}", chains());
    assert_eq!(links().lines().count(), 1, "{}", links());
    l.ok(&["rm", "held"]);
    assert_eq!(chains().matches("chain sb_wr").count(), 0, "{}", chains());
    assert!(links().trim().is_empty(), "{}", links());

    // A supervisor killed with its sandbox leaves a chain; the next server start removes it.
    l.run_running("crashed", &["--policy", "out"], &["sleep", "1000"]);
    let bundle = bundle_of(&l, "crashed");
    l.server.kill9();
    let state = common::json(&std::fs::read_to_string(bundle.join("state.json")).unwrap());
    for key in ["supervisorPid", "pid"] {
        let pid = state[key].as_i64().unwrap() as i32;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(chains().matches("chain sb_wr").count(), 1, "{}", chains());
    l.server.spawn();
    assert_eq!(chains().matches("chain sb_wr").count(), 0, "{}", chains());
    // The host's veth goes with the dead namespace, which the kernel tears down on its own
    // time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !links().trim().is_empty() {
        assert!(std::time::Instant::now() < deadline, "{}", links());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Once no sandbox holds a /30 (the last one removed), the table goes too: nothing of
    // warren's stays in the host's firewall, nor comes back at the next start.
    assert!(
        !chains().trim().is_empty(),
        "the table while sandboxes hold /30s"
    );
    for name in l.ok(&["ls", "-o", "name"]).lines() {
        l.ok(&["rm", "-f", name.trim_start_matches("sandbox/")]);
    }
    assert!(chains().trim().is_empty(), "{}", chains());
    l.server.kill9();
    l.server.spawn();
    assert!(chains().trim().is_empty(), "{}", chains());
}

/// env.allow: the workload sees the spec's variables the policy lists, not the others (the
/// image's own stay: PATH and the like are the image's).
#[test]
fn env_allow_drops_the_variables_it_does_not_list() {
    let l = linux_or_skip!();
    apply(&l, "envs", "  env:\n    allow: [\"APP_*\"]\n");
    let out = l.run(
        "envs",
        &[
            "--wait",
            "--policy",
            "envs",
            "-e",
            "APP_MODE=fast",
            "-e",
            "AWS_SECRET=s3cr3t",
        ],
        &[
            "sh",
            "-c",
            "echo \"$APP_MODE|${AWS_SECRET:-unset}|${PATH:+path}\"",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "fast|unset|path\n");
    let out = l.run(
        "no-policy",
        &["--wait", "-e", "AWS_SECRET=s3cr3t"],
        &["sh", "-c", "echo \"${AWS_SECRET:-unset}\""],
    );
    assert_eq!(stdout(&out), "s3cr3t\n");
}
