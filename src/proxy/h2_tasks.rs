//! An HTTP/2 connection's streams run inside the connection's own task.
//!
//! hyper's HTTP/2 server hands every request stream to an executor. With tokio's, that is a
//! task per request: allocated, entered in the runtime's task list (a lock), scheduled, freed;
//! and every step of a request crosses between two tasks (the stream queues its answer and
//! wakes the connection's task, which then writes it). The streams of one connection share its
//! TLS stream and its h2 state anyway, so here they share its task: hyper gives each stream to
//! [`StreamExec`], which only queues it, and [`drive`] polls the connection and its streams
//! together. A stream that answers is polled just before the connection, so the answer is
//! written in the same turn. Measured with `benches/cost.sh` (guard-h2): see ARCHITECTURE.md.
//!
//! The streams are polled by `FuturesUnordered`, which polls only those that were woken: a
//! long download does not make the connection's other streams run.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;

/// One stream's work, as hyper hands it over.
pub type StreamTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one HTTP/2 connection: it queues each stream for [`drive`]. It is
/// called from inside the connection's poll, that is from `drive` itself, so the queue is
/// never contended (the lock is there because hyper requires a `Send` executor).
#[derive(Clone, Default)]
pub struct StreamExec(Arc<Mutex<Vec<StreamTask>>>);

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for StreamExec {
    fn execute(&self, fut: F) {
        // A stream that panics ends alone (as it did in a task of its own): hyper resets it
        // when it is dropped, and the connection's other streams go on.
        let alone = AssertUnwindSafe(fut).catch_unwind().map(|r| {
            if r.is_err() {
                tracing::error!("an HTTP/2 stream panicked: it was reset");
            }
        });
        self.queue().push(Box::pin(alone));
    }
}

impl StreamExec {
    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<StreamTask>> {
        // A panic while pushing cannot leave the Vec broken: the poison is ignored.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Polls `conn` and the streams it hands to `exec` until the connection has ended and every
/// stream with it. Once `close` is ready (a shutdown, an idle connection), `graceful` is
/// called on the connection (hyper's GOAWAY), and its streams go on to their end.
/// One future owns it all, so no branch of a `select!` can drop a running stream.
pub async fn drive<C: Future>(
    mut conn: Pin<&mut C>,
    exec: &StreamExec,
    close: impl Future<Output = ()>,
    mut graceful: impl FnMut(Pin<&mut C>),
) -> C::Output {
    let mut running = FuturesUnordered::<StreamTask>::new();
    let mut ended = None;
    let mut close = std::pin::pin!(close);
    let mut closing = false;
    let turn = Arc::new(Turn {
        task: AtomicWaker::new(),
        in_turn: AtomicBool::new(false),
        // Whatever woke the task the first time, everything is polled.
        conn: AtomicBool::new(true),
        streams: AtomicBool::new(true),
        close: AtomicBool::new(true),
    });
    let conn_waker = Waker::from(Arc::new(Woke(turn.clone(), Part::Connection)));
    let streams_waker = Waker::from(Arc::new(Woke(turn.clone(), Part::Streams)));
    let close_waker = Waker::from(Arc::new(Woke(turn.clone(), Part::Close)));
    std::future::poll_fn(move |cx| {
        turn.task.register(cx.waker());
        let mut for_conn = Context::from_waker(&conn_waker);
        let mut for_streams = Context::from_waker(&streams_waker);
        let mut for_close = Context::from_waker(&close_waker);
        for _ in 0..MAX_ROUNDS {
            turn.in_turn.store(true, Ordering::SeqCst);
            // Each flag is cleared just before the part it stands for is polled: a wake
            // during that poll or after it sets it again, for the next round.
            // The streams first: an answer they queue is written by the connection's poll
            // below, in the same round.
            if turn.streams.swap(false, Ordering::SeqCst) {
                while let Poll::Ready(Some(())) = running.poll_next_unpin(&mut for_streams) {}
            }
            // The close is looked at only when its own timer or the stop woke it (polled
            // with the connection, it cost a few hundred instructions a request).
            if !closing
                && ended.is_none()
                && turn.close.swap(false, Ordering::SeqCst)
                && close.as_mut().poll(&mut for_close).is_ready()
            {
                closing = true;
                graceful(conn.as_mut());
                // The GOAWAY is sent by the connection's poll.
                turn.conn.store(true, Ordering::SeqCst);
            }
            if ended.is_none() && turn.conn.swap(false, Ordering::SeqCst) {
                if let Poll::Ready(out) = conn.as_mut().poll(&mut for_conn) {
                    ended = Some(out);
                }
            }
            let mut accepted = false;
            {
                let mut queue = exec.queue();
                while let Some(stream) = queue.pop() {
                    running.push(stream);
                    accepted = true;
                }
            }
            if accepted {
                // Their first poll: each sends its request on to Qlik (or answers at once,
                // and wakes the connection to write the answer: one more round).
                turn.streams.store(false, Ordering::SeqCst);
                while let Poll::Ready(Some(())) = running.poll_next_unpin(&mut for_streams) {}
            }
            turn.in_turn.store(false, Ordering::SeqCst);
            let again = turn.streams.load(Ordering::SeqCst)
                || (ended.is_none() && turn.conn.load(Ordering::SeqCst))
                || (ended.is_none() && !closing && turn.close.load(Ordering::SeqCst));
            if !again {
                return match ended.take() {
                    Some(out) if running.is_empty() => Poll::Ready(out),
                    e => {
                        ended = e;
                        Poll::Pending
                    }
                };
            }
        }
        // Still woken after as many rounds: give the runtime its turn (tokio's budget for
        // this task may be spent), and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Rounds of one poll of [`drive`] at most: the streams, then the connection, again while
/// one of them woke the other (a stream's answer wakes the connection to write it).
const MAX_ROUNDS: usize = 4;

/// What the connection and its streams are woken through. hyper's streams and the h2
/// connection wake each other all the time (an answer queued wakes the connection; a frame
/// read wakes a stream): during a poll of [`drive`] such a wake only asks for one more round
/// of the same poll, for the part that was woken. Waking the task instead would poll
/// everything once more from the runtime: some thousand instructions a request for nothing.
struct Turn {
    task: AtomicWaker,
    /// A poll of [`drive`] is in progress: it looks at the flags before it ends.
    in_turn: AtomicBool,
    /// The connection was woken since it was last polled.
    conn: AtomicBool,
    /// A stream was woken since the streams were last polled.
    streams: AtomicBool,
    /// The close (shutdown, idle timer) was woken since it was last polled.
    close: AtomicBool,
}

#[derive(Clone, Copy)]
enum Part {
    Connection,
    Streams,
    Close,
}

/// The waker of one part: it notes the wake, and wakes the task unless a poll is under way.
struct Woke(Arc<Turn>, Part);

impl Wake for Woke {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let turn = &self.0;
        match self.1 {
            Part::Connection => turn.conn.store(true, Ordering::SeqCst),
            Part::Streams => turn.streams.store(true, Ordering::SeqCst),
            Part::Close => turn.close.store(true, Ordering::SeqCst),
        }
        if !turn.in_turn.load(Ordering::SeqCst) {
            turn.task.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A stateful "connection" that hands over `n` streams, one per poll, then ends.
    struct Handing {
        exec: StreamExec,
        left: usize,
        done: Arc<AtomicUsize>,
        /// Asked to end: it hands over no more streams.
        graceful: bool,
        /// Ends by itself once it handed its streams over (else waits to be asked).
        ends: bool,
    }

    impl Handing {
        /// `left` streams for `exec`, each counted in `done` when it ends; `ends`: see there.
        fn new(exec: &StreamExec, left: usize, done: &Arc<AtomicUsize>, ends: bool) -> Handing {
            Handing {
                exec: exec.clone(),
                left,
                done: done.clone(),
                graceful: false,
                ends,
            }
        }
    }

    impl Future for Handing {
        type Output = &'static str;
        fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<&'static str> {
            if self.graceful || (self.left == 0 && self.ends) {
                return Poll::Ready("ended");
            }
            if self.left == 0 {
                return Poll::Pending;
            }
            self.left -= 1;
            let done = self.done.clone();
            self.exec.execute(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                done.fetch_add(1, Ordering::SeqCst);
            });
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn the_connection_ends_only_with_its_last_stream() {
        let exec = StreamExec::default();
        let done = Arc::new(AtomicUsize::new(0));
        let conn = Handing::new(&exec, 3, &done, true);
        tokio::pin!(conn);
        let never = std::future::pending();
        let out = drive(conn.as_mut(), &exec, never, |_| panic!("not closed")).await;
        assert_eq!(out, "ended");
        assert_eq!(
            done.load(Ordering::SeqCst),
            3,
            "every stream ran to its end"
        );
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_alone() {
        let exec = StreamExec::default();
        let done = Arc::new(AtomicUsize::new(0));
        exec.execute(async { panic!("a stream's bug") });
        let conn = Handing::new(&exec, 2, &done, true);
        tokio::pin!(conn);
        let never = std::future::pending();
        let out = drive(conn.as_mut(), &exec, never, |_| panic!("not closed")).await;
        assert_eq!(out, "ended", "the connection went on");
        assert_eq!(done.load(Ordering::SeqCst), 2, "and its other streams");
    }

    /// A wake that comes while the connection and its streams are being polled is served by
    /// the same poll (another round), not lost: here the connection's poll wakes a stream
    /// after the streams' part of the round has passed.
    #[tokio::test]
    async fn a_wake_during_the_poll_is_not_lost() {
        let exec = StreamExec::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let got = Arc::new(AtomicUsize::new(0));
        let g = got.clone();
        exec.execute(async move {
            rx.await.unwrap();
            g.fetch_add(1, Ordering::SeqCst);
        });
        // First poll: wakes itself (one more round). Second: wakes the stream, and ends.
        let mut polls = 0;
        let mut tx = Some(tx);
        let conn = std::future::poll_fn(move |cx| {
            polls += 1;
            if polls == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some(tx) = tx.take() {
                tx.send(()).unwrap();
            }
            Poll::Ready("ended")
        });
        tokio::pin!(conn);
        let never = std::future::pending();
        let out = tokio::time::timeout(
            Duration::from_secs(5),
            drive(conn.as_mut(), &exec, never, |_| panic!("not closed")),
        )
        .await
        .expect("no stream is left waiting for a wake that went missing");
        assert_eq!(out, "ended");
        assert_eq!(got.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn close_ends_the_connection_gracefully_and_its_streams_finish() {
        let exec = StreamExec::default();
        let done = Arc::new(AtomicUsize::new(0));
        let conn = Handing::new(&exec, 2, &done, false);
        tokio::pin!(conn);
        let close = tokio::time::sleep(Duration::from_millis(5));
        let out = drive(conn.as_mut(), &exec, close, |c| c.get_mut().graceful = true).await;
        assert_eq!(out, "ended");
        assert!(conn.graceful, "asked to end by the close");
        assert_eq!(
            done.load(Ordering::SeqCst),
            2,
            "the streams handed over before the close ran to their end"
        );
    }
}
