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
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::message::epoch_ms;

use self::sql::{Answer, Unanswered};

mod sql;

/// The most requests one transaction takes.
const MAX_BATCH: usize = 512;
/// How long a batch that found company sleeps to let more requests come, and
/// the size from which it does not wait (see the group commit in `Thread::next_batch`).
const LINGER: Duration = Duration::from_micros(250);
const LINGER_UNTIL: usize = 48;
/// Rows one prune step looks at (and at most deletes) of each table: small,
/// so that it never holds the write lock for more than a few milliseconds.
pub const PRUNE_SLICE: usize = 1000;

/// What the store keeps of a key: the first 16 bytes of its SHA-256. The
/// readable key stays where an operator reads it (the message, logs, dead
/// letters); a row of the `done` table is this and a time, about 40 bytes on
/// disk. Two different keys meet in one hash with odds of about n² / 2¹²⁹
/// (10¹⁴ / 6.8·10³⁸ at ten million keys): never, in practice.
pub type KeyHash = [u8; 16];

pub fn key_hash(key: &str) -> KeyHash {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let mut hash = [0; 16];
    hash.copy_from_slice(&digest[..16]);
    hash
}

/// One prune step's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    /// Keys and claims deleted.
    pub deleted: usize,
    /// Where the next step of the pass starts; `None`: the pass is over.
    pub next: Option<KeyHash>,
}

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

/// Where the store thread sends a request's answer (the tokio tutorial's
/// `Responder<T>`): each request carries a sender of its own answer's type, so
/// no code path has an answer of the wrong kind to make up a reply for.
type Responder<T> = oneshot::Sender<Result<T, Error>>;

enum Op {
    Claim {
        key: KeyHash,
        message_id: String,
        reply: Responder<Claim>,
    },
    Done {
        key: KeyHash,
        reply: Responder<()>,
    },
    Release {
        key: KeyHash,
        message_id: String,
        reply: Responder<()>,
    },
    Park {
        key: KeyHash,
        message_id: String,
        attempts: u32,
        handback: bool,
        reply: Responder<()>,
    },
    Prune {
        older_than_ms: i64,
        after: Option<KeyHash>,
        reply: Responder<Pruned>,
    },
    Probe {
        reply: Responder<()>,
    },
    /// When the key was done, if it was: a read, for a partition this
    /// process delivers alone (see [`Store::done_at_ms`]).
    IsDone {
        key: KeyHash,
        reply: Responder<Option<u64>>,
    },
    /// Takes partition `log` for this process (see [`Store::take_partition`]).
    TakePartition {
        log: String,
        reply: Responder<bool>,
    },
    LeavePartition {
        log: String,
        reply: Responder<()>,
    },
    /// Keys another host delivered (from a done-log), done at `at_ms`.
    DoneMany {
        keys: Vec<KeyHash>,
        at_ms: i64,
        reply: Responder<()>,
    },
    /// How far this host has read a done-log.
    Position {
        log: String,
        reply: Responder<Option<ReadPosition>>,
    },
    SetPosition {
        log: String,
        position: ReadPosition,
        reply: Responder<()>,
    },
}

/// How far a host has read a done-log: the offset of the last record it
/// applied, and that record's fingerprint. The offset alone does not say
/// which stream it is in: a done-log recreated (a broker reset, a new
/// cluster) starts again at 0, and a reader attached past its end would wait
/// for ever. A reader checks the record at the offset against the fingerprint
/// and reads from the stream's start when they differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPosition {
    pub offset: u64,
    pub fingerprint: String,
}

struct Request {
    op: Op,
    /// When the caller asked: claims and leases are judged at this time.
    now_ms: i64,
}

/// Who this process is to the other workers on the file, and how long its
/// claims stay its own without a renewal.
struct Lease {
    holder: String,
    duration: Duration,
    /// Epoch ms until which the last renewal that committed holds.
    valid_until: AtomicU64,
}

/// Called after each committed transaction.
pub type OnCommit = Box<dyn Fn() + Send>;

/// Handle on the store thread; clone freely.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Request>,
    healthy: Arc<AtomicBool>,
    lease: Arc<Lease>,
    path: PathBuf,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    i64::try_from(epoch_ms()).unwrap_or(i64::MAX)
}

/// The store thread: it owns the connection, runs the batches and renews the lease.
struct Thread {
    path: PathBuf,
    /// `path` as errors and logs show it.
    shown: String,
    /// Opened at the first batch, and again at the next one after a failure.
    conn: Option<Connection>,
    healthy: Arc<AtomicBool>,
    /// Told of each committed transaction (the `hookq_dedup_commits_total` metric).
    on_commit: OnCommit,
    lease: Arc<Lease>,
    /// When the lease was last renewed, or a failure put the next try off;
    /// `None`: renew with the next batch. It is renewed every quarter lease,
    /// idle or busy.
    renewed: Option<Instant>,
}

impl Thread {
    fn run(mut self, rx: mpsc::Receiver<Request>) {
        while let Some(batch) = self.next_batch(&rx) {
            let renew = self.renewal_is_due();
            if batch.is_empty() && !renew {
                continue;
            }
            self.run_batch(batch, renew);
        }
        // Every handle is gone: this process holds nothing any more.
        if let Some(c) = &self.conn {
            let _ = sql::end_lease(c, &self.lease);
        }
    }

    /// Every quarter lease; and with any batch while the lease is not
    /// written or half run out (a failed batch put the next renewal off): a
    /// claim made without a lease in force would look abandoned to the
    /// other processes at once.
    fn renewal_is_due(&self) -> bool {
        let half = ms(self.lease.duration / 2);
        let until = i64::try_from(self.lease.valid_until.load(Ordering::Relaxed)).unwrap_or(0);
        self.renewed
            .is_none_or(|at| at.elapsed() >= self.lease.duration / 4)
            || until < now_ms().saturating_add(half)
    }

    /// Waits for a request until the next renewal is due, then takes every
    /// request that is waiting. `None`: every handle is gone.
    fn next_batch(&self, rx: &mpsc::Receiver<Request>) -> Option<Vec<Request>> {
        let every = self.lease.duration / 4;
        let wait = self
            .renewed
            .map_or(Duration::ZERO, |at| every.saturating_sub(at.elapsed()));
        let mut batch = Vec::new();
        match rx.recv_timeout(wait) {
            Ok(first) => batch.push(first),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return None,
        }
        take_waiting(rx, &mut batch);
        // Group commit: when requests come several at a time (many messages in
        // flight), wait a moment for more, so that one commit (its WAL writes
        // and locks, the bulk of the store's cost) serves more of them. A lone
        // request (light load) goes at once. The wait is a sleep, not a wait
        // on the channel: senders then find no receiver to wake, and this
        // thread wakes once per batch instead of once per request.
        if batch.len() > 1 && batch.len() < LINGER_UNTIL {
            std::thread::sleep(LINGER);
            take_waiting(rx, &mut batch);
        }
        Some(batch)
    }

    /// Runs `batch` in one transaction (with the lease renewal when `renew`)
    /// and answers every request of it.
    fn run_batch(&mut self, batch: Vec<Request>, renew: bool) {
        let conn = match self.conn.take() {
            Some(c) => c,
            None => match sql::open(&self.path) {
                Ok(c) => c,
                Err(e) => {
                    self.fail(&e, batch.into_iter().map(Request::unanswered));
                    // Retry opening at the next request or renewal, not in a spin.
                    self.renewed = Some(Instant::now());
                    return;
                }
            },
        };
        let renew_at = renew.then(now_ms);
        match sql::run_batch(&conn, &self.lease, batch, renew_at) {
            Ok(answers) => {
                self.conn = Some(conn);
                self.committed(answers, renew_at);
            }
            Err(failed) => {
                // Reopen next time: the file may have been replaced or fixed.
                drop(conn);
                self.renewed = Some(Instant::now());
                self.fail(&failed.error, failed.waiting);
            }
        }
    }

    /// `renewed_at`: the time the lease renewal in the batch was made, if one was.
    fn committed(&mut self, answers: Vec<Answer>, renewed_at: Option<i64>) {
        if let Some(now) = renewed_at {
            self.renewed = Some(Instant::now());
            let until = now.saturating_add(ms(self.lease.duration));
            self.lease
                .valid_until
                .store(u64::try_from(until).unwrap_or(0), Ordering::Relaxed);
        }
        (self.on_commit)();
        if !self.healthy.swap(true, Ordering::Relaxed) {
            tracing::info!(path = %self.shown, "dedup store is writable again");
        }
        for answer in answers {
            answer.send();
        }
    }

    /// Marks the store unhealthy and gives every waiter of the batch its error.
    fn fail(&self, e: &rusqlite::Error, waiting: impl IntoIterator<Item = Unanswered>) {
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::error!(path = %self.shown, error = %e, "dedup store cannot be written: messages are held and retried, nothing is acked as done until it recovers");
        }
        let err = Error {
            path: self.shown.clone(),
            message: e.to_string(),
        };
        for request in waiting {
            request.fail(&err);
        }
    }
}

/// Adds the requests already waiting to `batch`, up to [`MAX_BATCH`].
fn take_waiting(rx: &mpsc::Receiver<Request>, batch: &mut Vec<Request>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
}

impl Store {
    /// Starts the store thread. Opening happens there, and is retried on every
    /// request while it fails, so a bad file does not stop the worker. `lease`:
    /// see [`crate::config::DedupSettings::lease`].
    /// `on_commit` is told of each transaction it commits.
    pub fn open(path: &Path, lease: Duration, on_commit: OnCommit) -> Self {
        let (tx, rx) = mpsc::channel();
        let healthy = Arc::new(AtomicBool::new(true));
        let lease = Arc::new(Lease {
            holder: uuid::Uuid::now_v7().to_string(),
            duration: lease,
            valid_until: AtomicU64::new(0),
        });
        let thread = Thread {
            path: path.to_path_buf(),
            shown: path.display().to_string(),
            conn: None,
            healthy: healthy.clone(),
            on_commit,
            lease: lease.clone(),
            renewed: None,
        };
        std::thread::Builder::new()
            .name("hookq-dedup".into())
            .spawn(move || thread.run(rx))
            .map(|_| ())
            .unwrap_or_else(|e| tracing::error!("cannot start the dedup thread: {e}"));
        Self {
            tx,
            healthy,
            lease,
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

    /// Sends the request that `op` makes of a reply channel, and awaits the answer.
    async fn call<T>(&self, op: impl FnOnce(Responder<T>) -> Op, now_ms: i64) -> Result<T, Error> {
        let (reply, rx) = oneshot::channel();
        let gone = || Error {
            path: self.path.display().to_string(),
            message: "the store thread stopped".into(),
        };
        self.tx
            .send(Request {
                op: op(reply),
                now_ms,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    pub async fn claim(&self, key: &str, message_id: &str) -> Result<Claim, Error> {
        self.claim_at(key, message_id, now_ms()).await
    }

    /// [`Store::claim`] at a given time (tests move the clock).
    pub async fn claim_at(&self, key: &str, message_id: &str, now: i64) -> Result<Claim, Error> {
        let op = |reply| Op::Claim {
            key: key_hash(key),
            message_id: message_id.into(),
            reply,
        };
        self.call(op, now).await
    }

    pub async fn done(&self, key: &str) -> Result<(), Error> {
        self.done_at(key, now_ms()).await
    }

    pub async fn done_at(&self, key: &str, now: i64) -> Result<(), Error> {
        let op = |reply| Op::Done {
            key: key_hash(key),
            reply,
        };
        self.call(op, now).await
    }

    pub async fn release(&self, key: &str, message_id: &str) -> Result<(), Error> {
        let op = |reply| Op::Release {
            key: key_hash(key),
            message_id: message_id.into(),
            reply,
        };
        self.call(op, now_ms()).await
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
        let op = |reply| park_op(key, message_id, attempts, handback, reply);
        self.call(op, now_ms()).await
    }

    /// [`Store::park`] without waiting for the answer, for a `Drop`: a task that
    /// ended without settling its claim must not leave it live. Nobody listens
    /// for the answer: the receiver is dropped here.
    pub fn park_in_background(&self, key: &str, message_id: &str, attempts: u32) {
        let (reply, _) = oneshot::channel();
        let _ = self.tx.send(Request {
            op: park_op(key, message_id, attempts, false, reply),
            now_ms: now_ms(),
        });
    }

    /// One step of a prune pass, which starts with `after = None` and goes on
    /// from each step's [`Pruned::next`]: deletes keys done more than
    /// `retention` ago among the next [`PRUNE_SLICE`] in hash order, and up to
    /// as many claims untouched for as long (never one a live holder works on).
    pub async fn prune(
        &self,
        retention: Duration,
        after: Option<KeyHash>,
    ) -> Result<Pruned, Error> {
        let now = now_ms();
        let older_than_ms = now.saturating_sub(ms(retention));
        let op = |reply| Op::Prune {
            older_than_ms,
            after,
            reply,
        };
        self.call(op, now).await
    }

    /// Records keys delivered elsewhere (read from a done-log) as done at
    /// `at_ms`, a record never made younger than it is.
    pub async fn done_many(&self, keys: Vec<String>, at_ms: u64) -> Result<(), Error> {
        let at_ms = i64::try_from(at_ms).unwrap_or(i64::MAX);
        let keys = keys.iter().map(|k| key_hash(k)).collect();
        let op = |reply| Op::DoneMany { keys, at_ms, reply };
        self.call(op, now_ms()).await
    }

    /// How far this host has read done-log `log` (`None`: not at all, or
    /// only by a version that kept no fingerprint).
    pub async fn read_position(&self, log: &str) -> Result<Option<ReadPosition>, Error> {
        let op = |reply| Op::Position {
            log: log.into(),
            reply,
        };
        self.call(op, now_ms()).await
    }

    /// Notes how far done-log `log` is read. It replaces what was there: the
    /// active consumer of a partition is the only one reading its done-log,
    /// and a recreated done-log's position is lower than the old one's.
    pub async fn set_read_position(&self, log: &str, position: ReadPosition) -> Result<(), Error> {
        let op = |reply| Op::SetPosition {
            log: log.into(),
            position,
            reply,
        };
        self.call(op, now_ms()).await
    }

    /// When `key` was done, if it was. A read: a worker that delivers a
    /// partition alone keeps its claims in memory and writes only the done.
    pub async fn done_at_ms(&self, key: &str) -> Result<Option<u64>, Error> {
        let op = |reply| Op::IsDone {
            key: key_hash(key),
            reply,
        };
        self.call(op, now_ms()).await
    }

    /// Takes partition `log` for this process: true when no other live
    /// process on this host holds it. Workers on one host that deliver a
    /// partition in turn (the single active consumer moves between them)
    /// hand it over here: the next one waits until the last one's
    /// deliveries of it have ended, which per-key claims in memory cannot
    /// see across processes.
    pub async fn take_partition(&self, log: &str) -> Result<bool, Error> {
        let op = |reply| Op::TakePartition {
            log: log.into(),
            reply,
        };
        self.call(op, now_ms()).await
    }

    /// Leaves partition `log`: this process has none of its messages in
    /// flight any more.
    pub async fn leave_partition(&self, log: &str) -> Result<(), Error> {
        let op = |reply| Op::LeavePartition {
            log: log.into(),
            reply,
        };
        self.call(op, now_ms()).await
    }

    /// Checks that the file can be written now (updates health either way).
    pub async fn probe(&self) -> Result<(), Error> {
        self.call(|reply| Op::Probe { reply }, now_ms()).await
    }
}

fn park_op(key: &str, message_id: &str, attempts: u32, handback: bool, reply: Responder<()>) -> Op {
    Op::Park {
        key: key_hash(key),
        message_id: message_id.into(),
        attempts,
        handback,
        reply,
    }
}

#[cfg(test)]
mod tests;
