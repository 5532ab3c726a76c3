//! The envelope: what hookq carries through the broker for one webhook.
//!
//! This is the SPEC's "Message on the broker" as plain Rust data. Only `broker/`
//! turns it into AMQP properties and headers (and back), so the rest of hookq
//! never sees lapin types.

use std::fmt;
use std::time::SystemTime;

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
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    /// Seconds since the epoch, the AMQP `timestamp` property.
    pub timestamp: u64,
    pub source: String,
    pub key: DedupKey,
    /// Failed deliveries so far: 0 at the ingress, the total on a dead letter.
    pub attempts: u32,
    /// RFC 3339.
    pub received_at: String,
    /// The request's headers worth forwarding, in arrival order (names lower-case).
    pub headers: Vec<(String, String)>,
    pub dead: Option<DeadInfo>,
    pub previous_dead_reason: Option<String>,
    pub shovelled: u32,
    /// Epoch milliseconds; see [`header::NOT_BEFORE`].
    pub not_before: Option<u64>,
}

impl Envelope {
    /// A fresh envelope for a webhook the ingress accepted now.
    pub fn received(
        source: &str,
        key: DedupKey,
        body: Vec<u8>,
        content_type: Option<String>,
        headers: Vec<(String, String)>,
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
        }
    }
}

/// Now, as RFC 3339 with milliseconds (UTC).
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Request headers that must not travel with the message: hop-by-hop headers
/// (RFC 9110 7.6.1), Host and Content-Length (they describe the ingress hop), and
/// credentials meant for the ingress, not for the user's application.
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
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
