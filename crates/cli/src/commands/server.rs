//! `warren server`: the control plane with its in-process agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::ValueEnum;
use tracing::info;
use warren_control::store::StoreUrl;
use warren_control::{Address, Server, ServerConfig, StoreConfig, WasmConfig};
use warren_runtime::SlotCapacity;
use warren_spec::BackendKind;

use super::{Globals, usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// State directory: the store, and per-sandbox files such as slot/<id>/resources.json.
    /// Default: /var/lib/warren for root, ~/.local/share/warren otherwise.
    #[arg(long, env = "WARREN_DIR")]
    dir: Option<PathBuf>,
    /// unix:///path.sock or tcp://host:port (TCP needs --token). Default: the --server
    /// address, else /run/warren/warren.sock for root.
    #[arg(long)]
    listen: Option<String>,
    /// Read the bearer token from this file instead of --token / WARREN_TOKEN.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Where the slot backend writes <id>/resources.json. Default: <dir>/slot. These files
    /// are re-written from the store at start-up, so a tmpfs (e.g. /dev/shm/warren) is safe
    /// and much faster than most disks.
    #[arg(long)]
    slot_dir: Option<PathBuf>,
    /// Where the linux backend keeps its sandboxes: bundles, logs and each sandbox's overlay
    /// upper layer (its writes to its root filesystem). Default: <dir>/linux. On a tmpfs
    /// (e.g. /run/warren/linux) creates are faster, but a sandbox's writes to its root
    /// filesystem then live in memory (charged to its memory limit) and nothing there
    /// survives a reboot.
    #[arg(long)]
    linux_dir: Option<PathBuf>,
    /// Name of this node. Default: the host name.
    #[arg(long)]
    node: Option<String>,
    /// What the slot backend may hand out: cpu=64,memory=256Gi,pids=100000,sandboxes=5000.
    #[arg(long, default_value = "")]
    slot_capacity: String,
    /// Most Wasm instances running at once (sizes the pooling allocator); at least 1.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    wasm_pool: u32,
    /// Largest linear memory of one Wasm instance, e.g. 256Mi; at least 64Ki (one Wasm page).
    #[arg(long, default_value = "256Mi")]
    wasm_max_memory: String,
    /// Timeout for Wasm sandboxes that set none, e.g. 5m; more than 0 (default: none).
    #[arg(long, value_parser = humantime::parse_duration)]
    wasm_timeout: Option<Duration>,
    /// Fuel per Wasm run (a deterministic CPU budget), at least 1; default unmetered.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    wasm_fuel: Option<u64>,
    /// Most compiled Wasm modules kept in memory, ready to instantiate (least recently used
    /// out first).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    wasm_cache_modules: u32,
    /// Most disk space for compiled Wasm modules (<dir>/wasm/cache), e.g. 1Gi; the least
    /// recently used files go once a compile passes it. 0 means unlimited.
    #[arg(long, default_value = "1Gi")]
    wasm_cache_size: String,
    /// Largest log file of one sandbox, e.g. 64Mi; later output is dropped with a notice.
    /// 0 means unlimited.
    #[arg(long, default_value = "64Mi")]
    log_max_size: String,
    /// Default time between SIGTERM and SIGKILL when deleting, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Keep N sandboxes of an image ready (repeatable): linux:IMAGE=N pre-created
    /// containers, so a create from the pool only sets the workload's settings and execs it
    /// (sandboxes with --mapdir start cold); vm:IMAGE=N restored clones of the image's
    /// template, built at start (needs vm.templates).
    #[arg(long, value_name = "linux|vm:IMAGE=N")]
    warm: Vec<String>,
    /// Parent cgroup of the linux backend's sandboxes (in every v1 hierarchy, or under the
    /// v2 root).
    #[arg(long, default_value = "warren")]
    cgroup_parent: String,
    /// The CRIU binary (4.x) for checkpoints of linux sandboxes; default: $WARREN_CRIU, then
    /// /usr/local/lib/warren/criu/criu (scripts/install-criu.sh), then criu on PATH.
    #[arg(long, value_name = "PATH")]
    criu: Option<std::path::PathBuf>,
    /// How long CRIU may take to restore a checkpoint before it is killed and the restore
    /// fails, e.g. 30s.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    restore_timeout: Duration,
    /// The secret checkpoints are sealed with (64 hex digits, mode 0600), which must exist.
    /// Default: DIR/checkpoint.key, made if absent. Servers that restore each other's
    /// checkpoints share one.
    #[arg(long, value_name = "FILE")]
    checkpoint_key: Option<std::path::PathBuf>,
    /// IPv4 range the linux backend gives `network.mode: egress` sandboxes their addresses
    /// from (a /30 each; /29 or larger). Each server on a host needs a range of its own.
    #[arg(long, value_name = "CIDR", default_value = warren_control::server::DEFAULT_EGRESS_RANGE)]
    linux_egress_cidr: String,
    /// Serve Prometheus `/metrics`, `/healthz` and `/readyz` over HTTP on ADDR (port 0: any
    /// free port; `off`: not at all). Default 127.0.0.1:9091, skipped with a warning when
    /// that port is taken.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Policy for sandboxes that name none; it must exist when a create needs it (else a
    /// policy named `default` applies when one is stored). See docs/policy.md.
    #[arg(long, value_name = "NAME")]
    default_policy: Option<String>,
    /// Consistency of creates that name none: fast (acknowledged once running, record
    /// written behind) or strong (acknowledged once the record is durable).
    #[arg(long, default_value = "fast")]
    consistency: String,
    /// Most sandboxes the server's own agent runs (default: no limit but the backends'); 0
    /// makes the server a pure control plane for `warren agent` processes.
    #[arg(long, value_name = "N")]
    local_capacity: Option<u32>,
    /// A `warren agent` silent this long is lost, and so are its sandboxes (AutoRecreate
    /// ones are created again elsewhere), e.g. 3s.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    agent_timeout: Duration,
    /// The server's own agent's janitor removes sandboxes the server does not know after
    /// this long, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    orphan_timeout: Duration,
    /// The vm backend's config (TOML: `[hypervisor]` with Kuasar's fields plus accel and
    /// machine, `[vm]` for templates and the pool; docs/vm.md). Default: /etc/warren/vm.toml
    /// when it exists, else built-in defaults (assets in /var/lib/warren/vm).
    #[arg(long, env = "WARREN_VM_CONFIG", value_name = "FILE")]
    vm_config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Where the state lives: redb:PATH (default: <dir>/state.redb) or
    /// etcd://host:port[,host:port...], shared by several servers that elect a leader (the
    /// others stand by and take over; docs/cluster.md).
    #[arg(long, env = "WARREN_STORE", value_name = "URL")]
    store: Option<String>,
    /// On etcd: the address standbys name for this server when it leads (default: the
    /// listen address, with its real port).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    /// On etcd: TTL of the leader's lease; a leader that dies is replaced about this long
    /// after (whole seconds, at least 2s).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    leader_ttl: Duration,
}

/// The size of a Wasm memory page, the least `--wasm-max-memory` can be.
const WASM_PAGE: u64 = 64 << 10;

/// `linux:IMAGE=N` or `vm:IMAGE=N`: the backend (linux keeps warm shells, vm clones of the
/// image's template), the image name, the count.
pub(super) fn parse_warm(s: &str) -> Result<(BackendKind, String, usize), String> {
    let (backend, rest) = s.split_once(':').ok_or("expected linux:IMAGE=N")?;
    let kind = match backend {
        "linux" => BackendKind::Linux,
        "vm" => BackendKind::Vm,
        _ => {
            return Err(format!(
                "backend {backend:?} keeps no warm pool (linux and vm do)"
            ));
        }
    };
    let (image, count) = rest.rsplit_once('=').ok_or("expected linux:IMAGE=N")?;
    if image.is_empty() {
        return Err("the image is empty".into());
    }
    let count: usize = count
        .parse()
        .map_err(|_| format!("{count:?} is not a count"))?;
    if count > 1000 {
        return Err(format!("{count} warm sandboxes is more than 1000"));
    }
    Ok((kind, image.to_string(), count))
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".to_string())
}

/// The `--warm` entries of one backend.
fn warm_of(kind: BackendKind, warm: &[(BackendKind, String, usize)]) -> Vec<(String, usize)> {
    warm.iter()
        .filter(|(k, ..)| *k == kind)
        .map(|(_, image, n)| (image.clone(), *n))
        .collect()
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    super::raise_open_files();
    let warm: Vec<(BackendKind, String, usize)> = args
        .warm
        .iter()
        .map(|w| parse_warm(w).map_err(|e| usage(format!("--warm {w:?}: {e}"))))
        .collect::<anyhow::Result<_>>()?;
    let store = match args.store.as_deref() {
        None => StoreUrl::default(),
        Some(s) => s
            .parse()
            .map_err(|e: String| usage(format!("--store: {e}")))?,
    };
    let advertise = match args.advertise.as_deref() {
        None => None,
        Some(a) => Some(
            a.parse::<Address>()
                .map_err(|e| usage(format!("--advertise: {e}")))?
                .to_string(),
        ),
    };
    if args.leader_ttl < Duration::from_secs(2) {
        return Err(usage(format!(
            "--leader-ttl: {} is under 2s (etcd's shortest lease)",
            humantime::format_duration(args.leader_ttl)
        )));
    }
    let store = StoreConfig {
        url: store,
        advertise,
        leader_ttl: Some(args.leader_ttl),
    };
    let listen: Address = match args.listen.as_deref().or(g.server.as_deref()) {
        Some(s) => s
            .parse()
            .map_err(|e: String| usage(format!("--listen: {e}")))?,
        None => Address::Unix(warren_control::address::default_socket()),
    };
    let token = match &args.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading --token-file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => g.token.clone(),
    };
    if let Some(node) = &args.node {
        // As an agent's: it names the node in tables, records and metrics.
        warren_spec::validate_name("--node", node).map_err(|e| usage(e.to_string()))?;
    }
    if token.as_deref() == Some("") {
        return Err(usage("the token is empty"));
    }
    if token
        .as_deref()
        .is_some_and(|t| !warren_control::client::valid_token(t))
    {
        return Err(usage(
            "the token must be printable ASCII, with spaces only between words (a client could \
             never send it as it is)",
        ));
    }
    let slot_capacity: SlotCapacity = args
        .slot_capacity
        .parse()
        .map_err(|e: String| usage(format!("--slot-capacity: {e}")))?;
    if args.agent_timeout < Duration::from_millis(200) {
        return Err(usage(format!(
            "--agent-timeout: {:?} is shorter than 200ms",
            args.agent_timeout
        )));
    }
    // Values that would fail every Wasm run; 0 fuel and 0 instances are refused by clap.
    let wasm_max_memory = warren_spec::parse_bytes(&args.wasm_max_memory)
        .map_err(|e| usage(format!("--wasm-max-memory: {e}")))?;
    if wasm_max_memory < WASM_PAGE {
        return Err(usage(format!(
            "--wasm-max-memory: {:?} is less than one Wasm page (64Ki), which a module with \
             any memory needs",
            args.wasm_max_memory
        )));
    }
    if args.wasm_timeout == Some(Duration::ZERO) {
        return Err(usage(
            "--wasm-timeout: 0s would end every Wasm sandbox at once (leave the flag out for no \
             timeout)",
        ));
    }
    if args.restore_timeout < Duration::from_secs(1) {
        return Err(usage(format!(
            "--restore-timeout: {} would kill CRIU before any restore could finish (give 1s or \
             more)",
            humantime::format_duration(args.restore_timeout)
        )));
    }
    let cluster = warren_control::server::ClusterConfig {
        local_capacity: args.local_capacity,
        agent_timeout: args.agent_timeout,
        consistency: args
            .consistency
            .parse()
            .map_err(|e| usage(format!("--consistency: {e}")))?,
        orphan_timeout: args.orphan_timeout,
    };
    let config = ServerConfig {
        cluster,
        dir: args
            .dir
            .unwrap_or_else(warren_control::address::default_dir),
        listen,
        token,
        node: args.node.unwrap_or_else(hostname),
        slot_capacity,
        slot_dir: args.slot_dir,
        linux_dir: args.linux_dir,
        wasm: WasmConfig {
            pool_instances: args.wasm_pool,
            max_memory_bytes: wasm_max_memory,
            default_timeout: args.wasm_timeout,
            fuel: args.wasm_fuel,
            log_max_bytes: match warren_spec::parse_bytes(&args.log_max_size)
                .map_err(|e| usage(format!("--log-max-size: {e}")))?
            {
                0 => None,
                n => Some(n),
            },
            cache_modules: args.wasm_cache_modules as usize,
            cache_max_bytes: match warren_spec::parse_bytes(&args.wasm_cache_size)
                .map_err(|e| usage(format!("--wasm-cache-size: {e}")))?
            {
                0 => None,
                n => Some(n),
            },
        },
        default_grace: args.grace,
        linux_supervisor: warren_control::LinuxConfig::default_supervisor(),
        linux_warm: warm_of(BackendKind::Linux, &warm),
        vm_warm: warm_of(BackendKind::Vm, &warm),
        cgroup_parent: args.cgroup_parent,
        criu: args.criu,
        restore_timeout: args.restore_timeout,
        // Absolute, so messages and logs name the file wherever they are read.
        checkpoint_key: args
            .checkpoint_key
            .map(|p| std::path::absolute(&p).unwrap_or(p)),
        linux_egress_range: args.linux_egress_cidr,
        default_policy: match args.default_policy {
            Some(name) => {
                warren_spec::validate_name("--default-policy", &name)
                    .map_err(|e| usage(e.to_string()))?;
                Some(name)
            }
            None => None,
        },
        vm: load_vm_config(args.vm_config.as_deref()),
        metrics_required: args.metrics_listen.as_deref().is_some_and(|a| a != "off"),
        metrics_listen: match args.metrics_listen.as_deref() {
            Some("off") => None,
            Some(addr) => Some(addr.to_string()),
            None => Some(warren_control::server::DEFAULT_METRICS_LISTEN.to_string()),
        },
    };
    let dir = config.dir.clone();
    let described = store.url.to_string();
    let server = Server::bind_with(config, store).await?;
    info!(store = %described, "store open");
    info!(address = %server.address(), dir = %dir.display(), "warren server listening");
    // One line on stdout for scripts and tests that asked for port 0.
    println!("warren server listening on {}", server.address());
    if let Some(metrics) = server.metrics_address() {
        info!(address = %metrics, "metrics at http://{metrics}/metrics");
        println!("warren server metrics on http://{metrics}/metrics");
    }
    server.run(shutdown_signal()).await?;
    info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// The vm backend's config; a file that cannot be read or parsed makes the backend
/// unavailable with the reason (the server still starts: the other backends do not need it).
pub fn load_vm_config(path: Option<&std::path::Path>) -> Result<warren_control::VmConfig, String> {
    let (path, required) = match path {
        Some(p) => (p, true),
        None => (std::path::Path::new("/etc/warren/vm.toml"), false),
    };
    warren_control::VmConfig::load(path, required).map_err(|e| warren_runtime::error_chain(&e))
}

/// Resolves on SIGTERM or SIGINT.
pub(super) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the server can still be stopped by SIGKILL; run on.
        _ => std::future::pending().await,
    }
}
