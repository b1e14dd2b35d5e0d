//! The publishing side shared by the scenarios: keep-alive HTTP/1.1
//! connections that POST bench events, each event starting with its
//! [`Stamp`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::client::{Target, unix_micros};
use super::decode::Stamp;

/// Longest wait for one publish to be answered.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// A keep-alive HTTP/1.1 connection that publishes.
pub type Publisher = http1::SendRequest<Full<Bytes>>;

pub async fn connect(target: &Target) -> Result<Publisher, String> {
    let tcp = TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", target.addr))?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// An event: its stamp, padded to `size` bytes of JSON.
pub fn event(seq: u64, size: usize) -> String {
    padded(
        Stamp {
            seq,
            sent_us: unix_micros(),
        }
        .json_prefix(),
        size,
    )
}

/// What the body of a `bench fanout` event looks like after its stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Payload {
    /// Padding only (`"pad":"xxx…"`): compresses to almost nothing.
    Padded,
    /// A dashboard-style metric update whose fields change from event to
    /// event (host, route, percentiles, count), then padding: the JSON
    /// `bench wire` measures, so compressed streams cost what they would.
    Metrics,
}

impl Payload {
    /// Event `seq` of about `size` bytes, starting with its stamp.
    pub fn event(self, seq: u64, size: usize) -> String {
        match self {
            Payload::Padded => event(seq, size),
            Payload::Metrics => metrics_event(seq, size),
        }
    }
}

/// A metric update stamped as a bench event, padded to `size` bytes.
pub fn metrics_event(seq: u64, size: usize) -> String {
    use std::fmt::Write;
    const ROUTES: [&str; 4] = ["/api/orders", "/api/users", "/api/cart", "/healthz"];
    let n = seq as usize;
    let mut event = Stamp {
        seq,
        sent_us: unix_micros(),
    }
    .json_prefix();
    let _ = write!(
        event,
        ",\"metric\":\"http.requests.latency_ms\",\"host\":\"web-{:02}.eu-west-1\",\"route\":\"{}\",\"p50\":{},\"p99\":{},\"count\":{}",
        n % 24,
        ROUTES[n % 4],
        12 + (n * 7) % 30,
        180 + (n * 13) % 400,
        1000 + (n * 37) % 5000,
    );
    padded(event, size)
}

/// The start of a JSON object (`{"seq":…`), closed with padding so that the
/// whole is `size` bytes (or just closed, when already longer).
pub fn padded(mut event: String, size: usize) -> String {
    event.push_str(",\"pad\":\"");
    let pad = size.saturating_sub(event.len() + 2);
    event.extend(std::iter::repeat_n('x', pad));
    event.push_str("\"}");
    event
}

/// Publishes `body` to `path` on `publisher`, connecting it first if it is
/// not connected or broke; succeeds on a 2xx answer.
pub async fn post(
    target: &Arc<Target>,
    path: &str,
    publisher: &mut Option<Publisher>,
    body: String,
) -> Result<(), String> {
    let sender = match publisher {
        Some(sender) if !sender.is_closed() => sender,
        _ => publisher.insert(connect(target).await?),
    };
    sender.ready().await.map_err(|e| e.to_string())?;
    let request = Request::post(path)
        .header("host", &target.authority)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(refused(status));
    }
    Ok(())
}

/// What a refused publish tells the person running the bench: a 429 is the
/// hub's per-publisher rate limit, which a measurement must lift.
pub fn refused(status: hyper::StatusCode) -> String {
    match status {
        hyper::StatusCode::TOO_MANY_REQUESTS => format!(
            "publish answered {status}: the hub's publish rate limit; start the hub with \
             --publish-rate 0 (CRIER_PUBLISH_RATE=0) to measure it"
        ),
        _ => format!("publish answered {status}"),
    }
}

/// [`post`] within [`PUBLISH_TIMEOUT`]; a publisher that timed out is
/// dropped, to be reconnected by the next publish.
pub async fn post_in_time(
    target: &Arc<Target>,
    path: &str,
    publisher: &mut Option<Publisher>,
    body: String,
) -> Result<(), String> {
    let sent = tokio::time::timeout(PUBLISH_TIMEOUT, post(target, path, publisher, body))
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {PUBLISH_TIMEOUT:?}")));
    if sent.is_err() {
        *publisher = None;
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_padded_to_their_size_and_keep_their_stamp() {
        let event = event(7, 200);
        assert_eq!(event.len(), 200);
        assert_eq!(Stamp::parse(event.as_bytes()).map(|s| s.seq), Some(7));
        let short = padded("{\"seq\":1,\"sent_us\":2".into(), 0);
        assert_eq!(short, "{\"seq\":1,\"sent_us\":2,\"pad\":\"\"}");
        serde_json::from_str::<serde_json::Value>(&event).unwrap();
    }

    #[test]
    fn metric_events_are_json_of_their_size_that_change_and_keep_their_stamp() {
        let (a, b) = (
            Payload::Metrics.event(7, 200),
            Payload::Metrics.event(8, 200),
        );
        assert_eq!((a.len(), b.len()), (200, 200));
        assert_eq!(Stamp::parse(a.as_bytes()).map(|s| s.seq), Some(7));
        let a: serde_json::Value = serde_json::from_str(&a).unwrap();
        let b: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_ne!(a["host"], b["host"]);
        assert_eq!(a["metric"], "http.requests.latency_ms");
    }
}
