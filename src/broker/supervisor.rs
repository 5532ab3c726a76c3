//! The supervisor behind a [`Broker`] handle: it owns the AMQP connection,
//! connects with backoff and jitter, moves to the next node when a node cannot
//! be reached or its connection is lost, declares the topology on every
//! connect, and closes the connection when the handle is closed.
//!
//! One log line per state change (connected to a node, lost it, cannot reach
//! any), not one per attempt; each change is also an event (metrics show the
//! node in use).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::session::{Session, establish};
use super::{Broker, CONNECT_TIMEOUT, Error};

/// The first wait after every node failed; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a held session is checked when nothing kicks the supervisor.
const HEALTH_EVERY: Duration = Duration::from_millis(250);

impl Broker {
    pub(super) async fn supervise(self) {
        let inner = &self.inner;
        let mut backoff = MIN_BACKOFF;
        let mut down_logged = false;
        let mut connected_once = inner.state.borrow().is_some();
        // Nodes tried since the last success; a full round without one backs off.
        let mut failed_in_round = 0usize;
        loop {
            // Hold the current session until it dies or the handle is closed.
            let current = inner.state.borrow().clone();
            if let Some(s) = current {
                while s.healthy() {
                    tokio::select! {
                        _ = inner.stop.cancelled() => {
                            inner.state.send_replace(None);
                            let _ = s.connection.close(200, "shutdown".into()).await;
                            return;
                        }
                        _ = inner.kick.notified() => {}
                        _ = tokio::time::sleep(HEALTH_EVERY) => {}
                    }
                }
                inner.state.send_replace(None);
                tracing::warn!(connection = %inner.name, node = %s.node, "lost the RabbitMQ connection; reconnecting");
                if let Some(events) = &inner.events {
                    events.disconnected(&inner.name, &s.node);
                }
                let _ = s.connection.close(200, "replacing".into()).await;
                // The node that failed goes to the back of the line.
                inner.next_node.fetch_add(1, Ordering::Relaxed);
                backoff = MIN_BACKOFF;
                failed_in_round = 0;
            }
            if inner.stop.is_cancelled() {
                return;
            }
            let n = inner.nodes.len().max(1);
            let i = inner.next_node.load(Ordering::Relaxed) % n;
            let Some(url) = inner.nodes.get(i) else {
                return;
            };
            // A broker that accepts TCP but never answers must not hang us.
            let attempt = tokio::select! {
                _ = inner.stop.cancelled() => return,
                r = tokio::time::timeout(CONNECT_TIMEOUT, establish(url, &inner.name, &inner.topology)) => {
                    r.unwrap_or(Err(Error::ConnectTimeout(CONNECT_TIMEOUT)))
                }
            };
            match attempt {
                Ok(s) => {
                    tracing::info!(connection = %inner.name, node = %s.node, reconnect = connected_once, "connected to RabbitMQ, topology declared");
                    if let Some(events) = &inner.events {
                        events.connected(&inner.name, &s.node, connected_once);
                    }
                    connected_once = true;
                    down_logged = false;
                    inner.state.send_replace(Some(Arc::new(s)));
                    continue;
                }
                Err(e) => {
                    if !down_logged {
                        tracing::error!(connection = %inner.name, node = %url.node(), "{e}; retrying in the background");
                        down_logged = true;
                    } else {
                        tracing::debug!(node = %url.node(), "still cannot connect: {e}");
                    }
                    inner.next_node.fetch_add(1, Ordering::Relaxed);
                    failed_in_round += 1;
                }
            }
            if failed_in_round < n {
                continue; // the next node, at once
            }
            failed_in_round = 0;
            let jittered = backoff.mul_f64(0.8 + 0.4 * rand::random::<f64>());
            tokio::select! {
                _ = inner.stop.cancelled() => return,
                _ = tokio::time::sleep(jittered) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Tries each node once, in order from `first`, for a one-shot command.
pub(super) async fn first_reachable(
    nodes: &[crate::config::AmqpUrl],
    first: usize,
    name: &str,
    topology: &super::Topology,
) -> Result<(Session, usize), Error> {
    let n = nodes.len().max(1);
    let mut last = Error::Unavailable;
    for k in 0..n {
        let i = (first + k) % n;
        let Some(url) = nodes.get(i) else { break };
        match tokio::time::timeout(CONNECT_TIMEOUT, establish(url, name, topology)).await {
            Ok(Ok(s)) => return Ok((s, i)),
            Ok(Err(e)) => last = e,
            Err(_) => last = Error::ConnectTimeout(CONNECT_TIMEOUT),
        }
    }
    Err(last)
}
