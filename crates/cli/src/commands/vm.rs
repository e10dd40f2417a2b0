//! `warren vm template build`: boots and saves the vm backend's template ahead of the first
//! create (otherwise the first create of a shape boots cold and builds it behind).
//!
//! It runs in this process, not through a server: the template lands in the config's
//! `vm.template_dir`, keyed by everything it depends on, where a server with the same
//! config finds it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;

use super::Globals;

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
    /// Boot a template VM of the config's default shape and save it.
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
}

pub async fn run(args: Args, _g: &Globals) -> anyhow::Result<ExitCode> {
    let What::Template(Template::Build(a)) = args.what;
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
        },
        events,
    )?;
    if let Err(reason) = backend.acceleration() {
        anyhow::bail!("the vm backend cannot run here: {reason}");
    }
    let t = Instant::now();
    let dir = if a.rebuild {
        backend.rebuild_template().await
    } else {
        backend.build_template().await
    }
    .context("building the template")?;
    println!(
        "template {} ready in {:.1}s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
