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
    Delayed { tier: DelayTier },
    /// Published to `P.dead` (confirmed) and acked.
    Dead { reason: DeadReason },
    /// Given back to the broker (nack, or its channel is gone): it will be
    /// delivered again, to this worker or another.
    HandedBack,
}

impl Outcome {
    /// The `outcome` label of `hookq_worker_deliveries_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Delivered { .. } => "delivered",
            Self::Duplicate { .. } => "duplicate",
            Self::Delayed { .. } => "retried",
            Self::Dead { .. } => "dead",
            Self::HandedBack => "handed_back",
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

/// Subscribers that fall further behind than this lose events (and are told so).
const CAPACITY: usize = 1 << 16;

/// Where the parts report; cheap to clone, one per running system.
#[derive(Clone)]
pub struct Events {
    metrics: Arc<Metrics>,
    tx: broadcast::Sender<Event>,
}

impl Events {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        Self { metrics, tx }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    fn send(&self, event: impl FnOnce() -> Event) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(event());
        }
    }

    pub fn accepted(&self, env: &Envelope, publish: Duration) {
        self.metrics.accepted(&env.source, publish);
        self.send(|| Event::Accepted {
            source: env.source.clone(),
            key: env.key.clone(),
            message_id: env.message_id.clone(),
        });
    }

    pub fn refused(&self, source: &str, status: u16, code: &'static str) {
        self.metrics.refused(source, status, code);
        self.send(|| Event::Refused {
            source: source.to_string(),
            status,
            code,
        });
    }

    /// A request handler panicked (a bug); the client got a 500.
    pub fn panicked(&self) {
        self.metrics.ingress_panics.inc();
    }

    /// One delivery attempt to the target took `took`.
    pub fn attempted(&self, took: Duration) {
        self.metrics.delivery_seconds.observe(took.as_secs_f64());
    }

    pub fn settled(&self, env: &Envelope, outcome: Outcome) {
        self.metrics.settled(&env.source, &outcome);
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

    pub fn partition(&self, partition: u32, active: bool) {
        self.metrics.partition(partition, active);
        self.send(|| Event::Partition { partition, active });
    }

    pub fn disconnected(&self, connection: &str, node: &str) {
        self.metrics.disconnected(connection, node);
        self.send(|| Event::Disconnected {
            connection: connection.to_string(),
            node: node.to_string(),
        });
    }
}
