//! Each request's span and the log line of its answer. Bodies are not
//! wrapped: an event stream's body enters the span itself while it runs
//! (`subscribe::EventBody`), and the others are written in one go. Like
//! tower-http's `TraceLayer`, which wrapped every body (an event crossed that
//! wrapper on its way to the socket), the future is the inner one's, in
//! place: no allocation per request.
//!
//! A gRPC call's answer is HTTP 200 whatever its outcome: its line carries
//! the call's `grpc_status` as well. A refused call (Trailers-Only) has it
//! in its headers and is logged like a refused request; any other call's
//! body is wrapped to log the status of its trailers when they go out (or
//! that the client left first).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::response::Response;

/// Runs each request in its span (method, path, version: the path only, as
/// a query string may carry a ticket) and logs its answer.
#[derive(Clone, Copy)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

#[derive(Clone)]
pub struct Trace<S> {
    inner: S,
}

impl<S> tower::Service<Request> for Trace<S>
where
    S: tower::Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Traced<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Traced<S::Future> {
        let span = tracing::info_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            version = ?request.version(),
        );
        let started = Instant::now();
        let inner = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Traced {
            inner,
            span,
            started,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's answer, worked out inside its span.
    pub struct Traced<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        started: Instant,
    }
}

impl<F, E> Future for Traced<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let answer = ready!(this.inner.poll(cx));
        Poll::Ready(
            answer.map(|response| match grpc_status(response.headers()) {
                GrpcAnswer::NotGrpc => {
                    log_response(&response, this.started.elapsed());
                    response
                }
                GrpcAnswer::Refused(code) => {
                    log_refused_call(&response, code, this.started.elapsed());
                    response
                }
                GrpcAnswer::InTrailers => {
                    let (span, started) = (this.span.clone(), *this.started);
                    response.map(|body| {
                        axum::body::Body::new(CallBody {
                            inner: body,
                            span,
                            started,
                            logged: false,
                        })
                    })
                }
            }),
        )
    }
}

/// Served requests are logged at DEBUG: at INFO, a flood of requests would
/// be a flood of log. Refused ones (4xx, 5xx) are logged at INFO, at most
/// [`REFUSALS_PER_SECOND`] a second, with a count of those left out.
/// Server errors (5xx) are also logged at ERROR, each one.
/// A readiness probe's 503 is neither: `/readyz` logs its changes itself
/// ([`super::ReadyzLog`]), not every probe a load balancer sends.
fn log_response(response: &Response, latency: Duration) {
    let status = response.status().as_u16();
    let latency_us = latency.as_micros() as u64;
    if response.extensions().get::<super::Probe>().is_some() {
        tracing::debug!(status, latency_us, "probed");
        return;
    }
    let problem = response
        .extensions()
        .get::<super::error::ProblemKind>()
        .map(|kind| kind.0);
    if status < 400 {
        tracing::debug!(status, latency_us, "served");
    } else if let Some(suppressed) = REFUSAL_LOG.allow() {
        tracing::info!(status, problem, latency_us, suppressed, "refused");
    }
    if response.status().is_server_error() {
        tracing::error!(status, problem, latency_us, "response failed");
    }
}

/// Where a gRPC call's status is, if the answer is one's.
enum GrpcAnswer {
    NotGrpc,
    /// Trailers-Only: the call was refused with this code.
    Refused(i32),
    /// In the trailers, after the messages.
    InTrailers,
}

fn grpc_status(headers: &axum::http::HeaderMap) -> GrpcAnswer {
    let grpc = headers
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return GrpcAnswer::NotGrpc;
    }
    match headers.get("grpc-status").map(status_code) {
        Some(code) => GrpcAnswer::Refused(code),
        None => GrpcAnswer::InTrailers,
    }
}

/// The code of a `grpc-status` value (`Unknown`, 2, if unreadable).
fn status_code(value: &axum::http::HeaderValue) -> i32 {
    std::str::from_utf8(value.as_bytes())
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// The codes that say the hub failed, as a 5xx does (logged at ERROR):
/// `Unknown`, `Internal`, `Unavailable`, `DataLoss`.
fn is_server_error(code: i32) -> bool {
    matches!(code, 2 | 13 | 14 | 15)
}

/// A call refused before any message, logged as a refused request is.
fn log_refused_call(response: &Response, grpc_status: i32, latency: Duration) {
    let status = response.status().as_u16();
    let latency_us = latency.as_micros() as u64;
    if grpc_status == 0 {
        tracing::debug!(status, grpc_status, latency_us, "served");
        return;
    }
    if let Some(suppressed) = REFUSAL_LOG.allow() {
        tracing::info!(status, grpc_status, latency_us, suppressed, "refused");
    }
    if is_server_error(grpc_status) {
        tracing::error!(status, grpc_status, latency_us, "response failed");
    }
}

pin_project_lite::pin_project! {
    /// A gRPC call's body, which logs the call's status when its trailers
    /// go out, or that the client left before them.
    struct CallBody {
        #[pin]
        inner: axum::body::Body,
        span: tracing::Span,
        started: Instant,
        logged: bool,
    }

    impl PinnedDrop for CallBody {
        fn drop(this: Pin<&mut Self>) {
            if !this.logged {
                let _entered = this.span.enter();
                let latency_us = this.started.elapsed().as_micros() as u64;
                tracing::debug!(status = 200u16, latency_us, "client left");
            }
        }
    }
}

impl hyper::body::Body for CallBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(trailers) = frame.trailers_ref()
        {
            *this.logged = true;
            let _entered = this.span.enter();
            let grpc_status = trailers.get("grpc-status").map_or(2, status_code);
            let latency_us = this.started.elapsed().as_micros() as u64;
            // At DEBUG whatever the status: a stream's end (its reader fell
            // behind, the node shuts down) is logged by the stream itself.
            if grpc_status == 0 {
                tracing::debug!(status = 200u16, grpc_status, latency_us, "served");
            } else {
                tracing::debug!(status = 200u16, grpc_status, latency_us, "ended");
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

const REFUSALS_PER_SECOND: u64 = 20;
static REFUSAL_LOG: LogBudget = LogBudget::new();

/// A budget of log lines per second, shared by every task.
struct LogBudget {
    /// The current second (since the process started) and lines used in it.
    window: std::sync::Mutex<(u64, u64)>,
    /// Lines left out since the last one written.
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogBudget {
    const fn new() -> LogBudget {
        LogBudget {
            window: std::sync::Mutex::new((0, 0)),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(lines left out since the last one)` when a line may be written.
    fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let second = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs();
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if window.0 != second {
            *window = (second, 0);
        }
        if window.1 >= REFUSALS_PER_SECOND {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        window.1 += 1;
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}
