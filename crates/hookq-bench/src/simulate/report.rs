//! The simulator's report as people read it (`--json` prints [`Report`] as is).

use super::Report;
use hookq::cli::print;

pub(super) fn print_report(r: &Report) {
    print(format_args!(
        "hookq simulate: {} webhooks, failure rate {}, timeout rate {}, at most {} attempts",
        r.deliveries, r.failure_rate, r.timeout_rate, r.max_attempts
    ));
    print(format_args!("  total            {:>8}", r.total));
    print(format_args!("  successful       {:>8}", r.successful));
    print(format_args!("  failed (dead)    {:>8}", r.failed));
    if r.duplicates > 0 || r.unsettled > 0 {
        print(format_args!("  delivered twice  {:>8}", r.duplicates));
        print(format_args!("  unsettled        {:>8}", r.unsettled));
    }
    print(format_args!(
        "  success rate     {:>7.1}%   theory 1 - q^K = {:.1}% (q = {:.3} per attempt)",
        r.success_rate * 100.0,
        r.theoretical_success_rate * 100.0,
        r.attempt_failure_probability
    ));
    print(format_args!(
        "  average attempts {:>8.2}",
        r.average_attempts
    ));
    print(format_args!(
        "  202 -> outcome   {:>8.1} ms average, {:.1} ms p99",
        r.average_ms, r.p99_ms
    ));
    print("  delivered on attempt:");
    let widest = r
        .attempt_distribution
        .iter()
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    for (i, &count) in r.attempt_distribution.iter().enumerate() {
        let bar = "#".repeat((count as usize * 40).div_ceil(widest as usize));
        print(format_args!("    {:>3} {:>8}  {bar}", i + 1, count));
    }
    print(format_args!("  took {:.1} s", r.elapsed_ms / 1000.0));
}
