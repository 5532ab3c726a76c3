//! One message, from delivery to settlement: dedup, deliver with in-process
//! retries, then ack, delay or dead-letter.
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

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Worker;
use crate::broker::{Acker, Incoming};
use crate::dedup::{Check, Held, Tier};
use crate::message::{DeadInfo, DeadReason, Envelope, epoch_ms, rfc3339_now};
use crate::retry::Decision;

/// How a message was settled, for tests and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Delivered,
    Duplicate,
    Delayed,
    Dead(DeadReason),
    HandedBack,
}

/// Polling a claim that a live holder works on: from this, doubling to [`BUSY_MAX`].
const BUSY_MIN: Duration = Duration::from_millis(50);
const BUSY_MAX: Duration = Duration::from_secs(1);

impl Worker {
    pub(super) async fn process(&self, msg: Incoming) -> Settled {
        let lost = msg.lost.clone();
        let (env, acker) = match msg.envelope {
            Ok(env) => (env, msg.acker),
            Err((err, stand_in)) => {
                tracing::warn!(message_id = %stand_in.message_id, "{err}: parking it in the dead-letter queue");
                let info = DeadInfo {
                    reason: DeadReason::Invalid,
                    last_error: err.to_string(),
                    last_status: None,
                    dead_at: rfc3339_now(),
                };
                return self.dead_letter(stand_in, info, msg.acker, None).await;
            }
        };
        let span = tracing::info_span!("message", message_id = %env.message_id, key = %env.key, source = %env.source);
        self.settle(env, acker, &lost).instrument(span).await
    }

    async fn settle(&self, mut env: Envelope, acker: Acker, lost: &CancellationToken) -> Settled {
        let mut busy_wait = BUSY_MIN;
        let held = loop {
            let check = self
                .persist("claim", || self.dedup.check(&env.key, &env.message_id))
                .await;
            match check {
                None => return self.hand_back(acker).await,
                Some(Check::Deliver(held)) => break held,
                Some(Check::Done(tier)) => {
                    self.metrics
                        .dedup_hits
                        .get_or_create(&crate::metrics::TierLabels {
                            tier: tier.as_str(),
                        })
                        .inc();
                    tracing::debug!(tier = tier.as_str(), "duplicate of a delivered key");
                    return self.ack(acker, &env, Settled::Duplicate).await;
                }
                Some(Check::InFlight { holder }) => {
                    self.metrics
                        .dedup_hits
                        .get_or_create(&crate::metrics::TierLabels {
                            tier: Tier::Sqlite.as_str(),
                        })
                        .inc();
                    tracing::debug!(%holder, "duplicate of a key another message holds");
                    return self.ack(acker, &env, Settled::Duplicate).await;
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
                    tokio::select! {
                        _ = self.abandon.cancelled() => return self.hand_back(acker).await,
                        // Our own channel went too: the broker has this copy again.
                        _ = lost.cancelled() => return Settled::HandedBack,
                        _ = tokio::time::sleep(busy_wait) => {}
                    }
                    busy_wait = (busy_wait * 2).min(BUSY_MAX);
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
            return self.dead_letter(env, info, acker, Some(&held)).await;
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
                    .delay(env, tier, Some(remaining), acker, &held, why)
                    .await;
            }
        }

        let (result, failed) = self.deliver_inline(&env).await;
        match result {
            Ok(status) => {
                tracing::debug!(status, "delivered");
                if !self.record_done(&held).await {
                    return self.hand_back(acker).await;
                }
                if lost.is_cancelled() {
                    // Recorded: the copy the broker hands out again is acked as a duplicate.
                    return Settled::HandedBack;
                }
                self.ack(acker, &env, Settled::Delivered).await
            }
            Err(e) => {
                env.attempts = failed;
                if lost.is_cancelled() {
                    // The broker has this message again; leave the claim (and the
                    // attempts) to the copy it hands out, and republish nothing.
                    tracing::info!(attempts = failed, error = %e, "delivery failed after the broker connection was lost; leaving the message to its redelivery");
                    if self
                        .persist("park", || held.park(failed, false))
                        .await
                        .is_none()
                    {
                        tracing::debug!("could not park the claim; the lease ends it");
                    }
                    return Settled::HandedBack;
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
                        self.dead_letter(env, info, acker, Some(&held)).await
                    }
                    Decision::Delay { tier, floor } => {
                        let why = e.to_string();
                        self.delay(env, tier, floor, acker, &held, &why).await
                    }
                    // Only reached when stopping: park the retry on the broker.
                    Decision::Inline(_) => self.delay(env, 0, None, acker, &held, "stopping").await,
                }
            }
        }
    }

    /// Delivers with the in-process retries the policy allows; returns the last
    /// result and the failed-attempt count after it. Stopping ends the retries
    /// (the caller parks the message on the broker); an attempt under way runs
    /// to its end (`worker.timeout_ms`).
    async fn deliver_inline(&self, env: &Envelope) -> (Result<u16, crate::handler::Error>, u32) {
        let mut failed = env.attempts;
        loop {
            let result = {
                let Ok(_permit) = self.deliveries.acquire().await else {
                    return (Err(crate::handler::Error::Other("stopping".into())), failed);
                };
                if !self.dedup.store().lease_is_fresh() {
                    // Other workers may soon treat our claims as abandoned: do not
                    // start a delivery that could overlap with theirs.
                    return (
                        Err(crate::handler::Error::Other(
                            "the dedup store has not renewed this worker's lease".into(),
                        )),
                        failed,
                    );
                }
                let started = std::time::Instant::now();
                let r = self.handler.deliver(env, failed + 1).await;
                self.metrics
                    .delivery_seconds
                    .observe(started.elapsed().as_secs_f64());
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
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times();
        let run = (|| held.done())
            .retry(backoff)
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
    async fn delay(
        &self,
        mut env: Envelope,
        tier: usize,
        floor: Option<Duration>,
        acker: Acker,
        held: &Held<'_>,
        why: &str,
    ) -> Settled {
        let topo = self.broker.topology();
        let Some(t) = topo.tiers.get(tier).or(topo.tiers.last()) else {
            return self.refused(acker, held, env.attempts).await;
        };
        env.not_before = floor
            .filter(|f| *f > t.delay)
            .map(|f| epoch_ms().saturating_add(u64::try_from(f.as_millis()).unwrap_or(u64::MAX)));
        let expiration = self
            .policy
            .tier_expiration(tier, rand::random::<f64>(), floor);
        tracing::info!(attempts = env.attempts, queue = %t.queue, wait = ?expiration, why, "retrying later");
        match self
            .broker
            .publish_to_queue(&t.queue, &env, Some(expiration), self.publish_timeout)
            .await
        {
            Ok(()) => {
                if self
                    .persist("park", || held.park(env.attempts, false))
                    .await
                    .is_none()
                {
                    return self.hand_back(acker).await;
                }
                self.ack(acker, &env, Settled::Delayed).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not move the message to its delay queue; handing it back");
                self.refused(acker, held, env.attempts).await
            }
        }
    }

    /// Publishes to `P.dead` with confirm, releases the claim (a dead-lettered
    /// key may be processed again), then acks. `held` is `None` for a message
    /// that was never claimed (not a hookq message).
    async fn dead_letter(
        &self,
        mut env: Envelope,
        info: DeadInfo,
        acker: Acker,
        held: Option<&Held<'_>>,
    ) -> Settled {
        let reason = info.reason;
        env.dead = Some(info);
        match self.broker.publish_dead(&env, self.publish_timeout).await {
            Ok(()) => {
                if let Some(held) = held
                    && self.persist("release", || held.release()).await.is_none()
                {
                    return self.hand_back(acker).await;
                }
                self.ack(acker, &env, Settled::Dead(reason)).await
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not publish the dead letter; handing the message back");
                match held {
                    Some(held) => self.refused(acker, held, env.attempts).await,
                    None => self.hand_back(acker).await,
                }
            }
        }
    }

    /// The broker refused a republish: count it on the claim (after
    /// `amqp.delivery_limit` of them the message is dead-lettered), park the
    /// claim and hand the message back.
    async fn refused(&self, acker: Acker, held: &Held<'_>, attempts: u32) -> Settled {
        let _ = self.persist("park", || held.park(attempts, true)).await;
        self.hand_back(acker).await
    }

    async fn ack(&self, acker: Acker, env: &Envelope, settled: Settled) -> Settled {
        match acker.ack().await {
            Ok(()) => {
                self.metrics.delivery(&env.source, outcome(&settled));
                settled
            }
            Err(e) => {
                // The channel is gone: the broker will redeliver; dedup recognises it.
                tracing::warn!(error = %e, "ack failed; the broker will redeliver the message");
                Settled::HandedBack
            }
        }
    }

    /// Gives the message back to the queue, after a short pause so that a broker
    /// or store that keeps failing does not turn into a hot loop.
    async fn hand_back(&self, acker: Acker) -> Settled {
        if !self.shutdown.is_cancelled() {
            tokio::select! {
                _ = self.abandon.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        if let Err(e) = acker.requeue().await {
            tracing::debug!(error = %e, "requeue failed; the broker will redeliver anyway");
        }
        Settled::HandedBack
    }

    /// Runs a dedup-store operation until it succeeds, backing off while the store
    /// cannot be written (the store logs that once and /readyz turns 503). `None`
    /// once the grace period is over: the caller hands the message back.
    async fn persist<T, E, F, Fut>(&self, what: &'static str, op: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times();
        let run = op.retry(backoff).sleep(tokio::time::sleep).notify(
            |e, _| tracing::debug!(what, error = %e, "dedup store busy or failing; retrying"),
        );
        tokio::select! {
            r = run => r.ok(),
            _ = self.abandon.cancelled() => None,
        }
    }
}

/// The metric label of an outcome.
fn outcome(s: &Settled) -> &'static str {
    match s {
        Settled::Delivered => "delivered",
        Settled::Duplicate => "duplicate",
        Settled::Delayed => "retried",
        Settled::Dead(_) => "dead",
        Settled::HandedBack => "handed_back",
    }
}
