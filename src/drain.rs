//! Draining a node before it stops (SIGTERM): readiness fails at once, new
//! streams are still served for the drain delay (a load balancer needs that
//! long to notice), then open streams are closed spread evenly over the
//! drain window, so their clients reconnect to other nodes as a trickle
//! rather than all at once.
//!
//! Each stream takes the next ordinal when draining begins (or when it
//! opens, if later) and closes at `window × frac(seed + ordinal × φ⁻¹)` into
//! the window: a low-discrepancy sequence, so however many streams there
//! are, every slice of the window gets its share of closes. No I/O here.

use std::future::Future;
use std::hash::BuildHasher;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The golden ratio's fractional part: consecutive multiples of it spread
/// over [0, 1) as evenly as any sequence can without knowing its length.
const PHI_FRACTION: f64 = 0.618_033_988_749_894_9;

/// A node's drain: a cheap handle shared by the server, the readiness
/// check and every stream.
#[derive(Clone)]
pub struct Drain(Arc<Inner>);

struct Inner {
    delay: Duration,
    window: Duration,
    /// Cancelled when draining begins, and when the process shuts down
    /// (a child of the shutdown token): one signal for streams to wait on.
    signal: CancellationToken,
    started: OnceLock<Instant>,
    next: AtomicU64,
    /// Retry hints handed out, a sequence of its own.
    hints: AtomicU64,
    /// Per-process offset of the sequence, and of the retry jitter.
    seed: u64,
}

impl Drain {
    pub fn new(delay: Duration, window: Duration, shutdown: &CancellationToken) -> Drain {
        Drain(Arc::new(Inner {
            delay,
            window,
            signal: shutdown.child_token(),
            started: OnceLock::new(),
            next: AtomicU64::new(0),
            hints: AtomicU64::new(0),
            seed: std::collections::hash_map::RandomState::new().hash_one(0u8),
        }))
    }

    /// Starts draining now; later calls change nothing.
    pub fn begin(&self) {
        if self.0.started.set(Instant::now()).is_ok() {
            self.0.signal.cancel();
        }
    }

    /// Whether draining has begun (readiness then fails).
    pub fn is_draining(&self) -> bool {
        self.0.started.get().is_some()
    }

    /// Cancelled when draining begins or the process shuts down.
    pub fn signal(&self) -> &CancellationToken {
        &self.0.signal
    }

    /// When the node stops taking new connections: the end of the delay.
    pub fn stop_accepting_at(&self) -> Option<Instant> {
        self.0.started.get().map(|at| *at + self.0.delay)
    }

    /// When the last stream has been closed: the end of the window.
    pub fn window_end(&self) -> Option<Instant> {
        self.stop_accepting_at().map(|at| at + self.0.window)
    }

    /// When a stream should close, given that draining has begun: the next
    /// point of the sequence within what is left of the window (a stream
    /// opened during the window closes within its rest). `None` when not
    /// draining.
    pub fn close_at(&self) -> Option<Instant> {
        let from = self.stop_accepting_at()?.max(Instant::now());
        let until = self.window_end()?.max(from);
        let n = self.0.next.fetch_add(1, Ordering::Relaxed);
        let fraction = self.fraction(n);
        Some(from + (until - from).mul_f64(fraction))
    }

    /// The `retry:` a closing stream suggests: up to `max`, spread too, so
    /// streams closed in the same instant (a window of 0) still reconnect
    /// apart.
    pub fn retry_hint(&self, max: Duration) -> Duration {
        let n = self.0.hints.fetch_add(1, Ordering::Relaxed);
        max.mul_f64(self.fraction(n))
    }

    fn fraction(&self, n: u64) -> f64 {
        let offset = (self.0.seed >> 11) as f64 / (1u64 << 53) as f64;
        (offset + n as f64 * PHI_FRACTION).fract()
    }
}

/// A future polled again only once it has asked to be: after its own waker
/// fired, or when the task's waker changed. A stream's select polls every
/// branch on each wake-up, and the shutdown and drain signals
/// (`CancellationToken::cancelled_owned`) take their token's lock on every
/// poll, a lock all streams share; behind this, they are looked at once per
/// stream until they fire. Until some `WokenOnly`'s waker fired, an event's
/// wake-up costs a load of one process-wide flag that nothing writes, and
/// no look at the stream's own flag (an allocation of its own).
pub struct WokenOnly<F> {
    future: Pin<Box<F>>,
    /// The task's waker `future` was last polled under, and its own flag.
    seen: Option<(Waker, Arc<Flag>)>,
}

/// Set once any [`WokenOnly`]'s waker fired in this process (a drain or a
/// shutdown began): from then on each one looks at its own flag.
static ANY_WOKEN: AtomicBool = AtomicBool::new(false);

struct Flag {
    woken: AtomicBool,
    task: Waker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        ANY_WOKEN.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<F: Future> WokenOnly<F> {
    pub fn new(future: F) -> WokenOnly<F> {
        WokenOnly {
            future: Box::pin(future),
            seen: None,
        }
    }

    /// Waits for `future` instead, from the next poll on.
    pub fn set(&mut self, future: F) {
        self.future.set(future);
        self.seen = None;
    }
}

impl<F: Future> Future for WokenOnly<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let flag = match &this.seen {
            Some((task, flag)) if task.will_wake(cx.waker()) => {
                // Not woken: a load or two, once per event.
                if !ANY_WOKEN.load(Ordering::Acquire) || !flag.woken.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
                // Woken: cleared before the future is polled, so a wake-up
                // during that poll is not lost.
                flag.woken.store(false, Ordering::Relaxed);
                flag.clone()
            }
            _ => {
                let flag = Arc::new(Flag {
                    woken: AtomicBool::new(false),
                    task: cx.waker().clone(),
                });
                this.seen = Some((cx.waker().clone(), flag.clone()));
                flag
            }
        };
        let waker = Waker::from(flag);
        this.future.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_woken_only_signal_fires_once_cancelled_whatever_the_waker() {
        let token = CancellationToken::new();
        let mut signal = WokenOnly::new(token.clone().cancelled_owned());
        assert!(futures_util::poll!(&mut signal).is_pending());
        assert!(futures_util::poll!(&mut signal).is_pending());
        // Polled by another task's waker (the future moved): registered anew.
        let noop = Waker::noop();
        let polled = Pin::new(&mut signal).poll(&mut Context::from_waker(noop));
        assert!(polled.is_pending());
        token.cancel();
        assert!(futures_util::poll!(&mut signal).is_ready());
        // Another signal in its place (draining, then shutdown).
        let shutdown = CancellationToken::new();
        signal.set(shutdown.clone().cancelled_owned());
        assert!(futures_util::poll!(&mut signal).is_pending());
        shutdown.cancel();
        assert!(futures_util::poll!(&mut signal).is_ready());
    }

    #[test]
    fn closes_fall_in_the_window_and_fill_every_tenth_of_it_evenly() {
        let shutdown = CancellationToken::new();
        let delay = Duration::from_secs(5);
        let window = Duration::from_secs(10);
        let drain = Drain::new(delay, window, &shutdown);
        assert!(drain.close_at().is_none());
        assert!(!drain.signal().is_cancelled());
        drain.begin();
        assert!(drain.is_draining() && drain.signal().is_cancelled());
        let start = drain.stop_accepting_at().unwrap();
        let mut tenths = [0usize; 10];
        for _ in 0..200 {
            let at = drain.close_at().unwrap();
            assert!(at >= start && at <= start + window);
            let tenth = ((at - start).as_secs_f64() / window.as_secs_f64() * 10.0) as usize;
            tenths[tenth.min(9)] += 1;
        }
        // 20 each, give or take the sequence's discrepancy.
        assert!(tenths.iter().all(|n| (17..=23).contains(n)), "{tenths:?}");
    }

    #[test]
    fn a_stream_opened_after_the_window_closes_at_once() {
        let drain = Drain::new(
            Duration::ZERO,
            Duration::from_millis(20),
            &CancellationToken::new(),
        );
        drain.begin();
        std::thread::sleep(Duration::from_millis(30));
        for _ in 0..10 {
            assert!(drain.close_at().unwrap() <= Instant::now());
        }
    }

    #[test]
    fn shutting_down_also_signals_the_drain_without_starting_it() {
        let shutdown = CancellationToken::new();
        let drain = Drain::new(Duration::ZERO, Duration::ZERO, &shutdown);
        shutdown.cancel();
        assert!(drain.signal().is_cancelled());
        assert!(!drain.is_draining());
        let hint = drain.retry_hint(Duration::from_secs(1));
        assert!(hint <= Duration::from_secs(1));
    }
}
