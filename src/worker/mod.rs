//! The worker: consume `P.work` with manual acks and a prefetch, deliver up to
//! `worker.concurrency` messages at once, and stop gracefully. One message's
//! processing is a [`Step`]; this file is the consume loop around it and the
//! broker side of the step's two traits.
//!
//! The consume loop survives broker loss: when the consumer ends it marks that
//! consumer's messages as lost (their acks can no longer reach the broker, which
//! hands them out again), closes its channel, waits for the broker handle to
//! reconnect and consumes again. On shutdown it cancels the consumer, lets
//! in-flight messages finish for the grace period, then tells the rest to hand
//! their message back (a delivery already under way still gets its
//! `worker.timeout_ms`, and a 2xx is recorded), and closes the channel (which
//! returns any prefetched, untouched messages to the queue).

mod step;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use step::{Message, Republish, Settle, Step};

use crate::broker::{self, Acker, Broker, Incoming};
use crate::config::{AmqpSettings, DedupSettings, RetrySettings, SourceSettings, WorkerSettings};
use crate::dedup::Dedup;
use crate::delivery::Delivery;
use crate::events::Events;
use crate::message::Envelope;
use crate::retry::{DelayTier, Policy};

/// How long a republish (to a delay tier or `P.dead`) waits for its confirm.
/// The message is held meanwhile, so a long wait costs nothing but a slot; a
/// short one would hand back messages the broker did take (a second copy).
pub const REPUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// The sections of the configuration a worker reads.
pub struct Config<'a> {
    pub worker: &'a WorkerSettings,
    pub retry: &'a RetrySettings,
    pub dedup: &'a DedupSettings,
    /// For their delivery targets.
    pub sources: &'a BTreeMap<String, SourceSettings>,
    /// For the prefetch and the delivery limit.
    pub amqp: &'a AmqpSettings,
}

pub struct Worker {
    broker: Broker,
    step: Arc<Step>,
    prefetch: u16,
    concurrency: usize,
    grace: Duration,
}

impl Worker {
    pub fn new(config: Config<'_>, broker: Broker, events: Events) -> anyhow::Result<Arc<Self>> {
        let shutdown = CancellationToken::new();
        let step = Step {
            dedup: Arc::new(Dedup::open(
                config.dedup,
                events.metrics().dedup_commits.clone(),
            )),
            delivery: Delivery::new(config.worker, config.sources)?,
            policy: Policy::new(config.retry),
            events,
            deliveries: Semaphore::new(config.worker.concurrency),
            delivery_limit: config.amqp.delivery_limit,
            timeout: config.worker.timeout,
            shutdown,
            abandon: CancellationToken::new(),
        };
        Ok(Arc::new(Self {
            broker,
            step: Arc::new(step),
            prefetch: config.amqp.prefetch,
            concurrency: config.worker.concurrency,
            grace: config.worker.grace,
        }))
    }

    /// Ready to take work: broker connected and the dedup store writable.
    pub fn is_ready(&self) -> bool {
        self.broker.is_ready() && self.step.dedup.store().is_healthy()
    }

    pub fn dedup(&self) -> &Dedup {
        &self.step.dedup
    }

    /// Stops taking work; [`Worker::run`] then drains and returns.
    pub fn stop(&self) {
        self.step.shutdown.cancel();
    }

    /// Consumes until [`Worker::stop`], then drains within the grace period.
    pub async fn run(self: Arc<Self>) -> anyhow::Result<()> {
        let queue = self.broker.topology().work();
        let shutdown = self.step.shutdown.clone();
        let tracker = TaskTracker::new();
        let background = tracker.spawn({
            let w = self.clone();
            async move { w.housekeeping().await }
        });
        let out = Arc::new(Out {
            broker: self.broker.clone(),
        });

        'connection: while self.broker.wait_ready(&shutdown).await {
            let mut consumer = match self.broker.consume(&queue, self.prefetch).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start consuming; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            tracing::info!(%queue, prefetch = self.prefetch, concurrency = self.concurrency, "consuming");
            loop {
                let msg = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    m = consumer.next() => m,
                };
                let Some(msg) = msg else {
                    // Channel or connection lost: the messages it delivered are the
                    // broker's again (their deliveries finish and record what they
                    // can; a copy that comes back waits for them). Consume anew.
                    consumer.close().await;
                    continue 'connection;
                };
                let (step, out) = (self.step.clone(), out.clone());
                tracker.spawn(async move {
                    step.events.metrics().in_flight.inc();
                    let span = match &msg.envelope {
                        Ok(env) | Err((_, env)) => crate::message::span(env),
                    };
                    step.run(message(msg), out.as_ref()).instrument(span).await;
                    step.events.metrics().in_flight.dec();
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
        let _ = background.await;
        Ok(())
    }

    async fn drain(&self, tracker: &TaskTracker) {
        tracker.close();
        let in_flight = self.step.events.metrics().in_flight.get();
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
            self.step.abandon.cancel();
            tracker.wait().await;
        }
    }

    /// Prunes old keys and probes a failing store so readiness recovers on its own.
    async fn housekeeping(&self) {
        let dedup = &self.step.dedup;
        let shutdown = self.step.shutdown.clone();
        // Often enough that a key outlives its retention by at most a quarter of it.
        let every =
            (dedup.retention() / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let prune = dedup.prune_forever(every, shutdown.clone());
        let probe = async {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                if !dedup.store().is_healthy() {
                    let _ = dedup.store().probe().await;
                }
            }
        };
        tokio::join!(prune, probe);
    }
}

/// A delivery from the consumer, as the step sees it.
fn message(m: Incoming) -> Message<Handle> {
    Message {
        envelope: m.envelope,
        settle: Handle {
            acker: m.acker,
            lost: m.lost,
        },
    }
}

/// The broker side of [`Settle`]: the delivery's acker and its consumer's fate.
pub struct Handle {
    acker: Acker,
    lost: CancellationToken,
}

impl Settle for Handle {
    fn lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    async fn until_lost(&self) {
        self.lost.cancelled().await
    }

    async fn ack(self) -> Result<(), broker::Error> {
        self.acker.ack().await
    }

    async fn requeue(self) {
        if let Err(e) = self.acker.requeue().await {
            tracing::debug!(error = %e, "requeue failed; the broker will redeliver anyway");
        }
    }
}

/// The broker side of [`Republish`].
struct Out {
    broker: Broker,
}

impl Republish for Out {
    async fn to_delay(
        &self,
        tier: DelayTier,
        env: &Envelope,
        expiration: Duration,
    ) -> Result<(), broker::Error> {
        let queue = self.broker.topology().delay(tier);
        self.broker
            .publish_to_queue(&queue, env, Some(expiration), REPUBLISH_TIMEOUT)
            .await
    }

    async fn to_dead(&self, env: &Envelope) -> Result<(), broker::Error> {
        self.broker.publish_dead(env, REPUBLISH_TIMEOUT).await
    }
}
