//! `warren rm NAME...`: delete sandboxes. Tries every name; exits 1 if any failed.

use std::process::ExitCode;

use warren_proto::v1;

use super::{Globals, ServerError, per_name, report_each};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox names.
    #[arg(required = true)]
    names: Vec<String>,
    /// Seconds between SIGTERM and SIGKILL, 0 to 3600 (the sandbox's default when absent).
    #[arg(long, short = 't', value_parser = clap::value_parser!(u32).range(..=i64::from(warren_spec::MAX_GRACE_SECONDS)))]
    grace: Option<u32>,
    /// Do not fail on names that do not exist.
    #[arg(long, short = 'f')]
    force: bool,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let client = g.connect().await?;
    let results = per_name(&client, &args.names, |mut client, name| async move {
        let req = v1::DeleteSandboxRequest {
            name,
            grace_period_seconds: args.grace,
            id: None,
        };
        client.delete_sandbox(req).await
    })
    .await;
    Ok(report_each(results, |e| {
        args.force
            && e.downcast_ref::<ServerError>()
                .is_some_and(|s| s.0.code() == tonic::Code::NotFound)
    }))
}
