//! `warren`: parses the command line, sets up logging, runs one subcommand, and maps the
//! outcome to an exit code: 0 ok, 1 an error (from the server or while running), 2 bad usage.

use std::process::ExitCode;

use clap::Parser;

mod commands;
mod object;
mod output;

use commands::{Cli, UsageError};

fn main() -> ExitCode {
    let cli = Cli::parse();
    commands::init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
