//! The one fake delivery target: a real HTTP server on 127.0.0.1:0 that
//! answers each request by script and records what it received. The tests
//! script failures, slowness and `Retry-After`; the simulator a flaky
//! application; the benchmark uses [`FakeTarget::sink`], which answers 200
//! at once and copies nothing out of the request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

/// One request the target received, and its answer.
#[derive(Clone, Debug)]
pub struct Received {
    /// When it arrived.
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The status it was (or, if the client gave up first, would have been)
    /// answered with.
    pub status: u16,
    /// How long the answer was held back.
    pub delay: Duration,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Its `Idempotency-Key` (empty without one).
    pub fn key(&self) -> String {
        self.header("idempotency-key").unwrap_or_default()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// What runs when an answer goes (or its client gives up first).
type OnAnswer = Box<dyn FnOnce() + Send>;

/// A scripted answer: a response, held back for `delay` (a slow or hanging
/// application).
pub struct Reply {
    pub response: Response,
    pub delay: Duration,
    on_answer: Option<OnAnswer>,
}

impl Reply {
    /// `response`, after `delay`.
    pub fn after(delay: Duration, response: impl IntoResponse) -> Self {
        Self {
            response: response.into_response(),
            delay,
            on_answer: None,
        }
    }

    /// Runs `f` the moment the answer goes, before the client can see it, or
    /// when the client gives up first. An application's own bookkeeping (a
    /// request's place freed) then happens exactly when the client learns of
    /// it, not on a timer that a loaded machine may run late.
    pub fn then(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_answer = Some(Box::new(f));
        self
    }
}

impl From<Response> for Reply {
    fn from(response: Response) -> Self {
        Self {
            response,
            delay: Duration::ZERO,
            on_answer: None,
        }
    }
}

impl From<StatusCode> for Reply {
    fn from(status: StatusCode) -> Self {
        status.into_response().into()
    }
}

/// Decides the answer to the n-th request (1-based) for a key.
type Script = Box<dyn Fn(u32, &Received) -> Reply + Send + Sync>;

struct Targeted {
    /// `None`: the sink (200 at once, nothing recorded).
    script: Option<Script>,
    /// Every answer waits this long too (a slow application).
    delay: Duration,
    log: Mutex<Vec<Received>>,
    counts: Mutex<HashMap<String, u32>>,
    /// Requests that arrived, answered or not yet.
    started: AtomicUsize,
    /// The sink's bookkeeping, see [`FakeTarget::note_keys`].
    arrivals: Mutex<HashMap<String, Instant>>,
    note_keys: AtomicBool,
    /// When the first request since the last [`FakeTarget::mark`] came, in
    /// nanoseconds after `base` (0: none yet).
    first_ns: AtomicU64,
    base: Instant,
}

/// A real HTTP server that answers by script and records every request.
#[derive(Clone)]
pub struct FakeTarget {
    /// `http://127.0.0.1:PORT/webhooks`.
    pub url: String,
    state: Arc<Targeted>,
    stop: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeTarget {
    /// Answers the n-th request for a key (1-based) as `script` says.
    pub async fn start<R: Into<Reply>>(
        script: impl Fn(u32, &Received) -> R + Send + Sync + 'static,
    ) -> Self {
        Self::start_slow(Duration::ZERO, script).await
    }

    /// Like [`FakeTarget::start`], every answer `delay` late.
    pub async fn start_slow<R: Into<Reply>>(
        delay: Duration,
        script: impl Fn(u32, &Received) -> R + Send + Sync + 'static,
    ) -> Self {
        let script: Script = Box::new(move |n, r| script(n, r).into());
        Self::serve(Some(script), delay)
            .await
            .expect("a fake target on 127.0.0.1")
    }

    /// Always 200.
    pub async fn ok() -> Self {
        Self::start(|_, _| StatusCode::OK).await
    }

    /// The benchmark's target: 200 at once, the body read to its end (so the
    /// connection is kept alive), headers looked at in place and nothing
    /// recorded but what [`FakeTarget::note_keys`] and [`FakeTarget::mark`]
    /// ask for.
    pub async fn sink() -> anyhow::Result<Self> {
        Self::serve(None, Duration::ZERO).await
    }

    async fn serve(script: Option<Script>, delay: Duration) -> anyhow::Result<Self> {
        let state = Arc::new(Targeted {
            script,
            delay,
            log: Mutex::new(Vec::new()),
            counts: Mutex::new(HashMap::new()),
            started: AtomicUsize::new(0),
            arrivals: Mutex::new(HashMap::new()),
            note_keys: AtomicBool::new(true),
            first_ns: AtomicU64::new(0),
            base: Instant::now(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("cannot listen on 127.0.0.1 for the fake target")?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });
        Ok(Self {
            url: format!("http://{addr}/webhooks"),
            state,
            stop,
        })
    }

    /// Stops serving (requests under way finish).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Every request answered (or given up on by its client), in that order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.state.log).clone()
    }

    pub fn for_key(&self, key: &str) -> Vec<Received> {
        lock(&self.state.log)
            .iter()
            .filter(|r| r.key() == key)
            .cloned()
            .collect()
    }

    /// Requests answered (or given up on) so far.
    pub fn count(&self) -> usize {
        lock(&self.state.log).len()
    }

    /// Requests that arrived so far, answered or still waiting for their answer.
    pub fn started(&self) -> usize {
        self.state.started.load(Ordering::SeqCst)
    }

    /// 2xx answers per key.
    pub fn successes(&self) -> HashMap<String, u32> {
        let mut m = HashMap::new();
        for r in lock(&self.state.log).iter().filter(|r| r.is_success()) {
            *m.entry(r.key()).or_default() += 1;
        }
        m
    }

    /// The sink: whether each key's first arrival is noted (off while a
    /// throughput is measured: the hand-written forwarder sends no key, so
    /// noting hookq's would charge hookq for the bench's own bookkeeping).
    pub fn note_keys(&self, on: bool) {
        self.state.note_keys.store(on, Ordering::Relaxed);
    }

    /// The sink: starts a new window for [`FakeTarget::first_since_mark`].
    pub fn mark(&self) {
        self.state.first_ns.store(0, Ordering::Relaxed);
    }

    /// The sink: when the first request since the last mark arrived.
    pub fn first_since_mark(&self) -> Option<Instant> {
        match self.state.first_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.state.base + Duration::from_nanos(ns)),
        }
    }

    /// The sink: when `key` first arrived (while keys were noted).
    pub fn arrival(&self, key: &str) -> Option<Instant> {
        lock(&self.state.arrivals).get(key).copied()
    }
}

async fn handle(State(s): State<Arc<Targeted>>, request: Request) -> Response {
    let now = Instant::now();
    s.started.fetch_add(1, Ordering::SeqCst);
    let Some(script) = &s.script else {
        return sink(&s, now, request).await;
    };
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default()
        .to_vec();
    let mut rec = Received {
        at: now,
        headers: parts.headers,
        body,
        status: 0,
        delay: Duration::ZERO,
    };
    let n = {
        let mut c = lock(&s.counts);
        let e = c.entry(rec.key()).or_default();
        *e += 1;
        *e
    };
    let mut reply = script(n, &rec);
    let delay = s.delay + reply.delay;
    rec.status = reply.response.status().as_u16();
    rec.delay = delay;
    // Logged when answered, or when the client gave up first (its request is
    // dropped mid-delay: a timeout), with the answer it would have had.
    let logged = Logged {
        state: s.clone(),
        rec: Some(rec),
        on_answer: reply.on_answer.take(),
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    drop(logged);
    reply.response
}

/// Pushes its request to the log and runs the reply's [`Reply::then`] when
/// dropped.
struct Logged {
    state: Arc<Targeted>,
    rec: Option<Received>,
    on_answer: Option<OnAnswer>,
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(rec) = self.rec.take() {
            lock(&self.state.log).push(rec);
        }
        if let Some(f) = self.on_answer.take() {
            f();
        }
    }
}

async fn sink(s: &Targeted, now: Instant, request: Request) -> Response {
    let ns = u64::try_from(now.saturating_duration_since(s.base).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    let _ = s
        .first_ns
        .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
    if s.note_keys.load(Ordering::Relaxed)
        && let Some(key) = request
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
    {
        lock(&s.arrivals).entry(key.to_string()).or_insert(now);
    }
    let _ = axum::body::to_bytes(request.into_body(), usize::MAX).await;
    StatusCode::OK.into_response()
}
