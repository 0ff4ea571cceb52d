//! Folded `Set-Cookie`s: which cookies were set in the same response as a new session cookie,
//! and, when the session cookie first comes back, which of them did not.
//!
//! A device on the way that joins several `Set-Cookie` fields into one leaves the browser with
//! only the first cookie: Qlik's session cookie comes back, the others (Qlik sets more than
//! one, so may a load balancer, and the guard sets its device cookie) never do. Only cookies a
//! browser would have kept and would send on the request's path are expected back, so a
//! `Path` elsewhere or a `Secure` cookie over plain http is not taken for a fold.

use crate::head_view::HeadView;

use super::cookies;

/// Cookies remembered per session, at most: Qlik sets a handful; a response with more is not
/// worth the memory.
const MAX: usize = 8;

/// A cookie set with a session: its name and the path it is sent on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Companion {
    pub name: Box<str>,
    path: Box<str>,
}

impl Companion {
    /// A cookie sent on every path (the guard's device cookie).
    pub fn everywhere(name: &str) -> Companion {
        Companion {
            name: name.into(),
            path: "/".into(),
        }
    }
}

/// The cookies a response sets besides `session` (the virtual proxy's session cookie) that a
/// browser keeps: not cleared, not `Secure` over plain http. `target` is the request's target,
/// for a cookie without `Path` (RFC 6265 5.1.4: the directory of the request path).
pub fn companions<H: HeadView>(
    headers: &H,
    session: &str,
    target: &str,
    tls: bool,
) -> Vec<Companion> {
    let mut out: Vec<Companion> = Vec::new();
    for field in headers.values("set-cookie") {
        let Some(c) = std::str::from_utf8(field)
            .ok()
            .and_then(|t| cookie::Cookie::parse(t).ok())
        else {
            continue;
        };
        let cleared = c.value().is_empty()
            || c.max_age().is_some_and(|d| d.is_zero() || d.is_negative())
            || c.expires_datetime()
                .is_some_and(|t| t < cookie::time::OffsetDateTime::now_utc());
        if c.name() == session
            || cleared
            || (c.secure() == Some(true) && !tls)
            || c.name().len() > 128
            || out.iter().any(|o| *o.name == *c.name())
        {
            continue;
        }
        if out.len() == MAX {
            break;
        }
        let path = match c.path() {
            Some(p) if p.starts_with('/') => p.to_string(),
            _ => default_path(target),
        };
        out.push(Companion {
            name: c.name().into(),
            path: path.into(),
        });
    }
    out
}

/// Checks the companions a request to `path` must carry, removing them from `pending`;
/// returns the names of those it does not carry. Companions for other paths stay pending.
pub fn not_returned<H: HeadView>(
    pending: &mut Vec<Companion>,
    path: &str,
    headers: &H,
) -> Vec<String> {
    let mut missing = Vec::new();
    pending.retain(|c| {
        if !path_matches(path, &c.path) {
            return true;
        }
        let [found] = cookies::find(headers, [&c.name]);
        if found.count == 0 {
            missing.push(c.name.to_string());
        }
        false
    });
    missing
}

/// RFC 6265 5.1.4: the request path up to, not including, its last `/` (at least `/`).
fn default_path(target: &str) -> String {
    let path = target.split('?').next().unwrap_or("");
    match path.rfind('/') {
        Some(0) | None => "/".into(),
        Some(i) => path[..i].into(),
    }
}

/// RFC 6265 5.1.4 path-match.
fn path_matches(request: &str, cookie: &str) -> bool {
    request == cookie
        || (request.starts_with(cookie)
            && (cookie.ends_with('/') || request.as_bytes().get(cookie.len()) == Some(&b'/')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderMap, HeaderValue, COOKIE, SET_COOKIE};

    fn set(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(SET_COOKIE, HeaderValue::from_str(l).unwrap());
        }
        h
    }

    #[test]
    fn only_cookies_a_browser_keeps_and_sends_here_are_expected() {
        let h = set(&[
            "X-Qlik-Session=abc; Path=/; HttpOnly",
            "affinity=1; Path=/",
            "gone=; Path=/",
            "old=1; Max-Age=0",
            "tls-only=1; Secure",
            "scoped=1; Path=/hub",
            "nopath=1",
        ]);
        let mut c = companions(&h, "X-Qlik-Session", "/hub/x?y=/z", false);
        let names: Vec<&str> = c.iter().map(|c| &*c.name).collect();
        assert_eq!(names, ["affinity", "scoped", "nopath"]);
        assert_eq!(&*c[2].path, "/hub");
        let mut req = HeaderMap::new();
        req.append(COOKIE, HeaderValue::from_static("X-Qlik-Session=abc"));
        // On /qmc only `affinity` must come back; the /hub ones wait for a /hub request.
        assert_eq!(not_returned(&mut c, "/qmc/", &req), ["affinity"]);
        assert_eq!(c.len(), 2);
        req.append(COOKIE, HeaderValue::from_static("scoped=1"));
        assert_eq!(not_returned(&mut c, "/hubx", &req), Vec::<String>::new());
        assert_eq!(not_returned(&mut c, "/hub/a", &req), ["nopath"]);
        assert!(c.is_empty());
        assert_eq!(
            companions(&h, "X-Qlik-Session", "/", true)
                .iter()
                .filter(|c| &*c.name == "tls-only")
                .count(),
            1
        );
    }
}
