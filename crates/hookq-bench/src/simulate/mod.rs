//! `hookq simulate`: the real pipeline (ingress, RabbitMQ, worker with dedup and
//! retries) against a built-in flaky target, to see what a failure rate and a
//! retry budget give, and that every webhook ends delivered or dead-lettered.
//!
//! Everything runs in this process in a throwaway [`Sandbox`]: its own amqp
//! prefix (deleted at the end), its own dedup file, port-0 listeners, and
//! millisecond delay tiers so that five attempts take milliseconds, not the
//! production tiers' minutes. The run ends when the worker's events say every
//! webhook was delivered or dead-lettered; the target's own tally says what it
//! saw (a 2xx twice would be a broken promise). The target's breaker is off
//! here: `--outage-s` shows what it changes.

mod flaky;
mod outage;
mod report;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::StatusCode;
use futures::StreamExt;
use serde::Serialize;

use crate::args::SimulateArgs;
use crate::stats::{ms, quantile};
use flaky::KeyRecord;
use hookq::cli::print;
use hookq::cli::progress::Progress;
use hookq::config::{HandlerKind, Settings, TargetRef, TargetSettings, TargetUrl};
use hookq::events::{Event, Outcome};
use hookq::system::Parts;
use hookq_testkit::FakeTarget;
use hookq_testkit::{Sandbox, WaitError, short_id, wait_for};

/// Delay tiers of the simulated pipeline: long enough to go through the broker
/// (TTL, dead-lettering back to work), short enough that a run takes seconds.
const SIM_DELAYS_MS: [u64; 3] = [20, 40, 80];
/// The worker's per-delivery timeout in the simulation; a "timeout" answer from
/// the flaky target stalls [`STALL_EXTRA`] longer than this.
const SIM_TIMEOUT: Duration = Duration::from_millis(200);
const STALL_EXTRA: Duration = Duration::from_millis(200);
/// Webhooks posted to the ingress at once.
const SEND_CONCURRENCY: usize = 16;
/// How long a started part may take to become ready.
const READY_WITHIN: Duration = Duration::from_secs(15);

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
    if args.outage_s == Some(0) || args.outage_s.is_some_and(|s| s > 3600) {
        return Some("--outage-s must be between 1 and 3600 seconds".into());
    }
    rate("failure-rate", args.failure_rate).or_else(|| rate("timeout-rate", args.timeout_rate))
}

pub async fn run(settings: &Settings, args: &SimulateArgs) -> anyhow::Result<ExitCode> {
    if let Some(problem) = usage_error(args) {
        eprintln!("hookq simulate: {problem}");
        return Ok(ExitCode::from(2));
    }
    if let Some(secs) = args.outage_s {
        let report = outage::simulate(settings, args, Duration::from_secs(secs)).await?;
        if args.json {
            print(serde_json::to_string(&report)?);
        } else {
            outage::print_report(&report);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let report = simulate(settings, args).await?;
    if args.json {
        print(serde_json::to_string(&report)?);
    } else {
        report::print_report(&report);
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
    let target = flaky::start(
        args.failure_rate,
        args.timeout_rate,
        SIM_TIMEOUT + STALL_EXTRA,
    )
    .await;

    // The breaker off: a run of failures would hold the messages instead of
    // spending their attempts, and the figures here are the retry policy's
    // (`--outage-s` compares the breaker on and off).
    let mut sandbox = sandbox(settings, "sim", &target.url, 0, args)?;
    sandbox.settings.retry.jitter = 0.1;
    // Proves the broker is reachable before anything starts.
    let result = match sandbox.broker().await {
        Ok(_) => drive(&sandbox, &target, args).await,
        Err(e) => Err(e.into()),
    };
    sandbox.remove().await;
    target.stop();
    result
}

/// A scratch sandbox delivering to `url` as the target `app` with
/// `breaker_failures`, with the simulation's short timeout, delay tiers and
/// `args.max_attempts`.
fn sandbox(
    settings: &Settings,
    name: &str,
    url: &str,
    breaker_failures: u32,
    args: &SimulateArgs,
) -> anyhow::Result<Sandbox> {
    let mut sandbox =
        Sandbox::new(settings, name).context("cannot make the simulation's scratch directory")?;
    let s = &mut sandbox.settings;
    s.worker.handler = HandlerKind::Http;
    s.targets.insert(
        "app".into(),
        TargetSettings {
            url: Some(TargetUrl::parse(url).map_err(anyhow::Error::msg)?),
            breaker_failures,
            ..Default::default()
        },
    );
    s.worker.target = Some(TargetRef::Named("app".into()));
    s.worker.timeout = SIM_TIMEOUT;
    s.retry.max_attempts = args.max_attempts;
    s.retry.inline_attempts_set = Some(args.max_attempts.min(2));
    s.retry.inline_delay = Duration::from_millis(5);
    s.retry.delays = SIM_DELAYS_MS.map(Duration::from_millis).to_vec();
    Ok(sandbox)
}

/// Starts `up`, sends, waits for every outcome, stops, and tallies.
async fn drive(
    sandbox: &Sandbox,
    target: &FakeTarget,
    args: &SimulateArgs,
) -> anyhow::Result<Report> {
    let n = args.deliveries;
    let progress = Progress::new("hookq simulate:", "settled");
    let started = Instant::now();
    let up = sandbox.start(Parts::Up).await?;
    anyhow::ensure!(
        up.ready(READY_WITHIN).await,
        "hookq did not become ready within {READY_WITHIN:?}"
    );
    let mut events = up.subscribe();
    let ingress = up
        .ingress_addr
        .context("the simulated ingress has no address")?;

    // Send: unique idempotency keys, so each webhook is its own key.
    let run_id = short_id();
    let http = reqwest::Client::new();
    let url = format!("http://{ingress}/hooks/sim");
    let sent = AtomicU32::new(0);
    let sending = futures::stream::iter(0..n)
        .map(|i| {
            let (http, url, run_id, sent) = (&http, &url, &run_id, &sent);
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
                sent.fetch_add(1, Ordering::Relaxed);
                Ok((key, at))
            }
        })
        .buffer_unordered(SEND_CONCURRENCY)
        .collect::<Vec<anyhow::Result<(String, Instant)>>>();

    // Settle: every webhook delivered or dead, as the worker reports it. The
    // events are counted while sending, so none is missed.
    let worst_per_message =
        (SIM_TIMEOUT + STALL_EXTRA + Duration::from_millis(SIM_DELAYS_MS[2])) * args.max_attempts;
    let within = Duration::from_secs(30)
        + worst_per_message
            * n.div_ceil(
                u32::try_from(sandbox.settings.worker.concurrency)
                    .unwrap_or(1)
                    .max(1),
            )
            .min(10_000);
    let (mut delivered, mut dead) = (0u32, 0u32);
    let settle = wait_for(&mut events, within, |e| {
        if let Event::Settled { outcome, .. } = e {
            match outcome {
                Outcome::Delivered { .. } => delivered += 1,
                Outcome::Dead { .. } => dead += 1,
                _ => {}
            }
            progress.update(u64::from(delivered + dead), u64::from(n), || {
                format!("{} sent", sent.load(Ordering::Relaxed))
            });
        }
        delivered + dead >= n
    });
    let (accepted, settled) = tokio::join!(sending, settle);
    let accepted: HashMap<String, Instant> = accepted.into_iter().collect::<Result<_, _>>()?;
    match settled {
        Ok(()) | Err(WaitError::TimedOut(_)) => {}
        Err(e) => anyhow::bail!("lost track of the outcomes: {e}"),
    }
    up.shutdown().await?;
    progress.finish();
    let elapsed = started.elapsed();

    // Stalled answers still pending are logged once they are given.
    let deadline = Instant::now() + SIM_TIMEOUT + STALL_EXTRA * 2;
    while target.count() < target.started() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let keys = flaky::records(&target.received(), SIM_TIMEOUT);
    Ok(tally(args, &accepted, &keys, dead, elapsed))
}

fn tally(
    args: &SimulateArgs,
    accepted: &HashMap<String, Instant>,
    keys: &HashMap<String, KeyRecord>,
    dead: u32,
    elapsed: Duration,
) -> Report {
    let total = u32::try_from(accepted.len()).unwrap_or(u32::MAX);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(deliveries: u32, p: f64, t: f64, k: u32) -> SimulateArgs {
        SimulateArgs {
            deliveries,
            failure_rate: p,
            timeout_rate: t,
            max_attempts: k,
            outage_s: None,
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
