//! A partitioned fleet under steady load through rolling restarts and
//! SIGKILLs: nothing lost, and keys delivered twice only within the bound the
//! README states for a SIGKILL (what the killed worker held: its prefetch on
//! each partition it was active on).
//!
//! CI runs a short version (45 s: two rolling restarts, one SIGKILL). The
//! soak in the README ran with `HOOKQ_SOAK_SECS=600 HOOKQ_SOAK_ROLL_SECS=30
//! HOOKQ_SOAK_KILL_SECS=120`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookq::system::Parts;

use crate::support::{Client, FakeTarget, Process, TestEnv, wait_until};

const PARTITIONS: u32 = 4;
const PREFETCH: u16 = 8;
const HOSTS: usize = 3;

fn secs(var: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

/// Waits until a worker's /readyz answers 200.
async fn ready(h: &Process) {
    wait_until(Duration::from_secs(60), "the worker ready", || async {
        reqwest::get(format!("http://{}/readyz", h.addr))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_load_through_rolling_restarts_and_kills() {
    let total = secs("HOOKQ_SOAK_SECS", 45);
    let roll_every = secs("HOOKQ_SOAK_ROLL_SECS", 15);
    let kill_every = secs("HOOKQ_SOAK_KILL_SECS", 30);
    let target = FakeTarget::start_slow(Duration::from_millis(50), |_, _| {
        StatusCode::OK.into_response()
    })
    .await;
    let mut env = TestEnv::new("soak").with_target(&target.url);
    env.settings.amqp.partitions = PARTITIONS;
    env.settings.amqp.prefetch = PREFETCH;
    env.broker().await;
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(Duration::from_secs(30)).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));
    let names: Vec<String> = (0..HOSTS).map(|i| format!("h{i}")).collect();
    let mut hosts = Vec::new();
    for n in &names {
        hosts.push(env.host(n).await);
    }

    // Steady load: 40 webhooks a second, one in ten a copy of a recent key.
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (client, accepted, stop) = (client.clone(), accepted.clone(), stop.clone());
        tokio::spawn(async move {
            let mut k = 0u64;
            let mut refused = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                let id = if k.is_multiple_of(10) {
                    format!("k{}", k - 7)
                } else {
                    format!("k{k}")
                };
                let r = client.post("p", &[("idempotency-key", &id)], "{}").await;
                match r.status().as_u16() {
                    202 => {
                        accepted.lock().unwrap().insert(format!("p:{id}"));
                    }
                    503 => refused += 1,
                    s => panic!("unexpected status {s}"),
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            refused
        })
    };

    let started = Instant::now();
    let (mut next_roll, mut next_kill) = (roll_every, kill_every);
    let (mut rolls, mut kills) = (0, 0);
    while started.elapsed() < total {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if started.elapsed() >= next_kill {
            next_kill += kill_every;
            kills += 1;
            let i = kills % HOSTS;
            let mut h = hosts.remove(i);
            h.child.start_kill().unwrap();
            h.child.wait().await.unwrap();
            hosts.insert(i, env.host(&names[i]).await);
            ready(&hosts[i]).await;
        }
        if started.elapsed() >= next_roll {
            next_roll += roll_every;
            rolls += 1;
            // A rolling deploy: each worker in turn stopped, and started
            // again before the next one stops.
            for i in 0..HOSTS {
                let mut h = hosts.remove(i);
                h.sigterm();
                let status = tokio::time::timeout(Duration::from_secs(60), h.child.wait())
                    .await
                    .expect("a worker stopped within a minute")
                    .unwrap();
                assert!(status.success(), "a graceful stop exits 0: {status}");
                hosts.insert(i, env.host(&names[i]).await);
                ready(&hosts[i]).await;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let refused = sender.await.unwrap();
    let accepted = accepted.lock().unwrap().clone();
    wait_until(
        Duration::from_secs(120),
        "every accepted key delivered",
        || async {
            let ok = target.successes();
            accepted.iter().all(|k| ok.contains_key(k))
        },
    )
    .await;
    let ok = target.successes();
    let twice = ok.values().filter(|n| **n > 1).count();
    let bound = kills * usize::from(PREFETCH) * PARTITIONS as usize;
    eprintln!(
        "soak: {:.0} s, {rolls} rolling restarts of {HOSTS} workers, {kills} SIGKILLs; \
         {} keys accepted ({refused} requests 503), lost 0, {twice} delivered twice (bound {bound})",
        started.elapsed().as_secs_f64(),
        accepted.len()
    );
    assert!(twice <= bound, "{twice} keys delivered twice, over {bound}");
    assert!(env.dead_letters().await.is_empty(), "nothing dead-lettered");
}
