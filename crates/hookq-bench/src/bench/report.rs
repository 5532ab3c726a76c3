//! The benchmark's report: every figure of a run (`--json` prints it as is) and the table people read.

use serde::{Deserialize, Serialize};

use super::PROBE_MESSAGES;
use super::scale::ScaleFigures;
use hookq::cli::print;

/// One target and whether this run met it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub name: String,
    pub goal: String,
    pub value: f64,
    pub met: bool,
}

/// Every figure of a run; `--json` prints it as one object.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub messages: u32,
    pub connections: usize,
    pub body_bytes: usize,
    pub queue_type: String,
    /// Persistent publishes confirmed per second, lapin alone, to the same
    /// exchange and routing key as the ingress.
    pub raw_publish_per_s: f64,
    /// The same for the hand-written ingress's message (the body alone,
    /// through the default exchange into a queue), and hookq's rate over it:
    /// what the broker itself spends on the topic exchange, `mandatory` and
    /// hookq's headers.
    pub raw_bare_publish_per_s: f64,
    pub raw_publish_vs_bare: f64,
    /// Messages consumed and acked per second, lapin alone.
    pub raw_consume_per_s: f64,
    /// The two measurements the figures above average: before the ingress
    /// phase and after the worker phase. Far apart means a noisy machine.
    pub raw_publish_rounds: [f64; 2],
    pub raw_consume_rounds: [f64; 2],
    /// CPU time of this process per message in each phase, in microseconds
    /// (the ingress phase includes the load client, the worker phase the target).
    pub raw_publish_cpu_us: f64,
    pub raw_consume_cpu_us: f64,
    /// 202s per second.
    pub ingress_per_s: f64,
    pub ingress_p50_ms: f64,
    pub ingress_p99_ms: f64,
    /// Requests not answered 202 (each is a problem worth a look).
    pub ingress_errors: u32,
    pub ingress_ratio: f64,
    pub ingress_cpu_us: f64,
    /// The hand-written ingress under the same load: 202s per second, p99,
    /// CPU per message; hookq's rate over it.
    pub hand_ingress_per_s: f64,
    pub hand_ingress_p99_ms: f64,
    pub hand_ingress_cpu_us: f64,
    pub ingress_vs_hand: f64,
    /// The hand-written ingress publishing hookq's message (same exchange
    /// kind, `mandatory`, the same headers): what the contract's message
    /// costs the broker, apart from what hookq's code costs.
    pub hand_same_ingress_per_s: f64,
    pub hand_same_ingress_p99_ms: f64,
    pub hand_same_ingress_cpu_us: f64,
    pub ingress_vs_same: f64,
    /// The hand-written ingress publishing hookq's message through a direct
    /// exchange (bound with the routing key) instead of the topic one, and
    /// its rate over the topic one's: what the topic routing costs.
    pub hand_direct_ingress_per_s: f64,
    pub direct_vs_topic: f64,
    /// Inside the ingress: publish to confirm, on average (its /metrics).
    pub ingress_publish_avg_ms: f64,
    /// Backlog messages delivered, recorded and acked per second.
    pub worker_per_s: f64,
    pub worker_ratio: f64,
    pub worker_cpu_us: f64,
    /// The hand-written forwarder on the same backlog and target.
    pub hand_forwarder_per_s: f64,
    pub hand_forwarder_cpu_us: f64,
    pub worker_vs_hand: f64,
    /// `dlq list` reading, and `shovel` moving, `dead_letters` of them.
    pub dead_letters: u32,
    pub dlq_list_per_s: f64,
    pub dlq_list_cpu_us: f64,
    pub shovel_per_s: f64,
    pub shovel_cpu_us: f64,
    /// The hand-written shovel (consume, publish with confirm, ack) on the
    /// same dead letters.
    pub hand_move_per_s: f64,
    /// One delivery to the target, on average (the worker's /metrics).
    pub worker_delivery_avg_ms: f64,
    /// SQLite transactions for the whole drain (two writes per message, batched).
    pub worker_dedup_commits: u64,
    pub e2e_messages: u32,
    pub e2e_rate_per_s: u32,
    /// From the 202 at the client to the delivery at the target; a delivery
    /// that beats the 202 back to the client counts as 0.
    pub e2e_p50_ms: f64,
    pub e2e_p99_ms: f64,
    /// From the start of the POST to the delivery at the target.
    pub e2e_from_post_p50_ms: f64,
    pub e2e_from_post_p99_ms: f64,
    /// VmHWM of this process (client, ingress, worker and target together).
    pub peak_rss_mib: Option<f64>,
    pub lru_keys: u32,
    /// A lone worker process after delivering the probe's messages.
    pub worker_rss_before_mib: f64,
    /// The same process with `lru_keys` keys in its LRU.
    pub worker_rss_after_mib: f64,
    pub worker_lru_len: u64,
    /// `--partitions`: many worker processes on partitions against one.
    pub scale: Option<ScaleFigures>,
    pub elapsed_s: f64,
    pub goals: Vec<Goal>,
}

/// One line of the table: the figure, hookq's value, and where there is one
/// the hand-written code's and the raw broker's, each with hookq's ratio to it.
struct Row {
    figure: String,
    value: String,
    hand: Option<(f64, f64)>,
    raw: Option<(f64, f64)>,
}

fn row(figure: impl Into<String>, value: String) -> Row {
    Row {
        figure: figure.into(),
        value,
        hand: None,
        raw: None,
    }
}

/// A rate (or a cost, `lower_is_better`) beside a baseline: the baseline and
/// hookq's ratio to it, written so that above 1 is hookq doing better.
fn beside(hookq: f64, base: f64, lower_is_better: bool) -> Option<(f64, f64)> {
    let r = if lower_is_better {
        if hookq > 0.0 { base / hookq } else { 0.0 }
    } else if base > 0.0 {
        hookq / base
    } else {
        0.0
    };
    Some((base, r))
}

pub(super) fn print_table(r: &Report) {
    let rows = vec![
        row(
            "raw broker: publish + confirm (msg/s)",
            format!(
                "{:.0} ({:.0}, {:.0})",
                r.raw_publish_per_s, r.raw_publish_rounds[0], r.raw_publish_rounds[1]
            ),
        ),
        Row {
            raw: beside(r.raw_publish_per_s, r.raw_bare_publish_per_s, false),
            ..row(
                "raw broker: publish, hookq's message / a bare one",
                format!("{:.0}", r.raw_publish_per_s),
            )
        },
        row(
            "raw broker: consume + ack (msg/s)",
            format!(
                "{:.0} ({:.0}, {:.0})",
                r.raw_consume_per_s, r.raw_consume_rounds[0], r.raw_consume_rounds[1]
            ),
        ),
        Row {
            hand: beside(r.ingress_per_s, r.hand_ingress_per_s, false),
            raw: beside(r.ingress_per_s, r.raw_publish_per_s, false),
            ..row("ingress: 202s (req/s)", format!("{:.0}", r.ingress_per_s))
        },
        Row {
            hand: beside(r.ingress_per_s, r.hand_same_ingress_per_s, false),
            ..row(
                "ingress: 202s, beside hand-written publishing hookq's message",
                format!("{:.0}", r.ingress_per_s),
            )
        },
        Row {
            hand: beside(
                r.hand_direct_ingress_per_s,
                r.hand_same_ingress_per_s,
                false,
            ),
            ..row(
                "hand-written, hookq's message: direct exchange beside topic (req/s)",
                format!("{:.0}", r.hand_direct_ingress_per_s),
            )
        },
        Row {
            hand: Some((r.hand_ingress_p99_ms, 0.0)),
            ..row(
                "ingress: latency p50 / p99 (ms)",
                format!("{:.1} / {:.1}", r.ingress_p50_ms, r.ingress_p99_ms),
            )
        },
        row(
            "ingress: publish to confirm, mean (ms)",
            format!("{:.1}", r.ingress_publish_avg_ms),
        ),
        Row {
            hand: beside(r.ingress_cpu_us, r.hand_ingress_cpu_us, true),
            raw: beside(r.ingress_cpu_us, r.raw_publish_cpu_us, true),
            ..row(
                "ingress: CPU per message, this process (us)",
                format!("{:.0}", r.ingress_cpu_us),
            )
        },
        Row {
            hand: beside(r.worker_per_s, r.hand_forwarder_per_s, false),
            raw: beside(r.worker_per_s, r.raw_consume_per_s, false),
            ..row(
                "worker: drain backlog (msg/s)",
                format!("{:.0}", r.worker_per_s),
            )
        },
        row(
            "worker: one delivery to the target, mean (ms)",
            format!("{:.2}", r.worker_delivery_avg_ms),
        ),
        row(
            "worker: dedup writes per SQLite commit",
            format!(
                "{:.1}",
                2.0 * r.messages as f64 / (r.worker_dedup_commits.max(1) as f64)
            ),
        ),
        Row {
            hand: beside(r.worker_cpu_us, r.hand_forwarder_cpu_us, true),
            raw: beside(r.worker_cpu_us, r.raw_consume_cpu_us, true),
            ..row(
                "worker: CPU per message, this process (us)",
                format!("{:.0}", r.worker_cpu_us),
            )
        },
        row(
            format!("dlq list, {} dead letters (msg/s)", r.dead_letters),
            format!("{:.0} ({:.0} us CPU)", r.dlq_list_per_s, r.dlq_list_cpu_us),
        ),
        Row {
            hand: beside(r.shovel_per_s, r.hand_move_per_s, false),
            ..row(
                format!("shovel, {} dead letters (msg/s)", r.dead_letters),
                format!("{:.0} ({:.0} us CPU)", r.shovel_per_s, r.shovel_cpu_us),
            )
        },
        row(
            format!(
                "end to end at {}/s, from 202: p50 / p99 (ms)",
                r.e2e_rate_per_s
            ),
            format!("{:.1} / {:.1}", r.e2e_p50_ms, r.e2e_p99_ms),
        ),
        row(
            format!(
                "end to end at {}/s, from POST: p50 / p99 (ms)",
                r.e2e_rate_per_s
            ),
            format!(
                "{:.1} / {:.1}",
                r.e2e_from_post_p50_ms, r.e2e_from_post_p99_ms
            ),
        ),
    ];
    let mut rows = rows;
    if let Some(sc) = &r.scale {
        rows.push(row(
            format!(
                "{} workers on {} partitions / 1 on 1 (msg/s)",
                sc.workers, sc.partitions
            ),
            format!(
                "{:.0} / {:.0} = {:.2}x",
                sc.many_per_s,
                sc.one_per_s,
                if sc.one_per_s > 0.0 {
                    sc.many_per_s / sc.one_per_s
                } else {
                    0.0
                }
            ),
        ));
    }
    rows.extend([
        row(
            "peak memory, this process (MiB)",
            r.peak_rss_mib
                .map_or_else(|| "n/a".into(), |m| format!("{m:.1}")),
        ),
        row(
            format!("worker RSS: after {PROBE_MESSAGES} deliveries (MiB)"),
            format!("{:.1}", r.worker_rss_before_mib),
        ),
        row(
            format!("worker RSS: {} keys in the LRU (MiB)", r.worker_lru_len),
            format!("{:.1}", r.worker_rss_after_mib),
        ),
    ]);
    print(format_args!(
        "hookq bench: {} messages of {} bytes, {} connections, {} queues ({:.0} s)",
        r.messages, r.body_bytes, r.connections, r.queue_type, r.elapsed_s
    ));
    print(format_args!(
        "{:<46} {:>22} {:>12} {:>7} {:>12} {:>7}",
        "figure", "hookq", "hand-written", "ratio", "raw broker", "ratio"
    ));
    let cell = |c: Option<(f64, f64)>| match c {
        None => (String::new(), String::new()),
        Some((v, 0.0)) => (format!("{v:.1}"), String::new()),
        Some((v, r)) => (format!("{v:.0}"), format!("{r:.2}x")),
    };
    for row in rows {
        let (hand, hand_ratio) = cell(row.hand);
        let (raw, raw_ratio) = cell(row.raw);
        print(format_args!(
            "{:<46} {:>22} {hand:>12} {hand_ratio:>7} {raw:>12} {raw_ratio:>7}",
            row.figure, row.value
        ));
    }
    print("(ratios: above 1 is hookq better; a CPU ratio is the baseline's cost over hookq's)");
    if r.ingress_errors > 0 {
        print(format_args!(
            "{} ingress requests were not accepted",
            r.ingress_errors
        ));
    }
    print("targets:");
    for g in &r.goals {
        print(format_args!(
            "  {:<46} {:>10.2} {:<10} {}",
            g.name,
            g.value,
            g.goal,
            if g.met { "met" } else { "MISSED" }
        ));
    }
}
