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
use crate::broker::{Broker, Topology};
use crate::config::Settings;
use crate::events::{Event, Events};
use crate::http::health::{self, Health};
use crate::ingress::{self, App};
use crate::metrics::Metrics;
use crate::retry::Policy;
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

impl System {
    /// Starts `parts`; they run until `stop` is cancelled (a signal, or
    /// [`System::shutdown`]).
    pub async fn start(
        settings: &Settings,
        parts: Parts,
        stop: CancellationToken,
    ) -> anyhow::Result<Self> {
        settings.amqp.warn_if_classic_on_a_cluster();
        let topology = Topology::new(
            &settings.amqp,
            &Policy::new(&settings.retry),
            settings.dedup.retention,
        );
        let events = Events::new(Metrics::new(settings.sources.keys().cloned()));
        let urls = &settings.amqp.urls;

        let ingress_part = matches!(parts, Parts::Up | Parts::Ingress);
        let worker_part = matches!(parts, Parts::Up | Parts::Worker);
        let ingress_listener = if ingress_part {
            Some(bind(settings.ingress.listen, "ingress.listen").await?)
        } else {
            None
        };
        let ops_listener = if parts == Parts::Worker {
            Some(bind(settings.worker.metrics_listen, "worker.metrics_listen").await?)
        } else {
            None
        };

        let mut brokers = Vec::new();
        let app = if ingress_part {
            let b = Broker::start(urls, "hookq-ingress", topology.clone(), events.clone());
            brokers.push(b.clone());
            Some(App::new(
                &settings.ingress,
                &settings.sources,
                b,
                events.clone(),
            )?)
        } else {
            None
        };
        let worker = if worker_part {
            let b = Broker::start(urls, "hookq-worker", topology.clone(), events.clone());
            brokers.push(b.clone());
            let config = worker::Config {
                worker: &settings.worker,
                retry: &settings.retry,
                dedup: &settings.dedup,
                sources: &settings.sources,
                amqp: &settings.amqp,
            };
            Some(Worker::new(config, b, events.clone())?)
        } else {
            None
        };

        let (a, w) = (app.clone(), worker.clone());
        let ready: health::Check = Arc::new(move || {
            a.as_ref().is_none_or(|a| a.is_ready()) && w.as_ref().is_none_or(|w| w.is_ready())
        });
        let health_router = health::router(Health {
            metrics: events.metrics().clone(),
            ready,
        });

        // The admin API, when a token is configured, on the ops listener:
        // the ingress's for `up` and `ingress`, the worker's for `worker`. Its
        // own connection, so that reading P.dead never competes with the
        // ingress's publishes or the worker's consumers.
        let admin = (settings.admin.token.is_some()).then(|| {
            let b = Broker::start(urls, "hookq-admin", topology.clone(), events.clone());
            Admin::new(&settings.admin, b, &events)
        });
        let admin = admin.flatten();
        let ops_router = match &admin {
            Some(a) => health_router.merge(admin::router(a.clone(), events.clone())),
            None => health_router,
        };

        let ingress_addr = ingress_listener.as_ref().and_then(|l| l.local_addr().ok());
        let ops_addr = ops_listener.as_ref().and_then(|l| l.local_addr().ok());
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
        if let (Some(l), Some(app)) = (ingress_listener, app.clone()) {
            let router = ingress::router(app).merge(ops_router.clone());
            servers.push(tokio::spawn(crate::http::serve(l, router, stop.clone())));
        }
        if let Some(l) = ops_listener {
            servers.push(tokio::spawn(crate::http::serve(
                l,
                ops_router,
                stop.clone(),
            )));
        }
        let w = worker.clone();
        let until = stop.clone();
        let mut parts_brokers = brokers.clone();
        if let Some(a) = &admin {
            parts_brokers.push(a.broker().clone());
        }
        let task = tokio::spawn(async move {
            let brokers = parts_brokers;
            let worker_result = match w {
                Some(w) => {
                    let stopper = w.clone();
                    let stop_worker = async move {
                        until.cancelled().await;
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
            // Last: nothing needs the broker any more.
            for b in &brokers {
                b.close().await;
            }
            worker_result.and(server_result)
        });
        Ok(Self {
            ingress_addr,
            ops_addr,
            events,
            worker,
            app,
            brokers,
            admin_broker: admin.as_ref().map(|a| a.broker().clone()),
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

    /// Connected to the broker and, for a worker, its store writable.
    pub fn is_ready(&self) -> bool {
        self.app.as_ref().is_none_or(|a| a.is_ready())
            && self.worker.as_ref().is_none_or(|w| w.is_ready())
    }

    /// Waits until every part is connected (false when `within` passed first).
    pub async fn ready(&self, within: std::time::Duration) -> bool {
        let all = async {
            for b in self.brokers.iter().chain(&self.admin_broker) {
                if !b.wait_ready(&self.stop).await {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(within, all).await.unwrap_or(false) && self.is_ready()
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        self.events.metrics()
    }

    pub fn worker(&self) -> Option<&Arc<Worker>> {
        self.worker.as_ref()
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
