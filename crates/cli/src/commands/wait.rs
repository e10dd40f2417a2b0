//! `warren wait NAME...`: block until sandboxes finish and print how each ended, one line per
//! name in the order given, as `docker wait` does: its exit code, or its phase (`Stopped`,
//! `Failed`) for one that ended without one (the reason on stderr). Waits for every name at
//! once; exits 1 if any wait failed (no such sandbox, `--timeout` reached).

use std::process::ExitCode;

use warren_proto::v1;

use futures::StreamExt as _;
use futures::stream::FuturesOrdered;

use super::{Globals, answer, named_error, usage};
use crate::output::printable;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox names.
    #[arg(required = true)]
    names: Vec<String>,
    /// Give up on a sandbox still running after this long, e.g. 500ms, 30s (at most 49 days).
    #[arg(long)]
    timeout: Option<String>,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let timeout_ms = args.timeout.as_deref().map(timeout_ms).transpose()?;
    let client = g.connect().await?;
    // All at once, each printed as soon as it and the names before it have ended.
    let mut waits: FuturesOrdered<_> = args
        .names
        .iter()
        .map(|name| {
            let mut client = client.clone();
            async move {
                let request = v1::WaitSandboxRequest {
                    name: name.clone(),
                    timeout_ms,
                };
                (name, answer(client.wait_sandbox(request).await))
            }
        })
        .collect();
    let mut failed = false;
    while let Some((name, result)) = waits.next().await {
        match result {
            Ok(sandbox) => println!("{}", ended(name, &sandbox.status.unwrap_or_default())),
            Err(e) => {
                eprintln!("error: {}", named_error(name, &e));
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `--timeout`'s value in the request's milliseconds.
fn timeout_ms(text: &str) -> anyhow::Result<u32> {
    let t = humantime::parse_duration(text).map_err(|e| {
        usage(format!(
            "--timeout: {text:?} is not a duration (e.g. 30s): {e}"
        ))
    })?;
    u32::try_from(t.as_millis()).map_err(|_| {
        usage(format!(
            "--timeout: {text:?} is longer than a wait can take (49 days)"
        ))
    })
}

/// A finished sandbox's line: its exit code, else its phase (the reason goes to stderr).
fn ended(name: &str, status: &v1::SandboxStatus) -> String {
    if let Some(code) = status.exit_code {
        return code.to_string();
    }
    if !status.reason.is_empty() {
        eprintln!(
            "sandbox/{} {}: {}",
            printable(name),
            printable(&status.phase),
            printable(&status.reason)
        );
    }
    printable(&status.phase)
}
