//! Every page and answer the guard writes itself, in one catalogue: the error pages (from
//! [`crate::proxy::ProxyError`]), the limit page (HTTP 429) and its end-session form's replies,
//! the redirect that sends a held login step back to its page, and the refusal of a bad
//! identity header. Each takes plain data and returns a finished response, so the parts that
//! decide (the proxy, the session guard) never write HTML, and every page escapes what it
//! quotes the same way.
//!
//! The pages are written for two readers: the user in front of the browser (what happened,
//! what to do) and the admin who gets the screenshot (which part failed). They are
//! self-contained (no external resources: Qlik may be down) and are never cached.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

/// A response the guard wrote itself.
pub type Page = Response<Full<Bytes>>;

/// Where the limit page's end-session form posts.
pub const END_SESSION_PATH: &str = "/__qsguard/end-session";

/// A small page: a title, advice for the user, a line for the admin.
pub fn message(status: StatusCode, title: &str, advice: &str, detail: &str) -> Page {
    let body = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title}</title><style>body{{font-family:system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em;color:#222}}\
h1{{font-size:1.4em}}.detail{{color:#555;font-size:.9em;border-top:1px solid #ddd;padding-top:1em;margin-top:2em}}</style></head>\
<body><h1>{title}</h1><p>{advice}</p>\
<p class=\"detail\">For your administrator: HTTP {code}. {detail}<br>Answered by qsguard, the proxy in front of Qlik Sense.</p>\
</body></html>\n",
        title = escape(title),
        advice = escape(advice),
        detail = escape(detail),
        code = status.as_u16(),
    );
    html(status, body)
}

/// `body` as an uncached HTML answer with `status`.
fn html(status: StatusCode, body: String) -> Page {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A header-authentication virtual proxy's identity header that is not `DIRECTORY\userid`.
pub fn bad_identity(header: &HeaderName, why: &str) -> Page {
    message(
        StatusCode::BAD_REQUEST,
        "This request was refused",
        "The sign-in information added by your organisation's login gateway is not valid, so the \
         request was not passed to Qlik Sense. Tell your Qlik administrator.",
        &format!("{why} (header {header}; the value must be DIRECTORY\\userid in US-ASCII)"),
    )
}

/// A held login step sent back to the page it asked for, with the session its browser's first
/// login got (`set_cookie`).
pub fn back_to_page(location: &str, set_cookie: Option<HeaderValue>) -> Page {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(v) = set_cookie {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// One of the user's sessions, as the limit page lists it.
pub struct LimitRow {
    pub browser: String,
    pub from: String,
    /// The virtual proxy's prefix (empty: the central proxy).
    pub virtual_proxy: String,
    pub idle_secs: u64,
    pub apps: String,
    /// The session's keyed hash (the form names the session by it, never by its cookie).
    pub hash: String,
}

/// What the limit page says.
pub struct Limit<'a> {
    pub user: &'a str,
    pub max: usize,
    pub policy: &'a str,
    pub rows: Vec<LimitRow>,
    /// The path (and query) the user asked for: "try again" goes there.
    pub back: &'a str,
    pub retry_after_secs: u64,
    /// The form's CSRF token.
    pub csrf: &'a str,
}

/// The limit page (HTTP 429): what happened, the user's sessions with a button to end each,
/// and what to do.
pub fn limit(p: &Limit<'_>) -> Page {
    let mut rows = String::new();
    for r in &p.rows {
        rows.push_str(&format!(
            "<tr><td>{browser}</td><td>{from}</td><td>{vp}</td><td>{idle}</td><td>{apps}</td>\
<td><form method=\"post\" action=\"{END_SESSION_PATH}\"><input type=\"hidden\" name=\"session\" value=\"{hash}\">\
<input type=\"hidden\" name=\"csrf\" value=\"{token}\"><input type=\"hidden\" name=\"return\" value=\"{back}\">\
<button type=\"submit\">End this session</button></form></td></tr>\n",
            browser = escape(&r.browser),
            from = escape(&r.from),
            vp = if r.virtual_proxy.is_empty() {
                "central".to_string()
            } else {
                escape(&r.virtual_proxy)
            },
            idle = ago(r.idle_secs),
            apps = if r.apps.is_empty() {
                "-".to_string()
            } else {
                escape(&r.apps)
            },
            hash = escape(&r.hash),
            token = escape(p.csrf),
            back = escape(p.back),
        ));
    }
    let body = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>Too many Qlik Sense sessions</title>\
<style>body{{font-family:system-ui,sans-serif;max-width:56em;margin:3em auto;padding:0 1em;color:#222}}\
table{{border-collapse:collapse;width:100%}}td,th{{border-bottom:1px solid #ddd;padding:.4em;text-align:left}}\
.detail{{color:#555;font-size:.9em;margin-top:2em}}</style></head><body>\
<h1>You already have {n} Qlik Sense sessions open</h1>\
<p>Qlik Sense allows each user at most <strong>{max}</strong> sessions at the same time (each browser, device \
or virtual proxy counts as one). Opening another one now would lock you out of Qlik Sense, so it was not opened.</p>\
<h2>Your sessions</h2><table><tr><th>Browser</th><th>From</th><th>Virtual proxy</th><th>Last active</th>\
<th>Open apps</th><th></th></tr>\n{rows}</table>\
<h2>What you can do</h2><ul><li>Go back to a browser or tab where Qlik Sense is already open, and use that.</li>\
<li>End one of the sessions above that you no longer use, then <a href=\"{back}\">try again</a>.</li>\
<li>Or wait: a session you no longer use ends by itself after a while of inactivity; the next one ends in \
about {wait}.</li></ul>\
<p class=\"detail\">For your administrator: HTTP 429, user {user}, limit {max} (sessions.max_per_user), \
sessions.on_limit = {policy}. Answered by qsguard, the proxy in front of Qlik Sense.</p></body></html>\n",
        n = p.rows.len(),
        max = p.max,
        back = escape(p.back),
        wait = ago(p.retry_after_secs).replace(" ago", ""),
        user = escape(p.user),
        policy = escape(p.policy),
    );
    let mut r = html(StatusCode::TOO_MANY_REQUESTS, body);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(p.retry_after_secs));
    r
}

/// The end-session form refused (`text` says why).
pub fn not_ended(status: StatusCode, text: &str) -> Page {
    message(
        status,
        "The session was not ended",
        text,
        "qsguard end-session form",
    )
}

/// After a form: back to `location` (a path on this site).
pub fn see_other(location: &str) -> Page {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// "3 min ago" and the like.
pub fn ago(secs: u64) -> String {
    match secs {
        0..=59 => "just now".into(),
        60..=3599 => format!("{} min ago", secs / 60),
        _ => format!("{} h {} min ago", secs / 3600, (secs % 3600) / 60),
    }
}

/// A readable name for a User-Agent.
pub fn browser_name(ua: &str) -> &'static str {
    let checks = [
        ("Edg/", "Microsoft Edge"),
        ("OPR/", "Opera"),
        ("Firefox/", "Firefox"),
        ("Chrome/", "Chrome"),
        ("Safari/", "Safari"),
        ("Qlik", "Qlik app"),
        ("curl/", "curl"),
    ];
    checks
        .iter()
        .find(|(k, _)| ua.contains(k))
        .map(|(_, n)| *n)
        .unwrap_or("another browser or app")
}

/// Text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_escape_what_they_quote() {
        let p = message(StatusCode::BAD_GATEWAY, "t", "a", "<script>x</script>");
        let body = String::from_utf8_lossy(&futures_body(p)).into_owned();
        assert!(!body.contains("<script>"));
        assert!(body.contains("&lt;script&gt;"));
    }

    #[test]
    fn the_limit_page_lists_sessions_by_hash_and_escapes_everything() {
        let page = limit(&Limit {
            user: "CORP\\<jane>",
            max: 5,
            policy: "error",
            rows: vec![LimitRow {
                browser: "Chrome".into(),
                from: "10.0.0.1".into(),
                virtual_proxy: String::new(),
                idle_secs: 180,
                apps: "<app>".into(),
                hash: "0123456789ab".into(),
            }],
            back: "/hub/?a=\"1\"",
            retry_after_secs: 90,
            csrf: "00ff",
        });
        assert_eq!(page.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(page.headers()["retry-after"], "90");
        let body = String::from_utf8_lossy(&futures_body(page)).into_owned();
        assert!(body.contains("value=\"0123456789ab\""));
        assert!(body.contains("3 min ago"));
        assert!(body.contains("CORP\\&lt;jane&gt;"));
        assert!(body.contains("&lt;app&gt;"));
        assert!(body.contains("/hub/?a=&quot;1&quot;"));
    }

    #[test]
    fn names_and_times() {
        assert_eq!(
            browser_name("Mozilla/5.0 ... Chrome/120.0 Safari/537.36"),
            "Chrome"
        );
        assert_eq!(
            browser_name("Mozilla/5.0 ... Chrome/120 Safari/537.36 Edg/120"),
            "Microsoft Edge"
        );
        assert_eq!(ago(30), "just now");
        assert_eq!(ago(180), "3 min ago");
    }

    fn futures_body(p: Page) -> Bytes {
        use http_body_util::BodyExt;
        futures_util::FutureExt::now_or_never(p.into_body().collect())
            .expect("a full body is ready")
            .expect("infallible")
            .to_bytes()
    }
}
