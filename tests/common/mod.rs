//! Shared test plumbing: start the simulator and the guard on loopback ephemeral ports, and
//! talk to them with a plain HTTP/1.1 client or a raw socket.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use qsguard::sim::{SimConfig, Simulator};
use qsguard::{Config, Guard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const LOOPBACK: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

pub async fn sim() -> Simulator {
    sim_with(SimConfig::default()).await
}

pub async fn sim_with(config: SimConfig) -> Simulator {
    Simulator::start(config, SocketAddr::from(LOOPBACK))
        .await
        .expect("simulator starts")
}

/// The guard's config for the given upstreams, with the simulator's two virtual proxies, plus
/// `extra` TOML appended (sections not already present).
pub fn config_text(upstreams: &[SocketAddr], server_extra: &str, extra: &str) -> String {
    let mut t = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ngrace_period = \"5s\"\n{server_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    for u in upstreams {
        t.push_str(&format!("[[upstream]]\nurl = \"http://{u}\"\n"));
    }
    t.push_str(
        "[[virtual_proxy]]\nprefix = \"\"\nsession_cookie = \"X-Qlik-Session-HTTP\"\n\
         [[virtual_proxy]]\nprefix = \"hdr\"\nsession_cookie = \"X-Qlik-Session-hdr-HTTP\"\nidentity_header = \"hdr-usr\"\n",
    );
    t.push_str(extra);
    t
}

pub async fn guard(upstream: SocketAddr) -> Guard {
    guard_with(&config_text(&[upstream], "", "")).await
}

pub async fn guard_with(text: &str) -> Guard {
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
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// GET `path` with the given headers (Host defaults to "qlik.example.com").
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut b = Request::get(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        b = b.header("host", "qlik.example.com");
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(addr, b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
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
    let mut path = path.to_string();
    for _ in 0..10 {
        let cookie = jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut headers: Vec<(&str, &str)> = extra.to_vec();
        if !cookie.is_empty() {
            headers.push(("cookie", &cookie));
        }
        let resp = get(addr, &path, &headers).await;
        for sc in resp.all("set-cookie") {
            let pair = sc.split(';').next().unwrap_or("");
            if let Some((k, v)) = pair.split_once('=') {
                jar.retain(|(n, _)| n != k);
                jar.push((k.to_string(), v.to_string()));
            }
        }
        if resp.status.is_redirection() {
            path = resp.header("location").expect("redirect has a location");
            if let Some(rest) = path.strip_prefix("http://") {
                path = rest[rest.find('/').unwrap_or(rest.len())..].to_string();
            }
            continue;
        }
        return resp;
    }
    panic!("too many redirects");
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

/// Waits (up to 5 s) until `f` holds.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Starts the simulator again on `addr` (after `stop`), retrying while the port is released.
pub async fn restart_sim(addr: SocketAddr) -> Simulator {
    for _ in 0..50 {
        if let Ok(s) = Simulator::start(SimConfig::default(), addr).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot restart the simulator on {addr}");
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
        .header("host", "admin");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    send(admin, b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap_or_else(|e| panic!("admin {path}: {e}"))
}

/// [`browse`] as `user` on the header-authentication virtual proxy (`hdr-usr`).
pub async fn browse_as(
    addr: SocketAddr,
    path: &str,
    jar: &mut Vec<(String, String)>,
    user: &str,
) -> Resp {
    browse(addr, path, jar, &[("hdr-usr", user)]).await
}

/// Everything the guard logs in this test binary, kept in memory: [`capture_logs`] installs
/// the subscriber once (at debug level, so nothing the guard says is missed), [`logged`] reads
/// what was written so far. Tests run in parallel in one binary, so look for what only your
/// test can have caused (a unique path, a unique user).
static LOGS: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
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
