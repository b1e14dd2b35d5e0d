//! `Connect`, the bidirectional stream: what a WebSocket does, for
//! services. The client subscribes (each `subscribe` a subscription of its
//! own, answered with its items under the message's `reference`),
//! unsubscribes (the same topics as a subscription's, which ends it), and
//! publishes (answered by an `ack` or a `problem` under its `reference`).
//! Every message goes through the same checks as the unary calls, with the
//! call's metadata. A subscription that ends (the node drains, the token
//! expired, the reader fell behind) ends the whole call with its status,
//! after its last item, as it would end a WebSocket: reconnect and
//! subscribe again with the last ids.

use std::collections::HashMap;
use std::pin::Pin;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt, StreamMap};
use tonic::metadata::MetadataMap;
use tonic::{Status, Streaming};

use super::{Face, SubscribeStream, proto};
use crate::http::ApiError;
use crate::transport::Kind;
use crate::transport::grpc::Encoded;
use proto::{client_message, server_message};

/// A call's outgoing messages.
pub type Outgoing = Pin<Box<dyn Stream<Item = Result<proto::ServerMessage, Status>> + Send>>;

/// Messages waiting for the client, per call.
const QUEUE: usize = 64;

/// Serves one call until the client leaves, a subscription ends it, or its
/// deadline (`grpc-timeout`) passes.
pub fn serve(
    face: Face,
    metadata: MetadataMap,
    extensions: axum::http::Extensions,
    inbound: Streaming<proto::ClientMessage>,
) -> Outgoing {
    let (tx, rx) = mpsc::channel(QUEUE);
    let deadline = super::deadline(&metadata).map(|limit| tokio::time::Instant::now() + limit);
    tokio::spawn(run(face, metadata, extensions, inbound, tx, deadline));
    Box::pin(ReceiverStream::new(rx))
}

type Sender = mpsc::Sender<Result<proto::ServerMessage, Status>>;

fn message(reference: &str, message: server_message::Message) -> proto::ServerMessage {
    proto::ServerMessage {
        reference: reference.to_owned(),
        message: Some(message),
    }
}

/// The problem of `error`, as an HTTP answer's body carries it.
fn problem(face: &Face, error: &ApiError) -> server_message::Message {
    face.state.metrics.refused(error.refusal());
    let problem = error.problem();
    server_message::Message::Problem(proto::Problem {
        r#type: problem["type"].as_str().unwrap_or_default().to_owned(),
        title: problem["title"].as_str().unwrap_or_default().to_owned(),
        status: problem["status"].as_u64().unwrap_or_default() as u32,
        detail: problem["detail"].as_str().unwrap_or_default().to_owned(),
    })
}

/// One message of the call as a call of its own, with the call's metadata.
fn request<T>(
    metadata: &MetadataMap,
    extensions: &axum::http::Extensions,
    message: T,
) -> tonic::Request<T> {
    tonic::Request::from_parts(metadata.clone(), extensions.clone(), message)
}

/// A subscription's key: its topics, sorted and distinct.
fn key_of(topics: &[String]) -> Vec<String> {
    let mut key = topics.to_vec();
    key.sort();
    key.dedup();
    key
}

async fn run(
    face: Face,
    metadata: MetadataMap,
    extensions: axum::http::Extensions,
    mut inbound: Streaming<proto::ClientMessage>,
    tx: Sender,
    deadline: Option<tokio::time::Instant>,
) {
    let expired = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let mut subscriptions: StreamMap<Vec<String>, SubscribeStream> = StreamMap::new();
    let mut references: HashMap<Vec<String>, String> = HashMap::new();
    let mut reading = true;
    loop {
        let answer = tokio::select! {
            next = inbound.message(), if reading => match next {
                Ok(Some(proto::ClientMessage { reference, message: Some(m) })) => match m {
                    client_message::Message::Subscribe(subscribe) => {
                        let key = key_of(&subscribe.topics);
                        match face.subscribe(request(&metadata, &extensions, subscribe)).await {
                            Ok(stream) => {
                                references.insert(key.clone(), reference);
                                // Subscribing to the same topics again
                                // replaces the subscription.
                                subscriptions.insert(key, stream);
                                None
                            }
                            Err(error) => {
                                face.state.metrics.subscribe_refused(Kind::Grpc);
                                Some(Ok(message(&reference, problem(&face, &error))))
                            }
                        }
                    }
                    client_message::Message::Unsubscribe(unsubscribe) => {
                        let key = key_of(&unsubscribe.topics);
                        subscriptions.remove(&key);
                        references.remove(&key);
                        None
                    }
                    client_message::Message::Publish(publish) => {
                        let answer = match face.publish(request(&metadata, &extensions, publish)).await {
                            Ok(reply) => server_message::Message::Ack(reply),
                            Err(error) => problem(&face, &error),
                        };
                        Some(Ok(message(&reference, answer)))
                    }
                },
                Ok(Some(proto::ClientMessage { message: None, .. })) => Some(Err(
                    Status::invalid_argument("a client message names subscribe, unsubscribe or publish"),
                )),
                Ok(None) => {
                    // No more requests; the subscriptions go on.
                    reading = false;
                    if subscriptions.is_empty() {
                        return;
                    }
                    None
                }
                Err(status) => Some(Err(status)),
            },
            Some((key, item)) = subscriptions.next(), if !subscriptions.is_empty() => {
                let reference = references.get(&key).map_or("", String::as_str);
                match item {
                    Ok(Encoded(bytes)) => match proto::Item::decode(bytes) {
                        Ok(item) => Some(Ok(message(reference, server_message::Message::Item(item)))),
                        Err(error) => Some(Err(Status::internal(error.to_string()))),
                    },
                    Err(status) => Some(Err(status)),
                }
            }
            () = tx.closed() => return,
            () = &mut expired => Some(Err(super::deadline_exceeded())),
        };
        let Some(answer) = answer else {
            if !reading && subscriptions.is_empty() {
                return;
            }
            continue;
        };
        let ends = answer.is_err();
        if tx.send(answer).await.is_err() || ends {
            return;
        }
    }
}
