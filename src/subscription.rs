//! One subscriber's stream: replay from the store, then the hub's live feed,
//! joined without a gap or a duplicate.
//!
//! The join is race-free by construction: the subscription joins the hub
//! *before* it reads history, then drops every live event at or below its
//! position and fills any hole above it from the store. Sequence numbers are
//! dense, so "is this the next event?" is a comparison, and a hole is never
//! skipped silently: either the store fills it, or the stream says `reset`.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use serde_json::json;
use tokio_stream::{Stream, StreamExt, StreamMap};
use tokio_util::sync::CancellationToken;

use crate::event::{Cursor, Event, Position, RESET_EVENT, Topic};
use crate::hub::{Hub, LiveFeed};
use crate::sse;
use crate::store::{Store, StoreError};

/// Events read from the store per round trip while replaying.
const REPLAY_PAGE: usize = 128;
/// A chunk stops absorbing ready events past this size, so one write stays
/// bounded however far behind the subscriber is.
const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// Where a new subscription starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Only events published from now on.
    Now,
    /// The `n` most recent retained events of each topic, then live ones.
    Last(u64),
    /// Every retained event after this cursor (from `Last-Event-ID`).
    After(Cursor),
}

/// How event ids are written on this stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdStyle {
    /// `SEQ.EPOCH`: the stream has one topic, named by its URL.
    Single,
    /// `TOPIC/POS,POS,…`: the event's topic, then the position in every
    /// topic of the subscription, in sorted topic order.
    Multi,
}

/// Settings every stream shares.
#[derive(Clone)]
pub struct StreamSettings {
    pub heartbeat: Duration,
    pub retry: Duration,
    pub shutdown: CancellationToken,
}

/// Why a subscriber's position could not be honoured.
#[derive(Debug, Clone, Copy)]
enum ResetReason {
    /// The position is older than the oldest retained event.
    Trimmed,
    /// The position is ahead of the newest event.
    Ahead,
    /// The position belongs to an earlier incarnation of the topic.
    Epoch,
}

impl ResetReason {
    fn as_str(self) -> &'static str {
        match self {
            ResetReason::Trimmed => "trimmed",
            ResetReason::Ahead => "ahead",
            ResetReason::Epoch => "epoch",
        }
    }
}

pub struct Subscription {
    topics: Vec<Topic>,
    positions: Vec<Position>,
    style: IdStyle,
    store: Arc<dyn Store>,
    live: StreamMap<usize, LiveFeed>,
}

impl Subscription {
    /// Joins the hub for every topic at once, so that nothing published from
    /// this moment on can be missed. `topics` must be sorted and distinct.
    pub fn open(
        hub: &Hub,
        store: Arc<dyn Store>,
        topics: Vec<Topic>,
        style: IdStyle,
    ) -> Subscription {
        let mut live = StreamMap::with_capacity(topics.len());
        for (i, topic) in topics.iter().enumerate() {
            live.insert(i, hub.subscribe(topic));
        }
        Subscription {
            positions: vec![Position::default(); topics.len()],
            topics,
            style,
            store,
            live,
        }
    }

    /// The SSE byte stream: preamble, replay, then live events and
    /// heartbeats until the client leaves, it falls too far behind, or the
    /// hub shuts down.
    pub fn into_stream(
        mut self,
        start: Start,
        settings: StreamSettings,
    ) -> impl Stream<Item = Bytes> {
        async_stream::stream! {
            let mut chunk = Chunk::default();
            yield sse::preamble(settings.retry.as_millis() as u64);

            if let Err(error) = self.start(start).await {
                tracing::warn!(%error, "ending a stream: replay failed");
                return;
            }
            for i in 0..self.topics.len() {
                loop {
                    if settings.shutdown.is_cancelled() { return; }
                    match self.catch_up_page(i, &mut chunk).await {
                        Ok(done) => {
                            if let Some(bytes) = chunk.take() { yield bytes; }
                            if done { break; }
                        }
                        Err(error) => {
                            tracing::warn!(%error, "ending a stream: replay failed");
                            return;
                        }
                    }
                }
            }

            let heartbeat = tokio::time::sleep(settings.heartbeat);
            tokio::pin!(heartbeat);
            loop {
                tokio::select! {
                    biased;
                    _ = settings.shutdown.cancelled() => return,
                    item = self.live.next() => {
                        let Some((i, Ok(event))) = item else {
                            tracing::debug!("ending a stream: the subscriber fell behind the live feed");
                            return;
                        };
                        let mut outcome = self.on_live(i, event, &mut chunk).await;
                        while outcome.is_ok() && chunk.len() < MAX_CHUNK_BYTES {
                            match self.live.next().now_or_never() {
                                Some(Some((i, Ok(event)))) => outcome = self.on_live(i, event, &mut chunk).await,
                                Some(_) => { outcome = Err(End::Lagged); }
                                None => break,
                            }
                        }
                        if let Some(bytes) = chunk.take() {
                            yield bytes;
                            heartbeat.as_mut().reset(tokio::time::Instant::now() + settings.heartbeat);
                        }
                        if let Err(end) = outcome {
                            tracing::debug!(?end, "ending a stream");
                            return;
                        }
                    }
                    _ = &mut heartbeat => {
                        yield Bytes::from_static(sse::HEARTBEAT);
                        heartbeat.as_mut().reset(tokio::time::Instant::now() + settings.heartbeat);
                    }
                }
            }
        }
    }

    /// Sets each topic's starting position.
    async fn start(&mut self, start: Start) -> Result<(), StoreError> {
        match start {
            Start::After(cursor) => self.positions = cursor.0,
            Start::Now | Start::Last(_) => {
                let last = if let Start::Last(n) = start { n } else { 0 };
                for (i, topic) in self.topics.iter().enumerate() {
                    let history = self.store.read(topic, 0, 0).await?;
                    if let Some(epoch) = history.epoch {
                        let from = history.head.saturating_sub(last).max(history.oldest - 1);
                        self.positions[i] = Position::new(from, epoch);
                    }
                }
            }
        }
        Ok(())
    }

    /// Replays one page of topic `i` after its position, first emitting a
    /// `reset` if the position cannot be honoured. Returns whether the topic
    /// is caught up with the store.
    async fn catch_up_page(&mut self, i: usize, chunk: &mut Chunk) -> Result<bool, StoreError> {
        loop {
            let position = self.positions[i];
            let history = self
                .store
                .read(&self.topics[i], position.seq, REPLAY_PAGE)
                .await?;
            let Some(epoch) = history.epoch else {
                if position.seq > 0 {
                    self.positions[i] = Position::default();
                    self.emit_reset(i, ResetReason::Ahead, position, None, chunk);
                }
                return Ok(true);
            };
            let reason = if position.epoch.is_some_and(|e| e != epoch) {
                Some(ResetReason::Epoch)
            } else if position.seq > history.head {
                Some(ResetReason::Ahead)
            } else if position.seq.saturating_add(1) < history.oldest {
                Some(ResetReason::Trimmed)
            } else {
                None
            };
            if let Some(reason) = reason {
                self.positions[i] = Position::new(history.oldest - 1, epoch);
                let oldest =
                    (history.oldest <= history.head).then(|| Position::new(history.oldest, epoch));
                self.emit_reset(i, reason, position, oldest, chunk);
                continue;
            }
            self.positions[i].epoch = Some(epoch);
            let page_len = history.events.len();
            for event in &history.events {
                self.emit(i, event, chunk);
            }
            return Ok(page_len < REPLAY_PAGE || self.positions[i].seq >= history.head);
        }
    }

    /// Handles one event from the live feed of topic `i`.
    async fn on_live(&mut self, i: usize, event: Arc<Event>, chunk: &mut Chunk) -> Result<(), End> {
        let position = self.positions[i];
        let in_step =
            position.epoch == Some(event.epoch) || (position.epoch.is_none() && position.seq == 0);
        if in_step && event.seq <= position.seq {
            return Ok(()); // already sent during replay
        }
        if in_step && event.seq == position.seq + 1 {
            self.emit(i, &event, chunk);
            return Ok(());
        }
        // A hole, or a new epoch: the store knows what happened.
        while !self.catch_up_page(i, chunk).await.map_err(End::Store)? {}
        let position = self.positions[i];
        if position.epoch == Some(event.epoch) && event.seq > position.seq {
            // The store is behind its own live feed; let the client retry.
            return Err(End::StoreBehind);
        }
        Ok(())
    }

    fn emit(&mut self, i: usize, event: &Event, chunk: &mut Chunk) {
        self.positions[i] = event.position();
        match self.style {
            IdStyle::Single => chunk.push_shared(event.frame()),
            IdStyle::Multi => {
                let id = self.multi_id(i);
                chunk.push_with_id(&id, &event.body());
            }
        }
    }

    fn emit_reset(
        &mut self,
        i: usize,
        reason: ResetReason,
        requested: Position,
        oldest: Option<Position>,
        chunk: &mut Chunk,
    ) {
        let id = match self.style {
            IdStyle::Single => self.positions[i].to_string(),
            IdStyle::Multi => self.multi_id(i),
        };
        let data = json!({
            "topic": self.topics[i].as_str(),
            "reason": reason.as_str(),
            "requested": requested.to_string(),
            "oldest": oldest.map(|p| p.to_string()),
        });
        chunk.push_shared(&sse::encode_control(&id, RESET_EVENT, &data));
    }

    fn multi_id(&self, i: usize) -> String {
        use std::fmt::Write;
        let mut id =
            String::with_capacity(self.topics[i].as_str().len() + 16 * self.positions.len());
        id.push_str(self.topics[i].as_str());
        id.push('/');
        for (n, p) in self.positions.iter().enumerate() {
            if n > 0 {
                id.push(',');
            }
            let _ = write!(id, "{p}");
        }
        id
    }
}

#[derive(Debug)]
enum End {
    Lagged,
    Store(#[allow(dead_code)] StoreError),
    StoreBehind,
}

/// The bytes of one write. A single ready frame is passed on as the shared
/// `Bytes` it already is; several are copied into one buffer so the socket
/// sees one write.
#[derive(Default)]
struct Chunk {
    single: Option<Bytes>,
    buf: BytesMut,
}

impl Chunk {
    fn len(&self) -> usize {
        self.single.as_ref().map_or(0, Bytes::len) + self.buf.len()
    }

    fn push_shared(&mut self, frame: &Bytes) {
        if self.single.is_none() && self.buf.is_empty() {
            self.single = Some(frame.clone());
        } else {
            self.spill();
            self.buf.extend_from_slice(frame);
        }
    }

    fn push_with_id(&mut self, id: &str, body: &[u8]) {
        self.spill();
        sse::put_id(&mut self.buf, id);
        self.buf.extend_from_slice(body);
    }

    fn spill(&mut self) {
        if let Some(single) = self.single.take() {
            self.buf.extend_from_slice(&single);
        }
    }

    fn take(&mut self) -> Option<Bytes> {
        if let Some(single) = self.single.take() {
            debug_assert!(self.buf.is_empty());
            return Some(single);
        }
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }
}
