//! What a running guard can be told to do while it serves: reload its config (SIGHUP,
//! `POST /reload`), and let go of its listeners for a successor process (see [`super::handover`]).
//!
//! A reload applies the new config in an order that cannot half-fail: everything that can fail
//! (parsing, certificates, the token, binding a new address, the nodes' APIs) is done first, and
//! any failure leaves the running config in place. Then the new values are swapped in; open
//! connections and WebSockets are not touched.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{accept_loop, bind, ConnSettings, Serving};
use crate::config::Config;
use crate::proxy::Proxy;

/// The main listener and the token that stops its accept loop (a reload that moves the
/// listener stops the old loop; the connections it accepted go on).
pub(super) struct Listening {
    pub(super) listen: SocketAddr,
    pub(super) addr: SocketAddr,
    /// Dropped at shutdown, so that the port is closed while the connections finish.
    pub(super) socket: Option<Arc<TcpListener>>,
    pub(super) stop: CancellationToken,
}

/// What a running guard can be told to do while it serves: reload, hand over to a new binary.
pub struct Control {
    pub(super) proxy: Arc<Proxy>,
    pub(super) conn: Arc<ArcSwap<ConnSettings>>,
    pub(super) listening: Mutex<Listening>,
    pub(super) admin_socket: Mutex<Option<Arc<TcpListener>>>,
    pub(super) admin_token: Arc<RwLock<Option<Arc<str>>>>,
    pub(super) config: Mutex<Config>,
    /// What the accept loops share (a moved listener gets a loop of its own).
    pub(super) serving: Serving,
    pub(super) stop: CancellationToken,
    /// A successor process took the listeners over: it owns the snapshot file now.
    pub(super) handed_over: AtomicBool,
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
                self.serving.clone(),
                stop.clone(),
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
    pub(super) fn close_listeners(&self) {
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

impl crate::admin::Reload for Control {
    fn reload(&self) -> Result<String, String> {
        Control::reload(self)
    }
}
