//! TLS for the connections the guard opens itself (to the Qlik nodes, the Personal API, the
//! QPS REST API, and `qsguard doctor`'s checks): the one place that decides which certificate
//! authorities are trusted. A configured CA bundle replaces the system's roots; without one,
//! the system's roots are used.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Reads every PEM certificate in `path`; `key` names the config key in errors.
pub fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

/// The roots certificates are checked against: the bundle at `ca` (named `key` in errors),
/// else the system's.
pub fn roots(ca: Option<&Path>, key: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for c in read_certs(path, key)? {
                roots
                    .add(c)
                    .map_err(|e| format!("{key}: {}: {e}", path.display()))?;
            }
        }
        None => {
            // Missing or unreadable system roots only matter for https peers; those then fail
            // with a clear certificate error on connect.
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    Ok(roots)
}

/// A client config builder with the guard's crypto provider and `roots`, waiting for the
/// client-authentication choice.
pub fn builder(
    roots: rustls::RootCertStore,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, String> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots))
}

/// A client config without a client certificate.
pub fn config(ca: Option<&Path>, key: &str) -> Result<rustls::ClientConfig, String> {
    Ok(builder(roots(ca, key)?)?.with_no_client_auth())
}
