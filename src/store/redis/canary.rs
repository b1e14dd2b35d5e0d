//! The canaries a node sends itself through Redis's live path, and how it
//! tells from them that the path has stalled.

use std::collections::VecDeque;
use std::time::Duration;

use indexmap::IndexMap;

/// How the node checks that its live feed flows.
#[derive(Debug, Clone, Copy)]
pub struct CanarySettings {
    /// How often a canary is sent.
    pub interval: Duration,
    /// How long one may take to come back before the feed counts as stalled.
    pub timeout: Duration,
}

/// The node's canaries: numbered messages on each path its live feed
/// depends on. Outside a cluster, one path: a channel only this node
/// listens to. On a cluster, every partition channel the node is
/// subscribed to (each shard's pub/sub is a path of its own, and a stalled
/// shard must show). Pub/sub keeps order on a path, so a canary coming back
/// accounts for every earlier one there; the feed has stalled when the
/// oldest one not back on any path is older than the timeout.
pub(super) struct Canary {
    /// This node's own channel (outside a cluster).
    pub(super) channel: String,
    /// What tells this node's canaries apart on a shared channel.
    pub(super) id: String,
    pub(super) settings: CanarySettings,
    state: std::sync::Mutex<CanaryState>,
}

#[derive(Default)]
pub(super) struct CanaryState {
    next: u64,
    /// Per path, canaries sent and not back, oldest first (a bounded
    /// number: only the oldest matters for readiness).
    out: IndexMap<String, VecDeque<(u64, tokio::time::Instant)>>,
    /// Whether the stall was reported, so it is logged once.
    reported: bool,
}

impl Canary {
    /// Canaries remembered while none comes back; more say nothing new.
    const MAX_OUT: usize = 64;

    pub(super) fn new(prefix: &str, settings: CanarySettings) -> Canary {
        use ring::rand::SecureRandom;
        let mut id = [0u8; 8];
        // A node's channel must be its own; were the system's randomness to
        // fail, the clock still tells nodes apart.
        if ring::rand::SystemRandom::new().fill(&mut id).is_err() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            id = (now.as_nanos() as u64 ^ u64::from(std::process::id())).to_be_bytes();
        }
        let id = format!("{:016x}", u64::from_be_bytes(id));
        Canary {
            channel: format!("{prefix}canary:{id}"),
            id,
            settings,
            state: std::sync::Mutex::new(CanaryState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CanaryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers the next canary on `path` and records it as sent now.
    pub(super) fn send(&self, path: &str) -> u64 {
        let mut state = self.lock();
        let n = state.next;
        state.next += 1;
        let out = match state.out.get_mut(path) {
            Some(out) => out,
            None => state.out.entry(path.to_owned()).or_default(),
        };
        if out.len() < Self::MAX_OUT {
            out.push_back((n, tokio::time::Instant::now()));
        }
        n
    }

    /// Canary `n` came back on `path`: it and every earlier one there are
    /// accounted for.
    /// Returns how long canary `n` took, if it was still awaited.
    pub(super) fn back(&self, path: &str, n: u64) -> Option<Duration> {
        let mut state = self.lock();
        let out = state.out.get_mut(path)?;
        let mut took = None;
        while let Some(&(sent, at)) = out.front().filter(|(sent, _)| *sent <= n) {
            if sent == n {
                took = Some(at.elapsed());
            }
            out.pop_front();
        }
        took
    }

    /// The message of canary `n` on a cluster's shared channel (no topic
    /// line: an empty first line).
    pub(super) fn shared_message(&self, n: u64) -> String {
        format!("\n{} {n}", self.id)
    }

    /// The number of a message on a shared channel, if it is one of this
    /// node's canaries; `Err` if it is another node's.
    pub(super) fn parse_shared(&self, payload: &[u8]) -> Result<u64, ()> {
        let text = std::str::from_utf8(payload.strip_prefix(b"\n").ok_or(())?).map_err(|_| ())?;
        let (id, n) = text.split_once(' ').ok_or(())?;
        if id != self.id {
            return Err(());
        }
        n.parse().map_err(|_| ())
    }

    /// Whether the last canary on `path` did not come back within an
    /// interval.
    pub(super) fn late(&self, path: &str) -> bool {
        self.lock()
            .out
            .get(path)
            .and_then(|out| out.front())
            .is_some_and(|(_, sent)| sent.elapsed() > self.settings.interval)
    }

    /// Forgets canaries sent before a (re)connection: pub/sub dropped them.
    pub(super) fn reset(&self) {
        self.lock().out.clear();
    }

    /// Stops watching `path` (no longer subscribed).
    pub(super) fn forget(&self, path: &str) {
        self.lock().out.swap_remove(path);
    }

    /// How long the oldest canary not back has been out, and on which
    /// path, if past the timeout.
    pub(super) fn overdue(&self) -> Option<(Duration, String)> {
        let state = self.lock();
        let (age, path) = state
            .out
            .iter()
            .filter_map(|(path, out)| Some((out.front()?.1.elapsed(), path)))
            .max()?;
        (age > self.settings.timeout).then(|| (age, path.clone()))
    }

    /// Logs a stall when it starts and when it ends, once each.
    pub(super) fn report(&self) {
        let overdue = self.overdue();
        let mut state = self.lock();
        match (overdue, state.reported) {
            (Some((age, _)), false) => {
                tracing::warn!(?age, timeout = ?self.settings.timeout, "the live feed from Redis has stalled: a canary has not come back; not ready");
                state.reported = true;
            }
            (None, true) => {
                tracing::info!("the live feed from Redis flows again");
                state.reported = false;
            }
            _ => {}
        }
    }
}
