//! Pools of pre-warmed linux sandboxes, on the server's own agent and on a `warren agent`
//! process: warm shells kept by the pool's numbers, creates that take one (hits) or start
//! cold (misses), `max`, and a pool that cannot go while its sandboxes exist. Needs root and
//! busybox-static (the linux backend); says so and skips without them.

#![allow(clippy::unwrap_used)] // a panic is how a test fails

#[path = "common/cluster.rs"]
mod cluster;
mod common;
#[macro_use]
#[path = "common/linux.rs"]
mod linux_harness;

use std::time::Duration;

use cluster::{TestAgent, eventually, node_state};
use common::{TestServer, http_get, json, stderr};
use linux_harness::{skip_reason, stdout};

const TOKEN: &str = "p00l";

fn pool(server: &TestServer, name: &str) -> serde_json::Value {
    json(&server.ok(&["pool", "get", name, "-o", "json"]))
}

fn wait_ready(server: &TestServer, name: &str, n: u64) {
    eventually(
        Duration::from_secs(20),
        &format!("{n} warm in pool {name}"),
        || pool(server, name)["status"]["ready"] == n,
    );
}

#[test]
fn pools_on_the_servers_own_agent() {
    let l = linux_or_skip!();
    let out = l.warren(&["pool", "create", "bad", "--image", "busybox", "-b", "slot"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("spec.backend"), "{}", stderr(&out));
    let out = l.warren(&["pool", "create", "bad", "--image", "busybox", "-b", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("spec.backend: \"nope\" is not a backend (expected one of"),
        "{}",
        stderr(&out)
    );
    let out = l.warren(&[
        "pool",
        "create",
        "bad",
        "--image",
        "busybox",
        "--buffer-min",
        "3",
        "--buffer-max",
        "1",
    ]);
    assert!(
        stderr(&out).contains("spec.bufferMin: 3 is more than spec.bufferMax (1)"),
        "{}",
        stderr(&out)
    );
    let out = l.warren(&["run", "--pool", "nope", "--", "true"]);
    assert!(
        stderr(&out).contains("spec.pool: \"nope\" does not exist"),
        "{}",
        stderr(&out)
    );

    assert_eq!(
        l.ok(&[
            "pool",
            "create",
            "bb",
            "--image",
            "busybox",
            "--buffer-min",
            "1"
        ]),
        "pool bb created\n"
    );
    wait_ready(&l.server, "bb", 1);
    // No image given: the pool's image and backend.
    let out = l.warren(&[
        "run", "--pool", "bb", "--name", "hit", "--wait", "--", "echo", "warm",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "warm\n");
    let got = l.get("hit");
    assert_eq!(got["spec"]["backend"], "linux");
    assert_eq!(got["status"]["backendInfo"]["warm"], "true", "{got}");
    assert_eq!(pool(&l.server, "bb")["status"]["hits"], 1);
    // Topped up again.
    wait_ready(&l.server, "bb", 1);
    let out = l.warren(&["run", "--pool", "bb", "-i", "alpine", "--", "true"]);
    assert!(
        stderr(&out).contains("spec.image: \"alpine\" is not the image of pool \"bb\""),
        "{}",
        stderr(&out)
    );
    // Another backend than the pool's is refused, not replaced; the default one gives way,
    // and what is printed is the backend the sandbox runs on.
    let out = l.warren(&["run", "--pool", "bb", "-b", "wasm", "--", "true"]);
    assert!(
        stderr(&out).contains("spec.backend: \"wasm\" is not the backend of pool \"bb\""),
        "{}",
        stderr(&out)
    );
    let out = l.ok(&[
        "run", "--pool", "bb", "--name", "shown", "--", "sleep", "60",
    ]);
    assert!(out.starts_with("sandbox/shown created (linux, "), "{out}");
    // The pool's image named without a backend is the pool's too.
    let out = l.ok(&[
        "run", "--pool", "bb", "-i", "busybox", "--name", "named", "--", "sleep", "60",
    ]);
    assert!(out.starts_with("sandbox/named created (linux, "), "{out}");
    let out = l.warren(&["pool", "rm", "bb"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("hit"),
        "names the sandbox: {}",
        stderr(&out)
    );
    l.ok(&["rm", "hit", "shown", "named"]);
    assert_eq!(l.ok(&["pool", "rm", "bb"]), "pool bb deleted\n");
    eventually(
        Duration::from_secs(10),
        "the pool's warm shells ended",
        || linux_harness::warm_ready(&l) == 0,
    );
}

/// Kills what a `warren agent`'s linux sandboxes left running (they outlive the agent by
/// design) and removes their cgroups.
struct LinuxAgent {
    agent: TestAgent,
    cgroup_parent: String,
}

impl Drop for LinuxAgent {
    fn drop(&mut self) {
        self.agent.kill9();
        linux_harness::kill_cgroups(&self.cgroup_parent);
    }
}

#[test]
fn pools_on_a_remote_agent_hit_miss_and_max() {
    if let Some(reason) = skip_reason() {
        eprintln!("{reason}");
        return;
    }
    let server = TestServer::start_with(
        &["--local-capacity", "0", "--agent-timeout", "5s"],
        Some(TOKEN),
    );
    let cgroup_parent = format!("warren-it-pool-{}", std::process::id());
    let mut agent = TestAgent::prepare(
        &server,
        "pooled",
        &[],
        "127.0.0.1:0",
        &[
            "--capacity",
            "10",
            "--cgroup-parent",
            &cgroup_parent,
            "--label",
            "tier=warm",
        ],
    );
    linux_harness::import_busybox(agent.dir.path(), &agent.state_dir().join("images"));
    agent.spawn(TOKEN);
    // It registers after it listens; the server has no agent of its own to fall back on.
    eventually(Duration::from_secs(10), "the agent registered", || {
        node_state(&server, "pooled") == "Up"
    });
    let agent = LinuxAgent {
        agent,
        cgroup_parent,
    };

    // A pool that keeps nothing warm: its create starts cold (a miss). First, while no
    // shell of the image is warm on the agent (any create of the image takes one).
    server.ok(&[
        "pool",
        "create",
        "cold",
        "--image",
        "busybox",
        "--buffer-min",
        "0",
    ]);
    let out = server.warren(&[
        "run", "--pool", "cold", "--name", "c1", "--wait", "--", "true",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let got = json(&server.ok(&["get", "c1", "-o", "json"]));
    assert_eq!(got["status"]["backendInfo"]["warm"], "false", "{got}");

    server.ok(&[
        "pool",
        "create",
        "bb",
        "--image",
        "busybox",
        "--buffer-min",
        "2",
        "--max",
        "3",
        "--node-selector",
        "tier=warm",
    ]);
    server.ok(&[
        "pool",
        "create",
        "nowhere",
        "--image",
        "busybox",
        "--node-selector",
        "tier=gpu",
    ]);
    wait_ready(&server, "bb", 2);
    assert_eq!(
        pool(&server, "bb")["status"]["nodes"],
        serde_json::json!(["pooled"])
    );

    let out = server.warren(&[
        "run", "--pool", "bb", "--name", "h1", "--wait", "--", "echo", "hi",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hi\n", "logs from the agent");
    let got = json(&server.ok(&["get", "h1", "-o", "json"]));
    assert_eq!(got["status"]["node"], "pooled");
    assert_eq!(got["status"]["backendInfo"]["warm"], "true", "{got}");
    let out = server.warren(&["run", "--pool", "nowhere", "--", "true"]);
    assert!(
        stderr(&out).contains("in pool \"nowhere\""),
        "{}",
        stderr(&out)
    );

    // max 3: two more fit, the fourth does not.
    server.ok(&["run", "--pool", "bb", "--name", "h2", "--", "sleep", "30"]);
    server.ok(&["run", "--pool", "bb", "--name", "h3", "--", "sleep", "30"]);
    let out = server.warren(&["run", "--pool", "bb", "--name", "h4", "--", "true"]);
    assert!(
        stderr(&out).contains("pool \"bb\" is full"),
        "{}",
        stderr(&out)
    );
    // In use 3 of max 3: nothing kept warm.
    eventually(Duration::from_secs(10), "no warm shells at max", || {
        let p = pool(&server, "bb");
        p["status"]["target"] == 0 && p["status"]["ready"] == 0
    });

    let (_, metrics) = http_get(server.metrics.as_ref().unwrap());
    assert!(
        metrics.contains(r#"warren_pool_creates_total{pool="bb",result="hit"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"warren_pool_creates_total{pool="cold",result="miss"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"warren_pool_sandboxes{pool="bb",state="in_use"} 3"#),
        "{metrics}"
    );
    // The refused creates (the full pool, the one that does not exist) count under the
    // pool's backend (their specs name none): never as slot ones.
    assert!(
        metrics
            .contains(r#"warren_create_errors_total{backend="linux",code="ResourceExhausted"} 2"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"warren_create_errors_total{backend="slot""#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"warren_errors_total{reason="pool_full"} 1"#),
        "{metrics}"
    );
    let table = server.ok(&["pool", "ls"]);
    assert!(table.contains("linux:busybox"), "{table}");

    server.ok(&["rm", "h1", "h2", "h3", "c1"]);
    server.ok(&["pool", "rm", "bb", "cold", "nowhere"]);
    eventually(
        Duration::from_secs(10),
        "the agent ended its warm shells",
        || {
            std::fs::read_dir(agent.agent.state_dir().join("linux/.warm"))
                .map(|d| d.count() == 0)
                .unwrap_or(true)
        },
    );
}
