//! One subscriber's stream: replay from the store, then the hub's live feed,
//! joined without a gap or a duplicate.
//!
//! The join is race-free by construction: the subscription joins the hub
//! *before* it reads history, then drops every live event at or below its
//! position and fills any hole above it from the store. Sequence numbers are
//! dense, so "is this the next event?" is a comparison, and a hole is never
//! skipped silently: either the store fills it, or the stream says `reset`.
//!
//! One subscriber's stream, the heart of exactness. It joins the hub and has
//! the store `watch` its topics *before* reading history, and fixes its start
//! positions before the HTTP answer goes out. Then it replays from the store
//! page by page and follows the live feed: events at or below its position
//! are dropped (already sent), the next one is written, and a hole, a new
//! epoch or a `Resync` marks the topic as owing store work, which fills the
//! gap or emits a `reset`. A stream opened by a token ends with `reauth` when
//! the token expires. Store work that fails because the store cannot be
//! reached (`StoreError::Unavailable`) is retried with backoff while the
//! stream stays open and sends heartbeats. Work the store refuses
//! (`StoreError::Rejected`: asking again gets the same answer) is never
//! retried: a refused read after a position falls back to the topic's bounds
//! (a read that takes no position), which reset the topic if the position is
//! what cannot be honoured; otherwise the stream ends (before the answer: a
//! 500 problem). The engine knows no transport: it hands its items (shared
//! events with the hub's chained units, events under a stream's own id,
//! heartbeats, and `Control` items: `Open` with the start the hub chose,
//! `Reset`, `Reauth`, `Farewell`) to a `Wire`, which makes each write
//! (`Wire::Out`) and hears why the stream ended (`Wire::ended`): SSE bytes,
//! WebSocket frames or long-poll entries (`src/transport/`). Ready events are
//! coalesced into one write (up to 64 KiB; a replay page tells the wire its
//! size, `Wire::reserve`, so the buffer is made once), and the buffer goes
//! with the write, so a stream holds none between writes; a lone event is
//! written as the shared frame (or unit) without copying. Heartbeats after
//! `--heartbeat` of silence; the stream ends cleanly on shutdown, and when
//! the node drains, at its instant in the drain window (the heartbeat timer
//! doubles as that alarm) with a `retry:` hint, always between two writes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use smallvec::SmallVec;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;

use crate::coding::Codec;
use crate::compress::Chained;
use crate::drain::Drain;
use crate::event::{Cursor, Event, Position, Topic};
use crate::hub::{Feeds, Hub, Lagged, Live};
use crate::metrics::{EventsSent, Metrics, Resume, StreamEnd};
use crate::store::{History, Store, StoreError};
use crate::transport::Kind;

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
    /// The node's drain: when it begins, the stream picks its moment in the
    /// drain window and ends then, with a `retry:` hint.
    pub drain: Drain,
    /// When the credentials that opened the stream expire: it then sends
    /// `reauth` and ends, and the client reconnects with fresh ones.
    pub expires: Option<tokio::time::Instant>,
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
    /// Why `position` cannot be honoured in a topic with these bounds, if
    /// it cannot.
    fn of(position: Position, history: &History) -> Option<ResetReason> {
        match history.epoch {
            // The topic has no history: a position with an epoch points
            // into one that is gone; one without is ahead.
            None if position.seq == 0 => None,
            None if position.epoch.is_some() => Some(ResetReason::Epoch),
            None => Some(ResetReason::Ahead),
            Some(epoch) if position.epoch.is_some_and(|e| e != epoch) => Some(ResetReason::Epoch),
            Some(_) if position.seq > history.head => Some(ResetReason::Ahead),
            Some(_) if position.seq.saturating_add(1) < history.oldest => {
                Some(ResetReason::Trimmed)
            }
            Some(_) => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            ResetReason::Trimmed => "trimmed",
            ResetReason::Ahead => "ahead",
            ResetReason::Epoch => "epoch",
        }
    }

    fn outcome(self) -> Resume {
        match self {
            ResetReason::Trimmed => Resume::Trimmed,
            ResetReason::Ahead => Resume::Ahead,
            ResetReason::Epoch => Resume::Epoch,
        }
    }
}

pub struct Subscription {
    topics: Vec<Topic>,
    /// Where the stream stands in each topic, read for every live event:
    /// in place for a single topic (no allocation to reach per event).
    places: SmallVec<[Place; 1]>,
    style: IdStyle,
    store: Arc<dyn Store>,
    live: Feeds,
    /// Whether the store confirmed live delivery of every topic to this node.
    watching: bool,
    /// Where to start, until the starting positions are set.
    start: Option<Start>,
    /// Whether the start is the hub's to announce (not the client's cursor).
    announce_start: bool,
    /// Set when store work put off after a failure should be tried now:
    /// the hub asked for a resync, or said the store is back.
    retry_now: bool,
    /// Topics whose resume (a start after a position) has yet to be
    /// counted: at their first page from the store. Empty (no allocation)
    /// unless the stream resumes.
    resuming: Vec<bool>,
    metrics: Metrics,
    /// Events written, counted by transport once the stream runs.
    sent: Option<EventsSent>,
}

/// Where a stream stands in one of its topics.
#[derive(Debug, Clone, Copy, Default)]
struct Place {
    /// The last event sent (or the start).
    position: Position,
    /// Whether the position must be brought up to date from the store.
    pending: bool,
    /// The newest live event seen while pending: the store must have
    /// caught up with it before the topic is in step again.
    wanted: Option<Position>,
}

impl Subscription {
    /// Joins the hub for every topic at once, so that nothing published from
    /// this moment on can be missed. `topics` must be sorted and distinct.
    pub fn open(
        hub: &Hub,
        store: Arc<dyn Store>,
        topics: Vec<Topic>,
        style: IdStyle,
        start: Start,
    ) -> Subscription {
        let live = hub.subscribe_all(&topics);
        let n = topics.len();
        let announce_start = !matches!(start, Start::After(_));
        Subscription {
            places: SmallVec::from_elem(Place::default(), n),
            topics,
            style,
            store,
            live,
            watching: false,
            start: Some(start),
            announce_start,
            retry_now: false,
            resuming: Vec::new(),
            metrics: hub.metrics().clone(),
            sent: None,
        }
    }

    /// Asks the store for live delivery of every topic, then sets the
    /// starting positions. Once this returned `Ok`, the stream holds exactly
    /// the events its start asks for, and everything published afterwards.
    /// When it fails, the stream itself retries.
    pub async fn prepare(&mut self) -> Result<(), StoreError> {
        if !self.watching {
            for topic in &self.topics {
                self.store.watch(topic).await?;
            }
            self.watching = true;
        }
        if let Some(start) = self.start.take() {
            let result = self.set_start(&start).await;
            if result.is_err() {
                self.start = Some(start);
            }
            return result;
        }
        Ok(())
    }

    /// The SSE byte stream: preamble, replay, then live events and
    /// heartbeats until the client leaves, it falls too far behind, or the
    /// hub shuts down. While the store cannot be reached the stream stays
    /// open, sends heartbeats, and retries with backoff; when the store
    /// refuses its work (which asking again cannot change) it ends.
    ///
    /// The stream hands its items (its own bytes, shared events, heartbeats)
    /// to `wire`, which makes each write's bytes: [`crate::transport::plain::Plain`] SSE, or a
    /// content coding (`crate::compress`). A stream that ends (rather than
    /// being dropped) ends with what `wire` finishes with (a gzip trailer).
    pub fn into_stream<W: Wire>(
        mut self,
        settings: StreamSettings,
        mut wire: W,
    ) -> impl Stream<Item = W::Out> {
        // Counted open from here (even if never polled), and its end counted
        // by the last reason set; dropped without one, the client left.
        let mut open = self.metrics.stream(W::TRANSPORT);
        self.sent = Some(self.metrics.sent(W::TRANSPORT));
        // The request's span (made in its handler), named by the stream's
        // log lines: the body does not enter it on every poll.
        let span = tracing::Span::current();
        if let Some(codec) = wire.shares()
            && self.style == IdStyle::Single
        {
            self.live.share(codec);
        }
        async_stream::stream! {
            let mut retry = Backoff::default();
            self.greet(&settings, &mut wire);
            if let Some(bytes) = wire.take() {
                yield bytes;
            }
            let mut pace = Pace::new();
            // One timer per stream: heartbeats, and the alarms of the
            // credentials' expiry and of the drain's closing.
            let heartbeat = tokio::time::sleep_until(pace.alarm(&settings));
            tokio::pin!(heartbeat);
            // One registration with a signal for the stream's life, rather
            // than one per loop turn: first the drain's (which also fires
            // on shutdown), then, once draining, the shutdown's.
            // Polled only once it fired: not a lock per event.
            let mut signal =
                crate::drain::WokenOnly::new(settings.drain.signal().clone().cancelled_owned());
            // Every end but the client's leaving comes out of this loop with
            // its reason, its last words (if any) handed to `wire`.
            let end = loop {
                // Work owed to the store comes first: it only moves forward.
                if self.owes_store_work() && retry.is_ready() {
                    if let Some(end) = self.store_work(&settings, &pace, &mut retry, &mut wire, &span).await {
                        break end;
                    }
                    if let Some(bytes) = wire.take() {
                        yield bytes;
                        pace.wrote();
                    }
                    continue;
                }
                tokio::select! {
                    biased;
                    () = &mut signal => {
                        if settings.shutdown.is_cancelled() {
                            break StreamEnd::Shutdown;
                        }
                        signal.set(settings.shutdown.clone().cancelled_owned());
                        if pace.draining(&settings) {
                            heartbeat.as_mut().reset(pace.alarm(&settings));
                        }
                    }
                    item = self.live.next() => {
                        if let Err(end) = self.take_live(item, &mut wire, &span) {
                            break end;
                        }
                        if let Some(bytes) = wire.take() {
                            yield bytes;
                            pace.wrote();
                        }
                        // A busy stream may never let the heartbeat branch
                        // run: its alarms are checked here as well (expiry
                        // against the last write's time: no clock read per
                        // event).
                        if let Some(end) = pace.end_due(&settings, pace.last_write, &mut wire) {
                            break end;
                        }
                        if std::mem::take(&mut self.retry_now) {
                            // The store is back: retry now, not after the backoff.
                            retry.succeeded();
                        }
                    }
                    () = retry.wait(), if self.owes_store_work() => {}
                    () = &mut heartbeat => {
                        // Ending here, between writes, never cuts an event.
                        let now = tokio::time::Instant::now();
                        if let Some(end) = pace.end_due(&settings, now, &mut wire) {
                            break end;
                        }
                        if pace.heartbeat_due(&settings, now) {
                            wire.heartbeat();
                            if let Some(bytes) = wire.take() {
                                yield bytes;
                            }
                            pace.wrote();
                        }
                        heartbeat.as_mut().reset(pace.alarm(&settings));
                    }
                }
            };
            open.ends(end);
            wire.ended(end);
            // What is still pending (events before a lag or a refusal, the
            // last words) and the coding's end, in one write.
            if let Some(bytes) = wire.finish() {
                yield bytes;
            }
        }
    }

    /// The stream's first item: `Open`, with the reconnection delay and the
    /// start the hub chose (if it did).
    fn greet(&self, settings: &StreamSettings, wire: &mut impl Wire) {
        wire.control(&Control::Open {
            retry: settings.retry,
            start: self.start_id(),
        });
    }

    /// One step of the work owed to the store, unless the stream must end
    /// first (shutdown, its drain instant, its credentials' expiry). A store
    /// that cannot be reached is retried after `retry`'s backoff; one that
    /// refuses the work ends the stream. Returns the end, if it ends.
    async fn store_work(
        &mut self,
        settings: &StreamSettings,
        pace: &Pace,
        retry: &mut Backoff,
        wire: &mut impl Wire,
        span: &tracing::Span,
    ) -> Option<StreamEnd> {
        // (The live path sees shutdown through `select!`; checking the
        // token takes a lock, so only here.)
        if settings.shutdown.is_cancelled() {
            return Some(StreamEnd::Shutdown);
        }
        if let Some(end) = pace.end_due(settings, tokio::time::Instant::now(), wire) {
            return Some(end);
        }
        match self.store_step(wire).await {
            Ok(()) => retry.succeeded(),
            Err(StoreError::Rejected(error)) => {
                tracing::warn!(parent: span, %error, "ending a stream: the store refuses its work");
                return Some(StreamEnd::StoreError);
            }
            Err(error) => {
                // The store logs its own outage once; this is per stream,
                // so it stays at debug.
                tracing::debug!(parent: span, %error, "a stream waits for the store");
                retry.failed();
            }
        }
        None
    }

    /// Hands `first` and whatever else the live feed has ready (up to one
    /// write's worth) to `wire`; a subscriber that fell behind the feed
    /// ends the stream.
    fn take_live(
        &mut self,
        first: (usize, Result<Live, Lagged>),
        wire: &mut impl Wire,
        span: &tracing::Span,
    ) -> Result<(), StreamEnd> {
        let mut lagged = !self.on_live(first, wire);
        while !lagged && wire.pending() < MAX_CHUNK_BYTES {
            match self.live.try_next() {
                Some(item) => lagged = !self.on_live(item, wire),
                None => break,
            }
        }
        if lagged {
            tracing::debug!(parent: span, "ending a stream: the subscriber fell behind the live feed");
            return Err(StreamEnd::SlowConsumer);
        }
        Ok(())
    }

    /// The cursor this stream starts from, when the hub chose it (a start
    /// "now" or at `last=N`, once fixed): what the client should resume
    /// from if it leaves before the first event. A start the client gave
    /// (`Last-Event-ID`) it knows already.
    pub fn start_id(&self) -> Option<String> {
        if !self.announce_start || self.start.is_some() {
            return None;
        }
        let positions: Vec<String> = self
            .places
            .iter()
            .map(|place| place.position.to_string())
            .collect();
        Some(positions.join(","))
    }

    fn owes_store_work(&self) -> bool {
        !self.watching || self.start.is_some() || self.places.iter().any(|place| place.pending)
    }

    /// Does the next piece of work owed to the store: watch, set the
    /// starting positions, or replay one page of one topic.
    async fn store_step(&mut self, wire: &mut impl Wire) -> Result<(), StoreError> {
        if !self.watching || self.start.is_some() {
            return self.prepare().await;
        }
        let Some(i) = self.places.iter().position(|place| place.pending) else {
            return Ok(());
        };
        if self.catch_up_page(i, wire).await? {
            let place = &mut self.places[i];
            place.pending = false;
            if let Some(wanted) = place.wanted.take()
                && wanted.epoch == place.position.epoch
                && wanted.seq > place.position.seq
            {
                // The store is behind its own live feed (a lagging replica):
                // try again shortly rather than skip the event.
                place.pending = true;
                place.wanted = Some(wanted);
                return Err(StoreError::Unavailable(format!(
                    "the store has not yet got event {wanted} of {}",
                    self.topics[i]
                )));
            }
        }
        Ok(())
    }

    /// Sets each topic's starting position.
    async fn set_start(&mut self, start: &Start) -> Result<(), StoreError> {
        // Live events seen so far precede the positions set here.
        for place in &mut self.places {
            place.wanted = None;
        }
        match start {
            Start::After(cursor) => {
                for (place, position) in self.places.iter_mut().zip(&cursor.0) {
                    place.position = *position;
                    place.pending = true;
                }
                self.resuming = vec![true; self.topics.len()];
            }
            Start::Now | Start::Last(_) => {
                let last = if let Start::Last(n) = start { *n } else { 0 };
                for (i, topic) in self.topics.iter().enumerate() {
                    let history = self.store.read(topic, 0, 0).await?;
                    self.places[i].position = match history.epoch {
                        Some(epoch) => {
                            let from = history
                                .head
                                .saturating_sub(last)
                                .max(history.oldest.saturating_sub(1));
                            Position::new(from, epoch)
                        }
                        None => Position::default(),
                    };
                }
                for place in &mut self.places {
                    place.pending = last > 0;
                }
            }
        }
        Ok(())
    }

    /// Replays one page of topic `i` after its position, first emitting a
    /// `reset` if the position cannot be honoured. Returns whether the topic
    /// is caught up with the store.
    async fn catch_up_page(&mut self, i: usize, wire: &mut impl Wire) -> Result<bool, StoreError> {
        loop {
            let position = self.places[i].position;
            let history = match self
                .store
                .read(&self.topics[i], position.seq, REPLAY_PAGE)
                .await
            {
                // The store will never read after this position. If the
                // position is what cannot be honoured, the topic's bounds
                // (a read that takes no position) say so, and it resets
                // like any other; if the store refuses a position it should
                // serve, asking again cannot help.
                Err(StoreError::Rejected(error)) => {
                    let bounds = self.store.read(&self.topics[i], 0, 0).await?;
                    if ResetReason::of(position, &bounds).is_none() {
                        return Err(StoreError::Rejected(error));
                    }
                    bounds
                }
                read => read?,
            };
            let reason = ResetReason::of(position, &history);
            if self.resuming.get_mut(i).is_some_and(std::mem::take) {
                self.metrics
                    .resumed(reason.map_or(Resume::Exact, ResetReason::outcome));
            }
            let Some(epoch) = history.epoch else {
                if let Some(reason) = reason {
                    self.places[i].position = Position::default();
                    self.emit_reset(i, reason, position, None, wire);
                }
                return Ok(true);
            };
            if let Some(reason) = reason {
                self.places[i].position = Position::new(history.oldest.saturating_sub(1), epoch);
                let oldest =
                    (history.oldest <= history.head).then(|| Position::new(history.oldest, epoch));
                self.emit_reset(i, reason, position, oldest, wire);
                continue;
            }
            self.places[i].position.epoch = Some(epoch);
            let page_len = history.events.len();
            if page_len > 1 {
                let page_bytes = history
                    .events
                    .iter()
                    .map(|e| e.frame().len())
                    .sum::<usize>();
                wire.reserve(page_bytes.min(MAX_CHUNK_BYTES));
            }
            let mut replayed = 0;
            for event in &history.events {
                // One write stays within the chunk cap however large the
                // events: the rest of the page is read again next turn.
                if wire.pending() >= MAX_CHUNK_BYTES {
                    self.metrics.replayed(replayed);
                    return Ok(false);
                }
                self.emit(i, event, None, wire);
                replayed += 1;
            }
            self.metrics.replayed(replayed);
            return Ok(page_len < REPLAY_PAGE || self.places[i].position.seq >= history.head);
        }
    }

    /// Handles one item of the live feed. Returns `false` when the
    /// subscriber lagged past the backlog and the stream must end.
    fn on_live(&mut self, (i, item): (usize, Result<Live, Lagged>), wire: &mut impl Wire) -> bool {
        let Ok(live) = item else {
            return false;
        };
        let (event, chained) = match &live {
            Live::Event(event) => (event, None),
            Live::Chained(chained) => (&chained.event, Some(&**chained)),
            Live::Resync => {
                self.places[i].pending = true;
                self.retry_now = true;
                return true;
            }
            Live::StoreBack => {
                self.retry_now = true;
                return true;
            }
        };
        let place = &mut self.places[i];
        if place.pending || self.start.is_some() || !self.watching {
            // The store work owed will cover this event; remember it so that
            // work is not considered done before it has.
            if place
                .wanted
                .is_none_or(|w| w.epoch != Some(event.epoch) || w.seq < event.seq)
            {
                place.wanted = Some(event.position());
            }
            return true;
        }
        let position = place.position;
        let in_step =
            position.epoch == Some(event.epoch) || (position.epoch.is_none() && position.seq == 0);
        if in_step && event.seq <= position.seq {
            // Already sent during replay.
        } else if in_step && Some(event.seq) == position.seq.checked_add(1) {
            if let Some(stamp) = event.take_live_stamp() {
                self.metrics.first_write(stamp);
            }
            self.emit(i, event, chained, wire);
        } else {
            // A hole, or a new epoch: the store knows what happened.
            place.pending = true;
            place.wanted = Some(event.position());
        }
        true
    }

    /// Writes `event` of topic `i`, with the chained units the hub made
    /// for it if it came live.
    fn emit(&mut self, i: usize, event: &Event, chained: Option<&Chained>, wire: &mut impl Wire) {
        self.places[i].position = event.position();
        if let Some(sent) = &self.sent {
            sent.add(1);
        }
        match self.style {
            IdStyle::Single => wire.event(event, chained),
            IdStyle::Multi => {
                let id = self.multi_id(i);
                wire.event_with_id(&id, event);
            }
        }
    }

    fn emit_reset(
        &mut self,
        i: usize,
        reason: ResetReason,
        requested: Position,
        oldest: Option<Position>,
        wire: &mut impl Wire,
    ) {
        self.metrics.reset(reason.outcome());
        let id = match self.style {
            IdStyle::Single => self.places[i].position.to_string(),
            IdStyle::Multi => self.multi_id(i),
        };
        let data = json!({
            "topic": self.topics[i].as_str(),
            "reason": reason.as_str(),
            "requested": requested.to_string(),
            "oldest": oldest.map(|p| p.to_string()),
        });
        wire.control(&Control::Reset { id, data });
    }

    fn multi_id(&self, i: usize) -> String {
        use std::fmt::Write;
        let mut id = String::with_capacity(self.topics[i].as_str().len() + 16 * self.places.len());
        id.push_str(self.topics[i].as_str());
        id.push('/');
        for (n, place) in self.places.iter().enumerate() {
            if n > 0 {
                id.push(',');
            }
            let _ = write!(id, "{}", place.position);
        }
        id
    }
}

/// When a stream's timer should fire: its next heartbeat, or earlier if it
/// closes (draining) or its credentials expire before.
fn alarm(
    heartbeat: tokio::time::Instant,
    closing_at: Option<tokio::time::Instant>,
    expires: Option<tokio::time::Instant>,
) -> tokio::time::Instant {
    [closing_at, expires]
        .into_iter()
        .flatten()
        .fold(heartbeat, std::cmp::Ord::min)
}

/// A stream's timing: when it last wrote and, once draining, when it
/// closes. The heartbeat timer is not re-armed on every write (a timer
/// operation per event per subscriber); when it fires early it is pushed to
/// one quiet period after the last write instead, or to an alarm before.
struct Pace {
    last_write: tokio::time::Instant,
    /// When draining, the moment this stream ends.
    closing_at: Option<tokio::time::Instant>,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            last_write: tokio::time::Instant::now(),
            closing_at: None,
        }
    }

    fn wrote(&mut self) {
        self.last_write = tokio::time::Instant::now();
    }

    /// When the stream's timer should fire next.
    fn alarm(&self, settings: &StreamSettings) -> tokio::time::Instant {
        alarm(
            self.last_write + settings.heartbeat,
            self.closing_at,
            settings.expires,
        )
    }

    /// The drain began: takes this stream's closing instant; whether it has
    /// one (the alarm then moves).
    fn draining(&mut self, settings: &StreamSettings) -> bool {
        self.closing_at = settings.drain.close_at();
        self.closing_at.is_some()
    }

    fn heartbeat_due(&self, settings: &StreamSettings, now: tokio::time::Instant) -> bool {
        now >= self.last_write + settings.heartbeat
    }

    /// The one check of a stream's deadlines: its credentials expired by
    /// `now` (it says `reauth`), or its drain instant has come (it says
    /// farewell, with a retry hint). The end it owes, its last words handed
    /// to `wire`; expiry is checked first. The clock is read for the drain
    /// only while draining.
    fn end_due(
        &self,
        settings: &StreamSettings,
        now: tokio::time::Instant,
        wire: &mut impl Wire,
    ) -> Option<StreamEnd> {
        if settings.expires.is_some_and(|at| at <= now) {
            wire.control(&Control::Reauth);
            return Some(StreamEnd::TokenExpired);
        }
        if self
            .closing_at
            .is_some_and(|at| at <= tokio::time::Instant::now())
        {
            wire.control(&farewell(settings));
            return Some(StreamEnd::Shutdown);
        }
        None
    }
}

/// The last words of a stream closed by the drain: a retry hint, spread
/// over up to `--retry`, so clients closed in the same instant still
/// reconnect (to another node) apart.
fn farewell(settings: &StreamSettings) -> Control {
    Control::Farewell {
        retry: settings.drain.retry_hint(settings.retry),
    }
}

/// When to try the store again after it failed.
#[derive(Default)]
struct Backoff {
    next_try: Option<tokio::time::Instant>,
    delay: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn is_ready(&self) -> bool {
        self.next_try
            .is_none_or(|t| t <= tokio::time::Instant::now())
    }

    fn failed(&mut self) {
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
        self.next_try = Some(tokio::time::Instant::now() + self.delay);
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }

    async fn wait(&self) {
        match self.next_try {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }
}

/// What a stream says besides events: every transport encodes these in its
/// own way (SSE comments and control events, WebSocket frames, long-poll
/// entries).
#[derive(Debug, Clone)]
pub enum Control {
    /// The stream is open. `start` is the cursor it starts from when the
    /// hub chose it (see [`Subscription::start_id`]); `retry` the delay a
    /// client should wait before reconnecting.
    Open {
        retry: Duration,
        start: Option<String>,
    },
    /// The position of one topic could not be honoured: the stream goes on
    /// from `id`. `data` says which topic, why, and what is left.
    Reset { id: String, data: serde_json::Value },
    /// The credentials that opened the stream expired: its last words.
    Reauth,
    /// The node drains: the stream's last words, with the delay to wait
    /// before reconnecting (elsewhere).
    Farewell { retry: Duration },
}

impl Control {
    /// The data of a `reauth`.
    pub fn reauth_data() -> serde_json::Value {
        json!({ "reason": "token-expired" })
    }
}

/// How a stream's items become its writes. The engine hands over what to
/// send, in order, and asks for each write with [`Wire::take`]: SSE bytes
/// (`crate::transport::plain`, `crate::compress`), WebSocket frames
/// (`crate::transport::websocket`) or long-poll entries
/// (`crate::transport::poll`).
pub trait Wire: Send + 'static {
    /// One write.
    type Out: Send + 'static;
    /// The transport it writes for: the `transport` label of the stream's
    /// metrics.
    const TRANSPORT: Kind;
    /// A control item: the stream's opening, a reset, its last words.
    fn control(&mut self, control: &Control);
    /// A heartbeat (an SSE comment, a WebSocket ping).
    fn heartbeat(&mut self);
    /// An event whose frame every single-topic stream of its topic writes,
    /// with the chained units the hub compressed for it, if it came live.
    fn event(&mut self, event: &Event, chained: Option<&Chained>);
    /// An event under this stream's own id (multi-topic streams).
    fn event_with_id(&mut self, id: &str, event: &Event);
    /// Uncompressed bytes waiting for the next write.
    fn pending(&self) -> usize;
    /// The next write, if anything waits.
    fn take(&mut self) -> Option<Self::Out>;
    /// About `bytes` more (a replay page) come before the next write: a
    /// wire that copies them into one buffer can make room once, rather
    /// than grow it event by event.
    fn reserve(&mut self, _bytes: usize) {}
    /// Why the stream ends (not called when the client left): before
    /// [`Wire::finish`].
    fn ended(&mut self, _end: StreamEnd) {}
    /// The last write of a stream that ends: what waits, and the coding's
    /// end (a gzip trailer), if any.
    fn finish(&mut self) -> Option<Self::Out>;
    /// The shared coding whose chained units this stream writes, if any: the
    /// engine asks the hub for them (single-topic streams only).
    fn shares(&self) -> Option<Codec> {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use async_trait::async_trait;
    use tokio_stream::StreamExt;

    use bytes::Bytes;

    use super::*;
    use crate::sse;
    use crate::store::{Appended, MemoryStore, NewEvent, Once, Retention};
    use crate::transport::plain::Plain;

    /// A store that refuses, for good, to read after any position past
    /// `refuse_after`, or every read at all.
    struct Refusing {
        inner: MemoryStore,
        refuse_after: u64,
        refuse_all: AtomicBool,
        reads: AtomicUsize,
    }

    #[async_trait]
    impl Store for Refusing {
        async fn append_once(
            &self,
            events: Vec<(NewEvent, Option<Once>)>,
            window: Duration,
        ) -> Result<Vec<Appended>, StoreError> {
            self.inner.append_once(events, window).await
        }

        async fn read(
            &self,
            topic: &Topic,
            after: u64,
            limit: usize,
        ) -> Result<History, StoreError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            if self.refuse_all.load(Ordering::SeqCst) || after > self.refuse_after {
                return Err(StoreError::Rejected(format!("no read after {after}")));
            }
            self.inner.read(topic, after, limit).await
        }

        async fn put_ticket(
            &self,
            key: &str,
            record: &str,
            ttl: Duration,
        ) -> Result<(), StoreError> {
            self.inner.put_ticket(key, record, ttl).await
        }

        async fn take_ticket(&self, key: &str) -> Result<Option<String>, StoreError> {
            self.inner.take_ticket(key).await
        }
    }

    fn topic() -> Topic {
        Topic::parse("t", 8).unwrap()
    }

    /// A hub and a store holding `t-1` … `t-n`.
    async fn store_with(n: u64, refuse_after: u64) -> (Hub, Arc<Refusing>) {
        let hub = Hub::new(64);
        let retention = Retention {
            max_events: 100,
            max_age: Duration::from_secs(3600),
        };
        let store = Arc::new(Refusing {
            inner: MemoryStore::new(
                hub.clone(),
                retention,
                crate::store::Budget {
                    max_bytes: usize::MAX,
                    max_topics: usize::MAX,
                    max_keys: usize::MAX,
                },
            ),
            refuse_after,
            refuse_all: AtomicBool::new(false),
            reads: AtomicUsize::new(0),
        });
        for i in 1..=n {
            publish(&store, &format!("t-{i}")).await;
        }
        (hub, store)
    }

    async fn publish(store: &Refusing, data: &str) -> Arc<Event> {
        let new = NewEvent {
            topic: topic(),
            name: None,
            data: data.into(),
        };
        store.append(vec![new]).await.unwrap().remove(0)
    }

    fn settings() -> StreamSettings {
        StreamSettings {
            heartbeat: Duration::from_millis(20),
            retry: Duration::from_secs(1),
            shutdown: CancellationToken::new(),
            drain: Drain::new(Duration::ZERO, Duration::ZERO, &CancellationToken::new()),
            expires: None,
        }
    }

    /// Reads `stream` until its text (heartbeats left out) ends with
    /// `wanted`, failing after a few seconds.
    async fn read_until(
        stream: &mut (impl Stream<Item = Bytes> + Unpin),
        text: &mut String,
        wanted: &str,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !text.ends_with(wanted) {
            let chunk = tokio::time::timeout_at(deadline, stream.next())
                .await
                .unwrap_or_else(|_| panic!("no {wanted:?} after {text:?}"))
                .unwrap_or_else(|| panic!("the stream ended before {wanted:?}: {text:?}"));
            if &chunk[..] != sse::HEARTBEAT {
                text.push_str(std::str::from_utf8(&chunk).unwrap());
            }
        }
    }

    #[tokio::test]
    async fn a_position_the_store_refuses_is_reset_from_its_bounds_and_the_stream_goes_on() {
        let (hub, store) = store_with(3, 10).await;
        let epoch = store
            .inner
            .read(&topic(), 0, 0)
            .await
            .unwrap()
            .epoch
            .unwrap();
        let start = Start::After(Cursor(vec![Position {
            seq: 50,
            epoch: None,
        }]));
        let mut subscription =
            Subscription::open(&hub, store.clone(), vec![topic()], IdStyle::Single, start);
        subscription.prepare().await.unwrap();
        let mut stream = Box::pin(
            subscription
                .into_stream(settings(), Plain::default())
                .map(Result::unwrap),
        );
        let mut text = String::new();
        let replayed = format!(
            "retry: 1000\n: crier stream open\n\n\
             id: 0.{epoch}\nevent: reset\n\
             data: {{\"topic\":\"t\",\"reason\":\"ahead\",\"requested\":\"50\",\"oldest\":\"1.{epoch}\"}}\n\n\
             id: 1.{epoch}\ndata: t-1\n\nid: 2.{epoch}\ndata: t-2\n\nid: 3.{epoch}\ndata: t-3\n\n"
        );
        read_until(
            &mut stream,
            &mut text,
            &format!("id: 3.{epoch}\ndata: t-3\n\n"),
        )
        .await;
        assert_eq!(text, replayed);
        publish(&store, "t-4").await;
        read_until(
            &mut stream,
            &mut text,
            &format!("id: 4.{epoch}\ndata: t-4\n\n"),
        )
        .await;
        assert_eq!(text, format!("{replayed}id: 4.{epoch}\ndata: t-4\n\n"));
        // The refused read, the bounds, one page from the start.
        assert_eq!(store.reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_store_that_refuses_every_read_ends_the_stream_instead_of_retrying() {
        let (hub, store) = store_with(3, u64::MAX).await;
        store.refuse_all.store(true, Ordering::SeqCst);
        let start = Start::After(Cursor(vec![Position {
            seq: 1,
            epoch: None,
        }]));
        let mut subscription =
            Subscription::open(&hub, store.clone(), vec![topic()], IdStyle::Single, start);
        subscription.prepare().await.unwrap();
        let stream = subscription
            .into_stream(settings(), Plain::default())
            .map(Result::unwrap);
        let chunks: Vec<Bytes> = tokio::time::timeout(Duration::from_secs(5), stream.collect())
            .await
            .expect("the stream ends");
        assert_eq!(chunks, vec![sse::preamble(1000, None)]);
        // The refused read and the refused bounds; no retry.
        assert_eq!(store.reads.load(Ordering::SeqCst), 2);

        // A start that reads the store is refused before any answer.
        let mut now = Subscription::open(
            &hub,
            store.clone(),
            vec![topic()],
            IdStyle::Single,
            Start::Now,
        );
        assert!(matches!(now.prepare().await, Err(StoreError::Rejected(_))));
    }
}
