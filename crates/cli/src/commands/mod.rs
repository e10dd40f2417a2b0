//! One file per subcommand; this module holds the shared flags and helpers.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use warren_control::Address;
use warren_control::client::{self, Client};

mod agent;
mod apply;
mod bench;
mod checkpoint;
mod cp;
mod exec;
mod get;
mod image;
mod info;
mod kill;
mod logs;
mod ls;
mod nodes;
mod pause;
mod policy;
mod pool;
mod restart;
mod restore;
mod rm;
mod run;
mod sandboxer;
mod server;
mod signals;
mod stats;
mod stop;
mod top;
mod update;
mod vm;
mod wait;
mod watch;

#[derive(Debug, Parser)]
#[command(
    name = "warren",
    version,
    about = "Start, run, limit, watch and throw away sandboxes."
)]
pub struct Cli {
    /// Server address: unix:///path/to.sock or tcp://host:port; several, comma-separated,
    /// for replicas on one etcd (the leader among them is found and followed).
    #[arg(long, short = 's', global = true, env = "WARREN_SERVER")]
    pub server: Option<String>,
    /// Bearer token for the server (required over TCP).
    #[arg(long, global = true, env = "WARREN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Log level: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, global = true, env = "WARREN_LOG", default_value = "info", value_parser = log_filter)]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the control plane with its local agent.
    Server(Box<server::Args>),
    /// Run a node agent for a control plane (`--server`, `--token`): seed 004's HTTP API on
    /// port 5758, registration and heartbeats, the janitor.
    Agent(agent::Args),
    /// List the control plane's agents: state, load, capacity, backends, images.
    #[command(alias = "node")]
    Nodes(nodes::Args),
    /// Manage pools of pre-warmed sandboxes (create, ls, get, rm).
    #[command(alias = "pools")]
    Pool(pool::Args),
    /// Serve containerd's sandbox API (a containerd 2.x `type = "sandbox"` proxy plugin).
    Sandboxer(sandboxer::Args),
    /// Create and start a sandbox.
    Run(Box<run::Args>),
    /// List sandboxes.
    #[command(alias = "list", alias = "ps")]
    Ls(ls::Args),
    /// Show one sandbox.
    Get(get::Args),
    /// Show a sandbox's output.
    Logs(logs::Args),
    /// Delete sandboxes.
    #[command(alias = "delete")]
    Rm(rm::Args),
    /// Stop sandboxes' workloads (SIGTERM, then SIGKILL after the grace period) and keep
    /// the sandboxes, Stopped, until `rm`.
    Stop(stop::Args),
    /// Send a signal to sandboxes' workloads (SIGKILL unless --signal says otherwise).
    Kill(kill::Args),
    /// Freeze running sandboxes' workloads where they are (memory kept, no CPU).
    Pause(pause::Args),
    /// Let paused sandboxes run on.
    #[command(alias = "resume")]
    Unpause(pause::Args),
    /// Run sandboxes' workloads again from scratch (stopped first if running), under new uids.
    Restart(restart::Args),
    /// Wait until sandboxes finish; print each one's exit code (or phase, without one).
    Wait(wait::Args),
    /// Create or update sandboxes from a YAML file.
    Apply(apply::Args),
    /// Change a sandbox's resources, labels, annotations, expiry or failure policy.
    Update(update::Args),
    /// Stream sandbox changes.
    Watch(watch::Args),
    /// Show what the server runs: version, backends, capacity in use.
    Info(info::Args),
    /// Run a command inside a running sandbox.
    Exec(exec::Args),
    /// Copy files and directories between this machine and a sandbox (NAME:PATH), as
    /// `docker cp` does (the sandbox needs `sh` and `tar`).
    Cp(cp::Args),
    /// What running sandboxes use now: CPU, memory against their limit, processes.
    Stats(stats::Args),
    /// The processes running in a sandbox (as `docker top`): pid inside it and on the node,
    /// user, state, memory, CPU time, command.
    Top(top::Args),
    /// Manage the server's images: import, ls, rm, pull.
    Image(image::Args),
    /// Pull an image from a registry into the server's image store.
    Pull(image::PullArgs),
    /// The vm backend's templates: `warren vm template build`.
    Vm(vm::Args),
    /// Measure warren.
    Bench(bench::Args),
    /// Manage the server's policies (apply, ls, get, rm) and check specs against them.
    Policy(policy::Args),
    /// Checkpoint a running sandbox (CRIU for linux), or list, delete and export checkpoints.
    Checkpoint(checkpoint::Args),
    /// Create a sandbox from a checkpoint; it continues where it was saved.
    Restore(restore::Args),
}

/// A mistake in how the command was called: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Raises this process's open-file limit to its hard limit, as long-running servers do (a
/// shell's default of 1024 runs out after a few hundred sandboxes: each holds pipes and
/// sockets open here). The systemd units set it too. Sandboxes inherit it, as they would
/// under the units.
pub fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "open-file limit raised"),
            Err(e) => tracing::warn!(soft, hard, "cannot raise the open-file limit: {e}"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open-file limit: {e}"),
    }
}

pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

/// A `--backend` value.
pub fn backend_arg(s: &str) -> anyhow::Result<warren_spec::BackendKind> {
    s.parse().map_err(|_| {
        usage(format!(
            "--backend: {s:?} is not a backend (expected slot, linux, wasm or vm)"
        ))
    })
}

/// `--log-level`: a level or a tracing filter, checked as it is parsed (a bad one would
/// otherwise fall back to `info` without a word).
fn log_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("not a level or a tracing filter ({e})"))
}

pub fn init_logging(cli: &Cli) {
    // Client commands log only warnings unless asked; the server logs at --log-level.
    let level = match (&cli.command, cli.log_level.as_str()) {
        (Command::Server(_) | Command::Sandboxer(_) | Command::Agent(_), l) => l.to_string(),
        (_, "info") => "warn".to_string(),
        (_, l) => l.to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json =
        matches!(&cli.command, Command::Server(a) if a.log_format == server::LogFormat::Json);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.compact().init();
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = Globals {
        server: cli.server,
        token: cli.token,
    };
    match cli.command {
        Command::Server(a) => server::run(*a, &g).await,
        Command::Agent(a) => agent::run(a, &g).await,
        Command::Nodes(a) => nodes::run(a, &g).await,
        Command::Pool(a) => pool::run(a, &g).await,
        Command::Sandboxer(a) => sandboxer::run(a).await,
        Command::Run(a) => run::run(*a, &g).await,
        Command::Ls(a) => ls::run(a, &g).await,
        Command::Get(a) => get::run(a, &g).await,
        Command::Logs(a) => logs::run(a, &g).await,
        Command::Rm(a) => rm::run(a, &g).await,
        Command::Stop(a) => stop::run(a, &g).await,
        Command::Wait(a) => wait::run(a, &g).await,
        Command::Pause(a) => pause::run(a, true, &g).await,
        Command::Unpause(a) => pause::run(a, false, &g).await,
        Command::Restart(a) => restart::run(a, &g).await,
        Command::Kill(a) => kill::run(a, &g).await,
        Command::Apply(a) => apply::run(a, &g).await,
        Command::Update(a) => update::run(a, &g).await,
        Command::Watch(a) => watch::run(a, &g).await,
        Command::Info(a) => info::run(a, &g).await,
        Command::Bench(a) => bench::run(a, &g).await,
        Command::Vm(a) => vm::run(a, &g).await,
        Command::Exec(a) => exec::run(a, &g).await,
        Command::Cp(a) => cp::run(a, &g).await,
        Command::Stats(a) => stats::run(a, &g).await,
        Command::Top(a) => top::run(a, &g).await,
        Command::Image(a) => image::run(a, &g).await,
        Command::Pull(a) => image::pull(a, &g).await,
        Command::Policy(a) => policy::run(a, &g).await,
        Command::Checkpoint(a) => checkpoint::run(a, &g).await,
        Command::Restore(a) => restore::run(a, &g).await,
    }
}

#[derive(Debug, Clone)]
pub struct Globals {
    pub server: Option<String>,
    pub token: Option<String>,
}

impl Globals {
    /// Every `--server` address (one unless replicas on etcd are named).
    pub fn addresses(&self) -> anyhow::Result<Vec<Address>> {
        match &self.server {
            Some(s) => client::parse_servers(s).map_err(|e| usage(format!("--server: {e}"))),
            None => Ok(vec![Address::Unix(
                warren_control::address::default_socket(),
            )]),
        }
    }

    /// The first `--server` address (for commands that start or measure one server).
    pub fn address(&self) -> anyhow::Result<Address> {
        Ok(self.addresses()?.swap_remove(0))
    }

    /// The one server to talk to: the `--server` address, or with several the one that
    /// leads now (asked in order, following standbys' hints).
    pub async fn leader_address(&self) -> anyhow::Result<Address> {
        let addresses = self.addresses()?;
        match addresses.as_slice() {
            [one] => Ok(one.clone()),
            many => Ok(client::connect_leader(many, self.token.as_deref()).await?.1),
        }
    }

    pub async fn connect(&self) -> anyhow::Result<Client> {
        let addresses = self.addresses()?;
        match addresses.as_slice() {
            [one] => Ok(client::connect(one, self.token.as_deref()).await?),
            many => Ok(client::connect_leader(many, self.token.as_deref()).await?.0),
        }
    }

    /// A client for idempotent calls that follows the leader across a fail-over.
    pub fn failover(&self) -> anyhow::Result<client::Failover> {
        Ok(client::Failover::new(self.addresses()?, self.token.clone()))
    }

    pub async fn connect_images(&self) -> anyhow::Result<client::ImagesClient> {
        let address = self.leader_address().await?;
        Ok(client::connect_images(&address, self.token.as_deref()).await?)
    }

    pub async fn connect_nodes(&self) -> anyhow::Result<client::NodesClient> {
        let address = self.leader_address().await?;
        Ok(client::connect_nodes(&address, self.token.as_deref()).await?)
    }

    pub async fn connect_pools(&self) -> anyhow::Result<client::PoolsClient> {
        let address = self.leader_address().await?;
        Ok(client::connect_pools(&address, self.token.as_deref()).await?)
    }

    pub async fn connect_checkpoints(&self) -> anyhow::Result<client::CheckpointsClient> {
        let address = self.address()?;
        Ok(client::connect_checkpoints(&address, self.token.as_deref()).await?)
    }

    pub async fn connect_policies(&self) -> anyhow::Result<client::PoliciesClient> {
        let address = self.leader_address().await?;
        Ok(client::connect_policies(&address, self.token.as_deref()).await?)
    }
}

/// A gRPC error as a person reads it: the server's message, without transport noise.
#[derive(Debug)]
pub struct ServerError(pub tonic::Status);

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let msg = self.0.message();
        // A status tonic made itself, when the connection failed (the server sent none),
        // carries the transport's error as its source, and a message such as "h2 protocol
        // error: error reading a body from connection" that says nothing a person can act on.
        if std::error::Error::source(&self.0).is_some() {
            return write!(
                f,
                "lost the connection to the server (it stopped or restarted?): {}",
                crate::output::printable_message(msg)
            );
        }
        match self.0.code() {
            tonic::Code::Unavailable if msg.is_empty() => write!(f, "the server is unavailable"),
            _ if msg.is_empty() => write!(f, "{:?}", self.0.code()),
            _ => f.write_str(&crate::output::printable_message(msg)),
        }
    }
}

impl std::error::Error for ServerError {}

/// Unwraps a gRPC response, turning a status into a readable error.
/// Prints each name whose call succeeded and each error (skipping those `ignore` accepts);
/// exit code 1 if any failed. For commands that act on several sandboxes at once.
pub fn report_each<T>(
    results: Vec<(&String, anyhow::Result<T>)>,
    ignore: impl Fn(&anyhow::Error) -> bool,
) -> ExitCode {
    let mut failed = false;
    for (name, result) in results {
        match result {
            Ok(_) => println!("{}", crate::output::printable(name)),
            Err(e) if ignore(&e) => {}
            Err(e) => {
                eprintln!("error: {}", named_error(name, &e));
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// An error of a call on sandbox `name`, naming it where the server's message does not
/// (a backend's error names the sandbox's uid).
pub fn named_error(name: &str, e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    let quoted = format!("{name:?}");
    if text.contains(&quoted) {
        text
    } else {
        format!("sandbox {}: {text}", crate::output::printable(&quoted))
    }
}

/// Makes `call` for every name at once, each on a clone of `client` (one connection), and
/// pairs each name with its result, in order, for [`report_each`].
pub async fn per_name<'a, T, F, Fut>(
    client: &Client,
    names: &'a [String],
    call: F,
) -> Vec<(&'a String, anyhow::Result<T>)>
where
    F: Fn(Client, String) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let calls = names.iter().map(|name| {
        let reply = call(client.clone(), name.clone());
        async move { (name, answer(reply.await)) }
    });
    futures::future::join_all(calls).await
}

pub fn answer<T>(r: Result<tonic::Response<T>, tonic::Status>) -> anyhow::Result<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| ServerError(s).into())
}

/// `--expire-in`: a duration of at least a second (an expiry is kept in whole seconds, and
/// a shorter one would delete the sandbox as it is made).
pub fn expiry(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    if d > MAX_EXPIRY {
        return Err("must be at most 100 years".into());
    }
    Ok(d)
}

/// The longest `--expire-in`: a hundred years (of 365.25 days, as `100y` is), past which
/// the unix time would not be a date anyone means.
const MAX_EXPIRY: std::time::Duration = std::time::Duration::from_secs(100 * 31_557_600);

/// The unix time (seconds) `d` from now; `d` is an [`expiry`].
pub fn expire_time(d: std::time::Duration) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.saturating_add(d).as_secs()).unwrap_or(i64::MAX)
}

/// Parses repeated `KEY=VALUE` flags.
pub fn key_values(
    flag: &str,
    items: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    items
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(usage(format!("{flag}: {kv:?} is not KEY=VALUE"))),
        })
        .collect()
}

/// Reads a YAML or JSON file, or standard input for "-".
pub fn read_input(path: &str) -> anyhow::Result<String> {
    if path == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("reading standard input")?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_is_a_date_someone_means() {
        assert_eq!(expiry("1h"), Ok(std::time::Duration::from_secs(3600)));
        assert_eq!(expiry("500ms"), Err("must be at least 1s".to_string()));
        assert!(expiry("100y").is_ok());
        for huge in ["18446744073709551615s", "9223372036854775807s", "100y 1s"] {
            assert_eq!(
                expiry(huge),
                Err("must be at most 100 years".to_string()),
                "{huge}"
            );
        }
        let at = expire_time(expiry("99years").unwrap());
        assert!(at > 4_000_000_000 && at < 6_000_000_000, "{at}");
    }

    #[test]
    fn an_error_names_its_sandbox_once() {
        let uid = ServerError(tonic::Status::internal("pause sandbox 3f2a: not frozen"));
        assert_eq!(
            named_error("web", &uid.into()),
            "sandbox \"web\": pause sandbox 3f2a: not frozen"
        );
        let named = ServerError(tonic::Status::not_found("sandbox \"web\" not found"));
        assert_eq!(
            named_error("web", &named.into()),
            "sandbox \"web\" not found"
        );
        // A name is shown quoted, its control characters escaped.
        let odd = ServerError(tonic::Status::internal("failed"));
        assert_eq!(
            named_error("a\u{1b}b", &odd.into()),
            "sandbox \"a\\u{1b}b\": failed"
        );
    }
}
