//! Every route of the admin API on real dead letters: the counts, the
//! filtered listing, one dead letter in full, and reprocess (dry run, then for
//! real, then a selection), each answer as the OpenAPI document says; reading
//! leaves P.dead as it was, in order.

use std::collections::HashMap;

use hookq::config::QueueType;
use serde_json::{Value, json};

use super::{Fixture, T, counts};
use crate::support::wait_until;

const DETAIL: &str = "/admin/dlq/{id}";

fn item_ids(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

on_both_queue_types!(every_route_reads_without_moving_and_reprocess_moves);

async fn every_route_reads_without_moving_and_reprocess_moves(q: QueueType) {
    let f = Fixture::new("admin-api", q).await;
    let a = &f.admin;
    let dead_q = f.env.topology().dead();

    // Stats: by source, by reason, by both, and the dead-at span.
    let s = a.stats().await;
    assert_eq!(s["total"], 6);
    assert_eq!(
        counts(&s["by_source"]),
        HashMap::from([("alpha".into(), 4), ("beta".into(), 2)])
    );
    assert_eq!(
        counts(&s["by_reason"]),
        HashMap::from([("rejected".into(), 3), ("max_attempts".into(), 3)])
    );
    assert_eq!(s["by_source_and_reason"].as_array().unwrap().len(), 4);
    assert_eq!(s["queue"], dead_q);
    let (oldest, newest) = (
        s["oldest_dead_at"].as_str().unwrap(),
        s["newest_dead_at"].as_str().unwrap(),
    );
    assert!(oldest <= newest, "{oldest} <= {newest}");
    // The read handed everything back before it answered: all six are
    // ready again, at once (no settling wait).
    assert_eq!(f.broker.queue_len(&dead_q).await.unwrap(), 6);

    // The listing, oldest first, as P.dead holds them.
    let (st, all) = a.pending("").await;
    assert_eq!(st, 200);
    assert_eq!(item_ids(&all), f.ids());
    assert_eq!(
        (all["looked_at"].clone(), all["matched"].clone()),
        (json!(6), json!(6))
    );
    assert_eq!(all["truncated"], false);
    for (item, env) in all["items"].as_array().unwrap().iter().zip(&f.dead) {
        let d = env.dead.as_ref().unwrap();
        assert_eq!(item["key"], env.key.0.as_str());
        assert_eq!(item["source"], env.source.as_str());
        assert_eq!(item["body_size"], env.body.len());
        assert_eq!(
            item["body_preview"],
            String::from_utf8_lossy(&env.body).as_ref()
        );
        assert_eq!(item["reason"], d.reason.as_str());
        assert_eq!(item["last_status"], d.last_status.unwrap());
        assert_eq!(item["attempts"], env.attempts);
        assert_eq!(item["dead_at"], d.dead_at.as_str());
        assert_eq!(item["hookq_message"], true);
    }
    assert_eq!(f.broker.queue_len(&dead_q).await.unwrap(), 6);

    // Each filter, and their combination.
    let keys_where = |pick: &dyn Fn(&hookq::message::Envelope) -> bool| -> Vec<String> {
        f.dead
            .iter()
            .filter(|e| pick(e))
            .map(|e| e.key.0.clone())
            .collect()
    };
    let reason = |e: &hookq::message::Envelope| e.dead.as_ref().unwrap().reason.as_str();
    for (query, want) in [
        ("?source=beta", keys_where(&|e| e.source == "beta")),
        ("?reason=rejected", keys_where(&|e| reason(e) == "rejected")),
        ("?key=alpha%3Abad-2", vec!["alpha:bad-2".to_string()]),
        (
            "?source=alpha&reason=max_attempts",
            keys_where(&|e| e.source == "alpha" && reason(e) == "max_attempts"),
        ),
        ("?source=&reason=&key=", keys_where(&|_| true)),
        ("?source=gamma", vec![]),
    ] {
        let (st, v) = a.pending(query).await;
        assert_eq!(st, 200, "{query}: {v}");
        let keys: Vec<&str> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, want, "{query}");
        assert_eq!(v["matched"], want.len(), "{query}");
    }
    assert_eq!(keys_where(&|e| e.source == "alpha").len(), 4);
    assert_eq!(keys_where(&|e| reason(e) == "rejected").len(), 3);
    let (_, two) = a.pending("?limit=2").await;
    assert_eq!(item_ids(&two), f.ids()[..2]);
    assert_eq!(
        (two["matched"].clone(), two["truncated"].clone()),
        (json!(6), json!(true))
    );

    // Bad parameters: 400 with a JSON code, nothing read.
    for bad in [
        "?reason=timeout",
        "?limit=0",
        "?limit=10001",
        "?limit=ten",
        "?source=Not%20A%20Source",
        "?colour=red",
    ] {
        let (st, v) = a.pending(bad).await;
        assert_eq!(st, 400, "{bad}: {v}");
        assert_eq!(v["error"], "invalid_request", "{bad}");
    }

    // One dead letter in full: body, hookq headers, forwarded headers.
    let flaky = f.dead.iter().find(|e| e.key.0 == "alpha:flaky-1").unwrap();
    let id = flaky.message_id.0.clone();
    let (st, d) = a.get(DETAIL, &format!("/admin/dlq/{id}")).await;
    assert_eq!(st, 200, "{d}");
    assert_eq!(d["id"], id.as_str());
    assert_eq!(d["body"]["encoding"], "utf8");
    assert_eq!(
        d["body"]["data"],
        String::from_utf8_lossy(&flaky.body).as_ref()
    );
    let header = |list: &str, name: &str| -> Option<String> {
        d[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .map(|h| h["value"].as_str().unwrap().to_string())
    };
    assert_eq!(
        header("hookq_headers", "hookq-dead-reason").as_deref(),
        Some("max_attempts")
    );
    assert_eq!(
        header("hookq_headers", "hookq-key").as_deref(),
        Some("alpha:flaky-1")
    );
    assert_eq!(
        header("hookq_headers", "hookq-last-status").as_deref(),
        Some("500")
    );
    assert_eq!(
        header("request_headers", "x-test-header").as_deref(),
        Some("hello <b>")
    );
    let (st, v) = a.get(DETAIL, "/admin/dlq/no-such-id").await;
    assert_eq!((st, v["error"].as_str()), (404, Some("not_found")));

    // Nothing moved, nothing reordered by any of it.
    assert_eq!(f.broker.queue_len(&dead_q).await.unwrap(), 6);
    assert_eq!(f.ids_in_dead().await, f.ids());

    // Reprocess: idle at first.
    let route = "/admin/dlq/reprocess";
    let (st, idle) = a.get(route, route).await;
    assert_eq!(st, 200);
    assert_eq!(
        (idle["state"].as_str(), idle["runs"].as_u64()),
        (Some("idle"), Some(0))
    );
    assert!(idle["last"].is_null());

    // Dry run for alpha: lists four, moves nothing.
    let (st, dry) = a.post(json!({"source": "alpha", "dry_run": true})).await;
    assert_eq!(st, 200, "{dry}");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["would_move"]["total"], 4);
    assert_eq!(dry["moved"]["total"], 0);
    assert_eq!(
        (dry["kept"].clone(), dry["looked_at"].clone()),
        (json!(2), json!(6))
    );
    let rows: Vec<&str> = dry["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message_id"].as_str().unwrap())
        .collect();
    let alpha: Vec<String> = f
        .dead
        .iter()
        .filter(|e| e.source == "alpha")
        .map(|e| e.message_id.0.clone())
        .collect();
    assert_eq!(rows, alpha);
    assert_eq!(f.broker.queue_len(&dead_q).await.unwrap(), 6);
    assert_eq!(f.ids_in_dead().await, f.ids());

    // For real, the rejected ones, once the target is healed: each delivered once.
    let before = f.target.count();
    f.heal();
    let (st, moved) = a
        .post(json!({"reason": "rejected", "dry_run": false}))
        .await;
    assert_eq!(st, 200, "{moved}");
    assert_eq!(moved["moved"]["total"], 3);
    assert_eq!(
        counts(&moved["moved"]["by_source"]),
        HashMap::from([("alpha".into(), 2), ("beta".into(), 1)])
    );
    assert_eq!(
        counts(&moved["moved"]["by_reason"]),
        HashMap::from([("rejected".into(), 3)])
    );
    assert_eq!(moved["kept"], 3);
    assert_eq!(moved["complete"], true);
    wait_until(T, "the three moved keys delivered", || async {
        f.target.successes().len() == 3
    })
    .await;
    let ok = f.target.successes();
    for k in ["alpha:bad-1", "alpha:bad-2", "beta:bad-3"] {
        assert_eq!(ok.get(k), Some(&1), "{k} delivered once");
    }
    assert_eq!(f.target.count(), before + 3, "nothing else was delivered");
    let left: Vec<String> = f
        .dead
        .iter()
        .filter(|e| reason(e) != "rejected")
        .map(|e| e.message_id.0.clone())
        .collect();
    assert_eq!(f.ids_in_dead().await, left, "the rest in P.dead, in order");

    let (_, status) = a.get(route, route).await;
    assert_eq!(status["state"], "idle");
    assert_eq!(status["runs"], 2);
    assert_eq!(status["last"]["moved"]["total"], 3);

    // A selection: the first and last of the remaining ones.
    let picked = vec![left[0].clone(), left[2].clone()];
    let (st, sel) = a.post(json!({"message_ids": picked})).await;
    assert_eq!(st, 200, "{sel}");
    assert_eq!(sel["moved"]["total"], 2);
    assert_eq!(sel["filter"]["selected"], 2);
    wait_until(T, "the selection delivered", || async {
        f.target.successes().len() == 5
    })
    .await;
    assert_eq!(f.ids_in_dead().await, vec![left[1].clone()]);

    // Bad bodies: 400, nothing runs.
    for bad in [
        json!({"reason": "timeout"}),
        json!({"limit": 0}),
        json!({"message_ids": []}),
        json!({"dryrun": true}),
        json!([1, 2]),
    ] {
        let (st, v) = a.post(bad.clone()).await;
        assert_eq!(
            (st, v["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    let (_, status) = a.get(route, route).await;
    assert_eq!(status["runs"], 3);
    for (_, k) in f.target.successes() {
        assert_eq!(k, 1);
    }
}

/// A message put in P.dead by hand, with a body that is not UTF-8: listed
/// (not a hookq message), shown in base64, and never moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_binary_dead_letter_is_shown_in_base64_and_never_moved() {
    let env = super::admin_env("admin-foreign");
    let sys = env.start(hookq::system::Parts::Ingress).await;
    assert!(sys.ready(T).await);
    let broker = env.broker().await;
    crate::support::publish_foreign_dead_letter(&env, b"\xff\xfe binary \x00", "foreign-1").await;
    crate::support::publish_dead_letters(&broker, 1).await;
    let a = super::Admin::new(sys.ingress_addr.unwrap());

    let (_, v) = a.pending("").await;
    assert_eq!(v["items"][0]["id"], "foreign-1");
    assert_eq!(v["items"][0]["hookq_message"], false);
    assert!(v["items"][0]["reason"].is_null());
    let (_, rejected) = a.pending("?reason=rejected").await;
    assert_eq!(rejected["matched"], 0);
    let (st, d) = a.get(DETAIL, "/admin/dlq/foreign-1").await;
    assert_eq!(st, 200);
    assert_eq!(d["body"]["encoding"], "base64");
    assert_eq!(d["body"]["data"], "//4gYmluYXJ5IAA=");
    let s = a.stats().await;
    assert_eq!(s["by_reason"]["-"], 1);

    let (st, r) = a.post(json!({})).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        (r["moved"]["total"].clone(), r["skipped"].clone()),
        (json!(1), json!(1))
    );
    let (_, v) = a.pending("").await;
    assert_eq!(item_ids(&v), ["foreign-1"]);
    sys.shutdown().await.unwrap();
}
