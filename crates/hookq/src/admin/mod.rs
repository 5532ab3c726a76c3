//! The admin API and the dead-letter console (issue 15): dead letters over
//! HTTP and in a browser, on the ops listener (`ingress.listen` for `hookq up`
//! and `hookq ingress`, `worker.metrics_listen` for `hookq worker`).
//!
//! Off unless `[admin]` configures a token; then every `/admin/dlq/*` request
//! must carry `Authorization: Bearer TOKEN` ([`auth`]), checked before
//! anything is read from the broker. The console's page and assets
//! ([`console`]) are served without the token: it only protects the API calls
//! the page makes. Reading ([`api`]) goes through the one reader of `P.dead`
//! that `hookq dlq` uses, which holds and hands back, and moving
//! ([`reprocess`]) is `hookq shovel` itself: publish with confirm, then ack.
//!
//! Reads and moves take turns ([`Admin::reading`]): two readers of one queue
//! at once would each see only what the other does not hold, and count short.

mod api;
mod auth;
mod console;
mod error;
mod reprocess;
mod targets;
mod view;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::broker::Broker;
use crate::config::{AdminSettings, Secret, Target};
use crate::events::Events;

pub use error::ApiError;

/// The admin API's state: who may call it, the broker it reads, the one
/// reprocess run.
pub struct Admin {
    token: Secret,
    /// Who holds the token, in every log line of what an operator does.
    label: String,
    broker: Broker,
    events: Events,
    /// Held by each read of `P.dead` and by a reprocess run, so that they take turns.
    reading: Arc<tokio::sync::Mutex<()>>,
    job: Arc<std::sync::Mutex<reprocess::Job>>,
    /// Every target of the configuration, by name.
    targets: std::collections::BTreeMap<String, Target>,
    /// The workers' beats, heard from the first question about targets on.
    watch: tokio::sync::OnceCell<crate::targets::Watch>,
}

impl Admin {
    /// The admin API for `settings`, or `None` when no token is configured
    /// (admin off: `/admin/*` is not routed, so it answers 404).
    pub fn new(
        settings: &AdminSettings,
        targets: std::collections::BTreeMap<String, Target>,
        broker: Broker,
        events: &Events,
    ) -> Option<Arc<Self>> {
        let token = settings.token.clone()?;
        Some(Arc::new(Self {
            token,
            label: settings.label.clone(),
            broker,
            events: events.clone(),
            reading: Arc::new(tokio::sync::Mutex::new(())),
            job: Arc::new(std::sync::Mutex::new(reprocess::Job::default())),
            targets,
            watch: tokio::sync::OnceCell::new(),
        }))
    }

    /// The listener on the workers' beats; the first call starts it and
    /// waits until it has heard two beats' worth.
    async fn watch(&self) -> &crate::targets::Watch {
        self.watch
            .get_or_init(|| async {
                let w = crate::targets::Watch::start(self.broker.clone());
                w.settled().await;
                w
            })
            .await
    }

    /// The broker connection the admin API uses (closed by the system, last).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }
}

/// The routes: the API behind the token, the console without it, both with
/// the security headers.
pub fn router(admin: Arc<Admin>, events: Events) -> Router {
    let api = Router::new()
        .route(api::STATS, get(api::stats))
        .route(api::PENDING, get(api::pending))
        .route(
            api::REPROCESS,
            get(reprocess::status).post(reprocess::start),
        )
        .route(api::DETAIL, get(api::detail))
        .route(targets::LIST, get(targets::list))
        .route(targets::PAUSE, post(targets::pause))
        .route(targets::RESUME, post(targets::resume))
        .route_layer(axum::middleware::from_fn_with_state(
            admin.clone(),
            auth::check,
        ))
        .with_state(admin);
    api.merge(console::router())
        .layer(axum::middleware::map_response(console::security_headers))
        .layer(crate::ingress::catch_panics(events))
}
