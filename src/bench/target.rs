//! The benchmark's delivery target: answers 200 at once and notes when each
//! key first arrived.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use tokio_util::sync::CancellationToken;

use crate::config::TargetUrl;
use crate::harness::serve_local;

struct SinkState {
    /// The first arrival of each key, while `keys` is on.
    arrivals: Mutex<HashMap<String, Instant>>,
    /// Off while a throughput is measured: the hand-written forwarder sends
    /// no key, so noting hookq's would charge hookq for the bench's own
    /// bookkeeping (a lock, a copy of the key, a growing map).
    keys: AtomicBool,
    /// When the first request since the last [`Sink::mark`] came, in
    /// nanoseconds after `base` (0: none yet).
    first_ns: AtomicU64,
    base: Instant,
}

pub(super) struct Sink {
    pub url: TargetUrl,
    state: Arc<SinkState>,
}

/// What a minimal target does: read the request, answer 200. The headers are
/// looked at in place, not copied out.
async fn sink(State(s): State<Arc<SinkState>>, request: Request) {
    let now = Instant::now();
    let ns = u64::try_from(now.saturating_duration_since(s.base).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1);
    let _ = s
        .first_ns
        .compare_exchange(0, ns, Ordering::Relaxed, Ordering::Relaxed);
    if s.keys.load(Ordering::Relaxed)
        && let Some(key) = request
            .headers()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
    {
        s.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_insert(now);
    }
    // Read the body to its end, so the connection is kept alive.
    let _ = axum::body::to_bytes(request.into_body(), usize::MAX).await;
}

impl Sink {
    pub async fn start(stop: CancellationToken) -> anyhow::Result<Self> {
        let state = Arc::new(SinkState {
            arrivals: Mutex::new(HashMap::new()),
            keys: AtomicBool::new(true),
            first_ns: AtomicU64::new(0),
            base: Instant::now(),
        });
        let router = axum::Router::new().fallback(sink).with_state(state.clone());
        let addr = serve_local(router, stop).await?;
        Ok(Self {
            url: TargetUrl::parse(&format!("http://{addr}/webhooks"))
                .map_err(anyhow::Error::msg)?,
            state,
        })
    }

    /// Whether each key's first arrival is noted (see [`SinkState::keys`]).
    pub fn note_keys(&self, on: bool) {
        self.state.keys.store(on, Ordering::Relaxed);
    }

    /// Starts a new window for [`Sink::first_since_mark`].
    pub fn mark(&self) {
        self.state.first_ns.store(0, Ordering::Relaxed);
    }

    /// When the first request since the last [`Sink::mark`] arrived.
    pub fn first_since_mark(&self) -> Option<Instant> {
        match self.state.first_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.state.base + Duration::from_nanos(ns)),
        }
    }

    pub fn arrival(&self, key: &str) -> Option<Instant> {
        self.state
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }
}
