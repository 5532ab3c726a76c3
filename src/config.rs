//! Settings: `config/default.toml` (or `--config FILE`), then `HOOKQ__SECTION__KEY`
//! environment overrides, deserialized once into typed structs and validated.
//!
//! Every problem is a [`ConfigError`] naming the key, so `main` can exit 2 with a
//! message an operator can act on. Each part of hookq receives only its own section.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ingress::verify::{SchemeKind, Verifier};

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("configuration key `{key}`: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub ingress: IngressSettings,
    pub worker: WorkerSettings,
    pub retry: RetrySettings,
    pub dedup: DedupSettings,
    pub sources: BTreeMap<String, SourceSettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: String,
    pub prefix: String,
    pub queue_type: QueueType,
    pub prefetch: u16,
    pub delivery_limit: u32,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: "hookq".into(),
            queue_type: QueueType::Quorum,
            prefetch: 64,
            delivery_limit: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngressSettings {
    pub listen: SocketAddr,
    pub max_body_bytes: usize,
    pub publish_timeout_ms: u64,
    pub allow_unknown_sources: bool,
    /// Not in the SPEC's table: requests handled at once before shedding with 503.
    pub max_in_flight: usize,
}

impl Default for IngressSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1_048_576,
            publish_timeout_ms: 5000,
            allow_unknown_sources: false,
            max_in_flight: 4096,
        }
    }
}

impl IngressSettings {
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerKind {
    Http,
    Log,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub handler: HandlerKind,
    pub target: Option<String>,
    pub timeout_ms: u64,
    pub metrics_listen: SocketAddr,
    /// Not in the SPEC's table: how long a stop waits for in-flight messages
    /// before it hands the rest back.
    pub grace_ms: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 32,
            handler: HandlerKind::Http,
            target: None,
            timeout_ms: 10_000,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            grace_ms: 20_000,
        }
    }
}

impl WorkerSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub inline_attempts: u32,
    pub inline_delay_ms: u64,
    #[serde(deserialize_with = "ms_list")]
    pub delays_ms: Vec<u64>,
    pub jitter: f64,
    pub max_delay_ms: u64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            inline_attempts: 2,
            inline_delay_ms: 100,
            delays_ms: vec![1000, 5000, 30_000, 120_000, 600_000],
            jitter: 0.1,
            max_delay_ms: 86_400_000,
        }
    }
}

impl RetrySettings {
    /// The longest a message can stay with the broker before its last attempt:
    /// every retry but the first delivery may wait in a delay tier, each wait
    /// either its tier or a `Retry-After` of up to `max_delay_ms`.
    pub fn longest_stay_ms(&self) -> u64 {
        let last = self.delays_ms.len().saturating_sub(1);
        (0..self.max_attempts.saturating_sub(1) as usize)
            .map(|k| {
                let tier = self.delays_ms.get(k.min(last)).copied().unwrap_or(0);
                tier.max(self.max_delay_ms)
            })
            .fold(0u64, u64::saturating_add)
    }
}

/// A list of milliseconds: a TOML array, or from the environment one number or
/// a comma-separated string (`HOOKQ__RETRY__DELAYS_MS=100,500`).
fn ms_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<u64>),
        One(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::List(v) => Ok(v),
        Raw::One(n) => Ok(vec![n]),
        Raw::Text(t) => t
            .split(',')
            .map(|p| p.trim().parse::<u64>())
            .collect::<Result<_, _>>()
            .map_err(|_| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a comma-separated list of milliseconds"
                ))
            }),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupSettings {
    pub path: PathBuf,
    pub lru_capacity: usize,
    pub retention_ms: u64,
    /// Not in the SPEC's table: how long a worker's claim on a key outlives the
    /// worker's last sign of life (it renews it while it runs). After a SIGKILL,
    /// the killed worker's messages wait at most this long before another
    /// worker takes them over.
    pub lease_ms: u64,
}

impl Default for DedupSettings {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/hookq.db"),
            lru_capacity: 100_000,
            retention_ms: 604_800_000,
            lease_ms: 10_000,
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceSettings {
    pub verify: SchemeKind,
    pub secret: Option<String>,
    pub secret_env: Option<String>,
    pub signature_header: Option<String>,
    pub tolerance_ms: u64,
    pub target: Option<String>,
    pub id_header: Option<String>,
    pub id_json_pointer: Option<String>,
}

impl Default for SourceSettings {
    fn default() -> Self {
        Self {
            verify: SchemeKind::None,
            secret: None,
            secret_env: None,
            signature_header: None,
            tolerance_ms: 300_000,
            target: None,
            id_header: None,
            id_json_pointer: None,
        }
    }
}

/// Secrets never reach logs: this Debug leaves the secret out.
impl std::fmt::Debug for SourceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSettings")
            .field("verify", &self.verify)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .field("signature_header", &self.signature_header)
            .field("tolerance_ms", &self.tolerance_ms)
            .field("target", &self.target)
            .field("id_header", &self.id_header)
            .field("id_json_pointer", &self.id_json_pointer)
            .finish()
    }
}

impl SourceSettings {
    /// Builds the signature verifier, reading `secret_env` now so that a missing
    /// variable is a start-up error rather than a stream of 401s.
    pub fn verifier(&self, name: &str) -> Result<Verifier, ConfigError> {
        let secret = match (&self.secret, &self.secret_env) {
            (Some(s), _) => Some(s.clone()),
            (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
                ConfigError::new(
                    format!("sources.{name}.secret_env"),
                    format!("environment variable {var} is not set"),
                )
            })?),
            (None, None) => None,
        };
        Verifier::new(
            self.verify,
            secret.as_deref(),
            self.signature_header.as_deref(),
            Duration::from_millis(self.tolerance_ms),
        )
        .map_err(|e| ConfigError::new(format!("sources.{name}"), e.to_string()))
    }
}

/// Where settings come from when `--config` is not given.
pub const DEFAULT_PATH: &str = "config/default.toml";

/// Loads file + environment and validates. `path = None` means the default file when
/// present, else built-in defaults; an explicit path must exist.
pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
    load_with_env(path, None)
}

/// Like [`load`], with environment variables taken from `env` instead of the process
/// (tests use this so they do not race on the global environment).
pub fn load_with_env(
    path: Option<&Path>,
    env: Option<std::collections::HashMap<String, String>>,
) -> Result<Settings, ConfigError> {
    let mut builder = config::Config::builder();
    match path {
        Some(p) => {
            if !p.exists() {
                return Err(ConfigError::new(
                    "--config",
                    format!("file {} does not exist", p.display()),
                ));
            }
            builder = builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
        }
        None => {
            let p = Path::new(DEFAULT_PATH);
            if p.exists() {
                builder =
                    builder.add_source(config::File::from(p).format(config::FileFormat::Toml));
            }
        }
    }
    let mut envsrc = config::Environment::with_prefix("HOOKQ")
        .prefix_separator("__")
        .separator("__")
        // Values stay text: "00123" is a secret, not the number 123. Numbers and
        // booleans are parsed by the field they land in (serde asks for them).
        .try_parsing(false);
    if let Some(env) = env {
        envsrc = envsrc.source(Some(env.into_iter().collect()));
    }
    let cfg = builder
        .add_source(envsrc)
        .build()
        .map_err(|e| ConfigError::new(key_of_config_error(&e), e.to_string()))?;
    let settings: Settings = serde_path_to_error::deserialize(cfg).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::new(key, e.into_inner().to_string())
    })?;
    settings.validate()?;
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

fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Ok(()),
        Ok(u) => Err(ConfigError::new(
            key,
            format!("scheme {} is not http or https", u.scheme()),
        )),
        Err(e) => Err(ConfigError::new(key, format!("not a URL: {e}"))),
    }
}

/// The longest duration any `*_ms` key takes (10 years): anything longer is a
/// typo, and bounding it keeps every later conversion (to `i64` milliseconds for
/// SQLite, to an `Instant` deadline) free of overflow.
pub const MAX_MS: u64 = 10 * 365 * 86_400_000;

fn check_ms(key: &str, value: u64, min: u64) -> Result<(), ConfigError> {
    if value < min {
        return Err(ConfigError::new(key, format!("must be at least {min} ms")));
    }
    if value > MAX_MS {
        return Err(ConfigError::new(
            key,
            format!("{value} ms is more than 10 years ({MAX_MS} ms)"),
        ));
    }
    Ok(())
}

impl Settings {
    fn validate(&self) -> Result<(), ConfigError> {
        let a = &self.amqp;
        if !(a.url.starts_with("amqp://") || a.url.starts_with("amqps://")) {
            return Err(ConfigError::new(
                "amqp.url",
                "must start with amqp:// or amqps://",
            ));
        }
        if a.prefix.is_empty()
            || a.prefix.len() > 100
            || !a
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(ConfigError::new(
                "amqp.prefix",
                "must be 1 to 100 characters of letters, digits, '.', '_' or '-'",
            ));
        }
        if a.prefetch == 0 {
            return Err(ConfigError::new("amqp.prefetch", "must be at least 1"));
        }
        if a.delivery_limit == 0 {
            return Err(ConfigError::new(
                "amqp.delivery_limit",
                "must be at least 1",
            ));
        }
        let i = &self.ingress;
        if i.max_body_bytes == 0 {
            return Err(ConfigError::new(
                "ingress.max_body_bytes",
                "must be at least 1",
            ));
        }
        if i.max_in_flight == 0 {
            return Err(ConfigError::new(
                "ingress.max_in_flight",
                "must be at least 1",
            ));
        }
        check_ms("ingress.publish_timeout_ms", i.publish_timeout_ms, 1)?;
        let w = &self.worker;
        if w.concurrency == 0 {
            return Err(ConfigError::new("worker.concurrency", "must be at least 1"));
        }
        check_ms("worker.timeout_ms", w.timeout_ms, 1)?;
        check_ms("worker.grace_ms", w.grace_ms, 0)?;
        if let Some(t) = &w.target {
            check_url("worker.target", t)?;
        }
        let r = &self.retry;
        if r.max_attempts == 0 {
            return Err(ConfigError::new("retry.max_attempts", "must be at least 1"));
        }
        if r.inline_attempts == 0 || r.inline_attempts > r.max_attempts {
            return Err(ConfigError::new(
                "retry.inline_attempts",
                "must be between 1 and retry.max_attempts",
            ));
        }
        if r.delays_ms.is_empty() || r.delays_ms.contains(&0) {
            return Err(ConfigError::new(
                "retry.delays_ms",
                "must list at least one delay, each above 0 ms",
            ));
        }
        if r.delays_ms.iter().any(|&d| d > u32::MAX as u64) {
            return Err(ConfigError::new(
                "retry.delays_ms",
                "each delay must fit a queue TTL (at most 4294967295 ms)",
            ));
        }
        if r.delays_ms.windows(2).any(|w| w[1] < w[0]) {
            return Err(ConfigError::new(
                "retry.delays_ms",
                format!(
                    "{:?} is not ascending: the k-th broker retry waits delays_ms[min(k-1, last)], \
                     so each tier must be at least as long as the one before",
                    r.delays_ms
                ),
            ));
        }
        check_ms("retry.inline_delay_ms", r.inline_delay_ms, 0)?;
        check_ms("retry.max_delay_ms", r.max_delay_ms, 1)?;
        if !(0.0..1.0).contains(&r.jitter) {
            return Err(ConfigError::new("retry.jitter", "must be in [0, 1)"));
        }
        let d = &self.dedup;
        if d.lru_capacity == 0 {
            return Err(ConfigError::new("dedup.lru_capacity", "must be at least 1"));
        }
        check_ms("dedup.retention_ms", d.retention_ms, 1)?;
        check_ms("dedup.lease_ms", d.lease_ms, 100)?;
        let stay = r.longest_stay_ms();
        if d.retention_ms < stay {
            return Err(ConfigError::new(
                "dedup.retention_ms",
                format!(
                    "{} ms is shorter than the longest a message can stay with the broker before \
                     its last attempt ({stay} ms: {} retries, each waiting its tier of retry.delays_ms \
                     or a Retry-After of up to retry.max_delay_ms); pruning would free the key of a \
                     message still in flight. Raise dedup.retention_ms, or lower retry.max_delay_ms, \
                     retry.delays_ms or retry.max_attempts",
                    d.retention_ms,
                    r.max_attempts.saturating_sub(1)
                ),
            ));
        }
        for (name, s) in &self.sources {
            if !valid_source_name(name) {
                return Err(ConfigError::new(
                    format!("sources.{name}"),
                    "source names are 1 to 64 of [a-z0-9_-]",
                ));
            }
            s.verifier(name)?;
            check_ms(&format!("sources.{name}.tolerance_ms"), s.tolerance_ms, 1)?;
            if let Some(t) = &s.target {
                check_url(&format!("sources.{name}.target"), t)?;
            }
            if let Some(p) = &s.id_json_pointer
                && !(p.is_empty() || p.starts_with('/'))
            {
                return Err(ConfigError::new(
                    format!("sources.{name}.id_json_pointer"),
                    "a JSON pointer is empty or starts with '/' (RFC 6901)",
                ));
            }
            if let Some(h) = &s.id_header
                && axum::http::HeaderName::from_bytes(h.as_bytes()).is_err()
            {
                return Err(ConfigError::new(
                    format!("sources.{name}.id_header"),
                    "not a valid HTTP header name",
                ));
            }
        }
        Ok(())
    }

    /// What only a worker needs (`up`, `worker`): a delivery target for the
    /// `http` handler. Other commands run without one.
    pub fn validate_worker(&self) -> Result<(), ConfigError> {
        let w = &self.worker;
        if w.handler == HandlerKind::Http && w.target.is_none() {
            let uncovered = self.ingress.allow_unknown_sources
                || self.sources.is_empty()
                || self.sources.values().any(|s| s.target.is_none());
            if uncovered {
                return Err(ConfigError::new(
                    "worker.target",
                    "handler \"http\" needs a target: set worker.target (or a target on every source, \
                     with allow_unknown_sources off), or use worker.handler = \"log\"",
                ));
            }
        }
        Ok(())
    }

    /// The delivery URL for a source: its own target, else worker.target.
    pub fn target_for(&self, source: &str) -> Option<&str> {
        self.sources
            .get(source)
            .and_then(|s| s.target.as_deref())
            .or(self.worker.target.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn shipped_default_file_matches_builtin_defaults() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let e = env(&[("HOOKQ__WORKER__HANDLER", "log")]);
        let s = load_with_env(Some(&p), e.clone()).unwrap();
        let d = Settings::default();
        assert_eq!(s.amqp.url, d.amqp.url);
        assert_eq!(s.retry.delays_ms, d.retry.delays_ms);
        assert_eq!(s.dedup.retention_ms, d.dedup.retention_ms);
        assert_eq!(s.ingress.listen, d.ingress.listen);
        assert_eq!(s.retry.max_delay_ms, d.retry.max_delay_ms);
        assert_eq!(s.dedup.lease_ms, d.dedup.lease_ms);
        assert_eq!(s.worker.grace_ms, d.worker.grace_ms);
        assert_eq!(s.amqp.delivery_limit, d.amqp.delivery_limit);
    }

    #[test]
    fn env_overrides_file_and_parses_lists() {
        let f = file("[worker]\nhandler = \"log\"\n[amqp]\nprefetch = 8\n");
        let s = load_with_env(
            Some(f.path()),
            env(&[
                ("HOOKQ__AMQP__PREFETCH", "16"),
                ("HOOKQ__RETRY__DELAYS_MS", "10, 20"),
                ("HOOKQ__AMQP__QUEUE_TYPE", "classic"),
            ]),
        )
        .unwrap();
        assert_eq!(s.amqp.prefetch, 16);
        assert_eq!(s.retry.delays_ms, vec![10, 20]);
        assert_eq!(s.amqp.queue_type, QueueType::Classic);
        let one =
            load_with_env(Some(f.path()), env(&[("HOOKQ__RETRY__DELAYS_MS", "250")])).unwrap();
        assert_eq!(one.retry.delays_ms, vec![250]);
        let bad =
            load_with_env(Some(f.path()), env(&[("HOOKQ__RETRY__DELAYS_MS", "1s")])).unwrap_err();
        assert_eq!(bad.key, "retry.delays_ms");
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let cases = [
            ("[amqp]\nprefecth = 3\n", "amqp"),
            ("[amqp]\nqueue_type = \"stream\"\n", "amqp.queue_type"),
            ("[ingress]\nlisten = \"nowhere\"\n", "ingress.listen"),
            ("[retry]\ndelays_ms = []\n", "retry.delays_ms"),
            ("[retry]\njitter = 1.5\n", "retry.jitter"),
            ("[worker]\nhandler = \"http\"\n", "worker.target"),
            ("[worker]\ntarget = \"ftp://x\"\n", "worker.target"),
            ("[bogus]\nx = 1\n", ""),
            (
                "[worker]\nhandler = \"log\"\n[sources.gh]\nverify = \"github\"\n",
                "sources.gh",
            ),
            (
                "[worker]\nhandler = \"log\"\n[sources.Bad]\nverify = \"none\"\n",
                "sources.Bad",
            ),
        ];
        for (text, key) in cases {
            let f = file(text);
            let err = load_with_env(Some(f.path()), env(&[]))
                .and_then(|s| s.validate_worker().map(|_| s))
                .unwrap_err();
            assert!(
                err.key.starts_with(key),
                "{text:?}: got key {:?} ({err})",
                err.key
            );
            if text.contains("prefecth") {
                assert!(err.to_string().contains("prefecth"), "{err}");
            }
            if text.contains("bogus") {
                assert!(err.to_string().contains("bogus"), "{err}");
            }
        }
    }

    #[test]
    fn secret_env_is_resolved_and_missing_variable_is_named() {
        let f = file(
            "[worker]\nhandler = \"log\"\n[sources.gh]\nverify = \"github\"\nsecret_env = \"HOOKQ_TEST_UNSET_SECRET_VAR\"\n",
        );
        let err = load_with_env(Some(f.path()), env(&[])).unwrap_err();
        assert_eq!(err.key, "sources.gh.secret_env");
    }

    #[test]
    fn environment_values_are_text_unless_the_key_is_a_number() {
        let f = file(
            "[worker]\nhandler = \"log\"\n[sources.x]\nverify = \"hmac-sha256\"\nsignature_header = \"x-sig\"\n",
        );
        let s = load_with_env(
            Some(f.path()),
            env(&[
                ("HOOKQ__SOURCES__X__SECRET", "00123"),
                ("HOOKQ__SOURCES__X__TOLERANCE_MS", "1500"),
                ("HOOKQ__AMQP__PREFIX", "007"),
                ("HOOKQ__INGRESS__ALLOW_UNKNOWN_SOURCES", "true"),
                ("HOOKQ__AMQP__PREFETCH", "16"),
            ]),
        )
        .unwrap();
        let x = &s.sources["x"];
        assert_eq!(x.secret.as_deref(), Some("00123"));
        assert_eq!(x.tolerance_ms, 1500);
        assert_eq!(s.amqp.prefix, "007");
        assert!(s.ingress.allow_unknown_sources);
        assert_eq!(s.amqp.prefetch, 16);
        let bad =
            load_with_env(Some(f.path()), env(&[("HOOKQ__AMQP__PREFETCH", "many")])).unwrap_err();
        assert_eq!(bad.key, "amqp.prefetch", "{bad}");
    }

    #[test]
    fn inconsistent_settings_are_refused_naming_the_keys() {
        let cases = [
            // Not ascending.
            (
                "[retry]\ndelays_ms = [5000, 1000]\n",
                "retry.delays_ms",
                "ascending",
            ),
            // A retention shorter than a message's longest stay with the broker.
            (
                "[dedup]\nretention_ms = 3600000\n",
                "dedup.retention_ms",
                "retry.max_delay_ms",
            ),
            (
                "[retry]\nmax_delay_ms = 0\n",
                "retry.max_delay_ms",
                "at least",
            ),
        ];
        for (text, key, says) in cases {
            let f = file(&format!("[worker]\nhandler = \"log\"\n{text}"));
            let err = load_with_env(Some(f.path()), env(&[])).unwrap_err();
            assert_eq!(err.key, key, "{text:?}: {err}");
            assert!(err.to_string().contains(says), "{text:?}: {err}");
        }
        // Values that would overflow a conversion (u64::MAX does not fit TOML's
        // integers, but it does fit an environment variable).
        let f = file("[worker]\nhandler = \"log\"\n");
        for var in ["HOOKQ__DEDUP__RETENTION_MS", "HOOKQ__WORKER__TIMEOUT_MS"] {
            let err =
                load_with_env(Some(f.path()), env(&[(var, "18446744073709551615")])).unwrap_err();
            let key = var
                .trim_start_matches("HOOKQ__")
                .replace("__", ".")
                .to_lowercase();
            assert_eq!(err.key, key, "{err}");
            assert!(err.to_string().contains("10 years"), "{err}");
        }
        // Repeating a tier is fine (two retries at that wait); a short retention
        // fits when the retries fit in it.
        let ok = file(
            "[worker]\nhandler = \"log\"\n[retry]\ndelays_ms = [100, 100, 400]\nmax_delay_ms = 500\n\
             [dedup]\nretention_ms = 3600000\n",
        );
        load_with_env(Some(ok.path()), env(&[])).unwrap();
    }

    #[test]
    fn longest_stay_counts_every_retry_at_its_longest_wait() {
        let r = RetrySettings {
            max_attempts: 4,
            delays_ms: vec![100, 1000],
            max_delay_ms: 500,
            ..Default::default()
        };
        // Three retries: max(100, 500) + max(1000, 500) + max(1000, 500).
        assert_eq!(r.longest_stay_ms(), 2500);
        let defaults = RetrySettings::default();
        assert_eq!(defaults.longest_stay_ms(), 4 * 86_400_000);
    }

    #[test]
    fn debug_redacts_secret() {
        let s = SourceSettings {
            secret: Some("hunter2-very-secret".into()),
            ..Default::default()
        };
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
