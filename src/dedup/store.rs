//! The SQLite store of keys, shared by every worker process on the host. The only
//! code that imports rusqlite.
//!
//! One thread owns the connection; async callers send it requests and await the
//! answer, so SQLite never blocks the runtime. The thread takes every request
//! that is waiting and runs them in one `BEGIN IMMEDIATE` transaction: one
//! commit (one fsync) for a whole batch, which is what keeps the store from being
//! the bottleneck. `IMMEDIATE` takes the write lock up front, so a claim is atomic
//! across processes; WAL lets readers and the next writer proceed meanwhile.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

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
    /// This message holds the key now (new, its own claim back after a crash, or a
    /// key whose earlier message was dead-lettered).
    Claimed,
    /// A delivery of this key already succeeded.
    Done,
    /// Another message holds the key: it is in flight, or waiting in a delay queue.
    HeldBy(String),
}

enum Op {
    Claim { key: String, message_id: String },
    Done { key: String },
    Release { key: String, message_id: String },
    Prune { older_than_ms: i64 },
    Probe,
}

enum Answer {
    Claim(Claim),
    Count(usize),
    Unit,
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Result<Answer, Error>>,
}

/// Counters the benchmark and /metrics read.
#[derive(Default)]
pub struct Stats {
    pub commits: AtomicU64,
    pub ops: AtomicU64,
}

/// Handle on the store thread; clone freely.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Request>,
    healthy: Arc<AtomicBool>,
    pub stats: Arc<Stats>,
    path: PathBuf,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
        "CREATE TABLE IF NOT EXISTS keys (
             key        TEXT PRIMARY KEY,
             state      INTEGER NOT NULL, -- 0 claimed, 1 done, 2 released (dead-lettered)
             message_id TEXT NOT NULL,    -- the message that holds the claim
             updated_ms INTEGER NOT NULL
         ) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS keys_updated ON keys(updated_ms);",
    )?;
    Ok(c)
}

fn run_op(c: &Connection, op: &Op) -> rusqlite::Result<Answer> {
    let now = now_ms();
    Ok(match op {
        Op::Claim { key, message_id } => {
            // One statement decides: insert, or take the key over when it was
            // released or is already ours (a redelivery after a crash).
            let won = c
                .prepare_cached(
                    "INSERT INTO keys(key, state, message_id, updated_ms) VALUES (?1, 0, ?2, ?3)
                     ON CONFLICT(key) DO UPDATE
                        SET state = 0, message_id = excluded.message_id, updated_ms = excluded.updated_ms
                        WHERE keys.state = 2 OR (keys.state = 0 AND keys.message_id = excluded.message_id)
                     RETURNING 1",
                )?
                .query_row(params![key, message_id, now], |_| Ok(()))
                .optional()?
                .is_some();
            if won {
                Answer::Claim(Claim::Claimed)
            } else {
                let (state, holder): (i64, String) = c
                    .prepare_cached("SELECT state, message_id FROM keys WHERE key = ?1")?
                    .query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?)))?;
                Answer::Claim(if state == 1 {
                    Claim::Done
                } else {
                    Claim::HeldBy(holder)
                })
            }
        }
        Op::Done { key } => {
            c.prepare_cached(
                "INSERT INTO keys(key, state, message_id, updated_ms) VALUES (?1, 1, '', ?2)
                 ON CONFLICT(key) DO UPDATE SET state = 1, updated_ms = excluded.updated_ms",
            )?
            .execute(params![key, now])?;
            Answer::Unit
        }
        Op::Release { key, message_id } => {
            c.prepare_cached(
                "UPDATE keys SET state = 2, updated_ms = ?3 WHERE key = ?1 AND message_id = ?2 AND state = 0",
            )?
            .execute(params![key, message_id, now])?;
            Answer::Unit
        }
        Op::Prune { older_than_ms } => {
            let n = c
                .prepare_cached(
                    "DELETE FROM keys WHERE key IN
                       (SELECT key FROM keys WHERE updated_ms < ?1 LIMIT ?2)",
                )?
                .execute(params![older_than_ms, PRUNE_BATCH as i64])?;
            Answer::Count(n)
        }
        Op::Probe => {
            // A write that changes nothing proves the file is writable now.
            c.execute("UPDATE keys SET state = state WHERE 0", [])?;
            Answer::Unit
        }
    })
}

fn run_batch(c: &Connection, batch: &[Request]) -> rusqlite::Result<Vec<Answer>> {
    c.execute_batch("BEGIN IMMEDIATE")?;
    let mut out = Vec::with_capacity(batch.len());
    for r in batch {
        match run_op(c, &r.op) {
            Ok(a) => out.push(a),
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
    if let Err(e) = c.execute_batch("COMMIT") {
        let _ = c.execute_batch("ROLLBACK");
        return Err(e);
    }
    Ok(out)
}

fn thread_main(
    path: PathBuf,
    rx: mpsc::Receiver<Request>,
    healthy: Arc<AtomicBool>,
    stats: Arc<Stats>,
) {
    let shown = path.display().to_string();
    let mut conn: Option<Connection> = None;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if conn.is_none() {
            match open(&path) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    fail(&shown, &healthy, batch, &e);
                    continue;
                }
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        match run_batch(c, &batch) {
            Ok(answers) => {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.ops.fetch_add(batch.len() as u64, Ordering::Relaxed);
                if !healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(path = %shown, "dedup store is writable again");
                }
                for (r, a) in batch.into_iter().zip(answers) {
                    let _ = r.reply.send(Ok(a));
                }
            }
            Err(e) => {
                // Reopen next time: the file may have been replaced or fixed.
                conn = None;
                fail(&shown, &healthy, batch, &e);
            }
        }
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
        let _ = r.reply.send(Err(err.clone()));
    }
}

impl Store {
    /// Starts the store thread. Opening happens there, and is retried on every
    /// request while it fails, so a bad file does not stop the worker.
    pub fn open(path: &Path) -> Self {
        let (tx, rx) = mpsc::channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let stats = Arc::new(Stats::default());
        let (h, s, p) = (healthy.clone(), stats.clone(), path.to_path_buf());
        std::thread::Builder::new()
            .name("hookq-dedup".into())
            .spawn(move || thread_main(p, rx, h, s))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start the dedup thread: {e}"));
        Self {
            tx,
            healthy,
            stats,
            path: path.to_path_buf(),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    async fn call(&self, op: Op) -> Result<Answer, Error> {
        let (reply, rx) = oneshot::channel();
        let gone = || Error {
            path: self.path.display().to_string(),
            message: "the store thread stopped".into(),
        };
        self.tx.send(Request { op, reply }).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn claim(&self, key: &str, message_id: &str) -> Result<Claim, Error> {
        match self
            .call(Op::Claim {
                key: key.into(),
                message_id: message_id.into(),
            })
            .await?
        {
            Answer::Claim(c) => Ok(c),
            _ => Ok(Claim::Claimed),
        }
    }

    pub async fn done(&self, key: &str) -> Result<(), Error> {
        self.call(Op::Done { key: key.into() }).await.map(|_| ())
    }

    pub async fn release(&self, key: &str, message_id: &str) -> Result<(), Error> {
        self.call(Op::Release {
            key: key.into(),
            message_id: message_id.into(),
        })
        .await
        .map(|_| ())
    }

    /// Deletes up to [`PRUNE_BATCH`] keys untouched for `retention`; returns how many.
    pub async fn prune(&self, retention: Duration) -> Result<usize, Error> {
        let older_than_ms = now_ms() - retention.as_millis() as i64;
        match self.call(Op::Prune { older_than_ms }).await? {
            Answer::Count(n) => Ok(n),
            _ => Ok(0),
        }
    }

    /// Checks that the file can be written now (updates health either way).
    pub async fn probe(&self) -> Result<(), Error> {
        self.call(Op::Probe).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claim_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("d.db"));
        assert_eq!(s.claim("k", "m1").await.unwrap(), Claim::Claimed);
        // Its own redelivery takes the claim back; another message does not.
        assert_eq!(s.claim("k", "m1").await.unwrap(), Claim::Claimed);
        assert_eq!(
            s.claim("k", "m2").await.unwrap(),
            Claim::HeldBy("m1".into())
        );
        // Dead-lettered: anyone may claim again.
        s.release("k", "m1").await.unwrap();
        assert_eq!(s.claim("k", "m2").await.unwrap(), Claim::Claimed);
        // A stale release by the old holder changes nothing.
        s.release("k", "m1").await.unwrap();
        assert_eq!(
            s.claim("k", "m3").await.unwrap(),
            Claim::HeldBy("m2".into())
        );
        s.done("k").await.unwrap();
        assert_eq!(s.claim("k", "m2").await.unwrap(), Claim::Done);
        assert_eq!(s.claim("k", "m4").await.unwrap(), Claim::Done);
        s.probe().await.unwrap();
    }

    #[tokio::test]
    async fn concurrent_claims_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.db");
        // Two stores = two connections, as two processes would have.
        let a = Store::open(&path);
        let b = Store::open(&path);
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
            if t.await.unwrap() == Claim::Claimed {
                won += 1;
            }
        }
        assert_eq!(won, 50);
    }

    #[tokio::test]
    async fn prune_removes_only_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("d.db"));
        s.done("old").await.unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(s.prune(Duration::from_millis(10)).await.unwrap(), 1);
        s.done("new").await.unwrap();
        assert_eq!(s.prune(Duration::from_secs(60)).await.unwrap(), 0);
        assert_eq!(s.claim("old", "m").await.unwrap(), Claim::Claimed);
        assert_eq!(s.claim("new", "m").await.unwrap(), Claim::Done);
    }
}
