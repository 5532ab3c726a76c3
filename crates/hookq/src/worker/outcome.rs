//! How a processed message leaves this worker: a 2xx recorded, a later try
//! from a delay tier, a dead letter, or a hand-back; each republish
//! confirmed before the ack, each claim settled once.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use super::process::{Later, Processor, Receipt, Republish};
use crate::dedup::{Held, Parked};
use crate::events::Outcome;
use crate::message::{DeadInfo, Envelope, epoch_ms};
use crate::targets::{Gate, HoldWhy};

/// The pause before a hand-back, so that a broker or store that keeps failing
/// does not turn into a hot loop.
const HAND_BACK_PAUSE: Duration = Duration::from_millis(500);

impl Processor {
    /// Records a 2xx. Never raced against the end of the grace period: the
    /// delivery happened, and forgetting it would deliver it again. Only a store
    /// that stays unwritable for a further `worker.timeout_ms` after the grace
    /// period makes it give up (the message then goes back: the one case where
    /// a graceful stop can deliver a key twice).
    pub(super) async fn record_done(&self, held: &Held<'_>) -> bool {
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
    pub(super) async fn delay<S: Receipt, R: Republish>(
        &self,
        env: &mut Envelope,
        later: Later<'_>,
        msg: S,
        held: &Held<'_>,
        out: &R,
    ) -> Outcome {
        let Later { tier, floor, why } = later;
        env.not_before = floor
            .filter(|f| *f > tier.0)
            .map(|f| epoch_ms().saturating_add(u64::try_from(f.as_millis()).unwrap_or(u64::MAX)));
        let expiration = self
            .policy
            .tier_expiration(tier, rand::random::<f64>(), floor);
        tracing::info!(attempts = env.attempts, tier = ?tier.0, wait = ?expiration, why, "retrying later");
        match out.to_delay(tier, env, expiration).await {
            Ok(()) => {
                self.park_then_ack(msg, held, env.attempts, Outcome::Retried { tier })
                    .await
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not move the message to its delay queue; handing it back");
                self.refused(msg, held, env.attempts).await
            }
        }
    }

    /// After a confirmed republish of the message (a delay tier, a hold
    /// queue): parks the claim for the copy, then acks as `outcome`; a store
    /// that cannot park hands the message back instead.
    async fn park_then_ack<S: Receipt>(
        &self,
        msg: S,
        held: &Held<'_>,
        attempts: u32,
        outcome: Outcome,
    ) -> Outcome {
        if self
            .persist("park", || held.park(attempts, Parked::ForItsNextCopy))
            .await
            .is_none()
        {
            return self.hand_back(msg).await;
        }
        ack(msg, outcome).await
    }

    /// Moves the message to its target's hold queue with confirm (attempts
    /// as they are: a hold is not an attempt), parks the claim for that
    /// copy, then acks.
    pub(super) async fn hold<S: Receipt, R: Republish>(
        &self,
        env: &mut Envelope,
        gate: &Gate,
        why: HoldWhy,
        msg: S,
        held: &Held<'_>,
        out: &R,
    ) -> Outcome {
        env.probe = false;
        tracing::debug!(
            target_name = gate.name(),
            attempts = env.attempts,
            why = why.as_str(),
            "holding the message on the broker"
        );
        match out.to_hold(gate.queue_id(), env).await {
            Ok(()) => {
                self.park_then_ack(msg, held, env.attempts, Outcome::Held)
                    .await
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not move the message to its target's hold queue; handing it back");
                self.refused(msg, held, env.attempts).await
            }
        }
    }

    /// Publishes to `P.dead` with confirm, releases the claim (a dead-lettered
    /// key may be processed again), then acks. `held` is `None` for a message
    /// that was never claimed (not a hookq message).
    pub(super) async fn dead_letter<S: Receipt, R: Republish>(
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
    pub(super) async fn refused<S: Receipt>(
        &self,
        msg: S,
        held: &Held<'_>,
        attempts: u32,
    ) -> Outcome {
        let _ = self
            .persist("park", || held.park(attempts, Parked::RepublishRefused))
            .await;
        self.hand_back(msg).await
    }

    pub(super) async fn hand_back<S: Receipt>(&self, msg: S) -> Outcome {
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
    pub(super) async fn persist<T, E, F, Fut>(&self, what: &'static str, op: F) -> Option<T>
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
pub(super) async fn ack<S: Receipt>(msg: S, outcome: Outcome) -> Outcome {
    match msg.ack().await {
        Ok(()) => outcome,
        Err(e) => {
            tracing::warn!(error = %e, "ack failed; the broker will redeliver the message");
            Outcome::HandedBack
        }
    }
}
