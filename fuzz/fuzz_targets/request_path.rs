//! The whole path of one webhook through hookq, minus the network: a request
//! (any headers the HTTP parser accepts, any body, any source settings) ->
//! the idempotency key -> the envelope the ingress publishes -> its AMQP
//! properties, serialised and parsed as lapin does -> the envelope the worker
//! decodes -> the request it sends to the target.
//!
//! The property: every request the ingress accepts can be delivered. The
//! worker builds its request without an error (no header value error, no
//! dead letter the sender cannot fix), and the target gets the key as
//! `Idempotency-Key`, the body byte for byte and the forwarded headers in
//! their order.
//!
//! Input: as `idempotency_key` (four lines: source, verify kind, id_header,
//! id_json_pointer; then headers, an empty line and the body).

#![no_main]

use bytes::Bytes;
use hookq::broker::codec::{decode, encode};
use hookq::config::TargetUrl;
use hookq::delivery::request;
use hookq::ingress::key::derive;
use hookq::message::Envelope;
use hookq_fuzz::{Request, wire_round_trip};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Request {
        source,
        settings,
        headers,
        body,
    } = Request::parse(data);
    // The ingress answers 400 when there is no key: nothing to deliver.
    let Ok(key) = derive(&source, Some(&settings), &headers, body) else {
        return;
    };
    let sent = Envelope::of_request(&source, key, Bytes::copy_from_slice(body), headers);

    let props = wire_round_trip(&encode(&sent), sent.body.len() as u64);
    let env = decode(&props, sent.body.clone()).expect("the ingress's own message did not decode");
    assert_eq!(env.key, sent.key);
    assert_eq!(env.headers, sent.headers, "the forwarded headers changed");

    let target = TargetUrl::parse("http://127.0.0.1:3000/hooks").expect("a target");
    let req = match request(&target, &env, 1) {
        Ok(r) => r,
        Err(e) => panic!("an accepted request cannot be delivered: {e}\n{sent:?}"),
    };
    hookq_fuzz::trace!("{sent:?}\n-> {:?}", req.headers());
    let h = req.headers();
    assert_eq!(
        h.get("idempotency-key").map(|v| v.as_bytes()),
        Some(sent.key.0.as_bytes())
    );
    assert_eq!(
        h.get("hookq-source").map(|v| v.as_bytes()),
        Some(source.as_bytes())
    );
    assert_eq!(
        req.body().and_then(|b| b.as_bytes()),
        Some(body),
        "the body changed"
    );
    // Every forwarded header arrives, in order, except hookq's own names
    // (the target gets hookq's values for those).
    let ours = |n: &http::HeaderName| n == "idempotency-key" || n.as_str().starts_with("hookq-");
    for name in sent.headers.keys().filter(|n| !ours(n)) {
        let want: Vec<_> = sent.headers.get_all(name).iter().collect();
        let got: Vec<_> = h.get_all(name).iter().collect();
        assert_eq!(got, want, "header {name} changed");
    }
});
