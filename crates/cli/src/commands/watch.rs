//! `warren watch`: stream sandbox changes until interrupted.

use std::process::ExitCode;

use warren_proto::v1::{self, sandbox_event};

use super::{Globals, ServerError, answer};
use crate::object;
use crate::output::{self, Format, printable};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Label selector, as for `ls`.
    #[arg(long = "selector", short = 'l')]
    selector: Option<String>,
    /// Do not start with the sandboxes that exist now.
    #[arg(long)]
    no_initial: bool,
    /// Output: table (one line per event; wide adds `ls -o wide`'s columns: backend,
    /// status with exit code, limits, age, node, id, labels), json (one object per line),
    /// yaml (one document per event) or name (the sandbox's name per event).
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut client = g.connect().await?;
    let req = v1::WatchSandboxesRequest {
        label_selector: args.selector.unwrap_or_default(),
        send_initial: !args.no_initial,
    };
    let mut stream = answer(client.watch_sandboxes(req).await)?;
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(s) => return Err(ServerError(s).into()),
        };
        let kind = match sandbox_event::Type::try_from(ev.r#type) {
            Ok(sandbox_event::Type::Added) => "ADDED",
            Ok(sandbox_event::Type::Modified) => "MODIFIED",
            Ok(sandbox_event::Type::Deleted) => "DELETED",
            _ => "UNKNOWN",
        };
        let sb = ev.sandbox.unwrap_or_default();
        let event = || -> anyhow::Result<serde_json::Value> {
            Ok(
                serde_json::json!({"type": kind, "sequence": ev.sequence, "object": object::to_object(&sb)?}),
            )
        };
        if args.output == Format::Json {
            println!("{}", event()?);
        } else if args.output == Format::Yaml {
            print!("---\n{}", yaml_serde::to_string(&event()?)?);
        } else if args.output == Format::Name {
            let name = sb.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
            println!("{}", printable(name));
        } else {
            let name = sb.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
            let phase = sb.status.as_ref().map(|s| s.phase.as_str()).unwrap_or("");
            let line = format!(
                "{kind:<9} {:<30} {phase:<10} rev {}",
                printable(name),
                sb.revision
            );
            if args.output == Format::Wide {
                // ls -o wide's columns, after the event's.
                let row = output::row(&sb, true);
                println!("{line:<60} {}", printable(&row[1..].join("  ")));
            } else {
                println!("{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
