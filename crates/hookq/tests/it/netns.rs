//! A host cut off from the broker, not stopped: a worker process in a network
//! namespace of its own (`ip netns`, a veth pair to this host) whose link is
//! taken down while it delivers. The broker notices the missing heartbeats,
//! drops its connection and hands its partitions to the standby worker on
//! this host, which reads their done-logs and delivers the rest. Nothing is
//! lost; the keys the target saw twice are the ones the cut-off worker had in
//! flight when its link went down (see the test's report).
//!
//! Needs root (`ip netns add`). The broker and the target listen on
//! 127.0.0.1 here, which a namespace cannot reach: plain TCP relays on the
//! veth's host side stand in for the route between the hosts.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookq::config::{AmqpUrl, TargetUrl};
use hookq::system::Parts;
use hookq_testkit::short_id;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::support::{Client, FakeTarget, Process, TestEnv, sample, wait_until};

const T: Duration = Duration::from_secs(90);
const PARTITIONS: u32 = 4;
const PREFETCH: u16 = 8;

/// A network namespace joined to this host by a veth pair: this host is
/// `10.213.N.1`, the namespace `10.213.N.2`. Deleted on drop (the veth pair
/// goes with it).
struct Netns {
    name: String,
    host_if: String,
    n: u8,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new() -> Self {
        let id = short_id();
        let id = &id[..6.min(id.len())];
        let n = u8::from_str_radix(&id[..2], 16).unwrap_or(7);
        let ns = Self {
            name: format!("hookq-{id}"),
            host_if: format!("hqh{id}"),
            n,
        };
        let peer = format!("hqn{id}");
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_addr()),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("10.213.{n}.2/30"), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    fn host_addr(&self) -> String {
        format!("10.213.{}.1", self.n)
    }

    fn inside_addr(&self) -> String {
        format!("10.213.{}.2", self.n)
    }

    /// The link between the namespace and this host, up or down.
    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Relays TCP connections from `listen` (port 0: any) to `to`; returns the
/// address it listens on.
async fn relay(listen: &str, to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(format!("{listen}:0")).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

async fn metrics(p: &Process) -> Option<String> {
    let r = reqwest::Client::new()
        .get(format!("http://{}/metrics", p.addr))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

/// How many partitions `p` reports itself active on.
async fn active(p: &Process) -> usize {
    let m = metrics(p).await.unwrap_or_default();
    (0..PARTITIONS)
        .filter(|i| {
            sample(
                &m,
                &format!("hookq_worker_partition_active{{partition=\"{i}\"}}"),
            ) == 1.0
        })
        .count()
}

async fn send_all(client: &Arc<Client>, ids: impl Iterator<Item = String>) {
    let gate = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for id in ids {
        let (client, gate) = (client.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            client.send("p", &id, "{}").await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_cut_off_from_the_broker_loses_nothing() {
    if std::env::var_os("HOOKQ_SKIP_NETNS").is_some() {
        eprintln!("HOOKQ_SKIP_NETNS is set: the network namespace test does not run");
        return;
    }
    let ns = Netns::new();
    let target = FakeTarget::start_slow(Duration::from_millis(100), |_, _| {
        StatusCode::OK.into_response()
    })
    .await;
    let mut env = TestEnv::new("netns").with_target(&target.url);
    env.settings.amqp.partitions = PARTITIONS;
    env.settings.amqp.prefetch = PREFETCH;
    env.settings.worker.timeout = Duration::from_secs(3);
    env.broker().await;
    let ingress = env.start(Parts::Ingress).await;
    assert!(ingress.ready(T).await);
    let client = Arc::new(Client::new(ingress.ingress_addr.unwrap()));

    // Host A, in the namespace: the broker and the target through relays on
    // the veth, AMQP heartbeats every second (a 2 s timeout).
    let broker_addr: SocketAddr = AmqpUrl::parse(crate::support::amqp_url())
        .unwrap()
        .node()
        .parse()
        .unwrap();
    let target_addr = {
        let u = TargetUrl::parse(&target.url).unwrap();
        let u = u.url();
        let host = u.host_str().unwrap().to_string();
        format!("{host}:{}", u.port().unwrap()).parse().unwrap()
    };
    let amqp = relay(&ns.host_addr(), broker_addr).await;
    let http = relay(&ns.host_addr(), target_addr).await;
    let store_a = env.dir().join("a.db");
    let (inside, netns) = (ns.inside_addr(), ns.name.clone());
    let a = env
        .spawn_via(
            &["ip", "netns", "exec", &netns],
            &["worker"],
            "worker metrics listening",
            |s| {
                s.amqp.urls = vec![
                    AmqpUrl::parse(&format!("amqp://guest:guest@{amqp}/%2f?heartbeat=2")).unwrap(),
                ];
                s.worker.target = Some(
                    TargetUrl::parse(&format!("http://{http}/webhooks"))
                        .unwrap()
                        .into(),
                );
                s.worker.metrics_listen = format!("{inside}:0").parse().unwrap();
                s.dedup.path = store_a;
            },
        )
        .await;
    // A takes every partition: one webhook per partition, before B starts.
    send_all(&client, (0..32).map(|k| format!("warm-{k}"))).await;
    wait_until(T, "host A active on every partition", || async {
        active(&a).await == PARTITIONS as usize
    })
    .await;

    // Host B, here, with a store of its own: standby on every partition, and
    // ready while it is.
    let store_b = env.dir().join("b.db");
    let b = env
        .spawn(&["worker"], "worker metrics listening", |s| {
            s.dedup.path = store_b;
        })
        .await;
    wait_until(T, "host B ready as a standby", || async {
        reqwest::get(format!("http://{}/readyz", b.addr))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert_eq!(active(&b).await, 0, "B stands by while A is active");

    let keys = 400;
    let sending = {
        let client = client.clone();
        tokio::spawn(async move { send_all(&client, (0..keys).map(|k| format!("cut-{k}"))).await })
    };
    wait_until(T, "host A delivering", || async { target.count() >= 100 }).await;
    ns.link(false);
    let cut = Instant::now();
    let at_cut = target.count();
    wait_until(T, "host B takes every partition over", || async {
        active(&b).await == PARTITIONS as usize
    })
    .await;
    let handover = cut.elapsed();
    sending.await.unwrap();
    wait_until(T, "every key delivered", || async {
        target.successes().len() == 32 + keys
    })
    .await;
    ns.link(true);
    wait_until(T, "host A back, standing by", || async {
        let m = metrics(&a).await.unwrap_or_default();
        m.lines()
            .any(|l| l.starts_with("hookq_broker_connected{") && l.ends_with(" 1"))
    })
    .await;

    // Nothing lost, nothing left in the queues, nothing dead-lettered.
    for i in 0..PARTITIONS {
        let q = format!("{}.work.{i}", env.prefix);
        wait_until(T, "the partition queue empty", || async {
            env.queue_len(&q).await == 0
        })
        .await;
    }
    assert!(env.dead_letters().await.is_empty(), "nothing dead-lettered");
    let successes = target.successes();
    let twice: Vec<_> = successes.iter().filter(|(_, n)| **n > 1).collect();
    let requests_twice = (0..keys)
        .filter(|k| target.for_key(&format!("p:cut-{k}")).len() > 1)
        .count();
    eprintln!(
        "netns: link down after {at_cut} requests; B active on all {PARTITIONS} partitions {:.1} s later; \
         {} keys answered 2xx twice, {requests_twice} keys requested twice (A's in flight at the cut)",
        handover.as_secs_f64(),
        twice.len()
    );
    // What the cut-off worker had unacked: its prefetch on each partition.
    assert!(
        twice.len() <= usize::from(PREFETCH) * PARTITIONS as usize,
        "more doubles than A had in flight: {twice:?}"
    );

    // A copy of every key, with A back (a standby on 3.10; on 4.x active
    // again where its consumer priority is the higher, after reading the
    // done-log): the done-logs hold what both delivered, so none reaches the
    // target again.
    let seen = target.count();
    let settled = |p: &Process| {
        let p = p.addr;
        async move {
            let m = reqwest::get(format!("http://{p}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            sample(
                &m,
                r#"hookq_worker_deliveries_total{source="_other",outcome="duplicate"}"#,
            )
        }
    };
    let both = || async { settled(&a).await + settled(&b).await };
    let before = both().await;
    send_all(&client, (0..keys).map(|k| format!("cut-{k}"))).await;
    wait_until(T, "the copies settled as duplicates", || async {
        both().await >= before + keys as f64
    })
    .await;
    assert_eq!(target.count(), seen, "a copy was delivered again");
    drop(a);
}
