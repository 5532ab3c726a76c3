//! The long-running commands: `hookq ingress`, `hookq worker` and `hookq up`
//! (both in one process, one shutdown signal).
//!
//! [`start`] binds the listeners first and returns their addresses, so that
//! tests can ask for port 0; the parts then run until the token is cancelled.
//! None of them needs the broker to start: each connects in the background and
//! answers /readyz 503 until it has.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Topology};
use crate::config::Settings;
use crate::ingress::{self, App};
use crate::metrics::Metrics;
use crate::ops::{self, Ops};
use crate::worker::Worker;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parts {
    Up,
    Ingress,
    Worker,
}

/// A started process: where it listens, and the task that ends after shutdown.
pub struct Running {
    /// /hooks (and, for `up`, the ops routes).
    pub ingress_addr: Option<SocketAddr>,
    /// The worker's own /metrics, /healthz, /readyz (`hookq worker`).
    pub ops_addr: Option<SocketAddr>,
    pub worker: Option<Arc<Worker>>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({key}): is another process using it?"))
}

pub async fn start(
    settings: &Settings,
    parts: Parts,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    let topology = Topology::new(&settings.amqp, &settings.retry);
    let metrics = Metrics::new(settings.sources.keys().cloned());
    let url = &settings.amqp.url;

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

    // The broker connections outlive the stop signal: in-flight publishes, acks
    // and republishes still need them. They close once every part has finished.
    let connections = CancellationToken::new();
    let app = if ingress_part {
        let b = Broker::start(url, "hookq-ingress", topology.clone(), connections.clone());
        Some(App::new(settings, b, metrics.clone())?)
    } else {
        None
    };
    let worker = if worker_part {
        let b = Broker::start(url, "hookq-worker", topology.clone(), connections.clone());
        Some(Worker::new(settings, b, metrics.clone(), shutdown.clone())?)
    } else {
        None
    };

    let (a, w) = (app.clone(), worker.clone());
    let ready: ops::Check = Arc::new(move || {
        a.as_ref().is_none_or(|a| a.is_ready()) && w.as_ref().is_none_or(|w| w.is_ready())
    });
    let (a, w) = (app.clone(), worker.clone());
    let refresh: ops::Refresh = Arc::new(move |m: &Metrics| {
        let reconnects =
            a.as_ref().map_or(0, |a| a.reconnects()) + w.as_ref().map_or(0, |w| w.reconnects());
        m.reconnects
            .set(i64::try_from(reconnects).unwrap_or(i64::MAX));
        if let Some(w) = &w {
            let commits = w
                .dedup()
                .store()
                .stats
                .commits
                .load(std::sync::atomic::Ordering::Relaxed);
            m.dedup_commits
                .set(i64::try_from(commits).unwrap_or(i64::MAX));
        }
    });
    let ops_router = ops::router(Ops {
        metrics: metrics.clone(),
        ready,
        refresh,
    });

    let ingress_addr = ingress_listener.as_ref().and_then(|l| l.local_addr().ok());
    let ops_addr = ops_listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(addr) = ingress_addr {
        tracing::info!(%addr, "ingress listening: POST /hooks/{{source}}");
    }
    if let Some(addr) = ops_addr {
        tracing::info!(%addr, "worker metrics listening: /metrics /healthz /readyz");
    }

    let worker_for_task = worker.clone();
    let task = tokio::spawn(async move {
        let mut servers = Vec::new();
        if let (Some(l), Some(app)) = (ingress_listener, app) {
            let router = ingress::router(app).merge(ops_router.clone());
            servers.push(tokio::spawn(crate::http_server::serve(
                l,
                router,
                shutdown.clone(),
            )));
        }
        if let Some(l) = ops_listener {
            servers.push(tokio::spawn(crate::http_server::serve(
                l,
                ops_router,
                shutdown.clone(),
            )));
        }
        let worker_run = async {
            match worker_for_task {
                Some(w) => w.run().await,
                None => Ok(()),
            }
        };
        let worker_result = worker_run.await;
        for s in servers {
            s.await
                .context("HTTP server task")?
                .context("HTTP server")?;
        }
        worker_result
    });
    Ok(Running {
        ingress_addr,
        ops_addr,
        worker,
        task,
    })
}
