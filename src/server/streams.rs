//! The streams of an HTTP/2 connection, run inside the connection's own
//! task rather than in a task each. hyper hands every stream's future (the
//! service call, then the pump of its response body into h2) to the
//! connection's executor; [`Streams`] keeps them, and [`Running`] polls
//! them beside the connection. A delivery then wakes one task, not two
//! (the body's, then the connection's to write what the body sent), what
//! a stream sends is written in the same poll, and a stream costs no task
//! of its own. The connection is polled under a waker of its own, which
//! swallows the wake-ups that come while the task is about to poll it
//! anyway (h2 wakes the connection whenever a stream sends): a delivery is
//! one poll of one task. No I/O of its own: the connection does the
//! writing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one HTTP/2 connection: it queues the futures of
/// the connection's streams for [`Running`] to poll.
#[derive(Clone, Default)]
pub(super) struct Streams(Arc<Shared>);

/// What the executor and the connection's waker share with [`Running`]:
/// stream futures handed over and not yet polled, and whether the task is
/// polling and was woken meanwhile. While the task polls (`POLLING`), a
/// wake-up of the connection or a stream handed over only notes itself
/// (`WOKEN`): the connection is polled after the streams in any case, and
/// the task polled again if it was woken after that. Otherwise the task
/// is woken.
#[derive(Default)]
struct Shared {
    queue: Mutex<Vec<StreamFuture>>,
    state: AtomicU8,
    task: AtomicWaker,
}

const POLLING: u8 = 1;
const WOKEN: u8 = 2;

impl Shared {
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
        // hyper hands streams over while the connection is polled: then
        // they are taken in that poll.
        Arc::clone(&self.0).wake();
    }
}

/// The connection's waker.
impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.fetch_or(WOKEN, Ordering::AcqRel) & POLLING == 0 {
            self.task.wake();
        }
    }
}

/// A connection and its streams, polled together. It ends when the
/// connection does: its streams have ended then, or can send nothing more
/// (dropping them drops their bodies, which leaves their subscriptions).
pub(super) struct Running<C> {
    connection: Pin<Box<C>>,
    shared: Arc<Shared>,
    streams: FuturesUnordered<StreamFuture>,
    /// `shared` as a waker, made once.
    waker: Waker,
}

impl<C: Future> Running<C> {
    /// Runs `connection`, whose executor is `streams`.
    pub(super) fn new(connection: C, streams: &Streams) -> Running<C> {
        // A future that is never woken: `FuturesUnordered` wakes its task
        // (a yield) whenever a poll polled every future it holds, which
        // for a connection of one stream would be after every delivery.
        let streams_set = FuturesUnordered::new();
        streams_set.push(Box::pin(std::future::pending()) as StreamFuture);
        Running {
            connection: Box::pin(connection),
            shared: streams.0.clone(),
            streams: streams_set,
            waker: Waker::from(streams.0.clone()),
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
        this.shared.task.register(cx.waker());
        this.shared.state.fetch_or(POLLING, Ordering::AcqRel);
        let output = loop {
            // The streams first: what they send, the connection then
            // frames and writes in this same poll.
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(cx) {}
            // Wake-ups until now are answered by this poll of it.
            this.shared.state.fetch_and(!WOKEN, Ordering::AcqRel);
            let mut under = Context::from_waker(&this.waker);
            if let Poll::Ready(output) = this.connection.as_mut().poll(&mut under) {
                break Poll::Ready(output);
            }
            // Streams the connection accepted just now: polled at once, so
            // their answers go out with this poll's writes.
            let handed = this.shared.take();
            if handed.is_empty() {
                break Poll::Pending;
            }
            this.streams.extend(handed);
        };
        // Woken since its last poll (by itself, the socket or a timer): the
        // task is polled again.
        if this.shared.state.fetch_and(!POLLING, Ordering::AcqRel) & WOKEN != 0 {
            cx.waker().wake_by_ref();
        }
        output
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

    /// Counts its wake-ups: the task's waker in a test.
    struct Counted(AtomicUsize);

    impl Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_stream_waking_its_connection_costs_the_task_no_second_poll() {
        let streams = Streams::default();
        let connection_waker: Arc<Mutex<Option<Waker>>> = Arc::default();
        let stream_waker: Arc<Mutex<Option<Waker>>> = Arc::default();
        let polls = Arc::new(AtomicUsize::new(0));
        let (executor, seen, counted) = (streams.clone(), connection_waker.clone(), polls.clone());
        let stream_seen = stream_waker.clone();
        // A "connection" that keeps its waker and hands over one stream;
        // the stream, each time it is woken (an event), wakes the
        // connection, as h2 does when a stream sends.
        let connection = std::future::poll_fn(move |cx| {
            *seen.lock().unwrap() = Some(cx.waker().clone());
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                let (sent, own) = (seen.clone(), stream_seen.clone());
                executor.execute(std::future::poll_fn(move |cx| {
                    if own.lock().unwrap().replace(cx.waker().clone()).is_some()
                        && let Some(waker) = sent.lock().unwrap().take()
                    {
                        waker.wake();
                    }
                    Poll::<()>::Pending
                }));
            }
            Poll::<()>::Pending
        });
        let mut running = Running::new(connection, &streams);
        let task = Arc::new(Counted(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut running).poll(&mut cx).is_pending());
        let (before, woken) = (polls.load(Ordering::SeqCst), task.0.load(Ordering::SeqCst));
        // An event for the stream: one wake-up of the task, one poll, in
        // which the connection is polled after the stream sent, and no
        // wake-up after it.
        stream_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), woken + 1);
        assert!(Pin::new(&mut running).poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            before + 1,
            "the connection, polled"
        );
        assert_eq!(
            task.0.load(Ordering::SeqCst),
            woken + 1,
            "no second poll asked"
        );
        // Woken from outside a poll (the socket, a timer): the task is.
        connection_waker.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), woken + 2);
    }
}
