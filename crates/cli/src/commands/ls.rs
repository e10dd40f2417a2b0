//! `warren ls`: list sandboxes.

use std::process::ExitCode;

use warren_proto::v1;

use super::{Globals, answer};
use crate::output::{self, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Label selector: app=web,tier!=db,env in (a,b),!legacy.
    #[arg(long = "selector", short = 'l')]
    selector: Option<String>,
    /// Only this backend (repeatable).
    #[arg(long)]
    backend: Vec<String>,
    /// Output: table, wide, name, json or yaml.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    for b in &args.backend {
        super::backend_arg(b)?;
    }
    let mut client = g.connect().await?;
    let req = v1::ListSandboxesRequest {
        label_selector: args.selector.unwrap_or_default(),
        backends: args.backend,
    };
    let list = answer(client.list_sandboxes(req).await)?;
    output::sandboxes(&list.sandboxes, args.output, true)?;
    Ok(ExitCode::SUCCESS)
}
