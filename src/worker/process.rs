//! One message, from delivery to settlement: dedup, deliver with in-process
//! retries, then ack, delay or dead-letter.
//!
//! The invariant this file keeps: a message is acked only after its success is
//! recorded in SQLite, or after its republish (to a delay queue or `P.dead`) was
//! confirmed by the broker. Whatever fails before that hands the message back to
//! the queue (nack with requeue); nothing is dropped.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use tracing::Instrument;

use super::Worker;
use crate::broker::{Acker, Incoming};
use crate::dedup::Check;
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

impl Worker {
    pub(super) async fn process(&self, msg: Incoming) -> Settled {
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
                return self.dead_letter(stand_in, info, msg.acker, false).await;
            }
        };
        let span = tracing::info_span!("message", message_id = %env.message_id, key = %env.key, source = %env.source);
        self.settle(env, acker).instrument(span).await
    }

    async fn settle(&self, env: Envelope, acker: Acker) -> Settled {
        let check = match self
            .persist("claim", || self.dedup.check(&env.key, &env.message_id))
            .await
        {
            Some(c) => c,
            None => return self.hand_back(acker).await,
        };
        match check {
            Check::Deliver => {}
            Check::Done(tier) => {
                self.metrics
                    .dedup_hits
                    .get_or_create(&crate::metrics::TierLabels {
                        tier: tier.as_str(),
                    })
                    .inc();
                tracing::debug!(tier = tier.as_str(), "duplicate of a delivered key");
                return self.ack(acker, &env, "duplicate", Settled::Duplicate).await;
            }
            Check::InFlight { holder } => {
                self.metrics
                    .dedup_hits
                    .get_or_create(&crate::metrics::TierLabels { tier: "sqlite" })
                    .inc();
                tracing::debug!(%holder, "duplicate of a key another message holds");
                return self.ack(acker, &env, "duplicate", Settled::Duplicate).await;
            }
        }

        // Back early from a delay tier shorter than the target's Retry-After.
        if let Some(not_before) = env.not_before {
            let now = epoch_ms();
            if not_before > now {
                let remaining = Duration::from_millis(not_before - now);
                let tier = self.policy.tier_at_least(remaining);
                return self
                    .delay(
                        env,
                        tier,
                        Some(remaining),
                        acker,
                        "Retry-After not over yet",
                    )
                    .await;
            }
        }
        let (result, failed) = self.deliver_inline(&env).await;
        match result {
            Ok(status) => {
                tracing::debug!(status, "delivered");
                if self
                    .persist("record", || self.dedup.done(&env.key))
                    .await
                    .is_none()
                {
                    return self.hand_back(acker).await;
                }
                let settled = self.ack(acker, &env, "delivered", Settled::Delivered).await;
                self.dedup.remember(&env.key);
                settled
            }
            Err(e) => {
                match self.policy.after_failure(failed, &e.failure()) {
                    Decision::Dead(reason) => {
                        tracing::warn!(attempts = failed, %reason, error = %e, "dead-lettering");
                        let info = DeadInfo {
                            reason,
                            last_error: e.to_string(),
                            last_status: e.status(),
                            dead_at: rfc3339_now(),
                        };
                        let mut env = env;
                        env.attempts = failed;
                        self.dead_letter(env, info, acker, true).await
                    }
                    Decision::Delay { tier, floor } => {
                        let mut env = env;
                        env.attempts = failed;
                        self.delay(env, tier, floor, acker, &e.to_string()).await
                    }
                    // Only reached when stopping: park the retry on the broker.
                    Decision::Inline(_) => {
                        let mut env = env;
                        env.attempts = failed;
                        self.delay(env, 0, None, acker, "stopping").await
                    }
                }
            }
        }
    }

    /// Delivers with the in-process retries (`backon`); returns the last result and
    /// the failed-attempt count after it.
    async fn deliver_inline(&self, env: &Envelope) -> (Result<u16, crate::handler::Error>, u32) {
        let failed = AtomicU32::new(env.attempts);
        let attempt = || async {
            let n = failed.load(Ordering::Relaxed) + 1;
            let started = Instant::now();
            let r = self.handler.deliver(env, n).await;
            self.metrics
                .delivery_seconds
                .observe(started.elapsed().as_secs_f64());
            if r.is_err() {
                failed.store(n, Ordering::Relaxed);
            }
            r
        };
        let inline_wait = |e: &crate::handler::Error| match self
            .policy
            .after_failure(failed.load(Ordering::Relaxed), &e.failure())
        {
            Decision::Inline(d) if !self.shutdown.is_cancelled() => Some(d),
            _ => None,
        };
        let result = attempt
            .retry(self.policy.inline_backoff())
            .sleep(tokio::time::sleep)
            .when(|e| inline_wait(e).is_some())
            .adjust(|e, _| {
                inline_wait(e).map(|d| {
                    self.policy
                        .jittered(d, rand::random::<f64>(), e.failure_floor())
                })
            })
            .notify(|e, wait| tracing::debug!(error = %e, ?wait, "retrying in-process"))
            .await;
        (result, failed.load(Ordering::Relaxed))
    }

    /// Republishes to a delay tier with confirm, then acks. A `floor` longer than
    /// the tier (a long Retry-After) is kept as the not-before time, and the
    /// message is delayed again when it comes back early.
    async fn delay(
        &self,
        mut env: Envelope,
        tier: usize,
        floor: Option<Duration>,
        acker: Acker,
        why: &str,
    ) -> Settled {
        let topo = self.broker.topology();
        let Some(t) = topo.tiers.get(tier).or(topo.tiers.last()) else {
            return self.hand_back(acker).await;
        };
        env.not_before = floor
            .filter(|f| *f > t.delay)
            .map(|f| epoch_ms() + f.as_millis() as u64);
        let expiration = self
            .policy
            .tier_expiration(tier, rand::random::<f64>(), floor);
        tracing::info!(attempts = env.attempts, queue = %t.queue, wait = ?expiration, why, "retrying later");
        match self
            .broker
            .publish_to_queue(&t.queue, &env, Some(expiration), self.publish_timeout)
            .await
        {
            Ok(()) => self.ack(acker, &env, "retried", Settled::Delayed).await,
            Err(e) => {
                tracing::warn!(error = %e, "could not move the message to its delay queue; handing it back");
                self.hand_back(acker).await
            }
        }
    }

    /// Releases the claim (a dead-lettered key may be processed again), publishes
    /// to `P.dead` with confirm, then acks. Releasing first is safe: if the
    /// publish fails the message is handed back and its redelivery claims the key again.
    async fn dead_letter(
        &self,
        mut env: Envelope,
        info: DeadInfo,
        acker: Acker,
        claimed: bool,
    ) -> Settled {
        if claimed
            && self
                .persist("release", || self.dedup.release(&env.key, &env.message_id))
                .await
                .is_none()
        {
            return self.hand_back(acker).await;
        }
        let reason = info.reason;
        env.dead = Some(info);
        match self.broker.publish_dead(&env, self.publish_timeout).await {
            Ok(()) => self.ack(acker, &env, "dead", Settled::Dead(reason)).await,
            Err(e) => {
                tracing::warn!(error = %e, "could not publish the dead letter; handing the message back");
                self.hand_back(acker).await
            }
        }
    }

    async fn ack(
        &self,
        acker: Acker,
        env: &Envelope,
        outcome: &'static str,
        settled: Settled,
    ) -> Settled {
        match acker.ack().await {
            Ok(()) => {
                self.metrics.delivery(&env.source, outcome);
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

impl crate::handler::Error {
    /// The Retry-After floor, if the target gave one.
    fn failure_floor(&self) -> Option<Duration> {
        match self.failure() {
            crate::retry::Failure::Retryable { retry_after } => retry_after,
            crate::retry::Failure::Permanent => None,
        }
    }
}
