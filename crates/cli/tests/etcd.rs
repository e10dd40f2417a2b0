//! `warren server --store etcd://...` with real etcd and real server processes: records
//! survive restarts, an unreachable store fails creates cleanly, two servers elect a leader,
//! the standby takes over from a leader killed with -9 during 500 strong creates without
//! losing or doubling any acknowledged one, a deposed leader's writes are refused, agents'
//! registrations live under leases across a fail-over, and fast creates lost with an
//! unreachable store are removed by the agent's janitor.

#![allow(clippy::unwrap_used)] // a panic is how a test fails (and the shared harnesses')

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[allow(unused_macros)] // linux_or_skip: the linux backend is one part of one test here
#[path = "common/linux.rs"]
mod linux_harness;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cluster::{TestAgent, eventually, node_state};
use common::{TestServer, http_get, json, stderr};
use warren_control::Address;
use warren_control::client::{self, Failover};
use warren_control::store::testing::EtcdServer;
use warren_proto::{spec_to_pb, v1};
use warren_spec::{Consistency, SandboxSpec};

const TOKEN: &str = "etcd-test-token";

fn on_etcd(etcd: &EtcdServer, ttl: &str) -> Vec<String> {
    ["--store", &etcd.url(), "--leader-ttl", ttl]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn start(etcd: &EtcdServer, ttl: &str) -> TestServer {
    let args = on_etcd(etcd, ttl);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    TestServer::start_with(&args, Some(TOKEN))
}

fn readyz(server: &TestServer) -> u16 {
    let url = server
        .metrics
        .as_deref()
        .expect("metrics address")
        .replace("/metrics", "/readyz");
    http_get(&url).0
}

/// Waits until `warren info` answers on this server (it leads and has recovered).
fn wait_leading(server: &TestServer, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let out = server.warren(&["info"]);
        if out.status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "server did not lead within {within:?}: {}\nlog:\n{}",
            stderr(&out),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn strong(name: &str) -> v1::CreateSandboxRequest {
    let spec = SandboxSpec {
        name: name.to_string(),
        consistency: Some(Consistency::Strong),
        ..SandboxSpec::default()
    };
    v1::CreateSandboxRequest {
        spec: Some(spec_to_pb(&spec)),
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn store_flag_errors_name_the_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (bad, want) in [
        ("mysql://db:3306", "mysql://db:3306"),
        ("etcd://", "etcd://"),
        ("etcd://nohost", "nohost"),
        ("redb:", "redb:"),
    ] {
        let out = std::process::Command::new(common::WARREN)
            .args(["server", "--dir"])
            .arg(dir.path())
            .args(["--listen"])
            .arg(format!("unix://{}/w.sock", dir.path().display()))
            .args(["--metrics-listen", "off", "--store", bad])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("--store") && err.contains(want),
            "{bad}: {err}"
        );
    }
    // Nothing listens there: a clear error naming the endpoint, quickly.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let started = Instant::now();
    let out = std::process::Command::new(common::WARREN)
        .args(["server", "--dir"])
        .arg(dir.path())
        .args(["--listen"])
        .arg(format!("unix://{}/w.sock", dir.path().display()))
        .args(["--metrics-listen", "off", "--store"])
        .arg(format!("etcd://127.0.0.1:{port}"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn a_server_on_etcd_recovers_its_records_after_a_restart() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let mut server = start(&etcd, "3s");
    wait_leading(&server, Duration::from_secs(10));
    let info = server.ok(&["info"]);
    assert!(info.contains(&etcd.url()), "info shows the store: {info}");
    server.ok(&["run", "--name", "s1", "--mode", "strong", "--cpu", "1"]);
    server.ok(&["run", "--name", "s2", "--mode", "strong", "-l", "app=x"]);
    server.ok(&["run", "--name", "f1"]);
    // A fast create is written behind: wait for its commit before the kill.
    eventually(Duration::from_secs(10), "f1's record is written", || {
        etcd_get(&etcd, "sandboxes/f1").is_some()
    });
    server.kill9();
    server.spawn();
    wait_leading(&server, Duration::from_secs(15));
    let listed = json(&server.ok(&["ls", "-o", "json"]));
    let names: BTreeSet<String> = listed["items"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        names,
        ["f1", "s1", "s2"].iter().map(|s| s.to_string()).collect()
    );
    let s2 = json(&server.ok(&["get", "s2", "-o", "json"]));
    assert_eq!(s2["status"]["phase"], "Running", "{s2}");
    assert_eq!(s2["metadata"]["labels"]["app"], "x");
    // The records are etcd's, under warren/sandboxes/.
    if let Ok(out) = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &etcd.endpoint(),
            "get",
            "--prefix",
            "--keys-only",
        ])
        .arg("warren/sandboxes/")
        .output()
    {
        let keys = String::from_utf8_lossy(&out.stdout);
        assert!(keys.contains("warren/sandboxes/s1"), "{keys}");
    }
    server.ok(&["rm", "s1"]);
    server.terminate();
    server.spawn();
    wait_leading(&server, Duration::from_secs(15));
    let out = server.warren(&["get", "s1"]);
    assert!(!out.status.success(), "s1 was deleted");
}

#[test]
fn an_unreachable_store_fails_creates_cleanly() {
    let Some(mut etcd) = EtcdServer::start() else {
        return;
    };
    // A long lease, so the server stays leader while etcd is away for a few seconds.
    let server = start(&etcd, "60s");
    wait_leading(&server, Duration::from_secs(10));
    server.ok(&["run", "--name", "before", "--mode", "strong"]);
    assert_eq!(readyz(&server), 200);
    etcd.pause();

    let started = Instant::now();
    let out = server.warren(&["run", "--name", "strong1", "--mode", "strong"]);
    let took = started.elapsed();
    assert!(!out.status.success(), "a strong create needs the store");
    let err = stderr(&out);
    assert!(
        err.contains(&etcd.endpoint()) && err.contains("unreachable"),
        "{err}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
    let out = server.warren(&["get", "strong1"]);
    assert!(
        !out.status.success(),
        "nothing is left of a failed strong create"
    );
    assert_eq!(readyz(&server), 503, "not ready while etcd is away");

    // A fast create is acknowledged before its record is written; the write fails, and
    // the sandbox is removed again (no record, no sandbox).
    let started = Instant::now();
    let out = server.warren(&["run", "--name", "fast1", "-o", "json"]);
    // (A create that waited for the store would wait for its 10 s of retries.)
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fast does not wait"
    );
    if out.status.success() {
        let path =
            json(&String::from_utf8_lossy(&out.stdout))["status"]["backendInfo"]["resources_path"]
                .as_str()
                .map(std::path::PathBuf::from);
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.warren(&["get", "fast1"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "an unpersisted fast create was not removed"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Some(path) = path {
            assert!(!path.exists(), "{} is left", path.display());
        }
    }

    etcd.resume();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = server.warren(&["run", "--name", "after", "--mode", "strong"]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {}", stderr(&out));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(readyz(&server), 200);
    server.ok(&["get", "before"]);
}

/// The test: two servers on one etcd; kill -9 the leader during 500 strong-mode
/// creates; the standby takes over; every acknowledged create is present, none duplicated.
#[test]
fn the_standby_takes_over_from_a_killed_leader_during_500_strong_creates() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let mut a = start(&etcd, "2s");
    wait_leading(&a, Duration::from_secs(10));
    let b = start(&etcd, "2s");
    // The standby refuses every call, naming the leader, and is not ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = b.warren(&["ls"]);
        assert!(!out.status.success(), "a standby serves nothing");
        if stderr(&out).contains(&format!("the leader is {}", a.address)) {
            break;
        }
        assert!(Instant::now() < deadline, "no hint: {}", stderr(&out));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(readyz(&b), 503);
    assert_eq!(readyz(&a), 200);
    // A client given both finds the leader, whichever comes first.
    let both = format!("{},{}", b.address, a.address);
    let out = std::process::Command::new(common::WARREN)
        .args(["info"])
        .env("WARREN_SERVER", &both)
        .env("WARREN_TOKEN", TOKEN)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));

    let addresses: Vec<Address> = [&a.address, &b.address]
        .iter()
        .map(|s| s.parse().expect("address"))
        .collect();
    let total = 500;
    let workers = 4;
    let acked = Arc::new(AtomicUsize::new(0));
    let rt = runtime();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let addresses = addresses.clone();
            let acked = acked.clone();
            rt.spawn(async move {
                let mut failover = Failover::new(addresses, Some(TOKEN.to_string()));
                failover.patience = Duration::from_secs(60);
                let mut mine = BTreeMap::new();
                for i in (w..total).step_by(workers) {
                    let name = format!("s-{i:03}");
                    let request = strong(&name);
                    let reply = failover
                        .call(|mut c| {
                            let request = request.clone();
                            async move { c.create_sandbox(request).await }
                        })
                        .await;
                    match reply {
                        Ok(r) => {
                            let sb = r.into_inner().sandbox.unwrap_or_default();
                            mine.insert(name, sb.id);
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(s) => panic!("create {name} failed for good: {s}"),
                    }
                }
                (mine, failover.retries)
            })
        })
        .collect();
    // Kill the leader a third of the way in.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < total / 3 {
        assert!(Instant::now() < deadline, "creates are too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    let at_kill = acked.load(Ordering::SeqCst);
    let killed = Instant::now();
    a.kill9();
    let mut acknowledged = BTreeMap::new();
    let mut retries = 0;
    for h in handles {
        let (mine, r) = rt.block_on(h).expect("worker");
        acknowledged.extend(mine);
        retries += r;
    }
    let took_over = killed.elapsed();
    eprintln!(
        "acknowledged {} creates ({at_kill} before the kill), {retries} retried; all done {took_over:?} after the kill",
        acknowledged.len()
    );
    assert!(at_kill < total, "the kill came after the last create");
    assert!(
        retries > 0,
        "no call was retried: the fail-over was not exercised"
    );
    assert_eq!(acknowledged.len(), total);

    // The new leader has each acknowledged create exactly once, Running.
    let listed = json(&b.ok(&["ls", "-o", "json"]));
    let mut seen = BTreeMap::new();
    for obj in listed["items"].as_array().expect("array") {
        let name = obj["metadata"]["name"].as_str().expect("name").to_string();
        assert_eq!(obj["status"]["phase"], "Running", "{obj}");
        *seen.entry(name).or_insert(0) += 1;
    }
    for name in acknowledged.keys() {
        assert_eq!(
            seen.get(name),
            Some(&1),
            "{name} is not present exactly once"
        );
    }
    assert_eq!(seen.len(), total, "no create beyond the acknowledged ones");
    // And one slot sandbox each on the new leader's node: no double made by a retry.
    let slot = b.state_dir().join("slot");
    let dirs = std::fs::read_dir(&slot)
        .expect("slot dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("resources.json").exists())
        .count();
    assert_eq!(dirs, total, "slot sandboxes on the new leader");
    // And what was acknowledged before the kill kept its identity (adopted, not re-made).
    let s0 = json(&b.ok(&["get", "s-000", "-o", "json"]));
    assert_eq!(
        s0["metadata"]["uid"].as_str(),
        acknowledged.get("s-000").map(String::as_str),
        "{s0}"
    );
}

#[test]
fn a_deposed_leader_stops_writing_and_exits() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let mut a = start(&etcd, "2s");
    wait_leading(&a, Duration::from_secs(10));
    a.ok(&["run", "--name", "kept", "--mode", "strong"]);
    let b = start(&etcd, "2s");
    // Freeze the leader past its lease: the standby takes over.
    let pid = a.pid().to_string();
    let status = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let frozen = Instant::now();
    wait_leading(&b, Duration::from_secs(15));
    eprintln!("standby took over {:?} after the freeze", frozen.elapsed());
    b.ok(&["get", "kept"]);
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    // The old leader refuses writes at once (its fence is gone) and exits.
    let out = a.warren(&["run", "--name", "stale", "--mode", "strong"]);
    assert!(!out.status.success(), "a deposed leader accepted a create");
    let status = {
        let deadline = Instant::now() + Duration::from_secs(15);
        let child = a.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the deposed leader did not exit:\n{}",
                a.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert!(!status.success());
    assert!(a.log().contains("lost leadership"), "{}", a.log());
    let out = b.warren(&["get", "stale"]);
    assert!(
        !out.status.success(),
        "the stale leader's create reached etcd"
    );
    // A client that still names the old leader first is sent to the new one.
    let both = format!("{},{}", a.address, b.address);
    let out = std::process::Command::new(common::WARREN)
        .args(["run", "--name", "via-list", "--mode", "strong"])
        .env("WARREN_SERVER", &both)
        .env("WARREN_TOKEN", TOKEN)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", stderr(&out));
    b.ok(&["get", "via-list"]);
    let _ = client::parse_servers(&both).expect("list");
}

/// A key in etcd (under warren's root): its value and lease, if it exists.
fn etcd_get(etcd: &EtcdServer, key: &str) -> Option<(Vec<u8>, i64)> {
    runtime().block_on(async {
        let store = warren_control::store::EtcdStore::open(&[etcd.endpoint()])
            .await
            .expect("open etcd");
        store.get_leased(key).await.expect("read a key")
    })
}

/// The registration key of agent `node` in etcd: its lease id, if the key exists.
fn registration_lease(etcd: &EtcdServer, node: &str) -> Option<i64> {
    let key = format!("{}{node}", warren_control::registrations::PREFIX);
    etcd_get(etcd, &key).map(|(value, lease)| {
        let text = String::from_utf8_lossy(&value);
        assert!(!text.contains(TOKEN), "the token is in the key: {text}");
        lease
    })
}

/// Registrations live in etcd under leases renewed by the agents' heartbeats: the standby
/// that takes over from a leader killed with -9 loads them and has the agents Up before
/// they heartbeat to it (its log says how many it loaded), keeps their sandboxes (not Lost,
/// not re-created, not reaped), and an agent killed later is Lost once its lease expires
/// (its key gone), not before.
#[test]
fn agents_follow_the_leader_and_keep_their_sandboxes_across_a_fail_over() {
    let Some(etcd) = EtcdServer::start() else {
        return;
    };
    let start = |etcd: &EtcdServer| {
        let mut args = on_etcd(etcd, "2s");
        args.extend(["--local-capacity", "0", "--agent-timeout", "3s"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        TestServer::start_with(&args, Some(TOKEN))
    };
    let mut a = start(&etcd);
    wait_leading(&a, Duration::from_secs(10));
    let b = start(&etcd);
    // The standby first: the agent follows its refusal's hint to the leader. A short
    // orphan timeout: a janitor that took the fail-over for "unknown" would show at once.
    let both = format!("{},{}", b.address, a.address);
    let mut agent = TestAgent::prepare(&a, "edge", &[], "127.0.0.1:0", &["--orphan-timeout", "1s"])
        .with_servers(&both);
    agent.spawn(TOKEN);
    eventually(Duration::from_secs(10), "edge registered", || {
        node_state(&a, "edge") == "Up"
    });
    for i in 0..3 {
        a.ok(&["run", "--name", &format!("e{i}"), "--mode", "strong"]);
    }
    let ids_before = agent.slot_ids();
    assert_eq!(ids_before.len(), 3, "{}", agent.log());
    // A second agent, with nothing on it.
    let mut idle = TestAgent::prepare(&a, "idle", &[], "127.0.0.1:0", &[]).with_servers(&both);
    idle.spawn(TOKEN);
    eventually(
        Duration::from_secs(10),
        "the agents registered with the leader, in etcd",
        || {
            ["edge", "idle"]
                .iter()
                .all(|n| node_state(&a, n) == "Up" && registration_lease(&etcd, n).is_some())
        },
    );
    let idle_lease = registration_lease(&etcd, "idle");

    a.kill9();
    wait_leading(&b, Duration::from_secs(15));
    // Loaded from their keys, which the agents' heartbeats to the standby kept alive
    // through the fail-over (the leader TTL, 2 s, plus recovery: about the lease's 3 s).
    assert!(
        b.log()
            .lines()
            .any(|l| l.contains("agent registrations loaded from etcd") && l.contains("agents=2")),
        "new leader's log:\n{}",
        b.log()
    );
    assert_eq!(node_state(&b, "edge"), "Up");
    assert_eq!(node_state(&b, "idle"), "Up");
    assert_eq!(
        registration_lease(&etcd, "idle"),
        idle_lease,
        "the same lease, renewed through the fail-over"
    );
    for i in 0..3 {
        let got = json(&b.ok(&["get", &format!("e{i}"), "-o", "json"]));
        assert_eq!(got["status"]["phase"], "Running", "{got}");
        assert_eq!(got["status"]["node"], "edge", "{got}");
    }
    // Past the orphan timeout: the agent's janitor asks the new leader and keeps them.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(agent.slot_ids(), ids_before, "agent log:\n{}", agent.log());
    assert!(
        agent.log().contains("registered with the control plane"),
        "{}",
        agent.log()
    );
    // An agent killed now is Lost once etcd expires its lease (TTL = --agent-timeout, 3 s),
    // and not before.
    idle.kill9();
    let killed = Instant::now();
    eventually(Duration::from_secs(10), "the killed agent is Lost", || {
        node_state(&b, "idle") == "Lost"
    });
    let took = killed.elapsed();
    // Its last renewal was at most one heartbeat interval (750 ms) before the kill, or a
    // late one more on a loaded machine: well over a second of its 3 s remains.
    assert!(
        took >= Duration::from_millis(1200),
        "lost after {took:?}, before its lease could expire"
    );
    assert_eq!(registration_lease(&etcd, "idle"), None, "its key is gone");
    assert!(
        b.log().contains("agent's registration expired"),
        "{}",
        b.log()
    );
    eprintln!("agent killed -> Lost on etcd lease expiry: {took:?} (lease TTL 3 s)");
    assert_eq!(node_state(&b, "edge"), "Up");
    // And the new leader places new sandboxes on the agent that lives.
    b.ok(&["run", "--name", "after", "--mode", "strong"]);
    let got = json(&b.ok(&["get", "after", "-o", "json"]));
    assert_eq!(got["status"]["node"], "edge", "{got}");
}

/// Fast-mode creates acknowledged while etcd is unreachable (SIGSTOP), then the leader dies
/// before its writes behind land: the records that never persisted leave orphans on the
/// agent. (The first write may already be in etcd's socket when it stops, and land when it
/// resumes; the others wait behind it in the leader's queue and die with it.) Once a server
/// leads again, the agent's janitor removes the orphans (their files gone, each removal
/// logged) within the orphan timeout, and keeps every sandbox whose record persisted.
/// Every sandbox the agent holds: slot ones (files) and linux ones (bundles), by id.
fn held(agent: &TestAgent) -> Vec<String> {
    let mut ids = agent.slot_ids();
    if let Ok(dir) = std::fs::read_dir(agent.state_dir().join("linux")) {
        ids.extend(
            dir.flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| !n.starts_with('.')),
        );
    }
    ids.sort();
    ids
}

/// Whether a process runs `sleep SECONDS` (each test sandbox sleeps a number of its own).
fn sleeping(seconds: u32) -> bool {
    let wanted = format!("sleep\0{seconds}\0");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).ends_with(&wanted))
        })
}

#[test]
fn fast_creates_lost_with_an_unreachable_store_are_removed_by_the_janitor() {
    if let Some(reason) = linux_harness::skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let Some(mut etcd) = EtcdServer::start() else {
        return;
    };
    let start = |etcd: &EtcdServer, leader_ttl: &str| {
        let mut args = on_etcd(etcd, leader_ttl);
        args.extend(["--local-capacity", "0"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        TestServer::start_with(&args, Some(TOKEN))
    };
    // `a` keeps its leadership for 4 to 6 s once the store stops answering (a keep-alive
    // every third of the TTL; lost after a whole TTL without one): the creates while it is
    // paused must all land before that, on a machine maybe loaded.
    let mut a = start(&etcd, "6s");
    wait_leading(&a, Duration::from_secs(10));
    let b = start(&etcd, "2s");
    let orphan_timeout = Duration::from_secs(2);
    let cgroups = linux_harness::Cgroups(format!("warren-it-orphans-{}", std::process::id()));
    let mut agent = TestAgent::prepare(
        &a,
        "edge",
        &[],
        "127.0.0.1:0",
        &[
            "--orphan-timeout",
            "2s",
            "--capacity",
            "20",
            "--cgroup-parent",
            &cgroups.0,
        ],
    )
    .with_servers(&format!("{},{}", b.address, a.address));
    linux_harness::import_busybox(agent.dir.path(), &agent.state_dir().join("images"));
    agent.spawn(TOKEN);
    eventually(Duration::from_secs(10), "the agent registered", || {
        node_state(&a, "edge") == "Up"
    });
    let rt = runtime();
    let address: Address = a.address.parse().expect("address");
    let client = rt
        .block_on(client::connect(&address, Some(TOKEN)))
        .expect("connect");
    // A linux sandbox sleeps `sleep` seconds (a process to look for); else a slot one.
    let create = |name: &str, sleep: Option<u32>| {
        let mut c = client.clone();
        let mut spec = SandboxSpec {
            name: name.to_string(),
            consistency: Some(Consistency::Fast),
            ..SandboxSpec::default()
        };
        if let Some(seconds) = sleep {
            spec.backend = warren_spec::BackendKind::Linux;
            spec.image = Some("busybox".into());
            spec.command = vec!["sleep".into(), seconds.to_string()];
        }
        let req = v1::CreateSandboxRequest {
            spec: Some(spec_to_pb(&spec)),
            ..Default::default()
        };
        rt.block_on(c.create_sandbox(req)).map(|_| ())
    };
    for i in 0..5 {
        let sleep = (i == 4).then_some(7100);
        create(&format!("kept-{i}"), sleep).expect("a fast create");
    }
    eventually(
        Duration::from_secs(10),
        "the kept records persisted",
        || (0..5).all(|i| etcd_get(&etcd, &format!("sandboxes/kept-{i}")).is_some()),
    );
    let kept = held(&agent);
    assert_eq!(kept.len(), 5, "{}", agent.log());
    eventually(
        Duration::from_secs(10),
        "the kept linux sandbox runs",
        || sleeping(7100),
    );

    // The store stops answering; fast creates are still acknowledged (agent first, the
    // record written behind), and the leader dies before any of those writes lands.
    etcd.pause();
    let paused = Instant::now();
    // name -> (id, what its process sleeps if it is a linux sandbox)
    let mut ids: BTreeMap<String, (String, Option<u32>)> = BTreeMap::new();
    for i in 0..6 {
        let before = held(&agent);
        let name = format!("late-{i}");
        let sleep = (i % 2 == 1).then_some(7200 + i);
        create(&name, sleep).expect("a fast create is acknowledged without the store");
        let new: Vec<String> = held(&agent)
            .into_iter()
            .filter(|id| !before.contains(id))
            .collect();
        assert_eq!(new.len(), 1, "{new:?}");
        ids.insert(name, (new[0].clone(), sleep));
    }
    assert!(
        paused.elapsed() < Duration::from_secs(4),
        "fast creates waited for the store: {:?}",
        paused.elapsed()
    );
    a.kill9();
    etcd.resume();
    assert_eq!(held(&agent).len(), 11, "{}", agent.log());
    for (_, sleep) in ids.values() {
        if let Some(s) = sleep {
            eventually(Duration::from_secs(10), "a late linux sandbox runs", || {
                sleeping(*s)
            });
        }
    }

    wait_leading(&b, Duration::from_secs(20));
    let leading = Instant::now();
    let (persisted, orphans): (Vec<_>, Vec<_>) = ids
        .iter()
        .partition(|(name, _)| etcd_get(&etcd, &format!("sandboxes/{name}")).is_some());
    assert!(
        orphans.len() >= 3,
        "writes queued behind a hung store landed after the leader died: {persisted:?}"
    );
    let mut expected = kept.clone();
    expected.extend(persisted.iter().map(|(_, (id, _))| id.to_string()));
    expected.sort();
    // Each orphan is older than the timeout by now: the first janitor pass that reaches
    // the new leader (every half timeout) removes it.
    // (Its link may first ask the dead leader and pass the turn: one pass more.)
    eventually(
        orphan_timeout * 2 + Duration::from_secs(1),
        "the janitor removed the orphans and only them",
        || held(&agent) == expected,
    );
    let took = leading.elapsed();
    eprintln!(
        "{} orphans of unpersisted fast creates removed {took:?} after a leader served ({} late records persisted)",
        orphans.len(),
        persisted.len()
    );
    // The janitor deletes orphans one after another and logs each once it is done: the
    // files can be gone a moment before the last one's process is reaped and logged.
    for (_, (id, sleep)) in &orphans {
        if let Some(s) = sleep {
            eventually(
                Duration::from_secs(10),
                &format!("the orphan's process (sleep {s}) is gone"),
                || !sleeping(*s),
            );
        }
        eventually(
            Duration::from_secs(10),
            &format!("the janitor logged the removal of {id}"),
            || {
                agent
                    .log()
                    .lines()
                    .any(|l| l.contains("janitor: removed an orphan") && l.contains(id.as_str()))
            },
        );
    }
    let log = agent.log();
    let removals = log
        .lines()
        .filter(|l| l.contains("janitor: removed an orphan"))
        .count();
    assert_eq!(removals, orphans.len(), "{log}");
    for i in 0..5 {
        let got = json(&b.ok(&["get", &format!("kept-{i}"), "-o", "json"]));
        assert_eq!(got["status"]["phase"], "Running", "{got}");
    }
    for (name, _) in &persisted {
        let got = json(&b.ok(&["get", name, "-o", "json"]));
        assert_eq!(got["status"]["phase"], "Running", "{got}");
    }
    for (name, _) in &orphans {
        let out = b.warren(&["get", name]);
        assert!(!out.status.success(), "an unpersisted create is unknown");
    }
    // And the persisted ones stay, past another orphan timeout, processes included.
    std::thread::sleep(orphan_timeout + Duration::from_millis(500));
    assert_eq!(held(&agent), expected, "{}", agent.log());
    assert!(sleeping(7100), "the kept linux sandbox's process");
    for (_, sleep) in persisted.iter().map(|(_, v)| v) {
        if let Some(s) = sleep {
            assert!(sleeping(*s), "a persisted linux sandbox's process");
        }
    }
}
