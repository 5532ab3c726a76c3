//! hookq on a real 3-node RabbitMQ cluster (started on this machine by
//! `tests/cluster/cluster.sh`, apart from the default node, and stopped at
//! the end, even when a test fails). Its own test binary, so that its nodes
//! come and go with nothing else running against them. The tests in it share
//! one cluster and run one after another.
//!
//! What they show: losing the node hookq is connected to costs a few seconds
//! of 503s and a pause, a rolling restart likewise, and nothing is lost or
//! delivered twice; the dead-letter tools work while a node is down.
//!
//! The nodes are the machine's RabbitMQ (3.10) by default. With
//! `HOOKQ_CLUSTER_ROOT=/opt/rmq4` (a root made by `.ci/rabbitmq4`: RabbitMQ
//! 4.x) they run from that root instead, as hq4-1..3@localhost on ports from
//! 5800, with their directory inside the root (see `tests/cluster/cluster.sh`).
//! The cluster's directory is removed at the end when every test passed, and
//! kept (its logs) when one failed.

// This binary uses a part of the shared helpers.
#[allow(dead_code, unused_imports)]
#[path = "it/support.rs"]
mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookq::config::AmqpUrl;
use hookq::system::{Parts, System};
use support::{Client, FakeTarget, TestEnv, wait_until};
use tokio::sync::Mutex as AsyncMutex;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cluster/cluster.sh");
/// The first port of the cluster on the machine's RabbitMQ (3.10) ...
const BASEPORT: u16 = 5700;
/// ... and of one from `HOOKQ_CLUSTER_ROOT` (4.x), apart from it.
const BASEPORT_ROOT: u16 = 5800;
const T: Duration = Duration::from_secs(120);

/// `HOOKQ_CLUSTER_ROOT`: the root of another RabbitMQ to run the nodes from
/// (e.g. `/opt/rmq4`), or `None` (unset or empty) for the machine's own.
fn cluster_root() -> Option<String> {
    std::env::var("HOOKQ_CLUSTER_ROOT")
        .ok()
        .filter(|r| !r.trim().is_empty())
}

/// `bash cluster.sh`, told the root (or that there is none) explicitly.
fn script_command() -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(SCRIPT);
    match cluster_root() {
        Some(root) => cmd.env("HOOKQ_CLUSTER_ROOT", root),
        None => cmd.env_remove("HOOKQ_CLUSTER_ROOT"),
    };
    cmd
}

/// The running cluster: its directory, each node's AMQP port and the
/// RabbitMQ version it runs.
struct Cluster {
    dir: PathBuf,
    ports: Vec<u16>,
    version: String,
}

fn script(args: &[&str]) -> String {
    let out = script_command()
        .args(args)
        .output()
        .expect("run cluster.sh");
    assert!(
        out.status.success(),
        "cluster.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Cluster {
    fn start() -> Self {
        // The nodes of a root see only what is inside it: their directory goes there.
        let (tmp, baseport) = match cluster_root() {
            Some(root) => (PathBuf::from(root).join("tmp"), BASEPORT_ROOT),
            None => (std::env::temp_dir(), BASEPORT),
        };
        let dir = tmp.join(format!("hookq-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display().to_string();
        let started = Instant::now();
        let out = script(&["start", &d, &baseport.to_string()]);
        let nodes: Vec<(String, u16, u16)> = out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((
                    w.next()?.to_string(),
                    w.next()?.parse().ok()?,
                    w.next()?.parse().ok()?,
                ))
            })
            .collect();
        assert_eq!(nodes.len(), 3, "three nodes: {out}");
        let version = rabbitmq_version(nodes[0].2);
        eprintln!(
            "cluster of RabbitMQ {version} ({}) started in {:?}: {}",
            cluster_root().unwrap_or_else(|| "this machine's RabbitMQ".into()),
            started.elapsed(),
            nodes
                .iter()
                .map(|(n, a, m)| format!("{n} amqp {a} http {m}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Self {
            dir,
            ports: nodes.iter().map(|n| n.1).collect(),
            version,
        }
    }

    fn urls(&self) -> Vec<AmqpUrl> {
        self.ports
            .iter()
            .map(|p| AmqpUrl::parse(&format!("amqp://guest:guest@127.0.0.1:{p}/%2f")).unwrap())
            .collect()
    }

    /// The node (1..3) listening on `host:port`.
    fn node_of(&self, node: &str) -> usize {
        let port: u16 = node.rsplit(':').next().unwrap().parse().unwrap();
        self.ports.iter().position(|p| *p == port).unwrap() + 1
    }

    fn stop_node(&self, n: usize) {
        script(&["stop-node", &self.dir.display().to_string(), &n.to_string()]);
    }

    fn start_node(&self, n: usize) {
        script(&[
            "start-node",
            &self.dir.display().to_string(),
            &n.to_string(),
        ]);
    }
}

/// The RabbitMQ version of the node whose management API is on `port`
/// (curl: this runs before any runtime is at hand; cluster.sh needs it too).
fn rabbitmq_version(port: u16) -> String {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "10", "-u", "guest:guest"])
        .arg(format!("http://127.0.0.1:{port}/api/overview"))
        .output()
        .expect("run curl");
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["rabbitmq_version"].as_str().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Stops the nodes; removes the directory unless a test failed (then its
/// logs stay, and where they are is said).
fn stop_cluster(c: &Cluster) {
    let stopped = script_command()
        .args(["stop", &c.dir.display().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    if stopped && !FAILED.load(Ordering::SeqCst) {
        let _ = std::fs::remove_dir_all(&c.dir);
    } else {
        eprintln!(
            "cluster (RabbitMQ {}) kept for a look: {} (cluster.log, rmq/<node>/log/)",
            c.version,
            c.dir.display()
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop_cluster(self);
    }
}

/// One cluster for the tests of this binary, started by the first and
/// stopped when the process exits (tests run one after another: see the
/// lock), plus the tests' own order.
static CLUSTER: std::sync::OnceLock<Cluster> = std::sync::OnceLock::new();
static ONE_AT_A_TIME: AsyncMutex<()> = AsyncMutex::const_new(());
/// Set when a test failed: the cluster's directory is kept then.
static FAILED: AtomicBool = AtomicBool::new(false);

/// A test's turn (see [`ONE_AT_A_TIME`]); notes a failure when the test
/// panics while holding it.
struct Turn(#[allow(dead_code)] tokio::sync::MutexGuard<'static, ()>);

impl Drop for Turn {
    fn drop(&mut self) {
        if std::thread::panicking() {
            FAILED.store(true, Ordering::SeqCst);
        }
    }
}

async fn my_turn() -> Turn {
    Turn(ONE_AT_A_TIME.lock().await)
}

fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        // Stop the nodes when the test binary ends, whatever happened.
        extern "C" fn stop_at_exit() {
            if let Some(c) = CLUSTER.get() {
                stop_cluster(c);
            }
        }
        unsafe extern "C" {
            fn atexit(f: extern "C" fn()) -> i32;
        }
        // SAFETY: registering a plain function to run at exit.
        unsafe {
            atexit(stop_at_exit);
        }
        Cluster::start()
    })
}

fn env_on(c: &Cluster, name: &str, target: &FakeTarget) -> TestEnv {
    let mut env = TestEnv::new(name).with_target(&target.url);
    env.settings.amqp.urls = c.urls();
    // Publishes wait out a leader election rather than fail at once.
    env.settings.ingress.publish_timeout = Duration::from_secs(5);
    env
}

/// `hookq up` with its ingress and worker connected to the same node (each
/// connection picks a node in a shuffled order; start again until they agree).
async fn up_on_one_node(env: &TestEnv) -> (System, String) {
    for _ in 0..20 {
        let up = env.start(Parts::Up).await;
        assert!(up.ready(T).await, "hookq up ready");
        let nodes: HashSet<Option<String>> = up.nodes().into_iter().map(|(_, n)| n).collect();
        if nodes.len() == 1
            && let Some(Some(node)) = nodes.into_iter().next()
        {
            return (up, node);
        }
        up.shutdown().await.unwrap();
    }
    panic!("ingress and worker never chose the same node");
}

/// Sends webhooks at a steady pace until `stop`, re-sending each one refused
/// with 503 until it is accepted; records the accepted keys and each 503's time.
struct Sender {
    accepted: Arc<Mutex<HashSet<String>>>,
    refusals: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn send_steadily(c: Arc<Client>, tag: &'static str) -> Sender {
    let accepted = Arc::new(Mutex::new(HashSet::new()));
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (a, r, s) = (accepted.clone(), refusals.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut i = 0u32;
        while !s.load(Ordering::Relaxed) {
            i += 1;
            let id = format!("{tag}-{i}");
            loop {
                match c
                    .http
                    .post(format!("{}/hooks/s", c.base))
                    .header("idempotency-key", &id)
                    .body("{}")
                    .send()
                    .await
                {
                    Ok(resp) if resp.status() == 202 => {
                        a.lock().unwrap().insert(format!("s:{id}"));
                        break;
                    }
                    Ok(resp) => {
                        assert_eq!(resp.status(), 503, "only 503 while a node goes");
                        r.lock().unwrap().push(Instant::now());
                    }
                    Err(e) => panic!("the ingress itself failed: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    Sender {
        accepted,
        refusals,
        stop,
        task,
    }
}

impl Sender {
    async fn finish(self) -> (HashSet<String>, Vec<Instant>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let a = self.accepted.lock().unwrap().clone();
        let r = self.refusals.lock().unwrap().clone();
        (a, r)
    }

    fn accepted(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }
}

/// The span from the first to the last 503 (zero when there was none).
fn window(refusals: &[Instant]) -> Duration {
    match (refusals.first(), refusals.last()) {
        (Some(a), Some(b)) => b.duration_since(*a),
        _ => Duration::ZERO,
    }
}

async fn each_delivered_once(target: &FakeTarget, accepted: &HashSet<String>) {
    wait_until(T, "every accepted webhook delivered", || async {
        let ok = target.successes();
        accepted.iter().all(|k| ok.contains_key(k))
    })
    .await;
    let doubled: Vec<_> = target
        .successes()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(doubled.is_empty(), "delivered twice: {doubled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_node_in_use_costs_seconds_of_503s_and_nothing_else() {
    let _one = my_turn().await;
    let c = cluster();
    let target = FakeTarget::ok().await;
    let env = env_on(c, "nodeloss", &target);
    let (up, node) = up_on_one_node(&env).await;
    let client = Arc::new(Client::new(up.ingress_addr.unwrap()));
    let sender = send_steadily(client, "loss");
    wait_until(T, "traffic flowing", || async { target.count() >= 50 }).await;
    let n = c.node_of(&node);
    let lost_at = Instant::now();
    c.stop_node(n);
    let before = sender.accepted();
    wait_until(T, "accepting again on another node", || async {
        sender.accepted() > before + 50
    })
    .await;
    let (accepted, refusals) = sender.finish().await;
    each_delivered_once(&target, &accepted).await;
    let w = window(&refusals);
    eprintln!(
        "node {n} ({node}) lost: {} 503s over {w:?}; accepted {} webhooks, each delivered once \
         (node stop to last 503: {:?})",
        refusals.len(),
        accepted.len(),
        refusals.last().map(|l| l.duration_since(lost_at))
    );
    assert!(w < Duration::from_secs(15), "503s for {w:?}");
    up.shutdown().await.unwrap();
    c.start_node(n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing_and_doubles_nothing() {
    let _one = my_turn().await;
    let c = cluster();
    let target = FakeTarget::ok().await;
    let env = env_on(c, "rolling", &target);
    let up = env.start(Parts::Up).await;
    assert!(up.ready(T).await);
    let client = Arc::new(Client::new(up.ingress_addr.unwrap()));
    let sender = send_steadily(client, "roll");
    wait_until(T, "traffic flowing", || async { target.count() >= 50 }).await;
    let mut per_node = Vec::new();
    for n in 1..=3 {
        let refused_before = sender.refusals.lock().unwrap().len();
        c.stop_node(n);
        let before = sender.accepted();
        wait_until(T, "accepting with the node down", || async {
            sender.accepted() > before + 20
        })
        .await;
        c.start_node(n);
        let r = sender.refusals.lock().unwrap()[refused_before..].to_vec();
        per_node.push((n, r.len(), window(&r)));
    }
    let (accepted, _) = sender.finish().await;
    each_delivered_once(&target, &accepted).await;
    for (n, count, w) in &per_node {
        eprintln!("rolling restart, node {n}: {count} 503s over {w:?}");
        assert!(*w < Duration::from_secs(15), "node {n}: 503s for {w:?}");
    }
    eprintln!(
        "rolling restart: {} webhooks accepted, each delivered once",
        accepted.len()
    );
    up.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_tools_work_with_a_node_down() {
    let _one = my_turn().await;
    let c = cluster();
    let failing = Arc::new(AtomicU32::new(1));
    let f = failing.clone();
    let target = FakeTarget::start(move |_, _| {
        if f.load(Ordering::SeqCst) == 1 {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        }
        .into_response()
    })
    .await;
    let env = env_on(c, "tools", &target);
    let up = env.up().await;
    let client = Client::new(up.ingress_addr.unwrap());
    for i in 0..20 {
        client.send("s", &format!("dead-{i}"), "{}").await;
    }
    wait_until(T, "twenty dead letters", || async {
        env.queue_len(&env.topology().dead()).await == 20
    })
    .await;
    c.stop_node(2);
    let run = |args: &'static [&'static str]| {
        let env = &env;
        async move {
            env.command(args, "warn")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .output()
                .await
                .unwrap()
        }
    };
    let stats = run(&["dlq", "stats", "--json"]).await;
    assert!(stats.status.success(), "{stats:?}");
    let v: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(v["total"], 20, "{v}");
    let list = run(&["dlq", "list", "--json"]).await;
    assert!(list.status.success(), "{list:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(rows.len(), 20);
    failing.store(0, Ordering::SeqCst);
    let moved = run(&["shovel"]).await;
    assert!(moved.status.success(), "{moved:?}");
    assert!(
        String::from_utf8_lossy(&moved.stdout).contains("moved 20 dead letter(s)"),
        "{}",
        String::from_utf8_lossy(&moved.stdout)
    );
    wait_until(T, "the moved webhooks delivered", || async {
        target.successes().len() == 20
    })
    .await;
    up.shutdown().await.unwrap();
    c.start_node(2);
}
