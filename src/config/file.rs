//! The configuration as written: TOML keys and `HOOKQ__SECTION__KEY`
//! environment values, deserialized as they are (`*_ms` numbers, URLs as
//! text). [`super::load`] turns this into the typed [`super::Settings`], and
//! [`super::Settings::to_toml`] writes it back (the harness gives child
//! processes a generated file this way).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{HandlerKind, QueueType, SchemeKind};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct File {
    pub amqp: Amqp,
    pub ingress: Ingress,
    pub worker: Worker,
    pub retry: Retry,
    pub dedup: Dedup,
    pub admin: Admin,
    pub sources: BTreeMap<String, Source>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Amqp {
    #[serde(deserialize_with = "text_list")]
    pub url: Vec<String>,
    pub prefix: String,
    pub queue_type: QueueType,
    pub prefetch: u16,
    pub delivery_limit: u32,
    /// Unset: 15672, or 15671 (the management plugin's TLS port) when the
    /// broker URL is `amqps://`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub management_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub management_url: Option<String>,
    pub partitions: u32,
}

impl Default for Amqp {
    /// The built-in defaults, with `management_port` unset: its default depends on
    /// other keys and is worked out when the settings are built.
    fn default() -> Self {
        let mut d = super::Settings::default().to_file().amqp;
        d.management_port = None;
        d
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Ingress {
    pub listen: String,
    pub max_body_bytes: usize,
    pub publish_timeout_ms: u64,
    pub allow_unknown_sources: bool,
    pub max_in_flight: usize,
}

impl Default for Ingress {
    fn default() -> Self {
        super::Settings::default().to_file().ingress
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Worker {
    pub concurrency: usize,
    pub handler: HandlerKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub timeout_ms: u64,
    pub metrics_listen: String,
    pub grace_ms: u64,
    pub partitions: Partitions,
}

/// `worker.partitions`: `"all"`, or a list of indexes (from the environment a
/// comma-separated string, `"0,3,5"`).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub(super) enum Partitions {
    All(String),
    List(Vec<u32>),
}

impl<'de> Deserialize<'de> for Partitions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match ListOr::<u32>::deserialize(d)? {
            ListOr::List(v) => Self::List(v),
            ListOr::One(n) => Self::List(vec![n]),
            ListOr::Text(t) if t.trim() == "all" => Self::All(t),
            ListOr::Text(t) => Self::List(
                t.split(',')
                    .map(|p| p.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| {
                        serde::de::Error::custom(format!(
                            "{t:?} is neither \"all\" nor a list of partition indexes"
                        ))
                    })?,
            ),
        })
    }
}

impl Default for Worker {
    fn default() -> Self {
        super::Settings::default().to_file().worker
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Retry {
    pub max_attempts: u32,
    /// Unset: 2, or `max_attempts` when that is less.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inline_attempts: Option<u32>,
    pub inline_delay_ms: u64,
    #[serde(deserialize_with = "ms_list")]
    pub delays_ms: Vec<u64>,
    pub jitter: f64,
    pub max_delay_ms: u64,
}

impl Default for Retry {
    /// The built-in defaults, with `inline_attempts` unset: its default depends on
    /// other keys and is worked out when the settings are built.
    fn default() -> Self {
        let mut d = super::Settings::default().to_file().retry;
        d.inline_attempts = None;
        d
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Dedup {
    pub path: PathBuf,
    pub lru_capacity: usize,
    /// Unset: 7 days, or longer when the retry settings need it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
    pub lease_ms: u64,
}

impl Default for Dedup {
    /// The built-in defaults, with `retention_ms` unset: its default depends on
    /// other keys and is worked out when the settings are built.
    fn default() -> Self {
        let mut d = super::Settings::default().to_file().dedup;
        d.retention_ms = None;
        d
    }
}

/// `[admin]`: the admin API and console, off unless a token is given.
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Admin {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    pub label: String,
}

impl Default for Admin {
    fn default() -> Self {
        super::Settings::default().to_file().admin
    }
}

/// The token never reaches logs: this Debug leaves it out.
impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_env", &self.token_env)
            .field("label", &self.label)
            .finish()
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Source {
    pub verify: SchemeKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature_header: Option<String>,
    pub tolerance_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_json_pointer: Option<String>,
}

impl Default for Source {
    fn default() -> Self {
        super::SourceSettings::default().to_file()
    }
}

/// Secrets never reach logs: this Debug leaves the secret out.
impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("verify", &self.verify)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_env", &self.secret_env)
            .finish_non_exhaustive()
    }
}

/// A list from a TOML array, or from the environment one value or a
/// comma-separated string.
#[derive(Deserialize)]
#[serde(untagged)]
enum ListOr<T> {
    List(Vec<T>),
    One(T),
    Text(String),
}

/// Milliseconds: `[100, 500]`, or `HOOKQ__RETRY__DELAYS_MS=100,500`.
fn ms_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    match ListOr::<u64>::deserialize(d)? {
        ListOr::List(v) => Ok(v),
        ListOr::One(n) => Ok(vec![n]),
        ListOr::Text(t) => t
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

/// Text: `"amqp://a"`, `["amqp://a", "amqp://b"]`, or `HOOKQ__AMQP__URL=amqp://a,amqp://b`.
fn text_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match ListOr::<String>::deserialize(d)? {
        ListOr::List(v) => v,
        ListOr::One(t) | ListOr::Text(t) => t
            .split(',')
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect(),
    })
}
