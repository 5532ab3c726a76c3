//! The worker's processing driven directly, without a broker: one message in, one
//! outcome out, with a real SQLite file and a real HTTP target, and fakes for
//! the broker's two sides (the message's own ack, and republishing).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use hookq::broker;
use hookq::config::{DedupSettings, RetrySettings, TargetUrl, WorkerSettings};
use hookq::dedup::{Dedup, Tier};
use hookq::delivery::Delivery;
use hookq::events::{Events, Outcome};
use hookq::message::{DeadReason, DedupKey, Envelope};
use hookq::retry::{DelayTier, Policy};
use hookq::targets::Targets;
use hookq::worker::{Message, Processor, Receipt, Republish};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::support::{FakeTarget, wait_until};

const T: Duration = Duration::from_secs(10);

/// What the step did with the message itself.
#[derive(Default)]
struct Ledger {
    acked: bool,
    requeued: bool,
}

struct FakeReceipt {
    lost: CancellationToken,
    ledger: Arc<Mutex<Ledger>>,
}

impl Receipt for FakeReceipt {
    fn lost(&self) -> bool {
        self.lost.is_cancelled()
    }
    async fn until_lost(&self) {
        self.lost.cancelled().await
    }
    async fn ack(self) -> Result<(), broker::Error> {
        self.ledger.lock().unwrap().acked = true;
        Ok(())
    }
    async fn requeue(self) {
        self.ledger.lock().unwrap().requeued = true;
    }
}

/// Records republishes; refuses them while `refuse` is set. Done-log
/// appends: the first `fail_appends` fail; `appended` lists the others.
#[derive(Default)]
struct FakeOut {
    refuse: std::sync::atomic::AtomicBool,
    delayed: Mutex<Vec<(DelayTier, Envelope)>>,
    dead: Mutex<Vec<Envelope>>,
    held: Mutex<Vec<(String, Envelope)>>,
    fail_appends: std::sync::atomic::AtomicU32,
    appended: Mutex<Vec<String>>,
    /// Claims in memory, as for a partition the worker delivers alone.
    alone: std::sync::atomic::AtomicBool,
}

impl Republish for FakeOut {
    async fn to_delay(
        &self,
        tier: DelayTier,
        env: &Envelope,
        _expiration: Duration,
    ) -> Result<(), broker::Error> {
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(broker::Error::Returned("NO_ROUTE".into()));
        }
        self.delayed.lock().unwrap().push((tier, env.clone()));
        Ok(())
    }
    async fn to_dead(&self, env: &Envelope) -> Result<(), broker::Error> {
        self.dead.lock().unwrap().push(env.clone());
        Ok(())
    }
    async fn to_hold(&self, target: &str, env: &Envelope) -> Result<(), broker::Error> {
        self.held
            .lock()
            .unwrap()
            .push((target.to_string(), env.clone()));
        Ok(())
    }
    async fn done(&self, env: &Envelope) -> Result<(), broker::Error> {
        use std::sync::atomic::Ordering;
        let failing = self
            .fail_appends
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(broker::Error::Unavailable);
        }
        self.appended.lock().unwrap().push(env.key.0.clone());
        Ok(())
    }
    fn alone(&self) -> bool {
        self.alone.load(std::sync::atomic::Ordering::SeqCst)
    }
}

struct Rig {
    step: Processor,
    out: FakeOut,
    _dir: tempfile::TempDir,
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn rig(target: &FakeTarget, max_attempts: u32, inline_attempts: u32) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let dedup = DedupSettings {
        path: dir.path().join("d.db"),
        lease: ms(2000),
        ..Default::default()
    };
    let worker = WorkerSettings {
        target: Some(TargetUrl::parse(&target.url).unwrap().into()),
        timeout: ms(2000),
        ..Default::default()
    };
    let settings = hookq::config::Settings {
        worker: worker.clone(),
        ..Default::default()
    };
    let retry = RetrySettings {
        max_attempts,
        inline_attempts_set: Some(inline_attempts),
        inline_delay: ms(5),
        delays: [100, 200].map(ms).to_vec(),
        jitter: 0.0,
        ..Default::default()
    };
    let step = Processor {
        dedup: Arc::new(Dedup::open(&dedup, Events::new([]))),
        delivery: Delivery::new(&worker).unwrap(),
        targets: Arc::new(
            Targets::new(
                settings.resolved_targets(),
                &settings.sources,
                worker.target.as_ref(),
                worker.timeout,
                retry.max_delay,
                &Events::new([]),
            )
            .without_peers(),
        ),
        policy: Policy::new(&retry),
        events: Events::new([]),
        deliveries: Semaphore::new(4),
        delivery_limit: 3,
        timeout: worker.timeout,
        shutdown: CancellationToken::new(),
        abandon: CancellationToken::new(),
    };
    Rig {
        step,
        out: FakeOut::default(),
        _dir: dir,
    }
}

fn webhook(key: &str) -> Envelope {
    Envelope::received(
        "s",
        DedupKey(format!("s:{key}")),
        "{}".into(),
        Some("application/json".into()),
        Default::default(),
    )
}

fn message(env: &Envelope) -> (Message<FakeReceipt>, Arc<Mutex<Ledger>>, CancellationToken) {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let lost = CancellationToken::new();
    let m = Message {
        envelope: Ok(env.clone()),
        receipt: FakeReceipt {
            lost: lost.clone(),
            ledger: ledger.clone(),
        },
    };
    (m, ledger, lost)
}

async fn run(rig: &Rig, env: &Envelope) -> (Outcome, Arc<Mutex<Ledger>>) {
    let (m, ledger, _) = message(env);
    let outcome = tokio::time::timeout(T, rig.step.run(m, &rig.out))
        .await
        .expect("the step ends");
    (outcome, ledger)
}

async fn a_2xx_is_recorded_and_acked_and_a_copy_is_a_duplicate(alone: bool) {
    let target = FakeTarget::ok().await;
    let r = rig(&target, 3, 2);
    r.out
        .alone
        .store(alone, std::sync::atomic::Ordering::SeqCst);
    let env = webhook("a");
    let (outcome, ledger) = run(&r, &env).await;
    assert_eq!(outcome, Outcome::Delivered { attempt: 1 });
    assert!(ledger.lock().unwrap().acked);
    // Another message with the key, and this very message again: duplicates.
    for copy in [webhook("a"), env.clone()] {
        let (outcome, ledger) = run(&r, &copy).await;
        assert_eq!(outcome, Outcome::Duplicate { tier: Tier::Lru });
        assert!(ledger.lock().unwrap().acked);
    }
    assert_eq!(target.count(), 1);
}

/// With partitions, a 2xx whose done-log append failed goes back (recorded
/// in the store); its redelivery, a duplicate here, is appended before it is
/// acked: a host that takes the partition over must know the key.
async fn a_done_key_is_in_the_done_log_before_any_ack(alone: bool) {
    let target = FakeTarget::ok().await;
    let r = rig(&target, 3, 2);
    r.out
        .alone
        .store(alone, std::sync::atomic::Ordering::SeqCst);
    r.out
        .fail_appends
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let env = webhook("append");
    let (outcome, ledger) = run(&r, &env).await;
    assert_eq!(outcome, Outcome::HandedBack);
    assert!(ledger.lock().unwrap().requeued);
    assert!(r.out.appended.lock().unwrap().is_empty());
    // The broker hands it out again: a duplicate of a delivered key, appended
    // this time, then acked.
    let (outcome, ledger) = run(&r, &env).await;
    assert_eq!(outcome, Outcome::Duplicate { tier: Tier::Lru });
    assert!(ledger.lock().unwrap().acked);
    assert_eq!(*r.out.appended.lock().unwrap(), ["s:append"]);
    assert_eq!(target.count(), 1);
    // An append that keeps failing keeps the message from being acked.
    r.out
        .fail_appends
        .store(1, std::sync::atomic::Ordering::SeqCst);
    let (outcome, ledger) = run(&r, &env).await;
    assert_eq!(outcome, Outcome::HandedBack);
    assert!(!ledger.lock().unwrap().acked);
}

async fn failures_retry_in_process_then_move_to_a_delay_tier_with_their_attempts(alone: bool) {
    let target = FakeTarget::start(|_, _| StatusCode::BAD_GATEWAY.into_response()).await;
    let r = rig(&target, 4, 2);
    r.out
        .alone
        .store(alone, std::sync::atomic::Ordering::SeqCst);
    let (outcome, ledger) = run(&r, &webhook("b")).await;
    assert_eq!(
        outcome,
        Outcome::Retried {
            tier: DelayTier(ms(100))
        }
    );
    assert!(ledger.lock().unwrap().acked);
    assert_eq!(target.count(), 2, "two in-process attempts");
    let delayed = r.out.delayed.lock().unwrap().clone();
    assert_eq!(delayed.len(), 1);
    assert_eq!(delayed[0].1.attempts, 2);
    // Its copy from the delay tier takes the parked claim and carries on, to
    // the next tier.
    let (outcome, _) = run(&r, &delayed[0].1).await;
    assert_eq!(
        outcome,
        Outcome::Retried {
            tier: DelayTier(ms(200))
        }
    );
    let again = r.out.delayed.lock().unwrap()[1].1.clone();
    let (outcome, _) = run(&r, &again).await;
    assert_eq!(
        outcome,
        Outcome::Dead {
            reason: DeadReason::MaxAttempts
        }
    );
    assert_eq!(r.out.dead.lock().unwrap()[0].attempts, 4);
}

async fn a_redelivery_waits_for_the_live_delivery_of_the_same_message(alone: bool) {
    let target = FakeTarget::start_slow(ms(700), |_, _| StatusCode::OK.into_response()).await;
    let r = rig(&target, 3, 2);
    r.out
        .alone
        .store(alone, std::sync::atomic::Ordering::SeqCst);
    let env = webhook("c");
    let (first, first_ledger, first_lost) = message(&env);
    let (second, second_ledger, _) = message(&env);
    let step = &r.step;
    let (a, b) = tokio::join!(
        async {
            // The consumer of the first copy goes while its delivery runs.
            let out = step.run(first, &r.out).await;
            (out, first_lost.clone())
        },
        async {
            // The first copy claimed and is delivering: its consumer goes, and
            // the broker hands the message out again.
            wait_until(T, "the first delivery under way", || async {
                target.started() == 1
            })
            .await;
            first_lost.cancel();
            step.run(second, &r.out).await
        }
    );
    assert_eq!(a.0, Outcome::HandedBack, "the lost copy cannot ack");
    assert!(!first_ledger.lock().unwrap().acked);
    assert!(matches!(b, Outcome::Duplicate { .. }), "{b:?}");
    assert!(second_ledger.lock().unwrap().acked);
    assert_eq!(target.started(), 1, "one delivery, never two at once");
}

async fn refused_republishes_are_counted_and_end_as_delivery_limit(alone: bool) {
    let target = FakeTarget::start(|_, _| StatusCode::SERVICE_UNAVAILABLE.into_response()).await;
    let r = rig(&target, 100, 1);
    r.out
        .alone
        .store(alone, std::sync::atomic::Ordering::SeqCst);
    r.out
        .refuse
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let env = webhook("d");
    for _ in 0..3 {
        let (outcome, ledger) = run(&r, &env).await;
        assert_eq!(outcome, Outcome::HandedBack);
        assert!(ledger.lock().unwrap().requeued);
    }
    let (outcome, ledger) = run(&r, &env).await;
    assert_eq!(
        outcome,
        Outcome::Dead {
            reason: DeadReason::DeliveryLimit
        }
    );
    assert!(ledger.lock().unwrap().acked);
    assert_eq!(target.count(), 3, "no delivery once the limit is reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_a_hookq_message_is_parked_as_invalid() {
    let target = FakeTarget::ok().await;
    let r = rig(&target, 3, 2);
    let (mut m, ledger, _) = message(&webhook("e"));
    let stand_in = webhook("e-stand-in");
    m.envelope = Err((
        broker::DecodeError("no hookq-source header".into()),
        stand_in,
    ));
    let outcome = r.step.run(m, &r.out).await;
    assert_eq!(
        outcome,
        Outcome::Dead {
            reason: DeadReason::Invalid
        }
    );
    assert!(ledger.lock().unwrap().acked);
    assert_eq!(target.count(), 0);
}

/// The cases above, with claims in the shared store (a shared work queue)
/// and in memory (a partition this worker delivers alone).
macro_rules! with_both_kinds_of_claim {
    ($($case:ident),* $(,)?) => {
        mod shared_claims {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(false).await
                }
            )*
        }
        mod claims_alone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(true).await
                }
            )*
        }
    };
}

with_both_kinds_of_claim!(
    a_2xx_is_recorded_and_acked_and_a_copy_is_a_duplicate,
    a_done_key_is_in_the_done_log_before_any_ack,
    failures_retry_in_process_then_move_to_a_delay_tier_with_their_attempts,
    a_redelivery_waits_for_the_live_delivery_of_the_same_message,
    refused_republishes_are_counted_and_end_as_delivery_limit,
);
