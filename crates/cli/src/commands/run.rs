//! `warren run`: create and start one sandbox from flags.

use std::process::ExitCode;
use std::time::Duration;

use warren_proto::{spec_to_pb, v1};
use warren_spec::{
    BackendKind, Consistency, FailurePolicy, Mount, PortSpec, ResourceRequirements, SandboxSpec,
};

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
    /// interrupted: SIGINT, SIGTERM or SIGHUP ends and deletes it).
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
                eprintln!("edit cancelled: the file was empty; nothing created");
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
    let reply = answer(
        failover
            .call(|mut c| {
                let request = request.clone();
                async move { c.create_sandbox(request).await }
            })
            .await,
    )
    .map_err(|e| match edited_file.take() {
        Some(file) => keep_edits(file, e),
        None => e,
    })?;
    drop(edited_file);
    let mut client = failover.client().await?;
    let sb = reply.sandbox.unwrap_or_default();
    if args.wait {
        // With --rm, the removal names the sandbox made here: never one that took its name
        // since.
        let rm = args.rm.then_some(sb.id.as_str());
        return wait(&mut client, &spec.name, rm).await;
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

/// Streams the sandbox's output until it finishes, then exits as it did: its exit code, or
/// 1 with the reason when it failed (Timeout, MemoryLimit, a trap).
/// `run --wait`'s exit code for a sandbox stopped (or removed) before its workload ended:
/// 128 + SIGTERM, as a shell reports a command a stop ends.
const STOPPED_EXIT: u8 = 143;

async fn wait(
    client: &mut warren_control::client::Client,
    name: &str,
    rm: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let Some(id) = rm else {
        return wait_for_end(client, name, None).await;
    };
    // With --rm the removal is this command's to do: a SIGINT, SIGTERM or SIGHUP (a ^C, a
    // closed terminal) removes the sandbox, its workload ended first, before the command
    // ends. (SIGPIPE stays ignored for it, see main.rs: a closed stdout only stops the
    // output.)
    let mut own = client.clone();
    match super::signals::until_signalled(wait_for_end(&mut own, name, Some(id))).await? {
        Ok(done) => done,
        Err(signal) => {
            let req = v1::DeleteSandboxRequest {
                name: name.to_string(),
                grace_period_seconds: None,
                id: Some(id.to_string()),
            };
            answer(client.delete_sandbox(req).await)?;
            Ok(signal.exit(&format!("run --rm (sandbox/{} removed)", printable(name))))
        }
    }
}

/// Streams the sandbox's output until it ends, then reports how it ended (removing it first
/// with `rm`, the sandbox's id).
async fn wait_for_end(
    client: &mut warren_control::client::Client,
    name: &str,
    rm: Option<&str>,
) -> anyhow::Result<ExitCode> {
    match super::logs::stream(client, name, true, None, None, false).await {
        Ok(()) => {}
        // A backend without logs (slot) still has an end to wait for.
        Err(e)
            if e.downcast_ref::<super::ServerError>()
                .is_some_and(|s| s.0.code() == tonic::Code::FailedPrecondition) => {}
        Err(e) => return Err(e),
    }
    let done = answer(
        client
            .wait_sandbox(v1::WaitSandboxRequest {
                name: name.to_string(),
                timeout_ms: None,
            })
            .await,
    )?;
    if let Some(id) = rm {
        let req = v1::DeleteSandboxRequest {
            name: name.to_string(),
            grace_period_seconds: Some(0),
            id: Some(id.to_string()),
        };
        answer(client.delete_sandbox(req).await)?;
    }
    let st = done.status.unwrap_or_default();
    match (st.phase.as_str(), st.exit_code) {
        (_, Some(code)) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
        ("Failed", _) => {
            eprintln!(
                "sandbox/{} failed: {}",
                printable(name),
                printable(&st.reason)
            );
            Ok(ExitCode::from(1))
        }
        // Ended by `warren stop` (which starts with SIGTERM), or removed meanwhile: not a
        // workload that finished, so not a success a script would take for one.
        (phase @ ("Stopped" | "Deleted" | "Expired"), _) => {
            eprintln!(
                "sandbox/{} was {} before its workload ended",
                printable(name),
                phase.to_lowercase()
            );
            Ok(ExitCode::from(STOPPED_EXIT))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}
