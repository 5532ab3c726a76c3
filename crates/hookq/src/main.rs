//! `hookq`: parse the command line, load the configuration, start telemetry and
//! run the command. Exit 0 on success, 2 on bad usage or configuration (naming
//! the key), 1 on a runtime failure (saying what to do).

use std::process::ExitCode;

use clap::Parser;

use hookq::cli::dead_letters as commands;
use hookq::cli::{Cli, Command, DlqCommand, TargetCommand};
use hookq::system::{Parts, System};
use hookq::{config, shutdown, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::External(args) = &cli.command {
        return external(&cli, args);
    }
    let role = match cli.command {
        Command::Up | Command::Worker => config::Role::Delivers,
        _ => config::Role::Other,
    };
    hookq::cli::start(
        cli.log_format,
        telemetry::DEFAULT_FILTER,
        cli.config.as_deref(),
        role,
        |settings| run(cli.command, settings),
    )
}

async fn run(command: Command, settings: config::Settings) -> anyhow::Result<ExitCode> {
    let parts = match command {
        Command::Up => Parts::Up,
        Command::Ingress => Parts::Ingress,
        Command::Worker => Parts::Worker,
        Command::Topology => return hookq::cli::topology::run(&settings).await,
        Command::Shovel(args) => return commands::shovel(&settings, &args).await,
        Command::Dlq(DlqCommand::List { limit, json }) => {
            return commands::dlq_list(&settings, limit, json).await;
        }
        Command::Dlq(DlqCommand::Stats { json }) => {
            return commands::dlq_stats(&settings, json).await;
        }
        Command::Target(TargetCommand::List { json }) => {
            return hookq::cli::targets::list(&settings, json).await;
        }
        Command::Target(TargetCommand::Pause { name }) => {
            return hookq::cli::targets::pause_or_resume(&settings, &name, true).await;
        }
        Command::Target(TargetCommand::Resume { name }) => {
            return hookq::cli::targets::pause_or_resume(&settings, &name, false).await;
        }
        Command::External(_) => return Ok(ExitCode::from(2)),
    };
    let system = System::start(&settings, parts, shutdown::on_signal()).await?;
    system.wait().await?;
    tracing::info!("stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

/// `hookq bench` and `hookq simulate` are the binaries `hookq-bench` and
/// `hookq-simulate` (the hookq-bench package, kept out of the product): run
/// the one beside this binary, else the one on PATH, with the global options
/// and the rest of the command line, in this process's place.
fn external(cli: &Cli, args: &[String]) -> ExitCode {
    let Some((name, rest)) = args.split_first() else {
        return ExitCode::from(2);
    };
    if !matches!(name.as_str(), "bench" | "simulate") {
        eprintln!("hookq: unknown command {name:?} (hookq --help lists them)");
        return ExitCode::from(2);
    }
    let binary = format!("hookq-{name}");
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join(&binary)))
        .filter(|p| p.is_file());
    let program = beside.map_or_else(|| binary.clone().into(), |p| p.into_os_string());
    let mut command = std::process::Command::new(&program);
    if let Some(config) = &cli.config {
        command.arg("--config").arg(config);
    }
    if cli.log_format == hookq::cli::LogFormat::Json {
        command.args(["--log-format", "json"]);
    }
    command.args(rest);
    use std::os::unix::process::CommandExt;
    let err = command.exec();
    eprintln!(
        "hookq: `hookq {name}` runs {binary}, which could not be started ({err}); build it with \
         `cargo build --release --locked -p hookq-bench` (it goes beside hookq) or put it on PATH"
    );
    ExitCode::from(1)
}
