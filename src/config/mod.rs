//! Settings: `config/default.toml` (or `--config FILE`), then `HOOKQ__SECTION__KEY`
//! environment overrides, read once ([`file`]), then turned into typed
//! sections (`Duration`, `Url`, `SocketAddr`, enums) and validated.
//!
//! Every problem is an [`Error`] naming the key, so `main` can exit 2 with a
//! message an operator can act on. Each part of hookq receives only its own
//! section. This module imports nothing from the parts: they depend on it.

mod build;
mod file;
mod values;

pub use values::{AmqpUrl, Management, Secret, TargetUrl};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("configuration key `{key}`: {problem}")]
pub struct Error {
    pub key: String,
    pub problem: String,
}

impl Error {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

impl QueueType {
    /// As written in the configuration and in `x-queue-type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    Http,
    Log,
}

/// Which signature scheme a source expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchemeKind {
    None,
    Github,
    Stripe,
    Standard,
    HmacSha256,
}

impl SchemeKind {
    /// The spelling used in the configuration, so errors name what the user wrote.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Github => "github",
            Self::Stripe => "stripe",
            Self::Standard => "standard",
            Self::HmacSha256 => "hmac-sha256",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub ingress: IngressSettings,
    pub worker: WorkerSettings,
    pub retry: RetrySettings,
    pub dedup: DedupSettings,
    pub admin: AdminSettings,
    pub sources: BTreeMap<String, SourceSettings>,
}

/// The admin API and console (`[admin]`): off unless a token is configured.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Resolved from `token` or `token_env` at load; at least
    /// [`MIN_ADMIN_TOKEN`] characters. `None`: the admin API is off (404).
    pub token: Option<Secret>,
    /// Who holds the token, for the logs of what an operator does.
    pub label: String,
}

/// The shortest admin token accepted: shorter ones are guessable.
pub const MIN_ADMIN_TOKEN: usize = 16;

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            token: None,
            label: "admin".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// The nodes to connect to (one, or the nodes of a cluster).
    pub urls: Vec<AmqpUrl>,
    pub prefix: String,
    pub queue_type: QueueType,
    pub prefetch: u16,
    pub delivery_limit: u32,
    /// Not in the SPEC's table: the port of each node's management API
    /// (`hookq topology` asks it for quorum queues' members and leader).
    /// `None`: 15672, or 15671 for an `amqps://` node.
    pub management_port: Option<u16>,
    /// Not in the SPEC's table: the management API somewhere else than on
    /// each node's host (a load balancer, another port, https); its user
    /// info, when it has one, signs in instead of the AMQP URL's.
    pub management_url: Option<TargetUrl>,
    /// Work queues the keys are spread over (`P.work.<i>` when more than 1).
    pub partitions: u32,
}

/// Which partitions a worker consumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerPartitions {
    All,
    /// Indexes, each below `amqp.partitions`, without repeats.
    Only(Vec<u32>),
}

impl WorkerPartitions {
    /// The indexes this worker consumes out of `n`.
    pub fn of(&self, n: u32) -> Vec<u32> {
        match self {
            Self::All => (0..n).collect(),
            Self::Only(v) => v.iter().copied().filter(|i| *i < n).collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct IngressSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub publish_timeout: Duration,
    pub allow_unknown_sources: bool,
    /// Not in the SPEC's table: requests handled at once before shedding with 503.
    pub max_in_flight: usize,
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub handler: HandlerKind,
    pub target: Option<TargetUrl>,
    pub timeout: Duration,
    pub metrics_listen: SocketAddr,
    /// Not in the SPEC's table: how long a stop waits for in-flight messages
    /// before it hands the rest back.
    pub grace: Duration,
    pub partitions: WorkerPartitions,
}

#[derive(Debug, Clone)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub inline_attempts: u32,
    pub inline_delay: Duration,
    /// Ascending; the k-th broker retry waits `delays[min(k-1, last)]`.
    pub delays: Vec<Duration>,
    pub jitter: f64,
    pub max_delay: Duration,
}

#[derive(Debug, Clone)]
pub struct DedupSettings {
    pub path: PathBuf,
    pub lru_capacity: usize,
    pub retention: Duration,
    /// Not in the SPEC's table: how long a worker's claim on a key outlives the
    /// worker's last sign of life (it renews it while it runs). After a SIGKILL,
    /// the killed worker's messages wait at most this long before another
    /// worker takes them over.
    pub lease: Duration,
}

#[derive(Debug, Clone)]
pub struct SourceSettings {
    pub verify: SchemeKind,
    /// Resolved from `secret` or `secret_env` at load.
    pub secret: Option<Secret>,
    pub signature_header: Option<String>,
    pub tolerance: Duration,
    pub target: Option<TargetUrl>,
    pub id_header: Option<String>,
    pub id_json_pointer: Option<String>,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            urls: vec![AmqpUrl("amqp://guest:guest@127.0.0.1:5672/%2f".into())],
            prefix: "hookq".into(),
            queue_type: QueueType::Quorum,
            prefetch: 64,
            delivery_limit: 20,
            management_port: None,
            management_url: None,
            partitions: 1,
        }
    }
}

impl Default for IngressSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1_048_576,
            publish_timeout: ms(5000),
            allow_unknown_sources: false,
            max_in_flight: 4096,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 32,
            handler: HandlerKind::Http,
            target: None,
            timeout: ms(10_000),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            grace: ms(20_000),
            partitions: WorkerPartitions::All,
        }
    }
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            inline_attempts: 2,
            inline_delay: ms(100),
            delays: [1000, 5000, 30_000, 120_000, 600_000].map(ms).to_vec(),
            jitter: 0.1,
            max_delay: ms(86_400_000),
        }
    }
}

impl Default for DedupSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/hookq.db"),
            lru_capacity: 100_000,
            retention: ms(604_800_000),
            lease: ms(10_000),
        }
    }
}

impl Default for SourceSettings {
    fn default() -> Self {
        Self {
            verify: SchemeKind::None,
            secret: None,
            signature_header: None,
            tolerance: ms(300_000),
            target: None,
            id_header: None,
            id_json_pointer: None,
        }
    }
}

impl AmqpSettings {
    /// Classic queues live on one node: on a cluster, losing that node stops
    /// hookq's queues (and, without replicas, may lose what they held).
    pub fn warn_if_classic_on_a_cluster(&self) {
        if self.urls.len() > 1 && self.queue_type == QueueType::Classic {
            tracing::warn!(
                nodes = self.urls.len(),
                "amqp.queue_type = \"classic\" on a cluster: each queue lives on one node, and \
                 while that node is down its messages are unavailable (and lost if its disk is); \
                 use quorum queues to replicate them"
            );
        }
    }
}

impl RetrySettings {
    /// The longest a message can stay with the broker before its last attempt:
    /// every retry but the first delivery may wait in a delay tier, each wait
    /// either its tier or a `Retry-After` of up to `max_delay`.
    pub fn longest_stay(&self) -> Duration {
        let last = self.delays.len().saturating_sub(1);
        (0..self.max_attempts.saturating_sub(1) as usize)
            .map(|k| {
                let tier = self.delays.get(k.min(last)).copied().unwrap_or_default();
                tier.max(self.max_delay)
            })
            .fold(Duration::ZERO, Duration::saturating_add)
    }
}

/// The largest `ingress.max_body_bytes`: RabbitMQ 4.x's default
/// `max_message_size` (16 MiB; 3.10's is 128 MiB). AMQP 0-9-1 does not tell a
/// client the broker's limit; a broker set lower is learned from its first
/// refusal, and larger bodies get 413 from then on.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Reads an environment variable (for `secret_env`).
type Lookup = dyn Fn(&str) -> Option<String>;

/// Where settings come from when `--config` is not given.
pub const DEFAULT_PATH: &str = "config/default.toml";

/// The longest duration any `*_ms` key takes (10 years): anything longer is a
/// typo, and bounding it keeps every later conversion (to `i64` milliseconds for
/// SQLite, to an `Instant` deadline) free of overflow.
pub const MAX_MS: u64 = 10 * 365 * 86_400_000;

/// Loads file + environment and validates. `path = None` means the default file when
/// present, else built-in defaults; an explicit path must exist.
pub fn load(path: Option<&Path>) -> Result<Settings, Error> {
    load_with_env(path, None)
}

/// Like [`load`], with environment variables taken from `env` instead of the process
/// (tests use this so they do not race on the global environment).
pub fn load_with_env(
    path: Option<&Path>,
    env: Option<std::collections::HashMap<String, String>>,
) -> Result<Settings, Error> {
    let mut builder = config::Config::builder();
    let path = match path {
        Some(p) if !p.exists() => {
            return Err(Error::new(
                "--config",
                format!("file {} does not exist", p.display()),
            ));
        }
        Some(p) => Some(p),
        None => Some(Path::new(DEFAULT_PATH)).filter(|p| p.exists()),
    };
    if let Some(p) = path {
        builder = builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
    }
    let mut envsrc = config::Environment::with_prefix("HOOKQ")
        .prefix_separator("__")
        .separator("__")
        // Values stay text: "00123" is a secret, not the number 123. Numbers and
        // booleans are parsed by the field they land in (serde asks for them).
        .try_parsing(false);
    let lookup: Box<Lookup> = match env {
        Some(env) => {
            let vars = env.clone();
            envsrc = envsrc.source(Some(env.into_iter().collect()));
            Box::new(move |k| vars.get(k).cloned())
        }
        None => Box::new(|k| std::env::var(k).ok()),
    };
    let cfg = builder
        .add_source(envsrc)
        .build()
        .map_err(|e| Error::new(key_of_config_error(&e), e.to_string()))?;
    let raw: file::File = serde_path_to_error::deserialize(cfg).map_err(|e| {
        let key = e.path().to_string();
        Error::new(key, e.into_inner().to_string())
    })?;
    build::settings(&raw, &lookup)
}

fn key_of_config_error(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::Type { key: Some(k), .. } => k.clone(),
        config::ConfigError::FileParse { uri, .. } => {
            uri.clone().unwrap_or_else(|| "--config".into())
        }
        _ => "--config".into(),
    }
}

/// Is `name` usable in `/hooks/{name}`?
pub fn valid_source_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Settings {
    /// What only a worker needs (`up`, `worker`): a delivery target for the
    /// `http` handler. Other commands run without one.
    pub fn validate_worker(&self) -> Result<(), Error> {
        let w = &self.worker;
        if w.handler == HandlerKind::Http && w.target.is_none() {
            let uncovered = self.ingress.allow_unknown_sources
                || self.sources.is_empty()
                || self.sources.values().any(|s| s.target.is_none());
            if uncovered {
                return Err(Error::new(
                    "worker.target",
                    "handler \"http\" needs a target: set worker.target (or a target on every source, \
                     with allow_unknown_sources off), or use worker.handler = \"log\"",
                ));
            }
        }
        Ok(())
    }

    /// The settings as a TOML file that [`load`] reads back to the same
    /// settings (secrets included: keep the file private).
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.to_file()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests;
