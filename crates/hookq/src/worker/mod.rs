//! The worker: consume `P.work` with manual acks and a prefetch, deliver up to
//! `worker.concurrency` messages at once, and stop gracefully. One message's
//! processing is a [`Processor`]; this file is the consume loop around it and the
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

mod broker_side;
mod handover;
mod outcome;
mod process;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use process::{Message, Processor, Receipt, Republish};

use crate::broker::{self, Broker};
use crate::config::{
    AmqpSettings, DedupSettings, HandlerKind, RetrySettings, SourceSettings, Target, WorkerSettings,
};
use crate::dedup::Dedup;
use crate::delivery::Delivery;
use crate::events::Events;
use crate::retry::Policy;
use crate::targets::Targets;
use broker_side::{BrokerRepublish, message};
use handover::{Activation, DoneLog, Fence};

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
    /// Every target, resolved ([`crate::config::Settings::resolved_targets`]).
    pub targets: BTreeMap<String, Target>,
}

pub struct Worker {
    broker: Broker,
    step: Arc<Processor>,
    /// The partitions this worker consumes (just 0 without partitions).
    partitions: Vec<u32>,
    prefetch: u16,
    concurrency: usize,
    grace: Duration,
    /// Messages taken from the consumers and not settled yet.
    in_flight: Arc<AtomicUsize>,
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
    out: Arc<BrokerRepublish>,
    done_log: Option<Arc<DoneLog>>,
    /// This process's hold on the partition in the store (with partitions).
    fence: Arc<Fence>,
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

impl Worker {
    pub fn new(config: Config<'_>, broker: Broker, events: Events) -> anyhow::Result<Arc<Self>> {
        let shutdown = CancellationToken::new();
        let targets = match config.worker.handler {
            HandlerKind::Http => Targets::new(
                config.targets,
                config.sources,
                config.worker.target.as_ref(),
                config.worker.timeout,
                config.retry.max_delay,
                &events,
            ),
            HandlerKind::Log => Targets::none(),
        };
        let step = Processor {
            dedup: Arc::new(Dedup::open(config.dedup, events.clone())),
            delivery: Delivery::new(config.worker)?,
            targets: Arc::new(targets),
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
            in_flight: Arc::new(AtomicUsize::new(0)),
        }))
    }

    /// Ready to take work: broker connected, the dedup store writable, and
    /// the peers heard (deliveries wait for them, about 0.4 s after the
    /// first connection: a worker that reported ready earlier would hold
    /// what it took until then).
    pub fn is_ready(&self) -> bool {
        self.broker.is_ready()
            && self.step.dedup.store().is_healthy()
            && self.step.targets.peers_known()
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
        // The targets' control loop outlives the consumers: a stopping
        // worker's held deliveries still finish within the limits, and its
        // goodbye goes out when it is done.
        let control_stop = CancellationToken::new();
        let control = tokio::spawn(
            self.step
                .targets
                .clone()
                .run(self.broker.clone(), control_stop.clone()),
        );
        let topo = self.broker.topology().clone();
        let done_log = (topo.partitions > 1).then(|| {
            Arc::new(DoneLog::start(
                self.broker.clone(),
                self.step.dedup.store().clone(),
            ))
        });
        let out = Arc::new(BrokerRepublish {
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
                fence: Arc::new(Fence::new(
                    self.step.dedup.store().clone(),
                    topo.done(i),
                    self.step.abandon.clone(),
                )),
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
        control_stop.cancel();
        let _ = control.await;
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
                activation: Arc::new(Activation::new(ctx.index, ctx.fence.clone())),
            };
            let part = self.clone().consume(part, &ctx).await;
            if shutdown.is_cancelled() {
                return Some(part);
            }
            // The consumer ended (channel or connection lost, or the broker
            // cancelled it): the messages it delivered are the broker's again
            // (their deliveries finish and record what they can; a copy that
            // comes back waits for them). Subscribe anew.
            self.step.events.partition_left(part.index);
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
                    if running.is_empty()
                        && let Some(leave) = part.activation.idle()
                    {
                        ctx.tracker.spawn(leave);
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
            let in_flight = self.in_flight.clone();
            let one = async move {
                let now = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                step.events.in_flight(now);
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
                        msg.receipt.requeue().await;
                    }
                }
                .instrument(span)
                .await;
                let now = in_flight.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
                step.events.in_flight(now);
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
        // What the consumer left finishes; then the partition is left.
        let activation = part.activation.clone();
        ctx.tracker.spawn(async move {
            while running.next().await.is_some() {}
            if let Some(leave) = activation.idle() {
                leave.await;
            }
        });
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
            self.step.events.partition_left(part.index);
            part.consumer.close().await;
        }
    }

    async fn drain(&self, tracker: &TaskTracker) {
        tracker.close();
        let in_flight = self.in_flight.load(Ordering::Relaxed);
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
        // A pass reads every key: often enough that a key outlives its
        // retention by at most a quarter of it (or an hour), seldom enough
        // that ten million keys cost the store thread seconds an hour.
        let every =
            (dedup.retention() / 4).clamp(Duration::from_millis(100), Duration::from_secs(3600));
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
