//! Logs on stderr, as text for people or one JSON object per line for machines.
//! Lines about a message carry its message_id and key (from the span the worker
//! opens around each message). lapin's own logs are off by default: the broker
//! module reports every failure that matters, once, with what to do.
//!
//! Keys, source names, header names, ids and the error texts that quote them
//! come from requests: no such text may start a log line of its own. The JSON
//! format escapes control characters as JSON does; the text format escapes
//! them here, in every field and message ([`escaped_fields`]), so a key of
//! `evt\n2026-12-06T13:47:00Z INFO ...` stays one line, shown as `evt\n2026…`.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::Field;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{self, Writer};

/// How log lines are written on stderr (`--log-format`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line, for machines.
    Json,
}

/// The filter when neither HOOKQ_LOG nor RUST_LOG is set.
pub const DEFAULT_FILTER: &str = "info,lapin=off,amq_protocol=off";
/// The default for `simulate` and `bench`: they run real parts in-process and
/// report what those parts did themselves; a log line per retry would bury the report.
pub const QUIET_FILTER: &str = "error,lapin=off,amq_protocol=off";

/// Sets the global subscriber, with `default` as the filter unless HOOKQ_LOG
/// or RUST_LOG says otherwise.
pub fn init_with_default(format: LogFormat, default: &str) {
    let filter = EnvFilter::try_from_env("HOOKQ_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    // Colours only for a person at a terminal, not in a file or a collector.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.fmt_fields(escaped_fields()).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// The text format's fields, as tracing-subscriber's default writes them
/// (`message` bare, the others `name=value`, space-delimited), with every
/// control character of the value escaped.
pub fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> {
    format::debug_fn(
        |w: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug| {
            if field.name() != "message" {
                write!(w, "{}=", field.name())?;
            }
            write!(Escaping(w), "{value:?}")
        },
    )
    .delimited(" ")
}

/// Writes through to `W`, escaping what could end a line or drive a
/// terminal: C0 and C1 controls, DEL and the Unicode line and paragraph
/// separators (`\n`, `\r`, `\t` as such, the rest as `\u{..}`).
struct Escaping<W>(W);

impl<W: fmt::Write> fmt::Write for Escaping<W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(i) = rest.find(needs_escape) {
            self.0.write_str(&rest[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[i + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escape(text: &str) -> String {
        let mut out = String::new();
        Escaping(&mut out).write_str(text).unwrap();
        out
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("plain é"), "plain é");
        assert_eq!(
            escape("evt\n2026 INFO x\r\t\u{1}\u{7f}\u{85}\u{1b}[31m\u{2028}"),
            "evt\\n2026 INFO x\\r\\t\\u{1}\\u{7f}\\u{85}\\u{1b}[31m\\u{2028}"
        );
    }

    #[test]
    fn text_log_lines_stay_whole() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(escaped_fields())
            .finish();
        let forged = "evt\n2026-12-06T13:47:00Z  INFO hookq::admin: forged";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("message", key = %forged);
            let _in = span.enter();
            tracing::warn!(source = forged, error = %forged, "refused: {forged}");
        });
        let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains(r"key=evt\n2026-12-06T13:47:00Z"), "{out}");
        assert!(out.contains(r"refused: evt\n2026"), "{out}");
        assert!(out.contains(r#"source="evt\n2026"#), "{out}");
    }
}
