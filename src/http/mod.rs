//! The HTTP face of the hub: thin axum handlers that parse a request into
//! domain types, call the store or open a subscription, and map the result.

mod access;
mod error;
mod limits;
mod metrics;
mod poll;
mod publish;
mod subscribe;
mod tickets;
mod trace;
mod websocket;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::extract::State;
use axum::handler::Handler;
use axum::http::{HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use tokio_util::sync::CancellationToken;
use tower_http::compression::CompressionLayer;

pub use error::ApiError;
pub use metrics::metrics_app;

use crate::auth::Auth;
use crate::compress::Codec;
use crate::config::Config;
use crate::hub::Hub;
use crate::store::{Store, StoreError};

/// Everything a handler may touch; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub hub: Hub,
    pub store: Arc<dyn Store>,
    pub config: Arc<Config>,
    /// Who may publish and read; checked before any store work.
    pub auth: Arc<Auth>,
    /// Caps and rates per client.
    pub limits: Arc<crate::limits::Limits>,
    /// Cancelled when the process shuts down; every open stream ends then.
    pub shutdown: CancellationToken,
    /// Begun on SIGTERM: readiness fails, streams close spread over time.
    pub drain: crate::drain::Drain,
    /// This hub's metrics (its own recorder, not a process-wide one).
    pub metrics: crate::metrics::Metrics,
}

/// Builds the whole router. `main` serves it; tests serve the very same.
pub fn app(state: AppState) -> Router {
    let cors = access::cors_layer(state.auth.origins());
    // JSON and HTML answers are compressed by tower-http; event streams
    // compress themselves, flushing per chunk. The layer wraps only the
    // handlers whose answers it compresses: around a stream its body
    // wrapper would cost every open connection several KiB for nothing.
    let codecs = state.config.codecs();
    let compression = CompressionLayer::new()
        .zstd(codecs.contains(&Codec::Zstd))
        .br(codecs.contains(&Codec::Brotli))
        .gzip(codecs.contains(&Codec::Gzip))
        .no_deflate();
    let router = Router::new()
        .route(
            "/",
            get(index.layer(compression.clone())).fallback(not_allowed("GET, HEAD")),
        )
        .route("/healthz", get(healthz).fallback(not_allowed("GET, HEAD")))
        .route("/readyz", get(readyz).fallback(not_allowed("GET, HEAD")))
        .route(
            "/topics/{topic}",
            get(subscribe::topic)
                // A WebSocket over HTTP/2 opens with an extended CONNECT.
                .connect(subscribe::topic)
                .post(publish::one.layer(compression.clone()))
                .fallback(not_allowed("GET, POST")),
        )
        .route(
            "/events",
            get(subscribe::topics)
                .connect(subscribe::topics)
                .post(publish::batch.layer(compression.clone()))
                .fallback(not_allowed("GET, POST")),
        )
        .route(
            "/tickets",
            axum::routing::post(tickets::create.layer(compression.clone()))
                .fallback(not_allowed("POST")),
        )
        .route(
            "/crier.js",
            get(browser_helper).fallback(not_allowed("GET, HEAD")),
        )
        .route(
            "/metrics",
            get(metrics::scrape.layer(compression)).fallback(not_allowed("GET, HEAD")),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::hold_stream,
        ))
        .with_state(state.clone());
    // The origin check comes before CORS, so a foreign origin's preflight is
    // refused like any of its requests rather than answered.
    let router = router
        .layer(cors)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::check_origin,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state,
            metrics::count_refusals,
        ));
    let router = router.layer(axum::middleware::from_fn(close_after_refused_body));
    router.layer(trace::TraceLayer)
}

/// A request refused with its body perhaps unread (a bad topic is refused
/// before the body is looked at) cannot be followed by another on its
/// HTTP/1.1 connection: hyper closes it after the answer. The answer says so,
/// so a keep-alive client does not send its next request into a closing
/// socket. (HTTP/2 streams are independent; nothing to say there.)
async fn close_after_refused_body(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let has_body = request.version() < Version::HTTP_2
        && (headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|length| length.as_bytes() != b"0"));
    let mut response = next.run(request).await;
    let refused = response.status().is_client_error() || response.status().is_server_error();
    if has_body && refused {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn not_allowed(allow: &'static str) -> MethodRouter<AppState> {
    axum::routing::any(move |method: Method| async move {
        ApiError::MethodNotAllowed {
            method: method.to_string(),
            allow,
        }
    })
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}

/// The live demo page; compiled in so the binary is all a user needs.
async fn index() -> Html<&'static str> {
    Html(include_str!("../../static/index.html"))
}

/// The browser helper (an ES module) that subscribes with tickets and
/// rides out expiry and restarts.
async fn browser_helper() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../static/crier.js"),
    )
}

/// Liveness: the process serves HTTP.
async fn healthz() -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
}

/// Readiness: the node is not draining, and the store can be reached and
/// its live feed flows (see `Store::check`), so publishes will be stored and
/// subscribers served.
async fn readyz(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    if state.drain.is_draining() {
        return Err(ApiError::Draining);
    }
    let timeout = state.config.redis_timeout;
    match tokio::time::timeout(timeout, state.store.check()).await {
        Ok(Ok(())) => Ok(healthz().await),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(StoreError::Unavailable("the store did not answer in time".into()).into()),
    }
}
