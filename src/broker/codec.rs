//! Envelope <-> AMQP properties and headers, as the SPEC's "Message on the broker"
//! says. Decoding is strict about what hookq needs (source, key, message id) and
//! lenient about the rest, because dead letters may have been touched by hand.

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::message::{DeadInfo, DeadReason, DedupKey, Envelope, MessageId, header};

/// Why a delivery could not be read as a hookq message (it ends in `P.dead` as `invalid`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a hookq message: {0}")]
pub struct DecodeError(pub String);

fn ls(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

pub fn encode(env: &Envelope) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert(header::SOURCE.into(), ls(&env.source));
    h.insert(header::KEY.into(), ls(&env.key.0));
    h.insert(
        header::ATTEMPTS.into(),
        AMQPValue::LongLongInt(env.attempts.into()),
    );
    h.insert(header::RECEIVED_AT.into(), ls(&env.received_at));
    let mut fwd = FieldTable::default();
    for (k, v) in &env.headers {
        // Repeated request headers are joined, as HTTP allows for most fields.
        let value = match fwd.inner().get(k.as_str()) {
            Some(AMQPValue::LongString(prev)) => {
                format!("{}, {v}", String::from_utf8_lossy(prev.as_bytes()))
            }
            _ => v.clone(),
        };
        fwd.insert(ShortString::from(k.as_str()), ls(&value));
    }
    h.insert(header::HEADERS.into(), AMQPValue::FieldTable(fwd));
    if let Some(d) = &env.dead {
        h.insert(header::DEAD_REASON.into(), ls(d.reason.as_str()));
        h.insert(header::LAST_ERROR.into(), ls(&d.last_error));
        if let Some(s) = d.last_status {
            h.insert(header::LAST_STATUS.into(), AMQPValue::LongLongInt(s.into()));
        }
        h.insert(header::DEAD_AT.into(), ls(&d.dead_at));
    }
    if let Some(p) = &env.previous_dead_reason {
        h.insert(header::PREVIOUS_DEAD_REASON.into(), ls(p));
    }
    if let Some(t) = env.not_before {
        h.insert(header::NOT_BEFORE.into(), AMQPValue::LongLongInt(t as i64));
    }
    if env.shovelled > 0 {
        h.insert(
            header::SHOVELLED.into(),
            AMQPValue::LongLongInt(env.shovelled.into()),
        );
    }
    let mut p = BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(env.message_id.0.as_str().into())
        .with_timestamp(env.timestamp)
        .with_headers(h);
    if let Some(ct) = &env.content_type {
        p = p.with_content_type(ct.as_str().into());
    }
    p
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

pub fn decode(props: &BasicProperties, body: Vec<u8>) -> Result<Envelope, DecodeError> {
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
    let headers = match h.inner().get(header::HEADERS) {
        Some(AMQPValue::FieldTable(t)) => t
            .inner()
            .keys()
            .filter_map(|k| text(t, k.as_str()).map(|v| (k.as_str().to_string(), v)))
            .collect(),
        _ => Vec::new(),
    };
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
    })
}

/// An envelope for a delivery that is not a hookq message, so that it can be
/// parked in `P.dead` as `invalid` with its body and content type intact.
pub fn stand_in(props: &BasicProperties, body: Vec<u8>) -> Envelope {
    use sha2::Digest;
    let key = DedupKey(format!(
        "invalid:{}",
        hex::encode(sha2::Sha256::digest(&body))
    ));
    let mut env = Envelope::received("invalid", key, body, None, Vec::new());
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

    #[test]
    fn round_trip_keeps_every_field() {
        let mut env = Envelope::received(
            "github",
            DedupKey("github:42".into()),
            b"{\"a\":1}".to_vec(),
            Some("application/json".into()),
            vec![("x-a".into(), "1".into()), ("x-a".into(), "2".into())],
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
        let back = decode(&encode(&env), env.body.clone()).unwrap();
        assert_eq!(back.headers, vec![("x-a".to_string(), "1, 2".to_string())]);
        let mut expected = env.clone();
        expected.headers = back.headers.clone();
        assert_eq!(back, expected);
    }

    #[test]
    fn missing_headers_are_a_decode_error() {
        let p = BasicProperties::default().with_message_id("m".into());
        assert!(decode(&p, vec![]).is_err());
    }
}
