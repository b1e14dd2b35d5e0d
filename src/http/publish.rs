//! `POST /topics/{topic}` and `POST /events`: validate, store, answer with
//! the assigned ids. Nothing is answered `201` before it is stored.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::{Deserialize, Serialize};

use super::access::credentials;
use super::request::{REPLAYED_HEADER, client_name, parse_topic};
use super::{ApiError, AppState};
use crate::auth::{OriginKind, Principal};
use crate::event::{EventName, Position, Topic};
use crate::limits::ClientKey;
use crate::store::{Appended, IdempotencyKey, NewEvent, Once, Receipt, StoreError};

/// What a publisher learns about each stored event (from its receipt, so a
/// replay answers exactly what the first request was answered).
#[derive(Debug, Serialize)]
pub struct Published {
    topic: String,
    /// The event's id as a single-topic stream writes it (`SEQ.EPOCH`).
    id: String,
    seq: u64,
}

impl From<&Receipt> for Published {
    fn from(receipt: &Receipt) -> Published {
        Published {
            topic: receipt.topic.to_string(),
            id: Position::new(receipt.seq, receipt.epoch).to_string(),
            seq: receipt.seq,
        }
    }
}

/// A `201` answer, marked as a replay when nothing was stored now.
fn created(body: impl Serialize, replayed: bool) -> Response {
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, header::HeaderValue::from_static("true"));
    }
    response
}

/// The `Idempotency-Key` header, if the request has one (only one).
pub(super) fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let place = || "Idempotency-Key header".to_owned();
    if values.next().is_some() {
        return Err(ApiError::InvalidIdempotencyKey {
            place: place(),
            reason: crate::store::InvalidIdempotencyKey,
        });
    }
    IdempotencyKey::parse(value.as_bytes())
        .map(Some)
        .map_err(|reason| ApiError::InvalidIdempotencyKey {
            place: place(),
            reason,
        })
}

pub async fn one(
    State(state): State<AppState>,
    Extension(origin): Extension<OriginKind>,
    client: Option<Extension<ClientKey>>,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let topic = parse_topic(path, &state)?;
    let key = idempotency_key(&headers)?;
    // Who is asking, and may they, before the body is read.
    let principal =
        state
            .auth
            .publisher(&credentials(&headers, origin, &state.config.auth_cookie))?;
    state.auth.may_publish(&principal, [&topic])?;
    state
        .limits
        .publish(&principal.rate_key(&client_name(client)), 1)?;
    let mut name = None;
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        if key == "event" {
            name = Some(EventName::parse(&value)?);
        }
    }
    let bytes = read_body(
        body,
        &headers,
        state.config.limits.max_event_bytes,
        state.config.limits.body_timeout,
    )
    .await?;
    let data = String::from_utf8(bytes).map_err(|_| ApiError::NotUtf8)?;
    if !fits(&data, state.config.limits.max_event_bytes) {
        return Err(ApiError::EncodedTooLarge {
            limit: state.config.limits.max_event_bytes,
        });
    }
    let event = NewEvent { topic, name, data };
    let appended = store_one(&state, &principal, event, key).await?;
    let replayed = matches!(appended, Appended::Replayed(_));
    Ok(created(Published::from(&appended.receipt()), replayed))
}

/// Stores `events` for `principal`, each under its idempotency key if it
/// has one (scoped to the principal, remembered for the window): the one
/// way into the store for every publish, over HTTP or a WebSocket. Grants
/// and rates are the caller's to check first.
pub(super) async fn store_events(
    state: &AppState,
    principal: &Principal,
    events: Vec<(NewEvent, Option<IdempotencyKey>)>,
) -> Result<Vec<Appended>, StoreError> {
    let window = state.config.idempotency_window;
    let scope = principal.key_scope();
    let events: Vec<(NewEvent, Option<Once>)> = events
        .into_iter()
        .map(|(event, key)| {
            let once = key
                .filter(|_| !window.is_zero())
                .map(|key| Once::new(&key, &scope, &event));
            (event, once)
        })
        .collect();
    state.store.append_once(events, window).await
}

/// Stores one event: [`store_events`] for a single publish.
pub(crate) async fn store_one(
    state: &AppState,
    principal: &Principal,
    event: NewEvent,
    key: Option<IdempotencyKey>,
) -> Result<Appended, ApiError> {
    let appended = store_events(state, principal, vec![(event, key)])
        .await
        .map_err(|error| match error {
            StoreError::KeyReused { .. } => ApiError::KeyReused,
            other => other.into(),
        })?;
    appended
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Store(StoreError::Unavailable("the store stored nothing".into())))
}

/// One event as a batch item or a WebSocket publish frame names it:
/// validated against the limits HTTP bodies are held to. The error says
/// what is wrong (the caller says where).
pub(super) fn item_event(
    limits: &crate::config::LimitsConfig,
    topic: &str,
    event: Option<&str>,
    data: serde_json::Value,
) -> Result<NewEvent, String> {
    let topic = Topic::parse(topic, limits.max_topic_len)
        .map_err(|e| format!("invalid topic `{topic}`: {e}"))?;
    let name = event
        .map(EventName::parse)
        .transpose()
        .map_err(|e| format!("invalid event name: {e}"))?;
    let data = match data {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    if !fits(&data, limits.max_event_bytes) {
        return Err(format!(
            "data is larger than the limit of {} bytes once encoded (each line break adds a `data: ` line)",
            limits.max_event_bytes
        ));
    }
    Ok(NewEvent { topic, name, data })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem {
    topic: String,
    data: serde_json::Value,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BatchPublished {
    events: Vec<BatchReceipt>,
}

/// One item's answer: where its event is, and `replayed: true` when its
/// key's record answered it and nothing was stored now.
#[derive(Debug, Serialize)]
struct BatchReceipt {
    #[serde(flatten)]
    published: Published,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
}

pub async fn batch(
    State(state): State<AppState>,
    Extension(origin): Extension<OriginKind>,
    client: Option<Extension<ClientKey>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let config = &state.config;
    // A bad token is refused before the body is read; grants are checked
    // once the body says which topics it names.
    let principal = state
        .auth
        .publisher(&credentials(&headers, origin, &config.auth_cookie))?;
    let bytes = read_body(
        body,
        &headers,
        config.limits.max_batch_bytes,
        config.limits.body_timeout,
    )
    .await?;
    let items: Vec<BatchItem> =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::MalformedBatch(e.to_string()))?;
    if items.len() > config.limits.max_batch_events {
        return Err(ApiError::BatchTooLong {
            limit: config.limits.max_batch_events,
        });
    }
    let mut events = Vec::with_capacity(items.len());
    let mut keys = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let event = item_event(
            &config.limits,
            &item.topic,
            item.event.as_deref(),
            item.data,
        )
        .map_err(|what| ApiError::MalformedBatch(format!("item {i}: {what}")))?;
        let key = item
            .idempotency_key
            .as_deref()
            .map(|key| IdempotencyKey::parse(key.as_bytes()))
            .transpose()
            .map_err(|reason| ApiError::InvalidIdempotencyKey {
                place: format!("idempotency_key of item {i}"),
                reason,
            })?;
        events.push(event);
        keys.push(key);
    }
    let appended = store_batch(&state, &principal, &client_name(client), events, keys).await?;
    let all_replayed =
        !appended.is_empty() && appended.iter().all(|a| matches!(a, Appended::Replayed(_)));
    let events = appended
        .iter()
        .map(|a| BatchReceipt {
            published: Published::from(&a.receipt()),
            replayed: matches!(a, Appended::Replayed(_)),
        })
        .collect();
    Ok(created(BatchPublished { events }, all_replayed))
}

/// Stores a validated batch, all or nothing, for `principal` publishing
/// from `client`: its grants, the publish rate for every event, keys that
/// conflict within the batch, then the store. (`POST /events` and gRPC's
/// `PublishBatch`.)
pub(crate) async fn store_batch(
    state: &AppState,
    principal: &Principal,
    client: &str,
    events: Vec<NewEvent>,
    keys: Vec<Option<IdempotencyKey>>,
) -> Result<Vec<Appended>, ApiError> {
    let config = &state.config;
    state
        .auth
        .may_publish(principal, events.iter().map(|e| &e.topic))?;
    state
        .limits
        .publish(&principal.rate_key(&client), events.len())?;
    let window = config.idempotency_window;
    let scope = principal.key_scope();
    let onces: Vec<Option<Once>> = events
        .iter()
        .zip(&keys)
        .map(|(event, key)| {
            key.as_ref()
                .filter(|_| !window.is_zero())
                .map(|key| Once::new(key, &scope, event))
        })
        .collect();
    if let Some(item) = crate::store::once::conflict_within(&onces) {
        state
            .metrics
            .idempotency(crate::metrics::Idempotency::Mismatch, 1);
        return Err(ApiError::BatchKeyReused { item });
    }
    let appended = store_events(state, principal, events.into_iter().zip(keys).collect())
        .await
        .map_err(|error| match error {
            StoreError::KeyReused { item } => ApiError::BatchKeyReused { item },
            other => other.into(),
        })?;
    state.metrics.batch_stored();
    Ok(appended)
}

/// Whether `data` stays within `limit` once encoded: a payload of `limit`
/// bytes on one line fits, and each line break costs the 7 bytes of the
/// `data: ` line it adds, so line breaks cannot inflate what is stored and
/// sent past the limit.
pub(crate) fn fits(data: &str, limit: usize) -> bool {
    crate::sse::encoded_data_len(data) <= limit.saturating_add(7)
}

/// Reads a request body of at most `limit` bytes within `timeout`, refusing
/// larger ones before reading them when the client announced its length.
///
/// Each piece is copied out as it arrives: a piece hyper hands over may keep
/// its whole read buffer alive, so collecting a dribbled body piece by piece
/// would hold kilobytes per byte received.
pub(super) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, ApiError> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut body = Limited::new(body, limit);
    let mut bytes = Vec::with_capacity(announced.map_or(0, |n| n as usize));
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(ApiError::BodyTimeout(timeout)),
            Ok(None) => return Ok(bytes),
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            Ok(Some(Err(e))) => return Err(ApiError::UnreadableBody(e.to_string())),
        };
        if let Some(data) = frame.data_ref() {
            bytes.extend_from_slice(data);
        }
    }
}
