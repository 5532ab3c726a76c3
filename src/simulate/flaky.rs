//! The simulator's built-in target: 500 with probability `failure_rate`, else
//! a stall past the worker's timeout with probability `timeout_rate`, else 200;
//! each attempt draws afresh. It keeps a tally per key of what it saw.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

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

pub(super) struct Flaky {
    pub(super) failure_rate: f64,
    pub(super) timeout_rate: f64,
    /// The worker's timeout: when a stalled attempt ends for the worker.
    pub(super) worker_timeout: Duration,
    pub(super) keys: Mutex<HashMap<String, KeyRecord>>,
}

enum Answer {
    Ok,
    Fail,
    Stall,
}

/// 500 with probability `failure_rate`; else a stall past the worker's timeout
/// with probability `timeout_rate`; else 200. Each attempt draws afresh.
pub(super) async fn flaky(State(t): State<Arc<Flaky>>, headers: HeaderMap) -> StatusCode {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let Some(key) = header("idempotency-key").map(str::to_string) else {
        return StatusCode::BAD_REQUEST;
    };
    let attempt = header("hookq-attempt")
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    let answer = if rand::random::<f64>() < t.failure_rate {
        Answer::Fail
    } else if rand::random::<f64>() < t.timeout_rate {
        Answer::Stall
    } else {
        Answer::Ok
    };
    let now = Instant::now();
    {
        let mut keys = t.keys.lock().unwrap_or_else(|p| p.into_inner());
        let r = keys.entry(key).or_default();
        r.attempts += 1;
        match answer {
            Answer::Ok => {
                r.successes += 1;
                r.delivered_on.get_or_insert(attempt);
                r.outcome_at = Some(now);
            }
            Answer::Fail => r.outcome_at = Some(now),
            Answer::Stall => r.outcome_at = Some(now + t.worker_timeout),
        }
    }
    match answer {
        Answer::Ok => StatusCode::OK,
        Answer::Fail => StatusCode::INTERNAL_SERVER_ERROR,
        Answer::Stall => {
            // A slow application, not a wait for an event: the worker gives up first.
            tokio::time::sleep(t.worker_timeout + super::STALL_EXTRA).await;
            StatusCode::GATEWAY_TIMEOUT
        }
    }
}
