//! The broker side of processing: a delivery's [`Receipt`] (ack, hand
//! back, whether its consumer is gone) and [`Republish`] (delay tiers,
//! `P.dead`, the done-log), over the broker handle.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::handover::DoneLog;
use super::{Message, REPUBLISH_TIMEOUT, Receipt, Republish};
use crate::broker::{self, Acker, Broker, Incoming};
use crate::message::Envelope;
use crate::retry::DelayTier;

/// A delivery from the consumer, as the step sees it.
pub(super) fn message(m: Incoming) -> Message<BrokerReceipt> {
    Message {
        envelope: m.envelope,
        receipt: BrokerReceipt {
            acker: m.acker,
            lost: m.lost,
        },
    }
}

/// The broker side of [`Receipt`]: the delivery's acker and its consumer's fate.
pub struct BrokerReceipt {
    acker: Acker,
    lost: CancellationToken,
}

impl Receipt for BrokerReceipt {
    fn lost(&self) -> bool {
        self.lost.is_cancelled()
    }

    async fn until_lost(&self) {
        self.lost.cancelled().await
    }

    async fn ack(self) -> Result<(), broker::Error> {
        self.acker.ack().await
    }

    async fn requeue(self) {
        if let Err(e) = self.acker.requeue().await {
            tracing::debug!(error = %e, "requeue failed; the broker will redeliver anyway");
        }
    }
}

/// The broker side of [`Republish`].
pub(super) struct BrokerRepublish {
    pub(super) broker: Broker,
    /// With partitions.
    pub(super) done_log: Option<Arc<DoneLog>>,
}

impl Republish for BrokerRepublish {
    async fn to_delay(
        &self,
        tier: DelayTier,
        env: &Envelope,
        expiration: Duration,
    ) -> Result<(), broker::Error> {
        let queue = self.broker.topology().delay(tier);
        self.broker
            .publish_to_queue(&queue, env, Some(expiration), REPUBLISH_TIMEOUT)
            .await
    }

    async fn to_dead(&self, env: &Envelope) -> Result<(), broker::Error> {
        self.broker.publish_dead(env, REPUBLISH_TIMEOUT).await
    }

    async fn to_hold(&self, target: &str, env: &Envelope) -> Result<(), broker::Error> {
        self.broker
            .hold_for_target(target, env, REPUBLISH_TIMEOUT)
            .await
    }

    async fn done(&self, env: &Envelope) -> Result<(), broker::Error> {
        match &self.done_log {
            Some(log) => {
                let partition = self.broker.topology().partition(&env.key);
                log.record(partition, &env.key).await
            }
            None => Ok(()),
        }
    }

    /// With partitions, every message this worker runs came through its
    /// partition's activation, which took the partition in the store.
    fn alone(&self) -> bool {
        self.done_log.is_some()
    }
}
