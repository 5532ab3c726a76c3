//! Dead letters back to work.
use std::process::ExitCode;
pub async fn run(
    _s: &crate::config::Settings,
    _a: &crate::cli::ShovelArgs,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
