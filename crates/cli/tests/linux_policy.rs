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
    let out = l.run("held", &["--policy", "nomkdir"], &["sleep", "1000"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    l.wait_phase("held", "Running");
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
fn network_none_takes_loopback_down_and_egress_is_refused() {
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

    apply(
        &l,
        "egress",
        "  network:\n    mode: egress\n    egress: [{cidr: 10.0.0.0/8}]\n",
    );
    let out = l.run("egress", &["--wait", "--policy", "egress"], &["true"]);
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(
        err.contains("policy.network.mode") && err.contains("not supported on linux"),
        "{err}"
    );
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
