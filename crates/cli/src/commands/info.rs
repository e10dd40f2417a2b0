//! `warren info`: what the server runs.

use std::process::ExitCode;

use warren_proto::{resource_info_from_pb, v1};

use super::{Globals, answer};
use crate::output::{Format, print_value, printable, table};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format: table, json or yaml.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut client = g.connect().await?;
    let info = answer(client.get_server_info(v1::GetServerInfoRequest {}).await)?;
    let allocated = resource_info_from_pb(&info.allocated.unwrap_or_default());
    if matches!(args.output, Format::Json | Format::Yaml) {
        let backends: Vec<_> = info
            .backends
            .iter()
            .map(|b| serde_json::json!({"name": b.name, "available": b.available, "reason": b.reason, "detail": b.detail, "sandboxes": b.sandboxes}))
            .collect();
        let value = serde_json::json!({
            "version": info.version, "node": info.node, "store": info.store,
            "sandboxes": info.sandboxes, "allocated": allocated, "backends": backends,
        });
        print_value(&value, args.output)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("version:   {}", printable(&info.version));
    println!("node:      {}", printable(&info.node));
    println!("store:     {}", printable(&info.store));
    println!("sandboxes: {}", info.sandboxes);
    println!("allocated: {}", allocated.to_json());
    println!();
    let rows: Vec<Vec<String>> = info
        .backends
        .iter()
        .map(|b| {
            let state = if b.available && !b.detail.is_empty() {
                format!("available: {}", b.detail)
            } else if b.available {
                "available".to_string()
            } else {
                format!("unavailable: {}", b.reason)
            };
            vec![b.name.clone(), state, b.sandboxes.to_string()]
        })
        .collect();
    table(&["BACKEND", "STATE", "SANDBOXES"], &rows);
    Ok(ExitCode::SUCCESS)
}
