//! The SQL of the store: the schema (and its in-place upgrade), one function
//! per request, and one batch in one transaction, whose answers are held until
//! it ends. Runs on the store thread only.

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Claim, Error, KeyHash, Lease, Op, PRUNE_SLICE, Pruned, ReadPosition, Request, Responder,
    key_hash, ms,
};

/// Turns WAL on. Switching the journal mode takes the file's exclusive lock
/// without SQLite's busy handler: two processes opening a new file at once
/// (workers started together) see SQLITE_BUSY, so it is retried here for as
/// long as the busy timeout.
fn wal(c: &Connection) -> rusqlite::Result<()> {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match c.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < until =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

pub(super) fn open(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        let _ = std::fs::create_dir_all(dir);
    }
    let c = Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(5))?;
    wal(&c)?;
    // With WAL, NORMAL fsyncs at checkpoints, not at every commit: a process crash
    // loses nothing; a power cut may lose the last commits (a key delivered again,
    // with the same Idempotency-Key). FULL would fsync each batch.
    c.pragma_update(None, "synchronous", "NORMAL")?;
    c.execute_batch(
        "BEGIN IMMEDIATE;
         -- Keys delivered: the bulk of the file, so a row is only what a
         -- lookup and the prune need: the key's hash (KeyHash) and when.
         -- No index on at_ms (it would double the row): the prune walks
         -- the table in key order, a slice at a time.
         CREATE TABLE IF NOT EXISTS done (
             key   BLOB PRIMARY KEY,
             at_ms INTEGER NOT NULL
         ) WITHOUT ROWID;
         -- Keys being delivered, waiting in a delay queue, or dead-lettered:
         -- as many as there are messages in flight, so fields may be wide.
         CREATE TABLE IF NOT EXISTS claims (
             key        BLOB PRIMARY KEY,
             state      INTEGER NOT NULL, -- 0 claimed, 2 released (dead-lettered)
             message_id TEXT NOT NULL,    -- the message that holds the claim
             holder     TEXT,             -- the process working on it; NULL when parked
             attempts   INTEGER NOT NULL DEFAULT 0, -- failures recorded by holders that could not settle
             handbacks  INTEGER NOT NULL DEFAULT 0, -- republishes the broker refused
             updated_ms INTEGER NOT NULL
         ) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS claims_updated ON claims(updated_ms);
         -- Partitions a process on this host delivers now, alone (single
         -- active consumer): the next process waits for it to leave.
         CREATE TABLE IF NOT EXISTS partition_holders (
             log    TEXT PRIMARY KEY,
             holder TEXT NOT NULL
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS holders (
             holder         TEXT PRIMARY KEY,
             lease_until_ms INTEGER NOT NULL
         ) WITHOUT ROWID;
         -- How far this host read each partition's done-log (a stream): the
         -- offset of the last record applied and its fingerprint, which tells
         -- a recreated stream from the one read before.
         CREATE TABLE IF NOT EXISTS done_log_reads (
             log         TEXT PRIMARY KEY,
             last_offset INTEGER NOT NULL,
             fingerprint TEXT NOT NULL
         ) WITHOUT ROWID;
         -- Read positions of earlier versions, offsets without a fingerprint:
         -- dropped (the next catch-up reads each done-log from its start).
         DROP TABLE IF EXISTS done_logs;",
    )?;
    upgrade_keys_table(&c)?;
    c.execute_batch("COMMIT")?;
    Ok(c)
}

/// Moves the rows of earlier versions' one `keys` table (readable keys, a
/// row of about 130 – 180 bytes) into `done` and `claims`, then drops it.
/// Runs once, in the opening transaction: a second process waits for it.
fn upgrade_keys_table(c: &Connection) -> rusqlite::Result<()> {
    let columns: Vec<String> = c
        .prepare("SELECT name FROM pragma_table_info('keys')")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if columns.is_empty() {
        return Ok(());
    }
    // The first release had neither holders nor counts.
    let or = |name: &'static str, default: &'static str| {
        if columns.iter().any(|c| c == name) {
            name
        } else {
            default
        }
    };
    let select = format!(
        "SELECT key, state, message_id, updated_ms, {}, {}, {} FROM keys",
        or("holder", "NULL"),
        or("attempts", "0"),
        or("handbacks", "0")
    );
    let mut done = c.prepare(
        "INSERT INTO done(key, at_ms) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET at_ms = MAX(done.at_ms, excluded.at_ms)",
    )?;
    let mut claim = c.prepare(
        "INSERT INTO claims(key, state, message_id, holder, attempts, handbacks, updated_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(key) DO NOTHING",
    )?;
    let mut moved = 0u64;
    let mut rows = c.prepare(&select)?;
    let mut rows = rows.query([])?;
    while let Some(r) = rows.next()? {
        let key = key_hash(&r.get::<_, String>(0)?);
        let (state, at): (i64, i64) = (r.get(1)?, r.get(3)?);
        if state == 1 {
            done.execute(params![key, at])?;
        } else {
            let (message, holder): (String, Option<String>) = (r.get(2)?, r.get(4)?);
            let (attempts, handbacks): (i64, i64) = (r.get(5)?, r.get(6)?);
            claim.execute(params![
                key, state, message, holder, attempts, handbacks, at
            ])?;
        }
        moved += 1;
    }
    c.execute_batch("DROP TABLE keys")?;
    tracing::info!(
        keys = moved,
        "dedup store upgraded: keys are kept as 16-byte hashes"
    );
    Ok(())
}

/// SQL: the claim is worked on by a live holder, one whose lease has not run
/// out at the time in parameter `now` (e.g. `"?4"`).
fn live(now: &str) -> String {
    format!(
        "claims.holder IS NOT NULL AND EXISTS (SELECT 1 FROM holders h
         WHERE h.holder = claims.holder AND h.lease_until_ms >= {now})"
    )
}

/// Takes the key: insert, or take it over when it was released, or when it is
/// this message's and no live holder works on it. ?1 key, ?2 message, ?3 holder, ?4 now.
static CLAIM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO claims(key, state, message_id, holder, attempts, handbacks, updated_ms)
         VALUES (?1, 0, ?2, ?3, 0, 0, ?4)
         ON CONFLICT(key) DO UPDATE SET
            state = 0, message_id = excluded.message_id, holder = excluded.holder,
            updated_ms = excluded.updated_ms,
            attempts = CASE WHEN claims.state = 2 THEN 0 ELSE claims.attempts END,
            handbacks = CASE WHEN claims.state = 2 THEN 0 ELSE claims.handbacks END
         WHERE claims.state = 2
            OR (claims.state = 0 AND claims.message_id = excluded.message_id AND NOT ({}))
         RETURNING attempts, handbacks",
        live("?4")
    )
});

/// Who holds a claim that was not won, and whether a live holder works on
/// it. ?1 key, ?2 now.
static HELD: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT message_id, ({}) FROM claims WHERE key = ?1",
        live("?2")
    )
});

/// Old claims (dead-lettered keys, parked ones whose message was lost),
/// never one a live holder works on (a slow delivery). ?1 cutoff, ?2 batch
/// size, ?3 now.
static PRUNE_CLAIMS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "DELETE FROM claims WHERE key IN
           (SELECT key FROM claims WHERE updated_ms < ?1 AND NOT (state = 0 AND {}) LIMIT ?2)",
        live("?3")
    )
});

/// A request's view of the open transaction: the connection, this process's
/// holder id (claims record it), and the time the request was made.
struct Txn<'a> {
    c: &'a Connection,
    holder: &'a str,
    now: i64,
}

impl Txn<'_> {
    /// Takes the key if it can; when it cannot, says why.
    fn claim(&self, key: &KeyHash, message_id: &str) -> rusqlite::Result<Claim> {
        if let Some(at_ms) = self.done_at(key)? {
            return Ok(Claim::Done { at_ms });
        }
        let won: Option<(i64, i64)> = self
            .c
            .prepare_cached(&CLAIM)?
            .query_row(params![&key[..], message_id, self.holder, self.now], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((attempts, handbacks)) = won {
            return Ok(Claim::Claimed {
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                handbacks: u32::try_from(handbacks).unwrap_or(u32::MAX),
            });
        }
        let (holder_msg, live): (String, bool) = self
            .c
            .prepare_cached(&HELD)?
            .query_row(params![&key[..], self.now], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(if holder_msg == message_id && live {
            Claim::Busy
        } else {
            Claim::HeldBy(holder_msg)
        })
    }

    fn done(&self, key: &KeyHash) -> rusqlite::Result<()> {
        // Unconditional: a 2xx happened, whoever holds the claim now.
        self.c
            .prepare_cached(
                "INSERT INTO done(key, at_ms) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET at_ms = excluded.at_ms",
            )?
            .execute(params![&key[..], self.now])?;
        self.c
            .prepare_cached("DELETE FROM claims WHERE key = ?1")?
            .execute(params![&key[..]])?;
        Ok(())
    }

    fn release(&self, key: &KeyHash, message_id: &str) -> rusqlite::Result<()> {
        // Only this holder's claim (or a parked one of this message): a
        // holder whose lease ran out and was taken over changes nothing.
        self.c
            .prepare_cached(
                "UPDATE claims SET state = 2, holder = NULL, updated_ms = ?4
                 WHERE key = ?1 AND message_id = ?2 AND state = 0 AND (holder = ?3 OR holder IS NULL)",
            )?
            .execute(params![&key[..], message_id, self.holder, self.now])?;
        Ok(())
    }

    fn park(
        &self,
        key: &KeyHash,
        message_id: &str,
        attempts: u32,
        handback: bool,
    ) -> rusqlite::Result<()> {
        self.c
            .prepare_cached(
                "UPDATE claims SET holder = NULL, updated_ms = ?4,
                    attempts = MAX(attempts, ?5), handbacks = handbacks + ?6
                 WHERE key = ?1 AND message_id = ?2 AND state = 0 AND holder = ?3",
            )?
            .execute(params![
                &key[..],
                message_id,
                self.holder,
                self.now,
                attempts,
                i64::from(handback)
            ])?;
        Ok(())
    }

    /// One step of a prune pass: the next [`PRUNE_SLICE`] done keys after
    /// `after` in key order (the hashes spread evenly), of which those done
    /// before `older_than_ms` go; and up to [`PRUNE_SLICE`] old claims. The
    /// write lock is held for at most that many deletions.
    fn prune(&self, older_than_ms: i64, after: Option<&KeyHash>) -> rusqlite::Result<Pruned> {
        let after: &[u8] = after.map_or(&[], |k| &k[..]);
        let last: Option<Vec<u8>> = self
            .c
            .prepare_cached("SELECT key FROM done WHERE key > ?1 ORDER BY key LIMIT 1 OFFSET ?2")?
            .query_row(params![after, PRUNE_SLICE as i64 - 1], |r| r.get(0))
            .optional()?;
        let mut deleted = match &last {
            Some(last) => self
                .c
                .prepare_cached("DELETE FROM done WHERE key > ?1 AND key <= ?2 AND at_ms < ?3")?
                .execute(params![after, last, older_than_ms])?,
            None => self
                .c
                .prepare_cached("DELETE FROM done WHERE key > ?1 AND at_ms < ?2")?
                .execute(params![after, older_than_ms])?,
        };
        deleted += self.c.prepare_cached(&PRUNE_CLAIMS)?.execute(params![
            older_than_ms,
            PRUNE_SLICE as i64,
            self.now
        ])?;
        self.c
            .prepare_cached("DELETE FROM holders WHERE lease_until_ms < ?1")?
            .execute(params![older_than_ms])?;
        Ok(Pruned {
            deleted,
            next: last.and_then(|k| KeyHash::try_from(k.as_slice()).ok()),
        })
    }

    fn done_at(&self, key: &KeyHash) -> rusqlite::Result<Option<u64>> {
        let at: Option<i64> = self
            .c
            .prepare_cached("SELECT at_ms FROM done WHERE key = ?1")?
            .query_row(params![&key[..]], |r| r.get(0))
            .optional()?;
        Ok(at.map(|at| u64::try_from(at).unwrap_or(0)))
    }

    /// Takes the partition when it is free, this process's, or its holder's
    /// lease ran out (a SIGKILL).
    fn take_partition(&self, log: &str) -> rusqlite::Result<bool> {
        let taken = self
            .c
            .prepare_cached(
                "INSERT INTO partition_holders(log, holder) VALUES (?1, ?2)
                 ON CONFLICT(log) DO UPDATE SET holder = excluded.holder
                 WHERE partition_holders.holder = excluded.holder
                    OR NOT EXISTS (SELECT 1 FROM holders h
                        WHERE h.holder = partition_holders.holder AND h.lease_until_ms >= ?3)
                 RETURNING 1",
            )?
            .query_row(params![log, self.holder, self.now], |_| Ok(()))
            .optional()?;
        Ok(taken.is_some())
    }

    fn leave_partition(&self, log: &str) -> rusqlite::Result<()> {
        self.c
            .prepare_cached("DELETE FROM partition_holders WHERE log = ?1 AND holder = ?2")?
            .execute(params![log, self.holder])?;
        Ok(())
    }

    fn probe(&self) -> rusqlite::Result<()> {
        // A write that changes nothing proves the file is writable now.
        self.c.execute(
            "UPDATE holders SET lease_until_ms = lease_until_ms WHERE 0",
            [],
        )?;
        Ok(())
    }

    fn done_many(&self, keys: &[KeyHash], at_ms: i64) -> rusqlite::Result<()> {
        let mut done = self.c.prepare_cached(
            "INSERT INTO done(key, at_ms) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET at_ms = MAX(done.at_ms, excluded.at_ms)",
        )?;
        let mut claim = self.c.prepare_cached("DELETE FROM claims WHERE key = ?1")?;
        for key in keys {
            done.execute(params![&key[..], at_ms])?;
            claim.execute(params![&key[..]])?;
        }
        Ok(())
    }

    fn read_position(&self, log: &str) -> rusqlite::Result<Option<ReadPosition>> {
        let row: Option<(i64, String)> = self
            .c
            .prepare_cached("SELECT last_offset, fingerprint FROM done_log_reads WHERE log = ?1")?
            .query_row(params![log], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(row.and_then(|(o, fingerprint)| {
            Some(ReadPosition {
                offset: u64::try_from(o).ok()?,
                fingerprint,
            })
        }))
    }

    fn set_read_position(&self, log: &str, position: &ReadPosition) -> rusqlite::Result<()> {
        self.c
            .prepare_cached(
                "INSERT INTO done_log_reads(log, last_offset, fingerprint) VALUES (?1, ?2, ?3)
                 ON CONFLICT(log) DO UPDATE SET last_offset = excluded.last_offset,
                                                fingerprint = excluded.fingerprint",
            )?
            .execute(params![
                log,
                i64::try_from(position.offset).unwrap_or(i64::MAX),
                position.fingerprint
            ])?;
        Ok(())
    }
}

/// A request whose statements ran, its answer held until the transaction
/// ends: a waiter must not act on a claim that a rollback undoes.
pub(super) struct Answer(OnEnd);

/// Sends the answer when the transaction ends: given `Ok` if it committed,
/// the batch's error if not.
type OnEnd = Box<dyn FnOnce(Result<(), &Error>) + Send>;

impl Answer {
    fn new<T: Send + 'static>(reply: Responder<T>, answer: T) -> Self {
        Self(Box::new(move |end| {
            let _ = reply.send(end.map(|()| answer).map_err(Error::clone));
        }))
    }

    /// The transaction committed: the waiter gets its answer.
    pub(super) fn send(self) {
        (self.0)(Ok(()))
    }
}

/// A request whose waiter gets the batch's error and nothing else: the batch
/// failed, before, during or after its statements.
pub(super) struct Unanswered(Box<dyn FnOnce(&Error) + Send>);

impl Unanswered {
    fn new<T: Send + 'static>(reply: Responder<T>) -> Self {
        Self(Box::new(move |e| {
            let _ = reply.send(Err(e.clone()));
        }))
    }

    pub(super) fn fail(self, e: &Error) {
        (self.0)(e)
    }
}

impl From<Answer> for Unanswered {
    /// The batch failed after this request ran: the rollback undid its answer.
    fn from(answer: Answer) -> Self {
        Self(Box::new(move |e| (answer.0)(Err(e))))
    }
}

impl Request {
    pub(super) fn unanswered(self) -> Unanswered {
        // One arm per type of answer.
        match self.op {
            Op::Claim { reply, .. } => Unanswered::new(reply),
            Op::Position { reply, .. } => Unanswered::new(reply),
            Op::IsDone { reply, .. } => Unanswered::new(reply),
            Op::TakePartition { reply, .. } => Unanswered::new(reply),
            Op::Prune { reply, .. } => Unanswered::new(reply),
            Op::Done { reply, .. }
            | Op::Release { reply, .. }
            | Op::Park { reply, .. }
            | Op::Probe { reply }
            | Op::LeavePartition { reply, .. }
            | Op::DoneMany { reply, .. }
            | Op::SetPosition { reply, .. } => Unanswered::new(reply),
        }
    }

    /// Runs the request's statements in the open transaction and holds the
    /// answer for its end. On an error, the request comes back unanswered, to
    /// be told the batch's error with the others.
    fn run(self, c: &Connection, holder: &str) -> Result<Answer, (rusqlite::Error, Unanswered)> {
        let txn = Txn {
            c,
            holder,
            now: self.now_ms,
        };
        match self.op {
            Op::Claim {
                key,
                message_id,
                reply,
            } => hold(reply, txn.claim(&key, &message_id)),
            Op::Done { key, reply } => hold(reply, txn.done(&key)),
            Op::Release {
                key,
                message_id,
                reply,
            } => hold(reply, txn.release(&key, &message_id)),
            Op::Park {
                key,
                message_id,
                attempts,
                handback,
                reply,
            } => hold(reply, txn.park(&key, &message_id, attempts, handback)),
            Op::Prune {
                older_than_ms,
                after,
                reply,
            } => hold(reply, txn.prune(older_than_ms, after.as_ref())),
            Op::Probe { reply } => hold(reply, txn.probe()),
            Op::IsDone { key, reply } => hold(reply, txn.done_at(&key)),
            Op::TakePartition { log, reply } => hold(reply, txn.take_partition(&log)),
            Op::LeavePartition { log, reply } => hold(reply, txn.leave_partition(&log)),
            Op::DoneMany { keys, at_ms, reply } => hold(reply, txn.done_many(&keys, at_ms)),
            Op::Position { log, reply } => hold(reply, txn.read_position(&log)),
            Op::SetPosition {
                log,
                position,
                reply,
            } => hold(reply, txn.set_read_position(&log, &position)),
        }
    }
}

/// Holds a request's answer for the end of the transaction, or hands its reply
/// back with the error that ends the batch.
fn hold<T: Send + 'static>(
    reply: Responder<T>,
    ran: rusqlite::Result<T>,
) -> Result<Answer, (rusqlite::Error, Unanswered)> {
    match ran {
        Ok(answer) => Ok(Answer::new(reply, answer)),
        Err(e) => Err((e, Unanswered::new(reply))),
    }
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

/// Ends this process's lease: it holds nothing any more, so a redelivery of
/// anything it left can take over at once.
pub(super) fn end_lease(c: &Connection, lease: &Lease) -> rusqlite::Result<()> {
    c.execute(
        "DELETE FROM holders WHERE holder = ?1",
        params![lease.holder],
    )?;
    Ok(())
}

/// A batch that failed and was rolled back: the error, which is every
/// request's answer, and the requests, in the order they came.
pub(super) struct Failed {
    pub(super) error: rusqlite::Error,
    pub(super) waiting: Vec<Unanswered>,
}

impl Failed {
    /// `ran`: the requests that ran before `error`; `rest`: the one that
    /// failed, if one did, and those that did not run.
    fn new(
        error: rusqlite::Error,
        ran: Vec<Answer>,
        rest: impl IntoIterator<Item = Unanswered>,
    ) -> Self {
        let waiting = ran.into_iter().map(Unanswered::from).chain(rest).collect();
        Self { error, waiting }
    }
}

/// Runs a batch (and the lease renewal, when `renew_at` says so) in one
/// transaction. The answers are sent by the caller once this returns them:
/// the transaction has committed by then.
pub(super) fn run_batch(
    c: &Connection,
    lease: &Lease,
    batch: Vec<Request>,
    renew_at: Option<i64>,
) -> Result<Vec<Answer>, Failed> {
    if let Err(e) = c.execute_batch("BEGIN IMMEDIATE") {
        return Err(Failed::new(
            e,
            Vec::new(),
            batch.into_iter().map(Request::unanswered),
        ));
    }
    let ended = run_in_transaction(c, lease, batch, renew_at).and_then(|answers| {
        match c.execute_batch("COMMIT") {
            Ok(()) => Ok(answers),
            Err(e) => Err(Failed::new(e, answers, [])),
        }
    });
    if ended.is_err() {
        let _ = c.execute_batch("ROLLBACK");
    }
    ended
}

fn run_in_transaction(
    c: &Connection,
    lease: &Lease,
    batch: Vec<Request>,
    renew_at: Option<i64>,
) -> Result<Vec<Answer>, Failed> {
    if let Some(now) = renew_at
        && let Err(e) = renew(c, lease, now)
    {
        return Err(Failed::new(
            e,
            Vec::new(),
            batch.into_iter().map(Request::unanswered),
        ));
    }
    let mut answers = Vec::with_capacity(batch.len());
    let mut requests = batch.into_iter();
    while let Some(r) = requests.next() {
        match r.run(c, &lease.holder) {
            Ok(answer) => answers.push(answer),
            Err((e, failed)) => {
                let rest = std::iter::once(failed).chain(requests.map(Request::unanswered));
                return Err(Failed::new(e, answers, rest));
            }
        }
    }
    Ok(answers)
}
