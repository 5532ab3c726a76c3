//! `hookq bench --store`: the dedup store alone, grown to millions of
//! remembered keys. What a key costs on disk, what a claim and a done cost
//! at that size, and how long one prune step holds the write lock: the
//! figures that size a host's disk for a retention and say whether the store
//! keeps up with the worker as the file grows.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use hookq::dedup::store::{Claim, Store};
use serde::{Deserialize, Serialize};

/// Keys recorded per request while filling: a done-log catch-up's batch.
const FILL_CHUNK: u64 = 20_000;
/// New keys claimed and done at each size, and how many at once (a worker's prefetch).
const CLAIMS: u64 = 50_000;
const CLAIMS_IN_FLIGHT: usize = 64;
/// Prune steps timed at each size.
const PRUNE_STEPS: usize = 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreFigures {
    /// Keys in the store when this row was measured.
    pub keys: u64,
    /// The file's size after a checkpoint, over the keys.
    pub bytes_per_key: f64,
    /// Keys recorded per second while filling up to this size (done-log catch-up's path).
    pub fill_per_s: f64,
    /// New keys claimed and then done per second, `CLAIMS_IN_FLIGHT` at a
    /// time: a shared work queue's two writes a message.
    pub claim_done_per_s: f64,
    /// New keys looked up and then done per second, as many at a time: a
    /// partition delivered alone, whose claims are in memory (one write).
    pub read_done_per_s: f64,
    /// Longest and mean time of a prune step that deletes a whole slice (the write lock's hold).
    pub prune_step_max_ms: f64,
    pub prune_step_mean_ms: f64,
}

/// The keys a body-hash source makes: the longest kind.
fn key(i: u64) -> String {
    format!("github:{i:064x}")
}

/// Grows a store in a scratch directory to each size of `sizes` (ascending)
/// and measures it there.
pub async fn run(sizes: &[u64]) -> anyhow::Result<Vec<StoreFigures>> {
    let dir = tempfile::tempdir().context("cannot make a scratch directory")?;
    let path = dir.path().join("bench.db");
    let store = Store::open(&path, Duration::from_secs(30), Box::new(|| {}));
    let mut figures = Vec::new();
    let mut filled = 0u64;
    // Keys above this are claimed by the claim phases, never filled.
    let claimed_from = 1u64 << 62;
    let mut next_claim = claimed_from;
    for &size in sizes {
        let started = Instant::now();
        let from = filled;
        let now = hookq::message::epoch_ms();
        while filled < size {
            let n = FILL_CHUNK.min(size - filled);
            let keys = (filled..filled + n).map(key).collect();
            store.done_many(keys, now).await?;
            filled += n;
            if filled.is_multiple_of(1_000_000) {
                super::say(format_args!("store: {filled} keys"));
            }
        }
        let fill_per_s = (filled - from) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let claim_done_per_s = claim_and_done(&store, &mut next_claim, false).await?;
        let read_done_per_s = claim_and_done(&store, &mut next_claim, true).await?;
        let keys = filled + (next_claim - claimed_from);
        let bytes_per_key = file_bytes(&path)? as f64 / keys as f64;
        let (prune_step_max_ms, prune_step_mean_ms) = prune_steps(&store).await?;
        figures.push(StoreFigures {
            keys,
            bytes_per_key,
            fill_per_s,
            claim_done_per_s,
            read_done_per_s,
            prune_step_max_ms,
            prune_step_mean_ms,
        });
    }
    Ok(figures)
}

/// What a worker does per message on a shared queue: a claim, then a done;
/// `alone`: on a partition it delivers alone, a read, then a done.
async fn claim_and_done(store: &Store, next: &mut u64, alone: bool) -> anyhow::Result<f64> {
    let from = *next;
    *next += CLAIMS;
    let started = Instant::now();
    let mut runs = futures::stream::iter(from..from + CLAIMS)
        .map(|i| async move {
            let k = key(i);
            if alone {
                return match store.done_at_ms(&k).await? {
                    None => store.done(&k).await,
                    Some(_) => Err(not_new("done already")),
                };
            }
            match store.claim(&k, "bench").await? {
                Claim::Claimed { .. } => store.done(&k).await,
                other => Err(not_new(&format!("{other:?}"))),
            }
        })
        .buffer_unordered(CLAIMS_IN_FLIGHT);
    while let Some(r) = runs.next().await {
        r?;
    }
    Ok(CLAIMS as f64 / started.elapsed().as_secs_f64().max(1e-9))
}

fn not_new(what: &str) -> hookq::dedup::store::Error {
    hookq::dedup::store::Error {
        path: "bench".into(),
        message: format!("a new key was not new: {what}"),
    }
}

/// The main file's size once the WAL is folded into it: what the keys take.
fn file_bytes(path: &Path) -> anyhow::Result<u64> {
    let c = rusqlite::Connection::open(path)?;
    c.busy_timeout(Duration::from_secs(30))?;
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    Ok(std::fs::metadata(path)?.len())
}

/// Times prune steps that each delete a whole slice (a retention of zero:
/// every key is old), from a point in the middle of the key space.
async fn prune_steps(store: &Store) -> anyhow::Result<(f64, f64)> {
    let mut after = Some([0x80; 16]);
    let (mut max, mut total) = (0f64, 0f64);
    for _ in 0..PRUNE_STEPS {
        let started = Instant::now();
        let step = store.prune(Duration::ZERO, after).await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        (max, total) = (max.max(ms), total + ms);
        after = step.next;
    }
    Ok((max, total / PRUNE_STEPS as f64))
}

pub fn print_table(figures: &[StoreFigures]) {
    hookq::cli::print(format!(
        "{:>12} {:>10} {:>12} {:>14} {:>14} {:>24}",
        "keys", "bytes/key", "fill/s", "claim+done/s", "read+done/s", "prune step max/mean ms"
    ));
    for f in figures {
        hookq::cli::print(format!(
            "{:>12} {:>10.1} {:>12.0} {:>14.0} {:>14.0} {:>18.1} / {:.1}",
            f.keys,
            f.bytes_per_key,
            f.fill_per_s,
            f.claim_done_per_s,
            f.read_done_per_s,
            f.prune_step_max_ms,
            f.prune_step_mean_ms
        ));
    }
}
