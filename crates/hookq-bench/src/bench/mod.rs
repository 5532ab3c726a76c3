//! `hookq bench`: what the ingress, the worker and the dead-letter tools
//! achieve on this machine and broker, set beside the code a user would write
//! by hand instead of hookq (`baselines`) and beside the broker with nothing
//! around it, in one run on throwaway prefixes.
//!
//! Phases, in order:
//! 1. raw broker: `--messages` persistent publishes with pipelined confirms
//!    (`--connections` in flight, to the same exchange and routing key), then
//!    consuming them with manual acks at the configured prefetch: lapin on its
//!    own connection. Measured again after the worker phases, and averaged,
//!    because a shared machine's background load drifts within a run;
//! 2. the hand-written ingress, then hookq's: `--messages` POSTs from the
//!    built-in client (`load`), `--connections` at once, unique keys,
//!    `--body-bytes` bodies;
//! 3. hookq's worker draining the backlog the ingress left (dedup on) to a
//!    local target that answers 200, then the hand-written forwarder draining
//!    the hand-written ingress's backlog to the same target;
//! 4. dead letters (`dead`): `dlq list` and `shovel` over `--messages` dead
//!    letters, then the hand-written shovel moving them back;
//! 5. end to end: `up` at a moderate, paced rate; time from each 202 to the
//!    delivery at the target;
//! 6. memory: this process's peak, and a lone worker process (this binary with
//!    a hidden flag) measured after real work and again with `--lru-keys` keys
//!    in its LRU;
//! 7. with `--partitions N` (`scale`): 3 worker processes (a store each) on N
//!    partitions against 1 on 1.
//!
//! Where the time goes is reported beside each rate: CPU per message of this
//! process, the ingress's publish-to-confirm time and the worker's delivery
//! time and SQLite batching (both read from the parts' own /metrics).
//!
//! Every part shares the machine with the client, the target and RabbitMQ, as
//! it would on a small host; the ratios are what to compare across machines.

mod baselines;
mod dead;
mod hand;
mod load;
mod phases;
mod probe;
mod report;
mod scale;
mod store;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::args::BenchArgs;
use baselines::Shape;
use hookq::cli::print;
use hookq::config::{HandlerKind, Settings};
use hookq::message::{DedupKey, Envelope};
use hookq_testkit::FakeTarget;
use hookq_testkit::Sandbox;
use phases::RawFigures;
use probe::proc_status_kib;
pub use report::{Goal, Report};

/// Webhooks per second in the end-to-end phase: well under what the ingress
/// and the worker sustain, so the figure is latency, not queueing.
const E2E_RATE: u32 = 200;
/// Messages the lone worker process delivers before its memory is measured.
const PROBE_MESSAGES: u32 = 2000;
/// A phase that makes no progress for this long has failed.
const STALL: Duration = Duration::from_secs(60);

/// Targets: hookq against the code a user would write by hand, the worker
/// against the raw broker, the dead-letter tools, memory.
const HAND_RATIO_GOAL: f64 = 0.9;
const INGRESS_P99_GOAL_MS: f64 = 20.0;
const WORKER_RATIO_GOAL: f64 = 0.6;
const DEAD_LETTERS_GOAL_PER_S: f64 = 10_000.0;
const WORKER_RSS_GOAL_MIB: f64 = 64.0;

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
    if a.partitions == 1 || a.partitions > 1024 {
        return Some("--partitions must be 0 (skip) or between 2 and 1024".into());
    }
    if a.target_rate.is_some_and(|r| !(r.is_finite() && r >= 0.0)) {
        return Some("--target-rate must be a number of at least 0 (0: no limit)".into());
    }
    if a.store_keys.is_empty()
        || a.store_keys.contains(&0)
        || !a.store_keys.is_sorted_by(|a, b| a < b)
    {
        return Some("--store-keys must be sizes of at least 1, ascending".into());
    }
    if a.target_max_concurrency == Some(0) {
        return Some("--target-max-concurrency must be at least 1".into());
    }
    None
}

pub async fn run(settings: &Settings, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(problem) = usage_error(args, settings) {
        eprintln!("hookq bench: {problem}");
        return Ok(ExitCode::from(2));
    }
    if args.store {
        let figures = store::run(&args.store_keys).await?;
        if args.json {
            print(serde_json::to_string(&figures)?);
        } else {
            store::print_table(&figures);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let report = bench(settings, args).await?;
    if args.json {
        print(serde_json::to_string(&report)?);
    } else {
        report::print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The broker the benchmark's own lapin connections use: the first of
/// `amqp.url`.
fn first_url(settings: &Settings) -> anyhow::Result<&hookq::config::AmqpUrl> {
    settings
        .amqp
        .urls
        .first()
        .context("amqp.url lists no broker")
}

/// The fake target as a delivery URL.
fn target_url(target: &FakeTarget) -> anyhow::Result<hookq::config::TargetUrl> {
    hookq::config::TargetUrl::parse(&target.url).map_err(anyhow::Error::msg)
}

/// Stops the target when the benchmark ends, however it ends.
struct StopOnDrop<'a>(&'a FakeTarget);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop();
    }
}

fn say(what: impl std::fmt::Display) {
    eprintln!("hookq bench: {what}");
}

fn per_s(n: u32, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 { f64::from(n) / s } else { 0.0 }
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
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

/// What the phases on the bench's prefix measured.
struct Measured {
    hand_ingress: load::IngressFigures,
    hand_same: load::IngressFigures,
    hand_direct: load::IngressFigures,
    ingress: load::IngressFigures,
    worker: phases::WorkerFigures,
    hand_forwarder: hand::ForwardFigures,
    raw_after: RawFigures,
    dead: dead::DeadFigures,
    e2e: phases::E2eFigures,
}

pub async fn bench(settings: &Settings, args: &BenchArgs) -> anyhow::Result<Report> {
    let started = Instant::now();
    let n = args.messages;
    let body = vec![b'x'; args.body_bytes];
    let sink = FakeTarget::sink().await?;
    let _stop_sink = StopOnDrop(&sink);

    // 1. The broker alone; measured again after the worker phase, because a
    // shared machine's background load drifts within a run.
    let raw_before = phases::raw(settings, args, &body).await?;

    // 2-4 on one throwaway prefix.
    let mut sandbox = Sandbox::new(settings, "bench").context("cannot make a scratch directory")?;
    sandbox.settings.worker.handler = HandlerKind::Http;
    sandbox.settings.worker.target = Some(target_url(&sink)?.into());
    if args.target_rate.is_some() || args.target_max_concurrency.is_some() {
        let limits = hookq::config::TargetSettings {
            url: Some(target_url(&sink)?),
            rate_per_s: args.target_rate.unwrap_or(0.0),
            max_concurrency: args.target_max_concurrency,
            ..Default::default()
        };
        say(format_args!(
            "the worker delivers to a limited target: rate_per_s {}, max_concurrency {}",
            limits.rate_per_s,
            limits
                .max_concurrency
                .map_or("worker.concurrency".into(), |c| c.to_string())
        ));
        sandbox.settings.targets.insert("bench".into(), limits);
        sandbox.settings.worker.target = Some(hookq::config::TargetRef::Named("bench".into()));
    }
    let phases = async {
        sandbox.broker().await?;
        let hand_ingress = hand::hand_ingress(&sandbox, args, &body, Shape::Bare).await?;
        let hand_same = hand::hand_ingress(&sandbox, args, &body, Shape::Hookq).await?;
        let hand_direct = hand::hand_ingress(&sandbox, args, &body, Shape::HookqDirect).await?;
        let ingress = phases::ingress(&sandbox, args, &body).await?;
        let worker = phases::worker(&sandbox, &sink, &ingress.keys).await?;
        let hand_count = u32::try_from(hand_ingress.keys.len()).unwrap_or(u32::MAX);
        let hand_forwarder = hand::hand_forwarder(&sandbox, &sink, hand_count).await?;
        let raw_after = phases::raw(settings, args, &body).await?;
        let dead = dead::dead_letters(settings, args, &body).await?;
        let e2e = phases::e2e(&sandbox, &sink, args, &body).await?;
        anyhow::Ok(Measured {
            hand_ingress,
            hand_same,
            hand_direct,
            ingress,
            worker,
            hand_forwarder,
            raw_after,
            dead,
            e2e,
        })
    }
    .await;
    hand::remove_hand_queue(&sandbox).await;
    sandbox.remove().await;
    let Measured {
        hand_ingress,
        hand_same,
        hand_direct,
        ingress,
        worker,
        hand_forwarder,
        raw_after,
        dead,
        e2e,
    } = phases?;
    let raw = RawFigures::mean(&raw_before, &raw_after);

    let scale = match args.partitions {
        0 => None,
        n => Some(scale::scale(settings, &sink, &body, n, args.messages).await?),
    };

    // 5. Memory.
    let peak_rss_mib = proc_status_kib("VmHWM").map(kib_to_mib);
    let rss = probe::worker_rss(settings, args, &sink, &body).await?;

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let ingress_ratio = ratio(ingress.per_s, raw.publish_per_s);
    let ingress_vs_hand = ratio(ingress.per_s, hand_ingress.per_s);
    let ingress_vs_same = ratio(ingress.per_s, hand_same.per_s);
    let worker_ratio = ratio(worker.per_s, raw.consume_per_s);
    let worker_vs_hand = ratio(worker.per_s, hand_forwarder.per_s);
    let after_mib = kib_to_mib(rss.rss_with_keys_kib);
    let goal = |name: String, goal: String, value: f64, met: bool| Goal {
        name,
        goal,
        value,
        met,
    };
    let goals = vec![
        goal(
            "ingress rate / hand-written ingress".into(),
            format!(">= {HAND_RATIO_GOAL}"),
            ingress_vs_hand,
            ingress_vs_hand >= HAND_RATIO_GOAL,
        ),
        goal(
            "ingress rate / hand-written ingress of hookq's message".into(),
            format!(">= {HAND_RATIO_GOAL}"),
            ingress_vs_same,
            ingress_vs_same >= HAND_RATIO_GOAL,
        ),
        goal(
            format!("ingress p99 at {} connections (ms)", args.connections),
            format!("< {INGRESS_P99_GOAL_MS}"),
            ingress.p99_ms,
            ingress.p99_ms < INGRESS_P99_GOAL_MS,
        ),
        goal(
            "worker rate / hand-written forwarder".into(),
            format!(">= {HAND_RATIO_GOAL}"),
            worker_vs_hand,
            worker_vs_hand >= HAND_RATIO_GOAL,
        ),
        goal(
            "worker rate / raw consume rate".into(),
            format!(">= {WORKER_RATIO_GOAL}"),
            worker_ratio,
            worker_ratio >= WORKER_RATIO_GOAL,
        ),
        goal(
            "dlq list (msg/s)".into(),
            format!(">= {DEAD_LETTERS_GOAL_PER_S}"),
            dead.list_per_s,
            dead.list_per_s >= DEAD_LETTERS_GOAL_PER_S,
        ),
        goal(
            "shovel (msg/s)".into(),
            format!(">= {DEAD_LETTERS_GOAL_PER_S}"),
            dead.shovel_per_s,
            dead.shovel_per_s >= DEAD_LETTERS_GOAL_PER_S,
        ),
        goal(
            format!("worker RSS with {} LRU keys (MiB)", args.lru_keys),
            format!("< {WORKER_RSS_GOAL_MIB}"),
            after_mib,
            after_mib < WORKER_RSS_GOAL_MIB,
        ),
    ];
    Ok(Report {
        messages: n,
        connections: args.connections,
        body_bytes: args.body_bytes,
        queue_type: settings.amqp.queue_type.as_str().into(),
        raw_publish_per_s: raw.publish_per_s,
        raw_bare_publish_per_s: raw.bare_publish_per_s,
        raw_publish_vs_bare: ratio(raw.publish_per_s, raw.bare_publish_per_s),
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
        hand_ingress_per_s: hand_ingress.per_s,
        hand_ingress_p99_ms: hand_ingress.p99_ms,
        hand_ingress_cpu_us: hand_ingress.cpu_us,
        ingress_vs_hand,
        hand_same_ingress_per_s: hand_same.per_s,
        hand_same_ingress_p99_ms: hand_same.p99_ms,
        hand_same_ingress_cpu_us: hand_same.cpu_us,
        hand_direct_ingress_per_s: hand_direct.per_s,
        direct_vs_topic: ratio(hand_direct.per_s, hand_same.per_s),
        ingress_vs_same,
        ingress_publish_avg_ms: ingress.publish_avg_ms,
        worker_per_s: worker.per_s,
        worker_ratio,
        worker_cpu_us: worker.cpu_us,
        hand_forwarder_per_s: hand_forwarder.per_s,
        hand_forwarder_cpu_us: hand_forwarder.cpu_us,
        worker_vs_hand,
        dead_letters: dead.count,
        dlq_list_per_s: dead.list_per_s,
        dlq_list_cpu_us: dead.list_cpu_us,
        shovel_per_s: dead.shovel_per_s,
        shovel_cpu_us: dead.shovel_cpu_us,
        hand_move_per_s: dead.hand_move_per_s,
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
        worker_rss_before_mib: kib_to_mib(rss.rss_after_work_kib),
        worker_rss_after_mib: after_mib,
        worker_lru_len: rss.lru_len,
        scale,
        elapsed_s: started.elapsed().as_secs_f64(),
        goals,
    })
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
            partitions: 0,
            target_rate: None,
            target_max_concurrency: None,
            store: false,
            store_keys: vec![1_000_000, 10_000_000],
            json: false,
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
            (
                BenchArgs {
                    target_rate: Some(f64::NAN),
                    ..ok.clone()
                },
                "--target-rate",
            ),
            (
                BenchArgs {
                    target_max_concurrency: Some(0),
                    ..ok.clone()
                },
                "--target-max-concurrency",
            ),
            (
                BenchArgs {
                    store_keys: vec![10, 5],
                    ..ok.clone()
                },
                "--store-keys",
            ),
        ] {
            assert!(usage_error(&bad, &s).is_some_and(|m| m.contains(flag)));
        }
    }
}
