//! Dead letters: [`DeadLetters`], the one reader of `P.dead` that `hookq
//! dlq`, `hookq shovel` and the admin API share, what it reads ([`Row`],
//! [`Counts`]), and moving them back to work ([`shovel`]).
//!
//! Reading holds every message it has seen unacked. Holding is what makes a
//! run see each dead letter at most once (the broker does not hand a held
//! message out again), and handing them all back at the end puts them back in
//! their original order (for a quorum queue, see [`DeadLetters::close`]):
//! reading removes nothing.

pub mod shovel;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::broker::{self, Acker, Broker, Consumer, DecodeError, Incoming, Reader};
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
    /// Which of the reader's channels holds it.
    pub by: ReadBy,
}

/// How a dead letter was read: the consumer, or `basic.get` past its prefetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadBy {
    Consumer,
    Get,
}

impl DeadLetter {
    fn from_incoming(m: Incoming, by: ReadBy) -> Self {
        let (envelope, unreadable) = match m.envelope {
            Ok(e) => (e, None),
            Err((err, stand_in)) => (stand_in, Some(err)),
        };
        Self {
            envelope,
            unreadable,
            acker: m.acker,
            by,
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
            delivery: env.delivery_id().map(str::to_string),
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
    /// The provider's delivery id beside the key (GitHub's
    /// `X-GitHub-Delivery`), when the webhook had one.
    #[serde(default)]
    pub delivery: Option<String>,
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
///
/// It reads with a consumer whose prefetch covers the run (tens of thousands of
/// messages a second on a quorum queue, where `basic.get` costs a Raft round
/// each); a run longer than the largest prefetch AMQP allows (65535), or than
/// a smaller prefetch its caller asked for, reads the rest with `basic.get`.
pub struct DeadLetters {
    consumer: Consumer,
    /// Opened when the consumer's prefetch is used up by held messages.
    reader: Option<Reader>,
    broker: Broker,
    queue: String,
    /// The queue's length when the run started.
    at_start: u64,
    /// How many the caller looks at (`at_start`, or fewer with a limit).
    budget: u64,
    seen: u64,
    /// Read from the consumer and not yet settled (held or being moved).
    unsettled_on_consumer: u64,
    prefetch: u64,
    /// Held on the consumer's channel, then on the reader's, in reading order.
    held: Vec<Acker>,
    held_by_reader: Vec<Acker>,
    /// See [`DeadLetters::close`].
    quorum: bool,
}

/// How long the consumer may be silent before the reader asks the queue
/// whether anything is left (someone else may have emptied it).
const QUIET: Duration = Duration::from_millis(250);
/// How long the queue must stay empty, with nothing arriving, before a run
/// ends short of its start length: messages the broker has already handed to
/// this consumer are not in the queue's count but may still be on their way
/// (a quorum queue that just took a large hand-back is slow to start).
const GONE_AFTER: Duration = Duration::from_secs(3);

impl DeadLetters {
    /// Opens a reader on `P.dead` that will look at `max` messages at most.
    pub async fn open(broker: &Broker, max: Option<u64>) -> Result<Self, broker::Error> {
        Self::open_with_prefetch(broker, max, None).await
    }

    /// [`DeadLetters::open`] with the consumer's prefetch at most
    /// `prefetch_cap`: for a caller that settles nearly everything it reads
    /// (the shovel moving every dead letter), a prefetch of a few windows
    /// keeps the broker's deliveries in step with the moves; the whole run's
    /// prefetch made a quorum queue move a third slower (`hookq bench`).
    pub async fn open_with_prefetch(
        broker: &Broker,
        max: Option<u64>,
        prefetch_cap: Option<u64>,
    ) -> Result<Self, broker::Error> {
        let queue = broker.topology().dead();
        let len = u64::from(broker.queue_len(&queue).await?);
        let budget = max.map_or(len, |m| m.min(len));
        let quorum = broker.topology().queue_type == QueueType::Quorum;
        // A quorum run that stops early reads on to the start length (see close).
        let want = if quorum { len } else { budget };
        let want = prefetch_cap.map_or(want, |cap| want.min(cap));
        let prefetch = u16::try_from(want.max(1)).unwrap_or(u16::MAX);
        let consumer = broker.consume(&queue, prefetch).await?;
        Ok(Self {
            consumer,
            reader: None,
            broker: broker.clone(),
            queue,
            at_start: len,
            budget,
            seen: 0,
            unsettled_on_consumer: 0,
            prefetch: u64::from(prefetch),
            held: Vec::new(),
            held_by_reader: Vec::new(),
            quorum,
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
        let mut empty_since: Option<std::time::Instant> = None;
        loop {
            if let Some(reader) = &self.reader {
                let Some((m, _remaining)) = reader.get(&self.queue).await? else {
                    return Ok(None);
                };
                self.seen += 1;
                return Ok(Some(DeadLetter::from_incoming(m, ReadBy::Get)));
            }
            match tokio::time::timeout(QUIET, self.consumer.next()).await {
                Ok(Some(m)) => {
                    self.seen += 1;
                    self.unsettled_on_consumer += 1;
                    return Ok(Some(DeadLetter::from_incoming(m, ReadBy::Consumer)));
                }
                Ok(None) => return Err(broker::Error::Unavailable),
                Err(_) => {
                    if self.unsettled_on_consumer >= self.prefetch {
                        // Every prefetch slot holds a message: go on with basic.get.
                        self.reader = Some(self.broker.reader().await?);
                    } else if self.broker.queue_len(&self.queue).await? == 0 {
                        let since = *empty_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= GONE_AFTER {
                            return Ok(None);
                        }
                    } else {
                        empty_since = None;
                    }
                }
            }
        }
    }

    /// Keeps a dead letter unsettled until [`DeadLetters::close`] puts it back.
    pub fn hold(&mut self, acker: Acker, by: ReadBy) {
        match by {
            ReadBy::Consumer => self.held.push(acker),
            ReadBy::Get => self.held_by_reader.push(acker),
        }
    }

    /// A dead letter read by the consumer was settled elsewhere (moved): its
    /// prefetch slot is free again.
    pub fn settled(&mut self, by: ReadBy) {
        if by == ReadBy::Consumer {
            self.unsettled_on_consumer = self.unsettled_on_consumer.saturating_sub(1);
        }
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
    ///
    /// Everything goes back with `basic.nack(multiple, requeue)`, which RabbitMQ
    /// 4.3 does not count against the queue's delivery limit (a lost channel
    /// would count).
    pub async fn close(mut self) {
        if self.quorum && !(self.held.is_empty() && self.held_by_reader.is_empty()) {
            while self.seen < self.at_start {
                match self.get().await {
                    Ok(Some(dl)) => self.hold(dl.acker, dl.by),
                    // The channel is gone (and gave back what it held) or the
                    // queue is empty: nothing more to keep in order.
                    Ok(None) | Err(_) => break,
                }
            }
        }
        // No more deliveries; what the broker sent before the cancel is held too.
        self.consumer.cancel().await;
        while let Ok(Some(m)) = tokio::time::timeout(QUIET, self.consumer.next()).await {
            self.held.push(m.acker);
        }
        let handed_back = (self.held.len() + self.held_by_reader.len()) as u64;
        let deadline = tokio::time::Instant::now() + BACK_WITHIN;
        // What is ready now (not held): the hand-back comes on top of it.
        let mut expect = match (self.quorum, handed_back) {
            (true, 1..) => self.broker.queue_len(&self.queue).await.map(u64::from).ok(),
            _ => None,
        };
        // Held messages are in reading order, so each one has a higher
        // delivery tag than the ones before it: a multiple nack on every
        // HAND_BACK_RUN-th hands them back run by run. On a quorum queue at
        // most RUNS_IN_FLIGHT runs are on their way at once (see
        // HAND_BACK_RUN).
        for held in [&mut self.held, &mut self.held_by_reader] {
            let run = std::mem::take(held);
            let n = run.len();
            let mut sent = 0u64;
            for (i, acker) in run.into_iter().enumerate() {
                let last = i + 1 == n;
                if (i + 1) % HAND_BACK_RUN != 0 && !last {
                    continue;
                }
                if let Err(e) = acker.requeue_through().await {
                    tracing::debug!(error = %e, "hand-back failed; closing the channel returns them");
                    break;
                }
                sent = (i + 1) as u64;
                let wave_done = ((i + 1) / HAND_BACK_RUN).is_multiple_of(RUNS_IN_FLIGHT);
                if let (Some(ready), true) = (expect, wave_done || last)
                    && !ready_again(&self.broker, &self.queue, ready + sent, deadline).await
                {
                    expect = None;
                }
            }
            if let Some(ready) = expect.as_mut() {
                *ready += sent;
            }
        }
        self.consumer.close().await;
        if let Some(r) = self.reader {
            r.close().await;
        }
        ready_again(&self.broker, &self.queue, handed_back, deadline).await;
    }
}

/// Held messages go back in runs of at most this many, one
/// `basic.nack(multiple)` each. RabbitMQ 3.10 puts the messages of one return
/// back in the order of an Erlang map of their ids, which is their order only
/// up to 32 entries; and a channel with many commands not yet applied by the
/// quorum queue (its Raft pipeline holds 32) merges the next returns into
/// one: handing back 10,000 dead letters with one nack, or with one nack
/// each, shuffled them (seen in the admin API's 10,000-dead-letter test).
const HAND_BACK_RUN: usize = 32;

/// On a quorum queue, how many runs are handed back before waiting until all
/// of them are ready again: few enough that the channel never has a full Raft
/// pipeline, so no two runs are merged and each is applied in order.
const RUNS_IN_FLIGHT: usize = 8;

/// How long [`DeadLetters::close`] waits, in all, for what it handed back to
/// show as ready again.
const BACK_WITHIN: Duration = Duration::from_secs(10);

/// Waits until `queue` counts at least `n` ready messages, or `deadline`
/// (false).
///
/// A quorum queue makes handed-back messages ready a moment after the nack;
/// a read that starts before then would not see them (a count would come out
/// short). New dead letters only add to the count; one that another reader
/// takes meanwhile can make the wait run to its deadline, which is all it
/// costs.
async fn ready_again(broker: &Broker, queue: &str, n: u64, deadline: tokio::time::Instant) -> bool {
    if n == 0 {
        return true;
    }
    loop {
        match broker.queue_len(queue).await {
            Ok(len) if u64::from(len) >= n => return true,
            Ok(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(len) => {
                tracing::debug!(ready = len, expected = n, "dead letters still coming back");
                return false;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot count the dead letters handed back");
                return false;
            }
        }
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
                letters.hold(dl.acker, dl.by);
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
    /// The counts as `hookq dlq stats --json` and the admin API show them:
    /// the total, by source, by reason, and by both.
    pub fn to_json(&self) -> serde_json::Value {
        let cross: Vec<_> = self
            .0
            .iter()
            .map(|((s, r), n)| serde_json::json!({"source": s, "reason": r, "count": n}))
            .collect();
        serde_json::json!({
            "total": self.total(),
            "by_source": self.by(|k| &k.0),
            "by_reason": self.by(|k| &k.1),
            "by_source_and_reason": cross,
        })
    }

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
