//! Every channel hookq opens comes from [`open`].
//!
//! lapin (4.12) keeps the error of a channel the broker closed (a passive
//! declaration of a missing queue: a 404) under its channel id, and never
//! clears it when it hands that id out again. Channel ids wrap at the
//! negotiated maximum (2,047 on RabbitMQ), so about every 2,047th channel
//! opened after such a close fails to open, with the old error (a NOT_FOUND
//! about a queue the new channel never named). An admin request answered 503
//! that way is what Schemathesis found. A channel open cannot fail with a
//! channel-level error of its own, so [`open`] takes the next id instead.

use lapin::protocol::AMQPErrorKind;
use lapin::{Channel, Connection, ErrorKind};

/// Ids tried at most: more than the channels hookq ever has the broker close
/// one after another.
const TRIES: usize = 16;

/// Opens a channel on `connection`, past ids that an earlier channel's
/// broker-side close left poisoned in lapin.
pub async fn open(connection: &Connection) -> lapin::Result<Channel> {
    let mut tries = 1;
    loop {
        match connection.create_channel().await {
            Err(e) if tries < TRIES && is_stale(&e) => {
                tracing::debug!(error = %e, "a channel id carried an old channel's error; taking the next");
                tries += 1;
            }
            other => return other,
        }
    }
}

/// A channel-level (soft) error on an open: what a closed channel left.
fn is_stale(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(amqp) if matches!(amqp.kind(), AMQPErrorKind::Soft(_)))
}
