//! The names and arguments of every exchange and queue, spelled in one place as
//! functions of the prefix, and their idempotent declaration.
//!
//! Declaring is safe to repeat: same name and same arguments is a no-op for the
//! broker. A queue that exists with other arguments makes the broker close the
//! channel with PRECONDITION_FAILED; [`declare`] turns that into an error that
//! names the queue, the argument and what to do.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ExchangeKind};

use crate::config::{AmqpSettings, QueueType};
use crate::retry::{DelayTier, Policy};

/// `x-delivery-limit` of a quorum `P.dead`: large enough that no amount of
/// reading reaches it, valid on RabbitMQ 3.x and 4.x alike.
pub const DEAD_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// Every name hookq uses on the broker, derived from the prefix.
#[derive(Clone, Debug)]
pub struct Topology {
    pub prefix: String,
    pub queue_type: QueueType,
    pub delivery_limit: u32,
    /// Ascending, without repeats: from the retry policy, the one definition.
    pub tiers: Vec<DelayTier>,
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

impl Topology {
    pub fn new(amqp: &AmqpSettings, policy: &Policy) -> Self {
        Self {
            prefix: amqp.prefix.clone(),
            queue_type: amqp.queue_type,
            delivery_limit: amqp.delivery_limit,
            tiers: policy.tiers(),
        }
    }

    /// The topic exchange the ingress publishes to.
    pub fn exchange(&self) -> String {
        self.prefix.clone()
    }

    /// Routing key of a source's webhooks.
    pub fn routing_key(source: &str) -> String {
        format!("source.{source}")
    }

    /// The work queue (`P.work`).
    pub fn work(&self) -> String {
        format!("{}.work", self.prefix)
    }

    /// A delay tier's queue: `P.delay.<tier>`.
    pub fn delay(&self, tier: DelayTier) -> String {
        format!("{}.delay.{}", self.prefix, tier_name(tier.0))
    }

    /// Both the fanout exchange and its queue.
    pub fn dead(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Every queue, for cleanup and printing.
    pub fn queues(&self) -> Vec<String> {
        let mut q = vec![self.work()];
        q.extend(self.tiers.iter().map(|t| self.delay(*t)));
        q.push(self.dead());
        q
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
        // Expired messages go back to the work queue through the default exchange.
        t.insert("x-dead-letter-exchange".into(), long_str(""));
        t.insert("x-dead-letter-routing-key".into(), long_str(&self.work()));
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
}

fn long_str(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// What was declared, for `hookq topology` to print.
#[derive(Debug)]
pub struct Declared {
    pub name: String,
    pub kind: &'static str,
    pub arguments: String,
}

/// A declaration the broker refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "queue {queue} already exists with a different {argument} ({detail}).\n\
         hookq will not change an existing queue. Either drain and delete it \
         (rabbitmqctl delete_queue {queue}, or the RabbitMQ UI) and run `hookq topology` again, \
         or keep its arguments by restoring the configuration it was made with, or use another amqp.prefix."
    )]
    Inequivalent {
        queue: String,
        argument: String,
        detail: String,
    },
    #[error("declaring {what} failed: {cause}")]
    Broker { what: String, cause: lapin::Error },
}

fn refused(what: &str, queue: Option<&str>, e: lapin::Error) -> Error {
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
        && amqp.get_id() == 406
        && let Some(queue) = queue
    {
        let text = amqp.get_message().to_string();
        // "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': received ... but current is ..."
        let argument = text
            .split("inequivalent arg '")
            .nth(1)
            .and_then(|r| r.split('\'').next())
            .unwrap_or("argument")
            .to_string();
        let detail = text
            .split_once("': ")
            .map(|(_, d)| d.to_string())
            .unwrap_or(text.clone());
        return Error::Inequivalent {
            queue: queue.to_string(),
            argument,
            detail: format!("the broker {detail}"),
        };
    }
    Error::Broker {
        what: what.to_string(),
        cause: e,
    }
}

fn show(args: &FieldTable) -> String {
    args.inner()
        .iter()
        .map(|(k, v)| {
            let v = match v {
                AMQPValue::LongString(s) => format!("{:?}", s.to_string()),
                AMQPValue::LongLongInt(n) => n.to_string(),
                other => format!("{other:?}"),
            };
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Declares everything, in dependency order, on channels of its own (a refused
/// declaration closes its channel: that is AMQP).
pub async fn declare(connection: &Connection, topo: &Topology) -> Result<Vec<Declared>, Error> {
    let open = || async {
        connection
            .create_channel()
            .await
            .map_err(|cause| Error::Broker {
                what: "a channel for declaring".into(),
                cause,
            })
    };
    let mut channel = open().await?;
    let durable_x = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut out = Vec::new();

    let ex = topo.exchange();
    channel
        .exchange_declare(
            ex.as_str().into(),
            ExchangeKind::Topic,
            durable_x,
            FieldTable::default(),
        )
        .await
        .map_err(|e| refused(&format!("exchange {ex}"), None, e))?;
    out.push(Declared {
        name: ex.clone(),
        kind: "exchange (topic)",
        arguments: String::new(),
    });
    let dead = topo.dead();
    channel
        .exchange_declare(
            dead.as_str().into(),
            ExchangeKind::Fanout,
            durable_x,
            FieldTable::default(),
        )
        .await
        .map_err(|e| refused(&format!("exchange {dead}"), None, e))?;
    out.push(Declared {
        name: dead.clone(),
        kind: "exchange (fanout)",
        arguments: String::new(),
    });

    let mut queues = vec![(topo.work(), topo.work_args())];
    for &tier in &topo.tiers {
        queues.push((topo.delay(tier), topo.delay_args(tier)));
    }
    for (name, args) in queues {
        channel
            .queue_declare(name.as_str().into(), durable_q, args.clone())
            .await
            .map_err(|e| refused(&format!("queue {name}"), Some(&name), e))?;
        out.push(Declared {
            name,
            kind: "queue",
            arguments: show(&args),
        });
    }
    let args = topo.dead_args();
    match channel
        .queue_declare(dead.as_str().into(), durable_q, args.clone())
        .await
        .map_err(|e| refused(&format!("queue {dead}"), Some(&dead), e))
    {
        Ok(_) => out.push(Declared {
            name: dead.clone(),
            kind: "queue",
            arguments: show(&args),
        }),
        // A P.dead from before hookq declared its delivery limit, holding dead
        // letters: refusing to start over it would stop the ingress too. Keep
        // it, and say loudly how to make it safe.
        Err(Error::Inequivalent { argument, .. }) if argument == "x-delivery-limit" => {
            tracing::warn!(
                queue = %dead,
                "{dead} exists without x-delivery-limit: on RabbitMQ 4.x a quorum queue then has a \
                 delivery limit of 20 and drops a dead letter read more often than that. Set one with \
                 a policy: rabbitmqctl set_policy hookq-dead '^{}$' '{{\"delivery-limit\":{DEAD_DELIVERY_LIMIT}}}' \
                 --apply-to quorum_queues --priority 10 (or drain it with hookq shovel, delete it, and let hookq declare it)",
                dead.replace('.', "\\.")
            );
            channel = open().await?;
            channel
                .queue_declare(
                    dead.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..durable_q
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| refused(&format!("queue {dead}"), Some(&dead), e))?;
            out.push(Declared {
                name: dead.clone(),
                kind: "queue",
                arguments: "existing, without x-delivery-limit (see the warning)".into(),
            });
        }
        Err(e) => return Err(e),
    }

    let work = topo.work();
    channel
        .queue_bind(
            work.as_str().into(),
            ex.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| refused("binding of the work queue", None, e))?;
    channel
        .queue_bind(
            dead.as_str().into(),
            dead.as_str().into(),
            ShortString::default(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| refused("binding of the dead queue", None, e))?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(out)
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

    #[test]
    fn names_follow_the_prefix() {
        let policy = Policy::new(&crate::config::RetrySettings::default());
        let t = Topology::new(&AmqpSettings::default(), &policy);
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
        assert_eq!(Topology::routing_key("github"), "source.github");
    }
}
