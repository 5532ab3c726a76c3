//! A partitioned fleet through what it goes through every week: rolling
//! deploys (a busy worker stopped while copies of its keys arrive), a
//! done-log recreated under it, a worker that becomes a partition's active
//! consumer again, done-log appends that fail, a done-log that keeps failing,
//! and a work queue deleted under a running worker. Each worker process has a
//! store of its own, as on a host of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookq::message::DedupKey;
use hookq::system::Parts;
use tokio::sync::Semaphore;

use crate::support::{Client, FakeTarget, Process, TestEnv, sample, wait_until};

const T: Duration = Duration::from_secs(60);

fn partitioned(name: &str, target: &FakeTarget, partitions: u32) -> TestEnv {
    let mut env = TestEnv::new(name).with_target(&target.url);
    env.settings.amqp.partitions = partitions;
    env.settings.amqp.prefetch = 8;
    env
}

/// Posts `ids` (source `p`), 16 at a time.
async fn send(client: &Arc<Client>, ids: &[String]) {
    let gate = Arc::new(Semaphore::new(16));
    let mut tasks = Vec::new();
    for id in ids {
        let (client, gate, id) = (client.clone(), gate.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            client.send("p", &id, "{}").await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// The deliveries a worker has in flight, from its /metrics.
async fn in_flight(h: &Process) -> f64 {
    sample(&h.metrics().await, "hookq_worker_in_flight")
}

/// The partitions a worker is active on, from its /metrics.
async fn active_on(h: &Process, partitions: u32) -> Vec<u32> {
    let m = h.metrics().await;
    (0..partitions)
        .filter(|i| {
            sample(
                &m,
                &format!("hookq_worker_partition_active{{partition=\"{i}\"}}"),
            ) == 1.0
        })
        .collect()
}

/// Waits until every partition queue is empty and `hosts` have nothing in
/// flight, twice in a row 200 ms apart.
async fn drained(env: &TestEnv, partitions: u32, hosts: &[&Process]) {
    let quiet = || async {
        for i in 0..partitions {
            if env.queue_len(&env.topology().work(i)).await > 0 {
                return false;
            }
        }
        for h in hosts {
            if in_flight(h).await > 0.0 {
                return false;
            }
        }
        true
    };
    wait_until(T, "the partitions drained", || async {
        quiet().await && {
            tokio::time::sleep(Duration::from_millis(200)).await;
            quiet().await
        }
    })
    .await;
}

/// Every key answered 2xx exactly once, and no two requests for one key
/// overlapped (each request takes the target's `delay`).
fn once_and_never_at_once(target: &FakeTarget, keys: &[String], delay: Duration) {
    let mut by_key: HashMap<String, Vec<Instant>> = HashMap::new();
    for r in target.received() {
        by_key.entry(r.key()).or_default().push(r.at);
    }
    let mut doubled = Vec::new();
    let mut overlapping = Vec::new();
    for k in keys {
        let mut at = by_key.get(&format!("p:{k}")).cloned().unwrap_or_default();
        at.sort();
        if at.len() != 1 {
            doubled.push((k.clone(), at.len()));
        }
        if at.windows(2).any(|w| w[1].duration_since(w[0]) < delay) {
            overlapping.push(k.clone());
        }
    }
    assert!(
        doubled.is_empty() && overlapping.is_empty(),
        "keys not requested exactly once: {doubled:?}; requests of one key at once: {overlapping:?}"
    );
}

/// Rolling deploys: three rounds of "stop the busy worker with SIGTERM while
/// copies of its in-flight keys arrive, then start it again". A stopping
/// worker stays its partitions' active consumer until what it holds is
/// delivered and in the done-log, so the standby never delivers a key at
/// the same time, nor after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_delivers_each_key_once() {
    let delay = Duration::from_millis(1500);
    let target = FakeTarget::start_slow(delay, |_, _| StatusCode::OK.into_response()).await;
    let env = partitioned("rolling", &target, 4);
    env.broker().await;
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(T).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let mut hosts = [Some(env.host("a").await), Some(env.host("b").await)];
    let names = ["a", "b"];
    let mut all = Vec::new();
    for round in 0..3 {
        let keys: Vec<String> = (0..16).map(|k| format!("r{round}-{k}")).collect();
        all.extend(keys.iter().cloned());
        send(&client, &keys).await;
        // The busy worker: the one with deliveries under way.
        let busy = std::sync::Mutex::new(None);
        wait_until(T, "a worker delivering", || async {
            for (i, h) in hosts.iter().enumerate() {
                if in_flight(h.as_ref().unwrap()).await > 0.0 {
                    *busy.lock().unwrap() = Some(i);
                    return true;
                }
            }
            false
        })
        .await;
        let i = busy.lock().unwrap().unwrap();
        let mut stopping = hosts[i].take().unwrap();
        let held = in_flight(&stopping).await;
        let term = Instant::now();
        stopping.sigterm();
        // Copies of every key of the round arrive while it stops.
        send(&client, &keys).await;
        let status = tokio::time::timeout(T, stopping.child.wait())
            .await
            .expect("the worker stopped")
            .unwrap();
        assert!(status.success(), "a graceful stop exits 0: {status}");
        eprintln!(
            "rolling: round {round}: {} stopped with {held} deliveries in flight, exited after {:.1} s",
            names[i],
            term.elapsed().as_secs_f64()
        );
        hosts[i] = Some(env.host(names[i]).await);
        wait_until(T, "the round's keys delivered", || async {
            keys.iter()
                .all(|k| !target.for_key(&format!("p:{k}")).is_empty())
        })
        .await;
    }
    let live: Vec<&Process> = hosts.iter().flatten().collect();
    drained(&env, 4, &live).await;
    once_and_never_at_once(&target, &all, delay);
    assert!(env.dead_letters().await.is_empty());
}

/// A done-log recreated (a broker reset, a new cluster, an operator deleting
/// it) is read from its start, not waited on: new keys flow at once, and the
/// keys the host delivered before stay delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_done_log_is_read_from_its_start() {
    let target = FakeTarget::ok().await;
    let env = partitioned("recreated", &target, 2);
    env.broker().await;
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(T).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let before: Vec<String> = (0..10).map(|k| format!("before-{k}")).collect();
    let a = env.host("a").await;
    send(&client, &before).await;
    wait_until(T, "the first keys delivered", || async {
        target.count() == before.len()
    })
    .await;
    a.sigterm();
    let mut a = a;
    assert!(a.child.wait().await.unwrap().success());
    for i in 0..2 {
        env.delete_queue(&env.topology().done(i)).await;
    }
    // The host comes back (its store still points into the old streams);
    // it declares the streams anew.
    let a = env.host("a").await;
    let after: Vec<String> = (0..20).map(|k| format!("after-{k}")).collect();
    send(&client, &after).await;
    send(&client, &before).await;
    let started = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the new keys delivered",
        || async {
            after
                .iter()
                .all(|k| !target.for_key(&format!("p:{k}")).is_empty())
        },
    )
    .await;
    eprintln!(
        "recreated done-log: 20 new keys delivered in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drained(&env, 2, &[&a]).await;
    assert_eq!(
        target.count(),
        before.len() + after.len(),
        "a copy delivered again"
    );
}

/// A worker that was idle on a partition may have lost it and got it back
/// (4.x consumer priorities; a 3.10 consumer marked down and back): before
/// it delivers again it reads what was appended to the done-log meanwhile.
/// Here another worker's append is made by hand while this one is idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_active_again_reads_the_done_log_first() {
    let target = FakeTarget::ok().await;
    let env = partitioned("again", &target, 2);
    let broker = env.broker().await;
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(T).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let a = env.host("a").await;
    let first: Vec<String> = (0..8).map(|k| format!("first-{k}")).collect();
    send(&client, &first).await;
    wait_until(T, "the first keys delivered", || async {
        target.count() == first.len()
    })
    .await;
    wait_until(T, "idle", || async { in_flight(&a).await == 0.0 }).await;
    // Meanwhile another worker, active on the partitions for a while,
    // delivered these and appended them to the done-logs.
    let elsewhere: Vec<String> = (0..8).map(|k| format!("elsewhere-{k}")).collect();
    let topo = env.topology();
    for id in &elsewhere {
        let key = DedupKey(format!("p:{id}"));
        broker
            .append_done(topo.partition(&key), &[key], hookq::message::epoch_ms(), T)
            .await
            .unwrap();
    }
    send(&client, &elsewhere).await;
    drained(&env, 2, &[&a]).await;
    let again: Vec<_> = elsewhere
        .iter()
        .filter(|k| !target.for_key(&format!("p:{k}")).is_empty())
        .collect();
    assert!(again.is_empty(), "delivered again: {again:?}");
}

/// On RabbitMQ 4.x, consumer priorities move partitions between live
/// workers: a worker that joins with the higher priority takes a partition
/// over once the current one settled what it holds, and the old one takes
/// it back, after reading the done-log, when the new one leaves. Nothing is
/// delivered twice through either move. (RabbitMQ 3.10 keeps the first
/// consumer active while it lives: nothing moves there.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_between_live_workers_without_doubles() {
    let delay = Duration::from_millis(300);
    let target = FakeTarget::start_slow(delay, |_, _| StatusCode::OK.into_response()).await;
    let env = partitioned("priorities", &target, 8);
    env.broker().await;
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(T).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let a = env.host("a").await;
    let warm: Vec<String> = (0..64).map(|k| format!("warm-{k}")).collect();
    send(&client, &warm).await;
    wait_until(T, "a active on every partition", || async {
        active_on(&a, 8).await.len() == 8
    })
    .await;
    // B joins while A is busy, and copies arrive during the move.
    let busy: Vec<String> = (0..48).map(|k| format!("busy-{k}")).collect();
    send(&client, &busy).await;
    let b = env.host("b").await;
    send(&client, &busy).await;
    let major = crate::support::broker_major().await;
    // A partition's active consumer shows once it gets a message: keep some
    // coming, a few a second, until B shows on one (4.x) or for 3 s (3.10).
    let mut trickle = Vec::new();
    let until = Instant::now() + if major < 4 { Duration::from_secs(3) } else { T };
    while Instant::now() < until && active_on(&b, 8).await.is_empty() {
        let ids: Vec<String> = (0..8)
            .map(|k| format!("trickle-{}-{k}", trickle.len()))
            .collect();
        send(&client, &ids).await;
        trickle.extend(ids);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if major < 4 {
        assert!(
            active_on(&b, 8).await.is_empty(),
            "3.10 keeps the first consumer active"
        );
        eprintln!("priorities: RabbitMQ 3.10 moves no partition to a live worker's rival");
    } else {
        assert!(!active_on(&b, 8).await.is_empty(), "b took no partition");
    }
    let moved = active_on(&b, 8).await;
    drained(&env, 8, &[&a, &b]).await;
    // Keys of B's partitions, delivered by B; then B leaves, A takes them
    // back and must know them.
    let topo = env.topology();
    let on_b: Vec<String> = (0..400)
        .map(|k| format!("onb-{k}"))
        .filter(|id| moved.contains(&topo.partition(&DedupKey(format!("p:{id}")))))
        .take(24)
        .collect();
    send(&client, &on_b).await;
    drained(&env, 8, &[&a, &b]).await;
    b.sigterm();
    let mut b = b;
    assert!(b.child.wait().await.unwrap().success());
    send(&client, &on_b).await;
    drained(&env, 8, &[&a]).await;
    eprintln!(
        "priorities: RabbitMQ {major}.x, b took {} of 8 partitions and gave them back",
        moved.len()
    );
    let mut all = warm;
    all.extend(busy);
    all.extend(trickle);
    all.extend(on_b);
    once_and_never_at_once(&target, &all, delay);
}

/// Log lines of `h` whose message starts with `what`.
fn logged(h: &Process, what: &str) -> usize {
    h.logs
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l["message"].as_str().unwrap_or("").starts_with(what))
        .count()
}

/// A done-log that keeps refusing (here a classic queue in its place that
/// takes nothing) makes its partition's messages go back after a pause that
/// grows, not at once: no hot loop, no quorum delivery limit spent in a
/// second. Once the done-log is back, the message is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_done_log_read_hands_back_slowly() {
    let target = FakeTarget::ok().await;
    let env = partitioned("slowback", &target, 2);
    env.broker().await;
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(T).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let a = env.host("a").await;
    wait_until(T, "a consuming", || async { logged(&a, "consuming") == 2 }).await;
    // Partition 0's done-log replaced by a queue that refuses every publish.
    let done = env.topology().done(0);
    env.refusing_queue_in_place_of(&done).await;
    let topo = env.topology();
    let id = (0..)
        .map(|k| format!("slow-{k}"))
        .find(|id| topo.partition(&DedupKey(format!("p:{id}"))) == 0)
        .unwrap();
    send(&client, std::slice::from_ref(&id)).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let failures = logged(&a, "could not read the partition's done-log");
    eprintln!("slowback: {failures} failed done-log reads in 6 s");
    assert!(
        (1..=6).contains(&failures),
        "{failures} failed reads in 6 s: hand-backs are not paced"
    );
    assert!(target.for_key(&format!("p:{id}")).is_empty());
    // The done-log back: the message is delivered at its next try.
    env.delete_queue(&done).await;
    env.broker().await.declare_topology().await.unwrap();
    wait_until(T, "delivered once the done-log is back", || async {
        !target.for_key(&format!("p:{id}")).is_empty()
    })
    .await;
}

/// The work queue deleted under a running worker: it declares the topology
/// again by itself, at a bounded rate (no hot loop of failed subscriptions),
/// and webhooks flow again within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_work_queue_comes_back_without_a_hot_loop() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("lostqueue").with_target(&target.url);
    env.broker().await;
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(T).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let a = env.host("a").await;
    send(&client, &["before".to_string()]).await;
    wait_until(T, "delivered", || async { target.count() == 1 }).await;
    env.delete_queue(&env.topology().work(0)).await;
    let deleted = Instant::now();
    wait_until(Duration::from_secs(20), "consuming again", || async {
        logged(&a, "consuming") >= 2
    })
    .await;
    let took = deleted.elapsed();
    let after: Vec<String> = (0..5).map(|k| format!("after-{k}")).collect();
    send(&client, &after).await;
    wait_until(
        Duration::from_secs(20),
        "webhooks delivered again",
        || async {
            after
                .iter()
                .all(|k| !target.for_key(&format!("p:{k}")).is_empty())
        },
    )
    .await;
    let warnings = logged(&a, "cannot start consuming");
    eprintln!(
        "lostqueue: consuming again {:.1} s after the deletion; {warnings} failed subscriptions",
        took.as_secs_f64()
    );
    assert!(
        warnings <= 10,
        "{warnings} failed subscriptions: a hot loop"
    );
}

/// Two worker processes on one host (one store): the first, stopped with
/// SIGTERM while its deliveries run, leaves its partitions (and ends its
/// lease) before it exits, so the second delivers at once rather than after
/// the first one's lease (30 s here) runs out. (A worker that leaves while
/// it lives is the dropped-connection test in `dedup.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_leaves_its_partitions_to_the_next_on_its_host() {
    let delay = Duration::from_millis(300);
    let target = FakeTarget::start_slow(delay, |_, _| StatusCode::OK.into_response()).await;
    let mut env = partitioned("leave", &target, 2);
    env.settings.dedup.lease = Duration::from_secs(30);
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(T).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let mut first = env.host("same").await;
    let busy: Vec<String> = (0..16).map(|k| format!("busy-{k}")).collect();
    send(&client, &busy).await;
    wait_until(T, "deliveries under way", || async {
        target.started() >= 2
    })
    .await;
    let second = env.host("same").await;
    first.sigterm();
    assert!(first.child.wait().await.unwrap().success());
    let stopped = Instant::now();
    let after: Vec<String> = (0..8).map(|k| format!("after-{k}")).collect();
    send(&client, &after).await;
    wait_until(T, "every key delivered", || async {
        target.count() == busy.len() + after.len()
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(15),
        "the next worker waited {:?}: for the stopped one's lease",
        stopped.elapsed()
    );
    for k in busy.iter().chain(&after) {
        assert_eq!(target.for_key(&format!("p:{k}")).len(), 1, "{k}");
    }
    drained(&env, 2, &[&second]).await;
}
