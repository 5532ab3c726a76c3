//! Waiting with a deadline: on a running hookq's events (preferred: nothing
//! polls hookq's state), or on a condition outside hookq (a fake target's
//! log, a queue's length, a file).

use std::future::Future;
use std::time::{Duration, Instant};

use hookq::events::Event;
use tokio::sync::broadcast;

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("the events did not arrive within {0:?}")]
    TimedOut(Duration),
    #[error("fell {0} events behind")]
    Lagged(u64),
    #[error("the system stopped")]
    Closed,
}

/// Waits for events until `done` says enough, or `within` passes. A
/// subscriber that falls behind and loses events fails the wait: a count
/// that skipped events is not a count.
pub async fn wait_for(
    events: &mut broadcast::Receiver<Event>,
    within: Duration,
    mut done: impl FnMut(&Event) -> bool,
) -> Result<(), WaitError> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.recv()).await {
            Err(_) => return Err(WaitError::TimedOut(within)),
            Ok(Ok(e)) => {
                if done(&e) {
                    return Ok(());
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => return Err(WaitError::Lagged(n)),
            Ok(Err(broadcast::error::RecvError::Closed)) => return Err(WaitError::Closed),
        }
    }
}

/// Polls `cond` every 20 ms until it holds; panics after `within`, naming
/// `what` (for tests: state outside hookq, where there is no event).
pub async fn wait_until<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
