//! The envelope: what hookq carries through the broker for one webhook.
//!
//! This is the SPEC's "Message on the broker" as plain Rust data. Only `broker/`
//! turns it into AMQP properties and headers (and back), so the rest of hookq
//! never sees lapin types.

use std::fmt;
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderMap;

/// Header names, spelled once.
pub mod header {
    pub const SOURCE: &str = "hookq-source";
    pub const KEY: &str = "hookq-key";
    pub const ATTEMPTS: &str = "hookq-attempts";
    pub const RECEIVED_AT: &str = "hookq-received-at";
    pub const HEADERS: &str = "hookq-headers";
    pub const DEAD_REASON: &str = "hookq-dead-reason";
    pub const LAST_ERROR: &str = "hookq-last-error";
    pub const LAST_STATUS: &str = "hookq-last-status";
    pub const DEAD_AT: &str = "hookq-dead-at";
    pub const PREVIOUS_DEAD_REASON: &str = "hookq-previous-dead-reason";
    pub const SHOVELLED: &str = "hookq-shovelled";
    /// Epoch milliseconds before which the message must not be delivered (a
    /// Retry-After longer than the largest delay tier).
    pub const NOT_BEFORE: &str = "hookq-not-before";
    /// With `amqp.partitions` > 1: the message's partition, which the return
    /// exchange routes a delay tier's expired messages by.
    pub const PARTITION: &str = "hookq-partition";
    /// Set (true) on the one held message a worker releases as an open
    /// breaker's probe: it is delivered while the rest stay held.
    pub const PROBE: &str = "hookq-probe";
}

/// The idempotency key, `SOURCE:ID`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DedupKey(pub String);

impl fmt::Display for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Unique per received request; the broker's `message_id` property.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MessageId(pub String);

impl MessageId {
    /// Time-ordered (UUIDv7), so ids sort by arrival in the UI and in logs.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a message ended in `P.dead`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeadReason {
    MaxAttempts,
    Rejected,
    DeliveryLimit,
    Invalid,
}

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxAttempts => "max_attempts",
            Self::Rejected => "rejected",
            Self::DeliveryLimit => "delivery_limit",
            Self::Invalid => "invalid",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "max_attempts" => Self::MaxAttempts,
            "rejected" => Self::Rejected,
            "delivery_limit" => Self::DeliveryLimit,
            "invalid" => Self::Invalid,
            _ => return None,
        })
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a dead letter says about its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadInfo {
    pub reason: DeadReason,
    pub last_error: String,
    pub last_status: Option<u16>,
    pub dead_at: String,
}

/// One webhook on its way through hookq.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub message_id: MessageId,
    /// The request body, byte for byte; cheap to clone (shared, not copied).
    pub body: Bytes,
    /// The AMQP `content_type` property. A Content-Type that does not fit one
    /// (over 255 bytes, or not UTF-8) travels only in `headers`.
    pub content_type: Option<String>,
    /// Seconds since the epoch, the AMQP `timestamp` property.
    pub timestamp: u64,
    pub source: String,
    pub key: DedupKey,
    /// Failed deliveries so far: 0 at the ingress, the total on a dead letter.
    pub attempts: u32,
    /// RFC 3339.
    pub received_at: String,
    /// The request's headers worth forwarding, repeats and raw bytes kept
    /// (a latin-1 value stays latin-1).
    pub headers: HeaderMap,
    pub dead: Option<DeadInfo>,
    pub previous_dead_reason: Option<String>,
    pub shovelled: u32,
    /// Epoch milliseconds; see [`header::NOT_BEFORE`].
    pub not_before: Option<u64>,
    /// With partitions, the key's partition; see [`header::PARTITION`].
    pub partition: Option<u32>,
    /// Released from a hold queue as the target's breaker probe; see
    /// [`header::PROBE`].
    pub probe: bool,
}

impl Envelope {
    /// The envelope of a request the ingress accepted now: its Content-Type
    /// (as the property, when it is text) and the headers that travel
    /// ([`forwardable_headers`]).
    pub fn of_request(source: &str, key: DedupKey, body: Bytes, headers: HeaderMap) -> Self {
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Self::received(
            source,
            key,
            body,
            content_type,
            forwardable_headers(headers),
        )
    }

    /// A fresh envelope for a webhook the ingress accepted now.
    pub fn received(
        source: &str,
        key: DedupKey,
        body: Bytes,
        content_type: Option<String>,
        headers: HeaderMap,
    ) -> Self {
        let now = SystemTime::now();
        Self {
            message_id: MessageId::new(),
            body,
            content_type,
            timestamp: now
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            source: source.to_string(),
            key,
            attempts: 0,
            received_at: rfc3339_now(),
            headers,
            dead: None,
            previous_dead_reason: None,
            shovelled: 0,
            not_before: None,
            partition: None,
            probe: false,
        }
    }
}

impl Envelope {
    /// The provider's own id of this delivery when it is not the key: GitHub's
    /// `X-GitHub-Delivery` (its key is the body's hash, since GitHub does not
    /// sign the header). Shown beside the key in logs, dead letters and the
    /// console, so an operator can find the delivery in the provider's UI.
    pub fn delivery_id(&self) -> Option<&str> {
        self.headers
            .get(DELIVERY_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    }
}

/// The header [`Envelope::delivery_id`] reads.
pub const DELIVERY_ID_HEADER: &str = "x-github-delivery";

/// The tracing span of everything done for one message: lines about it carry
/// its message id, key and source (and the provider's delivery id, when there
/// is one). Every value here may come from a request: the log formats escape
/// control characters (see `telemetry`), so none can start a line.
pub fn span(env: &Envelope) -> tracing::Span {
    let span = tracing::info_span!(
        "message",
        message_id = %env.message_id,
        key = %env.key,
        source = %env.source,
        delivery = tracing::field::Empty,
    );
    if let Some(d) = env.delivery_id() {
        span.record("delivery", d);
    }
    span
}

/// Now, as RFC 3339 with milliseconds (UTC).
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The request headers that travel with the message: all but the hop-by-hop
/// ones (RFC 9110 7.6.1: the fixed list and every header the `Connection`
/// header names), Host and Content-Length (they describe the ingress hop), and
/// credentials meant for the ingress, not for the user's application.
pub fn forwardable_headers(mut headers: HeaderMap) -> HeaderMap {
    let named: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|token| http::HeaderName::from_bytes(token.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let dropped: Vec<http::HeaderName> = headers
        .keys()
        .filter(|k| !is_forwardable_header(k.as_str()))
        .cloned()
        .collect();
    for name in dropped {
        headers.remove(name);
    }
    headers
}

/// Whether a header, by its name alone, may travel with the message (see
/// [`forwardable_headers`], which also drops what `Connection` names).
pub fn is_forwardable_header(name: &str) -> bool {
    const DROPPED: [&str; 14] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "authorization",
        "cookie",
        "expect",
    ];
    // No allocation: this runs for every header of every request.
    !DROPPED.iter().any(|d| d.eq_ignore_ascii_case(name))
}

/// Milliseconds since the epoch, now.
pub fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_stay_behind() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Drop-Me"),
            ("connection", "x-also"),
            ("x-drop-me", "1"),
            ("x-also", "2"),
            ("x-keep", "3"),
            ("x-keep", "4"),
            ("authorization", "Bearer t"),
            ("keep-alive", "timeout=5"),
            ("content-type", "application/json"),
        ] {
            h.append(
                http::HeaderName::from_static(k),
                http::HeaderValue::from_static(v),
            );
        }
        let out = forwardable_headers(h);
        let names: Vec<_> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-keep", "content-type"]);
        assert_eq!(out.get_all("x-keep").iter().count(), 2);
    }
}
