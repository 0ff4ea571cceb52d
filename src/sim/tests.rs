//! End-to-end tests of the simulator over real loopback listeners (127.0.0.1, port 0), so the
//! behaviour the guard's tests rely on is pinned down at the HTTP level, not just in the state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::http::{HeaderMap, Request, StatusCode};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::*;

const LIMIT: &str =
    "You cannot access Qlik Sense because you have too many sessions active in parallel";
const CENTRAL_COOKIE: &str = "X-Qlik-Session-HTTP";
const HDR_COOKIE: &str = "X-Qlik-Session-hdr-HTTP";
const XRF: &str = "abcdefghij012345";

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn sim(config: SimConfig) -> Simulator {
    Simulator::start(config, local())
        .await
        .expect("simulator starts")
}

#[derive(Debug)]
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().expect("ascii").to_string())
            .collect()
    }

    /// The value of the session cookie set by this response.
    fn cookie_value(&self, name: &str) -> String {
        let prefix = format!("{name}=");
        let sc = self
            .set_cookies()
            .into_iter()
            .find(|c| c.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {name} cookie in {self:?}"));
        sc[prefix.len()..]
            .split(';')
            .next()
            .unwrap_or("")
            .to_string()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("json body")
    }
}

async fn send_on<I>(
    io: I,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut sender = open(io).await;
    send_with(&mut sender, host, method, path, headers, body).await
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A kept-alive HTTP/1.1 connection, for exchanges that must share one (NTLM).
async fn open<I>(io: I) -> Sender
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

async fn send_with(
    sender: &mut Sender,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    sender.ready().await.expect("connection ready");
    let resp = sender
        .send_request(
            b.body(Full::new(Bytes::from(body.to_string())))
                .expect("request"),
        )
        .await
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    let stream = TcpStream::connect(addr).await.expect("connect");
    send_on(stream, &addr.to_string(), method, path, headers, body).await
}

async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    send(addr, "GET", path, headers, "").await
}

fn api_path(path: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}Xrfkey={XRF}")
}

async fn api(s: &Simulator, method: &str, path: &str, body: &str) -> Resp {
    send(
        s.api_addr(),
        method,
        &api_path(path),
        &[("x-qlik-xrfkey", XRF), ("content-type", "application/json")],
        body,
    )
    .await
}

/// The browser's first leg on `sender`: its Type 1, answered by a `401` with the challenge.
async fn type1(sender: &mut Sender, addr: SocketAddr, auth: &str, b: &ntlm::Browser) -> Resp {
    let r = send_with(
        sender,
        &addr.to_string(),
        "GET",
        auth,
        &[("authorization", &b.negotiate())],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    r
}

/// The browser's Type 3 answering the challenge of `r`.
fn type3(r: &Resp, b: &ntlm::Browser) -> String {
    b.authenticate(
        r.headers
            .get_all("www-authenticate")
            .iter()
            .map(|v| v.as_bytes()),
    )
    .expect("a challenge in the 401")
}

/// The whole NTLM handshake at `auth` on one connection; Qlik's answer to the Type 3.
async fn ntlm_handshake(addr: SocketAddr, auth: &str, user: &str, scheme: ntlm::Scheme) -> Resp {
    let b = ntlm::Browser::new(user, scheme);
    let mut c = open(TcpStream::connect(addr).await.expect("connect")).await;
    let r = type1(&mut c, addr, auth, &b).await;
    let a3 = type3(&r, &b);
    send_with(
        &mut c,
        &addr.to_string(),
        "GET",
        auth,
        &[("authorization", &a3)],
        "",
    )
    .await
}

/// The whole Windows dance for the central proxy as `user`; returns the session cookie value.
async fn windows_login(addr: SocketAddr, user: &str) -> String {
    let r = get(addr, "/hub/stream/x?a=1", &[]).await;
    assert_eq!(r.status, StatusCode::FOUND);
    let auth = r.header("location").to_string();
    assert!(
        auth.starts_with("/internal_windows_authentication/?targetId="),
        "{auth}"
    );
    let r = ntlm_handshake(addr, &auth, user, ntlm::Scheme::Ntlm).await;
    assert_eq!(r.status, StatusCode::FOUND, "{r:?}");
    let ticketed = r.header("location").to_string();
    assert!(
        ticketed.starts_with("/hub/stream/x?a=1&qlikTicket="),
        "{ticketed}"
    );
    let r = get(addr, &ticketed, &[]).await;
    assert_eq!(r.status, StatusCode::FOUND, "{r:?}");
    assert_eq!(r.header("location"), "/hub/stream/x?a=1");
    r.cookie_value(CENTRAL_COOKIE)
}

fn cookie(name: &str, value: &str) -> String {
    format!("{name}={value}")
}

/// Polls a condition for up to a second (socket tasks finish asynchronously).
async fn eventually(mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(f(), "condition not reached within 1 s");
}

#[tokio::test]
async fn windows_dance_end_to_end() {
    let s = sim(SimConfig::default()).await;
    let addr = s.addr();
    let r = get(addr, "/hub/", &[]).await;
    let auth = r.header("location").to_string();
    let r = ntlm_handshake(addr, &auth, "CORP\\bob", ntlm::Scheme::Negotiate).await;
    assert_eq!(r.status, StatusCode::FOUND);
    let ticketed = r.header("location").to_string();
    assert!(ticketed.starts_with("/hub/?qlikTicket="), "{ticketed}");
    // The target id is single use.
    assert_eq!(get(addr, &auth, &[]).await.status, StatusCode::FORBIDDEN);

    let r = get(addr, &ticketed, &[]).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(r.header("location"), "/hub/");
    let sc = r.set_cookies();
    assert_eq!(sc.len(), 1);
    let id = r.cookie_value(CENTRAL_COOKIE);
    assert_eq!(
        sc[0],
        format!("X-Qlik-Session-HTTP={id}; Path=/; HttpOnly; SameSite=Lax")
    );
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4");
    // The ticket is single use too.
    assert_eq!(
        get(addr, &ticketed, &[]).await.status,
        StatusCode::FORBIDDEN
    );

    let r = get(addr, "/hub/", &[("cookie", &cookie(CENTRAL_COOKIE, &id))]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("content-type").starts_with("text/html"));
    assert!(r.body.contains(r#"<p id="path">/hub/</p>"#), "{}", r.body);
    assert!(r.body.contains("CORP\\bob"));
    assert!(r.body.contains("app/engineData"));
    assert!(r.set_cookies().is_empty());

    // The dance keeps the original path and query.
    let id2 = windows_login(addr, "DEMO\\alice").await;
    assert_eq!(s.session_ids("demo\\ALICE"), vec![id2]);
    let c = s.counters();
    assert_eq!(
        (
            c.sessions_created,
            c.tickets_redeemed,
            c.unknown_cookie_requests,
            c.ntlm_handshakes,
            c.ntlm_failures()
        ),
        (2, 2, 0, 2, 0)
    );
    assert_eq!(s.live_sessions("CORP\\bob"), 1);
}

#[tokio::test]
async fn windows_auth_is_a_connection_bound_ntlm_handshake() {
    let s = sim(SimConfig::default()).await;
    let addr = s.addr();
    let r = get(addr, "/qmc/", &[]).await;
    let auth = r.header("location").to_string();
    // No credentials: both schemes on offer, and nothing else.
    let r = get(addr, &auth, &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let offered: Vec<_> = r.headers.get_all("www-authenticate").iter().collect();
    assert_eq!(offered, ["Negotiate", "NTLM"]);
    // The old header shortcut names nobody.
    let r = get(addr, &auth, &[("x-sim-user", "D\\u")]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let jane = ntlm::Browser::new("CORP\\jane", ntlm::Scheme::Ntlm);
    // Type 1 on one connection, Type 3 on another: no challenge there.
    let mut c1 = open(TcpStream::connect(addr).await.expect("connect")).await;
    let r = type1(&mut c1, addr, &auth, &jane).await;
    let a3 = type3(&r, &jane);
    let r = get(addr, &auth, &[("authorization", &a3)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.counters().ntlm_no_challenge, 1);
    // ...and the first connection's challenge is still waiting for it.
    let r = send_with(
        &mut c1,
        &addr.to_string(),
        "GET",
        &auth,
        &[("authorization", &a3)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::FOUND, "{r:?}");
    // A challenge is good for one answer.
    let r2 = send_with(
        &mut c1,
        &addr.to_string(),
        "GET",
        &auth,
        &[("authorization", &a3)],
        "",
    )
    .await;
    assert_eq!(
        r2.status,
        StatusCode::FORBIDDEN,
        "the target was used: {r2:?}"
    );

    let r = get(addr, "/qmc/", &[]).await;
    let auth = r.header("location").to_string();
    // A Type 3 answering another connection's challenge does not fit this one.
    let mut c2 = open(TcpStream::connect(addr).await.expect("connect")).await;
    let mut c3 = open(TcpStream::connect(addr).await.expect("connect")).await;
    let bob = ntlm::Browser::new("CORP\\bob", ntlm::Scheme::Ntlm);
    let r_bob = type1(&mut c2, addr, &auth, &bob).await;
    type1(&mut c3, addr, &auth, &jane).await;
    let a3 = type3(&r_bob, &bob);
    let r = send_with(
        &mut c3,
        &addr.to_string(),
        "GET",
        &auth,
        &[("authorization", &a3)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.counters().ntlm_bad_answer, 1);
    // A Type 3 whose user name was changed on the way does not fit either.
    let r = type1(&mut c2, addr, &auth, &bob).await;
    let a3 = type3(&r, &bob);
    let forged = {
        let token = a3.strip_prefix("NTLM ").expect("NTLM");
        let mut raw = ntlm::b64_decode(token.as_bytes()).expect("base64");
        let at = raw
            .windows(6)
            .position(|w| w == [b'b', 0, b'o', 0, b'b', 0])
            .expect("the user name");
        raw[at] = b'r';
        format!("NTLM {}", ntlm::b64_encode(&raw))
    };
    let r = send_with(
        &mut c2,
        &addr.to_string(),
        "GET",
        &auth,
        &[("authorization", &forged)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.counters().ntlm_bad_answer, 2);
    // Negotiate (NTLM in SPNEGO) completes like NTLM.
    let r = ntlm_handshake(addr, &auth, "CORP\\bob", ntlm::Scheme::Negotiate).await;
    assert_eq!(r.status, StatusCode::FOUND, "{r:?}");
    let c = s.counters();
    assert_eq!((c.ntlm_challenges, c.ntlm_handshakes), (5, 2));
    assert_eq!(c.tickets_redeemed, 0);

    // Unknown target ids and tickets are refused with an HTML page.
    let r = get(
        s.addr(),
        "/internal_windows_authentication/?targetId=nope",
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.header("content-type").starts_with("text/html"));
    assert_eq!(
        get(s.addr(), "/hub/?qlikTicket=bogus", &[]).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(s.addr(), "/hub/", &[("x-qlik-ticket", "bogus")])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(s.counters().sessions_created, 0);
}

#[tokio::test]
async fn limit_is_counted_across_virtual_proxies() {
    let s = sim(SimConfig::default()).await;
    let addr = s.addr();
    windows_login(addr, "DEMO\\alice").await; // DEMO\alice
    windows_login(addr, "demo\\Alice").await;
    for _ in 0..3 {
        let r = get(addr, "/hdr/hub/", &[("hdr-usr", "DEMO\\ALICE")]).await;
        assert_eq!(r.status, StatusCode::OK);
        r.cookie_value(HDR_COOKIE);
    }
    assert_eq!(s.live_sessions("DEMO\\alice"), 5);
    let r = get(addr, "/hdr/hub/", &[("hdr-usr", "DEMO\\alice")]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.header("content-type"), "text/html");
    assert!(r.body.contains(LIMIT), "{}", r.body);
    assert!(r.set_cookies().is_empty());
    let c = s.counters();
    assert_eq!((c.limit_refusals, c.sessions_created), (1, 5));
    // Another user is not affected.
    assert_eq!(
        get(addr, "/hdr/hub/", &[("hdr-usr", "DEMO\\bob")])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn unknown_cookie_is_counted_and_reauthenticates() {
    let s = sim(SimConfig::default()).await;
    let addr = s.addr();
    let bogus = cookie(HDR_COOKIE, "00000000-0000-4000-8000-000000000000");
    let r = get(
        addr,
        "/hdr/hub/",
        &[("hdr-usr", "D\\u"), ("cookie", &bogus)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let id = r.cookie_value(HDR_COOKIE);
    let c = s.counters();
    assert_eq!((c.unknown_cookie_requests, c.sessions_created), (1, 1));

    // A live session of another virtual proxy under this vp's name is not a session here.
    let central = windows_login(addr, "DEMO\\alice").await;
    let r = get(
        addr,
        "/hdr/hub/",
        &[
            ("hdr-usr", "D\\u"),
            ("cookie", &cookie(HDR_COOKIE, &central)),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_ne!(r.cookie_value(HDR_COOKIE), id);
    assert_eq!(s.counters().unknown_cookie_requests, 2);

    // Windows vp: a damaged cookie sends the browser through authentication again.
    let damaged = cookie(CENTRAL_COOKIE, &central[..35]);
    let r = get(addr, "/hub/", &[("cookie", &damaged)]).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert!(r
        .header("location")
        .starts_with("/internal_windows_authentication/"));
    assert_eq!(s.counters().unknown_cookie_requests, 3);
    // The cookie is read from every Cookie line.
    let r = get(
        addr,
        "/hub/",
        &[
            ("cookie", "a=b"),
            ("cookie", &cookie(CENTRAL_COOKIE, &central)),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn header_auth_creates_sessions_and_rejects_bad_headers() {
    let s = sim(SimConfig::default()).await;
    let addr = s.addr();
    let r = get(addr, "/hdr/sense/app/123", &[("hdr-usr", "CORP\\carol")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains(r#"<p id="path">/hdr/sense/app/123</p>"#));
    let id = r.cookie_value(HDR_COOKIE);
    assert_eq!(
        r.set_cookies()[0],
        format!("{HDR_COOKIE}={id}; Path=/; HttpOnly; SameSite=Lax")
    );
    let c = cookie(HDR_COOKIE, &id);
    let r = get(
        addr,
        "/hdr/hub/",
        &[("hdr-usr", "corp\\CAROL"), ("cookie", &c)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.set_cookies().is_empty());
    assert_eq!(s.counters().sessions_created, 1);

    for bad in ["", "CORP", "\\carol", "CORP\\", "A\\b\\c"] {
        let r = get(addr, "/hdr/hub/", &[("hdr-usr", bad), ("cookie", &c)]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        assert!(r.header("content-type").starts_with("text/html"));
    }
    assert_eq!(
        get(addr, "/hdr/hub/", &[("cookie", &c)]).await.status,
        StatusCode::UNAUTHORIZED
    );
    let two = get(
        addr,
        "/hdr/hub/",
        &[("hdr-usr", "CORP\\carol"), ("hdr-usr", "CORP\\carol")],
    )
    .await;
    assert_eq!(two.status, StatusCode::UNAUTHORIZED);
    // Non-ASCII bytes in the header.
    let mut raw = TcpStream::connect(addr).await.expect("connect");
    raw.write_all(b"GET /hdr/hub/ HTTP/1.1\r\nhost: x\r\nhdr-usr: CORP\\j\xc3\xbcrgen\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    raw.read_to_end(&mut out).await.expect("read");
    assert!(
        out.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // A live cookie of a different user: that session ends and the header's user gets a new one.
    let r = get(
        addr,
        "/hdr/hub/",
        &[("hdr-usr", "CORP\\dave"), ("cookie", &c)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_ne!(r.cookie_value(HDR_COOKIE), id);
    assert_eq!(s.live_sessions("CORP\\carol"), 0);
    assert_eq!(s.live_sessions("CORP\\dave"), 1);
}

async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, tokio_tungstenite::tungstenite::Error> {
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    for (n, v) in headers {
        req.headers_mut().append(
            ::http::HeaderName::from_bytes(n.as_bytes()).expect("name"),
            ::http::HeaderValue::from_str(v).expect("value"),
        );
    }
    let stream = TcpStream::connect(addr).await.expect("connect");
    tokio_tungstenite::client_async(req, stream)
        .await
        .map(|(ws, _)| ws)
}

async fn next_text(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> String {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("message in time")
            .expect("stream open")
            .expect("no error");
        match m {
            Message::Text(t) => return t.to_string(),
            Message::Close(_) => return "<close>".to_string(),
            _ => {}
        }
    }
}

async fn expect_closed(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) {
    let m = tokio::time::timeout(Duration::from_secs(2), ws.next())
        .await
        .expect("close in time");
    assert!(matches!(m, Some(Ok(Message::Close(_))) | None), "{m:?}");
    // Reading on sends our close reply (as a browser would) until the server hangs up.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {}
}

fn method_of(text: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(text).expect("json-rpc");
    v["method"].as_str().unwrap_or("").to_string()
}

#[tokio::test]
async fn inactivity_timeout_and_open_websocket_keepalive() {
    let mut cfg = SimConfig::default();
    cfg.virtual_proxies[1].inactivity_timeout = Some(Duration::from_millis(400));
    let s = sim(cfg).await;
    let addr = s.addr();
    let login = |user: &'static str| async move {
        get(addr, "/hdr/hub/", &[("hdr-usr", user)])
            .await
            .cookie_value(HDR_COOKIE)
    };
    let idle = login("D\\idle").await;
    let touched = login("D\\touched").await;
    let ws_user = login("D\\ws").await;
    let mut ws = ws_connect(
        addr,
        "/hdr/app/engineData",
        &[
            ("hdr-usr", "D\\ws"),
            ("cookie", &cookie(HDR_COOKIE, &ws_user)),
        ],
    )
    .await
    .expect("ws");
    assert_eq!(method_of(&next_text(&mut ws).await), "OnConnected");

    tokio::time::sleep(Duration::from_millis(250)).await;
    let r = get(
        addr,
        "/hdr/hub/",
        &[
            ("hdr-usr", "D\\touched"),
            ("cookie", &cookie(HDR_COOKIE, &touched)),
        ],
    )
    .await;
    assert!(r.set_cookies().is_empty(), "session still live at 250 ms");
    tokio::time::sleep(Duration::from_millis(250)).await;

    assert_eq!(s.live_sessions("D\\idle"), 0);
    assert_eq!(s.live_sessions("D\\touched"), 1);
    assert_eq!(
        s.live_sessions("D\\ws"),
        1,
        "an open engine socket keeps the session alive"
    );
    assert_eq!(s.counters().sessions_timed_out, 1);
    let r = get(
        addr,
        "/hdr/qps/user",
        &[("cookie", &cookie(HDR_COOKIE, &idle))],
    )
    .await;
    assert_eq!(r.json(), serde_json::json!({"session": "inactive"}));

    ws.close(None).await.expect("close");
    eventually(|| s.counters().websockets_open == 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.live_sessions("D\\ws"), 0);
    assert_eq!(s.counters().sessions_timed_out, 3);
}

#[tokio::test]
async fn logout_ends_the_session() {
    let s = sim(SimConfig::default()).await;
    let addr = s.addr();
    let id = windows_login(addr, "DEMO\\alice").await;
    let c = cookie(CENTRAL_COOKIE, &id);
    let r = send(addr, "DELETE", "/qps/user", &[("cookie", &c)], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["session"], "ended");
    assert_eq!(s.counters().logouts, 1);
    assert_eq!(s.live_sessions("DEMO\\alice"), 0);
    let r = get(addr, "/hub/", &[("cookie", &c)]).await;
    assert_eq!(r.status, StatusCode::FOUND);
    let r = send(addr, "DELETE", "/qps/user", &[("cookie", &c)], "").await;
    assert_eq!(r.json(), serde_json::json!({"session": "inactive"}));
    assert_eq!(s.counters().logouts, 1);
}

#[tokio::test]
async fn personal_api_never_creates_sessions() {
    let s = sim(SimConfig::default()).await;
    let addr = s.addr();
    let inactive = serde_json::json!({"session": "inactive"});
    assert_eq!(get(addr, "/qps/user", &[]).await.json(), inactive);
    assert_eq!(
        get(addr, "/hdr/qps/user", &[("hdr-usr", "D\\u")])
            .await
            .json(),
        inactive
    );
    assert_eq!(
        get(
            addr,
            "/qps/user",
            &[("cookie", &cookie(CENTRAL_COOKIE, "x"))]
        )
        .await
        .json(),
        inactive
    );
    assert_eq!(
        send(addr, "DELETE", "/hdr/qps/user", &[("hdr-usr", "D\\u")], "")
            .await
            .json(),
        inactive
    );
    let c = s.counters();
    assert_eq!((c.sessions_created, c.unknown_cookie_requests), (0, 1));

    let id = get(addr, "/hdr/hub/", &[("hdr-usr", "D\\u")])
        .await
        .cookie_value(HDR_COOKIE);
    let r = get(
        addr,
        "/hdr/qps/user",
        &[("cookie", &cookie(HDR_COOKIE, &id))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(
        (
            v["userDirectory"].as_str(),
            v["userId"].as_str(),
            v["userName"].as_str()
        ),
        (Some("D"), Some("u"), Some("u"))
    );
    assert_eq!(v["logoutUri"], format!("http://{addr}/hdr/qps/user"));
    // The central proxy does not know the hdr session.
    assert_eq!(
        get(
            addr,
            "/qps/user",
            &[("cookie", &cookie(CENTRAL_COOKIE, &id))]
        )
        .await
        .json(),
        inactive
    );
    assert_eq!(s.counters().sessions_created, 1);
}

#[tokio::test]
async fn rest_api_xrfkey_is_enforced() {
    let s = sim(SimConfig::default()).await;
    let a = s.api_addr();
    assert_eq!(
        get(a, "/qps/session", &[]).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get(a, &api_path("/qps/session"), &[]).await.status,
        StatusCode::FORBIDDEN
    );
    let other = "abcdefghij012346";
    assert_eq!(
        get(a, &api_path("/qps/session"), &[("x-qlik-xrfkey", other)])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let short = "/qps/session?Xrfkey=abc";
    assert_eq!(
        get(a, short, &[("x-qlik-xrfkey", "abc")]).await.status,
        StatusCode::FORBIDDEN
    );
    let bad = "/qps/session?Xrfkey=abcdefghij01234!";
    assert_eq!(
        get(a, bad, &[("x-qlik-xrfkey", "abcdefghij01234!")])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let r = get(a, &api_path("/qps/session"), &[("x-qlik-xrfkey", XRF)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), serde_json::json!([]));
}

#[tokio::test]
async fn rest_api_sessions_and_tickets() {
    let cfg = SimConfig {
        max_sessions_per_user: 2,
        ..SimConfig::default()
    };
    let s = sim(cfg).await;
    let hdr_id = get(s.addr(), "/hdr/hub/", &[("hdr-usr", "CORP\\eve")])
        .await
        .cookie_value(HDR_COOKIE);

    let r = api(&s, "GET", &format!("/qps/hdr/session/{hdr_id}"), "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json(),
        serde_json::json!({"UserDirectory":"CORP","UserId":"eve","UserName":"eve","Attributes":[],"SessionId":hdr_id})
    );
    // Sessions belong to their virtual proxy.
    assert_eq!(
        api(&s, "GET", &format!("/qps/session/{hdr_id}"), "")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api(&s, "GET", "/qps/nosuchvp/session", "").await.status,
        StatusCode::NOT_FOUND
    );

    let r = api(
        &s,
        "POST",
        "/qps/hdr/session",
        r#"{"UserDirectory":"CORP","UserId":"eve","SessionId":"api-made"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(r.json()["SessionId"], "api-made");
    let r = api(
        &s,
        "POST",
        "/qps/session",
        r#"{"userDirectory":"corp","userId":"EVE"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "at the limit");
    assert_eq!(s.counters().limit_refusals, 1);
    assert_eq!(
        api(&s, "POST", "/qps/session", "not json").await.status,
        StatusCode::BAD_REQUEST
    );

    let list = api(&s, "GET", "/qps/hdr/session", "").await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    let mine = api(&s, "GET", "/qps/hdr/user/corp/EVE", "").await.json();
    assert_eq!(mine.as_array().map(Vec::len), Some(2));

    let r = api(&s, "DELETE", &format!("/qps/hdr/session/{hdr_id}"), "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["SessionId"], hdr_id.as_str());
    assert_eq!(
        api(&s, "DELETE", &format!("/qps/hdr/session/{hdr_id}"), "")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let r = api(&s, "DELETE", "/qps/hdr/user/CORP/eve", "").await;
    assert_eq!(r.json().as_array().map(Vec::len), Some(1));
    assert_eq!(s.counters().sessions_ended_by_api, 2);
    assert_eq!(s.live_sessions("CORP\\eve"), 0);

    // A ticket from the API logs the user in on the central (ticket-redeeming) proxy, once.
    let r = api(
        &s,
        "POST",
        "/qps/ticket",
        r#"{"UserDirectory":"CORP","UserId":"eve"}"#,
    )
    .await;
    let t = r.json();
    assert_eq!(t["TargetUri"], serde_json::Value::Null);
    let ticket = t["Ticket"].as_str().expect("ticket").to_string();
    let r = get(s.addr(), &format!("/sense/?qlikTicket={ticket}"), &[]).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(r.header("location"), "/sense/");
    r.cookie_value(CENTRAL_COOKIE);
    assert_eq!(
        get(s.addr(), &format!("/sense/?qlikTicket={ticket}"), &[])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(s.counters().tickets_redeemed, 1);
}

#[tokio::test]
async fn websocket_connects_echoes_and_hears_logout() {
    let s = sim(SimConfig::default()).await;
    let addr = s.addr();
    let id = windows_login(addr, "DEMO\\alice").await;
    let c = cookie(CENTRAL_COOKIE, &id);
    let mut ws = ws_connect(addr, "/app/engineData", &[("cookie", &c)])
        .await
        .expect("ws");
    let hello = next_text(&mut ws).await;
    assert_eq!(
        hello,
        r#"{"jsonrpc":"2.0","method":"OnConnected","params":{"qSessionState":"SESSION_CREATED"}}"#
    );
    ws.send(Message::text("{\"id\":1}")).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "{\"id\":1}");
    ws.send(Message::binary(vec![0u8, 1, 2]))
        .await
        .expect("send");
    ws.send(Message::Ping(Bytes::from_static(b"p")))
        .await
        .expect("ping");
    let mut got_bin = false;
    let mut got_pong = false;
    while !(got_bin && got_pong) {
        match tokio::time::timeout(Duration::from_secs(2), ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Binary(b))) => {
                assert_eq!(&b[..], &[0, 1, 2]);
                got_bin = true;
            }
            Some(Ok(Message::Pong(p))) => {
                assert_eq!(&p[..], b"p");
                got_pong = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let c2 = s.counters();
    assert_eq!((c2.websockets_opened, c2.websockets_open), (1, 1));

    let r = send(addr, "DELETE", "/qps/user", &[("cookie", &c)], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        next_text(&mut ws).await,
        r#"{"jsonrpc":"2.0","method":"OnSessionLoggedOut","params":{}}"#
    );
    expect_closed(&mut ws).await;
    eventually(|| s.counters().websockets_open == 0).await;
}

#[tokio::test]
async fn websocket_refusals_and_api_close() {
    let cfg = SimConfig {
        max_sessions_per_user: 1,
        ..SimConfig::default()
    };
    let s = sim(cfg).await;
    let addr = s.addr();
    // Windows vp without a live cookie: 401, no upgrade.
    match ws_connect(addr, "/app/engineData", &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED)
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    assert_eq!(s.counters().unknown_cookie_requests, 0);

    // Header vp: a valid header creates the session on the upgrade itself.
    let mut ws = ws_connect(addr, "/hdr/app/abc", &[("hdr-usr", "D\\w")])
        .await
        .expect("ws");
    assert_eq!(method_of(&next_text(&mut ws).await), "OnConnected");
    // At the limit the upgrade is accepted only to say why.
    let mut refused = ws_connect(addr, "/hdr/app/abc", &[("hdr-usr", "D\\w")])
        .await
        .expect("ws");
    assert_eq!(
        next_text(&mut refused).await,
        r#"{"jsonrpc":"2.0","method":"OnMaxParallelSessionsExceeded","params":{}}"#
    );
    expect_closed(&mut refused).await;
    assert_eq!(s.counters().limit_refusals, 1);

    // Ending the session through the API tells the socket.
    let id = s.session_ids("D\\w").pop().expect("session");
    let r = api(&s, "DELETE", &format!("/qps/hdr/session/{id}"), "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(method_of(&next_text(&mut ws).await), "OnSessionClosed");
    expect_closed(&mut ws).await;
    eventually(|| s.counters().websockets_open == 0).await;
    assert_eq!(s.counters().websockets_opened, 1);
}

#[tokio::test]
async fn stop_then_start_again_on_the_same_address() {
    let s = sim(SimConfig::default()).await;
    let addr = s.addr();
    let id = windows_login(addr, "DEMO\\alice").await;
    // A keep-alive connection that stays open across the stop.
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /__sim/echo HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    s.stop().await;
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    let closed = tokio::time::timeout(Duration::from_secs(1), conn.read(&mut buf))
        .await
        .expect("connection dropped promptly");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");

    let s = Simulator::start(SimConfig::default(), addr)
        .await
        .expect("restart");
    assert_eq!(s.addr(), addr);
    let r = get(addr, "/hub/", &[("cookie", &cookie(CENTRAL_COOKIE, &id))]).await;
    assert_eq!(r.status, StatusCode::FOUND, "sessions are forgotten");
    assert_eq!(s.counters().unknown_cookie_requests, 1);
}

#[tokio::test]
async fn sim_endpoints_echo_and_slow() {
    let s = sim(SimConfig::default()).await;
    let addr = s.addr();
    let path = "/__sim/echo?set_cookie=a%3D1%3B%20Path%3D%2F&set_cookie=b%3D2&status=418";
    let r = send(
        addr,
        "POST",
        path,
        &[("cookie", "x=1"), ("cookie", "y=2"), ("x-test", "v")],
        "body!",
    )
    .await;
    assert_eq!(r.status.as_u16(), 418);
    assert_eq!(
        r.set_cookies(),
        vec!["a=1; Path=/".to_string(), "b=2".to_string()]
    );
    let v = r.json();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], path);
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(v["body_len"], 5);
    let headers = v["headers"].as_array().expect("headers");
    let cookies: Vec<&str> = headers
        .iter()
        .filter(|h| h[0] == "cookie")
        .filter_map(|h| h[1].as_str())
        .collect();
    assert_eq!(cookies, vec!["x=1", "y=2"]);

    let last = s.last_request("/__sim/echo").expect("recorded");
    assert_eq!(last.method, "POST");
    assert_eq!(last.body, b"body!".to_vec());
    assert_eq!(
        last.headers
            .iter()
            .filter(|(n, _)| n == "cookie")
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>(),
        vec![b"x=1".to_vec(), b"y=2".to_vec()]
    );
    assert_eq!(
        get(addr, "/__sim/echo?status=abc", &[]).await.status,
        StatusCode::BAD_REQUEST
    );

    let t = std::time::Instant::now();
    let r = get(addr, "/hdr/__sim/slow?ms=150", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(t.elapsed() >= Duration::from_millis(150));
    let c = s.counters();
    assert_eq!((c.requests, c.sessions_created), (3, 0));
}

#[tokio::test]
async fn rest_api_over_tls() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        ck.key_pair.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    let cfg = SimConfig {
        api_tls: Some(Arc::new(server)),
        ..SimConfig::default()
    };
    let s = sim(cfg).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(s.api_addr()).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await
        .expect("tls");
    let r = send_on(
        tls,
        "localhost",
        "GET",
        &api_path("/qps/hdr/session"),
        &[("x-qlik-xrfkey", XRF)],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    // Plain http is not spoken on a TLS listener.
    let mut plain = TcpStream::connect(s.api_addr()).await.expect("connect");
    plain
        .write_all(b"GET /qps/session HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), plain.read_to_end(&mut buf)).await;
    assert!(!buf.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn invalid_configs_are_rejected() {
    let mut dup = SimConfig::default();
    dup.virtual_proxies[1].prefix = String::new();
    let e = Simulator::start(dup, local())
        .await
        .expect_err("duplicate prefix");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    let mut reserved = SimConfig::default();
    reserved.virtual_proxies[1].prefix = "hub".to_string();
    assert!(Simulator::start(reserved, local()).await.is_err());
}

#[tokio::test]
async fn unknown_paths_and_methods_do_not_panic() {
    let mut cfg = SimConfig::default();
    cfg.virtual_proxies.remove(0); // no central proxy
    let s = sim(cfg).await;
    assert_eq!(
        get(s.addr(), "/hub/", &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(s.api_addr(), "/qps/session", &[("x-qlik-xrfkey", XRF)])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        api(&s, "GET", "/qps/session", "").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api(&s, "PUT", "/qps/hdr/session", "").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        api(&s, "GET", "/qps/hdr/user/onlydir", "").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        api(&s, "POST", "/qps/hdr/session", r#"{"UserDirectory":"D"}"#)
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    let r = send(s.addr(), "PUT", "/hdr/qps/user", &[], "").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn prefixed_windows_virtual_proxy_dance() {
    let mut cfg = SimConfig::default();
    cfg.virtual_proxies.push(SimVirtualProxy {
        prefix: "win".to_string(),
        cookie_name: "X-Qlik-Session-win-HTTP".to_string(),
        auth: SimAuth::Windows {
            accept_any_proof: false,
        },
        inactivity_timeout: None,
        same_site: None,
        also_sets: Vec::new(),
    });
    let s = sim(cfg).await;
    let addr = s.addr();
    let r = get(addr, "/win/hub/", &[]).await;
    assert_eq!(r.status, StatusCode::FOUND);
    let auth = r.header("location").to_string();
    assert!(
        auth.starts_with("/win/internal_windows_authentication/?targetId="),
        "{auth}"
    );
    // A target id is only known to the virtual proxy that issued it.
    let target = auth.split("targetId=").nth(1).unwrap_or("");
    let central = format!("/internal_windows_authentication/?targetId={target}");
    assert_eq!(get(addr, &central, &[]).await.status, StatusCode::FORBIDDEN);
    let r = ntlm_handshake(addr, &auth, "W\\x", ntlm::Scheme::Ntlm).await;
    let ticketed = r.header("location").to_string();
    assert!(ticketed.starts_with("/win/hub/?qlikTicket="), "{ticketed}");
    // ...and so is a ticket.
    let on_central = ticketed.replacen("/win/", "/", 1);
    assert_eq!(
        get(addr, &on_central, &[]).await.status,
        StatusCode::FORBIDDEN
    );
    let r = get(addr, &ticketed, &[]).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(r.header("location"), "/win/hub/");
    let id = r.cookie_value("X-Qlik-Session-win-HTTP");
    assert_eq!(
        r.set_cookies()[0],
        format!("X-Qlik-Session-win-HTTP={id}; Path=/; HttpOnly")
    );
    let r = get(
        addr,
        "/win/hub/",
        &[("cookie", &cookie("X-Qlik-Session-win-HTTP", &id))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.contains(r#"<p id="vp">win</p>"#));
    assert!(r.body.contains("/win/app/engineData"));
}

#[tokio::test]
async fn dropping_the_simulator_stops_it() {
    let s = sim(SimConfig::default()).await;
    let (addr, api_addr) = (s.addr(), s.api_addr());
    drop(s);
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_err() && TcpStream::connect(api_addr).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("listeners still accepting after drop");
}

/// One raw HTTP/1 request on a fresh connection; the status line's code, or 0 if none came.
async fn raw_status(addr: SocketAddr, head: &str) -> u16 {
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(head.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn both_listeners_refuse_a_missing_repeated_or_invalid_host() {
    let s = sim(SimConfig::default()).await;
    let q = format!("/qps/session?Xrfkey={XRF}");
    for (addr, path, extra) in [
        (s.addr(), "/__sim/echo", String::new()),
        (
            s.api_addr(),
            q.as_str(),
            format!("x-qlik-xrfkey: {XRF}\r\n"),
        ),
    ] {
        let req = |version: &str, hosts: &str| {
            format!("GET {path} {version}\r\n{hosts}{extra}connection: close\r\n\r\n")
        };
        let ok = req("HTTP/1.1", &format!("host: {addr}\r\n"));
        assert_eq!(raw_status(addr, &ok).await, 200, "{ok}");
        for hosts in [
            String::new(),
            format!("host: {addr}\r\nhost: {addr}\r\n"),
            "host: \r\n".to_string(),
            "host: user@qlik\r\n".to_string(),
            "host: qlik:port\r\n".to_string(),
            "host: qlik/hub\r\n".to_string(),
        ] {
            let bad = req("HTTP/1.1", &hosts);
            assert_eq!(raw_status(addr, &bad).await, 400, "{bad}");
        }
        // HTTP/1.0 may go without Host, but not with two.
        assert_eq!(raw_status(addr, &req("HTTP/1.0", "")).await, 200);
        let two = req("HTTP/1.0", "host: a\r\nhost: b\r\n");
        assert_eq!(raw_status(addr, &two).await, 400);
    }
    assert!(s
        .api_requests()
        .iter()
        .all(|r| r.path_and_query.starts_with("/qps/session?")));
}

#[tokio::test]
async fn rest_api_routes_on_the_canonical_path_like_http_sys() {
    let s = sim(SimConfig::default()).await;
    let mut victims = Vec::new();
    for _ in 0..2 {
        victims.push(
            get(s.addr(), "/hdr/hub/", &[("hdr-usr", "CORP\\victim")])
                .await
                .cookie_value(HDR_COOKIE),
        );
    }
    // A session id with `..` and an escaped `/` climbs out of its segment: HTTP.sys decodes
    // and resolves before the QPS routes, so this is "end all of CORP\victim's sessions".
    let r = api(
        &s,
        "DELETE",
        "/qps/hdr/session/..%2Fuser%2FCORP%2Fvictim",
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json().as_array().map(Vec::len), Some(2));
    assert_eq!(s.live_sessions("CORP\\victim"), 0);
    let seen = s.api_requests();
    assert_eq!(
        seen.last().map(|r| r.path_and_query.as_str()),
        Some(format!("/qps/hdr/session/..%2Fuser%2FCORP%2Fvictim?Xrfkey={XRF}").as_str()),
        "recorded as sent"
    );
    // A GUID stays one segment.
    let id = get(s.addr(), "/hdr/hub/", &[("hdr-usr", "CORP\\victim")])
        .await
        .cookie_value(HDR_COOKIE);
    let r = api(&s, "GET", &format!("/qps/hdr/session/{id}"), "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!victims.contains(&id));
}
