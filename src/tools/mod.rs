//! Operators' tools on `P.dead`: reading dead letters without moving them
//! ([`dead_letters`]), moving them back to work ([`shovel`]), and the commands
//! that present both ([`commands`]); and `hookq topology` ([`topology`](mod@topology)).

pub mod commands;
pub mod dead_letters;
pub mod shovel;
pub mod topology;

use crate::broker::{self, Broker, Topology};
use crate::config::Settings;
use crate::retry::Policy;

/// Connects for a one-shot tool; the error says how to start RabbitMQ. Close
/// the broker when done.
pub async fn connect(settings: &Settings, name: &str) -> Result<Broker, broker::Error> {
    settings.amqp.warn_if_classic_on_a_cluster();
    Broker::connect(&settings.amqp.urls, name, topology(settings)).await
}

/// The topology the settings describe.
pub fn topology(settings: &Settings) -> Topology {
    Topology::new(
        &settings.amqp,
        &Policy::new(&settings.retry),
        settings.dedup.retention,
    )
}
