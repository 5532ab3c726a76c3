//! `hookq simulate`: the real pipeline (ingress, RabbitMQ, worker with dedup and
//! retries) against a built-in flaky target, to see what a failure rate and a
//! retry budget give, and that every webhook ends delivered or dead-lettered.
//!
//! Everything runs in this process on a throwaway [`Scratch`]: its own amqp
//! prefix (deleted at the end), its own dedup file, port-0 listeners, and
//! millisecond delay tiers so that five attempts take milliseconds, not the
//! production tiers' minutes. Outcomes are observed from outside the worker: a
//! success is a 2xx the target gave for a key, a failure is a message in `P.dead`.
//!
//! [`Scratch`] and [`Part`] are shared with `bench`, which runs the same parts
//! the same way.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, Broker, Topology};
use crate::cli::{SimulateArgs, print};
use crate::config::{HandlerKind, Settings};
use crate::serve::{self, Parts};
use crate::worker::Worker;

/// Delay tiers of the simulated pipeline: long enough to go through the broker
/// (TTL, dead-lettering back to work), short enough that a run takes seconds.
const SIM_DELAYS_MS: [u64; 3] = [20, 40, 80];
/// The worker's per-delivery timeout in the simulation; a "timeout" answer from
/// the flaky target stalls [`STALL_EXTRA`] longer than this.
const SIM_TIMEOUT: Duration = Duration::from_millis(200);
const STALL_EXTRA: Duration = Duration::from_millis(200);
/// Webhooks posted to the ingress at once.
const SEND_CONCURRENCY: usize = 16;
/// How often the settle loop looks at the target's tally and `P.dead`.
const POLL: Duration = Duration::from_millis(50);
/// How long a started part may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(15);
/// How long a stopped part may take to hand back what it holds.
const STOP_WITHIN: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Scratch: throwaway hookq parts, shared with bench.

/// A throwaway hookq on the configured broker: its own prefix, dedup file and
/// port-0 listeners, so that a run never touches (or is touched by) the real
/// `P.work`. [`Scratch::remove`] deletes its queues, exchanges and files.
pub(crate) struct Scratch {
    pub settings: Settings,
    /// Connected and declared: proves the broker is reachable before anything
    /// starts, and serves queue lengths and the final clean-up.
    pub broker: Broker,
    /// Parent of every started part's stop token.
    parts: CancellationToken,
    /// Stops `broker`'s supervisor; cancelled last, after the clean-up used it.
    connection: CancellationToken,
}

/// Eight hex digits that make a name unique enough for a throwaway run.
pub(crate) fn short_id() -> String {
    let u = uuid::Uuid::now_v7().simple().to_string();
    u[u.len() - 8..].to_string()
}

impl Scratch {
    /// Settings derived from `base` (broker URL, queue type, prefetch,
    /// concurrency kept) with a prefix `<prefix>.<tag>.<id>`, a dedup file in
    /// the temp dir, port-0 listeners and no configured sources (a source the
    /// user configured with a signature scheme would refuse our requests). Then
    /// connects and declares, so an unreachable broker is an error now.
    pub async fn new(
        base: &Settings,
        tag: &str,
        adjust: impl FnOnce(&mut Settings),
    ) -> Result<Self, broker::Error> {
        let id = short_id();
        let mut s = base.clone();
        s.amqp.prefix = format!("{}.{tag}.{id}", base.amqp.prefix);
        s.ingress.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        s.ingress.allow_unknown_sources = true;
        s.worker.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        s.sources = BTreeMap::new();
        s.dedup.path = std::env::temp_dir().join(format!("hookq-{tag}-{id}.db"));
        adjust(&mut s);
        let connection = CancellationToken::new();
        let topology = Topology::new(&s.amqp, &s.retry);
        let name = format!("hookq-{tag}");
        let broker = Broker::connect(&s.amqp.url, &name, topology, connection.clone()).await?;
        Ok(Self {
            settings: s,
            broker,
            parts: CancellationToken::new(),
            connection,
        })
    }

    pub fn topology(&self) -> &Topology {
        self.broker.topology()
    }

    /// Starts parts of hookq on this scratch's settings.
    pub async fn start(&self, parts: Parts) -> anyhow::Result<Part> {
        let stop = self.parts.child_token();
        let r = serve::start(&self.settings, parts, stop.clone()).await?;
        Ok(Part {
            ingress_addr: r.ingress_addr,
            ops_addr: r.ops_addr,
            worker: r.worker,
            stop,
            task: r.task,
        })
    }

    /// Stops whatever still runs (parts not stopped on an error path), deletes
    /// the prefix's queues and exchanges and the dedup file. Best effort: a
    /// failure is logged, never hides the run's result.
    pub async fn remove(self) {
        self.parts.cancel();
        if let Err(e) = self.broker.delete_topology().await {
            // Said on stderr whatever the log level: the operator has queues to delete.
            eprintln!(
                "hookq: could not delete the throwaway queues and exchanges under prefix {}: {e}; \
                 delete them by hand (RabbitMQ UI or rabbitmqctl delete_queue)",
                self.settings.amqp.prefix
            );
        }
        self.connection.cancel();
        let db = self.settings.dedup.path.clone();
        for suffix in ["", "-wal", "-shm"] {
            let mut p = db.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(PathBuf::from(p));
        }
    }
}

/// Parts started by [`Scratch::start`].
pub(crate) struct Part {
    pub ingress_addr: Option<SocketAddr>,
    /// A lone worker's /metrics (`up` serves its metrics on the ingress address).
    pub ops_addr: Option<SocketAddr>,
    pub worker: Option<Arc<Worker>>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Part {
    /// Waits until the ingress answers /readyz 200 and the worker is ready.
    pub async fn ready(&self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let url = self.ingress_addr.map(|a| format!("http://{a}/readyz"));
        let ok = poll_until(Instant::now() + READY_WITHIN, POLL, || async {
            let ingress = match &url {
                Some(u) => http
                    .get(u)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == StatusCode::OK),
                None => true,
            };
            ingress && self.worker.as_ref().is_none_or(|w| w.is_ready())
        })
        .await;
        anyhow::ensure!(ok, "hookq did not become ready within {READY_WITHIN:?}");
        Ok(())
    }

    /// The Prometheus text of these parts' /metrics.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let addr = self
            .ingress_addr
            .or(self.ops_addr)
            .context("these parts serve no /metrics")?;
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(text)
    }

    /// Stops the parts and waits for them to hand back what they hold.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        tokio::time::timeout(STOP_WITHIN, self.task)
            .await
            .context("hookq parts did not stop in time")?
            .context("hookq parts panicked")?
    }
}

/// Polls `cond` every `every` until it holds (true) or `deadline` passes (false).
pub(crate) async fn poll_until<F, Fut>(deadline: Instant, every: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

/// Serves `router` on 127.0.0.1:0 until `stop`; returns its address.
pub(crate) async fn serve_local(
    router: axum::Router,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .context("cannot listen on 127.0.0.1 for the built-in target")?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await;
    });
    Ok(addr)
}

/// The `q`-quantile (0..=1) of sorted values, nearest-rank; `None` when empty.
pub(crate) fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------
// The flaky target.

/// What the flaky target saw of one key.
#[derive(Default, Clone)]
struct KeyRecord {
    /// Requests received.
    attempts: u32,
    /// `Hookq-Attempt` of the first 2xx answer.
    delivered_on: Option<u32>,
    /// 2xx answers (more than one would break the "once" guarantee).
    successes: u32,
    /// When the latest attempt ended, as the worker saw it: the key's final
    /// outcome time once it is settled.
    outcome_at: Option<Instant>,
}

struct Flaky {
    failure_rate: f64,
    timeout_rate: f64,
    /// The worker's timeout: when a stalled attempt ends for the worker.
    worker_timeout: Duration,
    keys: Mutex<HashMap<String, KeyRecord>>,
    /// Keys answered 2xx at least once.
    delivered: AtomicU32,
}

enum Answer {
    Ok,
    Fail,
    Stall,
}

/// 500 with probability `failure_rate`; else a stall past the worker's timeout
/// with probability `timeout_rate`; else 200. Each attempt draws afresh.
async fn flaky(State(t): State<Arc<Flaky>>, headers: HeaderMap) -> StatusCode {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let Some(key) = header("idempotency-key").map(str::to_string) else {
        return StatusCode::BAD_REQUEST;
    };
    let attempt = header("hookq-attempt")
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    let answer = if rand::random::<f64>() < t.failure_rate {
        Answer::Fail
    } else if rand::random::<f64>() < t.timeout_rate {
        Answer::Stall
    } else {
        Answer::Ok
    };
    let now = Instant::now();
    {
        let mut keys = t.keys.lock().unwrap_or_else(|p| p.into_inner());
        let r = keys.entry(key).or_default();
        r.attempts += 1;
        match answer {
            Answer::Ok => {
                r.successes += 1;
                if r.delivered_on.is_none() {
                    r.delivered_on = Some(attempt);
                    t.delivered.fetch_add(1, Ordering::Relaxed);
                }
                r.outcome_at = Some(now);
            }
            Answer::Fail => r.outcome_at = Some(now),
            Answer::Stall => r.outcome_at = Some(now + t.worker_timeout),
        }
    }
    match answer {
        Answer::Ok => StatusCode::OK,
        Answer::Fail => StatusCode::INTERNAL_SERVER_ERROR,
        Answer::Stall => {
            // A slow application, not a wait for an event: the worker gives up first.
            tokio::time::sleep(t.worker_timeout + STALL_EXTRA).await;
            StatusCode::GATEWAY_TIMEOUT
        }
    }
}

// ---------------------------------------------------------------------------
// The simulation.

/// The result, as printed; `--json` prints it as one object.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub deliveries: u32,
    pub failure_rate: f64,
    pub timeout_rate: f64,
    pub max_attempts: u32,
    /// Webhooks the ingress accepted (202).
    pub total: u32,
    /// Keys the target answered 2xx.
    pub successful: u32,
    /// Messages in the dead-letter queue.
    pub failed: u32,
    /// Keys answered 2xx more than once (0 unless the once guarantee broke).
    pub duplicates: u32,
    /// Webhooks neither delivered nor dead when the deadline passed.
    pub unsettled: u32,
    pub success_rate: f64,
    /// Per-attempt failure probability: failure_rate + (1 - failure_rate) * timeout_rate.
    pub attempt_failure_probability: f64,
    /// 1 - q^K.
    pub theoretical_success_rate: f64,
    /// Deliveries to the target per webhook, failed ones included.
    pub average_attempts: f64,
    /// From the 202 to the final outcome (2xx, or the last failed attempt).
    pub average_ms: f64,
    pub p99_ms: f64,
    /// `attempt_distribution[i]`: webhooks delivered on attempt i + 1.
    pub attempt_distribution: Vec<u32>,
    pub elapsed_ms: f64,
}

fn usage_error(args: &SimulateArgs) -> Option<String> {
    let rate = |name: &str, v: f64| {
        (!(0.0..=1.0).contains(&v)).then(|| format!("--{name} must be between 0 and 1 (got {v})"))
    };
    if args.deliveries == 0 {
        return Some("--deliveries must be at least 1".into());
    }
    if args.max_attempts == 0 {
        return Some("--max-attempts must be at least 1".into());
    }
    rate("failure-rate", args.failure_rate).or_else(|| rate("timeout-rate", args.timeout_rate))
}

pub async fn run(settings: &Settings, args: &SimulateArgs) -> anyhow::Result<ExitCode> {
    if let Some(problem) = usage_error(args) {
        eprintln!("hookq simulate: {problem}");
        return Ok(ExitCode::from(2));
    }
    let report = simulate(settings, args).await?;
    if args.json {
        print(serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    if report.unsettled > 0 {
        anyhow::bail!(
            "{} of {} webhooks were neither delivered nor dead-lettered in time; \
             is the broker overloaded? (HOOKQ_LOG=info shows what the worker did)",
            report.unsettled,
            report.total
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the simulation and returns its report (validated arguments expected).
pub async fn simulate(settings: &Settings, args: &SimulateArgs) -> anyhow::Result<Report> {
    let stop_target = CancellationToken::new();
    let target = Arc::new(Flaky {
        failure_rate: args.failure_rate,
        timeout_rate: args.timeout_rate,
        worker_timeout: SIM_TIMEOUT,
        keys: Mutex::new(HashMap::new()),
        delivered: AtomicU32::new(0),
    });
    let router = axum::Router::new()
        .fallback(flaky)
        .with_state(target.clone());
    let addr = serve_local(router, stop_target.clone()).await?;
    let _stop_target = stop_target.drop_guard();

    let max_attempts = args.max_attempts;
    let scratch = Scratch::new(settings, "sim", |s| {
        s.worker.handler = HandlerKind::Http;
        s.worker.target = Some(format!("http://{addr}/webhooks"));
        s.worker.timeout_ms = SIM_TIMEOUT.as_millis() as u64;
        s.retry.max_attempts = max_attempts;
        s.retry.inline_attempts = max_attempts.min(2);
        s.retry.inline_delay_ms = 5;
        s.retry.delays_ms = SIM_DELAYS_MS.to_vec();
        s.retry.jitter = 0.1;
    })
    .await?;
    let result = drive(&scratch, &target, args).await;
    scratch.remove().await;
    result
}

/// Starts `up`, sends, waits for every outcome, stops, and tallies.
async fn drive(scratch: &Scratch, target: &Flaky, args: &SimulateArgs) -> anyhow::Result<Report> {
    let n = args.deliveries;
    let progress = Progress::new(n as u64);
    let started = Instant::now();
    let up = scratch.start(Parts::Up).await?;
    up.ready().await?;
    let ingress = up
        .ingress_addr
        .context("the simulated ingress has no address")?;

    // Send: unique idempotency keys, so each webhook is its own key.
    let run_id = short_id();
    let http = reqwest::Client::new();
    let url = format!("http://{ingress}/hooks/sim");
    let sent = AtomicU32::new(0);
    let accepted: Vec<anyhow::Result<(String, Instant)>> = futures::stream::iter(0..n)
        .map(|i| {
            let (http, url, run_id, sent, progress) = (&http, &url, &run_id, &sent, &progress);
            async move {
                let r = http
                    .post(url)
                    .header("content-type", "application/json")
                    .header("idempotency-key", format!("{run_id}-{i}"))
                    .body(format!(r#"{{"simulated": {i}}}"#))
                    .send()
                    .await
                    .context("posting to the simulated ingress")?;
                let status = r.status();
                let at = Instant::now();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                anyhow::ensure!(
                    status == StatusCode::ACCEPTED,
                    "the ingress answered {status}: {body}"
                );
                let key = body["key"]
                    .as_str()
                    .context("the ingress's 202 has no key")?
                    .to_string();
                progress.sent(sent.fetch_add(1, Ordering::Relaxed) + 1);
                Ok((key, at))
            }
        })
        .buffer_unordered(SEND_CONCURRENCY)
        .collect()
        .await;
    let accepted: HashMap<String, Instant> = accepted.into_iter().collect::<Result<_, _>>()?;

    // Settle: every key delivered (2xx at the target) or dead (in P.dead).
    let dead_queue = scratch.topology().dead();
    let concurrency = scratch.settings.worker.concurrency.max(1) as u32;
    let worst_per_message =
        (SIM_TIMEOUT + STALL_EXTRA + Duration::from_millis(SIM_DELAYS_MS[2])) * args.max_attempts;
    let deadline = Instant::now()
        + Duration::from_secs(30)
        + worst_per_message * n.div_ceil(concurrency).min(10_000);
    let dead = loop {
        let dead = scratch
            .broker
            .queue_len(&dead_queue)
            .await
            .context("reading the dead-letter queue")?;
        let delivered = target.delivered.load(Ordering::Relaxed);
        progress.settled(delivered + dead);
        if delivered + dead >= n || Instant::now() >= deadline {
            break dead;
        }
        tokio::time::sleep(POLL).await;
    };
    up.stop().await?;
    progress.done();
    let elapsed = started.elapsed();

    let keys = target
        .keys
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    Ok(tally(args, &accepted, &keys, dead, elapsed))
}

fn tally(
    args: &SimulateArgs,
    accepted: &HashMap<String, Instant>,
    keys: &HashMap<String, KeyRecord>,
    dead: u32,
    elapsed: Duration,
) -> Report {
    let total = accepted.len() as u32;
    let k = args.max_attempts;
    let mut distribution = vec![0u32; k as usize];
    let (mut successful, mut duplicates, mut attempts) = (0u32, 0u32, 0u64);
    let mut latencies = Vec::with_capacity(accepted.len());
    for (key, at) in accepted {
        let Some(r) = keys.get(key) else { continue };
        attempts += u64::from(r.attempts);
        if let Some(n) = r.delivered_on {
            successful += 1;
            if let Some(slot) = distribution.get_mut(n.saturating_sub(1) as usize) {
                *slot += 1;
            }
        }
        if r.successes > 1 {
            duplicates += 1;
        }
        let settled = r.delivered_on.is_some() || r.attempts >= k;
        if let (true, Some(end)) = (settled, r.outcome_at) {
            // A delivery can beat the 202 back to the client: count it as 0.
            latencies.push(end.saturating_duration_since(*at));
        }
    }
    latencies.sort_unstable();
    let q = args.failure_rate + (1.0 - args.failure_rate) * args.timeout_rate;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Report {
        deliveries: args.deliveries,
        failure_rate: args.failure_rate,
        timeout_rate: args.timeout_rate,
        max_attempts: k,
        total,
        successful,
        failed: dead,
        duplicates,
        unsettled: total.saturating_sub(successful + dead),
        success_rate: ratio(successful as f64, total as f64),
        attempt_failure_probability: q,
        theoretical_success_rate: 1.0 - q.powi(k.min(i32::MAX as u32) as i32),
        average_attempts: ratio(attempts as f64, total as f64),
        average_ms: ratio(
            latencies.iter().map(|d| ms(*d)).sum::<f64>(),
            latencies.len() as f64,
        ),
        p99_ms: quantile(&latencies, 0.99).map(ms).unwrap_or(0.0),
        attempt_distribution: distribution,
        elapsed_ms: ms(elapsed),
    }
}

fn print_report(r: &Report) {
    print(format_args!(
        "hookq simulate: {} webhooks, failure rate {}, timeout rate {}, at most {} attempts",
        r.deliveries, r.failure_rate, r.timeout_rate, r.max_attempts
    ));
    print(format_args!("  total            {:>8}", r.total));
    print(format_args!("  successful       {:>8}", r.successful));
    print(format_args!("  failed (dead)    {:>8}", r.failed));
    if r.duplicates > 0 || r.unsettled > 0 {
        print(format_args!("  delivered twice  {:>8}", r.duplicates));
        print(format_args!("  unsettled        {:>8}", r.unsettled));
    }
    print(format_args!(
        "  success rate     {:>7.1}%   theory 1 - q^K = {:.1}% (q = {:.3} per attempt)",
        r.success_rate * 100.0,
        r.theoretical_success_rate * 100.0,
        r.attempt_failure_probability
    ));
    print(format_args!(
        "  average attempts {:>8.2}",
        r.average_attempts
    ));
    print(format_args!(
        "  202 -> outcome   {:>8.1} ms average, {:.1} ms p99",
        r.average_ms, r.p99_ms
    ));
    print("  delivered on attempt:");
    let widest = r
        .attempt_distribution
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    for (i, &count) in r.attempt_distribution.iter().enumerate() {
        let bar = "#".repeat((count as usize * 40).div_ceil(widest as usize));
        print(format_args!("    {:>3} {:>8}  {bar}", i + 1, count));
    }
    print(format_args!("  took {:.1} s", r.elapsed_ms / 1000.0));
}

/// A bar on a terminal; otherwise a plain line on stderr now and then.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    last_line: Mutex<Option<Instant>>,
    sent: AtomicU32,
}

impl Progress {
    fn new(total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} {bar:40} {pos}/{len} settled  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            indicatif::ProgressBar::new(total).with_style(style)
        });
        Self {
            bar,
            total,
            last_line: Mutex::new(None),
            sent: AtomicU32::new(0),
        }
    }

    fn sent(&self, n: u32) {
        self.sent.store(n, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.set_message(format!("{n} sent"));
        }
    }

    fn settled(&self, n: u32) {
        match &self.bar {
            Some(b) => b.set_position(n as u64),
            None => {
                let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    *last = Some(Instant::now());
                    eprintln!(
                        "hookq simulate: {n}/{} settled, {} sent",
                        self.total,
                        self.sent.load(Ordering::Relaxed)
                    );
                }
            }
        }
    }

    fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(deliveries: u32, p: f64, t: f64, k: u32) -> SimulateArgs {
        SimulateArgs {
            deliveries,
            failure_rate: p,
            timeout_rate: t,
            max_attempts: k,
            json: false,
        }
    }

    #[test]
    fn arguments_outside_their_range_are_refused() {
        assert!(usage_error(&args(1, 0.0, 0.0, 1)).is_none());
        assert!(usage_error(&args(1, 1.0, 1.0, 1)).is_none());
        for bad in [
            args(0, 0.5, 0.0, 5),
            args(10, 1.5, 0.0, 5),
            args(10, -0.1, 0.0, 5),
            args(10, f64::NAN, 0.0, 5),
            args(10, 0.5, 2.0, 5),
            args(10, 0.5, 0.0, 0),
        ] {
            assert!(usage_error(&bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn quantile_is_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&v, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&v, 1.0), Some(Duration::from_millis(100)));
        assert_eq!(quantile(&v[..1], 0.99), Some(Duration::from_millis(1)));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn tally_counts_outcomes_and_the_theory() {
        let now = Instant::now();
        let a = args(3, 0.5, 0.0, 3);
        let accepted: HashMap<String, Instant> =
            ["s:a", "s:b", "s:c"].map(|k| (k.to_string(), now)).into();
        let rec = |attempts, on: Option<u32>| KeyRecord {
            attempts,
            delivered_on: on,
            successes: on.map_or(0, |_| 1),
            outcome_at: Some(now + Duration::from_millis(10 * attempts as u64)),
        };
        let keys: HashMap<String, KeyRecord> = [
            ("s:a".to_string(), rec(1, Some(1))),
            ("s:b".to_string(), rec(2, Some(2))),
            ("s:c".to_string(), rec(3, None)),
        ]
        .into();
        let r = tally(&a, &accepted, &keys, 1, Duration::from_secs(1));
        assert_eq!((r.total, r.successful, r.failed, r.unsettled), (3, 2, 1, 0));
        assert_eq!(r.attempt_distribution, vec![1, 1, 0]);
        assert!((r.average_attempts - 2.0).abs() < 1e-9);
        assert!((r.theoretical_success_rate - 0.875).abs() < 1e-9);
        assert!((r.average_ms - 20.0).abs() < 1e-6);
        assert!((r.p99_ms - 30.0).abs() < 1e-6);
    }
}
