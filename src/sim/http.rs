//! Small HTTP helpers shared by the proxy and REST API listeners of the simulator.
//!
//! Cookie, query and percent-decoding are written out by hand on purpose: the simulator is the
//! referee for the guard, so it must read requests the way the QPS does (every `Cookie` line,
//! split on `;`, name and value split at the first `=`) rather than through a library that might
//! normalise away exactly the damage the guard is supposed to prevent.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE, HOST};
use http::{Response, StatusCode, Version};
use http_body_util::Full;

pub(crate) type Body = Full<Bytes>;

/// All `name=value` pairs from every `Cookie` header line, in arrival order.
/// Works on bytes because a middlebox may forward non-UTF-8 garbage and that must not panic.
pub(crate) fn cookies(headers: &HeaderMap) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    for line in headers.get_all(http::header::COOKIE) {
        for part in line.as_bytes().split(|b| *b == b';') {
            let part = trim(part);
            if part.is_empty() {
                continue;
            }
            match part.iter().position(|b| *b == b'=') {
                Some(i) => out.push((trim(&part[..i]).to_vec(), trim(&part[i + 1..]).to_vec())),
                None => out.push((part.to_vec(), Vec::new())),
            }
        }
    }
    out
}

/// The value of the first cookie called `name`; the QPS (.NET) reads the first one when a
/// browser sends duplicates, so a stale duplicate in front of a live one is not rescued here.
pub(crate) fn first_cookie(headers: &HeaderMap, name: &str) -> Option<Vec<u8>> {
    cookies(headers)
        .into_iter()
        .find(|(n, _)| n.as_slice() == name.as_bytes())
        .map(|(_, v)| v)
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Decodes `%XX` escapes (and `+` as space when `plus` is set, as in query strings).
/// Malformed escapes are kept literally instead of failing: a 4xx is decided by the caller.
pub(crate) fn percent_decode(s: &str, plus: bool) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    out
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Query parameters as (decoded name, decoded value), in order; repeated names are kept.
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, Vec<u8>)> {
    let Some(q) = query else { return Vec::new() };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            (
                String::from_utf8_lossy(&percent_decode(n, true)).into_owned(),
                percent_decode(v, true),
            )
        })
        .collect()
}

/// First query parameter whose name matches case-insensitively (Qlik's own query parsing is
/// case-insensitive for `Xrfkey` and `qlikTicket`).
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<Vec<u8>> {
    query_pairs(query)
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The raw query with every parameter called `name` (case-insensitively) removed; other
/// parameters keep their exact original encoding.
pub(crate) fn strip_query_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|p| {
            let n = p.split_once('=').map(|(n, _)| n).unwrap_or(p);
            !String::from_utf8_lossy(&percent_decode(n, true)).eq_ignore_ascii_case(name)
        })
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("&")
}

/// Why a request's Host makes it a 400, as RFC 9112 section 3.2 demands and HTTP.sys does
/// ("Bad Request - Invalid Hostname"): an HTTP/1.1 request without Host, any request with more
/// than one, or one whose value is not `host[:port]`. `None`: the Host is acceptable (HTTP/1.0
/// may go without one).
pub(crate) fn host_problem(version: Version, headers: &HeaderMap) -> Option<&'static str> {
    let mut all = headers.get_all(HOST).iter();
    match (all.next(), all.next()) {
        (None, _) if version == Version::HTTP_10 || version == Version::HTTP_09 => None,
        (None, _) => Some("the request has no Host header"),
        (Some(_), Some(_)) => Some("the request has more than one Host header"),
        (Some(h), None) if !valid_host(h.as_bytes()) => Some("the Host header is not host[:port]"),
        _ => None,
    }
}

/// `uri-host [ ":" port ]` (RFC 3986): an IP literal in brackets or a non-empty reg-name /
/// IPv4 address, and a port of digits. No user info, path, space or anything else.
fn valid_host(v: &[u8]) -> bool {
    let port = if let Some(rest) = v.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|b| *b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return false;
        }
        match &rest[end + 1..] {
            [] => None,
            [b':', port @ ..] => Some(port),
            _ => return false,
        }
    } else {
        let (host, port) = match v.iter().rposition(|b| *b == b':') {
            Some(i) => (&v[..i], Some(&v[i + 1..])),
            None => (v, None),
        };
        let reg_name = |b: &u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(b);
        if host.is_empty() || !host.iter().all(reg_name) {
            return false;
        }
        port
    };
    port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(p)
                .ok()
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|n| n <= 65535)
    })
}

/// The 400 a bad Host gets. HTTP.sys closes the connection after it, so the simulator does too.
pub(crate) fn bad_host(why: &str) -> Response<Body> {
    let mut r = html_page(
        StatusCode::BAD_REQUEST,
        "Bad Request - Invalid Hostname",
        why,
    );
    r.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The path the way HTTP.sys hands it to a .NET service: percent escapes decoded once (`%2F`
/// included, so it becomes a separator), `\` taken as `/`, and `.`/`..` segments resolved
/// (RFC 3986 section 5.2.4). A client value that reaches a path can therefore climb out of its
/// segment, as it can on a real QPS.
pub(crate) fn canonical_path(raw: &str) -> String {
    let decoded = String::from_utf8_lossy(&percent_decode(raw, false)).replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = decoded.split('/').collect();
    let last = segs.len().saturating_sub(1);
    for (i, seg) in segs.iter().enumerate().skip(1) {
        match *seg {
            "." | ".." => {
                if *seg == ".." {
                    out.pop();
                }
                // A trailing dot segment leaves the path ending in '/'.
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

/// Escapes text for HTML element content and attribute values.
pub(crate) fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A response with a body and content type; building it cannot fail because every header
/// value passed here is a constant.
pub(crate) fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(crate) fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    response(status, "application/json", v.to_string())
}

/// A short HTML page, the form the QPS uses for its error answers.
pub(crate) fn html_page(status: StatusCode, title: &str, text: &str) -> Response<Body> {
    let body = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body><h1>{t}</h1><p>{x}</p></body></html>\n",
        t = html_escape(title),
        x = html_escape(text)
    );
    response(status, "text/html", body)
}

/// A redirect with an empty body (the QPS answers its authentication redirects this way).
pub(crate) fn redirect(location: &str) -> Response<Body> {
    let mut r = response(StatusCode::FOUND, "text/html", Bytes::new());
    match HeaderValue::from_str(location) {
        Ok(v) => {
            r.headers_mut().insert(http::header::LOCATION, v);
        }
        // The location is built from the request's own (already valid) path, so this is
        // unreachable in practice; a 400 beats a panic if it ever is not.
        Err(_) => *r.status_mut() = StatusCode::BAD_REQUEST,
    }
    r
}

/// A random RFC 4122 version-4 GUID in .NET's lower-case `D` format, like QPS session ids.
pub(crate) fn guid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A random alphanumeric token (QPS tickets look like this).
pub(crate) fn token(len: usize) -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_from_all_lines_split_at_first_equals() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1; b=x=y ;c"));
        h.append("cookie", HeaderValue::from_static(" d = 2;;"));
        let c = cookies(&h);
        let c: Vec<(&[u8], &[u8])> = c
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .collect();
        assert_eq!(
            c,
            vec![
                (&b"a"[..], &b"1"[..]),
                (b"b", b"x=y"),
                (b"c", b""),
                (b"d", b"2"),
            ]
        );
        assert_eq!(first_cookie(&h, "b").as_deref(), Some(&b"x=y"[..]));
    }

    #[test]
    fn host_rules() {
        let h = |vals: &[&[u8]]| {
            let mut m = HeaderMap::new();
            for v in vals {
                m.append(HOST, HeaderValue::from_bytes(v).unwrap());
            }
            m
        };
        let v11 = Version::HTTP_11;
        for ok in [
            &b"qlik"[..],
            b"qlik.corp:443",
            b"127.0.0.1:4243",
            b"[::1]:80",
            b"[::1]",
        ] {
            assert_eq!(host_problem(v11, &h(&[ok])), None, "{ok:?}");
        }
        for bad in [
            &b""[..],
            b"qlik:",
            b"qlik:99999",
            b"qlik:8x",
            b"u@qlik",
            b"qlik/x",
            b"a b",
            b"[::1",
            b"[zz]",
            b"qlik:80:80",
        ] {
            assert!(host_problem(v11, &h(&[bad])).is_some(), "{bad:?}");
        }
        assert!(host_problem(v11, &h(&[])).is_some());
        assert!(host_problem(v11, &h(&[b"a", b"a"])).is_some());
        assert_eq!(host_problem(Version::HTTP_10, &h(&[])), None);
        assert!(host_problem(Version::HTTP_10, &h(&[b"a", b"b"])).is_some());
    }

    #[test]
    fn percent_and_query() {
        assert_eq!(percent_decode("a%20b+c%zz%4", true), b"a b c%zz%4".to_vec());
        assert_eq!(percent_decode("%", false), b"%".to_vec());
        assert_eq!(
            query_param(Some("x=1&QLIKTICKET=abc"), "qlikTicket"),
            Some(b"abc".to_vec())
        );
        assert_eq!(
            strip_query_param("a=1&qlikTicket=z&b=%20", "qlikticket"),
            "a=1&b=%20"
        );
        assert_eq!(canonical_path("/qps/session/../user/D/v"), "/qps/user/D/v");
        assert_eq!(
            canonical_path("/qps/session/..%2Fuser%2FD%2Fv"),
            "/qps/user/D/v"
        );
        assert_eq!(
            canonical_path("/qps/session/%2e%2e%5Cuser/D/v"),
            "/qps/user/D/v"
        );
        assert_eq!(canonical_path("/qps/session/x/.."), "/qps/session/");
        assert_eq!(canonical_path("/../../qps/./session"), "/qps/session");
        assert_eq!(canonical_path("/qps/session/..%252F"), "/qps/session/..%2F");
        let g = guid();
        assert_eq!(g.len(), 36);
        assert_eq!(&g[14..15], "4");
    }
}
