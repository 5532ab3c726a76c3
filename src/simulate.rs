//! Simulator.
use std::process::ExitCode;
pub async fn run(
    _s: &crate::config::Settings,
    _a: &crate::cli::SimulateArgs,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
