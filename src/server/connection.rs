//! What a connection tells the requests it carries (as request extensions):
//! its peer, its HTTP/2 activity (open streams, and when hyper last polled
//! each one's body), and the hold that keeps a graceful shutdown waiting
//! for a WebSocket it upgraded to. The accept loop (`server`) makes them;
//! handlers read them. No I/O.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::server::graceful::Watcher;

/// The peer of the connection a request came on (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// An HTTP/1.1 connection's hold on graceful shutdown, handed to the
/// WebSocket it upgrades to (a request extension of upgrade requests).
/// hyper's connection ends once it hands the socket over; without this the
/// server would return as soon as the other connections were done, and
/// the hub cut every socket at once instead of closing each at its moment
/// of the drain window.
#[derive(Clone)]
pub struct ConnectionHold(#[allow(dead_code)] pub(crate) Arc<Watcher>);

/// How many streams an HTTP/2 connection has open, since when none, and
/// when hyper last asked each open stream's body for more.
pub struct Activity {
    /// The instants below are milliseconds after this one.
    epoch: tokio::time::Instant,
    state: std::sync::Mutex<ActivityState>,
}

struct ActivityState {
    open: usize,
    since: tokio::time::Instant,
    /// Per open stream, when its body was last polled.
    streams: std::collections::HashMap<u64, Arc<AtomicU64>>,
    next_id: u64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        let now = tokio::time::Instant::now();
        Activity {
            epoch: now,
            state: std::sync::Mutex::new(ActivityState {
                open: 0,
                since: now,
                streams: std::collections::HashMap::new(),
                next_id: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn millis_now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a stream as open until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> StreamActivity {
        let polled = Arc::new(AtomicU64::new(self.millis_now()));
        let mut state = self.lock();
        state.open += 1;
        let id = state.next_id;
        state.next_id += 1;
        state.streams.insert(id, polled.clone());
        StreamActivity {
            activity: self.clone(),
            id,
            polled,
        }
    }

    /// Resolves once no stream has been open for `timeout`.
    pub(crate) async fn idle_for(&self, timeout: Duration) {
        loop {
            let (open, since) = {
                let state = self.lock();
                (state.open, state.since)
            };
            let now = tokio::time::Instant::now();
            if open == 0 && now >= since + timeout {
                return;
            }
            let wake = if open == 0 {
                since + timeout
            } else {
                now + timeout
            };
            tokio::time::sleep_until(wake).await;
        }
    }

    /// Resolves once an open stream's body has not been polled for
    /// `timeout`. hyper polls a body only when the stream has flow-control
    /// window to send into, so such a stream belongs to a client that stopped
    /// reading it while the connection lives on (the kernel's write timeout
    /// does not see that). Looked at four times per `timeout`, at a lock and
    /// a load per open stream.
    pub(crate) async fn stalled(&self, timeout: Duration) {
        let limit = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut tick = tokio::time::interval((timeout / 4).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = self.millis_now();
            let state = self.lock();
            if state
                .streams
                .values()
                .any(|polled| now.saturating_sub(polled.load(Ordering::Relaxed)) >= limit)
            {
                return;
            }
        }
    }
}

/// One open stream of an HTTP/2 connection.
pub struct StreamActivity {
    activity: Arc<Activity>,
    id: u64,
    polled: Arc<AtomicU64>,
}

impl StreamActivity {
    /// Notes that hyper asked the stream's body for more.
    pub fn polled(&self) {
        self.polled
            .store(self.activity.millis_now(), Ordering::Relaxed);
    }
}

impl Drop for StreamActivity {
    fn drop(&mut self) {
        let mut state = self.activity.lock();
        state.open -= 1;
        state.since = tokio::time::Instant::now();
        state.streams.remove(&self.id);
    }
}
