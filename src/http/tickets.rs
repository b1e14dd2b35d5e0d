//! `POST /tickets`: trade a token (or the auth cookie) for a single-use
//! ticket that opens a subscription to the topics it names, for pages whose
//! EventSource cannot send an `Authorization` header.

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::access::credentials;
use super::request::parse_topics;
use super::{ApiError, AppState};
use crate::auth::{AuthError, OriginKind, Principal, TicketRecord, ticket};

/// Largest ticket request body: a list of topic names.
const MAX_BODY: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TicketRequest {
    topics: Vec<String>,
}

pub async fn create(
    State(state): State<AppState>,
    Extension(origin): Extension<OriginKind>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let auth = &state.auth;
    if !auth.enabled() {
        return Err(AuthError::TicketsDisabled.into());
    }
    let credentials = credentials(&headers, origin, &state.config.auth_cookie);
    let principal = auth.identify(&credentials, origin.may_use_cookie())?;
    let Principal::Token(verified) = &principal else {
        return Err(AuthError::Missing.into());
    };
    let bytes =
        super::publish::read_body(body, &headers, MAX_BODY, state.config.limits.body_timeout)
            .await?;
    let request: TicketRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::MalformedTicketRequest(e.to_string()))?;
    let topics = parse_topics(&request.topics, &state.config.limits)?;
    auth.may_subscribe(&principal, &topics)?;

    let record = TicketRecord {
        topics: topics.iter().map(|t| t.to_string()).collect(),
        expires_at: verified.expires_at,
    };
    let ticket = ticket::generate();
    let ttl = auth.ticket_ttl();
    let record = serde_json::to_string(&record).expect("a ticket record serializes");
    state
        .store
        .put_ticket(&ticket::digest(&ticket), &record, ttl)
        .await?;
    let mut response = (
        StatusCode::CREATED,
        Json(json!({ "ticket": ticket, "expires_in": ttl.as_secs() })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
