//! A running hookq: the long-running commands (`hookq up`, `hookq ingress`,
//! `hookq worker`) as one handle.
//!
//! [`System::start`] binds the listeners first (tests ask for port 0), opens a
//! broker connection per part and starts the parts; none needs the broker to
//! start (each connects in the background and answers /readyz 503 until it
//! has). The handle reports what happens as [`Event`]s and
//! [`System::shutdown`] stops and closes everything it opened: the HTTP
//! servers drain, the worker finishes or hands back what it holds, then the
//! broker connections close, last.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Admin};
use crate::broker::Broker;
use crate::config::Settings;
use crate::events::{Event, Events};
use crate::http::health::{self, Health};
use crate::ingress::{self, App};
use crate::worker::{self, Worker};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parts {
    Up,
    Ingress,
    Worker,
}

/// A started hookq: where it listens, what it reports, how to stop it.
pub struct System {
    /// /hooks (and, for `up`, the health and metrics routes).
    pub ingress_addr: Option<SocketAddr>,
    /// The worker's own /metrics, /healthz, /readyz (`hookq worker`).
    pub ops_addr: Option<SocketAddr>,
    events: Events,
    worker: Option<Arc<Worker>>,
    app: Option<Arc<App>>,
    /// One per part; ready when every one is connected.
    brokers: Vec<Broker>,
    /// The admin API's own connection, when it is on: part of [`System::ready`],
    /// not of /readyz (the ingress and the worker work without it).
    admin_broker: Option<Broker>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({key}): is another process using it?"))
}

/// The listeners a system's parts serve on, bound before anything starts
/// (tests ask for port 0 and read the address back).
struct Listeners {
    /// `/hooks` (and, for `up`, the ops routes).
    ingress: Option<TcpListener>,
    /// `hookq worker`'s own ops routes.
    ops: Option<TcpListener>,
}

impl Listeners {
    async fn bind(settings: &Settings, parts: Parts) -> anyhow::Result<Self> {
        let ingress = match parts {
            Parts::Up | Parts::Ingress => {
                Some(bind(settings.ingress.listen, "ingress.listen").await?)
            }
            Parts::Worker => None,
        };
        let ops = match parts {
            Parts::Worker => {
                Some(bind(settings.worker.metrics_listen, "worker.metrics_listen").await?)
            }
            _ => None,
        };
        Ok(Self { ingress, ops })
    }
}

/// The ingress, on a broker connection of its own.
fn start_ingress(settings: &Settings, events: &Events) -> anyhow::Result<(Arc<App>, Broker)> {
    let b = Broker::start(
        &settings.amqp.urls,
        "hookq-ingress",
        settings.topology(),
        events.clone(),
    );
    let app = App::new(
        &settings.ingress,
        &settings.sources,
        b.clone(),
        events.clone(),
    )?;
    Ok((app, b))
}

/// The worker, on a broker connection of its own.
fn start_worker(settings: &Settings, events: &Events) -> anyhow::Result<(Arc<Worker>, Broker)> {
    let b = Broker::start(
        &settings.amqp.urls,
        "hookq-worker",
        settings.topology(),
        events.clone(),
    );
    let config = worker::Config {
        worker: &settings.worker,
        retry: &settings.retry,
        dedup: &settings.dedup,
        sources: &settings.sources,
        amqp: &settings.amqp,
        targets: settings.resolved_targets(),
    };
    Ok((Worker::new(config, b.clone(), events.clone())?, b))
}

/// The admin API, when a token is configured, on a connection of its own:
/// reading P.dead never competes with the ingress's publishes or the
/// worker's consumers.
fn start_admin(settings: &Settings, events: &Events) -> Option<Arc<Admin>> {
    settings.admin.token.as_ref()?;
    let b = Broker::start(
        &settings.amqp.urls,
        "hookq-admin",
        settings.topology(),
        events.clone(),
    );
    Admin::new(&settings.admin, settings.resolved_targets(), b, events)
}

/// The health, metrics and admin routes: served on the ingress's listener
/// for `up` and `ingress`, on the worker's own for `worker`.
fn ops_router(
    app: Option<&Arc<App>>,
    worker: Option<&Arc<Worker>>,
    admin: Option<&Arc<Admin>>,
    events: &Events,
) -> axum::Router {
    let (a, w) = (app.cloned(), worker.cloned());
    let ready: health::Check = Arc::new(move || {
        a.as_ref().is_none_or(|a| a.is_ready()) && w.as_ref().is_none_or(|w| w.is_ready())
    });
    let health_router = health::router(Health {
        events: events.clone(),
        ready,
    });
    match admin {
        Some(a) => health_router.merge(admin::router(a.clone(), events.clone())),
        None => health_router,
    }
}

/// Runs the worker (if any) until `stop`, then waits for the HTTP servers to
/// drain, then closes the broker connections: last, as nothing needs them
/// any more.
async fn run_until_stopped(
    worker: Option<Arc<Worker>>,
    servers: Vec<JoinHandle<std::io::Result<()>>>,
    brokers: Vec<Broker>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let worker_result = match worker {
        Some(w) => {
            let stopper = w.clone();
            let stop_worker = async move {
                stop.cancelled().await;
                stopper.stop();
            };
            tokio::join!(w.run(), stop_worker).0
        }
        None => Ok(()),
    };
    let mut server_result = Ok(());
    for s in servers {
        let r = s
            .await
            .context("HTTP server task")
            .and_then(|r| r.context("HTTP server"));
        server_result = server_result.and(r);
    }
    for b in &brokers {
        b.close().await;
    }
    worker_result.and(server_result)
}

impl System {
    /// Starts `parts`; they run until `stop` is cancelled (a signal, or
    /// [`System::shutdown`]).
    pub async fn start(
        settings: &Settings,
        parts: Parts,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        settings.amqp.warn_if_classic_on_a_cluster();
        let events = Events::new(settings.sources.keys().cloned());
        let listeners = Listeners::bind(settings, parts).await?;
        let mut brokers = Vec::new();
        let app = match parts {
            Parts::Up | Parts::Ingress => {
                let (app, b) = start_ingress(settings, &events)?;
                brokers.push(b);
                Some(app)
            }
            Parts::Worker => None,
        };
        let worker = match parts {
            Parts::Up | Parts::Worker => {
                let (worker, b) = start_worker(settings, &events)?;
                brokers.push(b);
                Some(worker)
            }
            Parts::Ingress => None,
        };
        let admin = start_admin(settings, &events);
        let ops = ops_router(app.as_ref(), worker.as_ref(), admin.as_ref(), &events);

        let ingress_addr = listeners.ingress.as_ref().and_then(|l| l.local_addr().ok());
        let ops_addr = listeners.ops.as_ref().and_then(|l| l.local_addr().ok());
        if let Some(addr) = ingress_addr {
            tracing::info!(%addr, "ingress listening: POST /hooks/{{source}}");
        }
        if let Some(addr) = ops_addr {
            tracing::info!(%addr, "worker metrics listening: /metrics /healthz /readyz");
        }
        if let Some(addr) = ops_addr.or(ingress_addr)
            && admin.is_some()
        {
            tracing::info!(%addr, label = %settings.admin.label, "admin API and console on http://{addr}/admin/ (bearer token required for /admin/dlq/*)");
        }

        let mut servers = Vec::new();
        if let (Some(l), Some(app)) = (listeners.ingress, app.clone()) {
            let router = ingress::router(app).merge(ops.clone());
            servers.push(tokio::spawn(crate::http::serve(l, router, stop.clone())));
        }
        if let Some(l) = listeners.ops {
            servers.push(tokio::spawn(crate::http::serve(l, ops, stop.clone())));
        }
        let admin_broker = admin.as_ref().map(|a| a.broker().clone());
        let all_brokers = brokers
            .iter()
            .cloned()
            .chain(admin_broker.clone())
            .collect();
        let task = tokio::spawn(run_until_stopped(
            worker.clone(),
            servers,
            all_brokers,
            stop.clone(),
        ));
        Ok(Self {
            ingress_addr,
            ops_addr,
            events,
            worker,
            app,
            brokers,
            admin_broker,
            stop,
            task,
        })
    }

    /// Each part's broker connection and the node (`host:port`) it is
    /// connected to now, if it is.
    pub fn nodes(&self) -> Vec<(String, Option<String>)> {
        self.brokers
            .iter()
            .map(|b| (b.name().to_string(), b.node()))
            .collect()
    }

    /// Connected to the broker and, for a worker, its store writable and its
    /// peers heard.
    pub fn is_ready(&self) -> bool {
        self.app.as_ref().is_none_or(|a| a.is_ready())
            && self.worker.as_ref().is_none_or(|w| w.is_ready())
    }

    /// Waits until every part is connected and [`System::is_ready`] (false
    /// when `within` passed first).
    pub async fn ready(&self, within: std::time::Duration) -> bool {
        let all = async {
            for b in self.brokers.iter().chain(&self.admin_broker) {
                if !b.wait_ready(&self.stop).await {
                    return false;
                }
            }
            // The rest (a worker hearing its peers) is a matter of beats.
            let mut poll = tokio::time::interval(std::time::Duration::from_millis(10));
            while !self.is_ready() {
                if self.stop.is_cancelled() {
                    return false;
                }
                poll.tick().await;
            }
            true
        };
        tokio::time::timeout(within, all).await.unwrap_or(false)
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Its metrics, as /metrics serves them (Prometheus text).
    pub fn metrics_text(&self) -> String {
        self.events.render()
    }

    /// Stops taking work, finishes or hands back what is in flight, closes the
    /// broker connections; returns when all of it is done.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.wait().await
    }

    /// Runs until stopped (the token given to [`System::start`]).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("hookq stopped unexpectedly")?
    }
}
