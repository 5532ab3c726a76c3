//! Dead letters and messages as the tests and the benchmark put them on the
//! broker by hand: the one fixture, so that every dead letter in a test
//! looks like one a worker writes.

use std::time::Duration;

use futures::StreamExt;
use hookq::broker::Broker;
use hookq::message::{DeadInfo, DeadReason, DedupKey, Envelope};

/// A webhook of `source` with `key` and `body`, as the ingress would
/// publish it (or another client, straight to the broker).
pub fn message(source: &str, key: &str, body: &[u8]) -> Envelope {
    Envelope::received(
        source,
        DedupKey(key.into()),
        body.to_vec().into(),
        Some("application/json".into()),
        Default::default(),
    )
}

/// `env` as a worker dead-letters it after five failed attempts (HTTP 503).
pub fn dead(mut env: Envelope) -> Envelope {
    env.attempts = 5;
    env.dead = Some(DeadInfo {
        reason: DeadReason::MaxAttempts,
        last_error: "HTTP 503".into(),
        last_status: Some(503),
        dead_at: hookq::message::rfc3339_now(),
    });
    env
}

/// `n` dead letters of source `bulk` (keys `bulk:0` ...) published straight
/// to `P.dead`, many at a time; their message ids, in publishing order.
pub async fn publish_dead_letters(broker: &Broker, n: usize) -> Vec<String> {
    let envs: Vec<Envelope> = (0..n)
        .map(|i| {
            dead(message(
                "bulk",
                &format!("bulk:{i}"),
                format!(r#"{{"i":{i}}}"#).as_bytes(),
            ))
        })
        .collect();
    let ids = envs.iter().map(|e| e.message_id.0.clone()).collect();
    futures::stream::iter(envs)
        .map(|e| async move {
            broker
                .publish_dead(&e, Duration::from_secs(10))
                .await
                .expect("publish dead letter")
        })
        .buffer_unordered(128)
        .collect::<Vec<()>>()
        .await;
    ids
}

/// Puts a message that is not a hookq message (no hookq headers) in
/// exchange `dead` by hand, with `body` and message id `id`.
pub async fn publish_foreign(amqp_url: &str, dead: &str, body: &[u8], id: &str) {
    let (conn, ch) = crate::sandbox::raw_channel(amqp_url)
        .await
        .expect("a raw channel");
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        dead.into(),
        "".into(),
        Default::default(),
        body,
        lapin::BasicProperties::default().with_message_id(id.into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = conn.close(200, "bye".into()).await;
}
