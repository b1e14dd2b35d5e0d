//! What more than one face (HTTP handlers, gRPC) reads from a request or
//! writes on its answer: the topics named, a presented ticket's record, the
//! client's name for limits, the replay and `Vary` headers.
//! Handlers import this; it imports no handler.

use axum::extract::Extension;
use axum::extract::Path;
use axum::extract::rejection::PathRejection;
use axum::http::HeaderValue;

use super::{ApiError, AppState};
use crate::auth::{TicketRecord, ticket};
use crate::config::LimitsConfig;
use crate::event::Topic;
use crate::limits::ClientKey;
use crate::store::StoreError;

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
    Topic::parse(&name, state.config.limits.max_topic_len)
        .map_err(|reason| ApiError::InvalidTopic { name, reason })
}

/// The client a request came from, for limits ("unknown" only when the
/// router is served without the accept loop).
pub(super) fn client_name(client: Option<Extension<ClientKey>>) -> String {
    client.map_or_else(|| "unknown".to_owned(), |Extension(c)| c.to_string())
}

/// The topics a subscription or a ticket names: at least one, at most
/// `--max-topics-per-subscription`, each parsed, sorted, without repeats.
pub(crate) fn parse_topics(
    names: &[String],
    limits: &LimitsConfig,
) -> Result<Vec<Topic>, ApiError> {
    if names.is_empty() {
        return Err(ApiError::NoTopic);
    }
    let limit = limits.max_topics_per_subscription;
    if names.len() > limit {
        return Err(ApiError::TooManyTopics { limit });
    }
    let mut topics = names
        .iter()
        .map(|name| {
            Topic::parse(name, limits.max_topic_len).map_err(|reason| ApiError::InvalidTopic {
                name: name.clone(),
                reason,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    topics.sort();
    topics.dedup();
    Ok(topics)
}

/// The record of a presented ticket, taken from the store (so it serves
/// once); `None` when it is malformed, unknown, used or expired.
pub(crate) async fn redeem_ticket(
    state: &AppState,
    presented: &str,
) -> Result<Option<TicketRecord>, StoreError> {
    if !ticket::well_formed(presented) {
        return Ok(None);
    }
    Ok(state
        .store
        .take_ticket(&ticket::digest(presented))
        .await?
        .and_then(|r| serde_json::from_str::<TicketRecord>(&r).ok()))
}
