//! HTTP/2 at the front, HTTP/1.1 at the back: what RFC 9113 calls malformed must never reach the
//! HTTP/1.1 origin.
//!
//! An h2 front end that turns frames into HTTP/1.1 text is where requests get smuggled: a CR LF
//! inside a field value becomes a field line (or a second request) of its own, a
//! connection-specific field changes the framing, and a `content-length` that disagrees with the
//! DATA frames leaves the back-end connection out of step with the front end. The rule tested
//! here, for each such request:
//!
//! - it is refused: RST_STREAM with PROTOCOL_ERROR, a GOAWAY with an error code (a connection
//!   error, which refuses everything on the connection), or a 4xx answer from the proxy;
//! - the origin sees nothing of it (no request, and no unparsable bytes at all);
//! - the proxy keeps serving: a valid request on the same HTTP/2 connection (when it is still
//!   open) and on a new one gets its own answer;
//! - a victim's HTTP/1.1 request afterwards gets its own answer from the origin: the pooled
//!   upstream connection was not poisoned. (The victim goes through the HTTP/1 engine's pool;
//!   the follow-up HTTP/2 requests go through the client the HTTP/2 path forwards with, so both
//!   are checked.)
//!
//! The pieces: a recording HTTP/1.1 origin with its own strict parser (anything it cannot parse
//! is recorded as GARBAGE), and a raw HTTP/2 client that encodes its own header blocks (HPACK
//! literals without indexing, no Huffman) so that it can send exactly the bytes a test wants.
//! Responses are decoded with `loona-hpack` (hyper encodes them with Huffman and a dynamic table).
//!
//! Each test collects every broken rule and fails once at the end with the whole list, so one
//! run tells everything that is wrong. `cargo test --test h2_framing -- --nocapture` also prints
//! what the proxy did with each request.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

/// The `:authority` (and Host) of every request.
const AUTHORITY: &str = "qlik.example.com";
/// `server.max_body_size` for these tests.
const MAX_BODY: usize = 1024;
/// How long a test waits for any one answer.
const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// The recording HTTP/1.1 origin
// ---------------------------------------------------------------------------------------------

/// One complete request as the origin parsed it.
#[derive(Clone)]
struct Recorded {
    method: String,
    target: String,
    /// Field names lower-cased, values as sent (without the surrounding whitespace).
    fields: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.target)?;
        for (n, v) in &self.fields {
            write!(f, " | {n}: {}", String::from_utf8_lossy(v))?;
        }
        write!(f, " | body {:?}", String::from_utf8_lossy(&self.body))
    }
}

impl Recorded {
    fn all(&self, name: &str) -> Vec<String> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    fn mentions(&self, what: &str) -> bool {
        let what = what.as_bytes();
        contains(self.target.as_bytes(), what)
            || contains(&self.body, what)
            || self
                .fields
                .iter()
                .any(|(n, v)| contains(n.as_bytes(), what) || contains(v, what))
    }
}

/// What the origin saw on its connections.
#[derive(Debug, Clone)]
enum Seen {
    Request(Recorded),
    /// Bytes the strict parser refused: the proxy sent something that is not HTTP/1.1.
    Garbage {
        why: String,
        bytes: Vec<u8>,
    },
    /// The connection ended in the middle of a request (the proxy gave up on it).
    Incomplete {
        bytes: Vec<u8>,
    },
    /// The proxy closed the connection while a `/case/hold-*` request waited for its answer.
    Abandoned {
        target: String,
    },
}

impl Seen {
    fn mentions(&self, what: &str) -> bool {
        match self {
            Seen::Request(r) => r.mentions(what),
            Seen::Garbage { bytes, .. } | Seen::Incomplete { bytes } => {
                contains(bytes, what.as_bytes())
            }
            Seen::Abandoned { target } => target.contains(what),
        }
    }
}

struct Origin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Connections the proxy opened to it.
    accepted: Arc<AtomicUsize>,
}

impl Origin {
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(origin_connection(s, log.clone()));
            }
        });
        Origin {
            addr,
            seen,
            accepted,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The complete requests for exactly this target.
    fn requests_to(&self, target: &str) -> Vec<Recorded> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Request(r) if r.target == target => Some(r),
                _ => None,
            })
            .collect()
    }
}

async fn origin_connection(mut s: TcpStream, log: Arc<Mutex<Vec<Seen>>>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match parse_request(&buf) {
            Parse::Done(r, used) => {
                buf.drain(..used);
                let close = r
                    .all("connection")
                    .iter()
                    .any(|v| v.eq_ignore_ascii_case("close"));
                let body = format!("target:{}", r.target);
                let target = r.target.clone();
                log.lock().unwrap().push(Seen::Request(r));
                if target.starts_with("/case/hold-") {
                    // Never answered: waits for the proxy to give up on it.
                    let _ = s.read(&mut chunk).await;
                    log.lock().unwrap().push(Seen::Abandoned { target });
                    return;
                }
                if target.starts_with("/case/short-") {
                    // 100 bytes promised, 10 sent, and the connection closed.
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                        .await;
                    return;
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(resp.as_bytes()).await.is_err() || close {
                    return;
                }
                continue;
            }
            Parse::Bad(why) => {
                log.lock().unwrap().push(Seen::Garbage {
                    why,
                    bytes: buf.clone(),
                });
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                    .await;
                return;
            }
            Parse::More => {}
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    log.lock().unwrap().push(Seen::Incomplete { bytes: buf });
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

enum Parse {
    More,
    Bad(String),
    /// The request and how many bytes of the buffer it took.
    Done(Recorded, usize),
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A CR not followed by LF, or an LF not preceded by CR (a CR at the very end may still get
/// its LF).
fn bare_cr_or_lf(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len()).find(|&i| match bytes[i] {
        b'\r' => i + 1 < bytes.len() && bytes[i + 1] != b'\n',
        b'\n' => i == 0 || bytes[i - 1] != b'\r',
        _ => false,
    })
}

/// Strict RFC 9112 parsing of one request at the start of `buf`: CRLF line ends only, no
/// obs-fold, tokens for method and names, no control bytes in values, and exactly one framing
/// (one all-digit Content-Length, or `Transfer-Encoding: chunked` alone).
fn parse_request(buf: &[u8]) -> Parse {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if let Some(i) = bare_cr_or_lf(buf) {
            return Parse::Bad(format!("bare CR or LF at byte {i} of the head"));
        }
        if buf.len() > 64 * 1024 {
            return Parse::Bad("head over 64 KiB".into());
        }
        return Parse::More;
    };
    let head = &buf[..end];
    if let Some(i) = bare_cr_or_lf(head) {
        return Parse::Bad(format!("bare CR or LF at byte {i} of the head"));
    }
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let line = lines.next().unwrap_or_default();
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let [method, target, version] = parts[..] else {
        return Parse::Bad(format!("request line {:?}", String::from_utf8_lossy(line)));
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Parse::Bad(format!("method {:?}", String::from_utf8_lossy(method)));
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Parse::Bad(format!("target {:?}", String::from_utf8_lossy(target)));
    }
    if version != b"HTTP/1.1" {
        return Parse::Bad(format!("version {:?}", String::from_utf8_lossy(version)));
    }
    let mut fields = Vec::new();
    for l in lines {
        if let Err(why) = parse_field(l, &mut fields) {
            return Parse::Bad(why);
        }
    }
    let mut r = Recorded {
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        fields,
        body: Vec::new(),
    };
    let te = r.all("transfer-encoding");
    let cl = r.all("content-length");
    let start = end + 4;
    if !te.is_empty() {
        if te.len() != 1 || !te[0].eq_ignore_ascii_case("chunked") || !cl.is_empty() {
            return Parse::Bad(format!(
                "framing: transfer-encoding {te:?} with content-length {cl:?}"
            ));
        }
        return match parse_chunked(&buf[start..]) {
            Parse::Done(body, used) => {
                r.body = body.body;
                Parse::Done(r, start + used)
            }
            Parse::More => Parse::More,
            Parse::Bad(why) => Parse::Bad(why),
        };
    }
    let len = match cl.as_slice() {
        [] => 0,
        [one] if !one.is_empty() && one.len() < 19 && one.bytes().all(|b| b.is_ascii_digit()) => {
            one.parse::<usize>().unwrap()
        }
        _ => return Parse::Bad(format!("content-length {cl:?}")),
    };
    if buf.len() < start + len {
        return Parse::More;
    }
    r.body = buf[start..start + len].to_vec();
    Parse::Done(r, start + len)
}

fn parse_field(l: &[u8], fields: &mut Vec<(String, Vec<u8>)>) -> Result<(), String> {
    let shown = || String::from_utf8_lossy(l).into_owned();
    let colon = l
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| format!("field line without a colon: {:?}", shown()))?;
    let (name, value) = (&l[..colon], &l[colon + 1..]);
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(format!("field name in {:?}", shown()));
    }
    let value = trim_ows(value);
    if !value
        .iter()
        .all(|&b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b) || b >= 0x80)
    {
        return Err(format!("control byte in field value {:?}", shown()));
    }
    fields.push((
        String::from_utf8_lossy(name).to_ascii_lowercase(),
        value.to_vec(),
    ));
    Ok(())
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// A chunked body (no chunk extensions; trailer fields allowed) at the start of `buf`.
fn parse_chunked(buf: &[u8]) -> Parse {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(&buf[pos..], b"\r\n") else {
            return match bare_cr_or_lf(&buf[pos..]) {
                Some(_) => Parse::Bad("bare CR or LF in a chunk size".into()),
                None if buf.len() - pos > 32 => Parse::Bad("chunk size line too long".into()),
                None => Parse::More,
            };
        };
        let size = &buf[pos..pos + eol];
        let ok = !size.is_empty() && size.len() <= 16 && size.iter().all(u8::is_ascii_hexdigit);
        if !ok {
            return Parse::Bad(format!("chunk size {:?}", String::from_utf8_lossy(size)));
        }
        let n = usize::from_str_radix(std::str::from_utf8(size).unwrap(), 16).unwrap();
        pos += eol + 2;
        if n == 0 {
            // Trailer fields up to an empty line.
            loop {
                let Some(eol) = find(&buf[pos..], b"\r\n") else {
                    return Parse::More;
                };
                let line = &buf[pos..pos + eol];
                pos += eol + 2;
                if line.is_empty() {
                    let done = Recorded {
                        method: String::new(),
                        target: String::new(),
                        fields: Vec::new(),
                        body,
                    };
                    return Parse::Done(done, pos);
                }
                if let Err(why) = parse_field(line, &mut Vec::new()) {
                    return Parse::Bad(format!("trailer: {why}"));
                }
            }
        }
        if buf.len() < pos + n + 2 {
            return Parse::More;
        }
        body.extend_from_slice(&buf[pos..pos + n]);
        if &buf[pos + n..pos + n + 2] != b"\r\n" {
            return Parse::Bad("chunk data not followed by CRLF".into());
        }
        pos += n + 2;
    }
}

// ---------------------------------------------------------------------------------------------
// The raw HTTP/2 client
// ---------------------------------------------------------------------------------------------

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const PROTOCOL_ERROR: u32 = 0x1;

fn error_name(code: u32) -> String {
    let name = match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        _ => return format!("error {code:#x}"),
    };
    name.to_string()
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of "literal field without indexing, new name" representations, no Huffman:
/// every byte of every name and value goes on the wire as given, in the order given.
fn header_block(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name);
        hpack_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// A request as the raw client sends it.
#[derive(Clone)]
struct Ask {
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    data: Vec<Vec<u8>>,
    /// Waited before the last DATA frame.
    pause: Duration,
}

impl Ask {
    /// `:method`, `:scheme`, `:authority`, `:path` = `/case/<marker>`, then `x-case: <marker>`.
    fn new(method: &str, marker: &str) -> Ask {
        Ask {
            fields: Vec::new(),
            data: Vec::new(),
            pause: Duration::ZERO,
        }
        .field(":method", method)
        .field(":scheme", "https")
        .field(":authority", AUTHORITY)
        .field(":path", format!("/case/{marker}"))
        .field("x-case", marker)
    }

    fn get(marker: &str) -> Ask {
        Ask::new("GET", marker)
    }

    fn post(marker: &str) -> Ask {
        Ask::new("POST", marker)
    }

    /// Appends a field (pseudo or regular), bytes as given.
    fn field(mut self, name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Ask {
        self.fields
            .push((name.as_ref().to_vec(), value.as_ref().to_vec()));
        self
    }

    /// Replaces the value of every field named `name`.
    fn set(mut self, name: &str, value: impl AsRef<[u8]>) -> Ask {
        for (n, v) in &mut self.fields {
            if n == name.as_bytes() {
                *v = value.as_ref().to_vec();
            }
        }
        self
    }

    fn without(mut self, name: &str) -> Ask {
        self.fields.retain(|(n, _)| n != name.as_bytes());
        self
    }

    fn data(mut self, d: impl AsRef<[u8]>) -> Ask {
        self.data.push(d.as_ref().to_vec());
        self
    }

    fn pause_before_last_data(mut self, d: Duration) -> Ask {
        self.pause = d;
        self
    }
}

/// What became of one stream.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Answer {
        status: u16,
        body: Vec<u8>,
    },
    Reset(u32),
    /// The connection was closed with a GOAWAY that does not cover the stream.
    GoAway(u32),
    /// The connection ended without a word about the stream.
    Closed,
    NoAnswer,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Answer { status, body } => {
                let text = String::from_utf8_lossy(body);
                let short: String = text.chars().take(120).collect();
                write!(f, "answered {status} {short:?}")
            }
            Outcome::Reset(c) => write!(f, "RST_STREAM({})", error_name(*c)),
            Outcome::GoAway(c) => write!(f, "GOAWAY({})", error_name(*c)),
            Outcome::Closed => write!(f, "closed the connection without RST_STREAM or GOAWAY"),
            Outcome::NoAnswer => write!(f, "no answer within {WAIT:?}"),
        }
    }
}

impl Outcome {
    /// RST_STREAM(PROTOCOL_ERROR), a GOAWAY with an error code, or a 4xx from the proxy (the
    /// origin only ever answers 200).
    fn is_refusal(&self) -> bool {
        match self {
            Outcome::Reset(code) => *code == PROTOCOL_ERROR,
            Outcome::GoAway(code) => *code != 0,
            Outcome::Answer { status, .. } => (400..500).contains(status),
            Outcome::Closed | Outcome::NoAnswer => false,
        }
    }

    /// The origin's own answer for `target`.
    fn is_origin_answer(&self, target: &str) -> bool {
        matches!(self, Outcome::Answer { status: 200, body } if body == format!("target:{target}").as_bytes())
    }
}

#[derive(Default)]
struct StreamState {
    status: Option<u16>,
    body: Vec<u8>,
    ended: bool,
    reset: Option<u32>,
    /// The stream's HEADERS and DATA frames as they came: kind, payload length, END_STREAM.
    frames: Vec<(u8, usize, bool)>,
}

struct H2 {
    io: TlsStream<TcpStream>,
    buf: Vec<u8>,
    hpack: loona_hpack::Decoder<'static>,
    next_id: u32,
    streams: HashMap<u32, StreamState>,
    /// A header block waiting for its CONTINUATION frames: stream, fragment, END_STREAM.
    block: Option<(u32, Vec<u8>, bool)>,
    /// Last stream id and error code of a GOAWAY.
    goaway: Option<(u32, u32)>,
    closed: bool,
}

impl H2 {
    async fn open(addr: SocketAddr, connector: &tokio_rustls::TlsConnector) -> H2 {
        let io = tls_connect(addr, connector).await;
        assert_eq!(
            io.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "the guard must pick h2 by ALPN"
        );
        let mut c = H2 {
            io,
            buf: Vec::new(),
            hpack: loona_hpack::Decoder::new(),
            next_id: 1,
            streams: HashMap::new(),
            block: None,
            goaway: None,
            closed: false,
        };
        let _ = c.io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        // ENABLE_PUSH = 0, INITIAL_WINDOW_SIZE = 1 MiB; and 1 MiB more for the connection, so
        // the client never needs to send WINDOW_UPDATE for the small answers here.
        let mut settings = Vec::new();
        settings.extend_from_slice(&[0, 2, 0, 0, 0, 0]);
        settings.extend_from_slice(&[0, 4]);
        settings.extend_from_slice(&(1u32 << 20).to_be_bytes());
        c.frame(SETTINGS, 0, 0, &settings).await;
        c.frame(WINDOW_UPDATE, 0, 0, &(1u32 << 20).to_be_bytes())
            .await;
        c
    }

    fn is_open(&self) -> bool {
        self.goaway.is_none() && !self.closed
    }

    async fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        // A write after the guard closed the connection fails; `outcome` then says so.
        if self.io.write_all(&f).await.is_ok() {
            let _ = self.io.flush().await;
        }
    }

    /// Sends the request on a new stream; returns the stream id.
    async fn send(&mut self, ask: &Ask) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        let block = header_block(&ask.fields);
        let mut flags = END_HEADERS;
        if ask.data.is_empty() {
            flags |= END_STREAM;
        }
        self.frame(HEADERS, flags, id, &block).await;
        for (i, d) in ask.data.iter().enumerate() {
            let last = i + 1 == ask.data.len();
            if last && !ask.pause.is_zero() {
                tokio::time::sleep(ask.pause).await;
            }
            self.frame(DATA, if last { END_STREAM } else { 0 }, id, d)
                .await;
        }
        id
    }

    /// Waits for what becomes of `id`: its whole answer, a reset, a GOAWAY or the end.
    async fn outcome(&mut self, id: u32) -> Outcome {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.streams.get(&id) {
                if let Some(code) = s.reset {
                    return Outcome::Reset(code);
                }
                if s.ended {
                    return Outcome::Answer {
                        status: s.status.unwrap_or(0),
                        body: s.body.clone(),
                    };
                }
            }
            if let Some((last, code)) = self.goaway {
                if last < id || self.closed {
                    return Outcome::GoAway(code);
                }
            }
            if self.closed {
                return Outcome::Closed;
            }
            if !self.read_frame(deadline).await {
                if self.closed {
                    continue;
                }
                return Outcome::NoAnswer;
            }
        }
    }

    /// Reads and handles one frame; false on timeout or when the connection has ended.
    async fn read_frame(&mut self, deadline: Instant) -> bool {
        let mut chunk = [0u8; 16384];
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let head: Vec<u8> = self.buf.drain(..9).collect();
                    let payload: Vec<u8> = self.buf.drain(..len).collect();
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & !(1 << 31);
                    self.handle(head[3], head[4], stream, payload).await;
                    return true;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.io.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.closed = true;
                    return false;
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn handle(&mut self, kind: u8, flags: u8, stream: u32, mut p: Vec<u8>) {
        match kind {
            DATA => {
                if flags & PADDED != 0 && !p.is_empty() {
                    let pad = p[0] as usize;
                    p = p[1..p.len().saturating_sub(pad)].to_vec();
                }
                let s = self.streams.entry(stream).or_default();
                s.frames.push((DATA, p.len(), flags & END_STREAM != 0));
                s.body.extend_from_slice(&p);
                if flags & END_STREAM != 0 {
                    s.ended = true;
                }
            }
            HEADERS => {
                let mut start = 0;
                let mut end = p.len();
                if flags & PADDED != 0 {
                    start = 1;
                    end = end.saturating_sub(p[0] as usize);
                }
                if flags & PRIORITY_FLAG != 0 {
                    start += 5;
                }
                let frag = p[start..end].to_vec();
                self.streams.entry(stream).or_default().frames.push((
                    HEADERS,
                    p.len(),
                    flags & END_STREAM != 0,
                ));
                self.block = Some((stream, frag, flags & END_STREAM != 0));
                if flags & END_HEADERS != 0 {
                    self.decode_block();
                }
            }
            CONTINUATION => {
                if let Some((_, frag, _)) = &mut self.block {
                    frag.extend_from_slice(&p);
                }
                if flags & END_HEADERS != 0 {
                    self.decode_block();
                }
            }
            RST_STREAM => {
                let code = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                self.streams.entry(stream).or_default().reset = Some(code);
            }
            SETTINGS if flags & ACK == 0 => {
                self.frame(SETTINGS, ACK, 0, &[]).await;
            }
            PING if flags & ACK == 0 => {
                self.frame(PING, ACK, 0, &p).await;
            }
            GOAWAY => {
                let last = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) & !(1 << 31);
                let code = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
                self.goaway = Some((last, code));
            }
            // SETTINGS and PING acks, WINDOW_UPDATE, PRIORITY, anything else: nothing to do.
            _ => {}
        }
    }

    /// Every header block goes through the decoder in order (its dynamic table is per
    /// connection), whichever stream it is for.
    fn decode_block(&mut self) {
        let Some((stream, block, end_stream)) = self.block.take() else {
            return;
        };
        let fields = self
            .hpack
            .decode(&block)
            .unwrap_or_else(|e| panic!("cannot decode the guard's header block: {e:?}"));
        let s = self.streams.entry(stream).or_default();
        for (name, value) in fields {
            if name == b":status" && s.status.is_none() {
                s.status = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|v| v.parse().ok());
            }
        }
        if end_stream {
            s.ended = true;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The bench: origin, guard, clients, and the list of broken rules
// ---------------------------------------------------------------------------------------------

/// How much of a refused request the origin may have seen.
#[derive(Clone, Copy, PartialEq)]
enum Reach {
    /// Nothing at all: not a byte mentioning the request.
    Nothing,
    /// Possibly a head and part of a body, then the proxy gave up: never a complete request.
    NoCompleteRequest,
}

struct Bench {
    origin: Origin,
    guard: qsguard::Guard,
    tls: TestCert,
    h2c: tokio_rustls::TlsConnector,
    h1c: tokio_rustls::TlsConnector,
    n: AtomicUsize,
    broken: Mutex<Vec<String>>,
    /// (rule, marker, how far the request may have got).
    never: Mutex<Vec<(String, String, Reach)>>,
}

impl Bench {
    async fn start() -> Bench {
        let origin = Origin::start().await;
        let tls = TestCert::new();
        let server = format!("{}\nmax_body_size = {MAX_BODY}", tls.server_toml());
        let guard = guard_with(&config_text(&[origin.addr], &server, "")).await;
        Bench {
            h2c: tls.connector(&[b"h2"]),
            h1c: tls.connector(&[b"http/1.1"]),
            origin,
            guard,
            tls,
            n: AtomicUsize::new(0),
            broken: Mutex::new(Vec::new()),
            never: Mutex::new(Vec::new()),
        }
    }

    /// A marker no other request of this test carries.
    fn unique(&self, label: &str) -> String {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("{label}-{n}")
    }

    fn broke(&self, what: String) {
        self.broken.lock().unwrap().push(what);
    }

    fn check(&self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.broke(what());
        }
    }

    async fn h2(&self) -> H2 {
        H2::open(self.guard.addr, &self.h2c).await
    }

    /// A request the proxy must forward: answered by the origin, which recorded it once.
    async fn forwarded(&self, rule: &str, c: &mut H2, ask: &Ask, target: &str) -> Option<Recorded> {
        let id = c.send(ask).await;
        let out = c.outcome(id).await;
        eprintln!("[{rule}] {out}");
        if !out.is_origin_answer(target) {
            self.broke(format!(
                "{rule}: a valid request must get the origin's answer for {target}, but the proxy {out}"
            ));
            return None;
        }
        let seen = self.origin.requests_to(target);
        self.check(seen.len() == 1, || {
            format!(
                "{rule}: the origin must record {target} exactly once, got {}",
                seen.len()
            )
        });
        seen.into_iter().next()
    }

    /// A request the proxy must refuse, on a new connection; then the proxy keeps serving.
    async fn refused(&self, rule: &str, marker: &str, ask: Ask, reach: Reach) {
        self.never
            .lock()
            .unwrap()
            .push((rule.to_string(), marker.to_string(), reach));
        let mut c = self.h2().await;
        let id = c.send(&ask).await;
        let out = c.outcome(id).await;
        eprintln!("[{rule}] {out}");
        self.check(out.is_refusal(), || {
            format!("{rule}: must be refused (RST_STREAM(PROTOCOL_ERROR), GOAWAY with an error, or a 4xx from the proxy), but the proxy {out}")
        });
        self.keeps_serving(rule, &mut c).await;
    }

    /// A request the proxy must answer itself with `status`, never forwarding it.
    async fn answered_by_proxy(
        &self,
        rule: &str,
        marker: &str,
        ask: Ask,
        status: u16,
        reach: Reach,
    ) {
        self.never
            .lock()
            .unwrap()
            .push((rule.to_string(), marker.to_string(), reach));
        let mut c = self.h2().await;
        let id = c.send(&ask).await;
        let out = c.outcome(id).await;
        eprintln!("[{rule}] {out}");
        self.check(
            matches!(out, Outcome::Answer { status: s, .. } if s == status),
            || format!("{rule}: the proxy must answer {status}, but it {out}"),
        );
        self.keeps_serving(rule, &mut c).await;
    }

    /// After a refused request: the same HTTP/2 connection (if still open), a new one, and a
    /// victim's HTTP/1.1 request each get their own answer from the origin.
    async fn keeps_serving(&self, rule: &str, c: &mut H2) {
        if c.is_open() {
            let target = format!("/next/{}", self.unique("same-conn"));
            let id = c.send(&Ask::get("x").set(":path", &target)).await;
            let out = c.outcome(id).await;
            self.check(out.is_origin_answer(&target), || {
                format!("after {rule}: the next request on the same HTTP/2 connection must get its own answer, but the proxy {out}")
            });
        }
        let target = format!("/fresh/{}", self.unique("new-conn"));
        let mut fresh = self.h2().await;
        let id = fresh.send(&Ask::get("x").set(":path", &target)).await;
        let out = fresh.outcome(id).await;
        self.check(out.is_origin_answer(&target), || {
            format!("after {rule}: a request on a new HTTP/2 connection must get its own answer, but the proxy {out}")
        });
        if let Err(e) = self.victim().await {
            self.broke(format!("after {rule}: {e}"));
        }
    }

    /// Another client's plain HTTP/1.1 request (TLS, ALPN http/1.1), with a unique target.
    async fn victim(&self) -> Result<(), String> {
        let target = format!("/victim/{}", self.unique("v"));
        let go = async {
            let stream = tls_connect(self.guard.addr, &self.h1c).await;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = http::Request::get(&target)
                .header("host", AUTHORITY)
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, body) = tokio::time::timeout(WAIT, go)
            .await
            .map_err(|_| format!("the victim's HTTP/1.1 request for {target} got no answer"))?
            .map_err(|e| format!("the victim's HTTP/1.1 request for {target} failed: {e}"))?;
        let want = format!("target:{target}");
        if status != 200 || body != want.as_bytes() {
            return Err(format!(
                "the victim's HTTP/1.1 request for {target} must get its own answer (pooled upstream connection poisoned?), got {status} {:?}",
                String::from_utf8_lossy(&body)
            ));
        }
        Ok(())
    }

    /// The origin-side checks, then the verdict: fails with every broken rule.
    async fn finish(self) {
        // Anything the proxy is still sending (or giving up on) arrives, or ends, by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = self.origin.seen();
        for (rule, marker, reach) in self.never.lock().unwrap().iter() {
            for s in seen.iter().filter(|s| s.mentions(marker)) {
                let bad = match (reach, s) {
                    (Reach::Nothing, _) => true,
                    (Reach::NoCompleteRequest, Seen::Request(_)) => true,
                    (Reach::NoCompleteRequest, _) => false,
                };
                if bad {
                    self.broke(format!(
                        "{rule}: must never reach the origin, but it saw {s:?}"
                    ));
                }
            }
        }
        for s in &seen {
            if let Seen::Incomplete { bytes } = s {
                let head: String = String::from_utf8_lossy(bytes).chars().take(60).collect();
                eprintln!(
                    "[origin] a request broke off after {} bytes: {head:?}",
                    bytes.len()
                );
            }
            if let Seen::Garbage { why, bytes } = s {
                self.broke(format!(
                    "the origin got bytes that are not HTTP/1.1 (front and back end out of step): {why}: {:?}",
                    String::from_utf8_lossy(bytes)
                ));
            }
            if s.mentions("smuggled") {
                self.broke(format!(
                    "a smuggled request or field reached the origin: {s:?}"
                ));
            }
            if let Seen::Request(r) = s {
                for name in ["x-upper", "x-injected"] {
                    self.check(r.all(name).is_empty(), || {
                        format!(
                            "the field {name} must never reach the origin, but {} carried it",
                            r.target
                        )
                    });
                }
            }
        }
        let broken = self.broken.lock().unwrap().clone();
        self.guard.shutdown().await;
        drop(self.tls);
        assert!(
            broken.is_empty(),
            "{} rule(s) broken:\n  - {}",
            broken.len(),
            broken.join("\n  - ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// 1. Baseline: a valid GET and valid POSTs reach the origin exactly. The GET's split `cookie`
///    fields arrive as one field joined with "; " (RFC 9113 8.2.3), `:authority` becomes Host,
///    other fields keep their bytes; a POST with `content-length` and two DATA frames arrives
///    with that Content-Length and exactly that body, and one without `content-length` arrives
///    with its body framed (Content-Length or chunked), never both.
#[tokio::test]
async fn h2_valid_requests_reach_the_origin_exactly() {
    let b = Bench::start().await;
    let mut c = b.h2().await;

    let m = b.unique("get");
    let ask = Ask::get(&m)
        .field("cookie", "X-Qlik-Session-HTTP=a=b\"c")
        .field("cookie", "z=1")
        .field("x-custom", "v 1;\"q\"");
    let target = format!("/case/{m}");
    if let Some(r) = b.forwarded("valid GET", &mut c, &ask, &target).await {
        b.check(r.method == "GET", || {
            format!("valid GET: method {:?}", r.method)
        });
        b.check(r.all("host") == [AUTHORITY], || {
            format!(
                "valid GET: :authority must become the one Host, got {:?}",
                r.all("host")
            )
        });
        b.check(
            r.all("cookie") == ["X-Qlik-Session-HTTP=a=b\"c; z=1"],
            || {
                format!(
                    "valid GET: split cookie fields must be joined with \"; \" into one, got {:?}",
                    r.all("cookie")
                )
            },
        );
        b.check(r.all("x-custom") == ["v 1;\"q\""], || {
            format!(
                "valid GET: a field's bytes must be kept, got {:?}",
                r.all("x-custom")
            )
        });
        b.check(r.all("x-case") == [m.as_str()], || {
            format!("valid GET: x-case {:?}", r.all("x-case"))
        });
        b.check(
            r.all("transfer-encoding").is_empty() && r.body.is_empty(),
            || {
                format!(
                    "valid GET: no body expected, got TE {:?} body {:?}",
                    r.all("transfer-encoding"),
                    r.body
                )
            },
        );
        b.check(r.all("x-forwarded-proto") == ["https"], || {
            format!(
                "valid GET: X-Forwarded-Proto {:?}",
                r.all("x-forwarded-proto")
            )
        });
    }

    let m = b.unique("post");
    let ask = Ask::post(&m)
        .field("content-type", "text/plain")
        .field("content-length", "11")
        .data("hello")
        .data(" world");
    let target = format!("/case/{m}");
    if let Some(r) = b
        .forwarded("valid POST with content-length", &mut c, &ask, &target)
        .await
    {
        b.check(r.method == "POST", || {
            format!("valid POST: method {:?}", r.method)
        });
        b.check(r.all("content-length") == ["11"], || {
            format!(
                "valid POST: Content-Length must be the one sent, got {:?}",
                r.all("content-length")
            )
        });
        b.check(r.all("transfer-encoding").is_empty(), || {
            format!(
                "valid POST: no Transfer-Encoding next to Content-Length, got {:?}",
                r.all("transfer-encoding")
            )
        });
        b.check(r.body == b"hello world", || {
            format!(
                "valid POST: body must arrive exactly, got {:?}",
                String::from_utf8_lossy(&r.body)
            )
        });
        b.check(r.all("host") == [AUTHORITY], || {
            format!("valid POST: Host {:?}", r.all("host"))
        });
    }

    let m = b.unique("post-no-length");
    let ask = Ask::post(&m).data("abc").data("def");
    let target = format!("/case/{m}");
    if let Some(r) = b
        .forwarded("valid POST without content-length", &mut c, &ask, &target)
        .await
    {
        b.check(r.body == b"abcdef", || {
            format!(
                "valid POST without content-length: body must arrive exactly, got {:?}",
                String::from_utf8_lossy(&r.body)
            )
        });
        let framing = (
            r.all("content-length").len(),
            r.all("transfer-encoding").len(),
        );
        b.check(framing == (1, 0) || framing == (0, 1), || {
            format!("valid POST without content-length: exactly one framing field upstream, got CL {:?} TE {:?}", r.all("content-length"), r.all("transfer-encoding"))
        });
    }

    b.keeps_serving("the baseline requests", &mut c).await;
    // Open connections would hold the guard's shutdown for its grace period.
    drop(c);
    b.finish().await;
}

/// Builds a request around its marker.
type MakeAsk = Box<dyn Fn(&str) -> Ask>;

/// 2. RFC 9113 8.1.1: a `content-length` that disagrees with the sum of the DATA frames makes
///    the request malformed. Larger than the DATA (END_STREAM early, on a DATA frame or on the
///    HEADERS) or smaller (in one DATA frame, or the extra bytes in a later frame after the
///    declared length was already filled): refused, and the origin never records a complete
///    request for it (a head and part of a body, then a closed connection, is tolerated), and
///    never receives unparsable bytes.
/// Qlik's answer ends on the DATA frame that carries its last bytes (END_STREAM set there),
/// not on an empty DATA frame of its own after them: a frame less per response, and no
/// extra pass of the connection for it.
#[tokio::test]
async fn h2_answer_ends_with_its_last_bytes() {
    let b = Bench::start().await;
    let mut c = b.h2().await;
    for _ in 0..3 {
        let m = b.unique("end");
        let id = c.send(&Ask::get(&m)).await;
        let out = c.outcome(id).await;
        assert!(out.is_origin_answer(&format!("/case/{m}")), "{out}");
        let frames = &c.streams[&id].frames;
        let data: Vec<_> = frames.iter().filter(|f| f.0 == DATA).collect();
        assert!(
            frames.first().is_some_and(|f| f.0 == HEADERS && !f.2),
            "the answer has a body: HEADERS without END_STREAM first, got {frames:?}"
        );
        assert!(
            !data.is_empty() && data.iter().all(|f| f.1 > 0),
            "no empty DATA frame, got {frames:?}"
        );
        assert!(
            frames.last().is_some_and(|f| f.0 == DATA && f.2)
                && frames.iter().filter(|f| f.2).count() == 1,
            "END_STREAM on the last DATA frame, and only there, got {frames:?}"
        );
    }
    // Each answer, ended with its last bytes, gave its connection back to the pool: the
    // three went over one.
    assert_eq!(b.origin.accepted.load(Ordering::SeqCst), 1);
    b.finish().await;
}

/// A client that resets its stream while Qlik is still answering: the guard gives up the
/// upstream request (its connection closed, never pooled) and the HTTP/2 connection goes on.
/// An answer that breaks off after its head: the stream is reset (INTERNAL_ERROR), never
/// ended as if it were whole.
#[tokio::test]
async fn h2_resets_both_ways() {
    let b = Bench::start().await;
    let mut c = b.h2().await;
    let m = b.unique("hold");
    let target = format!("/case/{m}");
    let id = c.send(&Ask::get(&m)).await;
    let waiting = Instant::now() + WAIT;
    while b.origin.requests_to(&target).is_empty() {
        assert!(
            Instant::now() < waiting,
            "the request never reached the origin"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.frame(RST_STREAM, 0, id, &0x8u32.to_be_bytes()).await; // CANCEL
    let abandoned = |b: &Bench| {
        b.origin
            .seen()
            .iter()
            .any(|s| matches!(s, Seen::Abandoned { target: t } if *t == target))
    };
    let waiting = Instant::now() + WAIT;
    while !abandoned(&b) {
        assert!(
            Instant::now() < waiting,
            "the guard kept waiting for Qlik's answer to a stream the client reset"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let m = b.unique("short");
    let id = c.send(&Ask::get(&m)).await;
    let out = c.outcome(id).await;
    assert!(
        matches!(out, Outcome::Reset(0x2)),
        "an answer cut short must reset the stream with INTERNAL_ERROR, but the proxy {out}"
    );
    let frames = &c.streams[&id].frames;
    assert!(
        frames.iter().all(|f| !f.2),
        "nothing of it carries END_STREAM: {frames:?}"
    );
    b.keeps_serving("the resets", &mut c).await;
    drop(c);
    b.finish().await;
}

#[tokio::test]
async fn h2_content_length_disagreeing_with_data_is_refused() {
    let b = Bench::start().await;
    let cases: Vec<(&str, MakeAsk)> = vec![
        (
            "content-length 20, 5 bytes of DATA with END_STREAM",
            Box::new(|m| Ask::post(m).field("content-length", "20").data("short")),
        ),
        (
            "content-length 20, 5 bytes of DATA, then an empty DATA with END_STREAM",
            Box::new(|m| {
                Ask::post(m)
                    .field("content-length", "20")
                    .data("short")
                    .data("")
                    .pause_before_last_data(Duration::from_millis(150))
            }),
        ),
        (
            "content-length 5, END_STREAM on the HEADERS",
            Box::new(|m| Ask::post(m).field("content-length", "5")),
        ),
        (
            "content-length 5, 11 bytes in one DATA frame",
            Box::new(|m| {
                Ask::post(m)
                    .field("content-length", "5")
                    .data("hello world")
            }),
        ),
        (
            "content-length 0, 1 byte of DATA",
            Box::new(|m| Ask::post(m).field("content-length", "0").data("x")),
        ),
        (
            "content-length 5, 5 bytes of DATA, then 6 more in a later DATA frame",
            Box::new(|m| {
                Ask::post(m)
                    .field("content-length", "5")
                    .data("hello")
                    .data(" world")
                    .pause_before_last_data(Duration::from_millis(150))
            }),
        ),
    ];
    for (rule, make) in &cases {
        let m = b.unique("cl");
        let rule = format!("RFC 9113 8.1.1, {rule}");
        b.refused(&rule, &m, make(&m), Reach::NoCompleteRequest)
            .await;
    }
    b.finish().await;
}

/// 3. RFC 9113 8.2.2: connection-specific fields (`connection`, `keep-alive`,
///    `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` other than `trailers`) make
///    a request malformed: refused, never at the origin. `te: trailers` is allowed, and is
///    still not forwarded (TE is hop-by-hop).
#[tokio::test]
async fn h2_connection_specific_fields_are_refused() {
    let b = Bench::start().await;
    let forbidden = [
        ("connection", "close"),
        ("connection", "content-length"),
        ("transfer-encoding", "chunked"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("upgrade", "websocket"),
        ("te", "gzip"),
    ];
    for (name, value) in forbidden {
        let m = b.unique(name);
        let rule = format!("RFC 9113 8.2.2, `{name}: {value}` is connection-specific");
        let mut ask = Ask::post(&m).field(name, value);
        if name == "transfer-encoding" {
            // What an HTTP/1.1 back end would read as a chunked body.
            ask = ask.data("5\r\nhello\r\n0\r\n\r\n");
        } else {
            ask = ask.data("hello");
        }
        b.refused(&rule, &m, ask, Reach::Nothing).await;
    }

    let mut c = b.h2().await;
    let m = b.unique("te-trailers");
    let target = format!("/case/{m}");
    let ask = Ask::get(&m).field("te", "trailers");
    if let Some(r) = b
        .forwarded("`te: trailers` is allowed", &mut c, &ask, &target)
        .await
    {
        b.check(r.all("te").is_empty(), || {
            format!(
                "`te: trailers` must not be forwarded to the HTTP/1.1 origin, got te {:?}",
                r.all("te")
            )
        });
    }
    b.keeps_serving("`te: trailers`", &mut c).await;
    // Open connections would hold the guard's shutdown for its grace period.
    drop(c);
    b.finish().await;
}

/// 4. RFC 9113 8.2.1: CR, LF or NUL in a field value, and an upper-case field name, make a
///    request malformed: refused, and the origin never sees the field, nor `/smuggled` (the
///    request a CR LF would inject). The same goes for CR LF in `:path`, `:method` and
///    `:authority`, which become the request line and Host upstream.
#[tokio::test]
async fn h2_cr_lf_nul_and_upper_case_names_are_refused() {
    let b = Bench::start().await;
    let values: [(&str, &[u8]); 4] = [
        ("CR in a field value", b"a\rb"),
        ("LF in a field value", b"a\nb"),
        (
            "CR LF and an injected request in a field value",
            b"a\r\nContent-Length: 0\r\n\r\nGET /smuggled HTTP/1.1",
        ),
        ("NUL in a field value", b"a\0b"),
    ];
    for (rule, value) in values {
        let m = b.unique("value");
        let rule = format!("RFC 9113 8.2.1, {rule}");
        let ask = Ask::get(&m).field("x-injected", value);
        b.refused(&rule, &m, ask, Reach::Nothing).await;
    }

    let m = b.unique("upper");
    let ask = Ask::get(&m).field("X-Upper", "1");
    b.refused(
        "RFC 9113 8.2.1, an upper-case field name",
        &m,
        ask,
        Reach::Nothing,
    )
    .await;

    let m = b.unique("path");
    let ask = Ask::get(&m).set(
        ":path",
        format!("/case/{m} HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /smuggled"),
    );
    b.refused("RFC 9113 8.2.1, CR LF in :path", &m, ask, Reach::Nothing)
        .await;

    let m = b.unique("method");
    let ask = Ask::get(&m).set(
        ":method",
        "GET /smuggled HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET",
    );
    b.refused("RFC 9113 8.2.1, CR LF in :method", &m, ask, Reach::Nothing)
        .await;

    let m = b.unique("authority");
    let ask = Ask::get(&m).set(":authority", format!("{AUTHORITY}\r\nX-Injected: 1"));
    b.refused(
        "RFC 9113 8.2.1, CR LF in :authority",
        &m,
        ask,
        Reach::Nothing,
    )
    .await;

    b.finish().await;
}

/// 5. RFC 9113 8.3.1: a `host` that differs from `:authority` is refused (malformed), never
///    at the origin. A `host` equal to `:authority`, or none (`:authority` becomes Host), is
///    forwarded with exactly one Host, the right one.
#[tokio::test]
async fn h2_host_must_agree_with_authority() {
    let b = Bench::start().await;
    let m = b.unique("host-differs");
    let ask = Ask::get(&m).field("host", "evil.example.net");
    b.refused(
        "RFC 9113 8.3.1, `host` differing from `:authority`",
        &m,
        ask,
        Reach::Nothing,
    )
    .await;

    let mut c = b.h2().await;
    for (rule, with_host) in [
        ("`host` equal to `:authority`", true),
        ("no `host`, only `:authority`", false),
    ] {
        let m = b.unique("host");
        let target = format!("/case/{m}");
        let mut ask = Ask::get(&m);
        if with_host {
            ask = ask.field("host", AUTHORITY);
        }
        if let Some(r) = b.forwarded(rule, &mut c, &ask, &target).await {
            b.check(r.all("host") == [AUTHORITY], || {
                format!(
                    "{rule}: the origin must get exactly one Host: {AUTHORITY}, got {:?}",
                    r.all("host")
                )
            });
        }
    }
    b.keeps_serving("the Host checks", &mut c).await;
    // Open connections would hold the guard's shutdown for its grace period.
    drop(c);
    b.finish().await;
}

/// 6. `content-length: +5`, `content-length: 5, 5` and two differing `content-length`
///    fields: a 400 from the proxy, never at the origin. A body over `server.max_body_size`:
///    a 413, whether `content-length` announces it (refused before anything is forwarded) or
///    not (the origin never records a complete request).
#[tokio::test]
async fn h2_bad_content_length_values_are_refused_and_big_bodies_get_413() {
    let b = Bench::start().await;
    let cases: [(&str, &[&str]); 3] = [
        ("`content-length: +5`", &["+5"]),
        ("`content-length: 5, 5`", &["5, 5"]),
        ("two differing content-length fields (5 and 6)", &["5", "6"]),
    ];
    for (rule, values) in cases {
        let m = b.unique("cl-value");
        let mut ask = Ask::post(&m);
        for v in values {
            ask = ask.field("content-length", v);
        }
        // The h2 crate resets these streams itself (PROTOCOL_ERROR) before the proxy sees
        // them; the proxy's own check (a 400) stands behind it.
        b.refused(rule, &m, ask.data("hello"), Reach::Nothing).await;
    }

    let big = vec![b'x'; MAX_BODY + 500];
    let m = b.unique("too-big");
    let ask = Ask::post(&m)
        .field("content-length", big.len().to_string())
        .data(&big);
    b.answered_by_proxy(
        "a body over server.max_body_size, announced by content-length",
        &m,
        ask,
        413,
        Reach::Nothing,
    )
    .await;

    let m = b.unique("too-big-unannounced");
    let ask = Ask::post(&m)
        .data(&big[..MAX_BODY / 2])
        .data(&big[MAX_BODY / 2..]);
    b.answered_by_proxy(
        "a body over server.max_body_size, without content-length",
        &m,
        ask,
        413,
        Reach::NoCompleteRequest,
    )
    .await;
    b.finish().await;
}

/// 6b. The fields of an HTTP/2 request are written as HTTP/1.1 lines and judged by the same
///    rules as a head that came as HTTP/1.1 (`parse::RequestWriter`): a name with `_` that a
///    server folding `_` into `-` reads as a framing field is refused, more fields than an
///    HTTP/1.1 head may have is 431, and a value with whitespace around it reaches the origin
///    without it.
#[tokio::test]
async fn h2_fields_are_judged_by_the_http1_rules() {
    let b = Bench::start().await;
    for (name, value) in [("content_length", "5"), ("transfer_encoding", "chunked")] {
        let m = b.unique("lookalike");
        let ask = Ask::post(&m).field(name, value).data("hello");
        b.refused(
            &format!("`{name}` stands for a framing field"),
            &m,
            ask,
            Reach::Nothing,
        )
        .await;
    }

    let m = b.unique("many-fields");
    let mut ask = Ask::get(&m);
    for i in 0..130 {
        ask = ask.field(format!("x-f{i}"), "1");
    }
    b.answered_by_proxy(
        "more than 128 fields (as an HTTP/1.1 head)",
        &m,
        ask,
        431,
        Reach::Nothing,
    )
    .await;

    let mut c = b.h2().await;
    let m = b.unique("padded");
    let ask = Ask::get(&m).field("x-padded", " \tv w\t ");
    let target = format!("/case/{m}");
    if let Some(r) = b.forwarded("a padded value", &mut c, &ask, &target).await {
        b.check(r.all("x-padded") == ["v w"], || {
            format!(
                "a padded value must reach the origin without its whitespace, got {:?}",
                r.all("x-padded")
            )
        });
    }
    b.finish().await;
}

/// 7. RFC 9113 8.3: a pseudo-header field after a regular field, a request without `:path`,
///    and a repeated `:path` are malformed: refused, never at the origin.
#[tokio::test]
async fn h2_misplaced_or_missing_pseudo_headers_are_refused() {
    let b = Bench::start().await;
    let m = b.unique("pseudo-late");
    let ask = Ask::get(&m)
        .without(":path")
        .field(":path", format!("/case/{m}"));
    b.refused(
        "RFC 9113 8.3, a pseudo-header after a regular field",
        &m,
        ask,
        Reach::Nothing,
    )
    .await;

    let m = b.unique("no-path");
    let ask = Ask::get(&m).without(":path");
    b.refused(
        "RFC 9113 8.3.1, a request without :path",
        &m,
        ask,
        Reach::Nothing,
    )
    .await;

    let m = b.unique("two-paths");
    let mut ask = Ask::get(&m).without("x-case");
    ask = ask.field(":path", "/smuggled").field("x-case", &m);
    b.refused("RFC 9113 8.3.1, a repeated :path", &m, ask, Reach::Nothing)
        .await;
    b.finish().await;
}

/// The origin's parser is as strict as the tests rely on: what it accepts is one well-framed
/// request, and bare LF, obs-fold, control bytes and ambiguous framing are GARBAGE.
#[test]
fn the_origin_parser_is_strict() {
    let done = |raw: &[u8]| match parse_request(raw) {
        Parse::Done(r, used) => Some((r, used)),
        _ => None,
    };
    let bad = |raw: &[u8]| matches!(parse_request(raw), Parse::Bad(_));
    let (r, used) =
        done(b"POST /a HTTP/1.1\r\nHost: q\r\nContent-Length: 3\r\n\r\nabcGET").unwrap();
    assert_eq!(
        (r.target.as_str(), r.body.as_slice(), used),
        ("/a", &b"abc"[..], 51)
    );
    let (r, _) =
        done(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
            .unwrap();
    assert_eq!(r.body, b"abc");
    assert!(matches!(
        parse_request(b"GET /a HTTP/1.1\r\nHost: q\r\n"),
        Parse::More
    ));
    assert!(bad(b"GET /a HTTP/1.1\nHost: q\r\n\r\n"), "bare LF");
    assert!(bad(b"GET /a HTTP/1.1\r\nX: a\rb\r\n\r\n"), "bare CR");
    assert!(bad(b"GET /a HTTP/1.1\r\nX: a\x00b\r\n\r\n"), "NUL");
    assert!(bad(b"GET /a HTTP/1.1\r\nX: a\r\n b\r\n\r\n"), "obs-fold");
    assert!(bad(b"GET /a HTTP/1.1\r\nX y: a\r\n\r\n"), "space in a name");
    assert!(bad(b"GET /a b HTTP/1.1\r\n\r\n"), "space in the target");
    assert!(bad(b"GET /a HTTP/1.0\r\n\r\n"), "not HTTP/1.1");
    assert!(
        bad(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"),
        "two CL"
    );
    assert!(
        bad(b"POST /a HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc"),
        "signed CL"
    );
    assert!(
        bad(b"POST /a HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
        "CL and TE"
    );
    assert!(
        bad(b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        "TE list"
    );
    assert!(
        bad(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\n\r\n"),
        "chunk extension"
    );
    assert!(
        bad(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n"),
        "chunk overrun"
    );
}
