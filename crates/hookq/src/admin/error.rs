//! The admin API's refusals: a status and a JSON body
//! `{"error": CODE, "message": ...}`, like the ingress's.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::broker;

#[derive(Debug)]
pub enum ApiError {
    /// 401: no or a wrong bearer token.
    Unauthorized,
    /// 400: a parameter or body that cannot mean anything.
    Invalid(String),
    /// 404: no dead letter with this message id.
    NotFound(String),
    /// 404: no target with this name.
    NoTarget(String),
    /// 409: a reprocess run is under way.
    Busy,
    /// 503: the broker cannot be read now.
    Broker(broker::Error),
    /// 500: a bug (a task that stopped unexpectedly).
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Invalid(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) | Self::NoTarget(_) => StatusCode::NOT_FOUND,
            Self::Busy => StatusCode::CONFLICT,
            Self::Broker(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Invalid(_) => "invalid_request",
            Self::NotFound(_) | Self::NoTarget(_) => "not_found",
            Self::Busy => "reprocess_running",
            Self::Broker(_) => "broker_unavailable",
            Self::Internal(_) => "internal_error",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::Unauthorized => {
                "send the admin token as `Authorization: Bearer TOKEN` ([admin] token or token_env)"
                    .into()
            }
            Self::Invalid(m) | Self::Internal(m) => m.clone(),
            Self::NotFound(id) => format!("no dead letter with message id {id:?}"),
            Self::NoTarget(name) => {
                format!("no target named {name:?} (GET /admin/targets lists them)")
            }
            Self::Busy => {
                "a reprocess run is under way; GET /admin/dlq/reprocess shows its progress".into()
            }
            Self::Broker(e) => format!("cannot read the dead letters now: {e}"),
        }
    }

    /// The JSON body, with `extra` fields added (a partial outcome).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": self.code(), "message": self.message()})
    }
}

impl From<broker::Error> for ApiError {
    fn from(e: broker::Error) -> Self {
        Self::Broker(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status(), Json(self.body())).into_response();
        match self {
            Self::Unauthorized => {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"hookq-admin\""),
                );
            }
            Self::Broker(_) => {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        r
    }
}
