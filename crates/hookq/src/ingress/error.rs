//! The ingress's refusals: each maps to a status and a JSON body
//! `{"error": CODE, "message": ...}` and is logged once with its source.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{key, verify};
use crate::broker;

/// What a client should wait before retrying after a 503, in seconds.
const RETRY_AFTER_SECS: &str = "5";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Key(key::Error),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Signature(verify::Error),
    #[error("unknown source")]
    UnknownSource,
    #[error("method not allowed: use POST")]
    MethodNotAllowed,
    #[error("body larger than ingress.max_body_bytes")]
    TooLarge,
    #[error("body larger than the broker takes (its max_message_size, {0} bytes)")]
    TooLargeForBroker(usize),
    #[error("request headers larger than 64 KiB")]
    HeadersTooLarge,
    #[error("too many requests in flight")]
    Overloaded,
    #[error("the broker did not take the message: {0}")]
    Broker(broker::Error),
    #[error("internal error; the message was not accepted, retry later")]
    Internal,
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Key(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Signature(_) => StatusCode::UNAUTHORIZED,
            Self::UnknownSource => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge | Self::TooLargeForBroker(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Overloaded | Self::Broker(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Key(_) | Self::BadRequest(_) => "invalid_request",
            Self::Signature(_) => "invalid_signature",
            Self::UnknownSource => "unknown_source",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooLarge | Self::TooLargeForBroker(_) => "payload_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::Overloaded => "overloaded",
            Self::Broker(_) => "broker_unavailable",
            Self::Internal => "internal_error",
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = axum::Json(serde_json::json!({
            "error": self.code(),
            "message": self.to_string(),
        }));
        let mut resp = (self.status(), body).into_response();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        if self.status() == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        }
        resp
    }
}
