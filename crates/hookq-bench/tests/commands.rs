//! Running `hookq simulate` and `hookq bench` as an operator runs them: the
//! `hookq` binary (which runs `hookq-simulate` and `hookq-bench` beside it)
//! against the real broker, reading their `--json`.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use hookq::config::{AmqpUrl, Settings, TargetUrl};
use hookq_testkit::Sandbox;
use serde_json::Value;

/// A test's throwaway settings, on the broker under test.
struct TestEnv {
    sandbox: Sandbox,
}

impl std::ops::Deref for TestEnv {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sandbox
    }
}

impl std::ops::DerefMut for TestEnv {
    fn deref_mut(&mut self) -> &mut Sandbox {
        &mut self.sandbox
    }
}

impl TestEnv {
    fn new(name: &str) -> Self {
        let url = std::env::var("HOOKQ_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let management = std::env::var("HOOKQ_TEST_MANAGEMENT_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:15672".into());
        let mut base = Settings::default();
        base.amqp.urls = vec![AmqpUrl::parse(&url).unwrap()];
        base.amqp.management_url = Some(TargetUrl::parse(&management).unwrap());
        base.amqp.prefix = "t".into();
        Self {
            sandbox: Sandbox::new(&base, name).expect("sandbox"),
        }
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let sandbox = &self.sandbox;
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(sandbox.remove())
        });
    }
}

/// The `hookq` binary: the workspace builds it beside this package's.
fn hookq_binary() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_BIN_EXE_hookq-bench"));
    let hookq = dir.parent().unwrap().join("hookq");
    assert!(
        hookq.is_file(),
        "{} is missing: build the workspace (cargo build), not this package alone",
        hookq.display()
    );
    hookq
}

/// Runs `hookq ARGS` on `env`'s settings and waits for it; killed (and the
/// test failed) after `within`.
async fn hookq(args: &[&str], env: &TestEnv, within: Duration) -> Output {
    let config = env.config_file().expect("a config file");
    let child = tokio::process::Command::new(hookq_binary())
        .arg("--config")
        .arg(config)
        .args(args)
        .env("HOOKQ_LOG", "warn")
        .current_dir(env.dir())
        .kill_on_drop(true)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hookq");
    tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("hookq {args:?} did not finish within {within:?}"))
        .expect("hookq output")
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn num(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} missing or not a number in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_json_outcomes_add_up() {
    let env = TestEnv::new("simulate");
    let out = hookq(
        &[
            "simulate",
            "--deliveries",
            "30",
            "--failure-rate",
            "0.3",
            "--max-attempts",
            "3",
            "--json",
        ],
        &env,
        Duration::from_secs(60),
    )
    .await;
    let r = json_of(&out);
    let (total, ok, dead) = (num(&r, "total"), num(&r, "successful"), num(&r, "failed"));
    assert_eq!(total, 30.0, "{r}");
    assert_eq!(ok + dead, total, "every webhook delivered or dead: {r}");
    assert_eq!(num(&r, "unsettled"), 0.0, "{r}");
    assert_eq!(num(&r, "duplicates"), 0.0, "nothing delivered twice: {r}");

    let dist: Vec<f64> = r["attempt_distribution"]
        .as_array()
        .expect("attempt_distribution")
        .iter()
        .map(|v| v.as_f64().expect("a count"))
        .collect();
    assert_eq!(dist.len(), 3, "one slot per attempt: {r}");
    assert_eq!(dist.iter().sum::<f64>(), ok, "{r}");

    assert!((num(&r, "success_rate") - ok / total).abs() < 1e-9, "{r}");
    assert!((num(&r, "attempt_failure_probability") - 0.3).abs() < 1e-9);
    let theory = 1.0 - 0.3f64.powi(3);
    assert!((num(&r, "theoretical_success_rate") - theory).abs() < 1e-9);
    // Theory says 97.3%; 24 or fewer of 30 has a probability below 1e-4.
    assert!(ok >= 25.0, "far below 1 - P^K: {r}");

    // Attempts at the target: each delivered webhook on its attempt, each dead one K times.
    let attempts: f64 = dist
        .iter()
        .enumerate()
        .map(|(i, c)| (i + 1) as f64 * c)
        .sum::<f64>()
        + dead * 3.0;
    assert!(
        (num(&r, "average_attempts") - attempts / total).abs() < 1e-9,
        "{r}"
    );
    // Every webhook took some time to settle, and the slowest no less than the mean.
    assert!(num(&r, "average_ms") > 0.0, "{r}");
    assert!(num(&r, "p99_ms") >= num(&r, "average_ms"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_counts_timeouts_as_failed_attempts() {
    let env = TestEnv::new("simtimeout");
    let out = hookq(
        &[
            "simulate",
            "--deliveries",
            "10",
            "--failure-rate",
            "0",
            "--timeout-rate",
            "1",
            "--max-attempts",
            "2",
            "--json",
        ],
        &env,
        Duration::from_secs(60),
    )
    .await;
    let r = json_of(&out);
    // Every attempt times out: everything ends in P.dead after exactly 2 attempts.
    assert_eq!(num(&r, "successful"), 0.0, "{r}");
    assert_eq!(num(&r, "failed"), 10.0, "{r}");
    assert_eq!(num(&r, "average_attempts"), 2.0, "{r}");
    assert_eq!(num(&r, "theoretical_success_rate"), 0.0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_and_bench_refuse_bad_arguments_with_exit_2() {
    let env = TestEnv::new("badargs");
    for (args, flag) in [
        (&["simulate", "--failure-rate", "1.5"][..], "--failure-rate"),
        (&["simulate", "--timeout-rate=-0.1"][..], "--timeout-rate"),
        (&["simulate", "--deliveries", "0"][..], "--deliveries"),
        (&["simulate", "--max-attempts", "0"][..], "--max-attempts"),
        (&["bench", "--messages", "0"][..], "--messages"),
        (&["bench", "--connections", "0"][..], "--connections"),
        (&["bench", "--partitions", "1"][..], "--partitions"),
        (
            &["bench", "--store", "--store-keys", "9,3"][..],
            "--store-keys",
        ),
    ] {
        let out = hookq(args, &env, Duration::from_secs(20)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(flag),
            "{args:?} should name {flag}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_without_a_broker_exits_1_saying_how_to_start_it() {
    let mut env = TestEnv::new("nobroker");
    env.settings.amqp.urls =
        vec![hookq::config::AmqpUrl::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap()];
    for cmd in ["simulate", "bench"] {
        let out = hookq(&[cmd, "--json"], &env, Duration::from_secs(30)).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {stderr}");
        assert!(stderr.contains("start RabbitMQ"), "{cmd}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{cmd} printed a result without a broker"
        );
    }
}

/// `--store` needs no broker: the store alone, at small sizes here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_store_measures_each_size_without_a_broker() {
    let mut env = TestEnv::new("benchstore");
    env.settings.amqp.urls =
        vec![hookq::config::AmqpUrl::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap()];
    let out = hookq(
        &["bench", "--store", "--store-keys", "20000,60000", "--json"],
        &env,
        Duration::from_secs(120),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rows.len(), 2, "{rows:?}");
    for (row, filled) in rows.iter().zip([20_000.0, 60_000.0]) {
        // The claim phases add their own new keys to what was filled.
        assert!(num(row, "keys") > filled, "{row}");
        assert!(num(row, "bytes_per_key") <= 64.0, "{row}");
        for figure in [
            "fill_per_s",
            "claim_done_per_s",
            "read_done_per_s",
            "prune_step_max_ms",
        ] {
            assert!(num(row, figure) > 0.0, "{figure}: {row}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_json_has_every_figure() {
    let env = TestEnv::new("bench");
    let out = hookq(
        &[
            "bench",
            "--messages",
            "500",
            "--connections",
            "16",
            "--lru-keys",
            "5000",
            "--partitions",
            "4",
            "--json",
        ],
        &env,
        Duration::from_secs(120),
    )
    .await;
    let r = json_of(&out);
    for rate in [
        "raw_publish_per_s",
        "raw_bare_publish_per_s",
        "raw_publish_vs_bare",
        "raw_consume_per_s",
        "ingress_per_s",
        "worker_per_s",
        "ingress_ratio",
        "worker_ratio",
        "peak_rss_mib",
        "worker_rss_before_mib",
        "worker_rss_after_mib",
        "raw_publish_cpu_us",
        "raw_consume_cpu_us",
        "ingress_cpu_us",
        "worker_cpu_us",
        "ingress_publish_avg_ms",
        "worker_delivery_avg_ms",
        "worker_dedup_commits",
        "hand_ingress_per_s",
        "hand_ingress_p99_ms",
        "hand_ingress_cpu_us",
        "hand_forwarder_per_s",
        "hand_forwarder_cpu_us",
        "ingress_vs_hand",
        "ingress_vs_same",
        "hand_same_ingress_per_s",
        "hand_direct_ingress_per_s",
        "direct_vs_topic",
        "worker_vs_hand",
        "dlq_list_per_s",
        "shovel_per_s",
        "hand_move_per_s",
    ] {
        assert!(num(&r, rate) > 0.0, "{rate} should be positive: {r}");
    }
    for rounds in ["raw_publish_rounds", "raw_consume_rounds"] {
        let v = r[rounds].as_array().expect(rounds);
        assert!(
            v.len() == 2 && v.iter().all(|x| x.as_f64().is_some_and(|x| x > 0.0)),
            "{rounds}: {r}"
        );
    }
    // A request takes time; a delivery may beat the 202 back to the client
    // (counted as 0 from the 202), never the POST.
    for latency in ["ingress_p50_ms", "e2e_from_post_p50_ms"] {
        assert!(num(&r, latency) > 0.0, "{latency}: {r}");
    }
    assert!(
        num(&r, "ingress_p50_ms") <= num(&r, "ingress_p99_ms"),
        "{r}"
    );
    assert!(num(&r, "e2e_p50_ms") <= num(&r, "e2e_p99_ms"), "{r}");
    assert_eq!(num(&r, "messages"), 500.0);
    assert_eq!(num(&r, "ingress_errors"), 0.0, "{r}");
    assert!(num(&r, "e2e_messages") >= 50.0, "{r}");
    assert!(num(&r, "worker_lru_len") >= 5000.0, "{r}");
    let ratio = num(&r, "ingress_per_s") / num(&r, "raw_publish_per_s");
    assert!((num(&r, "ingress_ratio") - ratio).abs() < 1e-6, "{r}");
    let vs_bare = num(&r, "raw_publish_per_s") / num(&r, "raw_bare_publish_per_s");
    assert!(
        (num(&r, "raw_publish_vs_bare") - vs_bare).abs() < 1e-6,
        "{r}"
    );
    let vs_hand = num(&r, "worker_per_s") / num(&r, "hand_forwarder_per_s");
    assert!((num(&r, "worker_vs_hand") - vs_hand).abs() < 1e-6, "{r}");
    assert_eq!(num(&r, "dead_letters"), 500.0, "{r}");
    // Three worker processes on 4 partitions and one on one drained it all.
    let scale = &r["scale"];
    assert_eq!(scale["partitions"], 4, "{r}");
    assert_eq!(scale["workers"], 3, "{r}");
    for rate in ["one_per_s", "many_per_s"] {
        assert!(scale[rate].as_f64().is_some_and(|x| x > 0.0), "{rate}: {r}");
    }
    let goals = r["goals"].as_array().expect("goals");
    assert_eq!(goals.len(), 8, "{r}");
    for g in goals {
        assert!(g["met"].is_boolean() && g["value"].is_number(), "{g}");
    }
}
