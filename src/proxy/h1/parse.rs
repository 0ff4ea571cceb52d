//! Reading HTTP/1.x heads byte for byte, strictly.
//!
//! Request smuggling lives in the gap between two parsers that frame one message differently.
//! The guard closes that gap from both ends: it accepts only heads that every conforming parser
//! reads the same way, and the framing Qlik sees is never the client's bytes but what the engine
//! writes from what it parsed here (`Content-Length: <n>` or `Transfer-Encoding: chunked` with
//! chunk lines of its own, see [`super::chunked`]). A head that breaks a rule below is a
//! [`Rejection`] with its status; it never reaches Qlik, and the connection is closed after the
//! answer (what follows it on the connection can no longer be framed with certainty).
//!
//! # The rules, and the choice taken where RFC 9112 leaves one
//!
//! | RFC 9112 | what the guard does |
//! | --- | --- |
//! | 2.2 line ends: a recipient MAY accept a bare LF | every line ends in CRLF; a bare LF or a bare CR anywhere in the head is 400 (a parser that splits on LF and one that splits on CRLF disagree on where fields end) |
//! | 2.2 empty lines before the request line: SHOULD ignore one | ignored (the engine writes its own request line, so nothing of them reaches Qlik) |
//! | 3 request line: a recipient MAY split on any whitespace | exactly `method SP target SP HTTP/1.x`; anything else is 400 |
//! | 3.2 target | origin-form only: a `/`, then visible ASCII without `#`; absolute-form, `*` and authority-form (CONNECT) are not proxied |
//! | 3.2 Host | exactly one on HTTP/1.1 (at most one on 1.0), and a valid `host[:port]` (reg-name, IPv4 or `[IPv6]`, port 0-65535); otherwise 400 |
//! | 5.1 no whitespace between name and colon | 400 (httparse) |
//! | 5.2 obs-fold: MAY be replaced by SP | 400 |
//! | 5.5 field values: CR, LF, NUL are invalid; other CTLs | 400 for every CTL but HTAB; obs-text is kept as is |
//! | 6.1 Transfer-Encoding with Content-Length: MAY process as chunked | 400 (never guess which one a second parser believes) |
//! | 6.1 codings other than a final `chunked` | 501 for a well-formed unknown coding, 400 for anything not a list of tokens or `chunked` twice or in two fields |
//! | 6.1 Transfer-Encoding on HTTP/1.0 | 400 |
//! | 6.3 several Content-Length fields or a list of equal values: MAY accept | 400; a single value of plain digits (leading zeros allowed, forwarded as a plain decimal) |
//! | 7.1 chunk-size `1*HEXDIG`, BWS before `;` | 1 to 16 hex digits followed by `;` or CRLF, nothing else (`5 6`, `5\tx`, `5 ;a` are 400); extensions may hold no CTL but HTAB and are dropped on the way |
//! | 7.1.2 trailer fields | each line must be a valid field line; only fields on [`TRAILER_ALLOWED`] are forwarded, the rest (Content-Length, Transfer-Encoding, Host, anything else) are dropped |
//! | RFC 9110 7.6.1 Connection options | `Connection` may not name Host, Content-Length, Transfer-Encoding or Cookie (400): a client must not be able to make the proxy delete a field it framed or judged the request by |
//! | names with `_` | a field like `Content_Length` or `Transfer_Encoding` that some servers fold into the real one is 400 |
//!
//! Responses from Qlik follow the same rules where they apply (CRLF only, one Content-Length,
//! no Transfer-Encoding with Content-Length, `Connection` naming no framing field, a coding list
//! that ends in `chunked`); a response that breaks them is a 502, its connection is closed.
//!
//! A head is kept as its own bytes plus ranges into them ([`Head`]): no header map is built,
//! and the field bytes Qlik gets are the bytes the browser sent.

use std::ops::Range;

use bytes::Bytes;

/// Most header fields in one head (more gets 431).
pub const MAX_HEADERS: usize = 128;

/// The trailer fields passed on at the end of a chunked body (RFC 9110 6.5.1: only fields
/// defined as safe in a trailer). Everything else in a trailer section is dropped.
pub const TRAILER_ALLOWED: [&[u8]; 3] = [b"server-timing", b"content-digest", b"repr-digest"];

/// Why a request was rejected; maps to the status code and the words on the error page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The request line or a header line is not HTTP/1.x syntax.
    Malformed,
    /// A line ends in a bare LF or contains a bare CR.
    BareLineEnd,
    /// The request target is not origin-form (`/path?query`, visible ASCII, no `#`).
    BadTarget,
    /// Host is missing (HTTP/1.1), sent twice, or not a valid `host[:port]`.
    BadHost,
    /// The head is larger than `server.max_header_size`, or has too many fields.
    HeadTooLarge,
    /// Both Transfer-Encoding and Content-Length.
    TeAndCl,
    /// Content-Length that is not a number, or sent more than once.
    BadContentLength,
    /// A Transfer-Encoding that is not exactly `chunked` once, or not a list of tokens.
    BadTransferEncoding,
    /// A well-formed but unsupported transfer coding (gzip, identity, ...).
    UnknownTransferCoding,
    /// Transfer-Encoding on an HTTP/1.0 request.
    TeOnHttp10,
    /// `Connection` names Host, Content-Length, Transfer-Encoding or Cookie.
    ConnectionNamesProtectedField,
    /// A field name with `_` that stands for a framing field (`Content_Length`).
    LookalikeFramingField,
    /// A chunked body that breaks the chunked syntax.
    BadChunk,
    /// An upgrade request with a body.
    UpgradeWithBody,
    /// CONNECT: the guard is not a forward proxy.
    Connect,
}

impl Rejection {
    pub fn status(self) -> u16 {
        match self {
            Rejection::HeadTooLarge => 431,
            Rejection::UnknownTransferCoding => 501,
            Rejection::Connect => 405,
            _ => 400,
        }
    }

    pub fn id(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed-request",
            Rejection::BareLineEnd => "bare-line-end",
            Rejection::BadTarget => "bad-request-target",
            Rejection::BadHost => "bad-host",
            Rejection::HeadTooLarge => "header-too-large",
            Rejection::TeAndCl => "transfer-encoding-with-content-length",
            Rejection::BadContentLength => "bad-content-length",
            Rejection::BadTransferEncoding => "bad-transfer-encoding",
            Rejection::UnknownTransferCoding => "unknown-transfer-coding",
            Rejection::TeOnHttp10 => "transfer-encoding-on-http10",
            Rejection::ConnectionNamesProtectedField => "connection-names-protected-field",
            Rejection::LookalikeFramingField => "lookalike-framing-field",
            Rejection::BadChunk => "bad-chunked-body",
            Rejection::UpgradeWithBody => "upgrade-with-body",
            Rejection::Connect => "connect",
        }
    }

    /// In words for the error page and the log.
    pub fn describe(self) -> &'static str {
        match self {
            Rejection::Malformed => "The request is not valid HTTP.",
            Rejection::BareLineEnd => "A line of the request does not end in CRLF.",
            Rejection::BadTarget => "The request target is not a plain path and query.",
            Rejection::BadHost => "The request has no valid Host header, or more than one.",
            Rejection::HeadTooLarge => {
                "The request headers are too large (often: too many or too large cookies)."
            }
            Rejection::TeAndCl => {
                "The request has both Transfer-Encoding and Content-Length, which makes its length ambiguous."
            }
            Rejection::BadContentLength => {
                "The request has an invalid or repeated Content-Length."
            }
            Rejection::BadTransferEncoding => "The request has an invalid Transfer-Encoding.",
            Rejection::UnknownTransferCoding => {
                "The request uses a transfer coding this proxy does not support (only chunked is)."
            }
            Rejection::TeOnHttp10 => "An HTTP/1.0 request may not use Transfer-Encoding.",
            Rejection::ConnectionNamesProtectedField => {
                "The Connection header names Host, Content-Length, Transfer-Encoding or Cookie."
            }
            Rejection::LookalikeFramingField => {
                "A header name with an underscore stands for Host, Content-Length or Transfer-Encoding."
            }
            Rejection::BadChunk => "The request body is not valid chunked encoding.",
            Rejection::UpgradeWithBody => "A WebSocket upgrade request may not have a body.",
            Rejection::Connect => "CONNECT is not proxied: this is a reverse proxy.",
        }
    }
}

/// A response or chunked body that breaks HTTP/1.1 framing; says what, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// How a message body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (no length field, or a response that never has one: HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length: n` (a request's `0` is kept so that Qlik gets `Content-Length: 0`).
    Length(u64),
    Chunked,
    /// A response without length: it ends when the node closes the connection.
    UntilClose,
}

impl Framing {
    /// Whether body bytes follow the head.
    pub fn has_body(self) -> bool {
        !matches!(self, Framing::None | Framing::Length(0))
    }
}

/// A parsed head: its bytes, and where the parts are.
#[derive(Debug, Clone)]
pub struct Head {
    pub bytes: Bytes,
    /// The request's method; empty for a response.
    method: Range<usize>,
    /// The request's target; empty for a response.
    target: Range<usize>,
    /// The response's reason phrase; empty for a request.
    reason: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub fields: Vec<(Range<usize>, Range<usize>)>,
    pub framing: Framing,
    /// The Content-Length value, when there was one (a HEAD or 304 response keeps it though it
    /// frames no body).
    pub length: Option<u64>,
    /// A response's transfer codings when they are more than `chunked` (`gzip, chunked`),
    /// joined, for the engine to write back.
    pub codings: Option<Bytes>,
    /// `Connection: close` (or HTTP/1.0 without keep-alive).
    pub close: bool,
    /// `Connection: upgrade` with an `Upgrade` field.
    pub upgrade: bool,
    pub expect_continue: bool,
    pub status: u16,
}

impl Head {
    pub fn method(&self) -> &[u8] {
        &self.bytes[self.method.clone()]
    }

    pub fn target(&self) -> &str {
        // Checked to be visible ASCII by `parse_request`.
        std::str::from_utf8(&self.bytes[self.target.clone()]).unwrap_or("/")
    }

    pub fn path(&self) -> &str {
        let t = self.target();
        t.split_once('?').map(|(p, _)| p).unwrap_or(t)
    }

    pub fn query(&self) -> Option<&str> {
        self.target().split_once('?').map(|(_, q)| q)
    }

    pub fn reason(&self) -> &[u8] {
        &self.bytes[self.reason.clone()]
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
                for t in list(v) {
                    if !t.eq_ignore_ascii_case(b"keep-alive")
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

impl crate::head_view::HeadView for Head {
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

/// The fields a `Connection` header may not name: the framing the engine rewrites, the Host it
/// checked, and the cookies the session guard judged the request by.
const PROTECTED_FROM_CONNECTION: [&[u8]; 4] =
    [b"host", b"content-length", b"transfer-encoding", b"cookie"];

/// What the field lines of a head say about its framing, gathered in one pass.
#[derive(Default)]
struct Fields {
    content_length: Option<u64>,
    /// Number of Transfer-Encoding fields, and their codings in order.
    te_fields: usize,
    codings: Vec<(usize, usize)>,
    chunked_count: usize,
    chunked_last: bool,
    upgrade: bool,
    connection_upgrade: bool,
    connection_close: bool,
    connection_keep_alive: bool,
    connection_names_protected: bool,
    expect_continue: bool,
    hosts: usize,
    host_valid: bool,
}

/// Why the field lines cannot be framed.
enum FieldError {
    Syntax,
    ContentLength,
    TransferEncoding,
    Lookalike,
}

fn read_fields(base: &[u8], fields: &[httparse::Header<'_>]) -> Result<Fields, FieldError> {
    let mut f = Fields::default();
    for h in fields {
        let name = h.name.as_bytes();
        let value = h.value;
        if value.iter().any(|&b| is_ctl(b) && b != b'\t') {
            return Err(FieldError::Syntax);
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            if f.content_length.is_some() {
                return Err(FieldError::ContentLength);
            }
            f.content_length = Some(content_length(value).ok_or(FieldError::ContentLength)?);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            f.te_fields += 1;
            for part in value.split(|&b| b == b',') {
                let token = trim_ows(part);
                if token.is_empty() || !token.iter().all(|&b| is_tchar(b)) {
                    return Err(FieldError::TransferEncoding);
                }
                let r = range_of(base, token);
                f.codings.push((r.start, r.end));
                let chunked = token.eq_ignore_ascii_case(b"chunked");
                f.chunked_count += chunked as usize;
                f.chunked_last = chunked;
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for part in value.split(|&b| b == b',') {
                let t = trim_ows(part);
                if t.is_empty() {
                    // `Connection: a,,b` is allowed (empty list elements), and says nothing.
                    continue;
                }
                if !t.iter().all(|&b| is_tchar(b)) {
                    return Err(FieldError::Syntax);
                }
                f.connection_upgrade |= t.eq_ignore_ascii_case(b"upgrade");
                f.connection_close |= t.eq_ignore_ascii_case(b"close");
                f.connection_keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
                f.connection_names_protected |= PROTECTED_FROM_CONNECTION
                    .iter()
                    .any(|p| p.eq_ignore_ascii_case(t));
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            f.upgrade = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            f.expect_continue |= trim_ows(value).eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"host") {
            f.hosts += 1;
            f.host_valid = valid_host(value);
        } else if name.contains(&b'_') && is_lookalike(name) {
            return Err(FieldError::Lookalike);
        }
    }
    Ok(f)
}

/// `Content_Length`, `transfer_encoding`, `HOST_`...: a name that a server folding `_` into `-`
/// would read as a framing field or Host.
fn is_lookalike(name: &[u8]) -> bool {
    let mut folded = [0u8; 17];
    if name.len() > folded.len() {
        return false;
    }
    for (o, &b) in folded.iter_mut().zip(name) {
        *o = if b == b'_' {
            b'-'
        } else {
            b.to_ascii_lowercase()
        };
    }
    let folded = &folded[..name.len()];
    [&b"content-length"[..], b"transfer-encoding", b"host"].contains(&folded)
}

/// Rejects a bare LF or a bare CR anywhere in `head` (httparse accepts a bare LF as a line
/// end).
fn crlf_only(head: &[u8]) -> bool {
    let mut i = 0;
    while let Some(p) = memchr2(b'\r', b'\n', &head[i..]) {
        let at = i + p;
        if head[at] == b'\n' || head.get(at + 1) != Some(&b'\n') {
            return false;
        }
        i = at + 2;
    }
    true
}

fn memchr2(a: u8, b: u8, hay: &[u8]) -> Option<usize> {
    memchr::memchr2(a, b, hay)
}

/// Parses the request head at the start of `bytes`: `Ok(None)` while it is incomplete. The
/// returned head's `bytes` are filled by the caller (a cheap slice of its buffer).
pub fn parse_request(bytes: &[u8], max_head: usize) -> Result<Option<(usize, Head)>, Rejection> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if bytes.len() > max_head {
                Err(Rejection::HeadTooLarge)
            } else if !crlf_only(bytes) {
                // Never wait for the rest of a head that is already wrong.
                Err(Rejection::BareLineEnd)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Rejection::HeadTooLarge),
        Err(_) => {
            return Err(if crlf_only(bytes) {
                Rejection::Malformed
            } else {
                Rejection::BareLineEnd
            })
        }
    };
    if len > max_head {
        return Err(Rejection::HeadTooLarge);
    }
    if !crlf_only(&bytes[..len]) {
        return Err(Rejection::BareLineEnd);
    }
    let minor = req.version.unwrap_or(1);
    if req.method == Some("CONNECT") {
        return Err(Rejection::Connect);
    }
    let target = req.path.unwrap_or("");
    if !target.starts_with('/')
        || !target
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'#')
    {
        return Err(Rejection::BadTarget);
    }
    let f = read_fields(bytes, req.headers).map_err(|e| match e {
        FieldError::Syntax => Rejection::Malformed,
        FieldError::ContentLength => Rejection::BadContentLength,
        FieldError::TransferEncoding => Rejection::BadTransferEncoding,
        FieldError::Lookalike => Rejection::LookalikeFramingField,
    })?;
    if f.hosts > 1 || (f.hosts == 0 && minor == 1) || (f.hosts == 1 && !f.host_valid) {
        return Err(Rejection::BadHost);
    }
    if f.connection_names_protected {
        return Err(Rejection::ConnectionNamesProtectedField);
    }
    let framing = if f.te_fields > 0 {
        if minor == 0 {
            return Err(Rejection::TeOnHttp10);
        }
        if f.content_length.is_some() {
            return Err(Rejection::TeAndCl);
        }
        if f.codings.len() != f.chunked_count {
            // A coding the guard cannot frame (gzip, identity, xchunked...): 501.
            return Err(Rejection::UnknownTransferCoding);
        }
        if f.chunked_count != 1 || f.te_fields != 1 {
            // "chunked, chunked", or chunked in two fields: chunked may be applied once only.
            return Err(Rejection::BadTransferEncoding);
        }
        Framing::Chunked
    } else {
        match f.content_length {
            Some(n) => Framing::Length(n),
            None => Framing::None,
        }
    };
    let upgrade = f.upgrade && f.connection_upgrade;
    if upgrade && framing.has_body() {
        return Err(Rejection::UpgradeWithBody);
    }
    let close = f.connection_close || (minor == 0 && !f.connection_keep_alive);
    Ok(Some((
        len,
        Head {
            bytes: Bytes::new(),
            method: range_of(bytes, req.method.unwrap_or("").as_bytes()),
            target: range_of(bytes, target.as_bytes()),
            reason: 0..0,
            minor,
            fields: ranges(bytes, req.headers),
            framing,
            length: f.content_length,
            codings: None,
            close,
            upgrade,
            expect_continue: f.expect_continue,
            status: 0,
        },
    )))
}

/// Parses a response head from a node, for a request that was a HEAD or not. Qlik is trusted
/// more than a browser, but a response whose length cannot be known exactly is refused (the
/// connection could not be reused safely, and the browser would be told a wrong length).
pub fn parse_response(bytes: &[u8], head_request: bool) -> Result<Option<(usize, Head)>, Invalid> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if bytes.len() > 256 * 1024 {
                Err(Invalid("the response head is larger than 256 KiB"))
            } else {
                Ok(None)
            };
        }
        Err(_) => return Err(Invalid("the response is not valid HTTP/1.1")),
    };
    if !crlf_only(&bytes[..len]) {
        return Err(Invalid("a line of the response head does not end in CRLF"));
    }
    let status = resp.code.ok_or(Invalid("no status code"))?;
    let minor = resp.version.unwrap_or(1);
    let f = read_fields(bytes, resp.headers).map_err(|e| {
        Invalid(match e {
            FieldError::Syntax => "a response field is not valid",
            FieldError::ContentLength => "an invalid or repeated Content-Length",
            FieldError::TransferEncoding => "an invalid Transfer-Encoding",
            FieldError::Lookalike => "a lookalike framing field",
        })
    })?;
    let names_framing = {
        // A response's Connection may name Host (meaningless) or Cookie, not its framing.
        let mut named = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("connection") {
                named |= list(h.value).any(|t| {
                    t.eq_ignore_ascii_case(b"content-length")
                        || t.eq_ignore_ascii_case(b"transfer-encoding")
                });
            }
        }
        named
    };
    if names_framing {
        return Err(Invalid("Connection names a framing field"));
    }
    let bodiless = head_request || status < 200 || status == 204 || status == 304;
    let mut codings = None;
    let framing = if f.te_fields > 0 {
        if f.content_length.is_some() {
            return Err(Invalid("both Transfer-Encoding and Content-Length"));
        }
        if !f.chunked_last || f.chunked_count != 1 {
            return Err(Invalid(
                "the transfer codings do not end in chunked exactly once",
            ));
        }
        if f.codings.len() > 1 {
            let mut joined = Vec::new();
            for (i, (s, e)) in f.codings.iter().enumerate() {
                if i > 0 {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(&bytes[*s..*e]);
            }
            codings = Some(Bytes::from(joined));
        }
        if bodiless {
            Framing::None
        } else {
            Framing::Chunked
        }
    } else if bodiless {
        Framing::None
    } else {
        match f.content_length {
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let close = f.connection_close
        || (minor == 0 && !f.connection_keep_alive)
        || framing == Framing::UntilClose;
    Ok(Some((
        len,
        Head {
            bytes: Bytes::new(),
            method: 0..0,
            target: 0..0,
            reason: range_of(bytes, resp.reason.unwrap_or("").as_bytes()),
            minor,
            fields: ranges(bytes, resp.headers),
            framing,
            // 1xx and 204 never carry a length (RFC 9110 8.6).
            length: f.content_length.filter(|_| status >= 200 && status != 204),
            codings,
            close,
            upgrade: f.upgrade && f.connection_upgrade,
            expect_continue: false,
            status,
        },
    )))
}

/// The elements of a comma-separated list field, trimmed, empty ones skipped.
fn list(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// `1*DIGIT`, nothing else: no sign, no spaces inside, no list; at most 19 digits.
pub(crate) fn content_length(v: &[u8]) -> Option<u64> {
    let v = trim_ows(v);
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Leading zeros do not count towards the size limit ("000...05" is 5).
    let digits = &v[v.iter().position(|&b| b != b'0').unwrap_or(v.len())..];
    if digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add((d - b'0') as u64)
    })
}

/// `host[:port]` as RFC 3986 allows it after `http://`: a reg-name (unreserved, sub-delims,
/// pct-encoded), an IPv4 address (a reg-name too), or an `[IPv6]` literal; the port 0-65535.
pub fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(end) = v.iter().position(|&b| b == b']') else {
            return false;
        };
        let inside = &v[1..end];
        let ok = !inside.is_empty()
            && std::str::from_utf8(inside)
                .ok()
                .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
                .is_some();
        if !ok {
            return false;
        }
        match &v[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (&v[..end + 1], Some(port)),
            _ => return false,
        }
    } else {
        match v.iter().rposition(|&b| b == b':') {
            Some(i) => (&v[..i], Some(&v[i + 1..])),
            None => (v, None),
        }
    };
    if let Some(p) = port {
        if p.is_empty()
            || p.len() > 5
            || !p.iter().all(u8::is_ascii_digit)
            || std::str::from_utf8(p)
                .ok()
                .and_then(|s| s.parse::<u16>().ok())
                .is_none()
        {
            return false;
        }
    }
    if host.first() == Some(&b'[') {
        return true;
    }
    if host.is_empty() {
        return false;
    }
    let mut i = 0;
    while i < host.len() {
        let b = host[i];
        if b == b'%' {
            if i + 2 >= host.len()
                || !host[i + 1].is_ascii_hexdigit()
                || !host[i + 2].is_ascii_hexdigit()
            {
                return false;
            }
            i += 3;
            continue;
        }
        if !(b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)) {
            return false;
        }
        i += 1;
    }
    true
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

pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub(crate) fn is_ctl(b: u8) -> bool {
    b < 0x20 || b == 0x7f
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
        let (_, h) = req(b"GET /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  Chunked \r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Chunked, "case and OWS");
        let (_, h) = req(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(0));
        assert!(!h.framing.has_body());
        let (_, h) = req(b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(7), "leading zeros");
        let (_, h) = req(b"GET /app/x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n").unwrap().unwrap();
        assert!(h.upgrade && !h.close);
        let (_, h) = req(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.close);
        let (_, h) = req(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.close);
        let leading = b"\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        let (_, mut h) = req(leading).unwrap().unwrap();
        h.bytes = Bytes::from_static(leading);
        assert_eq!(h.target(), "/x", "an empty line before the request line");
        let named = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: TE, ,x-a\r\nX-A: 1\r\n\r\n";
        let (_, mut h) = req(named).unwrap().unwrap();
        h.bytes = Bytes::from_static(named);
        assert_eq!(h.connection_tokens(), vec![&b"TE"[..], b"x-a"]);
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
        use crate::head_view::HeadView;
        let cookies: Vec<&[u8]> = h.values("cookie").collect();
        assert_eq!(cookies, vec![&b"a=1"[..], &b"b=2"[..]]);
    }

    #[test]
    fn smuggling_shapes_are_rejected() {
        use Rejection::*;
        let cases: &[(&[u8], Rejection)] = &[
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n", TeAndCl),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n", TeAndCl),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n", BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\n", BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\n", BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\n", BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", BadContentLength),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", UnknownTransferCoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", UnknownTransferCoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", UnknownTransferCoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \"chunked\"\r\n\r\n", BadTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", BadTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", BadTransferEncoding),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n", BadTransferEncoding),
            (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", TeOnHttp10),
            (b"GARBAGE\r\n\r\n", Malformed),
            (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", Malformed),
            (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", Malformed),
            (b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", Malformed),
            (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", Malformed),
            (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", Malformed),
            (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", Malformed),
            (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", Malformed),
            (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", Malformed),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", Malformed),
            (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: a b\r\n\r\n", Malformed),
            (b"GET / HTTP/1.1\nHost: a\n\n", BareLineEnd),
            (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", BareLineEnd),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\n", BareLineEnd),
            (b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", BareLineEnd),
            (b"GET / HTTP/1.1\r\nHost: a\r\nX: b\n", BareLineEnd),
            (b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", BadTarget),
            (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", BadTarget),
            (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", BadTarget),
            (b"GET / HTTP/1.1\r\n\r\n", BadHost),
            (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", BadHost),
            (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", BadHost),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", BadHost),
            (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", BadHost),
            (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", BadHost),
            (b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n", BadHost),
            (b"GET / HTTP/1.1\r\nHost: a:\r\n\r\n", BadHost),
            (b"GET / HTTP/1.1\r\nHost: [zz]\r\n\r\n", BadHost),
            (b"GET / HTTP/1.0\r\nHost: a\"b\r\n\r\n", BadHost),
            (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\n", ConnectionNamesProtectedField),
            (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, host\r\n\r\n", ConnectionNamesProtectedField),
            (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: transfer-encoding\r\n\r\n", ConnectionNamesProtectedField),
            (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Cookie\r\nCookie: x=1\r\n\r\n", ConnectionNamesProtectedField),
            (b"GET / HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\n\r\n", LookalikeFramingField),
            (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n", LookalikeFramingField),
            (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: 3\r\n\r\n", UpgradeWithBody),
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
    fn hosts() {
        for ok in [
            &b"qlik.example.com"[..],
            b"qlik:443",
            b"10.0.0.1:8080",
            b"[::1]",
            b"[::1]:443",
            b"a-b_c~d",
            b"xn--bcher-kva.example",
            b"%41b",
        ] {
            assert!(valid_host(ok), "{}", String::from_utf8_lossy(ok));
        }
        for bad in [
            &b""[..],
            b":80",
            b"a:b",
            b"[::1",
            b"[::1]x",
            b"a%4",
            b"a%zz",
            b"a\\b",
            b"a?b",
            b"a#b",
        ] {
            assert!(!valid_host(bad), "{}", String::from_utf8_lossy(bad));
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

    #[test]
    fn a_bare_lf_is_refused_before_the_head_ends() {
        assert_eq!(
            req(b"GET / HTTP/1.1\r\nHost: a\nX").err(),
            Some(Rejection::BareLineEnd)
        );
    }

    #[test]
    fn response_framing() {
        let r = |b: &[u8], head: bool| parse_response(b, head).unwrap().unwrap().1;
        let plain = r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false);
        assert_eq!(plain.framing, Framing::Length(3));
        assert_eq!(plain.length, Some(3));
        let head = r(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true);
        assert_eq!(head.framing, Framing::None);
        assert_eq!(head.length, Some(3), "a HEAD answer keeps its length");
        assert_eq!(
            r(
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n",
                false
            )
            .framing,
            Framing::None
        );
        let empty = r(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert_eq!(empty.framing, Framing::Length(0));
        let until = r(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(until.framing, Framing::UntilClose);
        assert!(until.close);
        let gz = r(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(gz.framing, Framing::Chunked);
        assert_eq!(gz.codings.as_deref(), Some(&b"gzip, chunked"[..]));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 1\n\n",
        ] {
            assert!(
                parse_response(bad, false).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
