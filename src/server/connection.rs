//! What a connection tells the requests it carries (as request extensions):
//! its peer, its HTTP/2 activity (open streams, and whether hyper polled
//! each one's body lately), and the hold that keeps a graceful shutdown waiting
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
/// whether hyper asked each open stream's body for more lately.
pub struct Activity {
    state: std::sync::Mutex<ActivityState>,
}

struct ActivityState {
    open: usize,
    since: tokio::time::Instant,
    /// Per open stream, the looks of [`Activity::stalled`] since its body
    /// was last polled: a poll stores 0, a look adds 1 (no clock read on a
    /// stream's path).
    streams: std::collections::HashMap<u64, Arc<AtomicU64>>,
    next_id: u64,
}

/// Looks of [`Activity::stalled`] per timeout.
const LOOKS_PER_TIMEOUT: u64 = 4;

impl Activity {
    pub(crate) fn new() -> Activity {
        let now = tokio::time::Instant::now();
        Activity {
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

    /// Counts a stream as open until the guard is dropped.
    pub fn open(self: &Arc<Self>) -> StreamActivity {
        let polled = Arc::new(AtomicU64::new(0));
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
    /// `timeout` (within a quarter more). hyper polls a body only when the
    /// stream has flow-control window to send into, so such a stream
    /// belongs to a client that stopped reading it while the connection
    /// lives on (the kernel's write timeout does not see that). Looked at
    /// four times per `timeout`, at a lock and an atomic add per open
    /// stream.
    pub(crate) async fn stalled(&self, timeout: Duration) {
        let look = (timeout / LOOKS_PER_TIMEOUT as u32).max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + look, look);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let state = self.lock();
            // Every stream's count goes up: one unpolled for the last
            // LOOKS_PER_TIMEOUT looks has gone a timeout without a poll.
            let mut stalled = false;
            for looks in state.streams.values() {
                stalled |= looks.fetch_add(1, Ordering::Relaxed) >= LOOKS_PER_TIMEOUT;
            }
            if stalled {
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
        self.polled.store(0, Ordering::Relaxed);
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
