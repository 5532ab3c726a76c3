//! Throwaway hookq parts on a scratch prefix: the one sandbox that the
//! integration tests, `hookq simulate` and `hookq bench` share.
//!
//! A [`Sandbox`] takes settings derived from a base (broker URLs, queue type,
//! prefetch and concurrency kept): its own `amqp.prefix`, its own dedup file in
//! a directory of its own, port-0 listeners, and no configured sources (a source
//! with a signature scheme would refuse the harness's requests). It starts
//! parts in this process ([`Sandbox::start`]) or writes a config file for a
//! child process ([`Sandbox::config_file`]), and [`Sandbox::remove`] deletes
//! its queues, exchanges and files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hookq::broker::{self, Broker, Topology};
use hookq::config::Settings;
use hookq::system::{Parts, System};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// Eight hex digits that make a name unique enough for a throwaway run.
pub fn short_id() -> String {
    let u = uuid::Uuid::now_v7().simple().to_string();
    u[u.len() - 8..].to_string()
}

pub struct Sandbox {
    /// Change these before the first [`Sandbox::start`] or [`Sandbox::broker`].
    pub settings: Settings,
    dir: PathBuf,
    broker: OnceCell<Broker>,
    /// Parent of every started part's stop token.
    parts: CancellationToken,
}

impl Sandbox {
    /// Scratch settings derived from `base`, named `<prefix>.<tag>.<id>`, with a
    /// directory of their own under the system's temp dir.
    pub fn new(base: &Settings, tag: &str) -> std::io::Result<Self> {
        let id = short_id();
        let mut s = base.clone();
        s.amqp.prefix = format!("{}.{tag}.{id}", base.amqp.prefix);
        s.ingress.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        s.ingress.allow_unknown_sources = true;
        s.worker.metrics_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        s.sources.clear();
        let dir = std::env::temp_dir().join(format!("hookq-{tag}-{id}"));
        std::fs::create_dir_all(&dir)?;
        s.dedup.path = dir.join("dedup.db");
        Ok(Self {
            settings: s,
            dir,
            broker: OnceCell::new(),
            parts: CancellationToken::new(),
        })
    }

    /// The sandbox's directory (the dedup file is in it; so is a config file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn topology(&self) -> Topology {
        self.settings.topology()
    }

    /// A broker handle of the sandbox's own: connected and the topology declared
    /// on first use (an unreachable broker is an error now), closed by
    /// [`Sandbox::remove`].
    pub async fn broker(&self) -> Result<&Broker, broker::Error> {
        self.broker
            .get_or_try_init(|| async {
                Broker::connect(&self.settings.amqp.urls, "hookq-harness", self.topology()).await
            })
            .await
    }

    /// Starts parts of hookq in this process on the sandbox's settings.
    pub async fn start(&self, parts: Parts) -> anyhow::Result<System> {
        System::start(&self.settings, parts, self.parts.child_token()).await
    }

    /// Writes the settings to a config file for a `hookq --config FILE` child
    /// process, and returns its path.
    pub fn config_file(&self) -> std::io::Result<PathBuf> {
        self.config_file_of(&self.settings)
    }

    /// Like [`Sandbox::config_file`], for settings changed from the
    /// sandbox's (another process's own dedup file, say).
    pub fn config_file_of(&self, settings: &Settings) -> std::io::Result<PathBuf> {
        let path = self.dir.join(format!("hookq-{}.toml", short_id()));
        std::fs::write(&path, settings.to_toml())?;
        Ok(path)
    }

    /// Stops whatever still runs, deletes the prefix's queues and exchanges,
    /// closes the broker handle and removes the directory. Best effort: a
    /// failure is said on stderr (the operator has queues to delete), never
    /// hides a run's result.
    pub async fn remove(&self) {
        self.parts.cancel();
        let broker = match self.broker().await {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("hookq: cannot reach the broker to delete the throwaway prefix: {e}");
                None
            }
        };
        if let Some(b) = broker {
            // The layout the settings say now, too (a test may change it).
            let now = self.topology();
            if now.partitions != b.topology().partitions {
                let _ = b.delete(&now).await;
            }
            if let Err(e) = delete_with_retries(b).await {
                eprintln!(
                    "hookq: could not delete the throwaway queues and exchanges under prefix {}: {e}; \
                     delete them by hand (RabbitMQ UI or rabbitmqctl delete_queue)",
                    self.settings.amqp.prefix
                );
            }
            b.close().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deletes a broker handle's topology, again on a fresh connection when an
/// attempt fails: RabbitMQ 3.10 sometimes closes the connection with
/// `INTERNAL_ERROR` while it deletes a quorum queue that held many messages
/// (its segment writer crashes), and the rest would be left behind.
async fn delete_with_retries(b: &Broker) -> Result<(), broker::Error> {
    const ATTEMPTS: u32 = 3;
    let mut attempt = 1;
    loop {
        match b.delete_topology().await {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= ATTEMPTS => return Err(e),
            Err(_) => {
                attempt += 1;
                let never = CancellationToken::new();
                let _ = tokio::time::timeout(Duration::from_secs(10), b.wait_ready(&never)).await;
            }
        }
    }
}

/// A plain lapin connection and channel to `url`, for doing to the broker
/// what hookq never does (deleting a queue under it, publishing a foreign
/// message).
pub async fn raw_channel(url: &str) -> Result<(lapin::Connection, lapin::Channel), lapin::Error> {
    let conn = lapin::Connection::connect(url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}
