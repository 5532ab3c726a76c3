//! Helpers shared by the fuzz targets: a readable input format for headers
//! (so seeds and crash artifacts can be read and written by hand) and the
//! clock and random-number stand-ins.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame, parse_frame};
use http::{HeaderMap, HeaderName, HeaderValue};
use lapin::BasicProperties;

/// The basic class, as lapin sends it in every content header.
const BASIC_CLASS: u16 = 60;

/// Serialises the properties as lapin does when it publishes (`gen_frame` on a
/// content-header frame) and parses the bytes as lapin does on delivery.
pub fn wire_round_trip(props: &BasicProperties, body_size: u64) -> BasicProperties {
    let frame = AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: BASIC_CLASS,
            body_size,
            properties: props.clone(),
        },
    );
    let (bytes, _) = gen_frame(&frame)(WriteContext::from(Vec::new()))
        .expect("the generator refused hookq's properties")
        .into_inner();
    let (rest, parsed) = parse_frame(bytes.as_slice()).expect("the generated frame does not parse");
    assert!(rest.is_empty(), "{} bytes left after the frame", rest.len());
    match parsed {
        AMQPFrame::Header(1, h) => {
            assert_eq!(h.class_id, BASIC_CLASS);
            assert_eq!(h.body_size, body_size);
            h.properties
        }
        other => panic!("the generated frame parsed as {other}"),
    }
}

/// Whether `HOOKQ_FUZZ_DEBUG` is set: the targets then print what they
/// checked (handy with `cargo fuzz run TARGET ARTIFACT` to read a finding).
pub fn debug() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HOOKQ_FUZZ_DEBUG").is_some())
}

/// `eprintln!` when [`debug`] is on.
#[macro_export]
macro_rules! trace {
    ($($t:tt)*) => {
        if $crate::debug() {
            eprintln!($($t)*);
        }
    };
}

/// Splits `input` at the first `\n` (the line without it, and the rest).
pub fn line(input: &[u8]) -> (&[u8], &[u8]) {
    match input.iter().position(|&b| b == b'\n') {
        Some(i) => (&input[..i], &input[i + 1..]),
        None => (input, &[]),
    }
}

/// An HTTP-like header block: `name: value` lines up to an empty line, then the
/// body. Names and values are raw bytes (one space after the colon is dropped);
/// only what `HeaderName::from_bytes` / `HeaderValue::from_bytes` accept is
/// kept, in order, repeats included. A line without a colon is a name with an
/// empty value.
pub fn header_block(mut input: &[u8]) -> (HeaderMap, &[u8]) {
    let mut headers = HeaderMap::new();
    loop {
        if input.is_empty() {
            return (headers, input);
        }
        let (l, rest) = line(input);
        input = rest;
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        if l.is_empty() {
            return (headers, input);
        }
        let (name, value) = match l.iter().position(|&b| b == b':') {
            Some(i) => (&l[..i], &l[i + 1..]),
            None => (l, &[][..]),
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            headers.append(n, v);
        }
    }
}

/// Seconds (negative: before the epoch) and nanoseconds as a `SystemTime`;
/// `None` where the platform cannot represent it.
pub fn system_time(secs: i64, nanos: u32) -> Option<SystemTime> {
    let d = Duration::new(secs.unsigned_abs(), nanos % 1_000_000_000);
    if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(d)
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(d)
    }
}

/// A float in [0, 1) from 64 random bits, as `rand::random::<f64>()` makes it.
pub fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Big-endian integers from the front of the input, zero when it runs out.
pub struct Fixed<'a>(pub &'a [u8]);

impl<'a> Fixed<'a> {
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    pub fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes())
    }
    pub fn i64(&mut self) -> i64 {
        i64::from_be_bytes(self.bytes())
    }
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_block_keeps_repeats_and_the_body() {
        let (h, body) = header_block(b"X-A: 1\nx-a: 2\nbad name: x\nx-empty\n\nbody\n\nmore");
        assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
        assert_eq!(h["x-empty"], "");
        assert_eq!(h.len(), 3);
        assert_eq!(body, b"body\n\nmore");
    }
}

/// Every signature scheme, for targets that pick one from the input.
pub const KINDS: [hookq::ingress::verify::SchemeKind; 5] = {
    use hookq::ingress::verify::SchemeKind;
    [
        SchemeKind::None,
        SchemeKind::Github,
        SchemeKind::Stripe,
        SchemeKind::Standard,
        SchemeKind::HmacSha256,
    ]
};

/// A webhook request as the fuzz targets of the ingress read it: four lines
/// (source, verify kind, id_header, id_json_pointer; an empty line is "not
/// set"), then `name: value` header lines, an empty line, and the body.
pub struct Request<'a> {
    /// A name `config::valid_source_name` accepts (the router refuses others).
    pub source: String,
    pub settings: hookq::config::SourceSettings,
    pub headers: HeaderMap,
    pub body: &'a [u8],
}

impl<'a> Request<'a> {
    pub fn parse(data: &'a [u8]) -> Self {
        let (source, rest) = line(data);
        let (verify, rest) = line(rest);
        let (id_header, rest) = line(rest);
        let (pointer, rest) = line(rest);
        let (headers, body) = header_block(rest);
        let source = source_name(source);
        assert!(hookq::config::valid_source_name(&source));
        let settings = hookq::config::SourceSettings {
            verify: kind(verify),
            id_header: optional(id_header),
            id_json_pointer: optional(pointer),
            ..Default::default()
        };
        Self {
            source,
            settings,
            headers,
            body,
        }
    }
}

/// 1 to 64 of `[a-z0-9_-]`, from any bytes.
fn source_name(raw: &[u8]) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_-";
    let s: String = raw
        .iter()
        .take(64)
        .map(|&b| {
            if ALPHABET.contains(&b) {
                char::from(b)
            } else {
                char::from(ALPHABET[usize::from(b) % ALPHABET.len()])
            }
        })
        .collect();
    if s.is_empty() { "s".into() } else { s }
}

fn kind(raw: &[u8]) -> hookq::ingress::verify::SchemeKind {
    use hookq::ingress::verify::SchemeKind;
    match raw {
        b"" | b"none" => SchemeKind::None,
        b"github" => SchemeKind::Github,
        b"stripe" => SchemeKind::Stripe,
        b"standard" => SchemeKind::Standard,
        b"hmac-sha256" => SchemeKind::HmacSha256,
        other => KINDS[usize::from(other[0]) % KINDS.len()],
    }
}

fn optional(raw: &[u8]) -> Option<String> {
    (!raw.is_empty()).then(|| String::from_utf8_lossy(raw).into_owned())
}
