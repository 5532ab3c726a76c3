//! One message, from delivery to settlement: dedup, deliver with in-process
//! retries, then ack, delay or dead-letter. The broker is behind two traits
//! ([`Settle`] for the message's own ack, [`Republish`] for delay tiers and
//! `P.dead`), so tests drive a [`Step`] with fakes, a real SQLite file and a
//! real HTTP target.
//!
//! The invariants this file keeps:
//! - a message is acked only after its success is recorded in SQLite, or after
//!   its republish (to a delay queue or `P.dead`) was confirmed by the broker;
//!   whatever fails before that hands the message back (nack with requeue);
//! - a claim is settled exactly once (done, released, or parked for the
//!   message's next copy) before the ack, so a copy of the message that comes
//!   back never finds a claim nobody works on but this process's lease keeps;
//! - a copy that finds its own message still being delivered by a live holder
//!   waits for it, so one key never has two deliveries running at once;
//! - a 2xx is recorded, however late it comes during a graceful stop.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::broker;
use crate::dedup::{Check, Dedup, Held};
use crate::delivery::{self, Delivery};
use crate::events::{Events, Outcome};
use crate::message::{DeadInfo, DeadReason, Envelope, epoch_ms, rfc3339_now};
use crate::retry::{Decision, DelayTier, Policy};

/// The message's own settlement with the broker.
pub trait Settle: Send + Sync + Sized {
    /// Whether the consumer that delivered it is gone (the broker has the
    /// message again and an ack can no longer reach it).
    fn lost(&self) -> bool;
    /// Resolves when [`Settle::lost`] turns true.
    fn until_lost(&self) -> impl Future<Output = ()> + Send;
    /// Acks; an error means the ack could not be sent (the broker redelivers).
    fn ack(self) -> impl Future<Output = Result<(), broker::Error>> + Send;
    /// Hands the message back to the queue.
    fn requeue(self) -> impl Future<Output = ()> + Send;
}

/// Publishing a message somewhere else, with the broker's confirm.
pub trait Republish: Send + Sync {
    fn to_delay(
        &self,
        tier: DelayTier,
        env: &Envelope,
        expiration: Duration,
    ) -> impl Future<Output = Result<(), broker::Error>> + Send;
    fn to_dead(&self, env: &Envelope) -> impl Future<Output = Result<(), broker::Error>> + Send;
    /// With partitions: appends the key to its partition's done-log (with
    /// confirm), after the 2xx is recorded and before the ack.
    fn done(&self, env: &Envelope) -> impl Future<Output = Result<(), broker::Error>> + Send;
}

/// Polling a claim that a live holder works on: from this, doubling to [`BUSY_MAX`].
const BUSY_MIN: Duration = Duration::from_millis(50);
const BUSY_MAX: Duration = Duration::from_secs(1);
/// The pause before a hand-back, so that a broker or store that keeps failing
/// does not turn into a hot loop.
const HAND_BACK_PAUSE: Duration = Duration::from_millis(500);

/// Everything one message's processing needs, shared by all of a worker's messages.
pub struct Step {
    pub dedup: Arc<Dedup>,
    pub delivery: Delivery,
    pub policy: Policy,
    pub events: Events,
    /// Deliveries to the target at once (`worker.concurrency`).
    pub deliveries: Semaphore,
    /// Broker refusals of a message's republish before it is dead-lettered as
    /// `delivery_limit` (the safety net a classic queue does not have).
    pub delivery_limit: u32,
    /// A delivery may take this long; after the grace period it still may.
    pub timeout: Duration,
    /// Stop taking work (and stop retrying in-process: park retries on the broker).
    pub shutdown: CancellationToken,
    /// The grace period is over: hand back whatever is still held.
    pub abandon: CancellationToken,
}

/// What a step works on: the message (or why it is not one) and its settlement.
pub struct Message<S> {
    pub envelope: Result<Envelope, (broker::DecodeError, Envelope)>,
    pub settle: S,
}

impl Step {
    /// Processes one message to its end and reports the outcome (as an event
    /// too). The caller opens the tracing span.
    pub async fn run<S: Settle, R: Republish>(&self, msg: Message<S>, out: &R) -> Outcome {
        let (env, outcome) = match msg.envelope {
            Ok(mut env) => {
                let outcome = self.settle(&mut env, msg.settle, out).await;
                (env, outcome)
            }
            Err((err, stand_in)) => {
                tracing::warn!(message_id = %stand_in.message_id, "{err}: parking it in the dead-letter queue");
                let info = DeadInfo {
                    reason: DeadReason::Invalid,
                    last_error: err.to_string(),
                    last_status: None,
                    dead_at: rfc3339_now(),
                };
                let mut env = stand_in;
                let outcome = self
                    .dead_letter(&mut env, info, msg.settle, None, out)
                    .await;
                (env, outcome)
            }
        };
        self.events.settled(&env, outcome.clone());
        outcome
    }

    /// `env` is this message's: what the step learns (attempts, the dead-letter
    /// details) is written into it.
    async fn settle<S: Settle, R: Republish>(
        &self,
        env: &mut Envelope,
        msg: S,
        out: &R,
    ) -> Outcome {
        let mut busy_wait = BUSY_MIN;
        let held = loop {
            let check = self
                .persist("claim", || self.dedup.check(&env.key, &env.message_id))
                .await;
            match check {
                None => return self.hand_back(msg).await,
                Some(Check::Deliver(held)) => break held,
                Some(Check::Done(tier)) => {
                    tracing::debug!(tier = tier.as_str(), "duplicate of a delivered key");
                    // With partitions, the key may be done here and not in its
                    // done-log (the append failed, the message came back): every
                    // ack of a done key follows its append, so a host that takes
                    // the partition over knows it. Without partitions, a no-op.
                    if let Err(e) = out.done(env).await {
                        tracing::warn!(error = %e, "could not append the key to its done-log; handing the message back");
                        return self.hand_back(msg).await;
                    }
                    return ack(msg, Outcome::Duplicate { tier }).await;
                }
                Some(Check::InFlight { holder }) => {
                    tracing::debug!(%holder, "duplicate of a key another message holds");
                    let tier = crate::dedup::Tier::Sqlite;
                    return ack(msg, Outcome::Duplicate { tier }).await;
                }
                Some(Check::Busy) => {
                    // This message is still being delivered by a live holder (its
                    // connection dropped, the broker gave it to us again): wait
                    // for that delivery to record its end.
                    if busy_wait == BUSY_MIN {
                        tracing::info!(
                            "this message is still being delivered elsewhere; waiting for that delivery to end"
                        );
                    }
                    enum Woke {
                        Abandon,
                        Lost,
                        Again,
                    }
                    let woke = tokio::select! {
                        _ = self.abandon.cancelled() => Woke::Abandon,
                        _ = msg.until_lost() => Woke::Lost,
                        _ = tokio::time::sleep(busy_wait) => Woke::Again,
                    };
                    match woke {
                        Woke::Abandon => return self.hand_back(msg).await,
                        // Our own channel went too: the broker has this copy again.
                        Woke::Lost => return Outcome::HandedBack,
                        Woke::Again => busy_wait = (busy_wait * 2).min(BUSY_MAX),
                    }
                }
            }
        };
        env.attempts = env.attempts.max(held.attempts);

        if held.handbacks >= self.delivery_limit {
            tracing::warn!(
                handbacks = held.handbacks,
                "the broker refused this message's republish too often; dead-lettering it"
            );
            let info = DeadInfo {
                reason: DeadReason::DeliveryLimit,
                last_error: format!(
                    "the broker refused to take this message back {} times",
                    held.handbacks
                ),
                last_status: None,
                dead_at: rfc3339_now(),
            };
            return self.dead_letter(env, info, msg, Some(&held), out).await;
        }

        // Back early from a delay tier shorter than the target's Retry-After.
        if let Some(not_before) = env.not_before {
            let now = epoch_ms();
            if not_before > now {
                // A hookq-not-before from anywhere (a hand-edited dead letter
                // included) waits no longer than retry.max_delay_ms from now.
                let remaining = self.policy.clamp(Duration::from_millis(not_before - now));
                let tier = self.policy.tier_at_least(remaining);
                let why = "Retry-After not over yet";
                return self
                    .delay(env, tier, Some(remaining), msg, &held, why, out)
                    .await;
            }
        }

        let (result, failed) = self.deliver_inline(env).await;
        match result {
            Ok(status) => {
                tracing::debug!(status, "delivered");
                if !self.record_done(&held).await {
                    return self.hand_back(msg).await;
                }
                if let Err(e) = out.done(env).await {
                    // Recorded here, not in the done-log: a copy that comes back
                    // to this host is a duplicate; one that goes to another host
                    // after a takeover may be delivered again.
                    tracing::warn!(error = %e, "could not append the key to its done-log; handing the message back");
                    return self.hand_back(msg).await;
                }
                if msg.lost() {
                    // Recorded: the copy the broker hands out again is acked as a duplicate.
                    return Outcome::HandedBack;
                }
                ack(
                    msg,
                    Outcome::Delivered {
                        attempt: failed + 1,
                    },
                )
                .await
            }
            Err(e) => {
                env.attempts = failed;
                if msg.lost() {
                    // The broker has this message again; leave the claim (and the
                    // attempts) to the copy it hands out, and republish nothing.
                    tracing::info!(attempts = failed, error = %e, "delivery failed after the broker connection was lost; leaving the message to its redelivery");
                    let _ = self.persist("park", || held.park(failed, false)).await;
                    return Outcome::HandedBack;
                }
                match self.policy.after_failure(failed, &e.failure()) {
                    Decision::Dead(reason) => {
                        tracing::warn!(attempts = failed, %reason, error = %e, "dead-lettering");
                        let info = DeadInfo {
                            reason,
                            last_error: e.to_string(),
                            last_status: e.status(),
                            dead_at: rfc3339_now(),
                        };
                        self.dead_letter(env, info, msg, Some(&held), out).await
                    }
                    Decision::Delay { tier, floor } => {
                        let why = e.to_string();
                        self.delay(env, tier, floor, msg, &held, &why, out).await
                    }
                    // Only reached when stopping: park the retry on the broker.
                    Decision::Inline(_) => {
                        let tier = self.policy.tier_at_least(Duration::ZERO);
                        self.delay(env, tier, None, msg, &held, "stopping", out)
                            .await
                    }
                }
            }
        }
    }

    /// Delivers with the in-process retries the policy allows; returns the last
    /// result and the failed-attempt count after it. Stopping ends the retries
    /// (the caller parks the message on the broker); an attempt under way runs
    /// to its end (`worker.timeout_ms`).
    async fn deliver_inline(&self, env: &Envelope) -> (Result<u16, delivery::Error>, u32) {
        let mut failed = env.attempts;
        loop {
            let result = {
                let Ok(_permit) = self.deliveries.acquire().await else {
                    return (Err(delivery::Error::Other("stopping".into())), failed);
                };
                if !self.dedup.store().lease_is_fresh() {
                    // Other workers may soon treat our claims as abandoned: do not
                    // start a delivery that could overlap with theirs.
                    let why = "the dedup store has not renewed this worker's lease";
                    return (Err(delivery::Error::Other(why.into())), failed);
                }
                let started = Instant::now();
                let r = self.delivery.deliver(env, failed + 1).await;
                self.events.attempted(started.elapsed());
                r
            };
            let e = match result {
                Ok(status) => return (Ok(status), failed),
                Err(e) => e,
            };
            failed += 1;
            let wait = match self.policy.after_failure(failed, &e.failure()) {
                Decision::Inline(d) if !self.shutdown.is_cancelled() => {
                    self.policy
                        .jittered(d, rand::random::<f64>(), e.retry_after())
                }
                _ => return (Err(e), failed),
            };
            tracing::debug!(error = %e, ?wait, "retrying in-process");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => return (Err(e), failed),
            }
        }
    }

    /// Records a 2xx. Never raced against the end of the grace period: the
    /// delivery happened, and forgetting it would deliver it again. Only a store
    /// that stays unwritable for a further `worker.timeout_ms` after the grace
    /// period makes it give up (the message then goes back: the one case where
    /// a graceful stop can deliver a key twice).
    async fn record_done(&self, held: &Held<'_>) -> bool {
        let run = (|| held.done())
            .retry(store_backoff())
            .sleep(tokio::time::sleep)
            .notify(
                |e, _| tracing::debug!(error = %e, "could not record the success yet; retrying"),
            );
        let give_up = async {
            self.abandon.cancelled().await;
            tokio::time::sleep(self.timeout).await;
        };
        tokio::select! {
            biased;
            r = run => r.is_ok(),
            _ = give_up => {
                tracing::error!("the dedup store stayed unwritable after the grace period: handing back a message that was delivered (it will be delivered again)");
                false
            }
        }
    }

    /// Republishes to a delay tier with confirm, parks the claim for that copy,
    /// then acks. A `floor` longer than the tier (a long Retry-After) is kept as
    /// the not-before time, and the message is delayed again when it comes back
    /// early.
    #[allow(clippy::too_many_arguments)]
    async fn delay<S: Settle, R: Republish>(
        &self,
        env: &mut Envelope,
        tier: DelayTier,
        floor: Option<Duration>,
        msg: S,
        held: &Held<'_>,
        why: &str,
        out: &R,
    ) -> Outcome {
        env.not_before = floor
            .filter(|f| *f > tier.0)
            .map(|f| epoch_ms().saturating_add(u64::try_from(f.as_millis()).unwrap_or(u64::MAX)));
        let expiration = self
            .policy
            .tier_expiration(tier, rand::random::<f64>(), floor);
        tracing::info!(attempts = env.attempts, tier = ?tier.0, wait = ?expiration, why, "retrying later");
        match out.to_delay(tier, env, expiration).await {
            Ok(()) => {
                if self
                    .persist("park", || held.park(env.attempts, false))
                    .await
                    .is_none()
                {
                    return self.hand_back(msg).await;
                }
                ack(msg, Outcome::Delayed { tier }).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not move the message to its delay queue; handing it back");
                self.refused(msg, held, env.attempts).await
            }
        }
    }

    /// Publishes to `P.dead` with confirm, releases the claim (a dead-lettered
    /// key may be processed again), then acks. `held` is `None` for a message
    /// that was never claimed (not a hookq message).
    async fn dead_letter<S: Settle, R: Republish>(
        &self,
        env: &mut Envelope,
        info: DeadInfo,
        msg: S,
        held: Option<&Held<'_>>,
        out: &R,
    ) -> Outcome {
        let reason = info.reason;
        env.dead = Some(info);
        match out.to_dead(env).await {
            Ok(()) => {
                if let Some(held) = held
                    && self.persist("release", || held.release()).await.is_none()
                {
                    return self.hand_back(msg).await;
                }
                ack(msg, Outcome::Dead { reason }).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not publish the dead letter; handing the message back");
                match held {
                    Some(held) => self.refused(msg, held, env.attempts).await,
                    None => self.hand_back(msg).await,
                }
            }
        }
    }

    /// The broker refused a republish: count it on the claim (after
    /// `amqp.delivery_limit` of them the message is dead-lettered), park the
    /// claim and hand the message back.
    async fn refused<S: Settle>(&self, msg: S, held: &Held<'_>, attempts: u32) -> Outcome {
        let _ = self.persist("park", || held.park(attempts, true)).await;
        self.hand_back(msg).await
    }

    async fn hand_back<S: Settle>(&self, msg: S) -> Outcome {
        if !self.shutdown.is_cancelled() {
            tokio::select! {
                _ = self.abandon.cancelled() => {}
                _ = tokio::time::sleep(HAND_BACK_PAUSE) => {}
            }
        }
        msg.requeue().await;
        Outcome::HandedBack
    }

    /// Runs a dedup-store operation until it succeeds, backing off while the store
    /// cannot be written (the store logs that once and /readyz turns 503). `None`
    /// once the grace period is over: the caller hands the message back.
    async fn persist<T, E, F, Fut>(&self, what: &'static str, op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let run = op.retry(store_backoff()).sleep(tokio::time::sleep).notify(
            |e, _| tracing::debug!(what, error = %e, "dedup store busy or failing; retrying"),
        );
        tokio::select! {
            r = run => r.ok(),
            _ = self.abandon.cancelled() => None,
        }
    }
}

/// Retrying a store operation while SQLite is busy or failing.
fn store_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
}

/// Acks, and reports `outcome` — or that the message went back, when the ack
/// cannot reach the broker (the channel is gone; dedup recognises the copy).
async fn ack<S: Settle>(msg: S, outcome: Outcome) -> Outcome {
    match msg.ack().await {
        Ok(()) => outcome,
        Err(e) => {
            tracing::warn!(error = %e, "ack failed; the broker will redeliver the message");
            Outcome::HandedBack
        }
    }
}
