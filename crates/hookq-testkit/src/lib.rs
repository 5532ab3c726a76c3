//! What hookq's tests, `hookq bench` and `hookq simulate` share, so that each
//! is written once:
//!
//! - [`sandbox`]: hookq's parts on a throwaway `amqp.prefix`, a directory of
//!   their own and port-0 listeners, deleted afterwards;
//! - [`target`]: the one fake delivery target, scripted per request, with a
//!   fast path for the benchmark;
//! - [`dead_letters`]: dead letters published straight to `P.dead`, and a
//!   message as another client would publish it;
//! - [`metrics`]: reading a sample out of Prometheus text;
//! - [`wait`]: waiting on events or on a condition, always with a deadline.
//!
//! It uses only what the product crate offers its own users; a test or the
//! benchmark that needs more is a sign the product should offer it.

pub mod dead_letters;
pub mod metrics;
pub mod sandbox;
pub mod target;
pub mod wait;

pub use sandbox::{Sandbox, short_id};
pub use target::{FakeTarget, Received, Reply};
pub use wait::{WaitError, wait_for, wait_until};
