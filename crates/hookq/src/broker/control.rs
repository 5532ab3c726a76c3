//! The broker side of targets: the control line workers talk on (`P.control`,
//! a fanout exchange, and an exclusive queue of each listener's own), the
//! counts of the hold and pause queues, holding a message and releasing it,
//! and an operator's pause and resume.

use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};

use super::{Broker, Error};
use crate::message::Envelope;

/// One listener's line on `P.control`: what every other sends arrives here,
/// and what it sends reaches every other (and itself).
pub struct ControlLine {
    channel: Channel,
    consumer: lapin::Consumer,
    exchange: String,
    /// For passive declarations: a missing queue closes its channel, and
    /// must not end the line.
    counter: Option<Channel>,
    broker: Broker,
}

impl Broker {
    /// Opens a line on `P.control`.
    pub async fn control_line(&self) -> Result<ControlLine, Error> {
        let session = self.session()?;
        let channel = super::channel::open(&session.connection).await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let exchange = self.topology().control();
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "hookq-control".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(ControlLine {
            channel,
            consumer,
            exchange,
            counter: None,
            broker: self.clone(),
        })
    }

    /// Pauses a target for every worker until [`Broker::resume_target`]: a
    /// persistent message in its pause queue (with confirm) says who and when.
    pub async fn pause_target(
        &self,
        queue_id: &str,
        note: &[u8],
        timeout: Duration,
    ) -> Result<(), Error> {
        let queue = self.topology().paused(queue_id);
        if self.queue_len(&queue).await? > 0 {
            return Ok(());
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        self.publish_confirmed("", &queue, note, props, timeout)
            .await
    }

    /// Resumes a paused target: empties its pause queue.
    pub async fn resume_target(&self, queue_id: &str) -> Result<(), Error> {
        let session = self.session()?;
        let ch = super::channel::open(&session.connection).await?;
        let queue = self.topology().paused(queue_id);
        ch.queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await?;
        let _ = ch.close(200, "done".into()).await;
        Ok(())
    }

    /// Puts a message in a target's hold queue, with confirm.
    pub async fn hold_for_target(
        &self,
        queue_id: &str,
        env: &Envelope,
        timeout: Duration,
    ) -> Result<(), Error> {
        let queue = self.topology().hold(queue_id);
        self.publish_to_queue(&queue, env, None, timeout).await
    }
}

impl ControlLine {
    pub fn topology(&self) -> &super::Topology {
        self.broker.topology()
    }

    /// Sends to every listener; fire and forget (a beat lost is replaced by
    /// the next).
    pub async fn send(&self, body: &[u8]) -> Result<(), Error> {
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await?;
        Ok(())
    }

    /// The next message, or `None` when the line is gone (open another).
    pub async fn next(&mut self) -> Option<Vec<u8>> {
        match self.consumer.next().await {
            Some(Ok(d)) => Some(d.data),
            _ => None,
        }
    }

    /// Messages ready in `queue`, by a passive declaration.
    pub async fn count(&mut self, queue: &str) -> Result<u32, Error> {
        let ch = match self.counter.take() {
            Some(ch) if ch.status().connected() => ch,
            _ => {
                let session = self.broker.session()?;
                super::channel::open(&session.connection).await?
            }
        };
        match super::queues::passive_on(&ch, queue).await {
            Ok(q) => {
                self.counter = Some(ch);
                Ok(q.message_count())
            }
            Err(e) => {
                // Deleted under us: declare it again (at most once a second).
                self.broker.repair_topology();
                Err(e.into())
            }
        }
    }

    pub async fn close(self) {
        if let Some(ch) = self.counter {
            let _ = ch.close(200, "bye".into()).await;
        }
        let _ = self.channel.close(200, "bye".into()).await;
    }
}
