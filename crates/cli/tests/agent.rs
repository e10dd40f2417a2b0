//! `warren agent` processes on loopback with a real server: the agent API's auth and errors,
//! sandboxes on remote agents (placement by capacity, exits and logs reaching the server,
//! delete, resetRevision), the janitor on agents and in the server, expireTime.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[allow(unused_macros)] // linux_or_skip: one test here runs linux sandboxes
#[path = "common/linux.rs"]
mod linux_harness;

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use cluster::{TestAgent, eventually, http, node_state};
use common::{TestServer, http_get, json, stderr};
use linux_harness::stdout;

const TOKEN: &str = "t0k3n";

fn module(name: &str) -> String {
    format!(
        "{}/../wasm/tests/modules/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A control plane that runs nothing itself, on TCP with a token.
fn control_plane(extra: &[&str]) -> TestServer {
    let mut flags = vec!["--local-capacity", "0", "--agent-timeout", "5s"];
    flags.extend_from_slice(extra);
    TestServer::start_with(&flags, Some(TOKEN))
}

fn wait_up(server: &TestServer, names: &[&str]) {
    eventually(Duration::from_secs(10), "agents registered", || {
        names.iter().all(|n| node_state(server, n) == "Up")
    });
}

#[test]
fn agent_api_needs_the_token_and_names_bad_fields() {
    let server = control_plane(&[]);
    let agent = TestAgent::start(&server, "a", &[]);
    // The agent's state (sandboxes' roots and logs, the image store's layers with their
    // set-id files) is root's alone.
    for dir in [agent.state_dir(), agent.state_dir().join("images")] {
        let mode = std::fs::metadata(&dir)
            .expect("state dir")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700, "{}: {mode:o}", dir.display());
    }
    // Every call needs the token, health probes too.
    for path in ["/healthz", "/readyz", "/api/v1/agent/status"] {
        assert_eq!(http("GET", &agent.url(path), None, None).0, 401, "{path}");
        assert_eq!(
            http("GET", &agent.url(path), Some("wrong"), None).0,
            401,
            "{path}"
        );
    }
    let (code, body) = http(
        "POST",
        &agent.url("/api/v1/agent/create"),
        None,
        Some(r#"{"id":"x","spec":{"name":"x"}}"#),
    );
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("bearer token"), "{body}");
    let (code, body) = http("GET", &agent.url("/healthz"), Some(TOKEN), None);
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    // Bad JSON: 400, naming the field.
    let cases = [
        (r#"{"id": 5, "spec": {"name": "x"}}"#, "id"),
        (r#"{"id": "abc"}"#, "missing field `spec`"),
        (
            r#"{"id": "abc", "spec": {"name": "x", "resources": {"limits": {"cpu": [1]}}}}"#,
            "spec.resources.limits.cpu",
        ),
        (
            r#"{"id": "abc", "spec": {"name": "x", "imagee": "y"}}"#,
            "imagee",
        ),
        ("{", "invalid request body"),
    ];
    for (body, names) in cases {
        let (code, reply) = http(
            "POST",
            &agent.url("/api/v1/agent/create"),
            Some(TOKEN),
            Some(body),
        );
        assert_eq!(code, 400, "{body} -> {reply}");
        assert!(reply.contains(names), "{body}: {reply} should name {names}");
        assert!(reply.contains(r#""kind":"invalid""#), "{reply}");
    }
    let (code, reply) = http(
        "POST",
        &agent.url("/api/v1/agent/delete"),
        Some(TOKEN),
        Some(r#"{"id": "abc", "gracePeriodSeconds": "soon"}"#),
    );
    assert_eq!(code, 400, "{reply}");
    assert!(reply.contains("gracePeriodSeconds"), "{reply}");
    let (code, reply) = http("GET", &agent.url("/api/v1/agent/logs"), Some(TOKEN), None);
    assert_eq!(code, 400, "{reply}");
    assert!(reply.contains("sandbox"), "{reply}");
    let (code, reply) = http(
        "GET",
        &agent.url("/api/v1/agent/status?sandbox=nope"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 404, "{reply}");
    let (code, reply) = http(
        "GET",
        &agent.url("/api/v1/agent/processes"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 400, "{reply}");
    assert!(reply.contains("sandbox: missing"), "{reply}");
    let (code, reply) = http(
        "GET",
        &agent.url("/api/v1/agent/processes?sandbox=nope"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 404, "{reply}");

    let (code, status) = http("GET", &agent.url("/api/v1/agent/status"), Some(TOKEN), None);
    assert_eq!(code, 200);
    let status = json(&status);
    assert_eq!(status["node"], "a");
    assert_eq!(status["capacity"], 5, "seed 004's default capacity");
    // Registration runs beside the API: on a loaded machine it may come after the calls.
    eventually(
        Duration::from_secs(15),
        "the agent registered with the control plane",
        || agent.log().contains("registered with the control plane"),
    );
}

#[test]
fn sandboxes_run_on_remote_agents_by_capacity() {
    let server = control_plane(&[]);
    let a = TestAgent::start(&server, "a", &["--capacity", "4"]);
    let b = TestAgent::start(&server, "b", &["--capacity", "4"]);
    wait_up(&server, &["a", "b"]);

    let node_of = |name: &str| {
        json(&server.ok(&["get", name, "-o", "json"]))["status"]["node"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut on = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..4 {
        server.ok(&["run", "--name", &format!("s{i}")]);
        *on.entry(node_of(&format!("s{i}"))).or_default() += 1;
    }
    // Least loaded first: two each.
    assert_eq!(on.get("a"), Some(&2), "{on:?}");
    assert_eq!(on.get("b"), Some(&2), "{on:?}");
    assert_eq!(a.slot_ids().len(), 2);
    assert_eq!(b.slot_ids().len(), 2);
    // Host port 8080 at most once per agent: both have room, the third is refused.
    server.ok(&["run", "--name", "p1", "-p", "8080:80"]);
    server.ok(&["run", "--name", "p2", "-p", "8080:80"]);
    assert_ne!(node_of("p1"), node_of("p2"));
    let out = server.warren(&["run", "--name", "p3", "-p", "8080:80"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("host port 8080/tcp"),
        "{}",
        stderr(&out)
    );

    // A wasm module on a remote agent: its output and its exit reach the server.
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("exit3.wat"),
        "--name",
        "w",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("hello.wat"),
        "--name",
        "h",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(server.ok(&["logs", "h"]), "hello\n", "logs from the agent");
    let got = json(&server.ok(&["get", "w", "-o", "json"]));
    assert_eq!(got["status"]["phase"], "Exited");
    assert_eq!(got["status"]["exitCode"], 3);

    // Both agents are full now.
    let out = server.warren(&["run", "--name", "more"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("full"), "{}", stderr(&out));

    // resetRevision re-creates it on its agent: new id, old files gone.
    let before = json(&server.ok(&["get", "s0", "-o", "json"]));
    let node = before["status"]["node"].as_str().unwrap().to_string();
    let agent = if node == "a" { &a } else { &b };
    let old_id = before["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    server.ok(&["update", "s0", "--reset-revision", "r2"]);
    let after = json(&server.ok(&["get", "s0", "-o", "json"]));
    assert_eq!(after["status"]["phase"], "Running");
    let new_id = after["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_ne!(old_id, new_id);
    let ids = agent.slot_ids();
    assert!(ids.contains(&new_id) && !ids.contains(&old_id), "{ids:?}");

    // Pause and unpause through the agent's API (a slot sandbox's pause is recorded).
    assert_eq!(server.ok(&["pause", "s2"]), "s2\n");
    let got = json(&server.ok(&["get", "s2", "-o", "json"]));
    assert_eq!(got["status"]["paused"], true, "{got}");
    assert_eq!(server.ok(&["unpause", "s2"]), "s2\n");
    let got = json(&server.ok(&["get", "s2", "-o", "json"]));
    assert_eq!(got["status"].get("paused"), None, "{got}");

    // Delete frees the slot and the files.
    server.ok(&["rm", "s1"]);
    server.ok(&["run", "--name", "more"]);

    let (code, metrics) = http_get(server.metrics.as_ref().unwrap());
    assert_eq!(code, 200);
    assert!(metrics.contains("warren_agents_up 3"), "{metrics}");
    assert!(
        metrics.contains("warren_schedule_duration_seconds_count"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"warren_errors_total{reason="capacity"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"warren_errors_total{reason="port_conflict"}"#),
        "{metrics}"
    );
    let table = server.ok(&["nodes"]);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("4/4"), "{table}");
}

#[test]
fn janitors_remove_orphans_on_agents_and_in_the_server() {
    let server = control_plane(&["--orphan-timeout", "1s"]);
    let agent = TestAgent::start(&server, "a", &["--orphan-timeout", "1s"]);
    wait_up(&server, &["a"]);
    server.ok(&["run", "--name", "known"]);
    // A sandbox the control plane never heard of, made straight through the agent's API.
    let (code, reply) = http(
        "POST",
        &agent.url("/api/v1/agent/create"),
        Some(TOKEN),
        Some(r#"{"id": "orphan1", "spec": {"name": "o"}}"#),
    );
    assert_eq!(code, 200, "{reply}");
    assert!(agent.slot_ids().contains(&"orphan1".to_string()));
    // The janitor logs a removal once it is done: the files go a moment before the line.
    eventually(
        Duration::from_secs(6),
        "the agent's janitor removed the orphan and logged it",
        || {
            !agent.slot_ids().contains(&"orphan1".to_string())
                && agent.log().contains("janitor: removed an orphan")
        },
    );
    assert_eq!(agent.slot_ids().len(), 1, "the known sandbox stays");

    // The server's own agent: files no record describes, as a crash between a fast create
    // and its write would leave.
    let local = TestServer::start_with(&["--orphan-timeout", "1s"], None);
    local.ok(&["run", "--name", "kept"]);
    let orphan = local.state_dir().join("slot").join("0123456789abcdef");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("resources.json"), "{}").unwrap();
    eventually(
        Duration::from_secs(6),
        "the server's janitor removed the orphan and logged it",
        || !orphan.exists() && local.log().contains("janitor: removed an orphan"),
    );
    assert_eq!(
        json(&local.ok(&["get", "kept", "-o", "json"]))["status"]["phase"],
        "Running"
    );
}

#[test]
fn expire_time_goes_through_expired_then_deleted() {
    let server = TestServer::start();
    // A sandbox there before the watch: its ADDED line says the watch is subscribed.
    server.ok(&["run", "--name", "marker"]);
    let mut watch = std::process::Command::new(common::WARREN)
        .args(["watch", "-o", "json"])
        .env("WARREN_SERVER", &server.address)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rx = common::lines_of(watch.stdout.take().expect("stdout"));
    let mut text = String::new();
    let mut until = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(what);
                    text.push_str(&line);
                    text.push('\n');
                    if found {
                        return;
                    }
                }
                Err(_) => panic!("no {what} in the watch, after 10 s:\n{text}"),
            }
        }
    };
    until("\"marker\"");
    server.ok(&["run", "--name", "short", "--expire-in", "1s"]);
    until("\"Deleted\"");
    let _ = watch.kill();
    let _ = watch.wait();
    let short: String = text
        .lines()
        .filter(|l| l.contains("\"short\""))
        .collect::<Vec<_>>()
        .join("\n");
    let phases: Vec<&str> = ["Running", "Expired", "Deleted"]
        .into_iter()
        .filter(|p| short.contains(&format!("\"{p}\"")))
        .collect();
    assert_eq!(phases, ["Running", "Expired", "Deleted"], "{short}");
    let expired = short.find("\"Expired\"").unwrap();
    let deleted = short.rfind("\"Deleted\"").unwrap();
    assert!(expired < deleted, "Expired comes before Deleted: {short}");
    assert_eq!(server.warren(&["get", "short"]).status.code(), Some(1));
}

#[test]
fn bad_cluster_flags_name_the_flag() {
    let server = TestServer::start();
    for (args, names) in [
        (vec!["agent", "--token", "t"], "--server"),
        (vec!["agent", "--server", "tcp://127.0.0.1:1"], "--token"),
        (
            vec![
                "agent",
                "--server",
                "tcp://127.0.0.1:1",
                "--token",
                "t",
                "--capacity",
                "0",
            ],
            "--capacity",
        ),
        (
            vec![
                "agent",
                "--server",
                "tcp://127.0.0.1:1",
                "--token",
                "t",
                "--listen",
                "0.0.0.0:0",
            ],
            "--advertise",
        ),
        (
            vec![
                "agent",
                "--server",
                "tcp://127.0.0.1:1,",
                "--token",
                "t",
                "--linux-egress-cidr",
                "10.0.0.0/30",
            ],
            "--linux-egress-cidr",
        ),
        (vec!["agent", "--server", ",", "--token", "t"], "--server"),
        (vec!["server", "--consistency", "eventual"], "--consistency"),
        (vec!["server", "--node", ""], "--node"),
        (vec!["ls", "--log-level", "["], "--log-level"),
        (vec!["server", "--log-level", "warren=bogus"], "--log-level"),
        (vec!["server", "--node", "evil\u{1b}]0;x\u{7}"], "--node"),
        (vec!["run", "--mode", "eventual"], "--mode"),
    ] {
        let mut cmd = std::process::Command::new(common::WARREN);
        cmd.args(&args)
            .env_remove("WARREN_TOKEN")
            .env_remove("WARREN_SERVER");
        let out = common::run_with_stdin(cmd, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(names), "{args:?}: {}", stderr(&out));
    }
    drop(server);
}

/// `warren exec` into a sandbox that runs on a remote agent: through the agent's WebSocket
/// exec, with output on both streams, the exit code, stdin and a terminal, as a local exec.
#[test]
fn exec_reaches_sandboxes_on_remote_agents() {
    if let Some(reason) = linux_harness::skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let server = control_plane(&[]);
    let cgroups = linux_harness::Cgroups(format!("warren-it-exec-{}", std::process::id()));
    let mut agent = TestAgent::prepare(
        &server,
        "far",
        &[],
        "127.0.0.1:0",
        &["--cgroup-parent", &cgroups.0],
    );
    linux_harness::import_busybox(agent.dir.path(), &agent.state_dir().join("images"));
    agent.spawn(TOKEN);
    wait_up(&server, &["far"]);
    server.ok(&[
        "run",
        "-b",
        "linux",
        "-i",
        "busybox",
        "--name",
        "box",
        "-e",
        "GREETING=hi",
        "--",
        "sleep",
        "1000",
    ]);
    eventually(Duration::from_secs(20), "box running", || {
        json(&server.ok(&["get", "box", "-o", "json"]))["status"]["phase"] == "Running"
    });
    let got = json(&server.ok(&["get", "box", "-o", "json"]));
    assert_eq!(got["status"]["node"], "far", "{got}");
    let id = got["metadata"]["uid"].as_str().unwrap().to_string();

    let text = server.ok(&[
        "exec",
        "box",
        "--",
        "sh",
        "-c",
        "echo $GREETING $(hostname); cat /proc/1/cmdline",
    ]);
    assert_eq!(text, "hi box\nsleep\x001000\x00");
    let out = server.warren(&["exec", "box", "--", "sh", "-c", "echo oops >&2; exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stderr(&out), "oops\n");
    assert_eq!(stdout(&out), "");
    // Stdin crosses too, to its end (`wc -c` answers only once it has seen EOF).
    let input = "x".repeat(100_000);
    let out = server.warren_stdin(
        &["exec", "-i", "box", "--", "busybox", "wc", "-c"],
        Some(&input),
    );
    assert_eq!(stdout(&out).trim(), "100000", "{}", stderr(&out));
    let out = server.warren(&["exec", "-t", "box", "--", "busybox", "tty"]);
    assert!(stdout(&out).starts_with("/dev/pts/"), "{}", stdout(&out));
    let out = server.warren(&["exec", "box", "--", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127), "{}", stderr(&out));
    // A client that goes away ends its process on the agent too.
    common::exec_ends_with_its_client(&server, "box", &[], "1359");
    common::exec_ends_with_its_client(&server, "box", &["-t"], "1360");
    // `warren stats` asks the agent.
    let stats = server.stats("box");
    assert_eq!(stats["measured"], true, "{stats}");
    assert_eq!(stats["pids"], 1, "{stats}");
    // So does `warren top`: the one process, pid 1 inside.
    let top = json(&server.ok(&["top", "box", "-o", "json"]));
    assert_eq!(top.as_array().map(Vec::len), Some(1), "{top}");
    assert_eq!(top[0]["command"], "sleep 1000", "{top}");
    assert_eq!(top[0]["sandboxPid"], 1, "{top}");
    // `warren cp` rides the same exec: in and back out.
    let here = tempfile::tempdir().unwrap();
    let file = here.path().join("note.txt");
    std::fs::write(&file, "far away\n").unwrap();
    server.ok(&["cp", file.to_str().unwrap(), "box:/tmp"]);
    let back = here.path().join("back.txt");
    server.ok(&["cp", "box:/tmp/note.txt", back.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "far away\n");

    // The agent's API refuses an exec into what it does not hold, before any upgrade.
    let (code, reply) = http(
        "GET",
        &agent.url("/api/v1/agent/exec?sandbox=nope"),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 404, "{reply}");
    assert!(
        reply.contains("sandbox nope is not on agent far"),
        "{reply}"
    );
    let (code, _) = http(
        "GET",
        &agent.url("/api/v1/agent/exec?sandbox=x"),
        None,
        None,
    );
    assert_eq!(code, 401);
    let (code, reply) = http(
        "GET",
        &agent.url(&format!("/api/v1/agent/exec?sandbox={id}")),
        Some(TOKEN),
        None,
    );
    assert_eq!(code, 400, "{reply}");
    assert!(reply.contains("exec is a WebSocket"), "{reply}");
    server.ok(&["rm", "-f", "box"]);
}

/// Calls waiting on an agent that stops answering end once it is declared lost (not at
/// their 120 s deadlines), and a sandbox busy then (a stop waiting on it) becomes Lost once
/// that call ends, rather than staying Running on a dead node for good.
#[test]
fn calls_to_a_lost_agent_end_and_its_busy_sandbox_is_lost() {
    let server = TestServer::start_with(
        &["--local-capacity", "0", "--agent-timeout", "1500ms"],
        Some(TOKEN),
    );
    let mut a = TestAgent::start(&server, "a", &["--capacity", "2"]);
    wait_up(&server, &["a"]);
    server.ok(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &module("loop.wat"),
        "--name",
        "busy",
    ]);
    let agent = nix::unistd::Pid::from_raw(a.child.as_ref().unwrap().id() as i32);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let spawn = |args: &[&str]| {
        server
            .command(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    // Both wait on the hung agent: the stop of a sandbox there, a create placed there.
    let stop = spawn(&["stop", "busy"]);
    let create = spawn(&["run", "--name", "late"]);
    eventually(Duration::from_secs(10), "agent a Lost", || {
        node_state(&server, "a") == "Lost"
    });
    let lost_at = Instant::now();
    for (what, child) in [("stop", stop), ("create", create)] {
        let out = child.wait_with_output().expect("wait");
        assert!(
            lost_at.elapsed() < Duration::from_secs(10),
            "{what} waited {:?} past the loss",
            lost_at.elapsed()
        );
        assert!(!out.status.success(), "{what}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("lost"), "{what}: {err}");
    }
    eventually(Duration::from_secs(10), "busy Lost", || {
        json(&server.ok(&["get", "busy", "-o", "json"]))["status"]["phase"] == "Lost"
    });
    a.kill9();
}

/// An agent the control plane turns away says why in its log, once per reason rather than
/// on every retry.
#[test]
fn an_agent_that_cannot_register_says_why_once() {
    let server = control_plane(&[]);
    let mut agent = TestAgent::prepare(&server, "refused", &[], "127.0.0.1:0", &[]);
    agent.spawn("not-the-token");
    eventually(Duration::from_secs(10), "the refusal logged", || {
        agent
            .log()
            .contains("cannot register with the control plane")
    });
    // Retries every few hundred ms meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    let log = agent.log();
    assert_eq!(log.matches("cannot register").count(), 1, "{log}");
    assert!(log.contains("token"), "{log}");
}
