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

/// What the supervisor remembers from one connection attempt to the next.
struct Attempts {
    /// The wait after the next round in which every node fails.
    backoff: Duration,
    /// The current outage was logged (as an error, once; later failures at debug).
    down_logged: bool,
    /// A session was up before: the next one is a reconnect.
    connected_once: bool,
    /// Nodes tried since the last success; a full round without one backs off.
    failed_in_round: usize,
}

impl Attempts {
    /// A held session was lost: its node moved to the back of the line, and
    /// the others are tried at once.
    fn lost(&mut self) {
        self.backoff = MIN_BACKOFF;
        self.failed_in_round = 0;
    }

    /// A node failed. The wait before the next attempt when that ended a round
    /// of `nodes` failures (jittered, and doubling up to [`MAX_BACKOFF`]);
    /// `None`: the next node, at once.
    fn failed(&mut self, nodes: usize) -> Option<Duration> {
        self.failed_in_round += 1;
        if self.failed_in_round < nodes {
            return None;
        }
        self.failed_in_round = 0;
        let jittered = self.backoff.mul_f64(0.8 + 0.4 * rand::random::<f64>());
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Some(jittered)
    }
}

/// How holding a session ended.
enum Held {
    /// It died; it is no longer the current session.
    Lost,
    /// The handle was closed, and the session with it.
    Closed,
}

/// How one connection attempt ended.
enum Attempt {
    /// A session is up and is the current one.
    Connected,
    /// The node could not be reached; the next one is in line.
    Failed,
    /// The handle was closed, or there is no node to connect to.
    Stopped,
}

impl Broker {
    pub(super) async fn supervise(self) {
        let inner = &self.inner;
        let mut attempts = Attempts {
            backoff: MIN_BACKOFF,
            down_logged: false,
            connected_once: inner.state.borrow().is_some(),
            failed_in_round: 0,
        };
        loop {
            // Hold the current session until it dies or the handle is closed.
            let current = inner.state.borrow().clone();
            if let Some(s) = current {
                match self.hold(&s).await {
                    Held::Closed => return,
                    Held::Lost => attempts.lost(),
                }
            }
            if inner.stop.is_cancelled() {
                return;
            }
            match self.connect_next(&mut attempts).await {
                Attempt::Connected => continue,
                Attempt::Stopped => return,
                Attempt::Failed => {}
            }
            let Some(wait) = attempts.failed(inner.nodes.len().max(1)) else {
                continue; // the next node, at once
            };
            tokio::select! {
                _ = inner.stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Keeps `s` as the current session while it is healthy, checking when
    /// kicked and every [`HEALTH_EVERY`]. When it dies: one log line and event,
    /// and its node goes to the back of the line. When the handle is closed:
    /// closes the connection.
    async fn hold(&self, s: &Session) -> Held {
        let inner = &self.inner;
        while s.healthy() {
            tokio::select! {
                _ = inner.stop.cancelled() => {
                    inner.state.send_replace(None);
                    let _ = s.connection.close(200, "shutdown".into()).await;
                    return Held::Closed;
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
        Held::Lost
    }

    /// Connects to the node next in line and makes the session the current
    /// one; on failure, logs (once per outage) and moves the line on.
    async fn connect_next(&self, attempts: &mut Attempts) -> Attempt {
        let inner = &self.inner;
        let n = inner.nodes.len().max(1);
        let i = inner.next_node.load(Ordering::Relaxed) % n;
        let Some(url) = inner.nodes.get(i) else {
            return Attempt::Stopped;
        };
        // A broker that accepts TCP but never answers must not hang us.
        let attempt = tokio::select! {
            _ = inner.stop.cancelled() => return Attempt::Stopped,
            r = tokio::time::timeout(CONNECT_TIMEOUT, establish(url, &inner.name, &inner.topology)) => {
                r.unwrap_or(Err(Error::ConnectTimeout(CONNECT_TIMEOUT)))
            }
        };
        match attempt {
            Ok(s) => {
                tracing::info!(connection = %inner.name, node = %s.node, reconnect = attempts.connected_once, "connected to RabbitMQ, topology declared");
                if let Some(events) = &inner.events {
                    events.connected(&inner.name, &s.node, attempts.connected_once);
                }
                attempts.connected_once = true;
                attempts.down_logged = false;
                inner.state.send_replace(Some(Arc::new(s)));
                Attempt::Connected
            }
            Err(e) => {
                if !attempts.down_logged {
                    tracing::error!(connection = %inner.name, node = %url.node(), "{e}; retrying in the background");
                    attempts.down_logged = true;
                } else {
                    tracing::debug!(node = %url.node(), "still cannot connect: {e}");
                }
                inner.next_node.fetch_add(1, Ordering::Relaxed);
                Attempt::Failed
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn attempts() -> Attempts {
        Attempts {
            backoff: MIN_BACKOFF,
            down_logged: false,
            connected_once: false,
            failed_in_round: 0,
        }
    }

    /// Within 0.8..=1.2 of `d`, the jitter's range.
    fn near(wait: Option<Duration>, d: Duration) -> bool {
        wait.is_some_and(|w| w >= d.mul_f64(0.8) && w <= d.mul_f64(1.2))
    }

    #[test]
    fn only_a_round_of_failed_nodes_waits_and_each_round_waits_longer_up_to_the_cap() {
        let mut a = attempts();
        assert_eq!(a.failed(3), None);
        assert_eq!(a.failed(3), None);
        assert!(near(a.failed(3), MIN_BACKOFF));
        assert_eq!(a.failed(3), None);
        assert_eq!(a.failed(3), None);
        assert!(near(a.failed(3), MIN_BACKOFF * 2));
        for _ in 0..10 {
            a.failed(1);
        }
        assert!(near(a.failed(1), MAX_BACKOFF));
    }

    #[test]
    fn a_lost_session_starts_a_new_round_from_the_shortest_wait() {
        let mut a = attempts();
        for _ in 0..5 {
            a.failed(2);
        }
        a.lost();
        assert_eq!(a.failed(2), None);
        assert!(near(a.failed(2), MIN_BACKOFF));
    }
}
