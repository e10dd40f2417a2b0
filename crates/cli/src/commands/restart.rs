//! `warren restart NAME...`: run sandboxes' workloads again from scratch, as `docker
//! restart` does: a running one is stopped first (SIGTERM, SIGKILL after its grace period);
//! each is then created again from its spec under a new uid and is Running (its earlier
//! output stays with the old uid: `warren logs` shows the new run's). It is seed 004's
//! `resetRevision` set to the current time (`warren update NAME --reset-revision`). Tries
//! every name; exits 1 if any failed.

use std::process::ExitCode;

use warren_proto::v1;

use super::{Globals, per_name, report_each};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox names.
    #[arg(required = true)]
    names: Vec<String>,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let token = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string();
    let client = g.connect().await?;
    let results = per_name(&client, &args.names, |mut client, name| {
        let req = v1::UpdateSandboxRequest {
            name,
            reset_revision: Some(token.clone()),
            ..Default::default()
        };
        async move { client.update_sandbox(req).await }
    })
    .await;
    Ok(report_each(results, |_| false))
}
