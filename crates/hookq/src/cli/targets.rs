//! `hookq target list | pause NAME | resume NAME`: each target as the workers
//! report it, and an operator's pause and resume (kept in RabbitMQ: every
//! worker on every host holds the target's deliveries within a second, and
//! still does after a restart, until resumed).

use std::process::ExitCode;

use crate::cli::{connect, print};
use crate::config::{Settings, Target};
use crate::targets::{self, TargetView};

/// The target named `name`, or exit 2 listing the names there are.
fn find(settings: &Settings, name: &str) -> Result<Target, ExitCode> {
    let all = settings.resolved_targets();
    match all.get(name) {
        Some(t) => Ok(t.clone()),
        None => {
            let names: Vec<&str> = all.keys().map(String::as_str).collect();
            eprintln!(
                "hookq: no target named {name:?}; the configuration has: {}",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            );
            Err(ExitCode::from(2))
        }
    }
}

fn row(v: &TargetView) -> String {
    let rate = if v.rate_per_s > 0.0 {
        format!("{}/s", v.rate_per_s)
    } else {
        "-".into()
    };
    format!(
        "{:<24} {:<10} {:>9} {:>7} {:>6} {:>8} {:>8}  {}",
        v.name,
        v.state,
        v.in_flight,
        format!("{}/{}", v.limit, v.max_concurrency),
        rate,
        v.held,
        v.workers,
        v.url
    )
}

/// `hookq target list [--json]`.
pub async fn list(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let broker = connect(settings, "hookq-target").await?;
    let views = targets::listen(&broker, &settings.resolved_targets()).await;
    broker.close().await;
    let views = views?;
    if json {
        print(serde_json::to_string_pretty(&views)?);
        return Ok(ExitCode::SUCCESS);
    }
    if views.is_empty() {
        print("no targets configured (worker.target, sources.NAME.target, [targets.NAME])");
        return Ok(ExitCode::SUCCESS);
    }
    print(format!(
        "{:<24} {:<10} {:>9} {:>7} {:>6} {:>8} {:>8}  URL",
        "TARGET", "STATE", "IN_FLIGHT", "LIMIT", "RATE", "HELD", "WORKERS"
    ));
    for v in &views {
        print(row(v));
    }
    Ok(ExitCode::SUCCESS)
}

/// `hookq target pause NAME` (`pause`) or `hookq target resume NAME`.
pub async fn pause_or_resume(
    settings: &Settings,
    name: &str,
    pause: bool,
) -> anyhow::Result<ExitCode> {
    let target = match find(settings, name) {
        Ok(t) => t,
        Err(code) => return Ok(code),
    };
    let broker = connect(settings, "hookq-target").await?;
    let by = format!(
        "hookq target pause ({}@{})",
        std::env::var("USER").unwrap_or_else(|_| "?".into()),
        hostname()
    );
    let done = if pause {
        targets::pause(&broker, &target, &by).await
    } else {
        targets::resume(&broker, &target).await
    };
    broker.close().await;
    done?;
    if pause {
        tracing::info!(target_name = %target.name, "paused: every worker holds its deliveries on the broker until `hookq target resume`");
        print(format!(
            "paused {}: its deliveries are held in {} until `hookq target resume {}`",
            target.name,
            settings.topology().hold(&target.queue_id),
            target.name
        ));
    } else {
        tracing::info!(target_name = %target.name, "resumed: workers ramp its deliveries up from one in flight");
        print(format!(
            "resumed {}: held deliveries go out again, ramping up from one in flight",
            target.name
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}
