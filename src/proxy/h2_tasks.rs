//! An HTTP/2 connection and its streams, driven together in the connection's own task.
//!
//! The h2 crate parses the frames and keeps every stream's state; this module drives it.
//! [`Served`] is one connection: its handshake, then each request as it is accepted, handed
//! to a function that makes the stream's future ([`crate::proxy::h2::stream`]). [`drive`]
//! polls that connection and its streams in one task: the streams of one connection share its
//! TLS stream and its h2 state anyway, and a task per stream would be allocated, entered in
//! the runtime's task list, scheduled and freed per request, with every step crossing between
//! two tasks (the stream queues its answer and wakes the connection's task, which writes it).
//! A stream that answers is polled just before the connection, so the answer is written in
//! the same turn.
//!
//! Why not hyper's HTTP/2 server on top of h2: it moved each answer through several large
//! values, looked up and stripped connection fields the engine never writes, and wrapped
//! every body; driving h2 directly saved some 3,000 instructions a request
//! (`benches/cost.sh`, guard-h2; see ARCHITECTURE.md). What hyper did that matters is done
//! here or in `proxy::h2`: its settings (below), a stream reset when the client resets it
//! while Qlik is still answering, flow control on both bodies, a GOAWAY on close.
//!
//! The streams are polled by `FuturesUnordered`, which polls only those that were woken: a
//! long download does not make the connection's other streams run.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;
use h2::server::{Connection as H2Connection, Handshake, SendResponse};
use h2::RecvStream;
use http::Request;
use tokio::io::{AsyncRead, AsyncWrite};

/// What [`drive`] needs of a connection.
pub trait Connection {
    /// One request's work.
    type Stream: Future<Output = ()>;
    type Output;
    /// Moves the connection on (reads and writes frames); hands over its next stream, or its
    /// end.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next<Self::Stream, Self::Output>>;
    /// Takes no new stream (GOAWAY); those open go on to their end.
    fn graceful(&mut self);
}

pub enum Next<S, O> {
    Stream(S),
    Ended(O),
}

/// The HTTP/2 settings the guard announces: those of hyper's server, which served before
/// (h2's own defaults allow any number of concurrent streams and a 64 KiB window).
pub fn builder(max_header_list: u32) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(1024 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_frame_size(16 * 1024)
        .max_header_list_size(max_header_list)
        .max_concurrent_streams(200)
        .max_local_error_reset_streams(Some(1024))
        .max_send_buffer_size(400 * 1024);
    b
}

/// One HTTP/2 server connection: `start` makes each accepted request's stream.
pub struct Served<T: AsyncRead + AsyncWrite + Unpin, F> {
    state: State<T>,
    start: F,
}

enum State<T: AsyncRead + AsyncWrite + Unpin> {
    /// The client's preface and SETTINGS.
    Handshaking(Handshake<T, Bytes>),
    Serving(H2Connection<T, Bytes>),
    /// Closed before the handshake was done: nothing was agreed, nothing to say.
    Dropped,
}

impl<T: AsyncRead + AsyncWrite + Unpin, F> Served<T, F> {
    pub fn new(handshake: Handshake<T, Bytes>, start: F) -> Self {
        Served {
            state: State::Handshaking(handshake),
            start,
        }
    }
}

impl<T, F, S> Connection for Served<T, F>
where
    T: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Request<RecvStream>, SendResponse<Bytes>) -> S,
    S: Future<Output = ()>,
{
    type Stream = S;
    type Output = Result<(), h2::Error>;

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next<S, Self::Output>> {
        loop {
            match &mut self.state {
                State::Handshaking(hs) => match Pin::new(hs).poll(cx) {
                    Poll::Ready(Ok(conn)) => self.state = State::Serving(conn),
                    Poll::Ready(Err(e)) => return Poll::Ready(Next::Ended(Err(e))),
                    Poll::Pending => return Poll::Pending,
                },
                State::Serving(conn) => {
                    return conn.poll_accept(cx).map(|next| match next {
                        Some(Ok((req, respond))) => Next::Stream((self.start)(req, respond)),
                        Some(Err(e)) => Next::Ended(Err(e)),
                        None => Next::Ended(Ok(())),
                    })
                }
                State::Dropped => return Poll::Ready(Next::Ended(Ok(()))),
            }
        }
    }

    fn graceful(&mut self) {
        match &mut self.state {
            State::Serving(conn) => conn.graceful_shutdown(),
            // A client that has not finished its preface has no stream to finish.
            State::Handshaking(_) => self.state = State::Dropped,
            State::Dropped => {}
        }
    }
}

/// Polls `conn` and the streams it hands over until the connection has ended and every
/// stream with it. Once `close` is ready (a shutdown, an idle connection), the connection is
/// asked to end gracefully (GOAWAY), and its streams go on to their end.
/// One future owns it all, so no branch of a `select!` can drop a running stream.
pub async fn drive<C: Connection>(mut conn: C, close: impl Future<Output = ()>) -> C::Output {
    // A stream that panics ends alone (as it would in a task of its own): h2 resets it when
    // its handle is dropped, and the connection's other streams go on.
    let mut running = FuturesUnordered::new();
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
        let mut poll_streams = |running: &mut FuturesUnordered<_>| {
            while let Poll::Ready(Some(r)) = running.poll_next_unpin(&mut for_streams) {
                let r: Result<(), _> = r;
                if r.is_err() {
                    tracing::error!("an HTTP/2 stream panicked: it was reset");
                }
            }
        };
        for _ in 0..MAX_ROUNDS {
            turn.in_turn.store(true, Ordering::SeqCst);
            // Each flag is cleared just before the part it stands for is polled: a wake
            // during that poll or after it sets it again, for the next round.
            // The streams first: an answer they queue is written by the connection's poll
            // below, in the same round.
            if turn.streams.swap(false, Ordering::SeqCst) {
                poll_streams(&mut running);
            }
            // The close is looked at only when its own timer or the stop woke it (polled
            // with the connection, it cost a few hundred instructions a request).
            if !closing
                && ended.is_none()
                && turn.close.swap(false, Ordering::SeqCst)
                && close.as_mut().poll(&mut for_close).is_ready()
            {
                closing = true;
                conn.graceful();
                // The GOAWAY is sent by the connection's poll.
                turn.conn.store(true, Ordering::SeqCst);
            }
            let mut accepted = false;
            if ended.is_none() && turn.conn.swap(false, Ordering::SeqCst) {
                loop {
                    match conn.poll_next(&mut for_conn) {
                        Poll::Ready(Next::Stream(s)) => {
                            running.push(AssertUnwindSafe(s).catch_unwind());
                            accepted = true;
                        }
                        Poll::Ready(Next::Ended(out)) => {
                            ended = Some(out);
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
            }
            if accepted {
                // Their first poll: each sends its request on to Qlik (or answers at once,
                // and wakes the connection to write the answer: one more round).
                turn.streams.store(false, Ordering::SeqCst);
                poll_streams(&mut running);
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
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    type Work = Pin<Box<dyn Future<Output = ()> + Send>>;

    /// A "connection" that hands over its streams, one per poll, then ends (or waits to be
    /// asked to).
    struct Handing {
        streams: Vec<Work>,
        /// Asked to end: it hands over no more streams.
        graceful: Arc<AtomicBool>,
        /// Ends by itself once it handed its streams over (else waits to be asked).
        ends: bool,
    }

    impl Handing {
        /// `n` streams, each counted in `done` when it ends; `ends`: see there.
        fn new(n: usize, done: &Arc<AtomicUsize>, ends: bool) -> Handing {
            let streams = (0..n)
                .map(|_| {
                    let done = done.clone();
                    Box::pin(async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        done.fetch_add(1, Ordering::SeqCst);
                    }) as Work
                })
                .collect();
            Handing {
                streams,
                graceful: Default::default(),
                ends,
            }
        }
    }

    impl Connection for Handing {
        type Stream = Work;
        type Output = &'static str;
        fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next<Work, &'static str>> {
            if self.graceful.load(Ordering::SeqCst) || (self.streams.is_empty() && self.ends) {
                return Poll::Ready(Next::Ended("ended"));
            }
            match self.streams.pop() {
                Some(s) => Poll::Ready(Next::Stream(s)),
                None => {
                    // Woken by `graceful`'s caller (drive polls the connection after it).
                    let _ = cx;
                    Poll::Pending
                }
            }
        }
        fn graceful(&mut self) {
            self.graceful.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn the_connection_ends_only_with_its_last_stream() {
        let done = Arc::new(AtomicUsize::new(0));
        let conn = Handing::new(3, &done, true);
        let out = drive(conn, std::future::pending()).await;
        assert_eq!(out, "ended");
        assert_eq!(
            done.load(Ordering::SeqCst),
            3,
            "every stream ran to its end"
        );
    }

    #[tokio::test]
    async fn a_stream_that_panics_ends_alone() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut conn = Handing::new(2, &done, true);
        conn.streams
            .insert(1, Box::pin(async { panic!("a stream's bug") }));
        let out = drive(conn, std::future::pending()).await;
        assert_eq!(out, "ended", "the connection went on");
        assert_eq!(done.load(Ordering::SeqCst), 2, "and its other streams");
    }

    /// A wake that comes while the connection and its streams are being polled is served by
    /// the same poll (another round), not lost: here the connection's poll wakes a stream
    /// after the streams' part of the round has passed.
    #[tokio::test]
    async fn a_wake_during_the_poll_is_not_lost() {
        struct Waking {
            stream: Option<Work>,
            tx: Option<tokio::sync::oneshot::Sender<()>>,
            polls: usize,
        }
        impl Connection for Waking {
            type Stream = Work;
            type Output = &'static str;
            fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Next<Work, &'static str>> {
                if let Some(s) = self.stream.take() {
                    return Poll::Ready(Next::Stream(s));
                }
                self.polls += 1;
                // First poll: wakes itself (one more round). Second: wakes the stream, and
                // ends.
                if self.polls == 1 {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                if let Some(tx) = self.tx.take() {
                    tx.send(()).unwrap();
                }
                Poll::Ready(Next::Ended("ended"))
            }
            fn graceful(&mut self) {
                panic!("not closed")
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let got = Arc::new(AtomicUsize::new(0));
        let g = got.clone();
        let conn = Waking {
            stream: Some(Box::pin(async move {
                rx.await.unwrap();
                g.fetch_add(1, Ordering::SeqCst);
            })),
            tx: Some(tx),
            polls: 0,
        };
        let out = tokio::time::timeout(Duration::from_secs(5), drive(conn, std::future::pending()))
            .await
            .expect("no stream is left waiting for a wake that went missing");
        assert_eq!(out, "ended");
        assert_eq!(got.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn close_ends_the_connection_gracefully_and_its_streams_finish() {
        let done = Arc::new(AtomicUsize::new(0));
        let conn = Handing::new(2, &done, false);
        let asked = conn.graceful.clone();
        let close = tokio::time::sleep(Duration::from_millis(5));
        let out = drive(conn, close).await;
        assert_eq!(out, "ended");
        assert!(asked.load(Ordering::SeqCst), "asked to end by the close");
        assert_eq!(
            done.load(Ordering::SeqCst),
            2,
            "the streams handed over before the close ran to their end"
        );
    }
}
