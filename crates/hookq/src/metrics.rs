//! Prometheus metrics for the ingress and the worker, served as text on /metrics.
//!
//! One [`Metrics`] per process (`hookq up` shares it between both parts), so a
//! scrape sees everything the process does. It is private to
//! [`crate::events`]: the parts report events, and each event records its
//! metrics here; nothing reads a metric back as program state.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub source: String,
    pub status: u16,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub source: String,
    /// delivered, duplicate, retried, dead, handed_back
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// hookq-ingress, hookq-worker, ...
    pub connection: String,
    /// host:port of the broker node.
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdminLabels {
    /// The route's pattern (`/admin/dlq/{id}`), never the path a client sent.
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetOutcomeLabels {
    pub target: String,
    /// success, rejected, back_pressure, failed
    pub outcome: &'static str,
}

/// The `source` label of every source not named in the configuration.
pub const OTHER_SOURCE: &str = "_other";

fn latency() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub(crate) struct Metrics {
    registry: Registry,
    /// Sources named in the configuration. Any other name (unknown sources,
    /// when allowed, come from the internet) is labelled `_other`, so that no
    /// client can grow the metric families without bound.
    known_sources: std::collections::HashSet<String>,
    requests: Family<RequestLabels, Counter>,
    /// Requests whose handler panicked (answered 500 by the catch layer).
    ingress_panics: Counter,
    publish_seconds: Histogram,
    deliveries: Family<DeliveryLabels, Counter>,
    delivery_seconds: Histogram,
    dedup_hits: Family<TierLabels, Counter>,
    in_flight: Gauge,
    reconnects: Counter,
    /// 1 for each (connection, node) in use now.
    connected: Family<ConnectionLabels, Gauge>,
    /// Counted by the dedup store's thread.
    dedup_commits: Counter,
    /// 1 for each partition this worker is the active consumer of.
    partitions: Family<PartitionLabels, Gauge>,
    admin_requests: Family<AdminLabels, Counter>,
    target_state: Family<TargetLabels, Gauge>,
    target_in_flight: Family<TargetLabels, Gauge>,
    target_limit: Family<TargetLabels, Gauge>,
    target_requests: Family<TargetOutcomeLabels, Counter>,
    target_held: Family<TargetLabels, Gauge>,
}

impl Metrics {
    // Over 80 lines on purpose: one registration per metric, in the order
    // /metrics lists them, reads best as one list.
    pub(crate) fn new(known_sources: impl IntoIterator<Item = String>) -> Self {
        let mut registry = Registry::with_prefix("hookq");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "ingress_requests",
            "Requests to /hooks/{source} by source, status and error code",
            requests.clone(),
        );
        let ingress_panics = Counter::default();
        registry.register(
            "ingress_panics",
            "Requests whose handler panicked; each is a bug, answered 500 and logged",
            ingress_panics.clone(),
        );
        let publish_seconds = latency();
        registry.register(
            "ingress_publish_seconds",
            "Time from publish to the broker's confirm",
            publish_seconds.clone(),
        );
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "worker_deliveries",
            "Messages settled by source and outcome (delivered, duplicate, retried, dead, handed_back)",
            deliveries.clone(),
        );
        let delivery_seconds = latency();
        registry.register(
            "worker_delivery_seconds",
            "Time of one delivery attempt to the target",
            delivery_seconds.clone(),
        );
        let dedup_hits = Family::<TierLabels, Counter>::default();
        registry.register(
            "worker_dedup_hits",
            "Duplicates recognised, by tier (lru, sqlite)",
            dedup_hits.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "worker_in_flight",
            "Messages being processed now",
            in_flight.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Broker connections re-established after a loss",
            reconnects.clone(),
        );
        let connected = Family::<ConnectionLabels, Gauge>::default();
        registry.register(
            "broker_connected",
            "1 for each broker connection and the node it is connected to",
            connected.clone(),
        );
        let partitions = Family::<PartitionLabels, Gauge>::default();
        registry.register(
            "worker_partition_active",
            "1 for each partition this worker delivers from (the active consumer), 0 once it stopped",
            partitions.clone(),
        );
        let dedup_commits = Counter::default();
        registry.register(
            "dedup_commits",
            "SQLite transactions committed by the dedup store",
            dedup_commits.clone(),
        );
        let admin_requests = Family::<AdminLabels, Counter>::default();
        registry.register(
            "admin_requests",
            "Requests to the admin API by route and status (401s included)",
            admin_requests.clone(),
        );
        let target_state = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "target_state",
            "Each target's state: 0 closed, 1 open (held by the breaker), 2 half_open (a probe is out), 3 paused (by an operator)",
            target_state.clone(),
        );
        let target_in_flight = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "target_in_flight",
            "Deliveries to each target in flight from this worker",
            target_in_flight.clone(),
        );
        let target_limit = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "target_concurrency_limit",
            "This worker's current limit of deliveries in flight to each target (adaptive, within its share of max_concurrency)",
            target_limit.clone(),
        );
        let target_requests = Family::<TargetOutcomeLabels, Counter>::default();
        registry.register(
            "target_requests",
            "Requests to each target by outcome (success, rejected, back_pressure, failed)",
            target_requests.clone(),
        );
        let target_held = Family::<TargetLabels, Gauge>::default();
        registry.register(
            "target_held",
            "Messages held on the broker for each target (its hold queue)",
            target_held.clone(),
        );
        Self {
            registry,
            known_sources: known_sources.into_iter().collect(),
            requests,
            ingress_panics,
            publish_seconds,
            deliveries,
            delivery_seconds,
            dedup_hits,
            in_flight,
            reconnects,
            connected,
            dedup_commits,
            partitions,
            admin_requests,
            target_state,
            target_in_flight,
            target_limit,
            target_requests,
            target_held,
        }
    }

    /// A target's request counter for `outcome`, to keep and count on.
    pub(crate) fn target_requests(&self, target: &str, outcome: &'static str) -> Counter {
        self.target_requests
            .get_or_create(&TargetOutcomeLabels {
                target: target.to_string(),
                outcome,
            })
            .clone()
    }

    pub(crate) fn target_state(&self, target: &str, code: i64) {
        self.target_state
            .get_or_create(&TargetLabels {
                target: target.to_string(),
            })
            .set(code);
    }

    /// A target's gauges, sampled.
    pub(crate) fn target_sample(&self, target: &str, in_flight: usize, limit: usize, held: u32) {
        let l = TargetLabels {
            target: target.to_string(),
        };
        let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.target_in_flight.get_or_create(&l).set(n(in_flight));
        self.target_limit.get_or_create(&l).set(n(limit));
        self.target_held.get_or_create(&l).set(held.into());
    }

    /// One answer of the admin API.
    pub(crate) fn admin_request(&self, route: &'static str, status: u16) {
        self.admin_requests
            .get_or_create(&AdminLabels { route, status })
            .inc();
    }

    /// The `source` label for a source name: itself when configured, else `_other`.
    fn source_label<'a>(&self, source: &'a str) -> &'a str {
        if self.known_sources.contains(source) {
            source
        } else {
            OTHER_SOURCE
        }
    }

    pub(crate) fn accepted(&self, source: &str, publish: Duration) {
        self.answered(source, 202, "");
        self.publish_seconds.observe(publish.as_secs_f64());
    }

    /// One answer to `/hooks/{source}` (`code` empty for a 202).
    pub(crate) fn answered(&self, source: &str, status: u16, code: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                source: self.source_label(source).to_string(),
                status,
                code,
            })
            .inc();
    }

    /// A message settled with `outcome` (a label); `duplicate_tier` when it
    /// was a duplicate.
    pub(crate) fn settled(
        &self,
        source: &str,
        outcome: &'static str,
        duplicate_tier: Option<&'static str>,
    ) {
        if let Some(tier) = duplicate_tier {
            self.dedup_hits.get_or_create(&TierLabels { tier }).inc();
        }
        self.deliveries
            .get_or_create(&DeliveryLabels {
                source: self.source_label(source).to_string(),
                outcome,
            })
            .inc();
    }

    pub(crate) fn panicked(&self) {
        self.ingress_panics.inc();
    }

    pub(crate) fn attempted(&self, took: Duration) {
        self.delivery_seconds.observe(took.as_secs_f64());
    }

    /// Messages being processed now.
    pub(crate) fn set_in_flight(&self, n: usize) {
        self.in_flight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn committed(&self) {
        self.dedup_commits.inc();
    }

    pub(crate) fn connected(&self, connection: &str, node: &str, reconnect: bool) {
        if reconnect {
            self.reconnects.inc();
        }
        self.connected
            .get_or_create(&ConnectionLabels {
                connection: connection.to_string(),
                node: node.to_string(),
            })
            .set(1);
    }

    pub(crate) fn partition(&self, partition: u32, active: bool) {
        self.partitions
            .get_or_create(&PartitionLabels { partition })
            .set(i64::from(active));
    }

    pub(crate) fn disconnected(&self, connection: &str, node: &str) {
        self.connected
            .get_or_create(&ConnectionLabels {
                connection: connection.to_string(),
                node: node.to_string(),
            })
            .set(0);
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
