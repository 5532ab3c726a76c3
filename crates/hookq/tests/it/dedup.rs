//! Processed once: duplicates through the real ingress, several worker
//! processes sharing one SQLite file, a worker killed mid-delivery, the LRU tier,
//! retention pruning and an unwritable store.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookq::system::Parts;
use tokio::process::Child;
use tokio::sync::Semaphore;

use crate::support::{self, Client, FakeTarget, TestEnv, wait_until};

const T: Duration = Duration::from_secs(30);

/// Sends `keys` x `copies` webhooks concurrently (64 at a time); all must get 202.
async fn send_copies(c: &Arc<Client>, keys: usize, copies: usize) {
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for copy in 0..copies {
        for k in 0..keys {
            let (c, gate) = (c.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                let _p = gate.acquire().await.unwrap();
                let id = format!("evt-{k}");
                c.send("dup", &id, &format!(r#"{{"k":{k},"copy":{copy}}}"#))
                    .await
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn assert_each_key_succeeded_once(target: &FakeTarget, keys: usize) {
    let ok = target.successes();
    assert_eq!(ok.len(), keys, "distinct keys delivered");
    let doubled: Vec<_> = ok.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "delivered more than once: {doubled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_copies_through_the_ingress_are_delivered_once() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("copies").with_target(&target.url);
    let up = env.up().await;
    let c = Arc::new(Client::new(up.ingress_addr.unwrap()));
    send_copies(&c, 500, 4).await;
    wait_until(T, "500 keys delivered", || async {
        target.successes().len() == 500
    })
    .await;
    wait_until(T, "work queue drained", || async {
        env.queue_len(&env.topology().work(0)).await == 0
    })
    .await;
    assert_each_key_succeeded_once(&target, 500);
    assert_eq!(
        target.count(),
        500,
        "the target never saw a duplicate request"
    );
}

fn worker_process(env: &TestEnv) -> Child {
    env.command(&["worker"], "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn hookq worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_worker_processes_sharing_one_store_deliver_once() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("procs").with_target(&target.url);
    let ingress = env.start(Parts::Ingress).await;
    let c = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    // Queue the duplicates first so that all three workers compete for them.
    wait_until(T, "ingress ready", || async {
        c.get("/readyz").await.status() == 200
    })
    .await;
    send_copies(&c, 300, 3).await;
    let mut workers: Vec<Child> = (0..3).map(|_| worker_process(&env)).collect();
    wait_until(T, "300 keys delivered", || async {
        target.successes().len() == 300
    })
    .await;
    wait_until(T, "work queue drained", || async {
        env.queue_len(&env.topology().work(0)).await == 0
    })
    .await;
    assert_each_key_succeeded_once(&target, 300);
    assert_eq!(target.count(), 300);
    for w in &mut workers {
        let _ = w.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_delivery_loses_nothing_and_reclaims_its_own_keys() {
    let target = FakeTarget::start_slow(Duration::from_millis(20), |_, _| {
        StatusCode::OK.into_response()
    })
    .await;
    let env = TestEnv::new("sigkill").with_target(&target.url);
    let ingress = env.start(Parts::Ingress).await;
    let c = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    wait_until(T, "ingress ready", || async {
        c.get("/readyz").await.status() == 200
    })
    .await;
    send_copies(&c, 300, 1).await;

    let mut first = worker_process(&env);
    wait_until(T, "deliveries under way", || async { target.count() >= 60 }).await;
    first.start_kill().unwrap(); // SIGKILL
    first.wait().await.unwrap();
    let before_restart = target.successes().len();
    assert!(
        before_restart < 300,
        "the kill came too late to test anything"
    );

    let mut second = worker_process(&env);
    wait_until(T, "every key delivered", || async {
        target.successes().len() == 300
    })
    .await;
    wait_until(T, "work queue drained", || async {
        env.queue_len(&env.topology().work(0)).await == 0
    })
    .await;
    // Only keys in flight at the kill may be seen twice (the SPEC's one exception),
    // and those are bounded by the prefetch.
    let doubled = target.successes().values().filter(|n| **n > 1).count();
    assert!(
        doubled <= env.settings.amqp.prefetch as usize,
        "{doubled} keys doubled"
    );
    assert!(env.dead_letters().await.is_empty());
    let _ = second.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_after_success_is_answered_from_the_lru() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("lru").with_target(&target.url);
    let up = env.up().await;
    let c = Client::new(up.ingress_addr.unwrap());
    c.send("s", "same", "{}").await;
    wait_until(T, "first delivery", || async { target.count() == 1 }).await;
    // The LRU learns the key after the ack; wait until the work queue settled.
    wait_until(T, "work queue drained", || async {
        env.queue_len(&env.topology().work(0)).await == 0
    })
    .await;
    c.send("s", "same", "{}").await;
    wait_until(T, "the repeat counted as an LRU hit", || async {
        let m = c.get("/metrics").await.text().await.unwrap();
        m.contains(r#"hookq_worker_dedup_hits_total{tier="lru"} 1"#)
    })
    .await;
    assert_eq!(target.count(), 1);
}

fn stored_keys(path: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row(
        "SELECT (SELECT count(*) FROM done) + (SELECT count(*) FROM claims)",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_pruning_forgets_old_keys() {
    let target = FakeTarget::ok().await;
    let mut env = TestEnv::new("prune").with_target(&target.url);
    env.settings.dedup.retention = Duration::from_millis(400);
    let up = env.up().await;
    let c = Client::new(up.ingress_addr.unwrap());
    c.send("s", "old", "{}").await;
    wait_until(T, "delivered", || async { target.count() == 1 }).await;
    let db = env.settings.dedup.path.clone();
    wait_until(T, "the key stored", || async { stored_keys(&db) == 1 }).await;
    wait_until(T, "the key pruned", || async { stored_keys(&db) == 0 }).await;
    // Forgotten: the same event is delivered again.
    c.send("s", "old", "{}").await;
    wait_until(T, "delivered again", || async { target.count() == 2 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_store_holds_messages_then_recovers_without_loss_or_doubling() {
    let target = FakeTarget::ok().await;
    let mut env = TestEnv::new("rostore").with_target(&target.url);
    // A regular file where the store's directory should be: SQLite cannot
    // create or write the database (root ignores file modes, so a chmod would not do).
    let blocker = env.dir().join("blocked");
    std::fs::write(&blocker, b"not a directory").unwrap();
    env.settings.dedup.path = blocker.join("dedup.db");
    let running = env.start(Parts::Up).await;
    let c = Client::new(running.ingress_addr.unwrap());
    wait_until(T, "ingress accepting", || async {
        c.post("s", &[("idempotency-key", "probe")], "{}")
            .await
            .status()
            == 202
    })
    .await;
    let keys: HashSet<String> = ["a", "b", "c"].iter().map(|k| format!("s:{k}")).collect();
    for k in ["a", "b", "c"] {
        c.send("s", k, "{}").await;
    }
    wait_until(T, "readyz 503 while the store fails", || async {
        c.get("/readyz").await.status() == 503
    })
    .await;
    // Held, not delivered: delivering without a claim could double it. The
    // worker has taken all four (none is ready in the queue) and the target
    // has seen none.
    wait_until(T, "the worker holding every message", || async {
        env.queue_len(&env.topology().work(0)).await == 0
    })
    .await;
    assert_eq!(
        target.started(),
        0,
        "nothing is delivered while the store cannot be written"
    );

    std::fs::remove_file(&blocker).unwrap();
    wait_until(T, "all delivered after recovery", || async {
        target.successes().len() == 4
    })
    .await;
    wait_until(T, "ready again", || async {
        c.get("/readyz").await.status() == 200
    })
    .await;
    assert_each_key_succeeded_once(&target, 4);
    for k in keys {
        assert_eq!(target.for_key(&k).len(), 1, "{k}");
    }
}

/// The broker connections (pids) of this test's prefix whose name starts with
/// `part`, as `rabbitmqctl` lists them (the name is in the client properties).
fn connections_of(env: &TestEnv, part: &str) -> Vec<String> {
    let out = crate::support::rabbitmqctl()
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let name = format!("{part} [{}]", env.prefix);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&name))
        .filter_map(|l| l.split('\t').next())
        .map(str::to_string)
        .collect()
}

/// The race a dropped connection opens: a worker with slow deliveries in flight
/// loses its broker connection, the broker hands those messages to the other
/// worker on the same store, and the first worker's deliveries are still
/// running. The claim knows its holder is alive: the copy waits, and the target
/// answers 2xx to each key exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_with_deliveries_in_flight_does_not_deliver_twice() {
    dropped_connection_with_deliveries_in_flight(1).await
}

/// The same with partitions, whose claims are in memory: the second worker
/// becomes the partitions' active consumer, and waits to take them in the
/// store until the first one's deliveries have ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_with_deliveries_in_flight_does_not_deliver_twice_on_partitions() {
    dropped_connection_with_deliveries_in_flight(2).await
}

async fn dropped_connection_with_deliveries_in_flight(partitions: u32) {
    // Slow enough that the deliveries are still running when the connection
    // goes (rabbitmqctl takes a second or more per call on a busy machine).
    let target = FakeTarget::start_slow(Duration::from_secs(10), |_, _| {
        StatusCode::OK.into_response()
    })
    .await;
    let mut env = TestEnv::new("dropconn").with_target(&target.url);
    env.settings.worker.timeout = Duration::from_millis(30_000);
    env.settings.amqp.partitions = partitions;
    let ingress = env.start(Parts::Ingress).await;
    let c = Client::new(ingress.ingress_addr.unwrap());
    wait_until(T, "ingress ready", || async {
        c.get("/readyz").await.status() == 200
    })
    .await;
    let first = env.start(Parts::Worker).await;
    for i in 0..8 {
        c.send("s", &format!("slow-{i}"), "{}").await;
    }
    wait_until(T, "8 deliveries in flight", || async {
        target.started() == 8
    })
    .await;
    let held = connections_of(&env, "hookq-worker");
    assert_eq!(held.len(), 1, "one worker connection so far: {held:?}");
    let second = env.start(Parts::Worker).await;
    wait_until(T, "the second worker consuming", || async {
        connections_of(&env, "hookq-worker").len() == 2
    })
    .await;
    let closed = crate::support::rabbitmqctl()
        .args(["close_connection", &held[0], "test: connection dropped"])
        .status()
        .unwrap();
    assert!(closed.success());
    assert_eq!(
        target.count(),
        0,
        "the connection must close while the deliveries run, or this proves nothing"
    );
    // The broker hands the 8 messages out again (to either worker, the first
    // one once it has reconnected); each copy finds its claim held by a live
    // worker, waits for the first delivery to end, then sees it done.
    let duplicates = |addr: std::net::SocketAddr| async move {
        let m = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let prefix = r#"hookq_worker_deliveries_total{source="_other",outcome="duplicate"} "#;
        m.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map_or(0, |n| n.parse::<u32>().unwrap())
    };
    let (a, b) = (first.ops_addr.unwrap(), second.ops_addr.unwrap());
    wait_until(T, "the copies acked as duplicates", || async {
        duplicates(a).await + duplicates(b).await == 8
    })
    .await;
    assert_each_key_succeeded_once(&target, 8);
    assert_eq!(target.started(), 8, "no second delivery was started");
    assert_eq!(target.count(), 8);
}

/// Two copies of one message in the work queue at once (a shovel re-run, or a
/// republish whose confirm timed out): the second waits for the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_of_one_message_are_not_delivered_at_once() {
    let target = FakeTarget::start_slow(Duration::from_millis(800), |_, _| {
        StatusCode::OK.into_response()
    })
    .await;
    let env = TestEnv::new("samecopy").with_target(&target.url);
    let up = env.up().await;
    let msg = support::message("s:twice");
    let broker = env.broker().await;
    for _ in 0..2 {
        broker
            .publish_to_queue(&env.topology().work(0), &msg, None, T)
            .await
            .unwrap();
    }
    let c = Client::new(up.ingress_addr.unwrap());
    wait_until(T, "one delivered, one duplicate", || async {
        let m = c.get("/metrics").await.text().await.unwrap();
        m.contains(r#"{source="_other",outcome="delivered"} 1"#)
            && m.contains(r#"{source="_other",outcome="duplicate"} 1"#)
    })
    .await;
    assert_eq!(target.started(), 1, "the copy never reached the target");
}
