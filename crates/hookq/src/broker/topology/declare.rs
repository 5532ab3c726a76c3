//! Declaring the topology: idempotent (same name and arguments is a no-op for
//! the broker); a queue that exists with other arguments makes the broker close
//! the channel with PRECONDITION_FAILED, which [`declare`] turns into an error
//! that names the queue, the argument and what to do; and a partition count
//! that differs from the broker's queues is refused, or, for an empty system,
//! [`migrate`]d.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use super::{DEAD_DELIVERY_LIMIT, Topology, long_str};
use crate::message::header;

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
    #[error(
        "amqp.partitions is {new}, but the broker holds hookq's queues for {old} partition(s). \
         Changing it on a running system would split a key's messages over two partitions. \
         Drain first: stop the ingress, let the workers empty the work queues and delay tiers, \
         stop the workers, then run `hookq topology` with the new amqp.partitions (it moves \
         an empty system to the new layout); or set amqp.partitions back to {old}"
    )]
    PartitionsChanged { old: u32, new: u32 },
    #[error(
        "cannot change amqp.partitions yet: {queue} still holds {messages} message(s) and \
         {consumers} consumer(s). Stop the ingress, let the workers drain it, stop the workers, \
         and run `hookq topology` again"
    )]
    NotDrained {
        queue: String,
        messages: u32,
        consumers: u32,
    },
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

/// A queue's counts, or `None` when it does not exist.
async fn probe(connection: &Connection, queue: &str) -> Result<Option<(u32, u32)>, Error> {
    let ch = open(connection).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    match ch
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(q) => {
            let _ = ch.close(200, "probed".into()).await;
            Ok(Some((q.message_count(), q.consumer_count())))
        }
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404 => Ok(None),
            _ => Err(Error::Broker {
                what: format!("looking for queue {queue}"),
                cause: e,
            }),
        },
    }
}

async fn open(connection: &Connection) -> Result<Channel, Error> {
    crate::broker::channel::open(connection)
        .await
        .map_err(|cause| Error::Broker {
            what: "a channel for declaring".into(),
            cause,
        })
}

/// How many partitions the broker's hookq queues of this prefix are laid out
/// for, if any exist: `P.work` means one; `P.work.0, P.work.1, ...` as many as
/// there are.
pub async fn existing_partitions(
    connection: &Connection,
    topo: &Topology,
) -> Result<Option<u32>, Error> {
    let p = &topo.prefix;
    if probe(connection, &format!("{p}.work")).await?.is_some() {
        return Ok(Some(1));
    }
    let mut n = 0;
    while n < 1024 && probe(connection, &format!("{p}.work.{n}")).await?.is_some() {
        n += 1;
    }
    Ok((n > 0).then_some(n))
}

/// Moves an empty system from `old` partitions to the topology's: refuses
/// while any old work queue or delay tier holds a message or a consumer,
/// then deletes what the new layout does not keep (or declares differently).
pub async fn migrate(connection: &Connection, topo: &Topology, old: u32) -> Result<(), Error> {
    let old_topo = Topology {
        partitions: old,
        ..topo.clone()
    };
    let mut check = old_topo.works();
    check.extend(old_topo.tiers.iter().map(|t| old_topo.delay(*t)));
    for queue in &check {
        if let Some((messages, consumers)) = probe(connection, queue).await?
            && (messages > 0 || consumers > 0)
        {
            return Err(Error::NotDrained {
                queue: queue.clone(),
                messages,
                consumers,
            });
        }
    }
    let ch = open(connection).await?;
    let keep = topo.works();
    for queue in check
        .iter()
        .filter(|q| !keep.contains(q) || q.contains(".delay."))
    {
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .map_err(|e| refused(&format!("deleting {queue}"), None, e))?;
    }
    if old > 1 && topo.partitions == 1 {
        ch.exchange_delete(
            old_topo.returns().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .map_err(|e| refused("deleting the return exchange", None, e))?;
    }
    let _ = ch.close(200, "migrated".into()).await;
    tracing::info!(
        old,
        new = topo.partitions,
        "moved the empty topology to the new partition count"
    );
    Ok(())
}

/// Declares everything, in dependency order, on channels of its own (a refused
/// declaration closes its channel: that is AMQP). Refuses a topology whose
/// partition count differs from the queues the broker already has.
pub async fn declare(connection: &Connection, topo: &Topology) -> Result<Vec<Declared>, Error> {
    if let Some(old) = existing_partitions(connection, topo).await?
        && old != topo.partitions
    {
        return Err(Error::PartitionsChanged {
            old,
            new: topo.partitions,
        });
    }
    let mut run = Declaring {
        connection,
        channel: open(connection).await?,
        out: Vec::new(),
    };
    run.exchanges(topo).await?;
    run.queues_and_streams(topo).await?;
    run.dead_queue(topo).await?;
    run.bindings(topo).await?;
    let _ = run.channel.close(200, "declared".into()).await;
    Ok(run.out)
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// The work queues, the delay tiers and, with partitions, the done-log
/// streams, in the order they are declared: name, arguments, kind as printed.
fn queues_and_streams(topo: &Topology) -> Vec<(String, FieldTable, &'static str)> {
    let mut queues: Vec<(String, FieldTable, &'static str)> = topo
        .works()
        .into_iter()
        .map(|w| (w, topo.work_args(), "queue"))
        .collect();
    for &tier in &topo.tiers {
        queues.push((topo.delay(tier), topo.delay_args(tier), "queue"));
    }
    if topo.partitions > 1 {
        for i in 0..topo.partitions {
            queues.push((topo.done(i), topo.done_args(), "stream"));
        }
    }
    for t in &topo.targets {
        queues.push((topo.hold(t), topo.kept_args(), "queue"));
        queues.push((topo.paused(t), topo.kept_args(), "queue"));
    }
    queues
}

/// One run of [`declare`]: the channel in use, replaced when the broker closed
/// it over a refusal that is tolerated, and what was declared so far.
struct Declaring<'a> {
    connection: &'a Connection,
    channel: Channel,
    out: Vec<Declared>,
}

impl Declaring<'_> {
    /// The topic exchange the ingress publishes to, the dead-letter fanout and,
    /// with partitions, the headers exchange retries come back through.
    async fn exchanges(&mut self, topo: &Topology) -> Result<(), Error> {
        let mut exchanges = vec![
            (topo.exchange(), ExchangeKind::Topic, "exchange (topic)"),
            (topo.dead(), ExchangeKind::Fanout, "exchange (fanout)"),
        ];
        if topo.partitions > 1 {
            exchanges.push((topo.returns(), ExchangeKind::Headers, "exchange (headers)"));
        }
        exchanges.push((topo.control(), ExchangeKind::Fanout, "exchange (fanout)"));
        for (name, kind, shown) in exchanges {
            self.channel
                .exchange_declare(
                    name.as_str().into(),
                    kind,
                    durable_exchange(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| refused(&format!("exchange {name}"), None, e))?;
            self.out.push(Declared {
                name,
                kind: shown,
                arguments: String::new(),
            });
        }
        Ok(())
    }

    /// The work queues, the delay tiers and the done-logs, keeping a done-log
    /// that exists with another `x-max-age`.
    async fn queues_and_streams(&mut self, topo: &Topology) -> Result<(), Error> {
        for (name, args, kind) in queues_and_streams(topo) {
            let declared = self
                .channel
                .queue_declare(name.as_str().into(), durable_queue(), args.clone())
                .await
                .map_err(|e| refused(&format!("queue {name}"), Some(&name), e));
            match declared {
                Ok(_) => self.out.push(Declared {
                    name,
                    kind,
                    arguments: show(&args),
                }),
                // A done-log declared under another dedup.retention_ms (which the
                // retry settings can grow): refusing to start over it would stop
                // the partition. Keep it, and say what that means.
                Err(Error::Inequivalent {
                    argument, detail, ..
                }) if kind == "stream" && argument == "x-max-age" => {
                    tracing::warn!(
                        stream = %name,
                        "{name} keeps its records for the x-max-age it was declared with ({detail}), \
                         not dedup.retention_ms: if that is shorter, a host taking the partition \
                         over may deliver again a key older than it. To change it, drain the system \
                         and delete the done-logs (the hosts' stores keep what they delivered); \
                         hookq declares them anew"
                    );
                    self.keep_existing(&name).await?;
                    self.out.push(Declared {
                        name,
                        kind,
                        arguments: "existing, with another x-max-age (see the warning)".into(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `P.dead`, keeping one that exists without `x-delivery-limit`.
    async fn dead_queue(&mut self, topo: &Topology) -> Result<(), Error> {
        let dead = topo.dead();
        let args = topo.dead_args();
        match self
            .channel
            .queue_declare(dead.as_str().into(), durable_queue(), args.clone())
            .await
            .map_err(|e| refused(&format!("queue {dead}"), Some(&dead), e))
        {
            Ok(_) => self.out.push(Declared {
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
                self.keep_existing(&dead).await?;
                self.out.push(Declared {
                    name: dead.clone(),
                    kind: "queue",
                    arguments: "existing, without x-delivery-limit (see the warning)".into(),
                });
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// After the broker refused `queue`'s arguments (closing the channel): a
    /// fresh channel, and a passive declaration that the queue is there.
    async fn keep_existing(&mut self, queue: &str) -> Result<(), Error> {
        self.channel = open(self.connection).await?;
        self.channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..durable_queue()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused(&format!("queue {queue}"), Some(queue), e))?;
        Ok(())
    }

    /// Each work queue to the topic exchange (with partitions on its
    /// partition's routing keys, and to the return exchange on its
    /// `hookq-partition` header), then `P.dead` to its fanout.
    async fn bindings(&self, topo: &Topology) -> Result<(), Error> {
        let ex = topo.exchange();
        for i in 0..topo.partitions {
            let work = topo.work(i);
            let pattern = if topo.partitions > 1 {
                format!("source.*.{i}")
            } else {
                "#".to_string()
            };
            self.channel
                .queue_bind(
                    work.as_str().into(),
                    ex.as_str().into(),
                    pattern.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| refused("binding of a work queue", None, e))?;
            if topo.partitions > 1 {
                let mut on = FieldTable::default();
                on.insert("x-match".into(), long_str("all"));
                on.insert(header::PARTITION.into(), long_str(&i.to_string()));
                self.channel
                    .queue_bind(
                        work.as_str().into(),
                        topo.returns().as_str().into(),
                        ShortString::default(),
                        QueueBindOptions::default(),
                        on,
                    )
                    .await
                    .map_err(|e| {
                        refused("binding of a work queue to the return exchange", None, e)
                    })?;
            }
        }
        let dead = topo.dead();
        self.channel
            .queue_bind(
                dead.as_str().into(),
                dead.as_str().into(),
                ShortString::default(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused("binding of the dead queue", None, e))?;
        Ok(())
    }
}
