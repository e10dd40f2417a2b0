//! `warren apply -f FILE`: create what does not exist, update what does. Like kubectl, fields
//! that cannot change on a live sandbox (backend, image, command...) are refused with the
//! field named, rather than silently recreating it.

use std::process::ExitCode;

use anyhow::bail;
use warren_proto::{failure_policy_to_pb, resources_to_pb, spec_from_pb, spec_to_pb, v1};
use warren_spec::SandboxSpec;

use super::{Globals, ServerError, answer, read_input};
use crate::object;
use crate::output::printable;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// YAML or JSON file of Sandbox objects (--- between them); - reads standard input.
    #[arg(long, short = 'f', required = true)]
    file: String,
}

/// The fields an update cannot change, by their YAML path.
fn immutable_changes(live: &SandboxSpec, want: &SandboxSpec) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |differs: bool, field: &'static str| {
        if differs {
            changed.push(field);
        }
    };
    check(live.backend != want.backend, "spec.backend");
    check(live.image != want.image, "spec.image");
    check(live.command != want.command, "spec.command");
    check(live.args != want.args, "spec.args");
    check(live.env != want.env, "spec.env");
    check(live.working_dir != want.working_dir, "spec.workingDir");
    check(live.ports != want.ports, "spec.ports");
    check(live.policy != want.policy, "spec.policy");
    check(live.pool != want.pool, "spec.pool");
    check(live.oci != want.oci, "spec.oci");
    check(live.consistency != want.consistency, "spec.consistency");
    check(
        live.recovery_timeout_seconds != want.recovery_timeout_seconds,
        "spec.recoveryTimeoutSeconds",
    );
    check(live.mounts != want.mounts, "spec.mounts");
    check(
        live.timeout_seconds != want.timeout_seconds,
        "spec.timeoutSeconds",
    );
    check(
        live.stop_grace_period_seconds != want.stop_grace_period_seconds,
        "spec.stopGracePeriodSeconds",
    );
    check(live.hostname != want.hostname, "spec.hostname");
    check(live.user != want.user, "spec.user");
    check(
        live.read_only_rootfs != want.read_only_rootfs,
        "spec.readOnlyRootfs",
    );
    check(
        live.deny_syscalls != want.deny_syscalls,
        "spec.denySyscalls",
    );
    changed
}

fn diff<'a>(
    live: &'a std::collections::BTreeMap<String, String>,
    want: &'a std::collections::BTreeMap<String, String>,
) -> (std::collections::HashMap<String, String>, Vec<String>) {
    let set = want
        .iter()
        .filter(|(k, v)| live.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let remove = live
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    (set, remove)
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let specs = object::from_documents(&read_input(&args.file)?, &args.file)?;
    for spec in &specs {
        // Validate every document before changing anything, so a bad file changes nothing.
        spec.validate()
            .map_err(|e| anyhow::anyhow!("{}: sandbox {:?}: {e}", args.file, spec.name))?;
    }
    let mut client = g.connect().await?;
    for want in specs {
        let name = printable(&want.name);
        let live = match client
            .get_sandbox(v1::GetSandboxRequest {
                name: want.name.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                answer(
                    client
                        .create_sandbox(v1::CreateSandboxRequest {
                            spec: Some(spec_to_pb(&want)),
                            ..Default::default()
                        })
                        .await,
                )?;
                println!("sandbox/{name} created");
                continue;
            }
            Err(s) => return Err(ServerError(s).into()),
        };
        let live_spec = spec_from_pb(live.spec.unwrap_or_default())?;
        let immutable = immutable_changes(&live_spec, &want);
        if !immutable.is_empty() {
            bail!(
                "sandbox/{name}: {} cannot change on a live sandbox (delete it and apply again)",
                immutable.join(", ")
            );
        }
        let (set_labels, remove_labels) = diff(&live_spec.labels, &want.labels);
        let (set_annotations, remove_annotations) = diff(&live_spec.annotations, &want.annotations);
        let req = v1::UpdateSandboxRequest {
            name: want.name.clone(),
            resources: (live_spec.resources != want.resources)
                .then(|| resources_to_pb(&want.resources)),
            set_labels,
            remove_labels,
            set_annotations,
            remove_annotations,
            expire_time: want
                .expire_time
                .filter(|_| live_spec.expire_time != want.expire_time),
            clear_expire_time: want.expire_time.is_none() && live_spec.expire_time.is_some(),
            failure_policy: if live_spec.failure_policy != want.failure_policy {
                failure_policy_to_pb(want.failure_policy) as i32
            } else {
                0
            },
            expected_revision: Some(live.revision),
            // A new spec.resetRevision re-creates the sandbox.
            reset_revision: want
                .reset_revision
                .clone()
                .filter(|_| live_spec.reset_revision != want.reset_revision),
        };
        let updated = answer(client.update_sandbox(req).await)?;
        if updated.revision == live.revision {
            println!("sandbox/{name} unchanged");
        } else {
            println!("sandbox/{name} configured");
        }
    }
    Ok(ExitCode::SUCCESS)
}
