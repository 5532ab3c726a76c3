//! The simulator's built-in target, a flaky application: 500 with
//! probability `failure_rate`, else a stall past the worker's timeout with
//! probability `timeout_rate`, else 200; each attempt draws afresh. It is
//! the testkit's fake target with this script; what it saw of each key is
//! read off its log.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use hookq_testkit::{FakeTarget, Received, Reply};

/// What the flaky target saw of one key.
#[derive(Default, Clone)]
pub(super) struct KeyRecord {
    /// Requests received.
    pub(super) attempts: u32,
    /// `Hookq-Attempt` of the first 2xx answer.
    pub(super) delivered_on: Option<u32>,
    /// 2xx answers (more than one would break the "once" guarantee).
    pub(super) successes: u32,
    /// When the latest attempt ended, as the worker saw it: the key's final
    /// outcome time once it is settled.
    pub(super) outcome_at: Option<Instant>,
}

/// Starts the flaky target; a stalled answer comes `worker_timeout +
/// stall_extra` late (a slow application: the worker gives up first).
pub(super) async fn start(failure_rate: f64, timeout_rate: f64, stall: Duration) -> FakeTarget {
    FakeTarget::start(move |_, _| {
        if rand::random::<f64>() < failure_rate {
            StatusCode::INTERNAL_SERVER_ERROR.into()
        } else if rand::random::<f64>() < timeout_rate {
            Reply::after(stall, StatusCode::GATEWAY_TIMEOUT)
        } else {
            Reply::from(StatusCode::OK)
        }
    })
    .await
}

/// Each key's record, from the target's log. A stalled attempt ended for the
/// worker at its timeout, not when the target answered.
pub(super) fn records(log: &[Received], worker_timeout: Duration) -> HashMap<String, KeyRecord> {
    let mut keys: HashMap<String, KeyRecord> = HashMap::new();
    for r in log {
        let rec = keys.entry(r.key()).or_default();
        rec.attempts += 1;
        let ended = if r.delay > worker_timeout {
            r.at + worker_timeout
        } else {
            r.at + r.delay
        };
        if r.is_success() {
            rec.successes += 1;
            let attempt = r
                .header("hookq-attempt")
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0);
            rec.delivered_on.get_or_insert(attempt);
        }
        rec.outcome_at = Some(rec.outcome_at.map_or(ended, |t| t.max(ended)));
    }
    keys
}
