//! `warren bench`: measure warren through its real API.
//!
//! `bench create` creates N sandboxes at concurrency C over the gRPC API, with persistence
//! on (every acknowledged create is durable), then deletes them, and prints latency
//! percentiles and rates. Without `--server` it starts a private `warren server` on a
//! temporary directory, so the figures include nothing from other work.
//!
//! `bench checkpoint` checkpoints and restores a small linux process, beside runc's
//! checkpoint and restore of it (see `bench_checkpoint.rs`).
//!
//! `bench run` runs a workload to completion N times through the same API and, in the same
//! run, the same workload with its peers: the wasmtime CLI for wasm; `crun run` and `runc run`
//! on an equivalent OCI bundle for linux (see `bench_linux.rs`).

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use warren_control::Address;
use warren_control::client::{self, Client};
use warren_proto::{spec_to_pb, v1};
use warren_spec::{BackendKind, SandboxSpec};

use super::{Globals, answer, usage};

/// `println!` that ignores a closed stdout: the run goes on and still cleans up after itself.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

// After `out!`, which they use.
#[path = "bench_checkpoint.rs"]
mod checkpoint;
#[path = "bench_cluster.rs"]
mod cluster;
#[path = "bench_linux.rs"]
mod linux;
#[path = "bench_pause.rs"]
mod pause;
#[path = "bench_vm.rs"]
mod vm;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// Create (then delete) sandboxes as fast as the server acknowledges them.
    Create(CreateArgs),
    /// Run a workload to completion N times (create -> exit through the API), side by side
    /// with the same workload run by its peers (the wasmtime CLI for wasm; crun and runc on
    /// an equivalent bundle for linux).
    Run(RunArgs),
    /// Checkpoint and restore a small linux process through the API, beside `runc
    /// checkpoint` / `runc restore` of the same process (see `bench_checkpoint.rs`).
    Checkpoint(checkpoint::CheckpointArgs),
    /// Pause and unpause a running linux sandbox through the API, beside `runc pause` /
    /// `runc resume` of the same process (see `bench_pause.rs`).
    Pause(pause::PauseArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Backend to run on.
    #[arg(long, short = 'b', default_value = "wasm")]
    backend: String,
    /// Image (linux, vm) or module (wasm) to run; vm: none runs in the initramfs, an image
    /// needs --image-layout.
    #[arg(long, short = 'i', visible_alias = "module", default_value = "")]
    image: String,
    /// vm: the vm backend's config (as `warren server --vm-config`).
    #[arg(long, env = "WARREN_VM_CONFIG", value_name = "FILE")]
    vm_config: Option<std::path::PathBuf>,
    /// linux, vm: an OCI image layout (directory, or tar of one) to import as --image before
    /// the run. linux: the peers' rootfs is unpacked from it too, and without it the image
    /// must already be in the server's store. Make a busybox one with
    /// `cargo run --release -p warren-image --example busybox-layout -- DIR`.
    #[arg(long, value_name = "DIR")]
    image_layout: Option<std::path::PathBuf>,
    /// How many runs.
    #[arg(short = 'n', default_value_t = 1000)]
    count: usize,
    /// How many runs in flight at once.
    #[arg(short = 'c', default_value_t = 1)]
    concurrency: usize,
    /// Runs of each peer (0 skips them).
    #[arg(long, default_value_t = 200)]
    peer_runs: usize,
    /// Log level of the private server.
    #[arg(long, default_value = "info")]
    server_log_level: String,
    /// -b linux: the private server keeps its sandboxes in a new directory under this one
    /// (its --linux-dir, removed after the run), e.g. on a tmpfs; default: inside its state
    /// dir, on disk.
    #[arg(long, value_name = "DIR")]
    linux_dir: Option<std::path::PathBuf>,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
    /// Arguments for the workload.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Backend to create sandboxes on.
    #[arg(long, short = 'b', default_value = "slot")]
    backend: String,
    /// How many sandboxes.
    #[arg(short = 'n', default_value_t = 10_000)]
    count: usize,
    /// How many creates in flight at once.
    #[arg(short = 'c', default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections to spread the calls over.
    #[arg(long, default_value_t = 2)]
    connections: usize,
    /// Log level of the private server (its log goes to a file in its temporary dir).
    #[arg(long, default_value = "info")]
    server_log_level: String,
    /// --slot-dir for the private server (default: inside its state dir, on disk).
    #[arg(long)]
    slot_dir: Option<std::path::PathBuf>,
    /// Consistency of each create: fast (acknowledged once it runs, record written behind),
    /// strong (acknowledged once the record is durable), or both (one phase each).
    #[arg(long = "mode", default_value = "fast")]
    consistency: String,
    /// Start N `warren agent` processes on loopback: the private server runs nothing itself
    /// and every create goes to an agent over HTTP.
    #[arg(long, default_value_t = 0, value_name = "N")]
    agents: usize,
    /// Image of the sandboxes (linux: a name in the server's image store).
    #[arg(long, short = 'i')]
    image: Option<String>,
    /// linux: an OCI image layout to import as --image first (see `bench run`).
    #[arg(long, value_name = "DIR")]
    image_layout: Option<std::path::PathBuf>,
    /// Also measure N creates from a pool of N pre-warmed sandboxes (hits) against N cold
    /// creates of the same image (misses); linux with --image.
    #[arg(long, value_name = "N")]
    pool: Option<usize>,
    /// Keep the sandboxes instead of deleting them afterwards.
    #[arg(long)]
    keep: bool,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    match args.what {
        What::Create(a) => create(a, g).await,
        What::Run(a) => run_to_exit(a, g).await,
        What::Checkpoint(a) => checkpoint::run(a, g).await,
        What::Pause(a) => pause::run(a, g).await,
    }
}

/// Imports the OCI image layout at `layout` into the server's store as `image`.
async fn import_layout(
    address: &Address,
    token: Option<&str>,
    layout: &std::path::Path,
    image: &str,
) -> anyhow::Result<v1::ImportImageResponse> {
    let path = std::path::absolute(layout)?;
    let mut images = client::connect_images(address, token).await?;
    answer(
        images
            .import_image(v1::ImportImageRequest {
                path: path.display().to_string(),
                name: Some(image.to_string()),
            })
            .await,
    )
    .with_context(|| format!("importing {} as {image}", path.display()))
}

/// A `warren server` child on a temporary dir, stopped with SIGTERM when dropped.
struct PrivateServer {
    child: std::process::Child,
    address: Address,
    _dir: tempfile::TempDir,
}

impl PrivateServer {
    fn start(
        log_level: &str,
        slot_dir: Option<&std::path::Path>,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_listening(log_level, slot_dir, extra, None)
    }

    /// Its state directory (`--dir`).
    fn state_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("state")
    }

    /// With `tcp_token`: on TCP (127.0.0.1, a free port) with that token, for agents.
    fn start_listening(
        log_level: &str,
        slot_dir: Option<&std::path::Path>,
        extra: &[&str],
        tcp_token: Option<&str>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("warren-bench-").tempdir()?;
        let sock = dir.path().join("warren.sock");
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let exe = std::env::current_exe().context("finding the warren binary")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("server").args(["--metrics-listen", "off"]);
        if let Some(d) = slot_dir {
            cmd.arg("--slot-dir").arg(d);
        }
        // The server must not outlive this process, however it ends.
        die_with_parent(&mut cmd);
        let listen = match tcp_token {
            Some(_) => "tcp://127.0.0.1:0".to_string(),
            None => format!("unix://{}", sock.display()),
        };
        cmd.arg("--dir")
            .arg(dir.path().join("state"))
            .arg("--listen")
            .arg(listen)
            .arg("--log-level")
            .arg(log_level)
            .args(extra)
            .env_remove("WARREN_TOKEN")
            .stdout(if tcp_token.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(log);
        if let Some(t) = tcp_token {
            cmd.env("WARREN_TOKEN", t);
        }
        let mut child = cmd.spawn().context("starting a private warren server")?;
        let address = match tcp_token {
            None => Address::Unix(sock),
            Some(_) => {
                let line = first_line(&mut child, "warren server listening on ")
                    .context("the private server did not start (see its log)")?;
                line.parse()
                    .map_err(|e: String| anyhow::anyhow!("private server address: {e}"))?
            }
        };
        Ok(PrivateServer {
            child,
            address,
            _dir: dir,
        })
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect_retrying(address: &Address, token: Option<&str>) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client::connect(address, token).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

struct Phase {
    hist: Histogram<u64>,
    elapsed: Duration,
    errors: usize,
    first_error: Option<String>,
}

/// Runs `op(i)` for i in 0..n with `concurrency` workers over the clients.
async fn drive<F, Fut>(
    clients: &[Client],
    n: usize,
    concurrency: usize,
    op: F,
) -> anyhow::Result<Phase>
where
    F: Fn(Client, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let op = Arc::new(op);
    let start = Instant::now();
    // A JoinSet aborts its tasks when dropped, so a run that is given up (Ctrl-C) stops
    // issuing calls instead of going on in the background.
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let client = clients[w % clients.len()].clone();
        let (next, op) = (next.clone(), op.clone());
        workers.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .expect("static bounds are valid");
            let (mut errors, mut first_error) = (0, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                match op(client.clone(), i).await {
                    Ok(()) => hist.saturating_record(t.elapsed().as_micros() as u64),
                    Err(s) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| s.message().to_string());
                    }
                }
            }
            (hist, errors, first_error)
        });
    }
    let mut phase = Phase {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        elapsed: Duration::ZERO,
        errors: 0,
        first_error: None,
    };
    while let Some(w) = workers.join_next().await {
        let (hist, errors, first_error) = w?;
        phase.hist.add(hist)?;
        phase.errors += errors;
        if phase.first_error.is_none() {
            phase.first_error = first_error;
        }
    }
    phase.elapsed = start.elapsed();
    Ok(phase)
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1}ms", v as f64 / 1000.0)
    } else {
        format!("{v}µs")
    }
}

fn report(name: &str, p: &Phase) -> serde_json::Value {
    let n = p.hist.len();
    let rate = n as f64 / p.elapsed.as_secs_f64();
    out!(
        "{name:<8} p50 {:>8}  p90 {:>8}  p99 {:>8}  max {:>8}  {:>9.0}/s  ({n} ok, {} failed, {:.2}s)",
        us(p.hist.value_at_quantile(0.5)),
        us(p.hist.value_at_quantile(0.9)),
        us(p.hist.value_at_quantile(0.99)),
        us(p.hist.max()),
        rate,
        p.errors,
        p.elapsed.as_secs_f64(),
    );
    if let Some(e) = &p.first_error {
        out!("         first error: {e}");
    }
    serde_json::json!({
        "ok": n, "failed": p.errors, "seconds": p.elapsed.as_secs_f64(), "per_second": rate,
        "p50_us": p.hist.value_at_quantile(0.5), "p90_us": p.hist.value_at_quantile(0.9),
        "p99_us": p.hist.value_at_quantile(0.99), "max_us": p.hist.max(),
    })
}

async fn create(a: CreateArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    let backend: BackendKind = super::backend_arg(&a.backend)?;
    if a.count == 0 || a.concurrency == 0 || a.connections == 0 {
        return Err(usage("-n, -c and --connections must be at least 1"));
    }
    let modes: Vec<warren_spec::Consistency> = match a.consistency.as_str() {
        "both" => vec![
            warren_spec::Consistency::Fast,
            warren_spec::Consistency::Strong,
        ],
        m => vec![
            m.parse()
                .map_err(|e| usage(format!("--mode: {e} (or both)")))?,
        ],
    };
    if a.agents > 0 && g.server.is_some() {
        return Err(usage(
            "--agents: starts its own server and agents; leave out --server",
        ));
    }
    if a.pool.is_some() && (backend != BackendKind::Linux || a.image.is_none()) {
        return Err(usage("--pool: needs -b linux and --image"));
    }
    let parent = format!("warren-bench-{}", std::process::id());
    // Declared first, so dropped last: linux sandboxes left by the agents go with it.
    let _cgroups = (backend == BackendKind::Linux).then(|| linux::CgroupSweep(parent.clone()));
    let token = (a.agents > 0).then(|| format!("bench-{:x}", std::process::id()));
    let mut server_flags = vec!["--cgroup-parent", parent.as_str()];
    if a.agents > 0 {
        server_flags.extend(["--local-capacity", "0"]);
    }
    let private = if g.server.is_none() {
        Some(PrivateServer::start_listening(
            &a.server_log_level,
            a.slot_dir.as_deref(),
            &server_flags,
            token.as_deref(),
        )?)
    } else {
        None
    };
    let token = token.or_else(|| g.token.clone());
    let address = match &private {
        Some(p) => p.address.clone(),
        None => g.address()?,
    };
    let mut clients = Vec::new();
    for _ in 0..a.connections {
        clients.push(connect_retrying(&address, token.as_deref()).await?);
    }
    let _agents = match (&private, a.agents) {
        (Some(server), n) if n > 0 => {
            let capacity = a.count.max(a.pool.unwrap_or(0)).max(1);
            Some(
                cluster::start_agents(
                    server,
                    n,
                    token.as_deref().unwrap_or_default(),
                    capacity,
                    &["--cgroup-parent", &parent],
                    &a.server_log_level,
                )
                .await?,
            )
        }
        _ => None,
    };
    if let (Some(layout), Some(image)) = (&a.image_layout, &a.image) {
        import_layout(&address, token.as_deref(), layout, image).await?;
    }
    let run_id = format!("{:x}", std::process::id());
    let where_ = match (&private, a.agents) {
        (Some(_), 0) => "private server".to_string(),
        (Some(_), n) => format!("private server with {n} remote agents"),
        (None, _) => "server".to_string(),
    };
    if !a.json {
        let modes: Vec<&str> = modes.iter().map(|m| m.as_str()).collect();
        out!(
            "warren bench create: backend={backend} n={} c={} connections={} mode={} ({where_} at {address}; records in group commits)",
            a.count,
            a.concurrency,
            a.connections,
            modes.join("+")
        );
    }
    let prefix = format!("bench-{run_id}");
    let mut base = SandboxSpec {
        backend,
        image: a.image.clone(),
        ..SandboxSpec::default()
    };
    if backend == BackendKind::Linux {
        base.command = vec!["/bin/sleep".into(), "3600".into()];
        base.stop_grace_period_seconds = Some(0.0);
    }
    base.annotations
        .insert("resources.limits.cpu".into(), "1".into());
    base.annotations
        .insert("resources.limits.memory".into(), "256Mi".into());
    base.labels.insert("bench".into(), prefix.clone());
    let (modes_json, errors) = if a.keep {
        let (p, b, mode) = (prefix.clone(), base.clone(), modes[0]);
        let created = drive(&clients, a.count, a.concurrency, move |mut c, i| {
            let spec = SandboxSpec {
                name: format!("{p}-{i}"),
                consistency: Some(mode),
                ..b.clone()
            };
            async move {
                c.create_sandbox(v1::CreateSandboxRequest {
                    spec: Some(spec_to_pb(&spec)),
                    ..Default::default()
                })
                .await
                .map(|_| ())
            }
        })
        .await?;
        let json = report(&format!("create ({mode})"), &created);
        (
            serde_json::json!({ mode.as_str(): {"create": json, "delete": null} }),
            created.errors,
        )
    } else {
        cluster::mode_phases(&clients, a.count, a.concurrency, &base, &modes, &prefix).await?
    };
    let pool_json = match a.pool {
        Some(n) => {
            cluster::pool_phases(
                &clients,
                &address,
                token.as_deref(),
                n,
                a.concurrency,
                &base,
                &prefix,
            )
            .await?
        }
        None => serde_json::Value::Null,
    };
    if a.json {
        // `create` and `delete` hold the first mode's figures; `modes` every mode's.
        let first = &modes_json[modes[0].as_str()];
        let all = serde_json::json!({
            "backend": backend.as_str(), "n": a.count, "concurrency": a.concurrency,
            "connections": a.connections, "agents": a.agents, "create": first["create"],
            "delete": first["delete"], "modes": modes_json, "pool": pool_json,
        });
        out!("{all}");
    }
    // Prove the server is still healthy after the run.
    let info = answer(
        clients[0]
            .get_server_info(v1::GetServerInfoRequest {})
            .await,
    )?;
    if !a.keep && info.sandboxes != 0 && private.is_some() {
        bail!("{} sandboxes left after the delete phase", info.sandboxes);
    }
    drop(_agents);
    drop(private);
    Ok(if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The first line a child prints on stdout, without `prefix`; within 30 s.
fn first_line(child: &mut std::process::Child, prefix: &str) -> anyhow::Result<String> {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        // Keep reading: a closed pipe would fail the child's later prints.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .context("no answer within 30 s")?;
    line.trim_end()
        .strip_prefix(prefix)
        .map(str::to_string)
        .with_context(|| format!("unexpected first line {line:?}"))
}

/// The peer that runs the same workload outside warren, if it is installed.
fn peer_command(
    backend: BackendKind,
    image: &str,
    args: &[String],
) -> Option<(String, std::process::Command)> {
    match backend {
        BackendKind::Wasm => {
            let found = std::env::var_os("PATH")
                .into_iter()
                .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .map(|d| d.join("wasmtime"))
                .find(|p| p.is_file())?;
            let mut cmd = std::process::Command::new(&found);
            cmd.arg("run")
                .arg(image)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            Some(("wasmtime run (CLI)".to_string(), cmd))
        }
        _ => None,
    }
}

async fn run_to_exit(a: RunArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    let backend: BackendKind = super::backend_arg(&a.backend)?;
    if a.count == 0 || a.concurrency == 0 {
        return Err(usage("-n and -c must be at least 1"));
    }
    if backend == BackendKind::Vm {
        return vm::run(a, g).await;
    }
    if a.image.is_empty() {
        return Err(usage(
            "--image: give the image (linux) or module (wasm) to run",
        ));
    }
    if backend == BackendKind::Linux {
        return linux::run(a, g).await;
    }
    if a.image_layout.is_some() {
        return Err(usage("--image-layout is for the linux backend"));
    }
    let image = std::fs::canonicalize(&a.image)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| a.image.clone());
    let private = if g.server.is_none() {
        Some(PrivateServer::start(&a.server_log_level, None, &[])?)
    } else {
        None
    };
    let address = match &private {
        Some(p) => p.address.clone(),
        None => g.address()?,
    };
    let clients = vec![connect_retrying(&address, g.token.as_deref()).await?];
    if !a.json {
        out!(
            "warren bench run: backend={backend} image={image} n={} c={}",
            a.count,
            a.concurrency
        );
    }
    let prefix = Arc::new(format!("run-{:x}", std::process::id()));
    let (p, img, args) = (prefix.clone(), image.clone(), a.args.clone());
    let runs = drive(&clients, a.count, a.concurrency, move |mut c, i| {
        let spec = SandboxSpec {
            name: format!("{p}-{i}"),
            backend,
            image: Some(img.clone()),
            args: args.clone(),
            ..SandboxSpec::default()
        };
        async move { create_and_wait(&mut c, &spec).await }
    })
    .await?;
    let ours = report("warren", &runs);
    // Clean up outside the timed part.
    let p = prefix.clone();
    drive(&clients, a.count, a.concurrency.max(8), move |mut c, i| {
        let req = v1::DeleteSandboxRequest {
            name: format!("{p}-{i}"),
            grace_period_seconds: Some(0),
            id: None,
        };
        async move { c.delete_sandbox(req).await.map(|_| ()) }
    })
    .await?;
    let pool_json = if backend == BackendKind::Wasm {
        instantiate_only(&image, a.count.min(1000)).await?
    } else {
        serde_json::Value::Null
    };
    let mut peer_json = serde_json::Value::Null;
    match peer_command(backend, &image, &a.args) {
        Some((name, _)) if a.peer_runs == 0 => out!("peer {name}: skipped (--peer-runs 0)"),
        Some((name, mut cmd)) => {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let start = Instant::now();
            for _ in 0..a.peer_runs {
                let t = Instant::now();
                let status = cmd.status().with_context(|| format!("running {name}"))?;
                if !status.success() {
                    bail!("{name} failed: {status}");
                }
                hist.saturating_record(t.elapsed().as_micros() as u64);
            }
            let peer = Phase {
                hist,
                elapsed: start.elapsed(),
                errors: 0,
                first_error: None,
            };
            peer_json = report("peer", &peer);
            out!("         peer = {name}, sequential");
            let ratio = peer.hist.value_at_quantile(0.5) as f64
                / runs.hist.value_at_quantile(0.5).max(1) as f64;
            out!("median: warren is {ratio:.1}x faster than the peer");
        }
        None => out!(
            "peer: none installed for {backend} (for wasm: scripts/bench-setup.sh installs the wasmtime CLI)"
        ),
    }
    if a.json {
        out!(
            "{}",
            serde_json::json!({"backend": backend.as_str(), "n": a.count, "concurrency": a.concurrency, "warren": ours, "in_process": pool_json, "peer": peer_json})
        );
    }
    drop(private);
    Ok(if runs.errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Creates a sandbox and waits for it to end, in one call (`wait` on the create); an exit
/// code other than 0 is an error.
async fn create_and_wait(c: &mut Client, spec: &SandboxSpec) -> Result<(), tonic::Status> {
    let name = spec.name.clone();
    let done = c
        .create_sandbox(v1::CreateSandboxRequest {
            spec: Some(spec_to_pb(spec)),
            wait: true,
            wait_timeout_ms: Some(60_000),
            ..Default::default()
        })
        .await?;
    let st = done
        .into_inner()
        .sandbox
        .and_then(|s| s.status)
        .unwrap_or_default();
    if st.exit_code != Some(0) {
        return Err(tonic::Status::internal(format!(
            "{name} ended {} {} (exit code {:?})",
            st.phase, st.reason, st.exit_code
        )));
    }
    Ok(())
}

/// The floor under the API figure: instantiating from the pool (and running) in this process,
/// with no RPC, no store write and no log file.
async fn instantiate_only(image: &str, n: usize) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::Builder::new()
        .prefix("warren-bench-wasm-")
        .tempdir()?;
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = warren_wasm::WasmBackend::new(
        dir.path().to_path_buf(),
        warren_wasm::WasmConfig::default(),
        events,
    )?;
    let bench = backend.bench_instantiate(image, n).await?;
    let mut out = serde_json::Map::new();
    for (name, samples) in [
        ("instantiate", &bench.instantiate),
        ("instantiate+run", &bench.instantiate_and_run),
    ] {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for d in samples {
            hist.saturating_record(d.as_nanos() as u64);
        }
        let (p50, p99) = (hist.value_at_quantile(0.5), hist.value_at_quantile(0.99));
        out!(
            "{name:<16} p50 {:>7.1}µs  p99 {:>7.1}µs  (in-process, pooled, {} samples)",
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            samples.len()
        );
        out.insert(
            name.to_string(),
            serde_json::json!({"p50_ns": p50, "p99_ns": p99}),
        );
    }
    Ok(serde_json::Value::Object(out))
}

/// Makes the child receive SIGTERM (a graceful stop) when this process dies.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, which
    // is async-signal-safe; it touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
