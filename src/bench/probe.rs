//! What the benchmark reads off the machine: this process's CPU time and
//! memory (/proc), the parts' own metrics (Prometheus text), and a lone worker
//! process's memory (this binary run as a probe).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::target::Sink;
use super::{PROBE_MESSAGES, STALL, sample, say};
use crate::cli::{BenchArgs, print};
use crate::config::{HandlerKind, Settings};
use crate::harness::{Sandbox, short_id};
use crate::message::DedupKey;
use crate::system::{Parts, System};

/// CPU time (user + system, every thread) of this process so far, from
/// /proc/self/stat; zero off Linux. Clock ticks are USER_HZ, 100 on Linux.
pub(super) fn cpu_time() -> Duration {
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
pub(super) fn cpu_us_per(since: Duration, n: u32) -> f64 {
    if n == 0 {
        return 0.0;
    }
    (cpu_time().saturating_sub(since)).as_secs_f64() * 1e6 / n as f64
}

/// A sample's value in Prometheus text (`name value`), e.g. a histogram's `_sum`.
pub(super) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// A histogram's mean in milliseconds, from its `_sum` and `_count`.
pub(super) fn mean_ms(text: &str, histogram: &str) -> f64 {
    let sum = metric(text, &format!("{histogram}_sum")).unwrap_or(0.0);
    let count = metric(text, &format!("{histogram}_count")).unwrap_or(0.0);
    if count > 0.0 {
        sum / count * 1000.0
    } else {
        0.0
    }
}

/// A field of /proc/self/status in KiB (`VmRSS`, `VmHWM`); `None` off Linux.
pub(super) fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// What the probe process reports on its stdout.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ProbeReport {
    pub rss_after_work_kib: u64,
    pub rss_with_keys_kib: u64,
    pub lru_len: u64,
}

/// Runs a lone worker process (this binary, `bench --worker-rss-probe`) on a
/// throwaway prefix holding [`PROBE_MESSAGES`] webhooks: it delivers them to the
/// sink, measures its RSS, fills its LRU with `--lru-keys` keys, measures again.
/// A separate process, so that the figure is a worker's and not this process's
/// client, ingress and target as well.
pub(super) async fn worker_rss(
    settings: &Settings,
    args: &BenchArgs,
    sink: &Sink,
    body: &[u8],
) -> anyhow::Result<ProbeReport> {
    say(format_args!(
        "memory: a worker process delivers {PROBE_MESSAGES} webhooks, then holds {} keys in its LRU",
        args.lru_keys
    ));
    let mut sandbox =
        Sandbox::new(settings, "bench-rss").context("cannot make a scratch directory")?;
    let s = &mut sandbox.settings;
    s.worker.handler = HandlerKind::Http;
    s.worker.target = Some(sink.url.clone());
    s.dedup.lru_capacity = s
        .dedup
        .lru_capacity
        .max(usize::try_from(args.lru_keys).unwrap_or(usize::MAX));
    let result = async {
        let broker = sandbox.broker().await?;
        let run_id = short_id();
        let published: Vec<_> = futures::stream::iter(0..PROBE_MESSAGES)
            .map(|i| {
                let env = sample(body, &format!("{run_id}-{i}"));
                async move { broker.publish_webhook(&env, STALL).await }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        published.into_iter().collect::<Result<Vec<_>, _>>()?;
        run_probe(&sandbox, args).await
    }
    .await;
    sandbox.remove().await;
    result
}

async fn run_probe(sandbox: &Sandbox, args: &BenchArgs) -> anyhow::Result<ProbeReport> {
    let exe = std::env::current_exe().context("cannot find the hookq binary to run the probe")?;
    let config = sandbox.config_file()?;
    let child = tokio::process::Command::new(&exe)
        .arg("--config")
        .arg(&config)
        .args(["bench", "--worker-rss-probe", "--messages"])
        .arg(PROBE_MESSAGES.to_string())
        .arg("--lru-keys")
        .arg(args.lru_keys.to_string())
        .env("HOOKQ_LOG", crate::telemetry::QUIET_FILTER)
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

/// The probe process: a worker alone, on the settings file the benchmark
/// wrote. Delivers `--messages` webhooks, then fills its LRU.
pub(super) async fn probe(settings: &Settings, args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let stop = tokio_util::sync::CancellationToken::new();
    let running = System::start(settings, Parts::Worker, stop).await?;
    let mut events = running.subscribe();
    let worker = running.worker().context("no worker started")?.clone();
    let delivered = super::phases::count_delivered(&mut events, args.messages).await;
    anyhow::ensure!(
        delivered == args.messages,
        "the probe worker delivered {delivered} of {} webhooks, then none for {STALL:?}",
        args.messages
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
        lru_len: u64::try_from(worker.dedup().lru_len()).unwrap_or(u64::MAX),
    };
    drop(worker);
    running.shutdown().await?;
    print(serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}
