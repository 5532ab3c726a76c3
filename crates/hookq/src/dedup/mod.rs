//! De-duplication: an in-process LRU in front of the SQLite store shared by every
//! worker on the host.
//!
//! The LRU only caches a fact SQLite already holds ("this key is done"), so it
//! can answer repeats without a round trip to the store thread but can never make
//! a decision SQLite would not. Claims always go to SQLite.

pub mod store;

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lru::LruCache;
use tokio_util::sync::CancellationToken;

pub use store::{Claim, Error, Store};

use crate::config::DedupSettings;
use crate::message::{DedupKey, MessageId, epoch_ms};

/// Which tier recognised a duplicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Lru,
    Sqlite,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::Sqlite => "sqlite",
        }
    }
}

/// The answer for one incoming message.
pub enum Check<'a> {
    /// This message holds the key: deliver it, then settle the claim.
    Deliver(Held<'a>),
    /// The key was already delivered successfully.
    Done(Tier),
    /// Another message holds the key and is still with the broker (in flight, or
    /// in a delay queue): it will be delivered or dead-lettered, so this copy is
    /// not needed.
    HeldByAnother { holder: String },
    /// This very message is being delivered by a live holder (it came back after
    /// a dropped connection): wait for that delivery to end, do not start another.
    StillBeingDelivered,
}

/// A claim this worker holds. Receipt it exactly once: [`Held::done`],
/// [`Held::release`] or [`Held::park`]. One that is dropped unsettled (a task
/// that panicked) is parked in the background, so that the message's next
/// copy can take it without waiting for this process's lease to run out.
/// Why a claim is parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parked {
    /// The message waits for its next copy (a delay tier, a redelivery).
    ForItsNextCopy,
    /// The broker refused the message's republish: counted, and after
    /// `amqp.delivery_limit` such refusals the message is dead-lettered.
    RepublishRefused,
}

pub struct Held<'a> {
    dedup: &'a Dedup,
    key: DedupKey,
    message_id: MessageId,
    /// Failed deliveries of this message that earlier holders recorded.
    pub attempts: u32,
    /// Republishes of this message the broker refused so far.
    pub handbacks: u32,
    settled: AtomicBool,
}

impl Held<'_> {
    fn finish<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        if r.is_ok() {
            self.settled.store(true, Ordering::Relaxed);
        }
        r
    }

    /// Records the success (before the ack) and remembers the key in the LRU.
    pub async fn done(&self) -> Result<(), Error> {
        let r = self.dedup.store.done(&self.key.0).await;
        if r.is_ok() {
            self.dedup.remember(&self.key);
        }
        self.finish(r)
    }

    /// Lets the key be claimed again: its message is being dead-lettered.
    pub async fn release(&self) -> Result<(), Error> {
        let r = self
            .dedup
            .store
            .release(&self.key.0, &self.message_id.0)
            .await;
        self.finish(r)
    }

    /// Leaves the claim to this message's next copy (a delay tier, or the work
    /// queue after a hand-back), with the failed attempts so far.
    pub async fn park(&self, attempts: u32, why: Parked) -> Result<(), Error> {
        let refused = why == Parked::RepublishRefused;
        let r = self
            .dedup
            .store
            .park(&self.key.0, &self.message_id.0, attempts, refused)
            .await;
        self.finish(r)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Relaxed) {
            self.dedup
                .store
                .park_in_background(&self.key.0, &self.message_id.0, self.attempts);
        }
    }
}

pub struct Dedup {
    /// Keys known done, with when SQLite's record of them expires (epoch ms): an
    /// entry past it is not trusted (SQLite may have pruned the key).
    lru: Mutex<LruCache<String, u64>>,
    store: Store,
    retention: Duration,
}

impl Dedup {
    /// The store's commits are reported to `events`.
    pub fn open(settings: &DedupSettings, events: crate::events::Events) -> Self {
        let cap = NonZeroUsize::new(settings.lru_capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            lru: Mutex::new(LruCache::new(cap)),
            store: Store::open(
                &settings.path,
                settings.lease,
                Box::new(move || events.store_committed()),
            ),
            retention: settings.retention,
        }
    }

    pub fn retention(&self) -> Duration {
        self.retention
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn retention_ms(&self) -> u64 {
        u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX)
    }

    fn lru_has(&self, key: &str, now: u64) -> bool {
        self.lru
            .lock()
            .map(|mut l| l.get(key).is_some_and(|expires| now < *expires))
            .unwrap_or(false)
    }

    fn remember_until(&self, key: &DedupKey, expires: u64) {
        if let Ok(mut l) = self.lru.lock() {
            l.put(key.0.clone(), expires);
        }
    }

    /// Remembers a key this worker has just recorded as done.
    pub fn remember(&self, key: &DedupKey) {
        self.remember_until(key, epoch_ms().saturating_add(self.retention_ms()));
    }

    pub async fn check(&self, key: &DedupKey, message_id: &MessageId) -> Result<Check<'_>, Error> {
        self.check_at(key, message_id, epoch_ms()).await
    }

    /// [`Dedup::check`] at a given time (tests move the clock).
    pub async fn check_at(
        &self,
        key: &DedupKey,
        message_id: &MessageId,
        now: u64,
    ) -> Result<Check<'_>, Error> {
        if self.lru_has(&key.0, now) {
            return Ok(Check::Done(Tier::Lru));
        }
        let now_i = i64::try_from(now).unwrap_or(i64::MAX);
        Ok(
            match self.store.claim_at(&key.0, &message_id.0, now_i).await? {
                Claim::Claimed {
                    attempts,
                    handbacks,
                } => Check::Deliver(Held {
                    dedup: self,
                    key: key.clone(),
                    message_id: message_id.clone(),
                    attempts,
                    handbacks,
                    settled: AtomicBool::new(false),
                }),
                Claim::Done { at_ms } => {
                    // Trusted only as long as SQLite keeps the record: until its own
                    // expiry, not for a fresh full retention.
                    self.remember_until(key, at_ms.saturating_add(self.retention_ms()));
                    Check::Done(Tier::Sqlite)
                }
                Claim::HeldBy(holder) => Check::HeldByAnother { holder },
                Claim::Busy => Check::StillBeingDelivered,
            },
        )
    }

    /// Prunes keys older than the retention until `shutdown`: a pass over the
    /// whole store, a small step at a time, every `every`.
    pub async fn prune_forever(&self, every: Duration, shutdown: CancellationToken) {
        loop {
            let (mut after, mut pruned) = (None, 0);
            while !shutdown.is_cancelled() {
                match self.store.prune(self.retention, after).await {
                    Ok(step) => {
                        pruned += step.deleted;
                        match step.next {
                            Some(next) => after = Some(next),
                            None => break,
                        }
                        // Let the claims waiting for the store go first.
                        tokio::task::yield_now().await;
                    }
                    Err(_) => break, // already logged by the store
                }
            }
            if pruned > 0 {
                tracing::debug!(pruned, "pruned old dedup keys");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dedup(dir: &std::path::Path, retention_ms: u64) -> Dedup {
        let settings = DedupSettings {
            path: dir.join("d.db"),
            retention: std::time::Duration::from_millis(retention_ms),
            ..Default::default()
        };
        Dedup::open(&settings, crate::events::Events::new([]))
    }

    fn tier(c: &Check<'_>) -> Option<Tier> {
        match c {
            Check::Done(t) => Some(*t),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_key_found_done_in_sqlite_is_trusted_in_the_lru_until_its_own_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let now = epoch_ms();
        let done_at = now - 200_000;
        let writer = dedup(dir.path(), 300_000);
        writer
            .store()
            .done_at("s:k", i64::try_from(done_at).unwrap())
            .await
            .unwrap();
        // Another worker, with an empty LRU, learns it from SQLite...
        let reader = dedup(dir.path(), 300_000);
        let (key, id) = (DedupKey("s:k".into()), MessageId::new());
        let c = reader.check_at(&key, &id, now).await.unwrap();
        assert_eq!(tier(&c), Some(Tier::Sqlite));
        let c = reader.check_at(&key, &id, now + 50_000).await.unwrap();
        assert_eq!(tier(&c), Some(Tier::Lru));
        // ...and stops trusting its LRU when SQLite's record expires (done_at +
        // retention), not a full retention after it looked.
        let c = reader.check_at(&key, &id, done_at + 300_001).await.unwrap();
        assert_eq!(tier(&c), Some(Tier::Sqlite));
    }

    #[tokio::test]
    async fn an_unsettled_claim_is_parked_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let d = dedup(dir.path(), 300_000);
        let (key, id) = (DedupKey("s:k".into()), MessageId::new());
        let held = d.check(&key, &id).await.unwrap();
        assert!(matches!(held, Check::Deliver(_)));
        assert!(matches!(
            d.check(&key, &id).await.unwrap(),
            Check::StillBeingDelivered
        ));
        drop(held);
        // The park goes to the store thread ahead of the next request.
        assert!(matches!(
            d.check(&key, &id).await.unwrap(),
            Check::Deliver(_)
        ));
    }
}
