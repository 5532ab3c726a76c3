//! Workers on several "hosts": worker processes that do not share a store
//! (each its own dedup file), over 8 partitions. Each partition has one active
//! worker, so a key's duplicates meet one store; the done-logs keep what a
//! worker delivered when another takes its partitions over.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookq::system::Parts;
use tokio::sync::Semaphore;

use crate::support::{Client, FakeTarget, Process, TestEnv, sample, wait_until};

const T: Duration = Duration::from_secs(60);

/// Delivered and duplicate settlements that `hosts` report on their /metrics.
pub async fn settled(hosts: &[&Process]) -> (f64, f64) {
    let (mut delivered, mut duplicate) = (0.0, 0.0);
    for h in hosts {
        let Ok(r) = reqwest::get(format!("http://{}/metrics", h.addr)).await else {
            continue;
        };
        let m = r.text().await.unwrap_or_default();
        delivered += sample(
            &m,
            r#"hookq_worker_deliveries_total{source="_other",outcome="delivered"}"#,
        );
        duplicate += sample(
            &m,
            r#"hookq_worker_deliveries_total{source="_other",outcome="duplicate"}"#,
        );
    }
    (delivered, duplicate)
}

fn partitioned(name: &str, target: &FakeTarget) -> TestEnv {
    let mut env = TestEnv::new(name).with_target(&target.url);
    env.settings.amqp.partitions = 8;
    env.settings.amqp.prefetch = 16;
    env
}

/// Sends every key `copies` times, copy `c` of key `k` to ingress `(k + c) % 2`.
async fn send(ingresses: &[Arc<Client>; 2], keys: usize, copies: usize, tag: &str) {
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for c in 0..copies {
        for k in 0..keys {
            let client = ingresses[(k + c) % 2].clone();
            let gate = gate.clone();
            let id = format!("{tag}-{k}");
            tasks.push(tokio::spawn(async move {
                let _p = gate.acquire().await.unwrap();
                client
                    .send("p", &id, &format!(r#"{{"k":{k},"c":{c}}}"#))
                    .await
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn ingresses(
    env: &TestEnv,
) -> (
    hookq::system::System,
    hookq::system::System,
    [Arc<Client>; 2],
) {
    let a = env.start(Parts::Ingress).await;
    let b = env.start(Parts::Ingress).await;
    assert!(a.ready(T).await && b.ready(T).await, "ingresses ready");
    let clients = [
        Arc::new(Client::new(a.ingress_addr.unwrap())),
        Arc::new(Client::new(b.ingress_addr.unwrap())),
    ];
    (a, b, clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_two_ingresses_each_key_delivered_once() {
    let target = FakeTarget::ok().await;
    let env = partitioned("parts3", &target);
    env.broker().await;
    let (_a, _b, clients) = ingresses(&env).await;
    let hosts = [
        env.host("h1").await,
        env.host("h2").await,
        env.host("h3").await,
    ];
    send(&clients, 1200, 3, "k").await;
    let all: Vec<&Process> = hosts.iter().collect();
    wait_until(T, "3600 webhooks settled", || async {
        let (d, dup) = settled(&all).await;
        d + dup >= 3600.0
    })
    .await;
    let (delivered, duplicate) = settled(&all).await;
    assert_eq!((delivered, duplicate), (1200.0, 2400.0));
    let ok = target.successes();
    assert_eq!(ok.len(), 1200, "every key delivered");
    let doubled: Vec<_> = ok.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "delivered twice: {doubled:?}");
    assert_eq!(target.count(), 1200, "no copy reached the target");
    // The partitions are spread: every host delivered some.
    for (i, h) in all.iter().enumerate() {
        let m = h.metrics().await;
        let active = (0..8)
            .filter(|p| {
                sample(
                    &m,
                    &format!("hookq_worker_partition_active{{partition=\"{p}\"}}"),
                ) == 1.0
            })
            .count();
        eprintln!("host {} is active on {active} of 8 partitions", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_host_loses_nothing_and_its_done_log_keeps_what_it_delivered() {
    let target = FakeTarget::start_slow(Duration::from_millis(5), |_, _| {
        StatusCode::OK.into_response()
    })
    .await;
    let env = partitioned("partkill", &target);
    env.broker().await;
    let (_a, _b, clients) = ingresses(&env).await;
    let mut hosts = vec![
        env.host("h1").await,
        env.host("h2").await,
        env.host("h3").await,
    ];
    let sending = {
        let clients = clients.clone();
        tokio::spawn(async move { send(&clients, 600, 2, "kill").await })
    };
    wait_until(T, "deliveries under way", || async {
        target.count() >= 150
    })
    .await;
    // SIGKILL a host that is active on some partitions and has delivered.
    let mut victim = {
        let mut at = None;
        for (i, h) in hosts.iter().enumerate() {
            let m = h.metrics().await;
            let delivered = sample(
                &m,
                r#"hookq_worker_deliveries_total{source="_other",outcome="delivered"}"#,
            );
            if delivered > 0.0 {
                at = Some(i);
                break;
            }
        }
        hosts.remove(at.expect("a host that delivered"))
    };
    victim.child.start_kill().unwrap();
    victim.child.wait().await.unwrap();
    sending.await.unwrap();
    let rest: Vec<&Process> = hosts.iter().collect();
    wait_until(T, "every key delivered", || async {
        target.successes().len() == 600
    })
    .await;
    // Nothing lost; doubles only for what the killed host had in flight: its
    // prefetch on each of its partitions, at most.
    let doubled = target.successes().values().filter(|n| **n > 1).count();
    assert!(doubled <= 16 * 8, "{doubled} keys doubled");
    let settled_before = settled(&rest).await;
    let seen_before = target.count();
    // A copy of every key, after everything settled: the done-logs hold
    // what every host delivered, so none is delivered again.
    send(&clients, 600, 1, "kill").await;
    wait_until(T, "the copies settled as duplicates", || async {
        let (d, dup) = settled(&rest).await;
        d + dup >= settled_before.0 + settled_before.1 + 600.0
    })
    .await;
    assert_eq!(target.count(), seen_before, "a copy was delivered again");
}

/// `hookq topology` refuses to change amqp.partitions while the old layout
/// holds messages, saying how to drain; once drained, it moves the topology.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_refuses_to_change_the_partitions_of_a_running_system() {
    let target = FakeTarget::ok().await;
    let env = TestEnv::new("repart").with_target(&target.url);
    // One partition, with a webhook waiting in P.work (no worker runs).
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(T).await);
    Client::new(ingress.ingress_addr.unwrap())
        .send("p", "waiting", "{}")
        .await;
    ingress.shutdown().await.unwrap();
    let run = |n: u32| {
        let env = &env;
        async move {
            env.command_with(&["topology"], "warn", |s| s.amqp.partitions = n)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .output()
                .await
                .unwrap()
        }
    };
    let out = run(8).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("{}.work", env.prefix)), "{stderr}");
    assert!(stderr.contains("drain"), "says what to do: {stderr}");
    // Drained by a worker on the old layout, the system moves.
    let worker = env.start(Parts::Worker).await;
    wait_until(T, "the waiting webhook delivered", || async {
        target.count() == 1
    })
    .await;
    worker.shutdown().await.unwrap();
    let out = run(8).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("moved the topology from 1 to 8"),
        "{stdout}"
    );
    for i in 0..8 {
        assert!(
            stdout.contains(&format!("{}.work.{i} ", env.prefix)),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("{}.done.{i} ", env.prefix)),
            "{stdout}"
        );
    }
    // The sandbox deletes the new layout's queues too when it drops.
    let mut env = env;
    env.settings.amqp.partitions = 8;
}
