//! TLS for tests: a self-signed certificate for `localhost` and 127.0.0.1 in a temporary
//! directory, the guard's `[server]` lines that serve it, and clients that trust it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::TempDir;

/// A self-signed certificate and its key, as `cert.pem` and `key.pem` in a directory of their
/// own (removed with the value).
pub struct TestCert {
    pub dir: TempDir,
    pub pem: String,
}

impl TestCert {
    pub fn new() -> TestCert {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        let dir = TempDir::new("tls");
        dir.write("cert.pem", ck.cert.pem());
        dir.write("key.pem", ck.key_pair.serialize_pem());
        TestCert {
            dir,
            pem: ck.cert.pem(),
        }
    }

    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// The `[server]` lines that serve this certificate.
    pub fn server_toml(&self) -> String {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            self.cert_file().display(),
            self.key_file().display()
        )
    }

    /// The guard's config as [`super::config_text`] writes it, serving this certificate.
    pub fn config(&self, upstreams: &[SocketAddr], server_extra: &str, extra: &str) -> String {
        super::config_text(
            upstreams,
            &format!("{}\n{server_extra}", self.server_toml()),
            extra,
        )
    }

    /// A client that trusts this certificate and offers `alpn`, in order.
    pub fn connector(&self, alpn: &[&[u8]]) -> TlsConnector {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from_pem_slice(self.pem.as_bytes()).unwrap())
            .unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(cfg))
    }
}

/// A TLS connection to `addr` as `localhost`.
pub async fn tls_connect(addr: SocketAddr, connector: &TlsConnector) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the guard");
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the guard")
}
