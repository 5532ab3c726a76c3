//! The benchmark's delivery target: answers 200 at once and notes when each
//! key first arrived.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use tokio_util::sync::CancellationToken;

use crate::config::TargetUrl;
use crate::harness::serve_local;

struct SinkState {
    arrivals: Mutex<HashMap<String, Instant>>,
    count: AtomicU32,
}

pub(super) struct Sink {
    pub url: TargetUrl,
    state: Arc<SinkState>,
}

async fn sink(State(s): State<Arc<SinkState>>, headers: HeaderMap, _body: axum::body::Bytes) {
    let now = Instant::now();
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        s.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_insert(now);
    }
    s.count.fetch_add(1, Ordering::Relaxed);
}

impl Sink {
    pub async fn start(stop: CancellationToken) -> anyhow::Result<Self> {
        let state = Arc::new(SinkState {
            arrivals: Mutex::new(HashMap::new()),
            count: AtomicU32::new(0),
        });
        let router = axum::Router::new().fallback(sink).with_state(state.clone());
        let addr = serve_local(router, stop).await?;
        Ok(Self {
            url: TargetUrl::parse(&format!("http://{addr}/webhooks"))
                .map_err(anyhow::Error::msg)?,
            state,
        })
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
