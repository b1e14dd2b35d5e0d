//! Sends gRPC calls to the gRPC router (`crate::grpc::routes`) before any
//! HTTP layer but the trace, everything else on to the HTTP routes. Knows
//! nothing of either: a header test and a fork.

use std::convert::Infallible;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::{Version, header};
use axum::response::Response;
use futures_util::future::Either;
use tower::{Layer, Service};

/// Whether `request` is a gRPC call: HTTP/2 with a gRPC content type
/// (gRPC-Web, which browsers send over HTTP/1.1 too, is not).
pub fn is_grpc<B>(request: &axum::http::Request<B>) -> bool {
    request.version() == Version::HTTP_2
        && request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v == "application/grpc"
                    || v.starts_with("application/grpc+")
                    || v.starts_with("application/grpc;")
            })
}

/// Puts [`Dispatch`] in front of the HTTP services (without a gRPC
/// router, it sends everything on).
#[derive(Clone)]
pub struct DispatchLayer(pub Option<axum::Router>);

impl<S> Layer<S> for DispatchLayer {
    type Service = Dispatch<S>;

    fn layer(&self, http: S) -> Dispatch<S> {
        Dispatch {
            http,
            grpc: self.0.clone(),
        }
    }
}

/// Sends gRPC calls to `grpc`, everything else on to `http`.
#[derive(Clone)]
pub struct Dispatch<S> {
    http: S,
    grpc: Option<axum::Router>,
}

impl<S> Service<Request> for Dispatch<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<<axum::Router as Service<Request>>::Future, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.http.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match &mut self.grpc {
            Some(grpc) if is_grpc(&request) => Either::Left(grpc.call(request)),
            _ => Either::Right(self.http.call(request)),
        }
    }
}
