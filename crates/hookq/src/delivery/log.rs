//! The `log` handler: one JSON line per event on stdout; it always succeeds.

use std::io::Write;

use crate::message::Envelope;

/// The `log` handler's line: the event as JSON on stdout.
pub fn print(env: &Envelope, attempt: u32) {
    let body = match serde_json::from_slice::<serde_json::Value>(&env.body) {
        Ok(v) => v,
        Err(_) => serde_json::Value::String(String::from_utf8_lossy(&env.body).into_owned()),
    };
    let line = serde_json::json!({
        "source": env.source,
        "key": env.key.0,
        "message_id": env.message_id.0,
        "attempt": attempt,
        "received_at": env.received_at,
        "content_type": env.content_type,
        "body": body,
    });
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}
