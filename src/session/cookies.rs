//! Reading and writing the cookies the guard cares about: the virtual proxy's session cookie,
//! and the guard's own device cookie.
//!
//! Reading never changes a byte. Writing happens only when the guard restores or reuses a
//! session: then exactly one `name=value` pair of the `Cookie` header is replaced (or appended),
//! and every other byte stays where it was.

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderValue};

use crate::head_view::HeadView;

/// What a request's `Cookie` header(s) say about one cookie name.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Found<'a> {
    /// The first value sent under the name.
    pub first: Option<&'a str>,
    /// How many times the name was sent (more than once: path-scoped duplicates or a middlebox
    /// appending).
    pub count: usize,
}

/// One `Cookie` field value with the first pair named `name` given `value`; `None` when the
/// field has no such pair. Every other byte stays where it was.
pub fn replace_in_field(field: &[u8], name: &str, value: &str) -> Option<BytesMut> {
    let mut out = BytesMut::with_capacity(field.len() + value.len());
    let mut replaced = false;
    let mut rest = field;
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b';').unwrap_or(rest.len());
        let pair = &rest[..end];
        let lead = pair
            .iter()
            .position(|&b| b != b' ' && b != b'\t')
            .unwrap_or(pair.len());
        let body = &pair[lead..];
        let is_it = !replaced
            && body
                .iter()
                .position(|&b| b == b'=')
                .is_some_and(|eq| trim_end(&body[..eq]) == name.as_bytes());
        if is_it {
            out.extend_from_slice(&pair[..lead]);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"=");
            out.extend_from_slice(value.as_bytes());
            replaced = true;
        } else {
            out.extend_from_slice(pair);
        }
        if end < rest.len() {
            out.extend_from_slice(b";");
            rest = &rest[end + 1..];
        } else {
            rest = &[];
        }
    }
    replaced.then_some(out)
}

/// `first; name=value`: the pair appended to a field (or alone when there is none).
pub fn append_to_field(field: Option<&[u8]>, name: &str, value: &str) -> BytesMut {
    let mut out = BytesMut::new();
    if let Some(f) = field.filter(|f| !f.is_empty()) {
        out.extend_from_slice(f);
        out.extend_from_slice(b"; ");
    }
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"=");
    out.extend_from_slice(value.as_bytes());
    out
}

/// Finds each of `names` in every `Cookie` field of the request, in one pass and without
/// allocating; the results come in the order of `names`
/// (`let [session, device] = find(headers, [session_name, device_name]);`).
pub fn find<'a, H: HeadView, const N: usize>(headers: &'a H, names: [&str; N]) -> [Found<'a>; N] {
    let mut found: [Found<'a>; N] = std::array::from_fn(|_| Found::default());
    for field in headers.values("cookie") {
        // Bytes, not text: a pair with a byte that is not UTF-8 (obs-text) does not hide the
        // other pairs of its field.
        for pair in memchr::memchr_iter(b';', field)
            .chain([field.len()])
            .scan(0, |start, end| {
                let pair = &field[*start..end];
                *start = end + 1;
                Some(pair)
            })
        {
            let pair = trim_start_sp(pair);
            let Some(eq) = memchr::memchr(b'=', pair) else {
                continue;
            };
            let n = pair[..eq].trim_ascii_end();
            let Some(i) = names.iter().position(|&name| name.as_bytes() == n) else {
                continue;
            };
            let Some(v) = crate::head_view::text(trim_end_sp(&pair[eq + 1..])) else {
                continue;
            };
            let f = &mut found[i];
            f.count += 1;
            if f.first.is_none() {
                f.first = Some(v);
            }
        }
    }
    found
}

fn trim_start_sp(v: &[u8]) -> &[u8] {
    let n = v.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    &v[n..]
}

fn trim_end_sp(v: &[u8]) -> &[u8] {
    let n = v
        .iter()
        .rev()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    &v[..v.len() - n]
}

/// Makes the request carry `name=value`: the first pair with that name gets the new value
/// (other duplicates are left), or the pair is appended to the first `Cookie` field.
pub fn set_request_cookie(headers: &mut HeaderMap, name: &str, value: &str) {
    let mut fields: Vec<HeaderValue> = headers.get_all(header::COOKIE).iter().cloned().collect();
    let mut done = false;
    for f in fields.iter_mut() {
        if let Some(new) = replace_in_field(f.as_bytes(), name, value) {
            if let Ok(v) = HeaderValue::from_maybe_shared(new.freeze()) {
                *f = v;
            }
            done = true;
            break;
        }
    }
    if !done {
        let joined = append_to_field(fields.first().map(|f| f.as_bytes()), name, value);
        if let Ok(v) = HeaderValue::from_maybe_shared(joined.freeze()) {
            match fields.first_mut() {
                Some(first) => *first = v,
                None => fields.push(v),
            }
        }
    }
    headers.remove(header::COOKIE);
    for f in fields {
        headers.append(header::COOKIE, f);
    }
}

fn trim_end(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(0, |e| e + 1);
    &b[..end]
}

/// A `Set-Cookie` from Qlik for a session cookie: the value and the attributes as Qlik wrote
/// them (kept verbatim, so a restore sets the cookie exactly as Qlik did).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCookie {
    pub value: String,
    pub attributes: String,
    /// Qlik clears a cookie with an empty value or an expiry in the past.
    pub clears: bool,
}

/// The `Set-Cookie` fields of a response that set `name`, in order.
pub fn set_cookies_named<H: HeadView>(headers: &H, name: &str) -> Vec<SetCookie> {
    let mut out = Vec::new();
    for field in headers.values("set-cookie") {
        let Ok(text) = std::str::from_utf8(field) else {
            continue;
        };
        if !text.trim_start().starts_with(name) {
            continue;
        }
        let Ok(c) = cookie::Cookie::parse(text) else {
            continue;
        };
        if c.name() != name {
            continue;
        }
        let attributes = text
            .split_once(';')
            .map(|(_, a)| a.trim().to_string())
            .unwrap_or_default();
        let expired = c.max_age().is_some_and(|d| d.is_zero() || d.is_negative())
            || c.expires_datetime()
                .is_some_and(|t| t.unix_timestamp() < unix_now());
        out.push(SetCookie {
            value: c.value().to_string(),
            clears: c.value().is_empty() || expired,
            attributes,
        });
    }
    out
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `Set-Cookie` for a restored or reused session, with Qlik's own attributes.
pub fn session_set_cookie(name: &str, value: &str, attributes: &str) -> Option<HeaderValue> {
    let text = if attributes.is_empty() {
        format!("{name}={value}")
    } else {
        format!("{name}={value}; {attributes}")
    };
    HeaderValue::from_str(&text).ok()
}

/// The device cookie: long-lived so it outlives a browser restart (the Qlik cookie does not).
/// Written as the `cookie` crate writes it (a test holds the two equal), without its
/// formatting machinery: a client without cookies gets one with every answer.
pub fn device_set_cookie(name: &str, device: &str, tls: bool) -> Option<HeaderValue> {
    const LAX: &str = "; HttpOnly; SameSite=Lax";
    const KEPT: &str = "; Path=/; Max-Age=34560000";
    let mut c = String::with_capacity(name.len() + device.len() + 64);
    c.push_str(name);
    c.push('=');
    c.push_str(device);
    c.push_str(LAX);
    if tls {
        c.push_str("; Secure");
    }
    c.push_str(KEPT);
    HeaderValue::from_maybe_shared(bytes::Bytes::from(c)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_cookie_is_written_as_the_cookie_crate_writes_it() {
        for tls in [false, true] {
            let c = cookie::Cookie::build(("qsguard", "0a1b.2c3d"))
                .path("/")
                .http_only(true)
                .same_site(cookie::SameSite::Lax)
                .max_age(cookie::time::Duration::days(400))
                .secure(tls)
                .build();
            assert_eq!(
                device_set_cookie("qsguard", "0a1b.2c3d", tls).unwrap(),
                c.to_string().as_str()
            );
        }
    }

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(header::COOKIE, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    fn cookie_fields(h: &HeaderMap) -> Vec<String> {
        h.get_all(header::COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn finds_values_and_duplicates() {
        let h = headers(&["a=1; X-Qlik-Session=abc=d; b=2", "X-Qlik-Session=zzz"]);
        let [f] = find(&h, ["X-Qlik-Session"]);
        assert_eq!(f.first, Some("abc=d"));
        assert_eq!(f.count, 2);
        assert_eq!(find(&h, ["X-Qlik-Session-HTTP"])[0].count, 0);
        assert_eq!(
            find(&headers(&["X-Qlik-Session-HTTP=1"]), ["X-Qlik-Session"])[0].count,
            0
        );
    }

    #[test]
    fn a_byte_that_is_not_utf8_hides_only_its_own_pair() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_bytes(b"a=\xe9; X-Qlik-Session=abc;qsguard=\xff\t; b=1 ").unwrap(),
        );
        let [s, d, b] = find(&h, ["X-Qlik-Session", "qsguard", "b"]);
        assert_eq!((s.first, s.count), (Some("abc"), 1));
        assert_eq!((d.first, d.count), (None, 0));
        assert_eq!(b.first, Some("1"));
    }

    #[test]
    fn finding_two_at_once_agrees_with_one_by_one() {
        let h = headers(&[
            "a=1; X-Qlik-Session=abc=d; qsguard=00ff",
            "X-Qlik-Session=zzz",
        ]);
        let [s, d] = find(&h, ["X-Qlik-Session", "qsguard"]);
        assert_eq!(s, find(&h, ["X-Qlik-Session"])[0]);
        assert_eq!(d, find(&h, ["qsguard"])[0]);
        assert_eq!(s.count, 2);
        assert_eq!(d.first, Some("00ff"));
    }

    #[test]
    fn replacing_keeps_every_other_byte() {
        let mut h = headers(&["a=\"q\";X-Qlik-Session=dead;  b=x=y"]);
        set_request_cookie(&mut h, "X-Qlik-Session", "live");
        assert_eq!(
            cookie_fields(&h),
            vec!["a=\"q\";X-Qlik-Session=live;  b=x=y"]
        );
    }

    #[test]
    fn appending_when_absent() {
        let mut h = headers(&["qsguard=00ff"]);
        set_request_cookie(&mut h, "X-Qlik-Session", "live");
        assert_eq!(cookie_fields(&h), vec!["qsguard=00ff; X-Qlik-Session=live"]);
        let mut empty = HeaderMap::new();
        set_request_cookie(&mut empty, "X-Qlik-Session", "live");
        assert_eq!(cookie_fields(&empty), vec!["X-Qlik-Session=live"]);
    }

    #[test]
    fn set_cookie_attributes_are_kept_verbatim() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("other=1; Path=/"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("X-Qlik-Session=abc; Path=/; HttpOnly; SameSite=Lax; Secure"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static(
                "X-Qlik-Session=; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            ),
        );
        let got = set_cookies_named(&h, "X-Qlik-Session");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].value, "abc");
        assert_eq!(got[0].attributes, "Path=/; HttpOnly; SameSite=Lax; Secure");
        assert!(!got[0].clears);
        assert!(got[1].clears);
        let v = session_set_cookie("X-Qlik-Session", "abc", &got[0].attributes).unwrap();
        assert_eq!(
            v,
            "X-Qlik-Session=abc; Path=/; HttpOnly; SameSite=Lax; Secure"
        );
    }

    #[test]
    fn device_cookie_attributes() {
        let v = device_set_cookie("qsguard", "00112233", false).unwrap();
        let s = v.to_str().unwrap();
        assert!(s.starts_with("qsguard=00112233"));
        for want in ["HttpOnly", "SameSite=Lax", "Path=/", "Max-Age="] {
            assert!(s.contains(want), "{s}");
        }
        assert!(!s.contains("Secure"));
        assert!(device_set_cookie("qsguard", "00", true)
            .unwrap()
            .to_str()
            .unwrap()
            .contains("Secure"));
    }
}
