//! Bench.
use std::process::ExitCode;
pub async fn run(
    _s: &crate::config::Settings,
    _a: &crate::cli::BenchArgs,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
