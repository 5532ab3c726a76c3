//! The benchmark's table, as people read it (`--json` prints the report as is).

use super::{PROBE_MESSAGES, Report};
use crate::cli::print;

pub(super) fn print_table(r: &Report) {
    let ratio = |x: f64| format!("{x:.2}x");
    let rows: Vec<(String, String, String, String)> = vec![
        (
            "raw broker: publish + confirm (msg/s)".into(),
            format!(
                "{:.0} ({:.0}, {:.0})",
                r.raw_publish_per_s, r.raw_publish_rounds[0], r.raw_publish_rounds[1]
            ),
            String::new(),
            String::new(),
        ),
        (
            "raw broker: consume + ack (msg/s)".into(),
            format!(
                "{:.0} ({:.0}, {:.0})",
                r.raw_consume_per_s, r.raw_consume_rounds[0], r.raw_consume_rounds[1]
            ),
            String::new(),
            String::new(),
        ),
        (
            "ingress: 202s (req/s)".into(),
            format!("{:.0}", r.ingress_per_s),
            format!("{:.0}", r.raw_publish_per_s),
            ratio(r.ingress_ratio),
        ),
        (
            "ingress: latency p50 / p99 (ms)".into(),
            format!("{:.1} / {:.1}", r.ingress_p50_ms, r.ingress_p99_ms),
            String::new(),
            String::new(),
        ),
        (
            "ingress: publish to confirm, mean (ms)".into(),
            format!("{:.1}", r.ingress_publish_avg_ms),
            String::new(),
            String::new(),
        ),
        (
            "CPU per message, this process (us)".into(),
            format!("{:.0}", r.ingress_cpu_us),
            format!("{:.0}", r.raw_publish_cpu_us),
            ratio(r.ingress_cpu_us / r.raw_publish_cpu_us.max(f64::MIN_POSITIVE)),
        ),
        (
            "worker: drain backlog (msg/s)".into(),
            format!("{:.0}", r.worker_per_s),
            format!("{:.0}", r.raw_consume_per_s),
            ratio(r.worker_ratio),
        ),
        (
            "worker: one delivery to the target, mean (ms)".into(),
            format!("{:.2}", r.worker_delivery_avg_ms),
            String::new(),
            String::new(),
        ),
        (
            "worker: dedup writes per SQLite commit".into(),
            format!(
                "{:.1}",
                2.0 * r.messages as f64 / (r.worker_dedup_commits.max(1) as f64)
            ),
            String::new(),
            String::new(),
        ),
        (
            "CPU per message, this process (us)".into(),
            format!("{:.0}", r.worker_cpu_us),
            format!("{:.0}", r.raw_consume_cpu_us),
            ratio(r.worker_cpu_us / r.raw_consume_cpu_us.max(f64::MIN_POSITIVE)),
        ),
        (
            format!(
                "end to end at {}/s, from 202: p50 / p99 (ms)",
                r.e2e_rate_per_s
            ),
            format!("{:.1} / {:.1}", r.e2e_p50_ms, r.e2e_p99_ms),
            String::new(),
            String::new(),
        ),
        (
            format!(
                "end to end at {}/s, from POST: p50 / p99 (ms)",
                r.e2e_rate_per_s
            ),
            format!(
                "{:.1} / {:.1}",
                r.e2e_from_post_p50_ms, r.e2e_from_post_p99_ms
            ),
            String::new(),
            String::new(),
        ),
        (
            "peak memory, this process (MiB)".into(),
            r.peak_rss_mib
                .map_or_else(|| "n/a".into(), |m| format!("{m:.1}")),
            String::new(),
            String::new(),
        ),
        (
            format!("worker RSS: after {PROBE_MESSAGES} deliveries (MiB)"),
            format!("{:.1}", r.worker_rss_before_mib),
            String::new(),
            String::new(),
        ),
        (
            format!("worker RSS: {} keys in the LRU (MiB)", r.worker_lru_len),
            format!("{:.1}", r.worker_rss_after_mib),
            String::new(),
            String::new(),
        ),
    ];
    print(format_args!(
        "hookq bench: {} messages of {} bytes, {} connections, {} queues ({:.0} s)",
        r.messages, r.body_bytes, r.connections, r.queue_type, r.elapsed_s
    ));
    print(format_args!(
        "{:<46} {:>22} {:>12} {:>7}",
        "figure", "value", "raw broker", "ratio"
    ));
    for (figure, value, raw, ratio) in rows {
        print(format_args!(
            "{figure:<46} {value:>22} {raw:>12} {ratio:>7}"
        ));
    }
    if r.ingress_errors > 0 {
        print(format_args!(
            "{} ingress requests were not accepted",
            r.ingress_errors
        ));
    }
    print("targets:");
    for g in &r.goals {
        print(format_args!(
            "  {:<46} {:>8.2} {:<8} {}",
            g.name,
            g.value,
            g.goal,
            if g.met { "met" } else { "MISSED" }
        ));
    }
}
