//! `hookq topology`: declare every exchange and queue (idempotent) and print
//! them; for quorum queues also their members and leader, from the
//! management API of the node hookq is connected to when it answers.

use std::process::ExitCode;

use crate::broker::{Broker, Declared};
use crate::cli::print;
use crate::config::{Management, Settings};

/// A quorum queue's replicas, as the management API reports them.
struct Replicas {
    leader: String,
    members: Vec<String>,
}

async fn replicas(http: &reqwest::Client, m: &Management, queue: &str) -> Option<Replicas> {
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let v: serde_json::Value = http
        .get(format!(
            "{}/queues/{}/{}",
            m.base.as_str().trim_end_matches('/'),
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
    let topology = settings.topology();
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
    // The management API of the node in use.
    let a = &settings.amqp;
    let management = a
        .urls
        .iter()
        .find(|u| Some(u.node()) == node)
        .or(a.urls.first())
        .and_then(|u| Management::of(u, a.management_port, a.management_url.as_ref()));
    if let Some(m) = &management
        && m.in_clear()
    {
        tracing::warn!(
            management = %m.base,
            "the broker's credentials go to this management API over plain HTTP; \
             use https (amqp.management_url, or an amqps:// broker URL) unless the \
             network is private"
        );
    }
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
        match &management {
            Some(m) => match replicas(&http, m, &d.name).await {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AmqpUrl, TargetUrl};
    use tokio::io::AsyncReadExt;

    fn management(amqp: &str, port: Option<u16>, explicit: Option<&str>) -> Management {
        let explicit = explicit.map(|u| TargetUrl::parse(u).unwrap());
        Management::of(&AmqpUrl::parse(amqp).unwrap(), port, explicit.as_ref()).unwrap()
    }

    #[test]
    fn the_management_api_is_https_when_the_broker_url_is_tls() {
        let cases = [
            (
                "amqp://u:p@10.0.0.5:5672/%2f",
                None,
                None,
                "http://10.0.0.5:15672/api",
                true,
            ),
            (
                "amqp://u:p@127.0.0.1/%2f",
                None,
                None,
                "http://127.0.0.1:15672/api",
                false,
            ),
            (
                "amqp://u:p@localhost/%2f",
                Some(1),
                None,
                "http://localhost:1/api",
                false,
            ),
            (
                "amqps://u:p@rmq.example/%2f",
                None,
                None,
                "https://rmq.example:15671/api",
                false,
            ),
            (
                "amqps://u:p@rmq.example/%2f",
                Some(443),
                None,
                "https://rmq.example/api",
                false,
            ),
            (
                "amqps://u:p@[::1]:5671/v",
                None,
                None,
                "https://[::1]:15671/api",
                false,
            ),
            (
                "amqps://u:p@rmq.example/%2f",
                None,
                Some("http://mgmt.internal:8080/rabbit/"),
                "http://mgmt.internal:8080/rabbit/api",
                true,
            ),
            (
                "amqp://u:p@rmq/%2f",
                None,
                Some("https://ops:pw@mgmt.example/api?x=1"),
                "https://mgmt.example/api",
                false,
            ),
        ];
        for (amqp, port, explicit, base, clear) in cases {
            let m = management(amqp, port, explicit);
            assert_eq!(m.base.as_str(), base, "{amqp} {port:?} {explicit:?}");
            assert_eq!(m.in_clear(), clear, "{base}");
        }
        let m = management("amqps://app:s%40cret@h/prod", None, None);
        assert_eq!((m.user.as_str(), m.password.expose()), ("app", "s@cret"));
        assert_eq!(m.vhost, "prod");
        let m = management("amqp://app:x@h/%2f", None, Some("https://ops:pw@m/"));
        assert_eq!((m.user.as_str(), m.password.expose()), ("ops", "pw"));
        assert_eq!(m.vhost, "/");
    }

    /// The request `hookq topology` makes for a quorum queue's replicas, to a
    /// local listener standing in for the management API of an `amqps://`
    /// broker: it opens with a TLS handshake, and the password never crosses
    /// in the clear.
    #[tokio::test]
    async fn credentials_never_cross_in_clear_to_a_tls_broker() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("the client's first bytes")
                .unwrap();
            buf.truncate(n);
            buf
        });
        let m = management(
            "amqps://guest:hunter2-secret@127.0.0.1:5671/%2f",
            Some(port),
            None,
        );
        assert!(!m.in_clear());
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap();
        // The stand-in answers no handshake: no replicas, and that is fine.
        assert!(replicas(&http, &m, "hookq.work").await.is_none());
        let bytes = seen.await.unwrap();
        assert_eq!(bytes.first(), Some(&0x16), "not a TLS handshake: {bytes:?}");
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("GET "), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let basic = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            "guest:hunter2-secret",
        );
        assert!(!text.contains(&basic), "{text}");
    }
}
