//! The one place where errors become gRPC statuses: a status code per kind
//! of problem (exhaustive, so a new kind cannot silently become one), the
//! problem's detail as the message, and its stable `type` in the details
//! (`google.rpc.ErrorInfo`: reason the type's last part, domain `crier`,
//! metadata `type` the whole URN), with `google.rpc.RetryInfo` when waiting
//! helps (rates, caps, a full store).

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::AuthError;
use crate::http::ApiError;
use crate::limits::LimitError;
use crate::store::StoreError;

/// The domain of crier's `ErrorInfo`.
pub const DOMAIN: &str = "crier";

/// The status code of `error`.
pub fn code(error: &ApiError) -> Code {
    match error {
        ApiError::InvalidTopic { .. }
        | ApiError::InvalidEventName(_)
        | ApiError::PayloadTooLarge { .. }
        | ApiError::EncodedTooLarge { .. }
        | ApiError::NotUtf8
        | ApiError::UnreadableBody(_)
        | ApiError::InvalidPosition { .. }
        | ApiError::InvalidParameter { .. }
        | ApiError::NoTopic
        | ApiError::TooManyTopics { .. }
        | ApiError::InvalidIdempotencyKey { .. }
        | ApiError::MalformedBatch(_)
        | ApiError::BatchTooLong { .. }
        | ApiError::MalformedTicketRequest(_)
        | ApiError::BadUpgrade(_)
        | ApiError::MalformedFrame(_)
        | ApiError::WebSocketVersion
        | ApiError::RepeatedHeader(_)
        | ApiError::Limit(LimitError::BatchOverBurst { .. }) => Code::InvalidArgument,
        // The key is bound to another event: asking again cannot help.
        ApiError::KeyReused
        | ApiError::BatchKeyReused { .. }
        | ApiError::Store(StoreError::KeyReused { .. }) => Code::FailedPrecondition,
        // Asking again cannot help; sending the topics apart can.
        ApiError::Store(StoreError::SpansPartitions) => Code::FailedPrecondition,
        ApiError::MethodNotAllowed { .. } => Code::Unimplemented,
        ApiError::NotFound(_) => Code::NotFound,
        ApiError::BodyTimeout(_) => Code::DeadlineExceeded,
        ApiError::Store(StoreError::Unavailable(_) | StoreError::Stalled(_))
        | ApiError::Draining => Code::Unavailable,
        ApiError::Store(StoreError::Rejected(_) | StoreError::Config(_)) => Code::Internal,
        ApiError::Store(StoreError::Full(_))
        | ApiError::Limit(LimitError::Streams { .. } | LimitError::PublishRate { .. }) => {
            Code::ResourceExhausted
        }
        ApiError::Auth(
            AuthError::Missing
            | AuthError::Token(_)
            | AuthError::Ticket(_)
            | AuthError::TicketExpired,
        ) => Code::Unauthenticated,
        ApiError::Auth(
            AuthError::NotGranted { .. } | AuthError::Origin(_) | AuthError::MetricsNotGranted,
        ) => Code::PermissionDenied,
        ApiError::Auth(AuthError::TicketsDisabled) => Code::FailedPrecondition,
        // Only the accept loop refuses a connection, before any gRPC call.
        ApiError::ConnectionRefused(_) => Code::ResourceExhausted,
    }
}

/// How long to wait before trying again, when waiting helps.
fn retry_after(error: &ApiError) -> Option<Duration> {
    match error {
        ApiError::Limit(limit @ (LimitError::Streams { .. } | LimitError::PublishRate { .. })) => {
            Some(limit.retry_after().max(Duration::from_secs(1)))
        }
        ApiError::Store(StoreError::Full(_)) => Some(Duration::from_secs(10)),
        _ => None,
    }
}

/// `error` as a status.
pub fn status(error: &ApiError) -> Status {
    let problem = error.problem();
    let urn = problem["type"].as_str().unwrap_or_default().to_owned();
    let reason = urn.rsplit(':').next().unwrap_or_default().to_owned();
    let mut details = ErrorDetails::new();
    details.set_error_info(reason, DOMAIN, HashMap::from([("type".to_owned(), urn)]));
    if let Some(delay) = retry_after(error) {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(code(error), error.to_string(), details)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_refusal_is_resource_exhausted_with_its_type_and_retry_info() {
        let error = ApiError::Limit(LimitError::PublishRate {
            per_second: 1,
            retry_after: Duration::from_millis(2500),
        });
        let status = status(&error);
        assert_eq!(status.code(), Code::ResourceExhausted);
        let details = status.get_error_details();
        let info = details.error_info().expect("error info");
        assert_eq!(info.reason, "publish-rate");
        assert_eq!(info.domain, DOMAIN);
        assert_eq!(info.metadata["type"], "urn:crier:problem:publish-rate");
        assert_eq!(
            details.retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_millis(2500))
        );
    }

    #[test]
    fn a_missing_token_is_unauthenticated_and_an_outage_unavailable() {
        assert_eq!(
            code(&ApiError::Auth(AuthError::Missing)),
            Code::Unauthenticated
        );
        assert_eq!(
            code(&ApiError::Store(StoreError::Unavailable("down".into()))),
            Code::Unavailable
        );
        assert!(
            status(&ApiError::NoTopic)
                .get_error_details()
                .retry_info()
                .is_none()
        );
    }
}
