//! `hookq shovel`: dead letters back to the work queue.
//!
//! The rule every move keeps: the copy for `P.work` is published and confirmed
//! by the broker first, and only then is the dead letter acked. A crash or a lost
//! connection at any point leaves at worst a copy in both queues (which the
//! worker's dedup absorbs), never a loss.
//!
//! Moves are pipelined: up to [`Options::window`] publishes await their confirms
//! at once, each acking its own dead letter when confirmed, while the next dead
//! letters are read. Non-matching dead letters are held unacked until the end,
//! when closing the reader puts them back in their original order.

use std::time::Duration;

use tokio::task::JoinSet;

use super::{Counts, DeadLetter, DeadLetters, ReadBy, Row};
use crate::broker::Acker;
use crate::broker::{self, Broker};
use crate::config::valid_source_name;
use crate::message::{DeadReason, Envelope};

/// Which dead letters to move; every given criterion must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub source: Option<String>,
    pub reason: Option<DeadReason>,
    pub key: Option<String>,
    /// Only these message ids (the admin console's selection); `None`: any.
    pub message_ids: Option<std::collections::BTreeSet<String>>,
}

/// A command line that cannot mean anything (exit 2).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UsageError {
    #[error(
        "--reason {0:?} is not a dead reason; use one of max_attempts, rejected, delivery_limit, invalid"
    )]
    Reason(String),
    #[error("--source {0:?} is not a source name (1 to 64 of a-z, 0-9, _ and -)")]
    Source(String),
}

impl Filter {
    /// A filter on a source, a dead reason (as written: `rejected`...) and a
    /// key, each optional; a reason or source that cannot be one is refused.
    pub fn new(
        source: Option<&str>,
        reason: Option<&str>,
        key: Option<&str>,
    ) -> Result<Self, UsageError> {
        let reason = match reason {
            Some(r) => Some(DeadReason::parse(r).ok_or_else(|| UsageError::Reason(r.into()))?),
            None => None,
        };
        if let Some(s) = source
            && !valid_source_name(s)
        {
            return Err(UsageError::Source(s.into()));
        }
        Ok(Self {
            source: source.map(str::to_string),
            reason,
            key: key.map(str::to_string),
            message_ids: None,
        })
    }

    /// Whether it moves every dead letter (no criterion given).
    pub fn takes_all(&self) -> bool {
        *self == Self::default()
    }

    /// Whether to move this dead letter.
    pub fn matches(&self, env: &Envelope) -> bool {
        self.source.as_ref().is_none_or(|s| *s == env.source)
            && self.key.as_ref().is_none_or(|k| *k == env.key.0)
            && self
                .message_ids
                .as_ref()
                .is_none_or(|ids| ids.contains(&env.message_id.0))
            && self
                .reason
                .is_none_or(|r| env.dead.as_ref().is_some_and(|d| d.reason == r))
    }
}

/// How a run goes.
#[derive(Clone, Debug)]
pub struct Options {
    /// Move (or, dry, list) at most this many.
    pub limit: Option<u64>,
    pub dry_run: bool,
    /// Each publish's confirm waits this long at most.
    pub publish_timeout: Duration,
    /// Moves awaiting their confirm at once. 1 is strictly one by one.
    ///
    /// A move is bound by the broker's confirm latency (on a quorum queue, a
    /// Raft round), so the rate is about `window` / that latency until the
    /// broker's CPU is the limit: in `hookq bench` 256 moved 14 – 32% more
    /// than 64. A run that moves every dead letter reads
    /// [`READ_AHEAD`] windows ahead; others read the whole run ahead.
    pub window: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            limit: None,
            dry_run: false,
            publish_timeout: crate::worker::REPUBLISH_TIMEOUT,
            window: 256,
        }
    }
}

/// What a run reports as it goes, for a progress bar or a listing.
#[derive(Debug)]
pub enum Event<'a> {
    /// `seen` of at most `total` dead letters looked at.
    Looked { seen: u64, total: u64 },
    /// Dry run: this one would move.
    WouldMove(&'a Row),
    /// This one is in the work queue (confirmed) and gone from `P.dead`.
    Moved(&'a Row),
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Dead letters at the start of the run, as far as this run looks.
    pub total: u64,
    pub looked_at: u64,
    /// Moved, by source and reason.
    pub moved: Counts,
    /// Dry run: would move, by source and reason.
    pub would_move: Counts,
    /// Looked at and left in `P.dead` (not matching, or not a hookq message).
    pub kept: u64,
    /// Of `kept`: dead letters that are not hookq messages (unreadable, or
    /// parked by a worker with reason `invalid`). They never move: the worker
    /// would only park them again, and the target would get garbage.
    pub skipped: u64,
}

/// Why a run stopped before its end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Broker(#[from] broker::Error),
    #[error("a move stopped unexpectedly: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Windows the reader of a run that moves everything reads ahead of the moves.
pub const READ_AHEAD: u64 = 4;

/// A run that stopped part way: what it did until then, and why it stopped.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Interrupted {
    pub summary: Summary,
    pub error: Error,
}

/// The work envelope for a dead letter: a fresh start (attempts 0, no dead
/// information, no pending Retry-After) that remembers where it has been.
pub fn back_to_work(dead: &Envelope) -> Envelope {
    let mut env = dead.clone();
    env.previous_dead_reason = dead.dead.as_ref().map(|d| d.reason.as_str().to_string());
    env.dead = None;
    env.attempts = 0;
    env.not_before = None;
    env.shovelled = dead.shovelled.saturating_add(1);
    env
}

/// How one move ended; a dead letter whose copy was not confirmed comes back
/// with it, to be handed back.
type Moved = (Row, ReadBy, Result<(), (broker::Error, Option<Acker>)>);

/// Publishes the copy with confirm, then acks the dead letter.
async fn move_one(broker: Broker, dl: DeadLetter, timeout: Duration) -> Moved {
    let (row, by) = (dl.row(), dl.by);
    let mut env = back_to_work(&dl.envelope);
    // Back into its key's partition, whatever the dead letter says.
    env.partition = broker.topology().partition_header(&env.key);
    let work = broker.topology().work_for(&env.key);
    if let Err(e) = broker.publish_to_queue(&work, &env, None, timeout).await {
        return (row, by, Err((e, Some(dl.acker))));
    }
    let acked = dl.acker.ack().await.map_err(|e| (e, None));
    (row, by, acked)
}

/// Moves up to `opts.window` dead letters at once, in spawned tasks so that
/// their confirms and acks proceed while the next dead letter is being read.
struct Mover {
    broker: Broker,
    timeout: Duration,
    window: usize,
    running: JoinSet<Moved>,
    failed: Option<Error>,
}

/// What a settled move tells the run: the summary, the progress callback, and
/// the reader (whose prefetch slot is free again, or which holds the dead
/// letter again).
struct Run<'a> {
    summary: &'a mut Summary,
    on_event: &'a mut (dyn FnMut(Event<'_>) + Send),
    letters: &'a mut DeadLetters,
}

impl Mover {
    fn start(&mut self, dl: DeadLetter) {
        let (broker, timeout) = (self.broker.clone(), self.timeout);
        self.running.spawn(move_one(broker, dl, timeout));
    }

    /// Waits for one move to end and records it; false when none is running.
    async fn settle_one(&mut self, run: &mut Run<'_>) -> bool {
        let Some(joined) = self.running.join_next().await else {
            return false;
        };
        match joined {
            Ok((row, by, Ok(()))) => {
                run.letters.settled(by);
                run.summary.moved.add(&row.source, row.reason.as_deref());
                (run.on_event)(Event::Moved(&row));
            }
            Ok((_, by, Err((e, acker)))) => {
                match acker {
                    Some(a) => run.letters.hold(a, by),
                    None => run.letters.settled(by),
                }
                self.failed.get_or_insert(Error::Broker(e));
            }
            Err(e) => {
                self.failed.get_or_insert(Error::Task(e));
            }
        }
        true
    }

    /// Makes room for one more move (waits while the window is full).
    async fn make_room(&mut self, run: &mut Run<'_>) {
        while self.running.len() >= self.window.max(1) {
            self.settle_one(run).await;
        }
    }

    async fn drain(&mut self, run: &mut Run<'_>) {
        while self.settle_one(run).await {}
    }
}

/// Moves the dead letters `filter` matches from `P.dead` to the work queue,
/// looking at each dead letter present at the start at most once.
///
/// On a broker failure it stops starting moves, lets those under way end, puts
/// the rest back and returns [`Interrupted`] with what was moved: running it
/// again finishes the job.
// A little over 80 lines: the run's loop and its two ways out (done, or a
// broker failure that puts the rest back) read best in one place.
pub async fn shovel(
    broker: &Broker,
    filter: &Filter,
    opts: &Options,
    on_event: &mut (dyn FnMut(Event<'_>) + Send),
) -> Result<Summary, Interrupted> {
    let mut summary = Summary::default();
    // Moving everything, the reader holds only what is not a hookq message:
    // a prefetch of a few windows is enough (past it, `basic.get` reads on).
    // With a filter or a limit, the whole run is read ahead, as holds may be
    // most of it (and a quorum run with a limit reads on to its start).
    let cap = (filter.takes_all() && opts.limit.is_none() && !opts.dry_run)
        .then(|| (opts.window.max(1) as u64).saturating_mul(READ_AHEAD));
    let mut letters = match DeadLetters::open_with_prefetch(broker, None, cap).await {
        Ok(l) => l,
        Err(e) => {
            return Err(Interrupted {
                summary,
                error: e.into(),
            });
        }
    };
    summary.total = letters.total();
    let mut mover = Mover {
        broker: broker.clone(),
        timeout: opts.publish_timeout,
        window: opts.window,
        running: JoinSet::new(),
        failed: None,
    };
    let mut matched = 0u64;
    while mover.failed.is_none() && opts.limit.is_none_or(|l| matched < l) {
        let dl = match letters.next().await {
            Ok(Some(dl)) => dl,
            Ok(None) => break,
            Err(e) => {
                mover.failed = Some(e.into());
                break;
            }
        };
        summary.looked_at = letters.seen();
        on_event(Event::Looked {
            seen: letters.seen(),
            total: letters.total(),
        });
        // A message that is not a hookq message never moves, whatever the
        // filter says: the worker would only park it again.
        let never = dl.unreadable.is_some()
            || dl
                .envelope
                .dead
                .as_ref()
                .is_some_and(|d| d.reason == DeadReason::Invalid);
        if never || !filter.matches(&dl.envelope) {
            summary.kept += 1;
            summary.skipped += u64::from(never);
            letters.hold(dl.acker, dl.by);
            continue;
        }
        matched += 1;
        if opts.dry_run {
            let row = dl.row();
            summary.would_move.add(&row.source, row.reason.as_deref());
            on_event(Event::WouldMove(&row));
            letters.hold(dl.acker, dl.by);
            continue;
        }
        let mut run = Run {
            summary: &mut summary,
            on_event: &mut *on_event,
            letters: &mut letters,
        };
        mover.make_room(&mut run).await;
        if mover.failed.is_some() {
            letters.hold(dl.acker, dl.by);
            break;
        }
        mover.start(dl);
    }
    let mut run = Run {
        summary: &mut summary,
        on_event: &mut *on_event,
        letters: &mut letters,
    };
    mover.drain(&mut run).await;
    letters.close().await;
    match mover.failed {
        None => Ok(summary),
        Some(error) => Err(Interrupted { summary, error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{DeadInfo, DedupKey};

    fn dead_letter() -> Envelope {
        let mut env = Envelope::received(
            "shop",
            DedupKey("shop:1".into()),
            bytes::Bytes::from_static(b"{}"),
            None,
            std::iter::once((
                http::HeaderName::from_static("x-a"),
                http::HeaderValue::from_static("1"),
            ))
            .collect(),
        );
        env.attempts = 5;
        env.not_before = Some(1);
        env.shovelled = 1;
        env.previous_dead_reason = Some("rejected".into());
        env.dead = Some(DeadInfo {
            reason: DeadReason::MaxAttempts,
            last_error: "HTTP 500".into(),
            last_status: Some(500),
            dead_at: "2026-01-01T00:00:00.000Z".into(),
        });
        env
    }

    #[test]
    fn the_work_copy_starts_afresh_and_remembers_its_history() {
        let dead = dead_letter();
        let work = back_to_work(&dead);
        assert_eq!(work.attempts, 0);
        assert_eq!(work.dead, None);
        assert_eq!(work.not_before, None);
        assert_eq!(work.shovelled, 2);
        assert_eq!(work.previous_dead_reason.as_deref(), Some("max_attempts"));
        assert_eq!(work.message_id, dead.message_id);
        assert_eq!(work.body, dead.body);
        assert_eq!(work.headers, dead.headers);
        assert_eq!(work.key, dead.key);
        assert_eq!(work.received_at, dead.received_at);
    }

    #[test]
    fn reasons_and_sources_are_checked_before_connecting() {
        let filter = |reason: &str, source: &str| Filter::new(Some(source), Some(reason), None);
        assert_eq!(
            filter("timeout", "shop"),
            Err(UsageError::Reason("timeout".into()))
        );
        assert_eq!(
            filter("rejected", "Shop!"),
            Err(UsageError::Source("Shop!".into()))
        );
        let f = filter("rejected", "shop").unwrap();
        assert_eq!(f.reason, Some(DeadReason::Rejected));
    }

    #[test]
    fn every_given_criterion_must_hold() {
        let env = dead_letter();
        let f = |source: Option<&str>, reason, key: Option<&str>| Filter {
            source: source.map(str::to_string),
            reason,
            key: key.map(str::to_string),
            message_ids: None,
        };
        assert!(f(None, None, None).matches(&env));
        assert!(f(Some("shop"), Some(DeadReason::MaxAttempts), Some("shop:1")).matches(&env));
        assert!(!f(Some("other"), None, None).matches(&env));
        assert!(!f(None, Some(DeadReason::Rejected), None).matches(&env));
        assert!(!f(None, None, Some("shop:2")).matches(&env));
        let mut no_reason = env.clone();
        no_reason.dead = None;
        assert!(!f(None, Some(DeadReason::MaxAttempts), None).matches(&no_reason));
        assert!(f(Some("shop"), None, None).matches(&no_reason));
        let mut picked = f(None, None, None);
        picked.message_ids = Some(["other".to_string()].into());
        assert!(!picked.matches(&env));
        picked.message_ids = Some([env.message_id.0.clone()].into());
        assert!(picked.matches(&env));
    }
}
