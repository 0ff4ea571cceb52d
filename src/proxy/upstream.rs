//! The Qlik Sense proxy nodes behind the guard and the connection pool to them.
//!
//! The QPS speaks HTTP/1.1, so the pool is hyper-util's HTTP/1.1 client: keep-alive
//! connections per node, reaped when idle for `proxy.pool_idle_timeout` (kept below the QPS's
//! own keep-alive timeout, so the guard never sends a request down a connection the QPS is
//! closing), plain http or https with the system roots or a configured CA.

use std::error::Error as StdError;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Config;
use crate::proxy::error::ProxyError;
use crate::proxy::pool::Pool;

/// The body sent upstream: the client's, cut off at `server.max_body_size`.
pub type UpstreamBody = Limited<Incoming>;

/// One Qlik Sense proxy node.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    name_arc: Arc<str>,
    scheme: Scheme,
    authority: Authority,
    /// Position in the list (the pool's index).
    pub index: usize,
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Node {
    pub fn name_arc(&self) -> Arc<str> {
        self.name_arc.clone()
    }

    /// The absolute URI of `path_and_query` on this node.
    pub fn uri(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(
                path_and_query
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
            .build()
    }
}

/// The nodes and the pool.
pub struct Upstreams {
    nodes: Vec<Arc<Node>>,
    next: AtomicUsize,
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    response_timeout: Duration,
    /// Keep-alive connections for the HTTP/1 engine.
    pub pool: Arc<Pool>,
}

impl Upstreams {
    pub fn new(config: &Config) -> Result<Upstreams, String> {
        let p = &config.proxy;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(p.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = tls_client_config(p.upstream_ca.as_deref())?;
        let mut engine_tls = tls.clone();
        engine_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let pool = Arc::new(Pool::new(
            config.upstreams.len(),
            engine_tls,
            p.connect_timeout,
            p.pool_idle_timeout,
            p.pool_max_idle_per_upstream,
        ));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(p.pool_idle_timeout)
            .pool_max_idle_per_host(p.pool_max_idle_per_upstream)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // Host is forwarded exactly as the client sent it, never made from the node's URL.
            .set_host(false)
            .build(connector);
        let nodes = config
            .upstreams
            .iter()
            .enumerate()
            .map(|(index, u)| {
                let tls = u.url.scheme_str() == Some("https");
                let authority = u.url.authority().cloned().expect("validated in config");
                Arc::new(Node {
                    name: u.display_name(),
                    name_arc: u.display_name().into(),
                    scheme: u.url.scheme().cloned().unwrap_or(Scheme::HTTP),
                    index,
                    host: authority
                        .host()
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string(),
                    port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
                    tls,
                    authority,
                })
            })
            .collect();
        Ok(Upstreams {
            nodes,
            next: AtomicUsize::new(0),
            client,
            response_timeout: p.response_timeout,
            pool,
        })
    }

    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    /// The node called `name`, if it is still configured.
    pub fn by_name(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.iter().find(|n| n.name == name).cloned()
    }

    /// The node for the next request (round robin until the balancing issue makes sessions
    /// sticky to the node that created them).
    pub fn pick(&self) -> Result<Arc<Node>, ProxyError> {
        if self.nodes.is_empty() {
            return Err(ProxyError::NoUpstream);
        }
        let i = if self.nodes.len() == 1 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len()
        };
        Ok(self.nodes[i].clone())
    }

    /// Sends the request and waits (up to `proxy.response_timeout`) for the response head.
    pub async fn send(
        &self,
        node: &Node,
        req: Request<UpstreamBody>,
        body_limit: u64,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(ProxyError::UpstreamTimeout {
                upstream: node.name.clone(),
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(node, &e, body_limit)),
        }
    }
}

/// Turns a client error into what went wrong, in words.
fn classify(node: &Node, e: &hyper_util::client::legacy::Error, body_limit: u64) -> ProxyError {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    let mut deepest = e.to_string();
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return ProxyError::PayloadTooLarge { limit: body_limit };
        }
        deepest = s.to_string();
        source = s.source();
    }
    if e.is_connect() {
        ProxyError::UpstreamUnreachable {
            upstream: node.name.clone(),
            detail: deepest,
        }
    } else {
        ProxyError::UpstreamFailed {
            upstream: node.name.clone(),
            detail: deepest,
        }
    }
}

/// The roots that upstream certificates are checked against: the given CA bundle, else the
/// system's.
pub fn root_store(ca: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("proxy.upstream_ca: cannot read {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "proxy.upstream_ca: {} holds no PEM certificate",
                    path.display()
                ));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("proxy.upstream_ca: {}: {e}", path.display()))?;
            }
        }
        None => {
            // Missing or unreadable system roots only matter for https upstreams; those then
            // fail with a clear certificate error on connect.
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    Ok(roots)
}

/// The TLS settings for https upstreams (hyper-rustls sets ALPN to http/1.1 from
/// `enable_http1`).
fn tls_client_config(ca: Option<&std::path::Path>) -> Result<rustls::ClientConfig, String> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(root_store(ca)?)
    .with_no_client_auth())
}
