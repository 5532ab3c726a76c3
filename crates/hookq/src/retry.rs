//! The retry policy, pure: (failed deliveries so far, what went wrong) -> what to
//! do next. No I/O and no clock, so it is tested with a table. The one
//! definition of the retry schedule: the worker's in-process loop and the delay
//! tiers of the topology both read it from here.
//!
//! Of `max_attempts` deliveries, the first `inline_attempts` happen in-process
//! with a short doubling backoff; after that each retry waits in a broker delay
//! queue (the k-th broker retry uses `delays[min(k-1, last)]`). A
//! `Retry-After` from the target is a floor on the wait: a wait longer than the
//! in-process backoff moves the message to the smallest tier at least that long.

use std::time::Duration;

use crate::config::RetrySettings;
use crate::delivery;
use crate::message::DeadReason;

/// How a delivery attempt failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Worth trying again (408, 425, 429, 5xx, timeout, connection error).
    Retryable { retry_after: Option<Duration> },
    /// The target refused it for good (any other non-2xx).
    Permanent,
}

impl Failure {
    /// The SPEC's table: 408, 425, 429, 5xx, timeouts and connection errors are
    /// worth another try (a `Retry-After` is the least wait); any other status
    /// is a permanent refusal.
    pub fn of(e: &delivery::Error) -> Self {
        use delivery::Error;
        match e {
            Error::Status {
                status,
                retry_after,
            } => {
                if matches!(status, 408 | 425 | 429) || (500..=599).contains(status) {
                    Self::Retryable {
                        retry_after: *retry_after,
                    }
                } else {
                    Self::Permanent
                }
            }
            Error::Timeout(_) | Error::Connect(_) | Error::Other(_) => {
                Self::Retryable { retry_after: None }
            }
            Error::NoTarget(_) | Error::BadRequest(_) => Self::Permanent,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Retryable { .. })
    }
}

/// A delay tier, named by its wait (one of `retry.delays_ms`); the topology
/// spells its queue from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DelayTier(pub Duration);

/// What to do after a failed attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Try again in this process after the given (unjittered) wait.
    Inline(Duration),
    /// Republish to this delay tier; the message must wait at least `floor`
    /// (the target's Retry-After, clamped) there.
    Delay {
        tier: DelayTier,
        floor: Option<Duration>,
    },
    Dead(DeadReason),
}

#[derive(Clone, Debug)]
pub struct Policy {
    settings: RetrySettings,
}

impl Policy {
    /// `settings` are validated (at least one tier, ascending).
    pub fn new(settings: &RetrySettings) -> Self {
        Self {
            settings: settings.clone(),
        }
    }

    pub fn settings(&self) -> &RetrySettings {
        &self.settings
    }

    /// Every tier, ascending, without repeats: the queues the topology declares.
    pub fn tiers(&self) -> Vec<DelayTier> {
        let mut t: Vec<DelayTier> = self
            .settings
            .delays
            .iter()
            .copied()
            .map(DelayTier)
            .collect();
        t.dedup();
        t
    }

    fn tier(&self, k: usize) -> DelayTier {
        let d = &self.settings.delays;
        DelayTier(d.get(k).or(d.last()).copied().unwrap_or_default())
    }

    /// A wait the target asked for (Retry-After, or what is left of it on a
    /// message back early from its tier), clamped to `retry.max_delay_ms`: a
    /// date in the year 9999 must not park a message forever.
    pub fn clamp(&self, wait: Duration) -> Duration {
        wait.min(self.settings.max_delay)
    }

    /// The in-process wait before attempt `failed + 1`.
    fn inline_wait(&self, failed: u32) -> Duration {
        self.settings
            .inline_delay
            .saturating_mul(2u32.saturating_pow(failed.saturating_sub(1)))
    }

    /// `failed`: failed deliveries so far, this one included (>= 1).
    pub fn after_failure(&self, failed: u32, failure: &Failure) -> Decision {
        let s = &self.settings;
        let retry_after = match failure {
            Failure::Permanent => return Decision::Dead(DeadReason::Rejected),
            Failure::Retryable { retry_after } => retry_after.map(|ra| self.clamp(ra)),
        };
        if failed >= s.max_attempts {
            return Decision::Dead(DeadReason::MaxAttempts);
        }
        let inline = self.inline_wait(failed);
        if failed < s.inline_attempts() && retry_after.is_none_or(|ra| ra <= inline) {
            return Decision::Inline(inline.max(retry_after.unwrap_or_default()));
        }
        let k = failed.saturating_sub(s.inline_attempts()) as usize; // 0-based broker retry
        let mut tier = self.tier(k);
        if let Some(ra) = retry_after {
            tier = tier.max(self.tier_at_least(ra));
        }
        Decision::Delay {
            tier,
            floor: retry_after,
        }
    }

    /// The smallest tier at least `d` long, else the largest (the worker then
    /// re-delays the message until its not-before time).
    pub fn tier_at_least(&self, d: Duration) -> DelayTier {
        let delays = &self.settings.delays;
        DelayTier(
            delays
                .iter()
                .copied()
                .find(|&t| t >= d)
                .or(delays.last().copied())
                .unwrap_or_default(),
        )
    }

    /// `d` moved by up to ± jitter; `u` is uniform in [0, 1). Never below `floor`:
    /// jitter only adds to a Retry-After.
    pub fn jittered(&self, d: Duration, u: f64, floor: Option<Duration>) -> Duration {
        let factor = 1.0 + self.settings.jitter * (2.0 * u - 1.0);
        // try_from: a huge configured backoff saturates instead of panicking.
        Duration::try_from_secs_f64(d.as_secs_f64() * factor.max(0.0))
            .unwrap_or(Duration::MAX)
            .max(floor.unwrap_or_default())
    }

    /// The per-message expiry inside a delay tier: the tier's TTL shortened by up to
    /// `jitter` (a queue TTL can only be shortened per message), never below `floor`.
    pub fn tier_expiration(&self, tier: DelayTier, u: f64, floor: Option<Duration>) -> Duration {
        let d = tier.0;
        Duration::try_from_secs_f64(d.as_secs_f64() * (1.0 - self.settings.jitter * u).max(0.0))
            .unwrap_or(d)
            .max(floor.unwrap_or_default())
            .min(d)
    }
}

/// `Retry-After` as seconds or an HTTP date, relative to `now`. Not clamped:
/// [`Policy::after_failure`] applies `retry.max_delay_ms`.
pub fn parse_retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    trait Classified {
        fn classified(&self) -> Failure;
    }

    impl Classified for delivery::Error {
        fn classified(&self) -> Failure {
            Failure::of(self)
        }
    }

    #[test]
    fn classification_table() {
        let retry_after = Some(Duration::from_secs(3));
        let cases: [(u16, bool); 11] = [
            (408, true),
            (425, true),
            (429, true),
            (500, true),
            (502, true),
            (599, true),
            (400, false),
            (401, false),
            (404, false),
            (409, false),
            (422, false),
        ];
        for (status, retryable) in cases {
            let f = delivery::Error::Status {
                status,
                retry_after,
            }
            .classified();
            assert_eq!(
                matches!(f, Failure::Retryable { .. }),
                retryable,
                "{status}"
            );
        }
        assert_eq!(
            delivery::Error::Status {
                status: 429,
                retry_after
            }
            .classified(),
            Failure::Retryable { retry_after }
        );
        assert!(matches!(
            delivery::Error::Timeout(Duration::from_secs(1)).classified(),
            Failure::Retryable { retry_after: None }
        ));
        assert!(matches!(
            delivery::Error::Connect("refused".into()).classified(),
            Failure::Retryable { .. }
        ));
    }

    fn policy() -> Policy {
        policy_with(2, 6)
    }

    fn policy_with(inline_attempts: u32, max_attempts: u32) -> Policy {
        Policy::new(&RetrySettings {
            max_attempts,
            inline_attempts_set: Some(inline_attempts),
            inline_delay: Duration::from_millis(100),
            delays: [1000, 5000, 30_000].map(Duration::from_millis).to_vec(),
            jitter: 0.1,
            max_delay: Duration::from_secs(3600),
        })
    }

    fn tier(ms: u64) -> DelayTier {
        DelayTier(Duration::from_millis(ms))
    }

    fn retry(ra: Option<u64>) -> Failure {
        Failure::Retryable {
            retry_after: ra.map(Duration::from_secs),
        }
    }

    #[test]
    fn decisions_table() {
        let p = policy();
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        let cases = [
            (1, retry(None), Decision::Inline(ms(100))),
            (
                2,
                retry(None),
                Decision::Delay {
                    tier: tier(1000),
                    floor: None,
                },
            ),
            (
                3,
                retry(None),
                Decision::Delay {
                    tier: tier(5000),
                    floor: None,
                },
            ),
            (
                4,
                retry(None),
                Decision::Delay {
                    tier: tier(30_000),
                    floor: None,
                },
            ),
            (
                5,
                retry(None),
                Decision::Delay {
                    tier: tier(30_000),
                    floor: None,
                },
            ),
            (6, retry(None), Decision::Dead(DeadReason::MaxAttempts)),
            (1, Failure::Permanent, Decision::Dead(DeadReason::Rejected)),
            (6, Failure::Permanent, Decision::Dead(DeadReason::Rejected)),
            // Retry-After longer than the inline wait goes to the broker at once,
            // to the smallest tier at least that long.
            (
                1,
                retry(Some(3)),
                Decision::Delay {
                    tier: tier(5000),
                    floor: Some(s(3)),
                },
            ),
            (
                2,
                retry(Some(1)),
                Decision::Delay {
                    tier: tier(1000),
                    floor: Some(s(1)),
                },
            ),
            (
                3,
                retry(Some(1)),
                Decision::Delay {
                    tier: tier(5000),
                    floor: Some(s(1)),
                },
            ),
            // Longer than every tier: the last tier, which the floor then stretches.
            (
                2,
                retry(Some(100)),
                Decision::Delay {
                    tier: tier(30_000),
                    floor: Some(s(100)),
                },
            ),
            (1, retry(Some(0)), Decision::Inline(ms(100))),
        ];
        for (failed, failure, want) in cases {
            assert_eq!(
                p.after_failure(failed, &failure),
                want,
                "failed={failed} {failure:?}"
            );
        }
    }

    #[test]
    fn a_retry_after_beyond_max_delay_is_clamped_and_counts() {
        let p = policy();
        let far = httpdate::parse_http_date("Fri, 31 Dec 9999 23:59:59 GMT").unwrap();
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for ra in [
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now).unwrap(),
            parse_retry_after("99999999999", now).unwrap(),
            far.duration_since(now).unwrap(),
        ] {
            assert_eq!(
                p.after_failure(
                    2,
                    &Failure::Retryable {
                        retry_after: Some(ra)
                    }
                ),
                Decision::Delay {
                    tier: tier(30_000),
                    floor: Some(Duration::from_secs(3600)),
                }
            );
            // The attempt counts: the last one dead-letters as usual.
            assert_eq!(
                p.after_failure(
                    6,
                    &Failure::Retryable {
                        retry_after: Some(ra)
                    }
                ),
                Decision::Dead(DeadReason::MaxAttempts)
            );
        }
    }

    #[test]
    fn inline_waits_double() {
        let p = policy_with(4, 10);
        let waits: Vec<_> = (1..4)
            .map(|f| match p.after_failure(f, &retry(None)) {
                Decision::Inline(d) => d.as_millis(),
                d => panic!("{d:?}"),
            })
            .collect();
        assert_eq!(waits, [100, 200, 400]);
    }

    #[test]
    fn jitter_stays_in_bounds_and_respects_the_floor() {
        let p = policy();
        let d = Duration::from_millis(1000);
        assert_eq!(p.jittered(d, 0.0, None), Duration::from_millis(900));
        assert_eq!(p.jittered(d, 0.5, None), d);
        assert!(p.jittered(d, 0.999, None) <= Duration::from_millis(1100));
        assert_eq!(p.jittered(d, 0.0, Some(d)), d);
        assert_eq!(p.tier_expiration(tier(1000), 0.0, None), d);
        assert_eq!(p.tier_expiration(tier(1000), 0.999, None).as_millis(), 900);
        assert_eq!(p.tier_expiration(tier(1000), 0.999, Some(d)), d);
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
