//! Each scheme against the providers' published vectors and hostile headers.

use super::*;
use SchemeKind as K;
use axum::http::HeaderValue;
use proptest::prelude::*;

type R = Result<(), Error>;
const OK: R = Ok(());
const BAD: R = Err(Error::Mismatch);
const NOW: u64 = 1_700_000_000;
const STD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OTHER_STD: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn ver(kind: SchemeKind, secret: &str) -> Verifier {
    let tolerance = Duration::from_secs(300);
    Verifier::new(kind, Some(secret), Some("X-Signature"), tolerance).unwrap()
}

fn hdrs(pairs: &[(&str, &[u8])]) -> HeaderMap {
    let value = |v: &[u8]| HeaderValue::from_bytes(v).unwrap();
    pairs
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), value(v)))
        .collect()
}

/// Verifies `body` at `now` with the one header set (or none if `value` is None).
fn one(v: &Verifier, name: &str, value: Option<&str>, body: &[u8], now: u64) -> R {
    let pairs: Vec<(&str, &[u8])> = value.iter().map(|s| (name, s.as_bytes())).collect();
    v.verify(&hdrs(&pairs), body, at(now))
}

fn hex_sig(key: &str, parts: &[&[u8]]) -> String {
    hex::encode(mac(key.as_bytes(), parts))
}

fn stripe_sig(secret: &str, t: u64, body: &[u8]) -> String {
    let sig = hex_sig(secret, &[t.to_string().as_bytes(), b".", body]);
    format!("t={t},v1={sig}")
}

fn std_sig(secret: &str, id: &str, ts: u64, body: &[u8]) -> String {
    let (ts, key) = (ts.to_string(), standard_key(secret).unwrap());
    let parts: [&[u8]; 5] = [id.as_bytes(), b".", ts.as_bytes(), b".", body];
    format!("v1,{}", B64.encode(mac(&key, &parts)))
}

fn std_headers(id: &str, ts: u64, sig: &str) -> HeaderMap {
    let ts = ts.to_string();
    let (id, ts, sig) = (id.as_bytes(), ts.as_bytes(), sig.as_bytes());
    hdrs(&[(STD_ID, id), (STD_TIMESTAMP, ts), (STD_SIGNATURE, sig)])
}

#[test]
fn none_accepts_anything_and_ignores_secret() {
    let v = Verifier::new(K::None, Some("x"), None, Duration::ZERO).unwrap();
    assert_eq!(v.kind(), K::None);
    assert_eq!(v.verify(&HeaderMap::new(), b"x", at(0)), OK);
}

#[test]
fn github() {
    let (v, h) = (ver(K::Github, "gh"), GITHUB_HEADER);
    let sig = hex_sig("gh", &[b"b"]);
    let (good, upper) = (
        format!("sha256={sig}"),
        format!("sha256={}", sig.to_uppercase()),
    );
    let wrong = format!("sha256={}", hex_sig("other", &[b"b"]));
    let cases: [(Option<&str>, &[u8], R); 9] = [
        (Some(&good), b"b", OK),
        (Some(&upper), b"b", OK),
        (Some(&good), b"B", BAD),
        (Some(&wrong), b"b", BAD),
        (None, b"b", Err(Error::MissingHeader(h.into()))),
        (Some(&sig), b"b", Err(malformed(h))),
        (Some("sha256=zz"), b"b", Err(malformed(h))),
        (Some("sha256=abcd"), b"b", Err(malformed(h))),
        (Some("sha1=00"), b"b", Err(malformed(h))),
    ];
    for (value, body, want) in cases {
        assert_eq!(one(&v, h, value, body, NOW), want, "{value:?}");
    }
}

#[test]
fn stripe() {
    let (v, h) = (ver(K::Stripe, "st"), STRIPE_HEADER);
    let good = hex_sig("st", &[NOW.to_string().as_bytes(), b".", b"b"]);
    // Two v1 (second correct), a v0 and an unknown scheme, spaces around items.
    let rotated = format!(" t={NOW} , v1={} ,v1={good}, v0=abc ,x=1", "ab".repeat(32));
    let (signed, old) = (stripe_sig("st", NOW, b"b"), stripe_sig("old", NOW, b"b"));
    let (future, past) = (stripe_sig("st", u64::MAX, b"b"), stripe_sig("st", 0, b"b"));
    let huge = "t=99999999999999999999999,v1=00";
    let cases: [(Option<&str>, &[u8], u64, R); 17] = [
        (Some(&signed), b"b", NOW, OK),
        (Some(&rotated), b"b", NOW, OK),
        (Some(&signed), b"B", NOW, BAD),
        (Some(&old), b"b", NOW, BAD),
        (Some(&signed), b"b", NOW + 300, OK),
        (Some(&signed), b"b", NOW + 301, Err(Error::Stale)),
        (Some(&signed), b"b", NOW - 301, Err(Error::Future)),
        (Some(&future), b"b", NOW, Err(Error::Future)),
        (Some(&past), b"b", NOW, Err(Error::Stale)),
        (None, b"b", NOW, Err(Error::MissingHeader(h.into()))),
        (Some("v1=00"), b"b", NOW, Err(malformed(h))),
        (Some("t=1"), b"b", NOW, Err(malformed(h))),
        (Some("t=1,v0=00"), b"b", NOW, Err(malformed(h))),
        (Some("t=-5,v1=00"), b"b", NOW, Err(malformed(h))),
        (Some(huge), b"b", NOW, Err(malformed(h))),
        (Some("t=1,t=1,v1=00"), b"b", NOW, Err(malformed(h))),
        (Some(""), b"b", NOW, Err(malformed(h))),
    ];
    for (value, body, now, want) in cases {
        assert_eq!(one(&v, h, value, body, now), want, "{value:?}");
    }
}

#[test]
fn standard_published_vectors() {
    // The Standard Webhooks / Svix reference test vector, as the spec's libraries use it.
    let sig = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    let (id, ts) = ("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330);
    let body = br#"{"test": 2432232314}"#;
    assert_eq!(std_sig(STD_SECRET, id, ts, body), sig);
    let h = std_headers(id, ts, sig);
    assert_eq!(ver(K::Standard, STD_SECRET).verify(&h, body, at(ts)), OK);
    // The same key without the whsec_ prefix is read as plain base64.
    let bare = ver(K::Standard, "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    assert_eq!(bare.verify(&h, body, at(ts + 10)), OK);
    // The vector from the reference Rust library's tests.
    let (id, ts) = ("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1_649_367_553);
    let body = br#"{"email":"test@example.com","username":"test_user"}"#;
    let h = std_headers(id, ts, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    assert_eq!(ver(K::Standard, OTHER_STD).verify(&h, body, at(ts)), OK);
}

#[test]
fn standard() {
    let v = ver(K::Standard, STD_SECRET);
    let good = std_sig(STD_SECRET, "m1", NOW, b"x");
    let other = std_sig(OTHER_STD, "m1", NOW, b"x");
    let rotated = format!("v1a,AAAA {other} v1,!!notb64 {good}");
    let cases: [(&str, &str, &[u8], u64, R); 8] = [
        ("m1", &good, b"x", NOW, OK),
        ("m1", &rotated, b"x", NOW, OK),
        ("m1", &other, b"x", NOW, BAD),
        ("m1", &good, b"y", NOW, BAD),
        ("m2", &good, b"x", NOW, BAD),
        ("m1", &good, b"x", NOW + 301, Err(Error::Stale)),
        ("m1", &good, b"x", NOW - 301, Err(Error::Future)),
        ("m1", "v1a,AAAA", b"x", NOW, Err(malformed(STD_SIGNATURE))),
    ];
    for (id, sig, body, now, want) in cases {
        let got = v.verify(&std_headers(id, NOW, sig), body, at(now));
        assert_eq!(got, want, "{sig}");
    }
    let full = std_headers("m1", NOW, &good);
    let before_epoch = SystemTime::UNIX_EPOCH - Duration::from_secs(9);
    assert_eq!(v.verify(&full, b"x", before_epoch), Err(Error::Future));
    for name in [STD_ID, STD_TIMESTAMP, STD_SIGNATURE] {
        let mut h = full.clone();
        h.remove(name);
        let want = Err(Error::MissingHeader(name.into()));
        assert_eq!(v.verify(&h, b"x", at(NOW)), want);
    }
    let bad: [(_, &[u8]); 3] = [
        (STD_TIMESTAMP, b"1.5"),
        (STD_TIMESTAMP, b""),
        (STD_ID, b"\xc3\xa9"),
    ];
    for (name, value) in bad {
        let mut h = full.clone();
        h.insert(name, HeaderValue::from_bytes(value).unwrap());
        assert_eq!(v.verify(&h, b"x", at(NOW)), Err(malformed(name)));
    }
}

#[test]
fn a_tolerance_under_a_second_is_honoured() {
    let tolerance = Duration::from_millis(500);
    let v = Verifier::new(K::Standard, Some(STD_SECRET), None, tolerance).unwrap();
    let h = std_headers("m1", NOW, &std_sig(STD_SECRET, "m1", NOW, b"x"));
    let ms = |n| SystemTime::UNIX_EPOCH + Duration::from_millis(NOW * 1000 + n);
    assert_eq!(v.verify(&h, b"x", ms(400)), OK);
    assert_eq!(v.verify(&h, b"x", ms(700)), Err(Error::Stale));
    let early = SystemTime::UNIX_EPOCH + Duration::from_millis(NOW * 1000 - 700);
    assert_eq!(v.verify(&h, b"x", early), Err(Error::Future));
}

#[test]
fn hmac_sha256_configured_header() {
    let (v, h) = (ver(K::HmacSha256, "k"), "x-signature");
    let (sig, wrong) = (hex_sig("k", &[b"b"]), hex_sig("k2", &[b"b"]));
    let upper = format!("sha256={}", sig.to_uppercase());
    let cases: [(Option<&str>, &[u8], R); 6] = [
        (Some(&sig), b"b", OK),
        (Some(&upper), b"b", OK),
        (Some(&sig), b"B", BAD),
        (Some(&wrong), b"b", BAD),
        (Some("nothex"), b"b", Err(malformed(h))),
        (None, b"b", Err(Error::MissingHeader(h.into()))),
    ];
    for (value, body, want) in cases {
        assert_eq!(one(&v, h, value, body, NOW), want, "{value:?}");
    }
}

#[test]
fn secret_is_never_printed() {
    let secret = format!("{:?}", Secret(b"hunter2".to_vec()));
    assert_eq!(secret, "Secret(<redacted>)");
    let text = format!("{:?}", ver(K::Github, "hunter2"));
    assert!(
        !text.contains("hunter2") && !text.contains("104,"),
        "{text}"
    );
}

#[test]
fn config_errors() {
    let new = |k, s, h| Verifier::new(k, s, h, Duration::ZERO).map(|_| ());
    let missing = |k| Err(ConfigError::MissingSecret(k));
    assert_eq!(new(K::Github, None, None), missing("github"));
    assert_eq!(new(K::Stripe, Some(""), None), missing("stripe"));
    let no_header = new(K::HmacSha256, Some("k"), None);
    assert_eq!(no_header, Err(ConfigError::MissingHeader));
    let bad_name = Err(ConfigError::BadHeaderName("bad header".into()));
    assert_eq!(new(K::HmacSha256, Some("k"), Some("bad header")), bad_name);
    // The message names the problem, never the secret (nor its base64 part).
    for secret in ["whsec_not*b64!", "abcde", "whsec_"] {
        match new(K::Standard, Some(secret), None) {
            Err(ConfigError::BadStandardSecret(m)) => assert!(!m.contains(&secret[3..]), "{m}"),
            other => panic!("{secret}: {other:?}"),
        }
    }
    let text = ConfigError::MissingSecret("standard").to_string();
    assert_eq!(
        text,
        r#"verify = "standard" needs a secret (set secret or secret_env)"#
    );
}

/// Raw bytes, arbitrary strings, and strings shaped like each scheme's headers
/// (to get past the first parse error); values HeaderValue refuses are dropped.
fn any_value() -> impl Strategy<Value = Option<HeaderValue>> {
    let text = |s: String| HeaderValue::from_str(&s).ok();
    let bytes = proptest::collection::vec(any::<u8>(), 0..120);
    prop_oneof![
        bytes.prop_map(|b| HeaderValue::from_bytes(&b).ok()),
        any::<String>().prop_map(text),
        "( ?(t|v1|v0|x)=[-+0-9a-fA-F]{0,70} ?,?){0,5}".prop_map(text),
        "((v1|v1a|v2),[A-Za-z0-9+/=]{0,48} ?){0,4}".prop_map(text),
        "(sha256=)?[-+0-9a-f]{0,70}".prop_map(text),
    ]
}

proptest! {
    #[test]
    fn never_panics(
        values in proptest::collection::vec(any_value(), 6),
        body in proptest::collection::vec(any::<u8>(), 0..256),
        (now, tol) in (any::<u32>(), any::<u64>()),
    ) {
        let names = [GITHUB_HEADER, STRIPE_HEADER, STD_ID, STD_TIMESTAMP, STD_SIGNATURE, "x-a"];
        let h: HeaderMap = names.iter().zip(values)
            .filter_map(|(n, v)| Some((HeaderName::from_static(n), v?)))
            .collect();
        let tol = Duration::from_secs(tol);
        for kind in [K::None, K::Github, K::Stripe, K::Standard, K::HmacSha256] {
            let v = Verifier::new(kind, Some(STD_SECRET), Some("X-A"), tol).unwrap();
            let _ = v.verify(&h, &body, at(u64::from(now)));
        }
    }

    #[test]
    fn signed_bodies_round_trip(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let stripe = stripe_sig("s", NOW, &body);
        let stripe = one(&ver(K::Stripe, "s"), STRIPE_HEADER, Some(&stripe), &body, NOW);
        prop_assert_eq!(stripe, OK);
        let std = std_headers("m", NOW, &std_sig(STD_SECRET, "m", NOW, &body));
        prop_assert_eq!(ver(K::Standard, STD_SECRET).verify(&std, &body, at(NOW)), OK);
    }
}
