//! `GET /metrics`: the Prometheus scrape, on the main listener (behind a
//! token granting `metrics` when tokens are configured) or on the
//! `--metrics-listen` listener (no token: operators keep it private). The
//! text itself is made by [`crate::metrics`]; refused requests are counted
//! by [`super::edge`].

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{ApiError, AppState};

/// The scrape on the main listener. With `--metrics-listen` set, the
/// metrics are not served here at all.
pub async fn scrape(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if state.config.metrics_elsewhere {
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
