//! `warren pool create|ls|get|rm`: pools of pre-warmed sandboxes (seed 004's SandboxPool).
//!
//! ```sh
//! warren pool create py --image busybox --buffer-min 2 --buffer-max 4 --max 50
//! warren run --pool py -- sh -c 'echo hi'   # takes a pre-warmed sandbox when one is ready
//! ```

use std::process::ExitCode;

use serde_json::json;
use warren_proto::v1;

use super::{Globals, ServerError, answer};
use crate::object::{API_VERSION, rfc3339};
use crate::output::{self, Format};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: PoolCommand,
}

#[derive(Debug, clap::Subcommand)]
enum PoolCommand {
    /// Create or replace a pool.
    #[command(alias = "apply")]
    Create(CreateArgs),
    /// List pools: image, sandboxes in use, pre-warmed ready and wanted, hits and misses.
    #[command(alias = "list")]
    Ls {
        /// Output: table, json or yaml.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Show one pool.
    Get {
        name: String,
        /// Output: yaml or json.
        #[arg(short, long, value_enum, default_value = "yaml")]
        output: Format,
    },
    /// Delete pools (and their pre-warmed sandboxes); refused while sandboxes of one exist.
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    name: String,
    /// The image every sandbox of the pool runs.
    #[arg(long, short = 'i')]
    image: String,
    /// Backend of its sandboxes: linux (warm shells) or vm (clones of the image's template).
    #[arg(long, short = 'b', default_value = "linux")]
    backend: String,
    /// Sandboxes the pool always holds, in use or pre-warmed.
    #[arg(long, default_value_t = 0)]
    min: u32,
    /// Most sandboxes, in use and pre-warmed together (0: no limit).
    #[arg(long, default_value_t = 0)]
    max: u32,
    /// Pre-warmed sandboxes kept ready at least.
    #[arg(long, default_value_t = 1)]
    buffer_min: u32,
    /// Pre-warmed sandboxes kept ready at most (default: --buffer-min).
    #[arg(long, default_value_t = 0)]
    buffer_max: u32,
    /// Only agents whose labels match, e.g. "zone=a" (default: every agent).
    #[arg(long, default_value = "")]
    node_selector: String,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut client = g.connect_pools().await?;
    match args.command {
        PoolCommand::Create(a) => {
            let req = v1::ApplyPoolRequest {
                name: a.name.clone(),
                spec: Some(v1::PoolSpec {
                    backend: a.backend,
                    image: a.image,
                    min: a.min,
                    max: a.max,
                    buffer_min: a.buffer_min,
                    buffer_max: a.buffer_max,
                    node_selector: a.node_selector,
                }),
            };
            let reply = answer(client.apply_pool(req).await)?;
            let what = match (reply.created, reply.changed) {
                (true, _) => "created",
                (false, true) => "configured",
                (false, false) => "unchanged",
            };
            println!("pool {} {what}", output::printable(&a.name));
        }
        PoolCommand::Ls { output } => {
            let reply = answer(client.list_pools(v1::ListPoolsRequest {}).await)?;
            if matches!(output, Format::Json | Format::Yaml) {
                let items: Vec<_> = reply.pools.iter().map(to_object).collect();
                output::print_value(
                    &json!({"apiVersion": API_VERSION, "kind": "SandboxPoolList", "items": items}),
                    output,
                )?;
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = reply
                .pools
                .iter()
                .map(|p| {
                    let spec = p.spec.clone().unwrap_or_default();
                    let st = p.status.clone().unwrap_or_default();
                    vec![
                        p.name.clone(),
                        format!("{}:{}", spec.backend, spec.image),
                        st.in_use.to_string(),
                        format!("{}/{}", st.ready, st.target),
                        if spec.max == 0 {
                            format!("{}-", spec.min)
                        } else {
                            format!("{}-{}", spec.min, spec.max)
                        },
                        format!("{}/{}", st.hits, st.misses),
                        st.nodes.len().to_string(),
                        output::age(p.created_at_ms),
                    ]
                })
                .collect();
            output::table(
                &[
                    "NAME",
                    "IMAGE",
                    "IN-USE",
                    "WARM",
                    "SIZE",
                    "HITS/MISSES",
                    "NODES",
                    "AGE",
                ],
                &rows,
            );
        }
        PoolCommand::Get { name, output } => {
            let p = answer(client.get_pool(v1::GetPoolRequest { name }).await)?;
            output::print_value(&to_object(&p), output)?;
        }
        PoolCommand::Rm { names } => {
            let mut failed = false;
            for name in names {
                match client
                    .delete_pool(v1::DeletePoolRequest { name: name.clone() })
                    .await
                {
                    Ok(_) => println!("pool {} deleted", output::printable(&name)),
                    Err(s) => {
                        eprintln!("error: {}", ServerError(s));
                        failed = true;
                    }
                }
            }
            return Ok(ExitCode::from(u8::from(failed)));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A pool as a Kubernetes-style object.
fn to_object(p: &v1::Pool) -> serde_json::Value {
    let spec = p.spec.clone().unwrap_or_default();
    let st = p.status.clone().unwrap_or_default();
    json!({
        "apiVersion": API_VERSION,
        "kind": "SandboxPool",
        "metadata": {
            "name": p.name,
            "creationTimestamp": rfc3339(p.created_at_ms),
            "resourceVersion": p.revision.to_string(),
        },
        "spec": {
            "backend": spec.backend,
            "image": spec.image,
            "min": spec.min,
            "max": spec.max,
            "bufferMin": spec.buffer_min,
            "bufferMax": spec.buffer_max,
            "nodeSelector": spec.node_selector,
        },
        "status": {
            "inUse": st.in_use,
            "ready": st.ready,
            "target": st.target,
            "nodes": st.nodes,
            "hits": st.hits,
            "misses": st.misses,
        },
    })
}
