//! Ending a client command cleanly on SIGINT, SIGTERM or SIGHUP, for the commands that leave
//! something behind when a signal kills them (a terminal in raw mode, a half-copied staging
//! directory): the command's future is dropped instead, so its `Drop`-based cleanup runs,
//! and the exit code is 128 + the signal's number, as a shell reports a death by it.

use std::future::Future;
use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};

/// The signal that ended a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted(Signal);

impl Interrupted {
    /// Says on stderr that `command` was ended, and gives the exit code (130 for SIGINT,
    /// 143 for SIGTERM, 129 for SIGHUP).
    pub fn exit(self, command: &str) -> ExitCode {
        // After a hangup stderr may be a terminal that is gone: no panic over it.
        let _ = writeln!(std::io::stderr(), "{command}: stopped by {}", self.0);
        ExitCode::from(128 + self.0 as u8)
    }
}

/// Runs `work` until it ends, or until SIGINT, SIGTERM or SIGHUP arrives: then `work` is
/// dropped (cancelled) before this returns. From here on these signals no longer kill the
/// process (their handlers stay installed), so call it only for a command that then exits.
pub async fn until_signalled<T>(
    work: impl Future<Output = T>,
) -> anyhow::Result<Result<T, Interrupted>> {
    let catch = |kind| signal(kind).context("cannot handle signals");
    let mut int = catch(SignalKind::interrupt())?;
    let mut term = catch(SignalKind::terminate())?;
    let mut hup = catch(SignalKind::hangup())?;
    // `select!` drops every branch's future before it yields.
    Ok(tokio::select! {
        done = work => Ok(done),
        _ = int.recv() => Err(Interrupted(Signal::SIGINT)),
        _ = term.recv() => Err(Interrupted(Signal::SIGTERM)),
        _ = hup.recv() => Err(Interrupted(Signal::SIGHUP)),
    })
}
