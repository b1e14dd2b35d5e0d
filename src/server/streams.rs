//! The streams of an HTTP/2 connection, run inside the connection's own
//! task rather than in a task each. hyper hands every stream's future (the
//! service call, then the pump of its response body into h2) to the
//! connection's executor; [`Streams`] keeps them, and [`Running`] polls
//! them beside the connection. A delivery then wakes one task, not two
//! (the body's, then the connection's to write what the body sent), what
//! a stream sends is written in the same poll, and a stream costs no task
//! of its own. No I/O of its own: the connection does the writing.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one HTTP/2 connection: it queues the futures of
/// the connection's streams for [`Running`] to poll.
#[derive(Clone, Default)]
pub(super) struct Streams(Arc<Handed>);

/// Stream futures handed over and not yet polled, and the connection task
/// to wake for them.
#[derive(Default)]
struct Handed {
    queue: Mutex<Vec<StreamFuture>>,
    waker: AtomicWaker,
}

impl Handed {
    fn take(&self) -> Vec<StreamFuture> {
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        self.0
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::pin(future));
        // hyper hands streams over while the connection is polled, so this
        // is the running task; were it not, the task still hears of them.
        self.0.waker.wake();
    }
}

/// A connection and its streams, polled together. It ends when the
/// connection does: its streams have ended then, or can send nothing more
/// (dropping them drops their bodies, which leaves their subscriptions).
pub(super) struct Running<C> {
    connection: Pin<Box<C>>,
    handed: Arc<Handed>,
    streams: FuturesUnordered<StreamFuture>,
}

impl<C: Future> Running<C> {
    /// Runs `connection`, whose executor is `streams`.
    pub(super) fn new(connection: C, streams: &Streams) -> Running<C> {
        Running {
            connection: Box::pin(connection),
            handed: streams.0.clone(),
            streams: FuturesUnordered::new(),
        }
    }

    /// The connection (to begin its graceful shutdown).
    pub(super) fn connection(&mut self) -> Pin<&mut C> {
        self.connection.as_mut()
    }
}

impl<C: Future> Future for Running<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = self.get_mut();
        this.handed.waker.register(cx.waker());
        loop {
            // The streams first: what they send, the connection then
            // frames and writes in this same poll.
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            if let Poll::Ready(output) = this.connection.as_mut().poll(cx) {
                return Poll::Ready(output);
            }
            // Streams the connection accepted just now: polled at once, so
            // their answers go out with this poll's writes.
            let handed = this.handed.take();
            if handed.is_empty() {
                return Poll::Pending;
            }
            this.streams.extend(handed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn streams_handed_over_run_in_the_connections_task_until_it_ends() {
        let streams = Streams::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let executor = streams.clone();
        let counted = ran.clone();
        // A "connection" that hands over two streams, one of which waits,
        // then ends when told.
        let connection = async move {
            let first = counted.clone();
            executor.execute(async move {
                first.fetch_add(1, Ordering::SeqCst);
            });
            executor.execute(async move {
                let _ = wait.await;
                counted.fetch_add(1, Ordering::SeqCst);
            });
            let _ = finished.await;
            "done"
        };
        let mut running = Running::new(connection, &streams);
        assert!(futures_util::poll!(&mut running).is_pending());
        assert_eq!(ran.load(Ordering::SeqCst), 1, "the first stream ran");
        go.send(()).unwrap();
        assert!(futures_util::poll!(&mut running).is_pending());
        assert_eq!(ran.load(Ordering::SeqCst), 2, "the waiting one, once woken");
        finish.send(()).unwrap();
        assert_eq!(running.await, "done");
    }
}
