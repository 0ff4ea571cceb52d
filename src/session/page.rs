//! The guard's own pages: the limit page (HTTP 429) that replaces Qlik's "too many sessions"
//! dead end, and the form behind its "end this session" buttons.
//!
//! The page says, in plain words, what happened, what the limit is, which sessions the user has
//! (which browser, from where, last active, open apps), and what to do. The buttons POST to
//! `/__qsguard/end-session` with a CSRF token bound to the browser and the user; only the same
//! user's sessions can be ended, and the device cookie is SameSite=Lax, so another site cannot
//! submit the form for them.

use http::header;
use http::StatusCode;

use super::identity::User;
use super::table::{DeviceId, State};
use super::{Context, SessionGuard};
use crate::pages::{self, Page};

pub use crate::pages::END_SESSION_PATH;

/// How long the limit page's form may be submitted after the page was made. Long enough to
/// read the page and choose; short enough that a token that leaked (a screenshot, a proxy
/// log) is soon worthless.
pub const CSRF_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// What a submitted CSRF token is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Csrf {
    Valid,
    /// Made by this guard for this browser and user, but too long ago.
    Expired,
    /// Not made by this guard for this browser and user (or not a token at all).
    Invalid,
}

impl SessionGuard {
    /// The token for a page made at `issued_ms` (the table's clock): the issue time in hex, a
    /// dot, and a keyed hash of browser, user and issue time, so the time cannot be changed
    /// without the key.
    pub fn csrf_token_at(&self, device: DeviceId, user: &User, issued_ms: u64) -> String {
        format!(
            "{issued_ms:x}.{}",
            self.csrf_mac(device, user, issued_ms).to_hex()
        )
    }

    fn csrf_mac(&self, device: DeviceId, user: &User, issued_ms: u64) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.csrf_key);
        h.update(&device.to_be_bytes());
        h.update(&(user.key.len() as u64).to_be_bytes());
        h.update(user.key.as_bytes());
        h.update(&issued_ms.to_be_bytes());
        h.finalize()
    }

    /// Checks a submitted token: its hash first, compared in constant time (`blake3::Hash`'s
    /// equality is), so a forger learns nothing from the timing; then its age.
    pub fn csrf_check(&self, token: &str, device: DeviceId, user: &User) -> Csrf {
        let Some((issued, mac)) = token.split_once('.') else {
            return Csrf::Invalid;
        };
        let (Ok(issued_ms), Ok(mac)) =
            (u64::from_str_radix(issued, 16), blake3::Hash::from_hex(mac))
        else {
            return Csrf::Invalid;
        };
        if mac != self.csrf_mac(device, user, issued_ms) {
            return Csrf::Invalid;
        }
        let now = self.table.now_ms();
        // A second of slack for a token issued "in the future": the clock is monotonic, so
        // only a token of another process could be, and its key differs anyway.
        if issued_ms > now + 1_000 {
            return Csrf::Invalid;
        }
        if now - issued_ms.min(now) > CSRF_LIFETIME.as_millis() as u64 {
            return Csrf::Expired;
        }
        Csrf::Valid
    }

    /// The limit page for `user`, who asked for `path` (with its query).
    pub fn limit_page(&self, user: &User, ctx: &Context, path: &str) -> Page {
        let now_ms = self.table.now_ms();
        let rows = self
            .table
            .user_sessions(&user.key)
            .iter()
            .map(|s| {
                let devices = s.meta().devices.clone();
                let mine = devices.contains(&ctx.device);
                let (ua, addr) = devices
                    .last()
                    .map(|d| self.table.device_info(*d))
                    .unwrap_or((None, None));
                let browser = match (mine, ua) {
                    (true, Some(ua)) => format!("this browser ({})", pages::browser_name(&ua)),
                    (true, None) => "this browser".to_string(),
                    (false, Some(ua)) => pages::browser_name(&ua).to_string(),
                    (false, None) => "a browser or app the guard has not seen".to_string(),
                };
                pages::LimitRow {
                    browser,
                    from: addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                    virtual_proxy: self.virtual_proxies()[s.vp].prefix.clone(),
                    idle_secs: now_ms.saturating_sub(s.last_active_ms()) / 1000,
                    apps: s.meta().apps.join(", "),
                    hash: s.hash.to_string(),
                }
            })
            .collect();
        let mut r = pages::limit(&pages::Limit {
            user: &user.to_string(),
            max: self.max_per_user(),
            policy: self.on_limit_name(),
            rows,
            back: path,
            retry_after_secs: self.retry_after(user),
            csrf: &self.csrf_token(ctx.device, user),
        });
        if let Some(v) = self.device_set_cookie(ctx) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
        r
    }

    /// `POST /__qsguard/end-session`: ends one of the caller's own sessions.
    pub async fn end_session_form<H: crate::head_view::HeadView>(
        &self,
        method: &[u8],
        headers: &H,
        body: &[u8],
    ) -> Page {
        if method != b"POST" {
            return pages::not_ended(
                StatusCode::METHOD_NOT_ALLOWED,
                "use the buttons on the limit page",
            );
        }
        let device = self.device_of(headers);
        let user = self.user_of(headers, device);
        let form: Vec<(String, String)> = form_pairs(body);
        let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let (Some(device), Some(user)) = (device, user) else {
            return pages::not_ended(
                StatusCode::FORBIDDEN,
                "this browser is not known to the guard",
            );
        };
        match self.csrf_check(get("csrf").unwrap_or(""), device, &user) {
            Csrf::Valid => {}
            Csrf::Expired => return pages::not_ended(
                StatusCode::FORBIDDEN,
                "the form has expired (it is valid for 10 minutes): go back and reload the page",
            ),
            Csrf::Invalid => {
                return pages::not_ended(
                    StatusCode::FORBIDDEN,
                    "the form is not valid for this browser: go back and reload the page",
                )
            }
        }
        let Some(hash) = get("session") else {
            return pages::not_ended(StatusCode::BAD_REQUEST, "no session was chosen");
        };
        let Some(s) = self
            .table
            .user_sessions(&user.key)
            .into_iter()
            .find(|s| &*s.hash == hash)
        else {
            return pages::not_ended(
                StatusCode::NOT_FOUND,
                "that session has ended already, or is not yours",
            );
        };
        self.table.end(&s, State::LoggedOut);
        if let Err(e) = self.end_in_qlik(&s).await {
            tracing::warn!(session = %s.hash, user = %user, "ending a session from the limit page failed: {e}");
            return pages::not_ended(
                StatusCode::BAD_GATEWAY,
                "Qlik Sense could not end the session; try again",
            );
        }
        tracing::info!(session = %s.hash, user = %user, "session ended by its user from the limit page");
        let back = get("return")
            .filter(|p| p.starts_with('/') && !p.starts_with("//") && !p.contains('\\'))
            .unwrap_or("/");
        pages::see_other(back)
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
}
