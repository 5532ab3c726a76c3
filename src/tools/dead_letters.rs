//! Dead letters, read without moving them: [`DeadLetters`], the one reader of
//! `P.dead` that `hookq dlq` and `hookq shovel` share, and what it reads
//! ([`Row`], [`Counts`]).
//!
//! Reading uses `basic.get` on a channel of its own and holds every message it
//! has seen unacked. Holding is what makes a run see each dead letter at most
//! once (the broker does not hand a held message out again), and closing the
//! channel puts every held message back in its original order (for a quorum
//! queue, see [`DeadLetters::close`]): reading removes nothing. `basic.get`
//! keeps memory flat whatever the queue's size; its cost is one round trip per
//! message, and on a quorum queue one Raft command each (hundreds per second).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::broker::{self, Acker, Broker, DecodeError, Incoming, Reader};
use crate::config::QueueType;
use crate::message::Envelope;

/// One dead letter as the tools see it, not settled yet.
pub struct DeadLetter {
    /// The message; for one that is not a hookq message, a stand-in carrying its
    /// body and message id (see `unreadable`).
    pub envelope: Envelope,
    /// Why the message could not be read as a hookq message, if it could not.
    /// Such a message was put in `P.dead` by hand: the tools never move it.
    pub unreadable: Option<DecodeError>,
    pub acker: Acker,
}

impl DeadLetter {
    fn from_incoming(m: Incoming) -> Self {
        let (envelope, unreadable) = match m.envelope {
            Ok(e) => (e, None),
            Err((err, stand_in)) => (stand_in, Some(err)),
        };
        Self {
            envelope,
            unreadable,
            acker: m.acker,
        }
    }

    /// The `hookq-dead-reason`, as written (`None` when there is none).
    pub fn reason(&self) -> Option<&'static str> {
        if self.unreadable.is_some() {
            return None;
        }
        self.envelope.dead.as_ref().map(|d| d.reason.as_str())
    }

    pub fn row(&self) -> Row {
        let env = &self.envelope;
        let dead = env.dead.as_ref();
        Row {
            message_id: env.message_id.0.clone(),
            key: env.key.0.clone(),
            source: env.source.clone(),
            reason: self.reason().map(str::to_string),
            attempts: env.attempts,
            last_status: dead.and_then(|d| d.last_status),
            last_error: match &self.unreadable {
                Some(e) => Some(e.to_string()),
                None => dead.map(|d| d.last_error.clone()),
            },
            dead_at: dead.map(|d| d.dead_at.clone()),
        }
    }
}

/// One line of `hookq dlq list` (and of `hookq shovel --dry-run`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Row {
    pub message_id: String,
    pub key: String,
    pub source: String,
    /// `None` for a message that is not a hookq dead letter.
    pub reason: Option<String>,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub dead_at: Option<String>,
}

/// Iterates `P.dead` once, oldest first, holding what the caller does not settle.
///
/// The number of messages to look at is fixed when it opens (the queue's length
/// then, or less): dead letters that arrive during a run are left for the next
/// one, so a run always ends, however busy the dead-letter queue is.
pub struct DeadLetters {
    reader: Reader,
    queue: String,
    /// The queue's length when the run started.
    at_start: u64,
    /// How many the caller looks at (`at_start`, or fewer with a limit).
    budget: u64,
    seen: u64,
    held: Vec<Acker>,
    /// See [`DeadLetters::close`].
    quorum: bool,
}

impl DeadLetters {
    /// Opens a reader on `P.dead` that will look at `max` messages at most.
    pub async fn open(broker: &Broker, max: Option<u64>) -> Result<Self, broker::Error> {
        let queue = broker.topology().dead();
        let len = u64::from(broker.queue_len(&queue).await?);
        let reader = broker.reader().await?;
        Ok(Self {
            reader,
            queue,
            at_start: len,
            budget: max.map_or(len, |m| m.min(len)),
            seen: 0,
            held: Vec::new(),
            quorum: broker.topology().queue_type == QueueType::Quorum,
        })
    }

    /// How many this run looks at, at most.
    pub fn total(&self) -> u64 {
        self.budget
    }

    /// How many it has looked at so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// The next dead letter, or `None` at the end of the run.
    pub async fn next(&mut self) -> Result<Option<DeadLetter>, broker::Error> {
        if self.seen >= self.budget {
            return Ok(None);
        }
        self.get().await
    }

    async fn get(&mut self) -> Result<Option<DeadLetter>, broker::Error> {
        let Some((m, _remaining)) = self.reader.get(&self.queue).await? else {
            return Ok(None);
        };
        self.seen += 1;
        Ok(Some(DeadLetter::from_incoming(m)))
    }

    /// Keeps a dead letter unsettled until [`DeadLetters::close`] puts it back.
    pub fn hold(&mut self, acker: Acker) {
        self.held.push(acker);
    }

    /// Puts every held dead letter back in `P.dead`, in its original order.
    ///
    /// A classic queue puts a returned message back where it was. A quorum
    /// queue appends returned messages to the back of its "returns", which it
    /// serves before messages never read: once `P.dead` has been read at all,
    /// handing back only part of it would move that part behind the rest. So
    /// on a quorum queue, a run that stopped early (a limit) while holding
    /// something first reads, and holds, the rest of what was there at its
    /// start; then everything goes back together, in order. Dead letters that
    /// arrived during the run stay behind them, unread. (Seen on RabbitMQ
    /// 3.10; the price is that `dlq list --limit 10` on a large quorum
    /// `P.dead` reads all of it.)
    pub async fn close(mut self) {
        if self.quorum && !self.held.is_empty() {
            while self.seen < self.at_start {
                match self.get().await {
                    Ok(Some(dl)) => self.hold(dl.acker),
                    // The channel is gone (and gave back what it held) or the
                    // queue is empty: nothing more to keep in order.
                    Ok(None) | Err(_) => break,
                }
            }
        }
        // Held messages are in reading order, so the last one has the highest
        // delivery tag: one multiple nack hands every held message back.
        if let Some(last) = self.held.pop()
            && let Err(e) = last.requeue_through().await
        {
            tracing::debug!(error = %e, "hand-back failed; closing the channel returns them");
        }
        self.reader.close().await;
        drop(self.held);
    }
}

/// Shows each of up to `limit` dead letters to `visit`, then puts them all back.
pub async fn read(
    broker: &Broker,
    limit: Option<u64>,
    mut visit: impl FnMut(&DeadLetter),
) -> Result<(), broker::Error> {
    let mut letters = DeadLetters::open(broker, limit).await?;
    let result = loop {
        match letters.next().await {
            Ok(Some(dl)) => {
                visit(&dl);
                letters.hold(dl.acker);
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    letters.close().await;
    result
}

/// Up to `limit` dead letters as rows, oldest first; nothing is moved.
pub async fn rows(broker: &Broker, limit: Option<u64>) -> Result<Vec<Row>, broker::Error> {
    let mut out = Vec::new();
    read(broker, limit, |dl| out.push(dl.row())).await?;
    Ok(out)
}

/// Dead letters counted by source and reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts(pub BTreeMap<(String, String), u64>);

impl Counts {
    pub fn add(&mut self, source: &str, reason: Option<&str>) {
        let reason = reason.unwrap_or(NO_REASON).to_string();
        *self.0.entry((source.to_string(), reason)).or_default() += 1;
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn by(&self, pick: impl Fn(&(String, String)) -> &String) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (k, n) in &self.0 {
            *m.entry(pick(k).clone()).or_default() += n;
        }
        m
    }
}

/// How a dead letter without a hookq reason is counted and shown.
pub const NO_REASON: &str = "-";

/// Counts every dead letter in `P.dead` by source and reason, putting them back.
pub async fn counts(broker: &Broker) -> Result<Counts, broker::Error> {
    let mut c = Counts::default();
    read(broker, None, |dl| c.add(&dl.envelope.source, dl.reason())).await?;
    Ok(c)
}
