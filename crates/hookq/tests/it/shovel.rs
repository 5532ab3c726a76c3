//! Dead letters for operators: `hookq shovel` and `hookq dlq`, on dead letters
//! the real worker made, plus the RabbitMQ management UI's view of the topology.

use std::collections::{HashMap, HashSet};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hookq::broker::Broker;
use hookq::config::QueueType;
use hookq::dead_letters::Row;
use hookq::dead_letters::shovel::{Event, Filter, Options, Summary, shovel};
use hookq::message::{DeadReason, Envelope};
use hookq::system::System;

use crate::support::{
    Client, FakeTarget, TestEnv, publish_dead_letters, publish_foreign_dead_letter, wait_until,
};

const T: Duration = Duration::from_secs(20);

/// Six real dead letters, made by a real worker against a target that fails
/// until it is healed.
struct Fixture {
    env: TestEnv,
    target: FakeTarget,
    healed: Arc<AtomicBool>,
    /// The dead letters, in P.dead's order.
    dead: Vec<Envelope>,
    broker: Broker,
    running: Option<System>,
}

impl Fixture {
    async fn new(name: &str, q: QueueType) -> Self {
        let (target, healed) = crate::support::failing_target().await;
        let mut env = TestEnv::new(name)
            .with_queue_type(q)
            .with_target(&target.url);
        env.settings.retry.max_attempts = 2;
        env.settings.retry.inline_attempts_set = Some(1);
        let running = env.up().await;
        let c = Client::new(running.ingress_addr.unwrap());
        for (source, id) in crate::support::DEAD_LETTER_SENT {
            c.send(source, id, &format!(r#"{{"id":"{id}"}}"#)).await;
        }
        wait_until(T, "six dead letters", || async {
            env.queue_len(&env.topology().dead()).await == 6
        })
        .await;
        let dead = env.dead_letters().await;
        let broker = env.broker().await;
        settled(&broker, 6).await;
        Self {
            env,
            target,
            healed,
            dead,
            broker,
            running: Some(running),
        }
    }

    fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
    }

    /// Stops the worker (and ingress), so that P.work keeps what arrives.
    async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.unwrap();
        }
    }

    /// The original dead letters' message ids, minus the moved keys, in order.
    fn ids_without(&self, moved: &HashSet<String>) -> Vec<String> {
        self.dead
            .iter()
            .filter(|e| !moved.contains(&e.key.0))
            .map(|e| e.message_id.0.clone())
            .collect()
    }

    /// Asserts that P.dead holds exactly the original dead letters minus the
    /// moved keys, in their original order.
    async fn assert_left(&self, moved: &HashSet<String>) {
        let expected = self.ids_without(moved);
        settled(&self.broker, expected.len()).await;
        assert_eq!(ids(&self.env.dead_letters().await), expected);
        settled(&self.broker, expected.len()).await;
    }

    fn reason_of(&self, key: &str) -> DeadReason {
        let e = self.dead.iter().find(|e| e.key.0 == key).unwrap();
        e.dead.as_ref().unwrap().reason
    }
}

/// Waits until P.dead has `n` messages ready. A quorum queue puts back what a
/// reader held a moment after the reader's channel closed, so a read (or a
/// run) straight after another could otherwise miss some.
async fn settled(broker: &Broker, n: usize) {
    let dead = broker.topology().dead();
    wait_until(T, "dead letters back in P.dead", || async {
        broker.queue_len(&dead).await.unwrap() as usize == n
    })
    .await;
}

fn ids(envs: &[Envelope]) -> Vec<String> {
    envs.iter().map(|e| e.message_id.0.clone()).collect()
}

async fn run_shovel(broker: &Broker, filter: Filter, limit: Option<u64>) -> Summary {
    let opts = Options {
        limit,
        ..Options::default()
    };
    shovel(broker, &filter, &opts, &mut |_| {})
        .await
        .expect("shovel")
}

fn counts(s: &Summary) -> HashMap<(String, String), u64> {
    s.moved.0.clone().into_iter().collect()
}

fn pair(source: &str, reason: &str, n: u64) -> ((String, String), u64) {
    ((source.into(), reason.into()), n)
}

/// The `hookq` binary with this test's settings, run to its end.
async fn hookq(env: &TestEnv, args: &[&str]) -> Output {
    env.command(args, "warn")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run hookq")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

on_both_queue_types!(each_filter_moves_exactly_the_matching_ones);

/// --key, then --source, then --reason: each moves exactly its matches, the
/// rest stay in P.dead in their original order, and each moved one is
/// delivered once.
async fn each_filter_moves_exactly_the_matching_ones(q: QueueType) {
    let f = Fixture::new("filters", q).await;
    f.heal();
    let broker = f.broker.clone();
    let mut moved = HashSet::new();

    let key = Filter {
        key: Some("alpha:flaky-1".into()),
        ..Filter::default()
    };
    let s = run_shovel(&broker, key, None).await;
    assert_eq!(
        counts(&s),
        HashMap::from([pair("alpha", "max_attempts", 1)])
    );
    assert_eq!((s.looked_at, s.kept), (6, 5));
    moved.insert("alpha:flaky-1".to_string());
    f.assert_left(&moved).await;

    // --source with --limit 1: stops at the first beta, holding the alphas
    // before it; they go back in order (on a quorum queue too).
    let beta = || Filter {
        source: Some("beta".into()),
        ..Filter::default()
    };
    let first_beta = f.dead.iter().find(|e| e.source == "beta").unwrap();
    let s = run_shovel(&broker, beta(), Some(1)).await;
    assert_eq!(s.moved.total(), 1);
    moved.insert(first_beta.key.0.clone());
    f.assert_left(&moved).await;
    let s = run_shovel(&broker, beta(), None).await;
    assert_eq!(s.moved.total(), 1);
    moved.extend(["beta:bad-3".to_string(), "beta:flaky-3".to_string()]);
    f.assert_left(&moved).await;

    let reason = Filter {
        reason: Some(DeadReason::Rejected),
        ..Filter::default()
    };
    let s = run_shovel(&broker, reason, None).await;
    assert_eq!(counts(&s), HashMap::from([pair("alpha", "rejected", 2)]));
    assert_eq!(s.kept, 1);
    moved.extend(["alpha:bad-1".to_string(), "alpha:bad-2".to_string()]);
    f.assert_left(&moved).await;

    wait_until(T, "every moved key delivered", || async {
        f.target.successes().len() == moved.len()
    })
    .await;
    wait_until(T, "work queue drained", || async {
        f.env.queue_len(&f.env.topology().work(0)).await == 0
    })
    .await;
    let ok = f.target.successes();
    for k in &moved {
        assert_eq!(ok.get(k), Some(&1), "{k} delivered once");
    }
    f.assert_left(&moved).await;
}

/// --limit moves the first N; the copy in P.work starts afresh with its
/// history in headers, and is delivered as a first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_moves_the_first_ones_as_fresh_work_with_their_history() {
    let mut f = Fixture::new("limit", QueueType::Quorum).await;
    f.stop().await;
    let broker = f.broker.clone();
    let s = run_shovel(&broker, Filter::default(), Some(2)).await;
    assert_eq!(s.moved.total(), 2);
    assert_eq!(s.looked_at, 2, "stops reading once the limit is reached");
    let first_two: Vec<&Envelope> = f.dead.iter().take(2).collect();
    let moved: HashSet<String> = first_two.iter().map(|e| e.key.0.clone()).collect();
    f.assert_left(&moved).await;

    // The copies, read in place from P.work.
    let work = f.env.topology().work(0);
    let reader = broker.reader().await.unwrap();
    let mut copies = HashMap::new();
    while let Some((m, _)) = reader.get(&work).await.unwrap() {
        let e = m.envelope.expect("a hookq message");
        copies.insert(e.key.0.clone(), e);
    }
    reader.close().await;
    assert_eq!(copies.len(), 2);
    for dead in &first_two {
        let copy = &copies[&dead.key.0];
        assert_eq!(copy.message_id, dead.message_id);
        assert_eq!(copy.body, dead.body);
        assert_eq!(copy.headers, dead.headers);
        assert_eq!(copy.source, dead.source);
        assert_eq!(copy.attempts, 0);
        assert_eq!(copy.dead, None);
        assert_eq!(copy.shovelled, 1);
        let reason = dead.dead.as_ref().unwrap().reason.as_str();
        assert_eq!(copy.previous_dead_reason.as_deref(), Some(reason));
    }

    // Delivered once each, as attempt 1.
    f.heal();
    f.running = Some(f.env.up().await);
    wait_until(T, "both moved keys delivered", || async {
        f.target.successes().len() == 2
    })
    .await;
    for dead in &first_two {
        let got: Vec<_> = f
            .target
            .for_key(&dead.key.0)
            .into_iter()
            .filter(|r| r.is_success())
            .collect();
        assert_eq!(got.len(), 1, "{} delivered once", dead.key);
        assert_eq!(got[0].header("hookq-attempt").as_deref(), Some("1"));
        assert_eq!(
            got[0].header("hookq-message-id"),
            Some(dead.message_id.0.clone())
        );
        let before = match f.reason_of(&dead.key.0) {
            DeadReason::Rejected => 1,
            _ => 2,
        };
        assert_eq!(f.target.for_key(&dead.key.0).len(), before + 1);
    }
}

/// `--dry-run` lists what would move, one line each, and moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lists_and_moves_nothing() {
    let f = Fixture::new("dryrun", QueueType::Quorum).await;
    let out = hookq(&f.env, &["shovel", "--dry-run", "--source", "alpha"]).await;
    settled(&f.broker, 6).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("would move "))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    let alpha = crate::support::ids_from(&f.dead, "alpha");
    assert_eq!(listed, alpha, "{text}");
    assert!(text.contains("key=alpha:bad-1"), "{text}");
    assert!(text.contains("reason=max_attempts  attempts=2"), "{text}");
    assert!(text.contains("would move 4"), "{text}");
    f.assert_left(&HashSet::new()).await;

    // The same through the library, with its report of what would move.
    let broker = f.broker.clone();
    let opts = Options {
        dry_run: true,
        limit: Some(3),
        ..Options::default()
    };
    let mut seen = Vec::new();
    let s = shovel(&broker, &Filter::default(), &opts, &mut |e| {
        if let Event::WouldMove(r) = e {
            seen.push(r.message_id.clone());
        }
    })
    .await
    .unwrap();
    assert_eq!(seen, ids(&f.dead)[..3]);
    assert_eq!((s.would_move.total(), s.moved.total()), (3, 0));
    f.assert_left(&HashSet::new()).await;
    assert_eq!(f.target.successes().len(), 0);
}

/// `dlq list` (text and JSON) and `dlq stats` report what is in P.dead and
/// leave it there, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_stats_read_without_moving() {
    let f = Fixture::new("dlq", QueueType::Quorum).await;
    let expected: Vec<Row> = f.dead.iter().map(row).collect();

    let out = hookq(&f.env, &["dlq", "list", "--json"]).await;

    settled(&f.broker, 6).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<Row> = serde_json::from_slice(&out.stdout).expect("a JSON array of rows");
    assert_eq!(rows, expected);
    let raw: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(raw[0]["last_status"], 400);
    assert!(raw[1]["dead_at"].is_string());

    let out = hookq(&f.env, &["dlq", "list", "--limit", "2", "--json"]).await;

    settled(&f.broker, 6).await;
    let rows: Vec<Row> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows, expected[..2]);

    let out = hookq(&f.env, &["dlq", "list"]).await;

    settled(&f.broker, 6).await;
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 7, "{text}");
    assert!(lines[0].starts_with("MESSAGE ID"), "{text}");
    assert!(lines[1].starts_with(&expected[0].message_id), "{text}");
    let reason_col = lines[0].find("REASON").unwrap();
    assert!(
        lines[1..]
            .iter()
            .all(|l| l[reason_col..].starts_with("rejected")
                || l[reason_col..].starts_with("max_attempts")),
        "columns line up: {text}"
    );

    let out = hookq(&f.env, &["dlq", "stats", "--json"]).await;

    settled(&f.broker, 6).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["total"], 6);
    assert_eq!(v["by_source"]["alpha"], 4);
    assert_eq!(v["by_source"]["beta"], 2);
    assert_eq!(v["by_reason"]["rejected"], 3);
    assert_eq!(v["by_reason"]["max_attempts"], 3);
    let out = hookq(&f.env, &["dlq", "stats"]).await;
    settled(&f.broker, 6).await;
    let text = stdout(&out);
    assert!(text.contains("alpha   max_attempts  2"), "{text}");
    assert!(text.contains("total 6 in"), "{text}");

    f.assert_left(&HashSet::new()).await;
}

fn row(e: &Envelope) -> Row {
    let d = e.dead.as_ref().unwrap();
    Row {
        message_id: e.message_id.0.clone(),
        key: e.key.0.clone(),
        delivery: e.delivery_id().map(str::to_string),
        source: e.source.clone(),
        reason: Some(d.reason.as_str().into()),
        attempts: e.attempts,
        last_status: d.last_status,
        last_error: Some(d.last_error.clone()),
        dead_at: Some(d.dead_at.clone()),
    }
}

/// Every message id in `queue`, taken with a consumer and handed back.
async fn ids_in(broker: &Broker, queue: &str) -> Vec<String> {
    let n = broker.queue_len(queue).await.unwrap() as usize;
    // Nothing is acked, so the prefetch must cover the whole queue.
    let prefetch = u16::try_from(n.max(1)).expect("a test-sized queue");
    let mut c = broker.consume(queue, prefetch).await.unwrap();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = tokio::time::timeout(T, c.next())
            .await
            .expect("the queue's messages")
            .expect("a delivery");
        out.push(m.envelope.expect("a hookq message").message_id.0);
    }
    c.close().await;
    out
}

/// SIGKILL in the middle of a run, then a second run: every dead letter ends
/// in P.work, none lost; at worst the few in flight at the kill are doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shovel_loses_nothing_and_a_rerun_finishes() {
    const N: usize = 3000;
    let env = TestEnv::new("kill");
    let broker = env.broker().await;
    let (dead, work) = (env.topology().dead(), env.topology().work(0));
    let originals: HashSet<String> = publish_dead_letters(&broker, N).await.into_iter().collect();
    assert_eq!(broker.queue_len(&dead).await.unwrap() as usize, N);

    let mut child = env
        .command(&["shovel"], "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn hookq shovel");
    wait_until(T, "some dead letters moved", || async {
        broker.queue_len(&work).await.unwrap() >= 200
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the shovel finished before the kill; the test needs more dead letters"
    );
    child.kill().await.expect("SIGKILL");

    // The killed connection's unsettled dead letters return to P.dead.
    wait_until(T, "every message accounted for", || async {
        let d = broker.queue_len(&dead).await.unwrap() as usize;
        let w = broker.queue_len(&work).await.unwrap() as usize;
        d + w >= N
    })
    .await;
    let moved_before = broker.queue_len(&work).await.unwrap() as usize;
    assert!(moved_before < N, "killed part way");

    let out = hookq(&env, &["shovel"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("moved "), "{}", stdout(&out));
    wait_until(T, "P.dead empty", || async {
        broker.queue_len(&dead).await.unwrap() == 0
    })
    .await;
    let in_work = ids_in(&broker, &work).await;
    let distinct: HashSet<String> = in_work.iter().cloned().collect();
    assert_eq!(distinct, originals, "every dead letter reached P.work");
    let copies = in_work.len() - N;
    assert!(
        copies <= Options::default().window,
        "at worst the moves in flight at the kill are doubled, got {copies} copies"
    );
}

/// The broker refuses moves part way (the work queue disappears): the run
/// stops, exits 1 saying a re-run finishes, and every dead letter it did not
/// report as moved is still in P.dead. After the queue is back, a re-run does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_move_stops_the_run_and_a_rerun_finishes() {
    const N: usize = 2000;
    // Classic: deleting a quorum queue under publishes makes RabbitMQ 3.10
    // close the connection (INTERNAL_ERROR), a different failure; this one
    // wants the broker's "unroutable" answer.
    let env = TestEnv::new("refused").with_queue_type(QueueType::Classic);
    let broker = env.broker().await;
    let (dead, work) = (env.topology().dead(), env.topology().work(0));
    publish_dead_letters(&broker, N).await;
    let child = env
        .command(&["shovel"], "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn hookq shovel");
    wait_until(T, "some dead letters moved", || async {
        broker.queue_len(&work).await.unwrap() >= 100
    })
    .await;
    env.delete_queue(&work).await;
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("again to finish"), "{}", stderr(&out));
    assert!(stderr(&out).contains("unroutable"), "{}", stderr(&out));
    let text = stdout(&out);
    let moved: usize = text
        .strip_prefix("moved ")
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a summary: {text}"));
    assert!((100..N).contains(&moved), "{text}");
    wait_until(T, "the rest still in P.dead", || async {
        broker.queue_len(&dead).await.unwrap() as usize == N - moved
    })
    .await;

    broker.declare_topology().await.unwrap();
    let out = hookq(&env, &["shovel"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with(&format!("moved {} ", N - moved)),
        "{}",
        stdout(&out)
    );
    wait_until(T, "P.dead empty", || async {
        broker.queue_len(&dead).await.unwrap() == 0
    })
    .await;
}

/// A message put in P.dead by hand, without hookq's headers: listed, counted,
/// never moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_in_the_dead_queue_is_listed_and_never_moved() {
    let env = TestEnv::new("foreign");
    let broker = env.broker().await;
    publish_foreign_dead_letter(&env, b"not a webhook", "foreign-1").await;
    publish_dead_letters(&broker, 1).await;

    let rows = hookq::dead_letters::rows(&broker, None).await.unwrap();
    settled(&broker, 2).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].message_id, "foreign-1");
    assert_eq!(rows[0].reason, None);
    let err = rows[0].last_error.as_deref().unwrap();
    assert!(err.contains("not a hookq message"), "{err}");

    let s = run_shovel(&broker, Filter::default(), None).await;
    assert_eq!((s.moved.total(), s.kept, s.skipped), (1, 1, 1));
    settled(&broker, 1).await;
    let left = hookq::dead_letters::rows(&broker, None).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].message_id, "foreign-1");
}

/// Bad usage exits 2 before connecting; an unreachable broker exits 1 saying
/// how to start RabbitMQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reason_exits_2_and_unreachable_broker_exits_1() {
    let mut env = TestEnv::new("usage");
    env.settings.amqp.urls =
        vec![hookq::config::AmqpUrl::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap()];
    let out = hookq(&env, &["shovel", "--reason", "timeout"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--reason \"timeout\""),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("max_attempts"), "{}", stderr(&out));
    for args in [&["shovel"][..], &["dlq", "list"], &["dlq", "stats"]] {
        let out = hookq(&env, args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("rabbitmq-server"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// A management API resource, or `None` while it is not there (yet).
async fn management(http: &reqwest::Client, path: &str) -> Option<serde_json::Value> {
    let r = http
        .get(format!("{}/{path}", crate::support::management_api()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

/// A management API resource, polled until it appears: the API can lag a few
/// seconds behind a new queue.
async fn management_eventually(http: &reqwest::Client, path: &str) -> serde_json::Value {
    let found = std::sync::Mutex::new(None);
    wait_until(T, path, || async {
        let v = management(http, path).await;
        let there = v.is_some();
        *found.lock().unwrap() = v;
        there
    })
    .await;
    found.into_inner().unwrap().unwrap()
}

/// Every queue of the topology shows in the management UI with its arguments.
/// Skipped when the management plugin is not enabled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_ui_shows_every_queue_with_its_arguments() {
    let http = reqwest::Client::new();
    assert!(
        management(&http, "overview").await.is_some(),
        "the management API is not answering on {}: \
         rabbitmq-plugins enable rabbitmq_management (.ci/run does)",
        crate::support::management_api()
    );
    let env = TestEnv::new("mgmt");
    let _broker = env.broker().await;
    let topo = env.topology();
    let mut shown = HashMap::new();
    for q in topo.queues() {
        let v = management_eventually(&http, &format!("queues/%2F/{q}")).await;
        assert_eq!(v["durable"], true, "{q}");
        shown.insert(q, v["arguments"].clone());
    }
    let work = &shown[&topo.work(0)];
    assert_eq!(work["x-queue-type"], "quorum");
    assert_eq!(work["x-dead-letter-exchange"], topo.dead());
    assert_eq!(work["x-delivery-limit"], 20);
    assert_eq!(work["x-dead-letter-strategy"], "at-least-once");
    assert_eq!(work["x-overflow"], "reject-publish");
    for &tier in &topo.tiers {
        let queue = topo.delay(tier);
        let a = &shown[&queue];
        assert_eq!(a["x-queue-type"], "quorum", "{queue}");
        assert_eq!(a["x-message-ttl"], tier.0.as_millis() as u64);
        assert_eq!(a["x-dead-letter-exchange"], "");
        assert_eq!(a["x-dead-letter-routing-key"], topo.work(0));
        assert_eq!(a["x-dead-letter-strategy"], "at-least-once");
    }
    let dead = &shown[&topo.dead()];
    assert_eq!(dead["x-queue-type"], "quorum");
    assert_eq!(
        dead["x-delivery-limit"],
        hookq::broker::topology::DEAD_DELIVERY_LIMIT,
        "an explicit limit, or RabbitMQ 4.x applies its default of 20"
    );
    assert!(
        dead.get("x-message-ttl").is_none(),
        "dead letters never expire"
    );
    let x = management_eventually(&http, &format!("exchanges/%2F/{}", topo.exchange())).await;
    assert_eq!(x["type"], "topic");
    let x = management_eventually(&http, &format!("exchanges/%2F/{}", topo.dead())).await;
    assert_eq!(x["type"], "fanout");
}

/// Garbage that reached the work queue is parked by the worker as `invalid`,
/// with a readable envelope around it. The shovel never moves it back, even when
/// asked for that reason: the target would only get garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_dead_letters_are_skipped_never_moved() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("invalid").with_target(&target.url);
    let _up = env.up().await;
    let broker = env.broker().await;
    let (conn, ch) = env.raw_channel().await;
    ch.confirm_select(Default::default()).await.unwrap();
    for i in 0..5 {
        ch.basic_publish(
            "".into(),
            env.topology().work(0).as_str().into(),
            Default::default(),
            format!("garbage {i}").as_bytes(),
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let _ = conn.close(200, "bye".into()).await;
    settled(&broker, 5).await;
    for filter in [
        Filter::default(),
        Filter {
            reason: Some(DeadReason::Invalid),
            ..Filter::default()
        },
    ] {
        let s = run_shovel(&broker, filter, None).await;
        assert_eq!((s.moved.total(), s.kept, s.skipped), (0, 5, 5));
        settled(&broker, 5).await;
    }
    // Moving everything with a window of 1 reads 4 ahead: the fifth held
    // one comes by basic.get.
    let opts = Options {
        window: 1,
        ..Options::default()
    };
    let s = shovel(&broker, &Filter::default(), &opts, &mut |_| {})
        .await
        .expect("shovel");
    assert_eq!((s.moved.total(), s.kept, s.skipped), (0, 5, 5));
    settled(&broker, 5).await;
    assert_eq!(env.queue_len(&env.topology().work(0)).await, 0);
    assert_eq!(target.count(), 0, "the target never sees garbage");
}

/// Reading dead letters many times over (more than RabbitMQ 4.x's default
/// delivery limit of 20) removes and reorders nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_dead_letters_again_and_again_keeps_every_one_in_order() {
    let env = TestEnv::new("reread");
    let broker = env.broker().await;
    publish_dead_letters(&broker, 10).await;
    let first = hookq::dead_letters::rows(&broker, None).await.unwrap();
    assert_eq!(first.len(), 10);
    for round in 0..25 {
        settled(&broker, 10).await;
        let again = if round % 2 == 0 {
            hookq::dead_letters::rows(&broker, None).await.unwrap()
        } else {
            hookq::dead_letters::rows(&broker, Some(3)).await.unwrap()
        };
        let ids: Vec<_> = again.iter().map(|r| &r.message_id).collect();
        let want: Vec<_> = first
            .iter()
            .map(|r| &r.message_id)
            .take(ids.len())
            .collect();
        assert_eq!(ids, want, "round {round}");
    }
    settled(&broker, 10).await;
}

/// A dead letter as an earlier version wrote it, its forwarded headers as
/// `[name, value]` pairs: listed, shovelled, and delivered with its headers
/// (repeats and a value that is not UTF-8 intact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_with_headers_as_pairs_still_reads_and_shovels() {
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("pairs").with_target(&target.url);
    let broker = env.broker().await;
    let ls = |b: &[u8]| AMQPValue::LongString(LongString::from(b.to_vec()));
    let pair =
        |k: &str, v: &[u8]| AMQPValue::FieldArray(FieldArray::from(vec![ls(k.as_bytes()), ls(v)]));
    let mut h = FieldTable::default();
    h.insert("hookq-source".into(), ls(b"old"));
    h.insert("hookq-key".into(), ls(b"old:1"));
    h.insert("hookq-attempts".into(), AMQPValue::LongLongInt(5));
    h.insert("hookq-received-at".into(), ls(b"2026-01-01T00:00:00.000Z"));
    h.insert("hookq-dead-reason".into(), ls(b"max_attempts"));
    h.insert("hookq-last-error".into(), ls(b"HTTP 500"));
    h.insert("hookq-dead-at".into(), ls(b"2026-01-01T00:00:01.000Z"));
    h.insert(
        "hookq-headers".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            pair("x-a", b"1"),
            pair("x-a", b"2"),
            pair("x-latin1", b"caf\xe9"),
        ])),
    );
    let (conn, ch) = env.raw_channel().await;
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        "".into(),
        env.topology().dead().as_str().into(),
        Default::default(),
        b"{}",
        lapin::BasicProperties::default()
            .with_message_id("old-m1".into())
            .with_delivery_mode(2)
            .with_headers(h),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = conn.close(200, "bye".into()).await;

    let rows = hookq::dead_letters::rows(&broker, None).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].key, "old:1");
    assert_eq!(rows[0].reason, Some("max_attempts".to_string()));
    settled(&broker, 1).await;
    let s = run_shovel(&broker, Filter::default(), None).await;
    assert_eq!(s.moved.total(), 1);
    let _up = env.up().await;
    wait_until(T, "the shovelled one delivered", || async {
        target.successes().contains_key("old:1")
    })
    .await;
    let got = target.for_key("old:1");
    let a: Vec<_> = got[0].headers.get_all("x-a").iter().collect();
    assert_eq!(a, ["1", "2"]);
    assert_eq!(got[0].headers["x-latin1"].as_bytes(), b"caf\xe9");
}
