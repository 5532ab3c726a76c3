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
    hookq::telemetry::init_with_default(global.log_format, hookq::telemetry::QUIET_FILTER);
    let settings = match hookq::config::load(global.config.as_deref(), hookq::config::Role::Other) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hookq: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hookq: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(command(settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hookq: {e:#}");
            ExitCode::from(1)
        }
    }
}
