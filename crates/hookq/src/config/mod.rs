//! Settings: `config/default.toml` (or `--config FILE`), then `HOOKQ__SECTION__KEY`
//! environment overrides, read once into the typed sections below (serde on
//! the sections themselves: `Duration`s from `*_ms`, URLs, socket addresses,
//! secrets), then checked by one [`Settings::validate`].
//!
//! Every problem is an [`Error`] naming the key, so `main` can exit 2 with a
//! message an operator can act on. Each part of hookq receives only its own
//! section. This module imports nothing from the parts: they depend on it.
//! Adding a key: its field (with its default) here, its check in
//! [`validate`] if it has one, its line in `config/default.toml`, the README
//! and `docs/contract.md` (a test keeps those three the same set).

mod validate;
mod values;
mod written;

pub use validate::Role;
pub use values::{AmqpUrl, Management, Secret, TargetRef, TargetUrl, standard_key};

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

/// Every setting, in its sections. `Deserialize` reads the keys as written
/// (unknown keys are errors); [`Settings::validate`] checks what one key
/// cannot check alone and works out the defaults that depend on other keys.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub ingress: IngressSettings,
    pub worker: WorkerSettings,
    pub retry: RetrySettings,
    pub dedup: DedupSettings,
    pub admin: AdminSettings,
    pub sources: BTreeMap<String, SourceSettings>,
    /// The applications hookq delivers to, by name, with their limits.
    pub targets: BTreeMap<String, TargetSettings>,
}

/// A target (`[targets.NAME]`): where deliveries go, and the limits that
/// protect it, for the whole system (every worker on every host).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetSettings {
    /// Required (checked by [`Settings::validate`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<TargetUrl>,
    /// Deliveries in flight at once, across every worker; unset:
    /// `worker.concurrency`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<usize>,
    /// Requests a second, across every worker; 0: no limit.
    pub rate_per_s: f64,
    /// Consecutive retryable failures that open the breaker; 0: no breaker.
    pub breaker_failures: u32,
    /// The first wait before an open breaker's probe; doubles after each
    /// failed probe up to `breaker_max_probe`.
    #[serde(rename = "breaker_probe_ms", with = "written::ms")]
    pub breaker_probe: Duration,
    #[serde(rename = "breaker_max_probe_ms", with = "written::ms")]
    pub breaker_max_probe: Duration,
}

impl Default for TargetSettings {
    fn default() -> Self {
        Self {
            url: None,
            max_concurrency: None,
            rate_per_s: 0.0,
            breaker_failures: 10,
            breaker_probe: ms(1000),
            breaker_max_probe: ms(60_000),
        }
    }
}

/// A target as the worker uses it: its name, URL and limits, whether it was
/// named in `[targets]` or given as a URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// Its queues' part of the name (`P.hold.<queue_id>`): the name of a
    /// named target; `url-` and 12 hex digits of the URL's SHA-256 for a
    /// target given as a URL (a URL is no queue name).
    pub queue_id: String,
    pub url: TargetUrl,
    pub max_concurrency: usize,
    pub rate_per_s: f64,
    pub breaker_failures: u32,
    pub breaker_probe: Duration,
    pub breaker_max_probe: Duration,
}

/// The admin API and console (`[admin]`): off unless a token is configured.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// At least [`MIN_ADMIN_TOKEN`] characters; read from `token_env` by
    /// [`Settings::validate`] when that is set. `None`: the admin API is off (404).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// The environment variable holding the token (better than `token`).
    #[serde(skip_serializing)]
    pub token_env: Option<String>,
    /// Who holds the token, for the logs of what an operator does.
    pub label: String,
}

/// The shortest admin token accepted: shorter ones are guessable.
pub const MIN_ADMIN_TOKEN: usize = 16;

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            token: None,
            token_env: None,
            label: "admin".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// The nodes to connect to (one, or the nodes of a cluster).
    #[serde(rename = "url", with = "written::urls")]
    pub urls: Vec<AmqpUrl>,
    pub prefix: String,
    pub queue_type: QueueType,
    pub prefetch: u16,
    pub delivery_limit: u32,
    /// Not in the SPEC's table: the port of each node's management API
    /// (`hookq topology` asks it for quorum queues' members and leader).
    /// `None`: 15672, or 15671 for an `amqps://` node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub management_port: Option<u16>,
    /// Not in the SPEC's table: the management API somewhere else than on
    /// each node's host (a load balancer, another port, https); its user
    /// info, when it has one, signs in instead of the AMQP URL's.
    #[serde(skip_serializing_if = "Option::is_none")]
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    #[serde(rename = "publish_timeout_ms", with = "written::ms")]
    pub publish_timeout: Duration,
    pub allow_unknown_sources: bool,
    /// Not in the SPEC's table: requests handled at once before shedding with 503.
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub handler: HandlerKind,
    /// The default target: a target's name or a URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetRef>,
    #[serde(rename = "timeout_ms", with = "written::ms")]
    pub timeout: Duration,
    pub metrics_listen: SocketAddr,
    /// Not in the SPEC's table: how long a stop waits for in-flight messages
    /// before it hands the rest back.
    #[serde(rename = "grace_ms", with = "written::ms")]
    pub grace: Duration,
    #[serde(with = "written::partitions")]
    pub partitions: WorkerPartitions,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    pub max_attempts: u32,
    /// As written; unset, [`RetrySettings::inline_attempts`] is 2, or
    /// `max_attempts` when that is less.
    #[serde(rename = "inline_attempts", skip_serializing_if = "Option::is_none")]
    pub inline_attempts_set: Option<u32>,
    #[serde(rename = "inline_delay_ms", with = "written::ms")]
    pub inline_delay: Duration,
    /// Ascending; the k-th broker retry waits `delays[min(k-1, last)]`.
    #[serde(rename = "delays_ms", with = "written::ms_list")]
    pub delays: Vec<Duration>,
    pub jitter: f64,
    #[serde(rename = "max_delay_ms", with = "written::ms")]
    pub max_delay: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupSettings {
    pub path: PathBuf,
    pub lru_capacity: usize,
    /// As written; unset, the default grows with the retry settings.
    #[serde(
        rename = "retention_ms",
        with = "written::opt_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention_set: Option<Duration>,
    /// In effect: `retention_set`, or the default worked out by
    /// [`Settings::validate`] (7 days, or a day more than a message's
    /// longest stay with the broker when that is longer).
    #[serde(skip)]
    pub retention: Duration,
    /// Not in the SPEC's table: how long a worker's claim on a key outlives the
    /// worker's last sign of life (it renews it while it runs). After a SIGKILL,
    /// the killed worker's messages wait at most this long before another
    /// worker takes them over.
    #[serde(rename = "lease_ms", with = "written::ms")]
    pub lease: Duration,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceSettings {
    pub verify: SchemeKind,
    /// Read from `secret_env` by [`Settings::validate`] when that is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    #[serde(skip_serializing)]
    pub secret_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature_header: Option<String>,
    #[serde(rename = "tolerance_ms", with = "written::ms")]
    pub tolerance: Duration,
    /// This source's target (a name or a URL), instead of `worker.target`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_json_pointer: Option<String>,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// The default retention of a processed key (7 days).
const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 86_400);

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
            inline_attempts_set: None,
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
            retention_set: None,
            retention: DEFAULT_RETENTION,
            lease: ms(10_000),
        }
    }
}

impl Default for SourceSettings {
    fn default() -> Self {
        Self {
            verify: SchemeKind::None,
            secret: None,
            secret_env: None,
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
    /// The deliveries made in-process before a delay queue: as set, else 2,
    /// or `max_attempts` when that is less (a default never makes another
    /// setting invalid).
    pub fn inline_attempts(&self) -> u32 {
        self.inline_attempts_set
            .unwrap_or_else(|| 2.min(self.max_attempts))
    }

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

/// Loads file + environment and validates for `role`. `path = None` means the
/// default file when present, else built-in defaults; an explicit path must exist.
pub fn load(path: Option<&Path>, role: Role) -> Result<Settings, Error> {
    load_with_env(path, None, role)
}

/// Like [`load`], with environment variables taken from `env` instead of the process
/// (tests use this so they do not race on the global environment).
pub fn load_with_env(
    path: Option<&Path>,
    env: Option<std::collections::HashMap<String, String>>,
    role: Role,
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
    let mut settings: Settings = serde_path_to_error::deserialize(cfg).map_err(|e| {
        let key = e.path().to_string();
        Error::new(key, e.into_inner().to_string())
    })?;
    settings.validate(&lookup, role)?;
    Ok(settings)
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
    /// Every target deliveries may go to, by name: the `[targets]` table,
    /// and a target of its own (default limits) for each URL given as
    /// `worker.target` or a source's target. Call after [`Settings::validate`].
    pub fn resolved_targets(&self) -> BTreeMap<String, Target> {
        let mut out = BTreeMap::new();
        for (name, t) in &self.targets {
            if let Some(url) = &t.url {
                out.insert(name.clone(), self.target_of(name, url, t));
            }
        }
        let refs = self
            .sources
            .values()
            .filter_map(|s| s.target.as_ref())
            .chain(self.worker.target.as_ref());
        for r in refs {
            if let TargetRef::Url(u) = r {
                let name = r.name();
                out.entry(name.clone())
                    .or_insert_with(|| self.target_of(&name, u, &TargetSettings::default()));
            }
        }
        out
    }

    fn target_of(&self, name: &str, url: &TargetUrl, t: &TargetSettings) -> Target {
        let queue_id = if self.targets.contains_key(name) {
            name.to_string()
        } else {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(name.as_bytes());
            format!("url-{}", &hex::encode(digest)[..12])
        };
        Target {
            name: name.to_string(),
            queue_id,
            url: url.clone(),
            max_concurrency: t.max_concurrency.unwrap_or(self.worker.concurrency),
            rate_per_s: t.rate_per_s,
            breaker_failures: t.breaker_failures,
            breaker_probe: t.breaker_probe,
            breaker_max_probe: t.breaker_max_probe,
        }
    }

    /// The name of the target a source's webhooks go to: its own, else
    /// `worker.target`'s.
    pub fn target_name_of(&self, source: &str) -> Option<String> {
        self.sources
            .get(source)
            .and_then(|s| s.target.as_ref())
            .or(self.worker.target.as_ref())
            .map(TargetRef::name)
    }

    /// The settings as a TOML file that [`load`] reads back to the same
    /// settings (secrets included: keep the file private).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod documented;
#[cfg(test)]
mod tests;
