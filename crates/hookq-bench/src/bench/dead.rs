//! The dead-letter tools' phase: `dlq list` and `shovel` over a full `P.dead`,
//! and the hand-written shovel moving the same messages back.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::probe::{cpu_time, cpu_us_per};
use super::{STALL, baselines, first_url, per_s, sample, say};
use crate::args::BenchArgs;
use hookq::config::Settings;
use hookq_testkit::Sandbox;

pub(super) struct DeadFigures {
    pub count: u32,
    pub list_per_s: f64,
    pub list_cpu_us: f64,
    pub shovel_per_s: f64,
    pub shovel_cpu_us: f64,
    /// The hand-written shovel moving the same messages back.
    pub hand_move_per_s: f64,
}

/// Fills `P.dead` with `--messages` dead letters (published as a worker
/// would), then times `dlq list` reading all of them (and handing them back)
/// and `hookq shovel` moving all of them to the work queue, with the code the
/// commands run.
pub(super) async fn dead_letters(
    settings: &Settings,
    args: &BenchArgs,
    body: &[u8],
) -> anyhow::Result<DeadFigures> {
    say(format_args!(
        "dead letters: {} in P.dead; dlq list reads them all, then shovel moves them all",
        args.messages
    ));
    let sandbox =
        Sandbox::new(settings, "bench-dead").context("cannot make a scratch directory")?;
    let result = dead_letters_on(&sandbox, args, body).await;
    sandbox.remove().await;
    result
}

async fn dead_letters_on(
    sandbox: &Sandbox,
    args: &BenchArgs,
    body: &[u8],
) -> anyhow::Result<DeadFigures> {
    use hookq::dead_letters::{self as dead_letters, shovel};
    let n = args.messages;
    let broker = sandbox.broker().await?;
    let url = first_url(&sandbox.settings)?;
    let env = hookq_testkit::dead_letters::dead(sample(body, "dead"));
    let dead = broker.topology().dead();
    baselines::publish_confirmed(url, &dead, "", &env, n, args.connections).await?;

    let (cpu, started) = (cpu_time(), Instant::now());
    let rows = dead_letters::rows(broker, None).await?;
    let (list, list_cpu_us) = (started.elapsed(), cpu_us_per(cpu, n));
    anyhow::ensure!(
        rows.len() == n as usize,
        "dlq list read {} of {n} dead letters",
        rows.len()
    );

    // The hand-back is asynchronous on a quorum queue (a Raft round): wait
    // until every dead letter is back before the shovel counts them.
    let back = Instant::now();
    while broker.queue_len(&dead).await? < n {
        anyhow::ensure!(
            back.elapsed() < STALL,
            "the dead letters dlq list read did not come back to {dead}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (cpu, started) = (cpu_time(), Instant::now());
    let summary = shovel::shovel(
        broker,
        &shovel::Filter::default(),
        &shovel::Options::default(),
        &mut |_| {},
    )
    .await
    .map_err(|e| anyhow::anyhow!("the shovel stopped: {}", e.error))?;
    let (moved, shovel_cpu_us) = (started.elapsed(), cpu_us_per(cpu, n));
    anyhow::ensure!(
        summary.moved.total() == u64::from(n),
        "the shovel moved {} of {n} dead letters",
        summary.moved.total()
    );
    // The hand-written shovel moves them back, with the shovel's window.
    let work = broker.topology().work_for(&env.key);
    let window = u16::try_from(shovel::Options::default().window).unwrap_or(u16::MAX);
    let hand = baselines::move_confirmed(url, &work, &dead, n, window).await?;
    Ok(DeadFigures {
        count: n,
        list_per_s: per_s(n, list),
        list_cpu_us,
        shovel_per_s: per_s(n, moved),
        shovel_cpu_us,
        hand_move_per_s: per_s(n, hand),
    })
}
