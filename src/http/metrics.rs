//! `GET /metrics`: the Prometheus scrape, on the main listener (behind a
//! token granting `metrics` when tokens are configured) or on the
//! `--metrics-listen` listener (no token: operators keep it private). Also
//! the layer that counts refused requests by the reason their problem
//! carries. The text itself is made by [`crate::metrics`].

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{ApiError, AppState};
use crate::metrics::Refusal;

/// The scrape on the main listener. With `--metrics-listen` set, the
/// metrics are not served here at all.
pub async fn scrape(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if state.config.metrics_listen.is_some() {
        return Err(ApiError::NotFound("/metrics".into()));
    }
    state.auth.may_scrape(super::access::bearer(&headers))?;
    Ok(answer(&state))
}

/// The router of the `--metrics-listen` listener: `/metrics`, nothing else.
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(state): State<AppState>| async move { answer(&state) }),
        )
        .fallback(|uri: axum::http::Uri| async move { ApiError::NotFound(uri.path().to_owned()) })
        .with_state(state)
}

fn answer(state: &AppState) -> Response {
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        state.metrics.render(),
    )
        .into_response()
}

/// Counts every refused request under the reason its problem was given
/// (set by [`ApiError`]'s answer).
pub async fn count_refusals(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let response = next.run(request).await;
    if let Some(reason) = response.extensions().get::<Refusal>() {
        state.metrics.refused(*reason);
    }
    response
}
