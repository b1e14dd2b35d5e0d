//! The `crier` binary: parse the command line, bind, serve, stop on signal.

use clap::Parser;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crier::config::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        None => cli.serve.observability.log_format,
        Some(Command::Serve(config)) => config.observability.log_format,
        _ => LogFormat::Text,
    };
    init_logging(format);
    let mut config = match cli.command {
        None => cli.serve.settle(),
        Some(Command::Serve(config)) => config.settle(),
        Some(Command::Token(args)) => return print_token(*args),
        Some(Command::Repair(args)) => return repair(&args.data_dir),
        Some(Command::Bench(bench)) => return crier_bench::main(bench.args).await,
    };

    if config.listen.tls_self_signed {
        let dir = crier::devcert::default_dir();
        match crier::devcert::ensure(&dir) {
            Ok(files) => {
                tracing::info!(
                    "serving HTTPS with the self-signed certificate {} (for localhost and 127.0.0.1; trust it with curl --cacert {})",
                    files.cert.display(),
                    files.cert.display()
                );
                config.listen.tls_cert = Some(files.cert);
                config.listen.tls_key = Some(files.key);
            }
            Err(error) => {
                tracing::error!(%error, "cannot serve HTTPS");
                return std::process::ExitCode::FAILURE;
            }
        }
    }

    // Every subscriber is an open socket: use all the descriptors we may.
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%error, "could not raise the open-file limit");
    }

    let listener = match bind(config.listen.addr, config.listen.backlog) {
        Ok(listener) => listener,
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::error!(
                %error,
                listen = %config.listen.addr,
                "cannot listen: another process (another crier?) holds this address; stop it, or give another --listen"
            );
            return std::process::ExitCode::FAILURE;
        }
        Err(error) => {
            tracing::error!(%error, listen = %config.listen.addr, "cannot listen");
            return std::process::ExitCode::FAILURE;
        }
    };
    let drain = CancellationToken::new();
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(drain.clone(), shutdown.clone()));
    match crier::serve_with_drain(listener, config, drain, shutdown).await {
        Ok(()) => {
            tracing::info!("stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "server failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`): as text for
/// people, or as one JSON object per line for log collectors. Whatever
/// `RUST_LOG` says, the WebSocket library's own lines are never written: at
/// trace level they hold every message whole (event data, idempotency
/// keys, tokens in publish frames).
fn init_logging(format: LogFormat) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let layer = match format {
        LogFormat::Text => layer
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(
            layer
                .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                    !is_silenced(meta.target())
                }))
                .with_filter(filter),
        )
        .init();
}

/// Targets never logged, at any level (see [`init_logging`]).
fn is_silenced(target: &str) -> bool {
    const SILENCED: [&str; 2] = ["tungstenite", "tokio_tungstenite"];
    SILENCED.iter().any(|silenced| {
        target
            .strip_prefix(silenced)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// `crier token`: prints a JWT signed with the configured secret. A token
/// that grants nothing is refused: it would only ever earn 403s, and a
/// script that forgot its grants should stop, not carry on with it.
fn print_token(args: crier::config::TokenArgs) -> std::process::ExitCode {
    if args.publish.is_empty() && args.subscribe.is_empty() && !args.metrics {
        eprintln!(
            "crier token: the token would grant nothing: give --publish PATTERN, --subscribe PATTERN or --metrics"
        );
        return std::process::ExitCode::FAILURE;
    }
    let grants = crier::auth::Grants {
        publish: args.publish.iter().map(crier::auth::Pattern::new).collect(),
        subscribe: args
            .subscribe
            .iter()
            .map(crier::auth::Pattern::new)
            .collect(),
        metrics: args.metrics,
    };
    match crier::auth::mint(&args.jwt, grants, args.ttl, args.subject) {
        Ok(token) => {
            println!("{token}");
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("crier token: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `crier repair`: repairs a data directory and says what it did.
fn repair(dir: &std::path::Path) -> std::process::ExitCode {
    match crier::store::repair(dir) {
        Ok(None) => {
            println!(
                "crier repair: no damaged journal in {}; nothing was changed",
                dir.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Ok(Some(repaired)) => {
            for (journal, dropped) in &repaired.journals {
                println!(
                    "crier repair: {}: cut out {dropped} damaged bytes, kept every intact batch",
                    journal.display()
                );
            }
            if let Some(saved) = &repaired.saved {
                println!(
                    "crier repair: the damaged journals as they were: {}",
                    saved.display()
                );
            }
            println!(
                "crier repair: {} topics start a new epoch: clients resuming get reset",
                repaired.topics
            );
            std::process::ExitCode::SUCCESS
        }
        Err(crier::store::StoreError::Config(what)) => {
            eprintln!("crier repair: {what}");
            std::process::ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("crier repair: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Binds the listener with room for a reconnect storm in its accept queue
/// (`TcpListener::bind` would leave it at 128).
fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// SIGTERM (what an orchestrator sends) cancels `drain`: the node drains
/// and then stops. Ctrl-C, or a second SIGTERM, cancels `shutdown`: streams
/// end at once (a person at a terminal, or an operator who means it).
async fn cancel_on_signal(drain: CancellationToken, shutdown: CancellationToken) {
    #[cfg(unix)]
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM");
            None
        }
    };
    #[cfg(unix)]
    let mut terminated = async || match term.as_mut() {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending::<()>().await,
    };
    #[cfg(not(unix))]
    let mut terminated = async || std::future::pending::<()>().await;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("shutting down (Ctrl-C)");
            shutdown.cancel();
            return;
        }
        () = terminated() => {
            tracing::info!("draining (SIGTERM); a second SIGTERM or Ctrl-C stops at once");
            drain.cancel();
        }
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminated() => {}
    }
    tracing::info!("shutting down now");
    shutdown.cancel();
}
