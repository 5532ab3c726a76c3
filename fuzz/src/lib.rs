//! Helpers shared by the fuzz targets: a readable input format for headers
//! (so seeds and crash artifacts can be read and written by hand) and the
//! clock and random-number stand-ins.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};

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
