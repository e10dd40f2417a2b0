//! `warren update NAME`: change what can change on a live sandbox.

use std::process::ExitCode;
use std::time::Duration;

use warren_proto::{failure_policy_to_pb, resources_to_pb, spec_from_pb, v1};
use warren_spec::FailurePolicy;

use super::run::ResourceFlags;
use super::{Globals, answer, key_values, usage};
use crate::output::{self, Format, printable};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox name.
    name: String,
    #[command(flatten)]
    resources: ResourceFlags,
    /// Set label KEY=VALUE (repeatable).
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// Remove label KEY (repeatable).
    #[arg(long = "label-rm")]
    remove_labels: Vec<String>,
    /// Set annotation KEY=VALUE (repeatable).
    #[arg(long = "annotation", short = 'a')]
    annotations: Vec<String>,
    /// Remove annotation KEY (repeatable).
    #[arg(long = "annotation-rm")]
    remove_annotations: Vec<String>,
    /// Delete the sandbox this long from now, e.g. 30m (at least 1s).
    #[arg(long, value_parser = super::expiry, conflicts_with = "no_expire")]
    expire_in: Option<Duration>,
    /// Remove the expiry.
    #[arg(long)]
    no_expire: bool,
    /// Manual or AutoRecreate.
    #[arg(long)]
    failure_policy: Option<String>,
    /// Fail unless the sandbox is at this revision (optimistic concurrency). Without it, an
    /// update that meets another operation on the sandbox is tried again for up to 10 s.
    #[arg(long)]
    revision: Option<u64>,
    /// Re-create the sandbox: its workload starts again from scratch, under a new uid. The
    /// value is an opaque token (the current time when none is given); the same token twice
    /// re-creates once.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    reset_revision: Option<String>,
    /// Output: table, name, json or yaml.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let failure_policy = match &args.failure_policy {
        Some(p) => {
            let p: FailurePolicy = p
                .parse()
                .map_err(|e| usage(format!("--failure-policy: {e}")))?;
            failure_policy_to_pb(p) as i32
        }
        None => 0,
    };
    let mut client = g.connect().await?;
    let labels: Vec<(String, String)> = key_values("--label", &args.labels)?.into_iter().collect();
    let annotations: Vec<(String, String)> = key_values("--annotation", &args.annotations)?
        .into_iter()
        .collect();
    let reset_revision = args.reset_revision.clone().map(|r| {
        if r.is_empty() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.as_nanos().to_string()
        } else {
            r
        }
    });
    // Without --revision, an update that meets another operation on the sandbox (ABORTED:
    // busy, or the live resources it merged onto changed meanwhile) is tried again, merged
    // onto the newest, for a while: flags say what to change, not which revision.
    let started = std::time::Instant::now();
    let sb = loop {
        let mut resources = None;
        let mut expected_revision = args.revision;
        if !args.resources.is_empty() {
            // Flags change single quantities; the API replaces the whole set, so merge onto
            // the live one, and pin its revision so a concurrent change is not overwritten.
            let live = answer(
                client
                    .get_sandbox(v1::GetSandboxRequest {
                        name: args.name.clone(),
                    })
                    .await,
            )?;
            let mut r = spec_from_pb(live.spec.unwrap_or_default())?.resources;
            args.resources.apply_to(&mut r);
            resources = Some(resources_to_pb(&r));
            expected_revision = expected_revision.or(Some(live.revision));
        }
        let req = v1::UpdateSandboxRequest {
            name: args.name.clone(),
            resources,
            set_labels: labels.iter().cloned().collect(),
            remove_labels: args.remove_labels.clone(),
            set_annotations: annotations.iter().cloned().collect(),
            remove_annotations: args.remove_annotations.clone(),
            expire_time: args.expire_in.map(super::expire_time),
            clear_expire_time: args.no_expire,
            failure_policy,
            expected_revision,
            reset_revision: reset_revision.clone(),
        };
        match client.update_sandbox(req).await {
            Err(s)
                if s.code() == tonic::Code::Aborted
                    && args.revision.is_none()
                    && started.elapsed() < UPDATE_RETRIES_FOR =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            done => break answer(done)?,
        }
    };
    match args.output {
        Format::Table | Format::Wide => println!(
            "sandbox/{} updated (revision {})",
            printable(&args.name),
            sb.revision
        ),
        f => output::sandboxes(&[sb], f, false)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `warren update` without `--revision` tries again when it meets another
/// operation on the sandbox.
const UPDATE_RETRIES_FOR: std::time::Duration = std::time::Duration::from_secs(10);
