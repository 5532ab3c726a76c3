//! The benchmark's table, as people read it (`--json` prints the report as is).

use super::{PROBE_MESSAGES, Report};
use crate::cli::print;

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
        row(
            format!("shovel, {} dead letters (msg/s)", r.dead_letters),
            format!("{:.0} ({:.0} us CPU)", r.shovel_per_s, r.shovel_cpu_us),
        ),
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
