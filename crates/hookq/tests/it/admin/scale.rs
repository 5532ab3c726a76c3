//! 10,000 dead letters: counted and listed in a few seconds; a reprocess run
//! shows its progress, refuses a second run (409) and reads (409) while it
//! goes, and moves every one.

use std::time::{Duration, Instant};

use hookq::config::QueueType;
use hookq::system::Parts;
use serde_json::json;

use super::{Admin, admin_env};
use crate::support::publish_dead_letters;
use crate::support::wait_until;

const N: usize = 10_000;
/// "A few seconds", with room for a busy 2-core machine.
const WITHIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_dead_letters_are_counted_listed_and_moved() {
    let env = admin_env("admin-10k").with_queue_type(QueueType::Quorum);
    // The ingress alone: what moves stays in P.work, to be counted.
    let sys = env.start(Parts::Ingress).await;
    assert!(sys.ready(Duration::from_secs(10)).await);
    let broker = env.broker().await;
    let (dead, work) = (env.topology().dead(), env.topology().work(0));
    publish_dead_letters(&broker, N).await;
    // Published many at a time: their order is P.dead's, as read.
    let ids: Vec<String> = env
        .dead_letters()
        .await
        .iter()
        .map(|e| e.message_id.0.clone())
        .collect();
    let a = Admin::new(sys.ingress_addr.unwrap());

    let t = Instant::now();
    let s = a.stats().await;
    let stats_time = t.elapsed();
    assert_eq!(s["total"], N);
    assert_eq!(s["by_source"]["bulk"], N);

    let t = Instant::now();
    let (st, v) = a.pending("?limit=10000").await;
    let list_time = t.elapsed();
    assert_eq!(st, 200);
    let listed: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    let first_difference = listed.iter().zip(&ids).position(|(a, b)| a != b);
    assert!(
        listed.len() == ids.len() && first_difference.is_none(),
        "all of them, in P.dead's order: {} listed, first difference at {first_difference:?}",
        listed.len()
    );

    let t = Instant::now();
    let (_, filtered) = a.pending("?key=bulk%3A9999").await;
    let filter_time = t.elapsed();
    assert_eq!(filtered["matched"], 1);
    assert_eq!(broker.queue_len(&dead).await.unwrap() as usize, N);

    eprintln!(
        "admin with {N} dead letters: stats {stats_time:.2?}, pending?limit=10000 {list_time:.2?}, \
         pending?key= {filter_time:.2?}"
    );
    assert!(stats_time < WITHIN, "stats took {stats_time:?}");
    assert!(list_time < WITHIN, "listing took {list_time:?}");

    // A real run in the background; the status shows it going.
    let route = "/admin/dlq/reprocess";
    let started = Instant::now();
    let run = {
        let a = Admin::new(sys.ingress_addr.unwrap());
        tokio::spawn(async move { a.post(json!({"dry_run": false})).await })
    };
    wait_until(Duration::from_secs(30), "the run under way", || async {
        let (_, s) = a.get(route, route).await;
        s["state"] == "running" && s["running"]["looked_at"].as_u64().unwrap_or(0) > 0
    })
    .await;
    let (st, busy) = a.post(json!({"dry_run": true})).await;
    assert_eq!(
        (st, busy["error"].as_str()),
        (409, Some("reprocess_running"))
    );
    let (st, busy) = a.pending("").await;
    assert_eq!(
        (st, busy["error"].as_str()),
        (409, Some("reprocess_running"))
    );
    let (st, outcome) = run.await.unwrap();
    let move_time = started.elapsed();
    assert_eq!(st, 200, "{outcome}");
    assert_eq!(outcome["moved"]["total"], N);
    assert_eq!(outcome["rows"].as_array().unwrap().len(), 1000);
    assert_eq!(outcome["rows_truncated"], true);
    eprintln!("admin reprocess of {N} dead letters: {move_time:.2?}");
    assert_eq!(broker.queue_len(&dead).await.unwrap(), 0);
    wait_until(Duration::from_secs(10), "all of them in P.work", || async {
        broker.queue_len(&work).await.unwrap() as usize == N
    })
    .await;
    let (_, s) = a.get(route, route).await;
    assert_eq!(s["state"], "idle");
    assert_eq!(s["last"]["moved"]["total"], N);
    sys.shutdown().await.unwrap();
}
