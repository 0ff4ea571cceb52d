//! A named corpus of request-smuggling and framing cases, each with its expected verdict.
//!
//! What it proves: every shape below, taken from the published classifications (RFC 9112
//! sections 2, 3, 6 and 7; AWS http-desync-guardian's; PortSwigger's request-smuggling
//! research: CL.TE, TE.CL, TE.TE obfuscations, CL.0, 0.CL, header name and value tricks, chunk
//! size and extension tricks, trailers, bare LF/CR, request-line and Host tricks, framing
//! fields named in Connection, pipelining), is either forwarded exactly as intended or refused
//! with the expected status, and never desynchronises the proxy from the origin.
//!
//! How: for every case, with the session guard off and on (one origin and one guard per test
//! function): the raw bytes go out on a new connection, which is half-closed and read until
//! EOF. The responses must be the expected verdicts in order: `Forward` = the origin's answer,
//! and the origin's record of that request has the expected target and body (plus the checks
//! every forwarded request gets: a normalised Content-Length, no hop-by-hop field, no trailer
//! off the allow-list); `Refuse(status)` = that status with the proxy's own page, last on the
//! connection before EOF. The origin ([`framing_support::Origin`], a strict parser of its own)
//! must have recorded exactly the forwarded requests, never garbage, never a target with
//! `canary` in it. Then a victim request on a new connection must get its own answer.
//! All failing cases are reported together.

mod common;
mod framing_support;

use std::net::SocketAddr;
use std::time::Duration;

use framing_support::*;

/// A further check of the origin's record of a forwarded request.
type Check = fn(&Recorded) -> Result<(), String>;

#[derive(Clone)]
enum Verdict {
    /// Forwarded; the origin gets this target and body (and `check`, if any, holds).
    Forward {
        target: &'static str,
        body: Vec<u8>,
        check: Option<Check>,
    },
    /// Refused by the proxy with this status; nothing of it reaches the origin.
    Refuse(u16),
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Forward { target, body, .. } => {
                write!(f, "Forward({target}, {})", show(body))
            }
            Verdict::Refuse(s) => write!(f, "Refuse({s})"),
        }
    }
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Vec<Verdict>,
    /// Which of the requests are HEAD (their answers have no body).
    heads: Vec<bool>,
}

fn fwd(target: &'static str, body: &[u8]) -> Verdict {
    Verdict::Forward {
        target,
        body: body.to_vec(),
        check: None,
    }
}

fn fwd_check(target: &'static str, body: &[u8], check: Check) -> Verdict {
    Verdict::Forward {
        target,
        body: body.to_vec(),
        check: Some(check),
    }
}

fn refuse(status: u16) -> Verdict {
    Verdict::Refuse(status)
}

fn case(name: &'static str, bytes: impl AsRef<[u8]>, expect: Vec<Verdict>) -> Case {
    Case {
        name,
        bytes: bytes.as_ref().to_vec(),
        expect,
        heads: Vec::new(),
    }
}

/// A POST to `/api/x` with these extra head lines (each ending in CRLF) and this body.
fn post(lines: &str, body: &[u8]) -> Vec<u8> {
    let mut b = format!("POST /api/x HTTP/1.1\r\nHost: q\r\n{lines}\r\n").into_bytes();
    b.extend_from_slice(body);
    b
}

const SMUGGLED: &str = "GET /canary HTTP/1.1\r\nHost: q\r\n\r\n";

fn field_is(rec: &Recorded, name: &str, want: &[&[u8]]) -> Result<(), String> {
    let got = rec.values(name);
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{name}: the origin got {:?}, expected {:?}",
            got.iter().map(|v| show(v)).collect::<Vec<_>>(),
            want.iter().map(|v| show(v)).collect::<Vec<_>>()
        ))
    }
}

fn cases() -> Vec<Case> {
    let hole_body = "GET /canary HTTP/1.1\r\nX: ";
    assert_eq!(hole_body.len(), 25);
    let hole = format!(
        "GET /hub/ HTTP/1.1\r\nHost: q\r\nConnection: Content-Length\r\nContent-Length: 25\r\n\r\n{hole_body}"
    );
    let mut all = vec![
        // ---- Valid messages and the leniencies the proxy accepts (RFC 9112 2, 3, 6, 7)
        case(
            "plain GET",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![fwd("/hub/", b"")],
        ),
        case(
            "POST with Content-Length (RFC 9112 6.2)",
            post("Content-Length: 5\r\n", b"hello"),
            vec![fwd("/api/x", b"hello")],
        ),
        case(
            "chunked body, two chunks (RFC 9112 7.1)",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            ),
            vec![fwd("/api/x", b"hello world")],
        ),
        case(
            "chunk size in upper-case hex with leading zeros",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"000A\r\n0123456789\r\n00\r\n\r\n",
            ),
            vec![fwd("/api/x", b"0123456789")],
        ),
        case(
            "chunk extensions, token and quoted values (RFC 9112 7.1.1)",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"5;a=b;c=\"d e\"\r\nhello\r\n0;last\r\n\r\n",
            ),
            vec![fwd("/api/x", b"hello")],
        ),
        case(
            "Transfer-Encoding: Chunked (coding names are case-insensitive)",
            post("Transfer-Encoding: Chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
            vec![fwd("/api/x", b"abc")],
        ),
        case(
            "Transfer-Encoding with OWS around the coding",
            post("Transfer-Encoding: \t chunked \r\n", b"3\r\nabc\r\n0\r\n\r\n"),
            vec![fwd("/api/x", b"abc")],
        ),
        case(
            "Transfer-Encoding without a space after the colon",
            post("Transfer-Encoding:chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n"),
            vec![fwd("/api/x", b"abc")],
        ),
        case(
            "Content-Length with leading zeros (forwarded normalised)",
            post("Content-Length: 0005\r\n", b"hello"),
            vec![fwd_check("/api/x", b"hello", |r| {
                field_is(r, "content-length", &[b"5"])
            })],
        ),
        case(
            "Content-Length: 0 on a GET",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nContent-Length: 0\r\n\r\n",
            vec![fwd("/hub/", b"")],
        ),
        case(
            "Content-Length with trailing OWS",
            post("Content-Length: 5 \t\r\n", b"hello"),
            vec![fwd("/api/x", b"hello")],
        ),
        case(
            "Expect: 100-continue (answered by the proxy, removed upstream)",
            post("Expect: 100-continue\r\nContent-Length: 5\r\n", b"hello"),
            vec![fwd("/api/x", b"hello")],
        ),
        case(
            "HTTP/1.0 with Host and Content-Length",
            "POST /api/x HTTP/1.0\r\nHost: q\r\nContent-Length: 5\r\n\r\nhello",
            vec![fwd_check("/api/x", b"hello", |r| {
                if r.version == "HTTP/1.0" {
                    Ok(())
                } else {
                    Err(format!("forwarded as {}", r.version))
                }
            })],
        ),
        case(
            "pipelined GET, POST, GET (RFC 9112 9.3.2)",
            "GET /a HTTP/1.1\r\nHost: q\r\n\r\nPOST /b HTTP/1.1\r\nHost: q\r\nContent-Length: 3\r\n\r\nxyzGET /c HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![fwd("/a", b""), fwd("/b", b"xyz"), fwd("/c", b"")],
        ),
        case(
            "HTTP/1.0 keep-alive, pipelined",
            "GET /a HTTP/1.0\r\nHost: q\r\nConnection: keep-alive\r\n\r\nGET /b HTTP/1.0\r\nHost: q\r\n\r\n",
            vec![fwd("/a", b""), fwd("/b", b"")],
        ),
        case(
            "HTTP/1.0 without keep-alive ends the connection",
            "GET /a HTTP/1.0\r\nHost: q\r\n\r\nGET /b HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![fwd("/a", b"")],
        ),
        case(
            "Connection: close ends the connection",
            "GET /a HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![fwd("/a", b"")],
        ),
        case(
            "trailer on the allow-list (server-timing)",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"3\r\nabc\r\n0\r\nServer-Timing: db;dur=53\r\n\r\n",
            ),
            vec![fwd("/api/x", b"abc")],
        ),
        case(
            "trailer Content-Length is dropped",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"3\r\nabc\r\n0\r\nContent-Length: 50\r\n\r\n",
            ),
            vec![fwd("/api/x", b"abc")],
        ),
        case(
            "trailer Transfer-Encoding is dropped",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"3\r\nabc\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n",
            ),
            vec![fwd("/api/x", b"abc")],
        ),
        case(
            "trailer Host is dropped",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"3\r\nabc\r\n0\r\nHost: evil\r\n\r\n",
            ),
            vec![fwd("/api/x", b"abc")],
        ),
        case(
            "trailer off the allow-list is dropped",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"3\r\nabc\r\n0\r\nX-Evil: 1\r\nCookie: X-Qlik-Session-HTTP=planted\r\n\r\n",
            ),
            vec![fwd("/api/x", b"abc")],
        ),
        case(
            "Connection names an end-to-end field, which is dropped (RFC 9110 7.6.1)",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nConnection: x-a\r\nX-A: 1\r\nX-B: 2\r\n\r\n",
            vec![fwd_check("/hub/", b"", |r| {
                field_is(r, "x-a", &[])?;
                field_is(r, "x-b", &[b"2"])
            })],
        ),
        Case {
            name: "HEAD",
            bytes: b"HEAD /hub/ HTTP/1.1\r\nHost: q\r\n\r\n".to_vec(),
            expect: vec![fwd("/hub/", b"")],
            heads: vec![true],
        },
        case(
            "Host with a port",
            "GET /hub/ HTTP/1.1\r\nHost: qlik.example.com:8443\r\n\r\n",
            vec![fwd("/hub/", b"")],
        ),
        case(
            "Host as an IPv6 literal with a port",
            "GET /hub/ HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            vec![fwd("/hub/", b"")],
        ),
        case(
            "a body that looks like a request, framed by Content-Length",
            post(&format!("Content-Length: {}\r\n", SMUGGLED.len()), SMUGGLED.as_bytes()),
            vec![fwd("/api/x", SMUGGLED.as_bytes())],
        ),
        case(
            "chunk data holding a last-chunk lookalike",
            post(
                "Transfer-Encoding: chunked\r\n",
                format!("{:x}\r\n0\r\n\r\n{SMUGGLED}\r\n0\r\n\r\n", 5 + SMUGGLED.len()).as_bytes(),
            ),
            vec![fwd("/api/x", format!("0\r\n\r\n{SMUGGLED}").as_bytes())],
        ),
        case(
            "CL.0: a GET with Content-Length: 0, then a pipelined request",
            "GET /a HTTP/1.1\r\nHost: q\r\nContent-Length: 0\r\n\r\nGET /next HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![fwd("/a", b""), fwd("/next", b"")],
        ),
        case(
            "the chunked terminator, then a pipelined request",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"0\r\n\r\nGET /next HTTP/1.1\r\nHost: q\r\n\r\n",
            ),
            vec![fwd("/api/x", b""), fwd("/next", b"")],
        ),
        case(
            "duplicate end-to-end fields keep their order",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: 1\r\nX-B: b\r\nx-a: 2\r\n\r\n",
            vec![fwd_check("/hub/", b"", |r| field_is(r, "x-a", &[b"1", b"2"]))],
        ),
        case(
            "obs-text and HTAB inside a value",
            b"GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: caf\xe9\tau lait\r\n\r\n",
            vec![fwd_check("/hub/", b"", |r| {
                field_is(r, "x-a", &[b"caf\xe9\tau lait"])
            })],
        ),
        // ---- The one-pass reader's edges (lines copied as they stand, 32-byte blocks)
        case(
            "field lines as written and not, side by side (each value forwarded trimmed)",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: 1\r\nX-B:2\r\nX-C:  3 \t\r\nX-D: 4\r\nX-E: 5\r\n\r\n",
            vec![fwd_check("/hub/", b"", |r| {
                field_is(r, "x-a", &[b"1"])?;
                field_is(r, "x-b", &[b"2"])?;
                field_is(r, "x-c", &[b"3"])?;
                field_is(r, "x-d", &[b"4"])?;
                field_is(r, "x-e", &[b"5"])
            })],
        ),
        case(
            "an empty value and one of whitespace only",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A:\r\nX-B: \t \r\n\r\n",
            vec![fwd_check("/hub/", b"", |r| {
                field_is(r, "x-a", &[b""])?;
                field_is(r, "x-b", &[b""])
            })],
        ),
        case(
            "a bare CR far into a long value (past the first 32-byte block)",
            format!(
                "GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: {}\rGET /canary HTTP/1.1\r\n\r\n",
                "a".repeat(70)
            ),
            vec![refuse(400)],
        ),
        case(
            "a value longer than 32 bytes, then a short field",
            format!(
                "GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: {}\r\nX-B: b\r\n\r\n",
                "a".repeat(22)
            ),
            vec![fwd_check("/hub/", b"", |r| field_is(r, "x-b", &[b"b"]))],
        ),
        case(
            "DEL at the end of a long value",
            format!(
                "GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: {}\x7f\r\n\r\n",
                "a".repeat(40)
            ),
            vec![refuse(400)],
        ),
        case(
            "a bare LF ending the last field line",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: a\n\r\n",
            vec![refuse(400)],
        ),
        // ---- The live hole and its relatives: framing fields named in Connection
        case("THE HOLE: Connection: Content-Length", &hole, vec![refuse(400)]),
        case(
            "the hole, pipelined behind a valid request",
            format!("GET /a HTTP/1.1\r\nHost: q\r\n\r\n{hole}"),
            vec![fwd("/a", b""), refuse(400)],
        ),
        case(
            "Connection: Transfer-Encoding on a chunked request",
            post(
                "Connection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n",
                format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len()).as_bytes(),
            ),
            vec![refuse(400)],
        ),
        case(
            "Connection: Host",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nConnection: Host\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "Connection: Cookie (would strip the session cookie)",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nConnection: Cookie\r\nCookie: X-Qlik-Session-HTTP=abc\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "Connection: close, content-length (in a list)",
            post("Connection: close, content-length\r\nContent-Length: 5\r\n", b"hello"),
            vec![refuse(400)],
        ),
        case(
            "Connection: content-length in a second Connection field",
            post(
                "Connection: keep-alive\r\nConnection: content-length\r\nContent-Length: 5\r\n",
                b"hello",
            ),
            vec![refuse(400)],
        ),
        // ---- CL and TE together, and bad Content-Length (RFC 9112 6.1, 6.3)
        case(
            "CL.TE",
            post(
                &format!(
                    "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                    5 + SMUGGLED.len()
                ),
                format!("0\r\n\r\n{SMUGGLED}").as_bytes(),
            ),
            vec![refuse(400)],
        ),
        case(
            "TE.CL",
            post(
                "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
                format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len()).as_bytes(),
            ),
            vec![refuse(400)],
        ),
        case(
            "two equal Content-Length fields",
            post("Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
            vec![refuse(400)],
        ),
        case(
            "two different Content-Length fields",
            post(
                &format!("Content-Length: 0\r\nContent-Length: {}\r\n", SMUGGLED.len()),
                SMUGGLED.as_bytes(),
            ),
            vec![refuse(400)],
        ),
        case(
            "Content-Length list 5, 5",
            post("Content-Length: 5, 5\r\n", b"hello"),
            vec![refuse(400)],
        ),
        case(
            "Content-Length +5",
            post("Content-Length: +5\r\n", b"hello"),
            vec![refuse(400)],
        ),
        case(
            "Content-Length -1",
            post("Content-Length: -1\r\n", b""),
            vec![refuse(400)],
        ),
        case(
            "Content-Length 0x5",
            post("Content-Length: 0x5\r\n", b"hello"),
            vec![refuse(400)],
        ),
        case(
            "0.CL: an empty Content-Length",
            post("Content-Length:\r\n", SMUGGLED.as_bytes()),
            vec![refuse(400)],
        ),
        case(
            "Content-Length with an inner space (1 0)",
            post("Content-Length: 1 0\r\n", b"0123456789"),
            vec![refuse(400)],
        ),
        // ---- TE.TE obfuscations and unknown codings (RFC 9112 6.1, 7)
        case(
            "Transfer-Encoding: chunked, chunked",
            post("Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "two Transfer-Encoding fields",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                b"0\r\n\r\n",
            ),
            vec![refuse(400)],
        ),
        case(
            "Transfer-Encoding: \"chunked\" (quoted)",
            post("Transfer-Encoding: \"chunked\"\r\n", b"0\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "Transfer-Encoding: gzip",
            post("Transfer-Encoding: gzip\r\n", b""),
            vec![refuse(501)],
        ),
        case(
            "Transfer-Encoding: identity",
            post("Transfer-Encoding: identity\r\n", b""),
            vec![refuse(501)],
        ),
        case(
            "Transfer-Encoding: xchunked",
            post("Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"),
            vec![refuse(501)],
        ),
        case(
            "Transfer-Encoding: gzip, chunked",
            post("Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
            vec![refuse(501)],
        ),
        case(
            "Transfer-Encoding on HTTP/1.0",
            "POST /api/x HTTP/1.0\r\nHost: q\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "Transfer-Encoding after a vertical tab",
            post("Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n"),
            vec![refuse(400)],
        ),
        // ---- Field name and value tricks (RFC 9112 5, RFC 9110 5.5)
        case(
            "Transfer_Encoding (underscore)",
            post(
                "Transfer_Encoding: chunked\r\n",
                format!("0\r\n\r\n{SMUGGLED}").as_bytes(),
            ),
            vec![refuse(400)],
        ),
        case(
            "Content_Length (underscore)",
            post(
                &format!("Content_Length: {}\r\n", SMUGGLED.len()),
                SMUGGLED.as_bytes(),
            ),
            vec![refuse(400)],
        ),
        case(
            "space before the colon",
            post("Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "obs-fold line folding",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: 1\r\n folded\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "Transfer-Encoding value on a folded line",
            post("Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "NUL in a value",
            b"GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: a\x00b\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "bare CR in a value",
            b"GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: a\rb\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "DEL in a value",
            b"GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: a\x7fb\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "a control byte (0x01) in a value",
            b"GET /hub/ HTTP/1.1\r\nHost: q\r\nX-A: a\x01b\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "a field name with @",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nX@Y: 1\r\n\r\n",
            vec![refuse(400)],
        ),
        // ---- Line ends (RFC 9112 2.2)
        case(
            "bare LF ending a field line",
            "GET /hub/ HTTP/1.1\r\nHost: q\nX-A: 1\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "bare LF ending the request line",
            "GET /hub/ HTTP/1.1\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "bare LF ending the head",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\n\n",
            vec![refuse(400)],
        ),
        case(
            "bare CR ending a field line",
            "GET /hub/ HTTP/1.1\r\nHost: q\rX-A: 1\r\n\r\n",
            vec![refuse(400)],
        ),
        // ---- The request line (RFC 9112 3)
        case(
            "two spaces in the request line",
            "GET  /hub/ HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "a space after the version",
            "GET /hub/ HTTP/1.1 \r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "HTTP/1.2",
            "GET /hub/ HTTP/1.2\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "HTTP/2.0 on an HTTP/1 connection",
            "GET /hub/ HTTP/2.0\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "lower-case http/1.1",
            "GET /hub/ http/1.1\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "absolute-form target",
            "GET http://q/hub/ HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "asterisk-form target (OPTIONS *)",
            "OPTIONS * HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "authority-form target on a GET",
            "GET q:80 HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "a target with a fragment (#)",
            "GET /hub/#x HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "a non-ASCII target (UTF-8)",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "a non-ASCII target (not UTF-8)",
            b"GET /\xff HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "a space in the target",
            "GET /a b HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![refuse(400)],
        ),
        // ---- Host (RFC 9112 3.2)
        case(
            "no Host",
            "GET /hub/ HTTP/1.1\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "two Host fields",
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nHost: evil\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "an empty Host",
            "GET /hub/ HTTP/1.1\r\nHost:\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "Host with a space (a b)",
            "GET /hub/ HTTP/1.1\r\nHost: a b\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "Host with a path (a/b)",
            "GET /hub/ HTTP/1.1\r\nHost: a/b\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "Host with userinfo (a@b)",
            "GET /hub/ HTTP/1.1\r\nHost: a@b\r\n\r\n",
            vec![refuse(400)],
        ),
        case(
            "Host with a bad port",
            "GET /hub/ HTTP/1.1\r\nHost: q:12ab\r\n\r\n",
            vec![refuse(400)],
        ),
        // ---- Chunk size and extension tricks (RFC 9112 7.1)
        case(
            "chunk size 5 6",
            post("Transfer-Encoding: chunked\r\n", b"5 6\r\nhello\r\n0\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "chunk size followed by a tab and junk",
            post("Transfer-Encoding: chunked\r\n", b"5\tx\r\nhello\r\n0\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "a space before the extension's semicolon",
            post("Transfer-Encoding: chunked\r\n", b"5 ;a=b\r\nhello\r\n0\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "a control byte in a chunk extension",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"5;a=\x01b\r\nhello\r\n0\r\n\r\n",
            ),
            vec![refuse(400)],
        ),
        case(
            "a chunk size of 17 hex digits",
            post(
                "Transfer-Encoding: chunked\r\n",
                b"00000000000000005\r\nhello\r\n0\r\n\r\n",
            ),
            vec![refuse(400)],
        ),
        case(
            "no CRLF after the chunk data",
            post("Transfer-Encoding: chunked\r\n", b"5\r\nhello0\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "an LF-only chunk size line",
            post("Transfer-Encoding: chunked\r\n", b"5\nhello\r\n0\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "a negative chunk size",
            post("Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "a 0x-prefixed chunk size",
            post("Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"),
            vec![refuse(400)],
        ),
        // ---- Bad trailer lines (RFC 9112 7.1.2)
        case(
            "a trailer line without a colon",
            post("Transfer-Encoding: chunked\r\n", b"0\r\nfoo\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "a trailer with a space before the colon",
            post("Transfer-Encoding: chunked\r\n", b"0\r\nx-t : v\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "a folded trailer",
            post("Transfer-Encoding: chunked\r\n", b"0\r\nx-t: a\r\n b\r\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "a trailer ending in a bare LF",
            post("Transfer-Encoding: chunked\r\n", b"0\r\nx-t: v\n\r\n"),
            vec![refuse(400)],
        ),
        case(
            "a control byte in a trailer value",
            post("Transfer-Encoding: chunked\r\n", b"0\r\nx-t: a\x01b\r\n\r\n"),
            vec![refuse(400)],
        ),
        // ---- Limits and methods
        case(
            "an oversized head",
            format!(
                "GET /hub/ HTTP/1.1\r\nHost: q\r\nCookie: {}\r\n\r\n",
                "a".repeat(40_000)
            ),
            vec![refuse(431)],
        ),
        case(
            "CONNECT",
            "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
            vec![refuse(405)],
        ),
        case(
            "TRACE",
            "TRACE /hub/ HTTP/1.1\r\nHost: q\r\n\r\n",
            vec![refuse(405)],
        ),
        case(
            "a body over server.max_body_size",
            post("Content-Length: 5000000000\r\n", b""),
            vec![refuse(413)],
        ),
        case(
            "an upgrade request with a body",
            format!(
                "GET /app/x HTTP/1.1\r\nHost: q\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            vec![refuse(400)],
        ),
        // ---- Pipelining with a bad request behind a good one
        case(
            "a valid request, then CL.TE",
            format!(
                "GET /a HTTP/1.1\r\nHost: q\r\n\r\nPOST /api/x HTTP/1.1\r\nHost: q\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}",
                5 + SMUGGLED.len()
            ),
            vec![fwd("/a", b""), refuse(400)],
        ),
        case(
            "a valid request, then a bare-LF request",
            "GET /a HTTP/1.1\r\nHost: q\r\n\r\nGET /b HTTP/1.1\nHost: q\n\n",
            vec![fwd("/a", b""), refuse(400)],
        ),
    ];
    for c in &mut all {
        if c.heads.is_empty() {
            c.heads = vec![false; c.expect.len()];
        }
    }
    all
}

/// The verdicts and the origin's log for one case (the victim follows, in [`with_victim`]).
async fn verdicts(guard: SocketAddr, origin: &Origin, c: &Case) -> Result<(), String> {
    let mark = origin.mark();
    let raw = exchange(guard, &c.bytes).await?;
    let resps = parse_responses(&raw, &c.heads)
        .map_err(|e| format!("{e}\n  raw answer: {}", show(&raw)))?;
    let got = resps
        .iter()
        .map(Response::summary)
        .collect::<Vec<_>>()
        .join(" | ");
    if resps.len() != c.expect.len() {
        return Err(format!("expected {:?}, got: {got}", c.expect));
    }
    let mut answered = Vec::new();
    for (i, (resp, want)) in resps.iter().zip(&c.expect).enumerate() {
        match want {
            Verdict::Forward {
                target,
                body,
                check,
            } => {
                let Some((conn, seq, _)) = resp.origin_ref() else {
                    return Err(format!("expected {:?}, got: {got}", c.expect));
                };
                let rec = origin
                    .request(conn, seq)
                    .ok_or_else(|| format!("answer {i} names no request the origin recorded"))?;
                if rec.target != *target || rec.body != *body {
                    return Err(format!(
                        "request {i}: the origin saw {} instead of {target} with body {}",
                        rec.summary(),
                        show(body)
                    ));
                }
                check_forwarded(&rec).map_err(|e| format!("request {i}: {e}"))?;
                if let Some(check) = check {
                    check(&rec).map_err(|e| format!("request {i}: {e}"))?;
                }
                answered.push((conn, seq));
            }
            Verdict::Refuse(status) => {
                if resp.status != *status || !resp.is_refusal() {
                    return Err(format!("expected {:?}, got: {got}", c.expect));
                }
                if i + 1 != resps.len() {
                    return Err(format!("more after the refusal: {got}"));
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let recs = check_log(origin, mark)?;
    let extra: Vec<String> = recs
        .iter()
        .filter(|r| !answered.contains(&(r.conn, r.seq)))
        .map(Recorded::summary)
        .collect();
    if !extra.is_empty() {
        return Err(format!(
            "the origin recorded what was refused or never answered:\n    {}",
            extra.join("\n    ")
        ));
    }
    Ok(())
}

async fn run_corpus(config_for: fn(SocketAddr) -> String) {
    let origin = Origin::start().await;
    let guard = common::guard_with(&config_for(origin.addr)).await;
    let all = cases();
    assert!(all.len() >= 60, "the corpus has {} cases", all.len());
    let mut failures = Vec::new();
    for c in &all {
        if let Err(e) = with_victim(guard.addr, &origin, verdicts(guard.addr, &origin, c)).await {
            failures.push(format!(
                "- {}: {e}\n    request: {}",
                c.name,
                show(&c.bytes)
            ));
        }
    }
    guard.shutdown().await;
    assert!(
        failures.is_empty(),
        "{} of {} corpus cases failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_guard_off() {
    run_corpus(guard_off_config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_guard_on() {
    run_corpus(guard_on_config).await;
}

/// Case names are unique (they are how a failure is reported).
#[test]
fn case_names_are_unique() {
    let all = cases();
    let mut names: Vec<&str> = all.iter().map(|c| c.name).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "duplicate case names");
}
