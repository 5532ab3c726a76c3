//! The worker's side of the done-logs (with `amqp.partitions` > 1): after a
//! key's 2xx its record is appended to its partition's stream, with confirm,
//! before the message is acked (records of messages done together share one
//! stream message); and a worker that becomes active for a partition reads the
//! partition's done-log into its SQLite store before it delivers anything from
//! it, so keys another host delivered stay delivered.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::Processor;
use crate::broker::{self, Broker};
use crate::dedup::store::{ReadPosition, Store};
use crate::message::{DedupKey, epoch_ms};
use std::sync::Arc;

/// How long an append or a marker may wait for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// A catch-up that receives nothing for this long has failed (the message that
/// started it goes back to the queue, and a later one tries again).
const READ_STALL: Duration = Duration::from_secs(30);
/// How long the record at a stored read position may take to arrive before
/// the done-log is taken for another one (see [`DoneLog::catch_up`]).
const FIRST_RECORD_WAIT: Duration = Duration::from_secs(2);
/// Keys that share one stream message at most.
const BATCH: usize = 512;
/// Records applied between notes of how far the catch-up got.
const NOTE_EVERY: u64 = 1000;

type Reply = oneshot::Sender<Result<(), broker::Error>>;

/// Appends and catches up for one worker.
pub struct DoneLog {
    broker: Broker,
    store: Store,
    appends: mpsc::UnboundedSender<(u32, DedupKey, Reply)>,
}

impl DoneLog {
    /// Starts the appender; it ends when the `DoneLog` is dropped.
    pub fn start(broker: Broker, store: Store) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(append_forever(broker.clone(), rx));
        Self {
            broker,
            store,
            appends: tx,
        }
    }

    /// Appends `key` to partition `partition`'s done-log; returns once the
    /// broker confirmed the record.
    pub async fn record(&self, partition: u32, key: &DedupKey) -> Result<(), broker::Error> {
        let (reply, done) = oneshot::channel();
        self.appends
            .send((partition, key.clone(), reply))
            .map_err(|_| broker::Error::Unavailable)?;
        done.await.map_err(|_| broker::Error::Unavailable)?
    }

    /// Reads partition `partition`'s done-log into the store, from where this
    /// host left it up to a marker appended now: everything any worker
    /// recorded before this worker took the partition over. Returns how many
    /// keys it applied.
    ///
    /// Where this host left it is a record's offset and fingerprint: the
    /// reader starts at that record, and when it is not there (the done-log
    /// was recreated, or the record expired) reads the done-log from its
    /// start instead. So a recreated done-log is never waited on (a reader
    /// past a stream's end waits for the stream to get there).
    pub async fn catch_up(&self, partition: u32) -> Result<u64, CatchUpError> {
        let log = self.broker.topology().done(partition);
        let token = uuid::Uuid::now_v7().to_string();
        self.broker
            .append_marker(partition, &token, CONFIRM_TIMEOUT)
            .await?;
        let from = self.store.read_position(&log).await?;
        if let Some(at) = from {
            match self.read(partition, &log, Some(&at), &token).await {
                Err(CatchUpError::NotThere) => {
                    tracing::info!(
                        partition,
                        offset = at.offset,
                        "the done-log is not the one this host read before (recreated, or expired that far): reading it from its start"
                    );
                }
                done => return done,
            }
        }
        self.read(partition, &log, None, &token).await
    }

    /// Reads `log` from `at` (its start when `None`) up to the marker `token`,
    /// applying every record after `at`; [`CatchUpError::NotThere`] when the
    /// first record is not `at`.
    async fn read(
        &self,
        partition: u32,
        log: &str,
        at: Option<&ReadPosition>,
        token: &str,
    ) -> Result<u64, CatchUpError> {
        let mut reader = self
            .broker
            .read_done(partition, at.map(|p| p.offset))
            .await?;
        let mut applied = 0u64;
        let mut since_note = 0u64;
        let mut first = at.is_some();
        let result = loop {
            // The record at a stored position is there at once when it is there
            // at all; a wrong guess only costs reading from the start.
            let wait = if first { FIRST_RECORD_WAIT } else { READ_STALL };
            let record = match tokio::time::timeout(wait, reader.next()).await {
                Err(_) if first => break Err(CatchUpError::NotThere),
                Err(_) => break Err(CatchUpError::Stalled(READ_STALL)),
                Ok(None) => break Err(broker::Error::Unavailable.into()),
                Ok(Some(Err(e))) => break Err(e.into()),
                Ok(Some(Ok(r))) => r,
            };
            if first {
                first = false;
                let expected = at.is_some_and(|p| {
                    p.offset == record.offset && p.fingerprint == record.fingerprint()
                });
                if !expected {
                    break Err(CatchUpError::NotThere);
                }
                // Applied before: only what follows it is new.
                continue;
            }
            let position = ReadPosition {
                offset: record.offset,
                fingerprint: record.fingerprint(),
            };
            if record.marker.as_deref() == Some(token) {
                self.store.set_read_position(log, position).await?;
                break Ok(applied);
            }
            if !record.keys.is_empty() {
                applied += u64::try_from(record.keys.len()).unwrap_or(0);
                self.store.done_many(record.keys, record.at_ms).await?;
            }
            since_note += 1;
            if since_note >= NOTE_EVERY {
                since_note = 0;
                self.store.set_read_position(log, position).await?;
            }
        };
        reader.close().await;
        result
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error(transparent)]
    Broker(#[from] broker::Error),
    #[error(transparent)]
    Store(#[from] crate::dedup::Error),
    #[error("the done-log sent nothing for {0:?}")]
    Stalled(Duration),
    /// The record this host read last is not at its offset any more.
    #[error("the done-log's record at the stored position is another one")]
    NotThere,
    /// The worker gave up waiting for the partition (its grace period ended).
    #[error("stopping")]
    Stopping,
}

/// First wait, and longest, between tries to take a partition that another
/// process on this host holds.
const TAKE_WAIT_MIN: Duration = Duration::from_millis(20);
const TAKE_WAIT_MAX: Duration = Duration::from_secs(1);

/// This process's hold on one partition in the host's store, counted: its
/// consumers of the partition (one per connection, the last one's
/// deliveries maybe still finishing) take it while busy and leave it when
/// idle. The store row goes when the last one leaves; until then another
/// process on the host that becomes the partition's active consumer waits,
/// so a key's in-memory claim and the next process's never overlap.
pub(super) struct Fence {
    store: Store,
    log: String,
    takers: tokio::sync::Mutex<usize>,
    /// The worker's grace period is over: stop trying to leave (the row
    /// goes with this process's lease).
    abandon: tokio_util::sync::CancellationToken,
}

impl Fence {
    pub(super) fn new(
        store: Store,
        log: String,
        abandon: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            store,
            log,
            takers: tokio::sync::Mutex::new(0),
            abandon,
        }
    }

    /// Takes the partition, waiting while another live process on the host
    /// holds it; false when `abandon` fires first.
    async fn take(&self, abandon: &tokio_util::sync::CancellationToken) -> bool {
        let mut takers = self.takers.lock().await;
        if *takers == 0 {
            let mut wait = TAKE_WAIT_MIN;
            let mut said = false;
            loop {
                match self.store.take_partition(&self.log).await {
                    Ok(true) => break,
                    Ok(false) if !said => {
                        said = true;
                        tracing::info!(partition = %self.log, "another worker process on this host still delivers this partition's messages; waiting for them to end");
                    }
                    // A failing store is logged by the store; wait and try again.
                    Ok(false) | Err(_) => {}
                }
                tokio::select! {
                    _ = abandon.cancelled() => return false,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(TAKE_WAIT_MAX);
            }
        }
        *takers += 1;
        true
    }

    /// Leaves the partition once its last taker here does. The row must go,
    /// or another process would wait for this one as long as it lives: a
    /// failing store is tried again until it takes the leave, or until the
    /// grace period of a stopping worker ends (then the row goes with this
    /// process's lease, within `dedup.lease_ms`).
    async fn leave(&self) {
        let mut takers = self.takers.lock().await;
        *takers = takers.saturating_sub(1);
        if *takers > 0 {
            return;
        }
        let mut wait = TAKE_WAIT_MIN;
        while self.store.leave_partition(&self.log).await.is_err() {
            tokio::select! {
                _ = self.abandon.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(TAKE_WAIT_MAX);
        }
    }
}

/// Takes every waiting append, groups them by partition, writes one record
/// per partition (up to [`BATCH`] keys) with confirm, and answers each waiter.
async fn append_forever(broker: Broker, mut rx: mpsc::UnboundedReceiver<(u32, DedupKey, Reply)>) {
    while let Some(first) = rx.recv().await {
        let mut by_partition: HashMap<u32, (Vec<DedupKey>, Vec<Reply>)> = HashMap::new();
        let mut add = |(p, key, reply): (u32, DedupKey, Reply)| {
            let e = by_partition.entry(p).or_default();
            e.0.push(key);
            e.1.push(reply);
        };
        add(first);
        let mut n = 1;
        while n < BATCH {
            match rx.try_recv() {
                Ok(a) => {
                    add(a);
                    n += 1;
                }
                Err(_) => break,
            }
        }
        let at = epoch_ms();
        let writes = by_partition.into_iter().map(|(p, (keys, replies))| {
            let broker = &broker;
            async move {
                let r = broker.append_done(p, &keys, at, CONFIRM_TIMEOUT).await;
                if let Err(e) = &r {
                    tracing::warn!(partition = p, keys = keys.len(), error = %e, "could not append to the done-log");
                }
                for reply in replies {
                    let _ = reply.send(match &r {
                        Ok(()) => Ok(()),
                        Err(_) => Err(broker::Error::Unavailable),
                    });
                }
            }
        });
        futures::future::join_all(writes).await;
    }
}

/// Whether a worker has read a partition's done-log since it could last have
/// stopped being the partition's active consumer. The broker never says when
/// a consumer becomes active (again); it can only have stopped being it while
/// none of its messages from the partition were unsettled: RabbitMQ 4.x hands
/// a partition to a higher-priority consumer only once the current one has
/// settled what it holds, and 3.10 only when the consumer goes. So the read
/// is due before the first message of every busy spell: at the first message
/// of a subscription, and at the first one after the partition's messages in
/// flight fell to none ([`Activation::idle`]).
pub(super) struct Activation {
    partition: u32,
    /// This process's hold on the partition in the store, taken for each
    /// busy spell before the done-log is read.
    fence: Arc<Fence>,
    /// Set once the done-log is read for the current busy spell.
    read: std::sync::Mutex<Arc<tokio::sync::OnceCell<()>>>,
    /// Reads since the subscription began (the first one is logged at info).
    reads: std::sync::atomic::AtomicU64,
    /// Failed reads in a row: the pause before handing a message back grows
    /// with them, so a done-log that keeps failing is not a hot loop, nor a
    /// fast way to spend a quorum queue's delivery limit.
    failures: std::sync::atomic::AtomicU32,
}

/// The first pause before a message goes back after a failed done-log read;
/// it doubles with each failure in a row, up to [`CATCH_UP_PAUSE_MAX`].
const CATCH_UP_PAUSE: Duration = Duration::from_millis(500);
const CATCH_UP_PAUSE_MAX: Duration = Duration::from_secs(30);

impl Activation {
    pub(super) fn new(partition: u32, fence: Arc<Fence>) -> Self {
        Self {
            partition,
            fence,
            read: std::sync::Mutex::new(Arc::new(tokio::sync::OnceCell::new())),
            reads: Default::default(),
            failures: Default::default(),
        }
    }

    /// None of the partition's messages is in flight (or will be: the
    /// consumer ended and what it left has finished): the next one reads the
    /// done-log first, and this process leaves the partition to whichever
    /// takes it next. The leave, when this spell took the partition, is for
    /// the caller to run on the worker's task tracker, so that a stopping
    /// worker has left before it exits (else the next process on the host
    /// would wait for its lease to run out).
    pub(super) fn idle(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        let mut cell = self.read.lock().ok()?;
        if !cell.initialized() {
            return None;
        }
        *cell = Arc::new(tokio::sync::OnceCell::new());
        let fence = self.fence.clone();
        Some(async move { fence.leave().await })
    }

    /// Reads the done-log once for this busy spell (concurrent messages wait
    /// for the same read). False when the read failed: after a pause, the
    /// message goes back and a later one tries again.
    pub(super) async fn ready(&self, step: &Processor, log: &DoneLog) -> bool {
        use std::sync::atomic::Ordering;
        let Ok(cell) = self.read.lock().map(|c| c.clone()) else {
            return false;
        };
        let i = self.partition;
        let read = cell
            .get_or_try_init(|| async {
                if !self.fence.take(&step.abandon).await {
                    return Err(CatchUpError::Stopping);
                }
                let started = std::time::Instant::now();
                let applied = match log.catch_up(i).await {
                    Ok(applied) => applied,
                    Err(e) => {
                        self.fence.leave().await;
                        return Err(e);
                    }
                };
                let first = self.reads.fetch_add(1, Ordering::Relaxed) == 0;
                step.events
                    .partition_read(i, applied, started.elapsed(), first);
                Ok::<(), CatchUpError>(())
            })
            .await;
        match read {
            Ok(()) => {
                self.failures.store(0, Ordering::Relaxed);
                true
            }
            Err(CatchUpError::Stopping) => false,
            Err(e) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed).min(16);
                let pause = CATCH_UP_PAUSE
                    .saturating_mul(1 << n)
                    .min(CATCH_UP_PAUSE_MAX);
                tracing::warn!(partition = i, error = %e, ?pause, "could not read the partition's done-log; handing the message back");
                tokio::select! {
                    _ = step.abandon.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
                false
            }
        }
    }
}
