//! `warren bench run -b linux`: a container workload run to completion N times through the
//! API, side by side with `crun run` and `runc run` of an equivalent OCI bundle.
//!
//! What one timed run is. For warren: the create RPC until `WaitSandbox` returns the exit
//! (the server writes the bundle and starts a supervisor, which makes the cgroups, the
//! namespaces and the overlay rootfs, execs the workload, reaps it and reports its end). The
//! deletes follow as a phase of their own. For a peer: the whole `crun run --bundle B ID`
//! process, which creates the container, runs it and destroys it. One untimed warm-up run
//! each comes first, so no figure includes a cold page cache.
//!
//! The peers' bundle holds the same files: the image's layers unpacked with `tar` into a
//! plain directory (`--image-layout`), or `/bin/busybox` with the applet links the
//! busybox-layout example packs. Its `config.json` is the peer's own `spec` with the
//! workload's arguments, no terminal, a writable root, the pid, network, ipc, uts and mount
//! namespaces, and no `/sys/fs/cgroup` mount (warren mounts none). What still differs is in
//! the peers' favour: warren mounts an overlay per sandbox where they bind a directory,
//! installs its default seccomp filter where `spec` configures none, and also unshares the
//! cgroup namespace.
//!
//! Everything made here is removed on the way out, on errors and Ctrl-C too: the private
//! server and its directory, the peers' bundles and state (`--root` in a temp dir), and every
//! cgroup under the run's own parent `warren-bench-PID`, in every hierarchy.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use warren_control::client::Client;
use warren_proto::{spec_to_pb, v1};
use warren_spec::{BackendKind, SandboxSpec};

use super::{
    Globals, Phase, PrivateServer, RunArgs, answer, connect_retrying, create_and_wait, drive,
    report, us, usage,
};

/// The applets the busybox-layout example links, for a rootfs made without a layout.
const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "true", "echo", "cat", "sleep", "ls", "mkdir", "id", "hostname", "env", "pwd", "ps",
    "head", "dd", "yes", "touch", "rm", "mount",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Crun,
    Runc,
}

impl Peer {
    const ALL: [Peer; 2] = [Peer::Crun, Peer::Runc];

    fn name(self) -> &'static str {
        match self {
            Peer::Crun => "crun",
            Peer::Runc => "runc",
        }
    }

    /// The target for warren's median as a fraction of this peer's.
    fn target(self) -> f64 {
        match self {
            Peer::Crun => 0.5,
            Peer::Runc => 0.25,
        }
    }

    /// The program on `PATH`, or in the sbin directories a non-login root shell may lack.
    fn find(self) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
            .map(|d| d.join(self.name()))
            .find(|p| p.is_file())
    }
}

/// How one peer's part of the run ended.
enum Outcome {
    Skipped(String),
    Failed(String),
    Ran(Phase),
}

pub(super) async fn run(a: RunArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    if a.args.is_empty() {
        return Err(usage(
            "bench run -b linux: give the workload after --, e.g. `-- /bin/true` (the peers need a command)",
        ));
    }
    let parent = format!("warren-bench-{}", std::process::id());
    // Declared first, so dropped last: once the server and the peers are gone, it kills and
    // removes whatever is left under the run's cgroup parent.
    let _cgroups = CgroupSweep(parent.clone());
    let linux_dir = match (&a.linux_dir, &g.server) {
        (Some(_), Some(_)) => {
            return Err(usage(
                "bench run -b linux: --linux-dir is for the private server; a server given with -s has its own",
            ));
        }
        (Some(under), None) => Some(
            tempfile::Builder::new()
                .prefix("warren-bench-linux-")
                .tempdir_in(under)
                .with_context(|| format!("--linux-dir {}", under.display()))?,
        ),
        (None, _) => None,
    };
    let private = match g.server {
        None => {
            let mut extra = vec!["--cgroup-parent".to_string(), parent.clone()];
            if let Some(d) = &linux_dir {
                extra.push("--linux-dir".into());
                extra.push(d.path().display().to_string());
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            Some(PrivateServer::start(&a.server_log_level, None, &extra)?)
        }
        Some(_) => None,
    };
    let prefix = format!("run-{:x}", std::process::id());
    let stop = Arc::new(AtomicBool::new(false));
    let result = tokio::select! {
        r = measure(&a, g, private.as_ref(), &parent, &prefix, stop.clone()) => r,
        _ = tokio::signal::ctrl_c() => {
            stop.store(true, Ordering::Relaxed);
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    if result.is_err() && private.is_none() {
        // A private server goes with its directory; on a shared one, delete what this run
        // created and may not have deleted yet.
        let cleanup = delete_labelled(g, &prefix);
        if tokio::time::timeout(Duration::from_secs(30), cleanup)
            .await
            .is_err()
        {
            eprintln!("warning: sandboxes labelled bench={prefix} may be left on the server");
        }
    }
    drop(private);
    drop(linux_dir);
    result
}

/// Deletes every sandbox labelled `bench=PREFIX`, best effort, until none has shown up for a
/// moment (creates that were in flight when the run was given up may still land).
async fn delete_labelled(g: &Globals, prefix: &str) {
    let Ok(mut c) = g.connect().await else {
        return;
    };
    let mut quiet = 0;
    while quiet < 3 {
        let Ok(list) = c
            .list_sandboxes(v1::ListSandboxesRequest {
                label_selector: format!("bench={prefix}"),
                backends: Vec::new(),
            })
            .await
        else {
            return;
        };
        let names: Vec<String> = list
            .into_inner()
            .sandboxes
            .into_iter()
            .filter_map(|sb| sb.spec.map(|s| s.name))
            .collect();
        quiet = if names.is_empty() { quiet + 1 } else { 0 };
        for name in names {
            let _ = delete(c.clone(), name).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn measure(
    a: &RunArgs,
    g: &Globals,
    private: Option<&PrivateServer>,
    parent: &str,
    prefix: &str,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<ExitCode> {
    let address = match private {
        Some(p) => p.address.clone(),
        None => g.address()?,
    };
    let token = g.token.as_deref();
    let clients = vec![connect_retrying(&address, token).await?];
    if let Some(layout) = &a.image_layout {
        let reply = super::import_layout(&address, token, layout, &a.image).await?;
        if !a.json {
            for image in reply.images {
                out!("imported {} {}", image.names.join(", "), image.id);
            }
        }
    }
    // What the private server will run (it is this same executable): the small supervisor
    // binary starts ~1 ms faster than `warren __supervise`, so say which one the figures used.
    let supervisor = match private {
        Some(_) => warren_linux::LinuxConfig::default_supervisor()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        None => "the server's".to_string(),
    };
    if !a.json {
        let where_ = match private {
            Some(_) => format!(
                "private server, cgroup parent {parent}, supervisor {supervisor}, sandboxes {}",
                match &a.linux_dir {
                    Some(d) => format!("under {}", d.display()),
                    None => "in its state dir".to_string(),
                }
            ),
            None => format!("server at {address}"),
        };
        out!(
            "warren bench run: backend=linux image={} n={} c={} -- {} ({where_})",
            a.image,
            a.count,
            a.concurrency,
            a.args.join(" ")
        );
        if supervisor.ends_with(" __supervise") {
            out!(
                "note: warren-supervise beside this binary is missing or older than it, so the \
                 server runs `warren __supervise`, which starts ~1 ms slower; build it with \
                 `cargo build --release -p warren-cli -p warren-linux`, and `touch` it if cargo \
                 relinked only `warren`"
            );
        }
    }

    let mut base = SandboxSpec {
        backend: BackendKind::Linux,
        image: Some(a.image.clone()),
        args: a.args.clone(),
        ..SandboxSpec::default()
    };
    base.labels.insert("bench".into(), prefix.to_string());

    let mut c = clients[0].clone();
    let mut warm = base.clone();
    warm.name = format!("{prefix}-warm");
    let warmed = create_and_wait(&mut c, &warm).await;
    let _ = delete(c.clone(), warm.name.clone()).await;
    if let Err(s) = warmed {
        let hint = if a.image_layout.is_none() && s.message().contains("spec.image") {
            "\nimport the image first, or pass --image-layout DIR; make a busybox layout with \
             `cargo run --release -p warren-image --example busybox-layout -- DIR`"
        } else {
            ""
        };
        bail!("the warm-up run failed: {}{hint}", s.message());
    }

    let (p, spec) = (prefix.to_string(), base.clone());
    let runs = drive(&clients, a.count, a.concurrency, move |mut c, i| {
        let mut spec = spec.clone();
        spec.name = format!("{p}-{i}");
        async move { create_and_wait(&mut c, &spec).await }
    })
    .await?;
    let ours = report("warren", &runs);
    let p = prefix.to_string();
    let deleted = drive(&clients, a.count, a.concurrency, move |c, i| {
        delete(c, format!("{p}-{i}"))
    })
    .await?;
    let deletes = report("delete", &deleted);
    let (running, warm_hits, running_json) = create_to_running(&clients, a, &base, prefix).await?;
    let ready = hand_outs_from_a_ready_pool(&mut c, a, &base, prefix).await?;
    let mut failed = runs.errors > 0 || deleted.errors > 0 || running.errors > 0;
    if private.is_some() {
        let info = answer(c.get_server_info(v1::GetServerInfoRequest {}).await)?;
        if info.sandboxes != 0 {
            out!("error: {} sandboxes left after the deletes", info.sandboxes);
            failed = true;
        }
    }

    let peers = run_peers(a, parent, stop).await;
    let mut peers_json = serde_json::Map::new();
    for (peer, outcome) in &peers {
        let name = peer.name();
        let value = match outcome {
            Outcome::Skipped(why) => {
                out!("{name}: skipped: {why}");
                json!({ "skipped": why })
            }
            Outcome::Failed(why) => {
                out!("{name}: FAILED: {why}");
                failed = true;
                json!({ "failed": why })
            }
            Outcome::Ran(phase) => {
                let mut value = report(name, phase);
                failed |= phase.errors > 0;
                if let Some(map) = value.as_object_mut() {
                    map.insert(
                        "warren_over_peer_p50".into(),
                        json!(ratio(&runs, phase, 0.5)),
                    );
                    map.insert(
                        "warren_over_peer_p99".into(),
                        json!(ratio(&runs, phase, 0.99)),
                    );
                }
                value
            }
        };
        peers_json.insert(name.to_string(), value);
    }
    for (peer, outcome) in &peers {
        if let Outcome::Ran(phase) = outcome {
            let (ours50, theirs50) = (
                runs.hist.value_at_quantile(0.5),
                phase.hist.value_at_quantile(0.5),
            );
            let (r50, r99) = (ratio(&runs, phase, 0.5), ratio(&runs, phase, 0.99));
            out!(
                "warren/{}: p50 {r50:.2}x ({} vs {}), p99 {r99:.2}x; target p50 <= {}x: {}",
                peer.name(),
                us(ours50),
                us(theirs50),
                peer.target(),
                if r50 <= peer.target() {
                    "met"
                } else {
                    "missed"
                }
            );
        }
    }
    if a.json {
        out!(
            "{}",
            json!({
                "backend": "linux", "image": a.image, "args": a.args, "n": a.count,
                "supervisor": supervisor, "linux_dir": a.linux_dir,
                "concurrency": a.concurrency, "warren": ours, "delete": deletes,
                "running": running_json, "running_warm_hits": warm_hits,
                "ready_pool": ready, "peers": peers_json,
            })
        );
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Create → running: the create RPC alone, which answers once the workload has `execve`d
/// (from a warm shell, once the shell was claimed and its workload started). The sandboxes
/// are waited for and deleted after, untimed. Returns the phase and how many creates took a
/// warm shell.
async fn create_to_running(
    clients: &[Client],
    a: &RunArgs,
    base: &SandboxSpec,
    prefix: &str,
) -> anyhow::Result<(Phase, usize, Value)> {
    // The hand-outs' own times (µs), apart from the creates that found no warm shell.
    let hit_times = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let (p, spec, counted) = (prefix.to_string(), base.clone(), hit_times.clone());
    let phase = drive(clients, a.count, a.concurrency, move |mut c, i| {
        let mut spec = spec.clone();
        spec.name = format!("{p}-running-{i}");
        let counted = counted.clone();
        async move {
            let (took, warm) = timed_create(&mut c, &spec).await?;
            if warm {
                counted
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .saturating_record(took);
            }
            Ok(())
        }
    })
    .await?;
    let hit_times = hit_times
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let hits = hit_times.len() as usize;
    let mut json = report("running", &phase);
    out!(
        "         (create->running: the create call alone, answered once the workload has \
         started; {hits} of {} from a warm shell)",
        phase.hist.len()
    );
    if hits > 0 {
        let at = |q: f64| hit_times.value_at_quantile(q);
        out!(
            "warm hit p50 {:>8}  p90 {:>8}  ({hits} hand-outs of a warm shell alone)",
            us(at(0.5)),
            us(at(0.9))
        );
        if let Some(map) = json.as_object_mut() {
            map.insert("warm_hit_p50_us".into(), json!(at(0.5)));
            map.insert("warm_hit_p90_us".into(), json!(at(0.9)));
        }
    }
    let p = prefix.to_string();
    let ended = drive(clients, a.count, a.concurrency, move |mut c, i| {
        let name = format!("{p}-running-{i}");
        async move {
            let _ = c
                .wait_sandbox(v1::WaitSandboxRequest {
                    name: name.clone(),
                    timeout_ms: Some(60_000),
                })
                .await;
            delete(c, name).await
        }
    })
    .await?;
    if ended.errors > 0 {
        out!(
            "error: {} of the create->running sandboxes could not be deleted: {}",
            ended.errors,
            ended.first_error.as_deref().unwrap_or("")
        );
    }
    Ok((phase, hits, json))
}

/// One create call, timed (µs), and whether it took a warm shell.
async fn timed_create(c: &mut Client, spec: &SandboxSpec) -> Result<(u64, bool), tonic::Status> {
    let t = Instant::now();
    let reply = c
        .create_sandbox(v1::CreateSandboxRequest {
            spec: Some(spec_to_pb(spec)),
            ..Default::default()
        })
        .await?;
    let took = t.elapsed().as_micros() as u64;
    let warm = reply
        .into_inner()
        .sandbox
        .and_then(|s| s.status)
        .is_some_and(|s| s.backend_info.get("warm").is_some_and(|w| w == "true"));
    Ok((took, warm))
}

/// Most timed hand-outs from a ready pool.
const READY_POOL_RUNS: usize = 50;

/// Hand-outs from a ready pool, when the server keeps warm shells of the image: up to
/// [`READY_POOL_RUNS`] creates, one at a time, each made once `warren info` reports the pool
/// full and a moment has passed (so the refill's last shell start is not competing), each
/// create → running timed alone. What a create meets when sandboxes are asked for now and
/// then; back to back (above), creates drain the pool faster than it refills and share the
/// CPUs with the refill. `None` without a pool of the image; an error when a create fails.
async fn hand_outs_from_a_ready_pool(
    c: &mut Client,
    a: &RunArgs,
    base: &SandboxSpec,
    prefix: &str,
) -> anyhow::Result<Option<Value>> {
    if warm_pool(c, &a.image).await.is_none() {
        return Ok(None);
    }
    let mut times = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut cold = 0;
    for i in 0..a.count.min(READY_POOL_RUNS) {
        if !pool_full(c, &a.image).await {
            out!(
                "warm ready: the pool of {} did not refill in 30 s; stopped after {i} hand-outs",
                a.image
            );
            break;
        }
        let mut spec = base.clone();
        spec.name = format!("{prefix}-ready-{i}");
        let (took, warm) = timed_create(c, &spec)
            .await
            .with_context(|| format!("create {} (ready pool)", spec.name))?;
        if warm {
            times.saturating_record(took);
        } else {
            cold += 1;
        }
        let _ = c
            .wait_sandbox(v1::WaitSandboxRequest {
                name: spec.name.clone(),
                timeout_ms: Some(60_000),
            })
            .await;
        delete(c.clone(), spec.name)
            .await
            .with_context(|| format!("delete {prefix}-ready-{i}"))?;
    }
    let hits = times.len();
    if hits == 0 {
        out!("warm ready: no create took a warm shell ({cold} started cold)");
        return Ok(Some(json!({ "hand_outs": 0, "cold": cold })));
    }
    let at = |q: f64| times.value_at_quantile(q);
    out!(
        "warm ready p50 {:>8}  p90 {:>8}  ({hits} hand-outs, each from a full pool after a pause; {cold} cold)",
        us(at(0.5)),
        us(at(0.9))
    );
    Ok(Some(json!({
        "hand_outs": hits, "cold": cold, "p50_us": at(0.5), "p90_us": at(0.9),
    })))
}

/// `(ready, target)` of the server's warm pool of `image`, from `warren info`.
async fn warm_pool(c: &mut Client, image: &str) -> Option<(usize, usize)> {
    let info = c
        .get_server_info(v1::GetServerInfoRequest {})
        .await
        .ok()?
        .into_inner();
    let linux = info.backends.into_iter().find(|b| b.name == "linux")?;
    warren_runtime::parse_warm(&linux.detail, warren_linux::WARM_LABEL, image)
}

/// Waits (30 s at most) until the pool of `image` is full, then 100 ms more; false when it
/// did not fill.
async fn pool_full(c: &mut Client, image: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match warm_pool(c, image).await {
            Some((ready, target)) if ready >= target => break,
            _ if Instant::now() >= deadline => return false,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    true
}

/// warren's figure over the peer's at quantile `q`: below 1 means warren is faster.
fn ratio(ours: &Phase, theirs: &Phase, q: f64) -> f64 {
    ours.hist.value_at_quantile(q) as f64 / theirs.hist.value_at_quantile(q).max(1) as f64
}

async fn delete(mut c: Client, name: String) -> Result<(), tonic::Status> {
    c.delete_sandbox(v1::DeleteSandboxRequest {
        name,
        grace_period_seconds: Some(0),
        id: None,
    })
    .await
    .map(|_| ())
}

/// Times each installed peer on the bundle, one after the other, each run sequential.
async fn run_peers(a: &RunArgs, parent: &str, stop: Arc<AtomicBool>) -> Vec<(Peer, Outcome)> {
    let skip_all = |why: &str| {
        Peer::ALL
            .iter()
            .map(|p| (*p, Outcome::Skipped(why.to_string())))
            .collect()
    };
    if a.peer_runs == 0 {
        return skip_all("--peer-runs 0");
    }
    if !nix::unistd::geteuid().is_root() {
        return skip_all("needs root");
    }
    let mut outcomes = Vec::new();
    let mut runnable = Vec::new();
    for peer in Peer::ALL {
        let refusal = match peer {
            Peer::Crun => crun_refusal(),
            Peer::Runc => None,
        };
        match (peer.find(), refusal) {
            (None, _) => outcomes.push((
                peer,
                Outcome::Skipped(
                    "not installed (scripts/bench-setup.sh linux installs it)".to_string(),
                ),
            )),
            (Some(_), Some(why)) => outcomes.push((peer, Outcome::Skipped(why))),
            (Some(program), None) => runnable.push((peer, program)),
        }
    }
    if runnable.is_empty() {
        return outcomes;
    }
    let (layout, image, args) = (a.image_layout.clone(), a.image.clone(), a.args.clone());
    let (parent, peers) = (parent.to_string(), runnable.clone());
    let made = tokio::task::spawn_blocking(move || {
        PeerWork::new(layout.as_deref(), &image, &args, &parent, peers)
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|r| r);
    let work = match made {
        Ok(work) => Arc::new(work),
        Err(e) => {
            for (peer, _) in runnable {
                outcomes.push((peer, Outcome::Failed(format!("the bundle: {e:#}"))));
            }
            return outcomes;
        }
    };
    if !a.json {
        out!(
            "peers: `crun|runc run` of {}, sequential, {} runs each",
            work.source,
            a.peer_runs
        );
    }
    for (peer, program) in runnable {
        // The blocking task owns a handle on the bundle, so it is removed only after the
        // last run ended, even if this future is dropped (Ctrl-C) while one is in flight.
        let (work, stop, runs) = (work.clone(), stop.clone(), a.peer_runs);
        let outcome = tokio::task::spawn_blocking(move || work.time(peer, &program, runs, &stop))
            .await
            .unwrap_or_else(|e| Outcome::Failed(e.to_string()));
        outcomes.push((peer, outcome));
    }
    outcomes.sort_by_key(|(p, _)| Peer::ALL.iter().position(|q| q == p));
    outcomes
}

/// The peers' temp dir: a rootfs, a bundle and a `--root` state dir per peer.
struct PeerWork {
    dir: tempfile::TempDir,
    /// What the rootfs was made from, for the output.
    source: String,
    peers: Vec<(Peer, PathBuf)>,
    prefix: String,
}

impl PeerWork {
    fn new(
        layout: Option<&Path>,
        image: &str,
        args: &[String],
        parent: &str,
        peers: Vec<(Peer, PathBuf)>,
    ) -> anyhow::Result<PeerWork> {
        let dir = tempfile::Builder::new()
            .prefix("warren-bench-peers-")
            .tempdir()?;
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs)?;
        let source = match layout {
            Some(layout) => {
                let layers = unpack_layout(layout, image, &rootfs, dir.path())
                    .with_context(|| format!("unpacking {}", layout.display()))?;
                format!("{} ({layers} layer(s) unpacked)", layout.display())
            }
            None if is_busybox(image) => {
                busybox_rootfs(&rootfs)?;
                "/bin/busybox and its applet links (no --image-layout given)".to_string()
            }
            None => {
                bail!("pass --image-layout DIR so the peers run the same files as image {image}")
            }
        };
        let work = PeerWork {
            dir,
            source,
            peers,
            prefix: format!("wb-{:x}", std::process::id()),
        };
        for (peer, program) in &work.peers {
            std::fs::create_dir(work.state_root(*peer))?;
            write_config(
                program,
                &work.bundle(*peer),
                &rootfs,
                args,
                &format!("/{parent}/{}", peer.name()),
            )
            .with_context(|| format!("{} config.json", peer.name()))?;
        }
        Ok(work)
    }

    fn bundle(&self, peer: Peer) -> PathBuf {
        self.dir.path().join(format!("bundle-{}", peer.name()))
    }

    fn state_root(&self, peer: Peer) -> PathBuf {
        self.dir.path().join(format!("state-{}", peer.name()))
    }

    /// One `PEER --root R run --bundle B ID`; the container is gone when it returns.
    fn run_once(&self, peer: Peer, program: &Path, id: &str) -> Result<(), String> {
        let out = Command::new(program)
            .arg("--root")
            .arg(self.state_root(peer))
            .arg("run")
            .arg("--bundle")
            .arg(self.bundle(peer))
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("starting {}: {e}", program.display()))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        Err(format!(
            "{id}: {} ({})",
            last.unwrap_or("no message").trim(),
            out.status
        ))
    }

    /// Removes a container a failed run may have left (outside the timed part).
    fn delete(&self, peer: Peer, program: &Path, id: &str) {
        if self.state_root(peer).join(id).exists() {
            let _ = Command::new(program)
                .arg("--root")
                .arg(self.state_root(peer))
                .args(["delete", "-f", id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    fn time(&self, peer: Peer, program: &Path, runs: usize, stop: &AtomicBool) -> Outcome {
        let warm = format!("{}-{}-warm", self.prefix, peer.name());
        let warmed = self.run_once(peer, program, &warm);
        self.delete(peer, program, &warm);
        if let Err(e) = warmed {
            return Outcome::Failed(format!("the warm-up run failed: {e}"));
        }
        let mut hist = match Histogram::<u64>::new_with_bounds(1, 60_000_000, 3) {
            Ok(h) => h,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let (mut errors, mut first_error) = (0, None);
        let start = Instant::now();
        for i in 0..runs {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let id = format!("{}-{}-{i}", self.prefix, peer.name());
            let t = Instant::now();
            match self.run_once(peer, program, &id) {
                Ok(()) => hist.saturating_record(t.elapsed().as_micros() as u64),
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
            self.delete(peer, program, &id);
        }
        Outcome::Ran(Phase {
            hist,
            elapsed: start.elapsed(),
            errors,
            first_error,
        })
    }
}

impl Drop for PeerWork {
    fn drop(&mut self) {
        for (peer, program) in &self.peers {
            if let Ok(entries) = std::fs::read_dir(self.state_root(*peer)) {
                for e in entries.flatten() {
                    if let Some(id) = e.file_name().to_str() {
                        self.delete(*peer, program, id);
                    }
                }
            }
        }
    }
}

pub(super) fn is_busybox(image: &str) -> bool {
    let name = image.strip_prefix("docker.io/").unwrap_or(image);
    let name = name.strip_prefix("library/").unwrap_or(name);
    name == "busybox" || name == "busybox:latest"
}

/// Writes `bundle/config.json`: the peer's own `spec`, made equivalent to warren's sandbox.
pub(super) fn write_config(
    program: &Path,
    bundle: &Path,
    rootfs: &Path,
    args: &[String],
    cgroups_path: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir(bundle)?;
    let out = Command::new(program)
        .arg("spec")
        .current_dir(bundle)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} spec", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} spec: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let path = bundle.join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("reading {}", path.display()))?;
    // Indexing a Value to assign panics unless it is an object: check first.
    for key in ["process", "linux"] {
        if !spec.get(key).is_some_and(Value::is_object) {
            bail!("{}: no {key:?} object", path.display());
        }
    }
    spec["process"]["args"] = json!(args);
    spec["process"]["terminal"] = json!(false);
    spec["root"] = json!({ "path": rootfs, "readonly": false });
    if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
        mounts.retain(|m| m["destination"] != "/sys/fs/cgroup");
    }
    spec["linux"]["namespaces"] =
        json!(["pid", "network", "ipc", "uts", "mount"].map(|t| json!({ "type": t })));
    spec["linux"]["cgroupsPath"] = json!(cgroups_path);
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}

/// Unpacks the layers of `image` from an OCI layout (a directory or a tar of one) into
/// `rootfs`, bottom first, with the system's `tar`. Whiteouts are not applied, so an image
/// that has any is refused (a single-layer image such as busybox has none). Returns the
/// number of layers.
pub(super) fn unpack_layout(
    layout: &Path,
    image: &str,
    rootfs: &Path,
    scratch: &Path,
) -> anyhow::Result<usize> {
    let layout = if layout.is_dir() {
        layout.to_path_buf()
    } else {
        let dir = scratch.join("layout");
        std::fs::create_dir(&dir)?;
        untar(layout, &dir)?;
        dir
    };
    let read = |path: &Path| -> anyhow::Result<Value> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    };
    let index = read(&layout.join("index.json"))?;
    let manifests = index["manifests"]
        .as_array()
        .filter(|m| !m.is_empty())
        .context("index.json lists no manifests")?;
    let tag = image
        .rsplit_once(':')
        .filter(|(_, t)| !t.contains('/'))
        .map_or("latest", |(_, t)| t);
    let with_tag = format!("{image}:latest");
    let mut desc = manifests
        .iter()
        .find(|m| {
            let r = m["annotations"]["org.opencontainers.image.ref.name"].as_str();
            r == Some(image) || r == Some(tag) || r == Some(with_tag.as_str())
        })
        .unwrap_or(&manifests[0])
        .clone();
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    // An image index may point at per-platform manifests (or further indexes).
    for _ in 0..4 {
        let blob = read(&blob_path(&layout, &desc["digest"])?)?;
        if let Some(list) = blob["manifests"].as_array() {
            desc = list
                .iter()
                .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
                .or(list.first())
                .context("an image index without manifests")?
                .clone();
            continue;
        }
        let layers = blob["layers"]
            .as_array()
            .context("the manifest has no layers")?;
        for layer in layers {
            untar(&blob_path(&layout, &layer["digest"])?, rootfs)?;
        }
        if let Some(w) = find_whiteout(rootfs) {
            bail!(
                "{} is a whiteout, which this bench does not apply; use an image without them",
                w.display()
            );
        }
        return Ok(layers.len());
    }
    bail!("image indexes nested too deep")
}

/// `blobs/ALG/HEX` for a descriptor's digest, which must be `alg:hex` (no path tricks).
fn blob_path(layout: &Path, digest: &Value) -> anyhow::Result<PathBuf> {
    let digest = digest.as_str().context("a descriptor without a digest")?;
    match digest.split_once(':') {
        Some((alg, hex))
            if !alg.is_empty()
                && !hex.is_empty()
                && alg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+')
                && hex.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(layout.join("blobs").join(alg).join(hex))
        }
        _ => bail!("digest {digest:?} is not ALG:HEX"),
    }
}

/// `tar -xf ARCHIVE -C DIR` (GNU tar detects the compression and refuses `..` names).
fn untar(archive: &Path, dir: &Path) -> anyhow::Result<()> {
    let out = Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(dir)
        .arg("--numeric-owner")
        .stdin(Stdio::null())
        .output()
        .context("running tar")?;
    if !out.status.success() {
        bail!(
            "tar -xf {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn find_whiteout(dir: &Path) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        if e.file_name().to_string_lossy().starts_with(".wh.") {
            return Some(e.path());
        }
        if e.file_type().is_ok_and(|t| t.is_dir())
            && let Some(w) = find_whiteout(&e.path())
        {
            return Some(w);
        }
    }
    None
}

/// The files of the busybox-layout example, from the host's `/bin/busybox`.
pub(super) fn busybox_rootfs(rootfs: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = rootfs.join("bin");
    std::fs::create_dir(&bin)?;
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .context("copying /bin/busybox (apt-get install busybox-static)")?;
    for applet in BUSYBOX_APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    for (path, mode) in [
        ("etc", 0o755),
        ("tmp", 0o1777),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("root", 0o700),
    ] {
        let dir = rootfs.join(path);
        std::fs::create_dir(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnobody:x:65534:\n")?;
    Ok(())
}

/// `(mount point, filesystem type)` of every mount, from `/proc/self/mountinfo`.
fn mounts() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            // The filesystem type follows the " - " separator; optional fields precede it.
            let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            Some((
                PathBuf::from(fields.get(4)?),
                fields.get(sep + 1)?.to_string(),
            ))
        })
        .collect()
}

fn cgroup_mounts() -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|(_, t)| t == "cgroup" || t == "cgroup2")
        .map(|(m, _)| m)
        .collect()
}

/// Why crun 1.8 will refuse this host: it rejects a hybrid layout (v1 hierarchies plus a
/// cgroup2 mount) while the cgroup2 mount holds controllers.
fn crun_refusal() -> Option<String> {
    let mounts = mounts();
    let root = Path::new("/sys/fs/cgroup");
    let root_type = mounts.iter().rev().find(|(m, _)| m == root)?;
    if root_type.1 == "cgroup2" {
        return None;
    }
    let (unified, _) = mounts.iter().find(|(_, t)| t == "cgroup2")?;
    let controllers = std::fs::read_to_string(unified.join("cgroup.controllers")).ok()?;
    let controllers = controllers.trim();
    if controllers.is_empty() {
        None
    } else if controllers.split(' ').any(|c| c == "hugetlb") {
        Some("needs a v1 hugetlb hierarchy (run scripts/bench-setup.sh)".to_string())
    } else {
        Some(format!(
            "crun refuses a hybrid cgroup layout with controllers on cgroup2 ({controllers})"
        ))
    }
}

/// On drop, kills every process in the cgroups under `/<hierarchy>/<parent>` and removes
/// them, in every hierarchy.
pub(super) struct CgroupSweep(pub(super) String);

impl Drop for CgroupSweep {
    fn drop(&mut self) {
        for mount in cgroup_mounts() {
            remove_cgroup_tree(&mount.join(&self.0));
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    eprintln!("warning: could not remove the cgroup {}", dir.display());
}
