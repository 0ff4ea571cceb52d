//! The admin listener: health, the session table, ending sessions, events and metrics, on a
//! port of its own (loopback by default), so a flood of client traffic never starves the
//! admin's view of it.
//!
//! | call | what |
//! | --- | --- |
//! | `GET /healthz` | the guard runs |
//! | `GET /readyz` | a Qlik node accepts connections (503 otherwise); names a failing QPS REST API |
//! | `GET /sessions[?user=DIR%5Cid]` | users and their live sessions (JSON) |
//! | `DELETE /sessions/<hash>` | end one session in Qlik |
//! | `DELETE /users/<DIR%5Cid>/sessions` | end all of a user's sessions |
//! | `GET /events[?kind=&user=&since=&wait=]` | recent cookie and session events (JSON) |
//! | `GET /metrics` | Prometheus text |
//! | `POST /device-key/rotate` | a new key for the device cookies (every browser gets a new one) |
//!
//! Authentication: a bearer token read from `admin.token_file`. It is required for every call
//! from a peer that is not on loopback (and a listener off loopback refuses to start without
//! one), and for every call that changes something, whoever sends it.
//!
//! The Host header (or an absolute request target's authority) must name this listener: a
//! localhost name, a loopback address or the address the connection came in on, or a name in
//! `admin.allowed_hosts`; anything else gets 421. A loopback peer is not proof of a local
//! admin: a page on another site can point its own DNS name at 127.0.0.1 (DNS rebinding) and
//! have the browser read the admin API as "same origin", but its requests then carry that
//! site's name as Host.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::diagnostics::events::Kind;
use crate::proxy::Proxy;
use crate::session::identity::User;
use crate::session::table::Session;

/// What the admin handlers can see.
#[derive(Clone)]
pub struct State {
    pub proxy: Arc<Proxy>,
    /// The bearer token (from `admin.token_file`; a reload reads it again).
    pub token: Arc<std::sync::RwLock<Option<Arc<str>>>>,
    /// Host names besides localhost names and the listener's own address
    /// (`admin.allowed_hosts`).
    pub allowed_hosts: Arc<[String]>,
    /// For `POST /reload` (weak: the admin API must not keep a stopped guard alive).
    pub control: std::sync::Weak<dyn Reload>,
}

/// What the admin API can ask of the running guard beyond the proxy's state: a reload (the
/// server's `Control` does it; the admin API does not depend on the server).
pub trait Reload: Send + Sync {
    /// Reads the config file again and applies it: `Ok` says what changed, `Err` why the new
    /// config was refused (the running one stays).
    fn reload(&self) -> Result<String, String>;
}

/// Serves the admin API until `stop` is cancelled.
pub async fn serve(listener: Arc<TcpListener>, state: State, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req, peer, local).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

async fn route(
    state: &State,
    req: Request<Incoming>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    if !host_allowed(host.as_deref(), local, &state.allowed_hosts) {
        let mut r = json(
            StatusCode::MISDIRECTED_REQUEST,
            json!({"error": format!(
                "the Host {} is not this admin listener: use localhost, {} or a name listed in admin.allowed_hosts",
                host.as_deref().map(|h| format!("`{h}`")).unwrap_or_else(|| "(none)".into()),
                local,
            )}),
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let mutating = method != Method::GET && method != Method::HEAD;
    if token_needed(&method, peer) {
        let token = state
            .token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match &token {
            None => {
                return json(
                    StatusCode::FORBIDDEN,
                    json!({"error": if mutating {
                        "changes need a bearer token: set admin.token_file and send Authorization: Bearer <token>"
                    } else {
                        "calls from off loopback need a bearer token: set admin.token_file and send Authorization: Bearer <token>"
                    }}),
                )
            }
            Some(t) if !bearer_matches(req.headers(), t) => {
                let mut r = json(
                    StatusCode::UNAUTHORIZED,
                    json!({"error": "a valid Authorization: Bearer <token> (admin.token_file) is needed"}),
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"qsguard\""),
                );
                return r;
            }
            Some(_) => {}
        }
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => json(
            StatusCode::OK,
            json!({"status": "ok", "pid": std::process::id(), "websockets_open": state.proxy.open_tunnels()}),
        ),
        (&Method::POST, ["reload"]) => reload(state).await,
        (&Method::POST, ["device-key", "rotate"]) => rotate_device_key(state),
        (&Method::GET, ["readyz"]) => readyz(state).await,
        (&Method::GET, ["sessions"]) => sessions(state, &query),
        (&Method::DELETE, ["sessions", hash]) => end_one(state, hash).await,
        (&Method::DELETE, ["users", user, "sessions"]) => end_user(state, user).await,
        (&Method::GET, ["events"]) => events(state, &query).await,
        (&Method::GET, ["metrics"]) => metrics(state),
        (&Method::GET, ["upstreams"]) => upstreams(state),
        (&Method::POST, ["upstreams", name, action @ ("drain" | "undrain")]) => {
            drain(state, name, *action == "drain")
        }
        (
            _,
            ["healthz" | "readyz" | "sessions" | "events" | "metrics" | "upstreams" | "reload"],
        )
        | (_, ["sessions", _])
        | (_, ["device-key", "rotate"])
        | (_, ["users", _, "sessions"]) => json(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": format!("{method} is not allowed on {path}")}),
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            json!({"error": "no such admin endpoint", "endpoints": [
                "GET /healthz", "GET /readyz", "GET /sessions?user=DIR%5Cid",
                "DELETE /sessions/<hash>", "DELETE /users/<DIR%5Cid>/sessions",
                "GET /events?kind=&user=&since=&wait=", "GET /metrics", "GET /upstreams",
                "POST /upstreams/<name>/drain", "POST /upstreams/<name>/undrain", "POST /reload",
                "POST /device-key/rotate"]}),
        ),
    }
}

/// A call needs the token when it changes something, or when its peer is not on loopback:
/// the peer, not the listener, since a listener on 0.0.0.0 serves both.
fn token_needed(method: &Method, peer: SocketAddr) -> bool {
    let reads = method == Method::GET || method == Method::HEAD;
    !reads || !peer.ip().to_canonical().is_loopback()
}

/// Whether `host` (a Host header or a target's authority) names this admin listener. The
/// port is not compared: DNS rebinding is defeated by the name alone (an attacker controls
/// the name its page uses, and the browser sends it), while an SSH tunnel or a port mapping
/// legitimately changes the port.
fn host_allowed(host: Option<&str>, local: SocketAddr, allowed: &[String]) -> bool {
    let Some(host) = host else {
        return false;
    };
    let name = host_name(host);
    if name.is_empty() {
        return false;
    }
    if name == "localhost" || name.ends_with(".localhost") {
        // RFC 6761: always the loopback, never resolved through DNS.
        return true;
    }
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip == local.ip().to_canonical() {
            return true;
        }
    }
    allowed.iter().any(|a| host_name(a) == name)
}

/// The name part of a Host value, lower-case, without port, brackets or a final dot.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => match host.rsplit_once(':') {
            Some((n, port)) if port.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => host,
        },
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Constant-time comparison of the presented bearer token.
fn bearer_matches(headers: &http::HeaderMap, token: &str) -> bool {
    let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some(given) = v.strip_prefix("Bearer ").map(str::trim) else {
        return false;
    };
    let (a, b) = (given.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(v) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A new device-cookie key: every browser's device cookie is replaced on its next request
/// (after a suspected leak of the key file, or as a routine).
fn rotate_device_key(state: &State) -> Response<Full<Bytes>> {
    let Some(g) = &state.proxy.sessions else {
        return json(
            StatusCode::CONFLICT,
            json!({"error": "the session guard is off (sessions.guard = false): there is no device key"}),
        );
    };
    match g.device_keys.rotate() {
        Ok(()) => {
            tracing::warn!("the device-cookie key was rotated: every browser gets a new device cookie on its next request");
            json(
                StatusCode::OK,
                json!({"rotated": true, "kept_in": g.device_keys.file().map(|f| f.display().to_string())}),
            )
        }
        Err(e) => json(StatusCode::INTERNAL_SERVER_ERROR, json!({"error": e})),
    }
}

/// Ready while a Qlik node accepts connections. A failing QPS REST API does not make the
/// guard unready (it still proxies, and falls back to the Personal API), so it is named in
/// the body (`qps_api`: `ok`, `not configured` or `failing since <time>: <node>: <reason>`)
/// for an admin and `qsguard doctor` to see, not in the status.
async fn readyz(state: &State) -> Response<Full<Bytes>> {
    let mut up = Vec::new();
    for node in state.proxy.upstreams().nodes() {
        let ok = matches!(
            tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect((node.host.as_str(), node.port))
            )
            .await,
            Ok(Ok(_))
        );
        up.push(json!({"upstream": node.name, "reachable": ok}));
    }
    let any = up.iter().any(|u| u["reachable"] == true);
    let (qps_api, failing) = match state.proxy.sessions() {
        Some(g) => (
            g.qps_health.summary(),
            g.qps_health
                .failing()
                .iter()
                .map(|f| {
                    json!({
                        "upstream": f.node,
                        "operation": f.operation.as_str(),
                        "since": humantime::format_rfc3339_seconds(f.since).to_string(),
                        "reason": f.reason,
                    })
                })
                .collect::<Vec<_>>(),
        ),
        None => ("not used (sessions.guard = false)".to_string(), Vec::new()),
    };
    let cluster = cluster_json(state);
    let degraded = cluster["store"] != "ok" && cluster["store"] != "not a pair";
    json(
        if any {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        json!({"ready": any, "degraded": degraded, "upstreams": up, "qps_api": qps_api, "qps_api_failing": failing, "cluster": cluster}),
    )
}

/// The pair's store as `/readyz` and `/sessions` show it. A store that does not answer makes
/// the guard degraded, not unready: it serves from its own table (a balancer that took it out
/// would leave the other guard alone with every user).
fn cluster_json(state: &State) -> serde_json::Value {
    match state.proxy.sessions().and_then(|g| g.cluster()) {
        None => json!({"store": "not a pair"}),
        Some(c) => {
            let store = match c.down_since() {
                None => "ok".to_string(),
                Some((since, why)) => format!(
                    "unreachable since {}: {why}",
                    humantime::format_rfc3339_seconds(since)
                ),
            };
            json!({
                "store": store,
                "guard": c.name(),
                "key_prefix": c.key_prefix(),
                "shows": "the limit is counted for the whole pair in the store; /sessions, /events and /metrics show this guard's own view",
            })
        }
    }
}

fn session_json(state: &State, s: &Session) -> serde_json::Value {
    let Some(g) = state.proxy.sessions() else {
        return json!({});
    };
    let t = &g.table;
    let meta = s.meta();
    let created = s
        .created
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let last = t
        .wall(s.last_active_ms())
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    json!({
        "virtual_proxy": g.virtual_proxies()[s.vp].prefix,
        "session": &*s.hash,
        "user": meta.owner.as_ref().map(|u| u.to_string()),
        "devices": meta.devices.iter().map(|d| g.device_hash(*d)).collect::<Vec<_>>(),
        "node": &*s.node,
        "created": created,
        "last_active": last,
        "websockets": s.websockets(),
        "apps": meta.apps,
        "state": s.state().as_str(),
    })
}

fn sessions(state: &State, query: &str) -> Response<Full<Bytes>> {
    let Some(g) = state.proxy.sessions() else {
        return json(
            StatusCode::NOT_FOUND,
            json!({"error": "the session guard is off (sessions.guard = false)"}),
        );
    };
    let filter = query_param(query, "user").map(|u| u.to_lowercase());
    let users: Vec<serde_json::Value> = g
        .table
        .users()
        .into_iter()
        .filter(|(u, _)| filter.as_deref().is_none_or(|f| *u.key == *f))
        .map(|(u, list)| {
            json!({
                "user": u.to_string(),
                "live": list.len(),
                "at_limit": list.len() >= g.max_per_user(),
                "sessions": list.iter().map(|s| session_json(state, s)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json(
        StatusCode::OK,
        json!({ "limit": g.max_per_user(), "users": users, "cluster": cluster_json(state) }),
    )
}

async fn end_one(state: &State, hash: &str) -> Response<Full<Bytes>> {
    let Some(g) = state.proxy.sessions() else {
        return json(
            StatusCode::NOT_FOUND,
            json!({"error": "the session guard is off"}),
        );
    };
    let Some(s) = g.table.find_by_hash(hash) else {
        return json(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no session {hash}")}),
        );
    };
    match g.end_by_admin(&s).await {
        Ok(()) => json(StatusCode::OK, json!({"ended": [&*s.hash]})),
        Err(e) => json(
            StatusCode::BAD_GATEWAY,
            json!({"error": e.to_string(), "session": &*s.hash}),
        ),
    }
}

async fn end_user(state: &State, user: &str) -> Response<Full<Bytes>> {
    let Some(g) = state.proxy.sessions() else {
        return json(
            StatusCode::NOT_FOUND,
            json!({"error": "the session guard is off"}),
        );
    };
    let name = percent_decode(user);
    let Ok(u) = User::parse(name.as_bytes()) else {
        return json(
            StatusCode::BAD_REQUEST,
            json!({"error": "the user is DIRECTORY\\userid, URL-encoded (DIR%5Cid)"}),
        );
    };
    let mut ended = Vec::new();
    let mut failed = Vec::new();
    for s in g.table.user_sessions(&u.key) {
        match g.end_by_admin(&s).await {
            Ok(()) => ended.push(s.hash.to_string()),
            Err(e) => failed.push(json!({"session": &*s.hash, "error": e.to_string()})),
        }
    }
    let status = if failed.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    json(
        status,
        json!({"user": u.to_string(), "ended": ended, "failed": failed}),
    )
}

async fn events(state: &State, query: &str) -> Response<Full<Bytes>> {
    let ev = &state.proxy.diagnostics.events;
    let kind = match query_param(query, "kind") {
        Some(k) => match Kind::parse(&k) {
            Some(k) => Some(k),
            None => {
                return json(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("unknown kind {k}"),
                    "kinds": Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>()}),
                )
            }
        },
        None => None,
    };
    let user = query_param(query, "user");
    let since: u64 = query_param(query, "since")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let wait: u64 = query_param(query, "wait")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
        .min(60);
    let mut found = ev.query(since, kind, user.as_deref());
    if found.is_empty() && wait > 0 {
        // A long poll: `qsguard events --follow`.
        let notified = ev.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        found = ev.query(since, kind, user.as_deref());
        if found.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(wait), notified).await;
            found = ev.query(since, kind, user.as_deref());
        }
    }
    json(
        StatusCode::OK,
        json!({"last": ev.last_id(), "events": found, "cluster": cluster_json(state)}),
    )
}

fn metrics(state: &State) -> Response<Full<Bytes>> {
    let d = &state.proxy.diagnostics;
    let (live, at_limit) = match state.proxy.sessions() {
        Some(g) => {
            let users = g.table.users();
            let live: usize = users.iter().map(|(_, s)| s.len()).sum();
            let at = users
                .iter()
                .filter(|(_, s)| s.len() >= g.max_per_user())
                .count();
            (live as i64, at as i64)
        }
        None => (0, 0),
    };
    let nodes: Vec<crate::diagnostics::metrics::NodeView> = state
        .proxy
        .upstreams()
        .nodes()
        .iter()
        .map(|n| crate::diagnostics::metrics::NodeView {
            name: n.name.clone(),
            up: n.is_up(),
            live_sessions: state
                .proxy
                .sessions()
                .map(|g| g.node_load(&n.name))
                .unwrap_or(0) as i64,
            in_flight: n.in_flight(),
        })
        .collect();
    if let Some(g) = state.proxy.sessions() {
        d.metrics.qps_api_failures(&g.qps_health.failure_counts());
        if let Some(c) = g.cluster() {
            use std::sync::atomic::Ordering::Relaxed;
            d.metrics
                .cluster(c.is_up(), c.calls.load(Relaxed), c.errors.load(Relaxed));
        }
    }
    let text = d.metrics.render(
        &d.events,
        live,
        at_limit,
        state.proxy.open_tunnels() as i64,
        &nodes,
    );
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    r
}

fn upstreams(state: &State) -> Response<Full<Bytes>> {
    let nodes: Vec<serde_json::Value> = state
        .proxy
        .upstreams()
        .nodes()
        .iter()
        .map(|n| {
            let check = n.last_check().map(|(t, what)| {
                json!({
                    "at": t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                    "result": what,
                })
            });
            json!({
                "name": n.name,
                "state": if !n.is_up() { "down" } else if n.is_retired() { "retired" } else if n.is_draining() { "draining" } else { "up" },
                "weight": n.weight(),
                "live_sessions": state.proxy.sessions().map(|g| g.node_load(&n.name)).unwrap_or(0),
                "in_flight": n.in_flight(),
                "idle_connections": state.proxy.upstreams().pool.idle_count(n),
                "last_check": check,
            })
        })
        .collect();
    json(StatusCode::OK, json!({ "upstreams": nodes }))
}

/// Draining a node: no new sessions; its existing sessions stay until they end (for patching
/// a Qlik node without kicking users out).
fn drain(state: &State, name: &str, on: bool) -> Response<Full<Bytes>> {
    let name = percent_decode(name);
    match state.proxy.upstreams().by_name(&name) {
        Some(n) => {
            n.set_draining(on);
            tracing::warn!(upstream = %name, draining = on, "upstream drain changed by an admin");
            json(StatusCode::OK, json!({"upstream": name, "draining": on}))
        }
        None => json(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no upstream named {name}")}),
        ),
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// `POST /reload`: what SIGHUP does, with the outcome in the answer. A refused config is a
/// 422 naming the key and the reason; the running config stays.
async fn reload(state: &State) -> Response<Full<Bytes>> {
    let Some(control) = state.control.upgrade() else {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "the guard is stopping"}),
        );
    };
    // Reading files and binding: off the async workers.
    match tokio::task::spawn_blocking(move || control.reload()).await {
        Ok(Ok(changes)) => {
            tracing::info!("config reloaded (admin API): {changes}");
            json(
                StatusCode::OK,
                json!({"reloaded": true, "changes": changes}),
            )
        }
        Ok(Err(e)) => {
            tracing::error!("reload refused, the running config stays: {e}");
            json(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"reloaded": false, "error": e}),
            )
        }
        Err(e) => json(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"reloaded": false, "error": e.to_string()}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        let mut h = http::HeaderMap::new();
        assert!(!bearer_matches(&h, "s3cret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cret"),
        );
        assert!(bearer_matches(&h, "s3cret"));
        assert!(!bearer_matches(&h, "s3cre"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic s3cret"),
        );
        assert!(!bearer_matches(&h, "s3cret"));
    }

    #[test]
    fn tokens_are_needed_off_loopback_and_for_changes() {
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 40000);
        assert!(!token_needed(&Method::GET, at("127.0.0.1")));
        assert!(!token_needed(&Method::HEAD, at("::1")));
        assert!(!token_needed(&Method::GET, at("::ffff:127.0.0.1")));
        assert!(token_needed(&Method::GET, at("10.0.0.7")));
        assert!(token_needed(&Method::GET, at("::ffff:10.0.0.7")));
        assert!(token_needed(&Method::POST, at("127.0.0.1")));
        assert!(token_needed(&Method::DELETE, at("127.0.0.1")));
    }

    #[test]
    fn admin_hosts() {
        let local: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        let wide: SocketAddr = "10.1.2.3:9090".parse().unwrap();
        let allowed = ["qsguard-admin.corp.example".to_string()];
        for ok in [
            "localhost",
            "localhost:9090",
            "LOCALHOST.:1234",
            "app.localhost",
            "127.0.0.1:9090",
            "127.0.0.2",
            "[::1]:9090",
            "qsguard-admin.corp.example",
            "QSGUARD-ADMIN.corp.example:443",
        ] {
            assert!(host_allowed(Some(ok), local, &allowed), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:9090",
            "localhost.evil.example",
            "10.1.2.3:9090",
            "",
            "admin",
        ] {
            assert!(!host_allowed(Some(bad), local, &allowed), "{bad}");
        }
        assert!(!host_allowed(None, local, &allowed));
        assert!(
            host_allowed(Some("10.1.2.3:9090"), wide, &[]),
            "the address the connection came in on"
        );
    }

    #[test]
    fn query_params() {
        assert_eq!(
            query_param("user=CORP%5Cjane&x=1", "user").as_deref(),
            Some("CORP\\jane")
        );
        assert_eq!(query_param("since=5", "since").as_deref(), Some("5"));
        assert_eq!(query_param("", "user"), None);
    }
}
