//! /healthz, /readyz and /metrics, for the ingress and the worker alike.
//!
//! Readiness is a closure so that each process says what it needs: the ingress
//! a broker connection, the worker also a writable dedup store, `hookq up` both.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::events::Events;

pub type Check = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
pub struct Health {
    /// Whose metrics /metrics serves.
    pub events: Events,
    pub ready: Check,
}

pub fn router(ops: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ops)
}

async fn readyz(State(ops): State<Health>) -> Response {
    if (ops.ready)() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(ops): State<Health>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ops.events.render(),
    )
        .into_response()
}
