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

mod written;
pub use written::RequestWriter;

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

/// The fields the proxy acts on, recognised once by the parser so that the phases after it
/// compare a byte instead of a name (a head is looked through several times per request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    Other,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    KeepAlive,
    ProxyConnection,
    Te,
    Trailer,
    Upgrade,
    Expect,
    Cookie,
    SetCookie,
    XForwardedFor,
    XForwardedProto,
    XForwardedHost,
    /// Looked up on every request (connection-bound authentication, [`crate::ntlm`]).
    Authorization,
    /// Looked up for every request without a live session (the browser's note, events).
    UserAgent,
    Via,
}

impl Known {
    /// The field a name stands for; by length first, so that most names are decided by one
    /// comparison.
    pub fn of(name: &[u8]) -> Known {
        let Some(&first) = name.first() else {
            return Known::Other;
        };
        let (known, text): (Known, &[u8]) = match (name.len(), first | 0x20) {
            (2, b't') => (Known::Te, b"te"),
            (3, b'v') => (Known::Via, b"via"),
            (4, b'h') => (Known::Host, b"host"),
            (6, b'c') => (Known::Cookie, b"cookie"),
            (6, b'e') => (Known::Expect, b"expect"),
            (7, b'u') => (Known::Upgrade, b"upgrade"),
            (7, b't') => (Known::Trailer, b"trailer"),
            (10, b'c') => (Known::Connection, b"connection"),
            (10, b's') => (Known::SetCookie, b"set-cookie"),
            (10, b'k') => (Known::KeepAlive, b"keep-alive"),
            (10, b'u') => (Known::UserAgent, b"user-agent"),
            (13, b'a') => (Known::Authorization, b"authorization"),
            (14, b'c') => (Known::ContentLength, b"content-length"),
            (15, b'x') => (Known::XForwardedFor, b"x-forwarded-for"),
            (16, b'x') => (Known::XForwardedHost, b"x-forwarded-host"),
            (16, b'p') => (Known::ProxyConnection, b"proxy-connection"),
            (17, b't') => (Known::TransferEncoding, b"transfer-encoding"),
            (17, b'x') => (Known::XForwardedProto, b"x-forwarded-proto"),
            _ => return Known::Other,
        };
        if eq_token_folded(name, text) {
            known
        } else {
            Known::Other
        }
    }

    /// Belongs to one connection only (RFC 9110 7.6.1), or is a legacy field browsers and old
    /// proxies still send with that meaning.
    pub fn hop_by_hop(self) -> bool {
        matches!(
            self,
            Known::Connection
                | Known::KeepAlive
                | Known::ProxyConnection
                | Known::Te
                | Known::Trailer
                | Known::TransferEncoding
                | Known::Upgrade
        )
    }
}

/// `name` equals `lower`, a lower-case name of letters and `-`, ignoring case; eight bytes
/// at a time. Setting bit 5 of a byte gives a lower-case letter only for that letter in either
/// case, and gives `-` only for `-` and CR; CR is never in a token, and every name compared
/// here is one (httparse checks field names and the parser `Connection` tokens; the guard's
/// own names are constants).
pub(crate) fn eq_token_folded(name: &[u8], lower: &[u8]) -> bool {
    const FOLD: u64 = 0x2020_2020_2020_2020;
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    let word = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    if n >= 8 {
        let mut at = 0;
        while at + 8 <= n {
            if word(name, at) | FOLD != word(lower, at) {
                return false;
            }
            at += 8;
        }
        at == n || word(name, n - 8) | FOLD == word(lower, n - 8)
    } else {
        name.iter().zip(lower).all(|(&a, &b)| a | 0x20 == b)
    }
}

/// One field line: where its name and value are in the head's bytes, and what it is.
#[derive(Debug, Clone)]
struct Field {
    name: Range<usize>,
    value: Range<usize>,
    known: Known,
    /// The line stands as `name: value` CRLF (one space, nothing trimmed): see [`Head::line`].
    plain: bool,
}

/// A parsed head: its bytes, and where the parts are.
#[derive(Debug, Clone)]
pub struct Head {
    pub bytes: Bytes,
    /// The request's method; empty for a response.
    method: Range<usize>,
    /// The request's target; empty for a response.
    target: Range<usize>,
    /// Where the target's path ends (its `?`, or its end).
    path_end: usize,
    /// The response's reason phrase; empty for a request.
    reason: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    fields: Vec<Field>,
    /// `Connection` lists a token other than keep-alive, close and upgrade (a field to drop).
    connection_names: bool,
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
        self.target_part(self.target.clone()).unwrap_or("/")
    }

    pub fn path(&self) -> &str {
        self.target_part(self.target.start..self.path_end)
            .unwrap_or("/")
    }

    pub fn query(&self) -> Option<&str> {
        let q = self.path_end + 1..self.target.end;
        (self.path_end < self.target.end).then(|| self.target_part(q).unwrap_or(""))
    }

    /// A part of the target as text: checked to be visible ASCII by `parse_request` (a
    /// response's target is empty), so the ASCII check of [`crate::head_view::text`] is all
    /// the validation it costs.
    fn target_part(&self, r: Range<usize>) -> Option<&str> {
        crate::head_view::text(&self.bytes[r])
    }

    pub fn reason(&self) -> &[u8] {
        &self.bytes[self.reason.clone()]
    }

    pub fn field(&self, i: usize) -> (&[u8], &[u8]) {
        let f = &self.fields[i];
        (&self.bytes[f.name.clone()], &self.bytes[f.value.clone()])
    }

    /// Field `i`'s value as a part of the head's bytes (shared, not copied).
    pub fn value_bytes(&self, i: usize) -> Bytes {
        self.bytes.slice(self.fields[i].value.clone())
    }

    /// Field `i`'s whole line, CRLF included, when it stands in the bytes exactly as the engine
    /// would write it (`name: value` CRLF, one space, nothing trimmed): it can then be copied
    /// as one slice, with its neighbours when they are such lines too.
    pub fn line(&self, i: usize) -> Option<Range<usize>> {
        let f = &self.fields[i];
        f.plain.then_some(f.name.start..f.value.end + 2)
    }

    /// What field `i` is, as the parser recognised it.
    pub fn known(&self, i: usize) -> Known {
        self.fields[i].known
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
        if !self.connection_names {
            return out;
        }
        for i in 0..self.len() {
            let (_, v) = self.field(i);
            if self.known(i) == Known::Connection {
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
    known: Known,
    i: usize,
}

impl<'a> Iterator for Values<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        while self.i < self.head.fields.len() {
            let f = &self.head.fields[self.i];
            self.i += 1;
            let hit = if self.known == Known::Other {
                f.known == Known::Other
                    && self.head.bytes[f.name.clone()].eq_ignore_ascii_case(self.name.as_bytes())
            } else {
                f.known == self.known
            };
            if hit {
                return Some(&self.head.bytes[f.value.clone()]);
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
            known: Known::of(name.as_bytes()),
            i: 0,
        }
    }
}

fn range_of(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - base.as_ptr() as usize;
    start..start + part.len()
}

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
    /// `Connection` names Content-Length or Transfer-Encoding (refused in a response too).
    connection_names_framing: bool,
    /// `Connection` names something other than keep-alive, close or upgrade.
    connection_names: bool,
    expect_continue: bool,
    hosts: usize,
    host_valid: bool,
    /// The first field that cannot be framed; the fields after it are not read.
    error: Option<FieldError>,
}

/// Why the field lines cannot be framed.
#[derive(Clone, Copy)]
enum FieldError {
    Syntax,
    ContentLength,
    TransferEncoding,
    Lookalike,
}

impl Fields {
    /// What one field line says about framing, in the order of the lines. The lines were
    /// checked for syntax by whichever reader found them ([`scan_fields`] or httparse): every
    /// CTL but HTAB in a value is refused there (and a CR not followed by LF), which the
    /// corpus and the fuzzer hold them to.
    fn read(&mut self, base: &[u8], name: &[u8], value: &[u8], known: Known) {
        if self.error.is_none() {
            if let Err(e) = self.read_one(base, name, value, known) {
                self.error = Some(e);
            }
        }
    }

    fn read_one(
        &mut self,
        base: &[u8],
        name: &[u8],
        value: &[u8],
        known: Known,
    ) -> Result<(), FieldError> {
        match known {
            Known::ContentLength => {
                if self.content_length.is_some() {
                    return Err(FieldError::ContentLength);
                }
                self.content_length = Some(content_length(value).ok_or(FieldError::ContentLength)?);
            }
            Known::TransferEncoding => {
                self.te_fields += 1;
                for part in value.split(|&b| b == b',') {
                    let token = trim_ows(part);
                    if token.is_empty() || !token.iter().all(|&b| is_tchar(b)) {
                        return Err(FieldError::TransferEncoding);
                    }
                    let r = range_of(base, token);
                    self.codings.push((r.start, r.end));
                    let chunked = token.eq_ignore_ascii_case(b"chunked");
                    self.chunked_count += chunked as usize;
                    self.chunked_last = chunked;
                }
            }
            Known::Connection => {
                for part in value.split(|&b| b == b',') {
                    let t = trim_ows(part);
                    if t.is_empty() {
                        // `Connection: a,,b` is allowed (empty list elements), and says nothing.
                        continue;
                    }
                    if !t.iter().all(|&b| is_tchar(b)) {
                        return Err(FieldError::Syntax);
                    }
                    match Known::of(t) {
                        Known::Upgrade => self.connection_upgrade = true,
                        Known::KeepAlive => self.connection_keep_alive = true,
                        Known::Other if t.eq_ignore_ascii_case(b"close") => {
                            self.connection_close = true
                        }
                        k => {
                            self.connection_names = true;
                            self.connection_names_framing |=
                                matches!(k, Known::ContentLength | Known::TransferEncoding);
                            self.connection_names_protected |= matches!(
                                k,
                                Known::Host
                                    | Known::ContentLength
                                    | Known::TransferEncoding
                                    | Known::Cookie
                            );
                        }
                    }
                }
            }
            Known::Upgrade => self.upgrade = true,
            Known::Expect => {
                self.expect_continue |= trim_ows(value).eq_ignore_ascii_case(b"100-continue")
            }
            Known::Host => {
                self.hosts += 1;
                self.host_valid = valid_host(value);
            }
            Known::Other
                if matches!(name.len(), 4 | 14 | 17)
                    && name.contains(&b'_')
                    && is_lookalike(name) =>
            {
                return Err(FieldError::Lookalike);
            }
            _ => {}
        }
        Ok(())
    }
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

/// [`crlf_only`] for a head httparse has read whole, in one pass the compiler vectorises:
/// httparse accepts a CR only when an LF follows it (in the request line, the status line,
/// field lines and the empty lines before the request line alike), so a bare LF is there
/// exactly when the head holds more LFs than CRs.
fn crlf_only_parsed(head: &[u8]) -> bool {
    let mut more_lf: isize = 0;
    for chunk in head.chunks(128) {
        let (mut lf, mut cr) = (0u8, 0u8);
        for &b in chunk {
            lf += (b == b'\n') as u8;
            cr += (b == b'\r') as u8;
        }
        more_lf += lf as isize - cr as isize;
    }
    more_lf == 0
}

/// The start line of a head and where the head ends, as one of the two readers found them.
struct StartLine {
    /// The head's length, its final CRLF included.
    len: usize,
    method: Range<usize>,
    target: Range<usize>,
    reason: Range<usize>,
    minor: u8,
    status: u16,
}

/// Room for the fields of a usual head, so that one allocation serves it.
const FIELDS_USUAL: usize = 16;

/// How many field lists a thread keeps for the next heads: a request and its response are
/// alive at once, a few connections' heads on the same thread at most.
const SPARE_LISTS: usize = 8;

thread_local! {
    /// Field lists of dropped heads, for the next heads parsed on this thread: two heads per
    /// request would otherwise cost two allocations and two frees (about 250 instructions).
    static SPARE: crate::proxy::spare::Spares<Vec<Field>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty field list with room for a usual head: a dropped head's, else a new one.
fn spare_fields() -> Vec<Field> {
    crate::proxy::spare::take(&SPARE).unwrap_or_else(|| Vec::with_capacity(FIELDS_USUAL))
}

impl Drop for Head {
    fn drop(&mut self) {
        // Only lists of the usual size: one that grew for a large head is let go.
        if self.fields.capacity() != FIELDS_USUAL {
            return;
        }
        let mut fields = std::mem::take(&mut self.fields);
        fields.clear();
        crate::proxy::spare::give(&SPARE, fields, SPARE_LISTS);
    }
}

/// The one-pass reader: the request line and every field line of a head that is whole in
/// `bytes`, each line ending in CRLF and holding only the bytes its grammar allows, with the
/// fields pushed to `out`.
///
/// It decides nothing on its own: anything it does not take (a head cut short, leading empty
/// lines, a bare CR or LF, a control byte, obs-text in the target, whitespace before a colon,
/// a folded line, more than [`MAX_HEADERS`] fields) gives `None`, and the head is read again
/// by httparse and the checks after it ([`read_request_line_slowly`]), which say what it is.
/// For a head it takes, it finds what httparse finds: the unit test
/// `the_one_pass_reader_agrees_with_httparse` holds the two to the same answer over corpus
/// heads and their mutations. Why it exists: the common head is read in one pass instead of
/// httparse's pass, a pass for bare line ends and one for the fields (about half the cost of
/// reading a head, `benches/cost.sh`).
fn scan_request(bytes: &[u8], out: &mut Vec<Field>, f: &mut Fields) -> Option<StartLine> {
    let mut i = 0;
    while TCHAR[*bytes.get(i)? as usize] {
        i += 1;
    }
    if i == 0 || bytes[i] != b' ' {
        return None;
    }
    let method = 0..i;
    i += 1;
    let target_start = i;
    i += bytes[i..]
        .iter()
        .take_while(|&&b| matches!(b, 0x21..=0x7e))
        .count();
    if i == target_start || *bytes.get(i)? != b' ' {
        return None;
    }
    let target = target_start..i;
    let minor = match bytes.get(i + 1..i + 11)? {
        b"HTTP/1.1\r\n" => 1,
        b"HTTP/1.0\r\n" => 0,
        _ => return None,
    };
    let len = scan_fields(bytes, i + 11, out, f)?;
    Some(StartLine {
        len,
        method,
        target,
        reason: 0..0,
        minor,
        status: 0,
    })
}

/// [`scan_request`] for a response head: `HTTP/1.x NNN reason` (a reason of HTAB, SP and
/// VCHAR; obs-text goes to httparse) or `HTTP/1.x NNN` with no reason.
fn scan_response(bytes: &[u8], out: &mut Vec<Field>, f: &mut Fields) -> Option<StartLine> {
    let minor = match bytes.get(..9)? {
        b"HTTP/1.1 " => 1,
        b"HTTP/1.0 " => 0,
        _ => return None,
    };
    let mut status = 0u16;
    for &d in bytes.get(9..12)? {
        if !d.is_ascii_digit() {
            return None;
        }
        status = status * 10 + (d - b'0') as u16;
    }
    let mut i = 12;
    let reason = match bytes.get(i)? {
        b' ' => {
            i += 1;
            let start = i;
            while matches!(bytes.get(i)?, b'\t' | 0x20..=0x7e) {
                i += 1;
            }
            start..i
        }
        b'\r' => 0..0,
        _ => return None,
    };
    if bytes.get(i..i + 2)? != b"\r\n" {
        return None;
    }
    let len = scan_fields(bytes, i + 2, out, f)?;
    Some(StartLine {
        len,
        method: 0..0,
        target: 0..0,
        reason,
        minor,
        status,
    })
}

/// The field lines from `start` to the empty line that ends the head; its end, or `None` for
/// anything [`scan_request`] leaves to httparse. Lines are found by their LF, and the bytes of
/// all of them are checked at once when the head is whole ([`field_bytes_ok`]): a field line is
/// mostly value, and a value needs no look of its own but that one.
fn scan_fields(bytes: &[u8], start: usize, out: &mut Vec<Field>, f: &mut Fields) -> Option<usize> {
    let mut i = start;
    let mut lines = 1;
    loop {
        let rest = &bytes[i..];
        let lf = memchr::memchr(b'\n', rest)?;
        if lf == 0 || rest[lf - 1] != b'\r' {
            return None;
        }
        let line = &rest[..lf - 1];
        if line.is_empty() {
            let end = i + lf + 1;
            return field_bytes_ok(&bytes[start..end], lines).then_some(end);
        }
        let name_len = line.iter().take_while(|&&b| TCHAR[b as usize]).count();
        if name_len == 0 || line.get(name_len) != Some(&b':') || out.len() == MAX_HEADERS {
            return None;
        }
        let mut from = name_len + 1;
        while matches!(line.get(from), Some(b' ' | b'\t')) {
            from += 1;
        }
        let mut to = line.len();
        while to > from && matches!(line[to - 1], b' ' | b'\t') {
            to -= 1;
        }
        let known = Known::of(&line[..name_len]);
        f.read(bytes, &line[..name_len], &line[from..to], known);
        out.push(Field {
            known,
            name: i..i + name_len,
            value: i + from..i + to,
            plain: from == name_len + 2 && line[name_len + 1] == b' ' && to == line.len(),
        });
        lines += 1;
        i += lf + 1;
    }
}

/// `lines` field lines (the empty one that ends the head included), each found ending in CRLF,
/// hold no control byte but HTAB and those CRs and LFs: exactly two per line. Counted in 32
/// lanes, a block of 32 bytes at a time, which the compiler makes vector code of.
fn field_bytes_ok(bytes: &[u8], lines: usize) -> bool {
    fn control(b: u8) -> u8 {
        ((b < 0x20 && b != b'\t') || b == 0x7f) as u8
    }
    let mut n = 0;
    // A lane counts at most one per block: 254 blocks and the tail's fit in a byte.
    for batch in bytes.chunks(32 * 254) {
        let mut lanes = [0u8; 32];
        let mut blocks = batch.chunks_exact(32);
        for block in &mut blocks {
            for (lane, &b) in lanes.iter_mut().zip(block) {
                *lane += control(b);
            }
        }
        // The tail as a block of its own, filled up with a byte that is no control byte.
        let mut tail = [b'a'; 32];
        tail[..blocks.remainder().len()].copy_from_slice(blocks.remainder());
        for (lane, &b) in lanes.iter_mut().zip(&tail) {
            *lane += control(b);
        }
        n += lanes.iter().map(|&l| l as usize).sum::<usize>();
    }
    n == 2 * lines
}

/// httparse's reading of a request head, with the checks httparse leaves to its caller: what
/// every head [`scan_request`] does not take goes through here. `Ok(None)` while the head is
/// incomplete.
fn read_request_line_slowly(
    bytes: &[u8],
    max_head: usize,
    out: &mut Vec<Field>,
    f: &mut Fields,
) -> Result<Option<StartLine>, Rejection> {
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(bytes, &mut fields) {
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
    if !crlf_only_parsed(&bytes[..len]) {
        return Err(Rejection::BareLineEnd);
    }
    fields_of(bytes, req.headers, out, f);
    Ok(Some(StartLine {
        len,
        method: range_of(bytes, req.method.unwrap_or("").as_bytes()),
        target: range_of(bytes, req.path.unwrap_or("").as_bytes()),
        reason: 0..0,
        minor: req.version.unwrap_or(1),
        status: 0,
    }))
}

/// httparse's fields as [`Field`]s.
fn fields_of(base: &[u8], fields: &[httparse::Header<'_>], out: &mut Vec<Field>, f: &mut Fields) {
    out.clear();
    *f = Fields::default();
    for h in fields {
        f.read(
            base,
            h.name.as_bytes(),
            h.value,
            Known::of(h.name.as_bytes()),
        );
    }
    out.extend(fields.iter().map(|h| {
        let (name, value) = (range_of(base, h.name.as_bytes()), range_of(base, h.value));
        Field {
            // A line end follows a value whose line had no whitespace after it (the head has
            // been checked to hold CRLF line ends only).
            plain: value.start == name.end + 2
                && base[name.end + 1] == b' '
                && base.get(value.end) == Some(&b'\r'),
            name,
            value,
            known: Known::of(h.name.as_bytes()),
        }
    }));
}

/// Parses the request head at the start of `bytes`: `Ok(None)` while it is incomplete. The
/// returned head's `bytes` are filled by the caller (a cheap slice of its buffer).
pub fn parse_request(bytes: &[u8], max_head: usize) -> Result<Option<(usize, Head)>, Rejection> {
    parse_request_by(bytes, max_head, true)
}

/// [`parse_request`], with the one-pass reader or (`one_pass` false, for the test that holds
/// the two to the same answer) httparse only.
fn parse_request_by(
    bytes: &[u8],
    max_head: usize,
    one_pass: bool,
) -> Result<Option<(usize, Head)>, Rejection> {
    let mut fields = spare_fields();
    let mut f = Fields::default();
    let line = match one_pass
        .then(|| scan_request(bytes, &mut fields, &mut f))
        .flatten()
    {
        Some(line) if line.len <= max_head => line,
        _ => match read_request_line_slowly(bytes, max_head, &mut fields, &mut f)? {
            Some(line) => line,
            None => return Ok(None),
        },
    };
    judge_request(bytes, line, fields, f)
}

/// What a request head's lines say, as one of the readers found them (the one-pass reader,
/// httparse, or [`written::RequestWriter`] for the lines the engine writes from HTTP/2's
/// fields): every rule past the syntax of the lines is decided here, once for all of them.
/// Always `Some` when `Ok`: in [`parse_request`]'s shape, so that the head is made where it
/// is returned (a `map` into that shape copied it, some 70 instructions a request).
#[inline(always)]
fn judge_request(
    bytes: &[u8],
    line: StartLine,
    fields: Vec<Field>,
    f: Fields,
) -> Result<Option<(usize, Head)>, Rejection> {
    if &bytes[line.method.clone()] == b"CONNECT" {
        return Err(Rejection::Connect);
    }
    let target = &bytes[line.target.clone()];
    if target.first() != Some(&b'/')
        || !target
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && b != b'#')
    {
        return Err(Rejection::BadTarget);
    }
    let minor = line.minor;
    if let Some(e) = f.error {
        return Err(match e {
            FieldError::Syntax => Rejection::Malformed,
            FieldError::ContentLength => Rejection::BadContentLength,
            FieldError::TransferEncoding => Rejection::BadTransferEncoding,
            FieldError::Lookalike => Rejection::LookalikeFramingField,
        });
    }
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
        line.len,
        Head {
            bytes: Bytes::new(),
            path_end: line.target.start + memchr::memchr(b'?', target).unwrap_or(target.len()),
            method: line.method,
            target: line.target,
            reason: 0..0,
            minor,
            fields,
            connection_names: f.connection_names,
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

/// httparse's reading of a response head, for what [`scan_response`] does not take.
fn read_status_line_slowly(
    bytes: &[u8],
    out: &mut Vec<Field>,
    f: &mut Fields,
) -> Result<Option<StartLine>, Invalid> {
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        bytes,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if bytes.len() > MAX_RESPONSE_HEAD {
                Err(Invalid("the response head is larger than 256 KiB"))
            } else {
                Ok(None)
            };
        }
        Err(_) => return Err(Invalid("the response is not valid HTTP/1.1")),
    };
    if !crlf_only_parsed(&bytes[..len]) {
        return Err(Invalid("a line of the response head does not end in CRLF"));
    }
    let status = resp.code.ok_or(Invalid("no status code"))?;
    // httparse gives a reason it did not find in the bytes (a `""` of its own) when there is
    // none or it holds obs-text: the guard then writes none.
    let reason = resp
        .reason
        .filter(|r| !r.is_empty())
        .map_or(0..0, |r| range_of(bytes, r.as_bytes()));
    fields_of(bytes, resp.headers, out, f);
    Ok(Some(StartLine {
        len,
        method: 0..0,
        target: 0..0,
        reason,
        minor: resp.version.unwrap_or(1),
        status,
    }))
}

/// The most a response head may take before it is refused.
const MAX_RESPONSE_HEAD: usize = 256 * 1024;

/// Parses a response head from a node, for a request that was a HEAD or not. Qlik is trusted
/// more than a browser, but a response whose length cannot be known exactly is refused (the
/// connection could not be reused safely, and the browser would be told a wrong length).
pub fn parse_response(bytes: &[u8], head_request: bool) -> Result<Option<(usize, Head)>, Invalid> {
    parse_response_by(bytes, head_request, true)
}

/// [`parse_response`], with the one-pass reader or httparse only (see [`parse_request_by`]).
fn parse_response_by(
    bytes: &[u8],
    head_request: bool,
    one_pass: bool,
) -> Result<Option<(usize, Head)>, Invalid> {
    let mut fields = spare_fields();
    let mut f = Fields::default();
    let line = match one_pass
        .then(|| scan_response(bytes, &mut fields, &mut f))
        .flatten()
    {
        Some(line) => line,
        None => match read_status_line_slowly(bytes, &mut fields, &mut f)? {
            Some(line) => line,
            None => return Ok(None),
        },
    };
    let (status, minor) = (line.status, line.minor);
    if let Some(e) = f.error {
        return Err(Invalid(match e {
            FieldError::Syntax => "a response field is not valid",
            FieldError::ContentLength => "an invalid or repeated Content-Length",
            FieldError::TransferEncoding => "an invalid Transfer-Encoding",
            FieldError::Lookalike => "a lookalike framing field",
        }));
    }
    // A response's Connection may name Host (meaningless) or Cookie, not its framing.
    let names_framing = f.connection_names_framing;
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
        line.len,
        Head {
            bytes: Bytes::new(),
            method: 0..0,
            target: 0..0,
            path_end: 0,
            reason: line.reason,
            minor,
            fields,
            connection_names: f.connection_names,
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
        if p.is_empty() || p.len() > 5 || !p.iter().all(u8::is_ascii_digit) {
            return false;
        }
        let n = p.iter().fold(0u32, |n, &d| n * 10 + (d - b'0') as u32);
        if n > u16::MAX as u32 {
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
        if !REG_NAME[b as usize] {
            return false;
        }
        i += 1;
    }
    true
}

/// The bytes of an RFC 3986 reg-name other than `%`: unreserved and sub-delims.
static REG_NAME: [bool; 256] = alphanumeric_and(b"-._~!$&'()*+,;=");

/// A byte table: ASCII letters and digits, and `extra`.
const fn alphanumeric_and(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
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
    TCHAR[b as usize]
}

/// RFC 9110's tchar: the bytes of a token.
static TCHAR: [bool; 256] = alphanumeric_and(b"!#$%&'*+-.^_`|~");

pub(crate) fn is_ctl(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(bytes: &[u8]) -> Result<Option<(usize, Head)>, Rejection> {
        parse_request(bytes, 8192)
    }

    /// HTTP/2 answers take their values as parts of the head's bytes.
    #[test]
    fn value_bytes_are_the_field_values() {
        let bytes: &'static [u8] = b"HTTP/1.1 200 OK\r\nA: 1\r\nB:  two \r\nC:\r\n\r\n";
        let (_, mut h) = parse_response(bytes, false).unwrap().unwrap();
        h.bytes = Bytes::from_static(bytes);
        for i in 0..h.len() {
            assert_eq!(&h.value_bytes(i)[..], h.field(i).1);
        }
        assert_eq!(&h.value_bytes(1)[..], b"two");
        assert!(h.value_bytes(2).is_empty());
    }

    #[test]
    fn a_dropped_heads_field_list_serves_the_next_head_empty() {
        let spare = || SPARE.with_borrow(|s| s.len());
        let (_, a) = req(b"GET /a HTTP/1.1\r\nHost: a\r\nX-One: 1\r\nX-Two: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        let list = a.fields.as_ptr();
        let kept = spare();
        drop(a);
        assert_eq!(spare(), kept + 1, "the dropped head's list is kept");
        let second = b"GET /b HTTP/1.1\r\nHost: b\r\n\r\n";
        let (_, mut b) = req(second).unwrap().unwrap();
        b.bytes = Bytes::from_static(second);
        assert_eq!(spare(), kept);
        assert_eq!(b.fields.as_ptr(), list, "the list was reused");
        assert_eq!(b.len(), 1, "and holds the new head's fields only");
        assert_eq!(b.field(0), (&b"Host"[..], &b"b"[..]));
        // A list that grew for a large head is not kept.
        let many: String = (0..40).map(|i| format!("X-{i}: v\r\n")).collect();
        let big = format!("GET / HTTP/1.1\r\nHost: c\r\n{many}\r\n");
        let (_, c) = req(big.as_bytes()).unwrap().unwrap();
        assert!(c.fields.capacity() > FIELDS_USUAL);
        let kept = spare();
        drop(c);
        assert_eq!(spare(), kept);
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

    /// The readers refuse control bytes in values (`scan_fields`, httparse): hold them to that for every
    /// byte, in requests and responses, at the start, middle and end of a value.
    #[test]
    fn every_control_byte_in_a_value_is_refused() {
        for b in (0u8..0x20).chain([0x7f]) {
            if b == b'\t' || b == b'\r' || b == b'\n' {
                continue;
            }
            for value in [vec![b, b'a'], vec![b'a', b, b'b'], vec![b'a', b]] {
                let mut head = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: ".to_vec();
                head.extend_from_slice(&value);
                head.extend_from_slice(b"\r\n\r\n");
                assert!(req(&head).is_err(), "request, byte {b:#04x} in {value:?}");
                let mut head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: ".to_vec();
                head.extend_from_slice(&value);
                head.extend_from_slice(b"\r\n\r\n");
                assert!(
                    parse_response(&head, false).is_err(),
                    "response, byte {b:#04x} in {value:?}"
                );
            }
        }
        // HTAB and obs-text are allowed in a value.
        assert!(req(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\tb\xe9\r\n\r\n").is_ok());
    }

    /// `crlf_only_parsed` counts LFs and CRs, which holds only because httparse accepts no CR
    /// without an LF after it: a bare LF and a bare CR in every place a line can end.
    #[test]
    fn a_bare_lf_or_cr_is_refused_wherever_a_line_ends() {
        let lines: [&[u8]; 4] = [b"GET /a HTTP/1.1", b"Host: a", b"X-A: b", b""];
        for at in 0..lines.len() {
            for end in [&b"\n"[..], b"\r", b"\r\r\n", b"\n\r"] {
                let mut head = Vec::new();
                for (i, l) in lines.iter().enumerate() {
                    head.extend_from_slice(l);
                    head.extend_from_slice(if i == at { end } else { b"\r\n" });
                }
                assert!(req(&head).is_err(), "{:?}", String::from_utf8_lossy(&head));
                let mut resp = b"HTTP/1.1 200 OK".to_vec();
                resp.extend_from_slice(if at == 0 { end } else { b"\r\n" });
                resp.extend_from_slice(b"Content-Length: 0");
                resp.extend_from_slice(if at == 1 { end } else { b"\r\n" });
                resp.extend_from_slice(if at >= 2 { end } else { b"\r\n" });
                assert!(
                    parse_response(&resp, false)
                        .map(|r| r.is_none())
                        .unwrap_or(true),
                    "{:?}",
                    String::from_utf8_lossy(&resp)
                );
            }
        }
        // Empty lines before the request line: CRLF is skipped, a bare LF is not.
        assert!(req(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .is_some());
        assert!(req(b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(req(b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        // A bare CR inside a value or the target.
        assert!(req(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n").is_err());
        assert!(req(b"GET /a\rb HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
    }

    #[test]
    fn field_kinds_are_recognised_in_any_case_and_only_by_the_whole_name() {
        for (name, known) in [
            (&b"Host"[..], Known::Host),
            (b"HOST", Known::Host),
            (b"content-length", Known::ContentLength),
            (b"Transfer-Encoding", Known::TransferEncoding),
            (b"X-Forwarded-Proto", Known::XForwardedProto),
            (b"x-forwarded-host", Known::XForwardedHost),
            (b"Proxy-Connection", Known::ProxyConnection),
            (b"Set-Cookie", Known::SetCookie),
            (b"TE", Known::Te),
            (b"Authorization", Known::Authorization),
            (b"Accept-Ranges", Known::Other),
            (b"Hosts", Known::Other),
            (b"hast", Known::Other),
            (b"Content_Length", Known::Other),
            (b"x-forwarded-fox", Known::Other),
            (b"User-Agent", Known::UserAgent),
            (b"VIA", Known::Via),
            (b"User-Agents", Known::Other),
            (b"", Known::Other),
        ] {
            assert_eq!(
                Known::of(name),
                known,
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    /// The byte tables against the grammar written out (RFC 9110 tchar, RFC 3986 reg-name).
    #[test]
    fn byte_tables_match_the_grammar() {
        for b in 0..=255u8 {
            let alnum = b.is_ascii_alphanumeric();
            assert_eq!(
                is_tchar(b),
                alnum || b"!#$%&'*+-.^_`|~".contains(&b),
                "{b:#04x}"
            );
            assert_eq!(
                REG_NAME[b as usize],
                alnum || b"-._~!$&'()*+,;=".contains(&b),
                "{b:#04x}"
            );
        }
    }

    #[test]
    fn path_and_query() {
        for (bytes, path, query) in [
            (
                &b"GET /a/b?x=1&y=?2 HTTP/1.1\r\nHost: a\r\n\r\n"[..],
                "/a/b",
                Some("x=1&y=?2"),
            ),
            (b"GET /a? HTTP/1.1\r\nHost: a\r\n\r\n", "/a", Some("")),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "/", None),
        ] {
            let (_, mut h) = req(bytes).unwrap().unwrap();
            h.bytes = Bytes::copy_from_slice(bytes);
            assert_eq!((h.path(), h.query()), (path, query));
        }
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

    /// What a parse said, in a form two parses can be compared by (the ranges of an empty
    /// value or reason may point anywhere; their bytes may not differ).
    fn said<E: std::fmt::Debug>(bytes: &[u8], r: Result<Option<(usize, Head)>, E>) -> String {
        match r {
            Err(e) => format!("error {e:?}"),
            Ok(None) => "incomplete".into(),
            Ok(Some((len, mut h))) => {
                h.bytes = Bytes::copy_from_slice(bytes);
                let fields: Vec<_> = (0..h.len())
                    .map(|i| {
                        let (n, v) = h.field(i);
                        let line = h.line(i).map(|r| h.bytes[r].to_vec());
                        (n.to_vec(), v.to_vec(), h.known(i), line)
                    })
                    .collect();
                format!(
                    "{len} {:?} {:?} {:?} {:?} {:?} {} {fields:?} {:?} {:?} {:?} {:?} {} {} {} {} {:?}",
                    h.method(),
                    h.target(),
                    h.path(),
                    h.query(),
                    h.reason(),
                    h.minor,
                    h.connection_tokens(),
                    h.framing,
                    h.length,
                    h.codings,
                    h.close,
                    h.upgrade,
                    h.expect_continue,
                    h.status,
                    h.connection_names,
                )
            }
        }
    }

    /// Heads of every shape the guard meets, and the edges of the one-pass reader.
    const REQUESTS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\nHost: q\r\n\r\n",
        b"GET /hub/?a=b&c HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: x\r\nAccept: */*\r\nCookie: _ga=1; X-Qlik-Session=3f2a9c1e; qsguard=0123\r\n\r\n",
        b"POST /qrs/app?xrfkey=a HTTP/1.1\r\nHost: [::1]:443\r\nContent-Length: 5\r\nX-Qlik-User: UserDirectory=D; UserId=u\r\n\r\nhello",
        b"POST /u HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"POST /u HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"GET /app/engineData HTTP/1.1\r\nHost: q\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nHost: q\r\n\r\n",
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: q\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: q\r\nX-Empty:\r\nX-Spaces:   \t \r\nX-Tab:\tv\t\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: q\r\nX-Obs: caf\xc3\xa9 \xff\r\n\r\n",
        b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: q\r\n\r\n",
        b"GET /a#b HTTP/1.1\r\nHost: q\r\n\r\n",
        b"CONNECT q:443 HTTP/1.1\r\nHost: q\r\n\r\n",
        b"GET http://q/ HTTP/1.1\r\nHost: q\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: q\r\nContent_Length: 5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: q\r\nConnection: close, cookie\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: q\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: q\r\nHost: q\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : q\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: q\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\nHost: q\n\n",
        b"GET / HTTP/1.1\r\nHost: q\r\nX: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: q\r\nX: a\x7fb\x00c\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: q\r\n\r\n",
        b"GET / HTTP/1.2\r\nHost: q\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: q\r\n\r\n",
    ];

    const RESPONSES: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sat, 05 Dec 2026 07:48:06 GMT\r\nContent-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: /hub/\r\nSet-Cookie: X-Qlik-Session=abc; Path=/; HttpOnly\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200  two  spaces\t\r\n\r\n",
        b"HTTP/1.1 200 Caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 204 No Content\r\nConnection: keep-alive\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: x-custom\r\nX-Custom: 1\r\nContent-Length: 2\r\n\r\nhi",
        b"HTTP/1.1 999 What\r\n\r\n",
        b"HTTP/1.1 20 Short\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 1\n\n",
    ];

    /// Bytes a mutation puts in: the ones each reader treats specially.
    const MUTANTS: &[u8] = b"\r\n\t :;,\x00\x01\x7f\x80\xff/?#_-=aZ0";

    fn mutations(seed: &[u8], rng: &mut rand::rngs::StdRng, n: usize) -> Vec<Vec<u8>> {
        use rand::Rng;
        let mut out = Vec::with_capacity(n + seed.len());
        for cut in 0..=seed.len() {
            out.push(seed[..cut].to_vec());
        }
        for _ in 0..n {
            let mut m = seed.to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..=m.len());
                let b = MUTANTS[rng.random_range(0..MUTANTS.len())];
                match rng.random_range(0..4) {
                    0 => m.insert(at, b),
                    1 if at < m.len() => m[at] = b,
                    2 if at < m.len() => {
                        m.remove(at);
                    }
                    _ => m.truncate(at),
                }
            }
            out.push(m);
        }
        out
    }

    /// The one-pass reader takes the usual heads, and whatever it takes, it reads as httparse
    /// and the checks after it do; what it leaves, httparse decides. Every corpus head, each of
    /// its prefixes, and random mutations of it; and heads with 127 to 129 fields.
    #[test]
    fn the_one_pass_reader_agrees_with_httparse() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x9b5_2026);
        let mut taken = 0;
        let mut many = Vec::new();
        for n in [127, 128, 129] {
            let mut h = b"GET / HTTP/1.1\r\nHost: q\r\n".to_vec();
            for i in 1..n {
                h.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
            }
            h.extend_from_slice(b"\r\n");
            many.push(h);
        }
        let requests = REQUESTS.iter().map(|r| r.to_vec()).chain(many);
        for seed in requests {
            for m in mutations(&seed, &mut rng, 3000) {
                for max in [8192, 40] {
                    let fast = said(&m, parse_request_by(&m, max, true));
                    let slow = said(&m, parse_request_by(&m, max, false));
                    assert_eq!(fast, slow, "{:?} (max {max})", String::from_utf8_lossy(&m));
                }
                taken +=
                    scan_request(&m, &mut Vec::new(), &mut Fields::default()).is_some() as usize;
            }
        }
        for seed in RESPONSES {
            for m in mutations(seed, &mut rng, 3000) {
                for head in [false, true] {
                    let fast = said(&m, parse_response_by(&m, head, true));
                    let slow = said(&m, parse_response_by(&m, head, false));
                    assert_eq!(fast, slow, "{:?}", String::from_utf8_lossy(&m));
                }
                taken +=
                    scan_response(&m, &mut Vec::new(), &mut Fields::default()).is_some() as usize;
            }
        }
        assert!(
            taken > 10_000,
            "the one-pass reader took only {taken} heads"
        );
        for usual in [REQUESTS[0], REQUESTS[1], REQUESTS[2], REQUESTS[5]] {
            assert!(scan_request(usual, &mut Vec::new(), &mut Fields::default()).is_some());
        }
        for usual in &RESPONSES[..4] {
            assert!(scan_response(usual, &mut Vec::new(), &mut Fields::default()).is_some());
        }
    }

    /// Only a line that stands exactly as the engine writes it (`name: value` CRLF) is offered
    /// whole for copying, whichever reader found it.
    #[test]
    fn a_field_line_is_offered_whole_only_as_written() {
        let bytes: &[u8] =
            b"GET / HTTP/1.1\r\nHost: q\r\nA:1\r\nB:  2\r\nC: 3 \r\nD:\t4\r\nE: 5\r\nF: \r\n\r\n";
        for one_pass in [true, false] {
            let (_, mut h) = parse_request_by(bytes, 8192, one_pass).unwrap().unwrap();
            h.bytes = Bytes::copy_from_slice(bytes);
            let whole: Vec<Option<&[u8]>> = (0..h.len())
                .map(|i| h.line(i).map(|r| &h.bytes[r]))
                .collect();
            assert_eq!(
                whole,
                [
                    Some(&b"Host: q\r\n"[..]),
                    None,
                    None,
                    None,
                    None,
                    Some(b"E: 5\r\n"),
                    // Empty, and written as the engine would write it.
                    Some(b"F: \r\n"),
                ],
                "one pass: {one_pass}"
            );
        }
    }

    /// A status line without a reason, or with obs-text in it, is passed on with no reason
    /// (httparse names none that is in the bytes; taking its word once made the guard slice
    /// outside the head).
    #[test]
    fn a_response_without_a_readable_reason_has_none() {
        for (bytes, want) in [
            (&b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n"[..], &b""[..]),
            (
                b"HTTP/1.1 200 Caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n",
                b"",
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"OK"),
        ] {
            for one_pass in [true, false] {
                let (_, mut h) = parse_response_by(bytes, false, one_pass).unwrap().unwrap();
                h.bytes = Bytes::copy_from_slice(bytes);
                assert_eq!(h.reason(), want);
            }
        }
    }
}
