//! What the benchmark reads off the machine: this process's CPU time and
//! memory (/proc), the parts' own metrics (Prometheus text), and a lone
//! `hookq worker` process's memory.

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;

use super::{PROBE_MESSAGES, STALL, sample, say};
use crate::args::BenchArgs;
use hookq::config::{HandlerKind, Settings};
use hookq_testkit::FakeTarget;
use hookq_testkit::{Sandbox, short_id};

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

/// A histogram's mean in milliseconds, from its `_sum` and `_count`.
pub(super) fn mean_ms(text: &str, histogram: &str) -> f64 {
    let sum = hookq_testkit::metrics::value(text, &format!("{histogram}_sum")).unwrap_or(0.0);
    let count = hookq_testkit::metrics::value(text, &format!("{histogram}_count")).unwrap_or(0.0);
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

/// A process's field of /proc/PID/status in KiB; `None` off Linux.
fn pid_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// A lone worker's memory.
#[derive(Debug)]
pub(super) struct ProbeReport {
    pub rss_after_work_kib: u64,
    pub rss_with_keys_kib: u64,
    /// Keys the worker delivered, and so holds in its LRU.
    pub lru_len: u64,
}

/// The `hookq` binary, beside this one (the workspace builds both into one
/// directory), else the one on PATH.
pub(super) fn hookq_binary() -> std::path::PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join("hookq")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "hookq".into())
}

/// Runs a lone `hookq worker` process on a throwaway prefix: it delivers
/// [`PROBE_MESSAGES`] webhooks to the sink and its RSS is read; then it
/// delivers `--lru-keys` more (each key stays in its LRU) and its RSS is read
/// again. A process of its own, so that the figure is a worker's and not
/// this process's client, ingress and target as well.
pub(super) async fn worker_rss(
    settings: &Settings,
    args: &BenchArgs,
    sink: &FakeTarget,
    body: &[u8],
) -> anyhow::Result<ProbeReport> {
    say(format_args!(
        "memory: a worker process delivers {PROBE_MESSAGES} webhooks, then {} more (held in its LRU)",
        args.lru_keys
    ));
    let mut sandbox =
        Sandbox::new(settings, "bench-rss").context("cannot make a scratch directory")?;
    let s = &mut sandbox.settings;
    s.worker.handler = HandlerKind::Http;
    s.worker.target = Some(super::target_url(sink)?.into());
    s.dedup.lru_capacity = s
        .dedup
        .lru_capacity
        .max(usize::try_from(args.lru_keys.saturating_add(PROBE_MESSAGES)).unwrap_or(usize::MAX));
    let result = probe(&sandbox, args, sink, body).await;
    sandbox.remove().await;
    result
}

async fn probe(
    sandbox: &Sandbox,
    args: &BenchArgs,
    sink: &FakeTarget,
    body: &[u8],
) -> anyhow::Result<ProbeReport> {
    let broker = sandbox.broker().await?;
    let exe = hookq_binary();
    let config = sandbox.config_file()?;
    let mut child = tokio::process::Command::new(&exe)
        .arg("--config")
        .arg(&config)
        .arg("worker")
        .env("HOOKQ_LOG", hookq::telemetry::QUIET_FILTER)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} worker for the memory probe", exe.display()))?;
    let pid = child.id().context("the probe worker exited at once")?;
    let run_id = short_id();
    let deliver = |from: u32, n: u32| {
        let run_id = run_id.clone();
        let before = sink.started();
        async move {
            let published: Vec<_> = futures::stream::iter(from..from + n)
                .map(|i| {
                    let env = sample(body, &format!("{run_id}-{i}"));
                    async move { broker.publish_webhook(&env, STALL).await }
                })
                .buffer_unordered(64)
                .collect()
                .await;
            published.into_iter().collect::<Result<Vec<_>, _>>()?;
            // Every one delivered to the sink.
            let want = before + usize::try_from(n).unwrap_or(usize::MAX);
            let deadline = std::time::Instant::now() + STALL + Duration::from_millis(u64::from(n));
            while sink.started() < want {
                anyhow::ensure!(
                    std::time::Instant::now() < deadline,
                    "the probe worker delivered {} of {n} in time",
                    sink.started().saturating_sub(before)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        }
    };
    deliver(0, PROBE_MESSAGES).await?;
    let rss_after_work_kib = pid_status_kib(pid, "VmRSS").context("no /proc/PID/status")?;
    deliver(PROBE_MESSAGES, args.lru_keys).await?;
    let rss_with_keys_kib = pid_status_kib(pid, "VmRSS").context("no /proc/PID/status")?;
    let _ = child.start_kill();
    let _ = child.wait().await;
    Ok(ProbeReport {
        rss_after_work_kib,
        rss_with_keys_kib,
        lru_len: u64::from(PROBE_MESSAGES.saturating_add(args.lru_keys)),
    })
}
