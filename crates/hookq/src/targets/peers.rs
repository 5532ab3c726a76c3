//! What workers tell each other on `P.control` (a fanout exchange; each
//! worker listens on a queue of its own), and each worker's share of a
//! target's limits computed from it.
//!
//! Every worker sends a [`Beat`] every [`BEAT_EVERY`], and at once when
//! something changes (a target's breaker, the start of demand for a target).
//! A worker counts as a peer while its beats keep coming ([`LIVE_FOR`]); one
//! that stops says so ([`Beat::bye`]). A target's limits are split evenly
//! between the live workers that have work for it ([`Peers::share`]), the
//! remainder of `max_concurrency` going to the lowest worker ids.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::breaker::Register;

/// How often a worker beats when nothing changes.
pub const BEAT_EVERY: Duration = Duration::from_millis(200);
/// A worker not heard for this long is gone (five beats missed).
pub const LIVE_FOR: Duration = Duration::from_secs(1);

/// One message on `P.control`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Control {
    Beat(Beat),
    /// An operator paused or resumed `target`: look at its pause queue now
    /// (every worker also looks twice a second).
    Look {
        target: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Beat {
    pub worker: u64,
    /// The worker stops: its share goes to the others now.
    #[serde(default)]
    pub bye: bool,
    pub targets: Vec<TargetBeat>,
}

/// One worker's view of one target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetBeat {
    pub name: String,
    pub register: Register,
    /// The worker has deliveries for this target (in flight, waiting, or
    /// started within the last seconds): it takes a share of the limits.
    pub demand: bool,
    pub in_flight: u32,
    /// This worker's current adaptive limit.
    pub limit: u32,
    pub paused: bool,
}

/// The live workers, as heard.
#[derive(Default)]
pub struct Peers {
    heard: HashMap<u64, (Instant, Beat)>,
}

/// A worker's part of a target's limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Share {
    pub concurrency: usize,
    pub rate_per_s: f64,
}

impl Peers {
    /// Records a beat (a bye forgets its worker).
    pub fn heard(&mut self, beat: Beat, now: Instant) {
        if beat.bye {
            self.heard.remove(&beat.worker);
        } else {
            self.heard.insert(beat.worker, (now, beat));
        }
    }

    /// Forgets workers not heard for [`LIVE_FOR`].
    pub fn expire(&mut self, now: Instant) {
        self.heard
            .retain(|_, (at, _)| now.duration_since(*at) <= LIVE_FOR);
    }

    /// The live workers' beats.
    pub fn beats(&self) -> impl Iterator<Item = &Beat> {
        self.heard.values().map(|(_, b)| b)
    }

    /// The live workers' views of `target`.
    pub fn views<'a>(&'a self, target: &'a str) -> impl Iterator<Item = (u64, &'a TargetBeat)> {
        self.heard.values().filter_map(move |(_, b)| {
            b.targets
                .iter()
                .find(|t| t.name == target)
                .map(|t| (b.worker, t))
        })
    }

    /// The lowest live worker id, `me` included: the one that sends an open
    /// breaker's probe.
    pub fn lowest(&self, me: u64) -> u64 {
        self.heard.keys().copied().chain([me]).min().unwrap_or(me)
    }

    /// `me`'s share of a target's `max_concurrency` and `rate_per_s`:
    /// even between `me` and the peers with demand for it, the remainder of
    /// the concurrency to the lowest ids; at least one in flight each.
    pub fn share(&self, target: &str, me: u64, max_concurrency: usize, rate_per_s: f64) -> Share {
        let mut ids: Vec<u64> = self
            .views(target)
            .filter(|(id, t)| t.demand && *id != me)
            .map(|(id, _)| id)
            .collect();
        ids.push(me);
        ids.sort_unstable();
        let n = ids.len();
        let rank = ids.iter().position(|id| *id == me).unwrap_or(0);
        let base = max_concurrency / n;
        let extra = usize::from(rank < max_concurrency % n);
        Share {
            concurrency: (base + extra).max(1),
            rate_per_s: rate_per_s / n as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(worker: u64, demand: bool) -> Beat {
        Beat {
            worker,
            bye: false,
            targets: vec![TargetBeat {
                name: "app".into(),
                register: Register::default(),
                demand,
                in_flight: 0,
                limit: 1,
                paused: false,
            }],
        }
    }

    #[test]
    fn limits_split_between_workers_with_demand_and_add_up() {
        let now = Instant::now();
        let mut p = Peers::default();
        p.heard(beat(1, true), now);
        p.heard(beat(2, true), now);
        p.heard(beat(3, true), now);
        p.heard(beat(4, false), now);
        let shares: Vec<Share> = [1, 2, 3]
            .iter()
            .map(|me| p.share("app", *me, 10, 30.0))
            .collect();
        assert_eq!(shares.iter().map(|s| s.concurrency).sum::<usize>(), 10);
        assert_eq!(shares[0].concurrency, 4);
        assert!((shares.iter().map(|s| s.rate_per_s).sum::<f64>() - 30.0).abs() < 1e-9);
        // A worker not heard yet counts itself in at once.
        assert_eq!(p.share("app", 5, 10, 30.0).concurrency, 2);
        // Alone, a worker has everything.
        let alone = Peers::default().share("app", 9, 10, 30.0);
        assert_eq!(
            alone,
            Share {
                concurrency: 10,
                rate_per_s: 30.0
            }
        );
    }

    #[test]
    fn gone_workers_give_their_share_back() {
        let now = Instant::now();
        let mut p = Peers::default();
        p.heard(beat(1, true), now);
        p.heard(beat(2, true), now);
        assert_eq!(p.share("app", 3, 9, 0.0).concurrency, 3);
        let mut bye = beat(1, true);
        bye.bye = true;
        p.heard(bye, now);
        assert_eq!(p.share("app", 3, 9, 0.0).concurrency, 4);
        p.expire(now + LIVE_FOR + Duration::from_millis(1));
        assert_eq!(p.share("app", 3, 9, 0.0).concurrency, 9);
    }

    #[test]
    fn the_lowest_live_id_probes() {
        let now = Instant::now();
        let mut p = Peers::default();
        assert_eq!(p.lowest(5), 5);
        p.heard(beat(3, false), now);
        assert_eq!(p.lowest(5), 3);
    }
}
