//! A worker's share of a target's `rate_per_s`, as evenly spaced start times:
//! one request every `1 / rate` seconds, no burst saved up while idle. Evenly
//! spaced starts keep any one-second window within one request of the share,
//! so workers together stay within one request each of the target's rate.
//! (A token bucket would allow a burst of its size at the start of every
//! window; `governor` and peers fix the rate at construction, and a share
//! changes whenever workers come and go.)

use std::time::{Duration, Instant};

/// The longest spacing a share can ask for (a configured rate is at least
/// one in 1,000 s; a share of it among many workers is slower still): what
/// no `Instant` arithmetic overflows on.
const LONGEST: Duration = Duration::from_secs(86_400);

#[derive(Debug)]
pub struct Pace {
    /// Seconds between two starts; `None`: no limit.
    interval: Option<Duration>,
    /// The last start taken: the next is due one interval after it, at the
    /// interval of now (a share that shrank spaces the very next start).
    last: Option<Instant>,
}

impl Pace {
    pub fn new(rate_per_s: f64) -> Self {
        let mut p = Self {
            interval: None,
            last: None,
        };
        p.set_rate(rate_per_s);
        p
    }

    /// A new share; 0 (or less) turns the pace off.
    pub fn set_rate(&mut self, rate_per_s: f64) {
        self.interval = (rate_per_s > 0.0 && rate_per_s.is_finite()).then(|| {
            Duration::try_from_secs_f64(1.0 / rate_per_s)
                .unwrap_or(LONGEST)
                .min(LONGEST)
        });
    }

    pub fn is_limited(&self) -> bool {
        self.interval.is_some()
    }

    /// The earliest start of the next request.
    fn next(&self) -> Option<Instant> {
        self.last?.checked_add(self.interval?)
    }

    /// How long a request asked for now would wait for its start.
    pub fn wait(&self, now: Instant) -> Duration {
        self.next()
            .map_or(Duration::ZERO, |next| next.saturating_duration_since(now))
    }

    /// Takes the next start time (the gate takes one only when it is due,
    /// [`Pace::wait`] zero, so no start is promised at a rate that changes).
    pub fn take(&mut self, now: Instant) -> Instant {
        if self.interval.is_none() {
            return now;
        }
        let at = self.next().map_or(now, |n| n.max(now));
        self.last = Some(at);
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_are_spaced_and_idle_time_is_not_saved_up() {
        let t0 = Instant::now();
        let mut p = Pace::new(10.0);
        let starts: Vec<Duration> = (0..5).map(|_| p.take(t0) - t0).collect();
        let ms: Vec<u128> = starts.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [0, 100, 200, 300, 400]);
        // Ten idle seconds later: no burst.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.take(later), later);
        assert_eq!(p.take(later) - later, Duration::from_millis(100));
        assert_eq!(p.wait(later), Duration::from_millis(200));
    }

    #[test]
    fn a_share_that_shrinks_spaces_the_next_start_by_the_new_rate() {
        let t0 = Instant::now();
        let mut p = Pace::new(40.0);
        p.take(t0);
        assert_eq!(p.wait(t0), Duration::from_millis(25));
        // A second worker took its part of the rate.
        p.set_rate(20.0);
        assert_eq!(p.wait(t0), Duration::from_millis(50));
    }

    #[test]
    fn a_rate_too_slow_to_space_is_a_day_apart() {
        let now = Instant::now();
        let mut p = Pace::new(1e-300);
        assert_eq!(p.take(now), now);
        assert_eq!(p.wait(now), LONGEST);
    }

    #[test]
    fn zero_is_no_limit() {
        let now = Instant::now();
        let mut p = Pace::new(0.0);
        assert!(!p.is_limited());
        assert_eq!(p.take(now), now);
        assert_eq!(p.take(now), now);
    }

    #[test]
    fn any_one_second_window_holds_at_most_one_over_the_rate() {
        let t0 = Instant::now();
        let mut p = Pace::new(50.0);
        let starts: Vec<Instant> = (0..500).map(|_| p.take(t0)).collect();
        for w in 0..90 {
            let from = t0 + Duration::from_millis(w * 100);
            let to = from + Duration::from_secs(1);
            let n = starts.iter().filter(|s| **s >= from && **s < to).count();
            assert!(n <= 51, "window {w}: {n}");
        }
    }
}
