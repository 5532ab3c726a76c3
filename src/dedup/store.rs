//! The SQLite store of keys, shared by every worker process on the host. The only
//! code that imports rusqlite.
//!
//! One thread owns the connection; async callers send it requests and await the
//! answer, so SQLite never blocks the runtime. The thread takes every request
//! that is waiting and runs them in one `BEGIN IMMEDIATE` transaction: one
//! commit (one fsync) for a whole batch, which is what keeps the store from being
//! the bottleneck. `IMMEDIATE` takes the write lock up front, so a claim is atomic
//! across processes; WAL lets readers and the next writer proceed meanwhile.
//!
//! **Fenced claims.** A claim records the message that holds the key and the
//! *holder*: this process, by an id of its own, with a lease in the `holders`
//! table that the store thread renews every quarter lease while the process
//! lives. A claim is taken over only by the same message (its redelivery) and
//! only when nobody is working on it: when its holder parked it (the message
//! waits in a delay queue, or was handed back) or when the holder's lease ran
//! out (the process was killed). A redelivery that finds its claim held by a
//! live holder (the broker connection dropped while a delivery was running)
//! waits for that delivery to end instead of starting a second one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, mpsc};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::message::epoch_ms;

/// The most requests one transaction takes.
const MAX_BATCH: usize = 512;
/// Rows one prune deletes; small, so it never holds the write lock for long.
pub const PRUNE_BATCH: usize = 500;

#[derive(Debug, Clone, thiserror::Error)]
#[error("dedup store {path}: {message}")]
pub struct Error {
    pub path: String,
    pub message: String,
}

/// The state of a key after a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This message holds the key now (new, its own parked or abandoned claim
    /// back, or a key whose earlier message was dead-lettered). `attempts` and
    /// `handbacks` are what earlier holders of this message recorded.
    Claimed { attempts: u32, handbacks: u32 },
    /// A delivery of this key already succeeded, at `at_ms`.
    Done { at_ms: u64 },
    /// Another message holds the key: it is in flight, or waiting in a delay queue.
    HeldBy(String),
    /// This very message holds the key and a live holder is working on it (a
    /// redelivery after a dropped connection): wait, do not deliver.
    Busy,
}

enum Op {
    Claim {
        key: String,
        message_id: String,
    },
    Done {
        key: String,
    },
    Release {
        key: String,
        message_id: String,
    },
    Park {
        key: String,
        message_id: String,
        attempts: u32,
        handback: bool,
    },
    Prune {
        older_than_ms: i64,
    },
    Probe,
}

enum Answer {
    Claim(Claim),
    Count(usize),
    Unit,
}

struct Request {
    op: Op,
    now_ms: i64,
    /// `None` for fire-and-forget requests (a claim parked from a `Drop`).
    reply: Option<oneshot::Sender<Result<Answer, Error>>>,
}

/// Counters the benchmark and /metrics read.
#[derive(Default)]
pub struct Stats {
    pub commits: AtomicU64,
    pub ops: AtomicU64,
}

/// Who this process is to the other workers on the file, and how long its
/// claims stay its own without a renewal.
struct Lease {
    holder: String,
    duration: Duration,
    /// Epoch ms until which the last renewal that committed holds.
    valid_until: AtomicU64,
}

/// Handle on the store thread; clone freely.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Request>,
    healthy: Arc<AtomicBool>,
    lease: Arc<Lease>,
    pub stats: Arc<Stats>,
    path: PathBuf,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    i64::try_from(epoch_ms()).unwrap_or(i64::MAX)
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        let _ = std::fs::create_dir_all(dir);
    }
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    // With WAL, NORMAL fsyncs at checkpoints, not at every commit: a process crash
    // loses nothing; a power cut may lose the last commits (a key delivered again,
    // with the same Idempotency-Key). FULL would fsync each batch.
    c.pragma_update(None, "synchronous", "NORMAL")?;
    c.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE IF NOT EXISTS keys (
             key        TEXT PRIMARY KEY,
             state      INTEGER NOT NULL, -- 0 claimed, 1 done, 2 released (dead-lettered)
             message_id TEXT NOT NULL,    -- the message that holds the claim
             updated_ms INTEGER NOT NULL
         ) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS keys_updated ON keys(updated_ms);
         CREATE TABLE IF NOT EXISTS holders (
             holder         TEXT PRIMARY KEY,
             lease_until_ms INTEGER NOT NULL
         ) WITHOUT ROWID;",
    )?;
    // Columns added after the first release; a file written by it gains them here.
    let columns: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_info('keys')")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for (name, ddl) in [
        // The process working on the claim; NULL when parked (no one is).
        ("holder", "ALTER TABLE keys ADD COLUMN holder TEXT"),
        // Failed deliveries recorded by a holder that could not settle the message.
        (
            "attempts",
            "ALTER TABLE keys ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
        ),
        // Times the broker refused this message's republish (it went back to the queue).
        (
            "handbacks",
            "ALTER TABLE keys ADD COLUMN handbacks INTEGER NOT NULL DEFAULT 0",
        ),
    ] {
        if !columns.iter().any(|c| c == name) {
            c.execute_batch(ddl)?;
        }
    }
    c.execute_batch("COMMIT")?;
    Ok(c)
}

/// SQL: the claim is worked on by a live holder, one whose lease has not run
/// out at the time in parameter `now` (e.g. `"?4"`).
fn live(now: &str) -> String {
    format!(
        "keys.holder IS NOT NULL AND EXISTS (SELECT 1 FROM holders h
         WHERE h.holder = keys.holder AND h.lease_until_ms >= {now})"
    )
}

/// Takes the key: insert, or take it over when it was released, or when it is
/// this message's and no live holder works on it. ?1 key, ?2 message, ?3 holder, ?4 now.
static CLAIM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO keys(key, state, message_id, holder, attempts, handbacks, updated_ms)
         VALUES (?1, 0, ?2, ?3, 0, 0, ?4)
         ON CONFLICT(key) DO UPDATE SET
            state = 0, message_id = excluded.message_id, holder = excluded.holder,
            updated_ms = excluded.updated_ms,
            attempts = CASE WHEN keys.state = 2 THEN 0 ELSE keys.attempts END,
            handbacks = CASE WHEN keys.state = 2 THEN 0 ELSE keys.handbacks END
         WHERE keys.state = 2
            OR (keys.state = 0 AND keys.message_id = excluded.message_id AND NOT ({}))
         RETURNING attempts, handbacks",
        live("?4")
    )
});

/// Why a claim was not won. ?1 key, ?2 now.
static HELD: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT state, message_id, updated_ms, ({}) FROM keys WHERE key = ?1",
        live("?2")
    )
});

/// Old keys, never one a live holder works on (a slow delivery). ?1 cutoff,
/// ?2 batch size, ?3 now.
static PRUNE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "DELETE FROM keys WHERE key IN
           (SELECT key FROM keys WHERE updated_ms < ?1 AND NOT (state = 0 AND {}) LIMIT ?2)",
        live("?3")
    )
});

fn run_op(c: &Connection, holder: &str, op: &Op, now: i64) -> rusqlite::Result<Answer> {
    Ok(match op {
        Op::Claim { key, message_id } => {
            let won: Option<(i64, i64)> = c
                .prepare_cached(&CLAIM)?
                .query_row(params![key, message_id, holder, now], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            if let Some((attempts, handbacks)) = won {
                return Ok(Answer::Claim(Claim::Claimed {
                    attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    handbacks: u32::try_from(handbacks).unwrap_or(u32::MAX),
                }));
            }
            let (state, holder_msg, at, live): (i64, String, i64, bool) =
                c.prepare_cached(&HELD)?.query_row(params![key, now], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?;
            Answer::Claim(if state == 1 {
                Claim::Done {
                    at_ms: u64::try_from(at).unwrap_or(0),
                }
            } else if holder_msg == *message_id && live {
                Claim::Busy
            } else {
                Claim::HeldBy(holder_msg)
            })
        }
        Op::Done { key } => {
            // Unconditional: a 2xx happened, whoever holds the claim now.
            c.prepare_cached(
                "INSERT INTO keys(key, state, message_id, holder, updated_ms) VALUES (?1, 1, '', NULL, ?2)
                 ON CONFLICT(key) DO UPDATE SET state = 1, holder = NULL, updated_ms = excluded.updated_ms",
            )?
            .execute(params![key, now])?;
            Answer::Unit
        }
        Op::Release { key, message_id } => {
            // Only this holder's claim (or a parked one of this message): a
            // holder whose lease ran out and was taken over changes nothing.
            c.prepare_cached(
                "UPDATE keys SET state = 2, holder = NULL, updated_ms = ?4
                 WHERE key = ?1 AND message_id = ?2 AND state = 0 AND (holder = ?3 OR holder IS NULL)",
            )?
            .execute(params![key, message_id, holder, now])?;
            Answer::Unit
        }
        Op::Park {
            key,
            message_id,
            attempts,
            handback,
        } => {
            c.prepare_cached(
                "UPDATE keys SET holder = NULL, updated_ms = ?4,
                    attempts = MAX(attempts, ?5), handbacks = handbacks + ?6
                 WHERE key = ?1 AND message_id = ?2 AND state = 0 AND holder = ?3",
            )?
            .execute(params![
                key,
                message_id,
                holder,
                now,
                attempts,
                i64::from(*handback)
            ])?;
            Answer::Unit
        }
        Op::Prune { older_than_ms } => {
            let n = c.prepare_cached(&PRUNE)?.execute(params![
                older_than_ms,
                PRUNE_BATCH as i64,
                now
            ])?;
            c.prepare_cached("DELETE FROM holders WHERE lease_until_ms < ?1")?
                .execute(params![older_than_ms])?;
            Answer::Count(n)
        }
        Op::Probe => {
            // A write that changes nothing proves the file is writable now.
            c.execute("UPDATE keys SET state = state WHERE 0", [])?;
            Answer::Unit
        }
    })
}

fn renew(c: &Connection, lease: &Lease, now: i64) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO holders(holder, lease_until_ms) VALUES (?1, ?2)
         ON CONFLICT(holder) DO UPDATE SET lease_until_ms = excluded.lease_until_ms",
    )?
    .execute(params![
        lease.holder,
        now.saturating_add(ms(lease.duration))
    ])?;
    Ok(())
}

/// Runs a batch (and the lease renewal, when `renew_at` says so) in one transaction.
fn run_batch(
    c: &Connection,
    lease: &Lease,
    batch: &[Request],
    renew_at: Option<i64>,
) -> rusqlite::Result<Vec<Answer>> {
    c.execute_batch("BEGIN IMMEDIATE")?;
    let run = || -> rusqlite::Result<Vec<Answer>> {
        if let Some(now) = renew_at {
            renew(c, lease, now)?;
        }
        batch
            .iter()
            .map(|r| run_op(c, &lease.holder, &r.op, r.now_ms))
            .collect()
    };
    match run().and_then(|out| c.execute_batch("COMMIT").map(|_| out)) {
        Ok(out) => Ok(out),
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn thread_main(
    path: PathBuf,
    rx: mpsc::Receiver<Request>,
    healthy: Arc<AtomicBool>,
    stats: Arc<Stats>,
    lease: Arc<Lease>,
) {
    let shown = path.display().to_string();
    let mut conn: Option<Connection> = None;
    // Renew every quarter lease, idle or busy; `None` = renew with the next batch.
    let every = lease.duration / 4;
    let mut renewed: Option<Instant> = None;
    loop {
        let due = renewed.is_none_or(|at| at.elapsed() >= every);
        let wait = renewed.map_or(Duration::ZERO, |at| every.saturating_sub(at.elapsed()));
        let mut batch = Vec::new();
        match rx.recv_timeout(if due { Duration::ZERO } else { wait }) {
            Ok(first) => batch.push(first),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let due = renewed.is_none_or(|at| at.elapsed() >= every);
        if batch.is_empty() && !due {
            continue;
        }
        if conn.is_none() {
            match open(&path) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    fail(&shown, &healthy, batch, &e);
                    // Retry opening at the next request or renewal, not in a spin.
                    renewed = Some(Instant::now());
                    continue;
                }
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        let now = now_ms();
        match run_batch(c, &lease, &batch, due.then_some(now)) {
            Ok(answers) => {
                if due {
                    renewed = Some(Instant::now());
                    let until = now.saturating_add(ms(lease.duration));
                    lease
                        .valid_until
                        .store(u64::try_from(until).unwrap_or(0), Ordering::Relaxed);
                }
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.ops.fetch_add(batch.len() as u64, Ordering::Relaxed);
                if !healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(path = %shown, "dedup store is writable again");
                }
                for (r, a) in batch.into_iter().zip(answers) {
                    if let Some(reply) = r.reply {
                        let _ = reply.send(Ok(a));
                    }
                }
            }
            Err(e) => {
                // Reopen next time: the file may have been replaced or fixed.
                conn = None;
                renewed = Some(Instant::now());
                fail(&shown, &healthy, batch, &e);
            }
        }
    }
    // Every handle is gone: this process holds nothing any more. Ending the
    // lease lets a redelivery of anything left take over at once.
    if let Some(c) = conn.as_ref() {
        let _ = c.execute(
            "DELETE FROM holders WHERE holder = ?1",
            params![lease.holder],
        );
    }
}

fn fail(path: &str, healthy: &AtomicBool, batch: Vec<Request>, e: &rusqlite::Error) {
    if healthy.swap(false, Ordering::Relaxed) {
        tracing::error!(path, error = %e, "dedup store cannot be written: messages are held and retried, nothing is acked as done until it recovers");
    }
    let err = Error {
        path: path.to_string(),
        message: e.to_string(),
    };
    for r in batch {
        if let Some(reply) = r.reply {
            let _ = reply.send(Err(err.clone()));
        }
    }
}

impl Store {
    /// Starts the store thread. Opening happens there, and is retried on every
    /// request while it fails, so a bad file does not stop the worker. `lease`:
    /// see [`crate::config::DedupSettings::lease_ms`].
    pub fn open(path: &Path, lease: Duration) -> Self {
        let (tx, rx) = mpsc::channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let stats = Arc::new(Stats::default());
        let lease = Arc::new(Lease {
            holder: uuid::Uuid::now_v7().to_string(),
            duration: lease,
            valid_until: AtomicU64::new(0),
        });
        let (h, s, l, p) = (
            healthy.clone(),
            stats.clone(),
            lease.clone(),
            path.to_path_buf(),
        );
        std::thread::Builder::new()
            .name("hookq-dedup".into())
            .spawn(move || thread_main(p, rx, h, s, l))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start the dedup thread: {e}"));
        Self {
            tx,
            healthy,
            lease,
            stats,
            path: path.to_path_buf(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// This process's holder id, as claims record it.
    pub fn holder(&self) -> &str {
        &self.lease.holder
    }

    /// Whether this process's lease, as last renewed, still holds for half its
    /// length: a delivery must not start on a claim that other workers may soon
    /// consider abandoned (the store thread renews every quarter lease).
    pub fn lease_is_fresh(&self) -> bool {
        let until = self.lease.valid_until.load(Ordering::Relaxed);
        let half = u64::try_from((self.lease.duration / 2).as_millis()).unwrap_or(u64::MAX);
        epoch_ms().saturating_add(half) <= until
    }

    async fn call(&self, op: Op, now_ms: i64) -> Result<Answer, Error> {
        let (reply, rx) = oneshot::channel();
        let gone = || Error {
            path: self.path.display().to_string(),
            message: "the store thread stopped".into(),
        };
        self.tx
            .send(Request {
                op,
                now_ms,
                reply: Some(reply),
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn claim(&self, key: &str, message_id: &str) -> Result<Claim, Error> {
        self.claim_at(key, message_id, now_ms()).await
    }

    /// [`Store::claim`] at a given time (tests move the clock).
    pub async fn claim_at(&self, key: &str, message_id: &str, now: i64) -> Result<Claim, Error> {
        let op = Op::Claim {
            key: key.into(),
            message_id: message_id.into(),
        };
        match self.call(op, now).await? {
            Answer::Claim(c) => Ok(c),
            _ => Ok(Claim::HeldBy(String::new())),
        }
    }

    pub async fn done(&self, key: &str) -> Result<(), Error> {
        self.done_at(key, now_ms()).await
    }

    pub async fn done_at(&self, key: &str, now: i64) -> Result<(), Error> {
        self.call(Op::Done { key: key.into() }, now)
            .await
            .map(|_| ())
    }

    pub async fn release(&self, key: &str, message_id: &str) -> Result<(), Error> {
        let op = Op::Release {
            key: key.into(),
            message_id: message_id.into(),
        };
        self.call(op, now_ms()).await.map(|_| ())
    }

    /// Leaves this message's claim to whichever copy of it comes next (it waits
    /// in a delay queue, or went back to the work queue), recording the failed
    /// attempts so far and, for a republish the broker refused, one hand-back.
    pub async fn park(
        &self,
        key: &str,
        message_id: &str,
        attempts: u32,
        handback: bool,
    ) -> Result<(), Error> {
        self.call(park_op(key, message_id, attempts, handback), now_ms())
            .await
            .map(|_| ())
    }

    /// [`Store::park`] without waiting for the answer, for a `Drop`: a task that
    /// ended without settling its claim must not leave it live.
    pub fn park_in_background(&self, key: &str, message_id: &str, attempts: u32) {
        let _ = self.tx.send(Request {
            op: park_op(key, message_id, attempts, false),
            now_ms: now_ms(),
            reply: None,
        });
    }

    /// Deletes up to [`PRUNE_BATCH`] keys untouched for `retention` (never one a
    /// live holder works on); returns how many.
    pub async fn prune(&self, retention: Duration) -> Result<usize, Error> {
        let now = now_ms();
        let older_than_ms = now.saturating_sub(ms(retention));
        match self.call(Op::Prune { older_than_ms }, now).await? {
            Answer::Count(n) => Ok(n),
            _ => Ok(0),
        }
    }

    /// Checks that the file can be written now (updates health either way).
    pub async fn probe(&self) -> Result<(), Error> {
        self.call(Op::Probe, now_ms()).await.map(|_| ())
    }
}

fn park_op(key: &str, message_id: &str, attempts: u32, handback: bool) -> Op {
    Op::Park {
        key: key.into(),
        message_id: message_id.into(),
        attempts,
        handback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    fn claimed(attempts: u32, handbacks: u32) -> Claim {
        Claim::Claimed {
            attempts,
            handbacks,
        }
    }

    #[tokio::test]
    async fn claim_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("d.db"), LEASE);
        assert_eq!(s.claim("k", "m1").await.unwrap(), claimed(0, 0));
        // A live holder works on it: its redelivery waits, another message is a duplicate.
        assert_eq!(s.claim("k", "m1").await.unwrap(), Claim::Busy);
        assert_eq!(
            s.claim("k", "m2").await.unwrap(),
            Claim::HeldBy("m1".into())
        );
        // Parked (in a delay queue): its copy takes it back with the attempts so far.
        s.park("k", "m1", 3, true).await.unwrap();
        assert_eq!(
            s.claim("k", "m2").await.unwrap(),
            Claim::HeldBy("m1".into())
        );
        assert_eq!(s.claim("k", "m1").await.unwrap(), claimed(3, 1));
        // Dead-lettered: anyone may claim again, from scratch.
        s.release("k", "m1").await.unwrap();
        assert_eq!(s.claim("k", "m2").await.unwrap(), claimed(0, 0));
        // A stale release by the old holder changes nothing.
        s.release("k", "m1").await.unwrap();
        assert_eq!(
            s.claim("k", "m3").await.unwrap(),
            Claim::HeldBy("m2".into())
        );
        s.done_at("k", 1234).await.unwrap();
        assert_eq!(
            s.claim("k", "m2").await.unwrap(),
            Claim::Done { at_ms: 1234 }
        );
        assert_eq!(
            s.claim("k", "m4").await.unwrap(),
            Claim::Done { at_ms: 1234 }
        );
        s.probe().await.unwrap();
    }

    #[tokio::test]
    async fn a_claim_whose_holder_stopped_renewing_is_taken_over_by_its_message_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        let lease = Duration::from_millis(200);
        let (a, b) = (Store::open(&path, lease), Store::open(&path, lease));
        assert_eq!(a.claim("k", "m1").await.unwrap(), claimed(0, 0));
        let now = now_ms();
        // While the holder's lease runs, the other process waits.
        assert_eq!(b.claim_at("k", "m1", now).await.unwrap(), Claim::Busy);
        // Seen from after the lease (as after a SIGKILL): the same message takes
        // it over, another message still counts as a duplicate.
        let later = now + 60_000;
        assert_eq!(
            b.claim_at("k", "m2", later).await.unwrap(),
            Claim::HeldBy("m1".into())
        );
        assert_eq!(b.claim_at("k", "m1", later).await.unwrap(), claimed(0, 0));
        // The old holder, back, cannot release or park what it lost.
        a.release("k", "m1").await.unwrap();
        a.park("k", "m1", 9, true).await.unwrap();
        assert_eq!(a.claim("k", "m1").await.unwrap(), Claim::Busy);
    }

    #[tokio::test]
    async fn a_dropped_store_ends_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        let b = Store::open(&path, LEASE);
        {
            let a = Store::open(&path, LEASE);
            assert_eq!(a.claim("k", "m1").await.unwrap(), claimed(0, 0));
            assert_eq!(b.claim("k", "m1").await.unwrap(), Claim::Busy);
        }
        // The lease row goes when the thread ends; poll for it with a deadline.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match b.claim("k", "m1").await.unwrap() {
                Claim::Claimed { .. } => break,
                other => assert!(Instant::now() < deadline, "still {other:?}"),
            }
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn concurrent_claims_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        // Two stores = two connections, as two processes would have.
        let a = Store::open(&path, LEASE);
        let b = Store::open(&path, LEASE);
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                s.claim(&format!("k{}", i / 4), &format!("m{i}"))
                    .await
                    .unwrap()
            }));
        }
        let mut won = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Claim::Claimed { .. }) {
                won += 1;
            }
        }
        assert_eq!(won, 50);
    }

    #[tokio::test]
    async fn prune_removes_only_old_keys_and_never_a_live_claim() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("d.db"), LEASE);
        let long_ago = now_ms() - 3_600_000;
        s.done_at("old", long_ago).await.unwrap();
        s.claim_at("live", "m", long_ago).await.unwrap();
        assert_eq!(s.prune(Duration::from_secs(60)).await.unwrap(), 1);
        s.done("new").await.unwrap();
        assert_eq!(s.prune(Duration::from_secs(60)).await.unwrap(), 0);
        assert_eq!(s.claim("old", "m").await.unwrap(), claimed(0, 0));
        assert!(matches!(
            s.claim("new", "m").await.unwrap(),
            Claim::Done { .. }
        ));
        assert_eq!(s.claim("live", "m").await.unwrap(), Claim::Busy);
    }

    #[tokio::test]
    async fn a_file_of_the_first_release_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE keys (key TEXT PRIMARY KEY, state INTEGER NOT NULL,
                   message_id TEXT NOT NULL, updated_ms INTEGER NOT NULL) WITHOUT ROWID;
                 INSERT INTO keys VALUES ('done', 1, '', 5), ('held', 0, 'm1', 5);",
            )
            .unwrap();
        }
        let s = Store::open(&path, LEASE);
        assert_eq!(
            s.claim("done", "m").await.unwrap(),
            Claim::Done { at_ms: 5 }
        );
        assert_eq!(
            s.claim("held", "m2").await.unwrap(),
            Claim::HeldBy("m1".into())
        );
        assert_eq!(s.claim("held", "m1").await.unwrap(), claimed(0, 0));
    }
}
