//! Dead letters, read without moving them: `hookq dlq list` and `hookq dlq stats`,
//! and [`DeadLetters`], the one reader of `P.dead` that `hookq shovel` shares.
//!
//! Reading uses `basic.get` on a channel of its own and holds every message it
//! has seen unacked. Holding is what makes a run see each dead letter at most
//! once (the broker does not hand a held message out again), and closing the
//! channel puts every held message back in its original order (for a quorum
//! queue, see [`DeadLetters::close`]): reading removes nothing. `basic.get`
//! keeps memory flat whatever the queue's size; its cost is one round trip per
//! message, and on a quorum queue one Raft command each (hundreds per second).

use std::collections::BTreeMap;
use std::process::ExitCode;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Acker, Broker, DecodeError, Incoming, Reader, Topology};
use crate::config::{QueueType, Settings};
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

/// Connects for a one-shot tool; the error says how to start RabbitMQ.
pub(crate) async fn connect(
    settings: &Settings,
    name: &str,
    stop: &CancellationToken,
) -> Result<Broker, broker::Error> {
    let topology = Topology::new(&settings.amqp, &settings.retry);
    Broker::connect(&settings.amqp.url, name, topology, stop.clone()).await
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

    fn by(&self, pick: impl Fn(&(String, String)) -> &String) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (k, n) in &self.0 {
            *m.entry(pick(k).clone()).or_default() += n;
        }
        m
    }

    /// `SOURCE REASON COUNT` lines, aligned, under a header naming the count.
    pub fn table(&self, count_title: &str) -> Vec<String> {
        let rows = self
            .0
            .iter()
            .map(|((s, r), n)| vec![s.clone(), r.clone(), n.to_string()]);
        let header = vec!["SOURCE".into(), "REASON".into(), count_title.into()];
        aligned(std::iter::once(header).chain(rows).collect())
    }

    pub fn json(&self) -> serde_json::Value {
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
}

/// How a dead letter without a hookq reason is counted and shown.
pub const NO_REASON: &str = "-";

/// Left-aligned columns, two spaces apart; the last column is not padded.
pub fn aligned(rows: Vec<Vec<String>>) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.into_iter()
        .map(|r| {
            let last = r.len().saturating_sub(1);
            r.iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i == last {
                        cell.clone()
                    } else {
                        format!("{cell:<w$}", w = widths[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        })
        .collect()
}

/// A cell on one line: control characters (a multi-line error) become spaces.
fn cell(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn or_dash(v: Option<String>) -> String {
    v.filter(|s| !s.is_empty())
        .map_or_else(|| "-".to_string(), |s| cell(&s))
}

/// The text table of `hookq dlq list`; the last error goes last, as it is the
/// long one.
pub fn list_table(rows: &[Row]) -> Vec<String> {
    let header = [
        "MESSAGE ID",
        "KEY",
        "SOURCE",
        "REASON",
        "ATTEMPTS",
        "STATUS",
        "DEAD AT",
        "LAST ERROR",
    ]
    .map(str::to_string)
    .to_vec();
    let body = rows.iter().map(|r| {
        vec![
            cell(&r.message_id),
            cell(&r.key),
            cell(&r.source),
            or_dash(r.reason.clone()),
            r.attempts.to_string(),
            or_dash(r.last_status.map(|s| s.to_string())),
            or_dash(r.dead_at.clone()),
            or_dash(r.last_error.clone()),
        ]
    });
    aligned(std::iter::once(header).chain(body).collect())
}

/// `hookq dlq list [--limit N] [--json]`.
pub async fn list(settings: &Settings, limit: Option<u64>, json: bool) -> anyhow::Result<ExitCode> {
    let stop = CancellationToken::new();
    let broker = connect(settings, "hookq-dlq", &stop).await?;
    let rows = rows(&broker, limit).await;
    stop.cancel();
    let rows = rows?;
    if json {
        crate::cli::print(serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        crate::cli::print(format_args!("{} is empty", broker.topology().dead()));
    } else {
        for line in list_table(&rows) {
            crate::cli::print(line);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Counts every dead letter in `P.dead` by source and reason, putting them back.
pub async fn counts(broker: &Broker) -> Result<Counts, broker::Error> {
    let mut c = Counts::default();
    read(broker, None, |dl| c.add(&dl.envelope.source, dl.reason())).await?;
    Ok(c)
}

/// `hookq dlq stats [--json]`.
pub async fn stats(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let stop = CancellationToken::new();
    let broker = connect(settings, "hookq-dlq", &stop).await?;
    let counts = counts(&broker).await;
    stop.cancel();
    let counts = counts?;
    if json {
        crate::cli::print(serde_json::to_string_pretty(&counts.json())?);
        return Ok(ExitCode::SUCCESS);
    }
    if counts.total() > 0 {
        for line in counts.table("COUNT") {
            crate::cli::print(line);
        }
    }
    crate::cli::print(format_args!(
        "total {} in {}",
        counts.total(),
        broker.topology().dead()
    ));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_the_last_is_not_padded() {
        let out = aligned(vec![
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["long".into(), "x".into(), "tail".into()],
        ]);
        assert_eq!(out, ["A     BB  C", "long  x   tail"]);
    }

    #[test]
    fn counts_add_up_by_source_and_reason() {
        let mut c = Counts::default();
        c.add("a", Some("rejected"));
        c.add("a", Some("rejected"));
        c.add("b", None);
        assert_eq!(c.total(), 3);
        let j = c.json();
        assert_eq!(j["by_source"]["a"], 2);
        assert_eq!(j["by_reason"][NO_REASON], 1);
        assert_eq!(j["by_source_and_reason"][0]["count"], 2);
        assert_eq!(c.table("N")[0], "SOURCE  REASON    N");
    }

    #[test]
    fn a_multi_line_error_stays_on_its_row() {
        let row = Row {
            message_id: "m".into(),
            key: "s:k".into(),
            source: "s".into(),
            reason: Some("rejected".into()),
            attempts: 1,
            last_status: None,
            last_error: Some("line1\nline2".into()),
            dead_at: None,
        };
        let t = list_table(&[row]);
        assert_eq!(t.len(), 2);
        assert!(t[1].ends_with("line1 line2"), "{}", t[1]);
        assert!(t[1].contains("rejected  1         -"), "{}", t[1]);
    }
}
