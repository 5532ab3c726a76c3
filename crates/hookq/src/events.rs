//! What happened, as typed events: each request the ingress answered, each
//! attempt and settlement of a message, each broker connection change.
//!
//! The parts report through [`Events`]; it updates the Prometheus metrics at
//! once (they never miss an event) and hands a copy to whoever subscribed:
//! tests, `simulate` and `bench` wait on these instead of polling the parts'
//! state. Nothing is built for subscribers when there are none, so the hot path
//! pays for metrics only.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::dedup::Tier as DedupTier;
use crate::message::{DeadReason, DedupKey, Envelope, MessageId};
use crate::metrics::Metrics;
use crate::retry::DelayTier;

/// How a message left this worker's hands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The target answered 2xx on attempt `attempt` (1-based); recorded and acked.
    Delivered { attempt: u32 },
    /// The key was already delivered or is held by another message; acked.
    Duplicate { tier: DedupTier },
    /// Republished to a delay tier (confirmed) and acked.
    Retried { tier: DelayTier },
    /// Published to `P.dead` (confirmed) and acked.
    Dead { reason: DeadReason },
    /// Given back to the broker (nack, or its channel is gone): it will be
    /// delivered again, to this worker or another.
    HandedBack,
    /// Moved to its target's hold queue (confirmed) and acked: the target is
    /// paused, its breaker open, or it has no room; no attempt spent.
    Held,
}

impl Outcome {
    /// The `outcome` label of `hookq_worker_deliveries_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Delivered { .. } => "delivered",
            Self::Duplicate { .. } => "duplicate",
            Self::Retried { .. } => "retried",
            Self::Dead { .. } => "dead",
            Self::HandedBack => "handed_back",
            Self::Held => "held",
        }
    }
}

/// One event; subscribers get a copy of each.
#[derive(Clone, Debug)]
pub enum Event {
    /// The ingress answered 202: the broker confirmed the message.
    Accepted {
        source: String,
        key: DedupKey,
        message_id: MessageId,
    },
    /// The ingress refused a request.
    Refused {
        source: String,
        status: u16,
        code: &'static str,
    },
    /// A message was settled by a worker.
    Settled {
        source: String,
        key: DedupKey,
        message_id: MessageId,
        outcome: Outcome,
    },
    /// A broker connection was established (`reconnect`: not the first one).
    Connected {
        connection: String,
        node: String,
        reconnect: bool,
    },
    /// A broker connection was lost.
    Disconnected { connection: String, node: String },
    /// This worker became the active consumer of a partition (its done-log
    /// read), or stopped being it.
    Partition { partition: u32, active: bool },
}

/// A target's state as operators see it (metric, logs, `hookq target list`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetState {
    Closed,
    Open,
    HalfOpen,
    Paused,
}

impl TargetState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
            Self::Paused => "paused",
        }
    }

    /// The value of `hookq_target_state`.
    pub fn code(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
            Self::Paused => 3,
        }
    }
}

/// A target's request counters by outcome.
#[derive(Clone, Debug)]
pub struct TargetRequests {
    pub success: prometheus_client::metrics::counter::Counter,
    pub rejected: prometheus_client::metrics::counter::Counter,
    pub back_pressure: prometheus_client::metrics::counter::Counter,
    pub failed: prometheus_client::metrics::counter::Counter,
}

/// Subscribers that fall further behind than this lose events (and are told so).
const CAPACITY: usize = 1 << 16;

/// Where the parts report; cheap to clone, one per running system.
#[derive(Clone)]
pub struct Events {
    metrics: Arc<Metrics>,
    tx: broadcast::Sender<Event>,
}

impl Events {
    /// A process's events and its metrics; `known_sources` are the source
    /// names that label metrics as themselves (any other is `_other`).
    pub fn new(known_sources: impl IntoIterator<Item = String>) -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        Self {
            metrics: Arc::new(Metrics::new(known_sources)),
            tx,
        }
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// The metrics, as Prometheus text (for /metrics).
    pub fn render(&self) -> String {
        self.metrics.render()
    }

    fn send(&self, event: impl FnOnce() -> Event) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(event());
        }
    }

    pub fn accepted(&self, env: &Envelope, publish: Duration) {
        self.metrics.accepted(&env.source, publish);
        tracing::debug!(message_id = %env.message_id, key = %env.key, source = %env.source, "accepted");
        self.send(|| Event::Accepted {
            source: env.source.clone(),
            key: env.key.clone(),
            message_id: env.message_id.clone(),
        });
    }

    /// The ingress refused a request: `code` is its JSON error code, `why`
    /// its message. Our own trouble (the broker, load, a bug) is a warning,
    /// a bad signature is noted, a client's other mistakes are debug.
    pub fn refused(&self, source: &str, status: u16, code: &'static str, why: &str) {
        self.metrics.answered(source, status, code);
        match status {
            500.. => tracing::warn!(source, code, "refused: {why}"),
            401 => tracing::info!(source, code, "refused: {why}"),
            _ => tracing::debug!(source, code, "refused: {why}"),
        }
        self.send(|| Event::Refused {
            source: source.to_string(),
            status,
            code,
        });
    }

    /// A request handler panicked (a bug); the client got a 500.
    pub fn panicked(&self, what: &str) {
        self.metrics.panicked();
        tracing::error!(panic = %what, "a request handler panicked; answering 500 (this is a bug, please report it)");
    }

    /// One delivery attempt to the target took `took`.
    pub fn attempted(&self, took: Duration) {
        self.metrics.attempted(took);
    }

    /// `n` messages are being processed now.
    pub fn in_flight(&self, n: usize) {
        self.metrics.set_in_flight(n);
    }

    /// The dedup store committed a transaction.
    pub fn store_committed(&self) {
        self.metrics.committed();
    }

    /// A message reached its outcome (`env` as it left: attempts, dead-letter
    /// details). Dead letters and later tries are logged; the rest at debug.
    pub fn settled(&self, env: &Envelope, outcome: Outcome) {
        let tier = match &outcome {
            Outcome::Duplicate { tier } => Some(tier.as_str()),
            _ => None,
        };
        self.metrics.settled(&env.source, outcome.label(), tier);
        match &outcome {
            Outcome::Delivered { attempt } => tracing::debug!(attempt, "delivered"),
            Outcome::Duplicate { tier } => tracing::debug!(tier = tier.as_str(), "duplicate"),
            // The decision to try later is logged where it is made, with why.
            Outcome::Retried { tier } => tracing::debug!(tier = ?tier.0, "in a delay tier"),
            Outcome::Dead { reason } => {
                let error = env.dead.as_ref().map_or("", |d| d.last_error.as_str());
                tracing::warn!(attempts = env.attempts, %reason, error, "dead-lettered")
            }
            Outcome::HandedBack => tracing::debug!("handed back to the broker"),
            Outcome::Held => tracing::debug!("held for its target"),
        }
        self.send(|| Event::Settled {
            source: env.source.clone(),
            key: env.key.clone(),
            message_id: env.message_id.clone(),
            outcome,
        });
    }

    pub fn connected(&self, connection: &str, node: &str, reconnect: bool) {
        self.metrics.connected(connection, node, reconnect);
        self.send(|| Event::Connected {
            connection: connection.to_string(),
            node: node.to_string(),
            reconnect,
        });
    }

    pub fn disconnected(&self, connection: &str, node: &str) {
        self.metrics.disconnected(connection, node);
        self.send(|| Event::Disconnected {
            connection: connection.to_string(),
            node: node.to_string(),
        });
    }

    /// This worker read partition `partition`'s done-log (`applied` keys new
    /// to it, in `took`) and delivers from it; `first`: since it subscribed.
    pub fn partition_read(&self, partition: u32, applied: u64, took: Duration, first: bool) {
        self.metrics.partition(partition, true);
        if first || applied > 0 {
            tracing::info!(
                partition,
                applied,
                ?took,
                "active on this partition: its done-log is read, delivering"
            );
        } else {
            tracing::debug!(partition, ?took, "the done-log has nothing new");
        }
        self.send(|| Event::Partition {
            partition,
            active: true,
        });
    }

    /// This worker stopped consuming partition `partition`.
    pub fn partition_left(&self, partition: u32) {
        self.metrics.partition(partition, false);
        self.send(|| Event::Partition {
            partition,
            active: false,
        });
    }

    /// Counters of a target's requests by outcome, kept by its gate.
    pub fn target_requests(&self, target: &str) -> TargetRequests {
        let c = |o| self.metrics.target_requests(target, o);
        TargetRequests {
            success: c("success"),
            rejected: c("rejected"),
            back_pressure: c("back_pressure"),
            failed: c("failed"),
        }
    }

    /// A target changed state, here (`by` names the worker that changed it
    /// when it was another), for `why`.
    pub fn target_state(&self, target: &str, state: TargetState, by: Option<u64>, why: &str) {
        self.metrics.target_state(target, state.code());
        let state = state.as_str();
        match by {
            None => tracing::info!(target_name = target, state, "target {state}: {why}"),
            Some(by) => tracing::info!(
                target_name = target,
                state,
                by = format_args!("{by:016x}"),
                "target {state} by another worker: {why}"
            ),
        }
    }

    /// A target's gauges: in flight from this worker, its limit, held on the broker.
    pub fn target_sample(&self, target: &str, in_flight: usize, limit: usize, held: u32) {
        self.metrics.target_sample(target, in_flight, limit, held);
    }

    /// One answer of the admin API.
    pub fn admin_answered(&self, route: &'static str, status: u16) {
        self.metrics.admin_request(route, status);
    }
}
