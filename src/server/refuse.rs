//! Turning a connection away before any request: the canned HTTP/1.1
//! answer of a refused connection (503 `over-capacity`, 429
//! `too-many-connections`), made once through `ApiError`, the one
//! problem+json builder, and written without waiting. Never reads a
//! request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::response::IntoResponse;
use tokio::net::TcpStream;

use crate::http::ApiError;
use crate::metrics::ConnectionRefusal;

/// Refused connections that may wait at once for their client to read the
/// refusal; past that, they are just closed.
const MAX_LINGERING: usize = 64;

/// Turns a refused connection away as cheaply as possible: on a plain
/// listener with the canned HTTP/1.1 answer, written once without waiting;
/// over TLS by closing it (answering would cost a handshake). A few refused
/// connections wait briefly for the client to send its request, so the
/// close does not destroy the answer (a close with unread data resets).
pub(super) fn refuse(
    stream: TcpStream,
    refusal: ConnectionRefusal,
    tls: bool,
    lingering: &Arc<AtomicUsize>,
) {
    if tls {
        return;
    }
    let _ = stream.try_write(canned(refusal));
    if lingering.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
        lingering.fetch_sub(1, Ordering::Relaxed);
        return;
    }
    let lingering = lingering.clone();
    tokio::spawn(async move {
        let mut stream = stream;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        // Read what the client sends (its request) until it pauses, at most
        // half a second, then close with nothing unread.
        let mut sink = [0u8; 4096];
        let drain = async {
            loop {
                let read = tokio::io::AsyncReadExt::read(&mut stream, &mut sink);
                match tokio::time::timeout(Duration::from_millis(50), read).await {
                    Ok(Ok(n)) if n > 0 => continue,
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
        lingering.fetch_sub(1, Ordering::Relaxed);
    });
}

/// The whole HTTP/1.1 answer to a refused connection, made once.
fn canned(refusal: ConnectionRefusal) -> &'static [u8] {
    static FULL: LazyLock<Vec<u8>> =
        LazyLock::new(|| answer(ApiError::ConnectionRefused(ConnectionRefusal::Capacity)));
    static CLIENT: LazyLock<Vec<u8>> = LazyLock::new(|| {
        answer(ApiError::ConnectionRefused(
            ConnectionRefusal::ClientConnections,
        ))
    });
    match refusal {
        ConnectionRefusal::Capacity => &FULL,
        ConnectionRefusal::ClientConnections | ConnectionRefusal::ConnectionRate => &CLIENT,
    }
}

/// `error` as the router would answer it, written out as HTTP/1.1 bytes
/// that close the connection.
fn answer(error: ApiError) -> Vec<u8> {
    let body = error.problem().to_string();
    let response = error.into_response();
    let status = response.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in response.headers() {
        if let Ok(value) = value.to_str() {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    head.push_str(&format!(
        "connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    head.into_bytes()
}
