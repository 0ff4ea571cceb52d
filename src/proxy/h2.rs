//! The HTTP/2 transport: the h2 crate's server (TLS + ALPN `h2`, driven by
//! [`super::h2_tasks`]) hands over each request; it goes through the same request lifecycle as
//! HTTP/1 ([`super::lifecycle`]); this module supplies how its bytes come and go:
//!
//! - **head**: the HTTP/2 request put into the engine's head form, after the rules RFC 9113
//!   adds (no connection-specific field, `te` only `trailers`, no control byte in a value, a
//!   Host that agrees with `:authority`); split `cookie` fields are joined with `"; "` (RFC 9113
//!   8.2.3) where the first stood, and `:authority` becomes Host. The head is then judged by
//!   the same strict parser as an HTTP/1 head, so one set of rules applies to both.
//! - **body**: the DATA frames, framed for Qlik by the engine: `Content-Length` when the client
//!   gave one (the last frame is handed on only once the stream has ended, [`HoldLast`]),
//!   else chunked;
//! - **answer / respond**: a response whose body streams from the upstream connection
//!   ([`RelayBody`]) and gives it back to the pool at its end, writing the access-log line;
//!   [`stream`] sends it as HEADERS and DATA frames, as the client's flow control allows.
//!
//! A connection-bound handshake or a WebSocket cannot be held per stream; browsers use
//! HTTP/1.1 for those.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full, Limited};

use super::error::ProxyError;
use super::h1::chunked::{self, Chunked};
use super::h1::parse::{self, Framing, Head};
use super::headers;
use super::hold_last::HoldLast;
use super::lifecycle::{self, BodyPart, DeviceMemoCell, Exchange, Finish, Transport};
use super::pool::Conn;
use super::{ConnInfo, Proxy, Settings};
use crate::pages::Page;

/// The body of every HTTP/2 response: Qlik's, streamed, or one the guard wrote.
pub type ResponseBody = Either<RelayBody, Full<Bytes>>;

/// One HTTP/2 request, from its head to its answer, put in `answer` (it stays there until it
/// has been sent: the answer is a large value, each move of it a copy). `Err`: the stream is
/// reset with that reason. `device_memo`: the connection's memory of its device cookie,
/// shared by its streams (a browser sends the same one on every stream: checked once, not
/// once per request).
async fn handle(
    proxy: Arc<Proxy>,
    req: Request<RecvStream>,
    info: ConnInfo,
    device_memo: &DeviceMemoCell,
    answer: &mut Option<Response<ResponseBody>>,
) -> Result<(), h2::Reason> {
    let (parts, body) = req.into_parts();
    let body = RequestBody(body);
    // (Its size is bounded by h2, with `server.max_header_size` as the list's limit.)
    let head = match head_of(&parts, body.is_end_stream()) {
        Ok(h) => h,
        Err(e) => {
            tracing::info!(client = %info.peer, "refused: {e}");
            *answer = Some(e.to_response().map(Either::Right));
            return Ok(());
        }
    };
    if crate::ntlm::needs_http1(head.path(), &head) {
        // Browsers retry over HTTP/1.1, where the handshake gets a connection of its own.
        tracing::debug!(client = %info.peer, "Windows authentication over HTTP/2: stream reset with HTTP_1_1_REQUIRED");
        return Err(h2::Reason::HTTP_1_1_REQUIRED);
    }
    let mut body = HoldLast::new(body);
    if head.length == Some(0) && !body.is_end_stream() {
        // `content-length: 0` completes the request for Qlik with its head alone: it goes
        // only once the stream has ended without DATA.
        if let Err(e) = no_data(&mut body).await {
            tracing::info!(client = %info.peer, "refused: {e}");
            *answer = Some(e.to_response().map(Either::Right));
            return Ok(());
        }
    }
    let mut stream = Stream {
        info,
        framing: head.framing,
        body,
        response: answer,
        device_memo,
    };
    lifecycle::exchange(&proxy, &mut stream, &head).await;
    Ok(())
}

/// The open streams of one HTTP/2 connection, for its idle timeout
/// (`server.http2_idle_timeout`). h2's server has none: a client that opens a connection
/// and leaves it idle would hold it (and a slot of `server.max_connections`) forever.
/// A stream counts from its request until its response body has been sent or reset, so a
/// long download or a slow Qlik answer keeps the connection, and only a connection with no
/// stream at all is idle.
///
/// Nothing is notified per stream, and no clock is read per stream: a stream that closes
/// counts itself, and the idle watch, asleep for most of the connection's life, finds the
/// connection idle when no stream was open when it fell asleep, none is now, and none closed
/// in between (a notification and a fresh timer per request cost about a thousand
/// instructions each, a clock read at each close some hundred). An idle connection is closed
/// after one to two idle timeouts.
///
/// It also holds what the streams of one connection share: the memory of the device cookie
/// (see [`handle`]).
#[derive(Clone)]
pub struct Streams(Arc<StreamsInner>);

struct StreamsInner {
    /// The connection's memory of its device cookie (it rides along with the count: one
    /// per connection, reached by every stream).
    device_memo: DeviceMemoCell,
    open: AtomicUsize,
    /// Streams closed so far.
    closed: AtomicU64,
}

impl Default for Streams {
    fn default() -> Self {
        Streams(Arc::new(StreamsInner {
            device_memo: Default::default(),
            open: AtomicUsize::new(0),
            closed: AtomicU64::new(0),
        }))
    }
}

impl Streams {
    /// A stream opens; it closes when the returned guard is dropped.
    pub fn open(&self) -> StreamOpen {
        self.0.open.fetch_add(1, Ordering::AcqRel);
        StreamOpen(self.clone())
    }

    pub fn count(&self) -> usize {
        self.0.open.load(Ordering::Acquire)
    }

    /// Returns once the connection has had no open stream for at least `idle` in a row
    /// (at most twice that).
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let quiet = self.count() == 0;
            let closed = self.0.closed.load(Ordering::Acquire);
            tokio::time::sleep(idle).await;
            // No stream then, none now, and none opened and closed in between: `idle` of
            // quiet. A stream that closed meanwhile starts the wait again.
            if quiet && self.count() == 0 && self.0.closed.load(Ordering::Acquire) == closed {
                return;
            }
        }
    }
}

/// One open stream (see [`Streams`]).
pub struct StreamOpen(Streams);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        let s = &self.0 .0;
        // Counted before the count drops: the watch must never see no stream open and the
        // close not yet counted.
        s.closed.fetch_add(1, Ordering::AcqRel);
        s.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One HTTP/2 stream, made by [`super::h2_tasks::Served`] for each request: the request goes
/// through the lifecycle, and its answer is sent. The stream counts as open in `streams`
/// until its answer has been sent (or reset).
///
/// Boxed, and written into its box rather than built and moved in: the future is several
/// kilobytes, and every move of it (into `h2_tasks`' set of streams, out of the connection's
/// poll) copied all of it (some 1,500 instructions a request).
pub fn stream(
    proxy: Arc<Proxy>,
    req: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    info: ConnInfo,
    streams: Streams,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    let boxed: Box<_> = Box::write(
        Box::new_uninit(),
        serve_stream(proxy, req, respond, info, streams),
    );
    Box::into_pin(boxed)
}

async fn serve_stream(
    proxy: Arc<Proxy>,
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    info: ConnInfo,
    streams: Streams,
) {
    let _open = streams.open();
    let mut answer = None;
    let handled = {
        let mut handled = std::pin::pin!(handle(
            proxy,
            req,
            info,
            &streams.0.device_memo,
            &mut answer
        ));
        // While Qlik is answering, the client may reset the stream: the request is then
        // dropped wherever it is (its upstream connection closed, never pooled).
        std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = handled.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            match respond.poll_reset(cx) {
                Poll::Ready(_) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    };
    match handled {
        Some(Ok(())) => {}
        Some(Err(reason)) => return respond.send_reset(reason),
        None => {
            tracing::debug!(client = %info.peer, "the client reset the HTTP/2 stream before its answer");
            return;
        }
    }
    let resp = answer.get_or_insert_with(|| {
        // Every phase ends in an answer; this is only a safety net.
        ProxyError::BadRequest("the request could not be answered")
            .to_response()
            .map(Either::Right)
    });
    // The head goes to h2; the body stays where it is until it has been sent.
    let mut head = Response::new(());
    *head.status_mut() = resp.status();
    *head.headers_mut() = std::mem::take(resp.headers_mut());
    if let Either::Right(page) = resp.body() {
        // The guard's own page: it says when and how long, as over HTTP/1.1, and not
        // `connection: close` (HTTP/2 has no such field: h2 would refuse the answer).
        let h = head.headers_mut();
        h.remove(header::CONNECTION);
        let len = page.size_hint().exact().unwrap_or(0);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        if let Ok(date) = HeaderValue::from_str(&super::h1::httpdate(std::time::SystemTime::now()))
        {
            h.entry(header::DATE).or_insert(date);
        }
    }
    let body = resp.body_mut();
    let end = body.is_end_stream();
    match respond.send_response(head, end) {
        Ok(tx) if !end => send_body(tx, body).await,
        Ok(_) => {}
        // The stream was reset meanwhile: the body, dropped, logs the client as gone.
        Err(e) => tracing::debug!(client = %info.peer, "HTTP/2 answer not sent: {e}"),
    }
}

/// Sends `body` in DATA frames, the last with END_STREAM. After a frame, the next is taken
/// from Qlik only once the client's window has room (h2 holds a frame it cannot send yet, so
/// at most one waits beyond the window); an answer of one frame, most of them, goes without
/// asking for capacity at all (three locks of h2's state fewer). A client that resets the
/// stream ends it; a body that fails resets it.
async fn send_body(mut tx: SendStream<Bytes>, body: &mut ResponseBody) {
    let mut sent_one = false;
    let sent = std::future::poll_fn(|cx| loop {
        if sent_one {
            tx.reserve_capacity(1);
            while tx.capacity() == 0 {
                match tx.poll_capacity(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(_))) => {}
                    // Reset or closed: nothing more can be sent.
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(Ok(())),
                }
            }
        }
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => {
                // Waiting for Qlik: woken by a reset of the stream too.
                return match tx.poll_reset(cx) {
                    Poll::Ready(_) => Poll::Ready(Ok(())),
                    Poll::Pending => Poll::Pending,
                };
            }
            Poll::Ready(Some(Ok(frame))) => {
                // Only DATA: neither body has trailers.
                if let Ok(data) = frame.into_data() {
                    let end = body.is_end_stream();
                    if tx.send_data(data, end).is_err() || end {
                        return Poll::Ready(Ok(()));
                    }
                    sent_one = true;
                }
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            // Ended without saying so beforehand: END_STREAM on an empty DATA frame.
            Poll::Ready(None) => {
                let _ = tx.send_data(Bytes::new(), true);
                return Poll::Ready(Ok(()));
            }
        }
    })
    .await;
    if sent.is_err() {
        // Qlik broke off mid-answer (logged by the body): the client must not take the
        // truncated answer for a whole one.
        tx.send_reset(h2::Reason::INTERNAL_ERROR);
    }
}

/// The request's DATA frames as a body: each frame's bytes are given back to the client's
/// flow-control window as they are taken.
struct RequestBody(RecvStream);

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        match self.0.poll_data(cx) {
            Poll::Ready(Some(Ok(data))) => {
                let _ = self.0.flow_control().release_capacity(data.len());
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => match self.0.poll_trailers(cx) {
                Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                Poll::Ready(Ok(None)) => Poll::Ready(None),
                Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
                Poll::Pending => Poll::Pending,
            },
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

/// Waits for the end of a stream that must bring no DATA.
async fn no_data(body: &mut HoldLast<RequestBody>) -> Result<(), ProxyError> {
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) if f.data_ref().is_some_and(|d| !d.is_empty()) => {
                return Err(ProxyError::BadRequest(
                    "DATA after content-length: 0 in an HTTP/2 request",
                ))
            }
            Ok(_) => {}
            Err(_) => return Err(ProxyError::ClientGone),
        }
    }
    Ok(())
}

/// The fields RFC 9113 8.2.2 forbids in HTTP/2 (connection-specific); `te` is allowed only
/// as `trailers`.
fn is_connection_specific(name: &header::HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// The HTTP/2 request as the engine's head: written as HTTP/1.1 lines and judged by the
/// engine's rules ([`parse::RequestWriter`]).
fn head_of(parts: &http::request::Parts, end_stream: bool) -> Result<Head, ProxyError> {
    let h = &parts.headers;
    let authority = parts.uri.authority();
    // One pass over the fields (not a hashed lookup per name): what HTTP/2 forbids, and what
    // would break the HTTP/1.1 lines they become.
    let mut host = None;
    for (name, value) in h.iter() {
        if is_connection_specific(name) || (name == header::TE && value != "trailers") {
            return Err(ProxyError::BadRequest(
                "a connection-specific header field in an HTTP/2 request",
            ));
        }
        // No CR, LF or NUL can be in a value to make a line of its own once written out:
        // h2 makes every value with `HeaderValue::from_bytes`, which refuses every control
        // byte but HTAB (a stream with one is reset); the writer below takes only such
        // values. (A scan here cost some 270 instructions a request.)
        if name == header::HOST {
            host = Some(value);
        }
    }
    if let (Some(host), Some(a)) = (host, authority) {
        if !host.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) {
            return Err(ProxyError::BadRequest(
                "the Host header differs from :authority",
            ));
        }
    }
    let target = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("");
    let mut w = parse::RequestWriter::new(&parts.method, target, 256 + h.len() * 32);
    if let (None, Some(a)) = (host, authority) {
        w.host(a);
    }
    // `te: trailers` (the only `te` that gets this far) is hop-by-hop: not passed on.
    w.fields(h.iter().filter(|(name, _)| *name != header::TE));
    let mut head = w.finish().map_err(ProxyError::Rejected)?;
    if head.framing == Framing::None && !end_stream {
        // No length given: the body goes to Qlik chunked, as the DATA frames come.
        head.framing = Framing::Chunked;
    }
    Ok(head)
}

/// One HTTP/2 stream while its request goes through the lifecycle.
struct Stream<'c> {
    info: ConnInfo,
    framing: Framing,
    body: HoldLast<RequestBody>,
    /// Where the answer goes (see [`handle`]).
    response: &'c mut Option<Response<ResponseBody>>,
    /// The connection's, see [`handle`].
    device_memo: &'c DeviceMemoCell,
}

impl Stream<'_> {
    fn answer_now(&mut self, finish: Finish, page: Page) {
        finish.done(page.status().as_u16(), 0, "ok");
        *self.response = Some(page.map(Either::Right));
    }
}

impl Transport for Stream<'_> {
    fn info(&self) -> ConnInfo {
        self.info
    }

    fn device_memo(&self) -> Option<&DeviceMemoCell> {
        Some(self.device_memo)
    }

    fn body_in_hand(&mut self, _out: &mut BytesMut) -> Result<BodyPart, ProxyError> {
        Ok(BodyPart {
            bytes: 0,
            done: !self.framing.has_body(),
        })
    }

    async fn more_body(
        &mut self,
        out: &mut BytesMut,
        _settings: &Settings,
    ) -> Result<BodyPart, ProxyError> {
        let chunked = self.framing == Framing::Chunked;
        loop {
            match self.body.frame().await {
                None => {
                    if chunked {
                        out.put_slice(b"0\r\n\r\n");
                    }
                    return Ok(BodyPart {
                        bytes: 0,
                        done: true,
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(client = %self.info.peer, "HTTP/2 request body failed: {e}");
                    return Err(ProxyError::ClientGone);
                }
                Some(Ok(frame)) => {
                    // Trailers are not passed on.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        chunked::put_hex(out, data.len() as u64);
                        out.put_slice(b"\r\n");
                        out.put_slice(&data);
                        out.put_slice(b"\r\n");
                    } else {
                        out.put_slice(&data);
                    }
                    return Ok(BodyPart {
                        bytes: data.len() as u64,
                        done: false,
                    });
                }
            }
        }
    }

    async fn small_body(&mut self, limit: usize) -> Result<Bytes, ProxyError> {
        match Limited::new(&mut self.body, limit).collect().await {
            Ok(b) => Ok(b.to_bytes()),
            Err(_) => Err(ProxyError::BadRequest(
                "the end-session form is sent with at most 8 KiB",
            )),
        }
    }

    async fn answer(&mut self, x: Exchange<'_>, page: Page) {
        self.answer_now(Finish::new(x), page)
    }

    async fn respond(
        &mut self,
        x: &mut Exchange<'_>,
        head: &Head,
        conn: Conn,
        extra: Vec<HeaderValue>,
        _switching: bool,
    ) {
        let Ok(status) = StatusCode::from_u16(head.status) else {
            let e = ProxyError::UpstreamFailed {
                upstream: x.node.as_ref().map(|n| n.name.clone()).unwrap_or_default(),
                detail: format!("status {} cannot be sent over HTTP/2", head.status),
            };
            return self.answer_now(Finish::of(x), e.to_response());
        };
        if head.status == 101 {
            // Nothing asked for an upgrade (HTTP/2 forbids the fields): Qlik broke protocol.
            let e = ProxyError::UpstreamFailed {
                upstream: x.node.as_ref().map(|n| n.name.clone()).unwrap_or_default(),
                detail: "an upgrade nobody asked for".into(),
            };
            return self.answer_now(Finish::of(x), e.to_response());
        }
        // Filled in where it stays until it is sent (a move less of a large value).
        let resp = self
            .response
            .insert(Response::new(Either::Left(RelayBody::new(
                conn,
                head,
                Finish::of(x),
            ))));
        *resp.status_mut() = status;
        // Sized once (it would grow three times for a usual answer); each value shares the
        // head's bytes instead of a copy of its own (an allocation per field).
        let h = resp.headers_mut();
        h.reserve(head.len() + extra.len() + 1);
        for i in headers::response_field_indices(head) {
            let (name, _) = head.field(i);
            let value = HeaderValue::from_maybe_shared(head.value_bytes(i));
            if let (Some(n), Ok(v)) = (headers::response_name(name), value) {
                h.append(n, v);
            }
        }
        for v in extra {
            h.append(header::SET_COOKIE, v);
        }
        if let Some(n) = head.length.filter(|_| head.framing != Framing::Chunked) {
            // Appended, not inserted: Qlik's own was left out above (no lookup to replace it).
            h.append(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
}

/// Qlik's response body on its way to an HTTP/2 client, read from the upstream connection as
/// the client takes it. At its end the connection goes back to the pool (if the response
/// ended cleanly) and the access-log line is written; a client that resets the stream is
/// logged as gone, an upstream that breaks off resets the stream.
pub struct RelayBody {
    conn: Option<Conn>,
    state: RelayState,
    finish: Option<Finish>,
    status: u16,
    /// Qlik asked to close its connection after this response.
    close: bool,
    sent: u64,
    out: BytesMut,
}

enum RelayState {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

impl RelayBody {
    fn new(conn: Conn, head: &Head, finish: Finish) -> RelayBody {
        RelayBody {
            conn: Some(conn),
            state: match head.framing {
                Framing::Length(n) if n > 0 => RelayState::Length(n),
                Framing::Chunked => RelayState::Chunked(Chunked::data_only(256 * 1024)),
                Framing::UntilClose => RelayState::UntilClose,
                _ => RelayState::Done,
            },
            finish: Some(finish),
            status: head.status,
            close: head.close,
            sent: 0,
            out: BytesMut::new(),
        }
    }

    fn end(&mut self, end: &'static str, clean: bool) {
        let conn = self.conn.take().filter(|_| clean && !self.close);
        if let Some(f) = self.finish.take() {
            f.relayed(self.status, self.sent, end, conn);
        }
    }

    fn broke(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        tracing::warn!(
            status = self.status,
            "the response broke off after its head was sent ({why}): the HTTP/2 stream is reset"
        );
        self.state = RelayState::Done;
        self.end("upstream_broke", false);
        Poll::Ready(Some(Err(std::io::Error::other(why))))
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // What is in hand first.
            let data = match &mut this.state {
                RelayState::Done => {
                    this.end("ok", true);
                    return Poll::Ready(None);
                }
                RelayState::Length(left) => {
                    let n = (*left).min(conn.buf.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        this.state = RelayState::Done;
                    }
                    conn.buf.split_to(n).freeze()
                }
                RelayState::Chunked(dec) => {
                    this.out.clear();
                    match dec.feed(&conn.buf, &mut this.out) {
                        Ok(n) => {
                            let _ = conn.buf.split_to(n);
                        }
                        Err(e) => return this.broke(e.0.into()),
                    }
                    if dec.done() {
                        this.state = RelayState::Done;
                    }
                    this.out.split().freeze()
                }
                RelayState::UntilClose => conn.buf.split().freeze(),
            };
            if !data.is_empty() {
                this.sent += data.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if matches!(this.state, RelayState::Done) {
                continue;
            }
            // Then more from Qlik.
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(16 * 1024);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if matches!(this.state, RelayState::UntilClose) {
                        this.state = RelayState::Done;
                        this.end("ok", false);
                        return Poll::Ready(None);
                    }
                    return this
                        .broke("Qlik closed the connection before the end of the body".into());
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.broke(e.to_string()),
            }
        }
    }

    /// True as soon as the last bytes are in hand, so that they are sent with END_STREAM
    /// (and an empty answer as HEADERS with END_STREAM), not in an empty DATA frame of their
    /// own after one more poll: a frame less per response (the end is logged on drop).
    fn is_end_stream(&self) -> bool {
        matches!(self.state, RelayState::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            RelayState::Length(n) => SizeHint::with_exact(n),
            RelayState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        if self.finish.is_some() {
            if matches!(self.state, RelayState::Done) {
                // Every byte was handed over, the last with END_STREAM (see `is_end_stream`).
                self.end("ok", true);
            } else {
                // The client went away (stream reset, connection closed) before the end.
                self.end("client_gone", false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn idle_counts_from_the_last_stream_closed() {
        let idle = Duration::from_millis(150);
        let streams = Streams::default();
        let watch = {
            let s = streams.clone();
            tokio::spawn(async move {
                s.idle_for(idle).await;
                Instant::now()
            })
        };
        // Busy for twice the idle time, with a stream that opens as another closes.
        let first = streams.open();
        tokio::time::sleep(idle).await;
        let second = streams.open();
        drop(first);
        tokio::time::sleep(idle).await;
        assert!(
            !watch.is_finished(),
            "a connection with an open stream is not idle"
        );
        drop(second);
        let closed = Instant::now();
        let idle_at = tokio::time::timeout(Duration::from_secs(5), watch)
            .await
            .expect("idle once no stream is open for the idle time")
            .unwrap();
        let quiet = idle_at - closed;
        assert!(
            quiet >= idle,
            "idle after {quiet:?}, before {idle:?} without a stream"
        );
    }
}
