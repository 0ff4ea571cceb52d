//! One request's life, the same for HTTP/1 and HTTP/2: a short sequence of named phases that
//! a reader can follow top to bottom.
//!
//! 1. **admit**: refuse what must not reach Qlik (the transport's parser has judged the
//!    syntax and framing already; here: TRACE, a body over the limit);
//!    the guard's own endpoints (the cookie self-test, the limit page's form) answer here;
//! 2. **guard**: the session guard decides ([`SessionGuard::before`]): forward, restore,
//!    reuse, hold, or answer itself (the limit page, a bad identity header);
//! 3. **choose node**: the session's node, the login dance's node, the sticky cookie's node,
//!    else the least loaded ([`Proxy::node_for`]);
//! 4. **send**: a pooled connection to the node, the head as [`headers::write_request_head`]
//!    writes it, then the body as the transport brings it, framed by the engine;
//! 5. **read response head**, within `proxy.response_timeout` (one retry on a fresh
//!    connection when a kept-alive one turns out closed and the whole request is in hand);
//! 6. **after**: what the response teaches the guard, the guard's and the sticky cookie's
//!    `Set-Cookie`s, Qlik's own refusal page looked at;
//! 7. **respond**: the transport sends the answer and relays the body (HTTP/1: bytes on the
//!    socket, a `101` becomes a tunnel; HTTP/2: a response whose body streams from Qlik);
//! 8. **log**: [`Finish::done`] writes the access-log line, counts the request, and gives
//!    the upstream connection back to the pool if its response ended cleanly.
//!
//! A transport ([`Transport`]) supplies only how bytes come and go: the request head in the
//! engine's form ([`Head`]), the body, and the way answers are sent. Whatever the request
//! holds in the session guard (a slot in its user's count, its browser's flight) is released
//! by dropping its [`Context`](crate::session::Context), so no exit from these phases can
//! leak one.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use tokio::io::AsyncWriteExt;

use super::access_log::Record;
use super::bound::Bound;
use super::error::ProxyError;
use super::h1::parse::{self, Framing, Head};
use super::headers;
use super::pool::Conn;
use super::upstream::{Node, Upstreams};
use super::{ConnInfo, Proxy, Settings};
use crate::pages::{self, Page};
use crate::session::{self, Verdict};

/// How much of the request body a transport handed on.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BodyPart {
    /// Body bytes (not framing) appended this time.
    pub bytes: u64,
    /// The body is complete.
    pub done: bool,
}

/// What a protocol supplies to the lifecycle.
pub(crate) trait Transport: Send {
    fn info(&self) -> ConnInfo;

    /// Appends the request body bytes that came with the head to `out`, framed for Qlik,
    /// without waiting for more.
    fn body_in_hand(&mut self, out: &mut BytesMut) -> Result<BodyPart, ProxyError>;

    /// Waits for more of the request body and appends it to `out`, framed for Qlik.
    fn more_body(
        &mut self,
        out: &mut BytesMut,
        settings: &Settings,
    ) -> impl Future<Output = Result<BodyPart, ProxyError>> + Send;

    /// The whole request body, when it is at most `limit` bytes (the end-session form).
    fn small_body(
        &mut self,
        limit: usize,
    ) -> impl Future<Output = Result<Bytes, ProxyError>> + Send;

    /// Sends an answer the guard wrote itself, and logs it.
    fn answer(&mut self, x: Exchange<'_>, page: Page) -> impl Future<Output = ()> + Send;

    /// Sends Qlik's answer: its head as [`headers`] filters it plus the guard's `extra`
    /// cookies, then the body relayed from `conn`; ends with [`Finish::done`]. A `private`
    /// exchange's connection is the transport's to keep ([`super::bound`]), never the pool's.
    /// `switching`: a `101` to an upgrade request, the connection becomes a tunnel.
    ///
    /// The exchange and the response head are lent, not given: the future is built and then
    /// moved twice on its way to being polled, and everything given it by value goes along
    /// each time (some 650 bytes, four copies per request when this took one `Reply`).
    fn respond(
        &mut self,
        x: &mut Exchange<'_>,
        head: &Head,
        conn: Conn,
        extra: Vec<HeaderValue>,
        switching: bool,
    ) -> impl Future<Output = ()> + Send;

    /// The upstream connection private to this client connection, if it has one (HTTP/2
    /// never does: an NTLM request is refused there).
    fn take_private(&mut self) -> Option<Bound> {
        None
    }

    /// The connection's memory of its device cookie ([`session::device::DeviceMemo`]): an
    /// HTTP/1 connection's, or the HTTP/2 connection's that its streams share.
    fn device_memo(&self) -> Option<&DeviceMemoCell> {
        None
    }

    /// The node of [`Transport::take_private`]'s connection, without taking it.
    fn private_node(&self) -> Option<&Arc<Node>> {
        None
    }
}

pub(crate) type DeviceMemoCell = std::sync::Mutex<session::device::DeviceMemo>;

/// One request on its way through the phases. The request head is lent by the transport:
/// a head given by value is copied each time the futures it passes through are moved.
pub(crate) struct Exchange<'h> {
    pub proxy: Arc<Proxy>,
    pub head: &'h Head,
    pub info: ConnInfo,
    pub started: Instant,
    /// The settings and nodes this request started with: a reload meanwhile changes neither.
    pub settings: Arc<Settings>,
    pub upstreams: Arc<Upstreams>,
    /// What the session guard decided; holds the request's slot and flight until dropped.
    pub ctx: Option<Box<session::Context>>,
    /// The sticky cookie the request carried (only next to a session cookie).
    pub sticky: Option<String>,
    pub node: Option<Arc<Node>>,
    /// The upstream connection belongs to this client connection (connection-bound
    /// authentication): it is not pooled, and if it breaks the client connection closes.
    pub private: bool,
}

/// Runs the phases for one request whose head `head` came over `t`.
pub(crate) async fn exchange<T: Transport>(proxy: &Arc<Proxy>, t: &mut T, head: &Head) {
    let private = crate::ntlm::request_binds(head);
    let mut x = Exchange {
        proxy: proxy.clone(),
        head,
        info: t.info(),
        started: Instant::now(),
        settings: proxy.settings.load_full(),
        upstreams: proxy.upstreams(),
        ctx: None,
        sticky: None,
        node: None,
        private,
    };
    // 1. admit
    if let Err(e) = admit(&x) {
        return fail(t, x, e).await;
    }
    if is_own_endpoint(&x) {
        if let Some(page) = own_endpoint(&x, t).await {
            return t.answer(x, page).await;
        }
    }
    // 2. guard
    if let Some(page) = guard(&mut x, t.device_memo()).await {
        return t.answer(x, page).await;
    }
    // 3. choose node: a private connection's, unless the request goes with a session that
    // lives on another node (that one would be lost there; the private connection waits).
    x.sticky = Proxy::sticky_in(&x.settings, x.head);
    let session_node = x
        .ctx
        .as_deref()
        .and_then(|c| c.session.as_ref().map(|s| &s.node));
    let bound = match t.private_node() {
        Some(n) if session_node.is_none_or(|s| **s == *n.name) => t.take_private(),
        _ => None,
    };
    x.private |= bound.is_some();
    let node = match &bound {
        Some(b) => b.node.clone(),
        None => match proxy.node_for(&x.upstreams, x.ctx.as_deref(), x.sticky.as_deref()) {
            Ok(n) => n,
            Err(e) => return fail(t, x, e).await,
        },
    };
    x.node = Some(node.clone());
    let busy = node.busy();
    // 4. send, 5. read response head
    let (head, mut conn) = match send(&x, t, &node, bound.map(|b| b.conn)).await {
        Ok(r) => r,
        Err(e) => {
            drop(busy);
            return fail(t, x, e).await;
        }
    };
    x.private |= crate::ntlm::response_binds(head.status, &head);
    // 6. after
    let extra = match after(&mut x, &head, &mut conn).await {
        Ok(After::Relay(extra)) => extra,
        Ok(After::Answer(page)) => {
            drop(busy);
            return t.answer(x, page).await;
        }
        Err(e) => {
            drop(busy);
            return fail(t, x, e).await;
        }
    };
    drop(busy);
    // 7. respond (and 8. log, when the body has gone)
    let switching = head.status == 101 && x.head.upgrade;
    t.respond(&mut x, &head, conn, extra, switching).await
}

/// Phase 1: what must not reach Qlik, beyond what the transport's parser judged.
fn admit(x: &Exchange<'_>) -> Result<(), ProxyError> {
    if x.head.method() == b"TRACE" {
        return Err(ProxyError::MethodNotAllowed);
    }
    if let Framing::Length(n) = x.head.framing {
        if n > x.settings.max_body_size {
            return Err(ProxyError::PayloadTooLarge {
                limit: x.settings.max_body_size,
            });
        }
    }
    Ok(())
}

/// The request is for one of [`own_endpoint`]'s paths. Asked first, so that the other
/// requests, nearly all, do not build and move that future and its empty answer.
fn is_own_endpoint(x: &Exchange<'_>) -> bool {
    let path = x.head.path();
    x.proxy
        .diagnostics
        .cookie_check
        .as_ref()
        .is_some_and(|c| c.owns(path))
        || (x.proxy.sessions.is_some() && path == pages::END_SESSION_PATH)
}

/// The guard's own endpoints: the cookie self-test, the limit page's end-session form.
async fn own_endpoint<T: Transport>(x: &Exchange<'_>, t: &mut T) -> Option<Page> {
    let head = x.head;
    if let Some(check) = &x.proxy.diagnostics.cookie_check {
        if let Some(page) = check.handle(head.path(), head.query(), head, x.info.tls) {
            return Some(page);
        }
    }
    let guard = x.proxy.sessions.as_ref()?;
    if head.path() != pages::END_SESSION_PATH {
        return None;
    }
    // Small, so the head's deadline fits it: a form that trickles in must not hold the
    // connection (and its task) forever.
    let read = tokio::time::timeout(x.settings.header_read_timeout, t.small_body(8 * 1024));
    Some(match read.await {
        // Boxed: the form's future (a QPS call) is some 2.5 KB, and every exchange's future
        // would carry it, for a form sent once in a while.
        Ok(Ok(body)) => Box::pin(guard.end_session_form(head.method(), head, &body)).await,
        Ok(Err(e)) => e.to_response(),
        Err(_) => ProxyError::ClientTooSlow(
            "the end-session form did not arrive within server.header_read_timeout",
        )
        .to_response(),
    })
}

/// Phase 2: the session guard's decision; `Some` when it answers itself.
async fn guard(x: &mut Exchange<'_>, device_memo: Option<&DeviceMemoCell>) -> Option<Page> {
    let guard = x.proxy.sessions.as_ref()?;
    let view = session::Request {
        method: x.head.method(),
        path: x.head.path(),
        query: x.head.query(),
        headers: x.head,
        device_memo,
    };
    // The scheme the browser used: TLS here, or what a trusted proxy in front says.
    let https = headers::browser_used_https(x.head, &x.settings.trusted, x.info);
    match guard.before(&view, x.info.peer.ip(), https).await {
        Verdict::Pass => None,
        Verdict::Forward(ctx) => {
            x.ctx = Some(ctx);
            None
        }
        Verdict::Answer(page) => Some(page),
    }
}

/// Phases 4 and 5: the request to `node` (over `private`, the client connection's own
/// upstream connection, when it has one), and Qlik's response head.
async fn send<T: Transport>(
    x: &Exchange<'_>,
    t: &mut T,
    node: &Arc<Node>,
    private: Option<Conn>,
) -> Result<(Head, Conn), ProxyError> {
    let pool = &x.upstreams.pool;
    let failed = |detail: String| ProxyError::UpstreamFailed {
        upstream: node.name.clone(),
        detail,
    };
    // The head, and the part of the body already in hand, in one write.
    let mut req = HeadBuf::lend(x.head.bytes.len() + 256);
    let cookie = match (&x.proxy.sessions, &x.ctx) {
        (Some(g), Some(c)) => g.cookie_to_send(c),
        _ => None,
    };
    headers::write_request_head(
        &mut req,
        x.head,
        &x.settings.trusted,
        &x.settings.identity,
        x.info,
        cookie,
    );
    let limit = x.settings.max_body_size;
    let too_large = || ProxyError::PayloadTooLarge { limit };
    let first = t.body_in_hand(&mut req)?;
    let mut sent = first.bytes;
    if sent > limit {
        return Err(too_large());
    }
    let whole = first.done;
    // One retry on a fresh connection when a reused one turns out to be closed and the whole
    // request is still in hand; never for a private one: a fresh connection would not hold
    // the handshake, so the browser must start over.
    let retry = whole && private.is_none();
    let mut conn = match private {
        Some(c) => c,
        None => pool.checkout(node).await?,
    };
    if let Err(e) = conn.io.write_all(&req).await {
        if !(conn.reused && retry) {
            return Err(failed(e.to_string()));
        }
        conn = pool.connect(node).await?;
        conn.io
            .write_all(&req)
            .await
            .map_err(|e| failed(e.to_string()))?;
    }
    // The rest of the body, as it comes. A failure here leaves Qlik half a request on this
    // connection, which is dropped with it (never pooled).
    let mut part = BytesMut::new();
    let mut done = whole;
    // Only for a body still to come: its clock read is saved on every other request.
    let pace = (!done).then(|| BodyPace::new(&x.settings));
    while let (false, Some(pace)) = (done, &pace) {
        part.clear();
        let got = pace
            .within(sent, t.more_body(&mut part, &x.settings))
            .await?;
        sent += got.bytes;
        if sent > limit {
            return Err(too_large());
        }
        done = got.done;
        conn.io
            .write_all(&part)
            .await
            .map_err(|e| failed(e.to_string()))?;
    }
    let is_head = x.head.method() == b"HEAD";
    let timeout = x.settings.response_timeout;
    match read_response_head(&mut conn, timeout, is_head, node).await {
        Ok(h) => Ok((h, conn)),
        Err(ProxyError::UpstreamFailed { .. }) if conn.reused && retry => {
            // A kept-alive connection Qlik closed just as it was reused: once more, fresh.
            let mut conn = pool.connect(node).await?;
            conn.io
                .write_all(&req)
                .await
                .map_err(|e| failed(e.to_string()))?;
            let h = read_response_head(&mut conn, timeout, is_head, node).await?;
            Ok((h, conn))
        }
        Err(e) => Err(e),
    }
}

/// The least pace of a request body. A per-read timeout alone (HTTP/1's
/// `server.header_read_timeout`) lets a client that sends one byte per read hold a
/// connection, a task and a Qlik connection forever; HTTP/2 has no per-read timeout at all.
/// A fixed total deadline would cut off real uploads: a QMC app upload of a few GB on a slow
/// link legitimately takes hours. So, like Apache's mod_reqtimeout (`MinRate`), the deadline
/// grows with what has arrived: a body must have
/// brought `server.body_min_rate` bytes per second on average, after a first
/// `server.header_read_timeout` of grace (the first bytes of a large upload, Expect: 100
/// continue). A fast upload of any size passes; a trickle is cut within seconds.
struct BodyPace {
    start: tokio::time::Instant,
    grace: std::time::Duration,
    /// Bytes per second; 0: no rule.
    rate: u64,
}

impl BodyPace {
    fn new(settings: &Settings) -> BodyPace {
        BodyPace {
            start: tokio::time::Instant::now(),
            grace: settings.header_read_timeout,
            rate: settings.body_min_rate,
        }
    }

    /// `read`, unless the body falls behind the pace before it gives something.
    async fn within<T>(
        &self,
        sent: u64,
        read: impl Future<Output = Result<T, ProxyError>>,
    ) -> Result<T, ProxyError> {
        if self.rate == 0 {
            return read.await;
        }
        let earned = std::time::Duration::from_secs_f64(sent as f64 / self.rate as f64);
        match tokio::time::timeout_at(self.start + self.grace + earned, read).await {
            Ok(r) => r,
            Err(_) => Err(ProxyError::ClientTooSlow(
                "the request body came slower than server.body_min_rate (after the grace of server.header_read_timeout)",
            )),
        }
    }
}

/// The buffer a request is written into on its way to Qlik, lent by the thread and given back
/// when dropped: a buffer per request would cost an allocation and a free on every request.
/// One that grew past [`HeadBuf::KEEP`] (a large head or body part) is let go.
struct HeadBuf(BytesMut);

thread_local! {
    static SPARE_BUFS: super::spare::Spares<BytesMut> = const { std::cell::RefCell::new(Vec::new()) };
}

impl HeadBuf {
    const KEEP: usize = 64 * 1024;
    /// Buffers a thread keeps: one per request being sent on it at once, a few at most.
    const SPARE: usize = 8;

    fn lend(room: usize) -> HeadBuf {
        let mut buf = super::spare::take(&SPARE_BUFS).unwrap_or_default();
        buf.reserve(room);
        HeadBuf(buf)
    }
}

impl std::ops::Deref for HeadBuf {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.0
    }
}

impl std::ops::DerefMut for HeadBuf {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.0
    }
}

impl Drop for HeadBuf {
    fn drop(&mut self) {
        if self.0.capacity() > Self::KEEP {
            return;
        }
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        super::spare::give(&SPARE_BUFS, buf, Self::SPARE);
    }
}

/// Phase 5: the response head from `conn`, skipping interim answers (100 Continue was
/// answered by the guard itself; 103 Early Hints are not passed on).
async fn read_response_head(
    conn: &mut Conn,
    timeout: std::time::Duration,
    is_head: bool,
    node: &Node,
) -> Result<Head, ProxyError> {
    use tokio::io::AsyncReadExt;
    conn.answer_deadline
        .set(tokio::time::Instant::now() + timeout);
    let failed = |detail: String| ProxyError::UpstreamFailed {
        upstream: node.name.clone(),
        detail,
    };
    loop {
        if !conn.buf.is_empty() {
            match parse::parse_response(&conn.buf, is_head) {
                Ok(Some((len, mut head))) => {
                    head.bytes = conn.buf.split_to(len).freeze();
                    if (100..200).contains(&head.status) && head.status != 101 {
                        continue;
                    }
                    return Ok(head);
                }
                Ok(None) => {}
                Err(parse::Invalid(why)) => {
                    return Err(failed(format!("the response cannot be passed on: {why}")))
                }
            }
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(8192);
        }
        let read = tokio::select! {
            biased;
            r = conn.io.read_buf(&mut conn.buf) => r,
            _ = conn.answer_deadline.expired() => {
                return Err(ProxyError::UpstreamTimeout {
                    upstream: node.name.clone(),
                })
            }
        };
        match read {
            Ok(0) => return Err(failed("the connection was closed before an answer".into())),
            Err(e) => return Err(failed(e.to_string())),
            Ok(_) => {}
        }
    }
}

/// What phase 6 decided.
enum After {
    /// Qlik's answer goes on, with the guard's `Set-Cookie`s after Qlik's.
    Relay(Vec<HeaderValue>),
    /// Qlik's refusal was turned into another login (`on_limit = "evict"`): this instead.
    Answer(Page),
}

/// Phase 6: what the response teaches the guard; the `Set-Cookie`s the guard adds. Fails only
/// when a body it must look at does not come in time.
async fn after(x: &mut Exchange<'_>, resp: &Head, conn: &mut Conn) -> Result<After, ProxyError> {
    let node = x.node.as_ref().expect("a node was chosen");
    let mut extra = match (&x.proxy.sessions, x.ctx.as_deref_mut()) {
        (Some(g), Some(c)) => g.after(c, &node.name_arc(), x.head.target(), resp.status, resp),
        _ => Vec::new(),
    };
    // A pair: a new session's answer waits until the store has it (boxed: only a login's).
    if let (Some(g), Some(c)) = (&x.proxy.sessions, x.ctx.as_deref_mut()) {
        if let Some(settled) = g.settle(c) {
            settled.await;
        }
    }
    if x.settings.sticky_cookie.is_some() {
        extra.extend(Proxy::sticky_set_cookie(
            &x.settings,
            &x.upstreams,
            x.sticky.as_deref(),
            node,
            x.info.tls,
        ));
    }
    if let (Some(g), Some(n)) = (&x.proxy.sessions, refusal_candidate(resp)) {
        // Qlik's own limit page: small (at most 64 KiB, see `refusal_candidate`), read whole,
        // looked at, then passed on. Nothing has gone to the client yet, so a Qlik that sends
        // the head and then stalls would hold it without any answer: the body gets the same
        // deadline as the head, and the client a 504 page when it is passed.
        let timeout = x.settings.response_timeout;
        if tokio::time::timeout(timeout, read_at_least(conn, n))
            .await
            .is_err()
        {
            return Err(ProxyError::UpstreamTimeout {
                upstream: node.name.clone(),
            });
        }
        let body = &conn.buf[..n.min(conn.buf.len())];
        let user = x.ctx.as_deref().and_then(|c| g.known_user(c));
        g.note_possible_qps_refusal(body, user);
        if let Some(c) = x.ctx.as_deref() {
            // Boxed: ending a session in Qlik is a QPS API call whose future is several KB,
            // and without the box every exchange would carry (and every HTTP/2 stream's spawn
            // copy) that much for a path taken once in a while.
            if let Some(page) = Box::pin(g.refusal_to_login(c, body, x.head.path())).await {
                return Ok(After::Answer(page));
            }
        }
    }
    Ok(After::Relay(extra))
}

/// A small HTML 4xx from Qlik may be its "too many sessions" page: its length, if so.
fn refusal_candidate(resp: &Head) -> Option<usize> {
    use crate::head_view::HeadView;
    // The status and length first: looking for a field by a name the parser does not know
    // compares it with every field, and this runs on every response.
    let html = || {
        resp.first("content-type")
            .is_some_and(|v| v.starts_with(b"text/html"))
    };
    match resp.framing {
        Framing::Length(n) if (400..500).contains(&resp.status) && n <= 64 * 1024 && html() => {
            Some(n as usize)
        }
        _ => None,
    }
}

/// Reads from `conn` until its buffer holds `n` bytes (or Qlik stops sending).
async fn read_at_least(conn: &mut Conn, n: usize) {
    use tokio::io::AsyncReadExt;
    while conn.buf.len() < n {
        conn.buf.reserve(n - conn.buf.len());
        match conn.io.read_buf(&mut conn.buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// The request could not be forwarded (or was refused): the error page, logged, with what
/// went wrong counted against the node.
async fn fail<T: Transport>(t: &mut T, x: Exchange<'_>, e: ProxyError) {
    let peer = x.info.peer;
    if e.is_upstream() {
        if let Some(n) = &x.node {
            x.proxy
                .diagnostics
                .metrics
                .upstream_error(&n.name, e.cause());
            if matches!(e, ProxyError::UpstreamUnreachable { .. }) {
                x.proxy.node_failed(n, &e.to_string());
            }
        }
        tracing::warn!(client = %peer, "{e}");
    } else if matches!(e, ProxyError::ClientGone) {
        // Nobody to answer: the access-log line says what happened.
        tracing::debug!(client = %peer, "{e}");
        let status = e.status().as_u16();
        Finish::new(x).done(status, 0, "client_gone");
        return;
    } else {
        tracing::info!(client = %peer, "refused: {e}");
    }
    t.answer(x, e.to_response()).await
}

/// Phase 8: the end of a request, whichever way it ended.
pub(crate) struct Finish {
    proxy: Arc<Proxy>,
    upstreams: Arc<Upstreams>,
    node: Option<Arc<Node>>,
    started: Instant,
    method: http::Method,
    path: String,
    peer: std::net::IpAddr,
    log: bool,
    private: bool,
}

impl Finish {
    pub fn new(mut x: Exchange<'_>) -> Finish {
        Finish::of(&mut x)
    }

    /// [`Finish::new`] for an exchange that is only lent (its node is taken).
    pub fn of(x: &mut Exchange<'_>) -> Finish {
        Finish {
            log: x.settings.log_requests,
            method: http::Method::from_bytes(x.head.method()).unwrap_or(http::Method::GET),
            path: if x.settings.log_requests {
                x.head.path().to_string()
            } else {
                String::new()
            },
            peer: x.info.peer.ip(),
            proxy: x.proxy.clone(),
            upstreams: x.upstreams.clone(),
            node: x.node.take(),
            started: x.started,
            private: x.private,
        }
    }

    /// Logs the request and counts it; `end` says how its answer ended (`ok`,
    /// `client_gone`, `client_stalled`, `upstream_broke`).
    pub fn done(self, status: u16, bytes: u64, end: &'static str) {
        self.done_at(Instant::now(), status, bytes, end)
    }

    /// [`Finish::done`] with the clock read once by the caller.
    fn done_at(self, now: Instant, status: u16, bytes: u64, end: &'static str) {
        let took = now.saturating_duration_since(self.started);
        self.proxy
            .diagnostics
            .metrics
            .request(status, took.as_secs_f64());
        if !self.log {
            return;
        }
        Record {
            method: self.method,
            path: self.path,
            status: http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY),
            upstream: self.node.as_ref().map(|n| n.name.clone()),
            took,
            bytes,
            peer: self.peer,
            end,
        }
        .emit();
    }

    /// [`Finish::done`] for a relayed response; the connection goes back to the pool when its
    /// response ended cleanly and neither side asked to close it, unless it is private (a
    /// transport that keeps it has taken it already; any other closes it here).
    pub fn relayed(self, status: u16, bytes: u64, end: &'static str, conn: Option<Conn>) {
        // One clock read for the pool and the log (each costs a vDSO call).
        let now = Instant::now();
        if let (Some(conn), Some(node), false) = (conn, &self.node, self.private) {
            self.upstreams.pool.checkin(node, conn, now);
        }
        self.done_at(now, status, bytes, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_buffer_goes_back_to_the_thread_empty_unless_it_grew_large() {
        let spare = || SPARE_BUFS.with_borrow(|s| s.len());
        let mut a = HeadBuf::lend(300);
        assert!(a.capacity() >= 300);
        a.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let kept = spare();
        drop(a);
        assert_eq!(spare(), kept + 1);
        let b = HeadBuf::lend(100);
        assert_eq!(spare(), kept, "lent again");
        assert!(b.is_empty(), "and empty");
        drop(b);
        let mut big = HeadBuf::lend(HeadBuf::KEEP + 1);
        big.extend_from_slice(&[b'x'; 10]);
        let kept = spare();
        drop(big);
        assert_eq!(spare(), kept, "a buffer past KEEP is let go");
    }
}
