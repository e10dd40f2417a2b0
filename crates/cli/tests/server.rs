//! End-to-end tests: the real `warren server` binary, driven by the real CLI and gRPC client.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{TestServer, json, read, resources_path, stderr, with_client};
use warren_proto::{spec_to_pb, v1};
use warren_spec::SandboxSpec;

const SEED_JSON: &str = "{\n  \"cpu_limit\": 2.0,\n  \"cpu_request\": 1.0,\n  \"memory_limit\": 2147483648,\n  \
                         \"memory_request\": 1073741824,\n  \"pid_limit\": 1000,\n  \"storage_limit\": null,\n  \
                         \"network_bandwidth\": null\n}\n";

#[test]
fn run_with_cri_annotations_writes_the_seed_json() {
    let server = TestServer::start();
    let out = server.ok(&[
        "run",
        "--name",
        "seed",
        "-a",
        "resources.limits.cpu=2",
        "-a",
        "resources.requests.cpu=1",
        "-a",
        "resources.limits.memory=2Gi",
        "-a",
        "resources.requests.memory=1Gi",
        "-a",
        "resources.limits.pid=1000",
    ]);
    assert!(
        out.starts_with("sandbox/seed created (slot, Running)"),
        "{out}"
    );
    let path = resources_path(&server, "seed");
    assert!(
        out.contains(&path.display().to_string()),
        "run prints where the JSON is: {out}"
    );
    assert!(path.starts_with(server.state_dir()), "{}", path.display());
    assert_eq!(read(&path), SEED_JSON);
}

#[test]
fn apply_with_oci_resources_and_precedence() {
    let server = TestServer::start();
    // OCI linux.resources as containerd sends them; the annotation wins for cpu_limit.
    let yaml = r#"
apiVersion: warren.dev/v1
kind: Sandbox
metadata:
  name: oci
  annotations:
    resources.limits.cpu: "3"
spec:
  resources:
    limits: {memory: 64Mi, pids: 7}
  oci:
    cpu: {quota: 50000, period: 100000, shares: 512}
    memory: {limit: 268435456, reservation: 134217728}
    pids: {limit: 100}
"#;
    let out = server.warren_stdin(&["apply", "-f", "-"], Some(yaml));
    assert!(out.status.success(), "{}", stderr(&out));
    let got = json(&read(&resources_path(&server, "oci")));
    assert_eq!(got["cpu_limit"], 3.0, "annotation over OCI");
    assert_eq!(got["cpu_request"], 0.5, "shares 512 / 1024");
    assert_eq!(got["memory_limit"], 268435456, "OCI over spec");
    assert_eq!(got["memory_request"], 134217728);
    assert_eq!(got["pid_limit"], 100);
    assert_eq!(got["storage_limit"], serde_json::Value::Null);
}

#[test]
fn list_get_update_delete() {
    let server = TestServer::start();
    server.ok(&[
        "run", "--name", "a", "--cpu", "500m", "--memory", "1Gi", "-l", "app=web",
    ]);
    server.ok(&["run", "--name", "b", "--pids", "50", "-l", "app=db"]);
    let table = server.ok(&["ls"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert!(
        lines[1].starts_with("a ") && lines[1].contains("500m") && lines[1].contains("1Gi"),
        "{table}"
    );
    assert_eq!(server.ok(&["ls", "-l", "app=db", "-o", "name"]), "b\n");
    let list = json(&server.ok(&["ls", "-o", "json"]));
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2));

    let got = json(&server.ok(&["get", "a", "-o", "json"]));
    assert_eq!(got["status"]["phase"], "Running");
    assert_eq!(got["metadata"]["resourceVersion"], "1");
    let yaml = server.ok(&["get", "a", "-o", "yaml"]);
    assert!(yaml.contains("apiVersion: warren.dev/v1"), "{yaml}");

    server.ok(&[
        "update",
        "a",
        "--memory",
        "2Gi",
        "-l",
        "tier=front",
        "--label-rm",
        "app",
    ]);
    let got = json(&server.ok(&["get", "a", "-o", "json"]));
    assert_eq!(got["metadata"]["resourceVersion"], "2");
    assert_eq!(got["spec"]["resources"]["limits"]["memory"], "2Gi");
    assert_eq!(
        got["spec"]["resources"]["limits"]["cpu"], "500m",
        "other quantities kept"
    );
    assert_eq!(
        got["metadata"]["labels"],
        serde_json::json!({"tier": "front"})
    );
    let path = resources_path(&server, "a");
    assert_eq!(
        json(&read(&path))["memory_limit"],
        2u64 << 30,
        "update re-wrote the JSON"
    );

    // A slot sandbox runs nothing: no processes to list, and the error says so.
    let out = server.warren(&["top", "b"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("does not support listing processes (top)")
            && stderr(&out).contains("sandbox \"b\""),
        "{}",
        stderr(&out)
    );
    // A slot sandbox runs nothing: its pause is recorded.
    assert_eq!(server.ok(&["pause", "b"]), "b\n");
    assert!(server.ok(&["ls"]).contains("Running (Paused)"));
    assert_eq!(
        json(&server.ok(&["get", "b", "-o", "json"]))["status"]["paused"],
        true
    );
    server.ok(&["unpause", "b"]);
    assert_eq!(
        json(&server.ok(&["get", "b", "-o", "json"]))["status"].get("paused"),
        None
    );
    server.ok(&["pause", "b"]);
    // Ended without an exit code (slot runs no process): `wait` prints its phase.
    server.ok(&["stop", "b"]);
    assert_eq!(server.ok(&["wait", "b"]), "Stopped\n");
    // Each line as soon as it and those before it are known: `b` at once, `c` once stopped.
    server.ok(&["run", "--name", "c"]);
    let mut waiting = std::process::Command::new(common::WARREN)
        .args(["wait", "b", "c"])
        .env("WARREN_SERVER", &server.address)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn warren wait");
    let stdout = waiting.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
            let _ = tx.send(line.expect("read"));
        }
    });
    let first = lines.recv_timeout(std::time::Duration::from_secs(10));
    let running = waiting.try_wait().expect("try_wait").is_none();
    server.ok(&["stop", "c"]);
    assert_eq!(first.as_deref(), Ok("Stopped"), "b's line waited for c");
    assert!(running, "the wait ended while c ran");
    let second = lines.recv_timeout(std::time::Duration::from_secs(10));
    assert_eq!(second.as_deref(), Ok("Stopped"));
    assert!(waiting.wait().expect("wait").success());
    assert_eq!(server.ok(&["rm", "a", "b", "c"]), "a\nb\nc\n");
    assert!(!path.exists(), "delete removed the JSON");
    assert_eq!(server.ok(&["ls", "-o", "name"]), "");
    let out = server.warren(&["rm", "a"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("sandbox \"a\" not found"),
        "{}",
        stderr(&out)
    );
    assert!(
        server.warren(&["rm", "-f", "a"]).status.success(),
        "--force ignores missing names"
    );
}

#[test]
fn apply_creates_updates_and_refuses_immutable_changes() {
    let server = TestServer::start();
    let doc = |mem: &str, image: &str| {
        format!(
            "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata:\n  name: app\n  labels: {{v: '1'}}\n\
             spec:\n  image: {image}\n  resources:\n    limits: {{memory: {mem}}}\n---\n\
             apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {{name: other}}\n"
        )
    };
    let file = server.dir.path().join("app.yaml");
    std::fs::write(&file, doc("1Gi", "busybox")).expect("write");
    let f = file.to_str().expect("utf8");
    assert_eq!(
        server.ok(&["apply", "-f", f]),
        "sandbox/app created\nsandbox/other created\n"
    );
    assert_eq!(
        server.ok(&["apply", "-f", f]),
        "sandbox/app unchanged\nsandbox/other unchanged\n"
    );
    std::fs::write(&file, doc("2Gi", "busybox")).expect("write");
    assert_eq!(
        server.ok(&["apply", "-f", f]),
        "sandbox/app configured\nsandbox/other unchanged\n"
    );
    assert_eq!(
        json(&read(&resources_path(&server, "app")))["memory_limit"],
        2u64 << 30
    );
    // What `get -o yaml` prints applies back unchanged.
    let yaml = server.ok(&["get", "app", "-o", "yaml"]);
    assert_eq!(
        server
            .warren_stdin(&["apply", "-f", "-"], Some(&yaml))
            .status
            .code(),
        Some(0)
    );
    std::fs::write(&file, doc("2Gi", "alpine")).expect("write");
    let out = server.warren(&["apply", "-f", f]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("spec.image cannot change"),
        "{}",
        stderr(&out)
    );
    // Every field an update cannot carry is refused by name, not dropped as "unchanged".
    let with = |extra: &str| {
        format!(
            "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {{name: other}}\nspec:\n{extra}"
        )
    };
    for (extra, field) in [
        ("  timeoutSeconds: 7\n", "spec.timeoutSeconds"),
        (
            "  stopGracePeriodSeconds: 60\n",
            "spec.stopGracePeriodSeconds",
        ),
        ("  user: \"0\"\n", "spec.user"),
        ("  hostname: h2\n", "spec.hostname"),
        ("  consistency: strong\n", "spec.consistency"),
        (
            "  recoveryTimeoutSeconds: 5\n",
            "spec.recoveryTimeoutSeconds",
        ),
        ("  readOnlyRootfs: true\n", "spec.readOnlyRootfs"),
        ("  denySyscalls: [mkdir]\n", "spec.denySyscalls"),
        ("  mounts: [{guest: /data, host: /srv}]\n", "spec.mounts"),
    ] {
        std::fs::write(&file, with(extra)).expect("write");
        let out = server.warren(&["apply", "-f", f]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{extra}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr(&out).contains(&format!("sandbox/other: {field} cannot change")),
            "{extra}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn bad_input_fails_with_the_field_named() {
    let server = TestServer::start();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["run", "--name", "x", "--memory", "2Gx"],
            1,
            "spec.resources.limits.memory: \"2Gx\" is not a quantity",
        ),
        (
            &["run", "--name", "x", "-a", "resources.limits.cpu=-1"],
            1,
            "annotations[\"resources.limits.cpu\"]",
        ),
        (&["run", "--name", "bad name"], 1, "spec.name: \"bad name\""),
        (
            &["run", "--name", "x", "--backend", "xen"],
            2,
            "\"xen\" is not a backend",
        ),
        (
            &["ls", "--backend", "xen"],
            2,
            "--backend: \"xen\" is not a backend",
        ),
        (
            &["stats", "x", "--interval", "2h"],
            2,
            "--interval: 7200s is longer than an hour",
        ),
        (
            &["run", "--name", "x", "-u", "99999999999"],
            1,
            "spec.user: \"99999999999\" has an ID above 4294967294, the largest",
        ),
        (
            &["run", "--name", "x", "-a", "novalue"],
            2,
            "--annotation: \"novalue\" is not KEY=VALUE",
        ),
        (
            &["run", "--name", "x", "--cpu", "1", "--cpu-request", "2"],
            1,
            "request 2 is more than the limit 1",
        ),
        (
            &["run", "--name", "x", "-i", "BUSYBOX::x"],
            1,
            "spec.image: invalid image name \"BUSYBOX::x\": repository component \"BUSYBOX:\"",
        ),
        (&["ls", "-l", "a b"], 1, "label selector \"a b\""),
        (&["get", "nope"], 1, "sandbox \"nope\" not found"),
        (&["frobnicate"], 2, "unrecognized subcommand"),
    ];
    for (args, code, want) in cases {
        let out = server.warren(args);
        assert_eq!(
            out.status.code(),
            Some(*code),
            "warren {args:?}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(want),
            "warren {args:?}: {want:?} not in {}",
            stderr(&out)
        );
    }
    assert_eq!(
        server.ok(&["ls", "-o", "name"]),
        "",
        "nothing was created by bad input"
    );
    let file = server.dir.path().join("bad.yaml");
    std::fs::write(&file, "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {name: ok}\n---\n\
        apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {name: bad}\nspec: {resources: {limits: {cpu: lots}}}\n")
        .expect("write");
    let out = server.warren(&["apply", "-f", file.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("spec.resources.limits.cpu: \"lots\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        server.ok(&["ls", "-o", "name"]),
        "",
        "a bad file changes nothing"
    );
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = format!("unix://{}/none.sock", dir.path().display());
    let out = common::run_with_stdin(
        {
            let mut c = std::process::Command::new(common::WARREN);
            c.args(["ls"]).env("WARREN_SERVER", &sock);
            c
        },
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot reach the warren server at"),
        "{}",
        stderr(&out)
    );
    // The cause once, not once per layer that quotes it.
    assert_eq!(
        stderr(&out).matches("No such file or directory").count(),
        1,
        "{}",
        stderr(&out)
    );
}

/// `run --wait` of a slot sandbox, which runs nothing, would wait for ever: refused, unless
/// it expires.
#[test]
fn run_wait_of_a_slot_sandbox_needs_an_expiry() {
    let server = TestServer::start();
    let out = server.warren(&["run", "--name", "never", "--wait"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--wait: a slot sandbox runs nothing"),
        "{}",
        stderr(&out)
    );
    assert!(
        !server.warren(&["get", "never"]).status.success(),
        "nothing created"
    );
    let out = server.warren(&["run", "--name", "brief", "--wait", "--expire-in", "1s"]);
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
}

/// A server that dies under a stream is a lost connection to the client, said so, not a
/// transport's protocol error.
#[test]
fn a_stream_whose_server_dies_says_the_connection_was_lost() {
    let mut server = TestServer::start();
    server.ok(&["run", "--name", "seen"]);
    let mut watch = server
        .command(&["watch"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    let lines = common::lines_of(watch.stdout.take().expect("stdout"));
    lines
        .recv_timeout(Duration::from_secs(10))
        .expect("watch lists the sandbox");
    server.kill9();
    let out = watch.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("lost the connection to the server"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn tcp_needs_the_token() {
    // `warren ARGS` with each env var set (`Some`) or removed (`None`).
    let warren = |args: &[&str], env: &[(&str, Option<&str>)]| {
        let mut c = std::process::Command::new(common::WARREN);
        c.args(args);
        for (key, value) in env {
            match value {
                Some(value) => c.env(key, value),
                None => c.env_remove(key),
            };
        }
        common::run_with_stdin(c, None)
    };
    // Without a token, a TCP server refuses to start.
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_arg = dir.path().to_str().expect("utf-8 temp dir");
    let serve = ["server", "--listen", "tcp://127.0.0.1:0", "--dir", dir_arg];
    let out = warren(&serve, &[("WARREN_TOKEN", None)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("needs a token"), "{}", stderr(&out));
    // Nor with a token no client could send.
    for bad in ["é", " padded "] {
        let out = warren(&serve, &[("WARREN_TOKEN", Some(bad))]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(
            stderr(&out).contains("printable ASCII, with spaces only between words"),
            "{}",
            stderr(&out)
        );
    }

    let server = TestServer::start_with(&[], Some("s3cret"));
    assert!(
        server.address.starts_with("tcp://127.0.0.1:"),
        "{}",
        server.address
    );
    server.ok(&["run", "--name", "t"]);
    let at = ("WARREN_SERVER", Some(server.address.as_str()));
    let no_token = warren(&["ls"], &[at, ("WARREN_TOKEN", None)]);
    assert_eq!(no_token.status.code(), Some(1));
    assert!(
        stderr(&no_token).contains("needs a bearer token"),
        "{}",
        stderr(&no_token)
    );
    let wrong = warren(&["ls", "--token", "guess"], &[at]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        stderr(&wrong).contains("token is wrong"),
        "{}",
        stderr(&wrong)
    );
    let unsendable = warren(&["ls", "--token", "é"], &[at]);
    assert_eq!(unsendable.status.code(), Some(1));
    assert!(
        stderr(&unsendable).contains("printable ASCII, spaces only between words"),
        "{}",
        stderr(&unsendable)
    );
    assert!(
        !server.log().contains("s3cret"),
        "the server never logs the token"
    );
    // A passphrase (spaces between words) works end to end.
    let phrase = TestServer::start_with(&[], Some("correct horse battery staple"));
    phrase.ok(&["run", "--name", "p"]);
    // An empty WARREN_TOKEN is no token, for a server that needs none.
    let open = TestServer::start();
    let out = warren(
        &["ls"],
        &[
            ("WARREN_SERVER", Some(open.address.as_str())),
            ("WARREN_TOKEN", Some("")),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn unix_socket_is_private_and_sigterm_stops_cleanly() {
    let mut server = TestServer::start();
    let sock = server.dir.path().join("w.sock");
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    server.ok(&["run", "--name", "keep"]);
    // A second server on the same dir is refused: the store is locked.
    let out = common::run_with_stdin(
        {
            let mut c = std::process::Command::new(common::WARREN);
            c.args(["server", "--dir"])
                .arg(server.state_dir())
                .arg("--listen")
                .arg(format!("unix://{}/other.sock", server.dir.path().display()));
            c
        },
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already uses"), "{}", stderr(&out));

    let status = server.terminate();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exits 0; log:\n{}",
        server.log()
    );
    assert!(!sock.exists(), "socket removed on shutdown");
    server.spawn();
    assert_eq!(
        server.ok(&["ls", "-o", "name"]),
        "keep\n",
        "state kept across restarts"
    );
}

/// A call waiting for a sandbox's end (`warren wait`, `run --wait`) does not hold a graceful
/// stop: it ends with "the server is shutting down" and the server exits at once.
#[test]
fn waits_end_when_the_server_stops() {
    let mut server = TestServer::start();
    // Slot sandboxes run nothing: they end only when deleted or expired.
    server.ok(&["run", "--name", "forever"]);
    let spawn = |args: &[&str]| {
        server
            .command(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn")
    };
    let waiters = [
        spawn(&["wait", "forever"]),
        spawn(&["run", "--name", "second", "--wait", "--expire-in", "1h"]),
    ];
    // Both calls reach the server (a create is seen in the list; a wait a moment after).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.ok(&["ls", "-o", "name"]).contains("second") {
        assert!(Instant::now() < deadline, "run --wait never created");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let stopping = Instant::now();
    assert_eq!(server.terminate().code(), Some(0), "{}", server.log());
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "the stop waited {:?}",
        stopping.elapsed()
    );
    for waiter in waiters {
        let out = waiter.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("the server is shutting down"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn watch_streams_changes() {
    let server = TestServer::start();
    server.ok(&["run", "--name", "first", "-l", "w=1"]);
    let mut watch = std::process::Command::new(common::WARREN)
        .args(["watch", "-o", "json", "-l", "w=1"])
        .env("WARREN_SERVER", &server.address)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    let rx = common::lines_of(watch.stdout.take().expect("stdout"));
    let next = || {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("an event");
        let v = json(&line);
        (
            v["type"].as_str().unwrap_or("").to_string(),
            v["object"]["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        )
    };
    assert_eq!(
        next(),
        ("ADDED".to_string(), "first".to_string()),
        "initial state first"
    );
    server.ok(&["run", "--name", "unwatched"]);
    server.ok(&["run", "--name", "second", "-l", "w=1"]);
    assert_eq!(
        next(),
        ("ADDED".to_string(), "second".to_string()),
        "selector filters others"
    );
    server.ok(&["rm", "second"]);
    assert_eq!(next().0, "MODIFIED", "Stopping");
    assert_eq!(next(), ("DELETED".to_string(), "second".to_string()));
    // Labels that stop matching are a DELETED for this watcher, labels that come to match
    // an ADDED (as a Kubernetes watch with a selector says).
    server.ok(&["update", "first", "--label-rm", "w"]);
    assert_eq!(next(), ("DELETED".to_string(), "first".to_string()));
    server.ok(&["update", "unwatched", "-l", "w=1"]);
    assert_eq!(next(), ("ADDED".to_string(), "unwatched".to_string()));
    server.ok(&["update", "first", "-l", "w=1"]);
    assert_eq!(next(), ("ADDED".to_string(), "first".to_string()));
    let _ = watch.kill();
    let _ = watch.wait();

    // Wide: the event, then ls -o wide's columns.
    let mut wide = std::process::Command::new(common::WARREN)
        .args(["watch", "-o", "wide", "-l", "w=1"])
        .env("WARREN_SERVER", &server.address)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    let rx = common::lines_of(wide.stdout.take().expect("stdout"));
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("an event");
    let id = json(&server.ok(&["get", "first", "-o", "json"]))["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .take(12)
        .collect::<String>();
    assert!(line.starts_with("ADDED     first"), "{line}");
    assert!(
        line.contains("  slot  ") && line.contains(&id) && line.ends_with("w=1"),
        "{line} (id {id})"
    );
    let _ = wide.kill();
    let _ = wide.wait();
}

/// kill -9 in the middle of 500 strong creates: every create the server acknowledged is
/// there after a restart, with its resources.json.
#[test]
fn acknowledged_creates_survive_kill_9() {
    let mut server = TestServer::start();
    let address = server.address.clone();
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    with_client(&address, async |client| {
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut workers = Vec::new();
        for _ in 0..16 {
            let (mut client, acked, next) = (client.clone(), acked.clone(), next.clone());
            workers.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= 500 {
                        return;
                    }
                    let mut spec = SandboxSpec {
                        name: format!("k{i:03}"),
                        consistency: Some(warren_spec::Consistency::Strong),
                        ..Default::default()
                    };
                    spec.resources.limits.memory = Some("64Mi".into());
                    let req = v1::CreateSandboxRequest {
                        spec: Some(spec_to_pb(&spec)),
                        ..Default::default()
                    };
                    match client.create_sandbox(req).await {
                        Ok(_) => {
                            acked.lock().expect("lock").insert(spec.name);
                        }
                        Err(_) => return, // the server is gone
                    }
                }
            }));
        }
        // Kill once a good share is acknowledged, while creates are in flight.
        while acked.lock().expect("lock").len() < 150 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        server.kill9();
        for w in workers {
            let _ = w.await;
        }
    });
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() >= 150 && acked.len() < 500,
        "killed mid-way: {} acknowledged",
        acked.len()
    );
    server.spawn();
    let listed: BTreeSet<String> = server
        .ok(&["ls", "-o", "name"])
        .lines()
        .map(str::to_string)
        .collect();
    let missing: Vec<_> = acked.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "acknowledged but lost after kill -9: {missing:?}"
    );
    for name in acked.iter().take(20) {
        let path = resources_path(&server, name);
        assert_eq!(json(&read(&path))["memory_limit"], 64u64 << 20, "{name}");
    }
    // Every sandbox dir on disk belongs to a listed sandbox: orphans were reconciled away.
    let on_disk = std::fs::read_dir(server.state_dir().join("slot"))
        .expect("slot dir")
        .count();
    assert_eq!(on_disk, listed.len(), "no orphan files after recovery");
}

#[test]
fn bench_create_runs_through_the_api() {
    let out = common::run_with_stdin(
        {
            let mut c = std::process::Command::new(common::WARREN);
            c.args(["bench", "create", "-n", "300", "-c", "8", "--json"])
                .env_remove("WARREN_SERVER");
            c
        },
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().expect("json line");
    let v = json(last);
    assert_eq!(v["create"]["ok"], 300);
    assert_eq!(v["create"]["failed"], 0);
    assert_eq!(v["delete"]["ok"], 300);
    assert!(v["create"]["p50_us"].as_u64().is_some_and(|p| p > 0));
}

/// Clients that hang up at once make the server write to closed sockets: it must take the
/// EPIPE and go on, not die of SIGPIPE.
#[test]
fn clients_hanging_up_do_not_kill_the_server() {
    use std::io::Write as _;
    let server = TestServer::start();
    let sock = server.dir.path().join("w.sock");
    for _ in 0..200 {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
        // The HTTP/2 preface and an empty SETTINGS frame: the server answers with its own.
        let _ =
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00");
        drop(s);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        server.ok(&["ls", "-o", "name"]),
        "",
        "the server is still serving"
    );
}

/// Fast creates are acknowledged before their record is on disk, and written behind in
/// order: a graceful stop drains the queue, so all of them are there after a restart. A
/// strong create that fails leaves no record.
#[test]
fn fast_creates_are_written_behind_and_strong_failures_leave_nothing() {
    let mut server = TestServer::start();
    for i in 0..20 {
        server.ok(&[
            "run",
            "--name",
            &format!("f{i:02}"),
            "--mode",
            "fast",
            "-m",
            "1Mi",
        ]);
    }
    let out = server.warren(&[
        "run",
        "--name",
        "bad",
        "--mode",
        "strong",
        "-b",
        "wasm",
        "--module",
        "/no/such.wasm",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(server.terminate().success());
    server.spawn();
    let listed = server.ok(&["ls", "-o", "name"]);
    let names: Vec<&str> = listed.lines().collect();
    assert_eq!(names.len(), 20, "{listed}");
    assert!(names.iter().all(|n| n.starts_with('f')), "{listed}");
}

/// Every metric moves with what the server did; health endpoints answer.
#[test]
fn metrics_count_what_the_server_did() {
    let server = TestServer::start();
    let base = server
        .metrics
        .clone()
        .expect("metrics address printed at start");
    let base = base.strip_suffix("/metrics").expect("ends in /metrics");
    let module = |name: &str| {
        format!(
            "{}/../wasm/tests/modules/{name}",
            env!("CARGO_MANIFEST_DIR")
        )
    };
    server.ok(&["run", "--name", "m1", "--memory", "64Mi"]);
    let bad = server.warren(&["run", "--name", "m2", "--memory", "lots"]);
    assert_ne!(bad.status.code(), Some(0));
    let hello = module("hello.wat");
    let looping = module("loop.wat");
    server.ok(&[
        "run", "-b", "wasm", "--module", &hello, "--name", "w1", "--wait",
    ]);
    let out = server.warren(&[
        "run",
        "-b",
        "wasm",
        "--module",
        &looping,
        "--name",
        "w2",
        "--timeout",
        "100ms",
        "--wait",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    server.ok(&["rm", "m1"]);

    let (code, text) = common::http_get(&format!("{base}/metrics"));
    assert_eq!(code, 200, "{text}");
    for want in [
        r#"warren_sandboxes{backend="wasm",phase="Exited"} 1"#,
        r#"warren_sandboxes{backend="wasm",phase="Failed"} 1"#,
        r#"warren_create_errors_total{backend="slot",code="InvalidArgument"} 1"#,
        r#"warren_sandbox_ends_total{backend="wasm",phase="Exited",reason=""} 1"#,
        r#"warren_sandbox_ends_total{backend="wasm",phase="Failed",reason="Timeout"} 1"#,
        r#"warren_deletes_total{backend="slot"} 1"#,
        r#"warren_create_duration_seconds_count{backend="slot",mode="fast"} 1"#,
        r#"warren_create_duration_seconds_count{backend="wasm",mode="fast"} 2"#,
        "warren_agents_up 1",
    ] {
        assert!(text.lines().any(|l| l == want), "no {want:?} in:\n{text}");
    }
    assert!(
        !text.contains("m1") && !text.contains("w1"),
        "no sandbox names in labels"
    );
    assert_eq!(
        common::http_get(&format!("{base}/healthz")),
        (200, "ok\n".into())
    );
    assert_eq!(common::http_get(&format!("{base}/readyz")).0, 200);
    assert_eq!(common::http_get(&format!("{base}/nothing")).0, 404);
}

/// `warren run --edit ARGS` with EDITOR set to a shell script doing `script` on the file.
fn run_edited(server: &TestServer, script: &str, args: &[&str]) -> std::process::Output {
    let editor = server.dir.path().join("editor.sh");
    std::fs::write(&editor, format!("#!/bin/sh\nset -e\n{script}\n")).expect("editor script");
    std::fs::set_permissions(&editor, std::fs::Permissions::from_mode(0o755))
        .expect("chmod editor script");
    let mut cmd = std::process::Command::new(common::WARREN);
    cmd.arg("run")
        .arg("--edit")
        .args(args)
        .env("WARREN_SERVER", &server.address)
        .env_remove("VISUAL")
        .env("EDITOR", &editor);
    common::run_with_stdin(cmd, None)
}

#[test]
fn run_edit_creates_what_the_editor_saved() {
    let server = TestServer::start();
    // The template carries the flags; the "user" renames it and adds a label.
    let out = run_edited(
        &server,
        r#"grep -q 'cpu: 500m' "$1"
sed -i 's/^  name: .*/  name: edited/' "$1"
sed -i 's/^metadata:$/metadata:\n  labels: {team: infra}/' "$1""#,
        &["--name", "draft", "--cpu", "500m"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let sb = json(&server.ok(&["get", "edited", "-o", "json"]));
    assert_eq!(sb["metadata"]["labels"]["team"], "infra", "{sb}");
    assert_eq!(sb["spec"]["resources"]["limits"]["cpu"], "500m", "{sb}");
    assert!(!server.warren(&["get", "draft"]).status.success());

    // Emptied: nothing is created, and it says so.
    let out = run_edited(&server, r#": > "$1""#, &["--name", "never"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("nothing created"), "{}", stderr(&out));
    assert!(!server.warren(&["get", "never"]).status.success());

    // A failing editor or a broken object: an error, nothing created.
    let out = run_edited(&server, "exit 3", &["--name", "never"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("editor"), "{}", stderr(&out));
    // The edits are kept, in a file the error names, whether the client or the server
    // refused them (here: a name taken by a different sandbox).
    for (script, flags) in [
        (
            r#"sed -i 's/cpu: 500m/cpu: lots/' "$1""#,
            ["--name", "never"],
        ),
        (
            r#"sed -i 's/^  name: .*/  name: edited/' "$1""#,
            ["--name", "other"],
        ),
    ] {
        let mut args = flags.to_vec();
        args.extend(["--cpu", "500m"]);
        let out = run_edited(&server, script, &args);
        assert_ne!(out.status.code(), Some(0));
        let err = stderr(&out);
        let kept = err
            .split("your edits are kept in ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("no kept file named: {err}"));
        let text = std::fs::read_to_string(kept).expect("the kept file");
        std::fs::remove_file(kept).expect("remove the kept file");
        assert!(
            err.contains("lots") || err.contains("already exists"),
            "{err}"
        );
        assert!(
            text.contains("cpu: lots") || text.contains("name: edited"),
            "{text}"
        );
    }
    assert!(!server.warren(&["get", "other"]).status.success());
    assert!(!server.warren(&["get", "never"]).status.success());
}

#[test]
fn reset_revision_recreates_the_sandbox() {
    let server = TestServer::start();
    server.ok(&["run", "--name", "rr", "--cpu", "250m"]);
    let before = json(&server.ok(&["get", "rr", "-o", "json"]));
    let old_path = resources_path(&server, "rr");
    assert!(old_path.exists());

    server.ok(&["update", "rr", "--reset-revision", "r1", "--cpu", "500m"]);
    let after = json(&server.ok(&["get", "rr", "-o", "json"]));
    assert_ne!(
        after["metadata"]["uid"], before["metadata"]["uid"],
        "{after}"
    );
    assert_eq!(after["status"]["phase"], "Running", "{after}");
    assert_eq!(after["spec"]["resetRevision"], "r1", "{after}");
    // The old sandbox's files are gone; the new one holds the new resources.
    assert!(!old_path.exists(), "{} left", old_path.display());
    let new_path = resources_path(&server, "rr");
    let json_file = json(&read(&new_path));
    assert_eq!(json_file["cpu_limit"], 0.5, "{json_file}");

    // The same token again changes nothing; a YAML with a new one re-creates again.
    server.ok(&["update", "rr", "--reset-revision", "r1"]);
    let same = json(&server.ok(&["get", "rr", "-o", "json"]));
    assert_eq!(same["metadata"]["uid"], after["metadata"]["uid"]);
    let mut object = same.clone();
    object["spec"]["resetRevision"] = "r2".into();
    object.as_object_mut().expect("object").remove("status");
    let file = server.dir.path().join("rr.yaml");
    std::fs::write(&file, serde_json::to_string(&object).expect("json")).expect("write yaml");
    server.ok(&["apply", "-f", file.to_str().expect("utf-8")]);
    let again = json(&server.ok(&["get", "rr", "-o", "json"]));
    assert_ne!(
        again["metadata"]["uid"], after["metadata"]["uid"],
        "{again}"
    );
    assert_eq!(again["status"]["phase"], "Running");
    assert!(!new_path.exists());

    // Survives a restart as the new sandbox.
    let mut server = server;
    server.kill9();
    server.spawn();
    let adopted = json(&server.ok(&["get", "rr", "-o", "json"]));
    assert_eq!(adopted["metadata"]["uid"], again["metadata"]["uid"]);
    assert_eq!(adopted["status"]["phase"], "Running", "{adopted}");
}

/// Started from a shell with a low open-file limit (1024 is common), the server raises it
/// to the hard limit: each sandbox holds files open in it.
#[test]
fn the_server_raises_its_open_file_limit() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new("prlimit")
        .arg("--nofile=256:")
        .arg("--")
        .arg(common::WARREN)
        .arg("server")
        .arg("--dir")
        .arg(dir.path().join("state"))
        .arg("--listen")
        .arg(format!("unix://{}/w.sock", dir.path().display()))
        .args(["--metrics-listen", "off"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prlimit (util-linux) runs warren server");
    let mut first = String::new();
    let read = std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut first);
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        read.is_ok() && first.starts_with("warren server listening on"),
        "{first:?}"
    );
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_else(|| panic!("{limits}"));
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers.len(), 2, "{line}");
    assert_ne!(numbers[0], "256", "not raised: {line}");
    assert_eq!(numbers[0], numbers[1], "soft is the hard limit: {line}");
}

/// What YAML can say but JSON cannot (`.nan`, `.inf`, a key twice) is refused by name,
/// never silently dropped; so is an expiry already past.
#[test]
fn apply_refuses_non_finite_numbers_duplicate_keys_and_past_expiries() {
    let server = TestServer::start();
    let cases = [
        (
            "sandbox",
            "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {name: a}\n\
             spec: {resources: {limits: {cpu: .inf}}}\n",
            ".inf is not a finite number",
        ),
        (
            "sandbox",
            "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {name: a}\n\
             spec: {timeoutSeconds: .nan}\n",
            ".nan is not a finite number",
        ),
        (
            "sandbox",
            "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {name: a, name: b}\n",
            "duplicate key \"name\"",
        ),
        (
            "sandbox",
            "apiVersion: warren.dev/v1\nkind: Sandbox\nmetadata: {name: a}\nspec: {expireTime: 1}\n",
            "spec.expireTime: \"1\" is in the past",
        ),
        (
            "policy",
            "apiVersion: warren.dev/v1\nkind: Policy\nmetadata: {name: p}\n\
             spec: {maxLifetimeSeconds: .nan}\n",
            ".nan is not a finite number",
        ),
        (
            "policy",
            "apiVersion: warren.dev/v1\nkind: Policy\nmetadata: {name: p}\n\
             spec: {mode: audit, mode: enforce}\n",
            "duplicate key \"mode\"",
        ),
    ];
    for (i, (what, text, want)) in cases.iter().enumerate() {
        let file = server.dir.path().join(format!("{i}.yaml"));
        std::fs::write(&file, text).expect("write");
        let f = file.to_str().expect("utf8");
        let args: &[&str] = if *what == "policy" {
            &["policy", "apply", "-f", f]
        } else {
            &["apply", "-f", f]
        };
        let out = server.warren(args);
        assert_ne!(out.status.code(), Some(0), "{text}");
        assert!(stderr(&out).contains(want), "{text}: {}", stderr(&out));
    }
    assert_eq!(server.ok(&["ls", "-o", "name"]), "");
    assert_eq!(server.ok(&["policy", "ls", "-o", "name"]), "");
    // Through the flags: an expiry under a second is refused before any call.
    for flag in ["0", "1ns", "999ms"] {
        let out = server.warren(&["run", "--name", "x", "--expire-in", flag]);
        assert_eq!(out.status.code(), Some(2), "{flag}");
        assert!(
            stderr(&out).contains("--expire-in") && stderr(&out).contains("at least 1s"),
            "{}",
            stderr(&out)
        );
    }
    server.ok(&["run", "--name", "kept"]);
    let out = server.warren(&["update", "kept", "--expire-in", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(server.ok(&["ls", "-o", "name"]), "kept\n");

    // `watch` prints the formats it accepts: its first event here is kept's ADDED.
    for (format, want) in [
        ("name", vec!["kept"]),
        ("yaml", vec!["---", "object:", "sequence:", "type: ADDED"]),
    ] {
        let mut watch = std::process::Command::new(common::WARREN)
            .args(["watch", "-o", format])
            .env("WARREN_SERVER", &server.address)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("watch");
        let rx = common::lines_of(watch.stdout.take().expect("stdout"));
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !want
            .iter()
            .all(|w| seen.iter().any(|l: &String| l.starts_with(w)))
        {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        let _ = watch.kill();
        let _ = watch.wait();
        for w in &want {
            assert!(
                seen.iter().any(|l| l.starts_with(w)),
                "-o {format}: {seen:?}"
            );
        }
        if format == "name" {
            assert_eq!(seen[0], "kept", "{seen:?}");
        }
    }
}

/// A stop or delete holds its sandbox for the grace period, so it is bounded as a sandbox's
/// own setting is (an hour), by the CLI and by the server.
#[test]
fn grace_periods_are_bounded() {
    let server = TestServer::start();
    server.ok(&["run", "--name", "g"]);
    for args in [
        ["stop", "-t", "3601", "g"],
        ["rm", "--grace", "4294967295", "g"],
    ] {
        let out = server.warren(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&out).contains("for '--grace <GRACE>'") && stderr(&out).contains("0..=3600"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    with_client(&server.address, async |mut client| {
        let err = client
            .stop_sandbox(v1::StopSandboxRequest {
                name: "g".into(),
                grace_period_seconds: Some(u32::MAX),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "grace_period_seconds: 4294967295 must be from 0 to 3600"
        );
        let err = client
            .delete_sandbox(v1::DeleteSandboxRequest {
                name: "g".into(),
                grace_period_seconds: Some(3601),
                id: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    });
    // `--time` is docker's spelling; the sandbox is still there to stop.
    server.ok(&["stop", "--time", "0", "g"]);
    server.ok(&["rm", "--grace", "3600", "g"]);
}

/// An exec's command, env and working directory are checked as a spec's are, before any
/// backend sees them (a NUL would cut the string short at `execve`).
#[test]
fn exec_requests_are_checked_naming_the_field() {
    let server = TestServer::start();
    server.ok(&["run", "--name", "x"]);
    let start = |edit: &dyn Fn(&mut v1::ExecStart)| {
        let mut start = v1::ExecStart {
            name: "x".into(),
            command: vec!["true".into()],
            ..Default::default()
        };
        edit(&mut start);
        start
    };
    let cases: Vec<(v1::ExecStart, &str)> = vec![
        (
            start(&|s| s.command.push("a\0b".into())),
            r#"exec: command[1]: "a\0b" contains a NUL character"#,
        ),
        (
            start(&|s| {
                s.env.insert("A=B".into(), "1".into());
            }),
            r#"exec: env: "A=B" is not a variable name"#,
        ),
        (
            start(&|s| {
                s.env.insert("A".into(), "1\0x".into());
            }),
            r#"exec: env["A"]: "1\0x" contains a NUL character"#,
        ),
        (
            start(&|s| s.working_dir = Some("rel/dir".into())),
            r#"exec: workingDir: "rel/dir" must be an absolute path"#,
        ),
    ];
    with_client(&server.address, async |mut client| {
        for (start, said) in cases {
            let first = v1::ExecInput {
                input: Some(v1::exec_input::Input::Start(start)),
            };
            let err = client
                .exec(tokio_stream::iter(vec![first]))
                .await
                .map(drop)
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{said}: {err}");
            assert!(err.message().starts_with(said), "{said}: {}", err.message());
        }
    });
}

/// Wasm limits under which every Wasm run would fail are usage errors at start, naming the
/// flag and the value; 0 stays allowed where it means something (unlimited cache).
#[test]
fn wasm_limits_that_fail_every_run_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir_arg = dir.path().to_str().expect("utf-8 temp dir");
    // Without a token this server would stop at binding (code 1), after the flags' checks,
    // so a flag let through fails the test instead of starting a server.
    let serve = |flag: &str, value: &str| {
        let mut c = std::process::Command::new(common::WARREN);
        c.args(["server", "--listen", "tcp://127.0.0.1:0", "--dir", dir_arg])
            .args([flag, value])
            .env_remove("WARREN_TOKEN");
        common::run_with_stdin(c, None)
    };
    for (flag, value, said) in [
        ("--wasm-pool", "0", "'0' for '--wasm-pool"),
        ("--wasm-fuel", "0", "'0' for '--wasm-fuel"),
        (
            "--wasm-max-memory",
            "0",
            "--wasm-max-memory: \"0\" is less than one Wasm page",
        ),
        (
            "--wasm-max-memory",
            "65535",
            "--wasm-max-memory: \"65535\" is less than one Wasm page",
        ),
        (
            "--wasm-timeout",
            "0s",
            "--wasm-timeout: 0s would end every Wasm sandbox",
        ),
        (
            "--restore-timeout",
            "500ms",
            "--restore-timeout: 500ms would kill CRIU before any restore could finish",
        ),
    ] {
        let out = serve(flag, value);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{flag} {value}: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains(said),
            "{flag} {value}: {}",
            stderr(&out)
        );
    }
    for (flag, value) in [
        ("--wasm-cache-size", "0"),
        ("--wasm-max-memory", "64Ki"),
        ("--restore-timeout", "1s"),
    ] {
        let out = serve(flag, value);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{flag} {value}: {}",
            stderr(&out)
        );
        assert!(stderr(&out).contains("needs a token"), "{}", stderr(&out));
    }
}

/// Concurrent `warren update`s of one sandbox without --revision all land: one that meets
/// another under way tries again rather than failing with ABORTED.
#[test]
fn concurrent_updates_without_a_revision_all_land() {
    let server = TestServer::start();
    server.ok(&["run", "--name", "shared", "--cpu", "100m"]);
    let outs: Vec<_> = std::thread::scope(|s| {
        let runs: Vec<_> = (0..20)
            .map(|i| {
                let server = &server;
                s.spawn(move || {
                    let label = format!("k{i}=v");
                    // Every fifth merges a resource onto the live set, pinned to its revision.
                    let mut args = vec!["update", "shared", "-l", label.as_str()];
                    if i % 5 == 0 {
                        args.extend(["--memory", "64Mi"]);
                    }
                    server.warren(&args)
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for out in &outs {
        assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    }
    let got = json(&server.ok(&["get", "shared", "-o", "json"]));
    let labels = got["metadata"]["labels"].as_object().unwrap();
    assert_eq!(labels.len(), 20, "{labels:?}");
    assert_eq!(got["spec"]["resources"]["limits"]["cpu"], "100m", "{got}");
}
