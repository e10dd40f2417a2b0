//! Several nodes for real: three `warren agent` processes, each in its own network namespace
//! joined to a bridge by a veth pair (198.18.0.0/24, the benchmarking range), and a server
//! on the bridge's address with a token, its state in a real etcd the test starts (issue 7:
//! "one server with etcd"; the agents' registrations live there under leases, so a killed
//! agent is lost when its lease expires). The embedded store's cluster path is covered by
//! agent.rs and pools.rs. Needs root (network namespaces) and etcd
//! (`scripts/install-etcd.sh`); removes every namespace, veth, bridge, process and etcd data
//! dir it made, pass or fail.
//!
//! The tests here run one at a time (one subnet, one bridge address).

#![allow(clippy::unwrap_used)] // a panic is how a test fails

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cluster::{Netns, TestAgent, eventually, http};
use common::{TestServer, http_get, json};
use warren_control::store::testing::EtcdServer;
use warren_proto::{spec_to_pb, v1};
use warren_spec::{FailurePolicy, PortSpec, Protocol, SandboxSpec};

const TOKEN: &str = "netns-t0k3n";
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Agents first, so they go before the server, its etcd and the namespaces they run in.
struct Cluster {
    agents: Vec<TestAgent>,
    server: TestServer,
    #[allow(dead_code)] // kept for its Drop: after the server
    etcd: EtcdServer,
    #[allow(dead_code)] // kept for its Drop: the namespaces go last
    net: Netns,
}

/// A server on the bridge, on `etcd`, and one agent per capacity in its own namespace;
/// `image_on` gets a busybox image in its store before it starts.
fn cluster(
    etcd: EtcdServer,
    capacities: &[u32],
    image_on: Option<usize>,
    extra_agent: &[&str],
) -> Cluster {
    let net = Netns::create(capacities.len());
    let server = TestServer::start_on(
        &format!("tcp://{}:0", Netns::BRIDGE_IP),
        &[
            "--local-capacity",
            "0",
            "--agent-timeout",
            "1500ms",
            "--store",
            &etcd.url(),
        ],
        Some(TOKEN),
    );
    eventually(Duration::from_secs(15), "the server leads on etcd", || {
        server.warren(&["info"]).status.success()
    });
    let mut agents = Vec::new();
    for (i, cap) in capacities.iter().enumerate() {
        let cap = cap.to_string();
        let listen = format!("{}:5758", Netns::ip(i));
        let mut flags = vec!["--capacity", cap.as_str()];
        flags.extend_from_slice(extra_agent);
        let mut agent = TestAgent::prepare(
            &server,
            &format!("agent-{i}"),
            &net.exec(i),
            &listen,
            &flags,
        );
        if image_on == Some(i) {
            let layout =
                warren_image::testing::busybox_layout(agent.dir.path(), "busybox").unwrap();
            let store = warren_image::ImageStore::open(&agent.state_dir().join("images")).unwrap();
            store.import(&layout, None).unwrap();
        }
        agent.spawn(TOKEN);
        agents.push(agent);
    }
    let c = Cluster {
        agents,
        server,
        etcd,
        net,
    };
    eventually(Duration::from_secs(10), "every agent registered", || {
        let nodes = json(&c.server.ok(&["nodes", "-o", "json"]));
        let up = nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["state"] == "Up" && n["local"] == false)
            .count();
        up == capacities.len()
    });
    c
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Creates every spec, 16 at a time; the status of each create, in order.
fn create_all(server: &TestServer, specs: Vec<SandboxSpec>) -> Vec<Result<(), tonic::Status>> {
    runtime().block_on(async {
        let address = server.address.parse().unwrap();
        let client = warren_control::client::connect(&address, Some(TOKEN))
            .await
            .unwrap();
        let mut results = Vec::new();
        for chunk in specs.chunks(16) {
            let calls = chunk.iter().map(|spec| {
                let mut c = client.clone();
                let req = v1::CreateSandboxRequest {
                    spec: Some(spec_to_pb(spec)),
                    ..Default::default()
                };
                async move { c.create_sandbox(req).await.map(|_| ()) }
            });
            results.extend(futures::future::join_all(calls).await);
        }
        results
    })
}

fn spec(name: &str) -> SandboxSpec {
    SandboxSpec {
        name: name.into(),
        ..Default::default()
    }
}

/// Every sandbox: name -> (node, phase, host ports).
fn sandboxes(server: &TestServer) -> BTreeMap<String, (String, String, Vec<u64>)> {
    let list = json(&server.ok(&["ls", "-o", "json"]));
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ports = s["spec"]["ports"]
                .as_array()
                .map(|p| p.iter().filter_map(|p| p["hostPort"].as_u64()).collect())
                .unwrap_or_default();
            (
                s["metadata"]["name"].as_str().unwrap().to_string(),
                (
                    s["status"]["node"].as_str().unwrap().to_string(),
                    s["status"]["phase"].as_str().unwrap().to_string(),
                    ports,
                ),
            )
        })
        .collect()
}

/// The test's etcd, or `None` (said loudly) when network namespaces or etcd are missing.
fn prerequisites() -> Option<EtcdServer> {
    if let Some(reason) = Netns::skip_reason() {
        eprintln!("{reason}");
        return None;
    }
    EtcdServer::start()
}

#[test]
fn three_hundred_creates_spread_by_capacity_and_affinity() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(etcd) = prerequisites() else {
        return;
    };
    let c = cluster(etcd, &[120, 100, 80], Some(0), &[]);

    // 100 of the image agent-0 has: image affinity puts them all there.
    let with_image: Vec<SandboxSpec> = (0..100)
        .map(|i| SandboxSpec {
            image: Some("busybox".into()),
            ..spec(&format!("img-{i}"))
        })
        .collect();
    // 50 publishing one of 25 host ports (each port asked for twice), then 150 more.
    let with_port: Vec<SandboxSpec> = (0..50)
        .map(|i| SandboxSpec {
            ports: vec![PortSpec {
                container_port: 80,
                protocol: Protocol::Tcp,
                host_port: Some(7000 + (i % 25) as u16),
                host_ip: None,
            }],
            ..spec(&format!("port-{i}"))
        })
        .collect();
    let plain: Vec<SandboxSpec> = (0..150).map(|i| spec(&format!("s-{i}"))).collect();
    let started = Instant::now();
    for batch in [with_image, with_port, plain] {
        for (i, r) in create_all(&c.server, batch).into_iter().enumerate() {
            assert!(r.is_ok(), "create {i}: {r:?}");
        }
    }
    let took = started.elapsed();

    let all = sandboxes(&c.server);
    assert_eq!(all.len(), 300);
    let mut per_node: BTreeMap<&str, u32> = BTreeMap::new();
    let mut ports = HashSet::new();
    for (name, (node, phase, host_ports)) in &all {
        assert_eq!(phase, "Running", "{name}");
        *per_node.entry(node.as_str()).or_default() += 1;
        if name.starts_with("img-") {
            assert_eq!(node, "agent-0", "{name} went past the image's agent");
        }
        for p in host_ports {
            assert!(
                ports.insert((node.clone(), *p)),
                "port {p} given twice on {node}"
            );
        }
    }
    // Exactly full: every agent holds its capacity, none more.
    assert_eq!(
        per_node,
        BTreeMap::from([("agent-0", 120), ("agent-1", 100), ("agent-2", 80)]),
        "created in {took:?}"
    );
    assert_eq!(ports.len(), 50);
    // Each agent says the same of itself, over its own address in its namespace.
    for (i, agent) in c.agents.iter().enumerate() {
        assert_eq!(agent.address, format!("{}:5758", Netns::ip(i)));
        let (code, body) = http("GET", &agent.url("/api/v1/agent/status"), Some(TOKEN), None);
        assert_eq!(code, 200, "{body}");
        let status = json(&body);
        let held = status["sandboxes"].as_array().unwrap().len() as u64;
        assert_eq!(held, status["capacity"].as_u64().unwrap(), "{}", agent.name);
    }
    let more = create_all(&c.server, vec![spec("one-too-many")]);
    let e = more[0].as_ref().unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("full"), "{}", e.message());

    let table = c.server.ok(&["nodes", "-o", "wide"]);
    for i in 0..3 {
        assert!(table.contains(&format!("{}:5758", Netns::ip(i))), "{table}");
    }
    assert!(table.contains("busybox"), "agent-0's image: {table}");
}

#[test]
fn a_killed_agent_loses_manual_sandboxes_and_auto_recreate_runs_elsewhere() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(etcd) = prerequisites() else {
        return;
    };
    let mut c = cluster(etcd, &[10, 10, 10], None, &["--orphan-timeout", "1s"]);
    // One kind at a time: concurrent creates are placed in the order they arrive, so a
    // mixed batch can leave one agent with a single kind. Each batch alone spreads over
    // the least loaded agents, so every agent holds some of each.
    for (kind, policy) in [
        ("auto", FailurePolicy::AutoRecreate),
        ("man", FailurePolicy::Manual),
    ] {
        let specs: Vec<SandboxSpec> = (0..10)
            .map(|i| SandboxSpec {
                failure_policy: policy,
                ..spec(&format!("{kind}-{i}"))
            })
            .collect();
        for r in create_all(&c.server, specs) {
            r.unwrap();
        }
    }
    let before = sandboxes(&c.server);
    let victim = "agent-2";
    let on_victim: Vec<&String> = before
        .iter()
        .filter(|(_, (node, _, _))| node == victim)
        .map(|(name, _)| name)
        .collect();
    let auto: Vec<String> = on_victim
        .iter()
        .filter(|n| n.starts_with("auto"))
        .map(|n| n.to_string())
        .collect();
    let manual: Vec<String> = on_victim
        .iter()
        .filter(|n| n.starts_with("man"))
        .map(|n| n.to_string())
        .collect();
    assert!(!auto.is_empty() && !manual.is_empty(), "{before:?}");

    let killed = Instant::now();
    c.agents[2].kill9();
    eventually(
        Duration::from_secs(15),
        "AutoRecreate sandboxes running elsewhere and Manual ones Lost",
        || {
            let now = sandboxes(&c.server);
            auto.iter()
                .all(|n| now[n].0 != victim && now[n].1 == "Running")
                && manual
                    .iter()
                    .all(|n| now[n].0 == victim && now[n].1 == "Lost")
        },
    );
    let took = killed.elapsed();
    // Its lease's 2 s, etcd's expiry pass and the re-creates, on a machine maybe loaded.
    assert!(took < Duration::from_secs(15), "{took:?}");
    // Lost because etcd expired its registration's lease (TTL 2 s: 1500ms rounded up).
    assert!(
        c.server
            .log()
            .lines()
            .any(|l| l.contains("registration expired") && l.contains(victim)),
        "{}",
        c.server.log()
    );
    eprintln!(
        "kill -9 of {victim}: {} re-created elsewhere and {} Lost within {took:?}",
        auto.len(),
        manual.len()
    );
    let lost = json(&c.server.ok(&["get", &manual[0], "-o", "json"]));
    assert!(
        lost["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("agent-2 stopped answering (its registration's lease expired"),
        "{lost}"
    );
    let moved = json(&c.server.ok(&["get", &auto[0], "-o", "json"]));
    assert_eq!(moved["status"]["recreations"], 1, "{moved}");
    assert_eq!(
        json(&c.server.ok(&["nodes", "-o", "json"]))["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == victim)
            .unwrap()["state"],
        "Lost"
    );
    let (_, metrics) = http_get(c.server.metrics.as_ref().unwrap());
    assert!(metrics.contains("warren_agents_up 3"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "warren_recreations_total{{backend=\"slot\",cause=\"lost\"}} {}",
            auto.len()
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"warren_errors_total{reason="agent_lost"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "warren_sandboxes{{backend=\"slot\",phase=\"Lost\"}} {}",
            manual.len()
        )),
        "{metrics}"
    );

    // The agent comes back: its Manual sandboxes run again, and its janitor removes the
    // copies of those re-created elsewhere (their ids are no longer known).
    c.agents[2].spawn(TOKEN);
    eventually(
        Duration::from_secs(10),
        "Manual sandboxes Running again",
        || {
            let now = sandboxes(&c.server);
            manual.iter().all(|n| now[n].1 == "Running")
        },
    );
    let manual_ids: Vec<String> = {
        let mut ids: Vec<String> = manual
            .iter()
            .map(|n| {
                json(&c.server.ok(&["get", n, "-o", "json"]))["metadata"]["uid"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        ids.sort();
        ids
    };
    eventually(
        Duration::from_secs(10),
        "the old copies removed by the janitor",
        || c.agents[2].slot_ids() == manual_ids,
    );
    assert!(
        c.agents[2].log().contains("janitor: removed an orphan"),
        "{}",
        c.agents[2].log()
    );
    // A Lost sandbox can always be deleted; one on a live agent too.
    c.server.ok(&["rm", &manual[0], &auto[0]]);
}
