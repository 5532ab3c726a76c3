//! `hookq simulate --outage-s N`: the same outage twice, with the target's
//! breaker and without it (`breaker_failures = 0`). Webhooks arrive evenly
//! over N seconds while the application answers 503; then it recovers. The
//! report says, for each run, how many ended dead, how many were delivered,
//! and how many requests the down application had to answer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::StatusCode;
use hookq::cli::print;
use hookq::config::Settings;
use hookq::events::{Event, Outcome};
use hookq::system::Parts;
use hookq_testkit::{FakeTarget, Sandbox, WaitError, short_id, wait_for};
use serde::Serialize;

use super::READY_WITHIN;
use crate::args::SimulateArgs;

/// One run of the outage.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub breaker: bool,
    pub accepted: u32,
    /// Dead-lettered (all of them because the target was down).
    pub dead: u32,
    /// Keys answered 2xx.
    pub delivered: u32,
    /// Keys answered 2xx more than once (0 unless "once" broke).
    pub duplicates: u32,
    /// Requests the application got while it was down.
    pub requests_during_outage: u32,
    /// From the recovery to the last delivery.
    pub drained_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub outage_s: u64,
    pub deliveries: u32,
    pub max_attempts: u32,
    pub with_breaker: Run,
    pub without_breaker: Run,
}

/// Both runs, then the report.
pub async fn simulate(
    settings: &Settings,
    args: &SimulateArgs,
    outage: Duration,
) -> anyhow::Result<Report> {
    let with_breaker = once(settings, args, outage, true).await?;
    let without_breaker = once(settings, args, outage, false).await?;
    Ok(Report {
        outage_s: outage.as_secs(),
        deliveries: args.deliveries,
        max_attempts: args.max_attempts,
        with_breaker,
        without_breaker,
    })
}

/// One column of the report: how a run's figure is shown.
type Column = fn(&Run) -> String;

pub fn print_report(r: &Report) {
    print(format!(
        "hookq simulate --outage-s {}: {} webhooks arriving evenly over a {} s outage (the application answers 503), max_attempts {}",
        r.outage_s, r.deliveries, r.outage_s, r.max_attempts
    ));
    print(format!(
        "{:<34} {:>12} {:>12}",
        "", "breaker on", "breaker off"
    ));
    let rows: [(&str, Column); 5] = [
        ("dead-lettered", |x| x.dead.to_string()),
        ("delivered (each once)", |x| x.delivered.to_string()),
        ("delivered twice", |x| x.duplicates.to_string()),
        ("requests to the down application", |x| {
            x.requests_during_outage.to_string()
        }),
        ("drained after recovery", |x| {
            format!("{:.1} s", x.drained_ms / 1000.0)
        }),
    ];
    for (label, f) in rows {
        print(format!(
            "{label:<34} {:>12} {:>12}",
            f(&r.with_breaker),
            f(&r.without_breaker)
        ));
    }
}

/// One run on a sandbox of its own.
async fn once(
    settings: &Settings,
    args: &SimulateArgs,
    outage: Duration,
    breaker: bool,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    let up_at = started + outage;
    let target = FakeTarget::start(move |_, _| {
        if Instant::now() < up_at {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        }
    })
    .await;
    let breaker_failures = if breaker { 10 } else { 0 };
    let sandbox = super::sandbox(settings, "outage", &target.url, breaker_failures, args)?;
    let result = match sandbox.broker().await {
        Ok(_) => drive(&sandbox, &target, args, started, up_at, breaker).await,
        Err(e) => Err(e.into()),
    };
    sandbox.remove().await;
    target.stop();
    result
}

async fn drive(
    sandbox: &Sandbox,
    target: &FakeTarget,
    args: &SimulateArgs,
    started: Instant,
    up_at: Instant,
    breaker: bool,
) -> anyhow::Result<Run> {
    let up = sandbox.start(Parts::Up).await?;
    anyhow::ensure!(
        up.ready(READY_WITHIN).await,
        "hookq did not become ready within {READY_WITHIN:?}"
    );
    let mut events = up.subscribe();
    let ingress = up
        .ingress_addr
        .context("the simulated ingress has no address")?;
    let http = reqwest::Client::new();
    let run_id = short_id();
    let n = args.deliveries;
    let outage = up_at.saturating_duration_since(started);
    let sending = async {
        let mut accepted = 0u32;
        for i in 0..n {
            // Evenly over the outage.
            let at = started + outage.mul_f64(f64::from(i) / f64::from(n));
            tokio::time::sleep_until(at.into()).await;
            let r = http
                .post(format!("http://{ingress}/hooks/sim"))
                .header("content-type", "application/json")
                .header("idempotency-key", format!("{run_id}-{i}"))
                .body(format!(r#"{{"simulated": {i}}}"#))
                .send()
                .await
                .context("posting to the simulated ingress")?;
            anyhow::ensure!(
                r.status() == StatusCode::ACCEPTED,
                "the ingress answered {}",
                r.status()
            );
            accepted += 1;
        }
        Ok(accepted)
    };
    let (mut delivered, mut dead) = (0u32, 0u32);
    // Held messages wait for the probes (up to a minute apart by default).
    let within = outage + Duration::from_secs(180);
    let settle = wait_for(&mut events, within, |e| {
        if let Event::Settled { outcome, .. } = e {
            match outcome {
                Outcome::Delivered { .. } => delivered += 1,
                Outcome::Dead { .. } => dead += 1,
                _ => {}
            }
        }
        delivered + dead >= n
    });
    let (accepted, settled) = tokio::join!(sending, settle);
    let accepted = accepted?;
    match settled {
        Ok(()) => {}
        Err(WaitError::TimedOut(_)) => anyhow::bail!(
            "{} of {n} webhooks were neither delivered nor dead-lettered in time (breaker {})",
            n - delivered - dead,
            if breaker { "on" } else { "off" }
        ),
        Err(e) => anyhow::bail!("lost track of the outcomes: {e}"),
    }
    up.shutdown().await?;
    let log = target.received();
    let mut successes: HashMap<String, u32> = HashMap::new();
    let mut last = up_at;
    for r in log.iter().filter(|r| r.is_success()) {
        *successes.entry(r.key()).or_default() += 1;
        last = last.max(r.at);
    }
    Ok(Run {
        breaker,
        accepted,
        dead,
        delivered: u32::try_from(successes.len()).unwrap_or(u32::MAX),
        duplicates: u32::try_from(successes.values().filter(|n| **n > 1).count())
            .unwrap_or(u32::MAX),
        requests_during_outage: u32::try_from(log.iter().filter(|r| r.at < up_at).count())
            .unwrap_or(u32::MAX),
        drained_ms: last.saturating_duration_since(up_at).as_secs_f64() * 1000.0,
    })
}
