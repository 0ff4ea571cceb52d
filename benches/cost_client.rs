//! Fixed-count load client for `benches/cost.sh` (not a Criterion bench: `harness = false`, a
//! plain program with its own `main`).
//!
//! It sends exactly N requests (or WebSocket messages) in total over a fixed number of
//! keep-alive connections and checks every answer, so that a target answering errors cannot
//! look cheap: any status other than 200, any body other than the expected one, any echo that
//! differs, a connection that fails: the client exits non-zero with the reason on stderr.
//!
//! * `cost_client h1 ADDR N --body-file F [--conns 8] [--cookie STR]`: HTTP/1.1 over plain TCP,
//!   `GET /` on C keep-alive connections, one request at a time per connection. A connection the
//!   server closes (`Connection: close`) is opened again and counted as a reconnect.
//! * `cost_client h2 ADDR N --body-file F [--conns 8] [--cookie STR]`: the same over TLS with
//!   ALPN `h2` (HTTP/2, one stream at a time per connection). The certificate is not verified
//!   (the benchmark's servers use a self-signed one); a server that does not choose `h2` is an
//!   error.
//! * `cost_client ws URL N [--conns 8] [--cookie STR] [--size 100]`: opens C WebSockets to URL
//!   (`ws://`), then sends N text messages of SIZE bytes in total, each waiting for its echo,
//!   which must be byte for byte the message sent.
//!
//! Requests are handed out from one shared counter, so the total is exact whatever the
//! connections' speed. A line `ok ...` on stdout ends a successful run (with the elapsed time,
//! for information only: `cost.sh` counts instructions and syscalls, not time).
//!
//! * `cost_client origin ADDR --body-file F --session S`: the upstream of the WebSocket rows
//!   (and usable for HTTP too): HTTP/1.1 keep-alive, `GET /login` answers 200 with
//!   `Set-Cookie: X-Qlik-Session=S`, `GET /qps/user` a Personal API answer (a user
//!   `BENCH\alice`), any other request 200 with the body of F; a WebSocket upgrade on any path
//!   becomes an echo of every text/binary message.
//!
//! `--cookie` is the whole value of the `Cookie` field (e.g. `X-Qlik-Session=...; qsguard=...`);
//! without it no `Cookie` field is sent.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser)]
#[command(about = "fixed-count load client for benches/cost.sh")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// HTTP/1.1 keep-alive GETs over plain TCP.
    H1 {
        /// host:port
        addr: String,
        /// Requests in total.
        n: u64,
        #[command(flatten)]
        common: Common,
        /// The body every answer must have, byte for byte.
        #[arg(long)]
        body_file: String,
        /// Path requested.
        #[arg(long, default_value = "/")]
        path: String,
    },
    /// HTTP/2 over TLS (ALPN h2) GETs.
    H2 {
        /// host:port
        addr: String,
        n: u64,
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        body_file: String,
        #[arg(long, default_value = "/")]
        path: String,
        /// SNI name sent in the TLS handshake.
        #[arg(long, default_value = "localhost")]
        sni: String,
    },
    /// WebSocket messages, each echoed back.
    Ws {
        /// ws://host:port/path
        url: String,
        /// Messages in total (each one goes out and comes back).
        n: u64,
        #[command(flatten)]
        common: Common,
        /// Message size in bytes (text frames).
        #[arg(long, default_value_t = 100)]
        size: usize,
    },
    /// Upstream: static 200s, a login that sets a session cookie, a Personal API, WS echo.
    Origin {
        /// host:port to listen on
        addr: String,
        #[arg(long)]
        body_file: String,
        /// The session cookie value `/login` sets.
        #[arg(long)]
        session: String,
    },
}

#[derive(clap::Args)]
struct Common {
    /// Connections (each carries one request or message at a time).
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// The whole Cookie field value; none by default.
    #[arg(long)]
    cookie: Option<String>,
}

fn main() -> ExitCode {
    // `cargo bench` runs harness-less benches with `--bench`: nothing to do then.
    let args: Vec<String> = std::env::args().collect();
    if args.len() <= 2 && args.iter().skip(1).all(|a| a.starts_with("--bench")) {
        eprintln!("cost_client: helper for benches/cost.sh; see --help");
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    let started = Instant::now();
    let (what, n, conns, result) = match cli.mode {
        Mode::H1 {
            addr,
            n,
            common,
            body_file,
            path,
        } => {
            let r = read_body(&body_file)
                .and_then(|body| rt.block_on(h1(&addr, n, &common, &path, body)));
            ("HTTP/1.1 requests", n, common.conns, r)
        }
        Mode::H2 {
            addr,
            n,
            common,
            body_file,
            path,
            sni,
        } => {
            let r = read_body(&body_file)
                .and_then(|body| rt.block_on(h2(&addr, n, &common, &path, &sni, body)));
            ("HTTP/2 requests", n, common.conns, r)
        }
        Mode::Origin {
            addr,
            body_file,
            session,
        } => {
            let r =
                read_body(&body_file).and_then(|body| rt.block_on(origin(&addr, body, &session)));
            if let Err(e) = r {
                eprintln!("cost_client origin: {e}");
                return ExitCode::FAILURE;
            }
            return ExitCode::SUCCESS;
        }
        Mode::Ws {
            url,
            n,
            common,
            size,
        } => {
            let r = rt.block_on(ws(&url, n, &common, size));
            ("WebSocket messages echoed", n, common.conns, r)
        }
    };
    match result {
        Ok(note) => {
            let secs = started.elapsed().as_secs_f64();
            println!(
                "ok {n} {what} over {conns} connections in {secs:.2}s ({:.0}/s){note}",
                n as f64 / secs
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cost_client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_body(path: &str) -> Result<Bytes, String> {
    std::fs::read(path)
        .map(Bytes::from)
        .map_err(|e| format!("cannot read --body-file {path}: {e}"))
}

/// Runs `conns` copies of a connection future and joins them; the first error wins.
async fn run_all<F, Fut>(conns: usize, f: F) -> Result<u64, String>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<u64, String>> + 'static,
{
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            let handles: Vec<_> = (0..conns).map(|i| tokio::task::spawn_local(f(i))).collect();
            let mut total = 0;
            let mut first_err = None;
            for h in handles {
                match h.await {
                    Ok(Ok(x)) => total += x,
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(e) => {
                        first_err.get_or_insert(format!("connection task failed: {e}"));
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(total),
            }
        })
        .await
}

/// The next request number, or None once N have been handed out.
fn ticket(counter: &AtomicU64, n: u64) -> Option<u64> {
    let t = counter.fetch_add(1, Ordering::Relaxed);
    (t < n).then_some(t)
}

const TIMEOUT: Duration = Duration::from_secs(60);

async fn connect(addr: &str) -> Result<TcpStream, String> {
    let s = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect {addr}: timed out"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

// ------------------------------------------------------------------------------------------
// HTTP/1.1
// ------------------------------------------------------------------------------------------

async fn h1(addr: &str, n: u64, c: &Common, path: &str, body: Bytes) -> Result<String, String> {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: qsguard-cost-client\r\nAccept: */*\r\n"
    );
    if let Some(cookie) = &c.cookie {
        req.push_str(&format!("Cookie: {cookie}\r\n"));
    }
    req.push_str("\r\n");
    let req: Arc<[u8]> = req.into_bytes().into();
    let counter = Arc::new(AtomicU64::new(0));
    let addr: Arc<str> = addr.into();
    let reconnects = run_all(c.conns, |_| {
        h1_conn(addr.clone(), req.clone(), body.clone(), counter.clone(), n)
    })
    .await?;
    Ok(if reconnects > 0 {
        format!(", {reconnects} reconnects (the server closed keep-alive connections)")
    } else {
        String::new()
    })
}

/// One keep-alive connection: requests until the tickets run out. Returns its reconnects.
async fn h1_conn(
    addr: Arc<str>,
    req: Arc<[u8]>,
    body: Bytes,
    counter: Arc<AtomicU64>,
    n: u64,
) -> Result<u64, String> {
    let mut stream: Option<TcpStream> = None;
    let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
    let mut reconnects = 0;
    let mut opened = false;
    while let Some(t) = ticket(&counter, n) {
        let s = match stream.as_mut() {
            Some(s) => s,
            None => {
                if opened {
                    reconnects += 1;
                }
                opened = true;
                buf.clear();
                stream.insert(connect(&addr).await?)
            }
        };
        let keep = tokio::time::timeout(TIMEOUT, h1_exchange(s, &req, &body, &mut buf))
            .await
            .map_err(|_| format!("request {t}: no complete answer within {TIMEOUT:?}"))?
            .map_err(|e| format!("request {t}: {e}"))?;
        if !keep {
            stream = None;
        }
    }
    Ok(reconnects)
}

/// Writes one request, reads and checks its answer. Ok(false): the server closes the connection.
async fn h1_exchange(
    s: &mut TcpStream,
    req: &[u8],
    body: &[u8],
    buf: &mut Vec<u8>,
) -> Result<bool, String> {
    s.write_all(req).await.map_err(|e| format!("write: {e}"))?;
    // The head.
    let (head_len, status, framing, close) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(len)) => {
                let mut framing = Framing::UntilClose;
                let mut close = resp.version == Some(0);
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        let v = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .ok_or("bad Content-Length")?;
                        framing = Framing::Length(v);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                        && h.value.eq_ignore_ascii_case(b"chunked")
                    {
                        framing = Framing::Chunked;
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = h.value.eq_ignore_ascii_case(b"close");
                    }
                }
                break (len, resp.code.unwrap_or(0), framing, close);
            }
            Ok(httparse::Status::Partial) => fill(s, buf).await?,
            Err(e) => return Err(format!("unparsable answer head: {e}")),
        }
    };
    buf.drain(..head_len);
    // The body.
    let got: Vec<u8> = match framing {
        Framing::Length(len) => {
            while buf.len() < len {
                fill(s, buf).await?;
            }
            buf.drain(..len).collect()
        }
        Framing::Chunked => read_chunked(s, buf).await?,
        Framing::UntilClose => {
            while fill(s, buf).await.is_ok() {}
            let all = std::mem::take(buf);
            return check(status, &all, body).map(|_| false);
        }
    };
    check(status, &got, body)?;
    Ok(!close)
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

fn check(status: u16, got: &[u8], body: &[u8]) -> Result<(), String> {
    if status != 200 {
        return Err(format!(
            "status {status}, expected 200 (body: {:?})",
            String::from_utf8_lossy(&got[..got.len().min(200)])
        ));
    }
    if got != body {
        return Err(format!(
            "body of {} bytes differs from the expected {} bytes: {:?}",
            got.len(),
            body.len(),
            String::from_utf8_lossy(&got[..got.len().min(200)])
        ));
    }
    Ok(())
}

/// Reads more bytes into buf; an end of stream is an error.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut tmp = [0u8; 16 * 1024];
    match s.read(&mut tmp).await {
        Ok(0) => Err("the server closed the connection in the middle of an answer".into()),
        Ok(k) => {
            buf.extend_from_slice(&tmp[..k]);
            Ok(())
        }
        Err(e) => Err(format!("read: {e}")),
    }
}

async fn read_chunked(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            fill(s, buf).await?;
        };
        let line = std::str::from_utf8(&buf[..line_end]).map_err(|_| "bad chunk line")?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size line {line:?}"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (none expected) up to the empty line.
            loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    buf.drain(..i + 2);
                    if i == 0 {
                        return Ok(out);
                    }
                } else {
                    fill(s, buf).await?;
                }
            }
        }
        while buf.len() < size + 2 {
            fill(s, buf).await?;
        }
        out.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

// ------------------------------------------------------------------------------------------
// HTTP/2 over TLS
// ------------------------------------------------------------------------------------------

/// Accepts any certificate (the benchmark's own self-signed one), but checks the handshake
/// signatures with the provider's algorithms.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn h2(
    addr: &str,
    n: u64,
    c: &Common,
    path: &str,
    sni: &str,
    body: Bytes,
) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS config: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let sni = rustls_pki_types::ServerName::try_from(sni.to_string())
        .map_err(|e| format!("bad --sni: {e}"))?;
    let uri: http::Uri = format!("https://{addr}{path}")
        .parse()
        .map_err(|e| format!("bad address: {e}"))?;
    let counter = Arc::new(AtomicU64::new(0));
    let suite = Arc::new(std::sync::Mutex::new(String::new()));
    let addr: Arc<str> = addr.into();
    let cookie = c.cookie.clone();
    run_all(c.conns, |_| {
        let (tls, sni, uri, body, counter, addr, cookie, suite) = (
            tls.clone(),
            sni.clone(),
            uri.clone(),
            body.clone(),
            counter.clone(),
            addr.clone(),
            cookie.clone(),
            suite.clone(),
        );
        async move {
            let tcp = connect(&addr).await?;
            let s = tokio::time::timeout(TIMEOUT, tls.connect(sni, tcp))
                .await
                .map_err(|_| "TLS handshake timed out".to_string())?
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let conn = s.get_ref().1;
            if conn.alpn_protocol() != Some(b"h2") {
                return Err(format!(
                    "the server chose ALPN {:?}, not h2",
                    conn.alpn_protocol().map(String::from_utf8_lossy)
                ));
            }
            if let (Some(cs), Some(v)) = (conn.negotiated_cipher_suite(), conn.protocol_version()) {
                *suite.lock().unwrap() = format!("{v:?} {:?}", cs.suite());
            }
            let (mut sender, conn) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .handshake::<_, Empty<Bytes>>(hyper_util::rt::TokioIo::new(s))
                    .await
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            while let Some(t) = ticket(&counter, n) {
                let mut req = http::Request::get(uri.clone())
                    .header("user-agent", "qsguard-cost-client")
                    .header("accept", "*/*");
                if let Some(cookie) = &cookie {
                    req = req.header("cookie", cookie.as_str());
                }
                let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
                let exchange = async {
                    sender
                        .ready()
                        .await
                        .map_err(|e| format!("connection not ready: {e}"))?;
                    let resp = sender
                        .send_request(req)
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                    let status = resp.status().as_u16();
                    let got = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| format!("body: {e}"))?
                        .to_bytes();
                    check(status, &got, &body)
                };
                tokio::time::timeout(TIMEOUT, exchange)
                    .await
                    .map_err(|_| format!("request {t}: no answer within {TIMEOUT:?}"))?
                    .map_err(|e| format!("request {t}: {e}"))?;
            }
            Ok(0)
        }
    })
    .await?;
    let suite = suite.lock().unwrap().clone();
    Ok(format!(", {suite}"))
}

// ------------------------------------------------------------------------------------------
// WebSocket
// ------------------------------------------------------------------------------------------

async fn ws(url: &str, n: u64, c: &Common, size: usize) -> Result<String, String> {
    // Open every WebSocket first, so that the counted part is messages only.
    let mut sockets = Vec::with_capacity(c.conns);
    for i in 0..c.conns {
        let mut req = url
            .into_client_request()
            .map_err(|e| format!("bad url {url}: {e}"))?;
        if let Some(cookie) = &c.cookie {
            req.headers_mut().insert(
                "cookie",
                cookie.parse().map_err(|e| format!("bad --cookie: {e}"))?,
            );
        }
        let (ws, resp) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(req))
            .await
            .map_err(|_| format!("WebSocket {i}: handshake timed out"))?
            .map_err(|e| format!("WebSocket {i}: handshake: {e}"))?;
        if resp.status().as_u16() != 101 {
            return Err(format!("WebSocket {i}: status {}", resp.status()));
        }
        sockets.push(ws);
    }
    let counter = Arc::new(AtomicU64::new(0));
    let sockets: Vec<_> = sockets
        .into_iter()
        .map(|s| Arc::new(tokio::sync::Mutex::new(Some(s))))
        .collect();
    run_all(c.conns, |i| {
        let slot = sockets[i].clone();
        let counter = counter.clone();
        async move {
            let mut ws = slot.lock().await.take().expect("one task per socket");
            while let Some(t) = ticket(&counter, n) {
                let mut text = format!("message {t:>10} ");
                while text.len() < size {
                    text.push((b'a' + (text.len() % 26) as u8) as char);
                }
                text.truncate(size.max(1));
                let exchange = async {
                    ws.send(Message::text(text.clone()))
                        .await
                        .map_err(|e| format!("send: {e}"))?;
                    loop {
                        match ws.next().await {
                            None => return Err("closed before the echo".to_string()),
                            Some(Err(e)) => return Err(format!("read: {e}")),
                            Some(Ok(Message::Text(got))) if got.as_str() == text => return Ok(()),
                            Some(Ok(Message::Text(got))) => {
                                return Err(format!(
                                    "echo {:?} differs from the message {text:?}",
                                    got.as_str()
                                ))
                            }
                            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                            Some(Ok(other)) => return Err(format!("unexpected message {other:?}")),
                        }
                    }
                };
                tokio::time::timeout(TIMEOUT, exchange)
                    .await
                    .map_err(|_| format!("message {t}: no echo within {TIMEOUT:?}"))?
                    .map_err(|e| format!("WebSocket {i}, message {t}: {e}"))?;
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(None)).await;
            Ok(0)
        }
    })
    .await?;
    Ok(String::new())
}

// ------------------------------------------------------------------------------------------
// The WebSocket rows' upstream
// ------------------------------------------------------------------------------------------

async fn origin(addr: &str, body: Bytes, session: &str) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let session: Arc<str> = session.into();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cost_client origin: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (body, session) = (body.clone(), session.clone());
        tokio::spawn(async move {
            if let Err(e) = origin_conn(stream, body, session).await {
                eprintln!("cost_client origin: {e}");
            }
        });
    }
}

async fn origin_conn(mut s: TcpStream, body: Bytes, session: Arc<str>) -> Result<(), String> {
    let mut buf: Vec<u8> = Vec::with_capacity(8 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // One request head.
        let (head_len, path, ws_key, content_length) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let mut key = None;
                    let mut upgrade = false;
                    let mut cl = 0usize;
                    for h in req.headers.iter() {
                        if h.name.eq_ignore_ascii_case("upgrade") {
                            upgrade = h.value.eq_ignore_ascii_case(b"websocket");
                        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
                            key = Some(h.value.to_vec());
                        } else if h.name.eq_ignore_ascii_case("content-length") {
                            cl = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok())
                                .ok_or("bad Content-Length")?;
                        }
                    }
                    let path = req.path.unwrap_or("/").to_string();
                    break (len, path, key.filter(|_| upgrade), cl);
                }
                Ok(httparse::Status::Partial) => {
                    let mut tmp = [0u8; 8 * 1024];
                    match s.read(&mut tmp).await {
                        Ok(0) => return Ok(()),
                        Ok(k) => buf.extend_from_slice(&tmp[..k]),
                        Err(_) => return Ok(()),
                    }
                }
                Err(e) => return Err(format!("unparsable request head: {e}")),
            }
        };
        buf.drain(..head_len);
        while buf.len() < content_length {
            let mut tmp = [0u8; 8 * 1024];
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return Ok(()),
                Ok(k) => buf.extend_from_slice(&tmp[..k]),
            }
        }
        buf.drain(..content_length);
        if let Some(key) = ws_key {
            let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(&key);
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            s.write_all(head.as_bytes())
                .await
                .map_err(|e| format!("write 101: {e}"))?;
            let mut ws = tokio_tungstenite::WebSocketStream::from_partially_read(
                s,
                buf,
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(msg)) = ws.next().await {
                let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                if matches!(msg, Message::Close(_)) || (echo && ws.send(msg).await.is_err()) {
                    break;
                }
            }
            return Ok(());
        }
        out.clear();
        let (extra, payload): (String, &[u8]) = match path.as_str() {
            "/login" => (
                format!("Set-Cookie: X-Qlik-Session={session}; Path=/; HttpOnly; SameSite=Lax\r\n"),
                &body,
            ),
            p if p.starts_with("/qps/user") => (
                "Content-Type: application/json\r\n".into(),
                br#"{"userDirectory":"BENCH","userId":"alice","session":"active"}"#,
            ),
            _ => ("Content-Type: text/plain\r\n".into(), &body),
        };
        out.extend_from_slice(
            format!(
                "HTTP/1.1 200 OK\r\nServer: cost-origin\r\n{extra}Content-Length: {}\r\n\r\n",
                payload.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(payload);
        s.write_all(&out).await.map_err(|e| format!("write: {e}"))?;
    }
}
