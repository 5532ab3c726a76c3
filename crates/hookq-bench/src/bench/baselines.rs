//! The baselines `hookq bench` sets hookq's figures beside: lapin with nothing
//! of hookq around it, on connections of its own. The raw broker's ceiling
//! (publish with pipelined confirms; consume with acks), and the few lines a
//! user would write by hand instead of hookq: an ingress (axum, one channel
//! in confirm mode, publish the body, await the confirm, 202; and the same
//! publishing hookq's message, to tell what the message costs the broker from
//! what hookq's code costs) and a forwarder
//! (one channel, POST each delivery's body with a keep-alive client, ack after
//! the 2xx).
//!
//! The one place outside `broker/` that imports lapin, by design: this is the
//! code a user would write without hookq. It has no reconnects, no
//! supervision, no signature, key, dedup or retries.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio_util::sync::CancellationToken;

use hookq::broker::{Error, codec};

/// How long the hand-written code waits for a connection.
const HAND_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
use crate::stats::serve_local;
use hookq::config::{AmqpUrl, TargetUrl};
use hookq::message::{DedupKey, Envelope};

async fn connect(url: &AmqpUrl, name: &str) -> Result<Connection, Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let attempt = tokio::time::timeout(
        HAND_CONNECT_TIMEOUT,
        Connection::connect(url.expose(), props),
    )
    .await
    .map_err(|_| Error::ConnectTimeout(HAND_CONNECT_TIMEOUT))?;
    attempt.map_err(|cause| Error::Connect {
        url: url.to_string(),
        cause,
    })
}

/// A consumer on `queue` with manual acks and `prefetch` unacked at most.
async fn consumer(channel: &Channel, queue: &str, prefetch: u16) -> Result<lapin::Consumer, Error> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            "hookq-bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(consumer)
}

/// Acks one delivery; `false` from lapin means the channel is gone, and the
/// ack with it.
async fn ack(acker: &lapin::Acker) -> Result<(), Error> {
    match acker.ack(BasicAckOptions::default()).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::Unavailable),
        Err(e) => Err(Error::Amqp(e)),
    }
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
    let opts = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let wire = Wire {
        exchange,
        routing_key,
        opts,
        body: &env.body,
        props: codec::encode(env),
    };
    publish_many(url, wire, count, window).await
}

/// The same as [`publish_confirmed`] with the message the hand-written
/// ingress publishes: `body` alone, persistent, through the default exchange
/// straight into `queue`. Beside hookq's message it shows what the broker
/// itself spends on the topic exchange, `mandatory` and hookq's headers.
pub async fn publish_bare(
    url: &AmqpUrl,
    queue: &str,
    body: &[u8],
    count: u32,
    window: usize,
) -> Result<Duration, Error> {
    let wire = Wire {
        exchange: "",
        routing_key: queue,
        opts: BasicPublishOptions::default(),
        body,
        props: BasicProperties::default().with_delivery_mode(2),
    };
    publish_many(url, wire, count, window).await
}

/// One message as it goes on the wire, published again and again.
struct Wire<'a> {
    exchange: &'a str,
    routing_key: &'a str,
    opts: BasicPublishOptions,
    body: &'a [u8],
    props: BasicProperties,
}

async fn publish_many(
    url: &AmqpUrl,
    wire: Wire<'_>,
    count: u32,
    window: usize,
) -> Result<Duration, Error> {
    let connection = connect(url, "hookq-bench-raw-publish").await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let started = Instant::now();
    let publishes = futures::stream::iter(0..count)
        .map(|_| {
            let (channel, wire) = (&channel, &wire);
            async move {
                let confirm = channel
                    .basic_publish(
                        wire.exchange.into(),
                        wire.routing_key.into(),
                        wire.opts,
                        wire.body,
                        wire.props.clone(),
                    )
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
    let mut consumer = consumer(&channel, queue, prefetch).await?;
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
                    ack(&d.acker).await
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

/// The shovel a user would write by hand: consume `count` messages from
/// `from` (prefetch `window`), publish each body with its properties to the
/// queue `to` on a confirm-mode channel, and ack the original once the copy
/// is confirmed: the same publish-then-ack order as `hookq shovel`, without
/// its reading, filters or envelope. Returns the time from the first delivery
/// to the last ack.
pub async fn move_confirmed(
    url: &AmqpUrl,
    from: &str,
    to: &str,
    count: u32,
    window: u16,
) -> Result<Duration, Error> {
    let connection = connect(url, "hookq-bench-hand-move").await?;
    let (consume, publish) = (
        connection.create_channel().await?,
        connection.create_channel().await?,
    );
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = consumer(&consume, from, window).await?;
    let mut moves = FuturesUnordered::new();
    let (mut received, mut first) = (0u32, None::<Instant>);
    while received < count || !moves.is_empty() {
        tokio::select! {
            Some(r) = moves.next(), if !moves.is_empty() => { r?; }
            d = consumer.next(), if received < count => {
                let Some(d) = d else { return Err(Error::Unavailable) };
                let d = d?;
                first.get_or_insert_with(Instant::now);
                received += 1;
                let publish = &publish;
                moves.push(async move {
                    let confirm = publish
                        .basic_publish(
                            "".into(),
                            to.into(),
                            BasicPublishOptions { mandatory: true, ..Default::default() },
                            &d.data,
                            d.properties.clone(),
                        )
                        .await?
                        .await?;
                    if !matches!(confirm, Confirmation::Ack(None)) {
                        return Err(Error::Nacked);
                    }
                    ack(&d.acker).await
                });
            }
        }
    }
    let elapsed = first.map(|f| f.elapsed()).unwrap_or_default();
    let _ = connection.close(200, "done".into()).await;
    Ok(elapsed)
}

/// A durable queue of `queue_type` (`quorum`, `classic`), as a user declares one.
async fn declare(channel: &Channel, queue: &str, queue_type: &str) -> Result<(), Error> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(queue_type.into()),
    );
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel.queue_declare(queue.into(), opts, args).await?;
    Ok(())
}

/// Deletes a queue a baseline declared.
pub async fn delete_queue(url: &AmqpUrl, queue: &str) -> Result<(), Error> {
    let connection = connect(url, "hookq-bench-cleanup").await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// What the hand-written ingress publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// The body alone, persistent, through the default exchange straight
    /// into the queue: what a user would write first.
    Bare,
    /// hookq's own message (its properties and headers, the forwarded
    /// request headers included), `mandatory`, through a topic exchange
    /// bound to the queue with `#` as hookq's work queue is: what the
    /// contract's message costs the broker, without hookq's code around it.
    Hookq,
    /// hookq's message through a direct exchange bound with its routing key:
    /// what the topic exchange's routing costs, beside [`Shape::Hookq`].
    HookqDirect,
}

/// The hand-written ingress, running until `stop`: any `POST` publishes (as
/// `shape` says) to `queue` (declared here, with its exchange for
/// [`Shape::Hookq`]: `<queue>.x`) on one confirm-mode channel, and answers
/// 202 once the broker confirmed it, 503 otherwise.
pub async fn hand_ingress(
    url: &AmqpUrl,
    queue: &str,
    queue_type: &str,
    shape: Shape,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    struct Hand {
        channel: Channel,
        queue: String,
        exchange: String,
        shape: Shape,
        _connection: Connection,
    }
    async fn publish(
        State(h): State<Arc<Hand>>,
        headers: axum::http::HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let published = match h.shape {
            Shape::Bare => {
                let props = BasicProperties::default().with_delivery_mode(2);
                h.channel
                    .basic_publish(
                        "".into(),
                        h.queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await
            }
            Shape::Hookq | Shape::HookqDirect => {
                let content_type = headers
                    .get(axum::http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let id = hookq::message::MessageId::new();
                let key = DedupKey(format!("bench:{}", id.0));
                let env = Envelope::received(
                    "bench",
                    key,
                    body,
                    content_type,
                    hookq::message::forwardable_headers(headers),
                );
                let opts = BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                };
                h.channel
                    .basic_publish(
                        h.exchange.as_str().into(),
                        "source.bench".into(),
                        opts,
                        &env.body,
                        codec::encode(&env),
                    )
                    .await
            }
        };
        match published {
            Ok(confirm) => match confirm.await {
                Ok(Confirmation::Ack(None)) => StatusCode::ACCEPTED,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            },
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    let connection = connect(url, "hookq-bench-hand-ingress").await?;
    let channel = connection.create_channel().await?;
    declare(&channel, queue, queue_type).await?;
    let exchange = format!("{queue}.x");
    if shape != Shape::Bare {
        let (kind, binding) = match shape {
            Shape::HookqDirect => (ExchangeKind::Direct, "source.bench"),
            _ => (ExchangeKind::Topic, "#"),
        };
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                exchange.as_str().into(),
                kind,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.into(),
                exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let hand = Arc::new(Hand {
        channel,
        queue: queue.to_string(),
        exchange,
        shape,
        _connection: connection,
    });
    let router = axum::Router::new()
        .fallback(axum::routing::post(publish))
        .with_state(hand);
    serve_local(router, stop).await
}

/// Deletes an exchange a baseline declared.
pub async fn delete_exchange(url: &AmqpUrl, exchange: &str) -> Result<(), Error> {
    let connection = connect(url, "hookq-bench-cleanup").await?;
    let channel = connection.create_channel().await?;
    channel
        .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(())
}

/// The hand-written forwarder: consumes `count` messages from `queue` (up to
/// `prefetch` unacked), POSTs each body to `target` with a keep-alive client,
/// `concurrency` at once, and acks each after its 2xx (a failure is requeued).
/// Returns the time from the first delivery to the last ack.
pub async fn hand_forwarder(
    url: &AmqpUrl,
    queue: &str,
    target: &TargetUrl,
    count: u32,
    prefetch: u16,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let connection = connect(url, "hookq-bench-hand-forwarder").await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "hookq-bench-hand".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let http = reqwest::Client::new();
    let mut running = FuturesUnordered::new();
    let (mut acked, mut first) = (0u32, None);
    while acked < count {
        tokio::select! {
            Some(done) = running.next(), if !running.is_empty() => {
                let ok: bool = done?;
                acked += u32::from(ok);
            }
            d = consumer.next(), if running.len() < concurrency => {
                let Some(d) = d else { anyhow::bail!("the consumer ended") };
                let d = d?;
                first.get_or_insert_with(Instant::now);
                let (http, target) = (http.clone(), target.url().clone());
                running.push(async move {
                    let answered = http.post(target).body(d.data).send().await;
                    if answered.is_ok_and(|r| r.status().is_success()) {
                        d.acker.ack(BasicAckOptions::default()).await?;
                        Ok(true)
                    } else {
                        d.acker.nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() }).await?;
                        Ok::<bool, lapin::Error>(false)
                    }
                });
            }
        }
    }
    let elapsed = first.map(|f| f.elapsed()).unwrap_or_default();
    let _ = connection.close(200, "done".into()).await;
    Ok(elapsed)
}
