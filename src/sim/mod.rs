//! A simulated Qlik Sense Proxy Service (QPS) node: the referee for qsguard's tests and the
//! backend of `qsguard demo`.
//!
//! It reproduces the parts of Qlik's proxy that make the session limit bite: per-virtual-proxy
//! session cookies, Windows-style redirect authentication with one-time tickets, header
//! authentication, the limit of parallel sessions per user counted across all virtual proxies,
//! re-authentication (and a new session) whenever the cookie is missing or damaged, the
//! inactivity timeout kept alive by engine WebSockets, the Personal API, and the QPS REST API
//! with its Xrfkey check. Both listeners refuse a request without exactly one valid Host
//! (400), as HTTP.sys does in front of the real QPS. It is deliberately self-contained (no code shared with the guard) so a
//! bug in the guard cannot be mirrored by the referee, and deliberately no kinder than Qlik.
//!
//! Two listeners: the proxy (virtual proxies, on the address given to `start`) and the QPS
//! REST API (127.0.0.1, random port; https when `SimConfig::api_tls` is set). All state lives
//! in memory behind one mutex and is lost on `stop`, like a restarted QPS loses its sessions.

mod api;
mod config;
mod engine;
mod http;
pub mod ntlm;
mod proxy;
pub mod secrets;
mod sessions;
#[cfg(test)]
mod tests;

pub use config::{SimAuth, SimConfig, SimVirtualProxy};

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use sessions::{State, User};

/// A snapshot of what the simulated QPS has seen and done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Requests received on the proxy listener (any path, including `/__sim/`).
    pub requests: u64,
    pub sessions_created: u64,
    /// Session creations refused because the user was at the limit (any route, API included).
    pub limit_refusals: u64,
    /// Requests that carried the virtual proxy's cookie name with a value that is not a live
    /// session of that virtual proxy.
    pub unknown_cookie_requests: u64,
    /// Sessions ended by `DELETE /<prefix/>qps/user`.
    pub logouts: u64,
    /// Sessions ended through the QPS REST API.
    pub sessions_ended_by_api: u64,
    pub sessions_timed_out: u64,
    /// Engine WebSockets attached to a session (a socket refused at the limit is not counted).
    pub websockets_opened: u64,
    /// Engine WebSockets open right now.
    pub websockets_open: u64,
    pub tickets_redeemed: u64,
    /// NTLM challenges (Type 2) sent.
    pub ntlm_challenges: u64,
    /// Windows handshakes completed: a Type 3 that fit the challenge of its connection.
    pub ntlm_handshakes: u64,
    /// Type 3 messages that arrived on a connection holding no challenge (the legs of one
    /// handshake went over different connections).
    pub ntlm_no_challenge: u64,
    /// Type 3 messages whose answer did not fit the challenge of their connection (another
    /// browser's challenge, a wrong password) or that could not be read.
    pub ntlm_bad_answer: u64,
}

impl SimCounters {
    /// Windows logins refused at the handshake, for any reason.
    pub fn ntlm_failures(&self) -> u64 {
        self.ntlm_no_challenge + self.ntlm_bad_answer
    }
}

/// One request as the proxy (or the QPS REST API) listener received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimRequest {
    pub method: String,
    pub path_and_query: String,
    /// e.g. "HTTP/1.1".
    pub version: String,
    /// Lower-case names with raw value bytes. Lines of one name keep their arrival order;
    /// distinct names come in order of first appearance (hyper's header map cannot do better).
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// State shared by every task of one running simulator instance.
pub(crate) struct Shared {
    pub config: SimConfig,
    state: Mutex<State>,
    pub tracker: Arc<Tracker>,
}

impl Shared {
    /// A poisoned lock only means a test thread panicked; the state is still usable, and the
    /// simulator must keep answering rather than cascade the panic.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Spawns and remembers every task of a simulator, so `stop` (and drop) can end them all,
/// including upgraded WebSockets that hyper no longer owns.
pub(crate) struct Tracker {
    inner: Mutex<TrackerInner>,
}

#[derive(Default)]
struct TrackerInner {
    closed: bool,
    next: u64,
    tasks: HashMap<u64, JoinHandle<()>>,
}

impl Tracker {
    fn new() -> Arc<Tracker> {
        Arc::new(Tracker {
            inner: Mutex::new(TrackerInner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, TrackerInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `fut` unless the simulator is stopping (then `fut` is dropped unrun).
    pub(crate) fn spawn<F>(self: &Arc<Self>, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut g = self.lock();
        if g.closed {
            return;
        }
        let id = g.next;
        g.next += 1;
        let me: Weak<Tracker> = Arc::downgrade(self);
        // Spawning while holding the lock guarantees the handle is stored before the task can
        // try to remove it.
        let h = tokio::spawn(async move {
            fut.await;
            if let Some(t) = me.upgrade() {
                t.lock().tasks.remove(&id);
            }
        });
        g.tasks.insert(id, h);
    }

    /// Refuses new tasks and aborts all running ones; returns their handles to await.
    fn close(&self) -> Vec<JoinHandle<()>> {
        let mut g = self.lock();
        g.closed = true;
        let handles: Vec<JoinHandle<()>> = g.tasks.drain().map(|(_, h)| h).collect();
        drop(g);
        for h in &handles {
            h.abort();
        }
        handles
    }
}

/// A running simulated QPS node.
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    api_addr: SocketAddr,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("node", &self.shared.config.node_name)
            .field("addr", &self.addr)
            .field("api_addr", &self.api_addr)
            .finish()
    }
}

impl Simulator {
    /// Binds the proxy listener on `addr` (use 127.0.0.1:0 in tests) and the QPS REST API
    /// listener on 127.0.0.1:0.
    pub async fn start(config: SimConfig, addr: SocketAddr) -> std::io::Result<Simulator> {
        config
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let listener = TcpListener::bind(addr).await?;
        let api_listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let api_addr = api_listener.local_addr()?;
        let timeouts = (0..config.virtual_proxies.len())
            .map(|i| config.timeout_of(i))
            .collect();
        let state = State::new(config.max_sessions_per_user, timeouts);
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(state),
            tracker: Tracker::new(),
        });
        let tracker = shared.tracker.clone();
        tracker.spawn(accept_proxy(shared.clone(), listener));
        tracker.spawn(api::accept(shared.clone(), api_listener));
        tracker.spawn(sweeper(shared.clone()));
        Ok(Simulator {
            shared,
            addr,
            api_addr,
        })
    }

    /// The proxy (virtual proxies) listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The QPS REST API listener (port 4243 in real Qlik).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn counters(&self) -> SimCounters {
        self.shared.lock().counters.clone()
    }

    /// Live sessions of `user` ("DIR\\id", case-insensitive) across all virtual proxies.
    pub fn live_sessions(&self, user: &str) -> usize {
        match User::lenient(user) {
            Some(u) => self
                .shared
                .lock()
                .count_user(&u, tokio::time::Instant::now()),
            None => 0,
        }
    }

    /// Live session ids (cookie values) of `user`, sorted.
    pub fn session_ids(&self, user: &str) -> Vec<String> {
        match User::lenient(user) {
            Some(u) => self
                .shared
                .lock()
                .ids_of_user(&u, tokio::time::Instant::now()),
            None => Vec::new(),
        }
    }

    /// The latest request on the proxy listener whose path starts with `path_prefix`.
    pub fn last_request(&self, path_prefix: &str) -> Option<SimRequest> {
        self.shared.lock().last_request(path_prefix)
    }

    /// The requests the QPS REST API listener received (the last 256), oldest first, with
    /// the path as sent (before any decoding).
    pub fn api_requests(&self) -> Vec<SimRequest> {
        self.shared.lock().api_requests()
    }

    /// Stops accepting and drops every connection (a crashed/stopped QPS); sessions are
    /// forgotten like a real QPS restart loses them. `start` again on the same addr brings it
    /// back.
    pub async fn stop(self) {
        // Awaiting the aborted tasks guarantees the listeners and sockets are closed (and the
        // port can be bound again) by the time this returns.
        for h in self.shared.tracker.close() {
            let _ = h.await;
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shared.tracker.close();
    }
}

async fn accept_proxy(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let s = shared.clone();
                shared.tracker.spawn(serve_proxy_conn(s, stream));
            }
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn serve_proxy_conn(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    // The NTLM challenge lives with the TCP connection, as it does in HTTP.sys.
    let conn = Arc::new(proxy::ConnAuth::default());
    let svc = service_fn(move |req| {
        let s = shared.clone();
        let c = conn.clone();
        async move { Ok::<_, Infallible>(proxy::handle(s, &c, req).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades()
        .await;
}

/// Ends idle sessions promptly so engine WebSockets and counters see the timeout even when no
/// request arrives; requests also expire lazily, so the pace only matters for notifications.
async fn sweeper(shared: Arc<Shared>) {
    let period =
        (shared.lock().min_timeout() / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut iv = tokio::time::interval(period);
    iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        iv.tick().await;
        shared.lock().expire(tokio::time::Instant::now());
    }
}
