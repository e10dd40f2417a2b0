//! `warren sandboxer`: containerd's sandbox API endpoint (the `warren-sandboxer` crate; the
//! same as the `resource-slot-sandboxer` binary). `--log-level` is warren's global flag.

use std::process::ExitCode;

pub use warren_sandboxer::Args;

use super::usage;

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    super::raise_open_files();
    let config = args.config().map_err(|e| usage(e.to_string()))?;
    warren_sandboxer::run(config, warren_sandboxer::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
