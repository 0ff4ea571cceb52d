//! The cookie self-test: a page a user opens in the browser that has the problem, and the two
//! endpoints it (and `qsguard doctor`) use.
//!
//! - `GET <path>`: the page; its script runs the test and shows this browser's own results.
//! - `GET <path>/set?id=ID`: sets test cookies with the attributes Qlik uses (HttpOnly, Secure,
//!   SameSite variants, a long value), several `Set-Cookie` in one response, like Qlik's login
//!   answer; the body lists what was sent.
//! - `GET <path>/report?id=ID`: what came back: each cookie intact, missing or changed, the
//!   verdict (clean, dropped, folded, modified), and the headers that reveal a middlebox.
//!
//! Values are derived from the id with a keyed hash, so the guard keeps no state and one
//! browser's test cannot read another's.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::json;

use crate::head_view::HeadView;
use crate::session::cookies;

/// The test cookies: name, attributes, value length.
pub const COOKIES: [(&str, &str, usize); 6] = [
    ("qsguard_check_plain", "Path=/; HttpOnly", 36),
    ("qsguard_check_lax", "Path=/; HttpOnly; SameSite=Lax", 36),
    (
        "qsguard_check_strict",
        "Path=/; HttpOnly; SameSite=Strict",
        36,
    ),
    ("qsguard_check_long", "Path=/; HttpOnly; SameSite=Lax", 3000),
    (
        "qsguard_check_secure",
        "Path=/; HttpOnly; Secure; SameSite=Lax",
        36,
    ),
    (
        "qsguard_check_none",
        "Path=/; HttpOnly; Secure; SameSite=None",
        36,
    ),
];

/// Browsers do not store or send a `Secure` cookie over plain http.
pub fn needs_tls(attributes: &str) -> bool {
    attributes.contains("Secure")
}

pub struct CookieCheck {
    pub path: String,
    key: [u8; 32],
}

impl CookieCheck {
    pub fn new(path: &str) -> CookieCheck {
        CookieCheck {
            path: path.trim_end_matches('/').to_string(),
            key: rand::random(),
        }
    }

    /// The expected value of test cookie `name` for test `id`.
    pub fn value(&self, id: &str, name: &str, len: usize) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(id.as_bytes());
        h.update(b"/");
        h.update(name.as_bytes());
        let mut out = String::with_capacity(len);
        let mut reader = h.finalize_xof();
        let mut buf = [0u8; 64];
        while out.len() < len {
            reader.fill(&mut buf);
            for b in buf {
                if out.len() == len {
                    break;
                }
                // Letters, digits, '-' and '.': a cookie-octet alphabet like a GUID's.
                const A: &[u8] =
                    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-.";
                out.push(A[(b as usize) % A.len()] as char);
            }
        }
        out
    }

    /// The request is under the check's path: [`CookieCheck::handle`] answers it.
    pub fn owns(&self, path: &str) -> bool {
        path.starts_with(self.path.as_str())
    }

    /// Answers a request under the check's path; `None` for any other path.
    pub fn handle<H: HeadView>(
        &self,
        path: &str,
        query: Option<&str>,
        headers: &H,
        tls: bool,
    ) -> Option<Response<Full<Bytes>>> {
        let rest = path.strip_prefix(&self.path)?;
        let id = query
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("id=")))
            .filter(|id| {
                !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
            })
            .map(str::to_string);
        Some(match rest {
            "" | "/" => self.page(),
            "/set" => self.set(&id.unwrap_or_else(new_id)),
            "/report" => match id {
                Some(id) => self.report(&id, headers, tls),
                None => json(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "report needs ?id= from /set"}),
                ),
            },
            _ => json(
                StatusCode::NOT_FOUND,
                json!({"error": "unknown cookie-check endpoint"}),
            ),
        })
    }

    fn set(&self, id: &str) -> Response<Full<Bytes>> {
        let sent: Vec<serde_json::Value> = COOKIES
            .iter()
            .map(|(n, a, l)| json!({"name": n, "attributes": a, "length": l}))
            .collect();
        let mut r = json(StatusCode::OK, json!({"id": id, "sent": sent}));
        for (name, attrs, len) in COOKIES {
            let v = format!("{name}={}; {attrs}", self.value(id, name, len));
            if let Ok(v) = HeaderValue::from_str(&v) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        r
    }

    /// What arrived, against what was set.
    pub fn report<H: HeadView>(&self, id: &str, headers: &H, tls: bool) -> Response<Full<Bytes>> {
        let mut results = Vec::new();
        let mut arrived = Vec::new();
        for (name, attrs, len) in COOKIES {
            let [found] = cookies::find(headers, [name]);
            let expected_missing = needs_tls(attrs) && !tls;
            let status = match found.first {
                None if expected_missing => {
                    "not sent (expected: Secure cookies are not sent over http)"
                }
                None => "missing",
                Some(v) if v == self.value(id, name, len) => "intact",
                Some(v) if v.contains("qsguard_check_") || v.contains(", ") => "folded",
                Some(_) => "changed",
            };
            arrived.push((name, status, expected_missing));
            results.push(json!({
                "name": name,
                "attributes": attrs,
                "status": status,
                "duplicates": found.count.saturating_sub(1),
            }));
        }
        let counted: Vec<_> = arrived.iter().filter(|(_, _, e)| !*e).collect();
        let intact = counted.iter().filter(|(_, s, _)| *s == "intact").count();
        let verdict = if intact == counted.len() {
            "clean: every cookie came back intact"
        } else if counted.first().is_some_and(|(_, s, _)| *s == "intact") && intact == 1 {
            "folded: only the first of several cookies set in one response came back; a device \
             on the way merged the Set-Cookie headers into one"
        } else if counted
            .iter()
            .any(|(_, s, _)| *s == "changed" || *s == "folded")
        {
            "modified: cookie values were changed on the way"
        } else {
            "dropped: cookies were lost on the way (a device stripped them, or the browser refused them)"
        };
        let header_text = |name: &'static str| -> Option<String> {
            let v: Vec<String> = headers
                .values(name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect();
            (!v.is_empty()).then(|| v.join(", "))
        };
        json(
            StatusCode::OK,
            json!({
                "id": id,
                "verdict": verdict,
                "clean": intact == counted.len(),
                "tls": tls,
                "cookies": results,
                "cookie_fields": headers.values("cookie").count(),
                "via": header_text("via"),
                "x_forwarded_for": header_text("x-forwarded-for"),
                "x_forwarded_proto": header_text("x-forwarded-proto"),
                "forwarded": header_text("forwarded"),
            }),
        )
    }

    fn page(&self) -> Response<Full<Bytes>> {
        let body = format!(
            r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Cookie check</title><style>body{{font-family:system-ui,sans-serif;max-width:48em;margin:3em auto;padding:0 1em}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left}}table{{border-collapse:collapse}}</style></head>
<body><h1>Cookie check</h1>
<p>This page tests whether cookies like Qlik Sense's session cookie get from this browser to the server and back
intact. It shows the results of this browser only.</p>
<p id="verdict">Running the check...</p>
<table id="results"></table>
<p id="middlebox"></p>
<script>
(async function () {{
  const base = {base:?};
  const id = Math.random().toString(36).slice(2) + Date.now().toString(36);
  try {{
    await fetch(base + "/set?id=" + id, {{credentials: "same-origin", cache: "no-store"}});
    const r = await fetch(base + "/report?id=" + id, {{credentials: "same-origin", cache: "no-store"}});
    const rep = await r.json();
    document.getElementById("verdict").textContent = "Result: " + rep.verdict;
    document.getElementById("verdict").dataset.clean = rep.clean;
    const t = document.getElementById("results");
    t.innerHTML = "<tr><th>Cookie</th><th>Attributes</th><th>Result</th></tr>";
    for (const c of rep.cookies) {{
      const row = t.insertRow();
      row.insertCell().textContent = c.name;
      row.insertCell().textContent = c.attributes;
      row.insertCell().textContent = c.status + (c.duplicates ? " (sent " + (c.duplicates + 1) + " times)" : "");
    }}
    const hops = [];
    if (rep.via) hops.push("Via: " + rep.via);
    if (rep.x_forwarded_for) hops.push("X-Forwarded-For: " + rep.x_forwarded_for);
    if (rep.forwarded) hops.push("Forwarded: " + rep.forwarded);
    document.getElementById("middlebox").textContent = hops.length
      ? "Devices between this browser and the guard announced themselves: " + hops.join("; ")
      : "No device between this browser and the guard announced itself (Via, X-Forwarded-For).";
  }} catch (e) {{
    document.getElementById("verdict").textContent = "The check could not run: " + e;
  }}
}})();
</script></body></html>
"#,
            base = self.path
        );
        let mut r = Response::new(Full::new(Bytes::from(body)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

fn new_id() -> String {
    format!("{:024x}", rand::random::<u128>() >> 32)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn report(check: &CookieCheck, cookie: &str, tls: bool) -> serde_json::Value {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        let r = check.report("abc", &h, tls);
        let body =
            futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(r.into_body()))
                .unwrap()
                .unwrap()
                .to_bytes();
        serde_json::from_slice(&body).unwrap()
    }

    /// The proxy asks `owns` before it builds the endpoint's future: it must say yes to
    /// every path `handle` answers, and no to the rest.
    #[test]
    fn owns_exactly_what_it_handles() {
        let c = CookieCheck::new("/__qsguard/cookie-check/");
        let h = HeaderMap::new();
        for path in [
            "/__qsguard/cookie-check",
            "/__qsguard/cookie-check/",
            "/__qsguard/cookie-check/set",
            "/__qsguard/cookie-check/report",
            "/__qsguard/cookie-check/nope",
            "/__qsguard/cookie-checker",
            "/__qsguard/cookie",
            "/__qsguard/",
            "/hub/",
            "/",
        ] {
            assert_eq!(
                c.owns(path),
                c.handle(path, Some("id=abc"), &h, false).is_some(),
                "{path}"
            );
        }
        assert!(c.owns("/__qsguard/cookie-check/set"));
        assert!(!c.owns("/hub/"));
    }

    fn all(check: &CookieCheck, skip: &[&str]) -> String {
        COOKIES
            .iter()
            .filter(|(n, _, _)| !skip.contains(n))
            .map(|(n, _, l)| format!("{n}={}", check.value("abc", n, *l)))
            .collect::<Vec<_>>()
            .join("; ")
    }

    #[test]
    fn verdicts() {
        let c = CookieCheck::new("/__qsguard/cookie-check");
        assert_eq!(report(&c, &all(&c, &[]), true)["clean"], true);
        // Over http the Secure cookies are not expected.
        let http = all(&c, &["qsguard_check_secure", "qsguard_check_none"]);
        assert_eq!(report(&c, &http, false)["clean"], true);
        let dropped = all(
            &c,
            &[
                "qsguard_check_long",
                "qsguard_check_secure",
                "qsguard_check_none",
            ],
        );
        assert!(report(&c, &dropped, false)["verdict"]
            .as_str()
            .unwrap()
            .starts_with("dropped"));
        let first = format!(
            "qsguard_check_plain={}",
            c.value("abc", "qsguard_check_plain", 36)
        );
        assert!(report(&c, &first, false)["verdict"]
            .as_str()
            .unwrap()
            .starts_with("folded"));
        let changed = http.replacen("qsguard_check_lax=", "qsguard_check_lax=x", 1);
        assert!(report(&c, &changed, false)["verdict"]
            .as_str()
            .unwrap()
            .starts_with("modified"));
        assert_eq!(c.value("abc", "qsguard_check_long", 3000).len(), 3000);
        assert_ne!(c.value("abc", "a", 36), c.value("abd", "a", 36));
    }
}
