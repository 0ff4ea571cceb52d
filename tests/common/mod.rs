//! Shared test plumbing: start the simulator and the guard on loopback ephemeral ports, and
//! talk to them with an HTTP/1.1 or HTTP/2 client ([`client`]), a raw socket or a WebSocket;
//! temporary directories, polling, the admin API, TLS test certificates ([`tls`]), qsguard
//! processes ([`process`]) and a tokio clock the test moves by hand ([`clock`]).
#![allow(dead_code)]

pub mod audit;
pub mod client;
pub mod clock;
pub mod process;
pub mod redis;
pub mod tls;

#[allow(unused_imports)]
pub use client::{Client, Link, Proto};
#[allow(unused_imports)]
pub use clock::*;
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use tls::*;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Full;
use qsguard::sim::{SimConfig, Simulator};
use qsguard::{Config, Guard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

pub async fn sim() -> Simulator {
    sim_with(SimConfig::default()).await
}

pub async fn sim_with(config: SimConfig) -> Simulator {
    capture_logs();
    let sim = Simulator::start(config, SocketAddr::from(LOOPBACK))
        .await
        .expect("simulator starts");
    audit::exempt(sim.addr());
    audit::exempt(sim.api_addr());
    sim
}

/// The guard's config for the given upstreams, with the simulator's two virtual proxies, plus
/// `extra` TOML appended (sections not already present). The header-authentication virtual
/// proxy has `cookieless = "new"`: a test client with an empty jar stands for a browser or a
/// script of its own, with its own session, as most tests need (the default, `reuse`, has its
/// own tests: [`cookieless_reuse`]).
pub fn config_text(upstreams: &[SocketAddr], server_extra: &str, extra: &str) -> String {
    let mut t = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ngrace_period = \"5s\"\n{server_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    for u in upstreams {
        t.push_str(&format!("[[upstream]]\nurl = \"http://{u}\"\n"));
    }
    t.push_str(
        "[[virtual_proxy]]\nprefix = \"\"\nsession_cookie = \"X-Qlik-Session-HTTP\"\n\
         [[virtual_proxy]]\nprefix = \"hdr\"\nsession_cookie = \"X-Qlik-Session-hdr-HTTP\"\nidentity_header = \"hdr-usr\"\ncookieless = \"new\"\n",
    );
    t.push_str(extra);
    t
}

/// `text` (from [`config_text`]) with the header-authentication virtual proxy's `cookieless`
/// at its default, `reuse`.
pub fn cookieless_reuse(text: &str) -> String {
    text.replace("cookieless = \"new\"\n", "")
}

pub async fn guard(upstream: SocketAddr) -> Guard {
    guard_with(&config_text(&[upstream], "", "")).await
}

pub async fn guard_with(text: &str) -> Guard {
    capture_logs();
    let config = Config::parse(text).expect("test config is valid");
    Guard::start(config).await.expect("guard starts")
}

/// A response as a test looks at it.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Resp, String> {
    Client::plain(addr).send(req).await
}

/// GET `path` with the given headers (Host defaults to "qlik.example.com").
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    Client::plain(addr).get(path, headers).await
}

/// Writes `bytes` on a raw connection and reads what comes back until the guard closes the
/// connection or `wait` passes without a byte.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    if !audit::is_exempt(addr) {
        audit::scan_raw("a raw answer", &out);
        audit::assert_clean();
    }
    out
}

/// The status codes of every response in a raw byte stream, in order.
pub fn statuses(raw: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(raw);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// Follows redirects (keeping cookies like a browser would) until a non-redirect answer.
pub async fn browse(
    addr: SocketAddr,
    path: &str,
    jar: &mut Vec<(String, String)>,
    extra: &[(&str, &str)],
) -> Resp {
    Client::plain(addr).browse(path, jar, extra).await
}

/// [`browse`] by a browser logged on to Windows as `user`: it answers Qlik's `401` with an
/// NTLM handshake on one connection, as a browser does.
pub async fn browse_windows(addr: SocketAddr, path: &str, jar: &mut Jar, user: &str) -> Resp {
    Client::plain(addr).browse_windows(path, jar, user).await
}

/// What a cookie-mangling middlebox does (for the "lost on the way" tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mangle {
    /// Passes everything, but says hello with `Via`.
    Clean,
    /// Removes this cookie from every request.
    StripCookie(&'static str),
    /// Changes this cookie's value in every request.
    ModifyCookie(&'static str),
    /// Folds all `Set-Cookie` headers of a response into one (comma-joined).
    FoldSetCookie,
    /// Keeps only the first `Set-Cookie` header of a response.
    DropSetCookies,
}

/// A tiny HTTP/1.1 middlebox in front of `target`: one request per connection, mangled as told.
pub async fn mangler(target: SocketAddr, mode: Mangle) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Some((head, body)) = read_message(&mut client, true).await else {
                    return;
                };
                let mut lines: Vec<String> = head.split("\r\n").map(str::to_string).collect();
                lines.retain(|l| !l.to_ascii_lowercase().starts_with("connection:"));
                for l in lines.iter_mut() {
                    let lower = l.to_ascii_lowercase();
                    if let Some(rest) = lower.strip_prefix("cookie:") {
                        let _ = rest;
                        let value = l[7..].trim().to_string();
                        let pairs: Vec<String> = value
                            .split(';')
                            .map(|p| p.trim().to_string())
                            .filter_map(|p| match mode {
                                Mangle::StripCookie(n) if p.starts_with(&format!("{n}=")) => None,
                                Mangle::ModifyCookie(n) if p.starts_with(&format!("{n}=")) => {
                                    Some(format!("{p}x"))
                                }
                                _ => Some(p),
                            })
                            .collect();
                        *l = format!("Cookie: {}", pairs.join("; "));
                    }
                }
                lines.retain(|l| l != "Cookie: ");
                let mut req = lines[..lines.len().saturating_sub(0)].join("\r\n");
                req = req.trim_end().to_string();
                req.push_str("\r\nVia: 1.1 mangler\r\nConnection: close\r\n\r\n");
                let Ok(mut up) = TcpStream::connect(target).await else {
                    return;
                };
                if up.write_all(req.as_bytes()).await.is_err() || up.write_all(&body).await.is_err()
                {
                    return;
                }
                let mut resp = Vec::new();
                let _ = up.read_to_end(&mut resp).await;
                let split = resp
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|i| i + 4)
                    .unwrap_or(resp.len());
                let (rhead, rbody) = resp.split_at(split);
                let rhead = String::from_utf8_lossy(rhead).to_string();
                let mut out: Vec<String> = Vec::new();
                let mut cookies: Vec<String> = Vec::new();
                for l in rhead.trim_end().split("\r\n") {
                    if l.to_ascii_lowercase().starts_with("set-cookie:") {
                        cookies.push(l[11..].trim().to_string());
                    } else if !l.to_ascii_lowercase().starts_with("connection:") {
                        out.push(l.to_string());
                    }
                }
                match mode {
                    Mangle::FoldSetCookie if !cookies.is_empty() => {
                        out.push(format!("Set-Cookie: {}", cookies.join(", ")))
                    }
                    Mangle::DropSetCookies if !cookies.is_empty() => {
                        out.push(format!("Set-Cookie: {}", cookies[0]))
                    }
                    _ => out.extend(cookies.iter().map(|c| format!("Set-Cookie: {c}"))),
                }
                out.push("Via: 1.1 mangler".into());
                out.push("Connection: close".into());
                let mut bytes = out.join("\r\n").into_bytes();
                bytes.extend_from_slice(b"\r\n\r\n");
                bytes.extend_from_slice(rbody);
                let _ = client.write_all(&bytes).await;
                let _ = client.shutdown().await;
            });
        }
    });
    addr
}

/// An origin that answers each request with exact bytes chosen by its path: `script(path)`
/// gives the bytes and whether to close the connection after them (else it reads the next
/// request). For responses the simulator cannot make (odd framing, hop-by-hop fields).
pub async fn scripted_origin(script: fn(&str) -> (Vec<u8>, bool)) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .and_then(|v| v.trim().parse().ok())
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    buf.drain(..end + 4 + len);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let (bytes, close) = script(&path);
                    if s.write_all(&bytes).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Reads one request (head and Content-Length body) from a raw socket.
async fn read_message(s: &mut TcpStream, _request: bool) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            let mut body = buf[i + 4..].to_vec();
            while body.len() < len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
            return Some((head, body));
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A browser's cookie jar, as `browse` keeps it.
pub type Jar = Vec<(String, String)>;

/// The `Cookie` header a browser with this jar sends.
pub fn cookie_header(jar: &Jar) -> String {
    jar.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `s` percent-encoded for a query string (everything but the unreserved characters).
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A jar without the cookie `name`: the browser after a restart lost its session cookie.
pub fn without(jar: &Jar, name: &str) -> Jar {
    jar.iter().filter(|(n, _)| n != name).cloned().collect()
}

/// The value of the cookie `name` in the jar.
pub fn jar_get(jar: &Jar, name: &str) -> Option<String> {
    jar.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
}

// ---------------------------------------------------------------------------------------------
// Waiting
// ---------------------------------------------------------------------------------------------

/// How often the poll loops look again.
const POLL_EVERY: Duration = Duration::from_millis(25);

/// Waits (up to 5 s) until `f` holds.
pub async fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(5), f).await
}

/// Waits up to `timeout` until `f` holds.
pub async fn eventually_within(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    poll_for(what, timeout, || f().then_some(())).await
}

/// Waits up to `timeout` until `f` has something, and returns it.
pub async fn poll_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    try_poll_for(timeout, f)
        .await
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for: {what}"))
}

/// [`poll_for`] that says `None` when `timeout` passes instead of failing the test.
pub async fn try_poll_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// [`poll_for`] with an asynchronous look (a request, a bind): each try runs to its end.
pub async fn poll_async<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Starts the simulator again on `addr` (after `stop`), retrying while the port is released.
pub async fn restart_sim(addr: SocketAddr) -> Simulator {
    poll_async(
        &format!("the simulator listening on {addr} again"),
        Duration::from_secs(5),
        || async move { Simulator::start(SimConfig::default(), addr).await.ok() },
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Temporary files
// ---------------------------------------------------------------------------------------------

/// A directory of its own under the system temp dir, removed (with what is in it) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "qsguard-{tag}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `contents` to the file `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let file = self.0.join(name);
        std::fs::write(&file, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        file
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The admin API
// ---------------------------------------------------------------------------------------------

/// `config` (as [`config_text`] writes it) with the admin token read from `token_file`.
pub fn with_admin_token(config: &str, token_file: &Path) -> String {
    const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";
    assert!(
        config.contains(ADMIN),
        "no default [admin] section in:\n{config}"
    );
    config.replace(
        ADMIN,
        &format!("{ADMIN}token_file = \"{}\"\n", token_file.display()),
    )
}

/// A call to the admin API, with a bearer token when given.
pub async fn admin_call(
    admin: SocketAddr,
    method: http::Method,
    path: &str,
    token: Option<&str>,
) -> Resp {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    send(admin, b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap_or_else(|e| panic!("admin {path}: {e}"))
}

/// The guard's events of one kind, as the admin API shows them.
pub fn events(guard: &Guard, kind: &str) -> Vec<serde_json::Value> {
    let kind = qsguard::diagnostics::events::Kind::parse(kind)
        .unwrap_or_else(|| panic!("no event kind {kind}"));
    let events = guard
        .proxy()
        .diagnostics
        .events
        .query(0, Some(kind), None)
        .into_iter()
        .map(|e| {
            let v = serde_json::to_value(e).unwrap();
            audit::scan("an event", &v.to_string());
            v
        })
        .collect();
    audit::assert_clean();
    events
}

// ---------------------------------------------------------------------------------------------
// Qlik's side
// ---------------------------------------------------------------------------------------------

/// The simulator's QPS REST API, plain http.
pub fn sim_api_config(sim: &Simulator) -> qsguard::config::QpsApiConfig {
    qsguard::config::QpsApiConfig {
        url: format!("http://{}", sim.api_addr()).parse().unwrap(),
        client_cert: None,
        client_key: None,
        ca: None,
    }
}

/// The header fields the simulator received for the last request to `path`, as (name, raw
/// value) pairs, in order.
pub fn received(sim: &Simulator, path: &str) -> Vec<(String, Vec<u8>)> {
    sim.last_request(path)
        .unwrap_or_else(|| panic!("the simulator saw no request for {path}"))
        .headers
}

/// The values of every field `name` (any case) among `fields`, in order.
pub fn values(fields: &[(String, Vec<u8>)], name: &str) -> Vec<Vec<u8>> {
    fields
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
        .collect()
}

/// The guard's session guard (the test config has it on).
pub fn session_guard(guard: &Guard) -> &std::sync::Arc<qsguard::session::SessionGuard> {
    guard.proxy().sessions().expect("the session guard is on")
}

/// The text between the first `start` and the next `end` after it.
pub fn between(text: &str, start: &str, end: &str) -> String {
    let i = text
        .find(start)
        .unwrap_or_else(|| panic!("no {start:?} in {text}"))
        + start.len();
    let j = text[i..]
        .find(end)
        .unwrap_or_else(|| panic!("no {end:?} after {start:?} in {text}"))
        + i;
    text[i..j].to_string()
}

/// [`values`] as text (lossy), for assertions that print readably.
pub fn texts(fields: &[(String, Vec<u8>)], name: &str) -> Vec<String> {
    values(fields, name)
        .iter()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// Ends a session in Qlik behind the guard's back (an admin, a QPS restart...).
pub async fn end_in_qlik(sim: &Simulator, prefix: &str, session_id: &str) {
    qsguard::qps::QpsApi::new(&sim_api_config(sim))
        .unwrap()
        .end(prefix, session_id)
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// Header authentication
// ---------------------------------------------------------------------------------------------

/// [`browse`] as `user` on the header-authentication virtual proxy (`hdr-usr`).
pub async fn browse_as(
    addr: SocketAddr,
    path: &str,
    jar: &mut Vec<(String, String)>,
    user: &str,
) -> Resp {
    browse(addr, path, jar, &[("hdr-usr", user)]).await
}

/// An engine WebSocket through the guard.
pub type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens the WebSocket `path` as `user` on the header-authentication virtual proxy (with the
/// browser's `Cookie` when given); the upgrade must succeed.
pub async fn ws_as(addr: SocketAddr, path: &str, user: &str, cookie: Option<&str>) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    req.headers_mut().insert("hdr-usr", user.parse().unwrap());
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse().unwrap());
    }
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (ws, resp) = tokio_tungstenite::client_async(req, stream)
        .await
        .expect("websocket upgrade through the guard");
    assert_eq!(resp.status(), 101);
    ws
}

/// The next text frame (pings and pongs skipped), within 5 s.
pub async fn next_text(ws: &mut Ws) -> String {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(Message::Ping(_)))) | Ok(Some(Ok(Message::Pong(_)))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Sends `text` and says whether it comes back within the next three text frames (Qlik's
/// greeting, OnConnected, may come first).
pub async fn echoes(ws: &mut Ws, text: &str) -> bool {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text(text)).await.unwrap();
    for _ in 0..3 {
        if next_text(ws).await == text {
            return true;
        }
    }
    false
}

/// The browser logs out of Qlik (`DELETE /<prefix>qps/user` with its cookies), as `user` on a
/// header-authentication virtual proxy when given.
pub async fn logout(addr: SocketAddr, prefix: &str, jar: &Jar, user: Option<&str>) -> Resp {
    Client::plain(addr).logout(prefix, jar, user).await
}

// ---------------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------------

/// Users who keep browsing `/hdr/hub/x` (each on their own session, each request on a fresh
/// connection) until [`Load::stop`]; every answer that is not a 200, and every request that
/// fails, is counted.
#[derive(Default)]
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    done: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Adds `users` users `CORP\<tag><i>` browsing through `addr`.
    pub fn users(&mut self, addr: SocketAddr, users: usize, tag: &str) {
        use std::sync::atomic::Ordering;
        for i in 0..users {
            let (stop, failed, done) = (self.stop.clone(), self.failed.clone(), self.done.clone());
            let user = format!("CORP\\{tag}{i}");
            self.tasks.push(tokio::spawn(async move {
                let mut jar = Jar::new();
                while !stop.load(Ordering::Relaxed) {
                    // In a task of its own, so that a panic is counted, not lost.
                    let r = tokio::spawn({
                        let mut j = jar.clone();
                        let user = user.clone();
                        async move {
                            let r = browse_as(addr, "/hdr/hub/x", &mut j, &user).await;
                            (r.status, j)
                        }
                    })
                    .await;
                    match r {
                        Ok((s, j)) if s == 200 => jar = j,
                        Ok((s, _)) => {
                            eprintln!("{user}: answered {s}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("{user}: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }

    /// Requests done so far (answered or failed).
    pub fn done(&self) -> usize {
        self.done.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits (up to 5 s) until `n` requests have been done.
    pub async fn reaches(&self, what: &str, n: usize) {
        eventually(what, || self.done() >= n).await
    }

    /// Stops the users, waits for them, and returns how many requests failed.
    pub async fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Everything the guard logs in this test binary, kept in memory: [`capture_logs`] installs
/// the subscriber once (at debug level, so nothing the guard says is missed), [`logged`] reads
/// what was written so far. Tests run in parallel in one binary, so look for what only your
/// test can have caused (a unique path, a unique user).
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        audit::scan("the log", &String::from_utf8_lossy(buf));
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("qsguard=debug"))
            .with_ansi(false)
            .with_writer(|| LogSink)
            .try_init();
    });
}

/// What the guard has logged so far in this test binary.
pub fn logged() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}
