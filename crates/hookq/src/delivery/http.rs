//! The `http` handler: `POST` the original body and headers to the target,
//! with the Idempotency-Key and hookq's own headers, on a keep-alive client.

use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue, header};

use super::Error;
use crate::config::{TargetUrl, WorkerSettings};
use crate::message::Envelope;
use crate::retry::parse_retry_after;

pub struct Forwarder {
    client: reqwest::Client,
    timeout: Duration,
}

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const HOOKQ_SOURCE: HeaderName = HeaderName::from_static("hookq-source");
const HOOKQ_MESSAGE_ID: HeaderName = HeaderName::from_static("hookq-message-id");
const HOOKQ_ATTEMPT: HeaderName = HeaderName::from_static("hookq-attempt");

/// Headers hookq sets itself on the delivery; the forwarded copies are dropped.
fn ours(name: &HeaderName) -> bool {
    let n = name.as_str(); // header names are lower-case
    n == "idempotency-key" || n.starts_with("hookq-")
}

/// A reqwest error as text without the URL it carries (and with its causes,
/// which reqwest's own text leaves out): "http://host:port/path: error
/// sending request: connection refused". The target is shown by scheme, host,
/// port and path: its query or user info may hold a token.
fn describe(target: &TargetUrl, e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = format!("{target}: {e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The request that delivers `env` to `target`: the original body and
/// forwarded headers, the Content-Type, the Idempotency-Key and hookq's own
/// headers. Every message the ingress accepted makes one (its key fits a
/// header value by construction); a message published by other means may not,
/// and that is [`Error::BadRequest`], permanent.
pub fn request(
    target: &TargetUrl,
    env: &Envelope,
    attempt: u32,
) -> Result<reqwest::Request, Error> {
    let mut request = reqwest::Request::new(reqwest::Method::POST, target.url().clone());
    let headers = request.headers_mut();
    headers.reserve(env.headers.len() + 5);
    for (name, value) in &env.headers {
        if !ours(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    // The request's own Content-Type is among the forwarded headers; a
    // message published by other means may only have the property.
    if !headers.contains_key(header::CONTENT_TYPE)
        && let Some(ct) = env
            .content_type
            .as_deref()
            .and_then(|c| HeaderValue::from_str(c).ok())
    {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    for (name, value) in [
        (IDEMPOTENCY_KEY, env.key.0.as_str()),
        (HOOKQ_SOURCE, env.source.as_str()),
        (HOOKQ_MESSAGE_ID, env.message_id.0.as_str()),
    ] {
        // A message published by other means may carry anything.
        let value = HeaderValue::from_str(value)
            .map_err(|_| Error::BadRequest(format!("its {name} is not a valid header value")))?;
        headers.insert(name, value);
    }
    headers.insert(HOOKQ_ATTEMPT, HeaderValue::from(attempt));
    *request.body_mut() = Some(env.body.clone().into());
    Ok(request)
}

impl Forwarder {
    pub fn new(worker: &WorkerSettings) -> Result<Self, reqwest::Error> {
        Ok(Self {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(worker.concurrency)
                .timeout(worker.timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            timeout: worker.timeout,
        })
    }

    /// One attempt to `target` (the source's, resolved by the caller).
    pub async fn deliver(
        &self,
        env: &Envelope,
        attempt: u32,
        target: Option<&TargetUrl>,
    ) -> Result<u16, Error> {
        let target = target.ok_or_else(|| Error::NoTarget(env.source.clone()))?;
        let request = request(target, env, attempt)?;
        let resp = self.client.execute(request).await.map_err(|e| {
            if e.is_timeout() {
                Error::Timeout(self.timeout)
            } else if e.is_connect() {
                Error::Connect(describe(target, e))
            } else if e.is_builder() {
                // A forwarded header reqwest cannot send: the message itself is bad.
                Error::BadRequest(describe(target, e))
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
