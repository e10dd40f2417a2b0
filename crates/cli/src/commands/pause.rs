//! `warren pause NAME...` and `warren unpause NAME...`, as `docker pause` and `docker
//! unpause`: freeze running sandboxes' workloads where they are (memory kept, no CPU; a VM's
//! vCPUs stopped) and let them run on. Tries every name; exits 1 if any failed.

use std::process::ExitCode;

use warren_proto::v1;

use super::{Globals, per_name, report_each};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox names.
    #[arg(required = true)]
    names: Vec<String>,
}

/// Pauses (`pause`) or unpauses every name.
pub async fn run(args: Args, pause: bool, g: &Globals) -> anyhow::Result<ExitCode> {
    let client = g.connect().await?;
    let results = per_name(&client, &args.names, |mut client, name| async move {
        let req = v1::PauseSandboxRequest { name };
        if pause {
            client.pause_sandbox(req).await
        } else {
            client.unpause_sandbox(req).await
        }
    })
    .await;
    Ok(report_each(results, |_| false))
}
