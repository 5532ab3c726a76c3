//! Dead letters, read only.
use std::process::ExitCode;
pub async fn list(
    _s: &crate::config::Settings,
    _l: Option<u64>,
    _j: bool,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
pub async fn stats(_s: &crate::config::Settings, _j: bool) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not yet")
}
