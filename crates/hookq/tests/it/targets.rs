//! Protecting the application: a target that goes down, is slow, takes only
//! so much at once or asks to wait, and an operator who pauses it. Every test
//! runs hookq against the real broker and a real HTTP target, and checks the
//! guarantees hold: nothing dead-lettered because the target was down, each
//! key delivered once, held messages spending no attempt.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, StatusCode};
use axum::response::IntoResponse;
use hookq::config::{QueueType, TargetRef, TargetSettings, TargetUrl};
use hookq::system::Parts;
use hookq_testkit::target::Reply;
use tokio::sync::Semaphore;

use crate::support::{Client, FakeTarget, TestEnv, sample, wait_until};

const T: Duration = Duration::from_secs(60);

/// A target that answers 503 while `down` is set, else 200.
async fn flaky(down: Arc<AtomicBool>) -> FakeTarget {
    FakeTarget::start(move |_, _| {
        if down.load(Ordering::SeqCst) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
    })
    .await
}

/// Posts `n` webhooks with ids `{tag}-0..`, 16 at a time; returns the keys.
async fn send(client: &Arc<Client>, source: &str, tag: &str, n: usize) -> Vec<String> {
    let gate = Arc::new(Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (client, gate) = (client.clone(), gate.clone());
        let (source, id) = (source.to_string(), format!("{tag}-{i}"));
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            client.send(&source, &id, "{}").await
        }));
    }
    let mut keys = Vec::new();
    for t in tasks {
        keys.push(t.await.unwrap());
    }
    keys
}

/// Each key of `keys` was answered 2xx exactly once.
fn each_delivered_once(target: &FakeTarget, keys: &[String]) {
    let ok = target.successes();
    for k in keys {
        assert_eq!(ok.get(k).copied(), Some(1), "{k}: {ok:?}");
    }
}

/// A 30-second outage: the breaker opens after `breaker_failures`, every
/// later message is held on the broker (no attempt spent, nothing dead), a
/// probe goes out on the doubling schedule, and after recovery each key is
/// delivered once, ramping up.
async fn an_outage_holds_and_burns_no_attempts(q: QueueType) {
    let down = Arc::new(AtomicBool::new(true));
    let target = flaky(down.clone()).await;
    let limits = TargetSettings {
        breaker_failures: 5,
        breaker_probe: Duration::from_millis(500),
        breaker_max_probe: Duration::from_secs(4),
        ..Default::default()
    };
    let env = TestEnv::new("outage")
        .with_named_target("app", &target.url, limits)
        .with_queue_type(q);
    let up = env.up().await;
    let client = Arc::new(Client::new(up.ingress_addr.unwrap()));
    let hold = env.topology().hold("app");

    let started = Instant::now();
    let mut keys = Vec::new();
    // Webhooks keep coming during the outage: 10 every 3 seconds.
    for round in 0..10 {
        keys.extend(send(&client, "s", &format!("o{round}"), 10).await);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let outage = started.elapsed();
    wait_until(T, "every webhook held", || async {
        env.queue_len(&hold).await == 100
    })
    .await;
    let during = target.count();
    assert_eq!(
        env.queue_len(&env.topology().dead()).await,
        0,
        "nothing dead"
    );
    // The failures that opened the breaker (with the in-process retries of
    // the messages in flight then), then the probes: at most one per
    // probe wait (0.5, 1, 2, 4, 4, ... s over the outage).
    let probes = 3 + outage.as_secs() as usize / 4;
    assert!(
        during <= 5 + 32 + probes,
        "{during} requests reached the target during a {outage:?} outage"
    );

    down.store(false, Ordering::SeqCst);
    let recovered = Instant::now();
    wait_until(T, "each key delivered", || async {
        target.successes().len() == keys.len()
    })
    .await;
    each_delivered_once(&target, &keys);
    assert_eq!(env.queue_len(&env.topology().dead()).await, 0);
    assert_eq!(env.queue_len(&hold).await, 0);
    // A hold is not an attempt: no delivery after recovery carried more than
    // the attempts spent before the breaker opened.
    let attempts: Vec<u32> = target
        .received()
        .iter()
        .filter(|r| r.is_success())
        .map(|r| r.header("hookq-attempt").unwrap().parse().unwrap())
        .collect();
    let first_try = attempts.iter().filter(|a| **a == 1).count();
    assert!(
        first_try >= keys.len() - 10,
        "{first_try} of {} delivered on their first attempt: {attempts:?}",
        keys.len()
    );
    // The ramp: the first second after recovery is not the whole backlog.
    let in_first = target
        .received()
        .iter()
        .filter(|r| r.at >= recovered && r.at < recovered + Duration::from_millis(100))
        .count();
    assert!(in_first < 50, "{in_first} requests in the first 100 ms");
    let m = up.metrics_text();
    assert_eq!(sample(&m, "hookq_target_state{target=\"app\"}"), 0.0);
}

on_both_queue_types!(an_outage_holds_and_burns_no_attempts);

/// Two targets behind one work queue: one goes down and is held, the other
/// keeps flowing, its messages never stuck behind the held ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_target_held_while_another_flows() {
    let down = Arc::new(AtomicBool::new(true));
    let bad = flaky(down.clone()).await;
    let good = FakeTarget::ok().await;
    let limits = TargetSettings {
        breaker_failures: 3,
        breaker_probe: Duration::from_millis(500),
        breaker_max_probe: Duration::from_secs(2),
        ..Default::default()
    };
    let mut env = TestEnv::new("two").with_named_target("down", &bad.url, limits);
    env.settings.targets.insert(
        "up".into(),
        TargetSettings {
            url: Some(TargetUrl::parse(&good.url).unwrap()),
            ..Default::default()
        },
    );
    env.settings.amqp.prefetch = 8;
    env.settings.worker.concurrency = 8;
    let fine = hookq::config::SourceSettings {
        target: Some(TargetRef::Named("up".into())),
        ..Default::default()
    };
    env.settings.sources.insert("fine".into(), fine);
    env.settings.ingress.allow_unknown_sources = true;
    let up = env.up().await;
    let client = Arc::new(Client::new(up.ingress_addr.unwrap()));

    // The down target's backlog first, then the other's, through one queue.
    let held = send(&client, "other", "d", 200).await;
    let flowing = send(&client, "fine", "f", 100).await;
    let t0 = Instant::now();
    wait_until(T, "the healthy target's webhooks", || async {
        good.successes().len() == flowing.len()
    })
    .await;
    let took = t0.elapsed();
    each_delivered_once(&good, &flowing);
    assert!(took < Duration::from_secs(15), "took {took:?}");
    assert!(bad.successes().is_empty());
    wait_until(T, "the down target's webhooks held", || async {
        env.queue_len(&env.topology().hold("down")).await as usize >= held.len() - 10
    })
    .await;

    down.store(false, Ordering::SeqCst);
    wait_until(T, "the held webhooks delivered", || async {
        bad.successes().len() == held.len()
    })
    .await;
    each_delivered_once(&bad, &held);
    assert_eq!(env.queue_len(&env.topology().dead()).await, 0);
}

/// A worker answers /readyz 200 only once it may deliver: it first hears the
/// other workers for two beats (their shares, a pause, an open breaker), and
/// a worker ready before that held what it took for 0.4 s (every webhook
/// sent at "ready" waited that long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_ready_only_once_it_may_deliver() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("ready").with_named_target("app", &target.url, Default::default());
    let started = Instant::now();
    let up = env.start(Parts::Up).await;
    let client = Client::new(up.ingress_addr.unwrap());
    let refused = AtomicUsize::new(0);
    wait_until(T, "/readyz 200", || async {
        let ok = client.get("/readyz").await.status() == 200;
        if !ok {
            refused.fetch_add(1, Ordering::SeqCst);
        }
        ok
    })
    .await;
    let ready_after = started.elapsed();
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "/readyz was never seen 503: the check proves nothing"
    );
    let beats = 2 * hookq::targets::peers::BEAT_EVERY;
    assert!(
        ready_after >= beats,
        "ready after {ready_after:?}, before the worker heard its peers ({beats:?})"
    );
    let keys = send(&Arc::new(client), "s", "c", 5).await;
    wait_until(T, "each key delivered", || async {
        target.successes().len() == keys.len()
    })
    .await;
    each_delivered_once(&target, &keys);
}

/// An application that takes 4 requests at once (503 beyond): hookq finds
/// the limit instead of burning attempts; nothing dead, few refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_takes_four_at_once() {
    let busy = Arc::new(AtomicUsize::new(0));
    let b = busy.clone();
    let target = FakeTarget::start(move |_, _| {
        // Beyond 4 at once, a 503 at once (a load-shedding application: a
        // refusal takes no place). A request taken is answered after 20 ms
        // and its place is free the moment the answer goes (so a request
        // sent on an answer finds it free).
        if b.fetch_add(1, Ordering::SeqCst) >= 4 {
            b.fetch_sub(1, Ordering::SeqCst);
            return Reply::from(StatusCode::SERVICE_UNAVAILABLE);
        }
        let b = b.clone();
        Reply::after(Duration::from_millis(20), StatusCode::OK).then(move || {
            b.fetch_sub(1, Ordering::SeqCst);
        })
    })
    .await;
    let env = TestEnv::new("four").with_named_target("app", &target.url, Default::default());
    let up = env.up().await;
    let client = Arc::new(Client::new(up.ingress_addr.unwrap()));
    let keys = send(&client, "s", "c", 300).await;
    wait_until(T, "each key delivered", || async {
        target.successes().len() == keys.len()
    })
    .await;
    each_delivered_once(&target, &keys);
    assert_eq!(
        env.queue_len(&env.topology().dead()).await,
        0,
        "nothing dead"
    );
    let all = target.received();
    let refused = all.iter().filter(|r| r.status == 503).count();
    let share = refused as f64 / all.len() as f64;
    let t0 = all.iter().map(|r| r.at).min().unwrap();
    let mut buckets = std::collections::BTreeMap::<u128, (u32, u32)>::new();
    for r in &all {
        let b = buckets.entry((r.at - t0).as_millis() / 250).or_default();
        if r.status == 503 { b.1 += 1 } else { b.0 += 1 }
    }
    assert!(
        share < 0.10,
        "{refused} of {} requests refused ({share:.2}); by 250 ms (ok, refused): {buckets:?}",
        all.len()
    );
}

/// `rate_per_s` across two workers: no one-second window at the target sees
/// more than the rate and 10%.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_holds_across_two_workers() {
    let target = FakeTarget::ok().await;
    let limits = TargetSettings {
        rate_per_s: 40.0,
        ..Default::default()
    };
    let env = TestEnv::new("rate").with_named_target("app", &target.url, limits);
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(Duration::from_secs(10)).await);
    let w1 = env.start(Parts::Worker).await;
    let mut second = env.settings.clone();
    second.dedup.path = env.dir().join("second.db");
    second.worker.metrics_listen = "127.0.0.1:0".parse().unwrap();
    let w2 = hookq::system::System::start(
        &second,
        Parts::Worker,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(w1.ready(Duration::from_secs(10)).await && w2.ready(Duration::from_secs(10)).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let keys = send(&client, "s", "r", 320).await;
    wait_until(T, "each key delivered", || async {
        target.successes().len() == keys.len()
    })
    .await;
    each_delivered_once(&target, &keys);
    let mut at: Vec<Instant> = target.received().iter().map(|r| r.at).collect();
    at.sort();
    let (first, last) = (at[0], at[at.len() - 1]);
    let mut worst = 0;
    let mut from = first;
    while from + Duration::from_secs(1) <= last {
        let n = at
            .iter()
            .filter(|t| **t >= from && **t < from + Duration::from_secs(1))
            .count();
        worst = worst.max(n);
        from += Duration::from_millis(50);
    }
    assert!(worst <= 44, "{worst} requests in one second (rate 40)");
    let overall = at.len() as f64 / (last - first).as_secs_f64();
    assert!(
        overall > 30.0,
        "{overall:.1}/s: the workers left the rate unused"
    );
    w2.shutdown().await.unwrap();
}

/// A 429 with Retry-After pauses the whole target until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_on_a_429_pauses_the_target() {
    let first = Arc::new(AtomicBool::new(true));
    let f = first.clone();
    let target = FakeTarget::start(move |_, _| {
        if f.swap(false, Ordering::SeqCst) {
            let mut r = StatusCode::TOO_MANY_REQUESTS.into_response();
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("2"));
            r
        } else {
            StatusCode::OK.into_response()
        }
    })
    .await;
    let limits = TargetSettings {
        max_concurrency: Some(1),
        ..Default::default()
    };
    let env = TestEnv::new("ra").with_named_target("app", &target.url, limits);
    let up = env.up().await;
    let client = Arc::new(Client::new(up.ingress_addr.unwrap()));
    let keys = send(&client, "s", "a", 20).await;
    wait_until(T, "each key delivered", || async {
        target.successes().len() == keys.len()
    })
    .await;
    each_delivered_once(&target, &keys);
    let all = target.received();
    let refused = all.iter().find(|r| r.status == 429).unwrap().at;
    let next = all
        .iter()
        .filter(|r| r.at > refused)
        .map(|r| r.at)
        .min()
        .unwrap();
    assert!(
        next - refused >= Duration::from_millis(1900),
        "a request {:?} after the 429 that asked for 2 s",
        next - refused
    );
    assert_eq!(env.queue_len(&env.topology().dead()).await, 0);
}

/// An operator's pause: held across a worker restart, delivered once on the
/// first attempt after the resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_lasts_across_a_restart_until_resumed() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("pause").with_named_target("app", &target.url, Default::default());
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(Duration::from_secs(10)).await);
    let broker = env.broker().await;
    let app = env.settings.resolved_targets()["app"].clone();
    hookq::targets::pause(&broker, &app, "test").await.unwrap();
    let worker = env.start(Parts::Worker).await;
    assert!(worker.ready(Duration::from_secs(10)).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let keys = send(&client, "s", "p", 30).await;
    let hold = env.topology().hold("app");
    wait_until(T, "every webhook held", || async {
        env.queue_len(&hold).await == 30
    })
    .await;
    worker.shutdown().await.unwrap();

    let worker = env.start(Parts::Worker).await;
    assert!(worker.ready(Duration::from_secs(10)).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(target.count(), 0, "delivered while paused");
    assert_eq!(env.queue_len(&hold).await, 30);
    let views = hookq::targets::listen(&broker, &env.settings.resolved_targets())
        .await
        .unwrap();
    assert_eq!(views[0].state, "paused");
    assert_eq!(views[0].held, 30);

    hookq::targets::resume(&broker, &app).await.unwrap();
    wait_until(T, "each key delivered", || async {
        target.successes().len() == keys.len()
    })
    .await;
    each_delivered_once(&target, &keys);
    let attempts: HashMap<String, String> = target
        .received()
        .iter()
        .map(|r| (r.key(), r.header("hookq-attempt").unwrap()))
        .collect();
    assert!(attempts.values().all(|a| a == "1"), "{attempts:?}");
    worker.shutdown().await.unwrap();
}

/// With partitions (two worker processes, stores of their own, as on two
/// hosts): the breaker holds and the held messages go back to their own
/// partitions; each key delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_with_partitions_holds_and_releases_to_each_partition() {
    let down = Arc::new(AtomicBool::new(true));
    let target = flaky(down.clone()).await;
    let limits = TargetSettings {
        breaker_failures: 3,
        breaker_probe: Duration::from_millis(300),
        breaker_max_probe: Duration::from_secs(1),
        ..Default::default()
    };
    let mut env = TestEnv::new("outparts").with_named_target("app", &target.url, limits);
    env.settings.amqp.partitions = 4;
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(Duration::from_secs(10)).await);
    let (a, b) = (env.host("a").await, env.host("b").await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let keys = send(&client, "s", "q", 80).await;
    let hold = env.topology().hold("app");
    wait_until(T, "the webhooks held", || async {
        env.queue_len(&hold).await >= 60
    })
    .await;
    assert_eq!(env.queue_len(&env.topology().dead()).await, 0);
    down.store(false, Ordering::SeqCst);
    wait_until(T, "each key delivered", || async {
        target.successes().len() == keys.len()
    })
    .await;
    each_delivered_once(&target, &keys);
    assert_eq!(env.queue_len(&env.topology().dead()).await, 0);
    for h in [&a, &b] {
        h.sigterm();
    }
}

/// `hookq target pause | list | resume` as an operator runs them, and a
/// graceful stop while the target is held: exit 0, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_commands_and_a_graceful_stop_during_a_hold() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("tcli").with_named_target("app", &target.url, Default::default());
    let run = |args: &'static [&'static str]| {
        let mut c = env.command(args, "warn");
        async move { c.output().await.unwrap() }
    };
    let unknown = run(&["target", "pause", "nope"]).await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("app"));

    let paused = run(&["target", "pause", "app"]).await;
    assert!(paused.status.success(), "{paused:?}");
    let out = String::from_utf8_lossy(&paused.stdout);
    assert!(out.contains("paused app"), "{out}");

    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(Duration::from_secs(10)).await);
    let mut worker = env.host("w").await;
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let keys = send(&client, "s", "g", 20).await;
    let hold = env.topology().hold("app");
    wait_until(T, "every webhook held", || async {
        env.queue_len(&hold).await == 20
    })
    .await;

    let list = run(&["target", "list", "--json"]).await;
    assert!(list.status.success(), "{list:?}");
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v[0]["name"], "app");
    assert_eq!(v[0]["state"], "paused");
    assert_eq!(v[0]["held"], 20);
    assert_eq!(v[0]["workers"], 1, "{v}");
    let text = run(&["target", "list"]).await;
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("paused"),
        "{text:?}"
    );

    worker.sigterm();
    let status = tokio::time::timeout(T, worker.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "a graceful stop during a hold exits 0: {status}"
    );
    assert_eq!(env.queue_len(&hold).await, 20, "held messages stay held");
    assert_eq!(target.count(), 0);

    let resumed = run(&["target", "resume", "app"]).await;
    assert!(resumed.status.success(), "{resumed:?}");
    let _worker = env.host("w2").await;
    wait_until(T, "each key delivered", || async {
        target.successes().len() == keys.len()
    })
    .await;
    each_delivered_once(&target, &keys);
}

/// `max_concurrency` across workers on several hosts (stores of their own)
/// while workers come and go: a third joins mid-run, then the first stops.
/// At no moment does the target have more than the limit and 10% in flight,
/// and each key is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrency_holds_while_workers_come_and_go() {
    const TAKES: Duration = Duration::from_millis(200);
    let target = FakeTarget::start_slow(TAKES, |_, _| StatusCode::OK).await;
    let limits = TargetSettings {
        max_concurrency: Some(10),
        ..Default::default()
    };
    let env = TestEnv::new("conc").with_named_target("app", &target.url, limits);
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(Duration::from_secs(10)).await);
    let a = env.host("a").await;
    let _b = env.host("b").await;
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let sender = {
        let client = client.clone();
        tokio::spawn(async move { send(&client, "s", "c", 400).await })
    };
    wait_until(T, "deliveries under way", || async { target.count() >= 60 }).await;
    let _c = env.host("c").await;
    wait_until(T, "the third worker in", || async { target.count() >= 140 }).await;
    a.sigterm();
    let keys = sender.await.unwrap();
    wait_until(T, "each key delivered", || async {
        target.successes().len() == keys.len()
    })
    .await;
    each_delivered_once(&target, &keys);
    // In flight at each arrival: the requests that arrived within one
    // answer time before it (every answer takes TAKES).
    let mut at: Vec<Instant> = target.received().iter().map(|r| r.at).collect();
    at.sort();
    let most = at
        .iter()
        .map(|t| at.iter().filter(|u| **u <= *t && *t - **u < TAKES).count())
        .max()
        .unwrap();
    assert!(most <= 11, "{most} in flight at once (max_concurrency 10)");
}
