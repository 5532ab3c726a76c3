//! Delivery to the user's application, and what its answer means.
//!
//! `http` forwards the original body and headers to the target with the
//! Idempotency-Key; `log` prints one JSON line per event and always succeeds.
//! This module does not retry: it reports one attempt's outcome and the worker
//! asks `retry.rs` what to do about it.

mod http;
mod log;

pub use http::request;

use std::time::Duration;

use crate::config::{HandlerKind, TargetUrl, WorkerSettings};
use crate::message::Envelope;

/// One failed attempt; the retry policy branches on the variant.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("HTTP {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("no target configured for source {0}")]
    NoTarget(String),
    /// The message cannot be sent as an HTTP request (a message published by
    /// other means with a key or id no header can carry): no retry helps.
    #[error("the message cannot be sent as a request: {0}")]
    BadRequest(String),
    #[error("request failed: {0}")]
    Other(String),
}

impl Error {
    /// The target's Retry-After, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How messages reach the user's application (`worker.handler`).
pub enum Delivery {
    Http(http::Forwarder),
    Log,
}

impl Delivery {
    /// From the worker's section (the handler, the timeout).
    pub fn new(worker: &WorkerSettings) -> Result<Self, reqwest::Error> {
        Ok(match worker.handler {
            HandlerKind::Log => Self::Log,
            HandlerKind::Http => Self::Http(http::Forwarder::new(worker)?),
        })
    }

    /// One attempt to `target` (the `http` handler's; see
    /// [`crate::targets::Targets::for_source`]); `attempt` is 1-based. Ok
    /// carries the 2xx status.
    pub async fn deliver(
        &self,
        env: &Envelope,
        attempt: u32,
        target: Option<&TargetUrl>,
    ) -> Result<u16, Error> {
        match self {
            Self::Log => {
                log::print(env, attempt);
                Ok(200)
            }
            Self::Http(f) => f.deliver(env, attempt, target).await,
        }
    }
}
