//! The HTTP ingress: `POST /hooks/{source}` -> verify -> key -> publish with
//! confirm -> 202. It never calls the user's application and never answers 2xx
//! for a message the broker has not confirmed.
//!
//! Cheap refusals come first (unknown source, declared length over the limit,
//! too many requests in flight) so hostile traffic costs little.

pub mod error;
pub mod key;
pub mod verify;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::sync::Semaphore;

pub use error::Error;

use crate::broker::Broker;
use crate::config::{self, IngressSettings, SourceSettings, valid_source_name};
use crate::events::Events;
use crate::message::Envelope;
use verify::Verifier;

/// A client has this long to send its whole body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

struct Source {
    settings: SourceSettings,
    verifier: Verifier,
}

/// What every request handler needs, built once at start-up.
pub struct App {
    broker: Broker,
    sources: HashMap<String, Source>,
    allow_unknown: bool,
    unknown: Source,
    max_body: usize,
    publish_timeout: Duration,
    in_flight: Semaphore,
    events: Events,
}

impl App {
    pub fn new(
        ingress: &IngressSettings,
        sources: &BTreeMap<String, SourceSettings>,
        broker: Broker,
        events: Events,
    ) -> Result<Arc<Self>, config::Error> {
        let mut built = HashMap::new();
        for (name, s) in sources {
            let source = Source {
                settings: s.clone(),
                verifier: Verifier::for_source(name, s)?,
            };
            built.insert(name.clone(), source);
        }
        let unknown = SourceSettings::default();
        Ok(Arc::new(Self {
            broker,
            sources: built,
            allow_unknown: ingress.allow_unknown_sources,
            unknown: Source {
                verifier: Verifier::for_source("unknown", &unknown)?,
                settings: unknown,
            },
            max_body: ingress.max_body_bytes,
            publish_timeout: ingress.publish_timeout,
            in_flight: Semaphore::new(ingress.max_in_flight),
            events,
        }))
    }

    pub fn is_ready(&self) -> bool {
        self.broker.is_ready()
    }
}

pub fn router(app: Arc<App>) -> Router {
    let events = app.events.clone();
    Router::new()
        .route(
            "/hooks/{source}",
            post(receive).fallback(method_not_allowed),
        )
        .with_state(app)
        .layer(catch_panics(events))
}

/// The second line of defence: nothing a request carries should panic (the
/// codec and the handlers are written so), but if something does, the client
/// gets a 500 with a JSON code instead of a reset connection, and the panic is
/// logged and counted (`hookq_ingress_panics_total`).
pub fn catch_panics(
    events: Events,
) -> tower_http::catch_panic::CatchPanicLayer<
    impl Fn(Box<dyn std::any::Any + Send>) -> Response + Clone,
> {
    tower_http::catch_panic::CatchPanicLayer::custom(move |panic: Box<dyn std::any::Any + Send>| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        events.panicked(&what);
        Error::Internal.into_response()
    })
}

async fn method_not_allowed() -> Response {
    Error::MethodNotAllowed.into_response()
}

async fn receive(
    State(app): State<Arc<App>>,
    Path(source): Path<String>,
    req: Request,
) -> Response {
    match accept(&app, &source, req).await {
        Ok(r) => r,
        Err(e) => {
            app.events
                .refused(&source, e.status().as_u16(), e.code(), &e.to_string());
            e.into_response()
        }
    }
}

async fn accept(app: &App, source: &str, req: Request) -> Result<Response, Error> {
    let _permit = app.in_flight.try_acquire().map_err(|_| Error::Overloaded)?;
    let Source { settings, verifier } = match app.sources.get(source) {
        Some(s) => s,
        None if app.allow_unknown && valid_source_name(source) => &app.unknown,
        None => return Err(Error::UnknownSource),
    };
    let (parts, body) = req.into_parts();
    // hyper's buffer limit is soft (a request that arrives in one read may pass
    // it); this one is not, and it keeps every message's AMQP header frame
    // well inside the broker's frame size.
    let header_bytes: usize = parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > crate::http::MAX_HEADER_BYTES {
        return Err(Error::HeadersTooLarge);
    }
    let body = read_body(body, &parts.headers, app.max_body).await?;
    verifier
        .verify(&parts.headers, &body, SystemTime::now())
        .map_err(Error::Signature)?;
    let key = key::derive(source, Some(settings), &parts.headers, &body).map_err(Error::Key)?;

    let mut env = Envelope::of_request(source, key, body, parts.headers);
    env.partition = app.broker.topology().partition_header(&env.key);

    let started = Instant::now();
    app.broker
        .publish_webhook(&env, app.publish_timeout)
        .await
        .map_err(|e| match e {
            // A broker that takes less than max_body_bytes: the client's
            // body is too large, not the broker away.
            crate::broker::Error::TooLarge { max, .. } => Error::TooLargeForBroker(max),
            e => Error::Broker(e),
        })?;
    app.events.accepted(&env, started.elapsed());
    let accepted = Accepted {
        id: &env.message_id.0,
        key: &env.key.0,
    };
    Ok((StatusCode::ACCEPTED, axum::Json(accepted)).into_response())
}

/// The 202's body, `{"id": MESSAGE_ID, "key": KEY}`.
#[derive(serde::Serialize)]
struct Accepted<'a> {
    id: &'a str,
    key: &'a str,
}

/// Reads the body up to `max` bytes: a declared length over the limit is refused
/// before reading anything, a longer stream as soon as it passes the limit, and a
/// client that sends too slowly is cut off.
async fn read_body(body: Body, headers: &HeaderMap, max: usize) -> Result<Bytes, Error> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(Error::TooLarge);
    }
    let read = axum::body::to_bytes(body, max);
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Err(_) => Err(Error::BadRequest("the body did not arrive in time".into())),
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                Err(Error::TooLarge)
            } else {
                Err(Error::BadRequest(format!("could not read the body: {e}")))
            }
        }
    }
}
