//! The one place where errors become HTTP answers: an RFC 9457
//! `application/problem+json` body with a stable `type` per kind of problem.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::{AuthError, TokenError};
use crate::event::{InvalidCursor, InvalidEventName, InvalidTopic};
use crate::limits::LimitError;
use crate::metrics::{ConnectionRefusal, Refusal};
use crate::store::{InvalidIdempotencyKey, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid topic `{name}`: {reason}")]
    InvalidTopic { name: String, reason: InvalidTopic },
    #[error("invalid event name: {0}")]
    InvalidEventName(#[from] InvalidEventName),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error(
        "the event is larger than the limit of {limit} bytes once encoded: each line break adds a `data: ` line of 7 bytes"
    )]
    EncodedTooLarge { limit: usize },
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
    #[error("invalid {place}: {reason}")]
    InvalidIdempotencyKey {
        place: String,
        reason: InvalidIdempotencyKey,
    },
    #[error(
        "this Idempotency-Key was used within the idempotency window for another event (another topic, event name or data); nothing was stored"
    )]
    KeyReused,
    #[error(
        "the idempotency_key of item {item} was used within the idempotency window for another event (another topic, event name or data); nothing of the batch was stored"
    )]
    BatchKeyReused { item: usize },
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
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error("the body is not a ticket request: {0}")]
    MalformedTicketRequest(String),
    #[error("this node is shutting down and closing its streams; use another node")]
    Draining,
    #[error("not a WebSocket handshake: {0}")]
    BadUpgrade(String),
    #[error("the WebSocket version offered is not 13, the only one spoken here")]
    WebSocketVersion,
    #[error("the request repeats its `{0}` header, which it may carry once")]
    RepeatedHeader(&'static str),
    #[error("malformed frame: {0}")]
    MalformedFrame(String),
    /// Written by the accept loop before any request is read.
    #[error("{}", connection_refused(*.0))]
    ConnectionRefused(ConnectionRefusal),
}

/// Why a connection was turned away, as its problem's detail.
fn connection_refused(refusal: ConnectionRefusal) -> &'static str {
    match refusal {
        ConnectionRefusal::Capacity => {
            "the hub holds all the connections it may; try again shortly"
        }
        ConnectionRefusal::ClientConnections | ConnectionRefusal::ConnectionRate => {
            "this client has too many connections open, or opens them too fast"
        }
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::PayloadTooLarge { .. } | ApiError::EncodedTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::KeyReused
            | ApiError::BatchKeyReused { .. }
            | ApiError::Store(StoreError::KeyReused { .. })
            | ApiError::Store(StoreError::SpansPartitions) => StatusCode::UNPROCESSABLE_ENTITY,
            // Asking again cannot help: not an outage.
            ApiError::Store(StoreError::Rejected(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Store(StoreError::Full(_)) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Store(_)
            | ApiError::Draining
            | ApiError::ConnectionRefused(ConnectionRefusal::Capacity) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::ConnectionRefused(
                ConnectionRefusal::ClientConnections | ConnectionRefusal::ConnectionRate,
            ) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Auth(
                AuthError::NotGranted { .. } | AuthError::Origin(_) | AuthError::MetricsNotGranted,
            ) => StatusCode::FORBIDDEN,
            ApiError::Auth(AuthError::TicketsDisabled) => StatusCode::NOT_FOUND,
            ApiError::Auth(_) => StatusCode::UNAUTHORIZED,
            ApiError::Limit(LimitError::BatchOverBurst { .. }) => StatusCode::BAD_REQUEST,
            ApiError::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            // RFC 6455 §4.4: with the versions that are spoken.
            ApiError::WebSocketVersion => StatusCode::UPGRADE_REQUIRED,
            // Listed one by one: a new variant must choose its status here.
            ApiError::InvalidTopic { .. }
            | ApiError::InvalidEventName(_)
            | ApiError::NotUtf8
            | ApiError::UnreadableBody(_)
            | ApiError::InvalidPosition { .. }
            | ApiError::InvalidParameter { .. }
            | ApiError::NoTopic
            | ApiError::TooManyTopics { .. }
            | ApiError::InvalidIdempotencyKey { .. }
            | ApiError::MalformedBatch(_)
            | ApiError::BatchTooLong { .. }
            | ApiError::MalformedTicketRequest(_)
            | ApiError::BadUpgrade(_)
            | ApiError::MalformedFrame(_)
            | ApiError::RepeatedHeader(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The stable, documented identifier of this kind of problem.
    /// The problem type's last part (`forbidden-topic`).
    pub fn problem_kind(&self) -> &'static str {
        self.kind()
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidTopic { .. } => "invalid-topic",
            ApiError::InvalidEventName(_) => "invalid-event-name",
            ApiError::PayloadTooLarge { .. } | ApiError::EncodedTooLarge { .. } => {
                "payload-too-large"
            }
            ApiError::NotUtf8 => "not-utf8",
            ApiError::UnreadableBody(_) => "unreadable-body",
            ApiError::InvalidPosition { .. } => "invalid-last-event-id",
            ApiError::InvalidParameter { .. } => "invalid-parameter",
            ApiError::NoTopic => "no-topic",
            ApiError::TooManyTopics { .. } => "too-many-topics",
            ApiError::InvalidIdempotencyKey { .. } => "invalid-idempotency-key",
            ApiError::KeyReused
            | ApiError::BatchKeyReused { .. }
            | ApiError::Store(StoreError::KeyReused { .. }) => "idempotency-key-reused",
            ApiError::Store(StoreError::SpansPartitions) => "batch-spans-partitions",
            ApiError::MalformedBatch(_) => "malformed-batch",
            ApiError::BatchTooLong { .. } => "batch-too-long",
            ApiError::MethodNotAllowed { .. } => "method-not-allowed",
            ApiError::NotFound(_) => "not-found",
            ApiError::Store(StoreError::Rejected(_)) => "store-error",
            ApiError::Store(StoreError::Full(_)) => "storage-full",
            ApiError::Store(StoreError::Stalled(_)) => "feed-stalled",
            ApiError::Store(_) => "store-unavailable",
            ApiError::MalformedTicketRequest(_) => "malformed-ticket-request",
            ApiError::Draining => "draining",
            ApiError::BadUpgrade(_) | ApiError::WebSocketVersion => "bad-upgrade",
            ApiError::RepeatedHeader(_) => "repeated-header",
            ApiError::MalformedFrame(_) => "malformed-frame",
            ApiError::ConnectionRefused(ConnectionRefusal::Capacity) => "over-capacity",
            ApiError::ConnectionRefused(
                ConnectionRefusal::ClientConnections | ConnectionRefusal::ConnectionRate,
            ) => "too-many-connections",
            ApiError::Limit(LimitError::Streams { .. }) => "too-many-streams",
            ApiError::Limit(LimitError::PublishRate { .. }) => "publish-rate",
            ApiError::Limit(LimitError::BatchOverBurst { .. }) => "batch-over-burst",
            ApiError::BodyTimeout(_) => "body-timeout",
            ApiError::Auth(error) => match error {
                AuthError::Missing => "unauthenticated",
                AuthError::Token(TokenError::Expired) => "token-expired",
                AuthError::Token(_) => "invalid-token",
                AuthError::NotGranted { .. } => "forbidden-topic",
                AuthError::Ticket(_) | AuthError::TicketExpired => "invalid-ticket",
                AuthError::Origin(_) => "origin-not-allowed",
                AuthError::TicketsDisabled => "tickets-disabled",
                AuthError::MetricsNotGranted => "forbidden-metrics",
            },
        }
    }

    /// The reason this refusal is counted under in the metrics.
    pub(crate) fn refusal(&self) -> Refusal {
        match self {
            ApiError::PayloadTooLarge { .. } | ApiError::EncodedTooLarge { .. } => {
                Refusal::TooLarge
            }
            ApiError::BodyTimeout(_) => Refusal::BodyTimeout,
            ApiError::MethodNotAllowed { .. } | ApiError::NotFound(_) => Refusal::NotFound,
            ApiError::Store(StoreError::Full(_)) => Refusal::StorageFull,
            ApiError::Store(StoreError::Rejected(_)) => Refusal::StoreError,
            ApiError::Store(StoreError::KeyReused { .. } | StoreError::SpansPartitions) => {
                Refusal::BadInput
            }
            ApiError::Store(_) => Refusal::StoreUnavailable,
            ApiError::Draining => Refusal::Draining,
            ApiError::Auth(AuthError::Origin(_)) => Refusal::Origin,
            ApiError::Auth(AuthError::NotGranted { .. } | AuthError::MetricsNotGranted) => {
                Refusal::Forbidden
            }
            ApiError::Auth(AuthError::TicketsDisabled) => Refusal::NotFound,
            ApiError::Auth(_) => Refusal::Auth,
            ApiError::Limit(LimitError::Streams { .. })
            | ApiError::ConnectionRefused(ConnectionRefusal::Capacity) => Refusal::Cap,
            ApiError::ConnectionRefused(
                ConnectionRefusal::ClientConnections | ConnectionRefusal::ConnectionRate,
            ) => Refusal::Rate,
            ApiError::Limit(_) => Refusal::Rate,
            ApiError::InvalidTopic { .. }
            | ApiError::InvalidEventName(_)
            | ApiError::NotUtf8
            | ApiError::UnreadableBody(_)
            | ApiError::InvalidPosition { .. }
            | ApiError::InvalidParameter { .. }
            | ApiError::NoTopic
            | ApiError::TooManyTopics { .. }
            | ApiError::MalformedBatch(_)
            | ApiError::InvalidIdempotencyKey { .. }
            | ApiError::KeyReused
            | ApiError::BatchKeyReused { .. }
            | ApiError::BatchTooLong { .. }
            | ApiError::MalformedTicketRequest(_)
            | ApiError::BadUpgrade(_)
            | ApiError::WebSocketVersion
            | ApiError::RepeatedHeader(_)
            | ApiError::MalformedFrame(_) => Refusal::BadInput,
        }
    }

    /// The `WWW-Authenticate` challenge of a refusal about tokens (RFC 6750).
    fn challenge(&self) -> Option<&'static str> {
        match self {
            ApiError::Auth(AuthError::Missing) => Some(r#"Bearer realm="crier""#),
            ApiError::Auth(AuthError::Token(_)) => {
                Some(r#"Bearer realm="crier", error="invalid_token""#)
            }
            ApiError::Auth(AuthError::NotGranted { .. } | AuthError::MetricsNotGranted) => {
                Some(r#"Bearer realm="crier", error="insufficient_scope""#)
            }
            _ => None,
        }
    }
}

/// The problem type of a refused request (`forbidden-topic`), for its log
/// line: a log reader sees why, not only a status.
#[derive(Debug, Clone, Copy)]
pub struct ProblemKind(pub &'static str);

impl ApiError {
    /// The problem's RFC 9457 fields (also what a WebSocket `problem` frame
    /// carries).
    pub fn problem(&self) -> serde_json::Value {
        let status = self.status();
        json!({
            "type": format!("urn:crier:problem:{}", self.kind()),
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.to_string(),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = self.problem();
        let mut response = (status, body.to_string()).into_response();
        // Counted by the metrics layer, which holds the metrics.
        response.extensions_mut().insert(self.refusal());
        // Named in the refusal's log line.
        response.extensions_mut().insert(ProblemKind(self.kind()));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let ApiError::Store(StoreError::Full(_)) = &self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(10u32));
        }
        if let ApiError::ConnectionRefused(refusal) = &self {
            let seconds: u32 = match refusal {
                ConnectionRefusal::Capacity => 5,
                ConnectionRefusal::ClientConnections | ConnectionRefusal::ConnectionRate => 1,
            };
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let ApiError::Limit(limit) = &self {
            let seconds = limit.retry_after().as_secs_f64().ceil().max(1.0) as u64;
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(challenge) = self.challenge() {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if let ApiError::WebSocketVersion = self {
            headers.insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        if let ApiError::MethodNotAllowed { allow, .. } = self {
            headers.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}
