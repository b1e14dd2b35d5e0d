//! The HTTP edge of the limits: which client a request comes from (its peer,
//! or the address `--client-ip-header` names when the peer is a trusted
//! proxy), and a cap on
//! its concurrent requests whose count is held by the response body, so an
//! event stream counts until it really ends.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::{ApiError, AppState};
use crate::limits::Slot;
use crate::server::connection::{Activity, Peer, StreamActivity};

/// Wraps the routes in [`HoldStream`].
#[derive(Clone)]
pub struct HoldStreamLayer(pub AppState);

impl<S> Layer<S> for HoldStreamLayer {
    type Service = HoldStream<S>;

    fn layer(&self, inner: S) -> HoldStream<S> {
        HoldStream {
            inner,
            state: self.0.clone(),
        }
    }
}

/// Names the request's client and counts the request against its cap until
/// the response body is dropped. (A tower service rather than `from_fn`
/// middleware, for the reason given in [`super::edge`].)
#[derive(Clone)]
pub struct HoldStream<S> {
    inner: S,
    state: AppState,
}

impl<S> Service<Request> for HoldStream<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = HoldFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let Some(Peer(peer)) = request.extensions().get::<Peer>().copied() else {
            // Served without the accept loop (never in the binary): no peer to
            // count against.
            return HoldFuture::Routed {
                future: self.inner.call(request),
                held: None,
            };
        };
        let named = self.state.limits.settings().client_ip_header.name();
        let forwarded_by = joined(request.headers().get_all(named));
        let client = self
            .state
            .limits
            .client_of(peer.ip(), forwarded_by.as_deref());
        request.extensions_mut().insert(client);
        let slot = match self.state.limits.open_stream(client) {
            Ok(slot) => Arc::new(slot),
            Err(error) => {
                return HoldFuture::Refused {
                    response: Some(ApiError::from(error).into_response()),
                };
            }
        };
        // A WebSocket outlives its handshake's answer: its task holds the slot
        // too.
        request.extensions_mut().insert(HeldSlot(slot.clone()));
        let activity = request
            .extensions()
            .get::<Arc<Activity>>()
            .map(Activity::open);
        HoldFuture::Routed {
            future: self.inner.call(request),
            held: Some((slot, activity)),
        }
    }
}

pin_project! {
    #[project = HoldProj]
    pub enum HoldFuture<F> {
        Routed {
            #[pin]
            future: F,
            // What the answer's body holds, if the request was counted.
            held: Option<(Arc<Slot>, Option<StreamActivity>)>,
        },
        Refused { response: Option<Response> },
    }
}

impl<F> Future for HoldFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            HoldProj::Routed { future, held } => {
                let Ok(response) = ready!(future.poll(cx));
                let Some((slot, activity)) = held.take() else {
                    return Poll::Ready(Ok(response));
                };
                // An event stream's body holds the slot and activity itself.
                if response.extensions().get::<BodyHoldsSlot>().is_some() {
                    return Poll::Ready(Ok(response));
                }
                Poll::Ready(Ok(response.map(|body| {
                    Body::new(Held {
                        inner: body,
                        _slot: slot,
                        activity,
                    })
                })))
            }
            HoldProj::Refused { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
        }
    }
}

/// A header that may be repeated, as one comma-separated value. A line
/// that is not visible ASCII becomes an empty element, which no address
/// parses from: the whole value is then malformed.
fn joined(values: axum::http::header::GetAll<'_, axum::http::HeaderValue>) -> Option<String> {
    let parts: Vec<&str> = values.iter().map(|v| v.to_str().unwrap_or("")).collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// The request's share of its client's cap, for a task that outlives the
/// answer (a WebSocket's) or a body that holds it itself (an event
/// stream's): released when the answer and they are done.
#[derive(Clone)]
pub struct HeldSlot(#[allow(dead_code)] Arc<Slot>);

/// Marks a response whose body holds the request's [`HeldSlot`] and, on
/// HTTP/2, its stream's activity itself (an event stream: the connection
/// polls its body for every event, and each wrapper around it is one more
/// object to reach per event). [`HoldStream`] then leaves the body as it
/// is.
#[derive(Clone, Copy)]
pub struct BodyHoldsSlot;

/// A response body that holds the request's counts until it is dropped.
struct Held {
    inner: Body,
    _slot: Arc<Slot>,
    /// On HTTP/2: the stream's share of its connection's activity, told
    /// each time hyper asks for more (a starved stream is never asked).
    activity: Option<StreamActivity>,
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Some(activity) = &self.activity {
            activity.polled();
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
