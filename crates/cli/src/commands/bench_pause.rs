//! `warren bench pause`: pausing and unpausing a running linux sandbox through the API,
//! beside `runc pause` / `runc resume` of the same process in the same run (crun refuses
//! this kind of host's hybrid cgroup layout; where both run they freeze the same way).
//!
//! warren: one sandbox runs the workload; each round times a `PauseSandbox` (it answers once
//! the kernel reports the cgroup frozen and the record is stored) and an `UnpauseSandbox`.
//! runc: the same rootfs and command in a bundle (`runc run -d`), then `runc pause` and
//! `runc resume` of it, round after round. A first round of each warms up, unrecorded.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context as _, bail};
use serde_json::json;
use warren_proto::{spec_to_pb, v1};
use warren_spec::{BackendKind, SandboxSpec};

use super::checkpoint::{RuncBundle, runc_beside};
use super::linux::CgroupSweep;
use super::{Globals, Phase, PrivateServer, answer, connect_retrying, report};

#[derive(Debug, clap::Args)]
pub(super) struct PauseArgs {
    /// The image to run (in the server's store, or imported from --image-layout).
    #[arg(long, short = 'i', default_value = "busybox")]
    image: String,
    /// An OCI image layout to import as --image first; runc's rootfs is unpacked from it
    /// too. Without it, busybox's rootfs is made from /bin/busybox for runc.
    #[arg(long, value_name = "DIR")]
    image_layout: Option<PathBuf>,
    /// Rounds (one pause and one unpause each).
    #[arg(short = 'n', default_value_t = 100)]
    count: usize,
    /// Rounds of runc (0 skips it).
    #[arg(long, default_value_t = 100)]
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

pub(super) async fn run(mut a: PauseArgs, g: &Globals) -> anyhow::Result<ExitCode> {
    if a.args.is_empty() {
        a.args = vec!["sleep".into(), "1000000".into()];
    }
    if a.count == 0 {
        bail!("-n must be at least 1");
    }
    let parent = format!("warren-bench-pause-{}", std::process::id());
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
    let mut client = connect_retrying(&address, token).await?;
    if let Some(layout) = &a.image_layout {
        super::import_layout(&address, token, layout, &a.image).await?;
    }
    if !a.json {
        out!(
            "warren bench pause: image={} rounds={} -- {}",
            a.image,
            a.count,
            a.args.join(" ")
        );
    }
    let name = format!("pause-{:x}", std::process::id());
    let spec = SandboxSpec {
        name: name.clone(),
        backend: BackendKind::Linux,
        image: Some(a.image.clone()),
        command: a.args.clone(),
        ..SandboxSpec::default()
    };
    answer(
        client
            .create_sandbox(v1::CreateSandboxRequest {
                spec: Some(spec_to_pb(&spec)),
                ..Default::default()
            })
            .await,
    )
    .context("creating the sandbox")?;
    let mut pauses = Rounds::new()?;
    let mut unpauses = Rounds::new()?;
    let started = Instant::now();
    for round in 0..=a.count {
        let request = || v1::PauseSandboxRequest { name: name.clone() };
        let t = Instant::now();
        let paused = client.pause_sandbox(request()).await;
        if !pauses.note(
            round,
            t,
            paused.map(|_| ()).map_err(|s| s.message().to_string()),
        ) {
            break;
        }
        let t = Instant::now();
        let resumed = client.unpause_sandbox(request()).await;
        if !unpauses.note(
            round,
            t,
            resumed.map(|_| ()).map_err(|s| s.message().to_string()),
        ) {
            break;
        }
    }
    let elapsed = started.elapsed();
    let _ = client
        .delete_sandbox(v1::DeleteSandboxRequest {
            name,
            grace_period_seconds: Some(0),
            id: None,
        })
        .await;
    let ours_pause = pauses.phase("pause", elapsed);
    let ours_unpause = unpauses.phase("unpause", elapsed);
    let mut failed = ours_pause.errors + ours_unpause.errors > 0;
    let pause_json = report("pause", &ours_pause);
    let unpause_json = report("unpause", &ours_unpause);

    let peer = if a.peer_runs == 0 {
        Err("--peer-runs 0".to_string())
    } else {
        let (layout, image, args, parent) = (
            a.image_layout.clone(),
            a.image.clone(),
            a.args.clone(),
            parent.clone(),
        );
        let runs = a.peer_runs;
        tokio::task::spawn_blocking(move || {
            runc_rounds(layout.as_deref(), &image, &args, &parent, runs)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| format!("{e:#}")))
    };
    let (peer_json, peer_failed) = runc_beside(
        [&ours_pause, &ours_unpause],
        &peer,
        [
            ("pause", "pause", "runc pause"),
            ("unpause", "resume", "runc resume"),
        ],
    );
    failed |= peer_failed;
    if a.json {
        out!(
            "{}",
            json!({
                "image": a.image, "args": a.args, "rounds": a.count,
                "pause": pause_json, "unpause": unpause_json, "runc": peer_json,
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

/// One timed call per round, round 0 (the warm-up) unrecorded; errors counted.
struct Rounds {
    hist: hdrhistogram::Histogram<u64>,
    errors: usize,
    first: Option<String>,
}

impl Rounds {
    fn new() -> anyhow::Result<Rounds> {
        Ok(Rounds {
            hist: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)?,
            errors: 0,
            first: None,
        })
    }

    /// Records the call begun at `t`; false (stop the rounds) if it failed.
    fn note(&mut self, round: usize, t: Instant, result: Result<(), String>) -> bool {
        let took = t.elapsed();
        match result {
            Ok(()) => {
                if round > 0 {
                    self.hist.saturating_record(took.as_micros() as u64);
                }
                true
            }
            Err(e) => {
                self.errors += 1;
                self.first.get_or_insert(e);
                false
            }
        }
    }

    fn phase(self, what: &str, elapsed: std::time::Duration) -> Phase {
        Phase {
            hist: self.hist,
            elapsed,
            errors: self.errors,
            first_error: self.first.map(|e| format!("{what}: {e}")),
        }
    }
}

/// `runc pause` and `runc resume` of one running container, `runs` rounds after a warm-up.
fn runc_rounds(
    layout: Option<&std::path::Path>,
    image: &str,
    args: &[String],
    parent: &str,
    runs: usize,
) -> anyhow::Result<(Phase, Phase)> {
    let runc = RuncBundle::prepare(layout, image, args, parent, "wbpause")?;
    let bundle = runc.bundle.to_string_lossy().into_owned();
    runc.call(&[], &["run", "-d", "--bundle", &bundle, &runc.id])?;
    let (mut pauses, mut resumes) = (Rounds::new()?, Rounds::new()?);
    let started = Instant::now();
    for round in 0..=runs {
        let t = Instant::now();
        let paused = runc.call(&[], &["pause", &runc.id]);
        if !pauses.note(round, t, paused.map_err(|e| e.to_string())) {
            break;
        }
        let t = Instant::now();
        let resumed = runc.call(&[], &["resume", &runc.id]);
        if !resumes.note(round, t, resumed.map_err(|e| e.to_string())) {
            break;
        }
    }
    let elapsed = started.elapsed();
    let _ = runc.call(&[], &["delete", "-f", &runc.id]);
    Ok((
        pauses.phase("runc pause", elapsed),
        resumes.phase("runc resume", elapsed),
    ))
}
