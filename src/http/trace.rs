//! Each request's span and the log line of its answer. Bodies are not
//! wrapped: an event stream's body enters the span itself while it runs
//! (`subscribe::EventBody`), and the others are written in one go. Like
//! tower-http's `TraceLayer`, which wrapped every body (an event crossed that
//! wrapper on its way to the socket), the future is the inner one's, in
//! place: no allocation per request.

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
        if let Ok(response) = &answer {
            log_response(response, this.started.elapsed());
        }
        Poll::Ready(answer)
    }
}

/// Served requests are logged at DEBUG: at INFO, a flood of requests would
/// be a flood of log. Refused ones (4xx, 5xx) are logged at INFO, at most
/// [`REFUSALS_PER_SECOND`] a second, with a count of those left out.
/// Server errors (5xx) are also logged at ERROR, each one.
/// A readiness probe's 503 is neither: `/readyz` logs its changes itself
/// ([`super::Readiness`]), not every probe a load balancer sends.
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
