//! Serving existing streams ahead of new connections: a probe that
//! measures how late the runtime runs a task (the queueing delay every
//! ready task is seeing), and the pacing the accept loop applies with it.
//!
//! Setting up a connection costs the hub ~100 µs of CPU (accept, read,
//! parse, handler, subscription, answer head). Thousands arriving at once
//! queue seconds of that work on the runtime's workers, and a delivery to
//! a stream that is already open waits behind all of it. While the probe
//! finds the runtime late by more than `--busy-lag`, the accept loop still
//! accepts and admits connections (cheap, and the kernel's backlog stays
//! free), but starts serving them only a batch per calm tick of the probe,
//! and at least [`FLOOR_BATCH`] every [`FLOOR_EVERY`] however busy, so a
//! new client always gets through. No I/O; the accept loop owns the queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How often the probe wakes; its overshoot is the runtime's lag.
pub const PROBE_PERIOD: Duration = Duration::from_millis(5);
/// Connections started on each calm tick of the probe (about 100 µs of
/// work each: a few milliseconds on two cores, then measured again).
pub const CALM_BATCH: usize = 128;
/// However busy the runtime, this many waiting connections start every
/// [`FLOOR_EVERY`]: ~6 ms of setup work, a third of two cores at most, so
/// the queue ahead of a delivery stays a few milliseconds long while a
/// storm of 10,000 reconnecting clients is still through within 2 s.
/// (The probe's lag also counts the operating system's delay when other
/// processes share the cores, so a busy verdict alone must not starve.)
pub const FLOOR_BATCH: usize = 64;
/// See [`FLOOR_BATCH`].
pub const FLOOR_EVERY: Duration = Duration::from_millis(10);

/// The runtime's lag as the probe last measured it, and when.
#[derive(Debug)]
struct Probe {
    base: Instant,
    /// Microseconds the probe's last wake came late.
    lag_us: AtomicU64,
    /// Microseconds from `base` to the probe's last wake.
    woke_us: AtomicU64,
    /// One permit per calm tick (none stored twice).
    calm: Notify,
}

/// The accept loop's view of the runtime: whether it is busy, and when the
/// next batch of waiting connections may start. Off (never busy) with a
/// zero bound. The probe task ends when the `Pacer` is dropped.
#[derive(Debug)]
pub struct Pacer {
    bound: Duration,
    probe: Option<Arc<Probe>>,
    last_start: Instant,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Pacer {
    /// Starts the probe (on the current runtime) unless `bound` is zero.
    pub fn new(bound: Duration) -> Pacer {
        let now = Instant::now();
        if bound.is_zero() {
            return Pacer {
                bound,
                probe: None,
                last_start: now,
                task: None,
            };
        }
        let probe = Arc::new(Probe {
            base: now,
            lag_us: AtomicU64::new(0),
            woke_us: AtomicU64::new(0),
            calm: Notify::new(),
        });
        let task = tokio::spawn(run_probe(probe.clone(), bound));
        Pacer {
            bound,
            probe: Some(probe),
            last_start: now,
            task: Some(task),
        }
    }

    /// Whether a new connection should wait rather than start now: the
    /// probe's last wake was later than the bound, or it is overdue by more
    /// than the bound (it is queued behind work itself).
    pub fn busy(&self) -> bool {
        let Some(probe) = &self.probe else {
            return false;
        };
        let lag = Duration::from_micros(probe.lag_us.load(Ordering::Relaxed));
        let woke = probe.base + Duration::from_micros(probe.woke_us.load(Ordering::Relaxed));
        lag > self.bound || woke.elapsed() > PROBE_PERIOD + self.bound
    }

    /// Waits for the next turn of waiting connections and says how many
    /// may start: [`CALM_BATCH`] on a calm tick of the probe, [`FLOOR_BATCH`]
    /// once [`FLOOR_EVERY`] has passed since the last start. Cancel-safe.
    pub async fn turn(&mut self) -> usize {
        let Some(probe) = &self.probe else {
            return usize::MAX;
        };
        let floor = tokio::time::sleep_until(self.last_start + FLOOR_EVERY);
        let batch = tokio::select! {
            () = probe.calm.notified() => CALM_BATCH,
            () = floor => FLOOR_BATCH,
        };
        self.last_start = Instant::now();
        batch
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Wakes every [`PROBE_PERIOD`], records how late, and hands out a calm
/// permit when the lateness is within `bound`.
async fn run_probe(probe: Arc<Probe>, bound: Duration) {
    loop {
        let asleep = Instant::now();
        tokio::time::sleep(PROBE_PERIOD).await;
        let woke = Instant::now();
        let lag = woke.duration_since(asleep).saturating_sub(PROBE_PERIOD);
        probe
            .lag_us
            .store(micros(lag), std::sync::atomic::Ordering::Relaxed);
        probe
            .woke_us
            .store(micros(woke.duration_since(probe.base)), Ordering::Relaxed);
        if lag <= bound {
            probe.calm.notify_one();
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_runtime_is_busy_and_a_quiet_one_is_not() {
        let pacer = Pacer::new(Duration::from_millis(10));
        let deadline = Instant::now() + Duration::from_secs(5);
        while pacer.busy() {
            assert!(Instant::now() < deadline, "a quiet runtime stays busy");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Both workers blocked for 100 ms: the probe cannot run.
        let blockers: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(async {
                    std::thread::sleep(Duration::from_millis(100));
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        assert!(pacer.busy(), "an overdue probe means busy");
        for blocker in blockers {
            blocker.await.unwrap();
        }
    }

    #[tokio::test]
    async fn off_is_never_busy_and_starts_everything() {
        let mut pacer = Pacer::new(Duration::ZERO);
        assert!(!pacer.busy());
        assert_eq!(pacer.turn().await, usize::MAX);
    }
}
