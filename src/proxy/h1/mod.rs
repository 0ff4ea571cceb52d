//! The HTTP/1.1 engine: one task per client connection runs the keep-alive loop, and each
//! request goes through these phases, in this order:
//!
//! 1. **read head**: bytes from the client until a complete head, judged by [`parse`] (a bad
//!    one is answered and the connection closed; it never reaches Qlik);
//! 2. **admit**: Host rules, CONNECT/TRACE, Content-Length over the limit;
//! 3. **guard**: the session guard decides (forward, restore, reuse, answer itself);
//! 4. **send**: a pooled connection to the session's node (or a new session's node), the head
//!    written field by field as the browser sent it (minus hop-by-hop fields, plus
//!    X-Forwarded-*), then the body, its framing passed on unchanged;
//! 5. **read response head**, with `proxy.response_timeout`;
//! 6. **respond**: the head as Qlik sent it (minus hop-by-hop fields), the guard's cookies
//!    after Qlik's, then the body; `101` hands both sockets to the WebSocket tunnel;
//! 7. **log**, and the upstream connection goes back to the pool if its response ended cleanly.
//!
//! Why not hyper here: a hyper server plus a hyper client cost two header maps, a channel and a
//! task hop per request; this path copies header bytes once and stays on one task, which is
//! what lets one core of qsguard keep up with one core of nginx. HTTP/2 (TLS + ALPN) still
//! goes through hyper (`proxy::Proxy::handle`).

pub mod chunked;
pub mod parse;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{Response, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::access_log::Record;
use super::error::ProxyError;
use super::pool::Conn;
use super::upstream::Node;
use super::{ConnInfo, Proxy};
use crate::session::{self, page, Verdict};
use chunked::Chunked;
use parse::{Framing, Head, Rejection};

/// What the connection does after a request.
enum Next {
    KeepAlive,
    Close,
    /// `101 Switching Protocols`: the connection becomes a tunnel to this upstream connection.
    Tunnel(Conn, Option<super::Engine>),
}

enum ReadHead {
    Head(Head),
    Rejected(Rejection),
    Closed,
}

/// Per-connection state kept between requests.
struct Client<S> {
    io: S,
    buf: BytesMut,
    out: BytesMut,
    info: ConnInfo,
    peer_text: String,
    /// The client's address as the trust check sees it (IPv4-mapped IPv6 as IPv4).
    peer: IpAddr,
    /// Requests answered on this connection so far.
    served: u64,
}

/// Serves one client connection until it closes, the guard stops, or it becomes a tunnel.
pub async fn serve<S>(io: S, info: ConnInfo, proxy: Arc<Proxy>, stop: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut c = Client {
        io,
        buf: BytesMut::with_capacity(4096),
        out: BytesMut::with_capacity(4096),
        info,
        peer_text: canonical(info.peer.ip()).to_string(),
        peer: canonical(info.peer.ip()),
        served: 0,
    };
    loop {
        let head = match read_head(&mut c, &proxy, &stop).await {
            ReadHead::Head(h) => h,
            ReadHead::Closed => return,
            ReadHead::Rejected(r) => {
                tracing::info!(client = %info.peer, "refused: {}", r.describe());
                let e = ProxyError::Rejected(r);
                let _ = write_answer(&mut c, e.to_response(), true).await;
                return;
            }
        };
        let next = exchange(&mut c, &proxy, head, &stop).await;
        c.served += 1;
        match next {
            Next::KeepAlive => continue,
            Next::Close => {
                let _ = c.io.shutdown().await;
                return;
            }
            Next::Tunnel(conn, engine) => {
                let Client { io, buf, .. } = c;
                proxy.spawn_tunnel_h1(io, buf, conn, engine);
                return;
            }
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Phase 1. The clock starts when the connection waits for a head, so it also bounds idle
/// keep-alive time (and slow-drip clients).
async fn read_head<S: AsyncRead + Unpin>(
    c: &mut Client<S>,
    proxy: &Proxy,
    stop: &CancellationToken,
) -> ReadHead {
    let settings = proxy.settings();
    let deadline = tokio::time::Instant::now() + settings.header_read_timeout;
    let max_header_size = settings.max_header_size;
    drop(settings);
    loop {
        if !c.buf.is_empty() {
            match parse::parse_request(&c.buf, max_header_size) {
                Ok(Some((len, mut head))) => {
                    head.bytes = c.buf.split_to(len).freeze();
                    return ReadHead::Head(head);
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
            r = tokio::time::timeout_at(deadline, c.io.read_buf(&mut c.buf)) => match r {
                Ok(Ok(0)) | Ok(Err(_)) => return ReadHead::Closed,
                Ok(Ok(_)) => {}
                Err(_) => {
                    if !idle {
                        tracing::debug!(client = %c.info.peer, "request head not complete within server.header_read_timeout");
                    }
                    return ReadHead::Closed;
                }
            },
            // Shutting down, an idle kept-alive connection is closed (a client retries a
            // request on a kept-alive connection that closes before answering). A new one is
            // not: its client opened it to send a request now, and closing it unanswered
            // would fail that request (a handover under load would show it). Its first
            // request is served, with `Connection: close`, within the head deadline.
            _ = stop.cancelled(), if idle && c.served > 0 => return ReadHead::Closed,
        }
    }
}

/// Phases 2 to 7 for one request.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    proxy: &Arc<Proxy>,
    head: Head,
    stop: &CancellationToken,
) -> Next {
    let started = Instant::now();
    let has_body = head.framing.has_body();
    // 2. admit
    if let Err(e) = admit(proxy, &head) {
        tracing::info!(client = %c.info.peer, "refused: {e}");
        let _ = write_answer(c, e.to_response(), true).await;
        return Next::Close;
    }
    if let Some(check) = &proxy.diagnostics.cookie_check {
        if let Some(resp) = check.handle(head.path(), head.query(), &head, c.info.tls) {
            let close = has_body || head.close;
            return answer(c, proxy, &head, resp, None, started, close).await;
        }
    }
    // 3. guard
    let mut ctx = None;
    if let Some(guard) = &proxy.sessions {
        if head.path() == page::END_SESSION_PATH {
            return end_session_form(c, proxy, guard, &head).await;
        }
        let view = session::Request {
            method: head.method(),
            path: head.path(),
            query: head.query(),
            headers: &head,
        };
        match guard.before(&view, c.info.peer.ip(), c.info.tls).await {
            Verdict::Pass => {}
            Verdict::Forward(x) => ctx = Some(x),
            Verdict::Answer(resp) => {
                // An unread body would be read as the next request: close instead.
                let close = has_body || head.close;
                return answer(c, proxy, &head, resp, None, started, close).await;
            }
        }
    }
    // 4. the node: a session lives in the memory of the node that made it.
    let sticky = proxy.sticky_in(&head);
    let node = match proxy.node_for(ctx.as_deref(), sticky.as_deref()) {
        Ok(n) => n,
        Err(e) => return fail(c, proxy, &head, ctx.as_deref(), None, e, started).await,
    };
    let busy = node.busy();
    let result = forward(
        c,
        proxy,
        &head,
        (&node, sticky.as_deref()),
        ctx.as_deref(),
        stop,
        started,
    )
    .await;
    drop(busy);
    match result {
        Ok(next) => next,
        Err(e) => fail(c, proxy, &head, ctx.as_deref(), Some(&node), e, started).await,
    }
}

/// The request could not be forwarded: the error page, and whatever the request held is given
/// back.
async fn fail<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    proxy: &Proxy,
    head: &Head,
    ctx: Option<&session::Context>,
    node: Option<&Arc<Node>>,
    e: ProxyError,
    started: Instant,
) -> Next {
    if let (Some(g), Some(x)) = (&proxy.sessions, ctx) {
        g.abandon(x);
    }
    if e.is_upstream() {
        if let Some(n) = node {
            proxy.diagnostics.metrics.upstream_error(&n.name, e.cause());
            if matches!(e, ProxyError::UpstreamUnreachable { .. }) {
                proxy.node_failed(n, &e.to_string());
            }
        }
        tracing::warn!(client = %c.info.peer, "{e}");
    } else if matches!(e, ProxyError::ClientGone) {
        tracing::debug!(client = %c.info.peer, "{e}");
    } else {
        tracing::info!(client = %c.info.peer, "refused: {e}");
    }
    if matches!(e, ProxyError::ClientGone) {
        // Nobody to answer: the line in the access log says what happened.
        let status = e.status().as_u16();
        log_ended(proxy, head, status, node, started, 0, c.info, "client_gone");
        return Next::Close;
    }
    let resp: Response<Full<Bytes>> = e.to_response();
    let close = head.framing.has_body() || head.close || !e.is_upstream();
    answer(c, proxy, head, resp, node, started, close).await
}

/// Logs and writes an answer the guard made itself; the connection goes on unless `close`.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    proxy: &Proxy,
    head: &Head,
    resp: Response<Full<Bytes>>,
    node: Option<&Arc<Node>>,
    started: Instant,
    close: bool,
) -> Next {
    log(
        proxy,
        head,
        resp.status().as_u16(),
        node,
        started,
        0,
        c.info,
    );
    match write_answer(c, resp, close).await {
        Ok(()) if !close => Next::KeepAlive,
        _ => Next::Close,
    }
}

fn admit(proxy: &Proxy, head: &Head) -> Result<(), ProxyError> {
    // Syntax, framing, Host and the target were judged by `parse::parse_request`.
    if head.method() == b"TRACE" {
        return Err(ProxyError::MethodNotAllowed);
    }
    if let Framing::Length(n) = head.framing {
        let limit = proxy.settings().max_body_size;
        if n > limit {
            return Err(ProxyError::PayloadTooLarge { limit });
        }
    }
    Ok(())
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

    /// Moves the body bytes at the front of `buf` to `out` (a chunked body framed anew);
    /// returns how many bytes of `buf` belonged to the body.
    fn take(&mut self, buf: &mut BytesMut, out: &mut BytesMut) -> Result<usize, ProxyError> {
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
        Ok(n)
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

/// Phases 4 to 7.
#[allow(clippy::too_many_arguments)]
async fn forward<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    proxy: &Arc<Proxy>,
    head: &Head,
    // The node, and the sticky cookie the request carried (it chose the node).
    (node, sticky): (&Arc<Node>, Option<&str>),
    ctx: Option<&session::Context>,
    stop: &CancellationToken,
    started: Instant,
) -> Result<Next, ProxyError> {
    let guard = proxy.sessions.as_ref();
    // This request's settings and pool, whatever a reload does meanwhile.
    let settings = proxy.settings.load_full();
    let upstreams = proxy.upstreams();
    let pool = &upstreams.pool;
    let failed = |detail: String| ProxyError::UpstreamFailed {
        upstream: node.name.clone(),
        detail,
    };

    // The head, and the part of the body already read, in one write.
    let mut req = BytesMut::with_capacity(head.bytes.len() + 256);
    let rewrite = match (guard, ctx) {
        (Some(g), Some(x)) => g.cookie_to_send(x),
        _ => None,
    };
    write_request_head(
        &mut req,
        head,
        proxy,
        (&c.peer_text, c.peer),
        c.info.tls,
        rewrite,
    );
    if head.expect_continue && head.framing.has_body() && c.buf.is_empty() {
        // The guard answers the client's Expect itself (it removed the field upstream).
        c.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| ProxyError::ClientGone)?;
    }
    let mut body = BodyState::of(head.framing, settings.max_header_size);
    let mut sent_body = body.take(&mut c.buf, &mut req)? as u64;
    if sent_body > settings.max_body_size {
        return Err(ProxyError::PayloadTooLarge {
            limit: settings.max_body_size,
        });
    }
    let whole = matches!(body, BodyState::Done);

    // 4. send, with one retry on a fresh connection when a reused one turns out to be closed
    // and the whole request is still in hand.
    let mut conn = pool.checkout(node).await?;
    if let Err(e) = conn.io.write_all(&req).await {
        if !(conn.reused && whole) {
            return Err(failed(e.to_string()));
        }
        conn = pool.connect(node).await?;
        conn.io
            .write_all(&req)
            .await
            .map_err(|e| failed(e.to_string()))?;
    }
    // The rest of the body, as it comes; a client that stalls for the header read timeout
    // between two reads is cut off (slowloris on the body), and Qlik's half request with it.
    let mut chunk = BytesMut::new();
    while !matches!(body, BodyState::Done) {
        if c.buf.is_empty() {
            c.buf.reserve(16 * 1024);
            let read = c.io.read_buf(&mut c.buf);
            match tokio::time::timeout(settings.header_read_timeout, read).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ProxyError::ClientGone),
                Ok(Ok(_)) => {}
                Err(_) => {
                    tracing::info!(client = %c.info.peer, "request body stalled for server.header_read_timeout: connection closed");
                    return Err(ProxyError::ClientGone);
                }
            }
        }
        chunk.clear();
        // A bad chunk: Qlik has half a request on this connection, which is dropped with it.
        sent_body += body.take(&mut c.buf, &mut chunk)? as u64;
        if sent_body > settings.max_body_size {
            return Err(ProxyError::PayloadTooLarge {
                limit: settings.max_body_size,
            });
        }
        conn.io
            .write_all(&chunk)
            .await
            .map_err(|e| failed(e.to_string()))?;
    }

    // 5. the response head
    let is_head = head.method() == b"HEAD";
    let resp = match read_response_head(&mut conn, proxy, is_head, node).await {
        Ok(r) => r,
        Err(e) if conn.reused && whole && matches!(e, ProxyError::UpstreamFailed { .. }) => {
            // A kept-alive connection Qlik closed just as it was reused: once more, fresh.
            conn = pool.connect(node).await?;
            conn.io
                .write_all(&req)
                .await
                .map_err(|e| failed(e.to_string()))?;
            read_response_head(&mut conn, proxy, is_head, node).await?
        }
        Err(e) => return Err(e),
    };
    drop(req);

    // 6. respond
    let node_name = node.name_arc();
    let mut extra = match (guard, ctx) {
        (Some(g), Some(x)) => g.after(x, &node_name, head.target(), resp.status, &resp),
        _ => Vec::new(),
    };
    if settings.sticky_cookie.is_some() {
        extra.extend(proxy.sticky_set_cookie(sticky, node, c.info.tls));
    }
    let switching = resp.status == 101 && head.upgrade;
    // A refused upgrade ends the connection (the client may already be sending frames).
    let close = head.close
        || resp.framing == Framing::UntilClose
        || (head.upgrade && !switching)
        || stop.is_cancelled();
    if let (Some(g), true) = (guard, is_refusal_candidate(&resp)) {
        // Qlik's own limit page: small, read whole, looked at, then passed on.
        if let Framing::Length(n) = resp.framing {
            while (conn.buf.len() as u64) < n {
                conn.buf.reserve(n as usize - conn.buf.len());
                match conn.io.read_buf(&mut conn.buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let user = ctx.and_then(|x| {
                x.identity
                    .clone()
                    .or_else(|| x.session.as_ref().and_then(|s| s.owner()))
            });
            g.note_possible_qps_refusal(&conn.buf[..(n as usize).min(conn.buf.len())], user);
        }
    }
    c.out.clear();
    write_response_head(&mut c.out, &resp, &extra, close, switching);
    let (sent, relay) = relay_body(c, &mut conn, resp.framing, settings.send_timeout).await;

    // 7. log, and give the connection back
    log_ended(
        proxy,
        head,
        resp.status,
        Some(node),
        started,
        sent,
        c.info,
        relay.end(),
    );
    if let Relay::UpstreamBroke(why) = &relay {
        tracing::warn!(client = %c.info.peer, upstream = %node.name, status = resp.status, "the response broke off after its head was sent ({why}): the client connection is closed");
    }
    if switching {
        let engine = match (guard, ctx.and_then(|x| x.session.clone())) {
            (Some(g), Some(s)) => Some((g.clone(), s, ctx.and_then(|x| x.app.clone()))),
            _ => None,
        };
        return Ok(Next::Tunnel(conn, engine));
    }
    // A 101 nobody asked for leaves the connection in another protocol: not reusable.
    let clean = relay == Relay::Complete && resp.status != 101;
    if clean && !resp.close {
        pool.checkin(node, conn);
    }
    if close || !clean {
        Ok(Next::Close)
    } else {
        Ok(Next::KeepAlive)
    }
}

/// Sends the response head in `c.out` and the body after it, as framed by `framing`.
async fn relay_body<S: AsyncWrite + Unpin>(
    c: &mut Client<S>,
    conn: &mut Conn,
    framing: Framing,
    st: std::time::Duration,
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
    limit: std::time::Duration,
) -> Result<(), Relay> {
    match tokio::time::timeout(limit, io.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Relay::ClientGone),
        Err(_) => Err(Relay::ClientStalled),
    }
}

async fn read_response_head(
    conn: &mut Conn,
    proxy: &Proxy,
    is_head: bool,
    node: &Node,
) -> Result<Head, ProxyError> {
    let deadline = tokio::time::Instant::now() + proxy.settings().response_timeout;
    loop {
        if !conn.buf.is_empty() {
            match parse::parse_response(&conn.buf, is_head) {
                Ok(Some((len, mut head))) => {
                    head.bytes = conn.buf.split_to(len).freeze();
                    if (100..200).contains(&head.status) && head.status != 101 {
                        // 100 Continue (answered by the guard already), 103 Early Hints: not
                        // passed on.
                        continue;
                    }
                    return Ok(head);
                }
                Ok(None) => {}
                Err(parse::Invalid(why)) => {
                    return Err(ProxyError::UpstreamFailed {
                        upstream: node.name.clone(),
                        detail: format!("the response cannot be passed on: {why}"),
                    })
                }
            }
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(8192);
        }
        match tokio::time::timeout_at(deadline, conn.io.read_buf(&mut conn.buf)).await {
            Err(_) => {
                return Err(ProxyError::UpstreamTimeout {
                    upstream: node.name.clone(),
                })
            }
            Ok(Ok(0)) => {
                return Err(ProxyError::UpstreamFailed {
                    upstream: node.name.clone(),
                    detail: "the connection was closed before an answer".into(),
                })
            }
            Ok(Err(e)) => {
                return Err(ProxyError::UpstreamFailed {
                    upstream: node.name.clone(),
                    detail: e.to_string(),
                })
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// Fields that belong to one connection only (RFC 9110 7.6.1).
const HOP_BY_HOP: [&[u8]; 7] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
];

/// Hop-by-hop fields, plus those the guard writes itself (Content-Length, Expect,
/// X-Forwarded-*).
fn request_field_dropped(name: &[u8]) -> bool {
    const OWN: [&[u8]; 4] = [
        b"content-length",
        b"expect",
        b"x-forwarded-proto",
        b"x-forwarded-host",
    ];
    HOP_BY_HOP.iter().any(|d| d.eq_ignore_ascii_case(name))
        || OWN.iter().any(|d| d.eq_ignore_ascii_case(name))
}

/// Hop-by-hop fields, plus the framing the engine writes itself (Content-Length).
fn response_field_dropped(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|d| d.eq_ignore_ascii_case(name))
        || name.eq_ignore_ascii_case(b"content-length")
}

/// The request head as the node gets it: the request line and the framing written by the
/// engine from what it parsed, the browser's other fields byte for byte except the hop-by-hop
/// ones (and those `Connection` names, which the parser made sure are none of Host, framing or
/// Cookie); the restored cookie put in place; X-Forwarded-* set.
fn write_request_head(
    out: &mut BytesMut,
    head: &Head,
    proxy: &Proxy,
    (peer, peer_ip): (&str, IpAddr),
    tls: bool,
    cookie: Option<(&str, &str)>,
) {
    out.extend_from_slice(head.method());
    out.extend_from_slice(b" ");
    out.extend_from_slice(head.target().as_bytes());
    out.extend_from_slice(if head.minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let trusted = proxy.settings().trusted.trusts(peer_ip);
    let named = head.connection_tokens();
    let mut cookie_done = cookie.is_none();
    let mut xff: Option<BytesMut> = None;
    let mut proto: Option<&[u8]> = None;
    let mut fwd_host: Option<&[u8]> = None;
    let mut host: Option<&[u8]> = None;
    let mut upgrade: Option<&[u8]> = None;
    for i in 0..head.len() {
        let (name, value) = head.field(i);
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            if trusted {
                let chain = xff.get_or_insert_with(BytesMut::new);
                if !chain.is_empty() {
                    chain.extend_from_slice(b", ");
                }
                chain.extend_from_slice(value);
            }
            continue;
        }
        if name.eq_ignore_ascii_case(b"host") {
            host = Some(value);
        } else if name.eq_ignore_ascii_case(b"x-forwarded-proto") {
            proto = Some(value);
        } else if name.eq_ignore_ascii_case(b"x-forwarded-host") {
            fwd_host = Some(value);
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = Some(value);
        }
        if request_field_dropped(name)
            || (!named.is_empty() && named.iter().any(|t| t.eq_ignore_ascii_case(name)))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        if !cookie_done && name.eq_ignore_ascii_case(b"cookie") {
            if let Some((n, v)) = cookie {
                if let Some(new) = session::cookies::replace_in_field(value, n, v) {
                    out.extend_from_slice(&new);
                    cookie_done = true;
                } else {
                    out.extend_from_slice(&session::cookies::append_to_field(Some(value), n, v));
                    cookie_done = true;
                }
            }
        } else {
            out.extend_from_slice(value);
        }
        out.extend_from_slice(b"\r\n");
    }
    if let (false, Some((n, v))) = (cookie_done, cookie) {
        out.extend_from_slice(b"cookie: ");
        out.extend_from_slice(&session::cookies::append_to_field(None, n, v));
        out.extend_from_slice(b"\r\n");
    }
    write_framing(out, head);
    if let (true, Some(u)) = (head.upgrade, upgrade) {
        out.extend_from_slice(b"connection: upgrade\r\nupgrade: ");
        out.extend_from_slice(u);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(chain) = xff {
        out.extend_from_slice(&chain);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(peer.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    match (trusted, proto) {
        (true, Some(p)) => out.extend_from_slice(p),
        _ => out.extend_from_slice(if tls { b"https" } else { b"http" }),
    }
    out.extend_from_slice(b"\r\n");
    match (trusted, fwd_host, host) {
        (true, Some(h), _) | (_, _, Some(h)) => {
            out.extend_from_slice(b"x-forwarded-host: ");
            out.extend_from_slice(h);
            out.extend_from_slice(b"\r\n");
        }
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// The response head as the browser gets it: Qlik's fields byte for byte and in order (every
/// `Set-Cookie` its own line), minus hop-by-hop ones; the guard's cookies after Qlik's.
fn write_response_head(
    out: &mut BytesMut,
    resp: &Head,
    extra: &[http::HeaderValue],
    close: bool,
    switching: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut code = itoa_status(resp.status);
    out.extend_from_slice(code.as_mut());
    out.extend_from_slice(b" ");
    out.extend_from_slice(resp.reason());
    out.extend_from_slice(b"\r\n");
    let named = resp.connection_tokens();
    let mut upgrade: Option<&[u8]> = None;
    for i in 0..resp.len() {
        let (name, value) = resp.field(i);
        if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = Some(value);
        }
        if response_field_dropped(name) || named.iter().any(|t| t.eq_ignore_ascii_case(name)) {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    for v in extra {
        out.extend_from_slice(b"set-cookie: ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    write_framing(out, resp);
    if switching {
        out.extend_from_slice(b"connection: upgrade\r\n");
        if let Some(u) = upgrade {
            out.extend_from_slice(b"upgrade: ");
            out.extend_from_slice(u);
            out.extend_from_slice(b"\r\n");
        }
    } else if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The framing fields of a message, from what the parser found: `Transfer-Encoding` (chunked,
/// after any other codings a response had) or `Content-Length` as a plain decimal.
fn write_framing(out: &mut BytesMut, head: &Head) {
    if head.framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: ");
        out.extend_from_slice(head.codings.as_deref().unwrap_or(b"chunked"));
        out.extend_from_slice(b"\r\n");
    } else if let Some(n) = head.length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

fn itoa_status(code: u16) -> [u8; 3] {
    [
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]
}

/// A small HTML 4xx from Qlik may be its "too many sessions" page.
fn is_refusal_candidate(resp: &Head) -> bool {
    use crate::head_view::HeadView;
    (400..500).contains(&resp.status)
        && matches!(resp.framing, Framing::Length(n) if n <= 64 * 1024)
        && resp
            .first("content-type")
            .is_some_and(|v| v.starts_with(b"text/html"))
}

/// Writes a response the guard made itself (error pages, the limit page, redirects).
async fn write_answer<S: AsyncWrite + Unpin>(
    c: &mut Client<S>,
    resp: Response<Full<Bytes>>,
    close: bool,
) -> io::Result<()> {
    use http_body_util::BodyExt;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    c.out.clear();
    c.out.extend_from_slice(b"HTTP/1.1 ");
    c.out.extend_from_slice(&itoa_status(parts.status.as_u16()));
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
    c.out.extend_from_slice(body.len().to_string().as_bytes());
    c.out.extend_from_slice(b"\r\n");
    c.out.extend_from_slice(b"date: ");
    c.out.extend_from_slice(httpdate_now().as_bytes());
    c.out.extend_from_slice(b"\r\n");
    if close {
        c.out.extend_from_slice(b"connection: close\r\n");
    }
    c.out.extend_from_slice(b"\r\n");
    c.out.extend_from_slice(&body);
    c.io.write_all(&c.out).await?;
    c.io.flush().await
}

fn httpdate_now() -> String {
    httpdate(std::time::SystemTime::now())
}

/// RFC 9110 IMF-fixdate.
fn httpdate(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86400;
    let (h, m, s) = ((secs % 86400) / 3600, (secs % 3600) / 60, secs % 60);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    // Civil from days (Howard Hinnant).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(mo - 1) as usize];
    format!("{weekday}, {d:02} {month} {y} {h:02}:{m:02}:{s:02} GMT")
}

/// `POST /__qsguard/end-session` (the limit page's buttons).
async fn end_session_form<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Client<S>,
    proxy: &Proxy,
    guard: &session::SessionGuard,
    head: &Head,
) -> Next {
    let started = Instant::now();
    let body = match head.framing {
        Framing::Length(n) if n <= 8 * 1024 => {
            while (c.buf.len() as u64) < n {
                match c.io.read_buf(&mut c.buf).await {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(_) => {}
                }
            }
            c.buf.split_to(n as usize).freeze()
        }
        Framing::None => Bytes::new(),
        _ => {
            let e = ProxyError::BadRequest(
                "the end-session form is sent with a Content-Length of at most 8 KiB",
            );
            let _ = write_answer(c, e.to_response(), true).await;
            return Next::Close;
        }
    };
    let resp = guard.end_session_form(head.method(), head, &body).await;
    answer(c, proxy, head, resp, None, started, head.close).await
}

fn log(
    proxy: &Proxy,
    head: &Head,
    status: u16,
    node: Option<&Arc<Node>>,
    started: Instant,
    bytes: u64,
    info: ConnInfo,
) {
    log_ended(proxy, head, status, node, started, bytes, info, "ok")
}

/// The access-log line and the metrics of one request; `end` says how its answer ended.
#[allow(clippy::too_many_arguments)]
fn log_ended(
    proxy: &Proxy,
    head: &Head,
    status: u16,
    node: Option<&Arc<Node>>,
    started: Instant,
    bytes: u64,
    info: ConnInfo,
    end: &'static str,
) {
    proxy
        .diagnostics
        .metrics
        .request(status, started.elapsed().as_secs_f64());
    if !proxy.settings().log_requests {
        return;
    }
    let method = http::Method::from_bytes(head.method()).unwrap_or(http::Method::GET);
    Record {
        method,
        path: head.path().to_string(),
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        upstream: node.map(|n| n.name.clone()),
        started,
        bytes,
        peer: info.peer.ip(),
        end,
    }
    .emit();
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

    #[test]
    fn status_digits() {
        assert_eq!(&itoa_status(101), b"101");
        assert_eq!(&itoa_status(429), b"429");
    }
}
