//! The worker: consume `P.work` with manual acks and a prefetch, deliver up to
//! `worker.concurrency` messages at once, and stop gracefully.
//!
//! The consume loop survives broker loss: when the consumer ends it marks that
//! consumer's messages as lost (their acks can no longer reach the broker, which
//! hands them out again), closes its channel, waits for the broker handle to
//! reconnect and consumes again. On shutdown it cancels the consumer, lets
//! in-flight messages finish for the grace period, then tells the rest to hand
//! their message back (a delivery already under way still gets its
//! `worker.timeout_ms`, and a 2xx is recorded), and closes the channel (which
//! returns any prefetched, untouched messages to the queue).

mod process;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use process::Settled;

use crate::broker::Broker;
use crate::config::Settings;
use crate::dedup::Dedup;
use crate::handler::Handler;
use crate::metrics::Metrics;
use crate::retry::Policy;

pub struct Worker {
    broker: Broker,
    dedup: Arc<Dedup>,
    handler: Handler,
    policy: Policy,
    metrics: Arc<Metrics>,
    /// Confirms for republishes (delay, dead) wait this long.
    publish_timeout: Duration,
    /// Deliveries to the target at once (`worker.concurrency`); messages held
    /// are bounded by the prefetch.
    deliveries: Semaphore,
    concurrency: usize,
    prefetch: u16,
    /// Broker refusals of a message's republish before it is dead-lettered as
    /// `delivery_limit` (the safety net a classic queue does not have).
    delivery_limit: u32,
    /// A delivery may take this long; after the grace period it still may.
    timeout: Duration,
    grace: Duration,
    /// Stop taking work (and stop retrying in-process: park retries on the broker).
    shutdown: CancellationToken,
    /// The grace period is over: hand back whatever is still held.
    abandon: CancellationToken,
}

impl Worker {
    pub fn new(
        settings: &Settings,
        broker: Broker,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            broker,
            dedup: Arc::new(Dedup::open(&settings.dedup)),
            handler: Handler::new(settings)?,
            policy: Policy::new(&settings.retry),
            metrics,
            publish_timeout: settings.ingress.publish_timeout(),
            deliveries: Semaphore::new(settings.worker.concurrency),
            concurrency: settings.worker.concurrency,
            prefetch: settings.amqp.prefetch,
            delivery_limit: settings.amqp.delivery_limit,
            timeout: settings.worker.timeout(),
            grace: settings.worker.grace(),
            shutdown,
            abandon: CancellationToken::new(),
        }))
    }

    /// Ready to take work: broker connected and the dedup store writable.
    pub fn is_ready(&self) -> bool {
        self.broker.is_ready() && self.dedup.store().is_healthy()
    }

    pub fn reconnects(&self) -> u64 {
        self.broker.reconnects()
    }

    pub fn dedup(&self) -> &Dedup {
        &self.dedup
    }

    /// Consumes until `shutdown`, then drains within the grace period.
    pub async fn run(self: Arc<Self>) -> anyhow::Result<()> {
        let queue = self.broker.topology().work_queue.clone();
        let tracker = TaskTracker::new();
        let background = tracker.spawn({
            let w = self.clone();
            async move { w.housekeeping().await }
        });

        'connection: while self.broker.wait_ready(&self.shutdown).await {
            let mut consumer = match self.broker.consume(&queue, self.prefetch).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start consuming; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            tracing::info!(%queue, prefetch = self.prefetch, concurrency = self.concurrency, "consuming");
            loop {
                let msg = tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    m = consumer.next() => m,
                };
                let Some(msg) = msg else {
                    // Channel or connection lost: the messages it delivered are the
                    // broker's again (their deliveries finish and record what they
                    // can; a copy that comes back waits for them). Consume anew.
                    consumer.close().await;
                    continue 'connection;
                };
                let w = self.clone();
                tracker.spawn(async move {
                    w.metrics.in_flight.inc();
                    w.process(msg).await;
                    w.metrics.in_flight.dec();
                });
            }
            // Stopping.
            consumer.cancel().await;
            self.drain(&tracker).await;
            consumer.close().await;
            break;
        }
        self.drain(&tracker).await;
        background.abort();
        Ok(())
    }

    async fn drain(&self, tracker: &TaskTracker) {
        tracker.close();
        let in_flight = self.metrics.in_flight.get();
        if in_flight > 0 {
            tracing::info!(
                in_flight,
                grace = ?self.grace,
                "stopping: letting in-flight messages finish"
            );
        }
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "grace period over: handing the remaining messages back to the queue \
                 (deliveries under way get up to worker.timeout_ms to finish)"
            );
            self.abandon.cancel();
            tracker.wait().await;
        }
    }

    /// Prunes old keys and probes a failing store so readiness recovers on its own.
    async fn housekeeping(&self) {
        // Often enough that a key outlives its retention by at most a quarter of it.
        let every =
            (self.dedup.retention() / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let prune = self.dedup.prune_forever(every, self.shutdown.clone());
        let probe = async {
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                if !self.dedup.store().is_healthy() {
                    let _ = self.dedup.store().probe().await;
                }
            }
        };
        tokio::join!(prune, probe);
    }
}
