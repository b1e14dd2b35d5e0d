//! The HTTP face of the hub: thin axum handlers that parse a request into
//! domain types, call the store or open a subscription, and map the result.

mod access;
mod dispatch;
mod edge;
mod error;
mod limits;
mod metrics;
mod poll;
pub(crate) mod publish;
pub(crate) mod subscribe;
mod tickets;
mod trace;
mod websocket;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::handler::Handler;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse};
use axum::routing::{MethodRouter, get};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::compression::CompressionLayer;

pub use error::ApiError;
pub use metrics::metrics_app;

use crate::auth::Auth;
use crate::compress::Codec;
use crate::config::Config;
use crate::hub::Hub;
use crate::store::{Store, StoreError};

/// Everything a handler may touch: a handle, one reference count to clone.
/// Handlers and layers clone it for every request (axum's extractors and
/// services take it by value), so a clone of each part here would be a
/// reference count (or a lock, for the cancellation tokens) per part, many
/// times per request.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] hands out.
pub struct Shared {
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
    app_with(state, None)
}

/// [`app`], with gRPC calls sent to `grpc` (`crate::grpc::routes`) once
/// traced, ahead of every other HTTP layer: Origin checks and CORS are for
/// browsers.
pub fn app_with(state: AppState, grpc: Option<Router>) -> Router {
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
        .with_state(state.clone());
    // One layer, a stack of plain services. Each `Router::layer` wraps every
    // route in a boxed service of its own, and a call clones the boxed
    // stack beneath it, so layers added one by one cost clones and boxes
    // per request in the square of their number.
    router.layer(
        ServiceBuilder::new()
            .layer(trace::TraceLayer)
            // gRPC calls get their span and log line, and none of the
            // layers below (Origin, CORS, HTTP limits): they have their own.
            .layer(dispatch::DispatchLayer(grpc))
            // The origin check comes before CORS, so a foreign origin's
            // preflight is refused like any of its requests rather than
            // answered.
            .layer(edge::EdgeLayer(state.clone()))
            .layer(cors)
            .layer(limits::HoldStreamLayer(state)),
    )
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
    ready(&state).await?;
    Ok(healthz().await)
}

/// Why the node is not ready, if it is not (what `/readyz` and gRPC's
/// health service answer).
pub async fn ready(state: &AppState) -> Result<(), ApiError> {
    if state.drain.is_draining() {
        return Err(ApiError::Draining);
    }
    let timeout = state.config.redis_timeout;
    match tokio::time::timeout(timeout, state.store.check()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(StoreError::Unavailable("the store did not answer in time".into()).into()),
    }
}
