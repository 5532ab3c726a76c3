//! The broker side of targets: each worker's control loop on `P.control`
//! (beats, shares, pauses, probes, releases), and what tools do there
//! (`hookq target`, the admin API): watch the workers' beats, pause and
//! resume.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::gate::Gate;
use super::peers::{BEAT_EVERY, Beat, Control, Peers};
use super::{Breaker, TICK, Targets};
use crate::broker::{self, Broker, ControlLine, Reader};
use crate::config::Target;
use crate::events::TargetState;
use crate::message::{DeadInfo, DeadReason, epoch_ms, rfc3339_now};

/// How long a release (a held message back to its work queue) waits for the
/// broker's confirm.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause and hold queues are counted every this many ticks (twice a second).
const COUNT_EVERY: u64 = 5;
/// At most this many held messages are released in one tick, so that the
/// loop keeps beating on time.
const RELEASE_MAX: usize = 256;

impl Targets {
    /// This worker's part on `P.control`, until `stop`: opens its line when
    /// the broker is there (again after each loss), then beats, listens, and
    /// looks after its targets every [`TICK`]. Says goodbye when it stops, so
    /// the others take its share at once.
    pub async fn run(self: Arc<Self>, broker: Broker, stop: CancellationToken) {
        if self.is_empty() {
            return;
        }
        let mut backoff = Duration::from_millis(200);
        while broker.wait_ready(&stop).await {
            match broker.control_line().await {
                Ok(line) => {
                    backoff = Duration::from_millis(200);
                    self.session(line, &broker, &stop).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot open the control line on the broker; the targets' limits count this worker alone meanwhile");
                    // Alone, as the warning says: deliveries go on meanwhile.
                    self.fleet
                        .ready
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            if stop.is_cancelled() {
                break;
            }
        }
        // Not connected, or stopping: the others see this worker go.
        self.fleet
            .ready
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    async fn session(&self, mut line: ControlLine, broker: &Broker, stop: &CancellationToken) {
        let started = Instant::now();
        let mut beat = tokio::time::interval(BEAT_EVERY);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks: u64 = 0;
        let mut reader: Option<Reader> = None;
        loop {
            tokio::select! {
                m = line.next() => match m {
                    Some(body) => self.heard(&body, &mut line).await,
                    None => {
                        tracing::debug!("the control line closed; opening another");
                        break;
                    }
                },
                _ = beat.tick() => self.send_beat(&line, false).await,
                _ = self.fleet.beat_now.notified() => self.send_beat(&line, false).await,
                _ = tick.tick() => {
                    ticks += 1;
                    // Two beats heard: the peers are known, deliveries may start.
                    if started.elapsed() >= 2 * BEAT_EVERY {
                        self.fleet.ready.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    self.look(&mut line, broker, &mut reader, ticks % COUNT_EVERY == 1).await;
                }
                _ = stop.cancelled() => {
                    self.send_beat(&line, true).await;
                    break;
                }
            }
        }
        if let Some(r) = reader {
            r.close().await;
        }
        line.close().await;
    }

    async fn send_beat(&self, line: &ControlLine, bye: bool) {
        let beat = Control::Beat(Beat {
            worker: self.fleet.me,
            bye,
            targets: self.gates().map(|g| g.beat()).collect(),
        });
        if let Ok(body) = serde_json::to_vec(&beat)
            && let Err(e) = line.send(&body).await
        {
            tracing::debug!(error = %e, "could not send a beat");
        }
    }

    /// Another's message: its view of the targets, or an operator's notice.
    async fn heard(&self, body: &[u8], line: &mut ControlLine) {
        let Ok(msg) = serde_json::from_slice::<Control>(body) else {
            tracing::debug!("ignoring a message on the control line that is not hookq's");
            return;
        };
        match msg {
            Control::Beat(b) if b.worker == self.fleet.me => {}
            Control::Beat(b) => {
                for t in &b.targets {
                    if let Some(g) = self.gates.get(&t.name) {
                        g.merge(&t.register);
                    }
                }
                self.fleet.peers().heard(b, Instant::now());
            }
            Control::Look { target } => {
                if let Some(g) = self.gates.get(&target) {
                    count(line, g).await;
                }
            }
        }
    }

    /// Every tick: shares from the peers heard; twice a second the pause and
    /// hold queues; an open breaker's probe when due (the lowest live worker
    /// sends it); held messages back to work while a gate has room.
    async fn look(
        &self,
        line: &mut ControlLine,
        broker: &Broker,
        reader: &mut Option<Reader>,
        counts: bool,
    ) {
        let lowest = {
            let mut peers = self.fleet.peers();
            peers.expire(Instant::now());
            peers.lowest(self.fleet.me) == self.fleet.me
        };
        for g in self.gates() {
            g.set_share(self.fleet.share(&g.target));
            if counts {
                count(line, g).await;
            }
            let now = epoch_ms();
            if lowest {
                g.probe_overdue(now);
                // Half open before the probe goes, so that whoever receives
                // it (this worker or another, a beat later) lets it through.
                if g.probe_due(now) && g.sample().3 > 0 {
                    g.probing(self.probe_deadline);
                    self.send_beat(line, false).await;
                    if release(broker, reader, g, 1, true).await == 0 {
                        g.probe_not_sent();
                    }
                }
            }
            let budget = g.release_budget().min(RELEASE_MAX);
            if budget > 0 && g.sample().3 > 0 {
                let moved = release(broker, reader, g, budget, false).await;
                if moved > 0 {
                    tracing::debug!(target_name = g.name(), moved, "released held messages");
                }
            }
        }
    }
}

/// A gate's pause and hold queues, counted.
async fn count(line: &mut ControlLine, g: &Gate) {
    let (paused, hold) = {
        let topo = line.topology();
        (topo.paused(g.queue_id()), topo.hold(g.queue_id()))
    };
    match line.count(&paused).await {
        Ok(n) => g.set_paused(n > 0),
        Err(e) => tracing::debug!(error = %e, queue = %paused, "cannot count the pause queue"),
    }
    match line.count(&hold).await {
        Ok(n) => g.set_held(n),
        Err(e) => tracing::debug!(error = %e, queue = %hold, "cannot count the hold queue"),
    }
}

/// Moves up to `n` held messages of `g` back to their work queue (each
/// publish confirmed before its ack: a crash leaves a copy, never a loss;
/// dedup takes care of the copy). `probe`: marks them as the breaker's probe.
/// Returns how many moved.
async fn release(
    broker: &Broker,
    reader: &mut Option<Reader>,
    g: &Gate,
    n: usize,
    probe: bool,
) -> usize {
    if reader.is_none() {
        match broker.reader().await {
            Ok(r) => *reader = Some(r),
            Err(e) => {
                tracing::debug!(error = %e, "cannot open a reader of the hold queues");
                return 0;
            }
        }
    }
    let Some(r) = reader.as_ref() else {
        return 0;
    };
    let topo = broker.topology();
    let hold = topo.hold(g.queue_id());
    let mut moved = 0;
    while moved < n {
        let (m, _) = match r.get(&hold).await {
            Ok(Some(got)) => got,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, queue = %hold, "cannot read the hold queue");
                *reader = None;
                break;
            }
        };
        let sent = match m.envelope {
            Ok(mut env) => {
                env.probe = probe;
                let work = topo.work_for(&env.key);
                broker
                    .publish_to_queue(&work, &env, None, RELEASE_TIMEOUT)
                    .await
            }
            // Not a hookq message (someone published into the hold queue).
            Err((err, mut stand_in)) => {
                stand_in.dead = Some(DeadInfo {
                    reason: DeadReason::Invalid,
                    last_error: err.to_string(),
                    last_status: None,
                    dead_at: rfc3339_now(),
                });
                broker.publish_dead(&stand_in, RELEASE_TIMEOUT).await
            }
        };
        match sent {
            Ok(()) => {
                if let Err(e) = m.acker.ack().await {
                    // The broker keeps it in the hold queue: a copy, which dedup settles.
                    tracing::debug!(error = %e, "could not ack a released message");
                    *reader = None;
                    break;
                }
                moved += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, target_name = g.name(), "could not release a held message; it stays held");
                let _ = m.acker.requeue().await;
                break;
            }
        }
    }
    moved
}

/// A target as the workers report it, for `hookq target list` and the admin API.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TargetView {
    pub name: String,
    /// The URL as shown (no query or user info).
    pub url: String,
    /// closed, open, half_open or paused.
    pub state: &'static str,
    /// Deliveries in flight, all workers together.
    pub in_flight: u64,
    /// The workers' current limits, together.
    pub limit: u64,
    /// `max_concurrency` (for the whole system).
    pub max_concurrency: usize,
    /// `rate_per_s`; 0: no limit.
    pub rate_per_s: f64,
    /// Messages in its hold queue.
    pub held: u32,
    /// Workers beating with this target.
    pub workers: usize,
}

/// The workers' beats, as one listener hears them: tools keep one for as
/// long as they answer questions about targets.
pub struct Watch {
    peers: Arc<Mutex<Peers>>,
    stop: CancellationToken,
    started: Instant,
}

impl Watch {
    /// Starts listening on `P.control` (again after each loss of the broker).
    pub fn start(broker: Broker) -> Self {
        let peers = Arc::new(Mutex::new(Peers::default()));
        let stop = CancellationToken::new();
        let (p, s) = (peers.clone(), stop.clone());
        tokio::spawn(async move {
            while broker.wait_ready(&s).await {
                let Ok(mut line) = broker.control_line().await else {
                    tokio::select! {
                        _ = s.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                };
                loop {
                    let body = tokio::select! {
                        _ = s.cancelled() => None,
                        b = line.next() => b,
                    };
                    let Some(body) = body else { break };
                    if let Ok(Control::Beat(b)) = serde_json::from_slice::<Control>(&body) {
                        p.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .heard(b, Instant::now());
                    }
                }
                line.close().await;
            }
        });
        Self {
            peers,
            stop,
            started: Instant::now(),
        }
    }

    /// Waits until the watch has heard two beats' worth.
    pub async fn settled(&self) {
        let wait =
            (2 * BEAT_EVERY + Duration::from_millis(100)).saturating_sub(self.started.elapsed());
        tokio::time::sleep(wait).await;
    }

    /// Each target of `targets` as the workers report it now, with its hold
    /// and pause queues counted.
    pub async fn views(
        &self,
        broker: &Broker,
        targets: &BTreeMap<String, Target>,
    ) -> Result<Vec<TargetView>, broker::Error> {
        let mut out = Vec::new();
        for t in targets.values() {
            let topo = broker.topology();
            let paused = broker.queue_len(&topo.paused(&t.queue_id)).await? > 0;
            let held = broker.queue_len(&topo.hold(&t.queue_id)).await?;
            let (register, in_flight, limit, workers) = {
                let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
                peers.expire(Instant::now());
                let mut register = super::Register::default();
                let (mut in_flight, mut limit, mut workers) = (0u64, 0u64, 0usize);
                for (_, v) in peers.views(&t.name) {
                    register.merge(&v.register);
                    in_flight += u64::from(v.in_flight);
                    limit += u64::from(v.limit);
                    workers += 1;
                }
                (register, in_flight, limit, workers)
            };
            let state = if paused {
                TargetState::Paused
            } else {
                match register.breaker {
                    Breaker::Closed => TargetState::Closed,
                    Breaker::Open { .. } => TargetState::Open,
                    Breaker::HalfOpen { .. } => TargetState::HalfOpen,
                }
            };
            out.push(TargetView {
                name: t.name.clone(),
                url: t.url.to_string(),
                state: state.as_str(),
                in_flight,
                limit,
                max_concurrency: t.max_concurrency,
                rate_per_s: t.rate_per_s,
                held,
                workers,
            });
        }
        Ok(out)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Each target as the workers report it, after listening for two beats.
pub async fn listen(
    broker: &Broker,
    targets: &BTreeMap<String, Target>,
) -> Result<Vec<TargetView>, broker::Error> {
    let watch = Watch::start(broker.clone());
    watch.settled().await;
    watch.views(broker, targets).await
}

/// Pauses `target` for every worker, on every host, until resumed (kept in
/// its pause queue, across restarts); `by` says who, in the queue's message.
pub async fn pause(broker: &Broker, target: &Target, by: &str) -> Result<(), broker::Error> {
    let note = serde_json::json!({ "paused_by": by, "at": rfc3339_now(), "target": target.name });
    broker
        .pause_target(
            &target.queue_id,
            note.to_string().as_bytes(),
            RELEASE_TIMEOUT,
        )
        .await?;
    notify(broker, target).await;
    Ok(())
}

/// Resumes a paused target: every worker ramps its deliveries up again.
pub async fn resume(broker: &Broker, target: &Target) -> Result<(), broker::Error> {
    broker.resume_target(&target.queue_id).await?;
    notify(broker, target).await;
    Ok(())
}

/// Tells every worker to look at `target`'s pause queue now (they look
/// twice a second anyway).
async fn notify(broker: &Broker, target: &Target) {
    let look = Control::Look {
        target: target.name.clone(),
    };
    if let Ok(line) = broker.control_line().await {
        if let Ok(body) = serde_json::to_vec(&look) {
            let _ = line.send(&body).await;
        }
        line.close().await;
    }
}
