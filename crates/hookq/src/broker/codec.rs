//! Envelope <-> AMQP properties and headers, as the SPEC's "Message on the broker"
//! says. Decoding is strict about what hookq needs (source, key, message id) and
//! lenient about the rest, because dead letters may have been touched by hand.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::message::{DeadInfo, DeadReason, DedupKey, Envelope, MessageId, header};

/// Why a delivery could not be read as a hookq message (it ends in `P.dead` as `invalid`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a hookq message: {0}")]
pub struct DecodeError(pub String);

fn ls(s: impl Into<Vec<u8>>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Adds one of hookq's own headers. Every name is a short constant, so
/// `try_new` cannot fail; going through it keeps the encoder free of the
/// panicking `ShortString::from`.
fn put(h: &mut FieldTable, name: &'static str, value: AMQPValue) {
    if let Ok(k) = ShortString::try_new(name) {
        h.insert(k, value);
    }
}

/// The forwarded request headers as one long string in HTTP/1.1 field form
/// (`name: value` and CRLF for each, in order, repeated names repeated, values
/// byte for byte; the fields of a repeated name stay together at its first
/// place, as the HTTP parser's header map keeps them, which changes no meaning
/// in HTTP): it reads as text in the RabbitMQ UI, carries names longer
/// than a table key's 255 bytes and values that are not UTF-8, and a quorum
/// queue confirms it faster than a table of pairs. A header value cannot hold
/// CR or LF, so the form splits back unambiguously.
fn encode_headers(headers: &HeaderMap) -> AMQPValue {
    let len: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    let mut text = Vec::with_capacity(len);
    for (k, v) in headers {
        text.extend_from_slice(k.as_str().as_bytes());
        text.extend_from_slice(b": ");
        text.extend_from_slice(v.as_bytes());
        text.extend_from_slice(b"\r\n");
    }
    ls(text)
}

pub fn encode(env: &Envelope) -> BasicProperties {
    let mut h = FieldTable::default();
    put(&mut h, header::SOURCE, ls(env.source.as_str()));
    put(&mut h, header::KEY, ls(env.key.0.as_str()));
    put(
        &mut h,
        header::ATTEMPTS,
        AMQPValue::LongLongInt(env.attempts.into()),
    );
    put(&mut h, header::RECEIVED_AT, ls(env.received_at.as_str()));
    put(&mut h, header::HEADERS, encode_headers(&env.headers));
    if let Some(d) = &env.dead {
        put(&mut h, header::DEAD_REASON, ls(d.reason.as_str()));
        put(&mut h, header::LAST_ERROR, ls(d.last_error.as_str()));
        if let Some(s) = d.last_status {
            put(
                &mut h,
                header::LAST_STATUS,
                AMQPValue::LongLongInt(s.into()),
            );
        }
        put(&mut h, header::DEAD_AT, ls(d.dead_at.as_str()));
    }
    if let Some(p) = &env.previous_dead_reason {
        put(&mut h, header::PREVIOUS_DEAD_REASON, ls(p.as_str()));
    }
    if let Some(t) = env.not_before {
        put(
            &mut h,
            header::NOT_BEFORE,
            AMQPValue::LongLongInt(i64::try_from(t).unwrap_or(i64::MAX)),
        );
    }
    if let Some(i) = env.partition {
        // Text, as the return exchange's bindings match it.
        put(&mut h, header::PARTITION, ls(i.to_string()));
    }
    if env.probe {
        put(&mut h, header::PROBE, AMQPValue::Boolean(true));
    }
    if env.shovelled > 0 {
        put(
            &mut h,
            header::SHOVELLED,
            AMQPValue::LongLongInt(env.shovelled.into()),
        );
    }
    let mut p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_timestamp(env.timestamp)
        .with_headers(h);
    // Both are short strings in AMQP. A message id is a UUID or was read from
    // a short string; a Content-Type may be longer, and then travels only in
    // hookq-headers (where the delivery takes it from anyway).
    if let Ok(id) = ShortString::try_new(env.message_id.0.as_str()) {
        p = p.with_message_id(id);
    }
    if let Some(ct) = env.content_type.as_deref()
        && let Ok(ct) = ShortString::try_new(ct)
    {
        p = p.with_content_type(ct);
    }
    p
}

/// The bytes of a string-like AMQP value.
fn bytes_of(v: &AMQPValue) -> Option<&[u8]> {
    match v {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => Some(b.as_slice()),
        _ => None,
    }
}

/// hookq-headers back into a header map: one string in field form (this
/// version), or what earlier versions wrote: `[name, value]` pairs, or a
/// table. What is not a valid header is skipped: it cannot be sent on anyway.
fn decode_headers(v: Option<&AMQPValue>) -> HeaderMap {
    let mut out = HeaderMap::new();
    let mut add = |name: &[u8], value: &[u8]| {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            out.append(n, v);
        }
    };
    match v {
        Some(AMQPValue::LongString(text)) => {
            for field in text.as_bytes().split(|b| *b == b'\n') {
                let field = field.strip_suffix(b"\r").unwrap_or(field);
                if let Some(colon) = field.iter().position(|b| *b == b':') {
                    let value = &field[colon + 1..];
                    add(&field[..colon], value.strip_prefix(b" ").unwrap_or(value));
                }
            }
        }
        Some(AMQPValue::FieldArray(pairs)) => {
            for pair in pairs.as_slice() {
                if let AMQPValue::FieldArray(kv) = pair
                    && let [k, v] = kv.as_slice()
                    && let (Some(k), Some(v)) = (bytes_of(k), bytes_of(v))
                {
                    add(k, v);
                }
            }
        }
        Some(AMQPValue::FieldTable(t)) => {
            for (k, v) in t.inner() {
                if let Some(v) = bytes_of(v) {
                    add(k.as_str().as_bytes(), v);
                }
            }
        }
        _ => {}
    }
    out
}

/// A header as text, whatever AMQP string or number type carries it.
pub fn text(h: &FieldTable, name: &str) -> Option<String> {
    match h.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        v => number(v).map(|n| n.to_string()),
    }
}

fn number(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()?
            .trim()
            .parse()
            .ok()?,
        _ => return None,
    })
}

fn count(h: &FieldTable, name: &str) -> u32 {
    h.inner()
        .get(name)
        .and_then(number)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

/// The `x-death` reason the broker gave, for dead letters hookq did not write
/// (the work queue's delivery-limit safety net).
fn broker_death_reason(h: &FieldTable) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = h.inner().get("x-death")? else {
        return None;
    };
    deaths.as_slice().iter().find_map(|d| match d {
        AMQPValue::FieldTable(t) => text(t, "reason"),
        _ => None,
    })
}

pub fn decode(props: &BasicProperties, body: Bytes) -> Result<Envelope, DecodeError> {
    let empty = FieldTable::default();
    let h = props.headers().as_ref().unwrap_or(&empty);
    let source =
        text(h, header::SOURCE).ok_or_else(|| DecodeError("no hookq-source header".into()))?;
    let key = text(h, header::KEY).ok_or_else(|| DecodeError("no hookq-key header".into()))?;
    let message_id = props
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_string())
        .ok_or_else(|| DecodeError("no message_id property".into()))?;
    let headers = decode_headers(h.inner().get(header::HEADERS));
    let dead = text(h, header::DEAD_REASON)
        .and_then(|r| DeadReason::parse(&r))
        .or_else(|| {
            // The broker's own dead-lettering (delivery limit) leaves no hookq header.
            broker_death_reason(h)
                .filter(|r| r == "delivery_limit")
                .map(|_| DeadReason::DeliveryLimit)
        })
        .map(|reason| DeadInfo {
            reason,
            last_error: text(h, header::LAST_ERROR).unwrap_or_default(),
            last_status: h
                .inner()
                .get(header::LAST_STATUS)
                .and_then(number)
                .and_then(|n| u16::try_from(n).ok()),
            dead_at: text(h, header::DEAD_AT).unwrap_or_default(),
        });
    Ok(Envelope {
        message_id: MessageId(message_id),
        body,
        content_type: props
            .content_type()
            .as_ref()
            .map(|c| c.as_str().to_string()),
        timestamp: props.timestamp().unwrap_or(0),
        source,
        key: DedupKey(key),
        attempts: count(h, header::ATTEMPTS),
        received_at: text(h, header::RECEIVED_AT).unwrap_or_default(),
        headers,
        dead,
        previous_dead_reason: text(h, header::PREVIOUS_DEAD_REASON),
        shovelled: count(h, header::SHOVELLED),
        not_before: h
            .inner()
            .get(header::NOT_BEFORE)
            .and_then(number)
            .and_then(|n| u64::try_from(n).ok()),
        partition: text(h, header::PARTITION).and_then(|p| p.trim().parse().ok()),
        probe: matches!(h.inner().get(header::PROBE), Some(AMQPValue::Boolean(true))),
    })
}

/// An envelope for a delivery that is not a hookq message, so that it can be
/// parked in `P.dead` as `invalid` with its body and content type intact.
pub fn stand_in(props: &BasicProperties, body: Bytes) -> Envelope {
    use sha2::Digest;
    let key = DedupKey(format!(
        "invalid:{}",
        hex::encode(sha2::Sha256::digest(&body))
    ));
    let mut env = Envelope::received("invalid", key, body, None, HeaderMap::new());
    if let Some(m) = props.message_id() {
        env.message_id = MessageId(m.as_str().to_string());
    }
    env.content_type = props
        .content_type()
        .as_ref()
        .map(|c| c.as_str().to_string());
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_bytes(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let long_name = format!("x-{}", "n".repeat(300));
        let mut env = Envelope::received(
            "github",
            DedupKey("github:42".into()),
            Bytes::from_static(b"{\"a\":1}"),
            Some("application/json".into()),
            headers(&[
                ("x-a", b"1"),
                ("x-a", b"2"),
                ("x-latin1", b"caf\xe9"),
                (&long_name, b"v"),
            ]),
        );
        env.attempts = 3;
        env.dead = Some(DeadInfo {
            reason: DeadReason::Rejected,
            last_error: "HTTP 400".into(),
            last_status: Some(400),
            dead_at: "2026-01-01T00:00:00.000Z".into(),
        });
        env.previous_dead_reason = Some("max_attempts".into());
        env.shovelled = 2;
        env.not_before = Some(1_700_000_000_000);
        env.partition = Some(7);
        let back = decode(&encode(&env), env.body.clone()).unwrap();
        assert_eq!(back, env);
        let a: Vec<_> = back.headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert_eq!(back.headers["x-latin1"].as_bytes(), b"caf\xe9");
    }

    #[test]
    fn a_content_type_too_long_for_the_property_is_left_to_the_headers() {
        let ct = format!("application/json; x={}", "a".repeat(300));
        let env = Envelope::received(
            "s",
            DedupKey("s:1".into()),
            Bytes::new(),
            Some(ct.clone()),
            headers(&[("content-type", ct.as_bytes())]),
        );
        let props = encode(&env);
        assert!(props.content_type().is_none());
        let back = decode(&props, Bytes::new()).unwrap();
        assert_eq!(back.headers["content-type"].as_bytes(), ct.as_bytes());
    }

    #[test]
    fn headers_travel_as_one_string_in_field_form() {
        let env = Envelope::received(
            "s",
            DedupKey("s:1".into()),
            Bytes::new(),
            None,
            headers(&[("x-a", b"1"), ("x-b", b"two words"), ("x-a", b"2")]),
        );
        let props = encode(&env);
        let h = props.headers().as_ref().unwrap();
        assert_eq!(
            text(h, header::HEADERS).unwrap(),
            "x-a: 1\r\nx-a: 2\r\nx-b: two words\r\n",
            "a repeated name's fields stay together, at its first place (as the \
             HTTP parser's header map keeps them)"
        );
    }

    #[test]
    fn headers_written_as_pairs_by_earlier_versions_still_decode() {
        let pair = |k: &str, v: &[u8]| AMQPValue::FieldArray(FieldArray::from(vec![ls(k), ls(v)]));
        let mut h = FieldTable::default();
        h.insert(header::SOURCE.into(), ls("s"));
        h.insert(header::KEY.into(), ls("s:1"));
        h.insert(
            header::HEADERS.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                pair("x-a", b"1"),
                pair("x-a", b"2"),
                pair("x-latin1", b"caf\xe9"),
            ])),
        );
        let p = BasicProperties::default()
            .with_message_id("m".into())
            .with_headers(h);
        let env = decode(&p, Bytes::new()).unwrap();
        let a: Vec<_> = env.headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["1", "2"]);
        assert_eq!(env.headers["x-latin1"].as_bytes(), b"caf\xe9");
    }

    #[test]
    fn headers_written_as_a_table_by_earlier_versions_still_decode() {
        let mut old = FieldTable::default();
        old.insert("x-old".into(), ls("v"));
        let mut h = FieldTable::default();
        h.insert(header::SOURCE.into(), ls("s"));
        h.insert(header::KEY.into(), ls("s:1"));
        h.insert(header::HEADERS.into(), AMQPValue::FieldTable(old));
        let p = BasicProperties::default()
            .with_message_id("m".into())
            .with_headers(h);
        let env = decode(&p, Bytes::new()).unwrap();
        assert_eq!(env.headers["x-old"], "v");
    }

    #[test]
    fn missing_headers_are_a_decode_error() {
        let p = BasicProperties::default().with_message_id("m".into());
        assert!(decode(&p, Bytes::new()).is_err());
    }
}
