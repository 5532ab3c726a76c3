//! Test support: a [`TestEnv`] per test (the testkit's sandbox with test
//! settings, its queues deleted on drop), a [`Client`] for the ingress, and
//! the testkit's fake target, fixtures and waits re-exported.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookq::broker::Broker;
use hookq::config::{AmqpUrl, HandlerKind, QueueType, Settings, TargetUrl};
use hookq::events::{Event, Outcome};
use hookq::message::Envelope;
use hookq::system::{Parts, System};
pub use hookq_testkit::dead_letters::publish_dead_letters;
pub use hookq_testkit::metrics::sample;
pub use hookq_testkit::{FakeTarget, Sandbox, wait_until};

/// Runs each named `async fn name(q: QueueType)` as two tests, one per queue type.
#[allow(unused_macros)]
macro_rules! on_both_queue_types {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quorum() { super::$name(QueueType::Quorum).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn classic() { super::$name(QueueType::Classic).await }
        }
    )*};
}

/// The broker every test talks to: RabbitMQ 3.10 on this machine by default;
/// `HOOKQ_TEST_AMQP_URL`, `HOOKQ_TEST_MANAGEMENT_URL` and
/// `HOOKQ_TEST_RABBITMQCTL` point the whole suite at another (`.ci/run` runs it
/// again against RabbitMQ 4.x that way).
pub fn amqp_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        std::env::var("HOOKQ_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    })
}

/// The broker's management API, `http://host:port/api` (guest:guest).
pub fn management_api() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        let base = std::env::var("HOOKQ_TEST_MANAGEMENT_URL")
            .unwrap_or_else(|_| "http://127.0.0.1:15672".into());
        let base = base.trim_end_matches('/');
        if base.ends_with("/api") {
            base.to_string()
        } else {
            format!("{base}/api")
        }
    })
}

/// `rabbitmqctl` for the broker under test: `HOOKQ_TEST_RABBITMQCTL` (split
/// on spaces: `.ci/rabbitmq4 ctl`, say), else the machine's own.
pub fn rabbitmqctl() -> std::process::Command {
    let spec = std::env::var("HOOKQ_TEST_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = spec.split_whitespace();
    let mut cmd = std::process::Command::new(words.next().unwrap_or("rabbitmqctl"));
    cmd.args(words);
    cmd
}

/// The broker's major version, from its management API (4 for 4.x).
pub async fn broker_major() -> u32 {
    let v: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/overview", management_api()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("the management API")
        .json()
        .await
        .expect("its overview");
    v["rabbitmq_version"]
        .as_str()
        .and_then(|s| s.split('.').next())
        .and_then(|m| m.parse().ok())
        .expect("a version")
}

/// Waits until the system's events say `n` messages were settled with an
/// outcome `pick` accepts.
pub async fn settled(
    events: &mut tokio::sync::broadcast::Receiver<Event>,
    within: Duration,
    n: usize,
    mut pick: impl FnMut(&Outcome) -> bool,
) {
    let mut seen = 0;
    if n == 0 {
        return;
    }
    hookq_testkit::wait_for(events, within, |e| {
        if let Event::Settled { outcome, .. } = e
            && pick(outcome)
        {
            seen += 1;
        }
        seen >= n
    })
    .await
    .unwrap_or_else(|e| panic!("{seen} of {n} settlements seen: {e}"));
}

/// A test's own hookq: the testkit's [`Sandbox`] (unique prefix, own store and
/// directory, port-0 listeners) with test settings: millisecond delay tiers, no
/// jitter (so waits can be asserted), the log handler. Its queues are deleted
/// when it drops.
pub struct TestEnv {
    /// Always `Some` until the env drops.
    sandbox: Option<Sandbox>,
    pub prefix: String,
}

impl std::ops::Deref for TestEnv {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        self.sandbox.as_ref().expect("the sandbox lives until drop")
    }
}

impl std::ops::DerefMut for TestEnv {
    fn deref_mut(&mut self) -> &mut Sandbox {
        self.sandbox.as_mut().expect("the sandbox lives until drop")
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

impl TestEnv {
    pub fn new(name: &str) -> Self {
        // HOOKQ_LOG=debug shows what the parts in this process do (off by default).
        static LOGS: std::sync::Once = std::sync::Once::new();
        LOGS.call_once(|| {
            let filter = tracing_subscriber::EnvFilter::try_from_env("HOOKQ_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        });
        let mut base = Settings::default();
        base.amqp.urls = vec![AmqpUrl::parse(amqp_url()).unwrap()];
        base.amqp.management_url = Some(TargetUrl::parse(management_api()).unwrap());
        base.amqp.prefix = "t".into();
        let mut sandbox = Sandbox::new(&base, name).expect("sandbox");
        let s = &mut sandbox.settings;
        s.amqp.prefetch = 32;
        s.ingress.publish_timeout = ms(3000);
        s.worker.handler = HandlerKind::Log;
        s.worker.timeout = ms(2000);
        s.retry.inline_delay = ms(10);
        s.retry.delays = [100, 200, 400].map(ms).to_vec();
        s.retry.jitter = 0.0;
        // Short enough that a killed worker's keys are taken over quickly, long
        // enough for a store thread on a busy 2-core machine to renew it.
        s.dedup.lease = ms(2000);
        let prefix = s.amqp.prefix.clone();
        Self {
            sandbox: Some(sandbox),
            prefix,
        }
    }

    pub fn with_queue_type(mut self, q: QueueType) -> Self {
        self.settings.amqp.queue_type = q;
        self
    }

    pub fn with_target(mut self, url: &str) -> Self {
        self.settings.worker.handler = HandlerKind::Http;
        self.settings.worker.target = Some(TargetUrl::parse(url).unwrap().into());
        self
    }

    /// Every source delivered to the named target `name` at `url`, with
    /// `limits` (its url set here).
    pub fn with_named_target(
        mut self,
        name: &str,
        url: &str,
        limits: hookq::config::TargetSettings,
    ) -> Self {
        self.settings.worker.handler = HandlerKind::Http;
        self.settings.targets.insert(
            name.to_string(),
            hookq::config::TargetSettings {
                url: Some(TargetUrl::parse(url).unwrap()),
                ..limits
            },
        );
        self.settings.worker.target = Some(hookq::config::TargetRef::Named(name.to_string()));
        self
    }

    /// Starts parts of hookq in this process; stopped when the env drops.
    pub async fn start(&self, parts: Parts) -> System {
        Sandbox::start(self, parts).await.expect("start hookq")
    }

    /// `up`, waiting until it is ready.
    pub async fn up(&self) -> System {
        let r = self.start(Parts::Up).await;
        assert!(
            r.ready(Duration::from_secs(10)).await,
            "hookq up is not ready"
        );
        r
    }

    /// The test's own broker handle on its topology: connected (and the
    /// topology declared) once, on first use, and closed when the env drops.
    pub async fn broker(&self) -> Broker {
        Sandbox::broker(self).await.expect("broker").clone()
    }

    pub async fn queue_len(&self, queue: &str) -> u32 {
        self.broker()
            .await
            .queue_len(queue)
            .await
            .expect("queue_len")
    }

    /// Everything in P.dead, left in place (read, then handed back).
    pub async fn dead_letters(&self) -> Vec<Envelope> {
        let mut out = Vec::new();
        hookq::dead_letters::read(&self.broker().await, None, |dl| {
            out.push(dl.envelope.clone())
        })
        .await
        .expect("read P.dead");
        out
    }

    /// A plain lapin connection and channel, for doing to the broker what hookq never does.
    pub async fn raw_channel(&self) -> (lapin::Connection, lapin::Channel) {
        hookq_testkit::sandbox::raw_channel(amqp_url())
            .await
            .expect("a raw channel")
    }

    /// Puts in `queue`'s place a durable classic queue that refuses every
    /// publish: declaring the topology again cannot replace it (its arguments
    /// differ), so the refusals last.
    pub async fn refusing_queue_in_place_of(&self, queue: &str) {
        self.delete_queue(queue).await;
        let (conn, ch) = self.raw_channel().await;
        let mut args = lapin::types::FieldTable::default();
        args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(0));
        args.insert(
            "x-overflow".into(),
            lapin::types::AMQPValue::LongString("reject-publish".into()),
        );
        ch.queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }

    /// Deletes a queue under hookq's feet.
    pub async fn delete_queue(&self, queue: &str) {
        let (conn, ch) = self.raw_channel().await;
        ch.queue_delete(queue.into(), Default::default())
            .await
            .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }

    /// A `hookq` child process on these settings (a generated config file):
    /// `hookq --config FILE <args>`, logs at `log` level on stderr.
    pub fn command(&self, args: &[&str], log: &str) -> tokio::process::Command {
        self.command_with(args, log, |_| {})
    }

    /// Like [`TestEnv::command`], with the child's settings changed by `adjust`.
    pub fn command_with(
        &self,
        args: &[&str],
        log: &str,
        adjust: impl FnOnce(&mut Settings),
    ) -> tokio::process::Command {
        self.command_via(&[], args, log, adjust)
    }

    /// Like [`TestEnv::command_with`], run through `via` (e.g. `ip netns exec
    /// NS`, which execs hookq in its place: the child is hookq itself).
    pub fn command_via(
        &self,
        via: &[&str],
        args: &[&str],
        log: &str,
        adjust: impl FnOnce(&mut Settings),
    ) -> tokio::process::Command {
        let mut settings = self.settings.clone();
        adjust(&mut settings);
        let config = self
            .config_file_of(&settings)
            .expect("write the config file");
        let hookq = env!("CARGO_BIN_EXE_hookq");
        let mut c = match via.split_first() {
            None => tokio::process::Command::new(hookq),
            Some((program, rest)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(rest).arg(hookq);
                c
            }
        };
        c.arg("--config")
            .arg(config)
            .args(args)
            .env("HOOKQ_LOG", log)
            .current_dir(self.dir())
            .kill_on_drop(true);
        c
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let Some(sandbox) = self.sandbox.take() else {
            return;
        };
        // Stop the parts, delete what the test declared and close the broker
        // handle, on the test's own runtime (Drop is sync: block in place). A
        // test on a current-thread runtime cleans up from a runtime of its own.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| h.block_on(sandbox.remove()));
            }
            _ => {
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(sandbox.remove());
                })
                .join();
            }
        }
    }
}

/// A `hookq` child process logging JSON: the address it said it listens on
/// (read from its own log line) and every log line it writes.
pub struct Process {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl TestEnv {
    /// Starts `hookq <args> --log-format json` with settings changed by
    /// `adjust`, and waits for its log line starting with `listening` (e.g.
    /// "ingress listening", "worker metrics listening") to learn its address.
    pub async fn spawn(
        &self,
        args: &[&str],
        listening: &str,
        adjust: impl FnOnce(&mut Settings),
    ) -> Process {
        self.spawn_via(&[], args, listening, adjust).await
    }

    /// Like [`TestEnv::spawn`], run through `via` (see [`TestEnv::command_via`]).
    pub async fn spawn_via(
        &self,
        via: &[&str],
        args: &[&str],
        listening: &str,
        adjust: impl FnOnce(&mut Settings),
    ) -> Process {
        use tokio::io::AsyncBufReadExt;
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--log-format", "json"]);
        let mut child = self
            .command_via(via, &all, "info", adjust)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn hookq");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (sink, listening) = (logs.clone(), listening.to_string());
        tokio::spawn(async move {
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
                if v["message"].as_str().unwrap_or("").starts_with(&listening)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(v["addr"].as_str().unwrap().parse().unwrap());
                }
                sink.lock().unwrap().push(v);
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("the listening log line")
            .expect("the process's log");
        Process { child, addr, logs }
    }
}

impl Process {
    /// Its /metrics text (empty when it does not answer).
    pub async fn metrics(&self) -> String {
        match reqwest::get(format!("http://{}/metrics", self.addr)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// SIGTERM: the graceful stop.
    pub fn sigterm(&self) {
        sigterm(&self.child);
    }
}

/// Sends SIGTERM to a child process.
pub fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(ok.success());
}

impl TestEnv {
    /// A `hookq worker` process with a store of its own (`NAME.db`), as on
    /// a host of its own.
    pub async fn host(&self, name: &str) -> Process {
        let store = self.dir().join(format!("{name}.db"));
        self.spawn(&["worker"], "worker metrics listening", |s| {
            s.dedup.path = store;
        })
        .await
    }
}

/// A client for the ingress.
pub struct Client {
    pub base: String,
    pub http: reqwest::Client,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
        }
    }

    pub async fn post(
        &self,
        source: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> reqwest::Response {
        let mut r = self
            .http
            .post(format!("{}/hooks/{source}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send().await.expect("post")
    }

    /// Posts and asserts 202; returns the key.
    pub async fn send(&self, source: &str, id: &str, body: &str) -> String {
        let r = self.post(source, &[("idempotency-key", id)], body).await;
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
        let v: serde_json::Value = r.json().await.unwrap();
        v["key"].as_str().unwrap().to_string()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("get")
    }
}

/// A message of source `s` with `key` and an empty JSON body, as a test
/// publishes it straight to the broker (as a hand, a bug or another client might).
pub fn message(key: &str) -> Envelope {
    hookq_testkit::dead_letters::message("s", key, b"{}")
}

/// Puts a message that is not a hookq message (no hookq headers) in P.dead
/// by hand, with `body` and message id `id`.
pub async fn publish_foreign_dead_letter(env: &TestEnv, body: &[u8], id: &str) {
    hookq_testkit::dead_letters::publish_foreign(amqp_url(), &env.topology().dead(), body, id).await
}

/// The webhooks the dead-letter fixtures send: (source, id). Ids with `bad`
/// get 400 from [`failing_target`] (dead as `rejected` after one delivery),
/// the others 500 (dead as `max_attempts` after two).
pub const DEAD_LETTER_SENT: [(&str, &str); 6] = [
    ("alpha", "bad-1"),
    ("alpha", "flaky-1"),
    ("alpha", "bad-2"),
    ("alpha", "flaky-2"),
    ("beta", "bad-3"),
    ("beta", "flaky-3"),
];

/// A target that fails every [`DEAD_LETTER_SENT`] webhook (400 for `bad`
/// ids, 500 for the others) until the flag it returns is set, then answers
/// 200.
pub async fn failing_target() -> (FakeTarget, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let healed = Arc::new(AtomicBool::new(false));
    let h = healed.clone();
    let target = FakeTarget::start(move |_, r| {
        if h.load(Ordering::SeqCst) {
            StatusCode::OK
        } else if r.key().contains(":bad-") {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        .into_response()
    })
    .await;
    (target, healed)
}

/// The message ids of the envelopes from `source`, in order.
pub fn ids_from(envs: &[Envelope], source: &str) -> Vec<String> {
    envs.iter()
        .filter(|e| e.source == source)
        .map(|e| e.message_id.0.clone())
        .collect()
}
