//! The only module that imports lapin: the connection and its supervisor,
//! publishing with confirms, consuming with manual acks, and the topology.
//!
//! A [`Broker`] is a cheap handle. Behind it a supervisor task owns the AMQP
//! connection: it connects with backoff and jitter, declares the topology, opens
//! a small pool of confirm-mode publisher channels, and replaces all of it when
//! the connection or a channel dies. Callers never hold a dead channel for long:
//! every operation takes the current session, and fails fast (no connection)
//! rather than queueing while the broker is away.

pub mod codec;
pub mod raw;
pub mod topology;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

pub use codec::DecodeError;
pub use topology::{Declared, Topology};

use crate::message::Envelope;

/// Publisher channels per connection. Confirms are pipelined on each one; a few
/// channels spread the broker-side work over more than one Erlang process.
const PUBLISHER_CHANNELS: usize = 4;

/// How long connecting and declaring may take before the attempt is abandoned.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// How to start RabbitMQ, for every message that says it cannot be reached.
pub const START_HINT: &str = "start RabbitMQ with `rabbitmq-server -detached` \
     (or `docker compose -f docker/compose.yml up -d rabbitmq`), or point amqp.url at a running broker";

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("RabbitMQ is not connected")]
    Unavailable,
    #[error("no publisher confirm within {0:?}")]
    Timeout(Duration),
    #[error("RabbitMQ did not complete the connection within {0:?}; {hint}", hint = START_HINT)]
    ConnectTimeout(Duration),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the broker returned the message as unroutable ({0})")]
    Returned(String),
    #[error("cannot reach RabbitMQ at {url}: {cause}; {hint}", hint = START_HINT)]
    Connect { url: String, cause: lapin::Error },
    #[error(transparent)]
    Topology(#[from] topology::Error),
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
}

/// `amqp://user:secret@host` without the secret, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// One live connection with its publisher channels.
struct Session {
    connection: Connection,
    publishers: Vec<Channel>,
    next: AtomicUsize,
}

impl Session {
    fn healthy(&self) -> bool {
        self.connection.status().connected()
            && self.publishers.iter().all(|c| c.status().connected())
    }

    fn publisher(&self) -> &Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.publishers.len();
        &self.publishers[i]
    }
}

struct Inner {
    url: String,
    name: String,
    topology: Topology,
    state: watch::Sender<Option<Arc<Session>>>,
    /// Wakes the supervisor to check health now (a publish or consume failed).
    kick: Notify,
    reconnects: AtomicU64,
}

/// A handle on the broker; clone it freely.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

async fn establish(url: &str, name: &str, topo: &Topology) -> Result<Session, Error> {
    // As the RabbitMQ UI shows it: which part, of which prefix.
    let shown = format!("{name} [{}]", topo.prefix);
    let props = ConnectionProperties::default().with_connection_name(shown.into());
    let connection = Connection::connect(url, props)
        .await
        .map_err(|cause| Error::Connect {
            url: redact_url(url),
            cause,
        })?;
    topology::declare(&connection, topo).await?;
    let mut publishers = Vec::with_capacity(PUBLISHER_CHANNELS);
    for _ in 0..PUBLISHER_CHANNELS {
        let c = connection.create_channel().await?;
        c.confirm_select(ConfirmSelectOptions::default()).await?;
        publishers.push(c);
    }
    Ok(Session {
        connection,
        publishers,
        next: AtomicUsize::new(0),
    })
}

impl Broker {
    fn new(url: &str, name: &str, topology: Topology, session: Option<Session>) -> Self {
        let (state, _) = watch::channel(session.map(Arc::new));
        Self {
            inner: Arc::new(Inner {
                url: url.to_string(),
                name: name.to_string(),
                topology,
                state,
                kick: Notify::new(),
                reconnects: AtomicU64::new(0),
            }),
        }
    }

    /// For long-running commands: returns at once; a supervisor connects in the
    /// background (logging once what is wrong while it cannot) and reconnects
    /// whenever the connection is lost, until `shutdown`.
    pub fn start(url: &str, name: &str, topology: Topology, shutdown: CancellationToken) -> Self {
        let b = Self::new(url, name, topology, None);
        tokio::spawn(b.clone().supervise(shutdown));
        b
    }

    /// For one-shot commands: connect and declare now, or fail with a message
    /// that says what to do. Reconnects in the background afterwards.
    pub async fn connect(
        url: &str,
        name: &str,
        topology: Topology,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        let s = tokio::time::timeout(CONNECT_TIMEOUT, establish(url, name, &topology))
            .await
            .map_err(|_| Error::ConnectTimeout(CONNECT_TIMEOUT))??;
        let b = Self::new(url, name, topology, Some(s));
        tokio::spawn(b.clone().supervise(shutdown));
        Ok(b)
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Connected, topology declared, publishers open.
    pub fn is_ready(&self) -> bool {
        self.inner
            .state
            .borrow()
            .as_ref()
            .is_some_and(|s| s.healthy())
    }

    /// Connections established after the first one.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Waits until connected (true) or `shutdown` (false).
    pub async fn wait_ready(&self, shutdown: &CancellationToken) -> bool {
        let mut rx = self.inner.state.subscribe();
        loop {
            if self.is_ready() {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                r = rx.changed() => if r.is_err() { return false },
                // A session can turn unhealthy without a state change; look again soon.
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    fn session(&self) -> Result<Arc<Session>, Error> {
        match self.inner.state.borrow().as_ref() {
            Some(s) if s.healthy() => Ok(s.clone()),
            _ => Err(Error::Unavailable),
        }
    }

    async fn supervise(self, shutdown: CancellationToken) {
        let url = self.inner.url.clone();
        let mut delay = Duration::from_millis(100);
        let mut down_logged = false;
        let mut connected_once = self.inner.state.borrow().is_some();
        loop {
            // Hold the current session until it dies.
            let current = self.inner.state.borrow().clone();
            if let Some(s) = current {
                loop {
                    if !s.healthy() {
                        break;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            let _ = s.connection.close(200, "shutdown".into()).await;
                            return;
                        }
                        _ = self.inner.kick.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
                self.inner.state.send_replace(None);
                tracing::warn!(connection = %self.inner.name, broker = %redact_url(&url), "lost the RabbitMQ connection; reconnecting");
                let _ = s.connection.close(200, "replacing".into()).await;
                delay = Duration::from_millis(100);
            }
            if shutdown.is_cancelled() {
                return;
            }
            // A broker that accepts TCP but never answers must not hang us.
            let attempt = tokio::time::timeout(
                CONNECT_TIMEOUT,
                establish(&url, &self.inner.name, &self.inner.topology),
            )
            .await
            .unwrap_or_else(|_| Err(Error::ConnectTimeout(CONNECT_TIMEOUT)));
            match attempt {
                Ok(s) => {
                    if connected_once {
                        self.inner.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(broker = %redact_url(&url), reconnect = connected_once, "connected to RabbitMQ, topology declared");
                    connected_once = true;
                    down_logged = false;
                    self.inner.state.send_replace(Some(Arc::new(s)));
                    continue;
                }
                Err(e) => {
                    // One line per state change, not one per attempt.
                    if !down_logged {
                        tracing::error!(connection = %self.inner.name, "{e}; retrying in the background");
                        down_logged = true;
                    } else {
                        tracing::debug!("still cannot connect: {e}");
                    }
                }
            }
            let jittered = delay.mul_f64(0.8 + 0.4 * rand::random::<f64>());
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(jittered) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    fn kick(&self) {
        self.inner.kick.notify_one();
    }

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
        let session = self.session()?;
        let mut props = codec::encode(env);
        if let Some(e) = expiration {
            props = props.with_expiration(e.as_millis().to_string().into());
        }
        let opts = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let fut = async {
            session
                .publisher()
                .basic_publish(exchange.into(), routing_key.into(), opts, &env.body, props)
                .await?
                .await
        };
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(Error::Timeout(timeout)),
            Ok(Err(e)) => {
                self.kick();
                Err(Error::Amqp(e))
            }
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(r)))) | Ok(Ok(Confirmation::Nack(Some(r)))) => {
                Err(Error::Returned(r.reply_text.to_string()))
            }
            Ok(Ok(Confirmation::Nack(None))) => Err(Error::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => Err(Error::Nacked),
        }
    }

    /// Publishes a webhook to the topic exchange as the ingress does.
    pub async fn publish_webhook(&self, env: &Envelope, timeout: Duration) -> Result<(), Error> {
        let ex = self.inner.topology.exchange();
        self.publish(&ex, &Topology::routing_key(&env.source), env, None, timeout)
            .await
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

    /// Starts a consumer with manual acks and `prefetch` unacked messages at most.
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, Error> {
        let session = self.session()?;
        let channel = session.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("{}-{}", self.inner.name, uuid::Uuid::now_v7().simple());
        let inner = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Consumer {
            channel,
            inner,
            tag,
            broker: self.clone(),
            lost: CancellationToken::new(),
        })
    }

    /// A channel of its own for tools that read a queue message by message
    /// (shovel, dlq). Closing it hands back whatever it still holds, in order.
    pub async fn reader(&self) -> Result<Reader, Error> {
        let session = self.session()?;
        let channel = session.connection.create_channel().await?;
        Ok(Reader {
            channel,
            lost: CancellationToken::new(),
        })
    }

    /// Messages waiting in a queue (not counting unacked ones).
    pub async fn queue_len(&self, queue: &str) -> Result<u32, Error> {
        let session = self.session()?;
        let ch = session.connection.create_channel().await?;
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = ch.close(200, "done".into()).await;
        Ok(q.message_count())
    }

    /// Deletes every queue and exchange of this topology (tests and `--prefix`
    /// throwaway runs such as the simulator and the benchmark).
    pub async fn delete_topology(&self) -> Result<(), Error> {
        let session = self.session()?;
        let ch = session.connection.create_channel().await?;
        for q in self.inner.topology.queues() {
            ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for x in [self.inner.topology.exchange(), self.inner.topology.dead()] {
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

fn incoming(d: lapin::message::Delivery, lost: &CancellationToken) -> Incoming {
    // The body moves into shared `Bytes` once; every later copy is a refcount.
    let body = bytes::Bytes::from(d.data);
    let envelope = match codec::decode(&d.properties, body.clone()) {
        Ok(e) => Ok(e),
        Err(err) => Err((err, codec::stand_in(&d.properties, body))),
    };
    Incoming {
        envelope,
        redelivered: d.redelivered,
        acker: Acker(d.acker),
        lost: lost.clone(),
    }
}

/// Settles one delivery, once: `ack` and `nack` take it by value.
pub struct Acker(lapin::Acker);

impl Acker {
    /// Errors when the ack could not be sent (lapin answers `false` when the
    /// channel it came from is gone): the broker will redeliver the message.
    pub async fn ack(self) -> Result<(), Error> {
        if self.0.ack(BasicAckOptions::default()).await? {
            Ok(())
        } else {
            Err(Error::Unavailable)
        }
    }

    /// Hands back this message and every earlier one still unsettled on its
    /// channel, in one `basic.nack(multiple, requeue)`. Readers of `P.dead` put
    /// what they held back this way rather than by closing the channel:
    /// RabbitMQ 4.3 counts a lost channel (and `basic.reject`) against a quorum
    /// queue's delivery limit, but not a `basic.nack`.
    pub async fn requeue_through(self) -> Result<(), Error> {
        self.0
            .nack(BasicNackOptions {
                requeue: true,
                multiple: true,
            })
            .await?;
        Ok(())
    }

    /// Hands the message back to the queue for another worker (or this one) to take.
    pub async fn requeue(self) -> Result<(), Error> {
        self.0
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await?;
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
}

impl Consumer {
    /// The next message; `None` when the consumer or its channel ended (cancelled,
    /// connection lost): the caller waits for the broker to be ready and consumes again.
    pub async fn next(&mut self) -> Option<Incoming> {
        match self.inner.next().await {
            Some(Ok(d)) => Some(incoming(d, &self.lost)),
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
            (incoming(m.delivery, &self.lost), remaining)
        }))
    }

    /// Returns every held message to the queue, in its original order.
    pub async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
    }
}
