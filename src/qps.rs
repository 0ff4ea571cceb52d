//! Talking to Qlik about sessions: who owns one, and ending one.
//!
//! Two ways, as `qlik-sessions.md` describes them:
//! - the **Personal API** through the virtual proxy with the session's own cookie
//!   (`GET`/`DELETE /<prefix>/qps/user`): needs no certificate, works on every site;
//! - the **QPS REST API** (`[qps_api]`, port 4243, mutual TLS with Qlik's exported client
//!   certificate, Xrfkey): `GET`/`DELETE /qps/<vp/>session/<id>`, `GET /qps/<vp/>session`.
//!
//! Replies are accepted in PascalCase (what the QPS sends) and camelCase (what some docs show).
//! Every call has a timeout and an error that says what failed in words.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;
use serde::Deserialize;

use crate::config::QpsApiConfig;
use crate::session::identity::User;
use crate::tls_client::{self, read_certs};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed call, in words an admin can act on.
#[derive(Debug, Clone)]
pub struct QpsError(pub String);

impl fmt::Display for QpsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for QpsError {}

/// What Qlik says about a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    User(User),
    /// The cookie is not a live session (Personal API `{"session":"inactive"}`, REST 404).
    Inactive,
}

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The Personal API client: plain requests to a node through a virtual proxy.
#[derive(Clone)]
pub struct PersonalApi {
    client: HttpsClient,
}

impl PersonalApi {
    pub fn new(tls: rustls::ClientConfig) -> PersonalApi {
        PersonalApi {
            client: client(tls),
        }
    }

    /// `GET /<prefix>/qps/user` with the session's cookie, on `node` (e.g. `http://qlik1:80`).
    /// `host` is the Host the browser used: Qlik's host allow list checks it.
    pub async fn owner(
        &self,
        node: &Uri,
        prefix: &str,
        host: Option<&HeaderValue>,
        cookie_name: &str,
        cookie_value: &str,
    ) -> Result<Owner, QpsError> {
        let req = personal_request(Method::GET, node, prefix, host, cookie_name, cookie_value)?;
        let (status, body) = call(&self.client, req, "the Personal API").await?;
        if !status.is_success() {
            return Err(QpsError(format!(
                "the Personal API answered {status} for GET {}qps/user",
                vp_path(prefix)
            )));
        }
        let reply: PersonalUser = serde_json::from_slice(&body).map_err(|e| {
            QpsError(format!(
                "the Personal API sent JSON the guard cannot read: {e}"
            ))
        })?;
        match (
            reply.session.as_deref(),
            reply.user_directory,
            reply.user_id,
        ) {
            (Some("inactive"), _, _) => Ok(Owner::Inactive),
            (_, Some(dir), Some(id)) => Ok(Owner::User(User::new(&dir, &id))),
            _ => Ok(Owner::Inactive),
        }
    }

    /// `DELETE /<prefix>/qps/user` with the session's own cookie: logs that session out.
    pub async fn logout(
        &self,
        node: &Uri,
        prefix: &str,
        host: Option<&HeaderValue>,
        cookie_name: &str,
        cookie_value: &str,
    ) -> Result<(), QpsError> {
        let req = personal_request(
            Method::DELETE,
            node,
            prefix,
            host,
            cookie_name,
            cookie_value,
        )?;
        let (status, _) = call(&self.client, req, "the Personal API").await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(QpsError(format!(
                "the Personal API answered {status} for DELETE {}qps/user",
                vp_path(prefix)
            )))
        }
    }
}

#[derive(Deserialize)]
struct PersonalUser {
    session: Option<String>,
    #[serde(alias = "UserDirectory")]
    #[serde(rename = "userDirectory")]
    user_directory: Option<String>,
    #[serde(alias = "UserId")]
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

fn vp_path(prefix: &str) -> String {
    if prefix.is_empty() {
        "/".into()
    } else {
        format!("/{prefix}/")
    }
}

fn personal_request(
    method: Method,
    node: &Uri,
    prefix: &str,
    host: Option<&HeaderValue>,
    cookie_name: &str,
    cookie_value: &str,
) -> Result<Request<Full<Bytes>>, QpsError> {
    let uri = format!(
        "{}://{}{}qps/user",
        node.scheme_str().unwrap_or("http"),
        node.authority().map(|a| a.as_str()).unwrap_or(""),
        vp_path(prefix)
    );
    let mut b = Request::builder().method(method).uri(uri);
    match host {
        Some(h) => b = b.header(header::HOST, h.clone()),
        None => {
            if let Some(a) = node.authority() {
                b = b.header(header::HOST, a.as_str());
            }
        }
    }
    b.header(header::COOKIE, format!("{cookie_name}={cookie_value}"))
        .header(header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| QpsError(format!("cannot build the Personal API request: {e}")))
}

/// A session as the QPS REST API describes it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct ApiSession {
    #[serde(alias = "userDirectory", rename = "UserDirectory")]
    pub user_directory: String,
    #[serde(alias = "userId", rename = "UserId")]
    pub user_id: String,
    #[serde(alias = "sessionId", rename = "SessionId", default)]
    pub session_id: String,
}

/// The QPS REST API client (`[qps_api]`).
#[derive(Clone)]
pub struct QpsApi {
    base: Uri,
    client: HttpsClient,
}

impl QpsApi {
    /// Loads the client certificate and CA; an `https` url needs the certificate.
    pub fn new(cfg: &QpsApiConfig) -> Result<QpsApi, String> {
        let https = cfg.url.scheme_str() == Some("https");
        let builder = tls_client::builder(tls_client::roots(cfg.ca.as_deref(), "qps_api.ca")?)?;
        let tls = match (&cfg.client_cert, &cfg.client_key) {
            (Some(cert), Some(key)) => {
                let chain = read_certs(cert, "qps_api.client_cert")?;
                check_validity(cert, &chain)?;
                let key_der = {
                    use rustls_pki_types::pem::PemObject;
                    rustls_pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
                        format!(
                            "qps_api.client_key: cannot read a PEM private key from {}: {e}",
                            key.display()
                        )
                    })?
                };
                builder
                    .with_client_auth_cert(chain, key_der)
                    .map_err(|e| format!("qps_api.client_cert/client_key: {e}"))?
            }
            (None, None) if !https => builder.with_no_client_auth(),
            (None, None) => {
                return Err(
                    "qps_api.client_cert: an https QPS API needs Qlik's client certificate \
                     (client.pem and client_key.pem, exported from the QMC)"
                        .into(),
                )
            }
            (Some(_), None) => {
                return Err("qps_api.client_key: must be set with client_cert".into())
            }
            (None, Some(_)) => {
                return Err("qps_api.client_cert: must be set with client_key".into())
            }
        };
        Ok(QpsApi {
            base: cfg.url.clone(),
            client: client(tls),
        })
    }

    /// The same client (certificate, CA) for the API at `base`: another node's.
    pub fn at(&self, base: Uri) -> QpsApi {
        QpsApi {
            base,
            client: self.client.clone(),
        }
    }

    /// Where the API is.
    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// The API's host name (to tell which node it belongs to).
    pub fn host(&self) -> &str {
        self.base.host().unwrap_or("")
    }

    fn uri(&self, path: &str, key: &str) -> String {
        format!(
            "{}://{}{}?Xrfkey={key}",
            self.base.scheme_str().unwrap_or("https"),
            self.base.authority().map(|a| a.as_str()).unwrap_or(""),
            path
        )
    }

    async fn call(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), QpsError> {
        let key = xrfkey();
        let req = Request::builder()
            .method(method.clone())
            .uri(self.uri(path, &key))
            .header("X-Qlik-Xrfkey", &key)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| QpsError(format!("cannot build the QPS API request: {e}")))?;
        call(&self.client, req, "the QPS REST API")
            .await
            .map_err(|e| QpsError(format!("{method} {path}: {e}")))
    }

    /// `GET /qps/<vp/>session/<id>`.
    pub async fn owner(&self, prefix: &str, session_id: &str) -> Result<Owner, QpsError> {
        let path = format!("/qps/{}session/{}", api_vp(prefix), session_id);
        let (status, body) = self.call(Method::GET, &path).await?;
        match status {
            StatusCode::NOT_FOUND => Ok(Owner::Inactive),
            s if s.is_success() => {
                if body.trim_ascii().is_empty() || &body[..] == b"null" {
                    return Ok(Owner::Inactive);
                }
                let s: ApiSession = serde_json::from_slice(&body).map_err(|e| {
                    QpsError(format!(
                        "the QPS REST API sent a session the guard cannot read: {e}"
                    ))
                })?;
                Ok(Owner::User(User::new(&s.user_directory, &s.user_id)))
            }
            s => Err(QpsError(format!(
                "the QPS REST API answered {s} for GET {path}"
            ))),
        }
    }

    /// `DELETE /qps/<vp/>session/<id>`: ends the session and its connections.
    pub async fn end(&self, prefix: &str, session_id: &str) -> Result<(), QpsError> {
        let path = format!("/qps/{}session/{}", api_vp(prefix), session_id);
        let (status, _) = self.call(Method::DELETE, &path).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(QpsError(format!(
                "the QPS REST API answered {status} for DELETE {path}"
            )))
        }
    }

    /// `GET /qps/<vp/>session`: every session of the virtual proxy on this node.
    pub async fn sessions(&self, prefix: &str) -> Result<Vec<ApiSession>, QpsError> {
        let path = format!("/qps/{}session", api_vp(prefix));
        let (status, body) = self.call(Method::GET, &path).await?;
        if !status.is_success() {
            return Err(QpsError(format!(
                "the QPS REST API answered {status} for GET {path}"
            )));
        }
        serde_json::from_slice(&body).map_err(|e| {
            QpsError(format!(
                "the QPS REST API sent a list the guard cannot read: {e}"
            ))
        })
    }
}

fn api_vp(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    }
}

/// A fresh anti-forgery key: 16 letters and digits.
pub fn xrfkey() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..16)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn client(tls: rustls::ClientConfig) -> HttpsClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(20))
        .pool_timer(TokioTimer::new())
        .set_host(false)
        .build(connector)
}

async fn call(
    client: &HttpsClient,
    req: Request<Full<Bytes>>,
    what: &str,
) -> Result<(StatusCode, Bytes), QpsError> {
    let fut = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| QpsError(describe(&e, what)))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| QpsError(format!("{what}: the answer broke off: {e}")))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(CALL_TIMEOUT, fut).await.map_err(|_| {
        QpsError(format!(
            "{what} did not answer within {}s",
            CALL_TIMEOUT.as_secs()
        ))
    })?
}

/// The deepest cause of a client error, with the TLS cases spelt out.
fn describe(e: &hyper_util::client::legacy::Error, what: &str) -> String {
    use std::error::Error;
    let mut deepest = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        deepest = s.to_string();
        src = s.source();
    }
    let lower = deepest.to_lowercase();
    let hint = if lower.contains("expired") {
        " (a certificate has expired: export a new client certificate from the QMC)"
    } else if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        " (the server certificate is not signed by qps_api.ca)"
    } else if lower.contains("certificate required") || lower.contains("handshake") {
        " (the QPS did not accept the client certificate)"
    } else {
        ""
    };
    format!("cannot reach {what}: {deepest}{hint}")
}

/// Refuses an expired client certificate up front, with a message that says so (the QPS would
/// only close the TLS handshake).
fn check_validity(
    path: &Path,
    chain: &[rustls_pki_types::CertificateDer<'_>],
) -> Result<(), String> {
    let Some(leaf) = chain.first() else {
        return Ok(());
    };
    if let Some(not_after) = x509_not_after(leaf.as_ref()) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if not_after < now {
            return Err(format!(
                "qps_api.client_cert: the certificate in {} expired (export a new one from the QMC)",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Reads notAfter from a DER certificate (a small walk of the ASN.1, enough for validity).
fn x509_not_after(der: &[u8]) -> Option<i64> {
    fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *b.first()?;
        let first = *b.get(1)? as usize;
        let (len, hdr) = if first < 0x80 {
            (first, 2)
        } else {
            let n = first & 0x7f;
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | *b.get(2 + i)? as usize;
            }
            (len, 2 + n)
        };
        let body = b.get(hdr..hdr + len)?;
        Some((tag, body, &b[hdr + len..]))
    }
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    // [0] version (optional), serial, signature algorithm, issuer, validity
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r;
        let (_, _, r) = tlv(rest)?; // serial
        rest = r;
    } else {
        rest = r; // that was the serial
    }
    let (_, _, r) = tlv(rest)?; // signature algorithm
    let (_, _, r) = tlv(r)?; // issuer
    let (_, validity, _) = tlv(r)?;
    let (_, _, r) = tlv(validity)?; // notBefore
    let (tag, t, _) = tlv(r)?; // notAfter
    let s = std::str::from_utf8(t).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = s.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
        }
        0x18 => (s.get(0..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let num = |i: usize| -> Option<i64> { rest.get(i..i + 2)?.parse().ok() };
    let (mo, d, h, mi, se) = (num(0)?, num(2)?, num(4)?, num(6)?, num(8)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xrfkeys_are_fresh_and_16_alnum() {
        let a = xrfkey();
        let b = xrfkey();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn both_json_casings_are_read() {
        let pascal: ApiSession = serde_json::from_str(
            r#"{"UserDirectory":"CORP","UserId":"jane","SessionId":"x","Attributes":[]}"#,
        )
        .unwrap();
        let camel: ApiSession =
            serde_json::from_str(r#"{"userDirectory":"CORP","userId":"jane","sessionId":"x"}"#)
                .unwrap();
        assert_eq!(pascal, camel);
        let p: PersonalUser =
            serde_json::from_str(r#"{"UserDirectory":"CORP","UserId":"jane"}"#).unwrap();
        assert_eq!(p.user_id.as_deref(), Some("jane"));
    }

    #[test]
    fn not_after_of_a_generated_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["qps".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 3, 4);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let t = x509_not_after(cert.der()).unwrap();
        assert_eq!(t, 1_930_348_800); // 2031-03-04T00:00:00Z
    }
}
