//! The scheduler's placement at 100 and 1,000 agents (issue 7's target: at most 2 µs at
//! 1,000). For scale: seed 004's Go registry reports 1.3 µs at 100 agents and 14.6 µs at
//! 1,000 from its own benchmark (not run here: it needs its Kubernetes test environment).
//!
//! `cargo bench -p warren-control --bench scheduler`
//!
//! Each iteration places one sandbox and gives its slot back, so the load stays where the
//! setup put it: every agent half full (capacity 64, 32 used), each holding one of 20 images.

use warren_control::nodes::{Heartbeat, Nodes};
use warren_control::scheduler::{Demand, HostPort, Scheduler};
use warren_spec::{BackendKind, Protocol};

fn main() {
    divan::main();
}

const CAPACITY: u32 = 64;

fn agents(n: usize) -> Scheduler {
    let mut s = Scheduler::new();
    for k in 0..n {
        let i = s.agent(&format!("agent-{k}"));
        s.configure(i, CAPACITY, &[BackendKind::Slot, BackendKind::Linux]);
        s.set_images(i, &[format!("img-{}:latest", k % 20)]);
        s.set_up(i, true);
        for _ in 0..CAPACITY / 2 {
            s.take(i, &[]);
        }
    }
    s
}

fn demand(image: Option<&str>) -> Demand<'_> {
    Demand {
        backend: BackendKind::Slot,
        image,
        ports: &[],
        pool: None,
        avoid: None,
    }
}

/// No image: the least loaded agent.
#[divan::bench(args = [100, 1000])]
fn least_loaded(bencher: divan::Bencher<'_, '_>, n: usize) {
    let mut s = agents(n);
    bencher.bench_local(|| {
        let p = s.allocate(&demand(None)).expect("room");
        s.release(p.agent, &[]);
    });
}

/// An image 1 in 20 agents have: image affinity first.
#[divan::bench(args = [100, 1000])]
fn image_affinity(bencher: divan::Bencher<'_, '_>, n: usize) {
    let mut s = agents(n);
    bencher.bench_local(|| {
        let p = s.allocate(&demand(Some("img-7:latest"))).expect("room");
        s.release(p.agent, &[]);
    });
}

/// A host port half the agents already publish.
#[divan::bench(args = [100, 1000])]
fn host_port_taken_on_half(bencher: divan::Bencher<'_, '_>, n: usize) {
    let mut s = agents(n);
    let port = [HostPort {
        protocol: Protocol::Tcp,
        port: 8080,
    }];
    for i in (0..n).step_by(2) {
        s.take(i, &port);
    }
    bencher.bench_local(|| {
        let p = s
            .allocate(&Demand {
                ports: &port,
                ..demand(None)
            })
            .expect("room");
        s.release(p.agent, &port);
    });
}

/// What the control plane calls: the node set, its lock included.
#[divan::bench(args = [100, 1000])]
fn through_the_node_set(bencher: divan::Bencher<'_, '_>, n: usize) {
    let dir = std::env::temp_dir().join(format!("warren-bench-sched-{}", std::process::id()));
    let slot = warren_runtime::SlotBackend::new(&dir, Default::default()).expect("slot");
    let agent = warren_agent::Agent::new(
        "local",
        [std::sync::Arc::new(slot) as std::sync::Arc<dyn warren_runtime::Backend>],
    );
    let nodes = Nodes::new(agent, Some(0), std::time::Duration::from_secs(60));
    for k in 0..n {
        let hb = Heartbeat {
            node: format!("agent-{k}"),
            address: "127.0.0.1:5758".into(),
            boot_id: "b".into(),
            capacity: CAPACITY,
            backends: vec![warren_agent::api::BackendState {
                kind: BackendKind::Slot,
                available: true,
                reason: String::new(),
            }],
            ..Default::default()
        };
        nodes.heartbeat(hb, "t").expect("registers");
        for _ in 0..CAPACITY / 2 {
            nodes.take(&format!("agent-{k}"), &[]);
        }
    }
    bencher.bench_local(|| {
        let (node, _) = nodes.allocate(&demand(None)).expect("room");
        nodes.release(&node, &[]);
    });
    let _ = std::fs::remove_dir_all(&dir);
}
