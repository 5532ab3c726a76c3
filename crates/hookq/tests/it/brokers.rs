//! What differs between RabbitMQ 3.10 and 4.x, checked on the broker under
//! test: the quorum delivery limit on the work queues, dead-letter reads that
//! a 4.x quorum queue counts, a done-log declared under another retention,
//! a topology declared on 3.10 taken over by 4.x, and channel ids that wrap
//! past one the broker closed.

use std::sync::Arc;
use std::time::Duration;

use hookq::message::{DeadReason, DedupKey};
use hookq::system::Parts;

use crate::support::{self, Client, FakeTarget, TestEnv, wait_until};

const T: Duration = Duration::from_secs(60);

/// A message handed back again and again (here: its partition's done-log
/// cannot be read) reaches the work queue's delivery limit, which hookq
/// declares (`amqp.delivery_limit`; 4.x would default to 20): the broker
/// dead-letters it to `P.dead` with its reason, never drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_backs_end_at_the_delivery_limit_as_a_dead_letter() {
    let target = FakeTarget::ok().await;
    let mut env = TestEnv::new("handbacks").with_target(&target.url);
    env.settings.amqp.partitions = 2;
    env.settings.amqp.delivery_limit = 2;
    env.broker().await;
    let topo = env.topology();
    let up = env.start(Parts::Up).await;
    assert!(up.ready(T).await);
    // After hookq connected: declaring the topology again is refused over a
    // queue in the done-log's place (it is not a stream).
    env.refusing_queue_in_place_of(&topo.done(0)).await;
    let client = Client::new(up.ingress_addr.unwrap());
    let id = (0..)
        .map(|k| format!("limit-{k}"))
        .find(|id| topo.partition(&DedupKey(format!("p:{id}"))) == 0)
        .unwrap();
    let key = client.send("p", &id, "{}").await;
    wait_until(T, "the dead letter", || async {
        env.queue_len(&topo.dead()).await == 1
    })
    .await;
    let dead = env.dead_letters().await;
    assert_eq!(dead[0].key.0, key);
    assert_eq!(
        dead[0].dead.as_ref().map(|d| d.reason),
        Some(DeadReason::DeliveryLimit)
    );
    assert!(target.count() == 0, "never delivered");
}

/// Reading `P.dead` fifty times (more than a 4.x quorum queue's default
/// delivery limit of 20) keeps every dead letter: hookq declares the limit
/// on `P.dead` out of reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reads_of_the_dead_letters_keep_them() {
    let env = TestEnv::new("reads");
    let broker = env.broker().await;
    let ids = support::publish_dead_letters(&broker, 3).await;
    for _ in 0..50 {
        let rows = hookq::dead_letters::rows(&broker, None).await.unwrap();
        assert_eq!(rows.len(), 3);
    }
    // What the broker counted, as it shows on the next delivery.
    let (conn, ch) = env.raw_channel().await;
    let got = ch
        .basic_get(env.topology().dead().as_str().into(), Default::default())
        .await
        .unwrap()
        .expect("a dead letter");
    let count = got
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned());
    eprintln!(
        "reads: RabbitMQ {}.x, x-delivery-count after 50 reads: {count:?}",
        support::broker_major().await
    );
    let _ = conn.close(200, "bye".into()).await;
    // The raw get's message goes back when its connection closes, which a
    // quorum queue applies a moment later: wait for it before reading again.
    let dead = env.topology().dead();
    wait_until(
        Duration::from_secs(10),
        "the raw read's message back",
        || async { env.queue_len(&dead).await == 3 },
    )
    .await;
    let rows = hookq::dead_letters::rows(&broker, None).await.unwrap();
    let mut left: Vec<_> = rows.into_iter().map(|r| r.message_id).collect();
    left.sort();
    let mut want = ids;
    want.sort();
    assert_eq!(left, want, "every dead letter still there");
}

/// A done-log declared under another `dedup.retention_ms` (the retry settings
/// grow its default) is kept with a warning, not refused: the workers start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_done_log_declared_under_another_retention_is_kept() {
    let target = FakeTarget::ok().await;
    let mut env = TestEnv::new("maxage").with_target(&target.url);
    env.settings.amqp.partitions = 2;
    env.broker().await;
    env.settings.dedup.retention *= 2;
    let up = env.start(Parts::Up).await;
    assert!(
        up.ready(T).await,
        "starts over done-logs of another max-age"
    );
    let client = Client::new(up.ingress_addr.unwrap());
    client.send("p", "after", "{}").await;
    wait_until(T, "delivered", || async { target.count() == 1 }).await;
}

/// Upgrading 3.10 to 4.x the way RabbitMQ documents for a new cluster: the
/// definitions exported from 3.10 (hookq's exchanges, queues with their
/// arguments, bindings) imported into 4.x; hookq then runs on 4.x over that
/// topology without a refused argument. Runs in the 4.x pass (it needs the
/// 3.10 broker on 127.0.0.1:5672 too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topology_declared_on_3_10_works_on_4() {
    if support::broker_major().await < 4 {
        eprintln!("upgrade: runs in the RabbitMQ 4.x pass");
        return;
    }
    let old_api = "http://127.0.0.1:15672/api";
    let http = reqwest::Client::new();
    let overview = http
        .get(format!("{old_api}/overview"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
    assert!(
        overview.is_ok_and(|r| r.status().is_success()),
        "the 3.10 broker's management API on :15672 (.ci/run starts it)"
    );
    let target = FakeTarget::ok().await;
    let mut env = TestEnv::new("upgrade").with_target(&target.url);
    env.settings.amqp.partitions = 2;
    // hookq on 3.10 declares its topology there.
    let mut old = env.settings.clone();
    old.amqp.urls =
        vec![hookq::config::AmqpUrl::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap()];
    let old_topo = hookq::broker::Topology::new(
        &old.amqp,
        &hookq::retry::Policy::new(&old.retry),
        old.dedup.retention,
    );
    let old_broker = hookq::broker::Broker::connect(&old.amqp.urls, "hookq-upgrade", old_topo)
        .await
        .unwrap();
    old_broker.declare_topology().await.unwrap();
    // Export from 3.10, keep this prefix's part, import into 4.x.
    let defs: serde_json::Value = http
        .get(format!("{old_api}/definitions"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let prefix = format!("{}.", env.prefix);
    let ours = |v: &serde_json::Value, field: &str| {
        v[field]
            .as_str()
            .is_some_and(|n| n == env.prefix || n.starts_with(&prefix))
    };
    let pick = |kind: &str, field: &str| -> Vec<serde_json::Value> {
        defs[kind]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| ours(v, field))
            .cloned()
            .collect()
    };
    let import = serde_json::json!({
        "queues": pick("queues", "name"),
        "exchanges": pick("exchanges", "name"),
        "bindings": pick("bindings", "destination"),
    });
    let queues = import["queues"].as_array().unwrap().len();
    // Two work queues, the delay tiers, two done-logs and P.dead.
    assert!(queues >= 6, "{import}");
    let r = http
        .post(format!("{}/definitions", support::management_api()))
        .basic_auth("guest", Some("guest"))
        .json(&import)
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "import refused: {:?}",
        r.text().await
    );
    old_broker.delete_topology().await.unwrap();
    old_broker.close().await;
    // hookq on 4.x over the imported topology.
    let up = env.start(Parts::Up).await;
    assert!(up.ready(T).await, "hookq starts over the 3.10 topology");
    let client = Arc::new(Client::new(up.ingress_addr.unwrap()));
    for k in 0..4 {
        client.send("p", &format!("up-{k}"), "{}").await;
    }
    wait_until(T, "delivered on 4.x", || async { target.count() == 4 }).await;
    eprintln!("upgrade: {queues} queues declared on 3.10, imported into 4.x, hookq runs over them");
}

/// A channel the broker closed (a passive declaration of a missing queue, as
/// the topology's probes make at every start) leaves its error in lapin under
/// its id; when the ids wrap (2,047 on RabbitMQ) the channel that gets it
/// failed to open with that old NOT_FOUND. `broker::channel::open` takes the
/// next id: every open succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_ids_wrap_past_one_the_broker_closed() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    let conn = lapin::Connection::connect(support::amqp_url(), Default::default())
        .await
        .unwrap();
    let max = usize::from(conn.configuration().channel_max());
    let probe = conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let missing = format!("hookq-test-missing-{}", uuid::Uuid::now_v7());
    let closed = probe
        .queue_declare(missing.as_str().into(), passive, FieldTable::default())
        .await;
    assert!(closed.is_err(), "{missing} exists");
    for i in 0..max + 10 {
        let ch = hookq::broker::channel::open(&conn)
            .await
            .unwrap_or_else(|e| panic!("channel {i} of {max}: {e}"));
        ch.close(200, "done".into()).await.unwrap();
    }
    conn.close(200, "done".into()).await.unwrap();
}
