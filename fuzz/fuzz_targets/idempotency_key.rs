//! The idempotency key from a request's headers and body, for every verify
//! kind, with and without a configured id header and JSON pointer.
//!
//! It must never panic, and a key (when there is one) is `SOURCE:ID` with the
//! id bounded (over 256 bytes, or with a control character, it is replaced by
//! its hex SHA-256), so it stays small in SQLite and in AMQP headers and
//! fits an HTTP header value whatever a client sends.

#![no_main]

use hookq::ingress::key::{MAX_ID_BYTES, derive};
use hookq_fuzz::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Request {
        source,
        settings,
        headers,
        body,
    } = Request::parse(data);

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
        assert!(
            http::HeaderValue::from_str(&key.0).is_ok() && !key.0.chars().any(char::is_control),
            "a key no header can carry: {:?}",
            key.0
        );
    }
    // Without settings (an unknown source) there is always a key.
    let plain = derive(&source, None, &headers, body).expect("no settings, no error");
    assert!(plain.0.starts_with(&format!("{source}:")));
    assert!(plain.0.len() <= 64 + 1 + MAX_ID_BYTES);
});
