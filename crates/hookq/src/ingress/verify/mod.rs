//! Webhook signature verification.
//!
//! This runs in the ingress handler once the raw body has been read and before
//! anything else looks at it: before the routing/dedup key is derived and before
//! the message is published to RabbitMQ. An unsigned or forged request must never
//! reach the broker, so the check is over the exact bytes received (never a
//! re-serialised body) and every comparison is constant-time.
//!
//! What it does not do: deduplication or replay caching. Stripe and Standard
//! Webhooks sign a timestamp, so a tolerance window bounds replays here; GitHub
//! signs no timestamp, so for GitHub the later dedup step (on the delivery id) is
//! the only replay guard. It also does not parse the body or limit its size.
//!
//! Order of checks, for every timestamped scheme: parse the headers, then the
//! timestamp window, then the signature (as the Standard Webhooks reference
//! library does). A stale request is therefore refused as `Stale` whatever its
//! signature; the window is not a secret, so this leaks nothing.

use std::time::{Duration, SystemTime};

use axum::http::{HeaderMap, HeaderName};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

type HmacSha256 = Hmac<Sha256>;

const GITHUB_HEADER: &str = "x-hub-signature-256";
const STRIPE_HEADER: &str = "stripe-signature";
const STD_ID: &str = "webhook-id";
const STD_TIMESTAMP: &str = "webhook-timestamp";
const STD_SIGNATURE: &str = "webhook-signature";

pub use crate::config::SchemeKind;

/// The HMAC key bytes. Debug is redacted and there is no Display, so a secret
/// cannot end up in a log line through `{:?}` on a `Verifier`.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A configured check for one endpoint; built once at start-up, shared by requests.
#[derive(Clone, Debug)]
pub struct Verifier {
    kind: SchemeKind,
    secret: Option<Secret>,
    /// Only for `HmacSha256`: where the signature is.
    header: Option<HeaderName>,
    tolerance: Duration,
}

/// Problems found at start-up (configuration); the caller turns them into
/// "exit 2 naming the source".
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("verify = \"{0}\" needs a secret (set secret or secret_env)")]
    MissingSecret(&'static str),
    /// The text says what is wrong with the secret, never the secret itself.
    #[error("the secret is not a valid Standard Webhooks secret: {0}")]
    BadStandardSecret(String),
    #[error("verify = \"hmac-sha256\" needs signature_header")]
    MissingHeader,
    #[error("signature_header {0:?} is not a valid HTTP header name")]
    BadHeaderName(String),
}

/// Why a request was refused. Display texts are short, safe to log and to send
/// to the client (they never contain the secret or the body).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("missing header {0}")]
    MissingHeader(String),
    #[error("malformed header {0}")]
    MalformedHeader(String),
    #[error("signature does not match")]
    Mismatch,
    #[error("timestamp is older than the tolerance")]
    Stale,
    #[error("timestamp is too far in the future")]
    Future,
}

impl Verifier {
    /// `secret`: the raw configured string (already resolved from secret/secret_env
    /// by the caller); an empty string counts as missing, since an empty HMAC key
    /// would let anyone sign. `signature_header`: only for `HmacSha256`, ignored
    /// otherwise. For `None` the secret is ignored too.
    pub fn new(
        kind: SchemeKind,
        secret: Option<&str>,
        signature_header: Option<&str>,
        tolerance: Duration,
    ) -> Result<Self, ConfigError> {
        let mut verifier = Verifier {
            kind,
            secret: None,
            header: None,
            tolerance,
        };
        if kind == SchemeKind::None {
            return Ok(verifier);
        }
        let raw = secret
            .filter(|s| !s.is_empty())
            .ok_or(ConfigError::MissingSecret(kind.as_str()))?;
        let key = match kind {
            SchemeKind::Standard => standard_key(raw)?,
            _ => raw.as_bytes().to_vec(),
        };
        verifier.secret = Some(Secret(key));
        if kind == SchemeKind::HmacSha256 {
            let name = signature_header.ok_or(ConfigError::MissingHeader)?;
            let parsed = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ConfigError::BadHeaderName(name.to_string()))?;
            verifier.header = Some(parsed);
        }
        Ok(verifier)
    }

    pub fn kind(&self) -> SchemeKind {
        self.kind
    }

    /// The verifier a configured source asks for; a problem with its secret or
    /// header is a configuration error naming the source.
    pub fn for_source(
        name: &str,
        s: &crate::config::SourceSettings,
    ) -> Result<Self, crate::config::Error> {
        Self::new(
            s.verify,
            s.secret.as_ref().map(crate::config::Secret::expose),
            s.signature_header.as_deref(),
            s.tolerance,
        )
        .map_err(|e| crate::config::Error::new(format!("sources.{name}"), e.to_string()))
    }

    /// Checks one request. `now` is passed in so tests are deterministic.
    pub fn verify(&self, headers: &HeaderMap, body: &[u8], now: SystemTime) -> Result<(), Error> {
        if self.kind == SchemeKind::None {
            return Ok(());
        }
        // `new` always sets a secret for the other kinds; fail closed regardless.
        let Some(Secret(key)) = &self.secret else {
            return Err(Error::Mismatch);
        };
        match self.kind {
            SchemeKind::None => Ok(()),
            SchemeKind::Github => {
                let value = header(headers, GITHUB_HEADER)?;
                let tag = value.strip_prefix("sha256=").and_then(decode_hex_tag);
                let tag = tag.ok_or_else(|| malformed(GITHUB_HEADER))?;
                check(&mac(key, &[body]), &[tag])
            }
            SchemeKind::HmacSha256 => {
                let name = self.header.as_ref().map_or("", HeaderName::as_str);
                let value = header(headers, name)?;
                let tag = decode_hex_tag(value.strip_prefix("sha256=").unwrap_or(value));
                let tag = tag.ok_or_else(|| malformed(name))?;
                check(&mac(key, &[body]), &[tag])
            }
            SchemeKind::Stripe => {
                let (t, tags) = parse_stripe(header(headers, STRIPE_HEADER)?)?;
                self.window(parse_unix(t).ok_or_else(|| malformed(STRIPE_HEADER))?, now)?;
                check(&mac(key, &[t.as_bytes(), b".", body]), &tags)
            }
            SchemeKind::Standard => {
                let id = header(headers, STD_ID)?;
                let ts = header(headers, STD_TIMESTAMP)?;
                let sig = header(headers, STD_SIGNATURE)?;
                self.window(parse_unix(ts).ok_or_else(|| malformed(STD_TIMESTAMP))?, now)?;
                // Space-separated "v1,<base64>"; other versions (v1a...) are ignored and
                // undecodable values kept as empty tags, which never match.
                let tags: Vec<Vec<u8>> = sig
                    .split(' ')
                    .filter_map(|item| item.strip_prefix("v1,"))
                    .map(|b64| B64.decode(b64).unwrap_or_default())
                    .collect();
                if tags.is_empty() {
                    return Err(malformed(STD_SIGNATURE));
                }
                let expected = mac(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
                check(&expected, &tags)
            }
        }
    }

    /// Both directions are bounded: a far-future timestamp would otherwise stay
    /// replayable until it became "recent". Compared in milliseconds, so a
    /// tolerance under a second means what it says; done in i128 so no input
    /// can overflow.
    fn window(&self, ts: u64, now: SystemTime) -> Result<(), Error> {
        let now = match now.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => i128::try_from(d.as_millis()).unwrap_or(i128::MAX),
            Err(e) => -i128::try_from(e.duration().as_millis()).unwrap_or(i128::MAX),
        };
        let ts = i128::from(ts) * 1000;
        let tol = i128::try_from(self.tolerance.as_millis()).unwrap_or(i128::MAX);
        if now - ts > tol {
            Err(Error::Stale)
        } else if ts - now > tol {
            Err(Error::Future)
        } else {
            Ok(())
        }
    }
}

/// Decodes `whsec_<base64>` (or bare base64, as the reference libraries accept).
/// The error text describes the problem by position only, never by content.
fn standard_key(raw: &str) -> Result<Vec<u8>, ConfigError> {
    crate::config::standard_key(raw).map_err(ConfigError::BadStandardSecret)
}

/// Splits `t=..,v1=..,v1=..,v0=..`; items are trimmed, unknown keys ignored and
/// undecodable v1 values kept as empty tags (they never match). Missing or
/// repeated `t`, or no `v1`, is malformed.
fn parse_stripe(value: &str) -> Result<(&str, Vec<Vec<u8>>), Error> {
    let (mut t, mut tags) = (None, Vec::new());
    for (k, v) in value.split(',').filter_map(|item| item.split_once('=')) {
        match (k.trim(), v.trim()) {
            ("t", _) if t.is_some() => return Err(malformed(STRIPE_HEADER)),
            ("t", v) => t = Some(v),
            ("v1", v) => tags.push(hex::decode(v).unwrap_or_default()),
            _ => {}
        }
    }
    match t {
        Some(t) if !tags.is_empty() => Ok((t, tags)),
        _ => Err(malformed(STRIPE_HEADER)),
    }
}

/// Plain decimal unix seconds only: no sign, no spaces; overflow is malformed.
fn parse_unix(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn decode_hex_tag(s: &str) -> Option<Vec<u8>> {
    hex::decode(s.trim()).ok().filter(|t| t.len() == 32)
}

/// The header as text; values that are not visible ASCII are malformed.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, Error> {
    let value = headers
        .get(name)
        .ok_or_else(|| Error::MissingHeader(name.to_string()))?;
    value.to_str().map(str::trim).map_err(|_| malformed(name))
}

fn malformed(name: &str) -> Error {
    Error::MalformedHeader(name.to_string())
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail; the fallback keeps
    // the no-panic rule without an expect.
    let Ok(mut m) = HmacSha256::new_from_slice(key) else {
        return [0; 32];
    };
    parts.iter().for_each(|p| m.update(p));
    m.finalize().into_bytes().into()
}

/// Accepts if any candidate matches (key rotation). Every candidate is compared
/// in constant time and none short-circuits.
fn check(expected: &[u8; 32], candidates: &[Vec<u8>]) -> Result<(), Error> {
    let hit = candidates
        .iter()
        .fold(Choice::from(0), |acc, c| acc | expected.as_slice().ct_eq(c));
    bool::from(hit).then_some(()).ok_or(Error::Mismatch)
}

#[cfg(test)]
mod tests;
