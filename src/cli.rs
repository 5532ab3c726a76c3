//! The command line: global options and subcommands, as the SPEC lists them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "hookq",
    version,
    about = "Webhook ingestion on RabbitMQ: verify, enqueue with confirms, deliver once"
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

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

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
    /// The delivery simulator: the real pipeline against a flaky endpoint.
    Simulate(SimulateArgs),
    /// Throughput of ingress, worker and end to end, beside the raw broker's.
    Bench(BenchArgs),
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

#[derive(Args, Debug, Clone)]
pub struct SimulateArgs {
    #[arg(long, default_value_t = 100)]
    pub deliveries: u32,
    /// Probability that the target answers 500.
    #[arg(long, default_value_t = 0.5)]
    pub failure_rate: f64,
    /// Probability that the target does not answer in time.
    #[arg(long, default_value_t = 0.0)]
    pub timeout_rate: f64,
    #[arg(long, default_value_t = 5)]
    pub max_attempts: u32,
    /// Machine-readable result.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Messages for the broker, ingress and worker phases.
    #[arg(long, default_value_t = 20_000)]
    pub messages: u32,
    /// Concurrent HTTP connections for the ingress phase.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub body_bytes: usize,
    /// Keys to fill the LRU with for the memory figure.
    #[arg(long, default_value_t = 100_000)]
    pub lru_keys: u32,
    /// Also drain `--messages` with 3 worker processes (a store each) on this
    /// many partitions, against 1 worker on 1 partition (0: skip).
    #[arg(long, default_value_t = 0)]
    pub partitions: u32,
    #[arg(long)]
    pub json: bool,
    /// Internal: run as the lone worker process whose memory the benchmark
    /// measures (the benchmark starts it with its settings in the environment).
    #[arg(long, hide = true)]
    pub worker_rss_probe: bool,
}

/// Prints a line on stdout; a closed pipe (`hookq dlq list | head`) is not an error.
pub fn print(line: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}
