//! The listeners and the life of a connection, from accept to graceful shutdown, and the
//! reload that changes them while the guard serves.
//!
//! [`Guard::start`] binds everything first (so a bad address fails before anything serves),
//! then runs one accept loop per listener. Each client connection is served by the HTTP/1.1
//! engine (`proxy::h1`), or by the HTTP/2 server (`proxy::h2_tasks`) when TLS ALPN picked `h2`.
//!
//! A reload ([`Control::reload`]: SIGHUP or `POST /reload`) reads the config file again and
//! applies it in an order that cannot half-fail: everything that can fail (parsing,
//! certificates, the token, binding a new address, the nodes' APIs) is done first, and any
//! failure leaves the running config in place. Then the new values are swapped in; open
//! connections and WebSockets are not touched. See [`handover`] for a new binary taking over.
//!
//! Shutdown, in order: stop accepting; tell every connection to finish its in-flight request
//! and close; wait for them up to `server.grace_period`; then close the WebSocket tunnels.

mod control;
pub mod handover;
pub mod tls;

pub use control::Control;
use control::Listening;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
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
    /// [`handover`]) and starts serving on the current tokio runtime: first everything that
    /// can fail (binding, certificates, the token, the nodes), then the admin API, the session
    /// guard's background work, the proxy's health checks and pool reaper, the accept loop,
    /// and the task that waits for the shutdown.
    pub async fn start(config: Config) -> Result<Guard, String> {
        let conn = Arc::new(ArcSwap::from_pointee(ConnSettings::new(&config)?));
        let listener = Arc::new(listener_for("server", &config.server.listen, &config)?);
        let admin_listener = Arc::new(listener_for("admin", &config.admin.listen, &config)?);
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
        let proxy = Arc::new(Proxy::new(&config)?);
        let admin_token = Arc::new(RwLock::new(
            config
                .admin
                .token()
                .map_err(|e| e.to_string())?
                .map(Into::into),
        ));
        let stop = CancellationToken::new();
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
            serving: Serving {
                proxy: proxy.clone(),
                conn: conn.clone(),
                slots: Arc::new(Semaphore::new(config.server.max_connections)),
                connections: TaskTracker::new(),
                stop: stop.clone(),
                cut: CancellationToken::new(),
            },
            stop: stop.clone(),
            handed_over: AtomicBool::new(false),
        });
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            admin::State {
                proxy: proxy.clone(),
                token: admin_token,
                allowed_hosts: config.admin.allowed_hosts.clone().into(),
                control: {
                    let reload: Arc<dyn crate::admin::Reload> = control.clone();
                    Arc::downgrade(&reload)
                },
            },
            stop.clone(),
        ));
        if let Some(sessions) = proxy.sessions() {
            start_session_guard(sessions, &config, &stop);
            sessions.join_pair(stop.clone()).await;
        }
        tokio::spawn(proxy.clone().reap_forever(stop.clone()));
        tokio::spawn(proxy.clone().health_forever(stop.clone()));
        tokio::spawn(accept_loop(listener, control.serving.clone(), accept_stop));
        let done = tokio::spawn(shut_down_when_told(
            control.clone(),
            config.server.grace_period,
            admin_task,
        ));
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

/// The listening socket `name` ("server", "admin"): inherited from the process this one
/// replaces, else bound now.
fn listener_for(name: &str, addr: &SocketAddr, config: &Config) -> Result<TcpListener, String> {
    match handover::inherited(name, *addr) {
        Some(l) => Ok(l),
        None => bind(*addr, &format!("{name}.listen"), config.server.reuse_port),
    }
}

/// The session guard's background work: the snapshot (loaded now, written periodically), the
/// reconciliation with the QPS REST API, the sweeper, and the merge of a predecessor's last
/// snapshot after an upgrade.
fn start_session_guard(
    sessions: &Arc<crate::session::SessionGuard>,
    config: &Config,
    stop: &CancellationToken,
) {
    let snapshot = config.sessions.snapshot_file.clone();
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
            Err(e) => tracing::warn!("cannot reconcile with the QPS REST API at start: {e}"),
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

/// The shutdown, once the stop token is cancelled: stop accepting, let the connections finish
/// within `grace`, close the tunnels, write the last snapshot, stop the admin API.
async fn shut_down_when_told(
    control: Arc<Control>,
    grace: Duration,
    admin_task: tokio::task::JoinHandle<()>,
) {
    control.stop.cancelled().await;
    control.close_listeners();
    let connections = control.serving.connections.clone();
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = connections.len(),
            "grace period over: closing the connections still open"
        );
        control.serving.cut.cancel();
        connections.wait().await;
    }
    control.proxy.close_tunnels(Duration::from_secs(2)).await;
    let handed_over = control.handed_over.load(Ordering::Acquire);
    // After a handover the new process owns the snapshot file: this one's last word goes to
    // the side file the new process merges once this one is gone.
    let path = control.snapshot_file().map(|p| {
        if handed_over {
            handover::side_file(&p)
        } else {
            p
        }
    });
    if let (Some(g), Some(path)) = (control.proxy.sessions(), &path) {
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

/// How the kernel finds a client that vanished (a laptop closed, a VPN dropped, a NAT that
/// forgot the connection): keepalive probes after this long with nothing received...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// ...every this long, this many times, unanswered...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;
/// ...and at most this long for data sent to stay unacknowledged (the probes only run on a
/// connection with nothing in flight; a stalled write to a vanished client needs this).
const UNACKNOWLEDGED_LIMIT: Duration = Duration::from_secs(90);

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
    // Set on the listener, so every accepted connection inherits them (Linux) without a
    // system call of its own. This is how a dead client is found, on every protocol: HTTP/2
    // PING keep-alives (as hyper's were) cost a lock and a clock read per frame received, some
    // thousand instructions per request; nginx and HAProxy rely on the kernel too.
    let _ = socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    );
    let _ = socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_LIMIT));
    socket
        .bind(&addr.into())
        .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))?;
    socket
        .listen(4096)
        .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))?;
    TcpListener::from_std(socket.into()).map_err(|e| format!("{key}: {e}"))
}

/// What every accept loop and connection task shares.
#[derive(Clone)]
pub(crate) struct Serving {
    proxy: Arc<Proxy>,
    conn: Arc<ArcSwap<ConnSettings>>,
    /// `server.max_connections`.
    slots: Arc<Semaphore>,
    connections: TaskTracker,
    /// Shutdown: connections finish their request and close.
    stop: CancellationToken,
    /// The grace period is over: what is still open is closed.
    cut: CancellationToken,
}

/// Accepts until `own` (a reload moved the listener) or the shutdown; the connections hear
/// of the shutdown only.
async fn accept_loop(listener: Arc<TcpListener>, serving: Serving, own: CancellationToken) {
    let Serving {
        proxy,
        conn: settings,
        slots,
        connections,
        stop,
        cut,
    } = serving;
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
        let cut = cut.clone();
        connections.spawn(async move {
            // Polled on every wake-up of the connection: a kept watch, not a new waiter each
            // time (`cut.cancelled()` here cost ~300 instructions per request).
            let mut cut = crate::proxy::shutdown_watch::ShutdownWatch::new(cut);
            tokio::select! {
                biased;
                _ = serve_connection(stream, peer, proxy, settings, stop) => {}
                // Past the grace period: dropping the connection's future closes its sockets.
                _ = cut.requested() => {}
            }
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
    let idle = proxy.settings().http2_idle_timeout;
    let streams = crate::proxy::h2::Streams::default();
    let counted = streams.clone();
    // The streams run in this task (see proxy::h2_tasks), not each in a task of its own.
    let handshake =
        crate::proxy::h2_tasks::builder(settings.max_header_size as u32).handshake(stream);
    let conn = crate::proxy::h2_tasks::Served::new(handshake, move |req, respond| {
        crate::proxy::h2::stream(proxy.clone(), req, respond, info, counted.clone())
    });
    let mut stop = crate::proxy::shutdown_watch::ShutdownWatch::new(stop);
    let close = async {
        tokio::select! {
            _ = stop.requested() => {}
            // GOAWAY, then the connection ends: nothing is open on it.
            _ = streams.idle_for(idle) => {
                tracing::debug!(client = %info.peer, "HTTP/2 connection idle for server.http2_idle_timeout: closed");
            }
        }
    };
    let result = crate::proxy::h2_tasks::drive(conn, close).await;
    if let Err(e) = result {
        tracing::debug!(client = %info.peer, "HTTP/2 connection ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The dead-client detection is set once on the listener: every accepted connection must
    /// carry it (it is not set again per connection).
    #[tokio::test]
    async fn accepted_connections_inherit_the_dead_client_detection() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), "server.listen", false).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let s = socket2::SockRef::from(&accepted);
        assert!(s.keepalive().unwrap(), "SO_KEEPALIVE");
        assert_eq!(s.keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(s.keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(s.keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(UNACKNOWLEDGED_LIMIT));
    }
}
