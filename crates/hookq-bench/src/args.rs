//! The command lines of `hookq bench` and `hookq simulate` (the binaries
//! `hookq-bench` and `hookq-simulate`, which `hookq` runs for those two
//! commands, passing the global options on).

use std::path::PathBuf;

use clap::{Args, Parser};
use hookq::cli::LogFormat;

/// The global options every hookq command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Configuration file (default: config/default.toml when present, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `hookq bench`: throughput of ingress, worker and end to end, beside the
/// raw broker's and hand-written code's, in one run.
#[derive(Parser, Debug)]
#[command(name = "hookq bench", version)]
pub struct BenchCli {
    #[command(flatten)]
    pub global: Global,
    #[command(flatten)]
    pub args: BenchArgs,
}

/// `hookq simulate`: the delivery simulator, the real pipeline against a
/// flaky endpoint.
#[derive(Parser, Debug)]
#[command(name = "hookq simulate", version)]
pub struct SimulateCli {
    #[command(flatten)]
    pub global: Global,
    #[command(flatten)]
    pub args: SimulateArgs,
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
    /// Instead: an outage of this many seconds (the target answers 503 while
    /// webhooks arrive), run with the target's breaker and without it, to
    /// compare how many end dead.
    #[arg(long, value_name = "SECONDS")]
    pub outage_s: Option<u64>,
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
    /// Keys the lone worker delivers (and so remembers in its LRU) for the
    /// memory figure.
    #[arg(long, default_value_t = 100_000)]
    pub lru_keys: u32,
    /// Also drain `--messages` with 3 worker processes (a store each) on this
    /// many partitions, against 1 worker on 1 partition (0: skip).
    #[arg(long, default_value_t = 0)]
    pub partitions: u32,
    /// Deliver to a named target with this `rate_per_s` (across workers)
    /// instead of a bare URL: what a limited target costs, against a run
    /// without. A rate above what the worker reaches measures the pacing's
    /// cost without slowing the run.
    #[arg(long)]
    pub target_rate: Option<f64>,
    /// Deliver to a named target with this `max_concurrency`.
    #[arg(long)]
    pub target_max_concurrency: Option<usize>,
    /// Instead of the broker phases: the dedup store alone, grown to each
    /// size of `--store-keys` remembered keys (bytes a key, claim-and-done
    /// rate, prune step time at each). Needs no broker.
    #[arg(long)]
    pub store: bool,
    /// The sizes `--store` measures at, ascending.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000_000, 10_000_000])]
    pub store_keys: Vec<u64>,
    #[arg(long)]
    pub json: bool,
}
