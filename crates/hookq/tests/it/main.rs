//! Integration tests against the real RabbitMQ on 127.0.0.1:5672, real SQLite
//! files and real HTTP servers on port 0. Each test has its own amqp.prefix and
//! temp dir; its queues are deleted when its `TestEnv` drops.

#[macro_use]
mod support;

mod admin;
mod brokers;
mod dedup;
mod deploys;
mod faults;
mod hostile;
mod lifecycle;
mod netns;
mod operate;
mod partitions;
mod pipeline;
mod process;
mod security;
mod shovel;
mod soak;
mod targets;
