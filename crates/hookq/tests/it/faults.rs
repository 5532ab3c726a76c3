//! The promises under hostile input and failing parts: requests that used to
//! panic the AMQP encoder, values that used to vanish, keys a replay could
//! change, waits that never ended, dead letters that should never move, and
//! URLs that should never be shown.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookq::events::Outcome;
use hookq::message::DeadReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, Client, FakeTarget, TestEnv, settled, wait_until};

const T: Duration = Duration::from_secs(15);

/// Sends raw bytes as one HTTP/1.1 request and returns the whole answer.
async fn raw_request(addr: std::net::SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    out
}

fn status_of(answer: &[u8]) -> u16 {
    let text = String::from_utf8_lossy(answer);
    let line = text.lines().next().unwrap_or("");
    assert!(
        line.starts_with("HTTP/1.1 "),
        "not an HTTP answer: {text:?}"
    );
    line[9..12].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_long_content_types_and_latin1_values_are_carried_faithfully() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("longhdr").with_target(&target.url);
    let up = env.up().await;
    let addr = up.ingress_addr.unwrap();
    let content_type = format!("application/json; profile={}", "p".repeat(300));
    let long_name = format!("x-{}", "n".repeat(300));
    let mut req = format!(
        "POST /hooks/s HTTP/1.1\r\nhost: x\r\nidempotency-key: long-1\r\n\
         content-type: {content_type}\r\n{long_name}: long\r\nx-repeat: 1\r\nx-repeat: 2\r\n"
    )
    .into_bytes();
    req.extend_from_slice(b"x-latin1: caf\xe9\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}");
    let answer = raw_request(addr, &req).await;
    assert_eq!(
        status_of(&answer),
        202,
        "{}",
        String::from_utf8_lossy(&answer)
    );

    wait_until(T, "the delivery", || async { target.count() == 1 }).await;
    let got = &target.received()[0];
    assert_eq!(
        got.headers["content-type"].as_bytes(),
        content_type.as_bytes()
    );
    assert_eq!(got.headers[long_name.as_str()], "long");
    assert_eq!(got.headers["x-latin1"].as_bytes(), b"caf\xe9");
    let repeats: Vec<_> = got.headers.get_all("x-repeat").iter().collect();
    assert_eq!(repeats, ["1", "2"]);
    assert_eq!(got.body, b"{}");
    // The process is fine: the next request on a new connection is accepted.
    let c = Client::new(addr);
    assert_eq!(c.post("s", &[], "{}").await.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_named_by_connection_are_not_forwarded() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("connhdr").with_target(&target.url);
    let up = env.up().await;
    let req = b"POST /hooks/s HTTP/1.1\r\nhost: x\r\nconnection: close, x-hop\r\n\
                x-hop: secret-for-the-proxy\r\nx-end: kept\r\ncontent-length: 2\r\n\r\n{}";
    let answer = raw_request(up.ingress_addr.unwrap(), req).await;
    assert_eq!(status_of(&answer), 202);
    wait_until(T, "the delivery", || async { target.count() == 1 }).await;
    let got = &target.received()[0];
    assert_eq!(got.header("x-end").as_deref(), Some("kept"));
    assert_eq!(got.header("x-hop"), None, "named in Connection: hop-by-hop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_and_is_counted() {
    let events = hookq::events::Events::new([]);
    let router = axum::Router::new()
        .route(
            "/boom",
            axum::routing::get(|| async {
                if true {
                    panic!("boom");
                }
                "unreachable"
            }),
        )
        .layer(hookq::ingress::catch_panics(events.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(hookq::http::serve(listener, router, stop.clone()));
    let http = reqwest::Client::new();
    for n in 1..=2 {
        let r = http
            .get(format!("http://{addr}/boom"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 500);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], "internal_error");
        let text = events.render();
        assert_eq!(
            crate::support::sample(&text, "hookq_ingress_panics_total"),
            n as f64,
            "{text}"
        );
    }
    stop.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_url_is_never_shown_with_its_query() {
    // Nothing listens on port 9: every attempt is a connection error.
    let url = "http://127.0.0.1:9/hooks?token=hunter2-secret";
    let mut env = TestEnv::new("urlleak").with_target(url);
    env.settings.retry.max_attempts = 1;
    env.settings.retry.inline_attempts_set = Some(1);
    let up = env.up().await;
    Client::new(up.ingress_addr.unwrap())
        .send("s", "leak", "{}")
        .await;
    wait_until(T, "the dead letter", || async {
        env.queue_len(&env.topology().dead()).await == 1
    })
    .await;
    let dead = env.dead_letters().await;
    let err = &dead[0].dead.as_ref().unwrap().last_error;
    assert!(err.contains("http://127.0.0.1:9/hooks"), "{err}");
    assert!(
        !err.contains("hunter2") && !err.contains("token"),
        "leaks the query: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_in_the_year_9999_is_clamped_and_counts() {
    let target = FakeTarget::start(|_, _| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
        )
            .into_response()
    })
    .await;
    // The breaker off: a failed probe spends its attempt, so the message
    // reaches its last one (with it on, the message is held instead).
    let no_breaker = hookq::config::TargetSettings {
        breaker_failures: 0,
        ..Default::default()
    };
    let mut env = TestEnv::new("ra9999").with_named_target("app", &target.url, no_breaker);
    env.settings.retry.max_attempts = 3;
    env.settings.retry.inline_attempts_set = Some(1);
    env.settings.retry.delays = [100].map(Duration::from_millis).to_vec();
    env.settings.retry.max_delay = Duration::from_millis(300);
    let up = env.up().await;
    let key = Client::new(up.ingress_addr.unwrap())
        .send("s", "far", "{}")
        .await;
    wait_until(T, "dead-lettered after its attempts", || async {
        env.queue_len(&env.topology().dead()).await == 1
    })
    .await;
    let got = target.for_key(&key);
    assert_eq!(got.len(), 3);
    for pair in got.windows(2) {
        let gap = pair[1].at - pair[0].at;
        assert!(gap >= Duration::from_millis(300), "waited {gap:?}");
    }
    let dead = env.dead_letters().await;
    assert_eq!(
        dead[0].dead.as_ref().unwrap().reason,
        DeadReason::MaxAttempts
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_before_in_the_far_future_is_clamped() {
    let target = FakeTarget::ok().await;
    let mut env = TestEnv::new("nb9999").with_target(&target.url);
    env.settings.retry.max_delay = Duration::from_millis(300);
    let _up = env.up().await;
    // A message as a hand (or a bug) might leave it: not before the year 9999.
    let mut msg = support::message("s:nb");
    msg.not_before = Some(253_402_300_799_000);
    let broker = env.broker().await;
    broker
        .publish_to_queue(&env.topology().work(0), &msg, None, T)
        .await
        .unwrap();
    wait_until(T, "delivered after at most max_delay_ms", || async {
        target.count() == 1
    })
    .await;
}

/// A message published by other means whose key no header can carry is
/// refused before any request is made: dead-lettered as `rejected`, saying
/// why, and the target never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_no_header_can_carry_is_rejected_without_a_request() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("badkey").with_target(&target.url);
    let up = env.up().await;
    let mut events = up.subscribe();
    let msg = support::message("s:line\nbreak");
    env.broker()
        .await
        .publish_to_queue(&env.topology().work(0), &msg, None, T)
        .await
        .unwrap();
    settled(&mut events, T, 1, |o| {
        matches!(
            o,
            Outcome::Dead {
                reason: DeadReason::Rejected
            }
        )
    })
    .await;
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    let info = dead[0].dead.as_ref().expect("the dead letter's details");
    assert!(
        info.last_error.contains(
            "cannot be sent as a request: its idempotency-key is not a valid header value"
        ),
        "{}",
        info.last_error
    );
    assert_eq!(target.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sources_share_one_metric_label_in_the_worker_too() {
    let env = TestEnv::new("labels");
    let up = env.up().await;
    let c = Client::new(up.ingress_addr.unwrap());
    let names: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "rand-{i}-{}",
                &uuid::Uuid::now_v7().simple().to_string()[24..]
            )
        })
        .collect();
    for n in &names {
        c.send(n, "one", "{}").await;
    }
    wait_until(T, "three deliveries counted under _other", || async {
        let m = c.get("/metrics").await.text().await.unwrap();
        m.contains(r#"hookq_worker_deliveries_total{source="_other",outcome="delivered"} 3"#)
    })
    .await;
    let m = c.get("/metrics").await.text().await.unwrap();
    assert!(m.contains("hookq_worker_deliveries_total"), "{m}");
    for n in &names {
        assert!(!m.contains(n.as_str()), "{n} became a label: {m}");
    }
}

/// A delay tier that refuses every republish (here a queue in its place that
/// takes nothing, which declaring the topology again cannot replace; a tier
/// that is merely gone is declared again). On a classic queue no broker
/// delivery limit ends that loop: hookq counts the refusals on the claim and
/// dead-letters the message as `delivery_limit` after `amqp.delivery_limit`.
async fn a_republish_that_keeps_failing_ends_in_the_dead_queue(q: hookq::config::QueueType) {
    let target = FakeTarget::start(|_, _| StatusCode::BAD_GATEWAY.into_response()).await;
    let mut env = TestEnv::new("refusals")
        .with_queue_type(q)
        .with_target(&target.url);
    env.settings.amqp.delivery_limit = 3;
    env.settings.retry.max_attempts = 100;
    env.settings.retry.inline_attempts_set = Some(1);
    env.settings.retry.delays = [100].map(Duration::from_millis).to_vec();
    let up = env.up().await;
    env.broker().await; // declares the topology now, not after the delete
    let topo = env.topology();
    env.refusing_queue_in_place_of(&topo.delay(topo.tiers[0]))
        .await;
    let key = Client::new(up.ingress_addr.unwrap())
        .send("s", "loop", "{}")
        .await;
    wait_until(T, "the dead letter", || async {
        env.queue_len(&env.topology().dead()).await == 1
    })
    .await;
    let dead = env.dead_letters().await;
    assert_eq!(dead[0].key.0, key);
    assert_eq!(
        dead[0].dead.as_ref().unwrap().reason,
        DeadReason::DeliveryLimit
    );
    assert!(
        target.for_key(&key).len() <= 4,
        "{}",
        target.for_key(&key).len()
    );
}

mod a_republish_that_keeps_failing_ends_in_the_dead_queue {
    use hookq::config::QueueType;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn classic() {
        super::a_republish_that_keeps_failing_ends_in_the_dead_queue(QueueType::Classic).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quorum() {
        super::a_republish_that_keeps_failing_ends_in_the_dead_queue(QueueType::Quorum).await
    }
}

/// A `P.dead` declared by the first release (no x-delivery-limit) still holds
/// its dead letters after an upgrade: hookq keeps it (and warns), rather than
/// refusing to start, which would also stop the ingress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_dead_queue_without_a_delivery_limit_does_not_stop_hookq() {
    let env = TestEnv::new("olddead");
    let (conn, ch) = env.raw_channel().await;
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        env.topology().dead().as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let _ = conn.close(200, "bye".into()).await;
    let declared = env.broker().await.declare_topology().await.unwrap();
    let dead = declared
        .iter()
        .find(|d| d.name == env.topology().dead() && d.kind == "queue")
        .unwrap();
    assert!(
        dead.arguments.contains("without x-delivery-limit"),
        "{dead:?}"
    );
    let up = env.up().await;
    let r = Client::new(up.ingress_addr.unwrap())
        .post("s", &[], "{}")
        .await;
    assert_eq!(r.status(), 202);
}
