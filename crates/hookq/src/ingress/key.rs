//! The idempotency key: `SOURCE ":" ID`, with ID from the first present of the
//! source's `id_header`, its `id_json_pointer`, then what the source's scheme
//! signs (`standard`: `webhook-id`; `stripe`: the body's `/id`; `github`: the
//! hex SHA-256 of the body, since GitHub signs the body and no id); for
//! `verify = "none"` sources only `Idempotency-Key`, `webhook-id`,
//! `X-GitHub-Delivery`, `X-Event-Id`; else the hex SHA-256 of the body.
//!
//! An unsigned header never overrides a signed id: a replay of a signed
//! request with a fresh `Idempotency-Key` (or, for GitHub, a fresh
//! `X-GitHub-Delivery`) is still a duplicate.
//!
//! Every key can travel as an HTTP header value: an id with a control
//! character (a line break, a tab, DEL) or over 256 bytes is replaced by its
//! hex SHA-256, so a 202 is never followed by a dead letter ("cannot be sent
//! as a request") that the sender cannot fix.
//!
//! Pure: headers and body in, key out. It does not verify anything; the
//! signature check runs before it.

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::config::SourceSettings;
use crate::ingress::verify::SchemeKind;
use crate::message::DedupKey;

/// Well-known event-id headers, in the SPEC's order of precedence (for
/// sources that verify nothing).
const ID_HEADERS: [&str; 4] = [
    "idempotency-key",
    "webhook-id",
    "x-github-delivery",
    "x-event-id",
];

/// An id longer than this is replaced by its hash, so keys stay small in SQLite
/// and in AMQP headers whatever a client sends.
pub const MAX_ID_BYTES: usize = 256;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the body is not JSON, but this source takes its event id from {pointer}")]
    NotJson { pointer: String },
    #[error("the body has no event id at {pointer} (a string or a number is needed)")]
    MissingBodyId { pointer: String },
}

fn header_id(headers: &HeaderMap, name: &str) -> Option<String> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    (!v.is_empty()).then(|| v.to_string())
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The id as it goes into the key: itself when it fits an HTTP header value
/// (`Idempotency-Key` at delivery) and is at most [`MAX_ID_BYTES`], else its
/// hex SHA-256. Control characters (C0 with tab, DEL, C1) are what a header
/// value cannot carry or a log line must not show raw; UTF-8 beyond them is
/// fine (header values take obs-text bytes).
fn fit(id: String) -> String {
    if id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control) {
        id
    } else {
        sha256_hex(id.as_bytes())
    }
}

pub fn derive(
    source: &str,
    settings: Option<&SourceSettings>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<DedupKey, Error> {
    let make = |id: String| DedupKey(format!("{source}:{}", fit(id)));
    if let Some(h) = settings.and_then(|s| s.id_header.as_deref())
        && let Some(id) = header_id(headers, h)
    {
        return Ok(make(id));
    }
    if let Some(pointer) = settings.and_then(|s| s.id_json_pointer.as_deref()) {
        let json: serde_json::Value = serde_json::from_slice(body).map_err(|_| Error::NotJson {
            pointer: pointer.to_string(),
        })?;
        let id = match json.pointer(pointer) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => {
                return Err(Error::MissingBodyId {
                    pointer: pointer.to_string(),
                });
            }
        };
        return Ok(make(id));
    }
    match settings.map_or(SchemeKind::None, |s| s.verify) {
        SchemeKind::Standard => {
            if let Some(id) = header_id(headers, "webhook-id") {
                return Ok(make(id));
            }
        }
        SchemeKind::Stripe => {
            // Stripe signs the body, and its event id is in it.
            if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice(body)
                && let Some(serde_json::Value::String(id)) = o.get("id")
                && !id.is_empty()
            {
                return Ok(make(id.clone()));
            }
        }
        // GitHub signs the body and nothing else: X-GitHub-Delivery is not
        // signed, so a captured request replayed under fresh delivery ids must
        // still be one key. The body hash below is that key; the delivery id
        // travels with the forwarded headers and is shown beside the key.
        SchemeKind::Github | SchemeKind::HmacSha256 => {}
        SchemeKind::None => {
            for h in ID_HEADERS {
                if let Some(id) = header_id(headers, h) {
                    return Ok(make(id));
                }
            }
        }
    }
    Ok(DedupKey(format!("{source}:{}", sha256_hex(body))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn source(id_header: Option<&str>, pointer: Option<&str>) -> SourceSettings {
        SourceSettings {
            id_header: id_header.map(Into::into),
            id_json_pointer: pointer.map(Into::into),
            ..Default::default()
        }
    }

    const BODY: &[u8] =
        br#"{"id":"evt_1","n":7,"data":{"object":{"id":"obj_9"}},"list":["a"],"empty":""}"#;

    #[test]
    fn precedence_table() {
        let all = [
            ("x-my-id", "mine"),
            ("idempotency-key", "idem"),
            ("webhook-id", "wh"),
            ("x-github-delivery", "gh"),
            ("x-event-id", "ev"),
        ];
        let cases: Vec<(Option<&str>, Option<&str>, usize, &str)> = vec![
            // (id_header, pointer, headers skipped from the front, expected id)
            (Some("x-my-id"), Some("/id"), 0, "mine"),
            (Some("x-my-id"), Some("/id"), 1, "evt_1"),
            (None, Some("/data/object/id"), 0, "obj_9"),
            (None, Some("/n"), 0, "7"),
            (None, None, 0, "idem"),
            (None, None, 1, "idem"),
            (None, None, 2, "wh"),
            (None, None, 3, "gh"),
            (None, None, 4, "ev"),
            (Some("x-absent"), None, 1, "idem"),
        ];
        for (idh, ptr, skip, want) in cases {
            let h = headers(&all[skip..]);
            let k = derive("src", Some(&source(idh, ptr)), &h, BODY).unwrap();
            assert_eq!(k.0, format!("src:{want}"), "{idh:?} {ptr:?} skip={skip}");
        }
    }

    #[test]
    fn signed_ids_win_over_unsigned_headers() {
        let replayed = [
            ("idempotency-key", "fresh-each-time"),
            ("x-event-id", "also-fresh"),
            ("webhook-id", "msg_1"),
            ("x-github-delivery", "gh-1"),
        ];
        let h = headers(&replayed);
        let with = |verify| SourceSettings {
            verify,
            ..Default::default()
        };
        let body = br#"{"id":"evt_9","object":"event"}"#;
        let cases = [
            (SchemeKind::Standard, "s:msg_1"),
            (SchemeKind::Stripe, "s:evt_9"),
            (SchemeKind::None, "s:fresh-each-time"),
        ];
        for (verify, want) in cases {
            let k = derive("s", Some(&with(verify)), &h, body).unwrap();
            assert_eq!(k.0, want, "{verify:?}");
        }
        // GitHub signs the body only: its hash is the key, and a replay under
        // a fresh X-GitHub-Delivery is the same key.
        let github = with(SchemeKind::Github);
        let k = derive("s", Some(&github), &h, body).unwrap();
        assert_eq!(k, derive("s", None, &HeaderMap::new(), body).unwrap());
        let replayed = headers(&[("x-github-delivery", "gh-2")]);
        assert_eq!(k, derive("s", Some(&github), &replayed, body).unwrap());
        // hmac-sha256 signs only the body: its hash is the key, whatever the headers.
        let k = derive("s", Some(&with(SchemeKind::HmacSha256)), &h, b"hello").unwrap();
        assert_eq!(k, derive("s", None, &HeaderMap::new(), b"hello").unwrap());
        // A Stripe body without an id falls back to the body hash, not to a header.
        let k = derive("s", Some(&with(SchemeKind::Stripe)), &h, b"not json").unwrap();
        assert_eq!(
            k,
            derive("s", None, &HeaderMap::new(), b"not json").unwrap()
        );
    }

    #[test]
    fn body_hash_is_the_fallback() {
        let k = derive("s", None, &HeaderMap::new(), b"hello").unwrap();
        assert_eq!(
            k.0,
            "s:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        // Blank headers do not count as present.
        let k2 = derive("s", None, &headers(&[("idempotency-key", "  ")]), b"hello").unwrap();
        assert_eq!(k, k2);
    }

    #[test]
    fn json_pointer_errors() {
        let s = source(None, Some("/id"));
        let h = HeaderMap::new();
        assert_eq!(
            derive("s", Some(&s), &h, b"not json").unwrap_err(),
            Error::NotJson {
                pointer: "/id".into()
            }
        );
        for body in [
            &br#"{"other":1}"#[..],
            br#"{"id":""}"#,
            br#"{"id":{"a":1}}"#,
            br#"{"id":null}"#,
            b"[1]",
        ] {
            assert!(matches!(
                derive("s", Some(&s), &h, body),
                Err(Error::MissingBodyId { .. })
            ));
        }
        // RFC 6901 escapes.
        let s = source(None, Some("/a~1b/c~0d"));
        let k = derive("s", Some(&s), &h, br#"{"a/b":{"c~d":"x"}}"#).unwrap();
        assert_eq!(k.0, "s:x");
    }

    #[test]
    fn long_ids_are_hashed() {
        let long = "x".repeat(1000);
        let k = derive("s", None, &headers(&[("idempotency-key", &long)]), b"").unwrap();
        assert_eq!(k.0, format!("s:{}", sha256_hex(long.as_bytes())));
        let fits = "x".repeat(MAX_ID_BYTES);
        let k = derive("s", None, &headers(&[("idempotency-key", &fits)]), b"").unwrap();
        assert_eq!(k.0, format!("s:{fits}"));
    }

    #[test]
    fn ids_no_header_can_carry_are_hashed() {
        let s = source(None, Some("/id"));
        let h = HeaderMap::new();
        for id in [
            r"evt\u0001x",
            r"evt\nforged",
            r"evt\r",
            r"evt\u007f",
            r"a\tb",
            r"c1\u0085",
        ] {
            let body = format!(r#"{{"id":"{id}"}}"#);
            let k = derive("s", Some(&s), &h, body.as_bytes()).unwrap();
            let raw: serde_json::Value = serde_json::from_str(&body).unwrap();
            let raw = raw["id"].as_str().unwrap();
            assert_eq!(k.0, format!("s:{}", sha256_hex(raw.as_bytes())), "{id}");
            assert!(HeaderValue::from_str(&k.0).is_ok(), "{id}");
        }
        // Non-ASCII text is a valid header value (obs-text): kept as it is.
        let k = derive("s", Some(&s), &h, r#"{"id":"évt_1"}"#.as_bytes()).unwrap();
        assert_eq!(k.0, "s:évt_1");
        assert!(HeaderValue::from_bytes(k.0.as_bytes()).is_ok());
    }

    proptest! {
        #[test]
        fn never_panics(
            value in proptest::collection::vec(any::<u8>(), 0..64),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            pointer in "(/[a-z~0-9]{0,4}){0,3}",
        ) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_bytes(&value) {
                h.insert("idempotency-key", v.clone());
                h.insert("x-id", v);
            }
            let s = source(Some("x-id"), Some(&pointer));
            for k in [derive("s", Some(&s), &h, &body), derive("s", None, &h, &body)]
                .into_iter()
                .flatten()
            {
                prop_assert!(HeaderValue::from_bytes(k.0.as_bytes()).is_ok(), "{k}");
            }
        }
    }
}
