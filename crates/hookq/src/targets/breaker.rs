//! A target's breaker as every worker of the system shares it: one small
//! register (closed, open until a probe, or waiting for a probe's answer),
//! stamped with when and by whom it last changed. Workers send theirs in each
//! heartbeat and take any newer one they hear ([`Register::merge`]), so a
//! breaker opened by one worker holds the target on every host within a
//! heartbeat, and a worker that starts learns it from the first beats it hears.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What the breaker lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Breaker {
    /// Deliveries flow, within the limits.
    Closed,
    /// Deliveries are held; one probe goes out at `probe_at` (epoch ms);
    /// `wait_ms` is the wait that led there (doubled after a failed probe).
    Open { probe_at: u64, wait_ms: u64 },
    /// One probe is out; the rest are held until its answer, or until
    /// `deadline` (epoch ms), when a probe nobody answered counts as failed.
    HalfOpen { deadline: u64, wait_ms: u64 },
}

/// The breaker, when it last changed and who changed it: the newer stamp
/// wins, the worker id breaks ties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    #[serde(flatten)]
    pub breaker: Breaker,
    /// Epoch milliseconds of the change.
    pub since: u64,
    /// The worker that made it.
    pub by: u64,
}

impl Default for Register {
    fn default() -> Self {
        Self {
            breaker: Breaker::Closed,
            since: 0,
            by: 0,
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Register {
    /// Takes `other` when it is newer; true when it did.
    pub fn merge(&mut self, other: &Register) -> bool {
        if (other.since, other.by) > (self.since, self.by) {
            *self = *other;
            true
        } else {
            false
        }
    }

    /// A change made here, now: stamped after the current one even when
    /// clocks disagree, so it is never lost to an older stamp.
    fn change(&mut self, breaker: Breaker, now: u64, me: u64) {
        *self = Register {
            breaker,
            since: now.max(self.since + 1),
            by: me,
        };
    }

    /// Opens the breaker: the first probe after `wait`.
    pub fn open(&mut self, wait: Duration, now: u64, me: u64) {
        let wait_ms = ms(wait);
        self.change(
            Breaker::Open {
                probe_at: now.saturating_add(wait_ms),
                wait_ms,
            },
            now,
            me,
        );
    }

    /// A probe went out: held until its answer or `deadline`.
    pub fn probing(&mut self, deadline: u64, now: u64, me: u64) {
        let wait_ms = match self.breaker {
            Breaker::Open { wait_ms, .. } | Breaker::HalfOpen { wait_ms, .. } => wait_ms,
            Breaker::Closed => 0,
        };
        self.change(Breaker::HalfOpen { deadline, wait_ms }, now, me);
    }

    /// A probe failed (or nobody answered it): open again, waiting twice as
    /// long, at most `max`.
    pub fn probe_failed(&mut self, first: Duration, max: Duration, now: u64, me: u64) {
        let last = match self.breaker {
            Breaker::Open { wait_ms, .. } | Breaker::HalfOpen { wait_ms, .. } => wait_ms,
            Breaker::Closed => 0,
        };
        let next = if last == 0 {
            ms(first)
        } else {
            last.saturating_mul(2)
        };
        self.open(Duration::from_millis(next.min(ms(max))), now, me);
    }

    pub fn close(&mut self, now: u64, me: u64) {
        self.change(Breaker::Closed, now, me);
    }

    pub fn is_closed(&self) -> bool {
        self.breaker == Breaker::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_newer_change_wins_whoever_hears_it_first() {
        let mut a = Register::default();
        let mut b = Register::default();
        a.open(S, 1000, 1);
        assert!(b.merge(&a));
        b.close(1000, 2); // same clock reading: still after a's change
        assert!(b.since > a.since);
        assert!(a.merge(&b));
        assert!(a.is_closed());
        assert!(!a.merge(&b), "nothing newer");
        // An old register heard late changes nothing.
        let mut old = Register::default();
        old.open(S, 500, 3);
        assert!(!a.merge(&old));
    }

    #[test]
    fn failed_probes_double_the_wait_up_to_the_most() {
        let mut r = Register::default();
        r.open(S, 0, 1);
        let mut waits = Vec::new();
        for i in 0..8 {
            r.probing(10, i * 100, 1);
            r.probe_failed(S, Duration::from_secs(10), i * 100 + 1, 1);
            if let Breaker::Open { wait_ms, .. } = r.breaker {
                waits.push(wait_ms);
            }
        }
        assert_eq!(
            waits,
            [2000, 4000, 8000, 10_000, 10_000, 10_000, 10_000, 10_000]
        );
    }
}
