//! `hookq topology` as an operator runs it.

use std::process::{Output, Stdio};
use std::time::Duration;

use crate::support::TestEnv;

/// Runs the hookq binary on `env`'s settings and waits for it; killed (and the
/// test failed) after `within`.
async fn hookq(args: &[&str], env: &TestEnv, within: Duration) -> Output {
    let child = env
        .command(args, "warn")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_prints_each_quorum_queue_with_its_members_and_leader() {
    let env = TestEnv::new("topocmd");
    let out = hookq(&["topology"], &env, Duration::from_secs(30)).await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let topo = env.topology();
    for q in topo.queues() {
        let at = text
            .lines()
            .position(|l| l.starts_with(&q) && l.contains("queue"))
            .unwrap_or_else(|| panic!("{q} not printed: {text}"));
        let next = text.lines().nth(at + 1).unwrap_or_default();
        // `members NODE[, NODE...]; leader NODE`, node names like rabbit@host.
        let (members, leader) = next
            .trim()
            .strip_prefix("members ")
            .and_then(|rest| rest.split_once("; leader "))
            .unwrap_or_else(|| panic!("{q}: {next:?}"));
        assert!(
            members.contains('@') && leader.contains('@'),
            "{q}: {next:?}"
        );
    }
}
