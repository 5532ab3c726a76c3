//! `hookq`: parse the command line, load the configuration, start telemetry and
//! run the command. Exit 0 on success, 2 on bad usage or configuration (naming
//! the key), 1 on a runtime failure (saying what to do).

use std::process::ExitCode;

use clap::Parser;

use hookq::cli::{Cli, Command, DlqCommand};
use hookq::system::{Parts, System};
use hookq::tools::commands;
use hookq::{config, ingress, shutdown, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Simulate(_) | Command::Bench(_));
    let filter = if quiet {
        telemetry::QUIET_FILTER
    } else {
        telemetry::DEFAULT_FILTER
    };
    telemetry::init_with_default(cli.log_format, filter);
    let settings = match config::load(cli.config.as_deref())
        .and_then(|s| ingress::check_sources(&s.sources).map(|_| s))
    {
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
    match runtime.block_on(run(cli.command, settings)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hookq: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command, settings: config::Settings) -> anyhow::Result<ExitCode> {
    let parts = match command {
        Command::Up => Parts::Up,
        Command::Ingress => Parts::Ingress,
        Command::Worker => Parts::Worker,
        Command::Topology => return hookq::tools::topology::run(&settings).await,
        Command::Shovel(args) => return commands::shovel(&settings, &args).await,
        Command::Dlq(DlqCommand::List { limit, json }) => {
            return commands::dlq_list(&settings, limit, json).await;
        }
        Command::Dlq(DlqCommand::Stats { json }) => {
            return commands::dlq_stats(&settings, json).await;
        }
        Command::Simulate(args) => return hookq::simulate::run(&settings, &args).await,
        Command::Bench(args) => return hookq::bench::run(&settings, &args).await,
    };
    if parts != Parts::Ingress
        && let Err(e) = settings.validate_worker()
    {
        eprintln!("hookq: {e}");
        return Ok(ExitCode::from(2));
    }
    let system = System::start(&settings, parts, shutdown::on_signal()).await?;
    system.wait().await?;
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}
