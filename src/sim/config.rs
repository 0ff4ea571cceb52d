//! Configuration of the simulated Qlik Sense Proxy Service (QPS).
//!
//! The shape mirrors what a Qlik administrator sets in the QMC for a proxy node and its
//! virtual proxies (prefix, session cookie header name, authentication method, inactivity
//! timeout, SameSite attribute), so the guard's tests can build the same topologies they meet
//! in the field. Validation happens once in `Simulator::start` so the request path never has to
//! cope with an inconsistent configuration.

use std::sync::Arc;
use std::time::Duration;

/// One simulated QPS node.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Name of the node, e.g. "node1"; shown on the pages so multi-node tests can tell nodes apart.
    pub node_name: String,
    /// Qlik's fixed limit is 5 parallel sessions per user; configurable here only for tests.
    pub max_sessions_per_user: usize,
    /// Inactivity timeout used by virtual proxies that do not override it (Qlik default: 30 min).
    pub inactivity_timeout: Duration,
    /// The virtual proxies linked to this node; "" is the central proxy.
    pub virtual_proxies: Vec<SimVirtualProxy>,
    /// `None`: the QPS REST API listener speaks plain http; `Some`: https with this config
    /// (which decides whether a client certificate is required, as Qlik's port 4243 does).
    pub api_tls: Option<Arc<rustls::ServerConfig>>,
}

/// One virtual proxy of the node.
#[derive(Clone, Debug)]
pub struct SimVirtualProxy {
    /// Path prefix without slashes; "" is the central proxy.
    pub prefix: String,
    /// The session cookie header name, e.g. "X-Qlik-Session-HTTP".
    pub cookie_name: String,
    /// How users of this virtual proxy authenticate.
    pub auth: SimAuth,
    /// Overrides `SimConfig::inactivity_timeout` for sessions of this virtual proxy.
    pub inactivity_timeout: Option<Duration>,
    /// The cookie's SameSite attribute value, e.g. `Some("Lax")`; `None` leaves it out.
    pub same_site: Option<String>,
    /// Other cookies set after the session cookie when a header-authentication login makes a
    /// session (`name=value; attributes`): Qlik and the systems around it set more than one.
    pub also_sets: Vec<String>,
}

/// Authentication method of a virtual proxy.
#[derive(Clone, Debug)]
pub enum SimAuth {
    /// Windows authentication: the redirect to `/internal_windows_authentication/`, where the
    /// browser does a connection-bound NTLM handshake (`WWW-Authenticate: Negotiate` and
    /// `NTLM`; see `ntlm.rs`), then the ticket redirect.
    Windows {
        /// The demo's only: a Type 3 whose proof the simulator cannot check (a real browser's
        /// NTLMv2) is taken as the user it names, still only on the connection holding the
        /// challenge. Tests leave it off, so a proof that does not fit is refused.
        accept_any_proof: bool,
    },
    /// Header authentication: this header carries `DIRECTORY\userid` on every request.
    Header { header: String },
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            node_name: "node1".to_string(),
            max_sessions_per_user: 5,
            inactivity_timeout: Duration::from_secs(30 * 60),
            virtual_proxies: vec![
                SimVirtualProxy {
                    prefix: String::new(),
                    cookie_name: "X-Qlik-Session-HTTP".to_string(),
                    auth: SimAuth::Windows {
                        accept_any_proof: false,
                    },
                    inactivity_timeout: None,
                    same_site: Some("Lax".to_string()),
                    also_sets: Vec::new(),
                },
                SimVirtualProxy {
                    prefix: "hdr".to_string(),
                    cookie_name: "X-Qlik-Session-hdr-HTTP".to_string(),
                    auth: SimAuth::Header {
                        header: "hdr-usr".to_string(),
                    },
                    inactivity_timeout: None,
                    same_site: Some("Lax".to_string()),
                    also_sets: Vec::new(),
                },
            ],
            api_tls: None,
        }
    }
}

impl SimConfig {
    /// Inactivity timeout that applies to sessions of virtual proxy `vp` (an index).
    pub(crate) fn timeout_of(&self, vp: usize) -> Duration {
        self.virtual_proxies
            .get(vp)
            .and_then(|v| v.inactivity_timeout)
            .unwrap_or(self.inactivity_timeout)
    }

    /// Rejects configurations Qlik itself would refuse (duplicate prefixes or cookie names,
    /// prefixes that are not one path segment, header names that are not header names), so a
    /// test typo fails loudly at start instead of producing confusing routing later.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let mut prefixes = std::collections::HashSet::new();
        let mut cookies = std::collections::HashSet::new();
        for vp in &self.virtual_proxies {
            let p = vp.prefix.as_str();
            let prefix_ok = p.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'-' | b'.' | b'_' | b'~')
            });
            if !prefix_ok {
                return Err(format!(
                    "virtual proxy prefix {p:?}: only a-z 0-9 - . _ ~ are allowed"
                ));
            }
            // Reserved words of Qlik's URL scheme (and of the QPS API paths and the simulator's
            // own endpoints) cannot be prefixes: routing would become ambiguous.
            const RESERVED: &[&str] = &[
                "__sim",
                "internal_windows_authentication",
                "hub",
                "qmc",
                "sense",
                "app",
                "qps",
                "resources",
                "api",
                "qrs",
                "session",
                "user",
                "ticket",
            ];
            if RESERVED.contains(&p) {
                return Err(format!("virtual proxy prefix {p:?} is reserved"));
            }
            if !prefixes.insert(p.to_string()) {
                return Err(format!("duplicate virtual proxy prefix {p:?}"));
            }
            let c = vp.cookie_name.as_str();
            if c.is_empty() || http::HeaderName::from_bytes(c.as_bytes()).is_err() {
                return Err(format!("invalid session cookie name {c:?}"));
            }
            if !cookies.insert(c.to_ascii_lowercase()) {
                return Err(format!("duplicate session cookie name {c:?}"));
            }
            if let Some(ss) = &vp.same_site {
                if http::HeaderValue::from_str(ss).is_err() || ss.contains(';') {
                    return Err(format!("invalid SameSite value {ss:?}"));
                }
            }
            if let SimAuth::Header { header } = &vp.auth {
                if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
                    return Err(format!("invalid authentication header name {header:?}"));
                }
            }
        }
        Ok(())
    }
}
