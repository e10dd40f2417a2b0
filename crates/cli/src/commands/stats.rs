//! `warren stats [NAME...]`: what running sandboxes use now, as `docker stats` shows it: CPU
//! (100% is one core, from two readings `--interval` apart), memory against the sandbox's
//! limit, processes. Streams until interrupted, one reading per sandbox and interval (each
//! refresh's CPU is taken against the one before); `--no-stream` prints once.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use warren_proto::v1;
use warren_spec::format_bytes;

use super::{Globals, ServerError, answer};
use crate::output;
use warren_control::client::Client;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandboxes to show (default: every running one).
    names: Vec<String>,
    /// Print one reading and exit.
    #[arg(long)]
    no_stream: bool,
    /// Time between the readings a CPU figure is taken from, e.g. 500ms (10ms to 1h).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Output: table or json (one object per sandbox and reading).
    #[arg(short, long, value_enum, default_value = "table")]
    output: StatsFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatsFormat {
    Table,
    Json,
}

/// One sandbox between two readings.
struct Line {
    name: String,
    backend: String,
    memory_limit: Option<u64>,
    usage: v1::SandboxUsage,
    /// Percent of one core over the interval; `None` without two CPU readings.
    cpu_percent: Option<f64>,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    if args.interval < Duration::from_millis(10) {
        return Err(super::usage(format!(
            "--interval: {:?} is too short to measure CPU over (at least 10ms)",
            args.interval
        )));
    }
    if args.interval > Duration::from_secs(3600) {
        return Err(super::usage(format!(
            "--interval: {:?} is longer than an hour (the CPU figure is an average over it)",
            args.interval
        )));
    }
    let mut client = g.connect().await?;
    let mut first = true;
    // Each sandbox's last reading, by id (a sandbox re-created under its name starts over).
    let mut last: HashMap<String, v1::SandboxUsage> = HashMap::new();
    loop {
        let sandboxes = if args.names.is_empty() {
            let list = answer(
                client
                    .list_sandboxes(v1::ListSandboxesRequest::default())
                    .await,
            )?;
            list.sandboxes
                .into_iter()
                .filter(|s| s.status.as_ref().is_some_and(|st| st.phase == "Running"))
                .collect()
        } else {
            let mut found = Vec::new();
            for name in &args.names {
                let req = v1::GetSandboxRequest { name: name.clone() };
                found.push(answer(client.get_sandbox(req).await)?);
            }
            found
        };
        let names: Vec<String> = sandboxes
            .iter()
            .map(|s| s.spec.clone().unwrap_or_default().name)
            .collect();
        let strict = !args.names.is_empty();
        // Sandboxes seen for the first time get a reading now; their CPU comes an interval
        // later, with everyone's.
        let new: Vec<(String, String)> = sandboxes
            .iter()
            .zip(&names)
            .filter(|(sb, _)| !last.contains_key(&sb.id))
            .map(|(sb, name)| (sb.id.clone(), name.clone()))
            .collect();
        if !new.is_empty() {
            let new_names: Vec<String> = new.iter().map(|(_, name)| name.clone()).collect();
            let readings = read(&mut client, &new_names, strict).await?;
            for ((id, _), reading) in new.into_iter().zip(readings) {
                if let Some(reading) = reading {
                    last.insert(id, reading);
                }
            }
            tokio::time::sleep(args.interval).await;
        }
        let after = read(&mut client, &names, strict).await?;
        let mut lines = Vec::new();
        let mut seen = HashMap::new();
        for (sb, after) in sandboxes.iter().zip(after) {
            let Some(after) = after else {
                continue;
            };
            let cpu = last
                .get(&sb.id)
                .and_then(|before| cpu_percent(before, &after));
            seen.insert(sb.id.clone(), after.clone());
            let spec = sb.spec.clone().unwrap_or_default();
            let limits = sb
                .status
                .as_ref()
                .and_then(|s| s.resources)
                .unwrap_or_default();
            lines.push(Line {
                name: spec.name,
                backend: if spec.backend.is_empty() {
                    "slot".into()
                } else {
                    spec.backend
                },
                memory_limit: limits.memory_limit,
                cpu_percent: cpu,
                usage: after,
            });
        }
        // Sandboxes that ended are forgotten.
        last = seen;
        print(&lines, args.output, first);
        first = false;
        if args.no_stream {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(args.interval).await;
    }
}

/// One reading of each sandbox; `None` for one that stopped running meanwhile, or an error
/// when `strict` (the user named it).
async fn read(
    client: &mut Client,
    names: &[String],
    strict: bool,
) -> anyhow::Result<Vec<Option<v1::SandboxUsage>>> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let req = v1::GetSandboxUsageRequest { name: name.clone() };
        match client.get_sandbox_usage(req).await {
            Ok(reply) => out.push(Some(reply.into_inner())),
            Err(s) if strict => return Err(ServerError(s).into()),
            Err(_) => out.push(None),
        }
    }
    Ok(out)
}

/// CPU over the interval between two readings, in percent of one core.
fn cpu_percent(before: &v1::SandboxUsage, after: &v1::SandboxUsage) -> Option<f64> {
    let used = after.cpu_ns?.checked_sub(before.cpu_ns?)? as f64;
    let wall_ms = after.time_ms - before.time_ms;
    (wall_ms > 0).then(|| used / (wall_ms as f64 * 1e6) * 100.0)
}

fn print(lines: &[Line], format: StatsFormat, first: bool) {
    if format == StatsFormat::Json {
        for l in lines {
            let u = &l.usage;
            let value = json!({
                "name": l.name,
                "backend": l.backend,
                "measured": u.measured,
                "cpuPercent": l.cpu_percent.map(|p| (p * 100.0).round() / 100.0),
                "cpuNs": u.cpu_ns,
                "memoryBytes": u.memory_bytes,
                "memoryPeakBytes": u.memory_peak_bytes,
                "memoryLimitBytes": l.memory_limit,
                "pids": u.pids,
                "timeMs": u.time_ms,
            });
            println!("{value}");
        }
        return;
    }
    if !first {
        println!();
    }
    let dash = || "-".to_string();
    let rows: Vec<Vec<String>> = lines
        .iter()
        .map(|l| {
            let u = &l.usage;
            let memory = match (u.memory_bytes, l.memory_limit) {
                (Some(used), Some(limit)) => {
                    format!("{} / {}", format_bytes(used), format_bytes(limit))
                }
                (Some(used), None) => format!("{} / -", format_bytes(used)),
                (None, _) => dash(),
            };
            let memory_percent = match (u.memory_bytes, l.memory_limit) {
                (Some(used), Some(limit)) if limit > 0 => {
                    format!("{:.1}%", used as f64 / limit as f64 * 100.0)
                }
                _ => dash(),
            };
            vec![
                l.name.clone(),
                l.backend.clone(),
                l.cpu_percent
                    .map(|p| format!("{p:.1}%"))
                    .unwrap_or_else(dash),
                memory,
                memory_percent,
                u.pids.map(|p| p.to_string()).unwrap_or_else(dash),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME",
            "BACKEND",
            "CPU %",
            "MEM USAGE / LIMIT",
            "MEM %",
            "PIDS",
        ],
        &rows,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_the_share_of_one_core_between_readings() {
        let at = |cpu_ns, time_ms| v1::SandboxUsage {
            cpu_ns: Some(cpu_ns),
            time_ms,
            ..Default::default()
        };
        // 250 ms of CPU over 1 s of wall time: a quarter of a core.
        assert_eq!(
            cpu_percent(&at(0, 1000), &at(250_000_000, 2000)),
            Some(25.0)
        );
        // Two cores busy: 200%.
        assert_eq!(
            cpu_percent(&at(0, 0), &at(2_000_000_000, 1000)),
            Some(200.0)
        );
        assert_eq!(cpu_percent(&at(5, 1000), &at(5, 1000)), None);
        let unmeasured = v1::SandboxUsage::default();
        assert_eq!(cpu_percent(&unmeasured, &unmeasured), None);
    }
}
