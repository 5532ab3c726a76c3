//! The hand-written baselines' phases: the ingress under the same load as
//! hookq's, the forwarder draining what it accepted to the same target.

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::baselines::Shape;
use super::load::{IngressFigures, load};
use super::probe::{cpu_time, cpu_us_per};
use super::{STALL, baselines, first_url, per_s, say};
use crate::args::BenchArgs;
use hookq_testkit::FakeTarget;
use hookq_testkit::Sandbox;

/// The queue the hand-written ingress fills and the hand-written forwarder drains.
fn hand_queue(sandbox: &Sandbox) -> String {
    format!("{}.hand", sandbox.settings.amqp.prefix)
}

/// The queue the hand-written ingress of hookq's message fills (through its
/// exchange, `<queue>.x`); nothing drains it.
fn same_queue(sandbox: &Sandbox) -> String {
    format!("{}.hand-same", sandbox.settings.amqp.prefix)
}

/// Deletes the hand-written baselines' queues and exchange, if left.
pub(super) async fn remove_hand_queue(sandbox: &Sandbox) {
    if let Some(url) = sandbox.settings.amqp.urls.first() {
        let _ = baselines::delete_queue(url, &hand_queue(sandbox)).await;
        let same = same_queue(sandbox);
        let _ = baselines::delete_queue(url, &same).await;
        let _ = baselines::delete_exchange(url, &format!("{same}.x")).await;
    }
}

/// The hand-written ingress (see [`baselines::hand_ingress`]) under the same
/// load as hookq's. The bare one leaves its backlog for [`hand_forwarder`];
/// the backlog of the one publishing hookq's message is deleted at once.
pub(super) async fn hand_ingress(
    sandbox: &Sandbox,
    args: &BenchArgs,
    body: &[u8],
    shape: Shape,
) -> anyhow::Result<IngressFigures> {
    say(format_args!(
        "hand-written ingress ({}): {} POSTs of {} bytes over {} connections",
        match shape {
            Shape::Bare => "a bare message",
            Shape::Hookq => "hookq's message",
            Shape::HookqDirect => "hookq's message, direct exchange",
        },
        args.messages,
        body.len(),
        args.connections
    ));
    let url = first_url(&sandbox.settings)?;
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let queue_type = sandbox.settings.amqp.queue_type.as_str();
    let queue = match shape {
        Shape::Bare => hand_queue(sandbox),
        Shape::Hookq | Shape::HookqDirect => same_queue(sandbox),
    };
    let addr = baselines::hand_ingress(url, &queue, queue_type, shape, stop).await?;
    let figures = load(
        &format!("http://{addr}/hooks/bench"),
        args,
        body,
        "the hand-written ingress",
    )
    .await;
    if shape != Shape::Bare {
        baselines::delete_queue(url, &queue).await?;
        baselines::delete_exchange(url, &format!("{queue}.x")).await?;
    }
    figures
}

/// The hand-written forwarder (see [`baselines::hand_forwarder`]) draining
/// the hand-written ingress's backlog of `count` to the same target, at the
/// worker's prefetch and concurrency.
pub(super) async fn hand_forwarder(
    sandbox: &Sandbox,
    sink: &FakeTarget,
    count: u32,
) -> anyhow::Result<ForwardFigures> {
    say(format_args!(
        "hand-written forwarder: draining a backlog of {count} messages (target answers 200)"
    ));
    let s = &sandbox.settings;
    let url = first_url(s)?;
    let queue = hand_queue(sandbox);
    let cpu = cpu_time();
    let took = tokio::time::timeout(
        STALL + Duration::from_millis(u64::from(count)),
        baselines::hand_forwarder(
            url,
            &queue,
            &super::target_url(sink)?,
            count,
            s.amqp.prefetch,
            s.worker.concurrency,
        ),
    )
    .await
    .context("the hand-written forwarder did not deliver every message in time")??;
    let cpu_us = cpu_us_per(cpu, count);
    baselines::delete_queue(url, &queue).await?;
    Ok(ForwardFigures {
        per_s: per_s(count, took),
        cpu_us,
    })
}

pub(super) struct ForwardFigures {
    pub per_s: f64,
    pub cpu_us: f64,
}
