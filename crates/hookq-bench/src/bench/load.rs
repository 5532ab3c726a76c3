//! The benchmark's HTTP load client: `--messages` POSTs over `--connections`
//! connections, against hookq's ingress or the hand-written one alike.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::http::StatusCode;

use super::probe::{cpu_time, cpu_us_per};
use super::{per_s, say};
use crate::args::BenchArgs;
use crate::stats::{ms, quantile};
use hookq_testkit::short_id;

pub(super) struct IngressFigures {
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u32,
    pub cpu_us: f64,
    pub publish_avg_ms: f64,
    /// Keys the ingress accepted (they wait in `P.work` for the worker phase).
    pub keys: Vec<String>,
}

/// One connection's share of the load: requests one after another until the
/// shared counter reaches the total. The key of request `i` is
/// `bench:RUN-i` (its Idempotency-Key, on the unsigned source `bench`); the
/// answer's body is read, not parsed, so that the client's work is the same
/// against hookq and against the hand-written ingress.
async fn hammer(
    http: reqwest::Client,
    url: String,
    body: bytes::Bytes,
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
        let id = format!("{run_id}-{i}");
        let sent = Instant::now();
        let r = http
            .post(&url)
            .header("content-type", "application/octet-stream")
            .header("idempotency-key", &id)
            .body(body.clone())
            .send()
            .await;
        let outcome = match r {
            Ok(r) if r.status() == StatusCode::ACCEPTED => {
                r.bytes().await.map(|_| ()).map_err(|e| e.to_string())
            }
            Ok(r) => Err(format!(
                "{} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            )),
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(()) => {
                latencies.push(sent.elapsed());
                keys.push(format!("bench:{id}"));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    (latencies, keys, errors, first_error)
}

/// `--messages` POSTs of `body` to `url` over `--connections` connections.
pub(super) async fn load(
    url: &str,
    args: &BenchArgs,
    body: &[u8],
    what: &str,
) -> anyhow::Result<IngressFigures> {
    let n = args.messages;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let next = Arc::new(AtomicU32::new(0));
    let run_id = short_id();
    let body = bytes::Bytes::copy_from_slice(body);
    let cpu = cpu_time();
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            tokio::spawn(hammer(
                http.clone(),
                url.to_string(),
                body.clone(),
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
    if let Some(e) = &first_error {
        say(format_args!(
            "{what}: {errors} requests were not accepted; the first: {e}"
        ));
    }
    anyhow::ensure!(!keys.is_empty(), "{what} accepted no request");
    latencies.sort_unstable();
    Ok(IngressFigures {
        per_s: per_s(u32::try_from(keys.len()).unwrap_or(u32::MAX), elapsed),
        p50_ms: quantile(&latencies, 0.5).map(ms).unwrap_or(0.0),
        p99_ms: quantile(&latencies, 0.99).map(ms).unwrap_or(0.0),
        errors,
        cpu_us,
        publish_avg_ms: 0.0,
        keys,
    })
}
