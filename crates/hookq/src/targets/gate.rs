//! One target as one worker guards it: every delivery attempt asks the gate
//! first ([`Gate::admit`]) and reports the target's answer when it ends
//! ([`Permit::finish`]). The gate holds deliveries while the target is paused
//! or its breaker is open, keeps this worker within its share of the
//! target's limits (adaptive concurrency, paced starts), and opens the
//! breaker after `breaker_failures` retryable failures in a row or on a
//! Retry-After. What it changes, it tells the other workers through the next
//! beat ([`super::Fleet::beat_now`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Fleet;
use super::adaptive::{Answer, Limit};
use super::breaker::{Breaker, Register};
use super::pace::Pace;
use super::peers::{Share, TargetBeat};
use crate::config::{Target, TargetUrl};
use crate::delivery;
use crate::events::{Events, TargetRequests, TargetState};
use crate::message::epoch_ms;
use crate::retry::Failure;

/// A worker that had a delivery for a target this recently still counts as
/// having demand for it (and keeps its share).
const DEMAND_FOR: Duration = Duration::from_secs(2);

/// Why a message is held instead of delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldWhy {
    /// An operator paused the target.
    Paused,
    /// The target's breaker is open (or a probe is out).
    Open,
    /// No room within the limits in time, and other targets need the slot.
    Busy,
}

impl HoldWhy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Paused => "the target is paused",
            Self::Open => "the target's breaker is open",
            Self::Busy => "the target is at its limit",
        }
    }
}

/// What [`Gate::admit`] decided.
pub enum Admission {
    /// Deliver now; report the answer on the permit.
    Go(Permit),
    /// Do not deliver: hold the message on the broker (no attempt spent).
    Hold(HoldWhy),
    /// The worker stops.
    Stopping,
}

/// A delivery's answer, as the gate sees it.
#[derive(Clone, Copy, Debug)]
pub enum Observed {
    /// A 2xx.
    Success,
    /// A permanent answer (a 4xx other than back pressure): the target is up.
    Rejected,
    /// 429, 503 or a timeout; with the target's Retry-After, if any.
    BackPressure(Option<Duration>),
    /// Another retryable failure (5xx, refused or reset connection).
    Failed,
    /// Not the target's doing (a message no request can carry).
    Nothing,
}

impl Observed {
    /// What one attempt's result says about the target: the retry policy's
    /// classification, with back pressure (429, 503, timeouts) told apart.
    pub fn of(r: &Result<u16, delivery::Error>) -> Self {
        use delivery::Error as E;
        let e = match r {
            Ok(_) => return Self::Success,
            Err(E::NoTarget(_) | E::BadRequest(_)) => return Self::Nothing,
            Err(e) => e,
        };
        match Failure::of(e) {
            Failure::Permanent => Self::Rejected,
            Failure::Retryable { retry_after } => match e {
                E::Status {
                    status: 429 | 503, ..
                }
                | E::Timeout(_) => Self::BackPressure(retry_after),
                _ => Self::Failed,
            },
        }
    }
}

/// The guard of one target in one worker.
pub struct Gate {
    pub target: Target,
    fleet: Arc<Fleet>,
    state: Mutex<State>,
    /// A delivery ended, or the state changed: waiters look again.
    freed: Notify,
    events: Events,
    requests: TargetRequests,
    /// The longest a Retry-After pauses the target (`retry.max_delay_ms`,
    /// the clamp the message's own wait gets): a date in the year 9999
    /// must not stop a target for good.
    longest_wait: Duration,
}

struct State {
    register: Register,
    paused: bool,
    in_flight: usize,
    waiting: usize,
    limit: Limit,
    pace: Pace,
    share: Share,
    /// Retryable failures in a row, this worker's.
    failures: u32,
    last_demand: Option<Instant>,
    /// Messages in the hold queue, as last counted.
    held: u32,
}

impl State {
    fn demand(&self, now: Instant) -> bool {
        self.in_flight > 0
            || self.waiting > 0
            || self
                .last_demand
                .is_some_and(|t| now.duration_since(t) < DEMAND_FOR)
    }

    fn shown(&self) -> TargetState {
        if self.paused {
            return TargetState::Paused;
        }
        match self.register.breaker {
            Breaker::Closed => TargetState::Closed,
            Breaker::Open { .. } => TargetState::Open,
            Breaker::HalfOpen { .. } => TargetState::HalfOpen,
        }
    }
}

/// What one look at a gate found.
enum Look {
    Decided(Admission),
    /// Room, and the pace's next start is due: start now.
    Start(Permit),
    /// No room yet: wait for a delivery to end, or until the pace's next
    /// start (when that is what there is no room in).
    Wait(Option<Instant>),
}

/// Takes one waiter's place while it waits.
struct Waiting<'a>(&'a Gate);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

impl Gate {
    pub(super) fn new(
        target: Target,
        fleet: Arc<Fleet>,
        events: Events,
        longest_wait: Duration,
    ) -> Self {
        let now = Instant::now();
        let share = Share {
            concurrency: target.max_concurrency,
            rate_per_s: target.rate_per_s,
        };
        let requests = events.target_requests(&target.name);
        events.target_state(&target.name, TargetState::Closed, None, "started");
        Self {
            state: Mutex::new(State {
                register: Register::default(),
                paused: false,
                in_flight: 0,
                waiting: 0,
                limit: Limit::new(share.concurrency, now),
                pace: Pace::new(share.rate_per_s),
                share,
                failures: 0,
                last_demand: None,
                held: 0,
            }),
            target,
            fleet,
            freed: Notify::new(),
            events,
            requests,
            longest_wait,
        }
    }

    pub fn name(&self) -> &str {
        &self.target.name
    }

    /// Its queues' part of the name on the broker.
    pub fn queue_id(&self) -> &str {
        &self.target.queue_id
    }

    pub fn url(&self) -> &TargetUrl {
        &self.target.url
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves counters, never a broken
        // invariant worth stopping deliveries for.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a delivery may start now. `probe`: the message was released
    /// as an open breaker's probe. `patience`: how long to wait for room
    /// within the limits before holding the message (`None`: wait, the
    /// worker has no other target the slot could serve).
    pub async fn admit(
        self: &Arc<Self>,
        probe: bool,
        patience: Option<Duration>,
        stop: &CancellationToken,
    ) -> Admission {
        let deadline = patience.map(|p| Instant::now() + p);
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a wake-up between the look and
            // the wait is not lost.
            freed.as_mut().enable();
            let paced = match self.look(probe, deadline) {
                Look::Decided(a) => return a,
                Look::Start(permit) => return Admission::Go(permit),
                Look::Wait(paced) => paced,
            };
            let _waiting = Waiting(self);
            let far = Instant::now() + Duration::from_secs(3600);
            let until = tokio::time::Instant::from_std(deadline.unwrap_or(far));
            tokio::select! {
                _ = &mut freed => {}
                // The fleet becomes ready, or room comes without a wake-up.
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = tokio::time::sleep_until(until) => {}
                // The pace's next start (every waiter looks; one takes it).
                _ = tokio::time::sleep_until(paced.unwrap_or(far).into()) => {}
                _ = stop.cancelled() => return Admission::Stopping,
            }
        }
    }

    /// One look at the state for [`Gate::admit`]; a `Wait` counts itself
    /// among the waiters (the caller's [`Waiting`] takes it off).
    fn look(self: &Arc<Self>, probe: bool, deadline: Option<Instant>) -> Look {
        let mut s = self.lock();
        if s.paused {
            return Look::Decided(Admission::Hold(HoldWhy::Paused));
        }
        match s.register.breaker {
            Breaker::Closed => {}
            // The probe. The worker that released it marked the breaker
            // half open first; a worker that has not heard that yet still
            // sees the probe due.
            Breaker::HalfOpen { .. } if probe => {
                s.in_flight += 1;
                return Look::Decided(Admission::Go(self.permit(true)));
            }
            Breaker::Open { probe_at, .. } if probe && epoch_ms() >= probe_at => {
                s.in_flight += 1;
                return Look::Decided(Admission::Go(self.permit(true)));
            }
            _ => return Look::Decided(Admission::Hold(HoldWhy::Open)),
        }
        let now = Instant::now();
        if !s.demand(now) {
            // Demand starts: take a share now and tell the others.
            s.last_demand = Some(now);
            let share = self.fleet.share(&self.target);
            Self::apply_share(&mut s, share);
            self.fleet.beat_now.notify_one();
        }
        s.last_demand = Some(now);
        let in_flight = s.in_flight;
        s.limit.tick(in_flight, now);
        let mut paced = None;
        if self.fleet.is_ready() && s.in_flight < s.limit.get() {
            let wait = s.pace.wait(now);
            if deadline.is_some_and(|d| now + wait > d) {
                return Look::Decided(Admission::Hold(HoldWhy::Busy));
            }
            if wait.is_zero() {
                if s.in_flight + 1 >= s.limit.get() {
                    s.limit.reached();
                }
                s.pace.take(now);
                s.in_flight += 1;
                return Look::Start(self.permit(false));
            }
            // Not a start reserved ahead: a share that shrinks meanwhile (a
            // worker joined) spaces the very next start by the new rate.
            paced = Some(now + wait);
        }
        if deadline.is_some_and(|d| now >= d) {
            return Look::Decided(Admission::Hold(HoldWhy::Busy));
        }
        s.waiting += 1;
        Look::Wait(paced)
    }

    fn permit(self: &Arc<Self>, probe: bool) -> Permit {
        Permit {
            gate: self.clone(),
            probe,
            started: Instant::now(),
            finished: false,
        }
    }

    fn apply_share(s: &mut State, share: Share) {
        if s.share != share {
            s.share = share;
            s.limit.set_max(share.concurrency);
            s.pace.set_rate(share.rate_per_s);
        }
    }

    /// This worker's share changed (workers came or went).
    pub(super) fn set_share(&self, share: Share) {
        let mut s = self.lock();
        if s.share != share {
            Self::apply_share(&mut s, share);
            drop(s);
            self.freed.notify_waiters();
        }
    }

    /// This worker's view, for its beat.
    pub(super) fn beat(&self) -> TargetBeat {
        let s = self.lock();
        TargetBeat {
            name: self.target.name.clone(),
            register: s.register,
            demand: s.demand(Instant::now()),
            in_flight: u32::try_from(s.in_flight).unwrap_or(u32::MAX),
            limit: u32::try_from(s.limit.get()).unwrap_or(u32::MAX),
            paused: s.paused,
        }
    }

    pub fn register(&self) -> Register {
        self.lock().register
    }

    pub fn state(&self) -> TargetState {
        self.lock().shown()
    }

    /// Another worker's register: taken when newer.
    pub(super) fn merge(&self, other: &Register) {
        let mut s = self.lock();
        let before = s.shown();
        if s.register.merge(other) {
            if other.breaker == Breaker::Closed && before != TargetState::Closed {
                s.limit.restart(Instant::now());
                s.failures = 0;
            }
            let after = s.shown();
            drop(s);
            if after != before {
                self.events
                    .target_state(&self.target.name, after, Some(other.by), describe(other));
            }
            self.freed.notify_waiters();
        }
    }

    /// An operator's pause or resume, as the pause queue says.
    pub(super) fn set_paused(&self, paused: bool) {
        let mut s = self.lock();
        if s.paused == paused {
            return;
        }
        s.paused = paused;
        if !paused {
            s.limit.restart(Instant::now());
        }
        let shown = s.shown();
        drop(s);
        let why = if paused {
            "paused by an operator: deliveries are held on the broker"
        } else {
            "resumed by an operator: deliveries ramp up from one in flight"
        };
        self.events
            .target_state(&self.target.name, shown, None, why);
        self.freed.notify_waiters();
    }

    /// Messages in the hold queue, as counted now.
    pub(super) fn set_held(&self, held: u32) {
        let mut s = self.lock();
        s.held = held;
        let (in_flight, limit) = (s.in_flight, s.limit.get());
        drop(s);
        self.events
            .target_sample(&self.target.name, in_flight, limit, held);
    }

    /// A snapshot for listings.
    pub fn sample(&self) -> (TargetState, usize, usize, u32) {
        let s = self.lock();
        (s.shown(), s.in_flight, s.limit.get(), s.held)
    }

    /// How many held messages this worker may release back to the work
    /// queue now: none unless the target is closed and not paused; then up
    /// to twice its limit, less what it has in flight or waiting.
    pub(super) fn release_budget(&self) -> usize {
        let s = self.lock();
        if s.paused || !s.register.is_closed() {
            return 0;
        }
        let mut budget = (2 * s.limit.get()).saturating_sub(s.in_flight + s.waiting);
        if s.pace.is_limited() {
            // About what the pace lets start before the next release.
            let per_tick = (s.share.rate_per_s * super::TICK.as_secs_f64() * 2.0).ceil();
            budget = budget.min(per_tick as usize);
        }
        budget
    }

    /// Whether the breaker's probe is due (open, its wait over).
    pub(super) fn probe_due(&self, now_ms: u64) -> bool {
        let s = self.lock();
        !s.paused
            && matches!(s.register.breaker, Breaker::Open { probe_at, .. } if now_ms >= probe_at)
    }

    /// No probe could be released (nothing held): open again, with the
    /// same wait, so the next tick tries again.
    pub(super) fn probe_not_sent(&self) {
        let mut s = self.lock();
        if let Breaker::HalfOpen { wait_ms, .. } = s.register.breaker {
            let now = epoch_ms();
            s.register.open(Duration::ZERO, now, self.fleet.me);
            if let Breaker::Open { wait_ms: w, .. } = &mut s.register.breaker {
                *w = wait_ms;
            }
        }
    }

    /// A probe is about to be released: held until its answer or `deadline`.
    pub(super) fn probing(&self, deadline: Duration) {
        let now = epoch_ms();
        let mut s = self.lock();
        let deadline = now.saturating_add(u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX));
        s.register.probing(deadline, now, self.fleet.me);
        let shown = s.shown();
        drop(s);
        self.events.target_state(
            &self.target.name,
            shown,
            None,
            "one held message goes out as the breaker's probe",
        );
        self.fleet.beat_now.notify_one();
    }

    /// A probe nobody answered in time counts as failed.
    pub(super) fn probe_overdue(&self, now_ms: u64) -> bool {
        let mut s = self.lock();
        if let Breaker::HalfOpen { deadline, .. } = s.register.breaker
            && now_ms >= deadline
        {
            let t = &self.target;
            s.register
                .probe_failed(t.breaker_probe, t.breaker_max_probe, now_ms, self.fleet.me);
            let shown = s.shown();
            drop(s);
            self.events
                .target_state(&t.name, shown, None, "the probe got no answer in time");
            self.fleet.beat_now.notify_one();
            return true;
        }
        false
    }

    /// Whether `breaker_failures` opens the breaker (0 turns it off: only a
    /// Retry-After then holds the target, and a failed probe spends its
    /// attempt like any delivery).
    pub fn breaker_on(&self) -> bool {
        self.target.breaker_failures > 0
    }

    /// The end of a delivery: its answer adjusts the limit and the breaker.
    fn finished(&self, probe: bool, took: Duration, seen: Observed) {
        let now = Instant::now();
        let t = &self.target;
        let mut s = self.lock();
        s.in_flight -= 1;
        let before = s.shown();
        let mut why = "";
        match seen {
            Observed::Success | Observed::Rejected => {
                s.failures = 0;
                s.limit.answer(Answer::Took(took), now);
                if !s.register.is_closed()
                    && (probe || matches!(s.register.breaker, Breaker::HalfOpen { .. }))
                {
                    s.register.close(epoch_ms(), self.fleet.me);
                    s.limit.restart(now);
                    why = "the probe was answered: deliveries ramp up from one in flight";
                }
            }
            Observed::BackPressure(_) | Observed::Failed => {
                s.failures += 1;
                let a = match seen {
                    Observed::BackPressure(_) => Answer::BackPressure,
                    _ => Answer::Failed,
                };
                s.limit.answer(a, now);
                let retry_after = match seen {
                    Observed::BackPressure(ra) => ra.map(|ra| ra.min(self.longest_wait)),
                    _ => None,
                }
                .filter(|ra| !ra.is_zero());
                let now_ms = epoch_ms();
                if probe && !s.register.is_closed() {
                    if self.breaker_on() {
                        s.register.probe_failed(
                            t.breaker_probe,
                            t.breaker_max_probe,
                            now_ms,
                            self.fleet.me,
                        );
                        why = "the probe failed";
                    }
                    // A longer wait the target asked for wins; with the
                    // breaker off, only that wait holds the target.
                    match retry_after {
                        Some(ra) if !self.breaker_on() || ra_later(&s.register, ra, now_ms) => {
                            s.register.open(ra, now_ms, self.fleet.me);
                            why = "the target asked to wait (Retry-After)";
                        }
                        None if !self.breaker_on() => {
                            s.register.close(now_ms, self.fleet.me);
                            s.limit.restart(now);
                            why = "the wait the target asked for is over";
                        }
                        _ => {}
                    }
                } else if let Some(ra) = retry_after {
                    if !probe && ra_later(&s.register, ra, now_ms) {
                        s.register.open(ra, now_ms, self.fleet.me);
                        why = "the target asked to wait (Retry-After)";
                    }
                } else if t.breaker_failures > 0
                    && s.failures >= t.breaker_failures
                    && s.register.is_closed()
                {
                    s.register.open(t.breaker_probe, now_ms, self.fleet.me);
                    why = "too many retryable failures in a row";
                }
            }
            Observed::Nothing => {}
        }
        let after = s.shown();
        drop(s);
        match seen {
            Observed::Success => self.requests.success.inc(),
            Observed::Rejected => self.requests.rejected.inc(),
            Observed::BackPressure(_) => self.requests.back_pressure.inc(),
            Observed::Failed => self.requests.failed.inc(),
            Observed::Nothing => 0,
        };
        if !why.is_empty() {
            if after != before || after == TargetState::Open {
                self.events.target_state(&t.name, after, None, why);
            }
            self.fleet.beat_now.notify_one();
        }
        self.freed.notify_waiters();
    }
}

/// Whether a wait of `ra` from `now_ms` ends after the open breaker's probe.
fn ra_later(r: &Register, ra: Duration, now_ms: u64) -> bool {
    let until = now_ms.saturating_add(u64::try_from(ra.as_millis()).unwrap_or(u64::MAX));
    match r.breaker {
        Breaker::Open { probe_at, .. } => until > probe_at,
        _ => true,
    }
}

/// What a register someone else made means, for the log line.
fn describe(r: &Register) -> &'static str {
    match r.breaker {
        Breaker::Closed => "its probe was answered",
        Breaker::Open { .. } => "the target failed there",
        Breaker::HalfOpen { .. } => "it sent the breaker's probe",
    }
}

/// One delivery's place within the target's limits; dropped without
/// [`Permit::finish`] (the delivery never ran), it frees the place only.
pub struct Permit {
    gate: Arc<Gate>,
    probe: bool,
    started: Instant,
    finished: bool,
}

impl Permit {
    /// Whether this delivery is the breaker's probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The delivery ended with `seen`.
    pub fn finish(mut self, seen: Observed) {
        self.finished = true;
        self.gate.finished(self.probe, self.started.elapsed(), seen);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.finished {
            self.gate.lock().in_flight -= 1;
            self.gate.freed.notify_waiters();
        }
    }
}
