//! The HTTP edge of access control: the `Origin` check every request passes
//! first, CORS answers from the same allowlist, and reading a request's
//! credentials (bearer token, cookie) for [`crate::auth::Auth`].

use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::{ApiError, AppState};
use crate::auth::{AllowedOrigins, Credentials, OriginKind};

/// Refuses a request from a foreign origin before anything else is done
/// with it, and tells the handlers how its origin relates to the list (an
/// [`OriginKind`] among the request's extensions).
pub fn check_origin(state: &AppState, request: &mut Request) -> Result<(), ApiError> {
    let headers = request.headers();
    let host = match request.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => headers.get(header::HOST).and_then(|h| h.to_str().ok()),
    };
    // One origin or none (RFC 6454 §7.3): with two, which one a check
    // reads would decide who the request is from.
    let mut origins = headers.get_all(header::ORIGIN).iter();
    let origin = origins.next().map(|o| o.as_bytes());
    if origins.next().is_some() {
        return Err(ApiError::RepeatedHeader("Origin"));
    }
    let kind = state.auth.check_origin(origin, host)?;
    request.extensions_mut().insert(kind);
    Ok(())
}

/// The credentials `headers` carry. `origin` decides elsewhere whether the
/// cookie may count.
pub fn credentials<'a>(
    headers: &'a HeaderMap,
    origin: OriginKind,
    cookie_name: &str,
) -> Credentials<'a> {
    let bearer = bearer(headers);
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == cookie_name).then(|| value.trim_matches('"'))
        })
        .filter(|t| !t.is_empty());
    let not_bearer = headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| crate::auth::is_bare_token(v.as_bytes()));
    Credentials {
        bearer,
        cookie,
        origin: Some(origin),
        not_bearer,
    }
}

/// The token of `Authorization: Bearer …`, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
}

/// CORS answers from the same list: `*` lets any page read answers without
/// credentials; a list lets exactly its origins read, with credentials
/// (cookies), and never answers `*`.
pub fn cors_layer(origins: &AllowedOrigins) -> CorsLayer {
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("idempotency-key"),
        ])
        .expose_headers([
            header::WWW_AUTHENTICATE,
            header::RETRY_AFTER,
            HeaderName::from_static(super::request::REPLAYED_HEADER),
        ])
        .max_age(Duration::from_secs(3600));
    if origins.is_any() {
        return layer.allow_origin(AllowOrigin::any());
    }
    let origins = origins.clone();
    layer
        .allow_origin(AllowOrigin::predicate(move |origin: &HeaderValue, _| {
            origin.to_str().is_ok_and(|o| origins.lists(o))
        }))
        .allow_credentials(true)
}
