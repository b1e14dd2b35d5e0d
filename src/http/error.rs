//! The one place where errors become HTTP answers: an RFC 9457
//! `application/problem+json` body with a stable `type` per kind of problem.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::event::{InvalidCursor, InvalidEventName, InvalidTopic};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid topic `{name}`: {reason}")]
    InvalidTopic { name: String, reason: InvalidTopic },
    #[error("invalid event name: {0}")]
    InvalidEventName(#[from] InvalidEventName),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the event data is not valid UTF-8 text")]
    NotUtf8,
    #[error("could not read the request body: {0}")]
    UnreadableBody(String),
    #[error("invalid {source_name}: {reason}")]
    InvalidPosition {
        source_name: &'static str,
        reason: InvalidCursor,
    },
    #[error("invalid query parameter `{name}`: {reason}")]
    InvalidParameter { name: &'static str, reason: String },
    #[error("a subscription needs at least one `topic` query parameter")]
    NoTopic,
    #[error("a subscription may name at most {limit} topics")]
    TooManyTopics { limit: usize },
    #[error("malformed batch: {0}")]
    MalformedBatch(String),
    #[error("the batch holds more than {limit} events")]
    BatchTooLong { limit: usize },
    #[error("method {method} is not allowed here; allowed: {allow}")]
    MethodNotAllowed { method: String, allow: &'static str },
    #[error("no such resource: {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The stable, documented identifier of this kind of problem.
    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidTopic { .. } => "invalid-topic",
            ApiError::InvalidEventName(_) => "invalid-event-name",
            ApiError::PayloadTooLarge { .. } => "payload-too-large",
            ApiError::NotUtf8 => "not-utf8",
            ApiError::UnreadableBody(_) => "unreadable-body",
            ApiError::InvalidPosition { .. } => "invalid-last-event-id",
            ApiError::InvalidParameter { .. } => "invalid-parameter",
            ApiError::NoTopic => "no-topic",
            ApiError::TooManyTopics { .. } => "too-many-topics",
            ApiError::MalformedBatch(_) => "malformed-batch",
            ApiError::BatchTooLong { .. } => "batch-too-long",
            ApiError::MethodNotAllowed { .. } => "method-not-allowed",
            ApiError::NotFound(_) => "not-found",
            ApiError::Store(_) => "store-unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = json!({
            "type": format!("urn:crier:problem:{}", self.kind()),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        let mut response = (status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let ApiError::MethodNotAllowed { allow, .. } = self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}
