//! Reading HTTP/1.x heads byte for byte, strictly.
//!
//! Request smuggling lives in the gap between two parsers that frame a message differently, so
//! the guard takes no chances: a request head with both Transfer-Encoding and Content-Length, a
//! coding other than one `chunked`, a Content-Length that is not a plain number or that differs
//! from another, a bare LF, line folding, a control character, an oversized head: each is a
//! [`Rejection`] with its status (400, 431, or 501 for an unknown coding) and never reaches
//! Qlik. Ambiguity is rejected, never normalised. Chunked bodies are followed with a strict
//! state machine ([`Chunked`]) so the end of every message is known exactly; the bytes
//! themselves are passed on unchanged.
//!
//! A head is kept as its own bytes plus ranges into them ([`Head`]): no header map is built,
//! and the header bytes Qlik gets are the bytes the browser sent.

use std::ops::Range;

use bytes::Bytes;

/// Most header fields in one head (more gets 431).
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

/// A response or chunked body that breaks HTTP/1.1 framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// How a message body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    /// A response without length: it ends when the node closes the connection.
    UntilClose,
}

/// A parsed head: its bytes, and where the parts are.
#[derive(Debug, Clone)]
pub struct Head {
    pub bytes: Bytes,
    /// Request: method; response: status code digits.
    first: Range<usize>,
    /// Request: target; response: reason phrase.
    second: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub fields: Vec<(Range<usize>, Range<usize>)>,
    pub framing: Framing,
    /// `Connection: close` (or HTTP/1.0 without keep-alive).
    pub close: bool,
    /// `Connection: upgrade` with an `Upgrade` field.
    pub upgrade: bool,
    pub expect_continue: bool,
    pub status: u16,
}

impl Head {
    pub fn method(&self) -> &[u8] {
        &self.bytes[self.first.clone()]
    }

    pub fn target(&self) -> &str {
        // httparse accepts only visible ASCII in the target.
        std::str::from_utf8(&self.bytes[self.second.clone()]).unwrap_or("/")
    }

    pub fn path(&self) -> &str {
        let t = self.target();
        t.split_once('?').map(|(p, _)| p).unwrap_or(t)
    }

    pub fn query(&self) -> Option<&str> {
        self.target().split_once('?').map(|(_, q)| q)
    }

    pub fn reason(&self) -> &[u8] {
        &self.bytes[self.second.clone()]
    }

    pub fn field(&self, i: usize) -> (&[u8], &[u8]) {
        let (n, v) = &self.fields[i];
        (&self.bytes[n.clone()], &self.bytes[v.clone()])
    }

    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The field names the `Connection` header lists (so hop-by-hop), other than the usual
    /// `keep-alive`, `close` and `upgrade`; usually none.
    pub fn connection_tokens(&self) -> Vec<&[u8]> {
        let mut out = Vec::new();
        for i in 0..self.len() {
            let (n, v) = self.field(i);
            if n.eq_ignore_ascii_case(b"connection") {
                for t in v.split(|&b| b == b',').map(trim_ows) {
                    if !t.is_empty()
                        && !t.eq_ignore_ascii_case(b"keep-alive")
                        && !t.eq_ignore_ascii_case(b"close")
                        && !t.eq_ignore_ascii_case(b"upgrade")
                    {
                        out.push(t);
                    }
                }
            }
        }
        out
    }
}

/// The values of one field name, in order.
pub struct Values<'a> {
    head: &'a Head,
    name: &'a str,
    i: usize,
}

impl<'a> Iterator for Values<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        while self.i < self.head.fields.len() {
            let (n, v) = self.head.field(self.i);
            self.i += 1;
            if n.eq_ignore_ascii_case(self.name.as_bytes()) {
                return Some(v);
            }
        }
        None
    }
}

impl crate::session::cookies::Headers for Head {
    type Values<'a> = Values<'a>;
    fn values<'a>(&'a self, name: &'a str) -> Values<'a> {
        Values {
            head: self,
            name,
            i: 0,
        }
    }
}

fn ranges(base: &[u8], fields: &[httparse::Header<'_>]) -> Vec<(Range<usize>, Range<usize>)> {
    fields
        .iter()
        .map(|f| (range_of(base, f.name.as_bytes()), range_of(base, f.value)))
        .collect()
}

fn range_of(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

/// Parses the request head at the start of `bytes`: `Ok(None)` while it is incomplete. The
/// returned head's bytes are copied out of `bytes` only as a cheap `Bytes` slice by the caller
/// (see [`split_head`]).
pub fn parse_request(bytes: &[u8], max_head: usize) -> Result<Option<(usize, Head)>, Rejection> {
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
    let minor = req.version.unwrap_or(1);
    let mut content_length: Option<u64> = None;
    let mut te_fields = 0usize;
    let mut codings = 0usize;
    let mut unknown_coding = false;
    let mut upgrade = false;
    let mut connection_upgrade = false;
    let mut close = minor == 0;
    let mut expect_continue = false;
    for f in req.headers.iter() {
        let name = f.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(f.value).ok_or(Rejection::BadContentLength)?;
            match content_length {
                Some(prev) if prev != n => return Err(Rejection::BadContentLength),
                _ => content_length = Some(n),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te_fields += 1;
            for part in f.value.split(|&b| b == b',') {
                let token = trim_ows(part);
                if token.is_empty() || !token.iter().all(|&b| is_tchar(b)) {
                    return Err(Rejection::BadTransferEncoding);
                }
                codings += 1;
                unknown_coding |= !token.eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in f.value.split(|&b| b == b',') {
                let t = trim_ows(t);
                connection_upgrade |= t.eq_ignore_ascii_case(b"upgrade");
                if t.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && minor == 0 {
                    close = false;
                }
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue |= trim_ows(f.value).eq_ignore_ascii_case(b"100-continue");
        }
    }
    let framing = if te_fields > 0 {
        if minor == 0 {
            return Err(Rejection::TeOnHttp10);
        }
        if content_length.is_some() {
            return Err(Rejection::TeAndCl);
        }
        if unknown_coding {
            // A coding the guard cannot frame (gzip, identity, xchunked...): 501.
            return Err(Rejection::UnknownTransferCoding);
        }
        if codings != 1 {
            // "chunked, chunked": chunked may be applied once only.
            return Err(Rejection::BadTransferEncoding);
        }
        Framing::Chunked
    } else {
        match content_length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    let upgrade = upgrade && connection_upgrade;
    if upgrade && framing != Framing::None {
        return Err(Rejection::UpgradeWithBody);
    }
    let method = range_of(bytes, req.method.unwrap_or("").as_bytes());
    let target = range_of(bytes, req.path.unwrap_or("").as_bytes());
    let fields = ranges(bytes, req.headers);
    Ok(Some((
        len,
        Head {
            bytes: Bytes::new(),
            first: method,
            second: target,
            minor,
            fields,
            framing,
            close,
            upgrade,
            expect_continue,
            status: 0,
        },
    )))
}

/// Parses a response head from a node, for a request with `method`. Qlik is trusted more than a
/// browser, but a response whose length cannot be known exactly is still refused (the
/// connection could not be reused safely).
pub fn parse_response(bytes: &[u8], head_request: bool) -> Result<Option<(usize, Head)>, Invalid> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if bytes.len() > 256 * 1024 {
                Err(Invalid)
            } else {
                Ok(None)
            };
        }
        Err(_) => return Err(Invalid),
    };
    let status = resp.code.ok_or(Invalid)?;
    let minor = resp.version.unwrap_or(1);
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut close = minor == 0;
    let mut upgrade = false;
    for f in resp.headers.iter() {
        let name = f.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(f.value).ok_or(Invalid)?;
            if content_length.is_some_and(|p| p != n) {
                return Err(Invalid);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = f
                .value
                .rsplit(|&b| b == b',')
                .next()
                .map(trim_ows)
                .unwrap_or(b"");
            if !last.eq_ignore_ascii_case(b"chunked") {
                return Err(Invalid);
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in f.value.split(|&b| b == b',') {
                let t = trim_ows(t);
                close |= t.eq_ignore_ascii_case(b"close");
                if t.eq_ignore_ascii_case(b"keep-alive") && minor == 0 {
                    close = false;
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    let framing = if head_request || status < 200 || status == 204 || status == 304 {
        Framing::None
    } else if chunked {
        // RFC 9112 6.3: chunked wins over a Content-Length; such a connection is not reused.
        if content_length.is_some() {
            close = true;
        }
        Framing::Chunked
    } else {
        match content_length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => {
                close = true;
                Framing::UntilClose
            }
        }
    };
    let reason = range_of(bytes, resp.reason.unwrap_or("").as_bytes());
    let fields = ranges(bytes, resp.headers);
    Ok(Some((
        len,
        Head {
            bytes: Bytes::new(),
            first: 0..0,
            second: reason,
            minor,
            fields,
            framing,
            close,
            upgrade,
            expect_continue: false,
            status,
        },
    )))
}

/// Follows a chunked body as its bytes pass.
#[derive(Debug, Clone, Copy)]
pub struct Chunked {
    state: Option<Chunk>,
    max_trailer: usize,
}

impl Chunked {
    pub fn new(max_trailer: usize) -> Chunked {
        Chunked {
            state: Some(Chunk::SizeStart),
            max_trailer,
        }
    }

    /// Consumes what belongs to the body from `bytes`; returns how many bytes that is.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<usize, Invalid> {
        let Some(st) = self.state else { return Ok(0) };
        let (n, next) = step_chunked(st, bytes, self.max_trailer).map_err(|_| Invalid)?;
        self.state = next;
        Ok(n)
    }

    pub fn done(&self) -> bool {
        self.state.is_none()
    }
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

/// `1*DIGIT`, nothing else: no sign, no spaces inside, no list.
fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `v` without surrounding spaces and tabs (RFC 9110's OWS).
pub(crate) fn trim_ows(v: &[u8]) -> &[u8] {
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
fn step_chunked(
    mut st: Chunk,
    bytes: &[u8],
    max_trailer: usize,
) -> Result<(usize, Option<Chunk>), ()> {
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
                b'\n' => return Ok((i + 1, None)),
                _ => return Err(()),
            },
        };
        i += 1;
    }
    Ok((i, Some(st)))
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

    fn req(bytes: &[u8]) -> Result<Option<(usize, Head)>, Rejection> {
        parse_request(bytes, 8192)
    }

    #[test]
    fn valid_heads_and_their_framing() {
        let (len, h) = req(b"POST /x?a=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(len, 52);
        assert_eq!(h.framing, Framing::Length(5));
        let (_, h) = req(b"GET /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let (_, h) = req(b"GET /app/x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n").unwrap().unwrap();
        assert!(h.upgrade && !h.close);
        let (_, h) = req(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.close);
        assert!(
            req(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none(),
            "incomplete"
        );
    }

    #[test]
    fn head_parts_are_ranges_into_the_bytes() {
        let bytes = b"GET /hub/?x=1 HTTP/1.1\r\nHost: q\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n";
        let (_, mut h) = req(bytes).unwrap().unwrap();
        h.bytes = Bytes::copy_from_slice(bytes);
        assert_eq!(h.method(), b"GET");
        assert_eq!(h.path(), "/hub/");
        assert_eq!(h.query(), Some("x=1"));
        use crate::session::cookies::Headers;
        let cookies: Vec<&[u8]> = h.values("cookie").collect();
        assert_eq!(cookies, vec![&b"a=1"[..], &b"b=2"[..]]);
    }

    #[test]
    fn smuggling_shapes_are_rejected() {
        let cases: &[(&[u8], Rejection)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", Rejection::TeAndCl),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n", Rejection::TeAndCl),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", Rejection::BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n", Rejection::BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\n", Rejection::BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", Rejection::UnknownTransferCoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", Rejection::UnknownTransferCoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", Rejection::UnknownTransferCoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n", Rejection::BadTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", Rejection::BadTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n", Rejection::BadTransferEncoding),
            (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Rejection::TeOnHttp10),
            (b"GARBAGE\r\n\r\n", Rejection::Malformed),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", Rejection::Malformed),
            (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", Rejection::Malformed),
            (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", Rejection::Malformed),
            (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 3\r\n\r\n", Rejection::UpgradeWithBody),
        ];
        for (input, want) in cases {
            assert_eq!(
                req(input).err(),
                Some(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn oversized_heads_are_431_even_before_they_end() {
        let mut input = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: ".to_vec();
        input.extend(std::iter::repeat_n(b'a', 9000));
        assert_eq!(req(&input).err(), Some(Rejection::HeadTooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..200 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_request(&many, 1 << 20).err(),
            Some(Rejection::HeadTooLarge)
        );
    }

    fn chunked_len(body: &[u8], step: usize) -> Result<Option<usize>, Invalid> {
        let mut c = Chunked::new(4096);
        let mut total = 0;
        for piece in body.chunks(step) {
            let n = c.feed(piece)?;
            total += n;
            if c.done() {
                return Ok(Some(total));
            }
        }
        Ok(None)
    }

    #[test]
    fn chunked_bodies_end_exactly_where_they_end() {
        let body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nGET /next HTTP/1.1";
        let end = body.len() - b"GET /next HTTP/1.1".len();
        for step in [1, 2, 7, 100] {
            assert_eq!(chunked_len(body, step), Ok(Some(end)), "step {step}");
        }
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"11111111111111111\r\n",
            b"-5\r\n",
        ] {
            assert!(
                chunked_len(bad, 3).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn response_framing() {
        let r = |b: &[u8], head: bool| parse_response(b, head).unwrap().unwrap().1;
        assert_eq!(
            r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false).framing,
            Framing::Length(3)
        );
        assert_eq!(
            r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).framing,
            Framing::None
        );
        assert_eq!(
            r(
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n",
                false
            )
            .framing,
            Framing::None
        );
        let until = r(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(until.framing, Framing::UntilClose);
        assert!(until.close);
        let both = r(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!(both.framing, Framing::Chunked);
        assert!(both.close, "a response with both is not reused");
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false
        )
        .is_err());
    }
}
