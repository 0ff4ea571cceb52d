//! The framing check: every HTTP/1.x request head is read and judged here, byte for byte,
//! before hyper parses it.
//!
//! Why a layer of our own: request smuggling lives in the gap between two parsers that frame a
//! message differently. hyper is lenient where a front proxy must be strict: it accepts a
//! request with both `Transfer-Encoding` and `Content-Length` (it drops the length), and a
//! non-chunked coding gets a plain 400 where RFC 9112 asks for 501. So this layer sits between
//! the socket and hyper, holds back each request head until it is complete, checks it, and only
//! then lets hyper see it. It follows the body framing (Content-Length or chunked) so that it
//! knows where the next head starts on a keep-alive connection.
//!
//! A head that fails the check never reaches hyper, and so never reaches Qlik. In its place
//! hyper is handed a short synthetic request carrying the verdict in the
//! [`REJECT_HEADER`] header (after any earlier, valid requests on the connection, so pipelined
//! answers stay in order), and then end-of-stream. The proxy answers that request with the
//! error page and closes the connection. A client that sends the header itself only gets its
//! own request rejected.
//!
//! After a WebSocket upgrade request the connection is no longer HTTP; the check steps aside
//! (the proxy closes the connection if the upgrade is refused, so nothing is smuggled behind a
//! failed upgrade).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The header on the synthetic request that carries a rejection: `"<status> <reason-id>"`.
pub const REJECT_HEADER: &str = "x-qsguard-rejected";

/// Most header fields in one request head (more gets 431).
pub const MAX_HEADERS: usize = 128;
/// A chunk-size line longer than this (extensions included) is not a real client.
const MAX_CHUNK_LINE: usize = 4096;

/// Why a request was rejected; maps to the status code and the words on the error page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The request line or a header line is not HTTP/1.x syntax.
    Malformed,
    /// The head is larger than `server.max_header_size`, or has too many fields.
    HeadTooLarge,
    /// Both Transfer-Encoding and Content-Length.
    TeAndCl,
    /// Content-Length that is not a number, or several that differ.
    BadContentLength,
    /// A Transfer-Encoding that is not exactly `chunked` once, or not a list of tokens.
    BadTransferEncoding,
    /// A well-formed but unsupported transfer coding (gzip, identity, ...).
    UnknownTransferCoding,
    /// Transfer-Encoding on an HTTP/1.0 request.
    TeOnHttp10,
    /// A chunked body that breaks the chunked syntax.
    BadChunk,
    /// An upgrade request with a body.
    UpgradeWithBody,
}

impl Rejection {
    pub fn status(self) -> u16 {
        match self {
            Rejection::HeadTooLarge => 431,
            Rejection::UnknownTransferCoding => 501,
            _ => 400,
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed-request",
            Rejection::HeadTooLarge => "header-too-large",
            Rejection::TeAndCl => "transfer-encoding-with-content-length",
            Rejection::BadContentLength => "bad-content-length",
            Rejection::BadTransferEncoding => "bad-transfer-encoding",
            Rejection::UnknownTransferCoding => "unknown-transfer-coding",
            Rejection::TeOnHttp10 => "transfer-encoding-on-http10",
            Rejection::BadChunk => "bad-chunked-body",
            Rejection::UpgradeWithBody => "upgrade-with-body",
        }
    }

    pub fn from_header(value: &[u8]) -> Option<Rejection> {
        let s = std::str::from_utf8(value).ok()?;
        let id = s.split_once(' ').map(|(_, id)| id).unwrap_or(s);
        ALL.iter().copied().find(|r| r.id() == id)
    }

    /// In words for the error page and the log.
    pub fn describe(self) -> &'static str {
        match self {
            Rejection::Malformed => "The request is not valid HTTP.",
            Rejection::HeadTooLarge => {
                "The request headers are too large (often: too many or too large cookies)."
            }
            Rejection::TeAndCl => {
                "The request has both Transfer-Encoding and Content-Length, which makes its length ambiguous."
            }
            Rejection::BadContentLength => "The request has an invalid or conflicting Content-Length.",
            Rejection::BadTransferEncoding => "The request has an invalid Transfer-Encoding.",
            Rejection::UnknownTransferCoding => {
                "The request uses a transfer coding this proxy does not support (only chunked is)."
            }
            Rejection::TeOnHttp10 => "An HTTP/1.0 request may not use Transfer-Encoding.",
            Rejection::BadChunk => "The request body is not valid chunked encoding.",
            Rejection::UpgradeWithBody => "A WebSocket upgrade request may not have a body.",
        }
    }
}

const ALL: [Rejection; 9] = [
    Rejection::Malformed,
    Rejection::HeadTooLarge,
    Rejection::TeAndCl,
    Rejection::BadContentLength,
    Rejection::BadTransferEncoding,
    Rejection::UnknownTransferCoding,
    Rejection::TeOnHttp10,
    Rejection::BadChunk,
    Rejection::UpgradeWithBody,
];

/// Where the reader is in the byte stream of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for (the rest of) a request head.
    Head,
    /// Inside a body with this many bytes left.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// After an upgrade request: the bytes are no longer HTTP.
    Tunnel,
    /// A rejection was handed over; only end-of-stream follows.
    Rejected,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    SizeStart,
    Size { size: u64, line: usize },
    Ext { size: u64, line: usize },
    SizeLf { size: u64 },
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart { total: usize },
    Trailer { total: usize },
    TrailerLf { total: usize },
    EndLf,
}

/// The judgement of one complete request head.
struct Head {
    len: usize,
    next: State,
}

/// Wraps a client connection; see the module docs.
pub struct FramingCheck<T> {
    io: T,
    /// Bytes read from the client that hyper has not been given yet.
    buf: BytesMut,
    /// How many bytes at the front of `buf` passed the check.
    checked: usize,
    state: State,
    max_head: usize,
    /// The synthetic request to hand over once the checked bytes are gone, and how much of it
    /// was handed over.
    reject: Option<(Rejection, usize)>,
    /// The client closed its side.
    eof: bool,
    /// A body broke its framing mid-way: end-of-stream after the checked bytes.
    cut: bool,
}

impl<T> FramingCheck<T> {
    pub fn new(io: T, max_head: usize) -> Self {
        FramingCheck {
            io,
            buf: BytesMut::new(),
            checked: 0,
            state: State::Head,
            max_head,
            reject: None,
            eof: false,
            cut: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Advances the check over the unchecked bytes in `buf` as far as they go.
    fn scan(&mut self) {
        while self.checked < self.buf.len() && self.state != State::Rejected {
            match self.state {
                State::Head => {
                    let rest = &self.buf[self.checked..];
                    match judge_head(rest, self.max_head) {
                        Ok(Some(head)) => {
                            self.checked += head.len;
                            self.state = head.next;
                        }
                        Ok(None) => return,
                        Err(r) => self.reject(r),
                    }
                }
                State::Body(left) => {
                    let avail = (self.buf.len() - self.checked) as u64;
                    let take = avail.min(left);
                    self.checked += take as usize;
                    self.state = if take == left {
                        State::Head
                    } else {
                        State::Body(left - take)
                    };
                }
                State::Chunked(chunk) => {
                    let (n, next) =
                        match step_chunked(chunk, &self.buf[self.checked..], self.max_head) {
                            Ok(v) => v,
                            Err(()) => {
                                // The earlier bytes of this body went to hyper already: the request
                                // is in flight. Cut the stream here; hyper sees a truncated body and
                                // fails that request instead of reading the rest as a new request.
                                self.buf.truncate(self.checked);
                                self.state = State::Rejected;
                                self.cut = true;
                                return;
                            }
                        };
                    self.checked += n;
                    self.state = next;
                }
                State::Tunnel | State::Rejected => {
                    self.checked = self.buf.len();
                }
            }
        }
    }

    fn reject(&mut self, r: Rejection) {
        self.buf.truncate(self.checked);
        self.reject = Some((r, 0));
        self.state = State::Rejected;
    }
}

/// The synthetic request that carries a rejection to the proxy.
fn synthetic_request(r: Rejection) -> Vec<u8> {
    format!(
        "GET /__qsguard/rejected HTTP/1.1\r\nhost: qsguard.invalid\r\n{REJECT_HEADER}: {} {}\r\nconnection: close\r\n\r\n",
        r.status(),
        r.id()
    )
    .into_bytes()
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingCheck<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.checked > 0 {
                let n = this.checked.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.checked -= n;
                if this.buf.is_empty() && this.state == State::Tunnel {
                    // An idle tunnel keeps no buffer.
                    this.buf = BytesMut::new();
                }
                return Poll::Ready(Ok(()));
            }
            if let Some((r, sent)) = this.reject {
                let bytes = synthetic_request(r);
                if sent < bytes.len() {
                    let n = (bytes.len() - sent).min(out.remaining());
                    out.put_slice(&bytes[sent..sent + n]);
                    this.reject = Some((r, sent + n));
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Ok(()));
            }
            if this.cut {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Hand over whatever partial head there was: hyper sees the truncation.
                this.checked = this.buf.len();
                if this.checked == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.state == State::Tunnel && this.buf.is_empty() {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            if this.buf.capacity() - this.buf.len() < 1024 {
                this.buf.reserve(8192);
            }
            let before = this.buf.len();
            {
                let dst = this.buf.spare_capacity_mut();
                let mut rb = ReadBuf::uninit(dst);
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                // SAFETY: `n` bytes of the spare capacity were initialised by the read.
                unsafe { this.buf.set_len(before + n) };
            }
            if this.buf.len() == before {
                this.eof = true;
                continue;
            }
            this.scan();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingCheck<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Judges the request head at the start of `bytes`: `Ok(None)` when it is not complete yet.
fn judge_head(bytes: &[u8], max_head: usize) -> Result<Option<Head>, Rejection> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if bytes.len() > max_head {
                Err(Rejection::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Rejection::HeadTooLarge),
        Err(_) => return Err(Rejection::Malformed),
    };
    if len > max_head {
        return Err(Rejection::HeadTooLarge);
    }
    let http10 = req.version == Some(0);
    let mut content_length: Option<u64> = None;
    let mut codings: Vec<&[u8]> = Vec::new();
    let mut has_te = false;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    for f in req.headers.iter() {
        let name = f.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(f.value).ok_or(Rejection::BadContentLength)?;
            match content_length {
                Some(prev) if prev != n => return Err(Rejection::BadContentLength),
                _ => content_length = Some(n),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_te = true;
            for part in f.value.split(|&b| b == b',') {
                let token = trim_ows(part);
                if token.is_empty() || !token.iter().all(|&b| is_tchar(b)) {
                    return Err(Rejection::BadTransferEncoding);
                }
                codings.push(token);
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection_upgrade |= f
                .value
                .split(|&b| b == b',')
                .any(|t| trim_ows(t).eq_ignore_ascii_case(b"upgrade"));
        }
    }
    let next = if has_te {
        if http10 {
            return Err(Rejection::TeOnHttp10);
        }
        if content_length.is_some() {
            return Err(Rejection::TeAndCl);
        }
        if let Some(other) = codings.iter().find(|c| !c.eq_ignore_ascii_case(b"chunked")) {
            // A token that is a known coding but not chunked: we cannot frame it.
            let _ = other;
            return Err(Rejection::UnknownTransferCoding);
        }
        if codings.len() != 1 {
            // "chunked, chunked": chunked may be applied once only.
            return Err(Rejection::BadTransferEncoding);
        }
        State::Chunked(Chunk::SizeStart)
    } else {
        match content_length {
            Some(0) | None => State::Head,
            Some(n) => State::Body(n),
        }
    };
    if upgrade && connection_upgrade {
        if next != State::Head {
            return Err(Rejection::UpgradeWithBody);
        }
        return Ok(Some(Head {
            len,
            next: State::Tunnel,
        }));
    }
    Ok(Some(Head { len, next }))
}

/// `1*DIGIT`, nothing else: no sign, no spaces inside, no list.
fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |e| e + 1);
    &v[start..end]
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Runs the chunked-body state machine over `bytes`; returns how many bytes it consumed and
/// the state after them. Strict: CRLF line ends only, hex sizes of at most 16 digits.
fn step_chunked(mut st: Chunk, bytes: &[u8], max_trailer: usize) -> Result<(usize, State), ()> {
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        st = match st {
            Chunk::SizeStart => match hex(b) {
                Some(d) => Chunk::Size {
                    size: d as u64,
                    line: 1,
                },
                None => return Err(()),
            },
            Chunk::Size { size, line } => match (hex(b), b) {
                (Some(d), _) => {
                    if line >= 16 {
                        return Err(());
                    }
                    Chunk::Size {
                        size: size * 16 + d as u64,
                        line: line + 1,
                    }
                }
                (None, b';') | (None, b' ') | (None, b'\t') => Chunk::Ext {
                    size,
                    line: line + 1,
                },
                (None, b'\r') => Chunk::SizeLf { size },
                _ => return Err(()),
            },
            Chunk::Ext { size, line } => match b {
                b'\r' => Chunk::SizeLf { size },
                b'\n' | 0 => return Err(()),
                _ if line >= MAX_CHUNK_LINE => return Err(()),
                _ => Chunk::Ext {
                    size,
                    line: line + 1,
                },
            },
            Chunk::SizeLf { size } => match b {
                b'\n' if size == 0 => Chunk::TrailerStart { total: 0 },
                b'\n' => Chunk::Data(size),
                _ => return Err(()),
            },
            Chunk::Data(left) => {
                let take = ((bytes.len() - i) as u64).min(left);
                i += take as usize;
                st = if take == left {
                    Chunk::DataCr
                } else {
                    Chunk::Data(left - take)
                };
                continue;
            }
            Chunk::DataCr => match b {
                b'\r' => Chunk::DataLf,
                _ => return Err(()),
            },
            Chunk::DataLf => match b {
                b'\n' => Chunk::SizeStart,
                _ => return Err(()),
            },
            Chunk::TrailerStart { total } => match b {
                b'\r' => Chunk::EndLf,
                b'\n' => return Err(()),
                _ => Chunk::Trailer { total: total + 1 },
            },
            Chunk::Trailer { total } => match b {
                _ if total > max_trailer => return Err(()),
                b'\r' => Chunk::TrailerLf { total },
                b'\n' | 0 => return Err(()),
                _ => Chunk::Trailer { total: total + 1 },
            },
            Chunk::TrailerLf { total } => match b {
                b'\n' => Chunk::TrailerStart { total },
                _ => return Err(()),
            },
            Chunk::EndLf => match b {
                b'\n' => return Ok((i + 1, State::Head)),
                _ => return Err(()),
            },
        };
        i += 1;
    }
    Ok((i, State::Chunked(st)))
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Feeds `input` through the check in pieces of `step` bytes; returns what hyper would read.
    async fn through(input: &[u8], step: usize) -> Vec<u8> {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in input.chunks(step) {
                client.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            client.shutdown().await.unwrap();
        });
        let mut check = FramingCheck::new(server, 8192);
        let mut out = Vec::new();
        check.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        out
    }

    fn rejected_with(out: &[u8], r: Rejection) -> bool {
        let s = String::from_utf8_lossy(out);
        s.ends_with(std::str::from_utf8(&synthetic_request(r)).unwrap())
    }

    #[tokio::test]
    async fn valid_requests_pass_unchanged_in_any_pieces() {
        let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n\
POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
POST /y HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n\
GET /z HTTP/1.1\r\nHost: a\r\n\r\n";
        for step in [1, 3, 7, 64, 4096] {
            assert_eq!(through(input, step).await, input.to_vec(), "step {step}");
        }
    }

    #[tokio::test]
    async fn smuggling_shapes_are_rejected() {
        let cases: &[(&[u8], Rejection)] = &[
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                Rejection::TeAndCl,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
                Rejection::TeAndCl,
            ),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
                Rejection::BadContentLength,
            ),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd", Rejection::BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\nabcd", Rejection::BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", Rejection::UnknownTransferCoding),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Rejection::UnknownTransferCoding,
            ),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", Rejection::UnknownTransferCoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n", Rejection::BadTransferEncoding),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                Rejection::BadTransferEncoding,
            ),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n", Rejection::BadTransferEncoding),
            (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Rejection::TeOnHttp10),
            (b"GARBAGE\r\n\r\n", Rejection::Malformed),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", Rejection::Malformed),
            (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", Rejection::Malformed),
            (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", Rejection::Malformed),
            (
                b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 3\r\n\r\nabc",
                Rejection::UpgradeWithBody,
            ),
        ];
        for (input, want) in cases {
            let out = through(input, 5).await;
            assert!(
                rejected_with(&out, *want),
                "{:?} -> {:?}",
                String::from_utf8_lossy(input),
                String::from_utf8_lossy(&out)
            );
            assert!(
                out.starts_with(b"GET /__qsguard/rejected"),
                "nothing of the bad request passes"
            );
        }
    }

    #[tokio::test]
    async fn a_bad_request_after_good_ones_keeps_the_good_ones() {
        let good = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        let mut input = good.clone();
        input.extend_from_slice(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        let out = through(&input, 4096).await;
        assert!(out.starts_with(&good));
        assert!(rejected_with(&out, Rejection::TeAndCl));
    }

    #[tokio::test]
    async fn smuggled_request_in_a_body_is_body() {
        // The second request line is inside the declared body: it must not be judged as a head.
        let input = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 31\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(through(input, 2).await, input.to_vec());
    }

    #[tokio::test]
    async fn bad_chunks_cut_the_stream() {
        for body in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"11111111111111111\r\n",
            b"-5\r\n",
        ] {
            let mut input =
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            input.extend_from_slice(body);
            input.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n");
            let out = through(&input, 3).await;
            assert!(
                !String::from_utf8_lossy(&out).contains("smuggled"),
                "{body:?}"
            );
        }
    }

    #[tokio::test]
    async fn oversized_head_is_431_even_before_it_ends() {
        let mut input = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 9000));
        let out = through(&input, 1000).await;
        assert!(rejected_with(&out, Rejection::HeadTooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..200 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let out = through(&many, 4096).await;
        assert!(rejected_with(&out, Rejection::HeadTooLarge));
    }

    #[tokio::test]
    async fn after_an_upgrade_the_bytes_are_not_http() {
        let input = b"GET /app/x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n\x81\x05hello GARBAGE\r\n\r\n";
        assert_eq!(through(input, 4).await, input.to_vec());
    }

    #[test]
    fn rejection_round_trips_through_the_header() {
        for r in ALL {
            let req = synthetic_request(r);
            let text = String::from_utf8(req).unwrap();
            let line = text.lines().find(|l| l.starts_with(REJECT_HEADER)).unwrap();
            let value = line.split_once(": ").unwrap().1;
            assert_eq!(Rejection::from_header(value.as_bytes()), Some(r));
        }
    }
}
