//! The listeners and the life of a connection, from accept to graceful shutdown, and the
//! reload that changes them while the guard serves.
//!
//! [`Guard::start`] binds everything first (so a bad address fails before anything serves),
//! then runs one accept loop per listener. Each client connection is served by the HTTP/1.1
//! engine (`proxy::h1`), or by hyper's HTTP/2 server when TLS ALPN picked `h2`.
//!
//! A reload ([`Control::reload`]: SIGHUP or `POST /reload`) reads the config file again and
//! applies it in an order that cannot half-fail: everything that can fail (parsing,
//! certificates, the token, binding a new address, the nodes' APIs) is done first, and any
//! failure leaves the running config in place. Then the new values are swapped in; open
//! connections and WebSockets are not touched. See [`handover`] for a new binary taking over.
//!
//! Shutdown, in order: stop accepting; tell every connection to finish its in-flight request
//! and close; wait for them up to `server.grace_period`; then close the WebSocket tunnels.

pub mod handover;
pub mod tls;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::config::Config;
use crate::proxy::{ConnInfo, Proxy};

/// Per-connection settings, copied out of the config at start and at each reload.
struct ConnSettings {
    header_read_timeout: Duration,
    max_header_size: usize,
    tls: Option<TlsAcceptor>,
}

impl ConnSettings {
    fn new(config: &Config) -> Result<ConnSettings, String> {
        Ok(ConnSettings {
            header_read_timeout: config.server.header_read_timeout,
            max_header_size: config.server.max_header_size as usize,
            tls: tls::server_config(&config.server)?.map(TlsAcceptor::from),
        })
    }
}

/// The main listener and the token that stops its accept loop (a reload that moves the
/// listener stops the old loop; the connections it accepted go on).
struct Listening {
    listen: SocketAddr,
    addr: SocketAddr,
    /// Dropped at shutdown, so that the port is closed while the connections finish.
    socket: Option<Arc<TcpListener>>,
    stop: CancellationToken,
}

/// What a running guard can be told to do while it serves: reload, hand over to a new binary.
pub struct Control {
    proxy: Arc<Proxy>,
    conn: Arc<ArcSwap<ConnSettings>>,
    listening: Mutex<Listening>,
    admin_socket: Mutex<Option<Arc<TcpListener>>>,
    admin_token: Arc<RwLock<Option<Arc<str>>>>,
    config: Mutex<Config>,
    slots: Arc<Semaphore>,
    connections: TaskTracker,
    stop: CancellationToken,
    /// A successor process took the listeners over: it owns the snapshot file now.
    handed_over: AtomicBool,
}

impl Control {
    /// Reads the config file again and applies it (see the module doc). `Ok` says what
    /// changed; `Err` says why the new config was refused, and the old one keeps running.
    pub fn reload(&self) -> Result<String, String> {
        let path = self
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .source
            .clone()
            .ok_or("the guard was started without a config file: there is nothing to reload")?;
        let new = Config::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        self.apply(new)
    }

    /// Applies `new` in place of the running config.
    pub fn apply(&self, mut new: Config) -> Result<String, String> {
        let mut current = self.config.lock().unwrap_or_else(|e| e.into_inner());
        if new.source.is_none() {
            new.source = current.source.clone();
        }
        // 1. Everything that can fail, before anything changes.
        let conn = ConnSettings::new(&new)?;
        let token = new.admin.token().map_err(|e| e.to_string())?;
        // The admin listener that serves is the one bound at start (admin.listen needs a
        // restart): it decides whether a token is needed.
        if token.is_none() && !current.admin.listen.ip().is_loopback() {
            return Err(
                "admin.token_file: the admin listener is off loopback and needs a token".into(),
            );
        }
        let mut listening = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        let moved = if new.server.listen != listening.listen {
            let socket = bind(new.server.listen, "server.listen", new.server.reuse_port)?;
            let addr = socket.local_addr().map_err(|e| e.to_string())?;
            Some((socket, addr))
        } else {
            None
        };
        self.proxy.reload(&new)?;
        // 2. Nothing below fails.
        self.conn.store(Arc::new(conn));
        *self.admin_token.write().unwrap_or_else(|e| e.into_inner()) = token.map(Into::into);
        let mut notes = Vec::new();
        if let Some((socket, addr)) = moved {
            let socket = Arc::new(socket);
            let stop = self.stop.child_token();
            tokio::spawn(accept_loop(
                socket.clone(),
                self.proxy.clone(),
                self.conn.clone(),
                self.slots.clone(),
                self.connections.clone(),
                stop.clone(),
                self.stop.clone(),
            ));
            let old = std::mem::replace(
                &mut *listening,
                Listening {
                    listen: new.server.listen,
                    addr,
                    socket: Some(socket),
                    stop,
                },
            );
            old.stop.cancel();
            notes.push(format!("listening on {addr} instead of {}", old.addr));
        }
        let restart = current.restart_only_changes(&new);
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "changed in the config file, applied only by a restart");
            notes.push(format!("needs a restart to apply: {}", restart.join(", ")));
        }
        let nodes: Vec<String> = self
            .proxy
            .upstreams()
            .nodes()
            .iter()
            .map(|n| n.name.clone())
            .collect();
        notes.push(format!("nodes: {}", nodes.join(", ")));
        *current = new;
        Ok(notes.join("; "))
    }

    /// The main listener's address now (a reload may move it).
    pub fn addr(&self) -> SocketAddr {
        self.listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .addr
    }

    /// The listening sockets, for a successor process to inherit.
    pub(crate) fn sockets(&self) -> Vec<(&'static str, Arc<TcpListener>)> {
        let server = self
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .socket
            .clone();
        let admin = self
            .admin_socket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        [("server", server), ("admin", admin)]
            .into_iter()
            .filter_map(|(k, s)| Some((k, s?)))
            .collect()
    }

    /// Lets go of the listening sockets (the accept loops hold the last references).
    fn close_listeners(&self) {
        self.listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .socket = None;
        *self.admin_socket.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The session snapshot file, if any.
    pub(crate) fn snapshot_file(&self) -> Option<std::path::PathBuf> {
        self.config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sessions
            .snapshot_file
            .clone()
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// A successor serves now: stop, and leave the snapshot file to it.
    pub(crate) fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Release);
        self.stop.cancel();
    }
}

/// A running guard: its bound addresses and the handle to stop it.
pub struct Guard {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    control: Arc<Control>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Guard {
    /// Binds the listeners (or takes them over from the process this one replaces, see
    /// [`handover`]) and starts serving on the current tokio runtime.
    pub async fn start(config: Config) -> Result<Guard, String> {
        let conn = Arc::new(ArcSwap::from_pointee(ConnSettings::new(&config)?));
        let reuse = config.server.reuse_port;
        let listener = Arc::new(match handover::inherited("server", config.server.listen) {
            Some(l) => l,
            None => bind(config.server.listen, "server.listen", reuse)?,
        });
        let admin_listener = Arc::new(match handover::inherited("admin", config.admin.listen) {
            Some(l) => l,
            None => bind(config.admin.listen, "admin.listen", reuse)?,
        });
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
        let proxy = Arc::new(Proxy::new(&config)?);
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        let admin_token = Arc::new(RwLock::new(
            config
                .admin
                .token()
                .map_err(|e| e.to_string())?
                .map(Into::into),
        ));
        let accept_stop = stop.child_token();
        let control = Arc::new(Control {
            proxy: proxy.clone(),
            conn: conn.clone(),
            listening: Mutex::new(Listening {
                listen: config.server.listen,
                addr,
                socket: Some(listener.clone()),
                stop: accept_stop.clone(),
            }),
            admin_socket: Mutex::new(Some(admin_listener.clone())),
            admin_token: admin_token.clone(),
            config: Mutex::new(config.clone()),
            slots: Arc::new(Semaphore::new(config.server.max_connections)),
            connections: connections.clone(),
            stop: stop.clone(),
            handed_over: AtomicBool::new(false),
        });
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            admin::State {
                proxy: proxy.clone(),
                token: admin_token,
                loopback: config.admin.listen.ip().is_loopback(),
                control: Arc::downgrade(&control),
            },
            stop.clone(),
        ));
        let snapshot = config.sessions.snapshot_file.clone();
        if let Some(sessions) = proxy.sessions() {
            if let Some(path) = &snapshot {
                if path.exists() {
                    match sessions.load_snapshot(path) {
                        Ok((loaded, dropped)) => tracing::info!(
                            file = %path.display(), loaded, dropped,
                            "sessions restored from the snapshot (dropped: expired meanwhile or of a removed virtual proxy)"
                        ),
                        Err(e) => tracing::warn!("the session snapshot was not loaded: {e}"),
                    }
                }
                tokio::spawn(save_periodically(
                    sessions.clone(),
                    path.clone(),
                    config.sessions.snapshot_interval,
                    stop.clone(),
                ));
            }
            // Off the start path: an unreachable QPS API must not delay serving.
            let g = sessions.clone();
            tokio::spawn(async move {
                match g.reconcile().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        sessions = n,
                        "sessions learnt from the QPS REST API at start"
                    ),
                    Err(e) => {
                        tracing::warn!("cannot reconcile with the QPS REST API at start: {e}")
                    }
                }
            });
            tokio::spawn(sessions.clone().sweep_forever(stop.clone()));
            if let (Some(path), Some(pid)) = (&snapshot, handover::predecessor()) {
                tokio::spawn(handover::merge_when_gone(
                    sessions.clone(),
                    pid,
                    handover::side_file(path),
                    stop.clone(),
                ));
            }
        }
        tokio::spawn(proxy.clone().reap_forever(stop.clone()));
        tokio::spawn(proxy.clone().health_forever(stop.clone()));
        tokio::spawn(accept_loop(
            listener,
            proxy.clone(),
            conn,
            control.slots.clone(),
            connections.clone(),
            accept_stop,
            stop.clone(),
        ));
        let grace = config.server.grace_period;
        let end = control.clone();
        let stopped = stop.clone();
        let done = tokio::spawn(async move {
            stopped.cancelled().await;
            end.close_listeners();
            connections.close();
            if tokio::time::timeout(grace, connections.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    left = connections.len(),
                    "grace period over: closing the connections still open"
                );
            }
            end.proxy.close_tunnels(Duration::from_secs(2)).await;
            let handed_over = end.handed_over.load(Ordering::Acquire);
            // After a handover the new process owns the snapshot file: this one's last word
            // goes to the side file the new process merges once this one is gone.
            let path = end.snapshot_file().map(|p| {
                if handed_over {
                    handover::side_file(&p)
                } else {
                    p
                }
            });
            if let (Some(g), Some(path)) = (end.proxy.sessions(), &path) {
                match g.save_snapshot(path) {
                    Ok(n) => {
                        tracing::info!(file = %path.display(), sessions = n, "session snapshot written")
                    }
                    Err(e) => {
                        tracing::error!(file = %path.display(), "cannot write the session snapshot: {e}")
                    }
                }
            }
            let _ = admin_task.await;
            tracing::info!("stopped");
        });
        tracing::info!(%addr, %admin_addr, tls = config.server.tls_cert.is_some(), pid = std::process::id(), "qsguard listening");
        Ok(Guard {
            addr,
            admin_addr,
            control,
            stop,
            done,
        })
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.control.proxy
    }

    /// Reload, listener handover: what can be done to the guard while it serves.
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// A token that starts the graceful shutdown when cancelled.
    pub fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Starts the graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }

    /// Waits until the guard has stopped (after the stopper was cancelled).
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Writes the session snapshot every `every` until the guard stops (the final one is written
/// at shutdown).
async fn save_periodically(
    sessions: Arc<crate::session::SessionGuard>,
    path: std::path::PathBuf,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        let (s, p) = (sessions.clone(), path.clone());
        match tokio::task::spawn_blocking(move || s.save_snapshot(&p)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::error!(file = %path.display(), "cannot write the session snapshot: {e}")
            }
            Err(e) => tracing::error!("the snapshot writer failed: {e}"),
        }
    }
}

fn bind(addr: SocketAddr, key: &str, reuse_port: bool) -> Result<TcpListener, String> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| format!("{key}: {e}"))?;
    let _ = socket.set_reuse_address(true);
    if reuse_port {
        socket
            .set_reuse_port(true)
            .map_err(|e| format!("server.reuse_port: {e}"))?;
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| format!("{key}: {e}"))?;
    socket
        .bind(&addr.into())
        .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))?;
    socket
        .listen(4096)
        .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))?;
    TcpListener::from_std(socket.into()).map_err(|e| format!("{key}: {e}"))
}

/// Accepts until `own` (a reload moved the listener) or `stop` (shutdown); the connections
/// hear of `stop` only.
async fn accept_loop(
    listener: Arc<TcpListener>,
    proxy: Arc<Proxy>,
    settings: Arc<ArcSwap<ConnSettings>>,
    slots: Arc<Semaphore>,
    connections: TaskTracker,
    own: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        // At max_connections, stop accepting: new clients wait in the backlog.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = own.cancelled() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = own.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let settings = settings.load_full();
        let stop = stop.clone();
        connections.spawn(async move {
            serve_connection(stream, peer, proxy, settings, stop).await;
            drop(permit);
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    settings: Arc<ConnSettings>,
    stop: CancellationToken,
) {
    let Some(acceptor) = settings.tls.clone() else {
        let info = ConnInfo { peer, tls: false };
        return serve_http1(stream, info, proxy, &settings, stop).await;
    };
    let tls =
        match tokio::time::timeout(settings.header_read_timeout, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(client = %peer, "TLS handshake failed: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!(client = %peer, "TLS handshake timed out");
                return;
            }
        };
    let info = ConnInfo { peer, tls: true };
    if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
        serve_http2(tls, info, proxy, &settings, stop).await
    } else {
        serve_http1(tls, info, proxy, &settings, stop).await
    }
}

async fn serve_http1<S>(
    stream: S,
    info: ConnInfo,
    proxy: Arc<Proxy>,
    _settings: &ConnSettings,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    crate::proxy::h1::serve(stream, info, proxy, stop).await
}

async fn serve_http2<S>(
    stream: S,
    info: ConnInfo,
    proxy: Arc<Proxy>,
    settings: &ConnSettings,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| crate::proxy::h2::handle(proxy.clone(), req, info));
    let conn = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_size as u32)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %info.peer, "HTTP/2 connection ended: {e}");
    }
}
