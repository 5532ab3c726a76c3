//! The done-log on the broker: per partition a stream `P.done.<i>` of the keys
//! its active worker delivered. A record is one stream message: the keys,
//! one per line, and when they were done (`hookq-done-at`, epoch ms). A marker
//! (`hookq-marker`, no keys) lets a reader know it has read everything written
//! before it: a worker taking a partition over appends one and reads up to it.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel};

use super::{Broker, Error};
use crate::message::DedupKey;

const DONE_AT: &str = "hookq-done-at";
const MARKER: &str = "hookq-marker";
/// Records a reader takes from the broker at a time.
const READ_PREFETCH: u16 = 500;

/// One record of a done-log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoneRecord {
    /// Its offset in the stream.
    pub offset: u64,
    pub keys: Vec<String>,
    /// Epoch milliseconds.
    pub at_ms: u64,
    /// A reader's marker token, for a marker record.
    pub marker: Option<String>,
}

impl DoneRecord {
    /// What tells this record from another at the same offset of another
    /// stream: a marker's token (unique), else a hash of the keys and time.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        if let Some(m) = &self.marker {
            return format!("m:{m}");
        }
        let mut h = sha2::Sha256::new();
        for k in &self.keys {
            h.update(k.as_bytes());
            h.update(b"\n");
        }
        h.update(self.at_ms.to_be_bytes());
        format!("r:{}", hex::encode(&h.finalize()[..16]))
    }
}

fn long(v: impl Into<Vec<u8>>) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn header_text(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn header_u64(props: &BasicProperties, name: &str) -> Option<u64> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

impl Broker {
    async fn append(
        &self,
        partition: u32,
        body: Vec<u8>,
        headers: FieldTable,
        timeout: Duration,
    ) -> Result<(), Error> {
        let stream = self.inner.topology.done(partition);
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        self.publish_confirmed("", &stream, &body, props, timeout)
            .await
    }

    /// Appends the keys, done at `at_ms`, to partition `partition`'s done-log,
    /// and waits for the broker's confirm.
    pub async fn append_done(
        &self,
        partition: u32,
        keys: &[DedupKey],
        at_ms: u64,
        timeout: Duration,
    ) -> Result<(), Error> {
        let mut body = Vec::with_capacity(keys.iter().map(|k| k.0.len() + 1).sum());
        for k in keys {
            body.extend_from_slice(k.0.as_bytes());
            body.push(b'\n');
        }
        let mut h = FieldTable::default();
        h.insert(DONE_AT.into(), long(at_ms.to_string()));
        self.append(partition, body, h, timeout).await
    }

    /// Appends a reader's marker to partition `partition`'s done-log.
    pub async fn append_marker(
        &self,
        partition: u32,
        token: &str,
        timeout: Duration,
    ) -> Result<(), Error> {
        let mut h = FieldTable::default();
        h.insert(MARKER.into(), long(token));
        self.append(partition, Vec::new(), h, timeout).await
    }

    /// Reads partition `partition`'s done-log from offset `from` (its first
    /// record when `None`, or when the records before `from` have expired).
    /// An offset past the stream's end waits until the stream gets there.
    pub async fn read_done(&self, partition: u32, from: Option<u64>) -> Result<DoneReader, Error> {
        let session = self.session()?;
        let channel = super::channel::open(&session.connection).await?;
        channel
            .basic_qos(READ_PREFETCH, BasicQosOptions::default())
            .await?;
        let mut args = FieldTable::default();
        let offset = match from {
            Some(o) => AMQPValue::LongLongInt(i64::try_from(o).unwrap_or(i64::MAX)),
            None => long("first"),
        };
        args.insert("x-stream-offset".into(), offset);
        let stream = self.inner.topology.done(partition);
        let consumer = channel
            .basic_consume(
                stream.as_str().into(),
                "hookq-done-log".into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await?;
        Ok(DoneReader { channel, consumer })
    }
}

/// A reader of one done-log, from an offset on.
pub struct DoneReader {
    channel: Channel,
    consumer: lapin::Consumer,
}

impl DoneReader {
    /// The next record; `None` when the channel or connection ended.
    pub async fn next(&mut self) -> Option<Result<DoneRecord, Error>> {
        let d = match self.consumer.next().await? {
            Ok(d) => d,
            Err(e) => return Some(Err(Error::Amqp(e))),
        };
        let props = &d.properties;
        let record = DoneRecord {
            offset: header_u64(props, "x-stream-offset").unwrap_or(0),
            keys: String::from_utf8_lossy(&d.data)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
            at_ms: header_u64(props, DONE_AT).unwrap_or(0),
            marker: header_text(props, MARKER),
        };
        // A stream consumer's acks only move its credit window.
        if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
            return Some(Err(Error::Amqp(e)));
        }
        Some(Ok(record))
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "read".into()).await;
    }
}
