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
    proto: Proto,
}

impl Client {
    /// HTTP/1.1 over plain TCP.
    pub fn plain(addr: SocketAddr) -> Client {
        Client {
            addr,
            tls: None,
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
                Link::Http2(sender)
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
    /// HTTP/2: every request a stream of this one connection.
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Link {
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Resp, String> {
        match self {
            Link::Http1(client) => client.send_h1(req).await,
            Link::Http2(sender) => {
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
        let mut path = path.to_string();
        for _ in 0..10 {
            let cookie = super::cookie_header(jar);
            let mut headers: Vec<(&str, &str)> = extra.to_vec();
            if !cookie.is_empty() {
                headers.push(("cookie", &cookie));
            }
            let resp = self.get(&path, &headers).await;
            for sc in resp.all("set-cookie") {
                let pair = sc.split(';').next().unwrap_or("");
                if let Some((k, v)) = pair.split_once('=') {
                    jar.retain(|(n, _)| n != k);
                    jar.push((k.to_string(), v.to_string()));
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
