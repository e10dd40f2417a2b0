//! `warren nodes`: the control plane's agents.

use std::process::ExitCode;

use serde_json::json;
use warren_proto::v1;

use super::{Globals, answer};
use crate::output::{self, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output: table, wide, json or yaml.
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut client = g.connect_nodes().await?;
    let reply = answer(client.list_nodes(v1::ListNodesRequest {}).await)?;
    match args.output {
        Format::Table | Format::Wide | Format::Name => {
            if args.output == Format::Name {
                for n in &reply.nodes {
                    println!("{}", output::printable(&n.name));
                }
                return Ok(ExitCode::SUCCESS);
            }
            let wide = args.output == Format::Wide;
            let rows: Vec<Vec<String>> = reply
                .nodes
                .iter()
                .map(|n| {
                    let backends: Vec<String> = n
                        .backends
                        .iter()
                        .filter(|b| b.available)
                        .map(|b| b.name.clone())
                        .collect();
                    let capacity = if n.capacity == u32::MAX {
                        "-".to_string()
                    } else {
                        n.capacity.to_string()
                    };
                    let mut row = vec![
                        n.name.clone(),
                        n.state.clone(),
                        format!("{}/{capacity}", n.sandboxes),
                        list(&backends),
                        if n.local {
                            "in-process".into()
                        } else {
                            n.address.clone()
                        },
                        if n.last_seen_ms > 0 && !n.local {
                            output::age(n.last_seen_ms)
                        } else {
                            "-".into()
                        },
                    ];
                    if wide {
                        let warm: Vec<String> = n
                            .warm
                            .iter()
                            .map(|w| format!("{}:{}={}/{}", w.backend, w.image, w.ready, w.target))
                            .collect();
                        let labels: Vec<String> =
                            n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        row.push(list(&n.images));
                        row.push(list(&warm));
                        row.push(list(&n.host_ports));
                        row.push(list(&labels));
                    }
                    row
                })
                .collect();
            let mut header = vec!["NAME", "STATE", "SANDBOXES", "BACKENDS", "ADDRESS", "SEEN"];
            if wide {
                header.extend(["IMAGES", "WARM", "PORTS", "LABELS"]);
            }
            output::table(&header, &rows);
        }
        Format::Json | Format::Yaml => {
            let items: Vec<serde_json::Value> = reply
                .nodes
                .iter()
                .map(|n| {
                    json!({
                        "name": n.name,
                        "state": n.state,
                        "local": n.local,
                        "address": n.address,
                        "capacity": if n.capacity == u32::MAX { None } else { Some(n.capacity) },
                        "sandboxes": n.sandboxes,
                        "backends": n.backends.iter().map(|b| json!({"name": b.name, "available": b.available, "reason": b.reason})).collect::<Vec<_>>(),
                        "images": n.images,
                        "warm": n.warm.iter().map(|w| json!({"backend": w.backend, "image": w.image, "ready": w.ready, "target": w.target})).collect::<Vec<_>>(),
                        "hostPorts": n.host_ports,
                        "labels": n.labels,
                        "lastSeenMs": n.last_seen_ms,
                        "bootId": n.boot_id,
                    })
                })
                .collect();
            output::print_value(&json!({"items": items}), args.output)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
