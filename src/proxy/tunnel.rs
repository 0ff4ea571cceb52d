//! The WebSocket tunnel: after a `101 Switching Protocols`, bytes are copied both ways,
//! untouched, for as long as both sides keep the connection, hours if need be.
//!
//! Qlik engine sessions sit idle for long stretches, and a site has one open tunnel per user
//! per app, so an idle tunnel must cost almost nothing. `tokio::io::copy_bidirectional` keeps
//! two 8 KiB buffers per tunnel for its whole life; this copy reads into a buffer on the stack
//! of the poll, and allocates only for the rare remainder that the other side could not take
//! at once. An idle tunnel holds no buffer at all.
//!
//! No timer cuts a tunnel unless `server.websocket_idle_timeout` is set; shutdown closes every
//! tunnel once in-flight requests have finished.

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::shutdown_watch::ShutdownWatch;

/// Bytes moved by one tunnel, reported when it ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub to_upstream: u64,
    pub to_client: u64,
}

/// How a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Both sides closed (or one closed and the other was told).
    Closed,
    /// No byte either way for `websocket_idle_timeout`.
    IdleTimeout,
    /// The guard is shutting down.
    Shutdown,
    /// A read or write failed (reset by peer, ...).
    Error,
}

/// Sees every chunk Qlik sends to the browser (the session guard listens for engine
/// notifications); it must be cheap, it runs on the copy path.
pub type Observer = Box<dyn FnMut(&[u8]) + Send>;

/// Copies between `client` and `upstream` until both directions are done.
pub async fn run<C, U>(
    client: C,
    upstream: U,
    idle_timeout: Option<Duration>,
    shutdown: CancellationToken,
    observe_upstream: Option<Observer>,
) -> (Ending, Transferred)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut copy = Copy {
        client,
        upstream,
        up: Direction::default(),
        down: Direction {
            observer: observe_upstream,
            ..Direction::default()
        },
        idle: idle_timeout.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        fin: None,
        stop: ShutdownWatch::new(shutdown),
    };
    let ending = (&mut copy).await;
    let t = Transferred {
        to_upstream: copy.up.bytes,
        to_client: copy.down.bytes,
    };
    (ending, t)
}

#[derive(Default)]
struct Direction {
    /// What the writer could not take yet (allocated only then).
    pending: Vec<u8>,
    written: usize,
    read_done: bool,
    /// Bytes went to the writer since its last flush (only a TLS writer holds any back).
    unflushed: bool,
    done: bool,
    bytes: u64,
    observer: Option<Observer>,
}

struct Copy<C, U> {
    client: C,
    upstream: U,
    up: Direction,
    down: Direction,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    /// Armed when one side has closed: the other gets [`FIN_TIMEOUT`] to follow.
    fin: Option<Pin<Box<Sleep>>>,
    stop: ShutdownWatch,
}

/// After one side closed, how long the other may keep its half open (HAProxy's
/// `timeout client-fin`): a peer that never closes must not pin the tunnel forever.
pub(crate) const FIN_TIMEOUT: Duration = Duration::from_secs(30);

const STACK_BUF: usize = 16 * 1024;

impl Direction {
    /// Moves what can be moved now; `Ready(Err)` on failure, `Ready(Ok)` when this direction is
    /// finished, `Pending` otherwise. Sets `moved` when any byte went through.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        moved: &mut bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.written < self.pending.len() {
                match Pin::new(&mut *writer).poll_write(cx, &self.pending[self.written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        self.unflushed = true;
                        *moved = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.read_done {
                return match Pin::new(&mut *writer).poll_shutdown(cx) {
                    Poll::Ready(_) => {
                        self.done = true;
                        Poll::Ready(Ok(()))
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); STACK_BUF];
            let mut buf = ReadBuf::uninit(&mut stack);
            match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    // Data written without a flush would sit in a TLS layer's buffer.
                    if self.unflushed && Pin::new(&mut *writer).poll_flush(cx).is_ready() {
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let data = buf.filled();
            if data.is_empty() {
                self.read_done = true;
                continue;
            }
            *moved = true;
            self.bytes += data.len() as u64;
            if let Some(o) = &mut self.observer {
                o(data);
            }
            let mut off = 0;
            while off < data.len() {
                match Pin::new(&mut *writer).poll_write(cx, &data[off..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        off += n;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if off < data.len() {
                self.pending = data[off..].to_vec();
                self.written = 0;
            }
        }
    }
}

impl<C, U> Future for Copy<C, U>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Ending;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ending> {
        let this = self.get_mut();
        if this.stop.poll_requested(cx) {
            return Poll::Ready(Ending::Shutdown);
        }
        let mut moved = false;
        let up = this
            .up
            .poll_copy(cx, &mut this.client, &mut this.upstream, &mut moved);
        let down = this
            .down
            .poll_copy(cx, &mut this.upstream, &mut this.client, &mut moved);
        match (up, down) {
            (Poll::Ready(Err(_)), _) | (_, Poll::Ready(Err(_))) => {
                return Poll::Ready(Ending::Error)
            }
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(Ending::Closed),
            (Poll::Ready(Ok(())), _) | (_, Poll::Ready(Ok(()))) => {
                let fin = this
                    .fin
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(FIN_TIMEOUT)));
                if fin.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ending::Closed);
                }
            }
            _ => {}
        }
        if let Some((limit, sleep)) = &mut this.idle {
            if moved {
                sleep.as_mut().reset(Instant::now() + *limit);
            }
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ending::IdleTimeout);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_cross_both_ways_unchanged_and_close_propagates() {
        let (mut client, client_side) = duplex(1024);
        let (upstream_side, mut server) = duplex(1024);
        let task = tokio::spawn(run(
            client_side,
            upstream_side,
            None,
            CancellationToken::new(),
            None,
        ));
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let big2 = big.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&big2).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, big);
        server.write_all(b"\x81\x02ok").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"\x81\x02ok");
        let (ending, t) = task.await.unwrap();
        assert_eq!(ending, Ending::Closed);
        assert_eq!(t.to_upstream, 200_000);
        assert_eq!(t.to_client, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_only_when_configured() {
        let (_c, client_side) = duplex(64);
        let (upstream_side, _s) = duplex(64);
        let (ending, _) = run(
            client_side,
            upstream_side,
            Some(Duration::from_secs(60)),
            CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(ending, Ending::IdleTimeout);

        let (_c, client_side) = duplex(64);
        let (upstream_side, _s) = duplex(64);
        let t = tokio::spawn(run(
            client_side,
            upstream_side,
            None,
            CancellationToken::new(),
            None,
        ));
        tokio::time::sleep(Duration::from_secs(6 * 3600)).await;
        assert!(!t.is_finished(), "no timer may cut an idle tunnel");
        t.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_tunnel_ends_after_the_fin_timeout() {
        let (client, client_side) = duplex(64);
        let (upstream_side, _server) = duplex(64);
        drop(client);
        let (ending, _) = run(
            client_side,
            upstream_side,
            None,
            CancellationToken::new(),
            None,
        )
        .await;
        assert_eq!(ending, Ending::Closed);
    }

    #[tokio::test]
    async fn shutdown_closes_the_tunnel() {
        let (_c, client_side) = duplex(64);
        let (upstream_side, _s) = duplex(64);
        let token = CancellationToken::new();
        let t = tokio::spawn(run(client_side, upstream_side, None, token.clone(), None));
        token.cancel();
        assert_eq!(t.await.unwrap().0, Ending::Shutdown);
    }

    #[tokio::test]
    async fn shutdown_ends_a_tunnel_that_has_been_woken_by_traffic() {
        // After its first poll the tunnel no longer polls the cancellation future on every
        // wake-up: shutdown must still end it once messages have gone through.
        let (mut client, client_side) = duplex(64);
        let (upstream_side, mut server) = duplex(64);
        let token = CancellationToken::new();
        let t = tokio::spawn(run(client_side, upstream_side, None, token.clone(), None));
        for _ in 0..3 {
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(b"pong").await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
        }
        token.cancel();
        let (ending, moved) = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("the tunnel ends on shutdown")
            .unwrap();
        assert_eq!(ending, Ending::Shutdown);
        assert_eq!((moved.to_upstream, moved.to_client), (12, 12));
    }
}
