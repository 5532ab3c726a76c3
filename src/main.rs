//! `hookq`: parse the command line, load the configuration, start telemetry and
//! run the command. Exit 0 on success, 2 on bad usage or configuration (naming
//! the key), 1 on a runtime failure (saying what to do).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use hookq::broker::{Broker, Topology};
use hookq::cli::{Cli, Command, DlqCommand};
use hookq::serve::{self, Parts};
use hookq::{config, shutdown, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Simulate(_) | Command::Bench(_));
    let filter = if quiet {
        telemetry::QUIET_FILTER
    } else {
        telemetry::DEFAULT_FILTER
    };
    telemetry::init_with_default(cli.log_format, filter);
    let settings = match config::load(cli.config.as_deref()) {
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
        Command::Topology => return topology(&settings).await,
        Command::Shovel(args) => return hookq::shovel::run(&settings, &args).await,
        Command::Dlq(DlqCommand::List { limit, json }) => {
            return hookq::dlq::list(&settings, limit, json).await;
        }
        Command::Dlq(DlqCommand::Stats { json }) => {
            return hookq::dlq::stats(&settings, json).await;
        }
        Command::Simulate(args) => return hookq::simulate::run(&settings, &args).await,
        Command::Bench(args) => return hookq::bench::run(&settings, &args).await,
    };
    if let Err(e) = settings.validate_worker().or_else(|e| {
        if parts == Parts::Ingress {
            Ok(())
        } else {
            Err(e)
        }
    }) {
        eprintln!("hookq: {e}");
        return Ok(ExitCode::from(2));
    }
    let stop = shutdown::on_signal();
    let running = serve::start(&settings, parts, stop).await?;
    running.task.await.context("hookq stopped unexpectedly")??;
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

async fn topology(settings: &config::Settings) -> anyhow::Result<ExitCode> {
    let topo = Topology::new(&settings.amqp, &settings.retry);
    let stop = CancellationToken::new();
    let broker = Broker::connect(&settings.amqp.url, "hookq-topology", topo, stop.clone()).await?;
    let declared = broker.declare_topology().await?;
    for d in declared {
        if d.arguments.is_empty() {
            hookq::cli::print(format_args!("{:<28} {}", d.name, d.kind));
        } else {
            hookq::cli::print(format_args!(
                "{:<28} {:<18} {}",
                d.name, d.kind, d.arguments
            ));
        }
    }
    stop.cancel();
    Ok(ExitCode::SUCCESS)
}
