//! `warren`: parses the command line, sets up logging, runs one subcommand, and maps the
//! outcome to an exit code: 0 ok, 1 an error (from the server or while running), 2 bad usage.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;

mod commands;
mod object;
mod output;
mod strict;

use commands::{Cli, UsageError};

fn main() -> ExitCode {
    // The linux backend's per-sandbox supervisor and exec helper, when the separate
    // `warren-supervise` binary is not installed: single-threaded, so before any runtime.
    let mut raw = std::env::args_os().skip(1);
    if raw.next().as_deref() == Some(std::ffi::OsStr::new("__supervise")) {
        let rest: Vec<_> = raw.collect();
        return ExitCode::from(warren_linux::supervisor::cli(&rest) as u8);
    }
    let cli = Cli::parse();
    // Only short-lived client commands die quietly of a closed pipe. The server writes to
    // sockets whose peers may be gone (SIGPIPE would kill it), and `bench` owns a child server
    // and temp files it must clean up: both keep SIGPIPE ignored and handle EPIPE instead.
    // `run --wait --rm` too: it removes its sandbox at the end, which a death by SIGPIPE
    // (`| head -1`) would skip; its output just stops.
    let keeps_going = match &cli.command {
        commands::Command::Server(_)
        | commands::Command::Sandboxer(_)
        | commands::Command::Agent(_)
        | commands::Command::Bench(_) => true,
        commands::Command::Run(args) => args.cleans_up_after_output(),
        _ => false,
    };
    if !keeps_going {
        restore_sigpipe();
    }
    commands::init_logging(&cli);
    // The server runs sandboxes' work on its workers: one per core. A client does one thing
    // at a time and its latency is the API's: one thread, so that no request or reply waits
    // for another thread to wake up (a slot create through the API took 2.6x as long from a
    // multi-threaded client on the project's 2-core machine; docs/PERFORMANCE.md).
    let mut builder = if matches!(
        cli.command,
        commands::Command::Server(_)
            | commands::Command::Sandboxer(_)
            | commands::Command::Agent(_)
    ) {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            // No panic over a closed stderr (commands that ignore SIGPIPE).
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot start the async runtime: {e}"
            );
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                output::printable_message(&chain_text(&e))
            );
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// An error and its causes, `: `-separated, each once: a cause its wrapper's message already
/// ends with (a transport error quoting the OS error it wraps) is not repeated.
fn chain_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if part.is_empty() || text.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// Rust ignores SIGPIPE, so `warren ls | head` would make every later print fail, and
/// `println!` panics then. A command-line tool should end quietly instead, as C tools do.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: called at the start of main, before any other thread exists; setting a signal's
    // disposition to its default has no memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
