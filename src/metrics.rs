//! Prometheus metrics for the ingress and the worker, served as text on /metrics.
//!
//! One [`Metrics`] per process (`hookq up` shares it between both parts), so a
//! scrape sees everything the process does.

use std::sync::Arc;

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
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub source: String,
    /// delivered, duplicate, retried, dead
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: &'static str,
}

/// The `source` label of every source not named in the configuration.
pub const OTHER_SOURCE: &str = "_other";

fn latency() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    /// Sources named in the configuration. Any other name (unknown sources,
    /// when allowed, come from the internet) is labelled `_other`, so that no
    /// client can grow the metric families without bound.
    known_sources: std::collections::HashSet<String>,
    pub requests: Family<RequestLabels, Counter>,
    /// Requests whose handler panicked (answered 500 by the catch layer).
    pub ingress_panics: Counter,
    pub publish_seconds: Histogram,
    pub deliveries: Family<DeliveryLabels, Counter>,
    pub delivery_seconds: Histogram,
    pub dedup_hits: Family<TierLabels, Counter>,
    pub in_flight: Gauge,
    /// Set from the broker handle when scraped.
    pub reconnects: Gauge,
    /// Set from the dedup store when scraped.
    pub dedup_commits: Gauge,
}

impl Metrics {
    pub fn new(known_sources: impl IntoIterator<Item = String>) -> Arc<Self> {
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
            "Messages handled by source and outcome (delivered, duplicate, retried, dead)",
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
        let reconnects = Gauge::default();
        registry.register(
            "broker_reconnects",
            "Broker connections re-established after a loss",
            reconnects.clone(),
        );
        let dedup_commits = Gauge::default();
        registry.register(
            "dedup_commits",
            "SQLite transactions committed by the dedup store",
            dedup_commits.clone(),
        );
        Arc::new(Self {
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
            dedup_commits,
        })
    }

    /// The `source` label for a source name: itself when configured, else `_other`.
    pub fn source_label<'a>(&self, source: &'a str) -> &'a str {
        if self.known_sources.contains(source) {
            source
        } else {
            OTHER_SOURCE
        }
    }

    pub fn delivery(&self, source: &str, outcome: &'static str) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                source: self.source_label(source).to_string(),
                outcome,
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
