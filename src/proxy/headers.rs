//! The header rules on the way through, one copy for both protocols: which fields are
//! hop-by-hop, how X-Forwarded-* is set, how a restored session's cookie is put on the
//! request, and how the framing is written. Requests always go to Qlik as HTTP/1.1 bytes
//! written here; responses come back as bytes too, and [`response_field_indices`] says which of
//! Qlik's fields the client gets, whether the transport writes them as HTTP/1.1 bytes
//! ([`write_response_head`]) or as an HTTP/2 header map.
//!
//! Each rule is a small function with its own tests, because each one is a place where a
//! proxy can quietly break Qlik (a lost cookie, a wrong Host, a forged client address).

use std::net::IpAddr;

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderName};
use http::HeaderValue;
use ipnet::IpNet;

use super::h1::parse::{eq_token_folded, Framing, Head, Known};
use super::ConnInfo;
use crate::session::cookies;
use crate::session::identity::IdentitySources;

/// Request fields Qlik does not get as the client sent them: the hop-by-hop ones, and those the
/// guard writes itself (Content-Length, Expect, X-Forwarded-*).
fn request_field_dropped(known: Known) -> bool {
    known.hop_by_hop()
        || matches!(
            known,
            Known::ContentLength
                | Known::Expect
                | Known::XForwardedFor
                | Known::XForwardedProto
                | Known::XForwardedHost
        )
}

/// Response fields the client does not get as Qlik sent them: the hop-by-hop ones and the
/// framing (the engine writes its own).
fn response_field_dropped(known: Known) -> bool {
    known.hop_by_hop() || known == Known::ContentLength
}

/// Which peers may hand us an X-Forwarded-* chain.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }
}

/// Whether the browser reached the site over https: TLS at the guard, or the last
/// X-Forwarded-Proto a trusted proxy sent says so (the same value Qlik gets).
pub(crate) fn browser_used_https(head: &Head, trusted: &TrustedProxies, conn: ConnInfo) -> bool {
    if conn.tls {
        return true;
    }
    if !trusted.trusts(conn.peer.ip()) {
        return false;
    }
    use crate::head_view::HeadView;
    head.values("x-forwarded-proto")
        .last()
        .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"https"))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The request head as Qlik gets it:
/// - the request line and the framing written by the engine from what it parsed;
/// - the client's other fields byte for byte and in order, except the hop-by-hop ones and
///   those `Connection` names (the parser made sure that is none of Host, the framing or
///   Cookie);
/// - with `cookie`, that `name=value` put in place of the client's pair wherever it stands
///   (in the first `Cookie` field that has it), or appended to the first `Cookie` field;
/// - X-Forwarded-For: the trusted chain plus the peer (from an untrusted peer, the peer
///   alone); X-Forwarded-Proto: the last value a trusted peer sent, else the scheme the
///   client used; X-Forwarded-Host: a trusted peer's, else the Host;
/// - an identity header only from a peer it is believed from (`identity`).
pub(crate) fn write_request_head(
    out: &mut BytesMut,
    head: &Head,
    trusted: &TrustedProxies,
    identity: &IdentitySources,
    conn: ConnInfo,
    cookie: Option<(&str, &str)>,
) {
    out.put_slice(head.method());
    out.put_slice(b" ");
    out.put_slice(head.target().as_bytes());
    out.put_slice(if head.minor == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    let peer = canonical(conn.peer.ip());
    let trust = trusted.trusts(peer);
    let named = head.connection_tokens();
    // The `Cookie` field the restored pair goes into.
    let cookie_field = cookie.map(|(n, _)| cookie_field_for(head, n));
    let mut cookie_fields = 0usize;
    let mut xff: Option<BytesMut> = None;
    let mut proto: Option<&[u8]> = None;
    let mut fwd_host: Option<&[u8]> = None;
    let mut host: Option<&[u8]> = None;
    let mut upgrade: Option<&[u8]> = None;
    let mut lines = Lines::default();
    for i in 0..head.len() {
        let (name, value) = head.field(i);
        let known = head.known(i);
        match known {
            Known::XForwardedFor => {
                if trust {
                    let chain = xff.get_or_insert_with(BytesMut::new);
                    if !chain.is_empty() {
                        chain.put_slice(b", ");
                    }
                    chain.put_slice(value);
                }
                continue;
            }
            Known::Host => host = Some(value),
            Known::XForwardedProto => proto = Some(value),
            Known::XForwardedHost => fwd_host = Some(value),
            Known::Upgrade => upgrade = Some(value),
            _ => {}
        }
        if request_field_dropped(known)
            || (!named.is_empty() && named.iter().any(|t| t.eq_ignore_ascii_case(name)))
            || identity.drops(name, peer)
        {
            continue;
        }
        let rewritten = cookie.is_some() && known == Known::Cookie;
        if !rewritten && lines.copy(out, head, i) {
            continue;
        }
        lines.flush(out, head);
        out.put_slice(name);
        out.put_slice(b": ");
        match (cookie, known == Known::Cookie) {
            (Some((n, v)), true) => {
                if Some(cookie_fields) == cookie_field {
                    let with = cookies::replace_in_field(value, n, v)
                        .unwrap_or_else(|| cookies::append_to_field(Some(value), n, v));
                    out.put_slice(&with);
                } else {
                    out.put_slice(value);
                }
                cookie_fields += 1;
            }
            _ => out.put_slice(value),
        }
        out.put_slice(b"\r\n");
    }
    lines.flush(out, head);
    if let (Some((n, v)), 0) = (cookie, cookie_fields) {
        out.put_slice(b"cookie: ");
        out.put_slice(&cookies::append_to_field(None, n, v));
        out.put_slice(b"\r\n");
    }
    write_framing(out, head);
    if let (true, Some(u)) = (head.upgrade, upgrade) {
        out.put_slice(b"connection: upgrade\r\nupgrade: ");
        out.put_slice(u);
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"x-forwarded-for: ");
    if let Some(chain) = xff {
        out.put_slice(&chain);
        out.put_slice(b", ");
    }
    write_ip(out, peer);
    out.put_slice(b"\r\nx-forwarded-proto: ");
    match (trust, proto) {
        (true, Some(p)) => out.put_slice(p),
        _ => out.put_slice(if conn.tls { b"https" } else { b"http" }),
    }
    out.put_slice(b"\r\n");
    match (trust, fwd_host, host) {
        (true, Some(h), _) | (_, _, Some(h)) => {
            out.put_slice(b"x-forwarded-host: ");
            out.put_slice(h);
            out.put_slice(b"\r\n");
        }
        _ => {}
    }
    out.put_slice(b"\r\n");
}

/// Field lines passed on as they stand: consecutive lines that are already in the form the
/// engine writes ([`Head::line`]) go out as one slice instead of four pieces each (a head's
/// fields are mostly such lines, and a piece costs a call and a capacity check).
#[derive(Default)]
struct Lines {
    run: Option<std::ops::Range<usize>>,
}

impl Lines {
    /// Adds field `i` to the run if it can be copied as it stands; `false` when the caller
    /// must write it (after [`Lines::flush`]).
    fn copy(&mut self, out: &mut BytesMut, head: &Head, i: usize) -> bool {
        let Some(line) = head.line(i) else {
            return false;
        };
        match &mut self.run {
            Some(run) if run.end == line.start => run.end = line.end,
            _ => {
                self.flush(out, head);
                self.run = Some(line);
            }
        }
        true
    }

    /// Writes the run so far.
    fn flush(&mut self, out: &mut BytesMut, head: &Head) {
        if let Some(run) = self.run.take() {
            out.put_slice(&head.bytes[run]);
        }
    }
}

/// Which `Cookie` field (by its position among the `Cookie` fields) holds the first `name`
/// pair; the first field when none does.
fn cookie_field_for(head: &Head, name: &str) -> usize {
    use crate::head_view::HeadView;
    head.values("cookie")
        .position(|f| cookies::replace_in_field(f, name, "").is_some())
        .unwrap_or(0)
}

/// The address as text; IPv4 by hand, because it is written on every request and
/// `core::fmt` costs several hundred instructions for it.
pub(crate) fn write_ip<B: BufMut>(out: &mut B, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.put_u8(b'.');
                }
                out.put_slice(digits.format(octet).as_bytes());
            }
        }
        IpAddr::V6(_) => {
            use std::io::Write;
            let _ = write!(out.writer(), "{ip}");
        }
    }
}

/// The positions of Qlik's response fields as the client gets them, in Qlik's order and byte
/// for byte (every `Set-Cookie` its own field): without the hop-by-hop ones, those
/// `Connection` names, and the framing.
pub(crate) fn response_field_indices(resp: &Head) -> impl Iterator<Item = usize> + '_ {
    let named = resp.connection_tokens();
    (0..resp.len()).filter(move |&i| {
        !response_field_dropped(resp.known(i))
            && (named.is_empty()
                || !named
                    .iter()
                    .any(|t| t.eq_ignore_ascii_case(resp.field(i).0)))
    })
}

/// The response head as an HTTP/1.1 client gets it: Qlik's status and [`response_field_indices`],
/// the guard's `Set-Cookie`s after Qlik's, the framing the engine writes, and the
/// connection's fate (`close`, or the upgrade of a `101`).
pub(crate) fn write_response_head(
    out: &mut BytesMut,
    resp: &Head,
    extra: &[HeaderValue],
    close: bool,
    switching: bool,
) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(&status_digits(resp.status));
    out.put_slice(b" ");
    out.put_slice(resp.reason());
    out.put_slice(b"\r\n");
    let mut lines = Lines::default();
    for i in response_field_indices(resp) {
        if lines.copy(out, resp, i) {
            continue;
        }
        lines.flush(out, resp);
        let (name, value) = resp.field(i);
        out.put_slice(name);
        out.put_slice(b": ");
        out.put_slice(value);
        out.put_slice(b"\r\n");
    }
    lines.flush(out, resp);
    for v in extra {
        out.put_slice(b"set-cookie: ");
        out.put_slice(v.as_bytes());
        out.put_slice(b"\r\n");
    }
    write_framing(out, resp);
    if switching {
        use crate::head_view::HeadView;
        out.put_slice(b"connection: upgrade\r\n");
        if let Some(u) = resp.first("upgrade") {
            out.put_slice(b"upgrade: ");
            out.put_slice(u);
            out.put_slice(b"\r\n");
        }
    } else if close {
        out.put_slice(b"connection: close\r\n");
    }
    out.put_slice(b"\r\n");
}

/// The framing fields of a message, from what the parser found: `Transfer-Encoding` (chunked,
/// after any other codings a response had) or `Content-Length` as a plain decimal.
pub(crate) fn write_framing(out: &mut BytesMut, head: &Head) {
    if head.framing == Framing::Chunked {
        out.put_slice(b"transfer-encoding: ");
        out.put_slice(head.codings.as_deref().unwrap_or(b"chunked"));
        out.put_slice(b"\r\n");
    } else if let Some(n) = head.length {
        out.put_slice(b"content-length: ");
        out.put_slice(itoa::Buffer::new().format(n).as_bytes());
        out.put_slice(b"\r\n");
    }
}

/// A status code's three digits.
pub(crate) fn status_digits(code: u16) -> [u8; 3] {
    [
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]
}

/// The `HeaderName` of one of Qlik's response field names (a token, as the engine's parser
/// checked), for an HTTP/2 answer: the usual ones by a comparison or two, decided by length
/// and first letter as [`Known::of`] does; any other through `HeaderName::from_bytes`, whose
/// own parse costs some 200 instructions a name, for every field of every answer.
pub(crate) fn response_name(name: &[u8]) -> Option<HeaderName> {
    let first = *name.first()?;
    let (known, text): (HeaderName, &[u8]) = match (name.len(), first | 0x20) {
        (4, b'd') => (header::DATE, b"date"),
        (4, b'e') => (header::ETAG, b"etag"),
        (4, b'v') => (header::VARY, b"vary"),
        (6, b's') => (header::SERVER, b"server"),
        (6, b'p') => (header::PRAGMA, b"pragma"),
        (7, b'e') => (header::EXPIRES, b"expires"),
        (8, b'l') => (header::LOCATION, b"location"),
        (10, b's') => (header::SET_COOKIE, b"set-cookie"),
        (12, b'c') => (header::CONTENT_TYPE, b"content-type"),
        (13, b'c') => (header::CACHE_CONTROL, b"cache-control"),
        (13, b'l') => (header::LAST_MODIFIED, b"last-modified"),
        (16, b'c') => (header::CONTENT_ENCODING, b"content-encoding"),
        (15, b'x') => (header::X_FRAME_OPTIONS, b"x-frame-options"),
        (22, b'x') => (header::X_CONTENT_TYPE_OPTIONS, b"x-content-type-options"),
        (23, b'c') => (header::CONTENT_SECURITY_POLICY, b"content-security-policy"),
        (25, b's') => (
            header::STRICT_TRANSPORT_SECURITY,
            b"strict-transport-security",
        ),
        _ => return HeaderName::from_bytes(name).ok(),
    };
    if eq_token_folded(name, text) {
        Some(known)
    } else {
        HeaderName::from_bytes(name).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::h1::parse::{parse_request, parse_response};

    #[test]
    fn response_names_are_those_http_would_make() {
        let names = [
            "Date",
            "ETag",
            "vary",
            "Server",
            "PRAGMA",
            "Expires",
            "Location",
            "Set-Cookie",
            "Content-Type",
            "Cache-Control",
            "Last-Modified",
            "Content-Encoding",
            "X-Frame-Options",
            "X-Content-Type-Options",
            "Content-Security-Policy",
            "Strict-Transport-Security",
            // Same length and first letter as one of those, or none of them.
            "Dote",
            "Eta-",
            "Sorver",
            "Content-Language",
            "Cache-Controls",
            "X-Qlik-Xrfkey",
            "x-custom_field",
            "Link",
            "Content-Typo",
        ];
        for name in names {
            assert_eq!(
                response_name(name.as_bytes()),
                Some(HeaderName::from_bytes(name.as_bytes()).unwrap()),
                "{name}"
            );
        }
        assert_eq!(response_name(b""), None);
        assert_eq!(response_name(b"bad name"), None);
    }

    fn head(bytes: &'static [u8]) -> Head {
        let (_, mut h) = parse_request(bytes, 16384).unwrap().unwrap();
        h.bytes = bytes::Bytes::from_static(bytes);
        h
    }

    fn conn(peer: &str, tls: bool) -> ConnInfo {
        ConnInfo {
            peer: format!("{peer}:1234").parse().unwrap(),
            tls,
        }
    }

    fn upstream(
        h: &Head,
        trusted: &TrustedProxies,
        c: ConnInfo,
        cookie: Option<(&str, &str)>,
    ) -> String {
        let mut out = BytesMut::new();
        write_request_head(&mut out, h, trusted, &IdentitySources::default(), c, cookie);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_go() {
        let h = head(b"GET /hub/ HTTP/1.1\r\nHost: qlik\r\nConnection: keep-alive, x-secret\r\nConnection: X-Other\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-Secret: 1\r\nX-Other: 2\r\nCookie: X-Qlik-Session=abc\r\nExpect: 100-continue\r\n\r\n");
        let out = upstream(
            &h,
            &TrustedProxies::default(),
            conn("192.0.2.7", false),
            None,
        );
        assert_eq!(
            out,
            "GET /hub/ HTTP/1.1\r\nHost: qlik\r\nCookie: X-Qlik-Session=abc\r\nx-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nx-forwarded-host: qlik\r\n\r\n"
        );
    }

    #[test]
    fn the_engine_writes_the_framing() {
        let h = head(b"POST /a HTTP/1.1\r\nHost: q\r\nContent-Length: 005\r\n\r\n");
        let out = upstream(&h, &TrustedProxies::default(), conn("10.0.0.1", true), None);
        assert!(out.contains("\r\ncontent-length: 5\r\n"), "{out}");
        assert!(!out.contains("005"), "{out}");
        let h = head(b"POST /a HTTP/1.1\r\nHost: q\r\nTransfer-Encoding:  Chunked\r\n\r\n");
        let out = upstream(&h, &TrustedProxies::default(), conn("10.0.0.1", true), None);
        assert!(out.contains("\r\ntransfer-encoding: chunked\r\n"), "{out}");
        assert!(!out.contains("Chunked"), "{out}");
    }

    #[test]
    fn upgrade_is_kept_for_an_upgrade_request() {
        let h = head(b"GET /app/x HTTP/1.1\r\nHost: q\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n");
        let out = upstream(
            &h,
            &TrustedProxies::default(),
            conn("10.0.0.1", false),
            None,
        );
        assert!(
            out.contains("connection: upgrade\r\nupgrade: websocket\r\n"),
            "{out}"
        );
        assert!(out.contains("Sec-WebSocket-Key: k\r\n"), "{out}");
    }

    #[test]
    fn a_restored_cookie_replaces_the_pair_where_it_stands() {
        // In the second field: replaced there, every other byte kept.
        let h = head(b"GET / HTTP/1.1\r\nHost: q\r\nCookie: a=1\r\nCookie: b=2; X-Qlik-Session=dead;c=3\r\n\r\n");
        let out = upstream(
            &h,
            &TrustedProxies::default(),
            conn("10.0.0.1", false),
            Some(("X-Qlik-Session", "live")),
        );
        assert!(
            out.contains("Cookie: a=1\r\nCookie: b=2; X-Qlik-Session=live;c=3\r\n"),
            "{out}"
        );
        // Absent: appended to the first field.
        let h = head(b"GET / HTTP/1.1\r\nHost: q\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n");
        let out = upstream(
            &h,
            &TrustedProxies::default(),
            conn("10.0.0.1", false),
            Some(("X-Qlik-Session", "live")),
        );
        assert!(
            out.contains("Cookie: a=1; X-Qlik-Session=live\r\nCookie: b=2\r\n"),
            "{out}"
        );
        // No Cookie field at all: one is added.
        let h = head(b"GET / HTTP/1.1\r\nHost: q\r\n\r\n");
        let out = upstream(
            &h,
            &TrustedProxies::default(),
            conn("10.0.0.1", false),
            Some(("X-Qlik-Session", "live")),
        );
        assert!(out.contains("cookie: X-Qlik-Session=live\r\n"), "{out}");
    }

    #[test]
    fn forwarded_from_an_untrusted_peer_is_replaced() {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let h = head(b"GET / HTTP/1.1\r\nHost: qlik.example.com\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n\r\n");
        let out = upstream(&h, &trusted, conn("192.0.2.7", false), None);
        assert!(out.contains("x-forwarded-for: 192.0.2.7\r\nx-forwarded-proto: http\r\nx-forwarded-host: qlik.example.com\r\n"), "{out}");
        assert!(!out.contains("6.6.6.6") && !out.contains("evil"), "{out}");
    }

    #[test]
    fn forwarded_from_a_trusted_peer_is_appended_and_its_last_proto_kept() {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let h = head(b"GET / HTTP/1.1\r\nHost: qlik-internal\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 10.1.1.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: portal.example.com\r\n\r\n");
        // An IPv4-mapped IPv6 peer is the IPv4 address for the trust check.
        let c = ConnInfo {
            peer: "[::ffff:10.2.2.2]:1".parse().unwrap(),
            tls: false,
        };
        let out = upstream(&h, &trusted, c, None);
        assert!(
            out.contains("x-forwarded-for: 198.51.100.1, 10.1.1.1, 10.2.2.2\r\n"),
            "{out}"
        );
        assert!(out.contains("x-forwarded-proto: https\r\n"), "{out}");
        assert!(
            out.contains("x-forwarded-host: portal.example.com\r\n"),
            "{out}"
        );
    }

    #[test]
    fn response_fields_keep_order_and_drop_hop_by_hop_and_framing() {
        let bytes: &'static [u8] = b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nConnection: x-drop\r\nX-Drop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nSet-Cookie: b=2\r\n\r\n";
        let (_, mut h) = parse_response(bytes, false).unwrap().unwrap();
        h.bytes = bytes::Bytes::from_static(bytes);
        let names: Vec<String> = response_field_indices(&h)
            .map(|i| h.field(i))
            .map(|(n, v)| {
                format!(
                    "{}={}",
                    String::from_utf8_lossy(n),
                    String::from_utf8_lossy(v)
                )
            })
            .collect();
        assert_eq!(names, vec!["Set-Cookie=a=1", "Set-Cookie=b=2"]);
        let mut out = BytesMut::new();
        write_response_head(
            &mut out,
            &h,
            &[HeaderValue::from_static("qsguard=1")],
            false,
            false,
        );
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nset-cookie: qsguard=1\r\ncontent-length: 2\r\n\r\n"
        );
    }

    #[test]
    fn status_digits_are_three() {
        assert_eq!(&status_digits(101), b"101");
        assert_eq!(&status_digits(429), b"429");
    }
}
