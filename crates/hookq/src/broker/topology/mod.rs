//! The names and arguments of every exchange and queue, spelled in one place as
//! functions of the prefix, and their idempotent declaration ([`declare`]).
//!
//! With `amqp.partitions = 1` the work queue is `P.work`, bound `#` to the
//! topic exchange `P`, and each delay tier dead-letters back to it by name. With
//! N > 1 partitions:
//! - `P.work.<i>`, single active consumer, bound to `P` with `source.*.<i>`: the
//!   ingress publishes a key's webhooks with routing key `source.NAME.<i>`, `i`
//!   from the key ([`partition_of`]);
//! - `P.return`, a headers exchange: each `P.work.<i>` is bound to it on the
//!   message header `hookq-partition = <i>`, and every delay tier dead-letters
//!   to it, so a retry comes back to the partition it left;
//! - `P.done.<i>`, a stream per partition: the keys its active worker delivered.

mod declare;

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use sha2::{Digest, Sha256};

pub use declare::{Declared, Error, declare, existing_partitions, migrate};

use crate::config::{AmqpSettings, QueueType};
use crate::message::DedupKey;
use crate::retry::{DelayTier, Policy};

/// `x-delivery-limit` of a quorum `P.dead`: large enough that no amount of
/// reading reaches it, valid on RabbitMQ 3.x and 4.x alike.
pub const DEAD_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// The partition of a key: `u64::from_be_bytes(SHA-256(KEY)[0..8]) mod N`, so
/// every ingress process agrees.
pub fn partition_of(key: &DedupKey, n: u32) -> u32 {
    let digest = Sha256::digest(key.0.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let n = u64::from(n.max(1));
    u32::try_from(u64::from_be_bytes(first) % n).unwrap_or(0)
}

/// Every name hookq uses on the broker, derived from the prefix.
#[derive(Clone, Debug)]
pub struct Topology {
    pub prefix: String,
    pub queue_type: QueueType,
    pub delivery_limit: u32,
    /// Ascending, without repeats: from the retry policy, the one definition.
    pub tiers: Vec<DelayTier>,
    /// `amqp.partitions`.
    pub partitions: u32,
    /// How long a done-log keeps its records (`dedup.retention_ms`).
    pub retention: Duration,
    /// The targets' queue ids (see [`crate::config::Target::queue_id`]):
    /// each has a hold queue and a pause queue.
    pub targets: Vec<String>,
}

/// A tier's name: the delay in the largest unit (h, m, s, ms) that writes it exactly.
pub fn tier_name(d: Duration) -> String {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    const UNITS: [(u64, &str); 3] = [(3_600_000, "h"), (60_000, "m"), (1000, "s")];
    for (size, unit) in UNITS {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

impl crate::config::Settings {
    /// The exchanges, queues and streams these settings describe (names,
    /// arguments, delay tiers, partitions): the one way from settings to a
    /// topology, for every part and tool.
    pub fn topology(&self) -> Topology {
        let mut t = Topology::new(&self.amqp, &Policy::new(&self.retry), self.dedup.retention);
        t.targets = self
            .resolved_targets()
            .into_values()
            .map(|t| t.queue_id)
            .collect();
        t
    }
}

impl Topology {
    pub fn new(amqp: &AmqpSettings, policy: &Policy, retention: Duration) -> Self {
        Self {
            prefix: amqp.prefix.clone(),
            queue_type: amqp.queue_type,
            delivery_limit: amqp.delivery_limit,
            tiers: policy.tiers(),
            partitions: amqp.partitions.max(1),
            retention,
            targets: Vec::new(),
        }
    }

    fn partitioned(&self) -> bool {
        self.partitions > 1
    }

    /// The topic exchange the ingress publishes to.
    pub fn exchange(&self) -> String {
        self.prefix.clone()
    }

    /// Routing key of a webhook: `source.NAME`, or `source.NAME.<i>` with partitions.
    pub fn routing_key(&self, source: &str, key: &DedupKey) -> String {
        if self.partitioned() {
            format!("source.{source}.{}", self.partition(key))
        } else {
            format!("source.{source}")
        }
    }

    /// The partition of `key` in this topology (0 without partitions).
    pub fn partition(&self, key: &DedupKey) -> u32 {
        partition_of(key, self.partitions)
    }

    /// The `hookq-partition` header a key's messages carry (none without partitions).
    pub fn partition_header(&self, key: &DedupKey) -> Option<u32> {
        self.partitioned().then(|| self.partition(key))
    }

    /// The work queue of partition `i`: `P.work`, or `P.work.<i>` with partitions.
    pub fn work(&self, i: u32) -> String {
        if self.partitioned() {
            format!("{}.work.{i}", self.prefix)
        } else {
            format!("{}.work", self.prefix)
        }
    }

    /// The work queue a key's messages live in.
    pub fn work_for(&self, key: &DedupKey) -> String {
        self.work(self.partition(key))
    }

    /// Every work queue.
    pub fn works(&self) -> Vec<String> {
        (0..self.partitions).map(|i| self.work(i)).collect()
    }

    /// The headers exchange delay tiers return partitioned messages through.
    pub fn returns(&self) -> String {
        format!("{}.return", self.prefix)
    }

    /// Partition `i`'s done-log (a stream), with partitions.
    pub fn done(&self, i: u32) -> String {
        format!("{}.done.{i}", self.prefix)
    }

    /// A delay tier's queue: `P.delay.<tier>`.
    pub fn delay(&self, tier: DelayTier) -> String {
        format!("{}.delay.{}", self.prefix, tier_name(tier.0))
    }

    /// Both the fanout exchange and its queue.
    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The fanout exchange workers tell each other their targets' state on
    /// (each listens on an exclusive queue of its own).
    pub fn control(&self) -> String {
        format!("{}.control", self.prefix)
    }

    /// A target's hold queue: its messages while its breaker is open or it
    /// is paused, kept without spending an attempt.
    pub fn hold(&self, target: &str) -> String {
        format!("{}.hold.{target}", self.prefix)
    }

    /// A target's pause queue: it holds a message (who paused it, when)
    /// while an operator has the target paused, and is empty otherwise.
    pub fn paused(&self, target: &str) -> String {
        format!("{}.paused.{target}", self.prefix)
    }

    /// Every queue and stream, for cleanup and printing.
    pub fn queues(&self) -> Vec<String> {
        let mut q = self.works();
        q.extend(self.tiers.iter().map(|t| self.delay(*t)));
        q.push(self.dead());
        if self.partitioned() {
            q.extend((0..self.partitions).map(|i| self.done(i)));
        }
        for t in &self.targets {
            q.push(self.hold(t));
            q.push(self.paused(t));
        }
        q
    }

    /// Every exchange.
    pub fn exchanges(&self) -> Vec<String> {
        let mut x = vec![self.exchange(), self.dead()];
        if self.partitioned() {
            x.push(self.returns());
        }
        x.push(self.control());
        x
    }

    fn queue_type_args(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-queue-type".into(), long_str(self.queue_type.as_str()));
        t
    }

    /// Quorum queues can dead-letter at-least-once (the broker keeps the message
    /// until the target queue confirms it); that needs `reject-publish` overflow.
    /// Classic queues only have at-most-once dead-lettering.
    fn at_least_once(&self, t: &mut FieldTable) {
        if self.queue_type == QueueType::Quorum {
            t.insert("x-dead-letter-strategy".into(), long_str("at-least-once"));
            t.insert("x-overflow".into(), long_str("reject-publish"));
        }
    }

    pub fn work_args(&self) -> FieldTable {
        let mut t = self.queue_type_args();
        // Safety net: a message that keeps killing workers (and so is never acked)
        // ends in P.dead instead of looping forever.
        t.insert("x-dead-letter-exchange".into(), long_str(&self.dead()));
        if self.queue_type == QueueType::Quorum {
            t.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(self.delivery_limit.into()),
            );
        }
        if self.partitioned() {
            // One worker delivers a partition at a time, so every duplicate of
            // a key meets the same SQLite store; the others stand by.
            t.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        }
        self.at_least_once(&mut t);
        t
    }

    pub fn delay_args(&self, tier: DelayTier) -> FieldTable {
        let mut t = self.queue_type_args();
        // One queue per tier: TTL expiry happens only at a queue's head, so a
        // queue-level TTL keeps every message's wait exact.
        t.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(tier.0.as_millis()).unwrap_or(i64::MAX)),
        );
        if self.partitioned() {
            // Back through the headers exchange, to the partition the message's
            // hookq-partition header names.
            t.insert("x-dead-letter-exchange".into(), long_str(&self.returns()));
        } else {
            // Back to the work queue through the default exchange.
            t.insert("x-dead-letter-exchange".into(), long_str(""));
            t.insert("x-dead-letter-routing-key".into(), long_str(&self.work(0)));
        }
        self.at_least_once(&mut t);
        t
    }

    pub fn dead_args(&self) -> FieldTable {
        // No TTL and no dead-lettering: dead letters stay until an operator acts.
        let mut t = self.queue_type_args();
        if self.queue_type == QueueType::Quorum {
            // RabbitMQ 4.x gives quorum queues a delivery limit of 20 unless one
            // is declared, and drops a message past it (P.dead has nowhere to
            // dead-letter to): every `dlq list` counts on 4.0-4.2. -1 (no limit
            // on 4.x) means 0 on 3.x, so a limit no reader will reach instead.
            t.insert(
                "x-delivery-limit".into(),
                AMQPValue::LongLongInt(DEAD_DELIVERY_LIMIT),
            );
        }
        t
    }

    /// A hold or pause queue: nothing expires or dead-letters from it, and
    /// reading it never drops a message (the delivery limit of `P.dead`).
    pub fn kept_args(&self) -> FieldTable {
        self.dead_args()
    }

    /// A done-log: a stream that forgets records older than the retention.
    pub fn done_args(&self) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-queue-type".into(), long_str("stream"));
        let secs = self.retention.as_secs().max(1);
        t.insert("x-max-age".into(), long_str(&format!("{secs}s")));
        t
    }
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_names_use_the_largest_exact_unit() {
        let cases = [
            (1000, "1s"),
            (5000, "5s"),
            (30_000, "30s"),
            (120_000, "2m"),
            (600_000, "10m"),
            (3_600_000, "1h"),
            (5_400_000, "90m"),
            (1500, "1500ms"),
            (50, "50ms"),
        ];
        for (ms, name) in cases {
            assert_eq!(tier_name(Duration::from_millis(ms)), name, "{ms}");
        }
    }

    fn topology(partitions: u32) -> Topology {
        let policy = Policy::new(&crate::config::RetrySettings::default());
        let amqp = AmqpSettings {
            partitions,
            ..Default::default()
        };
        Topology::new(&amqp, &policy, Duration::from_secs(3600))
    }

    #[test]
    fn names_follow_the_prefix() {
        let t = topology(1);
        assert_eq!(
            t.queues(),
            [
                "hookq.work",
                "hookq.delay.1s",
                "hookq.delay.5s",
                "hookq.delay.30s",
                "hookq.delay.2m",
                "hookq.delay.10m",
                "hookq.dead"
            ]
        );
        assert_eq!(t.exchange(), "hookq");
        let k = DedupKey("github:1".into());
        assert_eq!(t.routing_key("github", &k), "source.github");
        assert_eq!(t.work_for(&k), "hookq.work");
    }

    #[test]
    fn partitions_spread_keys_by_the_contract_formula() {
        let t = topology(8);
        // The first 8 bytes of SHA-256(KEY), big-endian, mod N.
        let k = DedupKey("s:k1".into());
        let digest = Sha256::digest(b"s:k1");
        let want = u64::from_be_bytes(digest[..8].try_into().unwrap()) % 8;
        assert_eq!(u64::from(t.partition(&k)), want);
        assert_eq!(t.routing_key("s", &k), format!("source.s.{want}"));
        assert_eq!(t.work_for(&k), format!("hookq.work.{want}"));
        assert_eq!(t.works().len(), 8);
        assert!(t.queues().contains(&"hookq.done.7".to_string()));
        // Keys spread: 800 keys leave no partition empty.
        let mut seen = [0u32; 8];
        for i in 0..800 {
            seen[t.partition(&DedupKey(format!("s:{i}"))) as usize] += 1;
        }
        assert!(seen.iter().all(|n| *n > 50), "{seen:?}");
    }
}
