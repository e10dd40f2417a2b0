//! `warren vm template build [--cpu C] [-m M] [-i IMAGE [--dir DIR]]`: boots and saves the
//! vm backend's template of a shape ahead of its first create (otherwise the first create of
//! a shape boots cold and builds it behind). The shape is the one sandboxes with those
//! limits (and that image) get, computed by the backend as for a create; without limits,
//! the config's default size.
//!
//! It runs in this process, not through a server: the template lands in the config's
//! `vm.template_dir`, keyed by everything it depends on, where a server with the same
//! config finds it. An image is taken from the server's image store under its `--dir`, and
//! its disk made (or found) where that server keeps image disks: the template's key names
//! the disk, so the server's creates of the image find this template.

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
    /// The image of the sandboxes it is for (`warren run -b vm -i IMAGE`), a name or id in
    /// the image store of the server on --dir.
    #[arg(long, short = 'i')]
    image: Option<String>,
    /// The `--dir` of the server whose image store has the image [default: the server's
    /// default, /var/lib/warren for root].
    #[arg(long, value_name = "DIR", requires = "image")]
    dir: Option<PathBuf>,
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
    let disk = match &a.image {
        Some(image) => Some(image_disk(a.dir.clone(), image)?),
        None => None,
    };
    let dir = backend
        .build_template(&limits, disk, a.rebuild)
        .await
        .context("building the template")?;
    println!(
        "template {} ready in {:.1}s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// The disk of `image` where the server on `dir` keeps image disks, made if it is missing.
fn image_disk(dir: Option<PathBuf>, image: &str) -> anyhow::Result<PathBuf> {
    let dir = dir.unwrap_or_else(warren_control::address::default_dir);
    let images = warren_control::server::images_dir(&dir);
    if !images.is_dir() {
        anyhow::bail!(
            "--dir {}: no image store there ({} is missing): give the server's --dir, with \
             the image imported or pulled on that server",
            dir.display(),
            images.display()
        );
    }
    let store = warren_image::ImageStore::open(&images)
        .with_context(|| format!("opening the image store {}", images.display()))?;
    let cache = warren_vm::image::disk_cache(&warren_control::server::vm_dir(&dir));
    let (disk, _) = warren_vm::image::root_disk(&store, &cache, image)
        .map_err(|e| anyhow::anyhow!("-i {image}: {}", warren_runtime::error_chain(&e)))?;
    Ok(disk)
}
