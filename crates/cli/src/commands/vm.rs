//! `warren vm template build [--cpu C] [-m M]`: boots and saves the vm backend's template of
//! a shape ahead of its first create (otherwise the first create of a shape boots cold and
//! builds it behind). The shape is the one sandboxes with those limits get, computed by the
//! backend as for a create; without them, the config's default.
//!
//! It runs in this process, not through a server: the template lands in the config's
//! `vm.template_dir`, keyed by everything it depends on, where a server with the same
//! config finds it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;

use super::{Globals, usage};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(Debug, clap::Subcommand)]
enum What {
    /// The vm backend's templates.
    #[command(subcommand)]
    Template(Template),
}

#[derive(Debug, clap::Subcommand)]
enum Template {
    /// Boot a template VM and save it: of the config's default size, or of the size of
    /// sandboxes created with the same --cpu and --memory (as `warren run -b vm` takes them).
    Build(BuildArgs),
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    /// The vm backend's config, as given to `warren server --vm-config`.
    #[arg(long, env = "WARREN_VM_CONFIG", value_name = "FILE")]
    vm_config: Option<PathBuf>,
    /// Build again even if a template with the same key exists.
    #[arg(long)]
    rebuild: bool,
    /// The CPU limit of the sandboxes it is for, in cores: 2, 0.5, 500m (a VM gets it
    /// rounded up to whole vCPUs).
    #[arg(long)]
    cpu: Option<String>,
    /// The memory limit of the sandboxes it is for: 256Mi, 1Gi (the VM gets it plus what
    /// the guest kernel keeps).
    #[arg(long, short = 'm')]
    memory: Option<String>,
}

impl BuildArgs {
    /// The limits of the sandboxes the template is for.
    fn limits(&self) -> anyhow::Result<warren_spec::ResourceInfo> {
        let cpu = self
            .cpu
            .as_deref()
            .map(|c| warren_spec::parse_cpu(c).map_err(|e| usage(format!("--cpu {c:?}: {e}"))))
            .transpose()?;
        let memory = self
            .memory
            .as_deref()
            .map(|m| warren_spec::parse_bytes(m).map_err(|e| usage(format!("--memory {m:?}: {e}"))))
            .transpose()?;
        Ok(warren_spec::ResourceInfo {
            cpu_limit: cpu,
            memory_limit: memory,
            ..Default::default()
        })
    }
}

pub async fn run(args: Args, _g: &Globals) -> anyhow::Result<ExitCode> {
    let What::Template(Template::Build(a)) = args.what;
    let limits = a.limits()?;
    let config = super::server::load_vm_config(a.vm_config.as_deref())
        .map_err(|e| anyhow::anyhow!("--vm-config: {e}"))?;
    // A scratch directory: the backend's own dir holds a server's pool, which this must not
    // touch; the template goes to the config's template_dir.
    let scratch = tempfile::Builder::new()
        .prefix("warren-vm-template-")
        .tempdir()?;
    let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = warren_vm::VmBackend::new(
        warren_vm::VmBackendConfig {
            dir: scratch.path().join("vm"),
            vm: config,
            config_error: None,
            images: None,
            cgroup_parent: "warren".into(),
            log_max_bytes: None,
            default_stop_grace: std::time::Duration::from_secs(10),
            warm: Vec::new(),
        },
        events,
    )?;
    if let Err(reason) = backend.acceleration() {
        anyhow::bail!("the vm backend cannot run here: {reason}");
    }
    let t = Instant::now();
    let dir = backend
        .build_template(&limits, a.rebuild)
        .await
        .context("building the template")?;
    println!(
        "template {} ready in {:.1}s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
