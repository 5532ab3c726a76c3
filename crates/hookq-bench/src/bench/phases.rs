//! The benchmark's phases: the raw broker, the ingress under load, the worker
//! draining a backlog, and end to end at a paced rate. Each runs real parts in
//! this process and waits on their events, never on the broker's counters.

use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::StatusCode;
use tokio::sync::broadcast;

use super::load::{IngressFigures, load};
use super::probe::{cpu_time, cpu_us_per, mean_ms};
use super::{E2E_RATE, STALL, baselines, first_url, per_s, sample, say};
use crate::args::BenchArgs;
use crate::stats::{ms, quantile};
use hookq::config::Settings;
use hookq::events::{Event, Outcome};
use hookq::system::Parts;
use hookq_testkit::FakeTarget;
use hookq_testkit::{Sandbox, short_id, wait_for};

/// How long a started part may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(15);

pub(super) struct RawFigures {
    pub publish_per_s: f64,
    /// The hand-written ingress's message (the body alone, straight into a
    /// queue) published the same way.
    pub bare_publish_per_s: f64,
    pub consume_per_s: f64,
    pub publish_cpu_us: f64,
    pub consume_cpu_us: f64,
}

impl RawFigures {
    pub fn mean(a: &Self, b: &Self) -> Self {
        Self {
            publish_per_s: (a.publish_per_s + b.publish_per_s) / 2.0,
            bare_publish_per_s: (a.bare_publish_per_s + b.bare_publish_per_s) / 2.0,
            consume_per_s: (a.consume_per_s + b.consume_per_s) / 2.0,
            publish_cpu_us: (a.publish_cpu_us + b.publish_cpu_us) / 2.0,
            consume_cpu_us: (a.consume_cpu_us + b.consume_cpu_us) / 2.0,
        }
    }
}

/// `--messages` persistent publishes to the same exchange and routing key as
/// the ingress, `--connections` awaiting confirms at once, then as many of the
/// hand-written ingress's bare messages into the queue, then consuming hookq's
/// with manual acks at the configured prefetch, on a prefix of its own.
pub(super) async fn raw(
    settings: &Settings,
    args: &BenchArgs,
    body: &[u8],
) -> anyhow::Result<RawFigures> {
    let n = args.messages;
    say(format_args!(
        "raw broker: {n} persistent publishes, {} awaiting confirms at once (hookq's message, then a bare one); then consuming them, prefetch {}",
        args.connections, settings.amqp.prefetch
    ));
    let rawq = Sandbox::new(settings, "bench-raw").context("cannot make a scratch directory")?;
    let result = async {
        rawq.broker().await?;
        let topo = rawq.topology();
        let (queue, exchange) = (topo.work(0), topo.exchange());
        let url = first_url(&rawq.settings)?;
        let env = sample(body, "raw");
        let routing_key = topo.routing_key(&env.source, &env.key);
        let cpu = cpu_time();
        let publish =
            baselines::publish_confirmed(url, &exchange, &routing_key, &env, n, args.connections)
                .await?;
        let publish_cpu_us = cpu_us_per(cpu, n);
        let bare = baselines::publish_bare(url, &queue, body, n, args.connections).await?;
        let cpu = cpu_time();
        let consume = tokio::time::timeout(
            STALL + Duration::from_millis(u64::from(n)),
            baselines::consume_acked(url, &queue, n, settings.amqp.prefetch),
        )
        .await
        .context("the raw consumer did not get every message in time")??;
        // The bare messages: consumed only to empty the queue.
        tokio::time::timeout(
            STALL + Duration::from_millis(u64::from(n)),
            baselines::consume_acked(url, &queue, n, settings.amqp.prefetch),
        )
        .await
        .context("the raw consumer did not get every bare message in time")??;
        anyhow::Ok(RawFigures {
            publish_per_s: per_s(n, publish),
            bare_publish_per_s: per_s(n, bare),
            consume_per_s: per_s(n, consume),
            publish_cpu_us,
            consume_cpu_us: cpu_us_per(cpu, n),
        })
    }
    .await;
    rawq.remove().await;
    result
}

pub(super) async fn ingress(
    sandbox: &Sandbox,
    args: &BenchArgs,
    body: &[u8],
) -> anyhow::Result<IngressFigures> {
    say(format_args!(
        "ingress: {} POSTs of {} bytes over {} connections",
        args.messages,
        body.len(),
        args.connections
    ));
    let part = sandbox.start(Parts::Ingress).await?;
    anyhow::ensure!(
        part.ready(READY_WITHIN).await,
        "the ingress did not become ready"
    );
    let addr = part.ingress_addr.context("the ingress has no address")?;
    let figures = load(
        &format!("http://{addr}/hooks/bench"),
        args,
        body,
        "the ingress",
    )
    .await;
    let metrics = part.metrics_text();
    part.shutdown().await?;
    Ok(IngressFigures {
        publish_avg_ms: mean_ms(&metrics, "hookq_ingress_publish_seconds"),
        ..figures?
    })
}

pub(super) struct WorkerFigures {
    pub per_s: f64,
    pub cpu_us: f64,
    pub delivery_avg_ms: f64,
    pub dedup_commits: u64,
}

/// Drains the ingress phase's backlog; messages per second from the first
/// delivery at the target until the worker reports the last one delivered
/// (recorded and acked).
pub(super) async fn worker(
    sandbox: &Sandbox,
    sink: &FakeTarget,
    keys: &[String],
) -> anyhow::Result<WorkerFigures> {
    let total = u32::try_from(keys.len()).unwrap_or(u32::MAX);
    say(format_args!(
        "worker: draining a backlog of {total} messages (dedup on, target answers 200)"
    ));
    sink.note_keys(false);
    sink.mark();
    let cpu = cpu_time();
    let part = sandbox.start(Parts::Worker).await?;
    let mut events = part.subscribe();
    let delivered = count_delivered(&mut events, total).await;
    let finished = Instant::now();
    let cpu_us = cpu_us_per(cpu, total);
    let metrics = part.metrics_text();
    part.shutdown().await?;
    sink.note_keys(true);
    anyhow::ensure!(
        delivered == total,
        "the worker delivered {delivered} of {total} messages and then made no progress for {STALL:?}"
    );
    let first = sink
        .first_since_mark()
        .context("the target saw none of the backlog")?;
    Ok(WorkerFigures {
        per_s: per_s(total, finished.saturating_duration_since(first)),
        cpu_us,
        delivery_avg_ms: mean_ms(&metrics, "hookq_worker_delivery_seconds"),
        dedup_commits: hookq_testkit::metrics::value(&metrics, "hookq_dedup_commits_total")
            .map_or(0, |c| c as u64),
    })
}

/// How long the bench lets events gather between its looks at them. Waking
/// on every message would cost the worker a thread wake per message that a
/// production worker, with nobody subscribed, does not pay; the hand-written
/// forwarder pays none either. It adds at most this much to a phase's time.
const GATHER: Duration = Duration::from_millis(1);

/// Counts `Delivered` events until `total`, or until no event came for
/// [`STALL`]. A subscriber that lost events stops the count short.
pub(super) async fn count_delivered(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    total: u32,
) -> u32 {
    let is_delivered = |e: &Event| {
        matches!(
            e,
            Event::Settled {
                outcome: Outcome::Delivered { .. },
                ..
            }
        )
    };
    let mut delivered = 0;
    while delivered < total {
        let got = wait_for(events, STALL, |e| {
            delivered += u32::from(is_delivered(e));
            true
        })
        .await;
        if got.is_err() {
            break;
        }
        if delivered < total {
            tokio::time::sleep(GATHER).await;
        }
        loop {
            match events.try_recv() {
                Ok(e) => delivered += u32::from(is_delivered(&e)),
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(_) => return delivered,
            }
        }
    }
    delivered
}

pub(super) struct E2eFigures {
    pub messages: u32,
    /// p50 and p99 in milliseconds.
    pub from_202: (f64, f64),
    pub from_post: (f64, f64),
}

pub(super) async fn e2e(
    sandbox: &Sandbox,
    sink: &FakeTarget,
    args: &BenchArgs,
    body: &[u8],
) -> anyhow::Result<E2eFigures> {
    let m = (args.messages / 10).clamp(50, 2000);
    say(format_args!(
        "end to end: {m} webhooks at {E2E_RATE}/s through ingress, broker and worker"
    ));
    let up = sandbox.start(Parts::Up).await?;
    anyhow::ensure!(up.ready(READY_WITHIN).await, "hookq did not become ready");
    let mut events = up.subscribe();
    let addr = up.ingress_addr.context("the ingress has no address")?;
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/hooks/bench");
    let run_id = short_id();
    // Paced: one request per tick, each on its own task so a slow answer does
    // not hold back the next send.
    let mut tick = tokio::time::interval(Duration::from_secs(1) / E2E_RATE);
    let mut sends = Vec::with_capacity(usize::try_from(m).unwrap_or(0));
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
    let want = u32::try_from(accepted.len()).unwrap_or(u32::MAX);
    let delivered = count_delivered(&mut events, want).await;
    up.shutdown().await?;
    anyhow::ensure!(
        delivered == want,
        "end to end: {delivered} of {want} webhooks reached the target, then none for {STALL:?}"
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
        messages: want,
        from_202: p50_p99(from_202),
        from_post: p50_p99(from_post),
    })
}
