//! Talking to Qlik about sessions: who owns one, and ending one.
//!
//! Two ways, as `qlik-sessions.md` describes them:
//! - the **Personal API** through the virtual proxy with the session's own cookie
//!   (`GET`/`DELETE /<prefix>/qps/user`): needs no certificate, works on every site;
//! - the **QPS REST API** (`[qps_api]`, port 4243, mutual TLS with Qlik's exported client
//!   certificate, Xrfkey): `GET`/`DELETE /qps/<vp/>session/<id>`, `GET /qps/<vp/>session`.
//!
//! Replies are accepted in PascalCase (what the QPS sends) and camelCase (what some docs show).
//! Every call has a timeout and an error that says what failed in words; no error text carries
//! a session id or cookie value (they end up in logs, the admin API and the limit page), so a
//! path is named by its template (`GET /qps/<vp/>session/{id}`).
//!
//! Every request carries exactly one Host (RFC 9112: a server answers 400 without one): the
//! URL's authority for the REST API; for the Personal API the browser's Host (Qlik's host
//! allow list checks it), else the node's authority. A session id goes into a REST API path
//! only when it has the shape of a Qlik session id (a GUID) and percent-encoded: a value a
//! client chose, like `../user/DIR/victim`, would otherwise be routed by the QPS as another
//! call. [`ApiHealth`] keeps what the REST API's failures were, per node, for `/readyz`,
//! `/metrics`, the events and `qsguard doctor`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

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
use crate::diagnostics::events::{Events, Kind, NewEvent};
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
                "the Personal API sent JSON the guard cannot read ({})",
                json_error(&e)
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
    /// The node this API is asked for, and where its outcomes are reported.
    health: Option<(Arc<str>, Arc<ApiHealth>)>,
}

/// What a REST API call was for: the `operation` label of events and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operation {
    /// `GET /qps/<vp/>session/{id}`.
    Owner,
    /// `DELETE /qps/<vp/>session/{id}`.
    End,
    /// `GET /qps/<vp/>session` (the reconciliation at start).
    List,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Owner => "owner",
            Operation::End => "end",
            Operation::List => "list",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Operation::Owner => "learn a session's owner",
            Operation::End => "end a session",
            Operation::List => "list the sessions",
        }
    }
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
            health: None,
        })
    }

    /// The same client (certificate, CA) for the API at `base`: another node's.
    pub fn at(&self, base: Uri) -> QpsApi {
        QpsApi {
            base,
            client: self.client.clone(),
            health: None,
        }
    }

    /// The same API, reporting each call's outcome to `health` under `node`.
    pub fn reporting(&self, node: Arc<str>, health: Arc<ApiHealth>) -> QpsApi {
        QpsApi {
            health: Some((node, health)),
            ..self.clone()
        }
    }

    fn report<T>(&self, op: Operation, r: Result<T, QpsError>) -> Result<T, QpsError> {
        if let Some((node, health)) = &self.health {
            match &r {
                Ok(_) => health.succeeded(node),
                Err(e) => health.failed(node, op, e),
            }
        }
        r
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

    /// `path` is what goes on the wire; `shown` is how errors name it (no session id).
    async fn call(
        &self,
        method: Method,
        path: &str,
        shown: &str,
    ) -> Result<(StatusCode, Bytes), QpsError> {
        let key = xrfkey();
        let host = self.base.authority().map(|a| a.as_str()).unwrap_or("");
        let req = Request::builder()
            .method(method.clone())
            .uri(self.uri(path, &key))
            .header(header::HOST, host)
            .header("X-Qlik-Xrfkey", &key)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| QpsError(format!("cannot build the QPS API request: {e}")))?;
        call(&self.client, req, "the QPS REST API")
            .await
            .map_err(|e| QpsError(format!("{method} {shown}: {e}")))
    }

    /// `GET /qps/<vp/>session/<id>`. Only for an id with the shape of a Qlik session id
    /// ([`is_session_id`]); any other value is refused here and never sent.
    pub async fn owner(&self, prefix: &str, session_id: &str) -> Result<Owner, QpsError> {
        let path = session_path(prefix, session_id)?;
        let shown = format!("/qps/{}session/{{id}}", api_vp(prefix));
        let r = async {
            let (status, body) = self.call(Method::GET, &path, &shown).await?;
            match status {
                StatusCode::NOT_FOUND => Ok(Owner::Inactive),
                s if s.is_success() => {
                    if body.trim_ascii().is_empty() || &body[..] == b"null" {
                        return Ok(Owner::Inactive);
                    }
                    let s: ApiSession = serde_json::from_slice(&body).map_err(|e| {
                        QpsError(format!(
                            "the QPS REST API sent a session the guard cannot read ({}) for GET {shown}",
                            json_error(&e)
                        ))
                    })?;
                    Ok(Owner::User(User::new(&s.user_directory, &s.user_id)))
                }
                s => Err(QpsError(format!(
                    "the QPS REST API answered {s} for GET {shown}"
                ))),
            }
        }
        .await;
        self.report(Operation::Owner, r)
    }

    /// `DELETE /qps/<vp/>session/<id>`: ends the session and its connections. Only for an id
    /// with the shape of a Qlik session id, like [`QpsApi::owner`].
    pub async fn end(&self, prefix: &str, session_id: &str) -> Result<(), QpsError> {
        let path = session_path(prefix, session_id)?;
        let shown = format!("/qps/{}session/{{id}}", api_vp(prefix));
        let r = async {
            let (status, _) = self.call(Method::DELETE, &path, &shown).await?;
            if status.is_success() || status == StatusCode::NOT_FOUND {
                Ok(())
            } else {
                Err(QpsError(format!(
                    "the QPS REST API answered {status} for DELETE {shown}"
                )))
            }
        }
        .await;
        self.report(Operation::End, r)
    }

    /// `GET /qps/<vp/>session`: every session of the virtual proxy on this node.
    pub async fn sessions(&self, prefix: &str) -> Result<Vec<ApiSession>, QpsError> {
        let path = format!("/qps/{}session", api_vp(prefix));
        let r = async {
            let (status, body) = self.call(Method::GET, &path, &path).await?;
            if !status.is_success() {
                return Err(QpsError(format!(
                    "the QPS REST API answered {status} for GET {path}"
                )));
            }
            serde_json::from_slice(&body).map_err(|e| {
                QpsError(format!(
                    "the QPS REST API sent a list the guard cannot read ({}) for GET {path}",
                    json_error(&e)
                ))
            })
        }
        .await;
        self.report(Operation::List, r)
    }
}

/// Whether `s` has the shape of a Qlik session id: a .NET GUID in `D` format (8-4-4-4-12 hex
/// digits). Only such a value is ever put into a REST API path.
pub fn is_session_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// `/qps/<vp/>session/<id>` with the id percent-encoded, or an error (naming no value) when
/// the id is not a Qlik session id.
fn session_path(prefix: &str, session_id: &str) -> Result<String, QpsError> {
    if !is_session_id(session_id) {
        return Err(QpsError(
            "the session's cookie value is not a Qlik session id (a GUID): it is not sent to the QPS REST API"
                .into(),
        ));
    }
    Ok(format!(
        "/qps/{}session/{}",
        api_vp(prefix),
        percent_encode(session_id)
    ))
}

/// Everything but RFC 3986's unreserved characters escaped: a value stays one path segment.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A JSON error by its kind and place only: serde's own text quotes the offending value, and
/// what a QPS sends back may hold a session id.
fn json_error(e: &serde_json::Error) -> String {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "unexpected fields or types",
        serde_json::error::Category::Eof => "cut off",
    };
    format!("{kind} at line {} column {}", e.line(), e.column())
}

/// A node's QPS REST API that is failing: since when, and the last reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failing {
    pub node: String,
    pub since: SystemTime,
    pub operation: Operation,
    pub reason: String,
}

/// How the QPS REST API has been doing, per node. A failure is an event
/// ([`Kind::QpsApiFailed`], naming node and operation) and a count; the API is failing from
/// its first failure until its next success.
pub struct ApiHealth {
    events: Arc<Events>,
    configured: AtomicBool,
    inner: Mutex<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    failing: BTreeMap<String, Failing>,
    failures: BTreeMap<(String, Operation), u64>,
}

impl ApiHealth {
    pub fn new(events: Arc<Events>) -> ApiHealth {
        ApiHealth {
            events,
            configured: AtomicBool::new(false),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `[qps_api]` is set (a reload may change it).
    pub fn set_configured(&self, on: bool) {
        self.configured.store(on, Ordering::Relaxed);
        if !on {
            self.lock().failing.clear();
        }
    }

    pub fn configured(&self) -> bool {
        self.configured.load(Ordering::Relaxed)
    }

    pub fn succeeded(&self, node: &str) {
        if let Some(f) = self.lock().failing.remove(node) {
            tracing::info!(upstream = %node, since = %humantime::format_rfc3339_seconds(f.since), "the QPS REST API answers again");
        }
    }

    pub fn failed(&self, node: &str, op: Operation, e: &QpsError) {
        {
            let mut g = self.lock();
            *g.failures.entry((node.to_string(), op)).or_default() += 1;
            let since = g
                .failing
                .get(node)
                .map_or_else(SystemTime::now, |f| f.since);
            g.failing.insert(
                node.to_string(),
                Failing {
                    node: node.to_string(),
                    since,
                    operation: op,
                    reason: e.to_string(),
                },
            );
        }
        self.events.emit(NewEvent::new(
            Kind::QpsApiFailed,
            format!(
                "the QPS REST API of {node} failed to {} ({}): {e}",
                op.what(),
                op.as_str()
            ),
        ));
    }

    /// The nodes whose API is failing now, by name.
    pub fn failing(&self) -> Vec<Failing> {
        self.lock().failing.values().cloned().collect()
    }

    /// Failures so far by (node, operation), for `/metrics`.
    pub fn failure_counts(&self) -> Vec<(String, &'static str, u64)> {
        self.lock()
            .failures
            .iter()
            .map(|((n, op), c)| (n.clone(), op.as_str(), *c))
            .collect()
    }

    /// `ok`, `not configured`, or `failing since <time>: <node>: <reason>` (each failing node,
    /// `; ` between them): what `/readyz` and `qsguard doctor` show.
    pub fn summary(&self) -> String {
        if !self.configured() {
            return "not configured".into();
        }
        let failing = self.failing();
        if failing.is_empty() {
            return "ok".into();
        }
        failing
            .iter()
            .map(|f| {
                format!(
                    "failing since {}: {}: {}",
                    humantime::format_rfc3339_seconds(f.since),
                    f.node,
                    f.reason
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
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
        // Each request sets its own Host (the Personal API's is the browser's, not the URL's).
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
    fn only_guid_shaped_values_are_session_ids() {
        assert!(is_session_id("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert!(is_session_id("0F8FAD5B-D9CB-469F-A165-70867728950E"));
        for bad in [
            "",
            "../user/CORP/victim",
            "..%2Fuser%2FCORP%2Fvictim",
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0f8fad5b-d9cb-469f-a165-70867728950e0",
            "0f8fad5bd-9cb-469f-a165-70867728950e",
            "0f8fad5b-d9cb-469f-a165-7086772895/e",
            "{0f8fad5b-d9cb-469f-a165-70867728950e}",
        ] {
            assert!(!is_session_id(bad), "{bad}");
        }
        assert_eq!(percent_encode("a-b._~/%?#"), "a-b._~%2F%25%3F%23");
    }

    /// A server that answers each connection with the next of `answers` (status line, then
    /// body), and records the request heads it received.
    async fn canned(answers: Vec<(&'static str, String)>) -> (Uri, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}", l.local_addr().unwrap())
            .parse()
            .unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            for (status, body) in answers {
                let Ok((mut c, _)) = l.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf).into_owned());
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = c.write_all(answer.as_bytes()).await;
            }
        });
        (uri, heads)
    }

    fn api_at(uri: &Uri) -> QpsApi {
        QpsApi::new(&QpsApiConfig {
            url: uri.clone(),
            client_cert: None,
            client_key: None,
            ca: None,
        })
        .unwrap()
    }

    fn personal() -> PersonalApi {
        PersonalApi::new(crate::tls_client::config(None, "test").unwrap())
    }

    #[tokio::test]
    async fn no_error_text_names_the_session() {
        let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let quoted = |t: &str| t.replace("{id}", id);
        let answers = [
            ("400 Bad Request", quoted(r#"{"error":"no session {id}"}"#)),
            ("500 Internal Server Error", quoted("{id}")),
            ("200 OK", quoted(r#""{id}""#)),
            (
                "200 OK",
                quoted(r#"{"UserDirectory":["{id}"],"UserId":"x"}"#),
            ),
            ("200 OK", quoted(r#"{"UserDirectory":"{id}"#)),
            ("200 OK", quoted("<html>{id}</html>")),
        ];
        let mut errors = Vec::new();
        for (status, body) in answers {
            let all = vec![(status, body.clone()); 5];
            let (uri, heads) = canned(all).await;
            let api = api_at(&uri);
            let p = personal();
            errors.push(api.owner("hdr", id).await.map(|_| ()));
            if !status.starts_with("200") {
                errors.push(api.end("hdr", id).await);
            }
            errors.push(api.sessions("hdr").await.map(|_| ()));
            errors.push(
                p.owner(&uri, "hdr", None, "X-Qlik-Session-hdr", id)
                    .await
                    .map(|_| ()),
            );
            if !status.starts_with("200") {
                errors.push(p.logout(&uri, "hdr", None, "X-Qlik-Session-hdr", id).await);
            }
            // Every request carried exactly one Host: the URL's authority.
            let authority = uri.authority().unwrap().as_str().to_string();
            for h in heads.lock().unwrap().iter() {
                let hosts: Vec<&str> = h
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
                    .map(|(_, v)| v.trim())
                    .collect();
                assert_eq!(hosts, [authority.as_str()], "{h}");
            }
        }
        // Nothing listens: the connection is refused.
        let closed: Uri = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
                .parse()
                .unwrap()
        };
        errors.push(api_at(&closed).owner("", id).await.map(|_| ()));
        errors.push(api_at(&closed).end("", id).await);
        errors.push(
            personal()
                .owner(&closed, "", None, "X-Qlik-Session", id)
                .await
                .map(|_| ()),
        );
        // A value that is not a session id is refused without a request, without naming it.
        let bogus = "../user/CORP/victim";
        errors.push(api_at(&closed).owner("", bogus).await.map(|_| ()));
        errors.push(api_at(&closed).end("", bogus).await);
        assert_eq!(errors.len(), 27);
        for e in errors {
            let e = e.expect_err("every answer above is a failure").to_string();
            assert!(!e.contains(id) && !e.contains(bogus), "{e}");
            assert!(!e.is_empty());
        }
    }

    #[tokio::test]
    async fn the_api_is_failing_from_a_failure_until_the_next_success() {
        let (uri, _) = canned(vec![
            ("503 Service Unavailable", String::new()),
            ("503 Service Unavailable", String::new()),
            ("404 Not Found", String::new()),
        ])
        .await;
        let events = Arc::new(Events::new(10));
        let health = Arc::new(ApiHealth::new(events.clone()));
        assert_eq!(health.summary(), "not configured");
        health.set_configured(true);
        assert_eq!(health.summary(), "ok");
        let api = api_at(&uri).reporting("qlik1".into(), health.clone());
        let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
        api.owner("", id).await.unwrap_err();
        let first = health.failing();
        api.end("", id).await.unwrap_err();
        let failing = health.failing();
        assert_eq!(failing.len(), 1);
        assert_eq!(
            failing[0].since, first[0].since,
            "failing since the first failure"
        );
        assert_eq!(failing[0].operation, Operation::End);
        let summary = health.summary();
        assert!(summary.starts_with("failing since "), "{summary}");
        assert!(summary.contains(": qlik1: "), "{summary}");
        assert!(summary.contains("503 Service Unavailable for DELETE /qps/session/{id}"));
        assert!(!summary.contains(id));
        assert_eq!(events.count(Kind::QpsApiFailed), 2);
        let e = &events.query(0, Some(Kind::QpsApiFailed), None)[1];
        assert!(
            e.cause.contains("qlik1") && e.cause.contains("(end)"),
            "{}",
            e.cause
        );
        assert_eq!(
            health.failure_counts(),
            vec![("qlik1".into(), "owner", 1), ("qlik1".into(), "end", 1)]
        );
        // A 404 is an answer: the session is not there. The API is healthy again.
        assert_eq!(api.owner("", id).await.unwrap(), Owner::Inactive);
        assert_eq!(health.summary(), "ok");
        assert!(health.failing().is_empty());
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
