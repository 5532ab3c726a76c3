//! How many deliveries one worker keeps in flight to a target, found from the
//! target's answers (the model is vector's adaptive request concurrency):
//! once per round trip, the limit grows by one while the round trip stays
//! near its usual time and the limit was reached, and shrinks by a factor on
//! a 429 or 503, a timeout, or a round trip well above the usual. After the
//! target was held (a breaker closing, a resume), it starts again from one in
//! flight and doubles each round trip (slow start) up to its share, so a
//! recovering application is not handed the whole backlog at once.

use std::time::{Duration, Instant};

/// The factor of a decrease on back pressure (429, 503, timeouts).
const BACK_PRESSURE: f64 = 0.5;
/// The factor of a decrease on a round trip well above the usual.
const SLOWER: f64 = 0.9;
/// How much of each round trip's mean goes into the usual one.
const ALPHA: f64 = 0.3;
/// A round trip is "well above the usual" past mean + this many deviations.
const DEVIATIONS: f64 = 3.0;
/// The shortest adjustment window (sub-millisecond targets answer faster than
/// the window would be worth measuring).
const MIN_WINDOW: Duration = Duration::from_millis(20);

/// One answer, as the limit sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Answer {
    /// The target answered in time (a 2xx or a status that is not back pressure).
    Took(Duration),
    /// 429, 503, a timeout: the target asks for less.
    BackPressure,
    /// A connection failure or another retryable error: no information on load.
    Failed,
}

#[derive(Debug)]
pub struct Limit {
    /// The current limit, fractional between adjustments.
    current: f64,
    /// At most this (the worker's share of `max_concurrency`).
    max: f64,
    /// Doubling each round trip until `ssthresh`.
    slow_start: bool,
    ssthresh: f64,
    /// The usual round trip (seconds) and its mean deviation, once measured.
    usual: Option<(f64, f64)>,
    window_start: Instant,
    window_sum: f64,
    window_n: u32,
    back_pressure: bool,
    reached: bool,
    /// The last decrease: one per round trip (the answers of one overload
    /// all arrive within it, and count as one).
    last_decrease: Option<Instant>,
    /// Where the target last pushed back: growth past it is tried once
    /// every [`PAST_THE_WALL_EVERY`] round trips only, so a target with a
    /// hard capacity sees few refusals, and one that grew is found again.
    wall: Option<f64>,
    /// Round trips since growth last went past the wall.
    since_past_wall: u32,
}

/// In slow start, a window whose deliveries are all still out after this
/// (or twice the usual round trip, if longer) counts as a round trip without
/// back pressure: one slow request must not keep the limit at one.
const STALLED: Duration = Duration::from_millis(100);

/// Round trips between two tries past the wall (see [`Limit::wall`]).
const PAST_THE_WALL_EVERY: u32 = 8;

impl Limit {
    /// Starts from one in flight, doubling each round trip up to `max` (slow
    /// start): a worker that starts (a deploy) does not hand a target it does
    /// not know its whole share at once; a fast target is at the share within
    /// a few milliseconds, and a slow one within a few [`STALLED`] periods
    /// (see [`Limit::tick`]).
    pub fn new(max: usize, now: Instant) -> Self {
        let max = max.max(1) as f64;
        Self {
            current: 1.0,
            max,
            slow_start: true,
            ssthresh: max,
            usual: None,
            window_start: now,
            window_sum: 0.0,
            window_n: 0,
            back_pressure: false,
            reached: false,
            last_decrease: None,
            wall: None,
            since_past_wall: 0,
        }
    }

    /// Deliveries allowed in flight now.
    pub fn get(&self) -> usize {
        (self.current.floor() as usize).max(1)
    }

    /// The worker's share changed (workers came or went).
    /// A limit that was at the old share (the target never pushed it down)
    /// moves to the new one; one found below it stays where the target put it.
    pub fn set_max(&mut self, max: usize) {
        let at_share = self.current >= self.max && !self.slow_start;
        self.max = max.max(1) as f64;
        self.current = if at_share {
            self.max
        } else {
            self.current.min(self.max)
        };
        self.ssthresh = self.ssthresh.min(self.max);
    }

    /// Back to one in flight, doubling each round trip up to the share.
    pub fn restart(&mut self, now: Instant) {
        self.ssthresh = self.max;
        self.wall = None;
        self.current = 1.0;
        self.slow_start = true;
        self.window_start = now;
        self.window_sum = 0.0;
        self.window_n = 0;
        self.back_pressure = false;
        self.reached = false;
    }

    /// Time passing with the limit in use and no answer: in slow start, a
    /// stalled window doubles the limit as an answered one would.
    pub fn tick(&mut self, in_flight: usize, now: Instant) {
        if !self.slow_start || in_flight < self.get() {
            return;
        }
        let stalled = self
            .usual
            .map(|(mean, _)| Duration::from_secs_f64(2.0 * mean))
            .unwrap_or_default()
            .max(STALLED);
        if now.duration_since(self.window_start) >= stalled {
            self.adjust(now);
            self.window_start = now;
        }
    }

    /// In flight reached the limit (before this delivery started): growth is
    /// earned only by a limit in use.
    pub fn reached(&mut self) {
        self.reached = true;
    }

    /// One answer; adjusts the limit at the end of each round-trip window,
    /// and at once on the first back pressure of a round trip.
    pub fn answer(&mut self, a: Answer, now: Instant) {
        match a {
            Answer::Took(rtt) => {
                self.window_sum += rtt.as_secs_f64();
                self.window_n += 1;
            }
            Answer::BackPressure => self.back_pressure = true,
            Answer::Failed => {}
        }
        let window = self
            .usual
            .map(|(mean, _)| Duration::from_secs_f64(mean))
            .unwrap_or_default()
            .max(MIN_WINDOW);
        if a == Answer::BackPressure
            && self
                .last_decrease
                .is_none_or(|t| now.duration_since(t) >= window)
        {
            self.wall = Some(self.current);
            self.since_past_wall = 0;
            self.decrease(BACK_PRESSURE, now);
            self.slow_start = false;
            self.ssthresh = self.current;
            self.window_start = now;
            return;
        }
        if now.duration_since(self.window_start) >= window {
            self.adjust(now);
            self.window_start = now;
        }
    }

    fn decrease(&mut self, factor: f64, now: Instant) {
        self.current = (self.current * factor).max(1.0);
        self.last_decrease = Some(now);
        self.window_sum = 0.0;
        self.window_n = 0;
        self.back_pressure = false;
        self.reached = false;
    }

    fn adjust(&mut self, now: Instant) {
        let mean = (self.window_n > 0).then(|| self.window_sum / f64::from(self.window_n));
        let slower = match (mean, self.usual) {
            (Some(m), Some((usual, dev))) => m > usual + DEVIATIONS * dev.max(usual * 0.1),
            _ => false,
        };
        if let Some(m) = mean
            && !self.back_pressure
        {
            self.usual = Some(match self.usual {
                None => (m, m / 2.0),
                Some((usual, dev)) => (
                    usual + ALPHA * (m - usual),
                    dev + ALPHA * ((m - usual).abs() - dev),
                ),
            });
        }
        if self.back_pressure {
            // Back pressure in this round trip, already answered by a
            // decrease: no growth.
        } else if slower && !self.slow_start {
            self.decrease(SLOWER, now);
            return;
        } else if self.slow_start {
            self.current *= 2.0;
            if self.current >= self.ssthresh {
                self.current = self.ssthresh;
                self.slow_start = false;
            }
        } else if self.reached {
            match self.wall {
                Some(wall) if self.current + 1.0 >= wall => {
                    self.since_past_wall += 1;
                    if self.since_past_wall >= PAST_THE_WALL_EVERY {
                        // Past the wall without back pressure: it moved.
                        self.current += 1.0;
                        self.since_past_wall = 0;
                        self.wall = Some(self.current);
                    }
                }
                _ => self.current += 1.0,
            }
        }
        self.current = self.current.min(self.max);
        self.window_sum = 0.0;
        self.window_n = 0;
        self.back_pressure = false;
        self.reached = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A round trip of answers taking `rtt`, the limit reached in each.
    fn round(l: &mut Limit, now: &mut Instant, rtt: Duration, a: Answer) {
        *now += rtt.max(MIN_WINDOW);
        l.reached();
        l.answer(a, *now);
    }

    #[test]
    fn back_pressure_halves_and_steady_answers_grow_it_by_one() {
        let mut now = Instant::now();
        let mut l = Limit::new(32, now);
        assert_eq!(l.get(), 1, "slow start");
        for _ in 0..5 {
            round(&mut l, &mut now, 20 * MS, Answer::Took(20 * MS));
        }
        assert_eq!(l.get(), 32);
        round(&mut l, &mut now, 20 * MS, Answer::BackPressure);
        assert_eq!(l.get(), 16);
        round(&mut l, &mut now, 20 * MS, Answer::BackPressure);
        assert_eq!(l.get(), 8);
        // Under the wall (16), one more a round trip.
        for _ in 0..3 {
            round(&mut l, &mut now, 20 * MS, Answer::Took(20 * MS));
        }
        assert_eq!(l.get(), 11);
    }

    #[test]
    fn converges_under_a_target_that_takes_four_at_once() {
        // The target answers 503 to whatever is over 4 in flight.
        let mut now = Instant::now();
        let mut l = Limit::new(32, now);
        let (mut sent, mut refused) = (0, 0);
        for _ in 0..200 {
            sent += l.get();
            let a = if l.get() > 4 {
                refused += l.get() - 4;
                Answer::BackPressure
            } else {
                Answer::Took(20 * MS)
            };
            round(&mut l, &mut now, 20 * MS, a);
        }
        assert!(l.get() <= 5, "limit {}", l.get());
        let share = refused as f64 / sent as f64;
        assert!(share < 0.1, "{refused} of {sent} requests refused");
    }

    #[test]
    fn rising_latency_shrinks_it() {
        let mut now = Instant::now();
        let mut l = Limit::new(32, now);
        for _ in 0..10 {
            round(&mut l, &mut now, 20 * MS, Answer::Took(20 * MS));
        }
        let before = l.get();
        assert_eq!(before, 32);
        round(&mut l, &mut now, 200 * MS, Answer::Took(200 * MS));
        assert!(l.get() < before, "{} -> {}", before, l.get());
    }

    #[test]
    fn restart_doubles_each_round_trip_from_one() {
        let mut now = Instant::now();
        let mut l = Limit::new(32, now);
        l.restart(now);
        let mut seen = vec![l.get()];
        for _ in 0..6 {
            round(&mut l, &mut now, 20 * MS, Answer::Took(20 * MS));
            seen.push(l.get());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 32]);
    }

    #[test]
    fn a_stalled_slow_start_grows_by_time() {
        let mut now = Instant::now();
        let mut l = Limit::new(8, now);
        let mut seen = vec![l.get()];
        for _ in 0..4 {
            now += STALLED;
            l.tick(l.get(), now);
            seen.push(l.get());
        }
        assert_eq!(seen, [1, 2, 4, 8, 8]);
        now += STALLED;
        l.tick(0, now);
        assert_eq!(l.get(), 8, "idle is not stalled");
    }

    #[test]
    fn a_smaller_share_caps_it() {
        let mut now = Instant::now();
        let mut l = Limit::new(32, now);
        for _ in 0..6 {
            round(&mut l, &mut now, 20 * MS, Answer::Took(20 * MS));
        }
        l.set_max(10);
        assert_eq!(l.get(), 10);
        l.set_max(20);
        assert_eq!(l.get(), 20, "a limit at the share follows it up");
        round(&mut l, &mut now, 20 * MS, Answer::BackPressure);
        l.set_max(40);
        assert_eq!(l.get(), 10, "one the target pushed down stays");
    }
}
