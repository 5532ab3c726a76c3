//! The idempotency key from a request's headers and body, for every verify
//! kind, with and without a configured id header and JSON pointer.
//!
//! It must never panic, and a key (when there is one) is `SOURCE:ID` with the
//! id bounded (over 256 bytes it is replaced by `sha256:<hex>`), so it stays
//! small in SQLite and in AMQP headers whatever a client sends.

#![no_main]

use hookq::config::SourceSettings;
use hookq::ingress::key::derive;
use hookq::ingress::verify::SchemeKind;
use hookq_fuzz::{KINDS, header_block, line};
use libfuzzer_sys::fuzz_target;

/// The longest id kept as it is (`MAX_ID_BYTES` in ingress/key.rs).
const MAX_ID_BYTES: usize = 256;

/// A name `config::valid_source_name` accepts: 1 to 64 of `[a-z0-9_-]`.
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

fn kind(raw: &[u8]) -> SchemeKind {
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

fuzz_target!(|data: &[u8]| {
    // Input: four lines (source, verify kind, id_header, id_json_pointer; an
    // empty line is "not set"), then `name: value` header lines, an empty
    // line, and the body.
    let (source, rest) = line(data);
    let (verify, rest) = line(rest);
    let (id_header, rest) = line(rest);
    let (pointer, rest) = line(rest);
    let (headers, body) = header_block(rest);
    let source = source_name(source);
    assert!(hookq::config::valid_source_name(&source));
    let settings = SourceSettings {
        verify: kind(verify),
        id_header: optional(id_header),
        id_json_pointer: optional(pointer),
        ..Default::default()
    };

    let first = derive(&source, Some(&settings), &headers, body);
    hookq_fuzz::trace!("{settings:?} {headers:?}: {first:?}");
    let again = derive(&source, Some(&settings), &headers, body);
    assert_eq!(first, again, "derive is not deterministic");
    if let Ok(key) = first {
        let prefix = format!("{source}:");
        assert!(
            key.0.starts_with(&prefix),
            "{:?} does not start with {prefix:?}",
            key.0
        );
        let id = &key.0[prefix.len()..];
        assert!(!id.is_empty(), "empty id in {:?}", key.0);
        assert!(
            id.len() <= MAX_ID_BYTES,
            "an id of {} bytes was not bounded: {:?}",
            id.len(),
            key.0
        );
        assert!(key.0.len() <= 64 + 1 + MAX_ID_BYTES);
    }
    // Without settings (an unknown source) there is always a key.
    let plain = derive(&source, None, &headers, body).expect("no settings, no error");
    assert!(plain.0.starts_with(&format!("{source}:")));
    assert!(plain.0.len() <= 64 + 1 + MAX_ID_BYTES);
});
