//! hookq: webhooks off the public internet fast and safely, each processed once.
//!
//! The flow, and the module that owns each step:
//! 1. [`ingress`]: HTTP in; verify the signature, derive the idempotency key,
//!    publish with confirm, answer 202.
//! 2. [`broker`]: the only module that speaks AMQP (lapin): connection
//!    supervision, topology, publish, consume.
//! 3. [`worker`]: consume, [`dedup`] (LRU then SQLite), deliver through a
//!    [`handler`], decide with [`retry`], then ack, delay or dead-letter.
//! 4. [`shovel`] and [`dlq`]: operators' tools for dead letters.
//!
//! Around them: [`config`] (settings, validated once), [`serve`] (the
//! long-running commands), [`ops`] and [`metrics`] (health and Prometheus),
//! [`simulate`] and [`bench`].

pub mod bench;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dedup;
pub mod dlq;
pub mod handler;
pub mod http_server;
pub mod ingress;
pub mod message;
pub mod metrics;
pub mod ops;
pub mod retry;
pub mod serve;
pub mod shovel;
pub mod shutdown;
pub mod simulate;
pub mod telemetry;
pub mod worker;
