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

mod done_log;
mod step;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
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
use done_log::DoneLog;

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
    /// The partitions this worker consumes (just 0 without partitions).
    partitions: Vec<u32>,
    prefetch: u16,
    concurrency: usize,
    grace: Duration,
}

/// How long, at most, a worker that starts waits before its lowest-scored
/// partition's subscription (see [`Worker::subscription_order`]).
const STAGGER: Duration = Duration::from_millis(1500);
/// The first wait before subscribing again after a consumer could not start
/// or ended soon after it started; it doubles up to [`RESUBSCRIBE_MAX`].
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(200);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(10);

/// `d` give or take a fifth, so that workers that failed together do not
/// retry together.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.8 + 0.4 * rand::random::<f64>())
}

/// What one partition's subscription loop works with.
struct Subscription {
    index: u32,
    /// The wait before the first subscription (see [`Worker::subscription_order`]).
    stagger: Duration,
    out: Arc<Out>,
    done_log: Option<Arc<DoneLog>>,
    /// Where a consumer's unfinished messages finish after it ends.
    tracker: TaskTracker,
}

/// One partition's consumer of the current connection.
struct Partition {
    index: u32,
    consumer: broker::Consumer,
    /// Whether this worker read the partition's done-log since it last may
    /// have lost the partition.
    activation: Arc<Activation>,
}

/// Whether a worker has read a partition's done-log since it could last have
/// stopped being the partition's active consumer. The broker never says when
/// a consumer becomes active (again); it can only have stopped being it while
/// none of its messages from the partition were unsettled: RabbitMQ 4.x hands
/// a partition to a higher-priority consumer only once the current one has
/// settled what it holds, and 3.10 only when the consumer goes. So the read
/// is due before the first message of every busy spell: at the first message
/// of a subscription, and at the first one after the partition's messages in
/// flight fell to none ([`Activation::idle`]).
struct Activation {
    partition: u32,
    /// Set once the done-log is read for the current busy spell.
    read: std::sync::Mutex<Arc<tokio::sync::OnceCell<()>>>,
    /// Reads since the subscription began (the first one is logged at info).
    reads: std::sync::atomic::AtomicU64,
    /// Failed reads in a row: the pause before handing a message back grows
    /// with them, so a done-log that keeps failing is not a hot loop, nor a
    /// fast way to spend a quorum queue's delivery limit.
    failures: std::sync::atomic::AtomicU32,
}

/// The first pause before a message goes back after a failed done-log read;
/// it doubles with each failure in a row, up to [`CATCH_UP_PAUSE_MAX`].
const CATCH_UP_PAUSE: Duration = Duration::from_millis(500);
const CATCH_UP_PAUSE_MAX: Duration = Duration::from_secs(30);

impl Activation {
    fn new(partition: u32) -> Self {
        Self {
            partition,
            read: std::sync::Mutex::new(Arc::new(tokio::sync::OnceCell::new())),
            reads: Default::default(),
            failures: Default::default(),
        }
    }

    /// None of the partition's messages is in flight: the next one reads the
    /// done-log first.
    fn idle(&self) {
        if let Ok(mut cell) = self.read.lock()
            && cell.initialized()
        {
            *cell = Arc::new(tokio::sync::OnceCell::new());
        }
    }

    /// Reads the done-log once for this busy spell (concurrent messages wait
    /// for the same read). False when the read failed: after a pause, the
    /// message goes back and a later one tries again.
    async fn ready(&self, step: &Step, log: &DoneLog) -> bool {
        use std::sync::atomic::Ordering;
        let Ok(cell) = self.read.lock().map(|c| c.clone()) else {
            return false;
        };
        let i = self.partition;
        let read = cell
            .get_or_try_init(|| async {
                let started = std::time::Instant::now();
                let applied = log.catch_up(i).await?;
                let first = self.reads.fetch_add(1, Ordering::Relaxed) == 0;
                if first || applied > 0 {
                    tracing::info!(partition = i, applied, took = ?started.elapsed(), "active on this partition: its done-log is read, delivering");
                } else {
                    tracing::debug!(partition = i, took = ?started.elapsed(), "the done-log has nothing new");
                }
                step.events.partition(i, true);
                Ok::<(), done_log::CatchUpError>(())
            })
            .await;
        match read {
            Ok(()) => {
                self.failures.store(0, Ordering::Relaxed);
                true
            }
            Err(e) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed).min(16);
                let pause = CATCH_UP_PAUSE
                    .saturating_mul(1 << n)
                    .min(CATCH_UP_PAUSE_MAX);
                tracing::warn!(partition = i, error = %e, ?pause, "could not read the partition's done-log; handing the message back");
                tokio::select! {
                    _ = step.abandon.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
                false
            }
        }
    }
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
        let partitions = config.worker.partitions.of(config.amqp.partitions.max(1));
        Ok(Arc::new(Self {
            broker,
            step: Arc::new(step),
            partitions,
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
        let tracker = TaskTracker::new();
        let background = tracker.spawn({
            let w = self.clone();
            async move { w.housekeeping().await }
        });
        let topo = self.broker.topology().clone();
        let done_log = (topo.partitions > 1).then(|| {
            Arc::new(DoneLog::start(
                self.broker.clone(),
                self.step.dedup.store().clone(),
            ))
        });
        let out = Arc::new(Out {
            broker: self.broker.clone(),
            done_log: done_log.clone(),
        });
        // One subscription loop per partition: a consumer that ends (its
        // channel closed, its queue deleted) is replaced on its own, and the
        // others keep their partitions.
        let mut loops = tokio::task::JoinSet::new();
        for (i, stagger) in self.subscription_order() {
            let ctx = Subscription {
                index: i,
                stagger,
                out: out.clone(),
                done_log: done_log.clone(),
                tracker: tracker.clone(),
            };
            loops.spawn(self.clone().subscribe(ctx));
        }
        let mut consumers = Vec::new();
        while let Some(r) = loops.join_next().await {
            if let Ok(Some(part)) = r {
                consumers.push(part);
            }
        }
        self.stop_consuming(consumers, &tracker, topo.partitions > 1)
            .await;
        background.abort();
        let _ = background.await;
        Ok(())
    }

    /// Partition `ctx.index`'s consumer, for as long as the worker runs:
    /// subscribe when the broker is ready, consume until the consumer ends,
    /// then subscribe anew; returns the live consumer when the worker stops
    /// (for [`Worker::stop_consuming`]). A consumer that cannot start or ends
    /// soon after starting (its queue was deleted, say) makes the broker
    /// declare the topology again and this loop wait, doubling from
    /// [`RESUBSCRIBE_MIN`] to [`RESUBSCRIBE_MAX`]: never a hot loop.
    async fn subscribe(self: Arc<Self>, ctx: Subscription) -> Option<Partition> {
        let shutdown = self.step.shutdown.clone();
        let queue = self.broker.topology().work(ctx.index);
        let mut wait = ctx.stagger;
        let mut backoff = RESUBSCRIBE_MIN;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            if !self.broker.wait_ready(&shutdown).await {
                return None;
            }
            let consumer = match self
                .broker
                .consume_prioritised(&queue, self.prefetch, self.priority(ctx.index))
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%queue, error = %e, retry_in = ?backoff, "cannot start consuming; declaring the topology again");
                    self.broker.repair_topology();
                    wait = jittered(backoff);
                    backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
                    continue;
                }
            };
            tracing::info!(%queue, prefetch = self.prefetch, concurrency = self.concurrency, "consuming");
            let started = std::time::Instant::now();
            let part = Partition {
                index: ctx.index,
                consumer,
                activation: Arc::new(Activation::new(ctx.index)),
            };
            let part = self.clone().consume(part, &ctx).await;
            if shutdown.is_cancelled() {
                return Some(part);
            }
            // The consumer ended (channel or connection lost, or the broker
            // cancelled it): the messages it delivered are the broker's again
            // (their deliveries finish and record what they can; a copy that
            // comes back waits for them). Subscribe anew.
            self.step.events.partition(part.index, false);
            part.consumer.close().await;
            if started.elapsed() < RESUBSCRIBE_MAX {
                self.broker.repair_topology();
                wait = jittered(backoff);
                backoff = (backoff * 2).min(RESUBSCRIBE_MAX);
            } else {
                wait = Duration::ZERO;
                backoff = RESUBSCRIBE_MIN;
            }
        }
    }

    /// This worker's partitions, each with the wait before its first
    /// subscription. With partitions, a worker subscribes sooner to the
    /// partitions it scores higher (rendezvous hashing on its holder id):
    /// RabbitMQ 3.10 makes the first consumer registered the active one, so
    /// workers that start together spread the partitions between them.
    fn subscription_order(&self) -> Vec<(u32, Duration)> {
        let mut order: Vec<(u32, u32)> = self
            .partitions
            .iter()
            .map(|&i| (i, self.score(i)))
            .collect();
        order.sort_by_key(|o| std::cmp::Reverse(o.1));
        order
            .into_iter()
            .map(|(i, score)| {
                let wait = if self.partitions.len() > 1 {
                    let behind = f64::from(u32::MAX - score) / f64::from(u32::MAX);
                    STAGGER.mul_f64(behind)
                } else {
                    Duration::ZERO
                };
                (i, wait)
            })
            .collect()
    }

    /// This worker's rendezvous score for partition `i`.
    fn score(&self, i: u32) -> u32 {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.step.dedup.store().holder().as_bytes());
        h.update(i.to_be_bytes());
        let d = h.finalize();
        u32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    /// The consumer priority on partition `i`: RabbitMQ 4.x makes the highest
    /// one the active consumer, so the partitions spread by the same scores.
    fn priority(&self, i: u32) -> i32 {
        i32::try_from(self.score(i) >> 1).unwrap_or(0)
    }

    /// One partition's consumer. Its messages are processed concurrently
    /// inside this task (after the partition's done-log has been read, once
    /// per subscription), not in a task each: a spawn per message, and the
    /// wake of another runtime thread it brings, cost about 3 us of CPU a
    /// message in `hookq bench`. When the loop ends, what is still in flight
    /// finishes in a task of the tracker, which the graceful stop waits for.
    async fn consume(self: Arc<Self>, mut part: Partition, ctx: &Subscription) -> Partition {
        let shutdown = self.step.shutdown.clone();
        let mut running = FuturesUnordered::new();
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(()) = running.next(), if !running.is_empty() => {
                    if running.is_empty() {
                        part.activation.idle();
                    }
                    continue;
                }
                m = part.consumer.next() => m,
            };
            let Some(msg) = msg else {
                break;
            };
            let (step, out) = (self.step.clone(), ctx.out.clone());
            let (activation, done_log) = (part.activation.clone(), ctx.done_log.clone());
            let one = async move {
                step.events.metrics().in_flight.inc();
                let span = match &msg.envelope {
                    Ok(env) | Err((_, env)) => crate::message::span(env),
                };
                async {
                    let ready = match &done_log {
                        Some(log) => activation.ready(&step, log).await,
                        None => true,
                    };
                    let msg = message(msg);
                    if ready {
                        step.run(msg, out.as_ref()).await;
                    } else {
                        msg.settle.requeue().await;
                    }
                }
                .instrument(span)
                .await;
                step.events.metrics().in_flight.dec();
            };
            // A bug in one message's processing must not end the others'.
            running.push(async move {
                if AssertUnwindSafe(one).catch_unwind().await.is_err() {
                    tracing::error!(
                        "a message's processing panicked (a bug); it stays unacked until its channel closes, then the broker delivers it again"
                    );
                }
            });
        }
        if !running.is_empty() {
            ctx.tracker
                .spawn(async move { while running.next().await.is_some() {} });
        }
        part
    }

    /// The graceful stop of this connection's consumers. On a shared work
    /// queue they are cancelled first, so other workers take the queue's
    /// messages while this one finishes its own. A partition's consumer is
    /// cancelled only after every message this worker took from it is settled
    /// (delivered and in the done-log, or handed back): RabbitMQ makes a
    /// standby the active consumer the moment the cancel arrives, and the
    /// standby must find in the done-log everything this worker delivered, so
    /// no key is delivered on two hosts, at once or one after the other.
    /// Either way, what the broker sent and nobody took goes back by nack.
    async fn stop_consuming(
        &self,
        mut consumers: Vec<Partition>,
        tracker: &TaskTracker,
        partitioned: bool,
    ) {
        if partitioned {
            self.drain(tracker).await;
            for part in &mut consumers {
                part.consumer.cancel_and_hand_back().await;
            }
        } else {
            for part in &mut consumers {
                part.consumer.cancel_and_hand_back().await;
            }
            self.drain(tracker).await;
        }
        for part in consumers {
            self.step.events.partition(part.index, false);
            part.consumer.close().await;
        }
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
    /// With partitions.
    done_log: Option<Arc<DoneLog>>,
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

    async fn done(&self, env: &Envelope) -> Result<(), broker::Error> {
        match &self.done_log {
            Some(log) => {
                let partition = self.broker.topology().partition(&env.key);
                log.record(partition, &env.key).await
            }
            None => Ok(()),
        }
    }
}
