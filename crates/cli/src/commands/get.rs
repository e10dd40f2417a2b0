//! `warren get NAME`: one sandbox.

use std::process::ExitCode;

use warren_proto::v1;

use super::{Globals, answer};
use crate::output::{self, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox name.
    name: String,
    /// Output: table, wide, name, json or yaml.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut client = g.connect().await?;
    let sb = answer(
        client
            .get_sandbox(v1::GetSandboxRequest { name: args.name })
            .await,
    )?;
    output::sandboxes(&[sb], args.output, false)?;
    Ok(ExitCode::SUCCESS)
}
