//! `Retry-After` from a target's response, and the retry policy it feeds.
//!
//! Input: the header value up to the first `\n` (not UTF-8: replaced lossily),
//! then structured input (`arbitrary`; zeros when it runs out).
//!
//! The header is parsed against an arbitrary clock (before the epoch too), then
//! the result goes through `Policy::after_failure` for an arbitrary attempt
//! count, under the default policy and under an arbitrary one that passes the
//! config's validation; `jittered` and `tier_expiration` get arbitrary waits,
//! tiers and floors, with `u` in [0, 1) as `rand::random` gives. Nothing may
//! panic, and the decisions keep the policy's promises.

#![no_main]

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use hookq::config::RetrySettings;
use hookq::message::DeadReason;
use hookq::retry::{Decision, DelayTier, Failure, Policy, parse_retry_after};
use hookq_fuzz::{line, system_time, unit};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Custom {
    max_attempts: u32,
    inline_attempts: u32,
    inline_delay_ms: u64,
    /// Steps between ascending tiers.
    steps_ms: Vec<u32>,
    jitter_bits: u64,
    max_delay_ms: u64,
}

#[derive(Arbitrary, Debug)]
struct Input {
    now_secs: i64,
    now_nanos: u32,
    failed: u32,
    custom: Custom,
    wait_secs: u64,
    wait_nanos: u32,
    u_bits: u64,
    floor: Option<(u64, u32)>,
    tier: usize,
}

/// Settings the config's validation accepts (`config::build`): 1 <= inline <=
/// max attempts, 1 to 16 ascending tiers of 1 ms to u32::MAX ms, jitter in
/// [0, 1), waits of at most 10 years.
fn valid(c: &Custom) -> RetrySettings {
    const MAX_MS: u64 = hookq::config::MAX_MS;
    let max_attempts = c.max_attempts.max(1);
    let inline_attempts = 1 + c.inline_attempts % max_attempts;
    let mut tier = 0u64;
    let mut delays = Vec::new();
    for step in c.steps_ms.iter().take(16) {
        tier = tier
            .saturating_add(u64::from(*step))
            .min(u64::from(u32::MAX));
        delays.push(Duration::from_millis(tier.max(1)));
    }
    if delays.is_empty() {
        delays.push(Duration::from_secs(1));
    }
    RetrySettings {
        max_attempts,
        inline_attempts_set: Some(inline_attempts),
        inline_delay: Duration::from_millis(c.inline_delay_ms % (MAX_MS + 1)),
        delays,
        jitter: unit(c.jitter_bits),
        max_delay: Duration::from_millis(1 + c.max_delay_ms % MAX_MS),
    }
}

fn check_decision(p: &Policy, failed: u32, retry_after: Option<Duration>) {
    let s = p.settings();
    let tiers = p.tiers();
    let clamped = retry_after.map(|ra| ra.min(s.max_delay));
    match p.after_failure(failed, &Failure::Retryable { retry_after }) {
        Decision::Dead(reason) => {
            assert_eq!(reason, DeadReason::MaxAttempts);
            assert!(
                failed >= s.max_attempts,
                "dead after {failed} of {}",
                s.max_attempts
            );
        }
        Decision::Inline(wait) => {
            assert!(failed < s.inline_attempts(), "inline after {failed}");
            assert!(failed < s.max_attempts);
            if let Some(ra) = clamped {
                assert!(wait >= ra, "inline {wait:?} under Retry-After {ra:?}");
            }
        }
        Decision::Delay { tier, floor } => {
            assert!(failed < s.max_attempts);
            assert!(tiers.contains(&tier), "{tier:?} is not one of {tiers:?}");
            assert_eq!(floor, clamped, "floor not clamped");
        }
    }
    assert_eq!(
        p.after_failure(failed, &Failure::Permanent),
        Decision::Dead(DeadReason::Rejected)
    );
    if let Some(ra) = clamped {
        let t = p.tier_at_least(ra);
        assert!(tiers.contains(&t), "{t:?} is not one of {tiers:?}");
        assert!(t.0 >= ra || Some(&t) == tiers.last(), "{t:?} under {ra:?}");
    }
}

fn check_waits(p: &Policy, input: &Input) {
    let jitter = p.settings().jitter;
    let d = Duration::new(input.wait_secs, input.wait_nanos % 1_000_000_000);
    let u = unit(input.u_bits);
    let floor = input
        .floor
        .map(|(s, n)| Duration::new(s, n % 1_000_000_000));
    let j = p.jittered(d, u, floor);
    if let Some(f) = floor {
        assert!(j >= f, "jittered {j:?} under the floor {f:?}");
    }
    // Within the jitter band (give float rounding a microsecond per second).
    let slack = d.as_secs_f64() * (jitter + 1e-6) + 1e-6;
    if floor.is_none_or(|f| f <= d) && j != Duration::MAX {
        assert!(
            (j.as_secs_f64() - d.as_secs_f64()).abs() <= slack,
            "jittered {j:?} too far from {d:?} (jitter {jitter})"
        );
    }
    let tiers = p.tiers();
    // A tier of the policy, and any wait at all as a tier.
    for tier in [tiers[input.tier % tiers.len()], DelayTier(d)] {
        let e = p.tier_expiration(tier, u, floor);
        assert!(e <= tier.0, "expiration {e:?} over its tier {tier:?}");
        if let Some(f) = floor {
            assert!(e >= f.min(tier.0), "expiration {e:?} under the floor {f:?}");
        }
        let band = tier.0.as_secs_f64() * (1.0 - jitter) - 1e-6 * (1.0 + tier.0.as_secs_f64());
        assert!(
            e.as_secs_f64() >= band,
            "expiration {e:?} shortened past the jitter {jitter}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let (value, rest) = line(data);
    let value = String::from_utf8_lossy(value);
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(rest)) else {
        return;
    };
    let Some(now) = system_time(input.now_secs, input.now_nanos) else {
        return;
    };
    let retry_after = parse_retry_after(&value, now);
    hookq_fuzz::trace!("{value:?} at {now:?}: {retry_after:?}; {input:?}");
    if let Ok(secs) = value.trim().parse::<u64>() {
        assert_eq!(retry_after, Some(Duration::from_secs(secs)));
    }
    let policies = [
        Policy::new(&RetrySettings::default()),
        Policy::new(&valid(&input.custom)),
    ];
    for p in &policies {
        check_decision(p, input.failed, retry_after);
        check_decision(
            p,
            input.failed % p.settings().max_attempts.saturating_add(1),
            retry_after,
        );
        check_waits(p, &input);
    }
});
