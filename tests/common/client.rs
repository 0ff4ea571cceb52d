//! One client for both protocols, so that a test written once runs over HTTP/1.1 and HTTP/2:
//! a [`Client`] knows how to reach the guard (plain TCP, or TLS with ALPN `http/1.1` or `h2`),
//! a [`Link`] is how one browser's requests travel (HTTP/1.1: a new connection per request, so
//! parallel requests are parallel connections as a browser's are; HTTP/2: streams of one
//! connection).

use std::net::SocketAddr;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use qsguard::sim::ntlm::{Browser, Scheme};

use super::{Jar, Resp, TestCert};

/// The protocol between the test client and the guard (the guard speaks HTTP/1.1 to Qlik
/// either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

impl Proto {
    pub const BOTH: [Proto; 2] = [Proto::Http1, Proto::Http2];
}

/// How a test reaches the guard's main listener.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    tls: Option<TlsConnector>,
    /// TLS with ALPN `http/1.1`: where a browser goes when HTTP/2 is refused for NTLM.
    tls_h1: Option<TlsConnector>,
    proto: Proto,
}

impl Client {
    /// HTTP/1.1 over plain TCP.
    pub fn plain(addr: SocketAddr) -> Client {
        Client {
            addr,
            tls: None,
            tls_h1: None,
            proto: Proto::Http1,
        }
    }

    /// `proto` over TLS, chosen by ALPN, trusting `cert`.
    pub fn tls(addr: SocketAddr, cert: &TestCert, proto: Proto) -> Client {
        let alpn: &[u8] = match proto {
            Proto::Http1 => b"http/1.1",
            Proto::Http2 => b"h2",
        };
        Client {
            addr,
            tls: Some(cert.connector(&[alpn])),
            tls_h1: Some(cert.connector(&[b"http/1.1"])),
            proto,
        }
    }

    pub fn proto(&self) -> Proto {
        self.proto
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A browser's way to the guard: see [`Link`].
    pub async fn link(&self) -> Link {
        match self.proto {
            Proto::Http1 => Link::Http1(self.clone()),
            Proto::Http2 => {
                let connector = self.tls.as_ref().expect("HTTP/2 goes over TLS here");
                let stream = super::tls_connect(self.addr, connector).await;
                assert_eq!(
                    stream.get_ref().1.alpn_protocol(),
                    Some(&b"h2"[..]),
                    "the guard picks h2 by ALPN"
                );
                let (sender, conn) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                .expect("HTTP/2 handshake with the guard");
                tokio::spawn(conn);
                Link::Http2(sender, self.clone())
            }
        }
    }

    /// One request (for HTTP/1.1 on a fresh connection, for HTTP/2 on a fresh connection too).
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Resp, String> {
        self.link().await.send(req).await
    }

    /// GET `path` with the given headers (Host defaults to "qlik.example.com").
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.link().await.get(path, headers).await
    }

    /// Follows redirects (keeping cookies like a browser would) until a non-redirect answer.
    pub async fn browse(&self, path: &str, jar: &mut Jar, extra: &[(&str, &str)]) -> Resp {
        self.link().await.browse(path, jar, extra).await
    }

    /// [`Client::browse`] by a browser logged on to Windows as `user`: it answers Qlik's
    /// `401` with an NTLM handshake on one connection.
    pub async fn browse_windows(&self, path: &str, jar: &mut Jar, user: &str) -> Resp {
        self.link().await.browse_windows(path, jar, user).await
    }

    /// [`Client::browse`] as `user` on the header-authentication virtual proxy (`hdr-usr`).
    pub async fn browse_as(&self, path: &str, jar: &mut Jar, user: &str) -> Resp {
        self.browse(path, jar, &[("hdr-usr", user)]).await
    }

    /// The browser logs out of Qlik (`DELETE /<prefix>qps/user` with its cookies), as `user` on
    /// a header-authentication virtual proxy when given.
    pub async fn logout(&self, prefix: &str, jar: &Jar, user: Option<&str>) -> Resp {
        let mut b = Request::delete(format!("{prefix}qps/user"))
            .header("host", "q")
            .header("cookie", super::cookie_header(jar));
        if let Some(u) = user {
            b = b.header("hdr-usr", u);
        }
        self.send(b.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap_or_else(|e| panic!("logout: {e}"))
    }

    /// A kept-alive HTTP/1.1 connection to the guard (TLS with ALPN `http/1.1` if TLS).
    pub async fn h1_conn(&self) -> Result<H1, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let tls = self.tls_h1.as_ref().or(self.tls.as_ref());
        let sender = match tls {
            None => handshake_h1(tcp).await?,
            Some(connector) => {
                let stream = connector
                    .connect(
                        rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                        tcp,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                handshake_h1(stream).await?
            }
        };
        Ok(H1 {
            sender,
            addr: self.addr,
        })
    }

    /// The browser's NTLM handshake for `req` (GET) on one new HTTP/1.1 connection: Type 1,
    /// Qlik's challenge, Type 3; Qlik's answer to the Type 3.
    pub async fn ntlm(&self, req: &Request<Full<Bytes>>, b: &Browser) -> Result<Resp, String> {
        let mut c = self.h1_conn().await?;
        let r = c.send(with_auth(req, &b.negotiate())).await?;
        if r.status != 401 {
            return Ok(r);
        }
        let www: Vec<Vec<u8>> = r
            .headers
            .get_all("www-authenticate")
            .iter()
            .map(|v| v.as_bytes().to_vec())
            .collect();
        let Some(a3) = b.authenticate(www.iter().map(Vec::as_slice)) else {
            return Ok(r);
        };
        c.send(with_auth(req, &a3)).await
    }

    /// One HTTP/1.1 exchange on a new connection.
    async fn send_h1(&self, req: Request<Full<Bytes>>) -> Result<Resp, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        match &self.tls {
            None => exchange_h1(tcp, req, self.addr).await,
            Some(connector) => {
                let stream = connector
                    .connect(
                        rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                        tcp,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                exchange_h1(stream, req, self.addr).await
            }
        }
    }
}

/// A kept-alive HTTP/1.1 connection to the guard: requests go one after the other on it.
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl H1 {
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Resp, String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        collect(resp, Some(self.addr)).await
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

async fn handshake_h1<S>(
    io: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A copy of the GET `req` without its `Authorization`.
fn copy_get(req: &Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let mut b = Request::get(req.uri().clone());
    for (n, v) in req.headers() {
        if n != http::header::AUTHORIZATION {
            b = b.header(n, v);
        }
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// A copy of the GET `req` with `Authorization: value`.
fn with_auth(req: &Request<Full<Bytes>>, value: &str) -> Request<Full<Bytes>> {
    let mut r = copy_get(req);
    r.headers_mut().insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(value).unwrap(),
    );
    r
}

/// Whether a `401` asks for Windows authentication.
fn asks_windows(r: &Resp) -> bool {
    r.status == 401
        && r.all("www-authenticate").iter().any(|v| {
            let s = v.split(' ').next().unwrap_or("");
            s.eq_ignore_ascii_case("NTLM") || s.eq_ignore_ascii_case("Negotiate")
        })
}

/// Whether an HTTP/2 request failed with `RST_STREAM(HTTP_1_1_REQUIRED)`.
pub fn is_http_1_1_required(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h2e) = s.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::HTTP_1_1_REQUIRED);
        }
        source = s.source();
    }
    false
}

async fn exchange_h1<S>(
    io: S,
    req: Request<Full<Bytes>>,
    addr: std::net::SocketAddr,
) -> Result<Resp, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    collect(resp, Some(addr)).await
}

/// The answer, looked at by the secrets audit unless it came from a simulator (`addr`).
async fn collect(
    resp: http::Response<hyper::body::Incoming>,
    addr: Option<std::net::SocketAddr>,
) -> Result<Resp, String> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    if !addr.is_some_and(super::audit::is_exempt) {
        super::audit::scan_response("an answer", &parts.headers, &body);
        super::audit::assert_clean();
    }
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// How one browser's requests travel to the guard.
#[derive(Clone)]
pub enum Link {
    /// HTTP/1.1: a new connection for every request.
    Http1(Client),
    /// HTTP/2: every request a stream of this one connection (and the client, for the
    /// HTTP/1.1 a browser falls back to when a stream is refused with `HTTP_1_1_REQUIRED`).
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>, Client),
}

impl Link {
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Resp, String> {
        match self {
            Link::Http1(client) => client.send_h1(req).await,
            Link::Http2(sender, _) => {
                let mut sender = sender.clone();
                sender.ready().await.map_err(|e| e.to_string())?;
                let resp = sender
                    .send_request(for_h2(req))
                    .await
                    .map_err(|e| e.to_string())?;
                collect(resp, None).await
            }
        }
    }

    /// [`Link::send`] as a browser does it: over HTTP/2, a stream refused with
    /// `HTTP_1_1_REQUIRED` is sent again over HTTP/1.1.
    pub async fn send_or_fall_back(&self, req: Request<Full<Bytes>>) -> Result<Resp, String> {
        match self {
            Link::Http1(client) => client.send_h1(req).await,
            Link::Http2(sender, client) => {
                let mut sender = sender.clone();
                sender.ready().await.map_err(|e| e.to_string())?;
                let again = copy_get(&req);
                match sender.send_request(for_h2(req)).await {
                    Ok(resp) => collect(resp, None).await,
                    Err(e) if is_http_1_1_required(&e) => client.h1_conn().await?.send(again).await,
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }

    /// GET `path` with the given headers (Host defaults to "qlik.example.com").
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut b = Request::get(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            b = b.header("host", "qlik.example.com");
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// POST `body` to `path` with the given headers (Host defaults to "qlik.example.com").
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let mut b = Request::post(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            b = b.header("host", "qlik.example.com");
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// Follows redirects (keeping cookies like a browser would) until a non-redirect answer.
    pub async fn browse(&self, path: &str, jar: &mut Jar, extra: &[(&str, &str)]) -> Resp {
        self.browse_with(path, jar, extra, None).await
    }

    /// [`Link::browse`] by a browser logged on to Windows as `user` (NTLM).
    pub async fn browse_windows(&self, path: &str, jar: &mut Jar, user: &str) -> Resp {
        self.browse_with(path, jar, &[], Some(&Browser::new(user, Scheme::Ntlm)))
            .await
    }

    /// [`Link::browse`]; a browser with Windows credentials (`windows`) answers a `401` that
    /// asks for NTLM or Negotiate with the handshake, on one HTTP/1.1 connection (over
    /// HTTP/2 the guard refuses the authentication path, and the browser falls back).
    pub async fn browse_with(
        &self,
        path: &str,
        jar: &mut Jar,
        extra: &[(&str, &str)],
        windows: Option<&Browser>,
    ) -> Resp {
        let shared = std::sync::Mutex::new(std::mem::take(jar));
        let r = self
            .browse_shared(path, &shared, extra, windows, &mut |_| None)
            .await;
        *jar = shared.into_inner().unwrap();
        r
    }

    /// [`Link::browse_with`] for one of several parallel requests of one browser: the jar is
    /// the browser's, read before each step and updated by every answer (as a real browser's
    /// is, so a straggler of a burst carries whatever cookie the others got meanwhile), and
    /// `pause(step)` may hold the request before step `step` (0: the first request, then one
    /// per redirect followed), to put it at any moment of another request's login.
    pub async fn browse_shared(
        &self,
        path: &str,
        jar: &std::sync::Mutex<Jar>,
        extra: &[(&str, &str)],
        windows: Option<&Browser>,
        pause: &mut (dyn FnMut(usize) -> Option<std::time::Duration> + Send),
    ) -> Resp {
        let mut path = path.to_string();
        for step in 0..10 {
            if let Some(d) = pause(step) {
                tokio::time::sleep(d).await;
            }
            let cookie = super::cookie_header(&jar.lock().unwrap());
            let mut headers: Vec<(&str, &str)> = extra.to_vec();
            if !cookie.is_empty() {
                headers.push(("cookie", &cookie));
            }
            let mut b = Request::get(&path);
            if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
                b = b.header("host", "qlik.example.com");
            }
            for (k, v) in &headers {
                b = b.header(*k, *v);
            }
            let req = b.body(Full::new(Bytes::new())).unwrap();
            let again = copy_get(&req);
            let mut resp = self
                .send_or_fall_back(req)
                .await
                .unwrap_or_else(|e| panic!("GET {path}: {e}"));
            if let (Some(w), true) = (windows, asks_windows(&resp)) {
                let client = match self {
                    Link::Http1(c) | Link::Http2(_, c) => c,
                };
                resp = client
                    .ntlm(&again, w)
                    .await
                    .unwrap_or_else(|e| panic!("NTLM at {path}: {e}"));
            }
            {
                let mut jar = jar.lock().unwrap();
                for sc in resp.all("set-cookie") {
                    let pair = sc.split(';').next().unwrap_or("");
                    if let Some((k, v)) = pair.split_once('=') {
                        jar.retain(|(n, _)| n != k);
                        jar.push((k.to_string(), v.to_string()));
                    }
                }
            }
            if resp.status.is_redirection() {
                path = resp.header("location").expect("redirect has a location");
                if let Some(rest) = path
                    .strip_prefix("http://")
                    .or_else(|| path.strip_prefix("https://"))
                {
                    path = rest[rest.find('/').unwrap_or(rest.len())..].to_string();
                }
                continue;
            }
            return resp;
        }
        panic!("too many redirects");
    }

    /// [`Link::browse`] as `user` on the header-authentication virtual proxy (`hdr-usr`).
    pub async fn browse_as(&self, path: &str, jar: &mut Jar, user: &str) -> Resp {
        self.browse(path, jar, &[("hdr-usr", user)]).await
    }
}

/// An HTTP/1-style request (origin-form target, Host field) as an HTTP/2 request: the Host
/// becomes the `:authority`, the scheme `https`.
fn for_h2(req: Request<Full<Bytes>>) -> Request<Full<Bytes>> {
    let (mut parts, body) = req.into_parts();
    if parts.uri.authority().is_none() {
        let host = parts
            .headers
            .remove(http::header::HOST)
            .map(|h| h.to_str().unwrap().to_string())
            .unwrap_or_else(|| "qlik.example.com".to_string());
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".to_string());
        parts.uri = format!("https://{host}{target}").parse().unwrap();
    }
    Request::from_parts(parts, body)
}
