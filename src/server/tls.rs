//! TLS for the main listener: certificate chains and keys from PEM files, chosen by the name
//! the browser asks for (SNI), and ALPN offering HTTP/2 (when enabled) and HTTP/1.1. Browsers
//! then speak HTTP/2 to the guard and the guard speaks HTTP/1.1 to Qlik; WebSockets arrive on
//! their own HTTP/1.1 connections.
//!
//! The files are read at start and at every reload (SIGHUP, `POST /reload`): a renewed
//! certificate is served to new connections without a restart, and one that cannot be read
//! refuses the reload, so the running certificate stays.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ServerConfig as Listener;

/// Builds the server TLS settings; the error names the key, the file and what is wrong.
pub fn server_config(s: &Listener) -> Result<Option<Arc<ServerConfig>>, String> {
    let (Some(cert), Some(key)) = (&s.tls_cert, &s.tls_key) else {
        return Ok(None);
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut by_name = ByName {
        default: Arc::new(load(
            &provider,
            cert,
            key,
            "server.tls_cert",
            "server.tls_key",
        )?),
        exact: HashMap::new(),
        wildcard: HashMap::new(),
    };
    for (i, c) in s.certificates.iter().enumerate() {
        let ck = Arc::new(load(
            &provider,
            &c.tls_cert,
            &c.tls_key,
            &format!("server.certificate[{i}].tls_cert"),
            &format!("server.certificate[{i}].tls_key"),
        )?);
        for name in &c.names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => by_name.wildcard.insert(parent.to_string(), ck.clone()),
                None => by_name.exact.insert(name, ck.clone()),
            };
        }
    }
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(by_name));
    cfg.alpn_protocols = if s.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Some(Arc::new(cfg)))
}

/// One chain and its key, checked to belong together.
fn load(
    provider: &rustls::crypto::CryptoProvider,
    cert: &Path,
    key: &Path,
    cert_key: &str,
    key_key: &str,
) -> Result<CertifiedKey, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert_key}: cannot read {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{cert_key}: {} holds no PEM certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "{key_key}: cannot read a PEM private key from {}: {e}",
            key.display()
        )
    })?;
    CertifiedKey::from_der(certs, key, provider)
        .map_err(|e| format!("{cert_key}/{key_key}: the certificate and key do not fit: {e}"))
}

/// Picks the certificate for the SNI name: an exact name first, then `*.parent`, then the
/// default one (also for clients that send no SNI, or an IP address).
#[derive(Debug)]
struct ByName {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl ByName {
    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) else {
            return self.default.clone();
        };
        if let Some(ck) = self.exact.get(&name) {
            return ck.clone();
        }
        // A wildcard covers exactly one label.
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(ck) = self.wildcard.get(parent) {
                return ck.clone();
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tag: u8) -> Arc<CertifiedKey> {
        // A distinct (not necessarily valid) chain per tag: only identity matters here.
        let signer = rustls::crypto::ring::sign::any_supported_type(
            &PrivateKeyDer::from_pem_slice(
                rcgen::KeyPair::generate()
                    .unwrap()
                    .serialize_pem()
                    .as_bytes(),
            )
            .unwrap(),
        )
        .unwrap();
        Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(vec![tag])],
            signer,
        ))
    }

    #[test]
    fn exact_then_wildcard_then_default() {
        let (d, a, w) = (key(0), key(1), key(2));
        let r = ByName {
            default: d.clone(),
            exact: [("qlik.example.com".to_string(), a.clone())].into(),
            wildcard: [("example.com".to_string(), w.clone())].into(),
        };
        let is = |x: &Arc<CertifiedKey>, y: &Arc<CertifiedKey>| Arc::ptr_eq(x, y);
        assert!(is(&r.pick(Some("qlik.example.com")), &a));
        assert!(is(&r.pick(Some("QLIK.example.com.")), &a));
        assert!(is(&r.pick(Some("hub.example.com")), &w));
        // One label only: a.b.example.com is not *.example.com.
        assert!(is(&r.pick(Some("a.hub.example.com")), &d));
        assert!(is(&r.pick(Some("example.com")), &d));
        assert!(is(&r.pick(None), &d));
    }
}
