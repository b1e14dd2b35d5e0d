//! What every request passes on its way in and out, around CORS and the
//! routes: the `Origin` check ([`super::access`]) first; on the way back,
//! refusals counted by reason ([`super::metrics`]), and `Connection: close`
//! on a refused request whose body may be unread.
//!
//! A tower service written out rather than axum `from_fn` middleware: each
//! `from_fn` layer boxes its future, boxes the rest of the stack into its
//! `Next` and clones it, per request. Stream setup is the hub's costliest
//! request (a reconnect storm or a connection flood is thousands of them a
//! second), and these layers are plain checks that need none of that.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::http::{HeaderValue, Version, header};
use axum::response::{IntoResponse, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::AppState;
use crate::metrics::Refusal;

/// Wraps the routes (and CORS) in [`Edge`].
#[derive(Clone)]
pub struct EdgeLayer(pub AppState);

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            state: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    state: AppState,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let has_body = may_have_unread_body(&request);
        let answer = match super::access::check_origin(&self.state, &mut request) {
            Ok(()) => Routing::Routed {
                future: self.inner.call(request),
            },
            Err(refused) => Routing::Refused {
                response: Some(refused.into_response()),
            },
        };
        EdgeFuture {
            answer,
            state: self.state.clone(),
            has_body,
        }
    }
}

pin_project! {
    pub struct EdgeFuture<F> {
        #[pin]
        answer: Routing<F>,
        state: AppState,
        has_body: bool,
    }
}

pin_project! {
    #[project = RoutingProj]
    enum Routing<F> {
        Routed { #[pin] future: F },
        Refused { response: Option<Response> },
    }
}

impl<F> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.answer.project() {
            RoutingProj::Routed { future } => match ready!(future.poll(cx)) {
                Ok(response) => response,
            },
            RoutingProj::Refused { response } => response.take().expect("polled after completion"),
        };
        if let Some(reason) = response.extensions().get::<Refusal>() {
            this.state.metrics.refused(*reason);
        }
        let refused = response.status().is_client_error() || response.status().is_server_error();
        if *this.has_body && refused {
            // hyper closes the connection after this answer (the body may
            // be unread): the answer says so, so a keep-alive client does
            // not send its next request into a closing socket.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Poll::Ready(Ok(response))
    }
}

/// A request refused with its body perhaps unread (a bad topic is refused
/// before the body is looked at) cannot be followed by another on its
/// HTTP/1.1 connection. (HTTP/2 streams are independent; nothing to say
/// there.)
fn may_have_unread_body(request: &Request) -> bool {
    let headers = request.headers();
    request.version() < Version::HTTP_2
        && (headers.contains_key(header::TRANSFER_ENCODING)
            || headers
                .get(header::CONTENT_LENGTH)
                .is_some_and(|length| length.as_bytes() != b"0"))
}
