//! The proxy's shared state (settings, nodes, session guard, diagnostics, tunnels), and the
//! HTTP/2 path (hyper), one request as a short sequence of named phases (HTTP/1 has the same
//! phases in [`h1`]):
//!
//! 1. **admit**: refuse what must not reach Qlik (CONNECT, a missing Host, a body over the
//!    limit);
//! 2. **prepare**: choose the node and build the upstream request: hop-by-hop fields out,
//!    X-Forwarded-* set, HTTP/2 cookies joined, Host and every cookie byte kept;
//! 3. **send**: to the node's keep-alive pool, with the response timeout;
//! 4. **respond**: hop-by-hop fields out of the response, every `Set-Cookie` kept as its own
//!    field in order; a `101` hands both connections to the WebSocket tunnel;
//! 5. **log**: one line when the response body is done (see [`access_log`]).
//!
//! Any failure is a [`ProxyError`], which becomes a status code and a readable page in one place.

pub mod access_log;
pub mod error;
pub mod h1;
pub mod headers;
pub mod hold_last;
pub mod pool;
pub mod tunnel;
pub mod upstream;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::diagnostics::Diagnostics;
use crate::session::{self, page, table::Session, SessionGuard, Verdict};
use access_log::{Logged, Record};
pub use error::ProxyError;
use headers::TrustedProxies;
use upstream::{Node, Upstreams};

/// A response body: Qlik's, streamed, or one the guard wrote (a page, a buffered error page).
pub type Body = Either<Incoming, Full<Bytes>>;

/// The body of every response the guard sends, with its access-log line.
pub type ProxyBody = Logged<Body>;

/// What the proxy knows about the client connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// The settings the hot path reads, copied out of the config at start and at each reload.
pub(crate) struct Settings {
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_header_size: usize,
    pub(crate) response_timeout: Duration,
    pub(crate) send_timeout: Duration,
    pub(crate) health: crate::config::HealthConfig,
    pub(crate) max_body_size: u64,
    websocket_idle_timeout: Option<Duration>,
    log_requests: bool,
    trusted: TrustedProxies,
    sticky_cookie: Option<String>,
    /// Every virtual proxy's session cookie name (the sticky cookie counts only next to one).
    session_cookies: Vec<String>,
}

impl Settings {
    fn new(config: &Config) -> Settings {
        Settings {
            header_read_timeout: config.server.header_read_timeout,
            max_header_size: config.server.max_header_size as usize,
            response_timeout: config.proxy.response_timeout,
            send_timeout: config.server.send_timeout,
            health: config.health.clone(),
            max_body_size: config.server.max_body_size,
            websocket_idle_timeout: config.server.websocket_idle_timeout,
            log_requests: config.log.requests,
            trusted: TrustedProxies::new(config.server.trusted_proxies.clone()),
            sticky_cookie: config.proxy.sticky_cookie.clone(),
            session_cookies: config
                .virtual_proxies_or_default()
                .into_iter()
                .map(|v| v.session_cookie)
                .collect(),
        }
    }
}

/// The proxy: shared by every connection. What a reload may change (the settings, the nodes)
/// sits behind an [`ArcSwap`]: each phase of a request loads the current value, and the send
/// phase keeps what it loaded to the end of the response, so a reload never changes the
/// rules under an exchange with Qlik in flight.
pub struct Proxy {
    settings: ArcSwap<Settings>,
    /// Events, metrics, the cookie self-test.
    pub diagnostics: Diagnostics,
    /// The session guard (`sessions.guard = true`, the default).
    pub(crate) sessions: Option<Arc<SessionGuard>>,
    upstreams: ArcSwap<Upstreams>,
    /// Open WebSocket tunnels, closed on shutdown after in-flight requests.
    tunnels: TaskTracker,
    close_tunnels: CancellationToken,
}

impl Proxy {
    pub fn new(config: &Config) -> Result<Proxy, String> {
        let diagnostics = Diagnostics::new(config);
        Ok(Proxy {
            settings: ArcSwap::from_pointee(Settings::new(config)),
            upstreams: ArcSwap::from_pointee(Upstreams::new(config)?),
            sessions: if config.sessions.guard {
                Some(Arc::new(SessionGuard::new(
                    config,
                    diagnostics.events.clone(),
                )?))
            } else {
                None
            },
            diagnostics,
            tunnels: TaskTracker::new(),
            close_tunnels: CancellationToken::new(),
        })
    }

    /// The nodes as they are now (a reload may replace them; this value stays whole).
    pub fn upstreams(&self) -> Arc<Upstreams> {
        self.upstreams.load_full()
    }

    pub(crate) fn settings(&self) -> arc_swap::Guard<Arc<Settings>> {
        self.settings.load()
    }

    /// Applies a reloaded config: the settings the hot path reads, the nodes (see
    /// [`Upstreams::take_over`]) and the session guard's policy. Requests in flight finish
    /// under the values they started with; connections and WebSockets stay open.
    pub fn reload(&self, config: &Config) -> Result<(), String> {
        // What can fail, first: nothing has changed if it does.
        if let Some(g) = &self.sessions {
            let current = self.upstreams();
            for (i, u) in config.upstreams.iter().enumerate() {
                let name = u.display_name();
                let moved = current.by_name(&name).filter(|n| !n.has_url(&u.url));
                let live = moved.map_or(0, |_| g.node_load(&name));
                if live > 0 {
                    return Err(format!(
                        "upstream[{i}].url: the node {name} holds {live} live sessions at its old URL, \
                         which Qlik cannot move: drain it until they have ended, or give the new URL a new name"
                    ));
                }
            }
        }
        let apis = match &self.sessions {
            Some(g) => Some(g.prepare_reload(config)?),
            None => None,
        };
        let mut next = Upstreams::new(config)?;
        let current = self.upstreams();
        next.take_over(&current, config, |n| {
            self.sessions
                .as_ref()
                .is_some_and(|g| g.node_load(&n.name) > 0)
        });
        if let (Some(g), Some(apis)) = (&self.sessions, apis) {
            let kept: Vec<&str> = next.nodes().iter().map(|n| n.name.as_str()).collect();
            g.reload(config, apis, &kept);
        }
        for n in next.nodes() {
            if n.is_retired() {
                tracing::warn!(
                    upstream = %n.name,
                    sessions = self.sessions.as_ref().map_or(0, |g| g.node_load(&n.name)),
                    "node removed from the config: it keeps serving its live sessions and goes when they have ended"
                );
            }
        }
        self.settings.store(Arc::new(Settings::new(config)));
        self.upstreams.store(Arc::new(next));
        Ok(())
    }

    /// Checks every node every `health.interval` (read anew each round, so a reload applies)
    /// until `stop`; a node going down marks its sessions lost. Retired nodes whose last
    /// session has ended are dropped here.
    pub async fn health_forever(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let cfg = self.settings().health.clone();
            tokio::select! {
                _ = tokio::time::sleep(cfg.interval) => {}
                _ = stop.cancelled() => return,
            }
            let ups = self.upstreams();
            for node in ups.nodes() {
                let (ok, what) = ups.check(node, &cfg).await;
                if let Some(up) = node.record(ok, what.clone(), cfg.fall, cfg.rise) {
                    if up {
                        tracing::warn!(upstream = %node.name, "Qlik node is up again: {what}");
                    } else {
                        tracing::error!(upstream = %node.name, "Qlik node is down: {what}");
                        if let Some(g) = &self.sessions {
                            g.node_lost(&node.name);
                        }
                    }
                }
            }
            let sessions = self.sessions.clone();
            let unused = |n: &Node| sessions.as_ref().is_none_or(|g| g.node_load(&n.name) == 0);
            if let Some(fewer) = ups.without_retired(unused) {
                // Only if no reload replaced the list meanwhile.
                let prev = self.upstreams.compare_and_swap(&ups, Arc::new(fewer));
                if Arc::ptr_eq(&prev, &ups) {
                    tracing::info!("a removed node's last session has ended: the node is gone");
                }
            }
        }
    }

    /// Closes idle upstream connections past `proxy.pool_idle_timeout` until `stop`.
    pub async fn reap_forever(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let every = self.upstreams().pool.reap_every();
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            let ups = self.upstreams();
            for node in ups.nodes() {
                ups.pool.reap(node);
            }
        }
    }

    pub fn sessions(&self) -> Option<&Arc<SessionGuard>> {
        self.sessions.as_ref()
    }

    /// The node for a request: a Qlik session lives in the memory of the node that made it,
    /// and a login dance exists only on the node that started it; anything else goes to the
    /// node with the fewest live sessions (for its weight) that is up and not draining.
    pub(crate) fn node_for(
        &self,
        ctx: Option<&session::Context>,
        sticky: Option<&str>,
    ) -> Result<Arc<Node>, ProxyError> {
        let wanted = ctx.and_then(|c| {
            c.session
                .as_ref()
                .map(|s| s.node.clone())
                .or_else(|| c.node_hint.clone())
        });
        let ups = self.upstreams.load();
        if let Some(n) = wanted.and_then(|name| ups.by_name(&name)) {
            if n.is_up() {
                return Ok(n);
            }
            let keep = self
                .sessions
                .as_ref()
                .is_some_and(|g| g.policy().on_node_down == crate::config::OnNodeDown::Error);
            if keep && ctx.is_some_and(|c| c.session.is_some()) {
                return Err(ProxyError::SessionNodeDown {
                    upstream: n.name.clone(),
                });
            }
        }
        // A session the guard has not seen created: the sticky cookie says where it lives
        // (`sticky` is only given when the request carries a session cookie; a login without
        // one is a new session, balanced like any other, never sent to a draining node).
        let unseen = ctx.is_none_or(|c| c.unknown.is_some());
        if let (true, Some(n)) = (unseen, sticky.and_then(|v| ups.by_sticky(v))) {
            if n.is_up() {
                return Ok(n);
            }
        }
        match &self.sessions {
            Some(g) => ups.pick_by(|n| g.node_load(&n.name)),
            None => ups.pick(),
        }
    }

    /// The sticky cookie's value in a request (when `proxy.sticky_cookie` is set), if the
    /// request also carries a virtual proxy's session cookie: without one there is no session
    /// to stick to.
    pub(crate) fn sticky_in<H: crate::head_view::HeadView>(&self, headers: &H) -> Option<String> {
        let settings = self.settings();
        let name = settings.sticky_cookie.as_deref()?;
        let value = session::cookies::find(headers, name).first?;
        settings
            .session_cookies
            .iter()
            .any(|c| session::cookies::find(headers, c).count > 0)
            .then(|| value.to_string())
    }

    /// The sticky cookie to set on a response from `node`, when the request did not carry it
    /// (with several nodes only: with one there is nothing to stick to).
    pub(crate) fn sticky_set_cookie(
        &self,
        sent: Option<&str>,
        node: &Node,
        tls: bool,
    ) -> Option<HeaderValue> {
        let settings = self.settings();
        let name = settings.sticky_cookie.as_deref()?;
        if sent == Some(&*node.sticky) || self.upstreams.load().nodes().len() < 2 {
            return None;
        }
        let c = cookie::Cookie::build((name, &*node.sticky))
            .path("/")
            .http_only(true)
            .same_site(cookie::SameSite::Lax)
            .secure(tls)
            .build();
        HeaderValue::from_str(&c.to_string()).ok()
    }

    /// A connection to `node` failed: passive failure detection (the health settings' `fall`).
    pub(crate) fn node_failed(&self, node: &Node, why: &str) {
        let s = self.settings();
        if let Some(false) = node.record(false, why.to_string(), s.health.fall, s.health.rise) {
            tracing::error!(upstream = %node.name, "Qlik node is down: {why}");
            if let Some(g) = &self.sessions {
                g.node_lost(&node.name);
            }
        }
    }

    /// Closes every tunnel and waits (bounded) for them to go.
    pub async fn close_tunnels(&self, wait: Duration) {
        self.close_tunnels.cancel();
        self.tunnels.close();
        let _ = tokio::time::timeout(wait, self.tunnels.wait()).await;
    }

    /// Number of open WebSocket tunnels.
    pub fn open_tunnels(&self) -> usize {
        self.tunnels.len()
    }

    /// The hyper service entry point.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let record = self.settings().log_requests.then(|| {
            Box::new(Record {
                method: req.method().clone(),
                path: req.uri().path().to_string(),
                status: StatusCode::OK,
                upstream: None,
                started,
                bytes: 0,
                peer: conn.peer.ip(),
                end: "ok",
            })
        });
        let (resp, node) = match self.forward(req, conn).await {
            Ok((resp, node)) => (resp, node),
            Err((e, node)) => {
                if let (true, Some(n)) = (e.is_upstream(), &node) {
                    self.diagnostics.metrics.upstream_error(&n.name, e.cause());
                    if matches!(e, ProxyError::UpstreamUnreachable { .. }) {
                        self.node_failed(n, &e.to_string());
                    }
                }
                if e.is_upstream() {
                    tracing::warn!(client = %conn.peer, "{e}");
                } else {
                    tracing::info!(client = %conn.peer, "refused: {e}");
                }
                (e.to_response().map(Either::Right), node)
            }
        };
        self.diagnostics
            .metrics
            .request(resp.status().as_u16(), started.elapsed().as_secs_f64());
        let record = record.map(|mut r| {
            r.status = resp.status();
            r.upstream = node.map(|n| n.name.clone());
            r
        });
        Ok(resp.map(|b| Logged::new(b, record)))
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<(Response<Body>, Option<Arc<Node>>), (ProxyError, Option<Arc<Node>>)> {
        self.admit(&req).map_err(|e| (e, None))?;
        if let Some(check) = &self.diagnostics.cookie_check {
            let (path, query) = (req.uri().path(), req.uri().query());
            if let Some(resp) = check.handle(path, query, req.headers(), conn.tls) {
                return Ok((resp.map(Either::Right), None));
            }
        }
        let sticky = self.sticky_in(req.headers());
        let Some(guard) = &self.sessions else {
            let node = self
                .node_for(None, sticky.as_deref())
                .map_err(|e| (e, None))?;
            let mut resp = self.exchange(req, conn, &node, None).await?;
            if let Some(v) = self.sticky_set_cookie(sticky.as_deref(), &node, conn.tls) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
            return Ok((resp.map(Either::Left), Some(node)));
        };
        if req.uri().path() == page::END_SESSION_PATH {
            let (parts, body) = req.into_parts();
            let body = match http_body_util::BodyExt::collect(Limited::new(body, 8 * 1024)).await {
                Ok(b) => b.to_bytes(),
                Err(_) => Bytes::new(),
            };
            let resp = guard
                .end_session_form(parts.method.as_str().as_bytes(), &parts.headers, &body)
                .await;
            return Ok((resp.map(Either::Right), None));
        }
        let (mut parts, body) = req.into_parts();
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let view = session::Request {
            method: parts.method.as_str().as_bytes(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        };
        let ctx = match guard.before(&view, conn.peer.ip(), conn.tls).await {
            Verdict::Pass => None,
            Verdict::Forward(ctx) => Some(ctx),
            Verdict::Answer(resp) => return Ok((resp.map(Either::Right), None)),
        };
        if let Some((name, value)) = ctx.as_deref().and_then(|c| guard.cookie_to_send(c)) {
            session::cookies::set_request_cookie(&mut parts.headers, name, value);
        }
        let node = self
            .node_for(ctx.as_deref(), sticky.as_deref())
            .map_err(|e| {
                if let Some(c) = &ctx {
                    guard.abandon(c);
                }
                (e, None)
            })?;
        let req = Request::from_parts(parts, body);
        let mut resp = match self.exchange(req, conn, &node, ctx.as_deref()).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(c) = &ctx {
                    guard.abandon(c);
                }
                return Err(e);
            }
        };
        let user = ctx.as_ref().and_then(|c| {
            c.identity
                .clone()
                .or_else(|| c.session.as_ref().and_then(|s| s.owner()))
        });
        if let Some(c) = &ctx {
            let status = resp.status().as_u16();
            for v in guard.after(c, &node.name_arc(), &target, status, resp.headers()) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        if let Some(v) = self.sticky_set_cookie(sticky.as_deref(), &node, conn.tls) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
        let resp = self.watch_for_qps_refusal(guard, resp, user).await;
        Ok((resp, Some(node)))
    }

    /// Phases 2 to 4 for one request to `node`.
    async fn exchange(
        &self,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        node: &Arc<Node>,
        ctx: Option<&session::Context>,
    ) -> Result<Response<Incoming>, (ProxyError, Option<Arc<Node>>)> {
        // Counted until the response head (the body then streams on its own).
        let _busy = node.busy();
        let client_upgrade = headers::upgrade_requested(req.headers())
            .map(|proto| (proto, hyper::upgrade::on(&mut req)));
        let upstream_req = self
            .prepare(
                req,
                conn,
                node,
                client_upgrade.as_ref().map(|(p, _)| p.clone()),
            )
            .map_err(|e| (e, Some(node.clone())))?;
        let max_body = self.settings().max_body_size;
        let resp = self
            .upstreams()
            .send(node, upstream_req, max_body)
            .await
            .map_err(|e| (e, Some(node.clone())))?;
        Ok(self.respond(resp, client_upgrade, ctx))
    }

    /// Qlik's own "too many sessions" page is the failure the guard exists to prevent: when it
    /// gets through anyway, it must show in the log and the counters, with the user.
    async fn watch_for_qps_refusal(
        &self,
        guard: &SessionGuard,
        resp: Response<Incoming>,
        user: Option<session::identity::User>,
    ) -> Response<Body> {
        let html = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
        let small = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n <= 64 * 1024);
        if !(resp.status().is_client_error() && html && small) {
            return resp.map(Either::Left);
        }
        let (parts, body) = resp.into_parts();
        let bytes = match http_body_util::BodyExt::collect(body).await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                tracing::debug!("error page from Qlik broke off: {e}");
                Bytes::new()
            }
        };
        guard.note_possible_qps_refusal(&bytes, user);
        Response::from_parts(parts, Either::Right(Full::new(bytes)))
    }

    /// Phase 1: what must not reach Qlik at all. The HTTP/2 server has checked the frame
    /// layer; this applies the HTTP/1 engine's rules to what becomes an HTTP/1.1 request for
    /// Qlik (RFC 9113 8.2: no connection-specific fields, no CR, LF or NUL in a value; one
    /// valid Content-Length; Host agreeing with `:authority`).
    fn admit(&self, req: &Request<Incoming>) -> Result<(), ProxyError> {
        if req.method() == Method::CONNECT || req.method() == Method::TRACE {
            return Err(ProxyError::MethodNotAllowed);
        }
        let h = req.headers();
        if h.iter().any(|(_, v)| {
            v.as_bytes()
                .iter()
                .any(|&b| h1::parse::is_ctl(b) && b != b'\t')
        }) {
            return Err(ProxyError::BadRequest(
                "a header value holds a control character",
            ));
        }
        let mut hosts = h.get_all(header::HOST).iter();
        let host = hosts.next();
        if hosts.next().is_some() {
            return Err(ProxyError::BadRequest("more than one Host header"));
        }
        if let Some(host) = host {
            if !h1::parse::valid_host(host.as_bytes()) {
                return Err(ProxyError::BadRequest(
                    "the Host header is not a valid host",
                ));
            }
        }
        if host.is_none() && req.version() == Version::HTTP_11 {
            return Err(ProxyError::BadRequest("HTTP/1.1 request without Host"));
        }
        if req.uri().path_and_query().is_none() || !req.uri().path().starts_with('/') {
            return Err(ProxyError::BadRequest("the request target is not a path"));
        }
        let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
        if let Some(len) = lengths.next() {
            let len = h1::parse::content_length(len.as_bytes())
                .ok_or(ProxyError::BadRequest("invalid Content-Length"))?;
            if lengths.next().is_some() {
                return Err(ProxyError::BadRequest("more than one Content-Length"));
            }
            let limit = self.settings().max_body_size;
            if len > limit {
                return Err(ProxyError::PayloadTooLarge { limit });
            }
        }
        if req.version() == Version::HTTP_2 {
            const CONNECTION_SPECIFIC: [&str; 5] = [
                "connection",
                "keep-alive",
                "proxy-connection",
                "transfer-encoding",
                "upgrade",
            ];
            if CONNECTION_SPECIFIC.iter().any(|n| h.contains_key(*n))
                || h.get_all(header::TE).iter().any(|v| v != "trailers")
            {
                return Err(ProxyError::BadRequest(
                    "a connection-specific header field in an HTTP/2 request",
                ));
            }
            if let (Some(host), Some(authority)) = (host, req.uri().authority()) {
                if !host
                    .as_bytes()
                    .eq_ignore_ascii_case(authority.as_str().as_bytes())
                {
                    return Err(ProxyError::BadRequest(
                        "the Host header differs from :authority",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Phase 2: the request as the node gets it.
    fn prepare(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        node: &Node,
        upgrade: Option<HeaderValue>,
    ) -> Result<Request<upstream::UpstreamBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let h2 = parts.version == Version::HTTP_2;
        let authority = if h2 { authority_of(&parts.uri) } else { None };
        parts.uri = node
            .uri(parts.uri.path_and_query())
            .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded"))?;
        if h2 {
            // HTTP/2 carries the host in :authority; an HTTP/1.1 upstream needs a Host field.
            if !parts.headers.contains_key(header::HOST) {
                if let Some(a) = authority {
                    parts.headers.insert(header::HOST, a);
                }
            }
            headers::join_cookies(&mut parts.headers);
        }
        parts.version = Version::HTTP_11;
        headers::remove_hop_by_hop(&mut parts.headers);
        if let Some(proto) = upgrade {
            headers::restore_upgrade(&mut parts.headers, proto);
        }
        let host = parts.headers.get(header::HOST).cloned();
        let settings = self.settings();
        headers::set_forwarded(
            &mut parts.headers,
            conn.peer.ip(),
            &settings.trusted,
            conn.tls,
            host.as_ref(),
        );
        let body = Limited::new(
            hold_last::HoldLast::new(body),
            settings.max_body_size as usize,
        );
        Ok(Request::from_parts(parts, body))
    }

    /// Phase 4: the response as the client gets it.
    fn respond(
        &self,
        mut resp: Response<Incoming>,
        client_upgrade: Option<(HeaderValue, hyper::upgrade::OnUpgrade)>,
        ctx: Option<&session::Context>,
    ) -> Response<Incoming> {
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let upgrade_proto = resp.headers().get(header::UPGRADE).cloned();
        headers::remove_hop_by_hop(resp.headers_mut());
        match (client_upgrade, switching) {
            (Some((_, client_side)), true) => {
                if let Some(p) = upgrade_proto {
                    headers::restore_upgrade(resp.headers_mut(), p);
                }
                let upstream_side = hyper::upgrade::on(&mut resp);
                let engine: Option<Engine> =
                    match (&self.sessions, ctx.and_then(|c| c.session.clone())) {
                        (Some(g), Some(s)) => Some((g.clone(), s, ctx.and_then(|c| c.app.clone()))),
                        _ => None,
                    };
                self.spawn_tunnel(client_side, upstream_side, engine);
            }
            (Some(_), false) => {
                // The upgrade was refused: end the connection after this answer (the client
                // may already be sending frames).
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }

    fn spawn_tunnel(
        &self,
        client: hyper::upgrade::OnUpgrade,
        upstream: hyper::upgrade::OnUpgrade,
        engine: Option<Engine>,
    ) {
        let idle = self.settings().websocket_idle_timeout;
        let stop = self.close_tunnels.clone();
        self.tunnels.spawn(async move {
            let (client, upstream) = match tokio::try_join!(client, upstream) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!("upgrade did not complete: {e}");
                    return;
                }
            };
            run_tunnel(
                TokioIo::new(client),
                TokioIo::new(upstream),
                None,
                engine,
                idle,
                stop,
            )
            .await;
        });
    }

    /// The HTTP/1 engine's tunnel: the client's socket (with bytes it sent after the upgrade
    /// request) and the upstream connection (with bytes Qlik sent after its 101).
    pub(crate) fn spawn_tunnel_h1<S>(
        &self,
        client: S,
        early: BytesMut,
        upstream: pool::Conn,
        engine: Option<Engine>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let idle = self.settings().websocket_idle_timeout;
        let stop = self.close_tunnels.clone();
        self.tunnels.spawn(async move {
            use tokio::io::AsyncWriteExt;
            let pool::Conn {
                io: mut up,
                buf: from_qlik,
                ..
            } = upstream;
            if !early.is_empty() && up.write_all(&early).await.is_err() {
                return;
            }
            drop(early);
            let mut client = client;
            if !from_qlik.is_empty() && client.write_all(&from_qlik).await.is_err() {
                return;
            }
            run_tunnel(client, up, Some(from_qlik), engine, idle, stop).await;
        });
    }
}

/// What the session guard needs to follow an engine WebSocket.
pub(crate) type Engine = (Arc<SessionGuard>, Arc<Session>, Option<String>);

/// Runs a tunnel; an engine WebSocket is counted on its session and listened to.
async fn run_tunnel<C, U>(
    client: C,
    upstream: U,
    already_sent: Option<BytesMut>,
    engine: Option<Engine>,
    idle: Option<Duration>,
    stop: CancellationToken,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    U: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // An open engine WebSocket keeps its session alive in Qlik: count it, and listen for the
    // notifications that end the session.
    let observer = engine.as_ref().map(|(guard, s, app)| {
        guard.table.websocket_opened(s, app.clone());
        let mut o = guard.engine_observer(s.clone());
        if let Some(bytes) = &already_sent {
            o(bytes);
        }
        o
    });
    // An idle tunnel keeps no buffer.
    drop(already_sent);
    let (ending, moved) = tunnel::run(client, upstream, idle, stop, observer).await;
    if let Some((guard, s, app)) = &engine {
        guard.table.websocket_closed(s, app.as_deref());
    }
    tracing::debug!(
        ?ending,
        to_upstream = moved.to_upstream,
        to_client = moved.to_client,
        "websocket closed"
    );
}

fn authority_of(uri: &http::Uri) -> Option<HeaderValue> {
    uri.authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
}
