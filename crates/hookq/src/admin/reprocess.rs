//! `POST /admin/dlq/reprocess`: `hookq shovel` over HTTP, and
//! `GET /admin/dlq/reprocess`: how the run goes, for the console's progress.
//!
//! The run is [`crate::dead_letters::shovel::shovel`] itself, so it keeps the
//! shovel's rule (each copy published with confirm, then the dead letter
//! acked; `invalid` never moved). It runs in a task of its own, so that a
//! client that goes away does not stop a run half way (which would be safe,
//! but leave the operator guessing); the POST answers when it ends. One run at
//! a time: a second POST meanwhile gets 409.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::api::{MAX_LIMIT, key_filter, limit_of, reason_filter, source_filter};
use super::{Admin, ApiError};
use crate::dead_letters::Row;
use crate::dead_letters::shovel::{self, Event, Filter, Interrupted, Options, Summary};
use crate::message::rfc3339_now;

/// Rows (moved or would move) an answer lists at most; the counts cover all.
pub const MAX_ROWS: usize = 1000;

/// The request body; every field optional (`{}` moves every dead letter).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ask {
    source: Option<String>,
    reason: Option<String>,
    key: Option<String>,
    /// Only these dead letters (the console's selection).
    message_ids: Option<Vec<String>>,
    limit: Option<u64>,
    dry_run: Option<bool>,
}

/// The filters as they are echoed back and logged.
#[derive(Clone, Debug, Serialize)]
struct Asked {
    source: Option<String>,
    reason: Option<String>,
    key: Option<String>,
    /// How many message ids were selected, when a selection was given.
    selected: Option<usize>,
    limit: Option<u64>,
}

fn parse(body: &[u8]) -> Result<(Filter, Options, Asked), ApiError> {
    let ask: Ask = if body.iter().all(u8::is_ascii_whitespace) {
        Ask::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::Invalid(format!("the body is not a reprocess request: {e}")))?
    };
    let message_ids = match ask.message_ids {
        Some(ids) if ids.is_empty() => {
            return Err(ApiError::Invalid(
                "message_ids is empty: select at least one, or leave it out for every dead letter the filters match".into(),
            ));
        }
        Some(ids) if ids.len() as u64 > MAX_LIMIT => {
            return Err(ApiError::Invalid(format!(
                "at most {MAX_LIMIT} message ids at once"
            )));
        }
        Some(ids) => Some(ids.into_iter().collect::<BTreeSet<_>>()),
        None => None,
    };
    let filter = Filter {
        source: ask.source.as_deref().map(source_filter).transpose()?,
        reason: ask.reason.as_deref().map(reason_filter).transpose()?,
        key: ask.key.as_deref().map(key_filter).transpose()?,
        message_ids,
    };
    let limit = ask.limit.map(|n| limit_of(n, u64::MAX)).transpose()?;
    let asked = Asked {
        source: filter.source.clone(),
        reason: filter.reason.map(|r| r.as_str().to_string()),
        key: filter.key.clone(),
        selected: filter.message_ids.as_ref().map(BTreeSet::len),
        limit,
    };
    let opts = Options {
        limit,
        dry_run: ask.dry_run.unwrap_or(false),
        ..Options::default()
    };
    Ok((filter, opts, asked))
}

/// A run under way, as `GET /admin/dlq/reprocess` shows it.
#[derive(Clone, Debug, Serialize)]
struct Progress {
    dry_run: bool,
    started_at: String,
    /// Dead letters looked at so far, of `total`.
    looked_at: u64,
    total: u64,
    moved: u64,
    would_move: u64,
    filter: Asked,
}

/// What a run did: the POST's answer, and `last` in the status.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    dry_run: bool,
    filter: Asked,
    started_at: String,
    finished_at: String,
    total: u64,
    looked_at: u64,
    moved: serde_json::Value,
    would_move: serde_json::Value,
    kept: u64,
    skipped: u64,
    /// Moved (or, dry, would move), oldest first; at most [`MAX_ROWS`].
    rows: Vec<Row>,
    rows_truncated: bool,
    /// False when the broker failed part way: what is counted moved, moved;
    /// the rest is still in `P.dead`. Running it again finishes.
    complete: bool,
    error: Option<String>,
}

/// The one reprocess run and the last one's outcome.
#[derive(Debug, Default)]
pub struct Job {
    running: Option<Progress>,
    last: Option<Outcome>,
    runs: u64,
}

fn lock(job: &Mutex<Job>) -> std::sync::MutexGuard<'_, Job> {
    job.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Admin {
    pub(super) fn job_running(&self) -> bool {
        lock(&self.job).running.is_some()
    }
}

/// Ends the run in the status however the task ends (a panic too).
struct Finish(Arc<Mutex<Job>>, Option<Outcome>);

impl Drop for Finish {
    fn drop(&mut self) {
        let mut job = lock(&self.0);
        job.running = None;
        if let Some(o) = self.1.take() {
            job.last = Some(o);
        }
    }
}

fn outcome(
    summary: &Summary,
    dry_run: bool,
    filter: Asked,
    started_at: String,
    rows: Vec<Row>,
    rows_truncated: bool,
    error: Option<String>,
) -> Outcome {
    Outcome {
        dry_run,
        filter,
        started_at,
        finished_at: rfc3339_now(),
        total: summary.total,
        looked_at: summary.looked_at,
        moved: summary.moved.to_json(),
        would_move: summary.would_move.to_json(),
        kept: summary.kept,
        skipped: summary.skipped,
        rows,
        rows_truncated,
        complete: error.is_none(),
        error,
    }
}

async fn run(admin: Arc<Admin>, filter: Filter, opts: Options, asked: Asked) -> Outcome {
    let mut finish = Finish(admin.job.clone(), None);
    let _turn = admin.reading.clone().lock_owned().await;
    let started_at = lock(&admin.job)
        .running
        .as_ref()
        .map(|p| p.started_at.clone())
        .unwrap_or_else(rfc3339_now);
    let (mut rows, mut truncated) = (Vec::new(), false);
    let job = admin.job.clone();
    let mut on_event = |e: Event<'_>| {
        let mut j = lock(&job);
        let Some(p) = j.running.as_mut() else { return };
        let row = match e {
            Event::Looked { seen, total } => {
                (p.looked_at, p.total) = (seen, total);
                return;
            }
            Event::Moved(row) => {
                p.moved += 1;
                row
            }
            Event::WouldMove(row) => {
                p.would_move += 1;
                row
            }
        };
        if rows.len() < MAX_ROWS {
            rows.push(row.clone());
        } else {
            truncated = true;
        }
    };
    let result = shovel::shovel(&admin.broker, &filter, &opts, &mut on_event).await;
    let (summary, error) = match result {
        Ok(s) => (s, None),
        Err(Interrupted { summary, error }) => (summary, Some(error.to_string())),
    };
    let o = outcome(
        &summary,
        opts.dry_run,
        asked,
        started_at,
        rows,
        truncated,
        error.clone(),
    );
    match &error {
        None => tracing::info!(
            who = %admin.label, action = "dlq.reprocess", dry_run = opts.dry_run,
            moved = summary.moved.total(), would_move = summary.would_move.total(),
            kept = summary.kept, skipped = summary.skipped, looked_at = summary.looked_at,
            "admin reprocess run finished"
        ),
        Some(e) => tracing::warn!(
            who = %admin.label, action = "dlq.reprocess", dry_run = opts.dry_run,
            moved = summary.moved.total(), error = %e,
            "admin reprocess run stopped part way; nothing lost, running it again finishes"
        ),
    }
    finish.1 = Some(o.clone());
    o
}

/// `POST /admin/dlq/reprocess`.
pub async fn start(State(admin): State<Arc<Admin>>, body: Bytes) -> Response {
    let (filter, opts, asked) = match parse(&body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    {
        let mut job = lock(&admin.job);
        if job.running.is_some() {
            tracing::info!(who = %admin.label, action = "dlq.reprocess", "admin reprocess refused: one is under way");
            return ApiError::Busy.into_response();
        }
        job.runs += 1;
        job.running = Some(Progress {
            dry_run: opts.dry_run,
            started_at: rfc3339_now(),
            looked_at: 0,
            total: 0,
            moved: 0,
            would_move: 0,
            filter: asked.clone(),
        });
    }
    tracing::info!(
        who = %admin.label, action = "dlq.reprocess", dry_run = opts.dry_run,
        source = ?asked.source, reason = ?asked.reason, key = ?asked.key,
        selected = ?asked.selected, limit = ?asked.limit,
        "admin started a reprocess run"
    );
    let task = tokio::spawn(run(admin.clone(), filter, opts, asked));
    match task.await {
        Ok(o) if o.complete => Json(o).into_response(),
        Ok(o) => {
            let e = ApiError::Broker(crate::broker::Error::Unavailable);
            let mut body = e.body();
            body["message"] = format!(
                "the run stopped part way ({}); what is counted moved has moved, the rest is still \
                 in the dead-letter queue: run it again to finish",
                o.error.as_deref().unwrap_or("broker failure")
            )
            .into();
            body["outcome"] = serde_json::to_value(&o).unwrap_or_default();
            (e.status(), Json(body)).into_response()
        }
        Err(e) => ApiError::Internal(format!("the run stopped unexpectedly: {e}")).into_response(),
    }
}

#[derive(Serialize)]
struct Status<'a> {
    /// `running` or `idle`.
    state: &'static str,
    /// Runs started since hookq started.
    runs: u64,
    running: Option<&'a Progress>,
    last: Option<&'a Outcome>,
}

/// `GET /admin/dlq/reprocess`: reads no broker, only the run's bookkeeping.
pub async fn status(State(admin): State<Arc<Admin>>) -> Response {
    let job = lock(&admin.job);
    let s = Status {
        state: if job.running.is_some() {
            "running"
        } else {
            "idle"
        },
        runs: job.runs,
        running: job.running.as_ref(),
        last: job.last.as_ref(),
    };
    Json(s).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_checked_before_anything_runs() {
        let (f, o, a) = parse(b"").unwrap();
        assert_eq!(f, Filter::default());
        assert!(!o.dry_run);
        assert_eq!(a.selected, None);
        let (f, o, _) =
            parse(br#"{"source":"shop","reason":"rejected","dry_run":true,"limit":3,"message_ids":["a","b"]}"#)
                .unwrap();
        assert_eq!(f.source.as_deref(), Some("shop"));
        assert!(o.dry_run);
        assert_eq!(o.limit, Some(3));
        assert_eq!(f.message_ids.map(|m| m.len()), Some(2));
        for bad in [
            &br#"{"reason":"timeout"}"#[..],
            br#"{"limit":0}"#,
            br#"{"source":"A B"}"#,
            br#"{"message_ids":[]}"#,
            br#"{"dry":true}"#,
            br#"[1]"#,
            b"not json",
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(
                e.code(),
                "invalid_request",
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
