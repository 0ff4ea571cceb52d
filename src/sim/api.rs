//! The QPS REST API listener of the simulated node (port 4243 in real Qlik).
//!
//! This is what Qlik-Cli, Ctrl-Q and the guard use to see whose a session is and to end
//! sessions. Like the real API it insists on the anti-forgery key (`Xrfkey` query parameter
//! equal to the `X-Qlik-Xrfkey` header) and is served over https when the configuration asks
//! for it, leaving client-certificate checking to the supplied rustls configuration. Like
//! HTTP.sys in front of the real one it refuses a request without exactly one valid Host
//! (400), and routes on the canonical path (escapes decoded, `..` resolved), so a value that
//! smuggles path segments in is routed where a real QPS would route it. Every request is
//! recorded, so tests can see which paths reached the API.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;

use super::http::{bad_host, canonical_path, host_problem, json, query_param, response, Body};
use super::sessions::{CreateError, EndReason, SessionInfo, User};
use super::{Shared, SimRequest};

const MAX_BODY: usize = 1024 * 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn accept(shared: Arc<Shared>, listener: TcpListener) {
    let tls = shared
        .config
        .api_tls
        .clone()
        .map(tokio_rustls::TlsAcceptor::from);
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let s = shared.clone();
        let tls = tls.clone();
        shared.tracker.spawn(async move {
            match tls {
                None => serve(s, TokioIo::new(stream)).await,
                Some(acceptor) => {
                    if let Ok(Ok(tls_stream)) =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        serve(s, TokioIo::new(tls_stream)).await;
                    }
                }
            }
        });
    }
}

async fn serve<I>(shared: Arc<Shared>, io: I)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let s = shared.clone();
        async move { Ok::<_, Infallible>(handle(&s, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(io, svc)
        .await;
}

/// `Xrfkey` must be exactly 16 characters a-zA-Z0-9 and equal the `X-Qlik-Xrfkey` header.
fn xrfkey_ok(parts: &http::request::Parts) -> bool {
    let Some(q) = query_param(parts.uri.query(), "xrfkey") else {
        return false;
    };
    q.len() == 16
        && q.iter().all(u8::is_ascii_alphanumeric)
        && parts
            .headers
            .get("x-qlik-xrfkey")
            .is_some_and(|h| h.as_bytes() == q.as_slice())
}

fn not_found() -> Response<Body> {
    response(StatusCode::NOT_FOUND, "text/plain", "Not found\n")
}

fn bad_request(why: &str) -> Response<Body> {
    response(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n"))
}

fn session_json(s: &SessionInfo) -> Value {
    json!({
        "UserDirectory": s.user.dir,
        "UserId": s.user.id,
        "UserName": s.user.id,
        "Attributes": [],
        "SessionId": s.id,
    })
}

/// A string field under its PascalCase name or, as some documentation shows, camelCase.
fn field<'a>(v: &'a Value, pascal: &str) -> Option<&'a str> {
    let mut camel = pascal.to_string();
    if let Some(first) = camel.get_mut(0..1) {
        first.make_ascii_lowercase();
    }
    v.get(pascal)
        .or_else(|| v.get(&camel))
        .and_then(Value::as_str)
}

/// A session id must be usable as a cookie value.
fn valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| (0x21..0x7f).contains(&b) && !matches!(b, b'"' | b',' | b';' | b'\\'))
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body: Option<Bytes> = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .ok()
        .map(|c| c.to_bytes());
    shared.lock().record_api(SimRequest {
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| parts.uri.to_string()),
        version: format!("{:?}", parts.version),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: body.as_deref().unwrap_or_default().to_vec(),
    });
    if let Some(why) = host_problem(parts.version, &parts.headers) {
        return bad_host(why);
    }
    let Some(body) = body else {
        return bad_request("The request body could not be read.");
    };
    if !xrfkey_ok(&parts) {
        return response(
            StatusCode::FORBIDDEN,
            "text/plain",
            "XSRF prevention check failed. Possible XSRF discovered.\n",
        );
    }
    // Routed on the canonical path, as the QPS gets it from HTTP.sys: a session id that brings
    // `..` or `%2F` into the path is routed elsewhere, not looked up.
    let path = canonical_path(parts.uri.path());
    let Some(rest) = path.strip_prefix("/qps/") else {
        return not_found();
    };
    let mut segs: Vec<String> = rest.split('/').map(str::to_string).collect();
    if segs.last().is_some_and(String::is_empty) {
        segs.pop();
    }
    let vps = &shared.config.virtual_proxies;
    let first = segs.first().map(String::as_str).unwrap_or("");
    let vp = if matches!(first, "session" | "user" | "ticket") {
        vps.iter().position(|v| v.prefix.is_empty())
    } else {
        let found = vps
            .iter()
            .position(|v| !v.prefix.is_empty() && v.prefix == first);
        if found.is_some() {
            segs.remove(0);
        }
        found
    };
    let Some(vp) = vp else {
        return not_found();
    };
    let now = Instant::now();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let m = &parts.method;
    match segs.as_slice() {
        ["session"] if m == Method::GET => {
            let list: Vec<Value> = shared
                .lock()
                .list(vp, None, now)
                .iter()
                .map(session_json)
                .collect();
            json(StatusCode::OK, &Value::Array(list))
        }
        ["session"] if m == Method::POST => add_session(shared, vp, &body, now),
        ["session", id] if m == Method::GET => match shared.lock().get(vp, id, now) {
            Some(s) => json(StatusCode::OK, &session_json(&s)),
            None => not_found(),
        },
        ["session", id] if m == Method::DELETE => {
            let mut st = shared.lock();
            match st.get(vp, id, now) {
                Some(_) => match st.end(id, EndReason::ClosedByApi) {
                    Some(s) => json(StatusCode::OK, &session_json(&s)),
                    None => not_found(),
                },
                None => not_found(),
            }
        }
        ["user", dir, id] if m == Method::GET || m == Method::DELETE => {
            let Some(user) = User::from_parts(dir, id) else {
                return bad_request("Invalid user.");
            };
            let mut st = shared.lock();
            let list = st.list(vp, Some(&user), now);
            if m == Method::DELETE {
                for s in &list {
                    st.end(&s.id, EndReason::ClosedByApi);
                }
            }
            json(
                StatusCode::OK,
                &Value::Array(list.iter().map(session_json).collect()),
            )
        }
        ["ticket"] if m == Method::POST => add_ticket(shared, vp, &body, now),
        ["session"] | ["session", _] | ["user", _, _] | ["ticket"] => response(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "Method not allowed\n",
        ),
        _ => not_found(),
    }
}

/// The user named by a JSON body; the error is the reason for a 400.
fn parse_user(body: &[u8]) -> Result<(Value, User), &'static str> {
    let v: Value = serde_json::from_slice(body).map_err(|_| "The body must be JSON.")?;
    let user = match (field(&v, "UserDirectory"), field(&v, "UserId")) {
        (Some(d), Some(i)) => User::from_parts(d, i),
        _ => None,
    };
    match user {
        Some(u) => Ok((v, u)),
        None => Err("UserDirectory and UserId are required."),
    }
}

/// `POST /qps/<vp/>session`: adds a session for a user (what a QPS session module does).
fn add_session(shared: &Shared, vp: usize, body: &[u8], now: Instant) -> Response<Body> {
    let (v, user) = match parse_user(body) {
        Ok(x) => x,
        Err(why) => return bad_request(why),
    };
    let id = match field(&v, "SessionId") {
        Some(id) if valid_session_id(id) => Some(id.to_string()),
        Some(_) => return bad_request("Invalid SessionId."),
        None => None,
    };
    let created = shared.lock().create(vp, &user, id, now);
    match created {
        Ok(s) => json(StatusCode::CREATED, &session_json(&s)),
        Err(CreateError::Limit) => response(
            StatusCode::FORBIDDEN,
            "text/plain",
            format!("{}\n", super::proxy::LIMIT_SENTENCE),
        ),
        Err(CreateError::Duplicate) => {
            response(StatusCode::CONFLICT, "text/plain", "Session exists\n")
        }
    }
}

/// `POST /qps/<vp/>ticket`: a one-time ticket for the user, redeemable within a minute on the
/// same virtual proxy.
fn add_ticket(shared: &Shared, vp: usize, body: &[u8], now: Instant) -> Response<Body> {
    let user = match parse_user(body) {
        Ok((_, u)) => u,
        Err(why) => return bad_request(why),
    };
    let ticket = shared.lock().issue_ticket(vp, &user, now);
    json(
        StatusCode::CREATED,
        &json!({
            "Ticket": ticket,
            "UserDirectory": user.dir,
            "UserId": user.id,
            "Attributes": [],
            "TargetUri": null,
        }),
    )
}
