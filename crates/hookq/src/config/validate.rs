//! [`Settings::validate`]: the checks one key cannot make alone (ranges,
//! lists, keys that must agree), the secrets read from the environment, and
//! the defaults that depend on other keys. Every problem is an [`Error`]
//! naming its key.

use std::time::Duration;

use super::{
    AdminSettings, AmqpSettings, DedupSettings, Error, HandlerKind, IngressSettings, Lookup,
    MAX_BODY_BYTES, MAX_MS, MIN_ADMIN_TOKEN, RetrySettings, SchemeKind, Secret, Settings,
    SourceSettings, TargetRef, WorkerPartitions, WorkerSettings, standard_key, valid_source_name,
};

/// The slowest `rate_per_s` that is not 0 (no limit): one request in
/// 1,000 s. Slower spacing would be a pause, which `hookq target pause` is for.
pub const MIN_RATE_PER_S: f64 = 0.001;

/// What the command being started needs beyond what every command does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `up` and `worker` deliver: the `http` handler needs a target.
    Delivers,
    /// Everything else (the ingress, the tools) runs without one.
    Other,
}

/// Partitions beyond this are a typo (and a queue and a stream each).
const MAX_PARTITIONS: u32 = 1024;

fn at_least_1<T: PartialOrd + From<u8>>(key: &str, v: T) -> Result<(), Error> {
    if v < T::from(1) {
        return Err(Error::new(key, "must be at least 1"));
    }
    Ok(())
}

fn at_least(key: &str, d: Duration, min: Duration) -> Result<(), Error> {
    if d < min {
        return Err(Error::new(
            key,
            format!("must be at least {} ms", min.as_millis()),
        ));
    }
    Ok(())
}

fn to_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Settings {
    /// Checks every section, reads `secret_env` and `token_env` through
    /// `env`, and works out the defaults that depend on other keys
    /// (`dedup.retention_ms`). `role` adds what the command needs.
    pub fn validate(&mut self, env: &Lookup, role: Role) -> Result<(), Error> {
        amqp(&self.amqp)?;
        ingress(&self.ingress)?;
        worker(&self.worker, self.amqp.partitions)?;
        retry(&self.retry)?;
        dedup(&mut self.dedup, &self.retry)?;
        admin(&mut self.admin, env)?;
        for (name, s) in &mut self.sources {
            source(name, s, env)?;
        }
        self.targets()?;
        if role == Role::Delivers {
            self.delivery_target()?;
        }
        Ok(())
    }

    /// The `http` handler needs a target: `worker.target`, or one on every
    /// source (with unknown sources off).
    fn delivery_target(&self) -> Result<(), Error> {
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
}

impl Settings {
    /// Each `[targets.NAME]` (a name, a URL, limits that make sense) and
    /// every reference to a target by name.
    fn targets(&self) -> Result<(), Error> {
        for (name, t) in &self.targets {
            let key = |k: &str| format!("targets.{name}.{k}");
            if !valid_source_name(name) {
                return Err(Error::new(
                    format!("targets.{name}"),
                    "a target's name is 1 to 64 characters of a-z, 0-9, '_' or '-'",
                ));
            }
            if t.url.is_none() {
                return Err(Error::new(
                    key("url"),
                    "every target needs the URL of the application it delivers to",
                ));
            }
            if let Some(c) = t.max_concurrency {
                at_least_1(&key("max_concurrency"), c)?;
            }
            if !t.rate_per_s.is_finite()
                || t.rate_per_s < 0.0
                || (t.rate_per_s > 0.0 && t.rate_per_s < MIN_RATE_PER_S)
            {
                return Err(Error::new(
                    key("rate_per_s"),
                    format!(
                        "must be 0 (no limit) or at least {MIN_RATE_PER_S} requests a second (one in {} s)",
                        1.0 / MIN_RATE_PER_S
                    ),
                ));
            }
            at_least(
                &key("breaker_probe_ms"),
                t.breaker_probe,
                Duration::from_millis(1),
            )?;
            if t.breaker_probe > t.breaker_max_probe {
                return Err(Error::new(
                    key("breaker_probe_ms"),
                    format!(
                        "{} ms is longer than breaker_max_probe_ms ({} ms): the first wait cannot be the longer",
                        to_ms(t.breaker_probe),
                        to_ms(t.breaker_max_probe)
                    ),
                ));
            }
            if t.breaker_max_probe > Duration::from_millis(MAX_MS) {
                return Err(Error::new(
                    key("breaker_max_probe_ms"),
                    format!("at most {MAX_MS} ms"),
                ));
            }
        }
        let refs = self
            .sources
            .iter()
            .map(|(n, s)| (format!("sources.{n}.target"), s.target.as_ref()))
            .chain([("worker.target".to_string(), self.worker.target.as_ref())]);
        for (key, r) in refs {
            if let Some(TargetRef::Named(n)) = r
                && !self.targets.contains_key(n)
            {
                return Err(Error::new(
                    &key,
                    format!(
                        "names the target \"{n}\", which is not defined: add [targets.{n}] with its url, or give a URL (http://...)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn amqp(a: &AmqpSettings) -> Result<(), Error> {
    if a.urls.is_empty() {
        return Err(Error::new("amqp.url", "give at least one broker URL"));
    }
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
    at_least_1("amqp.prefetch", a.prefetch)?;
    at_least_1("amqp.delivery_limit", a.delivery_limit)?;
    if let Some(p) = a.management_port {
        at_least_1("amqp.management_port", p)?;
    }
    at_least_1("amqp.partitions", a.partitions)?;
    if a.partitions > MAX_PARTITIONS {
        return Err(Error::new(
            "amqp.partitions",
            format!("at most {MAX_PARTITIONS} partitions"),
        ));
    }
    Ok(())
}

/// `ingress.max_body_bytes` is at most what every supported broker takes by
/// default ([`MAX_BODY_BYTES`]): a larger body would close the publisher
/// channel, and every publish in flight on it would get a 503.
fn ingress(i: &IngressSettings) -> Result<(), Error> {
    let v = i.max_body_bytes;
    at_least_1("ingress.max_body_bytes", v)?;
    if v > MAX_BODY_BYTES {
        return Err(Error::new(
            "ingress.max_body_bytes",
            format!(
                "{v} is more than RabbitMQ takes in a message by default \
                 ({MAX_BODY_BYTES} bytes, max_message_size on RabbitMQ 4.x): at most {MAX_BODY_BYTES}"
            ),
        ));
    }
    at_least(
        "ingress.publish_timeout_ms",
        i.publish_timeout,
        Duration::from_millis(1),
    )?;
    at_least_1("ingress.max_in_flight", i.max_in_flight)
}

fn worker(w: &WorkerSettings, partitions: u32) -> Result<(), Error> {
    at_least_1("worker.concurrency", w.concurrency)?;
    at_least("worker.timeout_ms", w.timeout, Duration::from_millis(1))?;
    let key = "worker.partitions";
    if let WorkerPartitions::Only(v) = &w.partitions {
        if v.is_empty() {
            return Err(Error::new(key, "list at least one partition, or \"all\""));
        }
        let mut seen = std::collections::BTreeSet::new();
        for &i in v {
            if i >= partitions {
                return Err(Error::new(
                    key,
                    format!(
                        "partition {i} does not exist: amqp.partitions is {partitions} (0 to {})",
                        partitions.saturating_sub(1)
                    ),
                ));
            }
            if !seen.insert(i) {
                return Err(Error::new(key, format!("partition {i} is listed twice")));
            }
        }
    }
    Ok(())
}

fn retry(r: &RetrySettings) -> Result<(), Error> {
    at_least_1("retry.max_attempts", r.max_attempts)?;
    let inline = r.inline_attempts();
    if inline == 0 || inline > r.max_attempts {
        return Err(Error::new(
            "retry.inline_attempts",
            format!(
                "{inline} must be between 1 and retry.max_attempts ({})",
                r.max_attempts
            ),
        ));
    }
    if r.delays.is_empty() || r.delays.contains(&Duration::ZERO) {
        return Err(Error::new(
            "retry.delays_ms",
            "must list at least one delay, each above 0 ms",
        ));
    }
    if r.delays.iter().any(|&d| to_ms(d) > u64::from(u32::MAX)) {
        return Err(Error::new(
            "retry.delays_ms",
            "each delay must fit a queue TTL (at most 4294967295 ms)",
        ));
    }
    if r.delays.windows(2).any(|w| w[1] < w[0]) {
        let shown: Vec<u64> = r.delays.iter().copied().map(to_ms).collect();
        return Err(Error::new(
            "retry.delays_ms",
            format!(
                "{shown:?} is not ascending: the k-th broker retry waits delays_ms[min(k-1, last)], \
                 so each tier must be at least as long as the one before"
            ),
        ));
    }
    if !(0.0..1.0).contains(&r.jitter) {
        return Err(Error::new("retry.jitter", "must be in [0, 1)"));
    }
    at_least("retry.max_delay_ms", r.max_delay, Duration::from_millis(1))
}

/// `dedup.retention_ms`: as set, when it covers the longest a message can
/// stay with the broker before its last attempt (else pruning could free the
/// key of a message still in flight); unset, the default (7 days) grown to a
/// day more than that stay, at most 10 years, so that no retry setting is
/// made invalid by a default.
fn dedup(d: &mut DedupSettings, retry: &RetrySettings) -> Result<(), Error> {
    at_least_1("dedup.lru_capacity", d.lru_capacity)?;
    at_least("dedup.lease_ms", d.lease, Duration::from_millis(100))?;
    let stay = retry.longest_stay();
    let retries = retry.max_attempts.saturating_sub(1);
    let Some(set) = d.retention_set else {
        d.retention = DedupSettings::default()
            .retention
            .max(stay.saturating_add(Duration::from_secs(86_400)))
            .min(Duration::from_millis(MAX_MS));
        return Ok(());
    };
    at_least("dedup.retention_ms", set, Duration::from_millis(1))?;
    if set < stay {
        return Err(Error::new(
            "dedup.retention_ms",
            format!(
                "{} ms is shorter than the longest a message can stay with the broker before \
                 its last attempt ({} ms: {retries} retries, each waiting its tier of \
                 retry.delays_ms or a Retry-After of up to retry.max_delay_ms); pruning would \
                 free the key of a message still in flight. Raise dedup.retention_ms (or leave \
                 it unset: its default grows to fit), or lower retry.max_delay_ms, \
                 retry.delays_ms or retry.max_attempts",
                to_ms(set),
                to_ms(stay)
            ),
        ));
    }
    d.retention = set;
    Ok(())
}

/// `[admin]`: the token from `token` or the variable `token_env` names, read
/// now so that a missing or weak token stops hookq at start, not at the first
/// request.
fn admin(a: &mut AdminSettings, env: &Lookup) -> Result<(), Error> {
    let from = match (&a.token, &a.token_env) {
        (Some(_), Some(_)) => {
            return Err(Error::new(
                "admin.token",
                "set either admin.token or admin.token_env, not both",
            ));
        }
        (None, Some(var)) => {
            let t = env(var).ok_or_else(|| {
                Error::new(
                    "admin.token_env",
                    format!("environment variable {var} is not set"),
                )
            })?;
            a.token = Some(Secret::new(t));
            format!(" (read from the variable {var} names)")
        }
        _ => String::new(),
    };
    a.token_env = None;
    if let Some(t) = &a.token {
        let t = t.expose();
        let n = t.chars().count();
        if n < MIN_ADMIN_TOKEN || t.trim() != t {
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
    a.label = label.to_string();
    Ok(())
}

fn source(name: &str, s: &mut SourceSettings, env: &Lookup) -> Result<(), Error> {
    if !valid_source_name(name) {
        return Err(Error::new(
            format!("sources.{name}"),
            "source names are 1 to 64 of [a-z0-9_-]",
        ));
    }
    // Read `secret_env` now, so that a missing variable is a start-up error
    // rather than a stream of 401s.
    if let (None, Some(var)) = (&s.secret, &s.secret_env) {
        let v = env(var).ok_or_else(|| {
            Error::new(
                format!("sources.{name}.secret_env"),
                format!("environment variable {var} is not set"),
            )
        })?;
        s.secret = Some(Secret::new(v));
    }
    s.secret_env = None;
    if s.verify != SchemeKind::None && s.secret.as_ref().is_none_or(|s| s.expose().is_empty()) {
        return Err(Error::new(
            format!("sources.{name}"),
            format!(
                "verify = \"{}\" needs a secret (set secret or secret_env)",
                s.verify.as_str()
            ),
        ));
    }
    if s.verify == SchemeKind::Standard
        && let Some(secret) = &s.secret
        && let Err(problem) = standard_key(secret.expose())
    {
        return Err(Error::new(
            format!("sources.{name}"),
            format!("the Standard Webhooks secret (whsec_...) is not valid: {problem}"),
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
    at_least(
        &format!("sources.{name}.tolerance_ms"),
        s.tolerance,
        Duration::from_millis(1),
    )
}
