//! Ending a client command cleanly on SIGINT, SIGTERM or SIGHUP, for the commands that leave
//! something behind when a signal kills them (a terminal in raw mode, a half-copied staging
//! directory, a sandbox made for `run --rm`): the command's future is dropped instead, so its
//! `Drop`-based cleanup runs, and the exit code is 128 + the signal's number, as a shell
//! reports a death by it.
//!
//! A signal this process started with ignored stays ignored, as it would for a C tool:
//! `nohup warren exec ...` must outlive the hangup it was started to outlive, and a
//! non-interactive shell starts a `&` job with SIGINT ignored. The disposition cannot be read
//! without `unsafe` (sigaction), so it is read from the kernel's `SigIgn:` mask in
//! /proc/self/status, once, before this module installs any handler.

use std::future::Future;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::OnceLock;

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
        self.code()
    }

    /// 128 + the signal's number.
    pub fn code(self) -> ExitCode {
        ExitCode::from(128 + self.0 as u8)
    }
}

/// Handlers for SIGINT, SIGTERM and SIGHUP, those that were not ignored when the process
/// started. Once made, these signals no longer kill the process (the handlers stay
/// installed), so make one only for a command that then ends by itself.
#[derive(Debug)]
pub struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installs the handlers (none for a signal ignored since the start).
    pub fn catch() -> anyhow::Result<Signals> {
        let catch = |kind: SignalKind, sig: Signal| {
            if ignored_at_start(sig) {
                return Ok(None);
            }
            signal(kind).map(Some).context("cannot handle signals")
        };
        Ok(Signals {
            int: catch(SignalKind::interrupt(), Signal::SIGINT)?,
            term: catch(SignalKind::terminate(), Signal::SIGTERM)?,
            hup: catch(SignalKind::hangup(), Signal::SIGHUP)?,
        })
    }

    /// The next of these signals to arrive (never, when all three are ignored).
    pub async fn recv(&mut self) -> Interrupted {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            if let Some(s) = s
                && s.recv().await.is_some()
            {
                return;
            }
            // Not caught (ignored at the start), or no longer deliverable.
            std::future::pending().await
        }
        tokio::select! {
            () = next(&mut self.int) => Interrupted(Signal::SIGINT),
            () = next(&mut self.term) => Interrupted(Signal::SIGTERM),
            () = next(&mut self.hup) => Interrupted(Signal::SIGHUP),
        }
    }
}

/// Runs `work` until it ends, or until SIGINT, SIGTERM or SIGHUP arrives: then `work` is
/// dropped (cancelled) before this returns. See [`Signals`]: call it only for a command
/// that then exits.
pub async fn until_signalled<T>(
    work: impl Future<Output = T>,
) -> anyhow::Result<Result<T, Interrupted>> {
    let mut signals = Signals::catch()?;
    // `select!` drops every branch's future before it yields.
    Ok(tokio::select! {
        done = work => Ok(done),
        signal = signals.recv() => Err(signal),
    })
}

/// Whether `signal` was ignored when this process started (`nohup`, a background job of a
/// non-interactive shell). Read once: after that this module's handlers are the disposition.
fn ignored_at_start(signal: Signal) -> bool {
    static IGNORED: OnceLock<u64> = OnceLock::new();
    let mask = *IGNORED.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| ignored_mask(&status))
            // Unreadable: handle every signal, as before this check.
            .unwrap_or(0)
    });
    is_in(mask, signal)
}

/// The `SigIgn:` mask of a /proc/PID/status text: bit N-1 for signal N.
fn ignored_mask(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("SigIgn:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn is_in(mask: u64, signal: Signal) -> bool {
    (1..=64).contains(&(signal as i32)) && mask & (1 << (signal as i32 - 1)) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ignored_mask_is_read_as_the_kernel_writes_it() {
        // SIGHUP (1) and SIGPIPE (13) ignored, as under `nohup` in a Rust program.
        let status = "Name:\twarren\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000001001\n\
                      SigCgt:\t0000000000000000\n";
        let mask = ignored_mask(status).unwrap_or_default();
        assert_eq!(mask, 0x1001);
        assert!(is_in(mask, Signal::SIGHUP));
        assert!(is_in(mask, Signal::SIGPIPE));
        assert!(!is_in(mask, Signal::SIGINT));
        assert!(!is_in(mask, Signal::SIGTERM));
        assert_eq!(ignored_mask("Name:\twarren\n"), None);
        // This process's own status has the line.
        let own = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        assert!(ignored_mask(&own).is_some(), "{own}");
    }
}
