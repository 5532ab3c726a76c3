//! Delivery to the user's application, and what its answer means.
//!
//! `http` forwards the original body and headers to the target with the
//! Idempotency-Key; `log` prints one JSON line per event and always succeeds.
//! This module does not retry: it reports one attempt's outcome and the worker
//! asks `retry.rs` what to do about it.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

use crate::config::{HandlerKind, Settings};
use crate::message::Envelope;
use crate::retry::{Failure, parse_retry_after};

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
    #[error("request failed: {0}")]
    Other(String),
}

impl Error {
    /// The SPEC's table: 408, 425, 429, 5xx, timeouts and connection errors are
    /// worth another try; any other status is a permanent refusal.
    pub fn failure(&self) -> Failure {
        match self {
            Self::Status {
                status,
                retry_after,
            } => {
                if matches!(status, 408 | 425 | 429) || (500..=599).contains(status) {
                    Failure::Retryable {
                        retry_after: *retry_after,
                    }
                } else {
                    Failure::Permanent
                }
            }
            Self::Timeout(_) | Self::Connect(_) | Self::Other(_) => {
                Failure::Retryable { retry_after: None }
            }
            Self::NoTarget(_) => Failure::Permanent,
        }
    }

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

pub enum Handler {
    Http {
        client: reqwest::Client,
        timeout: Duration,
        default_target: Option<Target>,
        targets: HashMap<String, Target>,
    },
    Log,
}

/// A delivery URL, parsed once, with the form that may be shown.
#[derive(Clone)]
pub struct Target {
    url: reqwest::Url,
    /// Scheme, host, port and path: a query string or user info may hold a
    /// token, so errors, logs and dead letters name the target by this alone.
    shown: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self, url::ParseError> {
        let url = reqwest::Url::parse(url)?;
        let shown = redact(&url);
        Ok(Self { url, shown })
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// `scheme://host[:port]/path`, without user info, query or fragment.
pub fn redact(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or("");
    match url.port() {
        Some(p) => format!("{}://{host}:{p}{}", url.scheme(), url.path()),
        None => format!("{}://{host}{}", url.scheme(), url.path()),
    }
}

/// A reqwest error as text without the URL it carries (and its causes, which
/// reqwest's own text leaves out): "POST http://host:port/path: connection
/// refused".
fn describe(target: &Target, e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = format!("{}: {e}", target.shown);
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Headers hookq sets itself on the delivery; the forwarded copies are dropped.
fn ours(name: &http::HeaderName) -> bool {
    let n = name.as_str(); // header names are lower-case
    n == "idempotency-key" || n.starts_with("hookq-")
}

impl Handler {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        Ok(match settings.worker.handler {
            HandlerKind::Log => Self::Log,
            HandlerKind::Http => Self::Http {
                client: reqwest::Client::builder()
                    .pool_max_idle_per_host(settings.worker.concurrency)
                    .timeout(settings.worker.timeout())
                    .redirect(reqwest::redirect::Policy::none())
                    .build()?,
                timeout: settings.worker.timeout(),
                default_target: settings
                    .worker
                    .target
                    .as_deref()
                    .map(Target::parse)
                    .transpose()?,
                targets: settings
                    .sources
                    .iter()
                    .filter_map(|(n, s)| s.target.as_deref().map(|t| (n, t)))
                    .map(|(n, t)| Ok((n.clone(), Target::parse(t)?)))
                    .collect::<Result<_, url::ParseError>>()?,
            },
        })
    }

    /// One attempt; `attempt` is 1-based. Ok carries the 2xx status.
    pub async fn deliver(&self, env: &Envelope, attempt: u32) -> Result<u16, Error> {
        match self {
            Self::Log => {
                log_event(env, attempt);
                Ok(200)
            }
            Self::Http {
                client,
                timeout,
                default_target,
                targets,
            } => {
                let target = targets
                    .get(&env.source)
                    .or(default_target.as_ref())
                    .ok_or_else(|| Error::NoTarget(env.source.clone()))?;
                let mut headers = env.headers.clone();
                let theirs: Vec<http::HeaderName> =
                    headers.keys().filter(|k| ours(k)).cloned().collect();
                for k in theirs {
                    headers.remove(k);
                }
                // The request's own Content-Type is among the forwarded headers;
                // a message published by other means may only have the property.
                if !headers.contains_key(http::header::CONTENT_TYPE)
                    && let Some(ct) = env
                        .content_type
                        .as_deref()
                        .and_then(|c| http::HeaderValue::from_str(c).ok())
                {
                    headers.insert(http::header::CONTENT_TYPE, ct);
                }
                let req = client.post(target.url.clone()).headers(headers);
                let resp = req
                    .header("idempotency-key", env.key.0.as_str())
                    .header("hookq-source", env.source.as_str())
                    .header("hookq-message-id", env.message_id.0.as_str())
                    .header("hookq-attempt", attempt.to_string())
                    .body(env.body.clone())
                    .send()
                    .await
                    .map_err(|e| {
                        if e.is_timeout() {
                            Error::Timeout(*timeout)
                        } else if e.is_connect() {
                            Error::Connect(describe(target, e))
                        } else if e.is_builder() {
                            // A forwarded header reqwest cannot send: the message itself is bad.
                            Error::NoTarget(format!(
                                "{} (bad request: {})",
                                env.source,
                                describe(target, e)
                            ))
                        } else {
                            Error::Other(describe(target, e))
                        }
                    })?;
                let status = resp.status().as_u16();
                if resp.status().is_success() {
                    return Ok(status);
                }
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                Err(Error::Status {
                    status,
                    retry_after,
                })
            }
        }
    }
}

/// The `log` handler's line: the event as JSON on stdout.
fn log_event(env: &Envelope, attempt: u32) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let retry_after = Some(Duration::from_secs(3));
        let cases: [(u16, bool); 11] = [
            (408, true),
            (425, true),
            (429, true),
            (500, true),
            (502, true),
            (599, true),
            (400, false),
            (401, false),
            (404, false),
            (409, false),
            (422, false),
        ];
        for (status, retryable) in cases {
            let f = Error::Status {
                status,
                retry_after,
            }
            .failure();
            assert_eq!(
                matches!(f, Failure::Retryable { .. }),
                retryable,
                "{status}"
            );
        }
        assert_eq!(
            Error::Status {
                status: 429,
                retry_after
            }
            .failure(),
            Failure::Retryable { retry_after }
        );
        assert!(matches!(
            Error::Timeout(Duration::from_secs(1)).failure(),
            Failure::Retryable { retry_after: None }
        ));
        assert!(matches!(
            Error::Connect("refused".into()).failure(),
            Failure::Retryable { .. }
        ));
    }
}
