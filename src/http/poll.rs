//! The long-poll answer: the subscription's entries after the client's
//! position as soon as there is at least one, or none after
//! `--poll-timeout`, with the id to ask from next. Compressed like every
//! JSON answer when the client offers a coding (the router's compression
//! layer is not around subscribe requests: see `super::app`).

use axum::http::{HeaderValue, header};
use axum::response::Response;
use tokio_stream::StreamExt;

use super::AppState;
use crate::coding::Codec;
use crate::compress;
use crate::subscription::{StreamSettings, Subscription};
use crate::transport::Kind;
use crate::transport::poll::{self, Answer};

/// Runs `subscription` until it has something to say (an event, a reset,
/// its end) or the poll timeout passes, and answers with it. `given` is the
/// client's own position, `next` when nothing moved it; `codec`, the coding
/// the client accepts.
pub async fn answer(
    state: &AppState,
    subscription: Subscription,
    settings: StreamSettings,
    given: Option<String>,
    codec: Option<Codec>,
) -> Response {
    let deadline = tokio::time::Instant::now() + state.config.transports.poll_timeout;
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
    // As tower-http does for the other JSON answers: tiny ones go as they are.
    let codec = codec.filter(|_| body.len() >= MIN_COMPRESSED);
    let (codec, body) = match codec.map(|c| (c, compress::whole(c, &body))) {
        Some((codec, Ok(compressed))) => (Some(codec), bytes::Bytes::from(compressed)),
        // Compressing in memory does not fail; were it to, the answer
        // goes as it is.
        Some((_, Err(_))) | None => (None, body),
    };
    state.metrics.written(Kind::LongPoll, codec).add(body.len());
    let mut response = Response::new(axum::body::Body::from(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(codec) = codec {
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(codec.token()),
        );
    }
    headers.insert(header::VARY, super::request::VARY_BY_ACCEPT);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Bodies shorter than this go uncompressed (tower-http's default for the
/// other JSON answers).
const MIN_COMPRESSED: usize = 32;
