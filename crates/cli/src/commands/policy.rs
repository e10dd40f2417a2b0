//! `warren policy apply|ls|get|rm|check`: the server's policies (docs/policy.md).
//!
//! A policy file holds Kubernetes-style objects:
//!
//! ```yaml
//! apiVersion: warren.dev/v1
//! kind: Policy
//! metadata: {name: strict}
//! spec: {network: {mode: none}, resources: {maxMemory: 1Gi}}
//! ```

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use warren_proto::v1;
use warren_spec::PolicySpec;

use super::{Globals, ServerError, answer, read_input};
use crate::object::{self, API_VERSION, rfc3339};
use crate::output::{self, Format, printable};

pub const KIND: &str = "Policy";

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, clap::Subcommand)]
enum PolicyCommand {
    /// Create or replace policies from a YAML file ("-" for standard input).
    Apply {
        #[arg(short, long, value_name = "FILE")]
        file: String,
    },
    /// List the server's policies.
    #[command(alias = "list")]
    Ls {
        /// Output: table, json or yaml.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Show one policy as the object `apply` takes.
    Get {
        name: String,
        /// Output: yaml or json.
        #[arg(short, long, value_enum, default_value = "yaml")]
        output: Format,
    },
    /// Delete policies no sandbox holds.
    #[command(alias = "delete")]
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Evaluate sandboxes against a policy without creating them; exit 1 on a violation.
    Check {
        /// Sandbox objects (YAML, as `warren apply` takes).
        #[arg(short, long, value_name = "FILE")]
        file: String,
        /// A stored policy (default: the one each sandbox names, else the server's default).
        #[arg(long, value_name = "NAME", conflicts_with = "policy_file")]
        policy: Option<String>,
        /// A policy from a file, not stored.
        #[arg(long, value_name = "FILE")]
        policy_file: Option<String>,
    },
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    match args.command {
        PolicyCommand::Apply { file } => apply(&file, g).await,
        PolicyCommand::Ls { output } => ls(output, g).await,
        PolicyCommand::Get { name, output } => {
            let mut client = g.connect_policies().await?;
            let p = answer(client.get_policy(v1::GetPolicyRequest { name }).await)?;
            output::print_value(&to_object(&p)?, output)?;
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Rm { names } => {
            let mut client = g.connect_policies().await?;
            let mut failed = false;
            for name in names {
                let req = v1::DeletePolicyRequest { name: name.clone() };
                match client.delete_policy(req).await {
                    Ok(_) => println!("policy {name} deleted"),
                    Err(s) => {
                        eprintln!("error: {}", ServerError(s));
                        failed = true;
                    }
                }
            }
            Ok(ExitCode::from(u8::from(failed)))
        }
        PolicyCommand::Check {
            file,
            policy,
            policy_file,
        } => check(&file, policy, policy_file.as_deref(), g).await,
    }
}

async fn apply(file: &str, g: &Globals) -> anyhow::Result<ExitCode> {
    let policies = from_documents(&read_input(file)?, file)?;
    let mut client = g.connect_policies().await?;
    for (name, spec) in policies {
        let req = v1::ApplyPolicyRequest {
            name: name.clone(),
            spec_json: serde_json::to_string(&spec)?,
        };
        let reply = answer(client.apply_policy(req).await)?;
        let what = match (reply.created, reply.changed) {
            (true, _) => "created",
            (false, true) => "configured",
            (false, false) => "unchanged",
        };
        println!("policy {name} {what}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn ls(format: Format, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut client = g.connect_policies().await?;
    let reply = answer(client.list_policies(v1::ListPoliciesRequest {}).await)?;
    if matches!(format, Format::Json | Format::Yaml) {
        let items = reply
            .policies
            .iter()
            .map(to_object)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let list = json!({"apiVersion": API_VERSION, "kind": "PolicyList",
            "defaultPolicy": reply.default_policy, "items": items});
        output::print_value(&list, format)?;
        return Ok(ExitCode::SUCCESS);
    }
    if format == Format::Name {
        for p in &reply.policies {
            println!("{}", output::printable(&p.name));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = reply
        .policies
        .iter()
        .map(|p| {
            let spec: PolicySpec = serde_json::from_str(&p.spec_json).unwrap_or_default();
            let mut name = p.name.clone();
            if p.name == reply.default_policy {
                name.push_str(" (default)");
            }
            vec![
                name,
                format!("{:?}", spec.mode).to_lowercase(),
                p.hash.chars().skip(7).take(12).collect(),
                p.sandboxes.len().to_string(),
                p.revision.to_string(),
                output::age(p.created_at_ms),
            ]
        })
        .collect();
    output::table(
        &["NAME", "MODE", "HASH", "SANDBOXES", "REVISION", "AGE"],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

async fn check(
    file: &str,
    policy: Option<String>,
    policy_file: Option<&str>,
    g: &Globals,
) -> anyhow::Result<ExitCode> {
    let specs = object::from_documents(&read_input(file)?, file)?;
    let which = match policy_file {
        Some(path) => {
            let mut docs = from_documents(&read_input(path)?, path)?;
            if docs.len() != 1 {
                bail!("{path}: holds {} policies; give one", docs.len());
            }
            let (_, spec) = docs.remove(0);
            Some(v1::check_policy_request::Policy::SpecJson(
                serde_json::to_string(&spec)?,
            ))
        }
        None => policy.map(v1::check_policy_request::Policy::Name),
    };
    let mut client = g.connect_policies().await?;
    let mut violated = false;
    for spec in specs {
        let req = v1::CheckPolicyRequest {
            spec: Some(warren_proto::spec_to_pb(&spec)),
            policy: which.clone(),
        };
        let d = answer(client.check_policy(req).await)?;
        let name = printable(&spec.name);
        if d.admitted {
            match d.policy.as_str() {
                "" => println!("sandbox {name}: admitted (no policy applies)"),
                p => println!("sandbox {name}: admitted by policy {}", printable(p)),
            }
            continue;
        }
        violated = true;
        println!(
            "sandbox {name}: {} violation{} of policy {} ({})",
            d.violations.len(),
            if d.violations.len() == 1 { "" } else { "s" },
            printable(&d.policy),
            d.mode
        );
        for v in &d.violations {
            println!(
                "  {}: {:?} violates {}",
                printable(&v.field),
                printable(&v.value),
                printable(&v.rule)
            );
        }
    }
    Ok(ExitCode::from(u8::from(violated)))
}

/// The object form of a stored policy: what `get` prints and `apply` takes back.
fn to_object(p: &v1::Policy) -> anyhow::Result<Value> {
    let spec: Value = serde_json::from_str(&p.spec_json)
        .context("the server sent a policy this client cannot read")?;
    Ok(json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": p.name,
            "creationTimestamp": rfc3339(p.created_at_ms),
            "resourceVersion": p.revision.to_string(),
        },
        "spec": spec,
        "status": {"hash": p.hash, "sandboxes": p.sandboxes},
    }))
}

/// Reads every Policy object of a YAML (or JSON) text, `---`-separated; errors name the
/// document and the field.
pub fn from_documents(text: &str, source: &str) -> anyhow::Result<Vec<(String, PolicySpec)>> {
    object::each_document(text, source, KIND, from_object)
}

fn from_object(value: Value) -> anyhow::Result<(String, PolicySpec)> {
    let (mut metadata, spec) = object::split_object(value, KIND)?;
    let name = match metadata.remove("name") {
        Some(Value::String(n)) => n,
        _ => bail!("metadata.name: missing or not a string"),
    };
    let spec =
        serde_path_to_error::deserialize::<_, PolicySpec>(Value::Object(spec)).map_err(|e| {
            let path = e.path().to_string();
            let place = if path == "." {
                "spec".into()
            } else {
                format!("spec.{path}")
            };
            anyhow::anyhow!("{place}: {}", e.into_inner())
        })?;
    Ok((name, spec))
}
