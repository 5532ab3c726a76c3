//! The baselines `hookq bench` sets hookq's figures beside: lapin with nothing
//! of hookq around it, on connections of its own. The raw broker's ceiling
//! (publish with pipelined confirms; consume with acks), and the few lines a
//! user would write by hand instead of hookq.
//!
//! The one place outside `broker/` that imports lapin, by design: this is the
//! code a user would write without hookq. It has no reconnects, no supervision
//! and no topology of its own (the queues must exist).

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Confirmation, Connection, ConnectionProperties};

use crate::broker::{CONNECT_TIMEOUT, Error, codec};
use crate::config::AmqpUrl;
use crate::message::Envelope;

async fn connect(url: &AmqpUrl, name: &str) -> Result<Connection, Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let attempt = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url.expose(), props))
        .await
        .map_err(|_| Error::ConnectTimeout(CONNECT_TIMEOUT))?;
    attempt.map_err(|cause| Error::Connect {
        url: url.to_string(),
        cause,
    })
}

/// Publishes `count` copies of `env` (persistent, `mandatory`, the properties
/// hookq puts on the wire) to `exchange` with `routing_key`, on one
/// confirm-mode channel with up to `window` publishes awaiting their confirm at
/// once. Returns the time from the first publish to the last confirm.
pub async fn publish_confirmed(
    url: &AmqpUrl,
    exchange: &str,
    routing_key: &str,
    env: &Envelope,
    count: u32,
    window: usize,
) -> Result<Duration, Error> {
    let connection = connect(url, "hookq-bench-raw-publish").await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let props = codec::encode(env);
    let opts = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let started = Instant::now();
    let publishes = futures::stream::iter(0..count)
        .map(|_| {
            let (channel, props) = (&channel, props.clone());
            async move {
                let confirm = channel
                    .basic_publish(exchange.into(), routing_key.into(), opts, &env.body, props)
                    .await?
                    .await?;
                match confirm {
                    Confirmation::Ack(None) => Ok(()),
                    Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)) => {
                        Err(Error::Returned(r.reply_text.to_string()))
                    }
                    Confirmation::Nack(None) | Confirmation::NotRequested => Err(Error::Nacked),
                }
            }
        })
        .buffer_unordered(window.max(1));
    futures::pin_mut!(publishes);
    while let Some(r) = publishes.next().await {
        r?;
    }
    let elapsed = started.elapsed();
    let _ = connection.close(200, "done".into()).await;
    Ok(elapsed)
}

/// Consumes `count` messages from `queue` with manual acks and `prefetch`
/// unacked at most, acking each one as soon as it arrives (acks are not awaited
/// one by one, so the next delivery is not held up by the last ack's write).
/// Returns the time from the first delivery to the last ack.
pub async fn consume_acked(
    url: &AmqpUrl,
    queue: &str,
    count: u32,
    prefetch: u16,
) -> Result<Duration, Error> {
    let connection = connect(url, "hookq-bench-raw-consume").await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "hookq-bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut acks = FuturesUnordered::new();
    let mut received = 0u32;
    let mut first: Option<Instant> = None;
    while received < count {
        tokio::select! {
            Some(r) = acks.next(), if !acks.is_empty() => { r?; }
            d = consumer.next() => {
                let Some(d) = d else { return Err(Error::Unavailable) };
                let d = d?;
                first.get_or_insert_with(Instant::now);
                received += 1;
                acks.push(async move {
                    // `false`: the channel is gone and the ack with it.
                    match d.acker.ack(BasicAckOptions::default()).await {
                        Ok(true) => Ok(()),
                        Ok(false) => Err(Error::Unavailable),
                        Err(e) => Err(Error::Amqp(e)),
                    }
                });
            }
        }
    }
    while let Some(r) = acks.next().await {
        r?;
    }
    let elapsed = first.map(|f| f.elapsed()).unwrap_or_default();
    let _ = connection.close(200, "done".into()).await;
    Ok(elapsed)
}
