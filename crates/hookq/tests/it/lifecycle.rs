//! A real `hookq up` process: SIGTERM under load loses and doubles nothing,
//! JSON logs carry message ids and keys, /metrics counts what was sent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;

use crate::support::{Client, FakeTarget, Process, TestEnv, wait_until};

const T: Duration = Duration::from_secs(30);

async fn spawn_up(env: &TestEnv) -> Process {
    env.spawn(&["up"], "ingress listening", |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_doubles_nothing() {
    let target = FakeTarget::start_slow(Duration::from_millis(25), |_, r| {
        if r.key() == "s:bad" {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        }
        .into_response()
    })
    .await;
    let env = TestEnv::new("sigterm").with_target(&target.url);
    let mut up = spawn_up(&env).await;
    let c = Arc::new(Client::new(up.addr));
    wait_until(T, "ready", || async {
        c.get("/readyz").await.status() == 200
    })
    .await;

    c.send("s", "bad", "{}").await;
    // A steady stream of webhooks; remember which ones were accepted.
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let sender = {
        let (c, accepted) = (c.clone(), accepted.clone());
        tokio::spawn(async move {
            for i in 0..400 {
                let r = c
                    .http
                    .post(format!("{}/hooks/s", c.base))
                    .header("idempotency-key", format!("k{i}"))
                    .body("{}")
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 202 => {
                        accepted.lock().unwrap().insert(format!("s:k{i}"));
                    }
                    Ok(_) => {}
                    Err(_) => break, // the ingress stopped listening
                }
            }
        })
    };
    wait_until(T, "deliveries under way", || async { target.count() >= 50 }).await;
    up.sigterm();
    let status = tokio::time::timeout(T, up.child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    let _ = sender.await;
    let accepted = accepted.lock().unwrap().clone();
    assert!(!accepted.is_empty());

    // The process has exited; its last lines may still be on their way
    // through the pipe to the reader.
    wait_until(Duration::from_secs(5), "the clean stop logged", || async {
        up.logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l["message"] == "stopped cleanly")
    })
    .await;
    let logs = up.logs.lock().unwrap().clone();
    // A line about a message carries its id and key.
    let dead = logs
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .contains("dead-lettered")
        })
        .expect("the dead-lettered line");
    assert_eq!(dead["span"]["key"], "s:bad", "{dead}");
    assert!(
        dead["span"]["message_id"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{dead}"
    );

    // A new process finishes what the first one handed back.
    let up2 = spawn_up(&env).await;
    wait_until(T, "every accepted webhook delivered", || async {
        let ok = target.successes();
        accepted.iter().all(|k| ok.contains_key(k))
    })
    .await;
    let c2 = Client::new(up2.addr);
    wait_until(T, "work queue drained", || async {
        env.queue_len(&env.topology().work(0)).await == 0
    })
    .await;
    let doubled: HashMap<_, _> = target
        .successes()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(
        doubled.is_empty(),
        "delivered twice after a graceful stop: {doubled:?}"
    );
    assert_eq!(c2.get("/healthz").await.status(), 200);
}

/// Parses Prometheus/OpenMetrics text into `name{labels}` -> value, checking
/// the shape of every line.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    let mut saw_eof = false;
    for line in text.lines() {
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line.starts_with("# UNIT ")
        {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unclosed labels in: {line}");
        }
        out.insert(series.to_string(), value);
    }
    assert!(saw_eof, "no # EOF line");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_what_was_sent() {
    let target = FakeTarget::start(|_, r| {
        if r.key().starts_with("m:bad") {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::OK
        }
        .into_response()
    })
    .await;
    let mut env = TestEnv::new("metrics").with_target(&target.url);
    env.settings
        .sources
        .insert("m".into(), hookq::config::SourceSettings::default());
    let up = env.up().await;
    let c = Client::new(up.ingress_addr.unwrap());
    for i in 0..5 {
        c.send("m", &format!("ok{i}"), "{}").await;
    }
    c.send("m", "ok0", "{}").await; // a duplicate
    for i in 0..2 {
        c.send("m", &format!("bad{i}"), "{}").await;
    }
    wait_until(T, "all settled", || async {
        let m = parse_metrics(&c.get("/metrics").await.text().await.unwrap());
        m.get(r#"hookq_worker_deliveries_total{source="m",outcome="dead"}"#) == Some(&2.0)
            && m.get(r#"hookq_worker_deliveries_total{source="m",outcome="delivered"}"#)
                == Some(&5.0)
            && m.get(r#"hookq_worker_deliveries_total{source="m",outcome="duplicate"}"#)
                == Some(&1.0)
    })
    .await;
    let m = parse_metrics(&c.get("/metrics").await.text().await.unwrap());
    assert_eq!(
        m[r#"hookq_ingress_requests_total{source="m",status="202",code=""}"#],
        8.0
    );
    assert_eq!(m["hookq_ingress_publish_seconds_count"], 8.0);
    assert_eq!(m["hookq_worker_delivery_seconds_count"], 7.0);
    assert_eq!(m["hookq_worker_in_flight"], 0.0);
    assert!(m["hookq_dedup_commits_total"] >= 1.0);
    assert_eq!(m["hookq_broker_reconnects_total"], 0.0);
}

/// Deliveries still running when the grace period ends finish within their
/// own worker.timeout_ms, and each 2xx is recorded and acked: nothing goes back
/// to the queue to be delivered a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_after_the_grace_period_is_recorded_not_handed_back() {
    let target = FakeTarget::start_slow(Duration::from_millis(1500), |_, _| {
        StatusCode::OK.into_response()
    })
    .await;
    let mut env = TestEnv::new("lategrace").with_target(&target.url);
    env.settings.worker.grace = Duration::from_millis(200);
    env.settings.worker.timeout = Duration::from_millis(10_000);
    let up = env.start(hookq::system::Parts::Up).await;
    let c = Client::new(up.ingress_addr.unwrap());
    wait_until(T, "ready", || async {
        c.get("/readyz").await.status() == 200
    })
    .await;
    for i in 0..8 {
        c.send("s", &format!("late-{i}"), "{}").await;
    }
    wait_until(T, "8 deliveries in flight", || async {
        target.started() == 8
    })
    .await;
    tokio::time::timeout(T, up.shutdown())
        .await
        .expect("stops")
        .unwrap();
    assert_eq!(target.count(), 8, "every delivery under way got its answer");
    let ok = target.successes();
    assert!(ok.values().all(|n| *n == 1) && ok.len() == 8, "{ok:?}");
    // Recorded and acked: nothing was handed back for a second delivery.
    assert_eq!(env.queue_len(&env.topology().work(0)).await, 0);
}

/// This process's threads now.
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Broker connections whose name carries this test's prefix.
fn broker_connections(env: &TestEnv) -> usize {
    let out = crate::support::rabbitmqctl()
        .args(["-q", "list_connections", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let mine = format!("[{}]", env.prefix);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&mine))
        .count()
}

/// `hookq up` started and shut down again and again in one process: each
/// shutdown closes what its start opened, so neither the broker's connections
/// nor this process's threads grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_and_shutting_down_again_and_again_leaks_nothing() {
    let env = TestEnv::new("cycles");
    env.broker().await; // the harness's own connection, open throughout
    let mut after = Vec::new();
    for i in 0..4 {
        let up = env.up().await;
        let mut events = up.subscribe();
        Client::new(up.ingress_addr.unwrap())
            .send("s", &format!("cycle-{i}"), "{}")
            .await;
        crate::support::settled(&mut events, T, 1, |o| {
            matches!(o, hookq::events::Outcome::Delivered { .. })
        })
        .await;
        assert_eq!(
            broker_connections(&env),
            3,
            "ingress, worker and the harness"
        );
        up.shutdown().await.unwrap();
        // Closing is awaited, so the broker has let go by now.
        assert_eq!(
            broker_connections(&env),
            1,
            "only the harness's, after cycle {i}"
        );
        // The store thread ends when its last handle goes; give it a moment.
        let deadline = std::time::Instant::now() + T;
        let mut n = threads();
        while i > 0 && n > after[0] && std::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
            n = threads();
        }
        after.push(n);
    }
    assert!(
        after.iter().all(|n| *n <= after[0]),
        "threads after each cycle: {after:?}"
    );
}
