//! One live AMQP connection to one node, with the topology declared on it and
//! a few confirm-mode publisher channels.

use std::sync::atomic::{AtomicUsize, Ordering};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};

use super::{Error, topology};
use crate::config::AmqpUrl;

/// Publisher channels per connection. Confirms are pipelined on each one; a few
/// channels spread the broker-side work over more than one Erlang process.
const PUBLISHER_CHANNELS: usize = 4;

pub(super) struct Session {
    pub connection: Connection,
    publishers: Vec<Channel>,
    next: AtomicUsize,
    /// `host:port` of the node this session is connected to.
    pub node: String,
}

impl Session {
    pub fn healthy(&self) -> bool {
        self.connection.status().connected()
            && self.publishers.iter().all(|c| c.status().connected())
    }

    /// The next publisher channel, round robin.
    pub fn publisher(&self) -> Option<&Channel> {
        let n = self.publishers.len().max(1);
        self.publishers
            .get(self.next.fetch_add(1, Ordering::Relaxed) % n)
    }
}

/// Connects to `url`, declares the topology and opens the publishers. The
/// connection's name, as the RabbitMQ UI shows it, says which part of which
/// prefix it is and which node it asked for.
pub(super) async fn establish(
    url: &AmqpUrl,
    name: &str,
    topo: &topology::Topology,
) -> Result<Session, Error> {
    let node = url.node();
    let shown = format!("{name} [{}] to {node}", topo.prefix);
    let props = ConnectionProperties::default().with_connection_name(shown.into());
    let connection = Connection::connect(url.expose(), props)
        .await
        .map_err(|cause| Error::Connect {
            url: url.to_string(),
            cause,
        })?;
    topology::declare(&connection, topo).await?;
    let mut publishers = Vec::with_capacity(PUBLISHER_CHANNELS);
    for _ in 0..PUBLISHER_CHANNELS {
        let c = super::channel::open(&connection).await?;
        c.confirm_select(ConfirmSelectOptions::default()).await?;
        publishers.push(c);
    }
    Ok(Session {
        connection,
        publishers,
        next: AtomicUsize::new(0),
        node,
    })
}
