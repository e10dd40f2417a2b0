//! `warren bench create --agents N` and `--pool N`: remote agents and pools in the create
//! benchmark.
//!
//! With `--agents N` the private server listens on loopback TCP with a token, runs nothing
//! itself (`--local-capacity 0`) and N `warren agent` processes (sharing the server's image
//! store) take every sandbox: each create is a gRPC call to the server plus an HTTP call to
//! an agent. With `--pool N` (linux, with an image) the run adds two phases: N creates
//! from a pool of N pre-warmed sandboxes (hits), then, once the pool and its warm shells are
//! gone, N creates of the same image starting cold (misses).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use warren_control::Address;
use warren_control::client::{self, Client};
use warren_proto::{spec_to_pb, v1};
use warren_spec::SandboxSpec;

use super::{Phase, PrivateServer, die_with_parent, drive, first_line, report};

/// The agents of a run, killed when dropped (their state dirs go with the server's).
pub(super) struct Agents(Vec<std::process::Child>);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        for c in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `n` agents for `server` on loopback, each able to hold `capacity` sandboxes, and
/// waits until the server has them all.
pub(super) async fn start_agents(
    server: &PrivateServer,
    n: usize,
    token: &str,
    capacity: usize,
    extra: &[&str],
    log_level: &str,
) -> anyhow::Result<Agents> {
    let exe = std::env::current_exe().context("finding the warren binary")?;
    let mut agents = Agents(Vec::new());
    for i in 0..n {
        let dir = server.state_dir().with_file_name(format!("agent-{i}"));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut cmd = std::process::Command::new(&exe);
        die_with_parent(&mut cmd);
        cmd.arg("agent")
            .args([
                "--listen",
                "127.0.0.1:0",
                "--node",
                &format!("bench-agent-{i}"),
            ])
            .arg("--dir")
            .arg(dir.join("state"))
            .arg("--image-dir")
            .arg(server.state_dir().join("images"))
            .args([
                "--capacity",
                &capacity.to_string(),
                "--orphan-timeout",
                "300s",
            ])
            .args(["--log-level", log_level])
            .args(extra)
            .arg("--server")
            .arg(server.address.to_string())
            .env("WARREN_TOKEN", token)
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().context("starting a warren agent")?;
        let started = first_line(&mut child, "warren agent listening on ");
        agents.0.push(child);
        started.context("an agent did not start")?;
    }
    let mut nodes = client::connect_nodes(&server.address, Some(token)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = nodes
            .list_nodes(v1::ListNodesRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("listing nodes: {}", s.message()))?
            .into_inner();
        let up = list
            .nodes
            .iter()
            .filter(|n| !n.local && n.state == "Up")
            .count();
        if up == n {
            return Ok(agents);
        }
        if Instant::now() > deadline {
            bail!("only {up} of {n} agents registered within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates then deletes `n` sandboxes made by `spec(i)`; the create phase and the figures
/// of both phases.
async fn create_delete(
    clients: &[Client],
    n: usize,
    c: usize,
    name: &str,
    spec: impl Fn(usize) -> SandboxSpec + Send + Sync + 'static,
) -> anyhow::Result<(Phase, serde_json::Value, serde_json::Value)> {
    let spec = std::sync::Arc::new(spec);
    let s = spec.clone();
    let created = drive(clients, n, c, move |mut client, i| {
        let req = v1::CreateSandboxRequest {
            spec: Some(spec_to_pb(&s(i))),
            ..Default::default()
        };
        async move { client.create_sandbox(req).await.map(|_| ()) }
    })
    .await?;
    let json = report(name, &created);
    let s = spec.clone();
    let deleted = drive(clients, n, c, move |mut client, i| {
        let req = v1::DeleteSandboxRequest {
            name: s(i).name,
            grace_period_seconds: Some(0),
            id: None,
        };
        async move {
            match client.delete_sandbox(req).await {
                // Its create failed (counted above): nothing to delete.
                Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
                r => r.map(|_| ()),
            }
        }
    })
    .await?;
    let delete_json = report("delete", &deleted);
    if deleted.errors > 0 {
        bail!(
            "{} deletes failed: {}",
            deleted.errors,
            deleted.first_error.unwrap_or_default()
        );
    }
    Ok((created, json, delete_json))
}

/// Warm shells of `image` ready on any node.
async fn warm_ready(address: &Address, token: Option<&str>, image: &str) -> anyhow::Result<u32> {
    let mut nodes = client::connect_nodes(address, token).await?;
    let list = nodes
        .list_nodes(v1::ListNodesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("listing nodes: {}", s.message()))?
        .into_inner();
    Ok(list
        .nodes
        .iter()
        .flat_map(|n| n.warm.iter())
        .filter(|w| w.image == image)
        .map(|w| w.ready)
        .sum())
}

/// The pool phases: `n` creates taking pre-warmed sandboxes, then `n` starting cold.
pub(super) async fn pool_phases(
    clients: &[Client],
    address: &Address,
    token: Option<&str>,
    n: usize,
    concurrency: usize,
    base: &SandboxSpec,
    prefix: &str,
) -> anyhow::Result<serde_json::Value> {
    let image = base
        .image
        .clone()
        .context("--pool needs --image (a linux image)")?;
    let mut pools = client::connect_pools(address, token).await?;
    let pool = format!("{prefix}-pool");
    let want = u32::try_from(n).context("--pool: too many")?;
    pools
        .apply_pool(v1::ApplyPoolRequest {
            name: pool.clone(),
            spec: Some(v1::PoolSpec {
                backend: base.backend.to_string(),
                image: image.clone(),
                buffer_min: want,
                buffer_max: want,
                ..Default::default()
            }),
        })
        .await
        .map_err(|s| anyhow::anyhow!("creating the pool: {}", s.message()))?;
    let started = Instant::now();
    while warm_ready(address, token, &image).await? < want {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("the pool's {n} sandboxes were not pre-warmed within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let warmed = started.elapsed();
    let (p, b) = (format!("{prefix}-hit"), base.clone());
    let pool_name = pool.clone();
    let (_, hit, _) = create_delete(clients, n, concurrency, "pool hit", move |i| SandboxSpec {
        name: format!("{p}-{i}"),
        pool: Some(pool_name.clone()),
        image: None,
        ..b.clone()
    })
    .await?;
    let status = pools
        .get_pool(v1::GetPoolRequest { name: pool.clone() })
        .await
        .map_err(|s| anyhow::anyhow!("reading the pool: {}", s.message()))?
        .into_inner()
        .status
        .unwrap_or_default();
    out!(
        "         {} of {n} took a pre-warmed sandbox ({} cold); the pool warmed {n} in {:.2}s",
        status.hits,
        status.misses,
        warmed.as_secs_f64()
    );
    pools
        .delete_pool(v1::DeletePoolRequest { name: pool })
        .await
        .map_err(|s| anyhow::anyhow!("deleting the pool: {}", s.message()))?;
    // No warm shell may be left for the cold phase to take.
    let started = Instant::now();
    while warm_ready(address, token, &image).await? > 0 {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the pool's warm shells did not end within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (p, b) = (format!("{prefix}-miss"), base.clone());
    let (_, miss, _) = create_delete(clients, n, concurrency, "pool miss", move |i| SandboxSpec {
        name: format!("{p}-{i}"),
        ..b.clone()
    })
    .await?;
    Ok(serde_json::json!({"hit": hit, "miss": miss, "hits": status.hits, "misses": status.misses}))
}

/// The consistency phases: for each mode, `n` creates then their deletes. Returns the
/// figures by mode (`{"fast": {"create": .., "delete": ..}}`) and the failed creates.
pub(super) async fn mode_phases(
    clients: &[Client],
    n: usize,
    concurrency: usize,
    base: &SandboxSpec,
    modes: &[warren_spec::Consistency],
    prefix: &str,
) -> anyhow::Result<(serde_json::Value, usize)> {
    let mut out = serde_json::Map::new();
    let mut errors = 0;
    for &mode in modes {
        let (p, b) = (format!("{prefix}-{mode}"), base.clone());
        let (phase, create, delete) = create_delete(
            clients,
            n,
            concurrency,
            &format!("create ({mode})"),
            move |i| SandboxSpec {
                name: format!("{p}-{i}"),
                consistency: Some(mode),
                ..b.clone()
            },
        )
        .await?;
        errors += phase.errors;
        out.insert(
            mode.to_string(),
            serde_json::json!({"create": create, "delete": delete}),
        );
    }
    Ok((serde_json::Value::Object(out), errors))
}
