//! `warren stop NAME...`: stop sandboxes' workloads and keep the sandboxes, as `docker stop`
//! does: SIGTERM, then SIGKILL after the grace period; each ends Stopped, its logs readable,
//! until `warren rm`. A sandbox that is not running is left as it is. Tries every name; exits
//! 1 if any failed.

use std::process::ExitCode;

use warren_proto::v1;

use super::{Globals, per_name, report_each};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox names.
    #[arg(required = true)]
    names: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL, 0 to 3600 (the sandbox's own setting when absent).
    #[arg(long, short = 't', visible_alias = "time", value_parser = clap::value_parser!(u32).range(..=i64::from(warren_spec::MAX_GRACE_SECONDS)))]
    grace: Option<u32>,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let client = g.connect().await?;
    let results = per_name(&client, &args.names, |mut client, name| async move {
        let req = v1::StopSandboxRequest {
            name,
            grace_period_seconds: args.grace,
        };
        client.stop_sandbox(req).await
    })
    .await;
    Ok(report_each(results, |_| false))
}
