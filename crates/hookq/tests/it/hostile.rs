//! Input an attacker or an ordinary operator produces: ids no header can
//! carry, request text that would forge log lines, a signed GitHub request
//! replayed under fresh delivery ids, one retry setting changed from its
//! default, and a body larger than the broker takes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hmac::{Hmac, Mac};
use hookq::config::{SchemeKind, Secret, SourceSettings};
use sha2::{Digest, Sha256};
use tokio::io::AsyncBufReadExt;

use crate::support::{self, Client, FakeTarget, TestEnv, wait_until};

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Ids with a control character, a line break, a DEL, a tab, a C1 control, or
/// over 256 bytes: each gets a 202 and is delivered once, under the hash of
/// the id, never dead-lettered as a request that cannot be sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_no_header_can_carry_are_delivered_once_under_their_hash() {
    let target = FakeTarget::ok().await;
    let mut env = TestEnv::new("hostile-ids").with_target(&target.url);
    env.settings.sources.insert(
        "byid".into(),
        SourceSettings {
            id_json_pointer: Some("/id".into()),
            ..Default::default()
        },
    );
    let up = env.up().await;
    let c = Client::new(up.ingress_addr.unwrap());
    let long = "x".repeat(300);
    let ids = [
        "evt\u{1}a",
        "evt\nb",
        "evt\rc",
        "evt\u{7f}d",
        "evt\te",
        "evt\u{85}f",
        long.as_str(),
    ];
    let mut keys = Vec::new();
    for id in ids {
        let body = serde_json::json!({ "id": id }).to_string();
        // Sent twice: the second is a duplicate of the first.
        for _ in 0..2 {
            let r = c.post("byid", &[], &body).await;
            assert_eq!(r.status(), 202, "{id:?}");
            let v: serde_json::Value = r.json().await.unwrap();
            let key = format!("byid:{}", sha256_hex(id.as_bytes()));
            assert_eq!(v["key"], key.as_str(), "{id:?}");
            keys.push(key);
        }
    }
    keys.dedup();
    wait_until(Duration::from_secs(20), "every id delivered", || async {
        keys.iter().all(|k| !target.for_key(k).is_empty())
    })
    .await;
    // The duplicates settle too, and nothing more arrives.
    wait_until(
        Duration::from_secs(10),
        "the duplicates settled",
        || async {
            let m = c.get("/metrics").await.text().await.unwrap();
            support::sample(
                &m,
                r#"hookq_worker_deliveries_total{source="byid",outcome="duplicate"}"#,
            ) >= 7.0
        },
    )
    .await;
    for k in &keys {
        assert_eq!(target.for_key(k).len(), 1, "{k} delivered more than once");
    }
    assert_eq!(target.count(), ids.len());
    assert!(env.dead_letters().await.is_empty(), "nothing dead-lettered");
}

/// A GitHub request is signed over its body only: replayed under three fresh
/// `X-GitHub-Delivery` ids it is one key and one delivery. The delivery id
/// still reaches the target and stays beside the key on a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_github_request_replayed_under_fresh_delivery_ids_is_delivered_once() {
    const SECRET: &str = "gh-secret-for-tests";
    let target = FakeTarget::start(|_, r| {
        if r.body.starts_with(b"{\"refuse\"") {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        }
        .into_response()
    })
    .await;
    let mut env = TestEnv::new("github-replay").with_target(&target.url);
    env.settings.sources.insert(
        "gh".into(),
        SourceSettings {
            verify: SchemeKind::Github,
            secret: Some(Secret::new(SECRET)),
            ..Default::default()
        },
    );
    let up = env.up().await;
    let c = Client::new(up.ingress_addr.unwrap());
    let sign = |body: &str| {
        let mut m = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        m.update(body.as_bytes());
        format!("sha256={}", hex::encode(m.finalize().into_bytes()))
    };
    let body = r#"{"action":"opened","number":7}"#;
    let sig = sign(body);
    let key = format!("gh:{}", sha256_hex(body.as_bytes()));
    for delivery in ["d-1", "d-2", "d-3"] {
        let r = c
            .post(
                "gh",
                &[
                    ("x-hub-signature-256", &sig),
                    ("x-github-delivery", delivery),
                ],
                body,
            )
            .await;
        assert_eq!(r.status(), 202);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["key"], key.as_str());
    }
    // The copies may settle as duplicates while the first is still being
    // delivered: wait for both.
    wait_until(Duration::from_secs(15), "the replays settled", || async {
        let m = c.get("/metrics").await.text().await.unwrap();
        support::sample(
            &m,
            r#"hookq_worker_deliveries_total{source="gh",outcome="duplicate"}"#,
        ) >= 2.0
            && !target.for_key(&key).is_empty()
    })
    .await;
    let got = target.for_key(&key);
    assert_eq!(got.len(), 1, "one delivery for three sends");
    assert_eq!(got[0].header("x-github-delivery").as_deref(), Some("d-1"));

    // A refused one: its dead letter names the delivery beside the key.
    let refused = r#"{"refuse":true}"#;
    let r = c
        .post(
            "gh",
            &[
                ("x-hub-signature-256", &sign(refused)),
                ("x-github-delivery", "d-9"),
            ],
            refused,
        )
        .await;
    assert_eq!(r.status(), 202);
    wait_until(Duration::from_secs(15), "the dead letter", || async {
        !env.dead_letters().await.is_empty()
    })
    .await;
    let dead = env.dead_letters().await;
    assert_eq!(dead[0].delivery_id(), Some("d-9"));
    let rows = hookq::dead_letters::rows(&env.broker().await, None)
        .await
        .unwrap();
    assert_eq!(
        rows[0].delivery.as_deref(),
        Some("d-9"),
        "dlq list shows it"
    );
}

/// The forged start of a log line, hidden in a key.
const FORGED: &str = "2026-12-06T13:47:00.000000Z  INFO hookq::admin: token rotated";

/// A `hookq up` child in `format`, at debug level; its stderr lines as they come.
async fn up_child(
    env: &TestEnv,
    format: &str,
    target: &str,
) -> (tokio::process::Child, Arc<Mutex<Vec<String>>>) {
    let target = hookq::config::TargetUrl::parse(target).unwrap();
    let mut child = env
        .command_with(&["up", "--log-format", format], "debug", |s| {
            s.worker.handler = hookq::config::HandlerKind::Http;
            s.worker.target = Some(target.into());
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn hookq up");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            sink.lock().unwrap().push(l);
        }
    });
    (child, seen)
}

/// Keys (and every other request-controlled text) never start a log line:
/// a message whose key carries a line break and a forged log line, dead-
/// lettered by the worker with a warning about it, in both log formats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_text_never_starts_a_log_line() {
    let target = FakeTarget::ok().await;
    for format in ["text", "json"] {
        let env = TestEnv::new(&format!("forged-{format}"));
        let (mut child, lines) = up_child(&env, format, &target.url).await;
        let logged = |what: &'static str| {
            let lines = lines.clone();
            move || {
                let found = lines.lock().unwrap().iter().any(|l| l.contains(what));
                async move { found }
            }
        };
        wait_until(
            Duration::from_secs(30),
            "hookq up listening",
            logged("ingress listening"),
        )
        .await;
        // A message with a key no request can carry any more (hookq hashes
        // such ids now), as an older version or another client published it.
        let key = format!("s:evt\n{FORGED}");
        env.broker()
            .await
            .publish_webhook(&support::message(&key), Duration::from_secs(5))
            .await
            .unwrap();
        wait_until(
            Duration::from_secs(30),
            "the dead-lettered warning",
            logged("dead-lettered"),
        )
        .await;
        let _ = child.kill().await;
        let lines = lines.lock().unwrap().clone();
        for l in &lines {
            assert!(
                !l.trim_start().starts_with("2026-12-06T13:47"),
                "{format}: a forged line: {l}"
            );
        }
        let line = lines.iter().find(|l| l.contains("dead-lettered")).unwrap();
        match format {
            "text" => assert!(line.contains(r"key=s:evt\n2026-12-06T13:47"), "{line}"),
            _ => {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(v["span"]["key"], key.as_str(), "{line}");
                for l in &lines {
                    serde_json::from_str::<serde_json::Value>(l)
                        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}"));
                }
            }
        }
        assert_eq!(target.for_key(&key).len(), 0);
    }
}

/// `retry.max_attempts = 10` with every other key at its default starts
/// `hookq up`: the retention's default grows to fit (it exited 2 before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_retry_key_changed_from_its_default_starts() {
    let env = TestEnv::new("defaults");
    let dir = env.dir();
    let config = dir.join("only-max-attempts.toml");
    std::fs::write(
        &config,
        format!(
            "[amqp]\nurl = \"{}\"\nprefix = \"{}\"\n\
             [ingress]\nlisten = \"127.0.0.1:0\"\n\
             [worker]\nhandler = \"log\"\n\
             [dedup]\npath = \"{}\"\n\
             [retry]\nmax_attempts = 10\n",
            support::amqp_url(),
            env.prefix,
            dir.join("hookq.db").display()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookq"))
        .arg("--config")
        .arg(&config)
        .args(["up", "--log-format", "json"])
        .env("HOOKQ_LOG", "info")
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(l)) = lines.next_line().await {
            let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
            if v["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("ingress listening")
            {
                return v["addr"]
                    .as_str()
                    .unwrap()
                    .parse::<std::net::SocketAddr>()
                    .unwrap();
            }
        }
        panic!("hookq up ended: {:?}", child.try_wait());
    })
    .await
    .expect("hookq up listening");
    let c = Client::new(addr);
    wait_until(Duration::from_secs(20), "ready", || async {
        c.get("/readyz").await.status() == 200
    })
    .await;
    assert_eq!(c.post("any", &[], "{}").await.status(), 404);
    let _ = child.kill().await;
}

/// `rabbitmqctl eval EXPR` on the broker under test, its output.
fn broker_eval(expr: &str) -> String {
    let mut cmd = support::rabbitmqctl();
    let out = cmd.args(["eval", expr]).output().expect("run rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl eval {expr}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Puts the broker's max_message_size back when the test ends, however.
struct MaxMessageSize(String);

impl MaxMessageSize {
    fn set(bytes: usize) -> Self {
        let before = broker_eval("{ok, N} = application:get_env(rabbit, max_message_size), N.");
        Self::put(&bytes.to_string());
        Self(before)
    }

    /// 3.10 reads the setting when a channel opens; 4.x caches it in a
    /// persistent term that every publish reads.
    fn put(bytes: &str) {
        broker_eval(&format!(
            "application:set_env(rabbit, max_message_size, {bytes}), \
             case persistent_term:get(max_message_size, undefined) of \
                 undefined -> ok; \
                 _ -> persistent_term:put(max_message_size, {bytes}) \
             end."
        ));
    }
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        Self::put(&self.0);
    }
}

/// A broker that takes less than `ingress.max_body_bytes` (its
/// max_message_size set lower than the default): the body gets 413, not a
/// 503, and from then on such bodies are refused before they reach the broker
/// (the broker's refusal closes the publisher channel, and every publish in
/// flight on it with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_what_the_broker_takes_gets_413() {
    let mut env = TestEnv::new("broker-size");
    env.settings.ingress.max_body_bytes = 1 << 20;
    // Lowered while hookq's publishers open and publish the large body (no
    // other test publishes bodies this large), restored right after.
    let lowered = MaxMessageSize::set(200_000);
    let up = env.up().await;
    let c = Client::new(up.ingress_addr.unwrap());
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(300_000));
    let r = c.post("any", &[("idempotency-key", "big-1")], &big).await;
    drop(lowered);
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "payload_too_large");
    assert!(v["message"].as_str().unwrap().contains("200000"), "{v}");
    // Learned: the next one is refused before publishing, even though the
    // reconnected channels would take it now.
    let r = c.post("any", &[("idempotency-key", "big-2")], &big).await;
    assert_eq!(r.status(), 413);
    // And the ingress serves everything else.
    wait_until(Duration::from_secs(20), "a small body accepted", || async {
        c.post("any", &[("idempotency-key", "small")], "{}")
            .await
            .status()
            == 202
    })
    .await;
}
