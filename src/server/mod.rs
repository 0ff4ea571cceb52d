//! The listeners and the life of a connection, from accept to graceful shutdown.
//!
//! [`Guard::start`] binds everything first (so a bad address fails before anything serves),
//! then runs one accept loop per listener. Each client connection is served by the HTTP/1.1
//! engine (`proxy::h1`), or by hyper's HTTP/2 server when TLS ALPN picked `h2`.
//!
//! Shutdown, in order: stop accepting; tell every connection to finish its in-flight request
//! and close; wait for them up to `server.grace_period`; then close the WebSocket tunnels.

pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

/// Per-connection settings, copied out of the config once.
#[derive(Clone)]
struct ConnSettings {
    header_read_timeout: Duration,
    max_header_size: usize,
    tls: Option<TlsAcceptor>,
}

/// A running guard: its bound addresses and the handle to stop it.
pub struct Guard {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    proxy: Arc<Proxy>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Guard {
    /// Binds the listeners and starts serving on the current tokio runtime.
    pub async fn start(config: Config) -> Result<Guard, String> {
        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(c), Some(k)) => Some(TlsAcceptor::from(tls::server_config(
                c,
                k,
                config.server.http2,
            )?)),
            _ => None,
        };
        let listener = bind(config.server.listen, "server.listen")?;
        let admin_listener = bind(config.admin.listen, "admin.listen")?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let admin_addr = admin_listener.local_addr().map_err(|e| e.to_string())?;
        let proxy = Arc::new(Proxy::new(&config)?);
        let settings = ConnSettings {
            header_read_timeout: config.server.header_read_timeout,
            max_header_size: config.server.max_header_size as usize,
            tls,
        };
        let stop = CancellationToken::new();
        let connections = TaskTracker::new();
        let admin_task = tokio::spawn(admin::serve(
            admin_listener,
            admin::State {
                proxy: proxy.clone(),
                token: config
                    .admin
                    .token()
                    .map_err(|e| e.to_string())?
                    .map(Into::into),
                loopback: config.admin.listen.ip().is_loopback(),
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
        }
        tokio::spawn(proxy.upstreams().pool.clone().reap(stop.clone()));
        {
            let on_change = proxy.clone();
            tokio::spawn(proxy.upstreams_arc().health_forever(
                config.health.clone(),
                move |node, up| {
                    if !up {
                        if let Some(g) = on_change.sessions() {
                            g.node_lost(&node.name);
                        }
                    }
                },
                stop.clone(),
            ));
        }
        let grace = config.server.grace_period;
        let accept = accept_loop(
            listener,
            proxy.clone(),
            settings,
            Arc::new(Semaphore::new(config.server.max_connections)),
            connections.clone(),
            stop.clone(),
        );
        let proxy_for_end = proxy.clone();
        let done = tokio::spawn(async move {
            accept.await;
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
            proxy_for_end.close_tunnels(Duration::from_secs(2)).await;
            if let (Some(g), Some(path)) = (proxy_for_end.sessions(), &snapshot) {
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
        tracing::info!(%addr, %admin_addr, tls = config.server.tls_cert.is_some(), "qsguard listening");
        Ok(Guard {
            addr,
            admin_addr,
            proxy,
            stop,
            done,
        })
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
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

fn bind(addr: SocketAddr, key: &str) -> Result<TcpListener, String> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| format!("{key}: {e}"))?;
    let _ = socket.set_reuse_address(true);
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

async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: ConnSettings,
    slots: Arc<Semaphore>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        // At max_connections, stop accepting: new clients wait in the backlog.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.cancelled() => return,
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
            _ = stop.cancelled() => return,
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let settings = settings.clone();
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
    settings: ConnSettings,
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
    let svc = service_fn(move |req| proxy.clone().handle(req, info));
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
