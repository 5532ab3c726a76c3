//! Protecting the application: each target's limits for the whole system,
//! its adaptive concurrency, its breaker and an operator's pause.
//!
//! Every worker has a [`Gate`] per target, and every delivery attempt passes
//! one. What one worker learns, all learn through `P.control`, a fanout
//! exchange (see [`peers`]): each worker beats five times a second with its
//! view of each target, so
//! - the limits are split between the workers with work for a target
//!   ([`peers::Peers::share`]);
//! - a breaker opened anywhere holds the target everywhere ([`breaker`]);
//! - the lowest live worker sends an open breaker's probe.
//!
//! A held message leaves the work queue for the target's hold queue
//! (`P.hold.<target>`, with confirm, attempts unchanged), so it takes no
//! delivery slot nor prefetch from other targets; a worker whose gate is
//! closed again releases held messages back to their work queue, a few at a
//! time, as its limit has room ([`control`]). A pause is a message in the
//! target's pause queue (`P.paused.<target>`): kept by the broker across
//! restarts, looked at by every worker twice a second.

mod adaptive;
mod breaker;
mod control;
mod gate;
mod pace;
pub mod peers;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

pub use breaker::{Breaker, Register};
pub use control::{TargetView, Watch, listen, pause, resume};
pub use gate::{Admission, Gate, HoldWhy, Observed, Permit};

use crate::config::{SourceSettings, Target, TargetRef};
use crate::events::Events;
use peers::{Peers, Share};

/// How often a worker looks at its targets (shares, probes, releases).
pub const TICK: Duration = Duration::from_millis(100);

/// How long a delivery waits for room within its target's limits before
/// its message is held, when the worker delivers to more than one target
/// (a message waiting longer would take prefetch other targets need).
pub const PATIENCE: Duration = Duration::from_secs(1);

/// This worker among the others.
pub struct Fleet {
    /// This worker's id on `P.control` (random per process).
    pub me: u64,
    peers: std::sync::Mutex<Peers>,
    /// Send a beat now (something changed).
    beat_now: Notify,
    /// The worker has listened long enough to know its peers.
    ready: AtomicBool,
}

impl Fleet {
    fn new() -> Self {
        Self {
            me: rand::random::<u64>() | 1,
            peers: std::sync::Mutex::new(Peers::default()),
            beat_now: Notify::new(),
            ready: AtomicBool::new(false),
        }
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn share(&self, t: &Target) -> Share {
        self.peers()
            .share(&t.name, self.me, t.max_concurrency, t.rate_per_s)
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// A worker's targets, and which one each source delivers to.
pub struct Targets {
    gates: BTreeMap<String, Arc<Gate>>,
    by_source: HashMap<String, Arc<Gate>>,
    default: Option<Arc<Gate>>,
    fleet: Arc<Fleet>,
    /// How long a probe may take to be answered before it counts as failed.
    probe_deadline: Duration,
}

impl Targets {
    /// The gates of `targets` (every target of the configuration, resolved),
    /// routed as `sources` and `default` (`worker.target`) say.
    pub fn new(
        targets: BTreeMap<String, Target>,
        sources: &BTreeMap<String, SourceSettings>,
        default: Option<&TargetRef>,
        delivery_timeout: Duration,
        longest_wait: Duration,
        events: &Events,
    ) -> Self {
        let fleet = Arc::new(Fleet::new());
        let gates: BTreeMap<String, Arc<Gate>> = targets
            .into_iter()
            .map(|(name, t)| {
                (
                    name,
                    Arc::new(Gate::new(t, fleet.clone(), events.clone(), longest_wait)),
                )
            })
            .collect();
        let by_source = sources
            .iter()
            .filter_map(|(s, cfg)| {
                let gate = gates.get(&cfg.target.as_ref()?.name())?;
                Some((s.clone(), gate.clone()))
            })
            .collect();
        let default = default.and_then(|r| gates.get(&r.name()).cloned());
        Self {
            gates,
            by_source,
            default,
            fleet,
            probe_deadline: delivery_timeout + Duration::from_secs(10),
        }
    }

    /// Delivers at once, without first listening for peers (a worker that
    /// runs no control loop: tests of the processing, tools).
    pub fn without_peers(self) -> Self {
        self.fleet.ready.store(true, Ordering::Relaxed);
        self
    }

    /// No targets: the `log` handler.
    pub fn none() -> Self {
        Self {
            gates: BTreeMap::new(),
            by_source: HashMap::new(),
            default: None,
            fleet: Arc::new(Fleet::new()),
            probe_deadline: Duration::ZERO,
        }
    }

    /// The gate of the target `source`'s webhooks go to.
    pub fn for_source(&self, source: &str) -> Option<&Arc<Gate>> {
        self.by_source.get(source).or(self.default.as_ref())
    }

    /// How long a delivery waits for room before its message is held:
    /// unbounded with one target (no other target needs the slot).
    pub fn patience(&self) -> Option<Duration> {
        (self.gates.len() > 1).then_some(PATIENCE)
    }

    pub fn gates(&self) -> impl Iterator<Item = &Arc<Gate>> {
        self.gates.values()
    }

    pub fn is_empty(&self) -> bool {
        self.gates.is_empty()
    }

    /// Deliveries may start: the worker has heard its peers for two beats
    /// (their shares of the limits, a pause or an open breaker are known),
    /// or it has no target to share.
    pub fn peers_known(&self) -> bool {
        self.gates.is_empty() || self.fleet.is_ready()
    }

    /// This worker's id on `P.control`.
    pub fn worker_id(&self) -> u64 {
        self.fleet.me
    }
}
