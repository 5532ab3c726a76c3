//! De-duplication: an in-process LRU in front of the SQLite store shared by every
//! worker on the host.
//!
//! The LRU only caches a fact SQLite already holds ("this key is done"), so it
//! can answer repeats without a round trip to the store thread but can never make
//! a decision SQLite would not.
//!
//! **Claims** go to SQLite when workers share a work queue: any of them may
//! get any copy of a key, so the claim must be one all of them see. With
//! partitions, a partition's single active consumer is the only one that
//! delivers its keys, and the processes of one host hand a partition over
//! through the store ([`store::Store::take_partition`]): its claims are kept
//! in memory ([`Dedup::check_alone`]), and the done is the one durable write
//! a message costs.

pub mod store;

use std::collections::HashMap;
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

/// Why a claim is parked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parked {
    /// The message waits for its next copy (a delay tier, a redelivery).
    ForItsNextCopy,
    /// The broker refused the message's republish: counted, and after
    /// `amqp.delivery_limit` such refusals the message is dead-lettered.
    RepublishRefused,
}

/// A claim this worker holds. Receipt it exactly once: [`Held::done`],
/// [`Held::release`] or [`Held::park`]. One that is dropped unsettled (a task
/// that panicked) is parked (in the background, for a claim in the store),
/// so that the message's next copy can take it without waiting for this
/// process's lease to run out.
pub struct Held<'a> {
    dedup: &'a Dedup,
    key: DedupKey,
    message_id: MessageId,
    /// Failed deliveries of this message that earlier holders recorded.
    pub attempts: u32,
    /// Republishes of this message the broker refused so far.
    pub handbacks: u32,
    settled: AtomicBool,
    /// The claim is in memory (a partition this process delivers alone).
    alone: bool,
}

impl<'a> Held<'a> {
    fn new(
        dedup: &'a Dedup,
        key: &DedupKey,
        message_id: &MessageId,
        (attempts, handbacks): (u32, u32),
        alone: bool,
    ) -> Self {
        Self {
            dedup,
            key: key.clone(),
            message_id: message_id.clone(),
            attempts,
            handbacks,
            settled: AtomicBool::new(false),
            alone,
        }
    }

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
            if self.alone {
                self.dedup.local().live.remove(&self.key.0);
            }
        }
        self.finish(r)
    }

    /// Lets the key be claimed again: its message is being dead-lettered.
    pub async fn release(&self) -> Result<(), Error> {
        if self.alone {
            self.dedup.local().live.remove(&self.key.0);
            return self.finish(Ok(()));
        }
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
        if self.alone {
            self.park_local(attempts, u32::from(refused));
            return self.finish(Ok(()));
        }
        let r = self
            .dedup
            .store
            .park(&self.key.0, &self.message_id.0, attempts, refused)
            .await;
        self.finish(r)
    }

    fn park_local(&self, attempts: u32, refused: u32) {
        let mut local = self.dedup.local();
        local.live.remove(&self.key.0);
        let parked = LocalPark {
            message_id: self.message_id.clone(),
            attempts: attempts.max(self.attempts),
            handbacks: self.handbacks.saturating_add(refused),
        };
        local.parked.put(self.key.0.clone(), parked);
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.settled.load(Ordering::Relaxed) {
            return;
        }
        if self.alone {
            self.park_local(self.attempts, 0);
        } else {
            self.dedup
                .store
                .park_in_background(&self.key.0, &self.message_id.0, self.attempts);
        }
    }
}

/// The claims of keys this process delivers alone (see the module's doc).
struct Local {
    /// Keys being delivered, and the message delivering each.
    live: HashMap<String, MessageId>,
    /// Keys whose message waits for its next copy (a delay tier, a
    /// hand-back). Bounded: a key forgotten here only lets a duplicate copy
    /// of it be delivered while its message waits, and whichever of the two
    /// comes second finds the key done.
    parked: LruCache<String, LocalPark>,
}

struct LocalPark {
    message_id: MessageId,
    attempts: u32,
    handbacks: u32,
}

pub struct Dedup {
    /// Keys known done, with when SQLite's record of them expires (epoch ms): an
    /// entry past it is not trusted (SQLite may have pruned the key).
    lru: Mutex<LruCache<String, u64>>,
    local: Mutex<Local>,
    store: Store,
    retention: Duration,
}

impl Dedup {
    /// The store's commits are reported to `events`.
    pub fn open(settings: &DedupSettings, events: crate::events::Events) -> Self {
        let cap = NonZeroUsize::new(settings.lru_capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            lru: Mutex::new(LruCache::new(cap)),
            local: Mutex::new(Local {
                live: HashMap::new(),
                parked: LruCache::new(cap),
            }),
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

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        // Nothing panics while holding it; a poisoned lock's data is still whole.
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

    /// A key SQLite says was done at `at_ms`: trusted in the LRU only as long
    /// as SQLite keeps the record (until its own expiry, not for a fresh full
    /// retention).
    fn found_done(&self, key: &DedupKey, at_ms: u64) -> Check<'_> {
        self.remember_until(key, at_ms.saturating_add(self.retention_ms()));
        Check::Done(Tier::Sqlite)
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
                } => Check::Deliver(Held::new(
                    self,
                    key,
                    message_id,
                    (attempts, handbacks),
                    false,
                )),
                Claim::Done { at_ms } => self.found_done(key, at_ms),
                Claim::HeldBy(holder) => Check::HeldByAnother { holder },
                Claim::Busy => Check::StillBeingDelivered,
            },
        )
    }

    /// [`Dedup::check`] for a message of a partition this process delivers
    /// alone (its single active consumer, the partition taken in the store):
    /// the claim is kept in memory, and the store is only read.
    pub async fn check_alone(
        &self,
        key: &DedupKey,
        message_id: &MessageId,
    ) -> Result<Check<'_>, Error> {
        let now = epoch_ms();
        if self.lru_has(&key.0, now) {
            return Ok(Check::Done(Tier::Lru));
        }
        let earlier = {
            let mut local = self.local();
            if let Some(holder) = local.live.get(&key.0) {
                return Ok(if holder == message_id {
                    Check::StillBeingDelivered
                } else {
                    Check::HeldByAnother {
                        holder: holder.0.clone(),
                    }
                });
            }
            if let Some(p) = local.parked.peek(&key.0)
                && p.message_id != *message_id
            {
                let holder = p.message_id.0.clone();
                return Ok(Check::HeldByAnother { holder });
            }
            let earlier = local.parked.pop(&key.0);
            local.live.insert(key.0.clone(), message_id.clone());
            earlier
        };
        // Claimed before the read, so a copy that comes meanwhile waits.
        let counts = earlier
            .as_ref()
            .map_or((0, 0), |p| (p.attempts, p.handbacks));
        let held = Held::new(self, key, message_id, counts, true);
        let read = self.store.done_at_ms(&key.0).await;
        if !matches!(read, Ok(None)) {
            // Done, or not known: the claim goes back to what it was.
            held.settled.store(true, Ordering::Relaxed);
            let mut local = self.local();
            local.live.remove(&key.0);
            if let Some(p) = earlier {
                local.parked.put(key.0.clone(), p);
            }
        }
        match read? {
            None => Ok(Check::Deliver(held)),
            Some(at_ms) => Ok(self.found_done(key, at_ms)),
        }
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

    #[tokio::test]
    async fn claims_kept_alone_are_in_memory_and_only_the_done_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let d = dedup(dir.path(), 300_000);
        let key = DedupKey("s:k".into());
        let (m1, m2) = (MessageId::new(), MessageId::new());
        let Check::Deliver(held) = d.check_alone(&key, &m1).await.unwrap() else {
            panic!("a new key is not claimed");
        };
        // Its redelivery waits; another message with the key is a duplicate.
        assert!(matches!(
            d.check_alone(&key, &m1).await.unwrap(),
            Check::StillBeingDelivered
        ));
        assert!(matches!(
            d.check_alone(&key, &m2).await.unwrap(),
            Check::HeldByAnother { .. }
        ));
        // Parked with its attempts: the next copy takes them, not another message.
        held.park(3, Parked::RepublishRefused).await.unwrap();
        drop(held);
        assert!(matches!(
            d.check_alone(&key, &m2).await.unwrap(),
            Check::HeldByAnother { .. }
        ));
        let Check::Deliver(held) = d.check_alone(&key, &m1).await.unwrap() else {
            panic!("the parked claim is not its message's");
        };
        assert_eq!((held.attempts, held.handbacks), (3, 1));
        // Dropped unsettled (a task that panicked): parked, not lost.
        drop(held);
        let Check::Deliver(held) = d.check_alone(&key, &m1).await.unwrap() else {
            panic!("a dropped claim is not parked");
        };
        // Dead-lettered: claimable from scratch by anyone.
        held.release().await.unwrap();
        drop(held);
        let Check::Deliver(held) = d.check_alone(&key, &m2).await.unwrap() else {
            panic!("a released key is not claimed");
        };
        assert_eq!((held.attempts, held.handbacks), (0, 0));
        // No claim reached the file: another process on the host, with a
        // shared queue's claims, finds the key free.
        let other = dedup(dir.path(), 300_000);
        assert!(matches!(
            other.store().claim("s:k", "m3").await.unwrap(),
            Claim::Claimed { .. }
        ));
        // The done does, and that process sees it.
        held.done().await.unwrap();
        drop(held);
        assert_eq!(
            tier(&other.check_alone(&key, &m1).await.unwrap()),
            Some(Tier::Sqlite)
        );
    }

    #[tokio::test]
    async fn a_claim_kept_alone_whose_read_failed_is_not_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: every read fails.
        std::fs::create_dir(dir.path().join("d.db")).unwrap();
        let d = dedup(dir.path(), 300_000);
        let key = DedupKey("s:k".into());
        let (m1, m2) = (MessageId::new(), MessageId::new());
        assert!(d.check_alone(&key, &m1).await.is_err());
        // Not claimed nor parked by m1: another message is not its duplicate.
        assert!(d.check_alone(&key, &m2).await.is_err());
        std::fs::remove_dir(dir.path().join("d.db")).unwrap();
        assert!(matches!(
            d.check_alone(&key, &m2).await.unwrap(),
            Check::Deliver(_)
        ));
    }
}
