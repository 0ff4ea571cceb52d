//! TLS on the main listener with an rcgen test certificate: HTTP/1.1 and HTTP/2 by ALPN, and
//! HTTP/2 cookie fields joined for the HTTP/1.1 upstream.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;

fn tls_config(sim: std::net::SocketAddr, tls: &TestCert) -> String {
    config_text(&[sim], &tls.server_toml(), "")
}

#[tokio::test]
async fn http2_over_tls_joins_split_cookies_for_qlik() {
    let sim = sim().await;
    let tls = TestCert::new();
    let guard = guard_with(&tls_config(sim.addr(), &tls)).await;
    let stream = tls_connect(guard.addr, &tls.connector(&[b"h2", b"http/1.1"])).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("https://qlik.example.com/__sim/echo")
        .header("cookie", "X-Qlik-Session-HTTP=a=b\"c")
        .header("cookie", "qsguard=0011")
        .header("cookie", "z=1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();
    let seen = sim.last_request("/__sim/echo").unwrap();
    assert_eq!(seen.version, "HTTP/1.1");
    assert_eq!(
        values(&seen.headers, "cookie"),
        vec![b"X-Qlik-Session-HTTP=a=b\"c; qsguard=0011; z=1".to_vec()]
    );
    assert_eq!(
        values(&seen.headers, "host"),
        vec![b"qlik.example.com".to_vec()],
        "the :authority becomes Host"
    );
    assert_eq!(
        values(&seen.headers, "x-forwarded-proto"),
        vec![b"https".to_vec()]
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn http1_over_tls_and_bad_tls_config_is_named() {
    let sim = sim().await;
    let tls = TestCert::new();
    let guard = guard_with(&tls_config(sim.addr(), &tls)).await;
    let resp = Client::tls(guard.addr, &tls, Proto::Http1)
        .get("/__sim/echo", &[])
        .await;
    assert_eq!(resp.status, 200);
    guard.shutdown().await;

    // A key file that is not a key: the error names the key and the file.
    std::fs::write(tls.key_file(), "not a key").unwrap();
    let config = qsguard::Config::parse(&tls_config(sim.addr(), &tls)).unwrap();
    let err = qsguard::Guard::start(config)
        .await
        .err()
        .expect("refuses to start");
    assert!(err.contains("server.tls_key"), "{err}");
}

#[tokio::test]
async fn https_upstream_with_a_configured_ca() {
    // Guard B serves TLS in front of the simulator; guard A uses B as an https upstream and
    // trusts B's certificate through proxy.upstream_ca.
    let sim = sim().await;
    let tls = TestCert::new();
    let b = guard_with(&tls_config(sim.addr(), &tls)).await;
    let a_text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[upstream]]\nurl = \"https://127.0.0.1:{}\"\n[proxy]\nupstream_ca = \"{}\"\n[sessions]\nguard = false\n",
        b.addr.port(),
        tls.cert_file().display()
    );
    let a = guard_with(&a_text).await;
    let r = get(
        a.addr,
        "/__sim/echo",
        &[("cookie", "X-Qlik-Session-HTTP=abc")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = sim.last_request("/__sim/echo").unwrap();
    assert_eq!(
        values(&seen.headers, "host"),
        vec![b"qlik.example.com".to_vec()],
        "Host survives two proxies"
    );
    a.shutdown().await;

    // Without the CA, the system roots do not trust B: a readable 502, not a hang.
    let untrusting = guard_with(&a_text.replace(
        &format!("[proxy]\nupstream_ca = \"{}\"\n", tls.cert_file().display()),
        "",
    ))
    .await;
    let r = get(untrusting.addr, "/__sim/echo", &[]).await;
    assert_eq!(r.status, 502);
    assert!(
        r.text().to_lowercase().contains("certificate"),
        "{}",
        r.text()
    );
    untrusting.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn the_session_guard_works_over_http2_too() {
    let sim = sim().await;
    let tls = TestCert::new();
    let guard = guard_with(&tls_config(sim.addr(), &tls)).await;
    let h2 = |cookie: Option<String>| {
        let connector = tls.connector(&[b"h2"]);
        let addr = guard.addr;
        async move {
            let stream = tls_connect(addr, &connector).await;
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut b = http::Request::get("https://qlik.example.com/hdr/hub/")
                .header("hdr-usr", "CORP\\h2");
            if let Some(c) = cookie {
                b = b.header("cookie", c);
            }
            let resp = sender
                .send_request(b.body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let cookies: Vec<String> = resp
                .headers()
                .get_all("set-cookie")
                .iter()
                .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
                .collect();
            let _ = resp.into_body().collect().await;
            (status, cookies)
        }
    };
    let (status, cookies) = h2(None).await;
    assert_eq!(status, 200);
    let device = cookies
        .iter()
        .find(|c| c.starts_with("qsguard="))
        .expect("device cookie")
        .clone();
    assert!(cookies
        .iter()
        .any(|c| c.starts_with("X-Qlik-Session-hdr-HTTP=")));
    // A restarted browser: only the device cookie. The guard restores the session over HTTP/2.
    let (status, cookies) = h2(Some(device)).await;
    assert_eq!(status, 200);
    assert!(
        cookies
            .iter()
            .any(|c| c.starts_with("X-Qlik-Session-hdr-HTTP=")),
        "set back: {cookies:?}"
    );
    assert_eq!(
        sim.counters().sessions_created,
        1,
        "restored, not recreated"
    );
    guard.shutdown().await;
}

/// A test CA and leaf certificates it signs.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        Ca {
            cert: params.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A leaf for `names`, written to `<dir>/<file>.pem` and `<dir>/<file>.key`; returns its DER.
    fn leaf(&self, dir: &std::path::Path, file: &str, names: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
        cert.der().to_vec()
    }

    /// The certificate the guard shows to a client asking for `name` (SNI; none for an IP).
    async fn served(&self, addr: std::net::SocketAddr, name: &str) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
            .await
            .unwrap_or_else(|e| panic!("TLS to {name}: {e}"));
        stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }
}

#[tokio::test]
async fn certificates_by_sni_and_a_renewed_certificate_served_after_a_reload() {
    let sim = sim().await;
    let ca = Ca::new();
    let dir = TempDir::new("sni");
    let default = ca.leaf(&dir, "default", &["localhost", "127.0.0.1"]);
    let apps = ca.leaf(&dir, "apps", &["qlik.test", "*.apps.test"]);
    let token = dir.write("token", "sni-reload-token-0123456789");
    let text = with_admin_token(
        &config_text(
            &[sim.addr()],
            &format!(
                "tls_cert = \"{d}/default.pem\"\ntls_key = \"{d}/default.key\"\n\
             [[server.certificate]]\nnames = [\"qlik.test\", \"*.apps.test\"]\n\
             tls_cert = \"{d}/apps.pem\"\ntls_key = \"{d}/apps.key\"\n",
                d = dir.display()
            ),
            "",
        ),
        &token,
    );
    let file = dir.write("qsguard.toml", text);
    let guard = qsguard::Guard::start(qsguard::Config::load(&file).unwrap())
        .await
        .unwrap();
    assert_eq!(ca.served(guard.addr, "localhost").await, default);
    assert_eq!(ca.served(guard.addr, "127.0.0.1").await, default, "no SNI");
    assert_eq!(ca.served(guard.addr, "qlik.test").await, apps);
    assert_eq!(ca.served(guard.addr, "hub.apps.test").await, apps);

    // The default certificate is renewed in place; the reload serves the new one.
    let renewed = ca.leaf(&dir, "default", &["localhost", "127.0.0.1"]);
    assert_ne!(renewed, default);
    assert_eq!(
        ca.served(guard.addr, "localhost").await,
        default,
        "not before the reload"
    );
    let r = admin_call(
        guard.admin_addr,
        http::Method::POST,
        "/reload",
        Some("sni-reload-token-0123456789"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ca.served(guard.addr, "localhost").await, renewed);
    assert_eq!(ca.served(guard.addr, "qlik.test").await, apps);

    // A key that does not fit its certificate: refused, and the renewed one stays.
    std::fs::copy(dir.join("apps.key"), dir.join("default.key")).unwrap();
    let r = admin_call(
        guard.admin_addr,
        http::Method::POST,
        "/reload",
        Some("sni-reload-token-0123456789"),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("server.tls_cert"), "{}", r.text());
    assert_eq!(ca.served(guard.addr, "localhost").await, renewed);
    guard.shutdown().await;
}

/// Answers larger than the client's flow-control window go through whole, the guard sending
/// as the client's WINDOW_UPDATEs come (three at once on one connection, each stream with a
/// 32 KiB window), and the connection serves on.
#[tokio::test]
async fn http2_large_answers_follow_the_clients_window() {
    let sim = sim().await;
    let tls = TestCert::new();
    let guard = guard_with(&tls_config(sim.addr(), &tls)).await;
    let stream = tls_connect(guard.addr, &tls.connector(&[b"h2"])).await;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(32 * 1024)
        .initial_connection_window_size(64 * 1024)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let n = 3 << 20;
    let get = |path: String| {
        let mut sender = sender.clone();
        async move {
            let req = http::Request::get(format!("https://qlik.example.com{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }
    };
    let path = format!("/__sim/bytes?n={n}");
    let all = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        futures_util::future::join_all((0..3).map(|_| get(path.clone()))),
    )
    .await
    .expect("the large answers came through");
    for (status, body) in all {
        assert_eq!(status, 200);
        assert_eq!(body.len(), n);
        assert!(body.iter().all(|&b| b == b'q'));
    }
    let (status, _) = get("/__sim/echo".into()).await;
    assert_eq!(status, 200);
    guard.shutdown().await;
}
