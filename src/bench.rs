//! `hookq bench`: what the ingress and the worker achieve on this machine and
//! broker, set beside what the broker achieves with nothing of hookq around it,
//! in one run on throwaway prefixes.
//!
//! Phases, in order:
//! 1. raw broker: `--messages` persistent publishes with pipelined confirms
//!    (`--connections` in flight, the same window the ingress gets, to the same
//!    exchange and routing key), then consuming them with manual acks at the
//!    configured prefetch, through [`crate::broker::raw`]: lapin on its own
//!    connection, none of hookq's code. Measured again after phase 3, and
//!    averaged, because a shared machine's background load drifts within a run;
//! 2. ingress: `--messages` POSTs from a built-in client, `--connections` at
//!    once, unique idempotency keys, `--body-bytes` bodies;
//! 3. worker: the ingress phase left that backlog in `P.work`; a worker with
//!    dedup on drains it to a local target that answers 200;
//! 4. end to end: `up` at a moderate, paced rate; time from each 202 to the
//!    delivery at the target;
//! 5. memory: this process's peak, and a lone worker process (this binary with
//!    a hidden flag) measured after real work and again with `--lru-keys` keys
//!    in its LRU.
//!
//! Where the time goes is reported beside each rate: CPU per message of this
//! process, the ingress's publish-to-confirm time and the worker's delivery
//! time and SQLite batching (both read from the parts' own /metrics).
//!
//! Every part shares the machine with the client, the target and RabbitMQ, as
//! it would on a small host; the ratios are what to compare across machines.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::broker::raw;
use crate::cli::{BenchArgs, print};
use crate::config::{HandlerKind, QueueType, Settings};
use crate::message::{DedupKey, Envelope};
use crate::serve::{self, Parts};
use crate::simulate::{Scratch, ms, poll_until, quantile, serve_local, short_id};

/// Webhooks per second in the end-to-end phase: well under what the ingress
/// and the worker sustain, so the figure is latency, not queueing.
const E2E_RATE: u32 = 200;
/// Messages the lone worker process delivers before its memory is measured.
const PROBE_MESSAGES: u32 = 2000;
/// How often timing-sensitive waits look (a phase's end is known this closely).
const FINE_POLL: Duration = Duration::from_millis(5);
/// A phase that makes no progress for this long has failed.
const STALL: Duration = Duration::from_secs(60);

/// Targets from the issue that introduced the benchmark.
const INGRESS_RATIO_GOAL: f64 = 0.8;
const INGRESS_P99_GOAL_MS: f64 = 20.0;
const WORKER_RATIO_GOAL: f64 = 0.6;
const WORKER_RSS_GOAL_MIB: f64 = 64.0;

/// One target and whether this run met it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub name: String,
    pub goal: String,
    pub value: f64,
    pub met: bool,
}

/// Every figure of a run; `--json` prints it as one object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub messages: u32,
    pub connections: usize,
    pub body_bytes: usize,
    pub queue_type: String,
    /// Persistent publishes confirmed per second, lapin alone, to the same
    /// exchange and routing key as the ingress.
    pub raw_publish_per_s: f64,
    /// Messages consumed and acked per second, lapin alone.
    pub raw_consume_per_s: f64,
    /// The two measurements the figures above average: before the ingress
    /// phase and after the worker phase. Far apart means a noisy machine.
    pub raw_publish_rounds: [f64; 2],
    pub raw_consume_rounds: [f64; 2],
    /// CPU time of this process per message in each phase, in microseconds
    /// (the ingress phase includes the load client, the worker phase the target).
    pub raw_publish_cpu_us: f64,
    pub raw_consume_cpu_us: f64,
    /// 202s per second.
    pub ingress_per_s: f64,
    pub ingress_p50_ms: f64,
    pub ingress_p99_ms: f64,
    /// Requests not answered 202 (each is a problem worth a look).
    pub ingress_errors: u32,
    pub ingress_ratio: f64,
    pub ingress_cpu_us: f64,
    /// Inside the ingress: publish to confirm, on average (its /metrics).
    pub ingress_publish_avg_ms: f64,
    /// Backlog messages delivered, recorded and acked per second.
    pub worker_per_s: f64,
    pub worker_ratio: f64,
    pub worker_cpu_us: f64,
    /// One delivery to the target, on average (the worker's /metrics).
    pub worker_delivery_avg_ms: f64,
    /// SQLite transactions for the whole drain (two writes per message, batched).
    pub worker_dedup_commits: u64,
    pub e2e_messages: u32,
    pub e2e_rate_per_s: u32,
    /// From the 202 at the client to the delivery at the target; a delivery
    /// that beats the 202 back to the client counts as 0.
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    /// From the start of the POST to the delivery at the target.
    pub e2e_from_post_p50_ms: f64,
    pub e2e_from_post_p99_ms: f64,
    /// VmHWM of this process (client, ingress, worker and target together).
    pub peak_rss_mib: Option<f64>,
    pub lru_keys: u32,
    /// A lone worker process after delivering [`PROBE_MESSAGES`].
    pub worker_rss_before_mib: f64,
    /// The same process with `lru_keys` keys in its LRU.
    pub worker_rss_after_mib: f64,
    pub worker_lru_len: u64,
    pub elapsed_s: f64,
    pub goals: Vec<Goal>,
}

fn usage_error(a: &BenchArgs, s: &Settings) -> Option<String> {
    if a.messages == 0 {
        return Some("--messages must be at least 1".into());
    }
    if a.connections == 0 || a.connections > s.ingress.max_in_flight {
        return Some(format!(
            "--connections must be between 1 and ingress.max_in_flight ({})",
            s.ingress.max_in_flight
        ));
    }
    if a.body_bytes == 0 || a.body_bytes > s.ingress.max_body_bytes {
        return Some(format!(
            "--body-bytes must be between 1 and ingress.max_body_bytes ({})",
            s.ingress.max_body_bytes
        ));
    }
    None
}

pub async fn run(settings: &Settings, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    if args.worker_rss_probe {
        return probe(settings, args).await;
    }
    if let Some(problem) = usage_error(args, settings) {
        eprintln!("hookq bench: {problem}");
        return Ok(ExitCode::from(2));
    }
    let report = bench(settings, args).await?;
    if args.json {
        print(serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn say(what: impl std::fmt::Display) {
    eprintln!("hookq bench: {what}");
}

fn per_s(n: u32, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { n as f64 / s } else { 0.0 }
}

/// CPU time (user + system, every thread) of this process so far, from
/// /proc/self/stat; zero off Linux. Clock ticks are USER_HZ, 100 on Linux.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(14 - 3) + ticks(15 - 3)) * 10)
}

/// Microseconds of CPU per message since `since` (a [`cpu_time`] reading).
fn cpu_us_per(since: Duration, n: u32) -> f64 {
    if n == 0 {
        return 0.0;
    }
    (cpu_time().saturating_sub(since)).as_secs_f64() * 1e6 / n as f64
}

/// A sample's value in Prometheus text (`name value`), e.g. a histogram's `_sum`.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// A histogram's mean in milliseconds, from its `_sum` and `_count`.
fn mean_ms(text: &str, histogram: &str) -> f64 {
    let sum = metric(text, &format!("{histogram}_sum")).unwrap_or(0.0);
    let count = metric(text, &format!("{histogram}_count")).unwrap_or(0.0);
    if count > 0.0 {
        sum / count * 1000.0
    } else {
        0.0
    }
}

/// As written in the configuration (`amqp.queue_type`).
fn queue_type_name(q: QueueType) -> &'static str {
    match q {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    }
}

/// The message every phase sends: `body_bytes` of payload, the headers the
/// ingress would forward for such a request.
fn sample(body: &[u8], key: &str) -> Envelope {
    Envelope::received(
        "bench",
        DedupKey(format!("bench:{key}")),
        bytes::Bytes::copy_from_slice(body),
        Some("application/octet-stream".into()),
        [
            ("idempotency-key", key),
            ("user-agent", "hookq-bench"),
            ("content-type", "application/octet-stream"),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((http::HeaderName::from_static(k), v.parse().ok()?)))
        .collect(),
    )
}

pub async fn bench(settings: &Settings, args: &BenchArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let n = args.messages;
    let body = vec![b'x'; args.body_bytes];
    let stop_sink = CancellationToken::new();
    let _stop_sink = stop_sink.clone().drop_guard();
    let sink = Sink::start(stop_sink).await?;

    // 1. The broker alone; measured again after the worker phase, because a
    // shared machine's background load drifts within a run.
    let raw_before = raw_phase(settings, args, &body).await?;

    // 2-4 on one throwaway prefix.
    let scratch = Scratch::new(settings, "bench", |s| {
        s.worker.handler = HandlerKind::Http;
        s.worker.target = Some(sink.url.clone());
    })
    .await?;
    let phases = async {
        let ingress = ingress_phase(&scratch, args, &body).await?;
        let worker = worker_phase(&scratch, &sink, &ingress.keys).await?;
        let raw_after = raw_phase(settings, args, &body).await?;
        let e2e = e2e_phase(&scratch, &sink, args, &body).await?;
        anyhow::Ok((ingress, worker, raw_after, e2e))
    }
    .await;
    scratch.remove().await;
    let (ingress, worker, raw_after, e2e) = phases?;
    let raw = RawFigures::mean(&raw_before, &raw_after);

    // 5. Memory.
    let peak_rss_mib = proc_status_kib("VmHWM").map(|k| k as f64 / 1024.0);
    let rss = worker_rss(settings, args, &sink, &body).await?;

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let ingress_ratio = ratio(ingress.per_s, raw.publish_per_s);
    let worker_ratio = ratio(worker.per_s, raw.consume_per_s);
    let after_mib = rss.rss_with_keys_kib as f64 / 1024.0;
    let goals = vec![
        Goal {
            name: "ingress rate / raw publish rate".into(),
            goal: format!(">= {INGRESS_RATIO_GOAL}"),
            value: ingress_ratio,
            met: ingress_ratio >= INGRESS_RATIO_GOAL,
        },
        Goal {
            name: "ingress p99 latency (ms)".into(),
            goal: format!("< {INGRESS_P99_GOAL_MS}"),
            value: ingress.p99_ms,
            met: ingress.p99_ms < INGRESS_P99_GOAL_MS,
        },
        Goal {
            name: "worker rate / raw consume rate".into(),
            goal: format!(">= {WORKER_RATIO_GOAL}"),
            value: worker_ratio,
            met: worker_ratio >= WORKER_RATIO_GOAL,
        },
        Goal {
            name: format!("worker RSS with {} LRU keys (MiB)", args.lru_keys),
            goal: format!("< {WORKER_RSS_GOAL_MIB}"),
            value: after_mib,
            met: after_mib < WORKER_RSS_GOAL_MIB,
        },
    ];
    Ok(Report {
        messages: n,
        connections: args.connections,
        body_bytes: args.body_bytes,
        queue_type: queue_type_name(settings.amqp.queue_type).into(),
        raw_publish_per_s: raw.publish_per_s,
        raw_consume_per_s: raw.consume_per_s,
        raw_publish_rounds: [raw_before.publish_per_s, raw_after.publish_per_s],
        raw_consume_rounds: [raw_before.consume_per_s, raw_after.consume_per_s],
        raw_publish_cpu_us: raw.publish_cpu_us,
        raw_consume_cpu_us: raw.consume_cpu_us,
        ingress_per_s: ingress.per_s,
        ingress_p50_ms: ingress.p50_ms,
        ingress_p99_ms: ingress.p99_ms,
        ingress_errors: ingress.errors,
        ingress_ratio,
        ingress_cpu_us: ingress.cpu_us,
        ingress_publish_avg_ms: ingress.publish_avg_ms,
        worker_per_s: worker.per_s,
        worker_ratio,
        worker_cpu_us: worker.cpu_us,
        worker_delivery_avg_ms: worker.delivery_avg_ms,
        worker_dedup_commits: worker.dedup_commits,
        e2e_messages: e2e.messages,
        e2e_rate_per_s: E2E_RATE,
        e2e_p50_ms: e2e.from_202.0,
        e2e_p99_ms: e2e.from_202.1,
        e2e_from_post_p50_ms: e2e.from_post.0,
        e2e_from_post_p99_ms: e2e.from_post.1,
        peak_rss_mib,
        lru_keys: args.lru_keys,
        worker_rss_before_mib: rss.rss_after_work_kib as f64 / 1024.0,
        worker_rss_after_mib: after_mib,
        worker_lru_len: rss.lru_len,
        elapsed_s: started.elapsed().as_secs_f64(),
        goals,
    })
}

struct RawFigures {
    publish_per_s: f64,
    consume_per_s: f64,
    publish_cpu_us: f64,
    consume_cpu_us: f64,
}

impl RawFigures {
    fn mean(a: &Self, b: &Self) -> Self {
        Self {
            publish_per_s: (a.publish_per_s + b.publish_per_s) / 2.0,
            consume_per_s: (a.consume_per_s + b.consume_per_s) / 2.0,
            publish_cpu_us: (a.publish_cpu_us + b.publish_cpu_us) / 2.0,
            consume_cpu_us: (a.consume_cpu_us + b.consume_cpu_us) / 2.0,
        }
    }
}

/// `--messages` persistent publishes to the same exchange and routing key as
/// the ingress, `--connections` awaiting confirms at once, then consuming
/// them with manual acks at the configured prefetch, on a prefix of its own.
async fn raw_phase(
    settings: &Settings,
    args: &BenchArgs,
    body: &[u8],
) -> anyhow::Result<RawFigures> {
    let n = args.messages;
    say(format_args!(
        "raw broker: {n} persistent publishes, {} awaiting confirms at once; then consuming them, prefetch {}",
        args.connections, settings.amqp.prefetch
    ));
    let rawq = Scratch::new(settings, "bench-raw", |_| {}).await?;
    let result = async {
        let topo = rawq.topology();
        let (queue, exchange) = (topo.work(), topo.exchange());
        let url = &rawq.settings.amqp.url;
        let env = sample(body, "raw");
        let routing_key = crate::broker::Topology::routing_key(&env.source);
        let cpu = cpu_time();
        let publish =
            raw::publish_confirmed(url, &exchange, &routing_key, &env, n, args.connections).await?;
        let publish_cpu_us = cpu_us_per(cpu, n);
        let cpu = cpu_time();
        let consume = tokio::time::timeout(
            STALL + Duration::from_millis(u64::from(n)),
            raw::consume_acked(url, &queue, n, settings.amqp.prefetch),
        )
        .await
        .context("the raw consumer did not get every message in time")??;
        anyhow::Ok(RawFigures {
            publish_per_s: per_s(n, publish),
            consume_per_s: per_s(n, consume),
            publish_cpu_us,
            consume_cpu_us: cpu_us_per(cpu, n),
        })
    }
    .await;
    rawq.remove().await;
    result
}

// ---------------------------------------------------------------------------
// The target: answers 200 and notes when each key first arrived.

struct SinkState {
    arrivals: Mutex<HashMap<String, Instant>>,
    count: AtomicU32,
}

struct Sink {
    url: String,
    state: Arc<SinkState>,
}

async fn sink(State(s): State<Arc<SinkState>>, headers: HeaderMap, _body: axum::body::Bytes) {
    let now = Instant::now();
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        s.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_insert(now);
    }
    s.count.fetch_add(1, Ordering::Relaxed);
}

impl Sink {
    async fn start(stop: CancellationToken) -> anyhow::Result<Self> {
        let state = Arc::new(SinkState {
            arrivals: Mutex::new(HashMap::new()),
            count: AtomicU32::new(0),
        });
        let router = axum::Router::new().fallback(sink).with_state(state.clone());
        let addr = serve_local(router, stop).await?;
        Ok(Self {
            url: format!("http://{addr}/webhooks"),
            state,
        })
    }

    fn arrival(&self, key: &str) -> Option<Instant> {
        self.state
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .copied()
    }
}

// ---------------------------------------------------------------------------
// 2. Ingress.

struct IngressFigures {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u32,
    cpu_us: f64,
    publish_avg_ms: f64,
    /// Keys the ingress accepted (they wait in `P.work` for the worker phase).
    keys: Vec<String>,
}

/// One connection's share of the load: requests one after another until the
/// shared counter reaches the total.
async fn hammer(
    http: reqwest::Client,
    url: String,
    body: Vec<u8>,
    next: Arc<AtomicU32>,
    total: u32,
    run_id: String,
) -> (Vec<Duration>, Vec<String>, u32, Option<String>) {
    let (mut latencies, mut keys, mut errors, mut first_error) = (Vec::new(), Vec::new(), 0, None);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            break;
        }
        let sent = Instant::now();
        let r = http
            .post(&url)
            .header("content-type", "application/octet-stream")
            .header("idempotency-key", format!("{run_id}-{i}"))
            .body(body.clone())
            .send()
            .await;
        let outcome = match r {
            Ok(r) if r.status() == StatusCode::ACCEPTED => r
                .json::<serde_json::Value>()
                .await
                .map_err(|e| e.to_string())
                .map(|v| v["key"].as_str().unwrap_or_default().to_string()),
            Ok(r) => Err(format!(
                "{} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            )),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(key) => {
                latencies.push(sent.elapsed());
                keys.push(key);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    (latencies, keys, errors, first_error)
}

async fn ingress_phase(
    scratch: &Scratch,
    args: &BenchArgs,
    body: &[u8],
) -> anyhow::Result<IngressFigures> {
    let n = args.messages;
    say(format_args!(
        "ingress: {n} POSTs of {} bytes over {} connections",
        body.len(),
        args.connections
    ));
    let part = scratch.start(Parts::Ingress).await?;
    part.ready().await?;
    let addr = part.ingress_addr.context("the ingress has no address")?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let url = format!("http://{addr}/hooks/bench");
    let next = Arc::new(AtomicU32::new(0));
    let run_id = short_id();
    let cpu = cpu_time();
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            tokio::spawn(hammer(
                http.clone(),
                url.clone(),
                body.to_vec(),
                next.clone(),
                n,
                run_id.clone(),
            ))
        })
        .collect();
    let (mut latencies, mut keys, mut errors, mut first_error) = (Vec::new(), Vec::new(), 0, None);
    for t in tasks {
        let (l, k, e, f) = t.await.context("a load connection panicked")?;
        latencies.extend(l);
        keys.extend(k);
        errors += e;
        first_error = first_error.or(f);
    }
    let elapsed = started.elapsed();
    let cpu_us = cpu_us_per(cpu, n);
    let metrics = part.metrics().await?;
    part.stop().await?;
    if let Some(e) = &first_error {
        say(format_args!(
            "ingress: {errors} requests were not accepted; the first: {e}"
        ));
    }
    anyhow::ensure!(!keys.is_empty(), "the ingress accepted no request");
    latencies.sort_unstable();
    Ok(IngressFigures {
        per_s: per_s(keys.len() as u32, elapsed),
        p50_ms: quantile(&latencies, 0.5).map(ms).unwrap_or(0.0),
        p99_ms: quantile(&latencies, 0.99).map(ms).unwrap_or(0.0),
        errors,
        cpu_us,
        publish_avg_ms: mean_ms(&metrics, "hookq_ingress_publish_seconds"),
        keys,
    })
}

// ---------------------------------------------------------------------------
// 3. Worker.

struct WorkerFigures {
    per_s: f64,
    cpu_us: f64,
    delivery_avg_ms: f64,
    dedup_commits: u64,
}

/// Drains the ingress phase's backlog; messages per second from the first
/// delivery at the target until every key is recorded done and acked (the
/// worker remembers a key in its LRU only after the ack).
async fn worker_phase(
    scratch: &Scratch,
    sink: &Sink,
    keys: &[String],
) -> anyhow::Result<WorkerFigures> {
    let work = scratch.topology().work();
    let backlog = scratch.broker.queue_len(&work).await?;
    let total = keys.len() as u32;
    say(format_args!(
        "worker: draining a backlog of {backlog} messages (dedup on, target answers 200)"
    ));
    let cpu = cpu_time();
    let part = scratch.start(Parts::Worker).await?;
    let worker = part.worker.clone().context("no worker started")?;
    let expected = (total as usize).min(scratch.settings.dedup.lru_capacity);
    let mut progress = (0usize, Instant::now());
    let done = poll_until(Instant::now() + STALL * 10, FINE_POLL, || {
        let len = worker.dedup().lru_len();
        if len > progress.0 {
            progress = (len, Instant::now());
        }
        let stalled = progress.1.elapsed() > STALL;
        async move { len >= expected || stalled }
    })
    .await;
    let finished = Instant::now();
    let cpu_us = cpu_us_per(cpu, total);
    let metrics = part.metrics().await?;
    part.stop().await?;
    anyhow::ensure!(
        done && worker.dedup().lru_len() >= expected,
        "the worker delivered {} of {total} messages and then made no progress for {STALL:?}",
        worker.dedup().lru_len()
    );
    let first = keys
        .iter()
        .filter_map(|k| sink.arrival(k))
        .min()
        .context("the target saw none of the backlog")?;
    Ok(WorkerFigures {
        per_s: per_s(total, finished.saturating_duration_since(first)),
        cpu_us,
        delivery_avg_ms: mean_ms(&metrics, "hookq_worker_delivery_seconds"),
        dedup_commits: metric(&metrics, "hookq_dedup_commits").unwrap_or(0.0) as u64,
    })
}

// ---------------------------------------------------------------------------
// 4. End to end.

struct E2eFigures {
    messages: u32,
    /// p50 and p99 in milliseconds.
    from_202: (f64, f64),
    from_post: (f64, f64),
}

async fn e2e_phase(
    scratch: &Scratch,
    sink: &Sink,
    args: &BenchArgs,
    body: &[u8],
) -> anyhow::Result<E2eFigures> {
    let m = (args.messages / 10).clamp(50, 2000);
    say(format_args!(
        "end to end: {m} webhooks at {E2E_RATE}/s through ingress, broker and worker"
    ));
    let up = scratch.start(Parts::Up).await?;
    up.ready().await?;
    let addr = up.ingress_addr.context("the ingress has no address")?;
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/hooks/bench");
    let run_id = short_id();
    // Paced: one request per tick, each on its own task so a slow answer does
    // not hold back the next send.
    let mut tick = tokio::time::interval(Duration::from_secs(1) / E2E_RATE);
    let mut sends = Vec::with_capacity(m as usize);
    for i in 0..m {
        tick.tick().await;
        let (http, url, body) = (http.clone(), url.clone(), body.to_vec());
        let id = format!("{run_id}-{i}");
        sends.push(tokio::spawn(async move {
            let sent = Instant::now();
            let r = http
                .post(&url)
                .header("content-type", "application/octet-stream")
                .header("idempotency-key", &id)
                .body(body)
                .send()
                .await
                .ok()?;
            let at = Instant::now();
            (r.status() == StatusCode::ACCEPTED).then(|| (format!("bench:{id}"), sent, at))
        }));
    }
    let mut accepted = Vec::with_capacity(sends.len());
    for s in sends {
        if let Some(a) = s.await.context("an end-to-end send panicked")? {
            accepted.push(a);
        }
    }
    let all_arrived = poll_until(Instant::now() + STALL, FINE_POLL, || {
        let done = accepted.iter().all(|(k, _, _)| sink.arrival(k).is_some());
        async move { done }
    })
    .await;
    up.stop().await?;
    anyhow::ensure!(
        all_arrived,
        "end to end: not every webhook reached the target within {STALL:?}"
    );
    let (mut from_202, mut from_post) = (Vec::new(), Vec::new());
    for (key, sent, accepted) in &accepted {
        if let Some(arrived) = sink.arrival(key) {
            from_202.push(arrived.saturating_duration_since(*accepted));
            from_post.push(arrived.saturating_duration_since(*sent));
        }
    }
    let p50_p99 = |mut v: Vec<Duration>| {
        v.sort_unstable();
        let q = |x| quantile(&v, x).map(ms).unwrap_or(0.0);
        (q(0.5), q(0.99))
    };
    Ok(E2eFigures {
        messages: accepted.len() as u32,
        from_202: p50_p99(from_202),
        from_post: p50_p99(from_post),
    })
}

// ---------------------------------------------------------------------------
// 5. Memory.

/// A field of /proc/self/status in KiB (`VmRSS`, `VmHWM`); `None` off Linux.
fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// What the probe process reports on its stdout.
#[derive(Debug, Serialize, Deserialize)]
struct ProbeReport {
    rss_after_work_kib: u64,
    rss_with_keys_kib: u64,
    lru_len: u64,
}

/// Runs a lone worker process (this binary, `bench --worker-rss-probe`) on a
/// throwaway prefix holding [`PROBE_MESSAGES`] webhooks: it delivers them to the
/// sink, measures its RSS, fills its LRU with `--lru-keys` keys, measures again.
/// A separate process, so that the figure is a worker's and not this process's
/// client, ingress and target as well.
async fn worker_rss(
    settings: &Settings,
    args: &BenchArgs,
    sink: &Sink,
    body: &[u8],
) -> anyhow::Result<ProbeReport> {
    say(format_args!(
        "memory: a worker process delivers {PROBE_MESSAGES} webhooks, then holds {} keys in its LRU",
        args.lru_keys
    ));
    let lru_capacity = settings.dedup.lru_capacity.max(args.lru_keys as usize);
    let scratch = Scratch::new(settings, "bench-rss", |s| {
        s.worker.handler = HandlerKind::Http;
        s.worker.target = Some(sink.url.clone());
        s.dedup.lru_capacity = lru_capacity;
    })
    .await?;
    let result = async {
        let timeout = scratch.settings.ingress.publish_timeout();
        let run_id = short_id();
        let published: Vec<_> = futures::stream::iter(0..PROBE_MESSAGES)
            .map(|i| {
                let env = sample(body, &format!("{run_id}-{i}"));
                let broker = &scratch.broker;
                async move { broker.publish_webhook(&env, timeout).await }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        published.into_iter().collect::<Result<Vec<_>, _>>()?;
        run_probe(&scratch.settings, args).await
    }
    .await;
    scratch.remove().await;
    result
}

async fn run_probe(s: &Settings, args: &BenchArgs) -> anyhow::Result<ProbeReport> {
    let exe = std::env::current_exe().context("cannot find the hookq binary to run the probe")?;
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let env = [
        ("HOOKQ__AMQP__URL", s.amqp.url.clone()),
        ("HOOKQ__AMQP__PREFIX", s.amqp.prefix.clone()),
        (
            "HOOKQ__AMQP__QUEUE_TYPE",
            queue_type_name(s.amqp.queue_type).into(),
        ),
        ("HOOKQ__AMQP__PREFETCH", s.amqp.prefetch.to_string()),
        (
            "HOOKQ__AMQP__DELIVERY_LIMIT",
            s.amqp.delivery_limit.to_string(),
        ),
        ("HOOKQ__WORKER__HANDLER", "http".into()),
        (
            "HOOKQ__WORKER__TARGET",
            s.worker.target.clone().unwrap_or_default(),
        ),
        (
            "HOOKQ__WORKER__CONCURRENCY",
            s.worker.concurrency.to_string(),
        ),
        ("HOOKQ__WORKER__METRICS_LISTEN", "127.0.0.1:0".into()),
        (
            "HOOKQ__RETRY__MAX_ATTEMPTS",
            s.retry.max_attempts.to_string(),
        ),
        (
            "HOOKQ__RETRY__INLINE_ATTEMPTS",
            s.retry.inline_attempts.to_string(),
        ),
        ("HOOKQ__RETRY__DELAYS_MS", list(&s.retry.delays_ms)),
        ("HOOKQ__DEDUP__PATH", s.dedup.path.display().to_string()),
        (
            "HOOKQ__DEDUP__LRU_CAPACITY",
            s.dedup.lru_capacity.to_string(),
        ),
        ("HOOKQ_LOG", "error".into()),
    ];
    let child = tokio::process::Command::new(&exe)
        .args(["bench", "--worker-rss-probe", "--messages"])
        .arg(PROBE_MESSAGES.to_string())
        .arg("--lru-keys")
        .arg(args.lru_keys.to_string())
        .envs(env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} for the memory probe", exe.display()))?;
    let out = tokio::time::timeout(STALL * 2, child.wait_with_output())
        .await
        .context("the memory probe did not finish in time")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "the memory probe ({}) failed: {}",
        exe.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("the memory probe printed {stdout:?}, not its report"))
}

/// The probe process: a worker alone, on the settings the benchmark passed in
/// the environment. Delivers `--messages` webhooks, then fills its LRU.
async fn probe(settings: &Settings, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let stop = CancellationToken::new();
    let running = serve::start(settings, Parts::Worker, stop.clone()).await?;
    let worker = running.worker.clone().context("no worker started")?;
    let expected = (args.messages as usize).min(settings.dedup.lru_capacity);
    let done = poll_until(Instant::now() + STALL, FINE_POLL, || {
        let len = worker.dedup().lru_len();
        async move { len >= expected }
    })
    .await;
    anyhow::ensure!(
        done,
        "the probe worker delivered {} of {expected} webhooks in {STALL:?}",
        worker.dedup().lru_len()
    );
    let rss_after_work_kib = proc_status_kib("VmRSS").context("no /proc/self/status")?;
    for _ in 0..args.lru_keys {
        // A realistic key: a source name and a UUID, as providers' event ids go.
        let key = DedupKey(format!("bench:{}", uuid::Uuid::now_v7()));
        worker.dedup().remember(&key);
    }
    let rss_with_keys_kib = proc_status_kib("VmRSS").context("no /proc/self/status")?;
    let report = ProbeReport {
        rss_after_work_kib,
        rss_with_keys_kib,
        lru_len: worker.dedup().lru_len() as u64,
    };
    stop.cancel();
    running.task.await.context("the probe worker panicked")??;
    print(serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// Output.

fn print_table(r: &Report) {
    let ratio = |x: f64| format!("{x:.2}x");
    let rows: Vec<(String, String, String, String)> = vec![
        (
            "raw broker: publish + confirm (msg/s)".into(),
            format!(
                "{:.0} ({:.0}, {:.0})",
                r.raw_publish_per_s, r.raw_publish_rounds[0], r.raw_publish_rounds[1]
            ),
            String::new(),
            String::new(),
        ),
        (
            "raw broker: consume + ack (msg/s)".into(),
            format!(
                "{:.0} ({:.0}, {:.0})",
                r.raw_consume_per_s, r.raw_consume_rounds[0], r.raw_consume_rounds[1]
            ),
            String::new(),
            String::new(),
        ),
        (
            "ingress: 202s (req/s)".into(),
            format!("{:.0}", r.ingress_per_s),
            format!("{:.0}", r.raw_publish_per_s),
            ratio(r.ingress_ratio),
        ),
        (
            "ingress: latency p50 / p99 (ms)".into(),
            format!("{:.1} / {:.1}", r.ingress_p50_ms, r.ingress_p99_ms),
            String::new(),
            String::new(),
        ),
        (
            "ingress: publish to confirm, mean (ms)".into(),
            format!("{:.1}", r.ingress_publish_avg_ms),
            String::new(),
            String::new(),
        ),
        (
            "CPU per message, this process (us)".into(),
            format!("{:.0}", r.ingress_cpu_us),
            format!("{:.0}", r.raw_publish_cpu_us),
            ratio(r.ingress_cpu_us / r.raw_publish_cpu_us.max(f64::MIN_POSITIVE)),
        ),
        (
            "worker: drain backlog (msg/s)".into(),
            format!("{:.0}", r.worker_per_s),
            format!("{:.0}", r.raw_consume_per_s),
            ratio(r.worker_ratio),
        ),
        (
            "worker: one delivery to the target, mean (ms)".into(),
            format!("{:.2}", r.worker_delivery_avg_ms),
            String::new(),
            String::new(),
        ),
        (
            "worker: dedup writes per SQLite commit".into(),
            format!(
                "{:.1}",
                2.0 * r.messages as f64 / (r.worker_dedup_commits.max(1) as f64)
            ),
            String::new(),
            String::new(),
        ),
        (
            "CPU per message, this process (us)".into(),
            format!("{:.0}", r.worker_cpu_us),
            format!("{:.0}", r.raw_consume_cpu_us),
            ratio(r.worker_cpu_us / r.raw_consume_cpu_us.max(f64::MIN_POSITIVE)),
        ),
        (
            format!(
                "end to end at {}/s, from 202: p50 / p99 (ms)",
                r.e2e_rate_per_s
            ),
            format!("{:.1} / {:.1}", r.e2e_p50_ms, r.e2e_p99_ms),
            String::new(),
            String::new(),
        ),
        (
            format!(
                "end to end at {}/s, from POST: p50 / p99 (ms)",
                r.e2e_rate_per_s
            ),
            format!(
                "{:.1} / {:.1}",
                r.e2e_from_post_p50_ms, r.e2e_from_post_p99_ms
            ),
            String::new(),
            String::new(),
        ),
        (
            "peak memory, this process (MiB)".into(),
            r.peak_rss_mib
                .map_or_else(|| "n/a".into(), |m| format!("{m:.1}")),
            String::new(),
            String::new(),
        ),
        (
            format!("worker RSS: after {PROBE_MESSAGES} deliveries (MiB)"),
            format!("{:.1}", r.worker_rss_before_mib),
            String::new(),
            String::new(),
        ),
        (
            format!("worker RSS: {} keys in the LRU (MiB)", r.worker_lru_len),
            format!("{:.1}", r.worker_rss_after_mib),
            String::new(),
            String::new(),
        ),
    ];
    print(format_args!(
        "hookq bench: {} messages of {} bytes, {} connections, {} queues ({:.0} s)",
        r.messages, r.body_bytes, r.connections, r.queue_type, r.elapsed_s
    ));
    print(format_args!(
        "{:<46} {:>22} {:>12} {:>7}",
        "figure", "value", "raw broker", "ratio"
    ));
    for (figure, value, raw, ratio) in rows {
        print(format_args!(
            "{figure:<46} {value:>22} {raw:>12} {ratio:>7}"
        ));
    }
    if r.ingress_errors > 0 {
        print(format_args!(
            "{} ingress requests were not accepted",
            r.ingress_errors
        ));
    }
    print("targets:");
    for g in &r.goals {
        print(format_args!(
            "  {:<46} {:>8.2} {:<8} {}",
            g.name,
            g.value,
            g.goal,
            if g.met { "met" } else { "MISSED" }
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_fields_parse() {
        if cfg!(target_os = "linux") {
            assert!(proc_status_kib("VmRSS").is_some_and(|k| k > 0));
            assert!(proc_status_kib("VmHWM").is_some_and(|k| k > 0));
        }
        assert_eq!(proc_status_kib("NoSuchField"), None);
    }

    #[test]
    fn usage_errors_name_the_flag() {
        let s = Settings::default();
        let ok = BenchArgs {
            messages: 10,
            connections: 4,
            body_bytes: 1024,
            lru_keys: 0,
            json: false,
            worker_rss_probe: false,
        };
        assert_eq!(usage_error(&ok, &s), None);
        for (bad, flag) in [
            (
                BenchArgs {
                    messages: 0,
                    ..ok.clone()
                },
                "--messages",
            ),
            (
                BenchArgs {
                    connections: 0,
                    ..ok.clone()
                },
                "--connections",
            ),
            (
                BenchArgs {
                    body_bytes: 0,
                    ..ok.clone()
                },
                "--body-bytes",
            ),
            (
                BenchArgs {
                    body_bytes: s.ingress.max_body_bytes + 1,
                    ..ok.clone()
                },
                "--body-bytes",
            ),
        ] {
            assert!(usage_error(&bad, &s).is_some_and(|m| m.contains(flag)));
        }
    }
}
