//! One message, from delivery to settlement: dedup, deliver with in-process
//! retries, then ack, delay or dead-letter. The broker is behind two traits
//! ([`Receipt`] for the message's own ack, [`Republish`] for delay tiers and
//! `P.dead`), so tests drive a [`Processor`] with fakes, a real SQLite file and a
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

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::outcome::ack;
use crate::broker;
use crate::dedup::{Check, Dedup, Held, Parked};
use crate::delivery::{self, Delivery};
use crate::events::{Events, Outcome};
use crate::message::{DeadInfo, DeadReason, Envelope, epoch_ms, rfc3339_now};
use crate::retry::{Decision, DelayTier, Failure, Policy};
use crate::targets::{Admission, Gate, HoldWhy, Observed, Targets};

/// The message's own settlement with the broker.
pub trait Receipt: Send + Sync + Sized {
    /// Whether the consumer that delivered it is gone (the broker has the
    /// message again and an ack can no longer reach it).
    fn lost(&self) -> bool;
    /// Resolves when [`Receipt::lost`] turns true.
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
    /// Into a target's hold queue (its breaker is open, it is paused, or it
    /// has no room): no attempt spent, released when the target takes
    /// deliveries again.
    fn to_hold(
        &self,
        target: &str,
        env: &Envelope,
    ) -> impl Future<Output = Result<(), broker::Error>> + Send;
    /// With partitions: appends the key to its partition's done-log (with
    /// confirm), after the 2xx is recorded and before the ack.
    fn done(&self, env: &Envelope) -> impl Future<Output = Result<(), broker::Error>> + Send;
    /// Whether this worker delivers the message's partition alone (with
    /// partitions: its single active consumer, the partition taken in the
    /// store), so that its claim can be kept in memory.
    fn alone(&self) -> bool {
        false
    }
}

/// Polling a claim that a live holder works on: from this, doubling to [`BUSY_MAX`].
const BUSY_MIN: Duration = Duration::from_millis(50);
const BUSY_MAX: Duration = Duration::from_secs(1);

/// Everything one message's processing needs, shared by all of a worker's messages.
pub struct Processor {
    pub dedup: Arc<Dedup>,
    pub delivery: Delivery,
    /// Each delivery passes its target's gate.
    pub targets: Arc<Targets>,
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

/// What processing works on: the message (or why it is not one) and its
/// receipt from the broker (to ack or hand it back).
pub struct Message<S> {
    pub envelope: Result<Envelope, (broker::DecodeError, Envelope)>,
    pub receipt: S,
}

/// What the claim came to.
enum Claimed<'d, S> {
    /// This message holds the key: deliver it.
    Held(Held<'d>, S),
    /// The message is settled already (a duplicate, or handed back).
    Settled(Outcome),
}

/// What an in-process delivery came to; `failed` counts the failed
/// deliveries of the message so far, this run's included.
enum Attempted {
    Delivered {
        status: u16,
        failed: u32,
    },
    Failed {
        error: delivery::Error,
        failed: u32,
    },
    /// No delivery was started, for this reason.
    NotStarted {
        why: NotStarted,
        failed: u32,
    },
}

/// Why a delivery was not started.
#[derive(Clone, Copy, Debug)]
enum NotStarted {
    /// The worker stops: the message waits on the broker for another.
    Stopping,
    /// The store has not renewed this worker's lease: other workers may
    /// soon take its claims over, and a delivery could overlap with theirs.
    StaleLease,
    /// The target's gate holds it (paused, breaker open, no room): the
    /// message waits in the target's hold queue.
    Held(HoldWhy),
}

impl NotStarted {
    fn as_str(self) -> &'static str {
        match self {
            Self::Stopping => "stopping",
            Self::StaleLease => "the dedup store has not renewed this worker's lease",
            Self::Held(why) => why.as_str(),
        }
    }
}

/// When and why a message is tried again from a delay tier.
pub(super) struct Later<'a> {
    pub(super) tier: DelayTier,
    /// The least wait (a Retry-After); longer than the tier: kept as the
    /// message's not-before time.
    pub(super) floor: Option<Duration>,
    pub(super) why: &'a str,
}

impl Processor {
    /// Processes one message to its end and reports the outcome (as an event
    /// too). The caller opens the tracing span.
    pub async fn run<S: Receipt, R: Republish>(&self, msg: Message<S>, out: &R) -> Outcome {
        let (env, outcome) = match msg.envelope {
            Ok(mut env) => {
                let outcome = self.process(&mut env, msg.receipt, out).await;
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
                    .dead_letter(&mut env, info, msg.receipt, None, out)
                    .await;
                (env, outcome)
            }
        };
        self.events.settled(&env, outcome.clone());
        outcome
    }

    /// `env` is this message's: what processing learns (attempts, the
    /// dead-letter details) is written into it.
    async fn process<S: Receipt, R: Republish>(
        &self,
        env: &mut Envelope,
        msg: S,
        out: &R,
    ) -> Outcome {
        let (held, msg) = match self.claim(env, msg, out).await {
            Claimed::Held(held, msg) => (held, msg),
            Claimed::Settled(outcome) => return outcome,
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
                let later = Later {
                    tier: self.policy.tier_at_least(remaining),
                    floor: Some(remaining),
                    why: "Retry-After not over yet",
                };
                return self.delay(env, later, msg, &held, out).await;
            }
        }

        // A probe is delivered as one only now: any copy republished from
        // here on (held, delayed, dead) is an ordinary message again.
        let probe = std::mem::take(&mut env.probe);
        let gate = self.targets.for_source(&env.source).cloned();
        match self.deliver_inline(env, gate.as_ref(), probe).await {
            Attempted::Delivered { status, failed } => {
                self.delivered(env, status, failed, msg, &held, out).await
            }
            Attempted::Failed { error, failed } => {
                self.failed(env, error, failed, msg, &held, out).await
            }
            Attempted::NotStarted {
                why: NotStarted::Held(why),
                failed,
            } => match &gate {
                Some(gate) => {
                    env.attempts = failed;
                    self.hold(env, gate, why, msg, &held, out).await
                }
                None => self.hand_back(msg).await,
            },
            // Not started: the claim goes to the message's next copy, and the
            // message back to the queue, for a worker that can deliver it.
            Attempted::NotStarted { why, failed } => {
                tracing::debug!(
                    why = why.as_str(),
                    "not delivering; handing the message back"
                );
                let _ = self
                    .persist("park", || held.park(failed, Parked::ForItsNextCopy))
                    .await;
                self.hand_back(msg).await
            }
        }
    }

    /// Takes this message's claim on its key, or settles the message when the
    /// key is done or another message holds it. Waits while this very message
    /// is still being delivered by a live holder.
    async fn claim<'d, S: Receipt, R: Republish>(
        &'d self,
        env: &Envelope,
        msg: S,
        out: &R,
    ) -> Claimed<'d, S> {
        let mut busy_wait = BUSY_MIN;
        loop {
            let check = self
                .persist("claim", || async {
                    if out.alone() {
                        self.dedup.check_alone(&env.key, &env.message_id).await
                    } else {
                        self.dedup.check(&env.key, &env.message_id).await
                    }
                })
                .await;
            match check {
                None => return Claimed::Settled(self.hand_back(msg).await),
                Some(Check::Deliver(held)) => return Claimed::Held(held, msg),
                Some(Check::Done(tier)) => {
                    tracing::debug!(tier = tier.as_str(), "duplicate of a delivered key");
                    // With partitions, the key may be done here and not in its
                    // done-log (the append failed, the message came back): every
                    // ack of a done key follows its append, so a host that takes
                    // the partition over knows it. Without partitions, a no-op.
                    if let Err(e) = out.done(env).await {
                        tracing::warn!(error = %e, "could not append the key to its done-log; handing the message back");
                        return Claimed::Settled(self.hand_back(msg).await);
                    }
                    return Claimed::Settled(ack(msg, Outcome::Duplicate { tier }).await);
                }
                Some(Check::HeldByAnother { holder }) => {
                    tracing::debug!(%holder, "duplicate of a key another message holds");
                    let tier = crate::dedup::Tier::Sqlite;
                    return Claimed::Settled(ack(msg, Outcome::Duplicate { tier }).await);
                }
                Some(Check::StillBeingDelivered) => {
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
                        Woke::Abandon => return Claimed::Settled(self.hand_back(msg).await),
                        // Our own channel went too: the broker has this copy again.
                        Woke::Lost => return Claimed::Settled(Outcome::HandedBack),
                        Woke::Again => busy_wait = (busy_wait * 2).min(BUSY_MAX),
                    }
                }
            }
        }
    }

    /// A 2xx: recorded in the store, appended to the done-log (with
    /// partitions), then acked.
    async fn delivered<S: Receipt, R: Republish>(
        &self,
        env: &Envelope,
        status: u16,
        failed: u32,
        msg: S,
        held: &Held<'_>,
        out: &R,
    ) -> Outcome {
        tracing::debug!(status, "delivered");
        if !self.record_done(held).await {
            return self.hand_back(msg).await;
        }
        if let Err(e) = out.done(env).await {
            // Recorded here, not in the done-log: a copy that comes back to this
            // host appends it before its ack.
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

    /// A failed delivery (after the in-process retries): a later try from a
    /// delay tier, or a dead letter, as the retry policy decides.
    async fn failed<S: Receipt, R: Republish>(
        &self,
        env: &mut Envelope,
        error: delivery::Error,
        failed: u32,
        msg: S,
        held: &Held<'_>,
        out: &R,
    ) -> Outcome {
        env.attempts = failed;
        if msg.lost() {
            // The broker has this message again; leave the claim (and the
            // attempts) to the copy it hands out, and republish nothing.
            tracing::info!(attempts = failed, error = %error, "delivery failed after the broker connection was lost; leaving the message to its redelivery");
            let _ = self
                .persist("park", || held.park(failed, Parked::ForItsNextCopy))
                .await;
            return Outcome::HandedBack;
        }
        match self.policy.after_failure(failed, &Failure::of(&error)) {
            Decision::Dead(reason) => {
                let info = DeadInfo {
                    reason,
                    last_error: error.to_string(),
                    last_status: error.status(),
                    dead_at: rfc3339_now(),
                };
                self.dead_letter(env, info, msg, Some(held), out).await
            }
            Decision::Delay { tier, floor } => {
                let why = error.to_string();
                let later = Later {
                    tier,
                    floor,
                    why: &why,
                };
                self.delay(env, later, msg, held, out).await
            }
            // The in-process retries ended early (the worker stops): park the
            // retry on the broker.
            Decision::Inline(_) => {
                let later = Later {
                    tier: self.policy.tier_at_least(Duration::ZERO),
                    floor: None,
                    why: "stopping",
                };
                self.delay(env, later, msg, held, out).await
            }
        }
    }

    /// Delivers with the in-process retries the policy allows, each attempt
    /// through the target's gate (which may hold the message instead).
    /// Stopping ends the retries (the caller parks the message on the
    /// broker); an attempt under way runs to its end (`worker.timeout_ms`).
    /// A probe (`probe`) that fails spends no attempt: it goes back to the
    /// hold queue with the rest.
    async fn deliver_inline(
        &self,
        env: &Envelope,
        gate: Option<&Arc<Gate>>,
        probe: bool,
    ) -> Attempted {
        let mut failed = env.attempts;
        loop {
            let pass = match gate {
                Some(g) => match g
                    .admit(probe, self.targets.patience(), &self.shutdown)
                    .await
                {
                    Admission::Go(p) => Some(p),
                    Admission::Hold(why) => {
                        let why = NotStarted::Held(why);
                        return Attempted::NotStarted { why, failed };
                    }
                    Admission::Stopping => {
                        let why = NotStarted::Stopping;
                        return Attempted::NotStarted { why, failed };
                    }
                },
                None => None,
            };
            let was_probe = pass.as_ref().is_some_and(|p| p.is_probe());
            let result = {
                // The semaphore is never closed: a permit always comes.
                let _permit = self.deliveries.acquire().await;
                if self.shutdown.is_cancelled() && failed == env.attempts {
                    let why = NotStarted::Stopping;
                    return Attempted::NotStarted { why, failed };
                }
                if !self.dedup.store().lease_is_fresh() {
                    // Other workers may soon treat our claims as abandoned: do not
                    // start a delivery that could overlap with theirs.
                    let why = NotStarted::StaleLease;
                    return Attempted::NotStarted { why, failed };
                }
                let started = Instant::now();
                let url = gate.map(|g| g.url());
                let r = self.delivery.deliver(env, failed + 1, url).await;
                self.events.attempted(started.elapsed());
                if let Some(pass) = pass {
                    pass.finish(Observed::of(&r));
                }
                r
            };
            let error = match result {
                Ok(status) => return Attempted::Delivered { status, failed },
                Err(e) => e,
            };
            if was_probe
                && Failure::of(&error).is_retryable()
                && gate.is_some_and(|g| g.breaker_on())
            {
                let why = NotStarted::Held(HoldWhy::Open);
                return Attempted::NotStarted { why, failed };
            }
            failed += 1;
            let wait = match self.policy.after_failure(failed, &Failure::of(&error)) {
                Decision::Inline(d) if !self.shutdown.is_cancelled() => {
                    self.policy
                        .jittered(d, rand::random::<f64>(), error.retry_after())
                }
                _ => return Attempted::Failed { error, failed },
            };
            tracing::debug!(error = %error, ?wait, "retrying in-process");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.cancelled() => return Attempted::Failed { error, failed },
            }
        }
    }
}
