//! The long-poll answer: the subscription's entries after the client's
//! position as soon as there is at least one, or none after
//! `--poll-timeout`, with the id to ask from next.

use axum::http::{HeaderValue, header};
use axum::response::Response;
use tokio_stream::StreamExt;

use super::AppState;
use crate::subscription::{StreamSettings, Subscription};
use crate::transport::poll::{self, Answer};

/// Runs `subscription` until it has something to say (an event, a reset,
/// its end) or the poll timeout passes, and answers with it. `given` is the
/// client's own position, `next` when nothing moved it.
pub async fn answer(
    state: &AppState,
    subscription: Subscription,
    settings: StreamSettings,
    given: Option<String>,
) -> Response {
    let deadline = tokio::time::Instant::now() + state.config.poll_timeout;
    let stream = subscription.into_stream(settings, Answer::default());
    tokio::pin!(stream);
    let mut entries = Vec::new();
    let mut next = given;
    while let Ok(Some(out)) = tokio::time::timeout_at(deadline, stream.next()).await {
        entries.extend(out.entries);
        if out.next.is_some() {
            next = out.next;
        }
        if out.ended || !entries.is_empty() {
            break;
        }
    }
    let body = poll::body(&entries, next.as_deref());
    state.metrics.written(None).add(body.len());
    let mut response = Response::new(axum::body::Body::from(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
