//! Keep-alive connections to the Qlik nodes, for the HTTP/1 engine.
//!
//! A request task takes a connection out of its node's idle list, uses it directly (no task or
//! channel in between), and puts it back once the response has been read to its end. Idle
//! connections are closed after `proxy.pool_idle_timeout` (kept below the QPS's own keep-alive
//! timeout, so a request is never sent down a connection Qlik is closing) by a reaper task,
//! and checked for a close from Qlik's side before they are reused.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::deadline::LazyDeadline;
use super::error::ProxyError;
use super::upstream::Node;

/// A connection to a node: plain TCP or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One upstream connection with its read buffer.
pub struct Conn {
    pub io: Stream,
    /// Bytes read from the node and not consumed yet.
    pub buf: BytesMut,
    /// It served a request before (a failure before any answer may be a stale close).
    pub reused: bool,
    idle_since: Instant,
    /// The deadline of the answer being waited for (one timer for the connection's life).
    pub(crate) answer_deadline: LazyDeadline,
}

/// How connections to the nodes are made and kept. The idle connections themselves live on
/// each [`Node`], so that a reload (which builds a new pool from the new settings) keeps them.
pub struct Pool {
    tls: TlsConnector,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
}

impl Pool {
    pub fn new(
        tls: rustls::ClientConfig,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Pool {
        Pool {
            tls: TlsConnector::from(Arc::new(tls)),
            connect_timeout,
            idle_timeout,
            max_idle,
        }
    }

    fn idle<'n>(&self, node: &'n Node) -> MutexGuard<'n, Vec<Conn>> {
        node.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection to `node`: the most recently used idle one that is still open, else new.
    /// The clock is read here, not taken from the request's start: the session guard may have
    /// held the request for seconds (a burst's wait, a lookup in Qlik), and a connection
    /// idle longer than the timeout must not be taken for a fresh one.
    pub async fn checkout(&self, node: &Node) -> Result<Conn, ProxyError> {
        loop {
            let Some(conn) = self.idle(node).pop() else {
                break;
            };
            if conn.idle_since.elapsed() < self.idle_timeout && still_open(&conn) {
                return Ok(conn);
            }
        }
        self.connect(node).await
    }

    /// A new connection, bypassing the idle list (a retry after a stale one).
    pub async fn connect(&self, node: &Node) -> Result<Conn, ProxyError> {
        let unreachable = |detail: String| ProxyError::UpstreamUnreachable {
            upstream: node.name.clone(),
            detail,
        };
        let tcp = match tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((node.host.as_str(), node.port)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Err(_) => {
                return Err(unreachable(format!(
                    "no connection within {:?} (proxy.connect_timeout)",
                    self.connect_timeout
                )))
            }
        };
        let _ = tcp.set_nodelay(true);
        let io = if node.tls {
            let name = ServerName::try_from(node.host.clone())
                .map_err(|e| unreachable(format!("invalid TLS server name: {e}")))?;
            match tokio::time::timeout(self.connect_timeout, self.tls.connect(name, tcp)).await {
                Ok(Ok(s)) => Stream::Tls(Box::new(s)),
                Ok(Err(e)) => return Err(unreachable(format!("TLS handshake failed: {e}"))),
                Err(_) => return Err(unreachable("TLS handshake timed out".into())),
            }
        } else {
            Stream::Plain(tcp)
        };
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(8 * 1024),
            reused: false,
            idle_since: Instant::now(),
            answer_deadline: LazyDeadline::new(tokio::time::Instant::now()),
        })
    }

    /// Puts a connection whose last response was read to its end back for reuse.
    /// `now`: the end of its response, read once for it.
    pub fn checkin(&self, node: &Node, mut conn: Conn, now: Instant) {
        if !conn.buf.is_empty() {
            // Bytes past the end of the response: the connection is out of step. Close it.
            return;
        }
        conn.reused = true;
        conn.idle_since = now;
        let mut idle = self.idle(node);
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    /// How often [`Pool::reap`] should run.
    pub fn reap_every(&self) -> Duration {
        (self.idle_timeout / 2).max(Duration::from_millis(100))
    }

    /// Closes the node's idle connections older than the idle timeout.
    pub fn reap(&self, node: &Node) {
        self.idle(node)
            .retain(|c| c.idle_since.elapsed() < self.idle_timeout);
    }

    /// Idle connections per node (for tests and the admin API).
    pub fn idle_count(&self, node: &Node) -> usize {
        self.idle(node).len()
    }
}

/// An idle connection is usable if the node has not closed it (or sent anything unasked).
fn still_open(conn: &Conn) -> bool {
    let mut probe = [0u8; 1];
    matches!(
        conn.io.tcp().try_read(&mut probe),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}
