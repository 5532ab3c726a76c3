//! A broker restart mid-stream (`rabbitmqctl stop_app` / `start_app`). Its own
//! test binary, so that it runs alone: cargo runs test binaries one after
//! another, and no other test may see the broker go away.

// This binary uses a few of the shared helpers; the `it` binary uses them all.
#[allow(dead_code, unused_imports)]
#[path = "it/support.rs"]
mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{Client, FakeTarget, TestEnv, wait_until};

/// The tests of this binary each restart the broker: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rabbitmqctl(args: &[&str]) {
    let out = support::rabbitmqctl()
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_no_accepted_webhook() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("restart").with_target(&target.url);
    let up = env.up().await;
    let c = Arc::new(Client::new(up.ingress_addr.unwrap()));

    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let refused = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (c, accepted, refused, stop) =
            (c.clone(), accepted.clone(), refused.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = c
                    .post("s", &[("idempotency-key", &format!("k{i}"))], "{}")
                    .await;
                match r.status().as_u16() {
                    202 => {
                        accepted.lock().unwrap().insert(format!("s:k{i}"));
                    }
                    503 => {
                        assert!(r.headers().get("retry-after").is_some());
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    s => panic!("unexpected status {s}"),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    wait_until(Duration::from_secs(10), "traffic flowing", || async {
        target.count() >= 20
    })
    .await;

    rabbitmqctl(&["stop_app"]);
    let restarted = scopeguard(|| rabbitmqctl(&["start_app"]));
    wait_until(
        Duration::from_secs(20),
        "readyz 503 while the broker is down",
        || async { c.get("/readyz").await.status() == 503 },
    )
    .await;
    wait_until(Duration::from_secs(20), "503s during the gap", || async {
        refused.load(Ordering::Relaxed) > 0
    })
    .await;
    drop(restarted); // start_app
    wait_until(Duration::from_secs(60), "ready again by itself", || async {
        c.get("/readyz").await.status() == 200
    })
    .await;
    let after = accepted.lock().unwrap().len();
    wait_until(Duration::from_secs(30), "accepting again", || async {
        accepted.lock().unwrap().len() > after + 10
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    assert!(up.is_ready(), "the parts are connected again");

    let accepted = accepted.lock().unwrap().clone();
    wait_until(
        Duration::from_secs(60),
        "every accepted webhook delivered",
        || async {
            let ok = target.successes();
            accepted.iter().all(|k| ok.contains_key(k))
        },
    )
    .await;
    let m = c.get("/metrics").await.text().await.unwrap();
    let reconnects: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("hookq_broker_reconnects_total "))
        .unwrap_or_else(|| panic!("no reconnect counter: {m}"))
        .parse()
        .unwrap();
    // Both the ingress's and the worker's connection came back.
    assert!(reconnects >= 2.0, "reconnects counted: {reconnects}");
}

/// A broker restart while an operator's pause holds a target's messages:
/// the held messages and the pause survive it (both live in RabbitMQ), the
/// reconnected worker keeps holding, and after the resume each key is
/// delivered once, on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_during_a_hold_keeps_the_pause_and_the_messages() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("rshold").with_named_target("app", &target.url, Default::default());
    let app = env.settings.resolved_targets()["app"].clone();
    let broker = env.broker().await;
    hookq::targets::pause(&broker, &app, "test").await.unwrap();
    let up = env.up().await;
    let c = Client::new(up.ingress_addr.unwrap());
    let mut keys = Vec::new();
    for i in 0..20 {
        keys.push(c.send("s", &format!("before-{i}"), "{}").await);
    }
    let hold = env.topology().hold("app");
    let t = Duration::from_secs(30);
    wait_until(t, "every webhook held", || async {
        env.queue_len(&hold).await == 20
    })
    .await;

    rabbitmqctl(&["stop_app"]);
    let restarted = scopeguard(|| rabbitmqctl(&["start_app"]));
    wait_until(t, "readyz 503 while the broker is down", || async {
        c.get("/readyz").await.status() == 503
    })
    .await;
    drop(restarted); // start_app
    wait_until(Duration::from_secs(60), "ready again by itself", || async {
        c.get("/readyz").await.status() == 200
    })
    .await;
    wait_until(t, "the test's own broker handle back", || async {
        env.broker().await.is_ready()
    })
    .await;
    for i in 0..10 {
        keys.push(c.send("s", &format!("after-{i}"), "{}").await);
    }
    wait_until(t, "the old and the new webhooks held", || async {
        env.queue_len(&hold).await == 30
    })
    .await;
    let broker = env.broker().await;
    let views = hookq::targets::listen(&broker, &env.settings.resolved_targets())
        .await
        .unwrap();
    assert_eq!(views[0].state, "paused", "the pause outlived the restart");
    assert_eq!(target.count(), 0, "delivered while paused");

    hookq::targets::resume(&broker, &app).await.unwrap();
    wait_until(Duration::from_secs(60), "each key delivered", || async {
        target.successes().len() == keys.len()
    })
    .await;
    let ok = target.successes();
    for k in &keys {
        assert_eq!(ok.get(k).copied(), Some(1), "{k}: {ok:?}");
    }
    assert!(
        target
            .received()
            .iter()
            .all(|r| r.header("hookq-attempt").as_deref() == Some("1")),
        "a held message spends no attempt"
    );
    assert_eq!(env.queue_len(&env.topology().dead()).await, 0);
}

/// Runs `f` when dropped, so the broker is started again even if an assertion fails.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
