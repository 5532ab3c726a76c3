//! Coalesced acks for one consumer's channel: many settled deliveries, one
//! `basic.ack(multiple)`.
//!
//! An ack through lapin costs a command to its I/O loop, a task there and a
//! frame; RabbitMQ then settles each one (on a quorum queue, a Raft command).
//! With a worker's prefetch of deliveries settling at about the same time,
//! most of that is paid once per run of them instead of once per message.
//!
//! Safety of `multiple`: RabbitMQ acks every unacked delivery on the channel
//! up to the tag given, so the ledger sends one only for a tag below every
//! delivery that is still open (being worked on, or whose nack is on its way).
//! A delivery behind a slow one would wait for it: after [`HOLD`] it is acked
//! on its own instead, so a slow message never holds up the others' acks (and
//! the prefetch window they occupy). A caller's [`Ledger::ack`] resolves once
//! its ack was sent, as a lapin ack does, and fails when the channel is gone
//! (the broker redelivers the message; dedup recognises it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lapin::options::BasicAckOptions;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Error;

/// How long a settled delivery behind an open one waits to be covered by a
/// `multiple` ack before it is acked on its own.
pub(super) const HOLD: Duration = Duration::from_millis(2);
/// With nothing to do, the flusher looks this often whether it is still needed.
const IDLE: Duration = Duration::from_secs(1);

type Reply = oneshot::Sender<Result<(), Error>>;

/// An ack asked for and not sent yet (`A`: lapin's acker; tests use `()`).
struct Pending<A> {
    acker: A,
    since: Instant,
    reply: Reply,
}

struct State<A> {
    /// Delivered on this channel and not settled (no ack asked, no nack sent).
    open: BTreeSet<u64>,
    /// Acks asked for, by delivery tag.
    pending: BTreeMap<u64, Pending<A>>,
}

/// What the flusher sends in one round.
struct Round<A> {
    /// One `multiple` ack on the highest tag below every open delivery, and
    /// the callers it answers.
    covering: Option<(A, Vec<Reply>)>,
    /// Acks behind an open delivery that waited [`HOLD`]: each on its own.
    alone: Vec<Pending<A>>,
    /// When the next held ack is due, if any is held.
    next_due: Option<Instant>,
}

impl<A> State<A> {
    fn new() -> Self {
        Self {
            open: BTreeSet::new(),
            pending: BTreeMap::new(),
        }
    }

    fn take_round(&mut self, now: Instant) -> Round<A> {
        let mut round = Round {
            covering: None,
            alone: Vec::new(),
            next_due: None,
        };
        let below = self.open.first().copied().unwrap_or(u64::MAX);
        let covered: Vec<u64> = self.pending.range(..below).map(|(t, _)| *t).collect();
        if let Some(&top) = covered.last() {
            let mut replies = Vec::with_capacity(covered.len());
            let mut acker = None;
            for tag in covered {
                if let Some(p) = self.pending.remove(&tag) {
                    replies.push(p.reply);
                    if tag == top {
                        acker = Some(p.acker);
                    }
                }
            }
            round.covering = acker.map(|a| (a, replies));
        }
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= HOLD)
            .map(|(t, _)| *t)
            .collect();
        for tag in due {
            if let Some(p) = self.pending.remove(&tag) {
                round.alone.push(p);
            }
        }
        round.next_due = self.pending.values().map(|p| p.since + HOLD).min();
        round
    }
}

/// The acks of one consumer channel; shared by the consumer and every
/// delivery it handed out.
pub(super) struct Ledger {
    state: Mutex<State<lapin::Acker>>,
    wake: Arc<Notify>,
    /// Signalled after each round the flusher sent.
    sent: Arc<Notify>,
    lost: CancellationToken,
}

impl Ledger {
    /// Starts the ledger of a channel and its flusher task, which ends when
    /// the channel is lost (`lost`) or when nothing refers to the ledger any more.
    pub fn start(lost: CancellationToken) -> Arc<Self> {
        let (wake, sent) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let ledger = Arc::new(Self {
            state: Mutex::new(State::new()),
            wake: wake.clone(),
            sent: sent.clone(),
            lost: lost.clone(),
        });
        tokio::spawn(flush(Arc::downgrade(&ledger), wake, sent, lost));
        ledger
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<lapin::Acker>> {
        // A panic while holding this lock cannot leave the sets half-changed in
        // a way that matters more than losing the acks: carry on with them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A delivery arrived on the channel (in tag order).
    pub fn delivered(&self, tag: u64) {
        self.state().open.insert(tag);
    }

    /// Acks delivery `tag` (sent with others where it can be); resolves once sent.
    pub async fn ack(&self, tag: u64, acker: lapin::Acker) -> Result<(), Error> {
        if self.lost.is_cancelled() {
            return Err(Error::Unavailable);
        }
        let (reply, answer) = oneshot::channel();
        {
            let mut s = self.state();
            s.open.remove(&tag);
            s.pending.insert(
                tag,
                Pending {
                    acker,
                    since: Instant::now(),
                    reply,
                },
            );
        }
        self.wake.notify_one();
        // The channel may go between the check above and the insert, after
        // the flusher failed what was pending: never wait for it then.
        tokio::select! {
            biased;
            r = answer => r.unwrap_or(Err(Error::Unavailable)),
            _ = self.lost.cancelled() => Err(Error::Unavailable),
        }
    }

    /// Delivery `tag` was settled otherwise (its nack was sent): it no longer
    /// holds back the acks after it.
    pub fn settled(&self, tag: u64) {
        let moved = {
            let mut s = self.state();
            let was_first = s.open.first() == Some(&tag);
            s.open.remove(&tag);
            was_first && !s.pending.is_empty()
        };
        if moved {
            self.wake.notify_one();
        }
    }

    /// Every delivery up to `tag` was settled at once (a multiple nack).
    pub fn settled_through(&self, tag: u64) {
        let mut s = self.state();
        s.open = s.open.split_off(&tag.saturating_add(1));
    }

    /// Waits until every ack asked for so far was sent (or the channel is
    /// gone): before a multiple nack, which would take back one not sent yet.
    pub async fn until_sent(&self) {
        loop {
            let sent = self.sent.notified();
            tokio::pin!(sent);
            sent.as_mut().enable();
            if self.state().pending.is_empty() {
                return;
            }
            self.wake.notify_one();
            tokio::select! {
                _ = sent => {}
                _ = self.lost.cancelled() => return,
            }
        }
    }

    /// Fails every ack not sent yet: the channel is gone.
    fn fail_pending(&self) {
        let pending = std::mem::take(&mut self.state().pending);
        for p in pending.into_values() {
            let _ = p.reply.send(Err(Error::Unavailable));
        }
    }
}

/// Sends what can be sent, then waits for more. While one round is on its way
/// the next one's acks gather, so a busy channel sends fewer, larger rounds.
async fn flush(
    ledger: Weak<Ledger>,
    wake: Arc<Notify>,
    sent: Arc<Notify>,
    lost: CancellationToken,
) {
    let mut next_due: Option<Instant> = None;
    loop {
        let deadline = next_due.unwrap_or_else(|| Instant::now() + IDLE);
        tokio::select! {
            _ = lost.cancelled() => {
                if let Some(l) = ledger.upgrade() {
                    l.fail_pending();
                }
                return;
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
        let Some(l) = ledger.upgrade() else { return };
        let round = l.state().take_round(Instant::now());
        drop(l);
        next_due = round.next_due;
        if let Some((acker, replies)) = round.covering {
            let result = send(&acker, true).await;
            if let Err(e) = &result {
                tracing::debug!(error = %e, "a coalesced ack could not be sent");
            }
            for r in replies {
                let answer = match &result {
                    Ok(()) => Ok(()),
                    Err(_) => Err(Error::Unavailable),
                };
                let _ = r.send(answer);
            }
        }
        for p in round.alone {
            let _ = p.reply.send(send(&p.acker, false).await);
        }
        sent.notify_waiters();
    }
}

async fn send(acker: &lapin::Acker, multiple: bool) -> Result<(), Error> {
    match acker.ack(BasicAckOptions { multiple }).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::Unavailable),
        Err(e) => Err(Error::Amqp(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(
        s: &mut State<u64>,
        tag: u64,
        since: Instant,
    ) -> oneshot::Receiver<Result<(), Error>> {
        let (reply, rx) = oneshot::channel();
        s.open.remove(&tag);
        s.pending.insert(
            tag,
            Pending {
                acker: tag,
                since,
                reply,
            },
        );
        rx
    }

    #[test]
    fn a_multiple_ack_never_reaches_an_open_delivery() {
        let now = Instant::now();
        let mut s = State::new();
        s.open.extend(1..=5);
        let _r1 = pending(&mut s, 1, now);
        let _r2 = pending(&mut s, 2, now);
        let _r4 = pending(&mut s, 4, now);
        // 3 is still open: 1 and 2 go in one ack, 4 waits.
        let round = s.take_round(now);
        let (top, replies) = round.covering.expect("a covering ack");
        assert_eq!((top, replies.len()), (2, 2));
        assert!(round.alone.is_empty());
        assert_eq!(round.next_due, Some(now + HOLD));
        assert_eq!(s.pending.keys().copied().collect::<Vec<_>>(), [4]);
        // After HOLD, 4 goes on its own while 3 stays open.
        let round = s.take_round(now + HOLD);
        assert!(round.covering.is_none());
        assert_eq!(round.alone.iter().map(|p| p.acker).collect::<Vec<_>>(), [4]);
        assert!(s.pending.is_empty());
        assert_eq!(s.open.iter().copied().collect::<Vec<_>>(), [3, 5]);
    }

    #[test]
    fn a_nacked_delivery_no_longer_holds_the_acks_after_it() {
        let now = Instant::now();
        let mut s = State::new();
        s.open.extend(1..=3);
        let _r2 = pending(&mut s, 2, now);
        let _r3 = pending(&mut s, 3, now);
        assert!(s.take_round(now).covering.is_none());
        s.open.remove(&1);
        let round = s.take_round(now);
        let (top, replies) = round.covering.expect("a covering ack");
        assert_eq!((top, replies.len()), (3, 2));
        assert!(s.pending.is_empty() && s.open.is_empty());
    }
}
