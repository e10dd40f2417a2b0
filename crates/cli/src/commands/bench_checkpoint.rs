//! `warren bench checkpoint`: checkpoint and restore of a small linux process through the
//! API, beside `runc checkpoint` / `runc restore` of the same process in the same run, both
//! with the CRIU warren uses (`runc --criu`).
//!
//! warren: a sandbox runs the workload; each round checkpoints it (stored, not left running)
//! and restores that checkpoint as the next round's sandbox, timing both calls; the old
//! sandbox and the checkpoint are deleted untimed. runc: the same rootfs and command in a
//! bundle (`runc run -d`), then `runc checkpoint --image-path` and `runc restore -d` of the
//! same container, round after round.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde_json::json;
use warren_control::client;
use warren_proto::{spec_to_pb, v1};
use warren_spec::{BackendKind, SandboxSpec};

use super::linux::{CgroupSweep, busybox_rootfs, is_busybox, unpack_layout, write_config};
use super::{Globals, Phase, PrivateServer, answer, connect_retrying, report, us};

#[derive(Debug, clap::Args)]
pub(super) struct CheckpointArgs {
    /// The image to run (in the server's store, or imported from --image-layout).
    #[arg(long, short = 'i', default_value = "busybox")]
    image: String,
    /// An OCI image layout to import as --image first; runc's rootfs is unpacked from it
    /// too. Without it, busybox's rootfs is made from /bin/busybox for runc.
    #[arg(long, value_name = "DIR")]
    image_layout: Option<PathBuf>,
    /// Rounds (one checkpoint and one restore each).
    #[arg(short = 'n', default_value_t = 20)]
    count: usize,
    /// Rounds of runc (0 skips it).
    #[arg(long, default_value_t = 20)]
    peer_runs: usize,
    /// Log level of the private server.
    #[arg(long, default_value = "info")]
    server_log_level: String,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
    /// The workload (default: `sleep 1000000`, one small process).
    #[arg(last = true)]
    args: Vec<String>,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?)
}

fn phase(hist: Histogram<u64>, elapsed: Duration, errors: usize, first: Option<String>) -> Phase {
    Phase {
        hist,
        elapsed,
        errors,
        first_error: first,
    }
}

pub(super) async fn run(mut a: CheckpointArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    if a.args.is_empty() {
        a.args = vec!["sleep".into(), "1000000".into()];
    }
    if a.count == 0 {
        bail!("-n must be at least 1");
    }
    let criu = warren_linux::criu::Criu::find(None)
        .map_err(|e| anyhow::anyhow!(warren_linux::error_chain(&e)))?;
    let parent = format!("warren-bench-ck-{}", std::process::id());
    let _cgroups = CgroupSweep(parent.clone());
    let private = match g.server {
        None => Some(PrivateServer::start(
            &a.server_log_level,
            None,
            &["--cgroup-parent", &parent],
        )?),
        Some(_) => None,
    };
    let address = match &private {
        Some(p) => p.address.clone(),
        None => g.address()?,
    };
    let token = g.token.as_deref();
    let mut sandboxes = connect_retrying(&address, token).await?;
    let mut checkpoints = client::connect_checkpoints(&address, token).await?;
    if let Some(layout) = &a.image_layout {
        super::import_layout(&address, token, layout, &a.image).await?;
    }
    if !a.json {
        out!(
            "warren bench checkpoint: image={} rounds={} -- {} (criu {} at {})",
            a.image,
            a.count,
            a.args.join(" "),
            criu.version,
            criu.path.display()
        );
    }
    let prefix = format!("ck-{:x}", std::process::id());
    let spec = |i: usize| SandboxSpec {
        name: format!("{prefix}-{i}"),
        backend: BackendKind::Linux,
        image: Some(a.image.clone()),
        command: a.args.clone(),
        ..SandboxSpec::default()
    };
    answer(
        sandboxes
            .create_sandbox(v1::CreateSandboxRequest {
                spec: Some(spec_to_pb(&spec(0))),
                ..Default::default()
            })
            .await,
    )
    .context("creating the first sandbox")?;
    let (mut dumps, mut restores) = (histogram()?, histogram()?);
    let (mut errors, mut first) = (0, None);
    let started = Instant::now();
    // Round 0 warms up (page cache, CRIU's kernel feature probe) and is not recorded.
    let mut current = 0;
    for round in 0..=a.count {
        let (sandbox, next, ckpt) = (
            format!("{prefix}-{current}"),
            format!("{prefix}-{}", current + 1),
            format!("{prefix}-c{round}"),
        );
        let t = Instant::now();
        let dumped = checkpoints
            .create_checkpoint(v1::CreateCheckpointRequest {
                sandbox: sandbox.clone(),
                name: Some(ckpt.clone()),
                leave_running: false,
                output: None,
            })
            .await;
        let dump_time = t.elapsed();
        if let Err(s) = dumped {
            errors += 1;
            first.get_or_insert_with(|| format!("checkpoint: {}", s.message()));
            break;
        }
        let t = Instant::now();
        let restored = checkpoints
            .restore_checkpoint(v1::RestoreCheckpointRequest {
                checkpoint: ckpt.clone(),
                name: Some(next.clone()),
            })
            .await;
        let restore_time = t.elapsed();
        if round > 0 {
            dumps.saturating_record(dump_time.as_micros() as u64);
        }
        match restored {
            Ok(_) if round > 0 => restores.saturating_record(restore_time.as_micros() as u64),
            Ok(_) => {}
            Err(s) => {
                errors += 1;
                first.get_or_insert_with(|| format!("restore: {}", s.message()));
                break;
            }
        }
        let _ = sandboxes
            .delete_sandbox(v1::DeleteSandboxRequest {
                name: sandbox,
                grace_period_seconds: Some(0),
                id: None,
            })
            .await;
        let _ = checkpoints
            .delete_checkpoint(v1::DeleteCheckpointRequest { name: ckpt })
            .await;
        current += 1;
    }
    let elapsed = started.elapsed();
    let _ = sandboxes
        .delete_sandbox(v1::DeleteSandboxRequest {
            name: format!("{prefix}-{current}"),
            grace_period_seconds: Some(0),
            id: None,
        })
        .await;
    let ours_dump = phase(dumps, elapsed, errors, first.clone());
    let ours_restore = phase(restores, elapsed, errors, first);
    let mut failed = ours_dump.errors > 0;
    let dump_json = report("checkpoint", &ours_dump);
    let restore_json = report("restore", &ours_restore);

    let peer = if a.peer_runs == 0 {
        Err("--peer-runs 0".to_string())
    } else {
        let (layout, image, args, parent) = (
            a.image_layout.clone(),
            a.image.clone(),
            a.args.clone(),
            parent.clone(),
        );
        let (runs, criu_path) = (a.peer_runs, criu.path.clone());
        tokio::task::spawn_blocking(move || {
            runc_rounds(layout.as_deref(), &image, &args, &parent, runs, &criu_path)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| format!("{e:#}")))
    };
    let (peer_json, peer_failed) = runc_beside(
        [&ours_dump, &ours_restore],
        &peer,
        [
            ("checkpoint", "checkpoint", "runc ckpt"),
            ("restore", "restore", "runc rst"),
        ],
    );
    failed |= peer_failed;
    if a.json {
        out!(
            "{}",
            json!({
                "image": a.image, "args": a.args, "rounds": a.count,
                "criu": criu.version, "checkpoint": dump_json, "restore": restore_json,
                "runc": peer_json,
            })
        );
    }
    drop(private);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `runc checkpoint` and `runc restore -d` of one container, `runs` rounds after a warm-up.
fn runc_rounds(
    layout: Option<&Path>,
    image: &str,
    args: &[String],
    parent: &str,
    runs: usize,
    criu: &Path,
) -> anyhow::Result<(Phase, Phase)> {
    let runc_bundle = RuncBundle::prepare(layout, image, args, parent, "wbck")?;
    let (program, bundle, root, id) = (
        &runc_bundle.program,
        &runc_bundle.bundle,
        &runc_bundle.root,
        &runc_bundle.id,
    );
    let runc = |what: &[&str]| runc_bundle.call(&["--criu".as_ref(), criu.as_os_str()], what);
    // A detached container's stdio must be pipes: runc (like warren) hands CRIU new pipes
    // for the dumped ones at a restore, but cannot restore a host file such as /dev/null.
    // The pipes' other ends are kept here until the run ends.
    let mut held = Vec::new();
    let mut detached = |what: &[&str]| -> anyhow::Result<()> {
        let mut child = Command::new(program)
            .arg("--root")
            .arg(root)
            .arg("--criu")
            .arg(criu)
            .args(what)
            .current_dir(bundle)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let status = child.wait()?;
        held.push(child);
        if status.success() {
            return Ok(());
        }
        bail!(
            "runc {} failed ({status}); run it by hand to see why",
            what.first().copied().unwrap_or_default()
        )
    };
    let bundle_arg = bundle.to_string_lossy().into_owned();
    detached(&["run", "-d", "--bundle", &bundle_arg, id])?;
    let (mut dumps, mut restores) = (histogram()?, histogram()?);
    let (mut errors, mut first) = (0, None);
    let started = Instant::now();
    let mut result = Ok(());
    for round in 0..=runs {
        let images = runc_bundle.dir.path().join(format!("img-{round}"));
        let images_arg = images.to_string_lossy().into_owned();
        let t = Instant::now();
        if let Err(e) = runc(&["checkpoint", "--image-path", &images_arg, id]) {
            errors += 1;
            first.get_or_insert(e.to_string());
            result = Err(e);
            break;
        }
        let dump_time = t.elapsed();
        let t = Instant::now();
        if let Err(e) = detached(&[
            "restore",
            "-d",
            "--image-path",
            &images_arg,
            "--bundle",
            &bundle_arg,
            id,
        ]) {
            errors += 1;
            first.get_or_insert(e.to_string());
            result = Err(e);
            break;
        }
        if round > 0 {
            dumps.saturating_record(dump_time.as_micros() as u64);
            restores.saturating_record(t.elapsed().as_micros() as u64);
        }
        let _ = std::fs::remove_dir_all(&images);
    }
    let _ = runc(&["delete", "-f", id]);
    result?;
    let elapsed = started.elapsed();
    Ok((
        phase(dumps, elapsed, errors, first.clone()),
        phase(restores, elapsed, errors, first),
    ))
}

/// An OCI bundle of the image's files and the workload for runc, with a state directory,
/// in a temporary directory removed on drop.
pub(super) struct RuncBundle {
    pub(super) program: PathBuf,
    pub(super) dir: tempfile::TempDir,
    pub(super) bundle: PathBuf,
    pub(super) root: PathBuf,
    /// The container's id.
    pub(super) id: String,
    errors_file: PathBuf,
}

impl RuncBundle {
    /// The bundle's rootfs is unpacked from `layout`, or made from /bin/busybox for busybox;
    /// its cgroup goes under `parent`.
    pub(super) fn prepare(
        layout: Option<&Path>,
        image: &str,
        args: &[String],
        parent: &str,
        prefix: &str,
    ) -> anyhow::Result<RuncBundle> {
        if !nix::unistd::geteuid().is_root() {
            bail!("needs root");
        }
        let program = ["/usr/sbin/runc", "/usr/local/sbin/runc", "/usr/bin/runc"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .context("runc is not installed (Debian's runc comes with containerd)")?;
        let dir = tempfile::Builder::new()
            .prefix("warren-bench-runc-")
            .tempdir()?;
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs)?;
        match layout {
            Some(layout) => {
                unpack_layout(layout, image, &rootfs, dir.path())?;
            }
            None if is_busybox(image) => busybox_rootfs(&rootfs)?,
            None => bail!("pass --image-layout DIR so runc runs the same files as image {image}"),
        }
        let bundle = dir.path().join("bundle");
        write_config(&program, &bundle, &rootfs, args, &format!("/{parent}/runc"))?;
        let root = dir.path().join("state");
        std::fs::create_dir(&root)?;
        let errors_file = dir.path().join("runc.stderr");
        Ok(RuncBundle {
            program,
            bundle,
            root,
            id: format!("{prefix}-{:x}", std::process::id()),
            errors_file,
            dir,
        })
    }

    /// `runc --root STATE GLOBAL... WHAT...` in the bundle; its stderr in the error. (It
    /// goes to a file: a detached container keeps the descriptor it was given, so a pipe
    /// would never reach end of file.)
    pub(super) fn call(&self, global: &[&std::ffi::OsStr], what: &[&str]) -> anyhow::Result<()> {
        let err = std::fs::File::create(&self.errors_file)?;
        let status = Command::new(&self.program)
            .arg("--root")
            .arg(&self.root)
            .args(global)
            .args(what)
            .current_dir(&self.bundle)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .status()
            .with_context(|| format!("starting {}", self.program.display()))?;
        if status.success() {
            return Ok(());
        }
        bail!(
            "runc {}: {}",
            what.first().copied().unwrap_or_default(),
            std::fs::read_to_string(&self.errors_file)
                .unwrap_or_default()
                .trim()
        )
    }
}

/// Prints runc's two timed operations beside warren's (`ours`), with the p50 ratios; returns
/// runc's JSON and whether anything failed (a skip by `--peer-runs 0` is no failure). `ops`:
/// per operation, warren's name, runc's JSON key, and runc's report label.
pub(super) fn runc_beside(
    ours: [&Phase; 2],
    peer: &Result<(Phase, Phase), String>,
    ops: [(&str, &str, &str); 2],
) -> (serde_json::Value, bool) {
    let (first, second) = match peer {
        Err(why) => {
            out!("runc: skipped or failed: {why}");
            return (json!({ "failed": why }), !why.starts_with("--peer-runs"));
        }
        Ok(phases) => phases,
    };
    let theirs = [first, second];
    let ratio = |ours: &Phase, theirs: &Phase| {
        ours.hist.value_at_quantile(0.5) as f64 / theirs.hist.value_at_quantile(0.5).max(1) as f64
    };
    let mut peer_json = serde_json::Map::new();
    let mut line = Vec::new();
    for i in 0..2 {
        let (op, key, label) = ops[i];
        peer_json.insert(key.to_string(), report(label, theirs[i]));
        let r = ratio(ours[i], theirs[i]);
        peer_json.insert(format!("warren_over_runc_{op}_p50"), json!(r));
        line.push(format!(
            "{op} {r:.2}x ({} vs {})",
            us(ours[i].hist.value_at_quantile(0.5)),
            us(theirs[i].hist.value_at_quantile(0.5))
        ));
    }
    out!("warren/runc p50: {}", line.join(", "));
    let failed = theirs.iter().any(|p| p.errors > 0);
    (serde_json::Value::Object(peer_json), failed)
}
