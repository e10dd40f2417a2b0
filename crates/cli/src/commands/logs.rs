//! `warren logs NAME`: a sandbox's output, optionally followed until it finishes.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use warren_proto::v1::{self, log_entry};

use super::{Globals, ServerError, answer};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandbox name.
    name: String,
    /// Keep streaming new output until the sandbox finishes.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only the last N lines.
    #[arg(long)]
    tail: Option<u32>,
    /// Only lines from the last DURATION (e.g. 10m).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Prefix each line with its time.
    #[arg(long, short = 't')]
    timestamps: bool,
}

pub async fn run(args: Args, g: &Globals) -> anyhow::Result<ExitCode> {
    let mut client = g.connect().await?;
    stream(
        &mut client,
        &args.name,
        args.follow,
        args.tail,
        args.since,
        args.timestamps,
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// Copies a sandbox's output to our stdout/stderr. The bytes are the workload's, untrusted:
/// they go out as they are, like `docker logs`, except that with timestamps each line is
/// prefixed so it stays one line.
pub async fn stream(
    client: &mut warren_control::client::Client,
    name: &str,
    follow: bool,
    tail: Option<u32>,
    since: Option<Duration>,
    timestamps: bool,
) -> anyhow::Result<()> {
    let since_ms = since.map(|d| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        now.saturating_sub(d).as_millis() as i64
    });
    let req = v1::StreamLogsRequest {
        name: name.to_string(),
        follow,
        tail,
        since_ms,
    };
    let mut entries = answer(client.stream_logs(req).await)?;
    // Per stream: the last entry was partial, so the next one goes on the same line (and
    // gets no timestamp of its own).
    let mut mid_line = [false; 2];
    loop {
        let entry = match entries.message().await {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(()),
            Err(s) => return Err(ServerError(s).into()),
        };
        let mut line = Vec::with_capacity(entry.content.len() + 40);
        let stderr = entry.stream == log_entry::Stream::Stderr as i32;
        let continues = std::mem::replace(&mut mid_line[usize::from(stderr)], entry.partial);
        if timestamps && !continues {
            let t = std::time::UNIX_EPOCH
                + Duration::from_nanos(u64::try_from(entry.time_ns).unwrap_or(0));
            line.extend_from_slice(humantime::format_rfc3339_nanos(t).to_string().as_bytes());
            line.push(b' ');
        }
        line.extend_from_slice(&entry.content);
        if !entry.partial {
            line.push(b'\n');
        }
        // A closed pipe (`warren logs x | head`) ends the command quietly.
        let written = if stderr {
            std::io::stderr().lock().write_all(&line)
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(&line).and_then(|()| out.flush())
        };
        if written.is_err() {
            return Ok(());
        }
    }
}
