//! The operators' commands on dead letters, as people and scripts see them:
//! `hookq shovel`, `hookq dlq list` and `hookq dlq stats` (tables, progress,
//! JSON). The algorithms are in [`crate::dead_letters`].

use std::process::ExitCode;

use super::ShovelArgs;
use crate::cli::progress::Progress;
use crate::config::Settings;
use crate::dead_letters::shovel::{self, Event, Filter, Interrupted, Options, Summary};
use crate::dead_letters::{Counts, NO_REASON, Row, counts, rows};

/// Left-aligned columns, two spaces apart; the last column is not padded.
pub fn aligned(rows: Vec<Vec<String>>) -> Vec<String> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    rows.into_iter()
        .map(|r| {
            let last = r.len().saturating_sub(1);
            r.iter()
                .enumerate()
                .map(|(i, cell)| {
                    if i == last {
                        cell.clone()
                    } else {
                        format!("{cell:<w$}", w = widths[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        })
        .collect()
}

/// A cell on one line: control characters (a multi-line error) become spaces.
fn cell(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn or_dash(v: Option<String>) -> String {
    v.filter(|s| !s.is_empty())
        .map_or_else(|| "-".to_string(), |s| cell(&s))
}

/// The text table of `hookq dlq list`; the last error goes last, as it is the
/// long one.
pub fn list_table(rows: &[Row]) -> Vec<String> {
    let header = [
        "MESSAGE ID",
        "KEY",
        "DELIVERY",
        "SOURCE",
        "REASON",
        "ATTEMPTS",
        "STATUS",
        "DEAD AT",
        "LAST ERROR",
    ]
    .map(str::to_string)
    .to_vec();
    let body = rows.iter().map(|r| {
        vec![
            cell(&r.message_id),
            cell(&r.key),
            or_dash(r.delivery.clone()),
            cell(&r.source),
            or_dash(r.reason.clone()),
            r.attempts.to_string(),
            or_dash(r.last_status.map(|s| s.to_string())),
            or_dash(r.dead_at.clone()),
            or_dash(r.last_error.clone()),
        ]
    });
    aligned(std::iter::once(header).chain(body).collect())
}

/// `SOURCE REASON COUNT` lines, aligned, under a header naming the count.
pub fn counts_table(counts: &Counts, count_title: &str) -> Vec<String> {
    let rows = counts
        .0
        .iter()
        .map(|((s, r), n)| vec![s.clone(), r.clone(), n.to_string()]);
    let header = vec!["SOURCE".into(), "REASON".into(), count_title.into()];
    aligned(std::iter::once(header).chain(rows).collect())
}

/// The shovel's progress: how many it looked at, and moved.
struct ShovelProgress {
    bar: Progress,
    /// Moved so far (dry run: listed).
    moved: u64,
    dry_run: bool,
}

impl ShovelProgress {
    fn new(dry_run: bool) -> Self {
        Self {
            bar: Progress::new("hookq shovel:", "looked at"),
            moved: 0,
            dry_run,
        }
    }

    fn note(&self) -> String {
        let verb = if self.dry_run { "would move" } else { "moved" };
        format!("{} {verb}", self.moved)
    }

    fn on(&mut self, event: Event<'_>) {
        match event {
            Event::Looked { seen, total } => self.bar.update(seen, total, || self.note()),
            Event::Moved(_) => self.moved += 1,
            Event::WouldMove(row) => {
                // Dry run: one line on stdout per dead letter that would move.
                self.moved += 1;
                self.bar.println(&format!(
                    "would move {}  key={}  source={}  reason={}  attempts={}",
                    row.message_id,
                    row.key,
                    row.source,
                    row.reason.as_deref().unwrap_or(NO_REASON),
                    row.attempts
                ));
            }
        }
    }
}

/// The end-of-run report on stdout.
fn report(summary: &Summary, dead: &str, work: &str, dry_run: bool) {
    let (counts, head) = if dry_run {
        (
            &summary.would_move,
            format!(
                "dry run: would move {} dead letter(s) from {dead} to {work}; nothing moved",
                summary.would_move.total()
            ),
        )
    } else {
        (
            &summary.moved,
            format!(
                "moved {} dead letter(s) from {dead} to {work}",
                summary.moved.total()
            ),
        )
    };
    crate::cli::print(head);
    if counts.total() > 0 {
        for line in counts_table(counts, if dry_run { "WOULD MOVE" } else { "MOVED" }) {
            crate::cli::print(format_args!("  {line}"));
        }
    }
    let mut kept = format!(
        "kept {} in {dead} (looked at {} of {})",
        summary.kept, summary.looked_at, summary.total
    );
    if summary.skipped > 0 {
        kept.push_str(&format!(
            "; skipped {} that are not hookq messages (reason invalid, or unreadable): \
             they never move, inspect them in the RabbitMQ UI",
            summary.skipped
        ));
    }
    crate::cli::print(kept);
}

/// `hookq shovel`: exit 0 when every matching dead letter moved, 2 on bad
/// usage, 1 when the broker failed (what moved is reported; re-running finishes).
pub async fn shovel(settings: &Settings, args: &ShovelArgs) -> anyhow::Result<ExitCode> {
    let filter = match Filter::new(
        args.source.as_deref(),
        args.reason.as_deref(),
        args.key.as_deref(),
    ) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hookq: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let opts = Options {
        limit: args.limit,
        dry_run: args.dry_run,
        ..Options::default()
    };
    let broker = super::connect(settings, "hookq-shovel").await?;
    let topo = broker.topology();
    let work = if topo.partitions > 1 {
        format!("{}.work.<partition>", topo.prefix)
    } else {
        topo.work(0)
    };
    let dead = topo.dead();
    let mut progress = ShovelProgress::new(opts.dry_run);
    let result = shovel::shovel(&broker, &filter, &opts, &mut |e| progress.on(e)).await;
    progress.bar.finish();
    broker.close().await;
    match result {
        Ok(summary) => {
            report(&summary, &dead, &work, opts.dry_run);
            Ok(ExitCode::SUCCESS)
        }
        Err(Interrupted { summary, error }) => {
            report(&summary, &dead, &work, opts.dry_run);
            eprintln!(
                "hookq: shovel stopped part way: {error}.\n\
                 Nothing was lost: every dead letter not reported as moved is still in {dead} \
                 (one whose move was under way may also be in {work}: the worker's dedup absorbs such a copy). \
                 Run the same `hookq shovel` again to finish."
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// `hookq dlq list [--limit N] [--json]`.
pub async fn dlq_list(
    settings: &Settings,
    limit: Option<u64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let broker = super::connect(settings, "hookq-dlq").await?;
    let rows = rows(&broker, limit).await;
    broker.close().await;
    let rows = rows?;
    if json {
        crate::cli::print(serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        crate::cli::print(format_args!("{} is empty", broker.topology().dead()));
    } else {
        for line in list_table(&rows) {
            crate::cli::print(line);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `hookq dlq stats [--json]`.
pub async fn dlq_stats(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let broker = super::connect(settings, "hookq-dlq").await?;
    let counts = counts(&broker).await;
    broker.close().await;
    let counts = counts?;
    if json {
        crate::cli::print(serde_json::to_string_pretty(&counts.to_json())?);
        return Ok(ExitCode::SUCCESS);
    }
    if counts.total() > 0 {
        for line in counts_table(&counts, "COUNT") {
            crate::cli::print(line);
        }
    }
    crate::cli::print(format_args!(
        "total {} in {}",
        counts.total(),
        broker.topology().dead()
    ));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_the_last_is_not_padded() {
        let out = aligned(vec![
            vec!["A".into(), "BB".into(), "C".into()],
            vec!["long".into(), "x".into(), "tail".into()],
        ]);
        assert_eq!(out, ["A     BB  C", "long  x   tail"]);
    }

    #[test]
    fn counts_add_up_by_source_and_reason() {
        let mut c = Counts::default();
        c.add("a", Some("rejected"));
        c.add("a", Some("rejected"));
        c.add("b", None);
        assert_eq!(c.total(), 3);
        let j = c.to_json();
        assert_eq!(j["by_source"]["a"], 2);
        assert_eq!(j["by_reason"][NO_REASON], 1);
        assert_eq!(j["by_source_and_reason"][0]["count"], 2);
        assert_eq!(counts_table(&c, "N")[0], "SOURCE  REASON    N");
    }

    #[test]
    fn a_multi_line_error_stays_on_its_row() {
        let row = Row {
            message_id: "m".into(),
            key: "s:k".into(),
            delivery: Some("d-1".into()),
            source: "s".into(),
            reason: Some("rejected".into()),
            attempts: 1,
            last_status: None,
            last_error: Some("line1\nline2".into()),
            dead_at: None,
        };
        let t = list_table(&[row]);
        assert_eq!(t.len(), 2);
        assert!(t[1].ends_with("line1 line2"), "{}", t[1]);
        assert!(t[1].contains("rejected  1         -"), "{}", t[1]);
    }
}
