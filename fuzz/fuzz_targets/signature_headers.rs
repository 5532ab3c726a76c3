//! Signature verification over hostile headers, for every scheme.
//!
//! Input: a fixed 29-byte prefix (big-endian: `now` seconds as i64, its
//! nanoseconds as u32, the tolerance in ms as u64, a mode byte, then a
//! timestamp as i64), then the HMAC secret up to `\n`, then `name: value`
//! header lines, an empty line and the body.
//!
//! Mode bit 0 clear (unsigned): the headers as given are checked by every
//! scheme (x-hub-signature-256, stripe-signature, webhook-id,
//! webhook-timestamp, webhook-signature, x-signature), with an arbitrary clock
//! (before the epoch too) and tolerance. Nothing may panic, and `none`
//! accepts everything.
//!
//! Mode bit 0 set (signed): the request is signed as the provider signs it
//! (scheme from bits 1-2: github, stripe, standard, hmac-sha256; bit 3: sign
//! another body; bit 4: `sha256=` before an hmac-sha256 tag; bit 5: upper-case
//! hex; bit 6: the timestamp is `now` plus the low 32 bits of the prefix's
//! timestamp as an i32, else the timestamp as u64), so the accepting paths are
//! reached: accepted when its timestamp is in the window (`Stale` / `Future`
//! otherwise), refused as `Mismatch` when the body signed is not the body sent.

#![no_main]

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use hookq::ingress::verify::{Error, SchemeKind, Verifier};
use hookq_fuzz::{Fixed, KINDS, header_block, line, system_time};
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const STD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const HMAC_HEADER: &str = "x-signature";
/// Every header a scheme reads.
const READ: [&str; 6] = [
    "x-hub-signature-256",
    "stripe-signature",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    HMAC_HEADER,
];

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    let v = HeaderValue::from_str(value).expect("a signature header is visible ASCII");
    h.insert(HeaderName::from_static(name), v);
}

/// What the window should say: milliseconds, both directions.
fn in_window(ts: u64, now: SystemTime, tolerance: Duration) -> Result<(), Error> {
    let now = match now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i128,
        Err(e) => -(e.duration().as_millis() as i128),
    };
    let (ts, tol) = (i128::from(ts) * 1000, tolerance.as_millis() as i128);
    if now - ts > tol {
        Err(Error::Stale)
    } else if ts - now > tol {
        Err(Error::Future)
    } else {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut fixed = Fixed(data);
    let now_secs = fixed.i64();
    let now_nanos = fixed.u32();
    let tolerance = Duration::from_millis(fixed.u64());
    let mode = fixed.u8();
    let ts_field = fixed.i64();
    let (secret, rest) = line(fixed.rest());
    let (mut headers, body) = header_block(rest);
    let Some(now) = system_time(now_secs, now_nanos) else {
        return;
    };
    let secret = String::from_utf8_lossy(secret);
    let secret = if secret.is_empty() { "s" } else { &*secret };
    let verifier = |kind| {
        let secret = if kind == SchemeKind::Standard {
            STD_SECRET
        } else {
            secret
        };
        Verifier::new(kind, Some(secret), Some(HMAC_HEADER), tolerance)
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"))
    };

    if mode & 1 == 0 {
        for kind in KINDS {
            let r = verifier(kind).verify(&headers, body, now);
            hookq_fuzz::trace!("unsigned {kind:?}: {r:?}");
            if kind == SchemeKind::None {
                assert_eq!(r, Ok(()));
            } else if !READ.iter().any(|h| headers.contains_key(*h)) {
                assert!(matches!(r, Err(Error::MissingHeader(_))), "{kind:?}: {r:?}");
            }
        }
        // The Standard secret parser, on arbitrary text (a config value).
        if let Ok(v) = Verifier::new(SchemeKind::Standard, Some(secret), None, tolerance) {
            let _ = v.verify(&headers, body, now);
        }
        return;
    }

    let kind = KINDS[1 + usize::from((mode >> 1) & 3)];
    let tamper = mode & 8 != 0;
    let (prefixed, upper) = (mode & 16 != 0, mode & 32 != 0);
    let ts = if mode & 64 != 0 {
        let offset = i128::from(ts_field as i32);
        (i128::from(now_secs) + offset).clamp(0, u64::MAX.into()) as u64
    } else {
        ts_field as u64
    };
    // What the sender signed: the body, or another one when tampered with.
    let mut signed = body.to_vec();
    if tamper {
        signed.push(b'!');
    }
    let hex_of = |tag: &[u8]| {
        let h = hex::encode(tag);
        if upper { h.to_uppercase() } else { h }
    };
    let mut timed = None;
    match kind {
        SchemeKind::Github => {
            let tag = hex_of(&mac(secret.as_bytes(), &[&signed]));
            set(
                &mut headers,
                "x-hub-signature-256",
                &format!("sha256={tag}"),
            );
        }
        SchemeKind::HmacSha256 => {
            let tag = hex_of(&mac(secret.as_bytes(), &[&signed]));
            let value = if prefixed {
                format!("sha256={tag}")
            } else {
                tag
            };
            set(&mut headers, HMAC_HEADER, &value);
        }
        SchemeKind::Stripe => {
            let t = ts.to_string();
            let tag = hex_of(&mac(secret.as_bytes(), &[t.as_bytes(), b".", &signed]));
            set(&mut headers, "stripe-signature", &format!("t={t},v1={tag}"));
            timed = Some(ts);
        }
        SchemeKind::Standard => {
            let key = B64
                .decode(STD_SECRET.trim_start_matches("whsec_"))
                .expect("the test secret is base64");
            // The id the request carries (as text, without the whitespace a
            // header value cannot have on the wire), else a fixed one.
            let id = headers
                .get("webhook-id")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .unwrap_or("msg_1")
                .to_string();
            let t = ts.to_string();
            let tag = mac(&key, &[id.as_bytes(), b".", t.as_bytes(), b".", &signed]);
            set(&mut headers, "webhook-id", &id);
            set(&mut headers, "webhook-timestamp", &t);
            set(
                &mut headers,
                "webhook-signature",
                &format!("v1,{}", B64.encode(tag)),
            );
            timed = Some(ts);
        }
        SchemeKind::None => unreachable!(),
    }
    let r = verifier(kind).verify(&headers, body, now);
    hookq_fuzz::trace!("signed {kind:?} tamper={tamper} ts={ts} headers={headers:?}: {r:?}");
    match timed.map_or(Ok(()), |t| in_window(t, now, tolerance)) {
        Err(e) => assert_eq!(r, Err(e), "{kind:?}: the window"),
        Ok(()) if tamper => assert_eq!(r, Err(Error::Mismatch), "{kind:?}: another body"),
        Ok(()) => assert_eq!(
            r,
            Ok(()),
            "{kind:?}: a correctly signed request was refused"
        ),
    }
});
