//! The command line: global options and subcommands, as the SPEC lists them,
//! and the one-shot commands as people and scripts see them: `dlq` and
//! `shovel` ([`dead_letters`](mod@dead_letters)) and `topology`
//! ([`topology`](mod@topology)). The algorithms are elsewhere
//! ([`crate::dead_letters`], [`crate::broker`]): nothing outside this module
//! imports it.

pub mod dead_letters;
pub mod progress;
pub mod targets;
pub mod topology;

use std::path::PathBuf;

use crate::broker::{self, Broker};
use crate::config::Settings;

/// Connects for a one-shot command; the error says how to start RabbitMQ.
/// Close the broker when done.
pub async fn connect(settings: &Settings, name: &str) -> Result<Broker, broker::Error> {
    settings.amqp.warn_if_classic_on_a_cluster();
    Broker::connect(&settings.amqp.urls, name, settings.topology()).await
}

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "hookq",
    version,
    about = "Webhook ingestion on RabbitMQ: verify, enqueue with confirms, deliver once",
    after_help = "Also: `hookq simulate` (the delivery simulator) and `hookq bench` (throughput \
                  beside the raw broker), from the hookq-bench package's binaries."
)]
pub struct Cli {
    /// Configuration file (default: config/default.toml when present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

pub use crate::telemetry::LogFormat;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Ingress and worker in one process: the quick start.
    Up,
    /// The HTTP ingress alone.
    Ingress,
    /// One consumer worker; run several to scale.
    Worker,
    /// Declare every exchange and queue (idempotent) and print them.
    Topology,
    /// Move dead letters back to the work queue.
    Shovel(ShovelArgs),
    /// Look at dead letters without moving them.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// See each target's state; pause and resume a target (every worker,
    /// every host, across restarts).
    #[command(subcommand)]
    Target(TargetCommand),
    /// `hookq bench`, `hookq simulate`: run the binaries `hookq-bench` and
    /// `hookq-simulate` (the hookq-bench package), found beside this one or
    /// on PATH, with the rest of the command line and the global options.
    #[command(external_subcommand)]
    External(Vec<String>),
}

#[derive(Args, Debug, Clone, Default)]
pub struct ShovelArgs {
    /// Move at most this many.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Only dead letters of this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only dead letters with this hookq-dead-reason (max_attempts, rejected, delivery_limit, invalid).
    #[arg(long)]
    pub reason: Option<String>,
    /// Only dead letters with this idempotency key.
    #[arg(long)]
    pub key: Option<String>,
    /// List what would move, move nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// One row per dead letter.
    List {
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Counts by source and reason.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum TargetCommand {
    /// Each target: state, in flight, limit, held, workers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Hold the target's deliveries on the broker until resumed.
    Pause { name: String },
    /// Let a paused target's deliveries go again (ramping up).
    Resume { name: String },
}

/// Prints a line on stdout; a closed pipe (`hookq dlq list | head`) is not an error.
pub fn print(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// The start of every hookq binary: telemetry (`filter` unless `HOOKQ_LOG` or
/// `RUST_LOG` say otherwise), the configuration for `role` (exit 2 naming the
/// key when it is bad), the async runtime, then `command` (exit 1 with its
/// error, said in full).
pub fn start<F, Fut>(
    log_format: LogFormat,
    filter: &str,
    config: Option<&std::path::Path>,
    role: crate::config::Role,
    command: F,
) -> std::process::ExitCode
where
    F: FnOnce(Settings) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<std::process::ExitCode>>,
{
    use std::process::ExitCode;
    crate::telemetry::init_with_default(log_format, filter);
    let settings = match crate::config::load(config, role) {
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
