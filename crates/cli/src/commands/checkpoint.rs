//! `warren checkpoint NAME [--leave-running] [-o PATH | --name CKPT]`, `warren checkpoint
//! ls|rm|export`: checkpoints of running sandboxes (docs/checkpoint.md). Paths are on the
//! server's host; a relative one is taken from this command's working directory (right
//! when the server runs on this machine, as it does over the default unix socket).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{Value, json};
use warren_proto::v1;
use warren_spec::format_bytes;

use super::{Globals, ServerError, answer, usage};
use crate::object::API_VERSION;
use crate::output::{self, Format, printable};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// The running sandbox to checkpoint.
    #[arg(required = true)]
    sandbox: Option<String>,
    /// Keep the sandbox running after the checkpoint (else it is Stopped).
    #[arg(long)]
    leave_running: bool,
    /// Write the checkpoint to PATH on the server's host instead of storing it: a new or
    /// empty directory, or a new .tar / .tar.gz file.
    #[arg(short, long, value_name = "PATH", conflicts_with = "name")]
    output: Option<PathBuf>,
    /// The stored checkpoint's name (default: SANDBOX-<unix ms>).
    #[arg(long, value_name = "CKPT")]
    name: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
enum Sub {
    /// List the server's stored checkpoints.
    #[command(alias = "list")]
    Ls {
        /// Output: table, json or yaml.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Delete stored checkpoints.
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Write a stored checkpoint to a directory or a .tar / .tar.gz on the server's host,
    /// for `warren restore PATH` on another server (one sharing this server's --checkpoint-key).
    Export { name: String, path: PathBuf },
}

/// `path` made absolute against this command's working directory.
pub fn absolute(path: &Path) -> anyhow::Result<String> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| usage(format!("the working directory: {e}")))?
            .join(path)
    };
    abs.to_str()
        .map(str::to_string)
        .ok_or_else(|| usage(format!("{}: not UTF-8", path.display())))
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(Sub::Ls { output }) => ls(output, g).await,
        Some(Sub::Rm { names }) => {
            let mut client = g.connect_checkpoints().await?;
            let mut failed = false;
            for name in names {
                let req = v1::DeleteCheckpointRequest { name: name.clone() };
                match client.delete_checkpoint(req).await {
                    Ok(_) => println!("{}", printable(&name)),
                    Err(s) => {
                        eprintln!("error: {}", ServerError(s));
                        failed = true;
                    }
                }
            }
            Ok(ExitCode::from(u8::from(failed)))
        }
        Some(Sub::Export { name, path }) => {
            let mut client = g.connect_checkpoints().await?;
            let req = v1::ExportCheckpointRequest {
                name,
                output: absolute(&path)?,
            };
            let c = answer(client.export_checkpoint(req).await)?;
            println!("{}", printable(&c.path));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let sandbox = args
                .sandbox
                .ok_or_else(|| usage("give the sandbox to checkpoint, or ls, rm or export"))?;
            let mut client = g.connect_checkpoints().await?;
            let req = v1::CreateCheckpointRequest {
                sandbox,
                name: args.name,
                leave_running: args.leave_running,
                output: args.output.as_deref().map(absolute).transpose()?,
            };
            let reply = answer(client.create_checkpoint(req).await)?;
            let c = reply.checkpoint.unwrap_or_default();
            // The name to restore by, or where it was written.
            if c.stored {
                println!("{}", printable(&c.name));
            } else {
                println!("{}", printable(&c.path));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn ls(format: Format, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut client = g.connect_checkpoints().await?;
    let reply = answer(client.list_checkpoints(v1::ListCheckpointsRequest {}).await)?;
    if matches!(format, Format::Json | Format::Yaml) {
        let items: Vec<Value> = reply.checkpoints.iter().map(to_object).collect();
        let list = json!({"apiVersion": API_VERSION, "kind": "CheckpointList", "items": items});
        output::print_value(&list, format)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = reply
        .checkpoints
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.sandbox.clone(),
                c.backend.clone(),
                format_bytes(c.size),
                c.criu_version.clone().unwrap_or_else(|| "-".into()),
                if c.leave_running { "yes" } else { "no" }.to_string(),
                output::age(c.created_at_ms),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME",
            "SANDBOX",
            "BACKEND",
            "SIZE",
            "CRIU",
            "LEFT RUNNING",
            "AGE",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

/// A checkpoint for `-o json|yaml`.
pub fn to_object(c: &v1::Checkpoint) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "Checkpoint",
        "metadata": {
            "name": c.name,
            "creationTimestamp": crate::object::rfc3339(c.created_at_ms),
        },
        "sandbox": {"name": c.sandbox, "id": c.sandbox_id, "backend": c.backend},
        "leaveRunning": c.leave_running,
        "engine": c.engine,
        "criuVersion": c.criu_version,
        "size": c.size,
        "digest": c.digest,
        "path": c.path,
        "stored": c.stored,
    })
}
