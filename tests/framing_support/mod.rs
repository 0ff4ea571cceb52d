//! Plumbing for the framing tests (`framing_fuzz.rs`, `framing_corpus.rs`): a recording origin
//! with its own strict HTTP/1.1 parser, a raw client with a strict response splitter, the
//! guard configurations, and the checks every case ends with (the victim request on a fresh
//! connection, the origin's log of what it saw).
//!
//! The origin is deliberately independent of the engine (and of httparse): it is the "back
//! end" of a request-smuggling pair, so it must frame messages its own way, and it must be
//! stricter than any real server. Whatever it cannot read by the letter of RFC 9112 is logged
//! as [`Event::Garbage`] and the connection is closed; a test fails on any garbage at all,
//! because garbage means the proxy passed on something it should have refused or normalised.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Trailer fields the proxy may pass on (everything else in a trailer section is dropped).
pub const ALLOWED_TRAILERS: [&str; 3] = ["server-timing", "content-digest", "repr-digest"];

/// How long a raw client waits for the proxy to finish answering and close.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest head or chunk line the origin accepts (the proxy's own limit is 32 KiB).
const ORIGIN_MAX_LINE: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Guard configurations

/// Extra config shared by both variants: a short response timeout, so that a request the
/// proxy passes on half-framed (the origin waits for bytes that never come) turns into a 504
/// within the client's patience instead of hanging the test.
const COMMON_EXTRA: &str = "[proxy]\nresponse_timeout = \"3s\"\n";

/// The guard as a plain proxy: `[sessions] guard = false`.
pub fn guard_off_config(origin: SocketAddr) -> String {
    super::common::config_text(
        &[origin],
        "",
        &format!("[sessions]\nguard = false\n{COMMON_EXTRA}"),
    )
}

/// The guard with its session guard on (the default).
pub fn guard_on_config(origin: SocketAddr) -> String {
    super::common::config_text(&[origin], "", COMMON_EXTRA)
}

// ---------------------------------------------------------------------------------------------
// The recording origin

/// One complete request as the origin read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// The origin's id of the TCP connection it came on (from 1).
    pub conn: u64,
    /// Its position on that connection (from 0).
    pub seq: u64,
    pub method: String,
    pub target: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Fields in order: lowercase name, value without surrounding OWS, byte for byte.
    pub fields: Vec<(String, Vec<u8>)>,
    /// The message body (decoded if chunked).
    pub body: Vec<u8>,
    /// The body came chunked.
    pub chunked: bool,
    /// The raw extension part (`;a=b...`) of every chunk line that had one.
    pub chunk_exts: Vec<Vec<u8>>,
    /// Trailer fields (lowercase name, trimmed value).
    pub trailers: Vec<(String, Vec<u8>)>,
}

impl Recorded {
    /// The values of a field, in order.
    pub fn values(&self, name: &str) -> Vec<&[u8]> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The fields minus the ones a proxy writes itself (X-Forwarded-*) and minus the framing
    /// fields (checked on their own): what must equal the client's end-to-end fields.
    pub fn end_to_end(&self) -> Vec<(String, Vec<u8>)> {
        self.fields
            .iter()
            .filter(|(n, _)| {
                !matches!(
                    n.as_str(),
                    "x-forwarded-for"
                        | "x-forwarded-proto"
                        | "x-forwarded-host"
                        | "content-length"
                        | "transfer-encoding"
                )
            })
            .cloned()
            .collect()
    }

    pub fn summary(&self) -> String {
        format!(
            "#{}.{} {} {} {} fields={} body={}{}{}",
            self.conn,
            self.seq,
            self.method,
            self.target,
            self.version,
            show_fields(&self.fields),
            show(&self.body),
            if self.chunked { " (chunked)" } else { "" },
            if self.trailers.is_empty() {
                String::new()
            } else {
                format!(" trailers={}", show_fields(&self.trailers))
            }
        )
    }
}

/// What the origin saw.
#[derive(Debug, Clone)]
pub enum Event {
    Request(Recorded),
    /// Bytes the strict parser refused; the connection was closed after them.
    Garbage {
        conn: u64,
        why: String,
        bytes: Vec<u8>,
    },
    /// The proxy closed the connection in the middle of a request (it gave up on it).
    Partial {
        conn: u64,
        bytes: Vec<u8>,
    },
}

impl Event {
    pub fn summary(&self) -> String {
        match self {
            Event::Request(r) => r.summary(),
            Event::Garbage { conn, why, bytes } => {
                format!("GARBAGE on #{conn} ({why}): {}", show(bytes))
            }
            Event::Partial { conn, bytes } => format!("PARTIAL on #{conn}: {}", show(bytes)),
        }
    }
}

/// The recording origin: answers every complete request with `200 OK` and a body naming it.
pub struct Origin {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Event>>>,
}

impl Origin {
    pub async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("origin binds");
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let ids = Arc::new(AtomicU64::new(1));
        let l = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let id = ids.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(origin_conn(stream, id, l.clone()));
            }
        });
        Origin { addr, log }
    }

    /// A position in the log, for [`Origin::since`].
    pub fn mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// The events logged after `mark`.
    pub fn since(&self, mark: usize) -> Vec<Event> {
        self.log.lock().unwrap()[mark..].to_vec()
    }

    pub fn all(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }

    /// The request the origin answered as `conn=<conn> seq=<seq>`.
    pub fn request(&self, conn: u64, seq: u64) -> Option<Recorded> {
        self.log.lock().unwrap().iter().find_map(|e| match e {
            Event::Request(r) if r.conn == conn && r.seq == seq => Some(r.clone()),
            _ => None,
        })
    }

    /// Fails if the origin ever saw garbage.
    pub fn assert_no_garbage(&self) {
        let garbage: Vec<String> = self
            .all()
            .iter()
            .filter(|e| matches!(e, Event::Garbage { .. }))
            .map(Event::summary)
            .collect();
        assert!(
            garbage.is_empty(),
            "the origin received bytes it could not parse strictly:\n{}",
            garbage.join("\n")
        );
    }
}

/// The body of the origin's answer to a request.
pub fn answer_body(conn: u64, seq: u64, target: &str) -> String {
    format!("conn={conn} seq={seq} target={target}")
}

/// `(conn, seq, target)` back from an answer body.
pub fn parse_answer_body(body: &[u8]) -> Option<(u64, u64, String)> {
    let text = std::str::from_utf8(body).ok()?;
    let rest = text.strip_prefix("conn=")?;
    let (conn, rest) = rest.split_once(" seq=")?;
    let (seq, target) = rest.split_once(" target=")?;
    Some((conn.parse().ok()?, seq.parse().ok()?, target.to_string()))
}

async fn origin_conn(mut s: TcpStream, id: u64, log: Arc<Mutex<Vec<Event>>>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut seq = 0u64;
    loop {
        loop {
            match parse_request(&buf) {
                Parsed::Need => break,
                Parsed::Bad(why) => {
                    log.lock().unwrap().push(Event::Garbage {
                        conn: id,
                        why,
                        bytes: buf.clone(),
                    });
                    return;
                }
                Parsed::Done(len, mut rec) => {
                    buf.drain(..len);
                    rec.conn = id;
                    rec.seq = seq;
                    seq += 1;
                    let head = rec.method == "HEAD";
                    let body = answer_body(id, seq - 1, &rec.target);
                    log.lock().unwrap().push(Event::Request(rec));
                    // The body names the request, and so does a field (a HEAD answer has no body).
                    let mut out = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Origin-Answer: {body}\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    if !head {
                        out.extend_from_slice(body.as_bytes());
                    }
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    log.lock().unwrap().push(Event::Partial {
                        conn: id,
                        bytes: buf,
                    });
                }
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

enum Parsed {
    Need,
    Done(usize, Recorded),
    Bad(String),
}

/// `Ok(None)`: incomplete.
type Step<T> = Result<Option<T>, String>;

/// The line starting at `start`, without its CRLF, and where the next one starts. A CR not
/// followed by LF, or an LF without a CR, is an error.
fn line_at(buf: &[u8], start: usize) -> Step<(&[u8], usize)> {
    let mut i = start;
    while i < buf.len() {
        match buf[i] {
            b'\n' => return Err(format!("bare LF at byte {i}")),
            b'\r' => {
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((&buf[start..i], i + 2))),
                    Some(_) => Err(format!("bare CR at byte {i}")),
                }
            }
            _ => {}
        }
        i += 1;
        if i - start > ORIGIN_MAX_LINE {
            return Err("line too long".into());
        }
    }
    Ok(None)
}

pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(t: &[u8]) -> bool {
    !t.is_empty() && t.iter().all(|&b| is_tchar(b))
}

/// RFC 3986 `pchar` minus pct-encoded (checked by the caller).
fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)
}

/// `origin-form = absolute-path [ "?" query ]`: ASCII `pchar`s, `/`, `?`, and well-formed
/// percent-escapes only (no space, `#`, backslash, non-ASCII...).
pub fn is_origin_form(t: &[u8]) -> bool {
    if t.first() != Some(&b'/') {
        return false;
    }
    let mut i = 0;
    while i < t.len() {
        let b = t[i];
        if b == b'%' {
            let hex = |j: usize| t.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
            continue;
        }
        if !(is_pchar(b) || b == b'/' || b == b'?') {
            return false;
        }
        i += 1;
    }
    true
}

/// A field value byte: VCHAR, obs-text, SP or HTAB.
pub fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80
}

pub fn trim_ows(v: &[u8]) -> &[u8] {
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

/// `field-line = field-name ":" OWS field-value OWS`, strictly.
pub fn parse_field_line(line: &[u8]) -> Result<(String, Vec<u8>), String> {
    if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
        return Err("obs-fold (a line starting with whitespace)".into());
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| format!("field line without a colon: {}", show(line)))?;
    let name = &line[..colon];
    if !is_token(name) {
        return Err(format!("field name is not a token: {}", show(name)));
    }
    let value = trim_ows(&line[colon + 1..]);
    if let Some(b) = value.iter().find(|&&b| !is_field_byte(b)) {
        return Err(format!(
            "control byte {b:#04x} in the value of {}",
            show(name)
        ));
    }
    Ok((
        String::from_utf8_lossy(name).to_ascii_lowercase(),
        value.to_vec(),
    ))
}

/// Parses one request at the start of `buf`.
fn parse_request(buf: &[u8]) -> Parsed {
    match parse_request_inner(buf) {
        Ok(Some((n, r))) => Parsed::Done(n, r),
        Ok(None) => Parsed::Need,
        Err(why) => Parsed::Bad(why),
    }
}

/// The origin's parser on its own: one request at the start of `buf`, and where it ends;
/// `Ok(None)` while incomplete.
pub fn parse_one(buf: &[u8]) -> Result<Option<(usize, Recorded)>, String> {
    parse_request_inner(buf)
}

fn parse_request_inner(buf: &[u8]) -> Step<(usize, Recorded)> {
    if buf.is_empty() {
        return Ok(None);
    }
    let Some((line, mut pos)) = line_at(buf, 0)? else {
        return Ok(None);
    };
    let parts: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(format!("request line is not three parts: {}", show(line)));
    };
    if !is_token(method) {
        return Err(format!("method is not a token: {}", show(method)));
    }
    if !is_origin_form(target) {
        return Err(format!("target is not origin-form: {}", show(target)));
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(format!("version: {}", show(version)));
    }
    let mut fields = Vec::new();
    loop {
        let Some((line, next)) = line_at(buf, pos)? else {
            return Ok(None);
        };
        pos = next;
        if line.is_empty() {
            break;
        }
        fields.push(parse_field_line(line)?);
        if fields.len() > 256 {
            return Err("too many fields".into());
        }
        if pos > ORIGIN_MAX_LINE {
            return Err("head too large".into());
        }
    }
    let cls: Vec<Vec<u8>> = fields
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.clone())
        .collect();
    let tes: Vec<Vec<u8>> = fields
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .map(|(_, v)| v.clone())
        .collect();
    if !cls.is_empty() && !tes.is_empty() {
        return Err("both Content-Length and Transfer-Encoding".into());
    }
    if cls.len() > 1 {
        return Err("more than one Content-Length".into());
    }
    if tes.len() > 1 {
        return Err("more than one Transfer-Encoding".into());
    }
    let mut rec = Recorded {
        conn: 0,
        seq: 0,
        method: String::from_utf8_lossy(method).into_owned(),
        target: String::from_utf8_lossy(target).into_owned(),
        version: String::from_utf8_lossy(version).into_owned(),
        fields,
        body: Vec::new(),
        chunked: false,
        chunk_exts: Vec::new(),
        trailers: Vec::new(),
    };
    if let Some(te) = tes.first() {
        if !te.eq_ignore_ascii_case(b"chunked") {
            return Err(format!("Transfer-Encoding is not chunked: {}", show(te)));
        }
        if version == b"HTTP/1.0" {
            return Err("Transfer-Encoding on HTTP/1.0".into());
        }
        rec.chunked = true;
        let Some(end) = decode_chunked(buf, pos, &mut rec)? else {
            return Ok(None);
        };
        return Ok(Some((end, rec)));
    }
    if let Some(cl) = cls.first() {
        if cl.is_empty() || cl.len() > 15 || !cl.iter().all(u8::is_ascii_digit) {
            return Err(format!("Content-Length is not 1*DIGIT: {}", show(cl)));
        }
        let n: usize = std::str::from_utf8(cl).unwrap().parse().unwrap();
        if buf.len() < pos + n {
            return Ok(None);
        }
        rec.body = buf[pos..pos + n].to_vec();
        return Ok(Some((pos + n, rec)));
    }
    Ok(Some((pos, rec)))
}

/// `quoted-string` at the start of `v`: its length.
fn quoted_len(v: &[u8]) -> Option<usize> {
    if v.first() != Some(&b'"') {
        return None;
    }
    let mut i = 1;
    while i < v.len() {
        match v[i] {
            b'"' => return Some(i + 1),
            b'\\' => {
                let n = *v.get(i + 1)?;
                if !(n == b'\t' || n == b' ' || (0x21..0x7f).contains(&n) || n >= 0x80) {
                    return None;
                }
                i += 2;
            }
            b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff => i += 1,
            _ => return None,
        }
    }
    None
}

/// `*( ";" token [ "=" ( token / quoted-string ) ] )`, no whitespace anywhere.
fn valid_chunk_ext(mut v: &[u8]) -> bool {
    while !v.is_empty() {
        if v[0] != b';' {
            return false;
        }
        v = &v[1..];
        let n = v.iter().take_while(|&&b| is_tchar(b)).count();
        if n == 0 {
            return false;
        }
        v = &v[n..];
        if v.first() == Some(&b'=') {
            v = &v[1..];
            let t = v.iter().take_while(|&&b| is_tchar(b)).count();
            if t > 0 {
                v = &v[t..];
            } else if let Some(q) = quoted_len(v) {
                v = &v[q..];
            } else {
                return false;
            }
        }
    }
    true
}

/// Decodes a chunked body starting at `pos`: where the message ends.
fn decode_chunked(buf: &[u8], mut pos: usize, rec: &mut Recorded) -> Step<usize> {
    loop {
        let Some((line, next)) = line_at(buf, pos)? else {
            return Ok(None);
        };
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 16 {
            return Err(format!("chunk size line: {}", show(line)));
        }
        let ext = &line[digits..];
        if !valid_chunk_ext(ext) {
            return Err(format!("chunk extension: {}", show(line)));
        }
        if !ext.is_empty() {
            rec.chunk_exts.push(ext.to_vec());
        }
        let size = u64::from_str_radix(std::str::from_utf8(&line[..digits]).unwrap(), 16)
            .map_err(|e| e.to_string())?;
        pos = next;
        if size == 0 {
            loop {
                let Some((line, next)) = line_at(buf, pos)? else {
                    return Ok(None);
                };
                pos = next;
                if line.is_empty() {
                    return Ok(Some(pos));
                }
                rec.trailers
                    .push(parse_field_line(line).map_err(|e| format!("trailer: {e}"))?);
            }
        }
        if size > 64 * 1024 * 1024 {
            return Err(format!("chunk of {size} bytes"));
        }
        let size = size as usize;
        if buf.len() < pos + size + 2 {
            // Still check what is there of the CRLF after the data.
            if buf.len() > pos + size && buf[pos + size] != b'\r' {
                return Err("no CRLF after chunk data".into());
            }
            return Ok(None);
        }
        rec.body.extend_from_slice(&buf[pos..pos + size]);
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err("no CRLF after chunk data".into());
        }
        pos += size + 2;
    }
}

// ---------------------------------------------------------------------------------------------
// The raw client

/// Connects, writes `bytes`, half-closes, and reads until the proxy closes. A connection reset
/// after the proxy answered (it closed with unread input) counts as the end; a timeout is an
/// error.
pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // The proxy may refuse and close before it read everything: then writing fails, and
    // what it answered is still to be read.
    if s.write_all(bytes).await.is_ok() {
        let _ = s.shutdown().await;
    }
    let mut out = Vec::new();
    let read = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    if tokio::time::timeout(CLIENT_TIMEOUT, read).await.is_err() {
        return Err(format!(
            "TIMEOUT: the proxy did not close the connection within {CLIENT_TIMEOUT:?} (the client had half-closed)"
        ));
    }
    Ok(out)
}

/// A response as the raw client split it off the stream.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub fields: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The proxy's own refusal: 4xx/5xx with its page.
    pub fn is_refusal(&self) -> bool {
        (400..600).contains(&self.status) && contains(&self.body, b"qsguard")
    }

    /// The origin's `(conn, seq, target)` when this is the origin's answer (from its
    /// `X-Origin-Answer` field, which must agree with the body when there is one).
    pub fn origin_ref(&self) -> Option<(u64, u64, String)> {
        if !(200..300).contains(&self.status) {
            return None;
        }
        let named = self.field("x-origin-answer")?;
        if !self.body.is_empty() && self.body != named {
            return None;
        }
        parse_answer_body(named)
    }

    pub fn summary(&self) -> String {
        let body = if self.is_refusal() {
            // The page's "For your administrator" line is what tells why.
            let text = String::from_utf8_lossy(&self.body);
            text.split("HTTP ")
                .nth(1)
                .map(|t| t.split("<br>").next().unwrap_or("").to_string())
                .unwrap_or_default()
        } else {
            show(&self.body)
        };
        format!("{} {}", self.status, body)
    }
}

/// `b` split at every CRLF.
fn split_crlf(b: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(b);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.windows(2).position(|w| w == b"\r\n") {
            Some(i) => {
                rest = Some(&r[i + 2..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Splits a response stream. `heads[i]` tells whether request i was a HEAD (its answer has
/// no body; a refusal page written for it anyway is accepted as the last thing on the
/// stream). Interim 1xx answers are skipped.
pub fn parse_responses(bytes: &[u8], heads: &[bool]) -> Result<Vec<Response>, String> {
    let mut out: Vec<Response> = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| format!("incomplete response head at byte {pos}: {}", show(rest)))?;
        let head = &rest[..end];
        let mut lines = split_crlf(head);
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .strip_prefix(b"HTTP/1.1 ")
            .and_then(|s| s.get(..3))
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("not a status line: {}", show(status_line)))?;
        let mut fields = Vec::new();
        for l in lines {
            if l.contains(&b'\n') || l.contains(&b'\r') {
                return Err(format!("bare LF or CR in a response head: {}", show(head)));
            }
            fields.push(parse_field_line(l).map_err(|e| format!("response head: {e}"))?);
        }
        pos += end + 4;
        if (100..200).contains(&status) {
            continue;
        }
        let is_head = heads.get(out.len()).copied().unwrap_or(false);
        let cl = fields
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .ok_or_else(|| format!("response Content-Length: {}", show(v)))
            })
            .transpose()?;
        let chunked = fields
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case(b"chunked"));
        let left = bytes.len() - pos;
        let body = if status == 204 || status == 304 {
            Vec::new()
        } else if is_head {
            // A proxy page written to a HEAD anyway, as the last thing before EOF.
            if status >= 400 && cl == Some(left) && left > 0 {
                pos = bytes.len();
                bytes[pos - left..].to_vec()
            } else {
                Vec::new()
            }
        } else if chunked {
            let mut rec = Recorded {
                conn: 0,
                seq: 0,
                method: String::new(),
                target: String::new(),
                version: String::new(),
                fields: Vec::new(),
                body: Vec::new(),
                chunked: true,
                chunk_exts: Vec::new(),
                trailers: Vec::new(),
            };
            let end = decode_chunked(bytes, pos, &mut rec)
                .map_err(|e| format!("response body: {e}"))?
                .ok_or("response chunked body cut short")?;
            pos = end;
            rec.body
        } else if let Some(n) = cl {
            if left < n {
                return Err(format!(
                    "response body cut short: {left} of {n} bytes (status {status})"
                ));
            }
            pos += n;
            bytes[pos - n..pos].to_vec()
        } else {
            pos = bytes.len();
            bytes[pos - left..].to_vec()
        };
        out.push(Response {
            status,
            fields,
            body,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The victim and the origin-log checks

static NONCE: AtomicU64 = AtomicU64::new(0);

/// A fresh nonce for a victim request.
pub fn nonce() -> String {
    let n = NONCE.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{n}x{t:08x}")
}

/// Another user's request on a new connection: it must get its own answer, and the origin
/// must have seen exactly it (on a pooled connection when there is one: a connection left
/// out of step by the case before shows here).
pub async fn check_victim(guard: SocketAddr, origin: &Origin) -> Result<(), String> {
    let nonce = nonce();
    let target = format!("/victim/{nonce}");
    let cookie = format!("X-Qlik-Session-HTTP=victim-{nonce}");
    let mark = origin.mark();
    let req = format!("GET {target} HTTP/1.1\r\nHost: victim\r\nCookie: {cookie}\r\n\r\n");
    let raw = exchange(guard, req.as_bytes())
        .await
        .map_err(|e| format!("victim: {e}"))?;
    let resps = parse_responses(&raw, &[false]).map_err(|e| format!("victim: {e}"))?;
    let [resp] = &resps[..] else {
        return Err(format!(
            "victim: {} responses instead of one: {}",
            resps.len(),
            show(&raw)
        ));
    };
    if resp.status != 200 {
        return Err(format!("victim got {}", resp.summary()));
    }
    let Some((conn, seq, answered)) = resp.origin_ref() else {
        return Err(format!(
            "victim got a body not from the origin: {}",
            resp.summary()
        ));
    };
    if answered != target {
        return Err(format!(
            "VICTIM GOT SOMEONE ELSE'S ANSWER: asked {target}, answered for {answered}"
        ));
    }
    let rec = origin
        .request(conn, seq)
        .ok_or("victim: the origin has no record of the answer")?;
    let want = vec![
        ("host".to_string(), b"victim".to_vec()),
        ("cookie".to_string(), cookie.into_bytes()),
    ];
    if rec.method != "GET"
        || rec.target != target
        || rec.version != "HTTP/1.1"
        || rec.end_to_end() != want
        || !rec.body.is_empty()
    {
        return Err(format!(
            "victim: the origin saw {} instead of GET {target} with only its own Host and Cookie",
            rec.summary()
        ));
    }
    // Nothing else may have happened meanwhile (a request glued to the victim's, garbage).
    let others: Vec<String> = origin
        .since(mark)
        .iter()
        .filter(|e| !matches!(e, Event::Request(r) if r.conn == conn && r.seq == seq))
        .filter(|e| !matches!(e, Event::Request(r) if is_guard_own(r)))
        .filter(|e| !matches!(e, Event::Partial { .. }))
        .map(Event::summary)
        .collect();
    if !others.is_empty() {
        return Err(format!(
            "while the victim was served, the origin also saw:\n{}",
            others.join("\n")
        ));
    }
    Ok(())
}

/// After a failed case: victims until one is served cleanly (at most 10), so that a pooled
/// connection the case left out of step is used up and does not make the next case fail.
pub async fn flush_pool(guard: SocketAddr, origin: &Origin) {
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if check_victim(guard, origin).await.is_ok() {
            return;
        }
    }
}

/// Runs a case's own checks, then (whatever they said) the victim; flushes the pool after a
/// failure. Both failures are reported.
pub async fn with_victim(
    guard: SocketAddr,
    origin: &Origin,
    case: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    let own = case.await;
    let victim = check_victim(guard, origin).await;
    let result = match (own, victim) {
        (Ok(()), Ok(())) => return Ok(()),
        (Err(e), Ok(())) => e,
        (Ok(()), Err(v)) => v,
        (Err(e), Err(v)) => format!(
            "{e}
  and then: {v}"
        ),
    };
    flush_pool(guard, origin).await;
    Err(result)
}

/// The guard's own requests to the node, made at any time: its health check (`User-Agent:
/// qsguard-health`) and, with the session guard on, `GET /qps/user` to learn who owns a
/// session it has not seen created. No client request in these tests looks like either.
pub fn is_guard_own(r: &Recorded) -> bool {
    r.values("user-agent") == [b"qsguard-health"] || (r.method == "GET" && r.target == "/qps/user")
}

/// Checks every forwarded request must pass whatever it was: the framing the origin got is
/// normalised (a plain decimal Content-Length, or chunked), no hop-by-hop field, no trailer
/// off the allow-list, no target with `canary` in it.
pub fn check_forwarded(rec: &Recorded) -> Result<(), String> {
    for (n, v) in &rec.fields {
        match n.as_str() {
            "content-length" => {
                let normal = rec.body.len().to_string();
                if v != normal.as_bytes() {
                    return Err(format!(
                        "the origin got Content-Length {} for a body of {} bytes (not the normalized decimal)",
                        show(v),
                        rec.body.len()
                    ));
                }
            }
            "connection" | "keep-alive" | "proxy-connection" | "te" | "trailer" | "upgrade"
            | "expect" => {
                return Err(format!("hop-by-hop field {n} reached the origin"));
            }
            _ => {}
        }
    }
    for (n, v) in &rec.trailers {
        if !ALLOWED_TRAILERS.contains(&n.as_str()) {
            return Err(format!(
                "trailer {n}: {} reached the origin (not on the allow-list)",
                show(v)
            ));
        }
    }
    if rec.target.contains("canary") {
        return Err(format!(
            "a planted request reached the origin: {}",
            rec.summary()
        ));
    }
    Ok(())
}

/// The client requests the origin saw since `mark` (the guard's own calls left out), with
/// garbage and planted requests as errors.
pub fn check_log(origin: &Origin, mark: usize) -> Result<Vec<Recorded>, String> {
    let events = origin.since(mark);
    let mut requests = Vec::new();
    for e in &events {
        match e {
            Event::Garbage { .. } => {
                return Err(format!(
                    "the origin got garbage:\n{}",
                    events
                        .iter()
                        .map(Event::summary)
                        .collect::<Vec<_>>()
                        .join("\n")
                ))
            }
            Event::Request(r) if is_guard_own(r) => {}
            Event::Request(r) => {
                if r.target.contains("canary") {
                    return Err(format!(
                        "a planted request reached the origin: {}",
                        r.summary()
                    ));
                }
                requests.push(r.clone());
            }
            Event::Partial { .. } => {}
        }
    }
    Ok(requests)
}

// ---------------------------------------------------------------------------------------------
// Showing bytes

/// Bytes as a Rust-like escaped string, shortened when long.
pub fn show(b: &[u8]) -> String {
    let mut s = String::from("\"");
    for &c in b.iter().take(600) {
        match c {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'"' => s.push_str("\\\""),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    if b.len() > 600 {
        s.push_str(&format!("...({} bytes)", b.len()));
    }
    s.push('"');
    s
}

pub fn show_fields(f: &[(String, Vec<u8>)]) -> String {
    let parts: Vec<String> = f.iter().map(|(n, v)| format!("{n}: {}", show(v))).collect();
    format!("[{}]", parts.join(", "))
}
