//! Loading, environment overrides and validation, against real files.

use super::*;
use std::collections::HashMap;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

pub(super) fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

pub(super) fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    f
}

#[test]
fn shipped_default_file_matches_builtin_defaults() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
    let e = env(&[("HOOKQ__WORKER__HANDLER", "log")]);
    let s = load_with_env(Some(&p), e.clone(), Role::Other).unwrap();
    let d = Settings::default();
    assert_eq!(s.amqp.urls, d.amqp.urls);
    assert_eq!(s.retry.delays, d.retry.delays);
    assert_eq!(s.dedup.retention, d.dedup.retention);
    assert_eq!(s.ingress.listen, d.ingress.listen);
    assert_eq!(s.retry.max_delay, d.retry.max_delay);
    assert_eq!(s.dedup.lease, d.dedup.lease);
    assert_eq!(s.worker.grace, d.worker.grace);
    assert_eq!(s.amqp.delivery_limit, d.amqp.delivery_limit);
}

#[test]
fn env_overrides_file_and_parses_lists() {
    let f = file("[worker]\nhandler = \"log\"\n[amqp]\nprefetch = 8\n");
    let s = load_with_env(
        Some(f.path()),
        env(&[
            ("HOOKQ__AMQP__PREFETCH", "16"),
            ("HOOKQ__RETRY__DELAYS_MS", "10, 20"),
            ("HOOKQ__AMQP__QUEUE_TYPE", "classic"),
        ]),
        Role::Other,
    )
    .unwrap();
    assert_eq!(s.amqp.prefetch, 16);
    assert_eq!(s.retry.delays, [10, 20].map(ms).to_vec());
    assert_eq!(s.amqp.queue_type, QueueType::Classic);
    let one = load_with_env(
        Some(f.path()),
        env(&[("HOOKQ__RETRY__DELAYS_MS", "250")]),
        Role::Other,
    )
    .unwrap();
    assert_eq!(one.retry.delays, vec![ms(250)]);
    let bad = load_with_env(
        Some(f.path()),
        env(&[("HOOKQ__RETRY__DELAYS_MS", "1s")]),
        Role::Other,
    )
    .unwrap_err();
    assert_eq!(bad.key, "retry.delays_ms");
}

#[test]
fn unknown_and_bad_keys_are_named() {
    let cases = [
        ("[amqp]\nprefecth = 3\n", "amqp"),
        ("[amqp]\nqueue_type = \"stream\"\n", "amqp.queue_type"),
        ("[ingress]\nlisten = \"nowhere\"\n", "ingress.listen"),
        ("[retry]\ndelays_ms = []\n", "retry.delays_ms"),
        ("[retry]\njitter = 1.5\n", "retry.jitter"),
        ("[worker]\nhandler = \"http\"\n", "worker.target"),
        ("[worker]\ntarget = \"ftp://x\"\n", "worker.target"),
        ("[bogus]\nx = 1\n", ""),
        (
            "[worker]\nhandler = \"log\"\n[sources.gh]\nverify = \"github\"\n",
            "sources.gh",
        ),
        (
            "[worker]\nhandler = \"log\"\n[sources.Bad]\nverify = \"none\"\n",
            "sources.Bad",
        ),
        // Targets: a name nothing defines, limits that make no sense.
        ("[worker]\ntarget = \"app\"\n", "worker.target"),
        (
            "[worker]\ntarget = \"http://a/\"\n[sources.s]\nverify = \"none\"\ntarget = \"nope\"\n",
            "sources.s.target",
        ),
        (
            "[worker]\ntarget = \"app\"\n[targets.app]\nurl = \"http://a/\"\nrate_per_s = -1\n",
            "targets.app.rate_per_s",
        ),
        (
            "[worker]\ntarget = \"app\"\n[targets.app]\nurl = \"http://a/\"\nrate_per_s = 1e-20\n",
            "targets.app.rate_per_s",
        ),
        (
            "[worker]\ntarget = \"app\"\n[targets.app]\nurl = \"http://a/\"\nbreaker_probe_ms = 5000\nbreaker_max_probe_ms = 1000\n",
            "targets.app.breaker_probe_ms",
        ),
        (
            "[worker]\ntarget = \"app\"\n[targets.app]\nurl = \"http://a/\"\nmax_concurrency = 0\n",
            "targets.app.max_concurrency",
        ),
        ("[targets.app]\nrate_per_s = 1\n", "targets.app.url"),
        (
            "[targets.app]\nurl = \"http://a/\"\nburst = 1\n",
            "targets.app",
        ),
        ("[targets.App]\nurl = \"http://a/\"\n", "targets.App"),
    ];
    for (text, key) in cases {
        let f = file(text);
        let err = load_with_env(Some(f.path()), env(&[]), Role::Delivers).unwrap_err();
        assert!(
            err.key.starts_with(key),
            "{text:?}: got key {:?} ({err})",
            err.key
        );
        if text.contains("prefecth") {
            assert!(err.to_string().contains("prefecth"), "{err}");
        }
        if text.contains("bogus") {
            assert!(err.to_string().contains("bogus"), "{err}");
        }
    }
}

#[test]
fn secret_env_is_resolved_and_missing_variable_is_named() {
    let f = file(
        "[worker]\nhandler = \"log\"\n[sources.gh]\nverify = \"github\"\nsecret_env = \"HOOKQ_TEST_UNSET_SECRET_VAR\"\n",
    );
    let err = load_with_env(Some(f.path()), env(&[]), Role::Other).unwrap_err();
    assert_eq!(err.key, "sources.gh.secret_env");
}

#[test]
fn environment_values_are_text_unless_the_key_is_a_number() {
    let f = file(
        "[worker]\nhandler = \"log\"\n[sources.x]\nverify = \"hmac-sha256\"\nsignature_header = \"x-sig\"\n",
    );
    let s = load_with_env(
        Some(f.path()),
        env(&[
            ("HOOKQ__SOURCES__X__SECRET", "00123"),
            ("HOOKQ__SOURCES__X__TOLERANCE_MS", "1500"),
            ("HOOKQ__AMQP__PREFIX", "007"),
            ("HOOKQ__INGRESS__ALLOW_UNKNOWN_SOURCES", "true"),
            ("HOOKQ__AMQP__PREFETCH", "16"),
        ]),
        Role::Other,
    )
    .unwrap();
    let x = &s.sources["x"];
    assert_eq!(x.secret.as_ref().map(Secret::expose), Some("00123"));
    assert_eq!(x.tolerance, ms(1500));
    assert_eq!(s.amqp.prefix, "007");
    assert!(s.ingress.allow_unknown_sources);
    assert_eq!(s.amqp.prefetch, 16);
    let bad = load_with_env(
        Some(f.path()),
        env(&[("HOOKQ__AMQP__PREFETCH", "many")]),
        Role::Other,
    )
    .unwrap_err();
    assert_eq!(bad.key, "amqp.prefetch", "{bad}");
}

#[test]
fn inconsistent_settings_are_refused_naming_the_keys() {
    let cases = [
        // Not ascending.
        (
            "[retry]\ndelays_ms = [5000, 1000]\n",
            "retry.delays_ms",
            "ascending",
        ),
        // A retention shorter than a message's longest stay with the broker.
        (
            "[dedup]\nretention_ms = 3600000\n",
            "dedup.retention_ms",
            "retry.max_delay_ms",
        ),
        (
            "[retry]\nmax_delay_ms = 0\n",
            "retry.max_delay_ms",
            "at least",
        ),
    ];
    for (text, key, says) in cases {
        let f = file(&format!("[worker]\nhandler = \"log\"\n{text}"));
        let err = load_with_env(Some(f.path()), env(&[]), Role::Other).unwrap_err();
        assert_eq!(err.key, key, "{text:?}: {err}");
        assert!(err.to_string().contains(says), "{text:?}: {err}");
    }
    // Values that would overflow a conversion (u64::MAX does not fit TOML's
    // integers, but it does fit an environment variable).
    let f = file("[worker]\nhandler = \"log\"\n");
    for var in ["HOOKQ__DEDUP__RETENTION_MS", "HOOKQ__WORKER__TIMEOUT_MS"] {
        let err = load_with_env(
            Some(f.path()),
            env(&[(var, "18446744073709551615")]),
            Role::Other,
        )
        .unwrap_err();
        let key = var
            .trim_start_matches("HOOKQ__")
            .replace("__", ".")
            .to_lowercase();
        assert_eq!(err.key, key, "{err}");
        assert!(err.to_string().contains("10 years"), "{err}");
    }
    // Repeating a tier is fine (two retries at that wait); a short retention
    // fits when the retries fit in it.
    let ok = file(
        "[worker]\nhandler = \"log\"\n[retry]\ndelays_ms = [100, 100, 400]\nmax_delay_ms = 500\n\
         [dedup]\nretention_ms = 3600000\n",
    );
    load_with_env(Some(ok.path()), env(&[]), Role::Other).unwrap();
}

#[test]
fn longest_stay_counts_every_retry_at_its_longest_wait() {
    let r = RetrySettings {
        max_attempts: 4,
        delays: [100, 1000].map(ms).to_vec(),
        max_delay: ms(500),
        ..Default::default()
    };
    // Three retries: max(100, 500) + max(1000, 500) + max(1000, 500).
    assert_eq!(r.longest_stay(), ms(2500));
    assert_eq!(RetrySettings::default().longest_stay(), ms(4 * 86_400_000));
}

#[test]
fn debug_redacts_secrets_passwords_and_target_queries() {
    let f = file(
        "[amqp]\nurl = \"amqp://app:hunter2@broker:5672/%2f\"\n\
         [worker]\nhandler = \"log\"\ntarget = \"http://t:1/p?token=t0ken\"\n\
         [sources.gh]\nverify = \"github\"\nsecret = \"hunter3\"\n",
    );
    let s = load_with_env(Some(f.path()), env(&[]), Role::Other).unwrap();
    let shown = format!("{s:?}");
    for secret in ["hunter2", "hunter3", "t0ken"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    assert!(shown.contains("broker"), "{shown}");
    assert_eq!(s.amqp.urls[0].node(), "broker:5672");
    assert_eq!(s.amqp.urls[0].to_string(), "amqp://app:***@broker:5672/%2f");
}

#[test]
fn a_list_of_broker_urls_from_the_file_or_the_environment() {
    let f = file(
        "[worker]\nhandler = \"log\"\n[amqp]\nurl = [\"amqp://a:5672/%2f\", \"amqp://b:5673/%2f\"]\n",
    );
    let s = load_with_env(Some(f.path()), env(&[]), Role::Other).unwrap();
    let nodes: Vec<_> = s.amqp.urls.iter().map(AmqpUrl::node).collect();
    assert_eq!(nodes, ["a:5672", "b:5673"]);
    let s = load_with_env(
        Some(f.path()),
        env(&[("HOOKQ__AMQP__URL", "amqp://x:1/%2f, amqps://y/%2f")]),
        Role::Other,
    )
    .unwrap();
    let nodes: Vec<_> = s.amqp.urls.iter().map(AmqpUrl::node).collect();
    assert_eq!(nodes, ["x:1", "y:5671"]);
    let bad = load_with_env(
        Some(f.path()),
        env(&[("HOOKQ__AMQP__URL", "http://x")]),
        Role::Other,
    )
    .unwrap_err();
    assert_eq!(bad.key, "amqp.url");
}

#[test]
fn written_settings_load_back_the_same() {
    let f = file(
        "[worker]\nhandler = \"http\"\ntarget = \"http://t:1/p?q=1\"\ntimeout_ms = 1234\n\
         [retry]\ndelays_ms = [100, 200]\nmax_delay_ms = 300\n[dedup]\nretention_ms = 3600000\n\
         [sources.s]\nverify = \"hmac-sha256\"\nsecret = \"00123\"\nsignature_header = \"x-sig\"\ntolerance_ms = 900\n",
    );
    let s = load_with_env(Some(f.path()), env(&[]), Role::Other).unwrap();
    let again = file(&s.to_toml());
    let back = load_with_env(Some(again.path()), env(&[]), Role::Other).unwrap();
    assert_eq!(format!("{s:?}"), format!("{back:?}"));
    assert_eq!(
        back.sources["s"].secret.as_ref().map(Secret::expose),
        Some("00123")
    );
    match back.worker.target {
        Some(TargetRef::Url(u)) => assert_eq!(u.url().as_str(), "http://t:1/p?q=1"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn targets_are_named_or_given_as_urls_and_resolve_with_their_limits() {
    let f = file(
        "[worker]\nhandler = \"http\"\ntarget = \"http://fallback:1/in\"\nconcurrency = 16\n\
         [targets.app]\nurl = \"http://app:8080/hooks\"\nmax_concurrency = 4\nrate_per_s = 50\n\
         breaker_failures = 3\nbreaker_probe_ms = 500\nbreaker_max_probe_ms = 8000\n\
         [sources.gh]\nverify = \"none\"\ntarget = \"app\"\n\
         [sources.other]\nverify = \"none\"\n",
    );
    let s = load_with_env(Some(f.path()), env(&[]), Role::Delivers).unwrap();
    let targets = s.resolved_targets();
    assert_eq!(targets.len(), 2, "{targets:?}");
    let app = &targets["app"];
    assert_eq!(app.queue_id, "app");
    assert_eq!(app.max_concurrency, 4);
    assert_eq!(app.rate_per_s, 50.0);
    assert_eq!(app.breaker_failures, 3);
    assert_eq!(app.breaker_probe, ms(500));
    assert_eq!(app.breaker_max_probe, ms(8000));
    // A URL is a target of its own, with the defaults (max_concurrency:
    // worker.concurrency) and a queue id no URL character gets into.
    let fallback = &targets["http://fallback:1/in"];
    assert_eq!(fallback.max_concurrency, 16);
    assert_eq!(fallback.rate_per_s, 0.0);
    assert_eq!(fallback.breaker_failures, 10);
    assert!(
        fallback.queue_id.starts_with("url-"),
        "{}",
        fallback.queue_id
    );
    assert_eq!(s.target_name_of("gh").as_deref(), Some("app"));
    assert_eq!(
        s.target_name_of("other").as_deref(),
        Some("http://fallback:1/in")
    );
    // Written and read back, the same.
    let again = file(&s.to_toml());
    let back = load_with_env(Some(again.path()), env(&[]), Role::Delivers).unwrap();
    assert_eq!(format!("{s:?}"), format!("{back:?}"));
}

#[test]
fn the_admin_token_is_checked_and_read_from_the_environment() {
    let off = load_with_env(None, env(&[]), Role::Other).unwrap();
    assert!(off.admin.token.is_none(), "admin is off by default");
    assert_eq!(off.admin.label, "admin");
    let short = file("[admin]\ntoken = \"too-short\"\n");
    let e = load_with_env(Some(short.path()), env(&[]), Role::Other).unwrap_err();
    assert_eq!(e.key, "admin.token");
    assert!(e.problem.contains("at least 16"), "{}", e.problem);
    assert!(
        !e.problem.contains("too-short"),
        "the token is never echoed"
    );
    let from_env = file("[admin]\ntoken_env = \"ADMIN_T\"\nlabel = \"ops-team\"\n");
    let s = load_with_env(
        Some(from_env.path()),
        env(&[("ADMIN_T", "0123456789abcdef0123")]),
        Role::Other,
    )
    .unwrap();
    assert_eq!(s.admin.token.unwrap().expose(), "0123456789abcdef0123");
    assert_eq!(s.admin.label, "ops-team");
    let e = load_with_env(Some(from_env.path()), env(&[]), Role::Other).unwrap_err();
    assert_eq!(e.key, "admin.token_env");
    let e = load_with_env(
        Some(from_env.path()),
        env(&[("ADMIN_T", "short")]),
        Role::Other,
    )
    .unwrap_err();
    assert_eq!(e.key, "admin.token");
    let unknown = file("[admin]\ntokn = \"0123456789abcdef0123\"\n");
    let e = load_with_env(Some(unknown.path()), env(&[]), Role::Other).unwrap_err();
    assert!(e.key.starts_with("admin"), "{}", e.key);
    assert!(e.problem.contains("tokn"), "{}", e.problem);
    let s = load_with_env(
        None,
        env(&[("HOOKQ__ADMIN__TOKEN", "00000000000000000000")]),
        Role::Other,
    )
    .unwrap();
    assert_eq!(
        s.admin.token.as_ref().unwrap().expose(),
        "00000000000000000000"
    );
    // Written back and read again: the same token (child processes get a file).
    let again = file(&s.to_toml());
    let back = load_with_env(Some(again.path()), env(&[]), Role::Other).unwrap();
    assert_eq!(back.admin.token, s.admin.token);
}

/// The SPEC: the defaults with any one documented key changed within its
/// documented range start; a default grows to fit instead of refusing.
#[test]
fn a_default_never_makes_another_key_invalid() {
    let max_ms = MAX_MS.to_string();
    let cases: &[(&str, &str)] = &[
        ("HOOKQ__RETRY__MAX_ATTEMPTS", "1"),
        ("HOOKQ__RETRY__MAX_ATTEMPTS", "10"),
        ("HOOKQ__RETRY__MAX_ATTEMPTS", "1000"),
        ("HOOKQ__RETRY__INLINE_ATTEMPTS", "5"),
        ("HOOKQ__RETRY__INLINE_DELAY_MS", "0"),
        ("HOOKQ__RETRY__DELAYS_MS", "4294967295"),
        ("HOOKQ__RETRY__DELAYS_MS", "1"),
        ("HOOKQ__RETRY__JITTER", "0.99"),
        ("HOOKQ__RETRY__MAX_DELAY_MS", "1"),
        ("HOOKQ__RETRY__MAX_DELAY_MS", &max_ms),
        ("HOOKQ__DEDUP__LEASE_MS", "100"),
        ("HOOKQ__DEDUP__LRU_CAPACITY", "1"),
        ("HOOKQ__AMQP__URL", "amqps://u:p@broker.example/%2f"),
        ("HOOKQ__AMQP__PARTITIONS", "1024"),
        ("HOOKQ__AMQP__PREFETCH", "65535"),
        ("HOOKQ__AMQP__DELIVERY_LIMIT", "1"),
        ("HOOKQ__AMQP__QUEUE_TYPE", "classic"),
        ("HOOKQ__AMQP__MANAGEMENT_URL", "https://mgmt.example/"),
        ("HOOKQ__INGRESS__MAX_BODY_BYTES", "16777216"),
        ("HOOKQ__INGRESS__MAX_BODY_BYTES", "1"),
        ("HOOKQ__WORKER__CONCURRENCY", "1"),
        ("HOOKQ__WORKER__TIMEOUT_MS", &max_ms),
        ("HOOKQ__WORKER__PARTITIONS", "0"),
        ("HOOKQ__WORKER__HANDLER", "log"),
    ];
    for (var, value) in cases {
        let s = load_with_env(
            None,
            env(&[
                (var, value),
                ("HOOKQ__WORKER__TARGET", "http://127.0.0.1:3000/"),
            ]),
            Role::Delivers,
        )
        .unwrap_or_else(|e| panic!("{var}={value}: {e}"));
        assert!(
            s.dedup.retention >= s.retry.longest_stay().min(ms(MAX_MS)),
            "{var}={value}: retention {:?} under the stay {:?}",
            s.dedup.retention,
            s.retry.longest_stay()
        );
        assert!(s.retry.inline_attempts() <= s.retry.max_attempts);
    }
    // The retention grows to a day more than the stay: 9 retries of up to a
    // day each, plus a day.
    let s = load_with_env(
        None,
        env(&[("HOOKQ__RETRY__MAX_ATTEMPTS", "10")]),
        Role::Other,
    )
    .unwrap();
    assert_eq!(s.dedup.retention, ms(10 * 86_400_000));
    assert_eq!(s.retry.inline_attempts(), 2);
    // The shipped file leaves the grown defaults unset too.
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
    let s = load_with_env(
        Some(&p),
        env(&[("HOOKQ__RETRY__MAX_ATTEMPTS", "10")]),
        Role::Other,
    )
    .unwrap();
    assert_eq!(s.dedup.retention, ms(10 * 86_400_000));
    // Fewer attempts than the default's in-process ones: all in-process.
    let s = load_with_env(
        None,
        env(&[("HOOKQ__RETRY__MAX_ATTEMPTS", "1")]),
        Role::Other,
    )
    .unwrap();
    assert_eq!(s.retry.inline_attempts(), 1);
    // Set explicitly, a retention too short is still refused, naming the keys.
    let e = load_with_env(
        None,
        env(&[
            ("HOOKQ__RETRY__MAX_ATTEMPTS", "10"),
            ("HOOKQ__DEDUP__RETENTION_MS", "604800000"),
        ]),
        Role::Other,
    )
    .unwrap_err();
    assert_eq!(e.key, "dedup.retention_ms");
    assert!(e.problem.contains("retry.max_attempts"), "{e}");
    // And explicit in-process attempts above the total.
    let e = load_with_env(
        None,
        env(&[
            ("HOOKQ__RETRY__MAX_ATTEMPTS", "1"),
            ("HOOKQ__RETRY__INLINE_ATTEMPTS", "2"),
        ]),
        Role::Other,
    )
    .unwrap_err();
    assert_eq!(e.key, "retry.inline_attempts");
}

#[test]
fn a_body_limit_above_what_the_broker_takes_is_refused() {
    let e = load_with_env(
        None,
        env(&[("HOOKQ__INGRESS__MAX_BODY_BYTES", "16777217")]),
        Role::Other,
    )
    .unwrap_err();
    assert_eq!(e.key, "ingress.max_body_bytes");
    assert!(e.problem.contains("max_message_size"), "{e}");
    let e = load_with_env(
        None,
        env(&[("HOOKQ__INGRESS__MAX_BODY_BYTES", "0")]),
        Role::Other,
    )
    .unwrap_err();
    assert_eq!(e.key, "ingress.max_body_bytes");
}

#[test]
fn the_management_api_follows_the_broker_url_or_its_own_key() {
    let s = load_with_env(
        None,
        env(&[("HOOKQ__AMQP__URL", "amqps://u:p@b.example/%2f")]),
        Role::Other,
    )
    .unwrap();
    let m = Management::of(
        &s.amqp.urls[0],
        s.amqp.management_port,
        s.amqp.management_url.as_ref(),
    )
    .unwrap();
    assert_eq!(m.base.as_str(), "https://b.example:15671/api");
    let e = load_with_env(
        None,
        env(&[("HOOKQ__AMQP__MANAGEMENT_URL", "ftp://m/")]),
        Role::Other,
    )
    .unwrap_err();
    assert_eq!(e.key, "amqp.management_url");
    let s = load_with_env(
        None,
        env(&[("HOOKQ__AMQP__MANAGEMENT_URL", "https://ops:pw@m.example/")]),
        Role::Other,
    )
    .unwrap();
    assert!(!format!("{s:?}").contains("pw"), "{s:?}");
}
