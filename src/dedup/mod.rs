//! De-duplication: an in-process LRU in front of the SQLite store shared by every
//! worker on the host.
//!
//! The LRU only caches a fact SQLite already holds ("this key is done"), so it
//! can answer repeats without a round trip to the store thread but can never make
//! a decision SQLite would not. Claims always go to SQLite.

pub mod store;

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio_util::sync::CancellationToken;

pub use store::{Claim, Error, Store};

use crate::config::DedupSettings;
use crate::message::{DedupKey, MessageId};

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// This message holds the key: deliver it.
    Deliver,
    /// The key was already delivered successfully.
    Done(Tier),
    /// Another message holds the key and is still with the broker (in flight, or
    /// in a delay queue): it will be delivered or dead-lettered, so this copy is
    /// not needed.
    InFlight { holder: String },
}

pub struct Dedup {
    /// Keys known done, with when they were recorded: an entry older than the
    /// retention is not trusted (SQLite may have pruned it).
    lru: Mutex<LruCache<String, Instant>>,
    store: Store,
    retention: Duration,
}

impl Dedup {
    pub fn open(settings: &DedupSettings) -> Self {
        let cap = NonZeroUsize::new(settings.lru_capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            lru: Mutex::new(LruCache::new(cap)),
            store: Store::open(&settings.path),
            retention: Duration::from_millis(settings.retention_ms),
        }
    }

    pub fn retention(&self) -> Duration {
        self.retention
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn lru_has(&self, key: &str) -> bool {
        self.lru
            .lock()
            .map(|mut l| l.get(key).is_some_and(|at| at.elapsed() < self.retention))
            .unwrap_or(false)
    }

    /// Remembers a key that SQLite already records as done.
    pub fn remember(&self, key: &DedupKey) {
        if let Ok(mut l) = self.lru.lock() {
            l.put(key.0.clone(), Instant::now());
        }
    }

    /// Keys in the LRU now.
    pub fn lru_len(&self) -> usize {
        self.lru.lock().map(|l| l.len()).unwrap_or(0)
    }

    pub async fn check(&self, key: &DedupKey, message_id: &MessageId) -> Result<Check, Error> {
        if self.lru_has(&key.0) {
            return Ok(Check::Done(Tier::Lru));
        }
        Ok(match self.store.claim(&key.0, &message_id.0).await? {
            Claim::Claimed => Check::Deliver,
            Claim::Done => {
                self.remember(key);
                Check::Done(Tier::Sqlite)
            }
            Claim::HeldBy(holder) => Check::InFlight { holder },
        })
    }

    /// Records a success; call before the ack, then [`Dedup::remember`] after it.
    pub async fn done(&self, key: &DedupKey) -> Result<(), Error> {
        self.store.done(&key.0).await
    }

    /// Lets the key be claimed again (its message is being dead-lettered).
    pub async fn release(&self, key: &DedupKey, message_id: &MessageId) -> Result<(), Error> {
        self.store.release(&key.0, &message_id.0).await
    }

    /// Prunes keys older than the retention, in small batches, until `shutdown`.
    pub async fn prune_forever(&self, every: Duration, shutdown: CancellationToken) {
        loop {
            loop {
                match self.store.prune(self.retention).await {
                    Ok(n) if n == store::PRUNE_BATCH => tokio::task::yield_now().await,
                    Ok(n) => {
                        if n > 0 {
                            tracing::debug!(pruned = n, "pruned old dedup keys");
                        }
                        break;
                    }
                    Err(_) => break, // already logged by the store
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
