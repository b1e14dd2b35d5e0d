//! `grpc.health.v1.Health`, answering what `/readyz` answers: `SERVING`
//! while the node is not draining and its store can be reached, for the
//! whole server (`""`) and for `crier.v1.Crier`; `NOT_FOUND` for any other
//! service name.

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use crate::http::AppState;

/// How often a `Watch` call looks again.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The service names this server answers for.
const SERVICES: [&str; 2] = ["", "crier.v1.Crier"];

pub fn service(state: AppState) -> HealthServer<HealthService> {
    HealthServer::new(HealthService { state })
}

pub struct HealthService {
    state: AppState,
}

impl HealthService {
    fn known(request: &HealthCheckRequest) -> Result<(), Status> {
        if SERVICES.contains(&request.service.as_str()) {
            Ok(())
        } else {
            Err(Status::not_found(format!(
                "unknown service `{}`",
                request.service
            )))
        }
    }
}

async fn status(state: &AppState) -> HealthCheckResponse {
    let status = match crate::http::ready(state).await {
        Ok(()) => ServingStatus::Serving,
        Err(_) => ServingStatus::NotServing,
    };
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        HealthService::known(request.get_ref())?;
        Ok(Response::new(status(&self.state).await))
    }

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        HealthService::known(request.get_ref())?;
        let state = self.state.clone();
        let stream = async_stream::stream! {
            let mut last = None;
            let mut tick = tokio::time::interval(WATCH_EVERY);
            loop {
                tokio::select! {
                    () = state.shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let now = status(&state).await;
                if last != Some(now.status) {
                    last = Some(now.status);
                    yield Ok(now);
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}
