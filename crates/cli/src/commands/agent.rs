//! `warren agent`: a node agent as its own process (seed 004's agent). It runs sandboxes
//! for a control plane (`--server`), serves seed 004's HTTP API (port 5758), heartbeats to
//! the control plane, and runs the janitor.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{info, warn};
use warren_agent::backends::{self, BackendsConfig};
use warren_agent::janitor::Janitor;
use warren_agent::node::NodeAgent;
use warren_agent::{Agent, api};
use warren_control::link::{self, LinkConfig, LinkOracle};
use warren_runtime::SlotCapacity;
use warren_wasm::WasmConfig;

use super::{Globals, key_values, usage};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to serve the agent's HTTP API: HOST:PORT (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:5758")]
    listen: String,
    /// Where the control plane reaches this agent (HOST:PORT). Default: the --listen
    /// address; required when listening on 0.0.0.0.
    #[arg(long)]
    advertise: Option<String>,
    /// Name of this node, unique among the agents. Default: the host name.
    #[arg(long)]
    node: Option<String>,
    /// Sandboxes this agent holds at most.
    #[arg(long, env = "AGENT_CAPACITY", default_value_t = api::DEFAULT_CAPACITY)]
    capacity: u32,
    /// State directory. Default: /var/lib/warren-agent for root, else next to the
    /// server's default.
    #[arg(long, env = "WARREN_AGENT_DIR")]
    dir: Option<PathBuf>,
    /// The image store (OCI images for linux, Wasm artifacts). Default: <dir>/images. Agents
    /// on one host may share one.
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// Label KEY=VALUE for pools' node selectors (repeatable).
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// Sandboxes the control plane does not know are removed after this long, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    orphan_timeout: Duration,
    /// What the slot backend may hand out: cpu=64,memory=256Gi,pids=100000,sandboxes=5000.
    #[arg(long, default_value = "")]
    slot_capacity: String,
    /// Default time between SIGTERM and SIGKILL when stopping, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Parent cgroup of the linux backend's sandboxes.
    #[arg(long, default_value = "warren")]
    cgroup_parent: String,
    /// Keep N warm linux shells of an image ready from the start: linux:IMAGE=N (repeatable;
    /// pools change this later).
    #[arg(long, value_name = "linux:IMAGE=N")]
    warm: Vec<String>,
    /// IPv4 range the linux backend gives `network.mode: egress` sandboxes their addresses
    /// from (a /30 each; /29 or larger). Each server and agent on a host needs its own.
    #[arg(long, value_name = "CIDR", default_value = warren_control::server::DEFAULT_EGRESS_RANGE)]
    linux_egress_cidr: String,
}

fn default_dir() -> PathBuf {
    let server = warren_control::address::default_dir();
    server.with_file_name("warren-agent")
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    super::raise_open_files();
    let server = g
        .server
        .as_deref()
        .ok_or_else(|| usage("--server: required (the control plane, e.g. tcp://10.0.0.1:9090)"))?;
    // One server, or the replicas on one etcd (the agent follows the leader among them).
    let servers = Arc::new(link::Servers::new(
        warren_control::client::parse_servers(server)
            .map_err(|e| usage(format!("--server: {e}")))?,
    ));
    let token = g.token.clone().filter(|t| !t.is_empty()).ok_or_else(|| {
        usage("--token: required (the agent API and the control plane both use it)")
    })?;
    if !warren_control::client::valid_token(&token) {
        return Err(usage(
            "--token: must be printable ASCII, with spaces only between words (a client could \
             never send it as it is)",
        ));
    }
    if args.capacity == 0 {
        return Err(usage("--capacity: 0 sandboxes is no agent at all"));
    }
    let labels = key_values("--label", &args.labels)?;
    let node_name = args.node.clone().unwrap_or_else(super::server::hostname);
    warren_spec::validate_name("--node", &node_name).map_err(|e| usage(e.to_string()))?;
    let slot_capacity: SlotCapacity = args
        .slot_capacity
        .parse()
        .map_err(|e: String| usage(format!("--slot-capacity: {e}")))?;
    let warm = args
        .warm
        .iter()
        .map(|w| match super::server::parse_warm(w) {
            Ok((warren_spec::BackendKind::Linux, image, n)) => Ok((image, n)),
            Ok(_) => Err(usage(format!(
                "--warm {w:?}: an agent runs no vm backend (only linux keeps warm sandboxes here)"
            ))),
            Err(e) => Err(usage(format!("--warm {w:?}: {e}"))),
        })
        .collect::<anyhow::Result<_>>()?;
    warren_linux::egress::parse_range(&args.linux_egress_cidr)
        .map_err(|e| usage(format!("--linux-egress-cidr: {e}")))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on --listen {}", args.listen))?;
    let bound = listener.local_addr().context("reading the bound address")?;
    let advertise = match &args.advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => {
            return Err(usage(
                "--advertise: required when --listen is 0.0.0.0 (the address the server reaches this agent at)",
            ));
        }
        None => bound.to_string(),
    };
    warren_agent::remote::base_url(&advertise).map_err(|e| usage(format!("--advertise: {e}")))?;

    let dir = args.dir.clone().unwrap_or_else(default_dir);
    let built = backends::build(&BackendsConfig {
        dir: dir.clone(),
        slot_capacity,
        wasm: WasmConfig::default(),
        default_grace: args.grace,
        linux_supervisor: warren_control::LinuxConfig::default_supervisor(),
        cgroup_parent: args.cgroup_parent.clone(),
        linux_warm: warm,
        images_dir: args.image_dir.clone(),
        linux_egress_range: args.linux_egress_cidr.clone(),
    })?;
    let agent = Agent::new(node_name.clone(), built.backends);
    for report in agent.report() {
        match &report.available {
            Ok(()) => info!(backend = %report.kind, "backend available"),
            Err(reason) => info!(backend = %report.kind, reason = %reason, "backend unavailable"),
        }
    }
    let node = Arc::new(NodeAgent::new(
        agent.clone(),
        args.capacity,
        Some(built.images),
        args.grace,
    ));
    let found = node.load().await?;
    if found > 0 {
        info!(
            sandboxes = found,
            "found sandboxes of an earlier run; the control plane hands back those it knows, the janitor removes the rest"
        );
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let link = tokio::spawn(link::run(
        node.clone(),
        built.events,
        LinkConfig {
            servers: servers.clone(),
            token: token.clone(),
            advertise: advertise.clone(),
            labels,
        },
        stop_rx.clone(),
    ));
    let forget = node.clone();
    let janitor = tokio::spawn(
        Janitor::new(
            agent,
            Arc::new(LinkOracle::new(&node_name, servers.clone(), &token)),
            args.orphan_timeout,
        )
        .on_removed(Arc::new(move |id| forget.forget(id)))
        .run(stop_rx.clone()),
    );
    info!(node = %node_name, address = %bound, advertise = %advertise, servers = %servers, capacity = args.capacity, dir = %dir.display(), "warren agent listening");
    // One line on stdout for scripts and tests that asked for port 0.
    println!("warren agent listening on {bound}");
    let mut stop = stop_rx.clone();
    let served = warren_agent::http::serve(listener, node, &token, async move {
        tokio::select! {
            () = super::server::shutdown_signal() => {}
            _ = stop.changed() => {}
        }
    })
    .await;
    let _ = stop_tx.send(true);
    let _ = link.await;
    let _ = janitor.await;
    if let Err(e) = served {
        warn!(error = %e, "serving the agent API failed");
        return Err(e.into());
    }
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}
