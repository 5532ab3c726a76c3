//! The SQL of the store: the schema (and its in-place upgrade), the claim
//! statements, and one batch in one transaction. Runs on the store thread only.

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{Answer, Claim, Lease, Op, PRUNE_BATCH, ReadPosition, Request, ms};

pub(super) fn open(path: &Path) -> rusqlite::Result<Connection> {
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
        Op::DoneMany { keys, at_ms } => {
            let mut st = c.prepare_cached(
                "INSERT INTO keys(key, state, message_id, holder, updated_ms) VALUES (?1, 1, '', NULL, ?2)
                 ON CONFLICT(key) DO UPDATE SET state = 1, holder = NULL,
                    updated_ms = MAX(keys.updated_ms, excluded.updated_ms)",
            )?;
            for key in keys {
                st.execute(params![key, at_ms])?;
            }
            Answer::Unit
        }
        Op::Position { log } => {
            let row: Option<(i64, String)> = c
                .prepare_cached(
                    "SELECT last_offset, fingerprint FROM done_log_reads WHERE log = ?1",
                )?
                .query_row(params![log], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            Answer::Position(row.and_then(|(o, fingerprint)| {
                Some(ReadPosition {
                    offset: u64::try_from(o).ok()?,
                    fingerprint,
                })
            }))
        }
        Op::SetPosition { log, position } => {
            c.prepare_cached(
                "INSERT INTO done_log_reads(log, last_offset, fingerprint) VALUES (?1, ?2, ?3)
                 ON CONFLICT(log) DO UPDATE SET last_offset = excluded.last_offset,
                                                fingerprint = excluded.fingerprint",
            )?
            .execute(params![
                log,
                i64::try_from(position.offset).unwrap_or(i64::MAX),
                position.fingerprint
            ])?;
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
pub(super) fn run_batch(
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
