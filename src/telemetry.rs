//! Logs on stderr, as text for people or one JSON object per line for machines.
//! Lines about a message carry its message_id and key (from the span the worker
//! opens around each message). lapin's own logs are off by default: the broker
//! module reports every failure that matters, once, with what to do.

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// The filter when neither HOOKQ_LOG nor RUST_LOG is set.
pub const DEFAULT_FILTER: &str = "info,lapin=off,amq_protocol=off";
/// The default for `simulate` and `bench`: they run real parts in-process and
/// report what those parts did themselves; a log line per retry would bury the report.
pub const QUIET_FILTER: &str = "error,lapin=off,amq_protocol=off";

pub fn init(format: LogFormat) {
    init_with_default(format, DEFAULT_FILTER)
}

/// Like [`init`], with `default` as the filter unless HOOKQ_LOG or RUST_LOG says otherwise.
pub fn init_with_default(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_env("HOOKQ_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
