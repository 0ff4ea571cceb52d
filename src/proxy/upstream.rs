//! The Qlik Sense proxy nodes behind the guard and the connection pool to them.
//!
//! The QPS speaks HTTP/1.1; every request goes to it over the engine's own keep-alive
//! connections ([`Pool`], kept on each node), plain http or https with the system roots or a
//! configured CA. Each node has its state (up, draining, retired), its weight and its
//! in-flight count, for the health checks and the balancing of new sessions.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::SystemTime;

use http::uri::Authority;
use http::Uri;

use crate::config::Config;
use crate::proxy::error::ProxyError;
use crate::proxy::pool::Pool;

/// One Qlik Sense proxy node.
pub struct Node {
    pub name: String,
    name_arc: Arc<str>,
    authority: Authority,
    /// The configured URL: a reload keeps a node (its state, its idle connections) when its
    /// name and URL stay the same.
    url: Uri,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    weight: AtomicU32,
    /// Taken out of the config by a reload while it still had live sessions: it serves them
    /// (like a draining node) and goes when the last one has ended.
    retired: AtomicBool,
    up: AtomicBool,
    draining: AtomicBool,
    fails: AtomicU32,
    oks: AtomicU32,
    last_check: Mutex<Option<(SystemTime, String)>>,
    in_flight: AtomicI64,
    /// The sticky cookie's value for this node: a hash of its name (stable across restarts,
    /// and it does not show the node's host name to browsers).
    pub sticky: Box<str>,
    /// Keep-alive connections to this node, most recently used last (see [`Pool`]).
    pub(crate) idle: Mutex<Vec<crate::proxy::pool::Conn>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("up", &self.is_up())
            .field("draining", &self.is_draining())
            .finish()
    }
}

/// A request on its way to a node (counted while it lives).
pub struct Busy<'a>(&'a Node);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Node {
    fn new(u: &crate::config::UpstreamConfig) -> Node {
        let tls = u.url.scheme_str() == Some("https");
        let authority = u.url.authority().cloned().expect("validated in config");
        Node {
            name: u.display_name(),
            name_arc: u.display_name().into(),
            url: u.url.clone(),
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            tls,
            authority,
            weight: AtomicU32::new(u.weight),
            retired: AtomicBool::new(false),
            up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            fails: AtomicU32::new(0),
            oks: AtomicU32::new(0),
            last_check: Mutex::new(None),
            in_flight: AtomicI64::new(0),
            sticky: blake3::hash(u.display_name().as_bytes()).to_hex()[..12].into(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Whether the node is at `url` (a reload keeps it only then).
    pub fn has_url(&self, url: &Uri) -> bool {
        self.url == *url
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Removed from the config, kept for the sessions it still holds.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub fn name_arc(&self) -> Arc<str> {
        self.name_arc.clone()
    }

    /// Counts a request to this node until the returned guard is dropped.
    pub fn busy(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self)
    }

    /// Requests on their way to this node now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Takes requests (health checks pass, or not enough failures yet).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Gets no new sessions; existing ones stay until they end.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.is_retired()
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Release);
    }

    /// The last health check: when, and what it found.
    pub fn last_check(&self) -> Option<(SystemTime, String)> {
        self.last_check
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Notes a check or connection result; returns `Some(now_up)` when the state changes.
    pub fn record(&self, ok: bool, what: String, fall: u32, rise: u32) -> Option<bool> {
        *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((SystemTime::now(), what));
        if ok {
            self.fails.store(0, Ordering::Release);
            let oks = self.oks.fetch_add(1, Ordering::AcqRel) + 1;
            if !self.is_up() && oks >= rise {
                self.up.store(true, Ordering::Release);
                return Some(true);
            }
        } else {
            self.oks.store(0, Ordering::Release);
            let fails = self.fails.fetch_add(1, Ordering::AcqRel) + 1;
            if self.is_up() && fails >= fall {
                self.up.store(false, Ordering::Release);
                return Some(false);
            }
        }
        None
    }
}

/// The nodes and the pool.
pub struct Upstreams {
    nodes: Vec<Arc<Node>>,
    next: AtomicUsize,
    /// Keep-alive connections for the HTTP/1 engine.
    pub pool: Arc<Pool>,
}

impl Upstreams {
    pub fn new(config: &Config) -> Result<Upstreams, String> {
        let p = &config.proxy;
        let mut tls = crate::tls_client::config(p.upstream_ca.as_deref(), "proxy.upstream_ca")?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let pool = Arc::new(Pool::new(
            tls,
            p.connect_timeout,
            p.pool_idle_timeout,
            p.pool_max_idle_per_upstream,
        ));
        let nodes = config
            .upstreams
            .iter()
            .map(|u| Arc::new(Node::new(u)))
            .collect();
        Ok(Upstreams {
            nodes,
            next: AtomicUsize::new(0),
            pool,
        })
    }

    pub fn nodes(&self) -> &[Arc<Node>] {
        &self.nodes
    }

    /// Makes `self` (built from a reloaded `config` with [`Upstreams::new`]) take over from
    /// `current`. A node whose name and URL stay keeps its state (up or down, draining, idle
    /// connections) and takes the new weight. A node taken out of the config is kept, retired,
    /// while `has_sessions` says it still holds live sessions: Qlik cannot move a session, so
    /// removing a node must not end them. Cannot fail: call it once the reload cannot fail.
    pub fn take_over(
        &mut self,
        current: &Upstreams,
        config: &Config,
        has_sessions: impl Fn(&Node) -> bool,
    ) {
        let next = self;
        for (slot, u) in next.nodes.iter_mut().zip(&config.upstreams) {
            if let Some(old) = current
                .nodes
                .iter()
                .find(|n| n.name == slot.name && n.url == u.url)
            {
                old.weight.store(u.weight, Ordering::Relaxed);
                old.retired.store(false, Ordering::Release);
                *slot = old.clone();
            }
        }
        for old in &current.nodes {
            if !next.nodes.iter().any(|n| n.name == old.name) && has_sessions(old) {
                old.retired.store(true, Ordering::Release);
                next.nodes.push(old.clone());
            }
        }
    }

    /// The same upstreams without the retired nodes for which `gone` says yes; `None` when
    /// there is none to drop.
    pub fn without_retired(&self, gone: impl Fn(&Node) -> bool) -> Option<Upstreams> {
        if !self.nodes.iter().any(|n| n.is_retired() && gone(n)) {
            return None;
        }
        Some(Upstreams {
            nodes: self
                .nodes
                .iter()
                .filter(|n| !(n.is_retired() && gone(n)))
                .cloned()
                .collect(),
            next: AtomicUsize::new(0),
            pool: self.pool.clone(),
        })
    }

    /// The node called `name`, if it is still configured.
    pub fn by_name(&self, name: &str) -> Option<Arc<Node>> {
        self.nodes.iter().find(|n| n.name == name).cloned()
    }

    /// The node a sticky cookie value names.
    pub fn by_sticky(&self, value: &str) -> Option<Arc<Node>> {
        self.nodes.iter().find(|n| &*n.sticky == value).cloned()
    }

    /// The node for a request that carries no session (it may create one): of the nodes that
    /// are up and not draining, the one with the fewest live sessions for its weight.
    pub fn pick(&self) -> Result<Arc<Node>, ProxyError> {
        self.pick_by(|_| 0)
    }

    /// [`Upstreams::pick`] with `load` telling each node's live sessions.
    pub fn pick_by(&self, load: impl Fn(&Node) -> usize) -> Result<Arc<Node>, ProxyError> {
        let n = self.nodes.len();
        if n == 1 && self.nodes[0].is_up() && !self.nodes[0].is_draining() {
            return Ok(self.nodes[0].clone());
        }
        // Ties go round robin: start the scan at a moving offset.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &self.nodes[(start + k) % n])
            .filter(|node| node.is_up() && !node.is_draining())
            .min_by(|a, b| {
                let la = load(a) as u64 * b.weight() as u64;
                let lb = load(b) as u64 * a.weight() as u64;
                la.cmp(&lb)
            })
            .cloned()
            .ok_or(ProxyError::NoUpstream)
    }

    /// One health check: `GET <path>`; an answer within the timeout that `health.expect_status`
    /// accepts (by default, any below 500) is up.
    pub async fn check(&self, node: &Node, cfg: &crate::config::HealthConfig) -> (bool, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let attempt = async {
            let mut conn = self.pool.connect(node).await.map_err(|e| e.to_string())?;
            let req = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: qsguard-health\r\nConnection: close\r\n\r\n",
                cfg.path, node.authority
            );
            conn.io
                .write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let mut got = 0;
            while got < 12 {
                let n = conn
                    .io
                    .read(&mut buf[got..])
                    .await
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            let line = String::from_utf8_lossy(&buf[..got]).to_string();
            let status: u16 = line
                .get(9..12)
                .and_then(|s| s.parse().ok())
                .ok_or("not an HTTP answer")?;
            Ok::<u16, String>(status)
        };
        match tokio::time::timeout(cfg.timeout, attempt).await {
            Ok(Ok(status)) if cfg.is_up(status) => (true, format!("answered {status}")),
            Ok(Ok(status)) => (false, format!("answered {status}")),
            Ok(Err(e)) => (false, e),
            Err(_) => (false, format!("no answer within {:?}", cfg.timeout)),
        }
    }
}
