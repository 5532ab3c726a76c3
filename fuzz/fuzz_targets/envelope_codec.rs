//! The envelope codec against what the broker hands back and what hookq writes.
//!
//! The first input byte picks a mode:
//! - 0: the rest is AMQP wire bytes, a content-header frame (optionally followed
//!   by a body frame), parsed with amq-protocol's own frame parser, exactly what
//!   lapin does with a delivery;
//! - 1: the rest is a basic-properties block (flags + properties), no framing;
//! - 2: the rest is a field table, used as the headers of a message with a
//!   message id (the shortest way to hookq's own headers);
//! - anything else: the rest is structured input (`arbitrary`) for an envelope
//!   that hookq encodes, serialises as a content-header frame with the generator
//!   lapin publishes with, parses back and decodes.
//!
//! Decoding must never panic. A delivery that decodes must survive a republish
//! (encode -> wire -> decode) unchanged, as the shovel and the delay tiers do;
//! one that does not must get a stand-in that survives the same trip.

#![no_main]

use amq_protocol::frame::{AMQPFrame, parse_frame};
use amq_protocol::protocol::basic::parse_properties;
use amq_protocol::types::parsing::parse_field_table;
use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use hookq::broker::codec::{decode, encode, stand_in};
use hookq::message::{DeadInfo, DeadReason, DedupKey, Envelope, MessageId};
use hookq_fuzz::wire_round_trip;
use http::{HeaderMap, HeaderName, HeaderValue};
use lapin::BasicProperties;
use libfuzzer_sys::fuzz_target;

/// A short string's limit (content type and message id are short strings).
const SHORT: usize = 255;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode {
        0 => {
            if let Ok((after, AMQPFrame::Header(_, header))) = parse_frame(rest) {
                // A body frame may follow the header, as on a real channel.
                let body = match parse_frame(after) {
                    Ok((_, AMQPFrame::Body(_, b))) => Bytes::from(b),
                    _ => Bytes::copy_from_slice(after),
                };
                decode_side(&header.properties, body);
            }
        }
        1 => {
            if let Ok((after, props)) = parse_properties(rest) {
                decode_side(&props, Bytes::copy_from_slice(after));
            }
        }
        2 => {
            if let Ok((after, table)) = parse_field_table(rest) {
                let props = BasicProperties::default()
                    .with_message_id("0190f1d2-0000-7000-8000-000000000000".into())
                    .with_headers(table);
                decode_side(&props, Bytes::copy_from_slice(after));
            }
        }
        _ => {
            if let Ok(input) = EncodeInput::arbitrary_take_rest(Unstructured::new(rest)) {
                encode_side(input);
            }
        }
    }
});

/// What the worker does with a delivery: decode, or park a stand-in.
fn decode_side(props: &BasicProperties, body: Bytes) {
    let decoded = decode(props, body.clone());
    hookq_fuzz::trace!("{props:?}\n-> {decoded:?}");
    match decoded {
        Ok(env) => {
            assert_eq!(env.body, body, "decode changed the body");
            let back = republish(&env).expect("a decoded envelope lost its message id");
            assert_eq!(back, env, "a decoded envelope changed on republish");
        }
        Err(_) => {
            let env = stand_in(props, body.clone());
            assert_eq!(env.body, body, "the stand-in changed the body");
            assert_eq!(env.source, "invalid");
            assert!(env.key.0.starts_with("invalid:"), "{}", env.key);
            let back = republish(&env).expect("a stand-in did not decode");
            assert_eq!(
                back, env,
                "a stand-in changed on its way to the dead letters"
            );
        }
    }
}

/// encode -> content-header frame bytes -> parse -> decode.
fn republish(env: &Envelope) -> Result<Envelope, hookq::broker::codec::DecodeError> {
    let props = encode(env);
    let parsed = wire_round_trip(&props, env.body.len() as u64);
    assert_eq!(parsed, props, "the properties changed on the wire");
    let direct = decode(&props, env.body.clone());
    let back = decode(&parsed, env.body.clone());
    assert_eq!(back, direct, "the wire changed what decodes");
    back
}

/// A string the fuzzer can cheaply make long: the text repeated 1..=64 times
/// (past the 255 bytes of a short string from a few bytes of input).
#[derive(Debug)]
struct Stretch(String);

impl<'a> Arbitrary<'a> for Stretch {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let times = usize::from(u.arbitrary::<u8>()? % 64) + 1;
        let s: String = u.arbitrary()?;
        Ok(Self(s.repeat(times)))
    }
}

#[derive(Arbitrary, Debug)]
struct Dead {
    reason: u8,
    last_error: String,
    last_status: Option<u16>,
    dead_at: String,
}

#[derive(Arbitrary, Debug)]
struct EncodeInput<'a> {
    message_id: Option<Stretch>,
    content_type: Option<Stretch>,
    timestamp: u64,
    source: Stretch,
    key: Stretch,
    attempts: u32,
    received_at: String,
    dead: Option<Dead>,
    previous_dead_reason: Option<String>,
    shovelled: u32,
    not_before: Option<u64>,
    partition: Option<u32>,
    headers: Vec<(Stretch, &'a [u8])>,
    body: &'a [u8],
}

fn encode_side(input: EncodeInput<'_>) {
    let mut headers = HeaderMap::new();
    for (name, value) in &input.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.0.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    let reasons = [
        DeadReason::MaxAttempts,
        DeadReason::Rejected,
        DeadReason::DeliveryLimit,
        DeadReason::Invalid,
    ];
    let message_id = input
        .message_id
        .map_or_else(MessageId::new, |m| MessageId(m.0));
    // Built from `received` (so a field added to Envelope later keeps its
    // default here rather than breaking the build), then every field set.
    let mut env = Envelope::received(
        &input.source.0,
        DedupKey(input.key.0),
        Bytes::copy_from_slice(input.body),
        input.content_type.map(|c| c.0),
        headers,
    );
    env.message_id = message_id;
    env.timestamp = input.timestamp;
    env.attempts = input.attempts;
    env.received_at = input.received_at;
    env.dead = input.dead.map(|d| DeadInfo {
        reason: reasons[usize::from(d.reason) % reasons.len()],
        last_error: d.last_error,
        last_status: d.last_status,
        dead_at: d.dead_at,
    });
    env.previous_dead_reason = input.previous_dead_reason;
    env.shovelled = input.shovelled;
    env.not_before = input.not_before;
    env.partition = input.partition;

    // What must come back: everything, except what AMQP cannot carry. A content
    // type over 255 bytes is not a property (it travels in hookq-headers), and
    // not_before is an AMQP long-long (signed), saturated at i64::MAX.
    let mut want = env.clone();
    if want.content_type.as_ref().is_some_and(|c| c.len() > SHORT) {
        want.content_type = None;
    }
    if let Some(t) = want.not_before.as_mut() {
        *t = (*t).min(i64::MAX as u64);
    }

    let back = republish(&env);
    hookq_fuzz::trace!("{env:?}\n-> {back:?}");
    if env.message_id.0.len() > SHORT {
        // The message id property is a short string: without it the delivery
        // is not a hookq message, and decoding must say so, not panic.
        assert!(back.is_err(), "an over-long message id decoded: {back:?}");
    } else {
        let back = back.expect("hookq's own message did not decode");
        assert_eq!(back.headers, want.headers, "headers changed");
        assert_eq!(back.body, want.body, "body changed");
        assert_eq!(back.key, want.key, "key changed");
        assert_eq!(back.source, want.source, "source changed");
        assert_eq!(back.attempts, want.attempts, "attempts changed");
        assert_eq!(back.content_type, want.content_type, "content type changed");
        assert_eq!(back, want, "the envelope changed");
    }
}
