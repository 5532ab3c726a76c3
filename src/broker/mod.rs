//! The only module that imports lapin: the connection and its supervisor,
//! publishing with confirms, consuming with manual acks, and the topology.
//!
//! A [`Broker`] is a cheap handle. Behind it a supervisor task owns the AMQP
//! connection to one node of `amqp.url` (a shuffled list, so that processes
//! spread over a cluster's nodes): it connects with backoff and jitter,
//! declares the topology, opens a small pool of confirm-mode publisher
//! channels, and replaces all of it, on the next node, when the connection or a
//! channel dies. Callers never hold a dead channel for long: every operation
//! takes the current session, and fails fast (no connection) rather than
//! queueing while the broker is away. [`Broker::close`] ends the supervisor and
//! the connection; nothing else does.

mod acks;
pub mod codec;
mod consume;
mod done_log;
mod session;
mod supervisor;
pub mod topology;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation};
use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use codec::DecodeError;
pub use consume::{Acker, Consumer, Incoming, Reader};
pub use done_log::{DoneReader, DoneRecord};
pub use topology::{Declared, Topology};

use crate::config::AmqpUrl;
use crate::events::Events;
use crate::message::Envelope;
use session::Session;

/// The least time between two [`Broker::repair_topology`] declarations.
pub const REPAIR_EVERY: Duration = Duration::from_secs(1);

/// How long connecting and declaring may take before the attempt is abandoned.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

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
    /// The broker takes no message this large (its `max_message_size`).
    #[error("a body of {size} bytes is over the broker's max_message_size ({max} bytes)")]
    TooLarge { size: usize, max: usize },
    #[error("cannot reach RabbitMQ at {url}: {cause}; {hint}", hint = START_HINT)]
    Connect { url: String, cause: lapin::Error },
    #[error(transparent)]
    Topology(#[from] topology::Error),
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
}

struct Inner {
    /// The nodes, in this process's order (shuffled when there are several).
    nodes: Vec<AmqpUrl>,
    /// Index (modulo the count) of the node to connect to next.
    next_node: AtomicUsize,
    name: String,
    topology: Topology,
    state: watch::Sender<Option<Arc<Session>>>,
    /// Wakes the supervisor to check health now (a publish or consume failed).
    kick: Notify,
    events: Option<Events>,
    /// The largest body the broker takes, once it refused a larger one
    /// (`max_message_size`; AMQP 0-9-1 does not tell it at connect). Larger
    /// bodies are refused here from then on: a refused publish closes its
    /// channel, and with it every publish in flight on the connection.
    max_body: AtomicUsize,
    /// When the topology was last declared again by [`Broker::repair_topology`]
    /// (milliseconds since `started`).
    repaired_at: std::sync::atomic::AtomicU64,
    started: std::time::Instant,
    /// Cancelled by [`Broker::close`]: the supervisor closes the connection and ends.
    stop: CancellationToken,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

/// A handle on the broker; clone it freely.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// The nodes in a per-process random order: several processes given the same
/// list spread their connections over the cluster.
fn shuffled(urls: &[AmqpUrl]) -> Vec<AmqpUrl> {
    use rand::seq::SliceRandom;
    let mut v = urls.to_vec();
    v.shuffle(&mut rand::rng());
    v
}

impl Broker {
    fn new(
        nodes: Vec<AmqpUrl>,
        first: usize,
        name: &str,
        topology: Topology,
        events: Option<Events>,
        session: Option<Session>,
    ) -> Self {
        let (state, _) = watch::channel(session.map(Arc::new));
        let b = Self {
            inner: Arc::new(Inner {
                nodes,
                next_node: AtomicUsize::new(first),
                name: name.to_string(),
                topology,
                state,
                kick: Notify::new(),
                events,
                max_body: AtomicUsize::new(usize::MAX),
                repaired_at: std::sync::atomic::AtomicU64::new(0),
                started: std::time::Instant::now(),
                stop: CancellationToken::new(),
                supervisor: Mutex::new(None),
            }),
        };
        let task = tokio::spawn(b.clone().supervise());
        if let Ok(mut slot) = b.inner.supervisor.try_lock() {
            *slot = Some(task);
        }
        b
    }

    /// For long-running commands: returns at once; a supervisor connects in the
    /// background (logging once what is wrong while it cannot) and reconnects
    /// whenever the connection is lost, until [`Broker::close`].
    pub fn start(urls: &[AmqpUrl], name: &str, topology: Topology, events: Events) -> Self {
        Self::new(shuffled(urls), 0, name, topology, Some(events), None)
    }

    /// For one-shot commands: connect (to the first node that answers) and
    /// declare now, or fail with a message that says what to do. Reconnects in
    /// the background afterwards, until [`Broker::close`].
    pub async fn connect(urls: &[AmqpUrl], name: &str, topology: Topology) -> Result<Self, Error> {
        let nodes = shuffled(urls);
        let (session, i) = supervisor::first_reachable(&nodes, 0, name, &topology).await?;
        Ok(Self::new(nodes, i, name, topology, None, Some(session)))
    }

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

    /// Closes the connection and ends the supervisor; waits until both are done.
    /// Call it last, when nothing needs the broker any more.
    pub async fn close(&self) {
        self.inner.stop.cancel();
        let task = self.inner.supervisor.lock().await.take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The connection's name (`hookq-ingress`, `hookq-worker`, ...).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Connected, topology declared, publishers open.
    pub fn is_ready(&self) -> bool {
        self.inner
            .state
            .borrow()
            .as_ref()
            .is_some_and(|s| s.healthy())
    }

    /// `host:port` of the node in use, if connected.
    pub fn node(&self) -> Option<String> {
        self.inner.state.borrow().as_ref().map(|s| s.node.clone())
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
                _ = self.inner.stop.cancelled() => return false,
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

    fn kick(&self) {
        self.inner.kick.notify_one();
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
                args,
            )
            .await?;
        let lost = CancellationToken::new();
        let ledger = acks::Ledger::start(lost.clone());
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
        let channel = session.connection.create_channel().await?;
        Ok(Reader {
            channel,
            lost: CancellationToken::new(),
        })
    }

    /// Messages waiting in a queue (not counting unacked ones).
    pub async fn queue_len(&self, queue: &str) -> Result<u32, Error> {
        Ok(self.passive(queue).await?.message_count())
    }

    async fn passive(&self, queue: &str) -> Result<lapin::Queue, Error> {
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
        let ch = session.connection.create_channel().await?;
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
