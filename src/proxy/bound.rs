//! Upstream connections private to one client connection, for connection-bound
//! authentication (NTLM, Negotiate falling back to NTLM).
//!
//! The server keeps an NTLM challenge per TCP connection and, once the handshake is done,
//! treats the connection as the user's. So a request or an answer that is part of such a
//! handshake (see [`crate::ntlm`]) makes its upstream connection private: the client
//! connection's next requests go over it (never a pooled one, and to its node), it never
//! returns to the pool, it closes with the client connection, and if it breaks the client
//! connection is closed too, so the browser starts its handshake again instead of having a
//! leg land on a connection that never saw the others. HAProxy calls this `http-reuse safe`
//! with private connections; nginx OSS cannot do it.

use std::sync::Arc;

use super::pool::Conn;
use super::upstream::Node;

/// An upstream connection that belongs to one client connection, and its node.
pub(crate) struct Bound {
    pub node: Arc<Node>,
    pub conn: Conn,
}
