//! The proxy listener of the simulated QPS: virtual-proxy routing, authentication (Windows
//! redirect dance with tickets, header authentication), session cookies, the per-user limit,
//! content pages, the Personal API and the simulator's own `/__sim/` test endpoints.
//!
//! The order of decisions follows the QPS: a request is authenticated only by a cookie that
//! names a live session of *this* virtual proxy; anything else re-authenticates and, once the
//! user is known, creates a new session, which is exactly how a damaged cookie burns through
//! the user's five sessions.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, SET_COOKIE};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;
use tokio::time::Instant;

use super::config::SimAuth;
use super::engine;
use super::http::{
    bad_host, first_cookie, host_problem, html_escape, html_page, json, query_pairs, query_param,
    redirect, response, strip_query_param, Body,
};
use super::ntlm::{self, ClientMessage, Scheme};
use super::sessions::{EndReason, SessionInfo, User};
use super::{Shared, SimRequest};

/// Request bodies larger than this get 413; the simulator keeps bodies for `last_request`.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Longest delay `/__sim/slow` accepts, so a typo cannot hang a test run.
const MAX_SLOW_MS: u64 = 120_000;
/// The exact sentence of Qlik's limit page.
pub(crate) const LIMIT_SENTENCE: &str =
    "You cannot access Qlik Sense because you have too many sessions active in parallel";
const AUTH_MODULE: &str = "internal_windows_authentication";

/// What one client connection holds of a Windows handshake: the challenge it was given.
pub(crate) struct ConnAuth {
    challenge: std::sync::Mutex<Option<[u8; 8]>>,
    /// A serial number, shown by `/__sim/echo`: tests see which connection a request came on.
    id: u64,
}

impl Default for ConnAuth {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        ConnAuth {
            challenge: Default::default(),
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl ConnAuth {
    fn set(&self, c: Option<[u8; 8]>) -> Option<[u8; 8]> {
        std::mem::replace(
            &mut *self.challenge.lock().unwrap_or_else(|e| e.into_inner()),
            c,
        )
    }
}

pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: &ConnAuth,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let (body, body_err) = match Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => (c.to_bytes(), None),
        Err(e) => {
            let too_big = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            (
                Bytes::new(),
                Some(if too_big {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                }),
            )
        }
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| parts.uri.to_string());
    shared.lock().record(SimRequest {
        method: parts.method.to_string(),
        path_and_query,
        version: format!("{:?}", parts.version),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: body.to_vec(),
    });
    if let Some(why) = host_problem(parts.version, &parts.headers) {
        return bad_host(why);
    }
    if let Some(status) = body_err {
        return html_page(status, "Bad request", "The request body could not be read.");
    }
    route(&shared, conn, &mut parts, &body).await
}

/// Splits the path into (virtual proxy index, rest below the prefix without a leading '/').
/// `None` when no virtual proxy matches (no central proxy configured).
fn route_vp<'a>(shared: &Shared, path: &'a str) -> (Option<usize>, &'a str) {
    let p = path.strip_prefix('/').unwrap_or(path);
    let (first, rest) = p.split_once('/').unwrap_or((p, ""));
    if !first.is_empty() {
        if let Some(i) = shared
            .config
            .virtual_proxies
            .iter()
            .position(|v| v.prefix == first)
        {
            return (Some(i), rest);
        }
    }
    let central = shared
        .config
        .virtual_proxies
        .iter()
        .position(|v| v.prefix.is_empty());
    (central, p)
}

async fn route(
    shared: &Arc<Shared>,
    conn: &ConnAuth,
    parts: &mut Parts,
    body: &Bytes,
) -> Response<Body> {
    let path = parts.uri.path().to_string();
    let (vp, rest) = route_vp(shared, &path);
    if rest == "__sim" || rest.starts_with("__sim/") {
        return sim_endpoint(conn, parts, rest, body).await;
    }
    let Some(vp) = vp else {
        return html_page(
            StatusCode::NOT_FOUND,
            "Not Found",
            "No virtual proxy has this prefix.",
        );
    };
    let vpc = &shared.config.virtual_proxies[vp];
    let now = Instant::now();

    if rest == "qps/user" || rest == "qps/user/" {
        return personal_api(shared, parts, vp, now);
    }
    let is_engine =
        (rest.starts_with("app/") || rest == "app") && engine::is_upgrade(&parts.headers);

    match &vpc.auth {
        SimAuth::Windows { accept_any_proof } => {
            if rest == AUTH_MODULE || rest.starts_with("internal_windows_authentication/") {
                return auth_module(shared, conn, parts, vp, *accept_any_proof, now);
            }
            let ticket = query_param(parts.uri.query(), "qlikTicket").or_else(|| {
                parts
                    .headers
                    .get("x-qlik-ticket")
                    .map(|v| v.as_bytes().to_vec())
            });
            if let Some(ticket) = ticket {
                return redeem(shared, parts, vp, rest, &ticket, is_engine, now);
            }
            match session_from_cookie(shared, vp, parts, now) {
                Some(s) => authenticated(shared, parts, vp, rest, &s, None, is_engine),
                None if is_engine => html_page(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "The engine connection needs a live session.",
                ),
                None => {
                    let original = path_and_query(parts);
                    let target = shared.lock().new_target(vp, original, now);
                    redirect(&format!(
                        "{}{AUTH_MODULE}/?targetId={target}",
                        prefix_path(&vpc.prefix)
                    ))
                }
            }
        }
        SimAuth::Header { header } => {
            let values: Vec<&HeaderValue> = parts.headers.get_all(header.as_str()).iter().collect();
            let user = match values.as_slice() {
                [one] => User::parse(one.as_bytes()),
                _ => None,
            };
            let Some(user) = user else {
                return html_page(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                    "Header authentication failed: the user header is missing or malformed.",
                );
            };
            let existing = session_from_cookie(shared, vp, parts, now);
            if let Some(s) = &existing {
                if s.user.key() == user.key() {
                    return authenticated(shared, parts, vp, rest, s, None, is_engine);
                }
            }
            let created = {
                let mut st = shared.lock();
                // Qlik drops the session of the previous user before logging in the new one.
                if let Some(s) = &existing {
                    st.end(&s.id, EndReason::Replaced);
                }
                st.create(vp, &user, None, now)
            };
            match created {
                Ok(s) => {
                    let cookie = set_cookie(shared, vp, &s.id);
                    let mut r = authenticated(shared, parts, vp, rest, &s, cookie, is_engine);
                    for c in &vpc.also_sets {
                        if let Ok(v) = HeaderValue::from_str(c) {
                            r.headers_mut().append(SET_COOKIE, v);
                        }
                    }
                    r
                }
                Err(_) if is_engine => engine::accept(shared, parts, None, None),
                Err(_) => limit_page(),
            }
        }
    }
}

fn path_and_query(parts: &Parts) -> String {
    parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string())
}

/// "/" for the central proxy, "/prefix/" otherwise.
fn prefix_path(prefix: &str) -> String {
    if prefix.is_empty() {
        "/".to_string()
    } else {
        format!("/{prefix}/")
    }
}

/// The live session named by this virtual proxy's cookie. A cookie that is present but not a
/// live session of this virtual proxy is counted and ignored, as the QPS ignores it.
fn session_from_cookie(
    shared: &Shared,
    vp: usize,
    parts: &Parts,
    now: Instant,
) -> Option<SessionInfo> {
    let name = &shared.config.virtual_proxies[vp].cookie_name;
    let value = first_cookie(&parts.headers, name)?;
    let mut st = shared.lock();
    let found = String::from_utf8(value)
        .ok()
        .and_then(|id| st.touch(vp, &id, now));
    if found.is_none() {
        st.counters.unknown_cookie_requests += 1;
    }
    found
}

fn set_cookie(shared: &Shared, vp: usize, id: &str) -> Option<HeaderValue> {
    let v = &shared.config.virtual_proxies[vp];
    let same_site = v
        .same_site
        .as_ref()
        .map(|s| format!("; SameSite={s}"))
        .unwrap_or_default();
    HeaderValue::from_str(&format!(
        "{}={id}; Path=/; HttpOnly{same_site}",
        v.cookie_name
    ))
    .ok()
}

fn limit_page() -> Response<Body> {
    html_page(
        StatusCode::FORBIDDEN,
        "Access denied",
        &format!("{LIMIT_SENTENCE}."),
    )
}

/// `/<prefix/>internal_windows_authentication/?targetId=...`: Windows authentication, a
/// connection-bound NTLM handshake (Type 1, the `401` with a Type 2 challenge kept for this
/// connection, Type 3), then the redirect with a one-time ticket.
fn auth_module(
    shared: &Shared,
    conn: &ConnAuth,
    parts: &Parts,
    vp: usize,
    accept_any_proof: bool,
    now: Instant,
) -> Response<Body> {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return html_page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "Use GET.",
        );
    }
    let target_id = query_param(parts.uri.query(), "targetId")
        .map(|t| String::from_utf8_lossy(&t).into_owned())
        .unwrap_or_default();
    let Some(original) = shared.lock().peek_target(vp, &target_id, now) else {
        return html_page(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "Unknown or expired authentication target.",
        );
    };
    let offered = parts
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| Scheme::split(v.as_bytes()));
    let Some((scheme, token)) = offered else {
        // A browser that has not authenticated yet gets the schemes on offer.
        return challenge(None);
    };
    let user = match ntlm::read_client(scheme, token) {
        Ok(ClientMessage::Negotiate { flags }) => {
            // A new Type 1 starts over: whatever this connection held is replaced.
            let c = ntlm::new_challenge();
            conn.set(Some(c));
            let type2 = ntlm::challenge_message(c, flags, "DEMO");
            let t = ntlm::server_token(scheme, &type2);
            super::secrets::note_token(&t);
            shared.lock().counters.ntlm_challenges += 1;
            return challenge(Some(format!("{} {t}", scheme.name())));
        }
        Ok(ClientMessage::Authenticate(a)) => {
            // The challenge is good for one answer, on this connection only.
            let Some(c) = conn.set(None) else {
                shared.lock().counters.ntlm_no_challenge += 1;
                return challenge(None);
            };
            if !(ntlm::answer_fits(&a, &c) || accept_any_proof) {
                shared.lock().counters.ntlm_bad_answer += 1;
                return challenge(None);
            }
            match User::from_parts(&a.domain, &a.user) {
                Some(u) => u,
                // An anonymous Type 3 (no user name) is no Windows login.
                None => {
                    shared.lock().counters.ntlm_bad_answer += 1;
                    return challenge(None);
                }
            }
        }
        Err(_) => {
            conn.set(None);
            shared.lock().counters.ntlm_bad_answer += 1;
            return challenge(None);
        }
    };
    let ticket = {
        let mut st = shared.lock();
        st.counters.ntlm_handshakes += 1;
        st.consume_target(&target_id);
        st.issue_ticket(vp, &user, now)
    };
    let sep = if original.contains('?') { '&' } else { '?' };
    redirect(&format!("{original}{sep}qlikTicket={ticket}"))
}

/// The `401` of the authentication module: both schemes on offer, or the next leg of the
/// scheme the browser chose. The target stays usable for the browser's next leg.
fn challenge(next_leg: Option<String>) -> Response<Body> {
    let mut r = html_page(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "Windows authentication required.",
    );
    let h = r.headers_mut();
    match next_leg.and_then(|v| HeaderValue::from_str(&v).ok()) {
        Some(v) => {
            h.insert(http::header::WWW_AUTHENTICATE, v);
        }
        None => {
            h.append(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Negotiate"),
            );
            h.append(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("NTLM"),
            );
        }
    }
    r
}

/// Redeems a ticket into a new session, then sends the browser back without the ticket.
fn redeem(
    shared: &Arc<Shared>,
    parts: &mut Parts,
    vp: usize,
    rest: &str,
    ticket: &[u8],
    is_engine: bool,
    now: Instant,
) -> Response<Body> {
    let ticket = String::from_utf8_lossy(ticket);
    let created = {
        let mut st = shared.lock();
        st.redeem_ticket(vp, &ticket, now)
            .map(|user| st.create(vp, &user, None, now))
    };
    let s = match created {
        None => {
            return html_page(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "Unknown, expired or already used ticket.",
            )
        }
        Some(Err(_)) if is_engine => return engine::accept(shared, parts, None, None),
        Some(Err(_)) => return limit_page(),
        Some(Ok(s)) => s,
    };
    let cookie = set_cookie(shared, vp, &s.id);
    if is_engine {
        // A WebSocket cannot follow a redirect; it gets the cookie on the 101 instead.
        return authenticated(shared, parts, vp, rest, &s, cookie, true);
    }
    let path = parts.uri.path();
    let location = match parts
        .uri
        .query()
        .map(|q| strip_query_param(q, "qlikTicket"))
    {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_string(),
    };
    let mut r = redirect(&location);
    if let Some(c) = cookie {
        r.headers_mut().append(SET_COOKIE, c);
    }
    r
}

/// Serves an authenticated request: the engine WebSocket or a content page.
fn authenticated(
    shared: &Arc<Shared>,
    parts: &mut Parts,
    vp: usize,
    rest: &str,
    s: &SessionInfo,
    cookie: Option<HeaderValue>,
    is_engine: bool,
) -> Response<Body> {
    if is_engine {
        return engine::accept(shared, parts, Some(s.clone()), cookie);
    }
    let mut r = content_page(shared, parts, vp, rest, s);
    if let Some(c) = cookie {
        r.headers_mut().append(SET_COOKIE, c);
    }
    r
}

/// The hub (and every other client page): plain HTML naming node, virtual proxy, user and
/// path; the hub opens the engine WebSocket and shows the notifications it receives.
fn content_page(
    shared: &Shared,
    parts: &Parts,
    vp: usize,
    rest: &str,
    s: &SessionInfo,
) -> Response<Body> {
    let vpc = &shared.config.virtual_proxies[vp];
    let pfx = prefix_path(&vpc.prefix);
    let vp_name = if vpc.prefix.is_empty() {
        "central proxy".to_string()
    } else {
        vpc.prefix.clone()
    };
    let is_hub = rest == "hub" || rest.starts_with("hub/");
    let script = if is_hub {
        // serde_json gives a valid JS string literal; "</" is broken up so it cannot end the
        // script element early.
        let engine = serde_json::Value::String(format!("{pfx}app/engineData"))
            .to_string()
            .replace("</", "<\\/");
        let logout = serde_json::Value::String(format!("{pfx}qps/user"))
            .to_string()
            .replace("</", "<\\/");
        format!(
            r#"<h2>Engine</h2><ul id="engine"></ul>
<button id="logout">Log out</button>
<script>
(function () {{
  var list = document.getElementById("engine");
  function show(text) {{
    var li = document.createElement("li");
    li.textContent = text;
    list.appendChild(li);
  }}
  var scheme = location.protocol === "https:" ? "wss:" : "ws:";
  var ws = new WebSocket(scheme + "//" + location.host + {engine});
  ws.onmessage = function (e) {{
    try {{ show(JSON.parse(e.data).method || e.data); }} catch (x) {{ show(e.data); }}
  }};
  ws.onclose = function (e) {{ show("engine connection closed (" + e.code + ")"); }};
  document.getElementById("logout").onclick = function () {{
    fetch({logout}, {{ method: "DELETE", credentials: "same-origin" }})
      .then(function (r) {{ return r.text(); }})
      .then(function (t) {{ show("logout: " + t); }});
  }};
}})();
</script>
"#
        )
    } else {
        String::new()
    };
    let body = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Qlik Sense (simulated) - {title}</title></head>\n\
         <body>\n<h1>Qlik Sense {title}</h1>\n\
         <p id=\"node\">{node}</p>\n<p id=\"vp\">{vp}</p>\n<p id=\"user\">{user}</p>\n\
         <p id=\"path\">{path}</p>\n{script}</body></html>\n",
        title = if is_hub { "hub" } else { "page" },
        node = html_escape(&shared.config.node_name),
        vp = html_escape(&vp_name),
        user = html_escape(&format!("{}\\{}", s.user.dir, s.user.id)),
        path = html_escape(parts.uri.path()),
    );
    response(StatusCode::OK, "text/html", body)
}

/// `/<prefix/>qps/user`: reports or ends the cookie's session; never authenticates and never
/// creates a session.
fn personal_api(shared: &Shared, parts: &Parts, vp: usize, now: Instant) -> Response<Body> {
    let inactive = || json(StatusCode::OK, &json!({"session": "inactive"}));
    let method = parts.method.clone();
    if method != Method::GET && method != Method::HEAD && method != Method::DELETE {
        return html_page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "Use GET or DELETE.",
        );
    }
    let Some(s) = session_from_cookie(shared, vp, parts, now) else {
        return inactive();
    };
    if method == Method::DELETE {
        shared.lock().end(&s.id, EndReason::LoggedOut);
        return json(
            StatusCode::OK,
            &json!({"session": "ended", "userDirectory": s.user.dir, "userId": s.user.id}),
        );
    }
    let pfx = prefix_path(&shared.config.virtual_proxies[vp].prefix);
    let logout = match parts
        .headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
    {
        Some(host) => format!("http://{host}{pfx}qps/user"),
        None => format!("{pfx}qps/user"),
    };
    json(
        StatusCode::OK,
        &json!({
            "userDirectory": s.user.dir,
            "userId": s.user.id,
            "userName": s.user.id,
            "logoutUri": logout,
        }),
    )
}

/// Test endpoints that are not part of Qlik: no authentication, never a session.
async fn sim_endpoint(conn: &ConnAuth, parts: &Parts, rest: &str, body: &Bytes) -> Response<Body> {
    match rest {
        "__sim/echo" => echo(conn, parts, body),
        "__sim/slow" => {
            let ms = query_param(parts.uri.query(), "ms")
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|v| v.parse::<u64>().ok());
            let Some(ms) = ms.filter(|m| *m <= MAX_SLOW_MS) else {
                return html_page(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    "ms must be 0..=120000",
                );
            };
            tokio::time::sleep(Duration::from_millis(ms)).await;
            response(StatusCode::OK, "text/plain", format!("slept {ms} ms\n"))
        }
        "__sim/bytes" => {
            // A large answer (a QMC export, an app download): `n` bytes.
            let n = query_param(parts.uri.query(), "n")
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|v| v.parse::<usize>().ok());
            let Some(n) = n.filter(|n| *n <= 256 << 20) else {
                return html_page(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    "n must be 0..=268435456",
                );
            };
            response(StatusCode::OK, "application/octet-stream", vec![b'q'; n])
        }
        _ => html_page(
            StatusCode::NOT_FOUND,
            "Not Found",
            "Unknown simulator endpoint.",
        ),
    }
}

/// `/__sim/echo`: the request exactly as received (and the serial number of the connection it
/// came on), plus optional status and Set-Cookie lines.
fn echo(conn: &ConnAuth, parts: &Parts, body: &Bytes) -> Response<Body> {
    let mut status = StatusCode::OK;
    let mut cookies = Vec::new();
    for (name, value) in query_pairs(parts.uri.query()) {
        match name.as_str() {
            "status" => {
                let code = String::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u16>().ok())
                    .filter(|c| (200..=599).contains(c))
                    .and_then(|c| StatusCode::from_u16(c).ok());
                match code {
                    Some(c) => status = c,
                    None => {
                        return html_page(
                            StatusCode::BAD_REQUEST,
                            "Bad request",
                            "status must be 200..=599",
                        )
                    }
                }
            }
            "set_cookie" => match HeaderValue::from_bytes(&value) {
                Ok(v) => cookies.push(v),
                Err(_) => {
                    return html_page(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "invalid set_cookie value",
                    )
                }
            },
            _ => {}
        }
    }
    let headers: Vec<serde_json::Value> = parts
        .headers
        .iter()
        .map(|(n, v)| json!([n.as_str(), String::from_utf8_lossy(v.as_bytes())]))
        .collect();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| parts.uri.to_string());
    let mut r = json(
        status,
        &json!({
            "method": parts.method.as_str(),
            "path": path,
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_len": body.len(),
            "connection": conn.id,
        }),
    );
    for c in cookies {
        r.headers_mut().append(SET_COOKIE, c);
    }
    // The body repeats the request, cookies included: the test suite's secrets audit knows by
    // this that what it reads there is Qlik's answer, not something the guard wrote.
    r.headers_mut()
        .insert("x-sim-reflects", HeaderValue::from_static("request"));
    r
}
