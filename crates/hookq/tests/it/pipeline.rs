//! The core pipeline: ingress -> RabbitMQ -> worker -> target, with in-process
//! retries, delay tiers and the dead-letter queue. Each scenario runs on both
//! queue types.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookq::broker::Broker;
use hookq::config::QueueType;
use hookq::events::{Event, Outcome};
use hookq::message::DeadReason;
use hookq::system::Parts;

use crate::support::{Client, FakeTarget, TestEnv, settled, wait_until};

const T: Duration = Duration::from_secs(10);

on_both_queue_types!(
    delivered_on_first_try,
    server_error_then_ok_recovers_in_process,
    failures_travel_through_the_delay_tiers_then_succeed,
    exhausted_retries_end_in_the_dead_queue,
    client_error_is_dead_lettered_as_rejected_after_one_delivery,
    retry_after_is_honoured,
    failed_republish_hands_the_message_back,
    a_slow_delivery_does_not_hold_back_the_acks_after_it,
);

/// Starts `up` and sends one webhook (source `s`, id `k1`); returns its key.
async fn up_and_send_one(env: &TestEnv, body: &str) -> (hookq::system::System, String) {
    let up = env.up().await;
    let key = Client::new(up.ingress_addr.unwrap())
        .send("s", "k1", body)
        .await;
    (up, key)
}

async fn delivered_on_first_try(q: QueueType) {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("first")
        .with_queue_type(q)
        .with_target(&target.url);
    let up = env.up().await;
    let c = Client::new(up.ingress_addr.unwrap());
    let body = r#"{"order": 1, "note": "héllo"}"#;
    let r = c
        .post(
            "shop",
            &[
                ("idempotency-key", "order-1"),
                ("x-custom", "v"),
                ("authorization", "Bearer secret"),
            ],
            body,
        )
        .await;
    assert_eq!(r.status(), 202);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert_eq!(answer["key"], "shop:order-1");
    let id = answer["id"].as_str().unwrap().to_string();

    wait_until(T, "one delivery", || async { target.count() == 1 }).await;
    let got = &target.received()[0];
    assert_eq!(got.body, body.as_bytes());
    assert_eq!(
        got.header("idempotency-key").as_deref(),
        Some("shop:order-1")
    );
    assert_eq!(got.header("hookq-source").as_deref(), Some("shop"));
    assert_eq!(got.header("hookq-message-id"), Some(id));
    assert_eq!(got.header("hookq-attempt").as_deref(), Some("1"));
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(got.header("x-custom").as_deref(), Some("v"));
    assert_eq!(
        got.header("authorization"),
        None,
        "credentials for the ingress are not forwarded"
    );
    wait_until(T, "work queue empty", || async {
        env.queue_len(&env.topology().work(0)).await == 0
    })
    .await;
    assert!(env.dead_letters().await.is_empty());
}

async fn server_error_then_ok_recovers_in_process(q: QueueType) {
    let target = FakeTarget::start(|n, _| {
        if n == 1 {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        }
        .into_response()
    })
    .await;
    let env = TestEnv::new("inline")
        .with_queue_type(q)
        .with_target(&target.url);
    let up = env.up().await;
    let mut events = up.subscribe();
    let key = Client::new(up.ingress_addr.unwrap())
        .send("s", "k1", "{}")
        .await;
    // The one settlement: delivered on the second attempt, in this process (no
    // delay tier on the way).
    let mut outcomes = Vec::new();
    hookq_testkit::wait_for(&mut events, T, |e| {
        if let Event::Settled { outcome, .. } = e {
            outcomes.push(outcome.clone());
        }
        !outcomes.is_empty()
    })
    .await
    .unwrap();
    assert_eq!(outcomes, [Outcome::Delivered { attempt: 2 }]);
    let attempts: Vec<_> = target
        .for_key(&key)
        .iter()
        .map(|r| r.header("hookq-attempt").unwrap())
        .collect();
    assert_eq!(attempts, ["1", "2"]);
    assert!(env.dead_letters().await.is_empty());
}

async fn failures_travel_through_the_delay_tiers_then_succeed(q: QueueType) {
    let target = FakeTarget::start(|n, _| {
        if n <= 3 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
        .into_response()
    })
    .await;
    let mut env = TestEnv::new("tiers")
        .with_queue_type(q)
        .with_target(&target.url);
    env.settings.retry.max_attempts = 5;
    env.settings.retry.inline_attempts_set = Some(1);
    env.settings.retry.delays = [100, 200, 400].map(Duration::from_millis).to_vec();
    let (_up, key) = up_and_send_one(&env, "{}").await;
    wait_until(T, "four attempts", || async { target.count() == 4 }).await;
    let got = target.for_key(&key);
    let attempts: Vec<_> = got
        .iter()
        .map(|r| r.header("hookq-attempt").unwrap())
        .collect();
    assert_eq!(attempts, ["1", "2", "3", "4"]);
    // Each broker retry waited at least its tier.
    for (i, tier) in [100u64, 200, 400].iter().enumerate() {
        let gap = got[i + 1].at - got[i].at;
        assert!(
            gap >= Duration::from_millis(*tier),
            "retry {} waited {gap:?}, tier {tier} ms",
            i + 1
        );
    }
    wait_until(T, "work queue empty", || async {
        env.queue_len(&env.topology().work(0)).await == 0
    })
    .await;
    let topo = env.topology();
    for &t in &topo.tiers {
        let queue = topo.delay(t);
        assert_eq!(env.queue_len(&queue).await, 0, "{queue}");
    }
    assert!(env.dead_letters().await.is_empty());
}

async fn exhausted_retries_end_in_the_dead_queue(q: QueueType) {
    let target = FakeTarget::start(|_, _| StatusCode::INTERNAL_SERVER_ERROR.into_response()).await;
    let mut env = TestEnv::new("exhaust")
        .with_queue_type(q)
        .with_target(&target.url);
    env.settings.retry.max_attempts = 4;
    env.settings.retry.inline_attempts_set = Some(2);
    let (_up, key) = up_and_send_one(&env, r#"{"x":1}"#).await;
    wait_until(T, "a dead letter", || async {
        env.queue_len(&env.topology().dead()).await == 1
    })
    .await;
    assert_eq!(target.for_key(&key).len(), 4);
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.key.0, key);
    assert_eq!(d.attempts, 4);
    assert_eq!(d.body, &br#"{"x":1}"#[..]);
    let info = d.dead.as_ref().unwrap();
    assert_eq!(info.reason, DeadReason::MaxAttempts);
    assert_eq!(info.last_status, Some(500));
    assert!(info.last_error.contains("500"), "{}", info.last_error);
    assert!(!info.dead_at.is_empty());
}

async fn client_error_is_dead_lettered_as_rejected_after_one_delivery(q: QueueType) {
    let target = FakeTarget::start(|_, _| StatusCode::BAD_REQUEST.into_response()).await;
    let env = TestEnv::new("rejected")
        .with_queue_type(q)
        .with_target(&target.url);
    let (_up, key) = up_and_send_one(&env, "{}").await;
    wait_until(T, "a dead letter", || async {
        env.queue_len(&env.topology().dead()).await == 1
    })
    .await;
    assert_eq!(target.for_key(&key).len(), 1);
    let dead = env.dead_letters().await;
    let info = dead[0].dead.as_ref().unwrap();
    assert_eq!(info.reason, DeadReason::Rejected);
    assert_eq!(info.last_status, Some(400));
    assert_eq!(dead[0].attempts, 1);
}

async fn retry_after_is_honoured(q: QueueType) {
    let target = FakeTarget::start(|n, _| {
        if n == 1 {
            (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response()
        } else {
            StatusCode::OK.into_response()
        }
    })
    .await;
    let env = TestEnv::new("retryafter")
        .with_queue_type(q)
        .with_target(&target.url);
    let (_up, key) = up_and_send_one(&env, "{}").await;
    wait_until(T, "two attempts", || async { target.count() == 2 }).await;
    let got = target.for_key(&key);
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "waited only {gap:?} after Retry-After: 1"
    );
}

/// The delay queue disappears under the worker: the republish is refused, the
/// message goes back to the work queue (never dropped), and once the topology
/// is back it carries on to its end.
async fn failed_republish_hands_the_message_back(q: QueueType) {
    let target = FakeTarget::start(|_, _| StatusCode::BAD_GATEWAY.into_response()).await;
    let mut env = TestEnv::new("handback")
        .with_queue_type(q)
        .with_target(&target.url);
    // Each refused republish keeps the attempt it followed (recorded on the
    // claim): the fourth attempt is the last.
    env.settings.retry.max_attempts = 4;
    env.settings.retry.inline_attempts_set = Some(1);
    env.settings.retry.delays = [100].map(Duration::from_millis).to_vec();
    let up = env.up().await;
    let broker = env.broker().await;
    let topo = env.topology();
    let tier = topo.delay(topo.tiers[0]);
    env.delete_queue(&tier).await;
    let key = Client::new(up.ingress_addr.unwrap())
        .send("s", "k1", "{}")
        .await;
    // Attempted, refused by the broker, handed back, attempted again...
    wait_until(T, "a second try after the hand-back", || async {
        target.for_key(&key).len() >= 2
    })
    .await;
    assert!(env.dead_letters().await.is_empty());
    // ...and the work queue still holds it (in flight or ready).
    broker.declare_topology().await.unwrap();
    wait_until(T, "the dead letter", || async {
        env.queue_len(&env.topology().dead()).await == 1
    })
    .await;
    let dead = env.dead_letters().await;
    assert_eq!(dead[0].key.0, key);
    assert_eq!(dead[0].attempts, 4);
    assert_eq!(
        target.for_key(&key).len(),
        4,
        "attempts counted across hand-backs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publish_is_not_accepted() {
    let env = TestEnv::new("unroutable");
    let up = env.up().await;
    // Nothing is bound to the exchange any more: the broker returns the message.
    let (conn, ch) = env.raw_channel().await;
    let topo = env.topology();
    ch.queue_unbind(
        topo.work(0).as_str().into(),
        topo.exchange().as_str().into(),
        "#".into(),
        Default::default(),
    )
    .await
    .unwrap();
    let r = Client::new(up.ingress_addr.unwrap())
        .post("s", &[], "{}")
        .await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "broker_unavailable");
    assert!(v["message"].as_str().unwrap().contains("unroutable"), "{v}");
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_gives_503_and_not_ready() {
    let mut env = TestEnv::new("nobroker");
    env.settings.amqp.urls =
        vec![hookq::config::AmqpUrl::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap()];
    let running = env.start(Parts::Ingress).await;
    let c = Client::new(running.ingress_addr.unwrap());
    assert_eq!(c.get("/healthz").await.status(), 200);
    assert_eq!(c.get("/readyz").await.status(), 503);
    let r = c.post("s", &[], "{}").await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers().get("retry-after").unwrap(), "5");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "broker_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_idempotent_and_refuses_changed_arguments_clearly() {
    let env = TestEnv::new("topo");
    let b = env.broker().await;
    let first = b.declare_topology().await.unwrap();
    let second = b.declare_topology().await.unwrap();
    assert_eq!(first.len(), second.len());
    // Exchanges (main, dead, control), the work queue, three delay tiers,
    // the dead-letter queue; no targets in this configuration.
    assert_eq!(first.len(), 3 + 1 + 3 + 1);

    let mut changed = env.settings.clone();
    changed.amqp.delivery_limit = 7;
    let policy = hookq::retry::Policy::new(&changed.retry);
    let topo = hookq::broker::Topology::new(&changed.amqp, &policy, changed.dedup.retention);
    let err = Broker::connect(&env.settings.amqp.urls, "test", topo)
        .await
        .err()
        .expect("changed arguments must be refused");
    let text = err.to_string();
    assert!(text.contains(&env.topology().work(0)), "{text}");
    assert!(text.contains("x-delivery-limit"), "{text}");
    assert!(text.contains("delete_queue"), "says what to do: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_and_unknown_source_get_their_codes() {
    let mut env = TestEnv::new("codes");
    env.settings.ingress.allow_unknown_sources = false;
    env.settings.ingress.max_body_bytes = 16;
    env.settings
        .sources
        .insert("known".into(), hookq::config::SourceSettings::default());
    let up = env.up().await;
    let c = Client::new(up.ingress_addr.unwrap());
    let r = c.post("other", &[], "{}").await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "unknown_source"
    );
    let r = c.get("/hooks/known").await;
    assert_eq!(r.status(), 405);
    let r = c.post("known", &[], &"x".repeat(17)).await;
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "payload_too_large"
    );
    assert_eq!(c.post("known", &[], "{}").await.status(), 202);
}

/// The worker sends one `basic.ack(multiple)` for a run of settled deliveries,
/// never past one still being worked on. A slow delivery must not hold back
/// the acks of the fast ones after it: with a prefetch of 8 they would fill the
/// window and stop the consumer until the slow one ends.
async fn a_slow_delivery_does_not_hold_back_the_acks_after_it(q: QueueType) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let release = Arc::new(tokio::sync::Notify::new());
    let arrived = Arc::new(AtomicBool::new(false));
    let (r, a) = (release.clone(), arrived.clone());
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let (release, arrived) = (r.clone(), a.clone());
        async move {
            if headers
                .get("idempotency-key")
                .is_some_and(|k| k == "s:slow")
            {
                arrived.store(true, Ordering::SeqCst);
                release.notified().await;
            }
            StatusCode::OK
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut env = TestEnv::new("slowack").with_queue_type(q).with_target(&url);
    env.settings.amqp.prefetch = 8;
    env.settings.worker.concurrency = 8;
    env.settings.worker.timeout = Duration::from_secs(30);
    let up = env.up().await;
    let mut events = up.subscribe();
    let c = Client::new(up.ingress_addr.unwrap());
    c.send("s", "slow", "{}").await;
    wait_until(T, "the slow delivery to reach the target", || async {
        arrived.load(Ordering::SeqCst)
    })
    .await;
    let fast = 40;
    for i in 0..fast {
        c.send("s", &format!("fast-{i}"), "{}").await;
    }
    // Every fast one is delivered and acked while the slow one still waits.
    settled(&mut events, T, fast, |o| {
        matches!(o, Outcome::Delivered { .. })
    })
    .await;
    assert!(arrived.load(Ordering::SeqCst));
    release.notify_one();
    settled(&mut events, T, 1, |o| {
        matches!(o, Outcome::Delivered { .. })
    })
    .await;
    up.shutdown().await.unwrap();
    // Every ack reached the broker: nothing went back to the queue at the stop.
    assert_eq!(env.queue_len(&env.topology().work(0)).await, 0);
}
