//! `warren run`: create and start one sandbox from flags.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use nix::sys::signal::Signal;

use warren_proto::{spec_to_pb, v1};
use warren_spec::{
    BackendKind, Consistency, FailurePolicy, Mount, PortSpec, ResourceRequirements, SandboxSpec,
};

use super::signals::{Interrupted, Signals};
use super::{Globals, answer, key_values, usage};
use crate::output::{self, Format, printable};

/// Resource flags shared by `run` and `update`. Quantities as Kubernetes writes them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ResourceFlags {
    /// CPU limit in cores: 2, 0.5, 500m.
    #[arg(long)]
    pub cpu: Option<String>,
    /// CPU request in cores.
    #[arg(long)]
    pub cpu_request: Option<String>,
    /// Memory limit: 512Mi, 2Gi, 1G.
    #[arg(long, short = 'm')]
    pub memory: Option<String>,
    /// Memory request.
    #[arg(long)]
    pub memory_request: Option<String>,
    /// Most processes the sandbox may have.
    #[arg(long)]
    pub pids: Option<String>,
    /// Storage limit: 10Gi.
    #[arg(long)]
    pub storage: Option<String>,
    /// Network bandwidth in bits per second: 100M.
    #[arg(long)]
    pub network_bandwidth: Option<String>,
}

impl ResourceFlags {
    pub fn is_empty(&self) -> bool {
        let ResourceFlags {
            cpu,
            cpu_request,
            memory,
            memory_request,
            pids,
            storage,
            network_bandwidth,
        } = self;
        [
            cpu,
            cpu_request,
            memory,
            memory_request,
            pids,
            storage,
            network_bandwidth,
        ]
        .iter()
        .all(|f| f.is_none())
    }

    /// Sets the flags given onto `r`, leaving the rest as they are.
    pub fn apply_to(&self, r: &mut ResourceRequirements) {
        let set = |to: &mut Option<String>, from: &Option<String>| {
            if from.is_some() {
                to.clone_from(from);
            }
        };
        set(&mut r.limits.cpu, &self.cpu);
        set(&mut r.requests.cpu, &self.cpu_request);
        set(&mut r.limits.memory, &self.memory);
        set(&mut r.requests.memory, &self.memory_request);
        set(&mut r.limits.pids, &self.pids);
        set(&mut r.limits.storage, &self.storage);
        set(&mut r.limits.network_bandwidth, &self.network_bandwidth);
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox name; generated when absent.
    #[arg(long)]
    name: Option<String>,
    /// Isolation backend: slot, linux, wasm or vm.
    #[arg(long, short = 'b', default_value = "slot")]
    backend: String,
    /// Image (linux, vm) or module (wasm) to run.
    #[arg(long, short = 'i', visible_alias = "module")]
    image: Option<String>,
    /// Map a host directory: GUEST::HOST, or GUEST::HOST:ro for read-only (repeatable).
    #[arg(long = "mapdir", visible_alias = "mount")]
    mounts: Vec<String>,
    /// Stop the workload after this long, e.g. 500ms, 30s; it ends with status Timeout.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
    /// Wait for the sandbox to finish, stream its output meanwhile, and exit with its exit code
    /// (like `docker run` without -d); 143 if it was stopped (or removed) before it ended. A
    /// slot sandbox, which runs nothing, needs --expire-in to end.
    #[arg(long)]
    wait: bool,
    /// Feed FILE to the workload's standard input (`-`: this command's own stdin, read to
    /// its end first); at most 4 MiB. The workload reads end of file after it.
    #[arg(long, value_name = "FILE")]
    stdin: Option<std::path::PathBuf>,
    /// With --wait: delete the sandbox once it has finished (also when this command is
    /// interrupted: SIGINT, SIGTERM or SIGHUP deletes it, its workload given its grace period
    /// to end; a second signal ends it at once). A restarted sandbox is still this one.
    #[arg(long, requires = "wait")]
    rm: bool,
    #[command(flatten)]
    resources: ResourceFlags,
    /// Annotation KEY=VALUE (repeatable); CRI resource keys such as resources.limits.cpu
    /// take precedence over the flags.
    #[arg(long = "annotation", short = 'a')]
    annotations: Vec<String>,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// Port to expose: 8080, 8080:80 (published on the node's port 8080, every address),
    /// 127.0.0.1:8080:80 or [::1]:8080:80 (that address only), 53/udp (repeatable).
    #[arg(long = "port", short = 'p')]
    ports: Vec<String>,
    /// Policy to apply (the server's default when absent).
    #[arg(long)]
    policy: Option<String>,
    /// What to do when the sandbox or its node fails: Manual or AutoRecreate.
    #[arg(long, default_value = "Manual")]
    failure_policy: String,
    /// fast (reply before persisting) or strong (persist first); the server's default
    /// (`warren server --consistency`) when absent.
    #[arg(long = "mode")]
    consistency: Option<String>,
    /// With --failure-policy AutoRecreate: how long to wait for a lost agent to come back
    /// before re-creating the sandbox elsewhere, e.g. 30s (default: at once).
    #[arg(long, value_parser = humantime::parse_duration)]
    recovery_timeout: Option<Duration>,
    /// Pool to take a pre-warmed sandbox from.
    #[arg(long)]
    pool: Option<String>,
    /// Delete the sandbox after this long, e.g. 30m, 2h (at least 1s).
    #[arg(long, value_parser = super::expiry)]
    expire_in: Option<Duration>,
    /// Program to run instead of the image's entrypoint (linux); what follows `--` are its
    /// arguments, replacing the image's command.
    #[arg(long)]
    entrypoint: Option<String>,
    /// Hostname inside the sandbox (linux); the sandbox's name by default.
    #[arg(long)]
    hostname: Option<String>,
    /// Run as UID[:GID] (linux).
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Mount the root filesystem read-only (linux).
    #[arg(long)]
    read_only: bool,
    /// Seconds between SIGTERM and SIGKILL when the sandbox is stopped (default 10).
    #[arg(long, value_name = "SECONDS")]
    stop_timeout: Option<f64>,
    /// Deny a syscall with EPERM on top of the default seccomp profile (linux; repeatable).
    #[arg(long = "deny-syscall", value_name = "NAME")]
    deny_syscalls: Vec<String>,
    /// Open $VISUAL/$EDITOR (else vi) on the sandbox these flags describe, as a YAML object,
    /// and create what is saved (an empty file creates nothing). Also what a bare
    /// `warren run` on a terminal does.
    #[arg(long)]
    edit: bool,
    /// Output: table (a summary), name, json or yaml.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
    /// Command and arguments to run (for wasm: the module's arguments).
    #[arg(last = true)]
    command: Vec<String>,
}

fn generated_name() -> String {
    // Unique enough for a human-run command: time in ms plus the process id, base 36.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut n = (now.as_millis() as u64).wrapping_mul(1_000_003) ^ u64::from(std::process::id());
    let mut s = String::new();
    for _ in 0..8 {
        s.push(char::from(
            b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize],
        ));
        n /= 36;
    }
    format!("sandbox-{s}")
}

/// A wasm module file given as a relative path is made absolute here: the server resolves
/// paths from its own working directory, which is not the caller's. A name that is not a
/// file here (and does not end in .wasm or .wat) is an image name and goes as it is. For
/// linux, an absolute path is a prepared root directory.
fn module_path(backend: BackendKind, image: &str) -> String {
    let is_file = image.ends_with(".wasm")
        || image.ends_with(".wat")
        || image.starts_with("./")
        || image.starts_with("../")
        || std::path::Path::new(image).is_file();
    // A linux root directory given relative to here (`-i ./rootfs`) goes absolute too.
    let is_dir = image.starts_with("./") || image.starts_with("../");
    match std::path::absolute(image) {
        Ok(abs) if backend == BackendKind::Wasm && is_file => abs.display().to_string(),
        Ok(abs) if backend == BackendKind::Linux && is_dir => abs.display().to_string(),
        _ => image.to_string(),
    }
}

impl Args {
    /// Whether this command must outlive a closed stdout: `--wait --rm` removes the sandbox
    /// at the end, which a death by SIGPIPE would skip.
    pub fn cleans_up_after_output(&self) -> bool {
        self.wait && self.rm
    }
}

pub fn build_spec(args: &Args) -> anyhow::Result<SandboxSpec> {
    let backend: BackendKind = super::backend_arg(&args.backend)?;
    let failure_policy: FailurePolicy = args
        .failure_policy
        .parse()
        .map_err(|e| usage(format!("--failure-policy: {e}")))?;
    let consistency: Option<Consistency> = args
        .consistency
        .as_deref()
        .map(|c| c.parse().map_err(|e| usage(format!("--mode: {e}"))))
        .transpose()?;
    let ports = args
        .ports
        .iter()
        .map(|p| {
            p.parse::<PortSpec>()
                .map_err(|e| usage(format!("--port: {e}")))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut resources = ResourceRequirements::default();
    args.resources.apply_to(&mut resources);
    let expire_time = args.expire_in.map(super::expire_time);
    Ok(SandboxSpec {
        name: args.name.clone().unwrap_or_else(generated_name),
        labels: key_values("--label", &args.labels)?,
        annotations: key_values("--annotation", &args.annotations)?,
        backend,
        image: args.image.as_deref().map(|i| module_path(backend, i)),
        // For wasm the module is the program and for linux the image names one (its
        // entrypoint and command): what follows `--` are its arguments, as with `docker run`.
        command: match (backend, &args.entrypoint) {
            (_, Some(e)) => vec![e.clone()],
            (BackendKind::Wasm | BackendKind::Linux, None) => Vec::new(),
            _ => args.command.clone(),
        },
        args: match backend {
            BackendKind::Wasm | BackendKind::Linux => args.command.clone(),
            _ if args.entrypoint.is_some() => args.command.clone(),
            _ => Vec::new(),
        },
        env: key_values("--env", &args.env)?,
        working_dir: args.workdir.clone(),
        resources,
        ports,
        policy: args.policy.clone(),
        failure_policy,
        consistency,
        recovery_timeout_seconds: args.recovery_timeout.map(|d| d.as_secs_f64()),
        pool: args.pool.clone(),
        expire_time,
        mounts: args
            .mounts
            .iter()
            .map(|m| {
                m.parse::<Mount>()
                    .map_err(|e| usage(format!("--mapdir: {e}")))
            })
            .collect::<anyhow::Result<_>>()?,
        timeout_seconds: args.timeout.map(|d| d.as_secs_f64()),
        stop_grace_period_seconds: args.stop_timeout,
        hostname: args.hostname.clone(),
        user: args.user.clone(),
        read_only_rootfs: args.read_only,
        deny_syscalls: args.deny_syscalls.clone(),
        ..SandboxSpec::default()
    })
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut spec = build_spec(&args)?;
    // What can fail without the server, before any editing (edits are never lost).
    let stdin = match &args.stdin {
        None => Vec::new(),
        Some(path) => read_stdin(path)?,
    };
    // A create is idempotent by name: after a fail-over it is sent again to the new leader
    // (the same spec answers the sandbox the first attempt made, if it made one).
    let mut failover = g.failover()?;
    // The edited file, kept (and named) if the server refuses what it says.
    let mut edited_file = None;
    if args.edit || bare_on_a_terminal() {
        match edit(&spec)? {
            Some((edited, file)) => {
                spec = edited;
                edited_file = Some(file);
            }
            None => {
                let _ = writeln!(
                    std::io::stderr(),
                    "edit cancelled: the file was empty; nothing created"
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
    // It would wait for ever (a pool's sandboxes are of the pool's backend).
    if args.wait
        && spec.backend == BackendKind::Slot
        && spec.pool.is_none()
        && spec.expire_time.is_none()
    {
        return Err(usage(
            "--wait: a slot sandbox runs nothing, so it never ends by itself: give it \
             --expire-in, or run a workload with -b linux, wasm or vm",
        ));
    }
    let request = v1::CreateSandboxRequest {
        spec: Some(spec_to_pb(&spec)),
        stdin,
        ..Default::default()
    };
    // With --wait --rm the removal is this command's to do, from before the create on: a
    // SIGINT, SIGTERM or SIGHUP that comes while the create is under way lets it finish,
    // then removes what it made.
    let mut signals = if args.wait && args.rm {
        Some(Signals::catch()?)
    } else {
        None
    };
    let create = failover.call(|mut c| {
        let request = request.clone();
        async move { c.create_sandbox(request).await }
    });
    let (reply, early) = match &mut signals {
        None => (create.await, None),
        Some(signals) => {
            let mut create = std::pin::pin!(create);
            let mut early = None;
            let reply = loop {
                tokio::select! {
                    reply = &mut create => break reply,
                    signal = signals.recv() => {
                        if early.is_some() {
                            // A create that does not finish (a server not answering): a
                            // second signal does not wait for it.
                            let what = format!(
                                "run --rm (during the create; sandbox/{} may be left)",
                                printable(&spec.name)
                            );
                            return Ok(signal.exit(&what));
                        }
                        early = Some(signal);
                    }
                }
            };
            (reply, early)
        }
    };
    let reply = answer(reply).map_err(|e| match edited_file.take() {
        Some(file) => keep_edits(file, e),
        None => e,
    })?;
    drop(edited_file);
    let sb = reply.sandbox.unwrap_or_default();
    if args.wait {
        let made = Made {
            name: spec.name.clone(),
            id: sb.id.clone(),
            created_at_ms: sb.created_at_ms,
        };
        let mut client = failover.client().await?;
        return match signals {
            // The removal names the sandbox made here (or a later run of it: a restart
            // gives it a new id): never another one that took its name since.
            Some(signals) => wait_rm(&mut client, &made, signals, early).await,
            None => Ok(report(&made, &wait_for_end(&mut client, &made).await?)),
        };
    }
    match args.output {
        Format::Table | Format::Wide => {
            let st = sb.status.clone().unwrap_or_default();
            let verb = if reply.created {
                "created"
            } else {
                "already exists"
            };
            // The server's choice: a pool's sandbox runs on the pool's backend.
            let backend = sb
                .spec
                .as_ref()
                .map(|s| s.backend.clone())
                .filter(|b| !b.is_empty())
                .unwrap_or_else(|| spec.backend.to_string());
            println!(
                "sandbox/{} {verb} ({}, {})",
                printable(&spec.name),
                printable(&backend),
                printable(&st.phase)
            );
            let mut info: Vec<_> = st.backend_info.iter().collect();
            info.sort();
            for (k, v) in info {
                println!("  {}: {}", printable(k), printable(v));
            }
        }
        format => output::sandboxes(&[sb], format, false)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `warren run` and nothing else, typed at a terminal: seed 004's interactive run.
fn bare_on_a_terminal() -> bool {
    use std::io::IsTerminal as _;
    std::env::args_os().nth(2).is_none()
        && std::env::args_os().nth(1).is_some_and(|a| a == "run")
        && std::io::stdin().is_terminal()
        && std::io::stdout().is_terminal()
}

/// Keeps the edited file past this command and says where it is, after `e`: edits are
/// never thrown away with an error.
fn keep_edits(file: tempfile::NamedTempFile, e: anyhow::Error) -> anyhow::Error {
    match file.keep() {
        Ok((_, path)) => e.context(format!(
            "your edits are kept in {} (fix them, then `warren apply -f` it)",
            path.display()
        )),
        Err(_) => e,
    }
}

/// Writes `spec` as a YAML object to a temp file, opens the user's editor on it and reads
/// back what was saved, with the file: `None` when it was emptied.
fn edit(spec: &SandboxSpec) -> anyhow::Result<Option<(SandboxSpec, tempfile::NamedTempFile)>> {
    use anyhow::Context as _;
    let mut object = crate::object::to_object(&v1::Sandbox {
        spec: Some(spec_to_pb(spec)),
        ..Default::default()
    })?;
    if let Some(obj) = object.as_object_mut() {
        obj.remove("status");
        if let Some(meta) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            for f in ["uid", "creationTimestamp", "resourceVersion"] {
                meta.remove(f);
            }
        }
    }
    let template = format!(
        "# The sandbox to create: edit, save and quit. An empty file creates nothing.\n\
         # Fields: docs/api.md; resources: docs/resources.md.\n{}",
        yaml_serde::to_string(&object)?
    );
    let file = tempfile::Builder::new()
        .prefix("warren-run-")
        .suffix(".yaml")
        .tempfile()?;
    std::fs::write(file.path(), template)?;
    let editor = ["VISUAL", "EDITOR"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|e| !e.trim().is_empty()))
        .unwrap_or_else(|| "vi".to_string());
    // Through the shell, as git and kubectl do: EDITOR may carry arguments ("code -w").
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sh")
        .arg(file.path())
        .status()
        .with_context(|| format!("start the editor {editor:?}"))?;
    if !status.success() {
        anyhow::bail!("the editor {editor:?} failed ({status}); nothing created");
    }
    let text = match std::fs::read_to_string(file.path()) {
        Ok(text) => text,
        Err(e) => {
            return Err(keep_edits(
                file,
                anyhow::Error::new(e).context("read the edited file"),
            ));
        }
    };
    let blank = text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'));
    if blank {
        return Ok(None);
    }
    let mut specs = match crate::object::from_documents(&text, "the edited file") {
        Ok(specs) => specs,
        Err(e) => return Err(keep_edits(file, e)),
    };
    if specs.len() != 1 {
        return Err(keep_edits(
            file,
            usage(format!(
                "the edited file holds {} sandboxes; `warren run` creates one (use `warren apply -f`)",
                specs.len()
            )),
        ));
    }
    Ok(specs.pop().map(|spec| (spec, file)))
}

/// Largest `--stdin` accepted: what fits in one gRPC message beside the spec.
const MAX_STDIN: u64 = 4 * 1024 * 1024 - 64 * 1024;

/// The bytes of `--stdin FILE` (`-`: standard input), refused past [`MAX_STDIN`].
fn read_stdin(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    let read = if path.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .take(MAX_STDIN + 1)
            .read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(MAX_STDIN + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| usage(format!("--stdin: reading {}: {e}", path.display())))?;
    if bytes.len() as u64 > MAX_STDIN {
        return Err(usage(format!(
            "--stdin: {} holds more than {MAX_STDIN} bytes, the most one create can carry",
            path.display()
        )));
    }
    Ok(bytes)
}

/// `run --wait`'s exit code for a sandbox stopped (or removed) before its workload ended:
/// 128 + SIGTERM, as a shell reports a command a stop ends.
const STOPPED_EXIT: u8 = 143;

/// The sandbox a `run --wait` made. A restart (`warren restart`, `update --reset-revision`)
/// or an AutoRecreate runs it again under a new id but keeps its creation time; a sandbox
/// made again under its name (after a `warren rm`) is another, with a later one.
#[derive(Debug)]
struct Made {
    name: String,
    id: String,
    created_at_ms: i64,
}

impl Made {
    /// Whether `sb` is this sandbox, or a later run of it.
    fn is(&self, sb: &v1::Sandbox) -> bool {
        sb.id == self.id || (self.created_at_ms != 0 && sb.created_at_ms == self.created_at_ms)
    }

    fn shown(&self) -> String {
        format!("sandbox/{}", printable(&self.name))
    }
}

/// Streams the sandbox's output until it ends (following it across restarts), and returns
/// its final status: phase Deleted when it was removed meanwhile (or its name is another
/// sandbox's now). The wait starts alongside the stream, not after it: a sandbox removed
/// meanwhile is then seen ending as Deleted (rather than not found), and a sandbox made
/// again under its name later is not waited for instead.
async fn wait_for_end(
    client: &mut warren_control::client::Client,
    made: &Made,
) -> anyhow::Result<v1::SandboxStatus> {
    let mut waiter = client.clone();
    let wait = async {
        let request = v1::WaitSandboxRequest {
            name: made.name.clone(),
            timeout_ms: None,
        };
        match waiter.wait_sandbox(request).await {
            Ok(done) => Ok(Some(done.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(anyhow::Error::from(super::ServerError(s))),
        }
    };
    let stream = async {
        match stream_output(client, &made.name).await {
            Ok(()) => Ok(()),
            // A backend without logs (slot) still has an end to wait for; a sandbox gone
            // already has its end said by the wait.
            Err(e)
                if e.downcast_ref::<super::ServerError>().is_some_and(|s| {
                    matches!(
                        s.0.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::NotFound
                    )
                }) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    };
    let ((), done) = tokio::try_join!(stream, wait)?;
    Ok(match done {
        Some(sb) if made.is(&sb) => sb.status.unwrap_or_default(),
        _ => v1::SandboxStatus {
            phase: "Deleted".into(),
            ..Default::default()
        },
    })
}

/// Copies the sandbox's output to this process's stdout and stderr until it ends, as
/// `warren logs -f` does, but through a writer thread: a reader that stops reading holds up
/// that thread, not the runtime, so a signal still removes a `--rm` sandbox. A closed
/// stdout or stderr only stops the output.
async fn stream_output(
    client: &mut warren_control::client::Client,
    name: &str,
) -> anyhow::Result<()> {
    use super::exec::{Chunk, Writer};
    let request = v1::StreamLogsRequest {
        name: name.to_string(),
        follow: true,
        tail: None,
        since_ms: None,
    };
    let mut entries = answer(client.stream_logs(request).await)?;
    let writer = Writer::start()?;
    loop {
        let entry = match entries.message().await {
            Ok(Some(e)) => e,
            Ok(None) => break,
            Err(s) => {
                writer.settle().await;
                return Err(super::ServerError(s).into());
            }
        };
        // The workload's bytes, untrusted, go out as they are (as `docker run` does).
        let mut line = entry.content;
        if !entry.partial {
            line.push(b'\n');
        }
        let chunk = if entry.stream == v1::log_entry::Stream::Stderr as i32 {
            Chunk::Stderr(line)
        } else {
            Chunk::Stdout(line)
        };
        if !writer.write(chunk).await {
            return Ok(());
        }
    }
    let _ = writer.finish().await;
    Ok(())
}

/// Says how the sandbox ended and gives `run --wait`'s exit code: its workload's exit code,
/// or 1 with the reason when it failed (Timeout, MemoryLimit, a trap), or 143 when it was
/// stopped or removed first.
fn report(made: &Made, st: &v1::SandboxStatus) -> ExitCode {
    let say = |text: String| {
        // Nothing to panic over when stderr is a closed pipe (`--rm` ignores SIGPIPE).
        let _ = writeln!(std::io::stderr(), "{text}");
    };
    match (st.phase.as_str(), st.exit_code) {
        (_, Some(code)) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        ("Failed", _) => {
            say(format!(
                "{} failed: {}",
                made.shown(),
                printable(&st.reason)
            ));
            ExitCode::from(1)
        }
        // Ended by `warren stop` (which starts with SIGTERM), or removed meanwhile: not a
        // workload that finished, so not a success a script would take for one.
        (phase @ ("Stopped" | "Deleted" | "Expired"), _) => {
            say(format!(
                "{} was {} before its workload ended",
                made.shown(),
                phase.to_lowercase()
            ));
            ExitCode::from(STOPPED_EXIT)
        }
        _ => ExitCode::SUCCESS,
    }
}

/// `run --wait --rm`: waits as `run --wait` does, then removes the sandbox. A SIGINT,
/// SIGTERM or SIGHUP (a ^C, a closed terminal; `early`: one that came during the create)
/// removes it at once instead, its workload given its grace period to end, and ends the
/// command with 128 + the signal's number. (SIGPIPE stays ignored for it, see main.rs: a
/// closed stdout only stops the output.)
async fn wait_rm(
    client: &mut warren_control::client::Client,
    made: &Made,
    mut signals: Signals,
    early: Option<Interrupted>,
) -> anyhow::Result<ExitCode> {
    let first = match early {
        Some(signal) => signal,
        None => {
            let mut own = client.clone();
            let ended = tokio::select! {
                end = wait_for_end(&mut own, made) => Ok(end?),
                signal = signals.recv() => Err(signal),
            };
            match ended {
                Ok(end) => {
                    let code = report(made, &end);
                    if end.phase == "Deleted" {
                        return Ok(code);
                    }
                    // Its workload has ended: nothing to give a grace period to.
                    return Ok(match remove(client, made, Some(0), &mut signals).await? {
                        Removal::Removed | Removal::Gone => code,
                        Removal::Replaced => {
                            let _ = writeln!(
                                std::io::stderr(),
                                "run --rm: {} is another sandbox now; left as it is",
                                made.shown()
                            );
                            code
                        }
                        Removal::Abandoned(signal) => {
                            signal.exit(&format!("run --rm ({} not removed)", made.shown()))
                        }
                    });
                }
                Err(signal) => signal,
            }
        }
    };
    let what = match remove(client, made, None, &mut signals).await? {
        Removal::Removed => "removed".to_string(),
        Removal::Gone => "already removed".to_string(),
        Removal::Replaced => "already removed; another sandbox has its name now".to_string(),
        Removal::Abandoned(signal) => {
            return Ok(signal.exit(&format!("run --rm ({} not removed)", made.shown())));
        }
    };
    Ok(first.exit(&format!("run --rm ({} {what})", made.shown())))
}

/// What became of a `--rm` sandbox.
#[derive(Debug)]
enum Removal {
    Removed,
    /// Not there when looked for.
    Gone,
    /// Its name is another sandbox's now: left as it is.
    Replaced,
    /// Given up on a signal that came after the grace period was cut short.
    Abandoned(Interrupted),
}

/// Removes `made` (its current run: a restart gives it a new id), with `grace` (the
/// sandbox's own when `None`) between SIGTERM and SIGKILL. Another operation under way on it
/// (a restart, a stop) is waited out. A signal meanwhile cuts the grace period short
/// (SIGKILL now); another one gives up.
async fn remove(
    client: &warren_control::client::Client,
    made: &Made,
    grace: Option<u32>,
    signals: &mut Signals,
) -> anyhow::Result<Removal> {
    let mut grace = grace;
    let mut hurried = false;
    let mut sent = false;
    loop {
        let attempt = async {
            match remove_once(client.clone(), made, grace, &mut sent).await? {
                Some(removal) => Ok(Some(removal)),
                None => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, anyhow::Error>(None)
                }
            }
        };
        tokio::select! {
            done = attempt => if let Some(removal) = done? {
                return Ok(removal);
            },
            signal = signals.recv() => {
                if hurried {
                    return Ok(Removal::Abandoned(signal));
                }
                hurried = true;
                grace = Some(0);
                // A delete under way (this one, dropped here, goes on in the server) waits
                // out the grace period before its SIGKILL: send that now.
                kill_now(client.clone(), made).await;
            }
        }
    }
}

/// One attempt at [`remove`]: `None` when it is to be tried again. `sent`: a delete was
/// sent, so a sandbox not found since was removed by it.
async fn remove_once(
    mut client: warren_control::client::Client,
    made: &Made,
    grace: Option<u32>,
    sent: &mut bool,
) -> anyhow::Result<Option<Removal>> {
    let gone = |sent: bool| {
        Some(if sent {
            Removal::Removed
        } else {
            Removal::Gone
        })
    };
    let get = v1::GetSandboxRequest {
        name: made.name.clone(),
    };
    let now = match client.get_sandbox(get.clone()).await {
        Ok(sb) => sb.into_inner(),
        Err(s) if s.code() == tonic::Code::NotFound => return Ok(gone(*sent)),
        Err(s) => return Err(super::ServerError(s).into()),
    };
    if !made.is(&now) {
        return Ok(if *sent {
            gone(true)
        } else {
            Some(Removal::Replaced)
        });
    }
    let request = v1::DeleteSandboxRequest {
        name: made.name.clone(),
        grace_period_seconds: grace,
        id: Some(now.id.clone()),
    };
    *sent = true;
    match client.delete_sandbox(request).await {
        Ok(_) => Ok(Some(Removal::Removed)),
        // Removed meanwhile (by a delete of this command's that was dropped, or another).
        Err(s) if s.code() == tonic::Code::NotFound => Ok(Some(Removal::Removed)),
        // Another operation on it is under way (a restart, a stop's grace period).
        Err(s) if s.code() == tonic::Code::Aborted => Ok(None),
        // Its id changed since the look (a restart): look again. Any other refusal stands.
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {
            match client.get_sandbox(get).await {
                Ok(again) if again.get_ref().id == now.id => Err(super::ServerError(s).into()),
                _ => Ok(None),
            }
        }
        Err(s) => Err(super::ServerError(s).into()),
    }
}

/// Ends `made`'s workload at once (SIGKILL), cutting short a stop's grace period; errors
/// are left to the delete.
async fn kill_now(mut client: warren_control::client::Client, made: &Made) {
    let get = v1::GetSandboxRequest {
        name: made.name.clone(),
    };
    if client
        .get_sandbox(get)
        .await
        .is_ok_and(|sb| made.is(sb.get_ref()))
    {
        let kill = v1::SignalSandboxRequest {
            name: made.name.clone(),
            signal: Signal::SIGKILL as i32,
        };
        let _ = client.signal_sandbox(kill).await;
    }
}
