//! The HTTP/1.1 transport: one task per client connection runs the keep-alive loop; each
//! request's head is read and judged here ([`parse`]), then goes through the one request
//! lifecycle ([`super::lifecycle`]); this module supplies how its bytes come and go:
//!
//! - **read head**: bytes from the client until a complete head; a head the strict parser
//!   refuses is answered and the connection closed (it never reaches Qlik);
//! - **body**: the bytes after the head, then reads, framed anew for Qlik ([`chunked`]); a
//!   client that stalls for `server.header_read_timeout` between two reads is cut off;
//! - **answer / respond**: the guard's own answers, and Qlik's head as [`super::headers`]
//!   writes it followed by the body relayed as it comes; a `101` hands both sockets to the
//!   WebSocket tunnel; once a head is out, a failure closes the connection.
//!
//! Why not hyper here: a hyper server plus a hyper client cost two header maps, a channel and a
//! task hop per request; this path copies header bytes once and stays on one task, which is
//! what lets one core of qsguard keep up with one core of nginx. HTTP/2 (TLS + ALPN) is served
//! by hyper (`super::h2`) and goes through the same lifecycle.

pub mod chunked;
pub mod parse;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::bound::Bound;
use super::deadline::LazyDeadline;
use super::error::ProxyError;
use super::headers;
use super::lifecycle::{self, BodyPart, DeviceMemoCell, Exchange, Finish, Transport};
use super::pool::Conn;
use super::shutdown_watch::ShutdownWatch;
use super::{ConnInfo, Proxy, Settings};
use crate::pages::Page;
use chunked::Chunked;
use parse::{Framing, Head, Rejection};

/// What the connection does after a request.
enum Next {
    KeepAlive,
    Close,
    /// `101 Switching Protocols`: the connection becomes a tunnel to this upstream connection.
    Tunnel(Conn, Option<super::Engine>),
}

enum ReadHead<'a> {
    /// The head, parsed into the connection's slot for it.
    Head(&'a Head),
    Rejected(Rejection),
    Closed,
}

/// One client connection, and the request it is serving.
struct ClientConn<S> {
    io: S,
    /// Bytes from the client not consumed yet.
    buf: BytesMut,
    /// What goes to the client next.
    out: BytesMut,
    info: ConnInfo,
    /// Requests answered on this connection so far.
    served: u64,
    stop: ShutdownWatch,
    /// The current request head's deadline (one timer for the connection's life).
    head_deadline: LazyDeadline,
    /// The request body still to come.
    body: BodyState,
    /// `Expect: 100-continue` not answered yet.
    expect_continue: bool,
    /// The request asked to close the connection after its answer.
    close_asked: bool,
    next: Next,
    /// The upstream connection this client connection owns (connection-bound
    /// authentication); dropped, so closed, with it.
    private: Option<Bound>,
    device_memo: DeviceMemoCell,
}

/// Serves one client connection until it closes, the guard stops, or it becomes a tunnel.
pub async fn serve<S>(io: S, info: ConnInfo, proxy: Arc<Proxy>, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut c = ClientConn {
        io,
        buf: BytesMut::with_capacity(4096),
        out: BytesMut::with_capacity(4096),
        info,
        served: 0,
        stop: ShutdownWatch::new(stop),
        head_deadline: LazyDeadline::new(
            tokio::time::Instant::now() + proxy.settings().header_read_timeout,
        ),
        body: BodyState::Done,
        expect_continue: false,
        close_asked: false,
        next: Next::Close,
        private: None,
        device_memo: Default::default(),
    };
    // The request being served, lent to its exchange: kept here, not passed along by value,
    // it is not copied from future to future on its way.
    let mut slot: Option<Head> = None;
    loop {
        let head = match read_head(&mut c, &proxy, &mut slot).await {
            ReadHead::Head(h) => h,
            ReadHead::Closed => return,
            ReadHead::Rejected(r) => {
                tracing::info!(client = %info.peer, "refused: {}", r.describe());
                let _ = write_page(&mut c, ProxyError::Rejected(r).to_response(), true).await;
                return;
            }
        };
        c.body = BodyState::of(head.framing, proxy.settings().max_header_size);
        c.expect_continue = head.expect_continue && head.framing.has_body();
        c.close_asked = head.close;
        c.next = Next::Close;
        lifecycle::exchange(&proxy, &mut c, head).await;
        // Let go of it now: its bytes are a part of the read buffer, which can take the
        // next request's bytes in place only once no part of it is held.
        slot = None;
        c.served += 1;
        if matches!(c.next, Next::KeepAlive) {
            // Looked at first: taking `next` out moves a tunnel's connection along with it.
            c.next = Next::Close;
            continue;
        }
        match std::mem::replace(&mut c.next, Next::Close) {
            Next::KeepAlive => continue,
            Next::Close => {
                let _ = c.io.shutdown().await;
                return;
            }
            Next::Tunnel(conn, engine) => {
                let ClientConn { io, buf, .. } = c;
                proxy.spawn_tunnel_h1(io, buf, conn, engine);
                return;
            }
        }
    }
}

/// Reads a request head. The clock starts when the connection waits for a head, so it also
/// bounds idle keep-alive time (and slow-drip clients).
async fn read_head<'a, S: AsyncRead + Unpin>(
    c: &mut ClientConn<S>,
    proxy: &Proxy,
    slot: &'a mut Option<Head>,
) -> ReadHead<'a> {
    let settings = proxy.settings();
    c.head_deadline
        .set(tokio::time::Instant::now() + settings.header_read_timeout);
    let max_header_size = settings.max_header_size;
    drop(settings);
    loop {
        if !c.buf.is_empty() {
            match parse::parse_request(&c.buf, max_header_size) {
                Ok(Some((len, mut head))) => {
                    head.bytes = c.buf.split_to(len).freeze();
                    return ReadHead::Head(slot.insert(head));
                }
                Ok(None) => {}
                Err(r) => return ReadHead::Rejected(r),
            }
        }
        if c.buf.capacity() - c.buf.len() < 1024 {
            c.buf.reserve(8192);
        }
        let idle = c.buf.is_empty();
        tokio::select! {
            biased;
            r = c.io.read_buf(&mut c.buf) => match r {
                Ok(0) | Err(_) => return ReadHead::Closed,
                Ok(_) => {}
            },
            _ = c.head_deadline.expired() => {
                if !idle {
                    tracing::debug!(client = %c.info.peer, "request head not complete within server.header_read_timeout");
                }
                return ReadHead::Closed;
            }
            // Shutting down, an idle kept-alive connection is closed (a client retries a
            // request on a kept-alive connection that closes before answering). A new one is
            // not: its client opened it to send a request now, and closing it unanswered
            // would fail that request (a handover under load would show it). Its first
            // request is served, with `Connection: close`, within the head deadline.
            _ = c.stop.requested(), if idle && c.served > 0 => return ReadHead::Closed,
        }
    }
}

/// The request body still to come from the client, and how it is framed.
enum BodyState {
    Done,
    Length(u64),
    Chunked(Chunked),
}

impl BodyState {
    fn of(framing: Framing, max_trailer: usize) -> BodyState {
        match framing {
            Framing::Length(n) if n > 0 => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(Chunked::new(max_trailer)),
            _ => BodyState::Done,
        }
    }

    fn done(&self) -> bool {
        matches!(self, BodyState::Done)
    }

    /// Moves the body bytes at the front of `buf` to `out` (a chunked body framed anew).
    fn take(&mut self, buf: &mut BytesMut, out: &mut BytesMut) -> Result<BodyPart, ProxyError> {
        let n = match self {
            BodyState::Done => 0,
            BodyState::Length(left) => {
                let n = (*left).min(buf.len() as u64) as usize;
                *left -= n as u64;
                out.extend_from_slice(&buf[..n]);
                if *left == 0 {
                    *self = BodyState::Done;
                }
                n
            }
            BodyState::Chunked(tracker) => {
                let n = tracker.feed(buf, out).map_err(|e| {
                    tracing::debug!("request body refused: {}", e.0);
                    ProxyError::Rejected(Rejection::BadChunk)
                })?;
                if tracker.done() {
                    *self = BodyState::Done;
                }
                n
            }
        };
        let _ = buf.split_to(n);
        Ok(BodyPart {
            bytes: n as u64,
            done: self.done(),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Transport for ClientConn<S> {
    fn info(&self) -> ConnInfo {
        self.info
    }

    fn body_in_hand(&mut self, out: &mut BytesMut) -> Result<BodyPart, ProxyError> {
        self.body.take(&mut self.buf, out)
    }

    fn take_private(&mut self) -> Option<Bound> {
        self.private.take()
    }

    fn device_memo(&self) -> Option<&DeviceMemoCell> {
        Some(&self.device_memo)
    }

    fn private_node(&self) -> Option<&Arc<super::upstream::Node>> {
        self.private.as_ref().map(|b| &b.node)
    }

    async fn more_body(
        &mut self,
        out: &mut BytesMut,
        settings: &Settings,
    ) -> Result<BodyPart, ProxyError> {
        if std::mem::take(&mut self.expect_continue) && self.buf.is_empty() {
            // The guard answers the client's Expect itself (Qlik never sees the field).
            self.io
                .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(|_| ProxyError::ClientGone)?;
        }
        while self.buf.is_empty() {
            self.buf.reserve(16 * 1024);
            let read = self.io.read_buf(&mut self.buf);
            match tokio::time::timeout(settings.header_read_timeout, read).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ProxyError::ClientGone),
                Ok(Ok(_)) => {}
                Err(_) => {
                    tracing::info!(client = %self.info.peer, "request body stalled for server.header_read_timeout: connection closed");
                    return Err(ProxyError::ClientGone);
                }
            }
        }
        self.body.take(&mut self.buf, out)
    }

    async fn small_body(&mut self, limit: usize) -> Result<Bytes, ProxyError> {
        let n = match self.body {
            BodyState::Done => return Ok(Bytes::new()),
            BodyState::Length(n) if n as usize <= limit => n as usize,
            _ => {
                return Err(ProxyError::BadRequest(
                    "the end-session form is sent with a Content-Length of at most 8 KiB",
                ))
            }
        };
        while self.buf.len() < n {
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(ProxyError::ClientGone),
                Ok(_) => {}
            }
        }
        self.body = BodyState::Done;
        Ok(self.buf.split_to(n).freeze())
    }

    async fn answer(&mut self, x: Exchange<'_>, page: Page) {
        // An unread body would be read as the next request: close instead. So does a
        // refused request (what follows it cannot be trusted) and a stopping guard, and a
        // failed leg of a connection-bound handshake (the browser starts it again).
        let close = !self.body.done()
            || (x.private && self.private.is_none())
            || self.close_asked
            || self.stop.is_requested()
            || page
                .headers()
                .get(http::header::CONNECTION)
                .is_some_and(|v| v == "close");
        let status = page.status().as_u16();
        Finish::new(x).done(status, 0, "ok");
        self.next = match write_page(self, page, close).await {
            Ok(()) if !close => Next::KeepAlive,
            _ => Next::Close,
        };
    }

    async fn respond(
        &mut self,
        x: &mut Exchange<'_>,
        head: &Head,
        mut conn: Conn,
        extra: Vec<HeaderValue>,
        switching: bool,
    ) {
        let upgrade = x.head.upgrade;
        // A refused upgrade ends the connection (the client may already be sending frames).
        let close = self.close_asked
            || head.framing == Framing::UntilClose
            || (upgrade && !switching)
            || self.stop.is_requested();
        self.out.clear();
        headers::write_response_head(&mut self.out, head, &extra, close, switching);
        let st = x.settings.send_timeout;
        let (sent, relay) = relay_body(self, &mut conn, head.framing, st).await;
        if let Relay::UpstreamBroke(why) = &relay {
            let node = x.node.as_ref().map(|n| n.name.clone()).unwrap_or_default();
            tracing::warn!(client = %self.info.peer, upstream = %node, status = head.status, "the response broke off after its head was sent ({why}): the client connection is closed");
        }
        let engine = if switching {
            match (
                &x.proxy.sessions,
                x.ctx.as_ref().and_then(|c| c.session.clone()),
            ) {
                (Some(g), Some(s)) => {
                    let app = x.ctx.as_ref().and_then(|c| c.app.clone());
                    Some((g.clone(), s, app))
                }
                _ => None,
            }
        } else {
            None
        };
        // A 101 nobody asked for leaves the connection in another protocol: not reusable.
        let clean = relay == Relay::Complete && head.status != 101;
        let private = x.node.clone().filter(|_| x.private);
        let finish = Finish::of(x);
        if switching {
            finish.done(head.status, sent, relay.end());
            self.next = Next::Tunnel(conn, engine);
            return;
        }
        let keep = clean && !head.close;
        let conn = keep.then_some(conn);
        // A private connection that ends takes its client connection with it.
        let lost_private = private.is_some() && conn.is_none();
        match private {
            Some(node) => {
                self.private = conn.map(|conn| Bound { node, conn });
                finish.relayed(head.status, sent, relay.end(), None);
            }
            None => finish.relayed(head.status, sent, relay.end(), conn),
        }
        self.next = if close || !clean || lost_private {
            Next::Close
        } else {
            Next::KeepAlive
        };
    }
}

/// How the relay of a response ended once its head had gone to the client. After that point
/// no error page can be written (it would land inside the body the client is reading): the
/// client connection is closed, and the access log says why.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Relay {
    Complete,
    /// The response ends when Qlik closes the connection, and it did.
    UntilClose,
    ClientGone,
    ClientStalled,
    UpstreamBroke(String),
}

impl Relay {
    /// The word in the access log.
    fn end(&self) -> &'static str {
        match self {
            Relay::Complete | Relay::UntilClose => "ok",
            Relay::ClientGone => "client_gone",
            Relay::ClientStalled => "client_stalled",
            Relay::UpstreamBroke(_) => "upstream_broke",
        }
    }
}

/// Sends the response head in `c.out` and the body after it, as framed by `framing`; returns
/// the body bytes relayed and how it ended.
async fn relay_body<S: AsyncWrite + Unpin>(
    c: &mut ClientConn<S>,
    conn: &mut Conn,
    framing: Framing,
    st: Duration,
) -> (u64, Relay) {
    let mut sent: u64 = 0;
    let broke = |e: Option<io::Error>| {
        Relay::UpstreamBroke(match e {
            Some(e) => e.to_string(),
            None => "Qlik closed the connection before the end of the body".into(),
        })
    };
    match framing {
        Framing::None | Framing::Length(0) => {
            if let Err(r) = send(&mut c.io, &c.out, st).await {
                return (0, r);
            }
        }
        Framing::Length(n) => {
            let first = (n as usize).min(conn.buf.len());
            c.out.extend_from_slice(&conn.buf.split_to(first));
            sent += first as u64;
            if let Err(r) = send(&mut c.io, &c.out, st).await {
                return (sent, r);
            }
            while sent < n {
                conn.buf.reserve(16 * 1024);
                match conn.io.read_buf(&mut conn.buf).await {
                    Ok(0) => return (sent, broke(None)),
                    Err(e) => return (sent, broke(Some(e))),
                    Ok(_) => {}
                }
                let part = ((n - sent) as usize).min(conn.buf.len());
                let bytes = conn.buf.split_to(part);
                sent += part as u64;
                if let Err(r) = send(&mut c.io, &bytes, st).await {
                    return (sent, r);
                }
            }
        }
        Framing::Chunked => {
            let mut tracker = Chunked::new(256 * 1024);
            loop {
                match tracker.feed(&conn.buf, &mut c.out) {
                    Ok(take) => {
                        let _ = conn.buf.split_to(take);
                        sent += take as u64;
                    }
                    Err(e) => {
                        // What was good before the bad byte (the head at least) still goes.
                        let _ = send(&mut c.io, &c.out, st).await;
                        return (sent, Relay::UpstreamBroke(e.0.into()));
                    }
                }
                if tracker.done() {
                    break;
                }
                if let Err(r) = send(&mut c.io, &c.out, st).await {
                    return (sent, r);
                }
                c.out.clear();
                conn.buf.reserve(16 * 1024);
                match conn.io.read_buf(&mut conn.buf).await {
                    Ok(0) => return (sent, broke(None)),
                    Err(e) => return (sent, broke(Some(e))),
                    Ok(_) => {}
                }
            }
            if let Err(r) = send(&mut c.io, &c.out, st).await {
                return (sent, r);
            }
        }
        Framing::UntilClose => {
            c.out.extend_from_slice(&conn.buf.split());
            if let Err(r) = send(&mut c.io, &c.out, st).await {
                return (sent, r);
            }
            let mut chunk = BytesMut::with_capacity(16 * 1024);
            loop {
                chunk.clear();
                match conn.io.read_buf(&mut chunk).await {
                    Ok(0) => return (sent, Relay::UntilClose),
                    Err(e) => return (sent, broke(Some(e))),
                    Ok(n) => {
                        sent += n as u64;
                        if let Err(r) = send(&mut c.io, &chunk, st).await {
                            return (sent, r);
                        }
                    }
                }
            }
        }
    }
    (sent, Relay::Complete)
}

/// Writes to the client, giving up after `server.send_timeout` without completing: a client
/// that stopped reading must not hold a Qlik connection forever.
async fn send<S: AsyncWrite + Unpin>(
    io: &mut S,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), Relay> {
    let mut write = std::pin::pin!(io.write_all(bytes));
    // Most writes are done at once (the socket has room): no timer (and no clock read) for
    // them.
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    if let Poll::Ready(r) = first {
        return r.map_err(|_| Relay::ClientGone);
    }
    match tokio::time::timeout(limit, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Relay::ClientGone),
        Err(_) => Err(Relay::ClientStalled),
    }
}

/// Writes a response the guard made itself (error pages, the limit page, redirects).
async fn write_page<S: AsyncWrite + Unpin>(
    c: &mut ClientConn<S>,
    page: Page,
    close: bool,
) -> io::Result<()> {
    use http_body_util::BodyExt;
    let (parts, body) = page.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    c.out.clear();
    c.out.extend_from_slice(b"HTTP/1.1 ");
    c.out
        .extend_from_slice(&headers::status_digits(parts.status.as_u16()));
    c.out.extend_from_slice(b" ");
    c.out
        .extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    c.out.extend_from_slice(b"\r\n");
    for (name, value) in parts.headers.iter() {
        if name == http::header::CONNECTION || name == http::header::CONTENT_LENGTH {
            continue;
        }
        c.out.extend_from_slice(name.as_str().as_bytes());
        c.out.extend_from_slice(b": ");
        c.out.extend_from_slice(value.as_bytes());
        c.out.extend_from_slice(b"\r\n");
    }
    c.out.extend_from_slice(b"content-length: ");
    c.out
        .extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    c.out.extend_from_slice(b"\r\ndate: ");
    c.out
        .extend_from_slice(httpdate(std::time::SystemTime::now()).as_bytes());
    c.out.extend_from_slice(b"\r\n");
    if close {
        c.out.extend_from_slice(b"connection: close\r\n");
    }
    c.out.extend_from_slice(b"\r\n");
    c.out.extend_from_slice(&body);
    c.io.write_all(&c.out).await?;
    c.io.flush().await
}

/// RFC 9110 IMF-fixdate.
pub(crate) fn httpdate(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let (h, m, s) = ((secs % 86400) / 3600, (secs % 3600) / 60, secs % 60);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let (y, mo, d) = crate::proxy::datetime::civil_from_days(days);
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(mo - 1) as usize];
    format!("{weekday}, {d:02} {month} {y} {h:02}:{m:02}:{s:02} GMT")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_930_348_800);
        assert_eq!(httpdate(t), "Tue, 04 Mar 2031 00:00:00 GMT");
        assert_eq!(
            httpdate(std::time::UNIX_EPOCH),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
    }
}
