//! The bearer token check in front of every `/admin/dlq/*` route, and the
//! per-request bookkeeping: the `hookq_admin_requests_total` counter and
//! `Cache-Control: no-store` (answers carry webhook bodies).
//!
//! Both sides are hashed with SHA-256 before the constant-time comparison, so
//! that neither the bytes nor the length of the token leak through timing.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Admin, ApiError, api};

/// What a request presented, for the log of a refusal (never the token).
#[derive(Debug, PartialEq, Eq)]
enum Presented {
    Nothing,
    NotBearer,
    WrongToken,
    Right,
}

fn presented(headers: &HeaderMap, token: &str) -> Presented {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Presented::Nothing;
    };
    let v = value.as_bytes();
    let Some(given) = v
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
        .and_then(|_| v.get(7..))
    else {
        return Presented::NotBearer;
    };
    let given = Sha256::digest(given.trim_ascii());
    let want = Sha256::digest(token.as_bytes());
    if bool::from(given.ct_eq(&want)) {
        Presented::Right
    } else {
        Presented::WrongToken
    }
}

/// The route's pattern as a static label (the metric never takes a client's path).
fn route_label(req: &Request) -> &'static str {
    let matched = req
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    [
        api::STATS,
        api::PENDING,
        api::REPROCESS,
        api::DETAIL,
        super::targets::LIST,
        super::targets::PAUSE,
        super::targets::RESUME,
    ]
    .into_iter()
    .find(|r| Some(*r) == matched)
    .unwrap_or("other")
}

pub async fn check(State(admin): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    let route = route_label(&req);
    let mut response = match presented(req.headers(), admin.token.expose()) {
        Presented::Right => next.run(req).await,
        refused => {
            tracing::warn!(
                route,
                method = %req.method(),
                presented = match refused {
                    Presented::Nothing => "no Authorization header",
                    Presented::NotBearer => "not a Bearer token",
                    _ => "a wrong token",
                },
                "admin request refused: unauthorized"
            );
            ApiError::Unauthorized.into_response()
        }
    };
    admin
        .events
        .admin_answered(route, response.status().as_u16());
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(auth: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(auth).unwrap(),
        );
        h
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        let t = "0123456789abcdef";
        assert_eq!(presented(&HeaderMap::new(), t), Presented::Nothing);
        assert_eq!(presented(&with(b"Basic abc"), t), Presented::NotBearer);
        assert_eq!(presented(&with(b"Bearer"), t), Presented::NotBearer);
        assert_eq!(presented(&with(b"Bearer 0123"), t), Presented::WrongToken);
        assert_eq!(presented(&with(b"Bearer "), t), Presented::WrongToken);
        assert_eq!(
            presented(&with(b"Bearer 0123456789abcdeF"), t),
            Presented::WrongToken
        );
        assert_eq!(
            presented(&with(b"bearer 0123456789abcdef"), t),
            Presented::Right
        );
        assert_eq!(
            presented(&with(b"Bearer \xff\xfe"), t),
            Presented::WrongToken
        );
    }
}
