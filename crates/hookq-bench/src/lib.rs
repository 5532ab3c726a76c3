//! `hookq bench` and `hookq simulate`, apart from the product: they drive
//! real hookq parts on throwaway prefixes (through `hookq-testkit`) and
//! measure them. Two binaries, `hookq-bench` and `hookq-simulate`; the
//! `hookq` binary runs them for `hookq bench` and `hookq simulate`.

pub mod args;
pub mod bench;
pub mod simulate;
mod stats;

use std::process::ExitCode;

use args::Global;

/// Loads the configuration and starts the async runtime and telemetry the
/// way `hookq` does (exit 2 on a bad configuration, naming the key), then
/// runs `command`.
pub fn main_with<F, Fut>(global: &Global, command: F) -> ExitCode
where
    F: FnOnce(hookq::config::Settings) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ExitCode>>,
{
    hookq::cli::start(
        global.log_format,
        hookq::telemetry::QUIET_FILTER,
        global.config.as_deref(),
        hookq::config::Role::Other,
        command,
    )
}
