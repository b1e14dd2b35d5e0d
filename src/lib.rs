//! crier: a Server-Sent Events broadcast hub.
//!
//! Publishers POST events; each topic numbers them 1, 2, 3, … and a store
//! keeps recent history; subscribers read a `text/event-stream` and resume
//! exactly where they left off with `Last-Event-ID`.
//!
//! Data flows one way: [`http`] publish → [`store`] (assigns the id, encodes
//! once) → [`hub`] (fans the same bytes out) → each [`subscription`]'s
//! stream. See docs/ARCHITECTURE.md for the map.

pub mod auth;
pub mod coding;
pub mod compress;
pub mod config;
pub mod devcert;
pub mod drain;
pub mod event;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod sse;
pub mod store;
pub mod subscription;
pub mod transport;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use http::{AppState, app};

use crate::auth::Auth;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::{DurableStore, Measured, MemoryStore, RedisStore, Store, StoreError};

/// A setting the hub cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthConfigError),
    #[error("{0}")]
    Config(String),
}

/// Builds the hub's state for `config`, starting its background tasks; they
/// stop when `shutdown` is cancelled. Fails only on a malformed setting (a
/// Redis that cannot be reached yet is retried in the background).
pub fn state(config: Config, shutdown: CancellationToken) -> Result<AppState, SetupError> {
    config.validate().map_err(SetupError::Config)?;
    let access = &config.access;
    let auth = Arc::new(Auth::new(
        &access.jwt,
        access.origins(),
        &access.public_topics,
        access.ticket_ttl,
    )?);
    // TLS (to Redis, `rediss://`) uses rustls with the ring provider. An
    // error only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // This state's own metrics, not a process-wide recorder: several hubs
    // may share a process (the tests run many), each showing its own.
    let metrics = Metrics::new();
    tokio::spawn(upkeep_until(metrics.clone(), shutdown.clone()));
    let transports = &config.transports;
    let hub = Hub::with_metrics(
        transports.subscriber_backlog,
        transports.heartbeat,
        transports.max_compression_chains,
        metrics.clone(),
    );
    let storage = &config.storage;
    let redis = config.redis.target().map_err(SetupError::Config)?;
    let store: Arc<dyn Store> = match (redis, storage.durable()) {
        (None, Some(durable)) => {
            let store = Arc::new(DurableStore::open(
                durable,
                hub.clone(),
                storage.retention(),
                storage.budget(),
            )?);
            tokio::spawn(store.clone().sweep_until(shutdown.clone()));
            store
        }
        (Some(target), _) => {
            let store = Arc::new(RedisStore::new(
                config.redis.settings(target, storage.retention()),
                hub.clone(),
            )?);
            tokio::spawn(store.clone().run_until(shutdown.clone()));
            store
        }
        (None, None) => {
            let store = Arc::new(MemoryStore::new(
                hub.clone(),
                storage.retention(),
                storage.budget(),
            ));
            tokio::spawn(store.clone().sweep_until(shutdown.clone()));
            store
        }
    };
    let store = Arc::new(Measured::new(store, metrics.clone()));
    let limits = Arc::new(limits::Limits::new(
        config.limits.settings().map_err(SetupError::Config)?,
    ));
    let drain = drain::Drain::new(
        config.shutdown.drain_delay,
        config.shutdown.drain_window,
        &shutdown,
    );
    Ok(AppState::new(http::Shared {
        drain,
        hub,
        store,
        metrics,
        auth,
        limits,
        config: http::HandlerConfig::of(&config),
        shutdown,
        readiness: Default::default(),
    }))
}

/// Serves the hub on `listener` until `shutdown` is cancelled, then stops
/// accepting, ends every open stream cleanly, lets in-flight requests finish
/// and returns, waiting at most the configured shutdown timeout.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with_drain(listener, config, CancellationToken::new(), shutdown).await
}

/// Like [`serve`], and when `drain` is cancelled (SIGTERM) drains first:
/// `/readyz` fails at once, new streams are served for `--drain-delay`,
/// then open streams are closed spread over `--drain-window`, and the hub
/// returns once they and in-flight requests are done (at most
/// `--shutdown-timeout` after the window). Cancelling `shutdown` meanwhile
/// cuts the drain short.
pub async fn serve_with_drain(
    listener: TcpListener,
    config: Config,
    drain: CancellationToken,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let metrics_listener = match config.observability.metrics_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|error| {
            std::io::Error::new(
                error.kind(),
                format!("cannot listen on {addr} for metrics: {error}"),
            )
        })?),
        None => None,
    };
    serve_with(listener, metrics_listener, config, drain, shutdown).await
}

/// [`serve`], with the `--metrics-listen` listener already bound (`None`:
/// metrics are served on the main listener). Tests bind it on an ephemeral
/// port this way.
pub async fn serve_with_metrics(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_with(
        listener,
        metrics_listener,
        config,
        CancellationToken::new(),
        shutdown,
    )
    .await
}

async fn serve_with(
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    mut config: Config,
    drain: CancellationToken,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    if let Some(metrics_listener) = &metrics_listener {
        // What the router decides by: /metrics is not on the main listener.
        config.observability.metrics_listen = Some(metrics_listener.local_addr()?);
    }
    let state = state(config.clone(), shutdown.clone()).map_err(std::io::Error::other)?;
    let limits = state.limits.clone();
    let metrics = state.metrics.clone();
    if let Some(metrics_listener) = metrics_listener {
        match metrics_listener.local_addr() {
            Ok(addr) => tracing::info!("metrics on http://{addr}/metrics (no token: firewall it)"),
            Err(error) => tracing::warn!(%error, "serving metrics on an unknown address"),
        }
        let router = http::metrics_app(state.clone());
        let stop = shutdown.clone();
        let settings = config.limits.clone();
        tokio::spawn(async move {
            server::serve_metrics(metrics_listener, router, &settings, stop).await;
        });
    }
    let draining = state.drain.clone();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = drain.cancelled() => draining.begin(),
            () = stop.cancelled() => {}
        }
    });
    let result = server::serve(
        listener,
        http::app_with(state.clone(), Some(grpc::routes(state.clone()))),
        limits,
        metrics,
        server::ServerSettings {
            listen: &config.listen,
            limits: &config.limits,
            transports: &config.transports,
            shutdown: &config.shutdown,
            access: &config.access,
        },
        shutdown.clone(),
        state.drain.clone(),
    )
    .await;
    // Background tasks (the store's live feed) ran through the drain; now
    // they stop, and the store syncs and unlocks its data directory.
    shutdown.cancel();
    state.store.close().await;
    result
}

/// Folds histogram samples into buckets every few seconds, so they take
/// bounded memory whether or not anyone scrapes.
async fn upkeep_until(metrics: Metrics, stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => metrics.upkeep(),
        }
    }
}
