//! `hookq bench --partitions N`: the same backlog drained by one worker process
//! on one partition, and by [`WORKERS`] worker processes with a store each (as
//! on as many hosts) on N partitions. Both drain to the bench's target; the
//! time runs from the first key's arrival there to the last's.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;

use super::{STALL, per_s, sample, say};
use hookq::config::{HandlerKind, Settings};
use hookq_testkit::FakeTarget;
use hookq_testkit::{Sandbox, short_id};

/// Worker processes on the partitioned layout.
pub(super) const WORKERS: u32 = 3;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScaleFigures {
    pub partitions: u32,
    pub workers: u32,
    pub messages: u32,
    /// One worker, `amqp.partitions = 1`.
    pub one_per_s: f64,
    /// [`WORKERS`] workers, `amqp.partitions = partitions`.
    pub many_per_s: f64,
}

pub(super) async fn scale(
    settings: &Settings,
    sink: &FakeTarget,
    body: &[u8],
    partitions: u32,
    messages: u32,
) -> anyhow::Result<ScaleFigures> {
    say(format_args!(
        "partitions: {messages} messages drained by 1 worker process on 1 partition, \
         then by {WORKERS} worker processes (a store each) on {partitions}"
    ));
    let one_per_s = drain(settings, sink, body, 1, 1, messages).await?;
    let many_per_s = drain(settings, sink, body, partitions, WORKERS, messages).await?;
    Ok(ScaleFigures {
        partitions,
        workers: WORKERS,
        messages,
        one_per_s,
        many_per_s,
    })
}

/// Publishes `messages` webhooks with fresh keys onto a throwaway prefix laid
/// out in `partitions`, then starts `workers` worker processes together and
/// returns the rate at which their deliveries reached the target.
async fn drain(
    settings: &Settings,
    sink: &FakeTarget,
    body: &[u8],
    partitions: u32,
    workers: u32,
    messages: u32,
) -> anyhow::Result<f64> {
    let mut sandbox =
        Sandbox::new(settings, "bench-scale").context("cannot make a scratch directory")?;
    let s = &mut sandbox.settings;
    s.amqp.partitions = partitions;
    s.worker.handler = HandlerKind::Http;
    s.worker.target = Some(super::target_url(sink)?.into());
    s.worker.metrics_listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let result = async {
        let broker = sandbox.broker().await?;
        let run_id = short_id();
        let keys: Vec<String> = (0..messages).map(|i| format!("{run_id}-{i}")).collect();
        let published: Vec<_> = futures::stream::iter(&keys)
            .map(|k| {
                let mut env = sample(body, k);
                env.partition = broker.topology().partition_header(&env.key);
                async move { broker.publish_webhook(&env, STALL).await }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        published.into_iter().collect::<Result<Vec<_>, _>>()?;
        let exe = super::probe::hookq_binary();
        let mut children = Vec::new();
        for w in 0..workers {
            let mut own = sandbox.settings.clone();
            own.dedup.path = sandbox.dir().join(format!("host-{w}.db"));
            let config = sandbox.config_file_of(&own)?;
            let child = tokio::process::Command::new(&exe)
                .arg("--config")
                .arg(&config)
                .arg("worker")
                .env("HOOKQ_LOG", hookq::telemetry::QUIET_FILTER)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {} worker", exe.display()))?;
            children.push(child);
        }
        let keys: Vec<String> = keys.iter().map(|k| format!("bench:{k}")).collect();
        let (first, last) = arrivals(sink, &keys).await?;
        for c in &mut children {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
        anyhow::Ok(per_s(messages, last.saturating_duration_since(first)))
    }
    .await;
    sandbox.remove().await;
    result
}

/// The first and the last arrival at the target of `keys`, once all arrived;
/// an error when none arrived for [`STALL`].
async fn arrivals(sink: &FakeTarget, keys: &[String]) -> anyhow::Result<(Instant, Instant)> {
    let (mut seen, mut progress) = (0, Instant::now());
    loop {
        let times: Vec<Instant> = keys.iter().filter_map(|k| sink.arrival(k)).collect();
        if times.len() == keys.len()
            && let (Some(first), Some(last)) = (times.iter().min(), times.iter().max())
        {
            return Ok((*first, *last));
        }
        if times.len() > seen {
            (seen, progress) = (times.len(), Instant::now());
        }
        anyhow::ensure!(
            progress.elapsed() < STALL,
            "{seen} of {} deliveries reached the target, then none for {STALL:?}",
            keys.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
