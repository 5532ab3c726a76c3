//! `[admin]` in the configuration: a short token or an unknown key stops
//! hookq with exit 2 naming the key; without a token the admin routes do not
//! exist (404); with one they are on each command's ops listener.

use std::process::Stdio;

use hookq::config::Secret;
use hookq::system::Parts;

use super::{Admin, T, admin_env, bearer};
use crate::support::TestEnv;

async fn exit_of(env: &TestEnv, cmd: &mut tokio::process::Command) -> (Option<i32>, String) {
    let _ = env;
    let out = cmd.stdin(Stdio::null()).output().await.expect("run hookq");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_token_or_an_unknown_key_exits_2_naming_it() {
    let env = TestEnv::new("admin-config");
    for args in [&["up"][..], &["ingress"], &["worker"]] {
        let mut c = env.command_with(args, "warn", |s| {
            s.worker.handler = hookq::config::HandlerKind::Log;
            s.admin.token = Some(Secret::new("too-short"));
        });
        let (code, err) = exit_of(&env, &mut c).await;
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains("admin.token"), "{args:?}: {err}");
        assert!(!err.contains("too-short"), "the token is not echoed: {err}");
    }
    // Unknown keys in [admin], and a token_env naming a variable that is not set.
    let path = env.dir().join("bad-admin.toml");
    for (text, key) in [
        ("[admin]\ntokn = \"0123456789abcdef0123\"\n", "tokn"),
        (
            "[admin]\ntoken_env = \"HOOKQ_TEST_NO_SUCH_VAR\"\n",
            "admin.token_env",
        ),
        (
            "[admin]\ntoken = \"0123456789abcdef0123\"\nlabel = \"\"\n",
            "admin.label",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookq"));
        c.arg("--config").arg(&path).arg("ingress");
        let (code, err) = exit_of(&env, &mut c).await;
        assert_eq!(code, Some(2), "{text}: {err}");
        assert!(err.contains(key), "{text}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_routes_are_404() {
    let env = TestEnv::new("admin-off");
    let up = env.up().await;
    let base = format!("http://{}", up.ingress_addr.unwrap());
    let http = reqwest::Client::new();
    for path in [
        "/admin/dlq/stats",
        "/admin/dlq/pending",
        "/admin/",
        "/admin/console.js",
    ] {
        let r = http
            .get(format!("{base}{path}"))
            .header("authorization", bearer())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    up.shutdown().await.unwrap();
}

/// `hookq worker` serves the admin API on worker.metrics_listen, `hookq
/// ingress` on ingress.listen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_on_each_commands_ops_listener() {
    let env = admin_env("admin-where");
    for parts in [Parts::Worker, Parts::Ingress] {
        let sys = env.start(parts).await;
        assert!(sys.ready(T).await, "{parts:?} ready");
        let addr = match parts {
            Parts::Worker => sys.ops_addr.unwrap(),
            _ => sys.ingress_addr.unwrap(),
        };
        let a = Admin::new(addr);
        assert_eq!(a.stats().await["total"], 0, "{parts:?}");
        sys.shutdown().await.unwrap();
    }
}
