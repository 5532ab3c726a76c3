//! The configuration as written ([`super::file`]) into typed settings, every
//! value checked and every problem an [`Error`] naming its key; and back again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::file;
use super::{
    AdminSettings, AmqpSettings, AmqpUrl, DedupSettings, Error, IngressSettings, MAX_BODY_BYTES,
    MAX_MS, MIN_ADMIN_TOKEN, RetrySettings, SchemeKind, Secret, Settings, SourceSettings,
    TargetUrl, WorkerPartitions, WorkerSettings, valid_source_name,
};

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn to_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn check_ms(key: &str, value: u64, min: u64) -> Result<Duration, Error> {
    if value < min {
        return Err(Error::new(key, format!("must be at least {min} ms")));
    }
    if value > MAX_MS {
        return Err(Error::new(
            key,
            format!("{value} ms is more than 10 years ({MAX_MS} ms)"),
        ));
    }
    Ok(ms(value))
}

fn at_least_1<T: PartialOrd + From<u8>>(key: &str, v: T) -> Result<T, Error> {
    if v < T::from(1) {
        return Err(Error::new(key, "must be at least 1"));
    }
    Ok(v)
}

fn listen(key: &str, v: &str) -> Result<SocketAddr, Error> {
    v.parse()
        .map_err(|_| Error::new(key, format!("{v:?} is not an address like 127.0.0.1:8080")))
}

/// `ingress.max_body_bytes`: at least 1, at most what every supported broker
/// takes by default ([`MAX_BODY_BYTES`]): a larger body would close the
/// publisher channel, and every publish in flight on it would get a 503.
fn body_limit(v: usize) -> Result<usize, Error> {
    let v = at_least_1("ingress.max_body_bytes", v)?;
    if v > MAX_BODY_BYTES {
        return Err(Error::new(
            "ingress.max_body_bytes",
            format!(
                "{v} is more than RabbitMQ takes in a message by default \
                 ({MAX_BODY_BYTES} bytes, max_message_size on RabbitMQ 4.x): at most {MAX_BODY_BYTES}"
            ),
        ));
    }
    Ok(v)
}

/// Partitions beyond this are a typo (and a queue and a stream each).
const MAX_PARTITIONS: u32 = 1024;

fn partitions(p: &file::Partitions, n: u32) -> Result<WorkerPartitions, Error> {
    let key = "worker.partitions";
    match p {
        file::Partitions::All(t) if t.trim() == "all" => Ok(WorkerPartitions::All),
        file::Partitions::All(t) => Err(Error::new(key, format!("{t:?} is not \"all\""))),
        file::Partitions::List(v) => {
            if v.is_empty() {
                return Err(Error::new(key, "list at least one partition, or \"all\""));
            }
            let mut seen = std::collections::BTreeSet::new();
            for &i in v {
                if i >= n {
                    return Err(Error::new(
                        key,
                        format!(
                            "partition {i} does not exist: amqp.partitions is {n} (0 to {})",
                            n - 1
                        ),
                    ));
                }
                if !seen.insert(i) {
                    return Err(Error::new(key, format!("partition {i} is listed twice")));
                }
            }
            Ok(WorkerPartitions::Only(v.clone()))
        }
    }
}

fn target(key: &str, v: Option<&str>) -> Result<Option<TargetUrl>, Error> {
    v.map(|t| TargetUrl::parse(t).map_err(|p| Error::new(key, p)))
        .transpose()
}

pub(super) fn settings(
    raw: &file::File,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, Error> {
    let a = &raw.amqp;
    if a.url.is_empty() {
        return Err(Error::new("amqp.url", "give at least one broker URL"));
    }
    let urls = a
        .url
        .iter()
        .map(|u| AmqpUrl::parse(u).map_err(|p| Error::new("amqp.url", p)))
        .collect::<Result<Vec<_>, _>>()?;
    if a.prefix.is_empty()
        || a.prefix.len() > 100
        || !a
            .prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(Error::new(
            "amqp.prefix",
            "must be 1 to 100 characters of letters, digits, '.', '_' or '-'",
        ));
    }
    let amqp = AmqpSettings {
        urls,
        prefix: a.prefix.clone(),
        queue_type: a.queue_type,
        prefetch: at_least_1("amqp.prefetch", a.prefetch)?,
        delivery_limit: at_least_1("amqp.delivery_limit", a.delivery_limit)?,
        management_port: a
            .management_port
            .map(|p| at_least_1("amqp.management_port", p))
            .transpose()?,
        management_url: target("amqp.management_url", a.management_url.as_deref())?,
        partitions: at_least_1("amqp.partitions", a.partitions)?,
    };
    if amqp.partitions > MAX_PARTITIONS {
        return Err(Error::new(
            "amqp.partitions",
            format!("at most {MAX_PARTITIONS} partitions"),
        ));
    }

    let i = &raw.ingress;
    let ingress = IngressSettings {
        listen: listen("ingress.listen", &i.listen)?,
        max_body_bytes: body_limit(i.max_body_bytes)?,
        publish_timeout: check_ms("ingress.publish_timeout_ms", i.publish_timeout_ms, 1)?,
        allow_unknown_sources: i.allow_unknown_sources,
        max_in_flight: at_least_1("ingress.max_in_flight", i.max_in_flight)?,
    };

    let w = &raw.worker;
    let worker = WorkerSettings {
        concurrency: at_least_1("worker.concurrency", w.concurrency)?,
        handler: w.handler,
        target: target("worker.target", w.target.as_deref())?,
        timeout: check_ms("worker.timeout_ms", w.timeout_ms, 1)?,
        metrics_listen: listen("worker.metrics_listen", &w.metrics_listen)?,
        grace: check_ms("worker.grace_ms", w.grace_ms, 0)?,
        partitions: partitions(&w.partitions, amqp.partitions)?,
    };

    let r = &raw.retry;
    at_least_1("retry.max_attempts", r.max_attempts)?;
    // A default never makes another key invalid: unset, the in-process
    // attempts are the default's, or all of them when there are fewer.
    let default = RetrySettings::default();
    let inline_attempts = r
        .inline_attempts
        .unwrap_or(default.inline_attempts.min(r.max_attempts));
    if inline_attempts == 0 || inline_attempts > r.max_attempts {
        return Err(Error::new(
            "retry.inline_attempts",
            format!(
                "{inline_attempts} must be between 1 and retry.max_attempts ({})",
                r.max_attempts
            ),
        ));
    }
    if r.delays_ms.is_empty() || r.delays_ms.contains(&0) {
        return Err(Error::new(
            "retry.delays_ms",
            "must list at least one delay, each above 0 ms",
        ));
    }
    if r.delays_ms.iter().any(|&d| d > u64::from(u32::MAX)) {
        return Err(Error::new(
            "retry.delays_ms",
            "each delay must fit a queue TTL (at most 4294967295 ms)",
        ));
    }
    if r.delays_ms.windows(2).any(|w| w[1] < w[0]) {
        return Err(Error::new(
            "retry.delays_ms",
            format!(
                "{:?} is not ascending: the k-th broker retry waits delays_ms[min(k-1, last)], \
                 so each tier must be at least as long as the one before",
                r.delays_ms
            ),
        ));
    }
    if !(0.0..1.0).contains(&r.jitter) {
        return Err(Error::new("retry.jitter", "must be in [0, 1)"));
    }
    let retry = RetrySettings {
        max_attempts: r.max_attempts,
        inline_attempts,
        inline_delay: check_ms("retry.inline_delay_ms", r.inline_delay_ms, 0)?,
        delays: r.delays_ms.iter().copied().map(ms).collect(),
        jitter: r.jitter,
        max_delay: check_ms("retry.max_delay_ms", r.max_delay_ms, 1)?,
    };

    let d = &raw.dedup;
    let dedup = DedupSettings {
        path: d.path.clone(),
        lru_capacity: at_least_1("dedup.lru_capacity", d.lru_capacity)?,
        retention: retention(d.retention_ms, &retry)?,
        lease: check_ms("dedup.lease_ms", d.lease_ms, 100)?,
    };

    let admin = admin(&raw.admin, env)?;

    let mut sources = BTreeMap::new();
    for (name, s) in &raw.sources {
        sources.insert(name.clone(), source(name, s, env)?);
    }
    Ok(Settings {
        amqp,
        ingress,
        worker,
        retry,
        dedup,
        admin,
        sources,
    })
}

/// `dedup.retention_ms`: as set, when it covers the longest a message can
/// stay with the broker before its last attempt (else pruning could free the
/// key of a message still in flight); unset, the default (7 days) grown to a
/// day more than that stay, so that no retry setting is made invalid by a
/// default.
fn retention(set: Option<u64>, retry: &RetrySettings) -> Result<Duration, Error> {
    let stay = retry.longest_stay();
    let retries = retry.max_attempts.saturating_sub(1);
    let Some(v) = set else {
        // At most 10 years, like every duration: a stay longer than that
        // (ten-year Retry-Afters, say) outlives any deployment anyway.
        let grown = DedupSettings::default()
            .retention
            .max(stay.saturating_add(Duration::from_secs(86_400)))
            .min(ms(MAX_MS));
        return Ok(grown);
    };
    let retention = check_ms("dedup.retention_ms", v, 1)?;
    if retention < stay {
        return Err(Error::new(
            "dedup.retention_ms",
            format!(
                "{v} ms is shorter than the longest a message can stay with the broker before \
                 its last attempt ({} ms: {retries} retries, each waiting its tier of \
                 retry.delays_ms or a Retry-After of up to retry.max_delay_ms); pruning would \
                 free the key of a message still in flight. Raise dedup.retention_ms (or leave \
                 it unset: its default grows to fit), or lower retry.max_delay_ms, \
                 retry.delays_ms or retry.max_attempts",
                to_ms(stay)
            ),
        ));
    }
    Ok(retention)
}

/// `[admin]`: the token from `token` or the variable `token_env` names, read
/// now so that a missing or weak token stops hookq at start, not at the first
/// request.
fn admin(a: &file::Admin, env: &dyn Fn(&str) -> Option<String>) -> Result<AdminSettings, Error> {
    let token = match (&a.token, &a.token_env) {
        (Some(_), Some(_)) => {
            return Err(Error::new(
                "admin.token",
                "set either admin.token or admin.token_env, not both",
            ));
        }
        (Some(t), None) => Some((t.clone(), "admin.token")),
        (None, Some(var)) => Some((
            env(var).ok_or_else(|| {
                Error::new(
                    "admin.token_env",
                    format!("environment variable {var} is not set"),
                )
            })?,
            "admin.token_env",
        )),
        (None, None) => None,
    };
    if let Some((t, from)) = &token {
        let n = t.chars().count();
        if n < MIN_ADMIN_TOKEN || t.trim() != t {
            let from = if *from == "admin.token" {
                String::new()
            } else {
                format!(" (read from the variable {from} names)")
            };
            return Err(Error::new(
                "admin.token",
                format!(
                    "the admin token{from} must be at least {MIN_ADMIN_TOKEN} characters without \
                     surrounding spaces (got {n}); generate one with `openssl rand -hex 32`"
                ),
            ));
        }
    }
    let label = a.label.trim();
    if label.is_empty() || label.len() > 64 || label.chars().any(char::is_control) {
        return Err(Error::new(
            "admin.label",
            "must be 1 to 64 characters, no control characters",
        ));
    }
    Ok(AdminSettings {
        token: token.map(|(t, _)| Secret::new(t)),
        label: label.to_string(),
    })
}

fn source(
    name: &str,
    s: &file::Source,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<SourceSettings, Error> {
    if !valid_source_name(name) {
        return Err(Error::new(
            format!("sources.{name}"),
            "source names are 1 to 64 of [a-z0-9_-]",
        ));
    }
    // Read `secret_env` now, so that a missing variable is a start-up error
    // rather than a stream of 401s.
    let secret = match (&s.secret, &s.secret_env) {
        (Some(v), _) => Some(Secret::new(v.clone())),
        (None, Some(var)) => Some(Secret::new(env(var).ok_or_else(|| {
            Error::new(
                format!("sources.{name}.secret_env"),
                format!("environment variable {var} is not set"),
            )
        })?)),
        (None, None) => None,
    };
    if s.verify != SchemeKind::None && secret.as_ref().is_none_or(|s| s.expose().is_empty()) {
        return Err(Error::new(
            format!("sources.{name}"),
            format!(
                "verify = \"{}\" needs a secret (set secret or secret_env)",
                s.verify.as_str()
            ),
        ));
    }
    if s.verify == SchemeKind::HmacSha256 && s.signature_header.is_none() {
        return Err(Error::new(
            format!("sources.{name}.signature_header"),
            "verify = \"hmac-sha256\" needs signature_header",
        ));
    }
    for (key, h) in [
        ("signature_header", &s.signature_header),
        ("id_header", &s.id_header),
    ] {
        if let Some(h) = h
            && http::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            return Err(Error::new(
                format!("sources.{name}.{key}"),
                "not a valid HTTP header name",
            ));
        }
    }
    if let Some(p) = &s.id_json_pointer
        && !(p.is_empty() || p.starts_with('/'))
    {
        return Err(Error::new(
            format!("sources.{name}.id_json_pointer"),
            "a JSON pointer is empty or starts with '/' (RFC 6901)",
        ));
    }
    Ok(SourceSettings {
        verify: s.verify,
        secret,
        signature_header: s.signature_header.clone(),
        tolerance: check_ms(&format!("sources.{name}.tolerance_ms"), s.tolerance_ms, 1)?,
        target: target(&format!("sources.{name}.target"), s.target.as_deref())?,
        id_header: s.id_header.clone(),
        id_json_pointer: s.id_json_pointer.clone(),
    })
}

impl Settings {
    /// The settings as written in a file; the file's defaults are these of
    /// `Settings::default()`, so the defaults are written once.
    pub(super) fn to_file(&self) -> file::File {
        file::File {
            amqp: file::Amqp {
                url: self
                    .amqp
                    .urls
                    .iter()
                    .map(|u| u.expose().to_string())
                    .collect(),
                prefix: self.amqp.prefix.clone(),
                queue_type: self.amqp.queue_type,
                prefetch: self.amqp.prefetch,
                delivery_limit: self.amqp.delivery_limit,
                management_port: self.amqp.management_port,
                management_url: self
                    .amqp
                    .management_url
                    .as_ref()
                    .map(|u| u.url().to_string()),
                partitions: self.amqp.partitions,
            },
            ingress: file::Ingress {
                listen: self.ingress.listen.to_string(),
                max_body_bytes: self.ingress.max_body_bytes,
                publish_timeout_ms: to_ms(self.ingress.publish_timeout),
                allow_unknown_sources: self.ingress.allow_unknown_sources,
                max_in_flight: self.ingress.max_in_flight,
            },
            worker: file::Worker {
                concurrency: self.worker.concurrency,
                handler: self.worker.handler,
                target: self.worker.target.as_ref().map(|t| t.url().to_string()),
                timeout_ms: to_ms(self.worker.timeout),
                metrics_listen: self.worker.metrics_listen.to_string(),
                grace_ms: to_ms(self.worker.grace),
                partitions: match &self.worker.partitions {
                    WorkerPartitions::All => file::Partitions::All("all".into()),
                    WorkerPartitions::Only(v) => file::Partitions::List(v.clone()),
                },
            },
            retry: file::Retry {
                max_attempts: self.retry.max_attempts,
                inline_attempts: Some(self.retry.inline_attempts),
                inline_delay_ms: to_ms(self.retry.inline_delay),
                delays_ms: self.retry.delays.iter().copied().map(to_ms).collect(),
                jitter: self.retry.jitter,
                max_delay_ms: to_ms(self.retry.max_delay),
            },
            dedup: file::Dedup {
                path: self.dedup.path.clone(),
                lru_capacity: self.dedup.lru_capacity,
                retention_ms: Some(to_ms(self.dedup.retention)),
                lease_ms: to_ms(self.dedup.lease),
            },
            admin: file::Admin {
                token: self.admin.token.as_ref().map(|t| t.expose().to_string()),
                token_env: None,
                label: self.admin.label.clone(),
            },
            sources: self
                .sources
                .iter()
                .map(|(n, s)| (n.clone(), s.to_file()))
                .collect(),
        }
    }
}

impl SourceSettings {
    pub(super) fn to_file(&self) -> file::Source {
        file::Source {
            verify: self.verify,
            secret: self.secret.as_ref().map(|x| x.expose().to_string()),
            secret_env: None,
            signature_header: self.signature_header.clone(),
            tolerance_ms: to_ms(self.tolerance),
            target: self.target.as_ref().map(|t| t.url().to_string()),
            id_header: self.id_header.clone(),
            id_json_pointer: self.id_json_pointer.clone(),
        }
    }
}
