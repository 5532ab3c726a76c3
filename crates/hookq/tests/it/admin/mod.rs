//! The admin API and the dead-letter console (issue 15), against a real
//! RabbitMQ, real dead letters and a real target; every answer is checked
//! against docs/admin-openapi.json.

mod api;
mod auth;
mod config;
mod console;
mod scale;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use hookq::broker::Broker;
use hookq::config::{QueueType, Secret};
use hookq::message::Envelope;
use hookq::system::System;
use serde_json::Value;

use crate::support::{Client, FakeTarget, TestEnv, wait_until};

pub const TOKEN: &str = "test-admin-token-0123456789";
pub const LABEL: &str = "test-ops";
pub const T: Duration = Duration::from_secs(30);

/// A test env with the admin API on.
pub fn admin_env(name: &str) -> TestEnv {
    let mut env = TestEnv::new(name);
    env.settings.admin.token = Some(Secret::new(TOKEN));
    env.settings.admin.label = LABEL.into();
    env
}

static OPENAPI: LazyLock<Value> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/admin-openapi.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("docs/admin-openapi.json"))
        .expect("docs/admin-openapi.json is JSON")
});

/// Asserts that `body` is what docs/admin-openapi.json says `method route`
/// answers with `status`.
pub fn assert_documented(method: &str, route: &str, status: u16, body: &Value) {
    let escaped = route.replace('~', "~0").replace('/', "~1");
    let pointer = format!(
        "/paths/{escaped}/{}/responses/{status}/content/application~1json/schema",
        method.to_lowercase()
    );
    assert!(
        OPENAPI.pointer(&pointer).is_some(),
        "docs/admin-openapi.json does not document {status} for {method} {route}"
    );
    let mut root = OPENAPI.clone();
    // A JSON pointer in a URI fragment: the braces of `{id}` percent-encoded.
    root["$ref"] = format!("#{}", pointer.replace('{', "%7B").replace('}', "%7D")).into();
    let validator = jsonschema::validator_for(&root).expect("the OpenAPI schemas compile");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{e} (at {})", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {route} answered {status} outside docs/admin-openapi.json: {errors:#?}\n{body:#}"
    );
}

/// A client of the admin API that checks every answer against the document
/// and the headers every answer carries.
pub struct Admin {
    pub base: String,
    pub http: reqwest::Client,
}

impl Admin {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    /// `method path` (its `route` pattern for the document) with `auth` as
    /// the Authorization header; the status and the JSON body, both checked.
    pub async fn call(
        &self,
        method: &str,
        route: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut r = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            m => panic!("no method {m}"),
        };
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        if let Some(b) = body {
            r = r.json(b);
        }
        let resp = r.send().await.expect("the admin API answers");
        let status = resp.status().as_u16();
        let h = resp.headers().clone();
        assert_eq!(h["cache-control"], "no-store", "{method} {path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{method} {path}");
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .starts_with("default-src 'self'"),
            "{method} {path}"
        );
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{method} {path}: {:?}",
            h["content-type"]
        );
        let v: Value = resp.json().await.expect("a JSON answer");
        assert_documented(method, route, status, &v);
        (status, v)
    }

    pub async fn get(&self, route: &str, path: &str) -> (u16, Value) {
        self.call("GET", route, path, Some(&bearer()), None).await
    }

    pub async fn post(&self, body: Value) -> (u16, Value) {
        self.call(
            "POST",
            "/admin/dlq/reprocess",
            "/admin/dlq/reprocess",
            Some(&bearer()),
            Some(&body),
        )
        .await
    }

    pub async fn stats(&self) -> Value {
        let (s, v) = self.get("/admin/dlq/stats", "/admin/dlq/stats").await;
        assert_eq!(s, 200, "{v}");
        v
    }

    pub async fn pending(&self, query: &str) -> (u16, Value) {
        self.get("/admin/dlq/pending", &format!("/admin/dlq/pending{query}"))
            .await
    }
}

pub fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// Six real dead letters made by a real `hookq up` against a target that
/// fails until it is healed; the admin API on.
pub struct Fixture {
    pub env: TestEnv,
    pub target: FakeTarget,
    healed: Arc<AtomicBool>,
    /// The dead letters, in P.dead's order.
    pub dead: Vec<Envelope>,
    pub broker: Broker,
    /// Kept running: the worker delivers what reprocess moves.
    pub _up: System,
    pub admin: Admin,
}

impl Fixture {
    pub async fn new(name: &str, q: QueueType) -> Self {
        let (target, healed) = crate::support::failing_target().await;
        let mut env = admin_env(name).with_queue_type(q).with_target(&target.url);
        env.settings.retry.max_attempts = 2;
        env.settings.retry.inline_attempts_set = Some(1);
        let up = env.up().await;
        let c = Client::new(up.ingress_addr.unwrap());
        for (source, id) in crate::support::DEAD_LETTER_SENT {
            let r = c
                .post(
                    source,
                    &[("idempotency-key", id), ("x-test-header", "hello <b>")],
                    &format!(r#"{{"id":"{id}","html":"<script>alert(1)</script>"}}"#),
                )
                .await;
            assert_eq!(r.status(), 202);
        }
        wait_until(T, "six dead letters", || async {
            env.queue_len(&env.topology().dead()).await == 6
        })
        .await;
        let dead = env.dead_letters().await;
        let broker = env.broker().await;
        let admin = Admin::new(up.ingress_addr.unwrap());
        Self {
            env,
            target,
            healed,
            dead,
            broker,
            _up: up,
            admin,
        }
    }

    pub fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
    }

    pub fn ids(&self) -> Vec<String> {
        self.dead.iter().map(|e| e.message_id.0.clone()).collect()
    }

    /// P.dead's message ids now, in order (read and handed back).
    pub async fn ids_in_dead(&self) -> Vec<String> {
        self.env
            .dead_letters()
            .await
            .iter()
            .map(|e| e.message_id.0.clone())
            .collect()
    }
}

/// A count map of an answer (`by_source`, `by_reason`).
pub fn counts(v: &Value) -> HashMap<String, u64> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
                .collect()
        })
        .unwrap_or_default()
}
