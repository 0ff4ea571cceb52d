//! The proxy's shared state: settings (reloadable), the Qlik nodes, the session guard,
//! diagnostics and the WebSocket tunnels; and the choices made per request that need it (the
//! node, the sticky cookie). A request itself goes through [`lifecycle`], brought by the
//! HTTP/1 engine ([`h1`]) or the HTTP/2 server ([`h2`]).
//!
//! Any failure is a [`ProxyError`], which becomes a status code and a readable page in one place.

pub mod access_log;
pub mod bound;
pub(crate) mod datetime;
pub(crate) mod deadline;
pub mod error;
pub mod h1;
pub mod h2;
pub mod h2_tasks;
pub mod headers;
pub mod hold_last;
pub mod lifecycle;
pub mod pool;
pub mod relay;
pub(crate) mod shutdown_watch;
pub(crate) mod spare;
pub mod tunnel;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use http::HeaderValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::diagnostics::Diagnostics;
use crate::session::{self, table::Session, SessionGuard};
pub use error::ProxyError;
use headers::TrustedProxies;
use upstream::{Node, Upstreams};

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
    pub(crate) body_min_rate: u64,
    pub(crate) http2_idle_timeout: Duration,
    websocket_idle_timeout: Option<Duration>,
    log_requests: bool,
    trusted: TrustedProxies,
    /// Where each identity header may come from.
    pub(crate) identity: crate::session::identity::IdentitySources,
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
            body_min_rate: config.server.body_min_rate,
            http2_idle_timeout: config.server.http2_idle_timeout,
            websocket_idle_timeout: config.server.websocket_idle_timeout,
            log_requests: config.log.requests,
            trusted: TrustedProxies::new(config.server.trusted_proxies.clone()),
            identity: crate::session::identity::IdentitySources::new(config),
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
    /// Where tunnels between two plain sockets are copied.
    relay: Arc<relay::Relay>,
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
            relay: Arc::default(),
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
    /// `ups`: the nodes the request started with.
    pub(crate) fn node_for(
        &self,
        ups: &Upstreams,
        ctx: Option<&session::Context>,
        sticky: Option<&str>,
    ) -> Result<Arc<Node>, ProxyError> {
        let wanted = ctx.and_then(|c| {
            c.session
                .as_ref()
                .map(|s| s.node.clone())
                .or_else(|| c.node_hint.clone())
        });
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
    pub(crate) fn sticky_in<H: crate::head_view::HeadView>(
        settings: &Settings,
        headers: &H,
    ) -> Option<String> {
        let name = settings.sticky_cookie.as_deref()?;
        let [sticky] = session::cookies::find(headers, [name]);
        let value = sticky.first?;
        settings
            .session_cookies
            .iter()
            .any(|c| session::cookies::find(headers, [c])[0].count > 0)
            .then(|| value.to_string())
    }

    /// The sticky cookie to set on a response from `node`, when the request did not carry it
    /// (with several nodes only: with one there is nothing to stick to).
    pub(crate) fn sticky_set_cookie(
        settings: &Settings,
        ups: &Upstreams,
        sent: Option<&str>,
        node: &Node,
        tls: bool,
    ) -> Option<HeaderValue> {
        let name = settings.sticky_cookie.as_deref()?;
        if sent == Some(&*node.sticky) || ups.nodes().len() < 2 {
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
        let relay = self.relay.clone();
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
            let observer = tunnel_opened(engine.as_ref(), &from_qlik);
            // An idle tunnel keeps no buffer.
            drop(from_qlik);
            // Two plain sockets go to the relay thread; anything over TLS is copied here.
            let (ending, moved) = match (plain_tcp(client), up) {
                (Ok(client), pool::Stream::Plain(up)) => {
                    match relay.run(client, up, idle, stop.clone(), observer).await {
                        Ok(r) => r,
                        Err(back) => {
                            tunnel::run(back.client, back.upstream, idle, stop, back.observer).await
                        }
                    }
                }
                (Ok(client), up) => tunnel::run(client, up, idle, stop, observer).await,
                (Err(client), up) => tunnel::run(client, up, idle, stop, observer).await,
            };
            tunnel_closed(engine.as_ref(), ending, moved);
        });
    }
}

/// The client's socket as a plain TCP stream, if that is what it is.
fn plain_tcp<S: 'static>(client: S) -> Result<tokio::net::TcpStream, S> {
    let mut slot = Some(client);
    match (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<tokio::net::TcpStream>>() {
        Some(tcp) => Ok(tcp.take().expect("just put there")),
        None => Err(slot.take().expect("just put there")),
    }
}

/// What the session guard needs to follow an engine WebSocket.
pub(crate) type Engine = (Arc<SessionGuard>, Arc<Session>, Option<String>);

/// An engine WebSocket is counted on its session and listened to, from the bytes Qlik sent
/// with its 101 on.
fn tunnel_opened(engine: Option<&Engine>, already_sent: &[u8]) -> Option<tunnel::Observer> {
    // An open engine WebSocket keeps its session alive in Qlik: count it, and listen for the
    // notifications that end the session.
    engine.map(|(guard, s, app)| {
        guard.table.websocket_opened(s, app.clone());
        let mut o = guard.engine_observer(s.clone());
        if !already_sent.is_empty() {
            o(already_sent);
        }
        o
    })
}

fn tunnel_closed(engine: Option<&Engine>, ending: tunnel::Ending, moved: tunnel::Transferred) {
    if let Some((guard, s, app)) = engine {
        guard.table.websocket_closed(s, app.as_deref());
    }
    tracing::debug!(
        ?ending,
        to_upstream = moved.to_upstream,
        to_client = moved.to_client,
        "websocket closed"
    );
}
