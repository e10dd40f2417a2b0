//! `warren kill [--signal SIGNAL] NAME...`: send a signal to sandboxes' workloads, as `docker kill`
//! does (SIGKILL unless told otherwise). Tries every name; exits 1 if any failed.

use std::process::ExitCode;

use warren_proto::v1;

use super::{Globals, per_name, report_each, usage};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox names.
    #[arg(required = true)]
    names: Vec<String>,
    /// The signal: a name (KILL, SIGTERM, hup) or a number. (No `-s`: that is `--server`.)
    #[arg(long, default_value = "KILL")]
    signal: String,
}

/// `KILL`, `SIGKILL`, `kill` or `9` → 9.
pub fn parse_signal(s: &str) -> Result<i32, String> {
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=64).contains(&n) {
            Ok(n)
        } else {
            Err(format!("--signal: {s:?} is not a signal number (1-64)"))
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| {
            format!("--signal: {s:?} is not a signal name (e.g. KILL, TERM, HUP) or number")
        })
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let signal = parse_signal(&args.signal).map_err(usage)?;
    let client = g.connect().await?;
    let results = per_name(&client, &args.names, |mut client, name| async move {
        client
            .signal_sandbox(v1::SignalSandboxRequest { name, signal })
            .await
    })
    .await;
    Ok(report_each(results, |_| false))
}

#[cfg(test)]
mod tests {
    use super::parse_signal;

    #[test]
    fn signal_names_and_numbers() {
        assert_eq!(parse_signal("KILL"), Ok(9));
        assert_eq!(parse_signal("sigterm"), Ok(15));
        assert_eq!(parse_signal("hup"), Ok(1));
        assert_eq!(parse_signal("10"), Ok(10));
        assert_eq!(parse_signal("34"), Ok(34));
        let e = parse_signal("0").unwrap_err();
        assert!(e.contains("--signal") && e.contains("\"0\""), "{e}");
        let e = parse_signal("NOPE").unwrap_err();
        assert!(e.contains("--signal") && e.contains("NOPE"), "{e}");
    }
}
