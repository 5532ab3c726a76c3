//! The token: a wrong or missing one gets 401 on every API route and nothing
//! is read from the broker (the dead letters have never been delivered to
//! anyone); refusals and operators' actions are logged with the label, never
//! with a token; the console's page needs no token.

use std::time::Duration;

use lapin::options::BasicGetOptions;
use serde_json::{Value, json};

use super::{Admin, LABEL, T, TOKEN, admin_env, bearer};
use crate::support::{publish_dead_letters, sample, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_token_gets_401_and_reads_nothing() {
    let env = admin_env("admin-auth");
    let mut p = env.spawn(&["ingress"], "ingress listening", |_| {}).await;
    let broker = env.broker().await;
    let dead = env.topology().dead();
    let ids = publish_dead_letters(&broker, 5).await;
    let a = Admin::new(p.addr);

    let wrong = "Bearer wrong-token-0123456789abc";
    let longer = format!("Bearer {TOKEN}x");
    let auths: [Option<&str>; 5] = [
        None,
        Some(wrong),
        Some("Basic dGVzdDp0ZXN0"),
        Some(&longer),
        Some("Bearer"),
    ];
    let detail = format!("/admin/dlq/{}", ids[0]);
    let calls: [(&str, &str, &str, Option<Value>); 5] = [
        ("GET", "/admin/dlq/stats", "/admin/dlq/stats", None),
        (
            "GET",
            "/admin/dlq/pending",
            "/admin/dlq/pending?limit=5",
            None,
        ),
        ("GET", "/admin/dlq/{id}", &detail, None),
        ("GET", "/admin/dlq/reprocess", "/admin/dlq/reprocess", None),
        (
            "POST",
            "/admin/dlq/reprocess",
            "/admin/dlq/reprocess",
            Some(json!({})),
        ),
    ];
    for (method, route, path, body) in &calls {
        for auth in auths {
            let (st, v) = a.call(method, route, path, auth, body.as_ref()).await;
            assert_eq!(st, 401, "{method} {path} with {auth:?}: {v}");
            assert_eq!(v["error"], "unauthorized");
        }
    }
    // The POSTs above moved nothing, and no reader ever had the dead
    // letters: each is still a first delivery, in order.
    assert_eq!(broker.queue_len(&dead).await.unwrap(), 5);
    let (conn, ch) = env.raw_channel().await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let m = ch
            .basic_get(dead.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("a dead letter");
        assert!(
            !m.delivery.redelivered,
            "a dead letter was read before: the refused requests touched the broker"
        );
        seen.push(
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string(),
        );
    }
    let (mut seen, mut ids) = (seen, ids.clone());
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    let _ = conn.close(200, "bye".into()).await;

    // The right token reads (once the admin API's own connection is up);
    // the read is logged with the label.
    wait_until(T, "the dead letters back", || async {
        broker.queue_len(&dead).await.unwrap() == 5
    })
    .await;
    wait_until(T, "the admin API's broker connection", || async {
        p.logs.lock().unwrap().iter().any(|l| {
            l["connection"] == "hookq-admin"
                && l["message"] == "connected to RabbitMQ, topology declared"
        })
    })
    .await;
    assert_eq!(a.stats().await["total"], 5);

    // Refusals were logged (what was presented, never the token itself).
    wait_until(T, "the log lines", || async {
        let logs = p.logs.lock().unwrap();
        logs.iter()
            .any(|l| l["message"] == "admin read the dead-letter counts")
    })
    .await;
    {
        let logs = p.logs.lock().unwrap();
        let refused: Vec<&Value> = logs
            .iter()
            .filter(|l| l["message"] == "admin request refused: unauthorized")
            .collect();
        assert_eq!(refused.len(), 25, "one line per refusal");
        assert!(refused.iter().any(|l| l["presented"] == "a wrong token"));
        assert!(
            refused
                .iter()
                .any(|l| l["presented"] == "no Authorization header")
        );
        let read = logs
            .iter()
            .find(|l| l["message"] == "admin read the dead-letter counts")
            .unwrap();
        assert_eq!(read["who"], LABEL);
        assert_eq!(read["total"], 5);
        for l in logs.iter() {
            let text = l.to_string();
            assert!(!text.contains("wrong-token-0123456789abc"), "{text}");
            assert!(!text.contains(TOKEN), "{text}");
        }
    }

    // Counted by route and status.
    let metrics = reqwest::get(format!("{}/metrics", a.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = |route: &str, status: u16| {
        sample(
            &metrics,
            &format!("hookq_admin_requests_total{{route=\"{route}\",status=\"{status}\"}}"),
        )
    };
    assert_eq!(series("/admin/dlq/stats", 401), 5.0, "{metrics}");
    assert_eq!(series("/admin/dlq/reprocess", 401), 10.0, "{metrics}");
    assert_eq!(series("/admin/dlq/stats", 200), 1.0, "{metrics}");

    // The console is served without the token, with its security headers.
    for (path, kind) in [
        ("/admin/", "text/html"),
        ("/admin/console.js", "text/javascript"),
        ("/admin/console.css", "text/css"),
    ] {
        let r = a
            .http
            .get(format!("{}{path}", a.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'self'")
        );
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["x-frame-options"], "DENY");
    }
    let r = a
        .http
        .get(format!("{}/admin/dlq/stats", a.base))
        .header("authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    p.child.kill().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), p.child.wait()).await;
}
