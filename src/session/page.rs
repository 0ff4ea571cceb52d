//! The guard's own pages: the limit page (HTTP 429) that replaces Qlik's "too many sessions"
//! dead end, and the form behind its "end this session" buttons.
//!
//! The page says, in plain words, what happened, what the limit is, which sessions the user has
//! (which browser, from where, last active, open apps), and what to do. The buttons POST to
//! `/__qsguard/end-session` with a CSRF token bound to the browser and the user; only the same
//! user's sessions can be ended, and the device cookie is SameSite=Lax, so another site cannot
//! submit the form for them.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::identity::User;
use super::table::State;
use super::{Context, SessionGuard};
use crate::proxy::error::escape;

/// Where the end-session form posts.
pub const END_SESSION_PATH: &str = "/__qsguard/end-session";

impl SessionGuard {
    /// The limit page for `user`, who asked for `path` (with its query).
    pub fn limit_page(&self, user: &User, ctx: &Context, path: &str) -> Response<Full<Bytes>> {
        let now_ms = self.table.now_ms();
        let sessions = self.table.user_sessions(&user.key);
        let token = self.csrf_token(ctx.device, user);
        let mut rows = String::new();
        for s in &sessions {
            let (browser, from) = {
                let devices = s.meta().devices.clone();
                let mine = devices.contains(&ctx.device);
                let (ua, addr) = devices
                    .last()
                    .map(|d| self.table.device_info(*d))
                    .unwrap_or((None, None));
                let browser = match (mine, ua) {
                    (true, Some(ua)) => format!("this browser ({})", browser_name(&ua)),
                    (true, None) => "this browser".to_string(),
                    (false, Some(ua)) => browser_name(&ua).to_string(),
                    (false, None) => "a browser or app the guard has not seen".to_string(),
                };
                (
                    browser,
                    addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                )
            };
            let vp = &self.virtual_proxies()[s.vp].prefix;
            let apps = s.meta().apps.join(", ");
            let idle = now_ms.saturating_sub(s.last_active_ms()) / 1000;
            rows.push_str(&format!(
                "<tr><td>{browser}</td><td>{from}</td><td>{vp}</td><td>{idle}</td><td>{apps}</td>\
<td><form method=\"post\" action=\"{END_SESSION_PATH}\"><input type=\"hidden\" name=\"session\" value=\"{hash}\">\
<input type=\"hidden\" name=\"csrf\" value=\"{token}\"><input type=\"hidden\" name=\"return\" value=\"{back}\">\
<button type=\"submit\">End this session</button></form></td></tr>\n",
                browser = escape(&browser),
                from = escape(&from),
                vp = if vp.is_empty() { "central".to_string() } else { escape(vp) },
                idle = ago(idle),
                apps = if apps.is_empty() { "-".to_string() } else { escape(&apps) },
                hash = s.hash,
                token = token,
                back = escape(path),
            ));
        }
        let retry = self.retry_after(user);
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
            n = sessions.len(),
            max = self.max_per_user(),
            rows = rows,
            back = escape(path),
            wait = ago(retry).replace(" ago", ""),
            user = escape(&user.to_string()),
            policy = self.on_limit_name(),
        );
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::RETRY_AFTER, HeaderValue::from(retry));
        if ctx.new_device {
            if let Some(v) = super::cookies::device_set_cookie(
                self.device_cookie_name(),
                &format!("{:032x}", ctx.device),
                ctx.tls,
            ) {
                h.append(header::SET_COOKIE, v);
            }
        }
        r
    }

    /// `POST /__qsguard/end-session`: ends one of the caller's own sessions.
    pub async fn end_session_form<H: super::cookies::Headers>(
        &self,
        method: &[u8],
        headers: &H,
        body: &[u8],
    ) -> Response<Full<Bytes>> {
        if method != b"POST" {
            return plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "use the buttons on the limit page",
            );
        }
        let device = self.device_of(headers);
        let user = self.user_of(headers, device);
        let form: Vec<(String, String)> = form_pairs(body);
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let (Some(device), Some(user)) = (device, user) else {
            return plain(
                StatusCode::FORBIDDEN,
                "this browser is not known to the guard",
            );
        };
        if get("csrf") != Some(self.csrf_token(device, &user).as_str()) {
            return plain(
                StatusCode::FORBIDDEN,
                "the form has expired: go back and reload the page",
            );
        }
        let Some(hash) = get("session") else {
            return plain(StatusCode::BAD_REQUEST, "no session was chosen");
        };
        let Some(s) = self
            .table
            .user_sessions(&user.key)
            .into_iter()
            .find(|s| &*s.hash == hash)
        else {
            return plain(
                StatusCode::NOT_FOUND,
                "that session has ended already, or is not yours",
            );
        };
        self.table.end(&s, State::LoggedOut);
        if let Err(e) = self.end_in_qlik(&s).await {
            tracing::warn!(session = %s.hash, user = %user, "ending a session from the limit page failed: {e}");
            return plain(
                StatusCode::BAD_GATEWAY,
                "Qlik Sense could not end the session; try again",
            );
        }
        tracing::info!(session = %s.hash, user = %user, "session ended by its user from the limit page");
        let back = get("return")
            .filter(|p| p.starts_with('/') && !p.starts_with("//") && !p.contains('\\'))
            .unwrap_or("/");
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SEE_OTHER;
        if let Ok(v) = HeaderValue::from_str(back) {
            r.headers_mut().insert(header::LOCATION, v);
        }
        r
    }

    pub fn max_per_user(&self) -> usize {
        self.policy().max
    }

    fn on_limit_name(&self) -> &'static str {
        match self.policy().on_limit {
            crate::config::OnLimit::Reuse => "reuse",
            crate::config::OnLimit::Evict => "evict",
            crate::config::OnLimit::Error => "error",
        }
    }

    pub fn device_cookie_name(&self) -> &str {
        &self.device_cookie
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let body = crate::proxy::error::page(
        status,
        "The session was not ended",
        text,
        "qsguard end-session form",
    );
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// `application/x-www-form-urlencoded` pairs.
fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    body.split(|&b| b == b'&')
        .filter_map(|kv| {
            let mut it = kv.splitn(2, |&b| b == b'=');
            Some((
                percent_decode(it.next()?),
                percent_decode(it.next().unwrap_or(b"")),
            ))
        })
        .collect()
}

fn percent_decode(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// "3 min ago" and the like.
fn ago(secs: u64) -> String {
    match secs {
        0..=59 => "just now".into(),
        60..=3599 => format!("{} min ago", secs / 60),
        _ => format!("{} h {} min ago", secs / 3600, (secs % 3600) / 60),
    }
}

/// A readable name for a User-Agent.
fn browser_name(ua: &str) -> &'static str {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        let f = form_pairs(b"session=abc&csrf=00ff&return=%2Fhub%2F%3Fa%3D1+b&bad=%zz");
        assert_eq!(f[0], ("session".into(), "abc".into()));
        assert_eq!(f[2].1, "/hub/?a=1 b");
        assert_eq!(f[3].1, "%zz");
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
}
