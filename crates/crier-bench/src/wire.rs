//! `crier bench wire`: bytes on the wire per event, per content coding.
//!
//! For each coding, one subscriber asks for it with `Accept-Encoding`, the
//! tool publishes the same stream of realistic JSON events, and counts the
//! body bytes the subscriber receives (after chunked framing, before
//! decoding). Decoding every chunk as it arrives also checks that the stream
//! delivers each event without waiting for the next.

use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpStream;

use crate::coding::{Codec, Decompressor};

#[derive(Debug, Clone, Args)]
pub struct WireArgs {
    /// Base URL of the hub.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Path to subscribe to; `{topic}` is replaced.
    #[arg(long, default_value = "/topics/{topic}")]
    pub subscribe_path: String,
    /// Path to publish to (POST, the event as the body); `{topic}` is replaced.
    #[arg(long, default_value = "/topics/{topic}")]
    pub publish_path: String,
    /// Events per coding.
    #[arg(long, default_value_t = 1000)]
    pub events: usize,
    /// Approximate size of each event's JSON payload, in bytes.
    #[arg(long, default_value_t = 200)]
    pub size: usize,
}

/// A dashboard-style metric update, padded to about `size` bytes.
fn payload(n: usize, size: usize) -> String {
    const ROUTES: [&str; 4] = ["/api/orders", "/api/users", "/api/cart", "/healthz"];
    let mut event = json!({
        "metric": "http.requests.latency_ms",
        "host": format!("web-{:02}.eu-west-1", n % 24),
        "route": ROUTES[n % 4],
        "p50": 12 + (n * 7) % 30,
        "p99": 180 + (n * 13) % 400,
        "count": 1000 + (n * 37) % 5000,
        "ts": 1_764_000_000_000u64 + n as u64 * 250,
        "seq": n,
    });
    let len = event.to_string().len();
    if size > len + 10 {
        event["note"] = json!("x".repeat(size - len - 10));
    }
    event.to_string()
}

struct Target {
    host: String,
    authority: String,
}

fn target(url: &str) -> Result<Target, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad --url {url}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err("bench wire speaks plain http:// (put TLS aside to count bytes)".into());
    }
    let authority = uri.authority().ok_or("--url needs a host")?.to_string();
    let host = if authority.contains(':') {
        authority.clone()
    } else {
        format!("{authority}:80")
    };
    Ok(Target { host, authority })
}

async fn connect(target: &Target) -> Result<http1::SendRequest<Full<Bytes>>, String> {
    let tcp = TcpStream::connect(&target.host)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", target.host))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Result of one coding.
struct Measured {
    coding: &'static str,
    body_bytes: usize,
}

async fn measure(
    args: &WireArgs,
    target: &Target,
    coding: Option<Codec>,
) -> Result<Measured, String> {
    let name = coding.map_or("identity", Codec::token);
    let topic = format!("bench-wire-{name}-{}", std::process::id());
    let mut subscriber = connect(target).await?;
    let request = Request::get(args.subscribe_path.replace("{topic}", &topic))
        .header("host", &target.authority)
        .header("accept", "text/event-stream")
        .header("accept-encoding", name)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = subscriber
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let answered = response
        .headers()
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("identity")
        .to_owned();
    if answered != name {
        return Err(format!("asked for {name}, the hub answered {answered}"));
    }
    let mut body = response.into_body();
    let mut decoder = coding
        .map(Decompressor::new)
        .transpose()
        .map_err(|e| e.to_string())?;

    // The first chunk (the stream's preamble) says the subscription is live.
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .map_err(|_| "the stream sent nothing within 10 s")?;
    if let Some(Ok(frame)) = first
        && let (Some(data), Some(d)) = (frame.data_ref(), decoder.as_mut())
    {
        d.decompress(data).map_err(|e| e.to_string())?;
    }

    // One event at a time, each received before the next is published: a
    // quiet feed, where every event is its own flush, as on a dashboard.
    // (Events published back to back share flushes, and the figure would
    // depend on the machine's timing.)
    let mut publisher = connect(target).await?;
    let publish_path = args.publish_path.replace("{topic}", &topic);
    let mut body_bytes = 0;
    let mut seen = 0;
    let mut pending = Vec::new();
    for n in 0..args.events {
        publisher.ready().await.map_err(|e| e.to_string())?;
        let request = Request::post(&publish_path)
            .header("host", &target.authority)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(payload(n, args.size))))
            .map_err(|e| e.to_string())?;
        let response = publisher
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(super::publish::refused(response.status()));
        }
        response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        while seen <= n {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .map_err(|_| format!("{name}: stalled after {seen} events"))?
                .ok_or(format!("{name}: the stream ended after {seen} events"))?
                .map_err(|e| e.to_string())?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            body_bytes += data.len();
            let plain = match decoder.as_mut() {
                Some(d) => d.decompress(data).map_err(|e| e.to_string())?,
                None => data.to_vec(),
            };
            pending.extend_from_slice(&plain);
            seen += pending.windows(7).filter(|w| w == b"\ndata: ").count();
            let keep = pending.len().min(6);
            pending.drain(..pending.len() - keep);
        }
    }
    eprintln!(
        "{name:>8}: {body_bytes} bytes for {} events, {:.1} bytes/event",
        args.events,
        body_bytes as f64 / args.events as f64
    );
    Ok(Measured {
        coding: name,
        body_bytes,
    })
}

pub async fn run(args: WireArgs) -> Result<serde_json::Value, String> {
    let target = target(&args.url)?;
    eprintln!(
        "bench wire: {} events of ~{} bytes per coding against {}",
        args.events, args.size, args.url
    );
    let mut results = Vec::new();
    for coding in [
        None,
        Some(Codec::Gzip),
        Some(Codec::Brotli),
        Some(Codec::Zstd),
    ] {
        results.push(measure(&args, &target, coding).await?);
    }
    let identity = results[0].body_bytes.max(1) as f64;
    let codings: Vec<_> = results
        .iter()
        .map(|m| {
            json!({
                "coding": m.coding,
                "body_bytes": m.body_bytes,
                "bytes_per_event": m.body_bytes as f64 / args.events as f64,
                "ratio_to_identity": m.body_bytes as f64 / identity,
            })
        })
        .collect();
    Ok(json!({
        "scenario": "wire",
        "url": args.url,
        "events": args.events,
        "payload_bytes": payload(0, args.size).len(),
        "codings": codings,
    }))
}
