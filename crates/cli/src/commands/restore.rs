//! `warren restore CKPT|PATH [--name NEW]`: a sandbox from a checkpoint, continuing where it
//! was saved (docs/checkpoint.md).

use std::path::Path;
use std::process::ExitCode;

use warren_proto::v1;

use super::{Globals, answer};
use crate::output::printable;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A stored checkpoint's name, or a checkpoint directory or .tar / .tar.gz on the
    /// server's host (a path: it holds a `/` or names an existing file here).
    checkpoint: String,
    /// The new sandbox's name (default: the checkpointed sandbox's; a finished sandbox of
    /// that name is replaced).
    #[arg(long)]
    name: Option<String>,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let checkpoint = if args.checkpoint.contains('/') || Path::new(&args.checkpoint).exists() {
        super::checkpoint::absolute(Path::new(&args.checkpoint))?
    } else {
        args.checkpoint
    };
    let mut client = g.connect_checkpoints().await?;
    let reply = answer(
        client
            .restore_checkpoint(v1::RestoreCheckpointRequest {
                checkpoint,
                name: args.name,
            })
            .await,
    )?;
    let name = reply
        .sandbox
        .and_then(|s| s.spec)
        .map(|s| s.name)
        .unwrap_or_default();
    println!("{}", printable(&name));
    Ok(ExitCode::SUCCESS)
}
