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
//!
//! This file is the handle itself ([`Broker`], the state behind it, [`Error`]);
//! its operations sit with what they do: `supervisor.rs` and `session.rs` the
//! connection, `publish.rs` publishing with confirm, `consume.rs` consumers,
//! readers and settling (`acks.rs` coalesces a consumer's acks), `queues.rs`
//! declaring, repairing, counting and deleting the topology, `done_log.rs` the
//! partitions' done-logs, `codec.rs` the envelope on the wire, and `topology/`
//! every name and argument.

mod acks;
pub mod channel;
pub mod codec;
mod consume;
mod control;
mod done_log;
mod publish;
mod queues;
mod session;
mod supervisor;
pub mod topology;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use tokio::sync::{Mutex, Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use codec::DecodeError;
pub use consume::{Acker, Consumer, Incoming, Reader};
pub use control::ControlLine;
pub use done_log::{DoneReader, DoneRecord};
pub use topology::{Declared, Topology};

use crate::config::AmqpUrl;
use crate::events::Events;
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
}
