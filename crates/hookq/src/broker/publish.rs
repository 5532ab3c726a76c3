//! Publishing: every message hookq puts on the broker goes through
//! [`Broker::publish_confirmed`], one `mandatory` publish on a confirm-mode
//! channel of the current session and its confirm. A return, a nack, a
//! timeout or a lost channel is an error for the caller to act on (the
//! ingress answers 503, the worker hands the message back); nothing here
//! retries.
//!
//! It also learns the broker's `max_message_size` from a refusal
//! ([`refused_size`]), so that later bodies over it are refused before they
//! cost the connection a channel.

use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};

use super::{Broker, Error, codec};
use crate::message::Envelope;

impl Broker {
    /// Publishes persistently and waits for the broker's confirm. `mandatory`: a
    /// message no queue takes is an error, never a silent drop.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        env: &Envelope,
        expiration: Option<Duration>,
        timeout: Duration,
    ) -> Result<(), Error> {
        let mut props = codec::encode(env);
        if let Some(e) = expiration
            && let Ok(ms) = ShortString::try_new(e.as_millis().to_string())
        {
            props = props.with_expiration(ms);
        }
        self.publish_confirmed(exchange, routing_key, &env.body, props, timeout)
            .await
    }

    /// One `mandatory` publish on this connection's publisher channel, and its
    /// confirm within `timeout`: a return, a nack or a lost channel is an
    /// error (the last also wakes the supervisor).
    pub(crate) async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
        timeout: Duration,
    ) -> Result<(), Error> {
        let max = self.inner.max_body.load(Ordering::Relaxed);
        if body.len() > max {
            return Err(Error::TooLarge {
                size: body.len(),
                max,
            });
        }
        let session = self.session()?;
        let channel = session.publisher().ok_or(Error::Unavailable)?;
        let opts = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let (exchange, routing_key) = (
            ShortString::try_new(exchange).map_err(|_| Error::Unavailable)?,
            ShortString::try_new(routing_key).map_err(|_| Error::Unavailable)?,
        );
        let fut = async {
            channel
                .basic_publish(exchange, routing_key, opts, body, props)
                .await?
                .await
        };
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(Error::Timeout(timeout)),
            Ok(Err(e)) => {
                self.kick();
                match refused_size(&e) {
                    Some(max) => {
                        self.inner.max_body.fetch_min(max, Ordering::Relaxed);
                        tracing::warn!(
                            size = body.len(),
                            max,
                            "the broker refused a message over its max_message_size; bodies \
                             over it are refused before publishing from now on: lower \
                             ingress.max_body_bytes to at most {max}"
                        );
                        Err(Error::TooLarge {
                            size: body.len(),
                            max,
                        })
                    }
                    None => Err(Error::Amqp(e)),
                }
            }
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(r)))) | Ok(Ok(Confirmation::Nack(Some(r)))) => {
                // Unroutable: a queue or binding of the topology may be gone.
                self.repair_topology();
                Err(Error::Returned(r.reply_text.to_string()))
            }
            Ok(Ok(Confirmation::Nack(None) | Confirmation::NotRequested)) => Err(Error::Nacked),
        }
    }

    /// Publishes a webhook to the topic exchange as the ingress does.
    pub async fn publish_webhook(&self, env: &Envelope, timeout: Duration) -> Result<(), Error> {
        let ex = self.inner.topology.exchange();
        let routing_key = self.inner.topology.routing_key(&env.source, &env.key);
        self.publish(&ex, &routing_key, env, None, timeout).await
    }

    /// Publishes straight into a queue (through the default exchange), with an
    /// optional per-message expiry (delay tiers use it to jitter the wait).
    pub async fn publish_to_queue(
        &self,
        queue: &str,
        env: &Envelope,
        expiration: Option<Duration>,
        timeout: Duration,
    ) -> Result<(), Error> {
        self.publish("", queue, env, expiration, timeout).await
    }

    /// Publishes a dead letter to `P.dead`.
    pub async fn publish_dead(&self, env: &Envelope, timeout: Duration) -> Result<(), Error> {
        let dead = self.inner.topology.dead();
        self.publish(&dead, "", env, None, timeout).await
    }
}

/// The broker's limit when `e` is its refusal of a message over
/// `max_message_size`: RabbitMQ closes the channel with `PRECONDITION_FAILED -
/// message size N is larger than configured max size M`.
fn refused_size(e: &lapin::Error) -> Option<usize> {
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    amqp.get_message()
        .as_str()
        .split_once("larger than configured max size ")?
        .1
        .trim()
        .parse()
        .ok()
}
