//! `resource-slot-sandboxer`: the ResourceSlot seed's sandboxer under its own name, with its
//! flags (`--listen SOCKET --dir DIR --log-level LEVEL`): `warren sandboxer` on the `slot`
//! backend. Exit codes: 0 after a clean shutdown, 1 on an error, 2 on bad flags.

use std::process::ExitCode;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "resource-slot-sandboxer",
    version,
    about = "containerd sandbox API endpoint accounting pods' resources (warren's slot backend)."
)]
struct Cli {
    #[command(flatten)]
    args: warren_sandboxer::Args,
    /// Log level: error, warn, info, debug, trace (or a tracing filter).
    #[arg(long, env = "WARREN_LOG", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match tracing_subscriber::EnvFilter::try_new(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: --log-level {:?}: {e}", cli.log_level);
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact()
        .init();
    let config = match cli.args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
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
    match runtime.block_on(warren_sandboxer::run(
        config,
        warren_sandboxer::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", warren_runtime::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
