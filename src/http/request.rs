//! What more than one handler reads from a request or writes on its answer:
//! the topic in the path, the client's name for limits, the replay and
//! `Vary` headers.
//! Handlers import this; it imports no handler.

use axum::extract::Extension;
use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::http::HeaderValue;

use super::{ApiError, AppState};
use crate::event::Topic;
use crate::limits::ClientKey;

/// The answer header that says a publish was a retry: nothing was stored
/// now, and the body is the first request's.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The same URL answers an event stream or a long-poll's JSON by
/// `Accept`, each in a coding by `Accept-Encoding`: a cache must key on
/// both.
pub(super) const VARY_BY_ACCEPT: HeaderValue = HeaderValue::from_static("accept, accept-encoding");

/// The topic named in the path, parsed once.
pub(super) fn parse_topic(
    path: Result<Path<String>, PathRejection>,
    state: &AppState,
) -> Result<Topic, ApiError> {
    let name = match path {
        Ok(Path(name)) => name,
        // The only way a `{topic}` segment fails to extract is percent-
        // encoding that is not UTF-8: outside the charset either way.
        Err(rejection) => {
            return Err(ApiError::InvalidTopic {
                name: format!("({})", rejection.body_text()),
                reason: crate::event::InvalidTopic::Charset,
            });
        }
    };
    Topic::parse(&name, state.config.max_topic_len)
        .map_err(|reason| ApiError::InvalidTopic { name, reason })
}

/// The client a request came from, for limits ("unknown" only when the
/// router is served without the accept loop).
pub(super) fn client_name(client: Option<Extension<ClientKey>>) -> String {
    client.map_or_else(|| "unknown".to_owned(), |Extension(c)| c.to_string())
}
