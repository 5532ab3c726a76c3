//! Test support: a [`TestEnv`] per test (unique amqp.prefix, temp dir, port-0
//! listeners, its queues deleted on drop) and a scriptable [`FakeTarget`].
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hookq::broker::{Broker, Topology};
use hookq::config::{HandlerKind, QueueType, Settings};
use hookq::message::Envelope;
use hookq::serve::{self, Parts, Running};
use tokio_util::sync::CancellationToken;

/// Runs each named `async fn name(q: QueueType)` as two tests, one per queue type.
#[allow(unused_macros)]
macro_rules! on_both_queue_types {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quorum() { super::$name(QueueType::Quorum).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn classic() { super::$name(QueueType::Classic).await }
        }
    )*};
}

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Polls `cond` every 20 ms until it holds or `within` passes.
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct TestEnv {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub settings: Settings,
    stops: Mutex<Vec<CancellationToken>>,
    broker: tokio::sync::OnceCell<Broker>,
    broker_stop: CancellationToken,
}

impl TestEnv {
    /// Settings for a test: its own prefix and dedup file, port 0, millisecond
    /// delay tiers, no jitter (so waits can be asserted), log handler.
    pub fn new(name: &str) -> Self {
        // HOOKQ_LOG=debug shows what the parts in this process do (off by default).
        static LOGS: std::sync::Once = std::sync::Once::new();
        LOGS.call_once(|| {
            let filter = tracing_subscriber::EnvFilter::try_from_env("HOOKQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        });
        let prefix = format!(
            "t.{name}.{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Settings::default();
        s.amqp.url = AMQP_URL.into();
        s.amqp.prefix = prefix.clone();
        s.amqp.prefetch = 32;
        s.ingress.listen = "127.0.0.1:0".parse().unwrap();
        s.ingress.allow_unknown_sources = true;
        s.ingress.publish_timeout_ms = 3000;
        s.worker.metrics_listen = "127.0.0.1:0".parse().unwrap();
        s.worker.handler = HandlerKind::Log;
        s.worker.timeout_ms = 2000;
        s.retry.inline_delay_ms = 10;
        s.retry.delays_ms = vec![100, 200, 400];
        s.retry.jitter = 0.0;
        s.dedup.path = dir.path().join("dedup.db");
        // Short enough that a killed worker's keys are taken over quickly, long
        // enough for a store thread on a busy 2-core machine to renew it.
        s.dedup.lease_ms = 2000;
        Self {
            prefix,
            dir,
            settings: s,
            stops: Mutex::new(Vec::new()),
            broker: tokio::sync::OnceCell::new(),
            broker_stop: CancellationToken::new(),
        }
    }

    pub fn with_queue_type(mut self, q: QueueType) -> Self {
        self.settings.amqp.queue_type = q;
        self
    }

    pub fn with_target(mut self, url: &str) -> Self {
        self.settings.worker.handler = HandlerKind::Http;
        self.settings.worker.target = Some(url.to_string());
        self
    }

    pub fn topology(&self) -> Topology {
        Topology::new(&self.settings.amqp, &self.settings.retry)
    }

    /// Starts parts of hookq in this process; stopped when the env drops.
    pub async fn start(&self, parts: Parts) -> Running {
        let stop = CancellationToken::new();
        self.stops.lock().unwrap().push(stop.clone());
        serve::start(&self.settings, parts, stop)
            .await
            .expect("start hookq")
    }

    /// Like [`TestEnv::start`], with the token to stop it by hand.
    pub async fn start_with(&self, parts: Parts, stop: CancellationToken) -> Running {
        serve::start(&self.settings, parts, stop)
            .await
            .expect("start hookq")
    }

    /// `up`, waiting until it is ready.
    pub async fn up(&self) -> Running {
        let r = self.start(Parts::Up).await;
        let url = format!("http://{}/readyz", r.ingress_addr.unwrap());
        wait_until(Duration::from_secs(10), "readyz", || async {
            reqwest::get(&url)
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        })
        .await;
        r
    }

    /// A broker handle on this test's topology (declares it).
    /// The test's own broker handle on its topology: connected (and the
    /// topology declared) once, on first use, and closed when the env drops.
    pub async fn broker(&self) -> Broker {
        self.broker
            .get_or_init(|| async {
                Broker::connect(
                    AMQP_URL,
                    "hookq-test",
                    self.topology(),
                    self.broker_stop.clone(),
                )
                .await
                .expect("broker")
            })
            .await
            .clone()
    }

    pub async fn queue_len(&self, queue: &str) -> u32 {
        self.broker()
            .await
            .queue_len(queue)
            .await
            .expect("queue_len")
    }

    /// Everything in P.dead, left in place (read, then handed back on close).
    pub async fn dead_letters(&self) -> Vec<Envelope> {
        let b = self.broker().await;
        let r = b.reader().await.unwrap();
        let mut out = Vec::new();
        while let Some((m, _)) = r.get(&self.topology().dead()).await.unwrap() {
            out.push(m.envelope.unwrap_or_else(|(_, e)| e));
        }
        r.close().await;
        out
    }

    /// A plain lapin connection and channel, for doing to the broker what hookq never does.
    pub async fn raw_channel(&self) -> (lapin::Connection, lapin::Channel) {
        let conn = lapin::Connection::connect(&self.settings.amqp.url, Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        (conn, ch)
    }

    /// Deletes a queue under hookq's feet.
    pub async fn delete_queue(&self, queue: &str) {
        let (conn, ch) = self.raw_channel().await;
        ch.queue_delete(queue.into(), Default::default())
            .await
            .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }

    /// Environment for a `hookq` child process with these settings.
    pub fn child_env(&self) -> Vec<(String, String)> {
        let s = &self.settings;
        let mut v = vec![
            ("HOOKQ__AMQP__URL", s.amqp.url.clone()),
            ("HOOKQ__AMQP__PREFIX", s.amqp.prefix.clone()),
            ("HOOKQ__AMQP__PREFETCH", s.amqp.prefetch.to_string()),
            (
                "HOOKQ__AMQP__QUEUE_TYPE",
                match s.amqp.queue_type {
                    QueueType::Quorum => "quorum".into(),
                    QueueType::Classic => "classic".into(),
                },
            ),
            ("HOOKQ__INGRESS__LISTEN", "127.0.0.1:0".into()),
            ("HOOKQ__WORKER__METRICS_LISTEN", "127.0.0.1:0".into()),
            ("HOOKQ__WORKER__TIMEOUT_MS", s.worker.timeout_ms.to_string()),
            (
                "HOOKQ__RETRY__INLINE_DELAY_MS",
                s.retry.inline_delay_ms.to_string(),
            ),
            (
                "HOOKQ__RETRY__DELAYS_MS",
                s.retry
                    .delays_ms
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("HOOKQ__RETRY__JITTER", "0".into()),
            ("HOOKQ__DEDUP__PATH", s.dedup.path.display().to_string()),
            ("HOOKQ__DEDUP__LEASE_MS", s.dedup.lease_ms.to_string()),
            ("HOOKQ__INGRESS__ALLOW_UNKNOWN_SOURCES", "true".into()),
        ];
        if let Some(t) = &s.worker.target {
            v.push(("HOOKQ__WORKER__HANDLER", "http".into()));
            v.push(("HOOKQ__WORKER__TARGET", t.clone()));
        } else {
            v.push(("HOOKQ__WORKER__HANDLER", "log".into()));
        }
        v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        for s in self.stops.lock().map(|s| s.clone()).unwrap_or_default() {
            s.cancel();
        }
        self.broker_stop.cancel();
        // Delete what the test declared, from a runtime of its own (Drop is sync).
        let topo = self.topology();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(b) = Broker::connect(
                    AMQP_URL,
                    "hookq-test-cleanup",
                    topo,
                    CancellationToken::new(),
                )
                .await
                {
                    let _ = b.delete_topology().await;
                }
            });
        })
        .join();
    }
}

/// One request the fake target received.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    pub fn key(&self) -> String {
        self.header("idempotency-key").unwrap_or_default()
    }
}

/// Decides the answer to the n-th request (1-based) for a key.
pub type Script = Arc<dyn Fn(u32, &Received) -> Response + Send + Sync>;

struct TargetState {
    script: Script,
    /// Each answer waits this long (a slow application).
    delay: Duration,
    log: Mutex<Vec<Received>>,
    counts: Mutex<HashMap<String, u32>>,
    /// Requests that arrived, answered or not yet.
    started: std::sync::atomic::AtomicUsize,
}

/// A real HTTP server on 127.0.0.1:0 that answers by script and records every request.
#[derive(Clone)]
pub struct FakeTarget {
    pub url: String,
    state: Arc<TargetState>,
}

impl FakeTarget {
    pub async fn start(
        script: impl Fn(u32, &Received) -> Response + Send + Sync + 'static,
    ) -> Self {
        Self::start_slow(Duration::ZERO, script).await
    }

    pub async fn start_slow(
        delay: Duration,
        script: impl Fn(u32, &Received) -> Response + Send + Sync + 'static,
    ) -> Self {
        let state = Arc::new(TargetState {
            delay,
            script: Arc::new(script),
            log: Mutex::new(Vec::new()),
            counts: Mutex::new(HashMap::new()),
            started: Default::default(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/webhooks"),
            state,
        }
    }

    /// Always 200.
    pub async fn ok() -> Self {
        Self::start(|_, _| StatusCode::OK.into_response()).await
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.log.lock().unwrap().clone()
    }

    pub fn for_key(&self, key: &str) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.key() == key)
            .collect()
    }

    /// Requests answered so far.
    pub fn count(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }

    /// Requests that arrived so far, answered or still waiting for their answer.
    pub fn started(&self) -> usize {
        self.state.started.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// 2xx answers per key.
    pub fn successes(&self) -> HashMap<String, u32> {
        let mut m = HashMap::new();
        for r in self.received() {
            if r.header("x-fake-answer").as_deref() == Some("2xx") {
                *m.entry(r.key()).or_default() += 1;
            }
        }
        m
    }
}

async fn handle(State(state): State<Arc<TargetState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default()
        .to_vec();
    let mut rec = Received {
        at: Instant::now(),
        headers: parts.headers,
        body,
    };
    state
        .started
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let n = {
        let mut c = state.counts.lock().unwrap();
        let e = c.entry(rec.key()).or_default();
        *e += 1;
        *e
    };
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let resp = (state.script)(n, &rec);
    if resp.status().is_success() {
        rec.headers.insert("x-fake-answer", "2xx".parse().unwrap());
    }
    state.log.lock().unwrap().push(rec);
    resp
}

/// A client for the ingress.
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    pub async fn post(
        &self,
        source: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> reqwest::Response {
        let mut r = self
            .http
            .post(format!("{}/hooks/{source}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.expect("post")
    }

    /// Posts and asserts 202; returns the key.
    pub async fn send(&self, source: &str, id: &str, body: &str) -> String {
        let r = self.post(source, &[("idempotency-key", id)], body).await;
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
        let v: serde_json::Value = r.json().await.unwrap();
        v["key"].as_str().unwrap().to_string()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("get")
    }
}
