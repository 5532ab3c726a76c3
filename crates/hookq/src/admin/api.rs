//! The reading routes: `GET /admin/dlq/stats`, `/admin/dlq/pending` and
//! `/admin/dlq/{id}`. Each reads the whole of `P.dead` once with the shared
//! reader, which holds what it reads and hands it all back in order: reading
//! removes and reorders nothing.
//!
//! A read runs in a task of its own: a client that goes away mid-read does not
//! cancel it half way, so the reader always gets to hand its messages back.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::view::{Detail, Item};
use super::{Admin, ApiError};
use crate::config::valid_source_name;
use crate::dead_letters::shovel::Filter;
use crate::dead_letters::{self, Counts};
use crate::message::DeadReason;

pub const STATS: &str = "/admin/dlq/stats";
pub const PENDING: &str = "/admin/dlq/pending";
pub const REPROCESS: &str = "/admin/dlq/reprocess";
pub const DETAIL: &str = "/admin/dlq/{id}";

/// Items a listing returns when no limit is given, and at most.
pub const DEFAULT_LIMIT: u64 = 100;
pub const MAX_LIMIT: u64 = 10_000;
/// A key filter longer than this cannot match (keys are `source:id`).
const MAX_KEY_BYTES: usize = 4096;

/// Runs `read` on the broker once no reprocess runs and no other read does,
/// in a task of its own.
pub(super) async fn exclusive<T, F, Fut>(admin: &Arc<Admin>, read: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(Arc<Admin>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, ApiError>> + Send + 'static,
{
    if admin.job_running() {
        return Err(ApiError::Busy);
    }
    let admin = admin.clone();
    let task = tokio::spawn(async move {
        let _turn = admin.reading.clone().lock_owned().await;
        read(admin.clone()).await
    });
    task.await
        .map_err(|e| ApiError::Internal(format!("the read stopped unexpectedly: {e}")))?
}

/// A dead-at time for ordering; `None` when it does not parse.
fn when(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(s).ok()
}

#[derive(Default)]
struct Span {
    oldest: Option<(SystemTime, String)>,
    newest: Option<(SystemTime, String)>,
}

impl Span {
    fn add(&mut self, at: &str) {
        let Some(t) = when(at) else { return };
        if self.oldest.as_ref().is_none_or(|(o, _)| t < *o) {
            self.oldest = Some((t, at.to_string()));
        }
        if self.newest.as_ref().is_none_or(|(n, _)| t > *n) {
            self.newest = Some((t, at.to_string()));
        }
    }
}

/// `GET /admin/dlq/stats`.
pub async fn stats(State(admin): State<Arc<Admin>>) -> Response {
    let result = exclusive(&admin, |admin| async move {
        let mut counts = Counts::default();
        let mut span = Span::default();
        dead_letters::read(&admin.broker, None, |dl| {
            counts.add(&dl.envelope.source, dl.reason());
            if let Some(d) = &dl.envelope.dead {
                span.add(&d.dead_at);
            }
        })
        .await?;
        Ok((counts, span))
    })
    .await;
    match result {
        Ok((counts, span)) => {
            tracing::info!(who = %admin.label, action = "dlq.stats", total = counts.total(), "admin read the dead-letter counts");
            let mut v = counts.to_json();
            v["queue"] = admin.broker.topology().dead().into();
            v["oldest_dead_at"] = span.oldest.map(|(_, s)| s).into();
            v["newest_dead_at"] = span.newest.map(|(_, s)| s).into();
            Json(v).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// The filters of a listing, checked.
#[derive(Debug, Default)]
pub(super) struct Listing {
    pub filter: Filter,
    pub limit: u64,
}

/// A source filter as the shovel takes it.
pub(super) fn source_filter(s: &str) -> Result<String, ApiError> {
    if valid_source_name(s) {
        Ok(s.to_string())
    } else {
        Err(ApiError::Invalid(format!(
            "source {s:?} is not a source name (1 to 64 of a-z, 0-9, _ and -)"
        )))
    }
}

pub(super) fn reason_filter(r: &str) -> Result<DeadReason, ApiError> {
    DeadReason::parse(r).ok_or_else(|| {
        ApiError::Invalid(format!(
            "reason {r:?} is not a dead reason; use one of max_attempts, rejected, delivery_limit, invalid"
        ))
    })
}

pub(super) fn key_filter(k: &str) -> Result<String, ApiError> {
    if k.len() > MAX_KEY_BYTES {
        return Err(ApiError::Invalid(format!(
            "key is longer than {MAX_KEY_BYTES} bytes"
        )));
    }
    Ok(k.to_string())
}

pub(super) fn limit_of(n: u64, max: u64) -> Result<u64, ApiError> {
    if (1..=max).contains(&n) {
        Ok(n)
    } else {
        Err(ApiError::Invalid(format!(
            "limit must be between 1 and {max}"
        )))
    }
}

/// `?source=&reason=&key=&limit=`; an empty value is no filter (as an HTML
/// form sends it), an unknown parameter is an error (a typo is not "all").
fn listing(query: Option<&str>) -> Result<Listing, ApiError> {
    let mut l = Listing {
        limit: DEFAULT_LIMIT,
        ..Listing::default()
    };
    for (name, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if value.is_empty() {
            continue;
        }
        match &*name {
            "source" => l.filter.source = Some(source_filter(&value)?),
            "reason" => l.filter.reason = Some(reason_filter(&value)?),
            "key" => l.filter.key = Some(key_filter(&value)?),
            "limit" => {
                let n = value.parse::<u64>().map_err(|_| {
                    ApiError::Invalid(format!("limit {value:?} is not a whole number"))
                })?;
                l.limit = limit_of(n, MAX_LIMIT)?;
            }
            other => {
                return Err(ApiError::Invalid(format!(
                    "unknown parameter {other:?}; use source, reason, key, limit"
                )));
            }
        }
    }
    Ok(l)
}

#[derive(Serialize)]
struct Pending {
    queue: String,
    /// Dead letters looked at (the queue's length when the read started).
    looked_at: u64,
    /// Of those, how many the filters match.
    matched: u64,
    limit: u64,
    /// More matched than `items` holds (raise `limit`, or filter).
    truncated: bool,
    items: Vec<Item>,
}

/// `GET /admin/dlq/pending`.
pub async fn pending(State(admin): State<Arc<Admin>>, RawQuery(query): RawQuery) -> Response {
    let l = match listing(query.as_deref()) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let (filter, limit) = (l.filter.clone(), l.limit);
    let result = exclusive(&admin, move |admin| async move {
        let (mut items, mut matched, mut looked) = (Vec::new(), 0u64, 0u64);
        dead_letters::read(&admin.broker, None, |dl| {
            looked += 1;
            if filter.matches(&dl.envelope) && (filter.reason.is_none() || dl.unreadable.is_none())
            {
                matched += 1;
                if (items.len() as u64) < limit {
                    items.push(Item::of(dl));
                }
            }
        })
        .await?;
        Ok((items, matched, looked))
    })
    .await;
    match result {
        Ok((items, matched, looked_at)) => {
            tracing::info!(
                who = %admin.label, action = "dlq.pending",
                source = ?l.filter.source, reason = ?l.filter.reason.map(|r| r.as_str()), key = ?l.filter.key,
                limit, matched, returned = items.len(),
                "admin listed dead letters"
            );
            Json(Pending {
                queue: admin.broker.topology().dead(),
                looked_at,
                matched,
                limit,
                truncated: matched > items.len() as u64,
                items,
            })
            .into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `GET /admin/dlq/{id}`.
pub async fn detail(
    State(admin): State<Arc<Admin>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match id {
        Ok(Path(id)) => id,
        Err(e) => return ApiError::Invalid(format!("bad message id: {e}")).into_response(),
    };
    let wanted = id.clone();
    let result = exclusive(&admin, move |admin| async move {
        let mut found = None;
        dead_letters::read(&admin.broker, None, |dl| {
            if found.is_none() && dl.envelope.message_id.0 == wanted {
                found = Some(Detail::of(dl));
            }
        })
        .await?;
        Ok(found)
    })
    .await;
    match result {
        Ok(Some(d)) => {
            tracing::info!(who = %admin.label, action = "dlq.detail", message_id = %id, key = %d.item.key, "admin opened a dead letter");
            Json(d).into_response()
        }
        Ok(None) => {
            tracing::info!(who = %admin.label, action = "dlq.detail", message_id = %id, "admin asked for a dead letter that is not there");
            ApiError::NotFound(id).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_parameters_are_checked() {
        let l = listing(Some("source=shop&reason=rejected&key=shop%3A1&limit=5")).unwrap();
        assert_eq!(l.filter.source.as_deref(), Some("shop"));
        assert_eq!(l.filter.reason, Some(DeadReason::Rejected));
        assert_eq!(l.filter.key.as_deref(), Some("shop:1"));
        assert_eq!(l.limit, 5);
        let d = listing(None).unwrap();
        assert_eq!(d.limit, DEFAULT_LIMIT);
        assert!(
            listing(Some("source=&reason=")).is_ok(),
            "empty is no filter"
        );
        for bad in [
            "reason=timeout",
            "limit=0",
            "limit=10001",
            "limit=-1",
            "limit=x",
            "source=Shop!",
            "sorce=shop",
        ] {
            let e = listing(Some(bad)).unwrap_err();
            assert_eq!(e.code(), "invalid_request", "{bad}");
        }
    }
}
