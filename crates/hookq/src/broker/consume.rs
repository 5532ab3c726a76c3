//! Taking messages off a queue: a consumer with manual acks (the worker) or
//! a reader with `basic.get` (the tools), and settling each message once.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use tokio_util::sync::CancellationToken;

use super::acks::Ledger;
use super::{Broker, DecodeError, Error, codec};
use crate::message::Envelope;

impl Broker {
    /// Starts a consumer with manual acks and `prefetch` unacked messages at
    /// most. Its acks are coalesced into `basic.ack(multiple)` where that is
    /// safe (see `acks`).
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, Error> {
        self.consume_with(queue, prefetch, FieldTable::default())
            .await
    }

    /// A consumer on a partition's work queue with a priority: with single
    /// active consumer, RabbitMQ 4.x makes the highest-priority consumer the
    /// active one (and switches to a higher one once the current one has
    /// settled what it holds); 3.10 ignores it and keeps the first registered.
    pub async fn consume_prioritised(
        &self,
        queue: &str,
        prefetch: u16,
        priority: i32,
    ) -> Result<Consumer, Error> {
        let mut args = FieldTable::default();
        args.insert("x-priority".into(), AMQPValue::LongInt(priority));
        self.consume_with(queue, prefetch, args).await
    }

    async fn consume_with(
        &self,
        queue: &str,
        prefetch: u16,
        args: FieldTable,
    ) -> Result<Consumer, Error> {
        let session = self.session()?;
        let channel = super::channel::open(&session.connection).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("{}-{}", self.inner.name, uuid::Uuid::now_v7().simple());
        let inner = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await?;
        let lost = CancellationToken::new();
        let ledger = Ledger::start(lost.clone());
        Ok(Consumer {
            channel,
            inner,
            tag,
            broker: self.clone(),
            lost,
            ledger,
        })
    }

    /// A channel of its own for tools that read a queue message by message
    /// (shovel, dlq). Closing it hands back whatever it still holds, in order.
    pub async fn reader(&self) -> Result<Reader, Error> {
        let session = self.session()?;
        let channel = super::channel::open(&session.connection).await?;
        Ok(Reader {
            channel,
            lost: CancellationToken::new(),
        })
    }
}

/// One message taken from a queue, not yet settled.
pub struct Incoming {
    /// The envelope, or why it is not one (with a stand-in to dead-letter).
    pub envelope: Result<Envelope, (DecodeError, Envelope)>,
    pub redelivered: bool,
    pub acker: Acker,
    /// Cancelled when the consumer that delivered this message ends (its
    /// channel or connection is gone): the broker has the message again, and
    /// an ack can no longer reach it.
    pub lost: CancellationToken,
}

/// `ledger`: the channel's coalesced acks, when it has them (the worker's).
fn incoming(
    d: lapin::message::Delivery,
    lost: &CancellationToken,
    ledger: Option<&Arc<Ledger>>,
) -> Incoming {
    // The body moves into shared `Bytes` once; every later copy is a refcount.
    let body = bytes::Bytes::from(d.data);
    let envelope = match codec::decode(&d.properties, body.clone()) {
        Ok(e) => Ok(e),
        Err(err) => Err((err, codec::stand_in(&d.properties, body))),
    };
    Incoming {
        envelope,
        redelivered: d.redelivered,
        acker: Acker {
            inner: d.acker,
            tag: d.delivery_tag,
            ledger: ledger.cloned(),
        },
        lost: lost.clone(),
    }
}

/// Settles one delivery, once: `ack` and `nack` take it by value.
pub struct Acker {
    inner: lapin::Acker,
    tag: u64,
    /// A consumer's deliveries coalesce acks (see [`Ledger`]); `basic.get`'s do not.
    ledger: Option<Arc<Ledger>>,
}

impl Acker {
    /// Errors when the ack could not be sent (lapin answers `false` when the
    /// channel it came from is gone): the broker will redeliver the message.
    /// A consumer's ack may go out with others, as one `basic.ack(multiple)`;
    /// it resolves once sent either way.
    pub async fn ack(self) -> Result<(), Error> {
        if let Some(ledger) = &self.ledger {
            return ledger.ack(self.tag, self.inner).await;
        }
        if self.inner.ack(BasicAckOptions::default()).await? {
            Ok(())
        } else {
            Err(Error::Unavailable)
        }
    }

    /// Hands back this message and every earlier one still unsettled on its
    /// channel, in one `basic.nack(multiple, requeue)`. Readers of `P.dead` put
    /// what they held back this way rather than by closing the channel:
    /// RabbitMQ 4.3 counts a lost channel (and `basic.reject`) against a quorum
    /// queue's delivery limit, but not a `basic.nack`. Acks asked for on the
    /// channel are sent first: the nack would take back one not sent yet.
    pub async fn requeue_through(self) -> Result<(), Error> {
        if let Some(ledger) = &self.ledger {
            ledger.until_sent().await;
        }
        let sent = self
            .inner
            .nack(BasicNackOptions {
                requeue: true,
                multiple: true,
            })
            .await;
        if let Some(ledger) = &self.ledger {
            ledger.settled_through(self.tag);
        }
        sent?;
        Ok(())
    }

    /// Hands the message back to the queue for another worker (or this one) to take.
    pub async fn requeue(self) -> Result<(), Error> {
        let sent = self
            .inner
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await;
        // Sent (or the channel is gone): it no longer holds back later acks.
        if let Some(ledger) = &self.ledger {
            ledger.settled(self.tag);
        }
        sent?;
        Ok(())
    }
}

/// A running consumer; a stream of [`Incoming`].
pub struct Consumer {
    channel: Channel,
    inner: lapin::Consumer,
    tag: String,
    broker: Broker,
    /// Handed to every [`Incoming`]; cancelled when this consumer ends.
    lost: CancellationToken,
    /// Its coalesced acks.
    ledger: Arc<Ledger>,
}

impl Consumer {
    /// The next message; `None` when the consumer or its channel ended (cancelled,
    /// connection lost): the caller waits for the broker to be ready and consumes again.
    pub async fn next(&mut self) -> Option<Incoming> {
        match self.inner.next().await {
            Some(Ok(d)) => {
                self.ledger.delivered(d.delivery_tag);
                Some(incoming(d, &self.lost, Some(&self.ledger)))
            }
            Some(Err(e)) => {
                tracing::warn!("consumer stopped: {e}");
                self.lost.cancel();
                self.broker.kick();
                None
            }
            None => {
                self.lost.cancel();
                None
            }
        }
    }

    /// Stops new deliveries; unacked ones stay ours to settle.
    pub async fn cancel(&self) {
        let _ = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }

    /// Stops the consumer and hands back, one `basic.nack(requeue)` each, the
    /// deliveries the broker sent that the caller never took ([`Consumer::next`]):
    /// after `basic.cancel` they come before the stream's end. A nack, not the
    /// channel's close: RabbitMQ 4.3 counts a lost channel against a quorum
    /// queue's delivery limit, and not a nack. What the caller took stays its
    /// own to settle (call [`Consumer::close`] after).
    pub async fn cancel_and_hand_back(&mut self) {
        /// A cancel-ok takes a round trip; more than this and the channel is
        /// in trouble (its close hands back the rest).
        const CANCEL_WAIT: Duration = Duration::from_secs(5);
        self.cancel().await;
        let deadline = tokio::time::Instant::now() + CANCEL_WAIT;
        while let Ok(Some(Ok(d))) = tokio::time::timeout_at(deadline, self.inner.next()).await {
            self.ledger.delivered(d.delivery_tag);
            let acker = Acker {
                inner: d.acker,
                tag: d.delivery_tag,
                ledger: Some(self.ledger.clone()),
            };
            if acker.requeue().await.is_err() {
                break;
            }
        }
    }

    /// Closes the channel: anything still unacked goes back to the queue.
    pub async fn close(self) {
        self.lost.cancel();
        let _ = self.channel.close(200, "bye".into()).await;
    }
}

/// Reads a queue one message at a time (`basic.get`), holding what it does not settle.
pub struct Reader {
    channel: Channel,
    lost: CancellationToken,
}

impl Reader {
    /// The next message and how many remain after it, or `None` when the queue is empty.
    pub async fn get(&self, queue: &str) -> Result<Option<(Incoming, u32)>, Error> {
        let m = self
            .channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await?;
        Ok(m.map(|m| {
            let remaining = m.message_count;
            (incoming(m.delivery, &self.lost, None), remaining)
        }))
    }

    /// Returns every held message to the queue, in its original order.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
    }
}
