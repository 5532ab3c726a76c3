//! `hookq topology`: declare every exchange and queue (idempotent) and print
//! them; for quorum queues also their members and leader, from the
//! management API of the node hookq is connected to when it answers.

use std::process::ExitCode;

use crate::broker::{Broker, Declared};
use crate::cli::print;
use crate::config::{AmqpUrl, Settings};

/// A quorum queue's replicas, as the management API reports them.
struct Replicas {
    leader: String,
    members: Vec<String>,
}

async fn replicas(
    http: &reqwest::Client,
    url: &AmqpUrl,
    port: u16,
    queue: &str,
) -> Option<Replicas> {
    let m = url.management(port)?;
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let v: serde_json::Value = http
        .get(format!(
            "{}/queues/{}/{}",
            m.base,
            enc(&m.vhost),
            enc(queue)
        ))
        .basic_auth(&m.user, Some(m.password.expose()))
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .json()
        .await
        .ok()?;
    let members = v["members"]
        .as_array()?
        .iter()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    Some(Replicas {
        leader: v["leader"].as_str().unwrap_or("?").to_string(),
        members,
    })
}

fn line(d: &Declared) -> String {
    if d.arguments.is_empty() {
        format!("{:<28} {}", d.name, d.kind)
    } else {
        format!("{:<28} {:<18} {}", d.name, d.kind, d.arguments)
    }
}

pub async fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    let topology = super::topology(settings);
    // An empty system laid out for another amqp.partitions moves to this one;
    // a running one is refused with what to do (exit 1).
    if let Some(old) = Broker::migrate_partitions(&settings.amqp.urls, &topology).await? {
        print(format_args!(
            "moved the topology from {old} to {} partition(s): the old queues were empty",
            topology.partitions
        ));
    }
    let broker = super::connect(settings, "hookq-topology").await?;
    let declared = broker.declare_topology().await;
    let node = broker.node();
    broker.close().await;
    let declared = declared?;
    // The URL of the node in use, for its management API.
    let url = settings
        .amqp
        .urls
        .iter()
        .find(|u| Some(u.node()) == node)
        .or(settings.amqp.urls.first());
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()?;
    let quorum = settings.amqp.queue_type == crate::config::QueueType::Quorum;
    let mut unknown = Vec::new();
    for d in &declared {
        print(line(d));
        if !(quorum && d.kind == "queue") {
            continue;
        }
        match url {
            Some(u) => match replicas(&http, u, settings.amqp.management_port, &d.name).await {
                Some(r) => print(format_args!(
                    "{:<28} members {}; leader {}",
                    "",
                    r.members.join(", "),
                    r.leader
                )),
                None => unknown.push(d.name.clone()),
            },
            None => unknown.push(d.name.clone()),
        }
    }
    if let Some(q) = unknown.first() {
        print(format_args!(
            "members and leaders of the quorum queues: the management API did not answer \
             (rabbitmq-plugins enable rabbitmq_management), or ask a node: \
             rabbitmq-queues quorum_status {q}"
        ));
    }
    Ok(ExitCode::SUCCESS)
}
