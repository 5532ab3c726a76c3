//! What a [`Broker`] handle does to the queues and exchanges themselves rather
//! than to messages: declaring the topology (again, after something deleted a
//! part of it), counting a queue, deleting a topology, and moving an empty
//! system to another `amqp.partitions` for `hookq topology`. The names and
//! arguments are spelled in `topology/`; this is where a handle applies them.

use std::sync::atomic::Ordering;

use lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

use super::{Broker, CONNECT_TIMEOUT, Declared, Error, REPAIR_EVERY, Topology, topology};
use crate::config::AmqpUrl;

impl Broker {
    /// For `hookq topology`: when the broker's queues of this prefix are laid
    /// out for another `amqp.partitions` and hold nothing (no message, no
    /// consumer), moves them to this topology's layout; returns the old count.
    /// Refuses ([`topology::Error::NotDrained`]) when they are not empty.
    pub async fn migrate_partitions(
        urls: &[AmqpUrl],
        topology: &Topology,
    ) -> Result<Option<u32>, Error> {
        let mut last = Error::Unavailable;
        for url in urls {
            let props = lapin::ConnectionProperties::default()
                .with_connection_name(format!("hookq-topology [{}]", topology.prefix).into());
            let connection = match tokio::time::timeout(
                CONNECT_TIMEOUT,
                lapin::Connection::connect(url.expose(), props),
            )
            .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(cause)) => {
                    last = Error::Connect {
                        url: url.to_string(),
                        cause,
                    };
                    continue;
                }
                Err(_) => {
                    last = Error::ConnectTimeout(CONNECT_TIMEOUT);
                    continue;
                }
            };
            let result = async {
                match topology::existing_partitions(&connection, topology).await? {
                    Some(old) if old != topology.partitions => {
                        topology::migrate(&connection, topology, old).await?;
                        Ok(Some(old))
                    }
                    _ => Ok(None),
                }
            }
            .await;
            let _ = connection.close(200, "checked".into()).await;
            return result;
        }
        Err(last)
    }

    /// Declares the topology again, in the background and at most once every
    /// [`REPAIR_EVERY`]: a queue, exchange or stream deleted under a running
    /// hookq (by an operator, a policy, a broker reset) comes back without a
    /// reconnect. Called when a publish comes back unroutable and when a
    /// consumer cannot start or is cancelled by the broker.
    pub fn repair_topology(&self) {
        let now = u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let every = u64::try_from(REPAIR_EVERY.as_millis()).unwrap_or(u64::MAX);
        let last = self.inner.repaired_at.load(Ordering::Relaxed);
        if (last != 0 && now.saturating_sub(last) < every)
            || self
                .inner
                .repaired_at
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let broker = self.clone();
        tokio::spawn(async move {
            match broker.declare_topology().await {
                Ok(_) => {
                    tracing::info!(connection = %broker.name(), "declared the topology again (a queue or exchange was missing)")
                }
                Err(e) => {
                    tracing::warn!(connection = %broker.name(), error = %e, "could not declare the topology again; retrying later")
                }
            }
        });
    }

    /// Messages waiting in a queue (not counting unacked ones).
    pub async fn queue_len(&self, queue: &str) -> Result<u32, Error> {
        Ok(self.passive(queue).await?.message_count())
    }

    async fn passive(&self, queue: &str) -> Result<lapin::Queue, Error> {
        let session = self.session()?;
        let ch = super::channel::open(&session.connection).await?;
        let q = passive_on(&ch, queue).await?;
        let _ = ch.close(200, "done".into()).await;
        Ok(q)
    }

    /// Deletes every queue and exchange of this topology (tests and the
    /// throwaway prefixes of the simulator and the benchmark).
    pub async fn delete_topology(&self) -> Result<(), Error> {
        self.delete(&self.inner.topology.clone()).await
    }

    /// Deletes every queue and exchange of `topology` (this broker's prefix
    /// laid out another way, say).
    pub async fn delete(&self, topology: &Topology) -> Result<(), Error> {
        let session = self.session()?;
        let ch = super::channel::open(&session.connection).await?;
        for q in topology.queues() {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for x in topology.exchanges() {
            ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        let _ = ch.close(200, "done".into()).await;
        Ok(())
    }

    /// Declares the topology on a fresh channel and reports what exists.
    pub async fn declare_topology(&self) -> Result<Vec<Declared>, Error> {
        let session = self.session()?;
        Ok(topology::declare(&session.connection, &self.inner.topology).await?)
    }
}

/// A passive declaration of `queue` on `ch`: its counts, or an error (and a
/// closed channel) when it does not exist.
pub(super) async fn passive_on(ch: &lapin::Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}
