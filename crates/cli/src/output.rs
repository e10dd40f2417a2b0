//! How results are shown: aligned tables for people, JSON and YAML for scripts.

use std::io::Write as _;

use clap::ValueEnum;
use serde_json::Value;
use warren_proto::v1;
use warren_spec::{format_bytes, format_cpu};

use crate::object;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Wide,
    Json,
    Yaml,
    Name,
}

/// Prints rows with columns padded to the widest cell. Cells are sanitized: a sandbox's
/// labels and names are user data and must not move the cursor or clear the screen.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    let mut line = |cells: &mut dyn Iterator<Item = String>| {
        let mut s = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 == widths.len() {
                s.push_str(&cell);
            } else {
                s.push_str(&format!("{:<w$}   ", cell, w = widths[i]));
            }
        }
        let _ = writeln!(out, "{}", s.trim_end());
    };
    line(&mut header.iter().map(|h| h.to_string()));
    for row in rows {
        line(&mut row.iter().map(|c| printable(c)));
    }
}

/// Replaces control characters so untrusted text cannot drive the terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// An error message for the terminal: line breaks and tabs kept, any other control
/// character shown escaped (`\u{1b}`), since a message may quote a server's, an image's or
/// a file's bytes.
pub fn printable_message(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

pub fn age(created_at_ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = ((now - created_at_ms) / 1000).max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn phase(sb: &v1::Sandbox) -> String {
    let st = sb.status.clone().unwrap_or_default();
    match (st.exit_code, object::seed_phase(&st.phase)) {
        _ if st.paused => format!("{} (Paused)", st.phase),
        (Some(code), _) => format!("{}({code})", st.phase),
        // Seed 004's name beside warren's: "Creating (Bound)".
        (None, Some(seed)) => format!("{} ({seed})", st.phase),
        (None, None) => st.phase,
    }
}

pub fn row(sb: &v1::Sandbox, wide: bool) -> Vec<String> {
    let spec = sb.spec.clone().unwrap_or_default();
    let st = sb.status.clone().unwrap_or_default();
    let r = st.resources.unwrap_or_default();
    let dash = || "-".to_string();
    let mut row = vec![
        spec.name,
        if spec.backend.is_empty() {
            "slot".into()
        } else {
            spec.backend
        },
        phase(sb),
        r.cpu_limit.map(format_cpu).unwrap_or_else(dash),
        r.memory_limit.map(format_bytes).unwrap_or_else(dash),
        r.pid_limit.map(|p| p.to_string()).unwrap_or_else(dash),
        age(sb.created_at_ms),
    ];
    if wide {
        row.push(st.node);
        row.push(sb.id.chars().take(12).collect());
        let labels: Vec<String> = spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        row.push(if labels.is_empty() {
            "-".into()
        } else {
            labels.join(",")
        });
    }
    row
}

pub const HEADER: &[&str] = &["NAME", "BACKEND", "STATUS", "CPU", "MEMORY", "PIDS", "AGE"];
pub const WIDE_HEADER: &[&str] = &[
    "NAME", "BACKEND", "STATUS", "CPU", "MEMORY", "PIDS", "AGE", "NODE", "ID", "LABELS",
];

/// Prints sandboxes in the chosen format. Several sandboxes in JSON/YAML form a `List`, as
/// kubectl prints them.
pub fn sandboxes(list: &[v1::Sandbox], format: Format, as_list: bool) -> anyhow::Result<()> {
    match format {
        Format::Table | Format::Wide => {
            let wide = format == Format::Wide;
            let rows: Vec<_> = list.iter().map(|s| row(s, wide)).collect();
            table(if wide { WIDE_HEADER } else { HEADER }, &rows);
        }
        Format::Name => {
            for s in list {
                println!(
                    "{}",
                    printable(&s.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default())
                );
            }
        }
        Format::Json | Format::Yaml => {
            let objects = list
                .iter()
                .map(object::to_object)
                .collect::<anyhow::Result<Vec<_>>>()?;
            let value = if as_list {
                serde_json::json!({"apiVersion": object::API_VERSION, "kind": "List", "items": objects})
            } else {
                objects.into_iter().next().unwrap_or(Value::Null)
            };
            print_value(&value, format)?;
        }
    }
    Ok(())
}

pub fn print_value(value: &Value, format: Format) -> anyhow::Result<()> {
    if format == Format::Yaml {
        print!("{}", yaml_serde::to_string(value)?);
    } else {
        println!("{}", serde_json::to_string_pretty(value)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_lines_and_escape_terminal_controls() {
        assert_eq!(
            printable_message("a\n\tb \u{1b}]0;pwned\u{7}\u{1b}[2J\rc"),
            "a\n\tb \\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\rc"
        );
        assert_eq!(printable_message("plain: ünïcode"), "plain: ünïcode");
    }
}
