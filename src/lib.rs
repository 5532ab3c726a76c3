//! hookq: webhooks off the public internet fast and safely, each processed once.
//!
//! The flow, and the module that owns each step:
//! 1. [`ingress`]: HTTP in; verify the signature, derive the idempotency key,
//!    publish with confirm, answer 202.
//! 2. [`broker`]: the only module that speaks AMQP (lapin): connection
//!    supervision over the cluster's nodes, topology, publish, consume.
//! 3. [`worker`]: consume, [`dedup`] (LRU then SQLite), deliver through
//!    [`delivery`], decide with [`retry`], then ack, delay or dead-letter.
//! 4. [`tools`]: the operators' commands on dead letters (`dlq`, `shovel`).
//!
//! Around them: [`config`] (settings, typed and validated once), [`message`]
//! (the envelope on the broker), [`system`] (a running hookq as one handle),
//! [`events`] (what happened, for [`metrics`], tests and tools), [`http`]
//! (serving, health and metrics routes), [`harness`] (throwaway parts for tests,
//! [`simulate`] and [`bench`](mod@bench)).

pub mod admin;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod config;
pub mod dedup;
pub mod delivery;
pub mod events;
pub mod harness;
pub mod http;
pub mod ingress;
pub mod message;
pub mod metrics;
pub mod progress;
pub mod retry;
pub mod shutdown;
pub mod simulate;
pub mod system;
pub mod telemetry;
pub mod tools;
pub mod worker;
