//! The configuration model: the TOML file parsed once into plain structs the rest of the guard
//! reads, and checked before anything binds a port.
//!
//! Nothing else in the crate parses TOML. Unknown keys are errors (a misspelt key that is
//! silently ignored is a setting the admin believes is active), and every error names the key
//! and the reason, so `qsguard check-config` can be run in a deploy pipeline.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

/// What a restart-only key compares between two configs (see
/// [`Config::restart_only_changes`]).
type Compared = fn(&Config) -> String;

/// The whole configuration, as read from the file with defaults filled in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default, rename = "upstream")]
    pub upstreams: Vec<UpstreamConfig>,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default, rename = "virtual_proxy")]
    pub virtual_proxies: Vec<VirtualProxyConfig>,
    #[serde(default)]
    pub sessions: SessionsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The QPS REST API (port 4243, mutual TLS); unset: the Personal API is used instead.
    pub qps_api: Option<QpsApiConfig>,
    #[serde(default)]
    pub diagnostics: DiagnosticsConfig,
    #[serde(default)]
    pub health: HealthConfig,
    /// An active/active pair sharing the session table through Redis; unset: one guard, the
    /// table in memory.
    pub cluster: Option<ClusterConfig>,
    /// The file this was read from (a reload reads it again).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// Active health checks of the Qlik nodes, with hysteresis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    #[serde(default = "default_health_interval", with = "duration")]
    pub interval: Duration,
    #[serde(default = "default_health_timeout", with = "duration")]
    pub timeout: Duration,
    /// The path asked.
    #[serde(default = "default_health_path")]
    pub path: String,
    /// The answers that count as up: status codes (`200`) or classes (`"2xx"`). Empty (the
    /// default): any answer below 500, since a QPS answers `/` with a login redirect or 401.
    #[serde(default)]
    pub expect_status: Vec<StatusMatch>,
    /// Failures in a row (checks or connection errors) before a node is down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Successful checks in a row before a down node is up again.
    #[serde(default = "default_rise")]
    pub rise: u32,
}

/// One entry of `health.expect_status`: a status code, or a class like `"3xx"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    Code(u16),
    Class(u16),
}

impl StatusMatch {
    pub fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Code(c) => status == c,
            StatusMatch::Class(c) => status / 100 == c,
        }
    }
}

impl<'de> Deserialize<'de> for StatusMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u16),
            Str(String),
        }
        let bad = |s: &str| {
            serde::de::Error::custom(format!(
                "`{s}` is not a status code (100-599) or class (\"2xx\" to \"5xx\")"
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Int(n) if (100..600).contains(&n) => Ok(StatusMatch::Code(n)),
            Raw::Int(n) => Err(bad(&n.to_string())),
            Raw::Str(s) => {
                let t = s.trim().to_ascii_lowercase();
                match t.as_bytes() {
                    [c @ b'1'..=b'5', b'x', b'x'] => Ok(StatusMatch::Class(u16::from(c - b'0'))),
                    _ => t
                        .parse::<u16>()
                        .ok()
                        .filter(|n| (100..600).contains(n))
                        .map(StatusMatch::Code)
                        .ok_or_else(|| bad(&s)),
                }
            }
        }
    }
}

impl HealthConfig {
    /// Whether a health check's answer counts as up.
    pub fn is_up(&self, status: u16) -> bool {
        if self.expect_status.is_empty() {
            status < 500
        } else {
            self.expect_status.iter().any(|m| m.matches(status))
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: default_health_interval(),
            timeout: default_health_timeout(),
            path: default_health_path(),
            expect_status: Vec::new(),
            fall: default_fall(),
            rise: default_rise(),
        }
    }
}

fn one() -> u32 {
    1
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_health_path() -> String {
    "/".into()
}
fn default_fall() -> u32 {
    3
}
fn default_rise() -> u32 {
    2
}

/// Events, and the cookie self-test page.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiagnosticsConfig {
    /// Recent events kept for the admin API and `qsguard events`.
    #[serde(default = "default_events_kept")]
    pub events_kept: usize,
    /// Serve the cookie self-test page (and the endpoints `qsguard doctor` uses).
    #[serde(default = "yes")]
    pub cookie_check: bool,
    #[serde(default = "default_cookie_check_path")]
    pub cookie_check_path: String,
}

impl Default for DiagnosticsConfig {
    fn default() -> Self {
        DiagnosticsConfig {
            events_kept: default_events_kept(),
            cookie_check: true,
            cookie_check_path: default_cookie_check_path(),
        }
    }
}

fn default_events_kept() -> usize {
    1000
}

fn default_cookie_check_path() -> String {
    "/__qsguard/cookie-check".into()
}

/// The QPS REST API client: Qlik's exported client certificate and key, and the CA that
/// signed the QPS's certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QpsApiConfig {
    /// e.g. `https://qlik1.example.com:4243`; plain `http` only when TLS is ended elsewhere.
    #[serde(deserialize_with = "uri")]
    pub url: http::Uri,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

/// The main (client-facing) listener and the limits that protect it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain; set together with `tls_key` to serve https (and HTTP/2 by ALPN).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Offer HTTP/2 by ALPN on TLS.
    #[serde(default = "yes")]
    pub http2: bool,
    /// Tokio worker threads; 0 = one per CPU core.
    #[serde(default)]
    pub workers: usize,
    /// Connections served at once; further clients wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a complete request head (slowloris protection); hyper starts
    /// this clock when it waits for a head, so it is also the keep-alive idle timeout.
    #[serde(default = "default_header_read_timeout", with = "duration")]
    pub header_read_timeout: Duration,
    /// Largest request head (request line + headers); larger gets 431.
    #[serde(default = "default_max_header_size", deserialize_with = "byte_size")]
    pub max_header_size: u64,
    /// Largest request body; larger gets 413. Qlik app uploads through the QMC can be large.
    #[serde(default = "default_max_body_size", deserialize_with = "byte_size")]
    pub max_body_size: u64,
    /// How long one write to a client may take before the client counts as gone (one that
    /// stopped reading would otherwise hold a Qlik connection forever).
    #[serde(default = "default_send_timeout", with = "duration")]
    pub send_timeout: Duration,
    /// On shutdown, how long in-flight requests get to finish before tunnels are closed.
    #[serde(default = "default_grace_period", with = "duration")]
    pub grace_period: Duration,
    /// Close a WebSocket tunnel idle this long. Unset (the default): never, since Qlik engine
    /// sessions sit idle for hours.
    #[serde(default, with = "opt_duration")]
    pub websocket_idle_timeout: Option<Duration>,
    /// Close an HTTP/2 connection (GOAWAY) that has had no open stream this long. Longer than
    /// HTTP/1's keep-alive (`header_read_timeout`): one h2 connection carries all of a
    /// browser's requests and reopening it costs a TLS handshake, but it must not stay forever.
    #[serde(default = "default_http2_idle_timeout", with = "duration")]
    pub http2_idle_timeout: Duration,
    /// The slowest a request body may come, on average, in bytes per second, after a first
    /// `header_read_timeout` of grace. 0: no rate rule (only the per-read pause).
    #[serde(default = "default_body_min_rate", deserialize_with = "byte_size")]
    pub body_min_rate: u64,
    /// Peers whose X-Forwarded-* headers are trusted and appended to; others are replaced.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// More certificates, each for the names a browser may ask for by SNI; `tls_cert` serves
    /// every other name.
    #[serde(default, rename = "certificate")]
    pub certificates: Vec<CertificateConfig>,
    /// `SO_REUSEPORT` on the listeners, so that a new qsguard can bind the same ports while
    /// the old one still serves (see "Upgrades" in README.md).
    #[serde(default)]
    pub reuse_port: bool,
}

/// A certificate chosen by SNI (`[[server.certificate]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// Host names it serves: exact (`qlik.example.com`) or one wildcard label
    /// (`*.example.com`).
    pub names: Vec<String>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
}

/// The admin listener (health, and later sessions, events and metrics).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// A file holding the bearer token: needed for every call off loopback, and for every
    /// call that changes something.
    pub token_file: Option<PathBuf>,
    /// Host names (besides localhost names and the listener's own address) a request to the
    /// admin API may name in its Host header: a page on another site that points its DNS name
    /// at the admin address (DNS rebinding) is refused.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token_file: None,
            allowed_hosts: Vec::new(),
        }
    }
}

impl AdminConfig {
    /// The token, read from `token_file`.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let t = std::fs::read_to_string(path).map_err(|e| {
            err(
                "admin.token_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let t = t.trim().to_string();
        if t.len() < 16 {
            return Err(err(
                "admin.token_file",
                "the token must be at least 16 characters",
            ));
        }
        Ok(Some(t))
    }
}

/// One Qlik Sense proxy node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(deserialize_with = "uri")]
    pub url: http::Uri,
    /// A short name for logs; defaults to the URL's authority.
    pub name: Option<String>,
    /// Share of new sessions, relative to the other nodes (default 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// This node's QPS REST API (e.g. `https://qlik2.example.com:4243`), with the client
    /// certificate of `[qps_api]`; without it, the node uses `[qps_api].url`.
    #[serde(default, deserialize_with = "opt_uri")]
    pub qps_api: Option<http::Uri>,
}

impl UpstreamConfig {
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.url
                .authority()
                .map(|a| a.to_string())
                .unwrap_or_default()
        })
    }
}

/// How the guard talks to the upstream nodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Time to wait for the upstream's response head (not for the whole body).
    #[serde(default = "default_response_timeout", with = "duration")]
    pub response_timeout: Duration,
    /// Idle keep-alive connections to an upstream are closed after this; keep it below the
    /// upstream's own keep-alive timeout so the guard never reuses a connection Qlik is closing.
    #[serde(default = "default_pool_idle_timeout", with = "duration")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_upstream: usize,
    /// PEM CA bundle for https upstreams; unset: the system's roots.
    pub upstream_ca: Option<PathBuf>,
    /// With several nodes: a cookie naming the node a browser was sent to, used only for a
    /// session the guard has not seen created (made before a restart without a snapshot, or
    /// with `sessions.guard = false`). Unset (the default): no such cookie is set.
    pub sticky_cookie: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            pool_idle_timeout: default_pool_idle_timeout(),
            pool_max_idle_per_upstream: default_pool_max_idle(),
            upstream_ca: None,
            sticky_cookie: None,
        }
    }
}

/// A Qlik virtual proxy: its path prefix and the name of its session cookie.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualProxyConfig {
    pub prefix: String,
    pub session_cookie: String,
    /// Header-authentication virtual proxy: the header carrying `DIRECTORY\user`.
    pub identity_header: Option<String>,
    /// The peers the identity header is believed from; from any other peer it is removed
    /// before Qlik sees it and the guard ignores it. Unset: `server.trusted_proxies`.
    #[serde(default)]
    pub identity_from: Option<Vec<IpNet>>,
    /// Give a browser that lost its session cookie its own live session back (by its device
    /// cookie). On a shared computer this means: a browser closed and reopened within the
    /// inactivity timeout is still logged in as the last user. Default true.
    #[serde(default = "yes")]
    pub restore: bool,
    /// Overrides `[sessions] inactivity_timeout` for this virtual proxy.
    #[serde(default, with = "opt_duration")]
    pub inactivity_timeout: Option<Duration>,
    /// Header authentication: what a request with neither a session cookie nor a device
    /// cookie (a script without a cookie jar) gets. Unset: `reuse`.
    #[serde(default)]
    pub cookieless: Option<Cookieless>,
}

/// Clients that keep no cookies, on a header-authentication virtual proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cookieless {
    /// The user's most recently active session on the virtual proxy that was itself made for a
    /// cookie-less client: a script calling once a second does not make a session per call.
    Reuse,
    /// A new session per request, as Qlik does (each counts towards the user's limit for the
    /// inactivity timeout).
    New,
}

/// What happens to the sessions of a node that goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNodeDown {
    /// The sessions are marked lost; their users go on to a healthy node, where Qlik makes a
    /// new session (a QPS that crashed took its sessions with it).
    NewSession,
    /// The sessions are kept; their users see the error page until the node is back (an
    /// unreachable node may still hold them: a network outage, a false health check).
    Error,
}

/// `[cluster]`: the store two guards share so that a user's limit holds across both.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port/db`. Checked by the client crate's own URL parser, so what passes
    /// here is what the store connection will accept.
    pub redis_url: String,
    /// This guard's name in the store (whose reservations and sessions are whose); unset: the
    /// host name.
    pub name: Option<String>,
    /// Put before every key, so one Redis can hold several sites (prod, test) apart.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// The longest a request waits on the store; past it the guard decides from its own
    /// table (a store that is slow must not make Qlik slow).
    #[serde(default = "default_store_timeout", with = "duration")]
    pub store_timeout: Duration,
    /// With `rediss://`: the CA (PEM) that signed the store's certificate; unset: the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
    /// A secret every guard of the pair has and the store has not (32 bytes or more): cookie
    /// values are then kept in the store sealed with it, so that a guard that has not seen a
    /// session can still restore or reuse it. Unset: the store holds no values.
    pub secret_file: Option<PathBuf>,
}

fn default_key_prefix() -> String {
    "qsguard:".into()
}

/// The pair's secret in `cluster.secret_file`: at least 32 bytes once trimmed (a line of
/// base64 or hex from 32 random bytes, say).
pub fn pair_secret(file: &Path) -> Result<Vec<u8>, ConfigError> {
    let bytes = std::fs::read(file).map_err(|e| {
        err(
            "cluster.secret_file",
            format!("cannot read {}: {e}", file.display()),
        )
    })?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < 32 {
        return Err(err(
            "cluster.secret_file",
            format!(
                "{} holds {} bytes: at least 32 are needed (head -c 32 /dev/urandom | base64 > {})",
                file.display(),
                secret.len(),
                file.display()
            ),
        ));
    }
    Ok(secret)
}

/// By hand: the URL may carry the store's password, and a debug line must not.
impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis_url", &redacted_url(&self.redis_url))
            .field("name", &self.name)
            .field("key_prefix", &self.key_prefix)
            .field("store_timeout", &self.store_timeout)
            .field("ca_file", &self.ca_file)
            .field("secret_file", &self.secret_file)
            .finish()
    }
}

fn default_store_timeout() -> Duration {
    Duration::from_millis(80)
}

impl ClusterConfig {
    /// The name given, else the host name (`/proc/sys/kernel/hostname`, `$HOSTNAME`).
    pub fn guard_name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "qsguard".into())
    }
}

/// What to do when a user is about to pass Qlik's session limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnLimit {
    Reuse,
    Error,
    Evict,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    #[serde(default = "default_max_per_user")]
    pub max_per_user: usize,
    #[serde(default = "default_inactivity_timeout", with = "duration")]
    pub inactivity_timeout: Duration,
    #[serde(default = "default_on_limit")]
    pub on_limit: OnLimit,
    /// Track sessions and act on the limit. Off: qsguard is a plain (cookie-safe) proxy.
    #[serde(default = "yes")]
    pub guard: bool,
    /// With `evict`: end a session this many slots before the limit (Qlik frees a slot only
    /// about five minutes after a session ends with professional access).
    #[serde(default)]
    pub evict_headroom: usize,
    /// The guard's own cookie that recognises a browser across restarts.
    #[serde(default = "default_device_cookie")]
    pub device_cookie: String,
    /// `new_session` (the default) or `error`: see [`OnNodeDown`].
    #[serde(default = "default_on_node_down")]
    pub on_node_down: OnNodeDown,
    /// How long requests of a browser wait while another of its requests is (re)creating its
    /// session, before they go on their own.
    #[serde(default = "default_burst_wait", with = "duration")]
    pub burst_wait: Duration,
    /// How long the guard remembers a browser (and its last user) after its last session.
    #[serde(default = "default_device_memory", with = "duration")]
    pub device_memory: Duration,
    /// The most browsers the guard remembers at once. At the cap, the least recently seen
    /// browser without a live session is forgotten; when every one has a live session, a new
    /// browser is not remembered (no restore for it) rather than the map growing.
    #[serde(default = "default_max_devices")]
    pub max_devices: usize,
    /// The most session (re)creations in flight at once (one per browser and virtual proxy,
    /// a login dance included). At the cap, a new browser's requests go on without one (no
    /// burst coalescing) rather than the map growing.
    #[serde(default = "default_max_flights")]
    pub max_flights: usize,
    /// Where the session table is kept across restarts (mode 0600: it holds cookie values).
    /// Unset: `$STATE_DIRECTORY/sessions.json` when systemd gives the unit a state directory
    /// (see [`Config::load`]), else none, and a restart forgets every session.
    pub snapshot_file: Option<PathBuf>,
    /// How often the snapshot is written while running (and always at shutdown).
    #[serde(default = "default_snapshot_interval", with = "duration")]
    pub snapshot_interval: Duration,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            max_per_user: default_max_per_user(),
            inactivity_timeout: default_inactivity_timeout(),
            on_limit: default_on_limit(),
            guard: true,
            evict_headroom: 0,
            device_cookie: default_device_cookie(),
            on_node_down: default_on_node_down(),
            burst_wait: default_burst_wait(),
            device_memory: default_device_memory(),
            max_devices: default_max_devices(),
            max_flights: default_max_flights(),
            snapshot_file: None,
            snapshot_interval: default_snapshot_interval(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// One line per request (method, path, status, upstream, time, bytes).
    #[serde(default = "yes")]
    pub requests: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { requests: true }
    }
}

/// A configuration error: the key it concerns and why.
#[derive(Debug)]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.key, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("", format!("cannot read {}: {e}", path.display())))?;
        let mut config = Config::parse(&text)?;
        config.source = Some(path.to_path_buf());
        config.snapshot_in_state_directory(std::env::var_os("STATE_DIRECTORY"));
        Ok(config)
    }

    /// A guard that forgets its sessions on a restart sends every browser to a node that
    /// does not know it (with several nodes) and loses what it knew of every user: where the
    /// service has a place for state (systemd's `StateDirectory=`, given as `$STATE_DIRECTORY`,
    /// colon-separated when there are several), the snapshot goes there unless the file says
    /// where.
    pub fn snapshot_in_state_directory(&mut self, state_directory: Option<std::ffi::OsString>) {
        if self.sessions.snapshot_file.is_some() {
            return;
        }
        let Some(dirs) = state_directory else { return };
        if let Some(first) = std::env::split_paths(&dirs).find(|d| d.is_absolute()) {
            self.sessions.snapshot_file = Some(first.join("sessions.json"));
        }
    }

    /// Where the session table is kept across restarts, in words (for `check-config`).
    pub fn snapshot_text(&self) -> String {
        match &self.sessions.snapshot_file {
            Some(f) => format!("sessions are kept across restarts in {}", f.display()),
            None => "no session snapshot: a restart forgets every session (set [sessions] snapshot_file, or run under systemd with StateDirectory=)".into(),
        }
    }

    /// The keys that differ from `new` and that only a restart applies (a reload says so in
    /// the log and goes on with the rest).
    pub fn restart_only_changes(&self, new: &Config) -> Vec<&'static str> {
        // Each key with what is compared, as Debug text (every config type has it). Each
        // virtual proxy's own inactivity_timeout is left out: a reload applies it.
        let keys: [(&'static str, Compared); 15] = [
            ("server.workers", |c| format!("{:?}", c.server.workers)),
            ("server.max_connections", |c| {
                format!("{:?}", c.server.max_connections)
            }),
            ("server.grace_period", |c| {
                format!("{:?}", c.server.grace_period)
            }),
            ("admin", |c| format!("{:?}", c.admin.listen)),
            ("admin.allowed_hosts", |c| {
                format!("{:?}", c.admin.allowed_hosts)
            }),
            ("virtual_proxy", |c| {
                let vps: Vec<_> = c
                    .virtual_proxies_or_default()
                    .into_iter()
                    .map(|v| (v.prefix, v.session_cookie, v.identity_header, v.cookieless))
                    .collect();
                format!("{vps:?}")
            }),
            ("sessions.guard", |c| format!("{:?}", c.sessions.guard)),
            ("sessions.device_cookie", |c| {
                format!("{:?}", c.sessions.device_cookie)
            }),
            ("sessions.device_memory", |c| {
                format!("{:?}", c.sessions.device_memory)
            }),
            ("sessions.max_devices", |c| {
                format!("{:?}", c.sessions.max_devices)
            }),
            ("sessions.max_flights", |c| {
                format!("{:?}", c.sessions.max_flights)
            }),
            ("sessions.snapshot_file", |c| {
                format!("{:?}", c.sessions.snapshot_file)
            }),
            ("sessions.snapshot_interval", |c| {
                format!("{:?}", c.sessions.snapshot_interval)
            }),
            ("diagnostics", |c| format!("{:?}", c.diagnostics)),
            ("cluster", |c| format!("{:?}", c.cluster)),
        ];
        keys.into_iter()
            .filter(|(_, of)| of(self) != of(new))
            .map(|(key, _)| key)
            .collect()
    }

    /// Parses and validates; the error names the key (TOML errors carry line and column).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // Quote the whole line the error points at: it shows the key even when the
            // error's span covers only the value.
            let key = match e.span() {
                Some(span) => {
                    let start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
                    let end = text[span.start..]
                        .find('\n')
                        .map_or(text.len(), |i| span.start + i);
                    let line = text[..span.start].matches('\n').count() + 1;
                    format!("line {line}: `{}`", text[start..end].trim())
                }
                None => String::new(),
            };
            err(key, e.message())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Every rule a config must meet, section by section; the first broken one is the error.
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_server()?;
        self.validate_upstreams()?;
        self.validate_virtual_proxies()?;
        self.validate_admin_and_diagnostics()?;
        self.validate_sessions()?;
        self.validate_health()?;
        self.validate_qps_api()?;
        self.validate_cluster()
    }

    /// `[cluster]`: a URL the Redis client takes, a name and prefix usable inside a key, a
    /// deadline short enough that a dead store does not stall requests.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        let Some(c) = &self.cluster else {
            return Ok(());
        };
        let tls = c.redis_url.starts_with("rediss://");
        if !tls && !c.redis_url.starts_with("redis://") {
            return Err(err(
                "cluster.redis_url",
                format!(
                    "`{}` is not a redis:// or rediss:// URL",
                    redacted_url(&c.redis_url)
                ),
            ));
        }
        if let Some(ca) = &c.ca_file {
            if !tls {
                return Err(err(
                    "cluster.ca_file",
                    "is for a store reached over TLS: redis_url must be rediss://",
                ));
            }
            if let Err(e) = std::fs::metadata(ca) {
                return Err(err(
                    "cluster.ca_file",
                    format!("cannot read {}: {e}", ca.display()),
                ));
            }
        }
        if let Err(e) = redis::Client::open(c.redis_url.as_str()) {
            return Err(err("cluster.redis_url", format!("not a Redis URL: {e}")));
        }
        if let Some(f) = &c.secret_file {
            pair_secret(f)?;
        }
        let key_safe = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        if let Some(name) = &c.name {
            if !key_safe(name) || name.len() > 64 {
                return Err(err(
                    "cluster.name",
                    "must be 1 to 64 visible ASCII characters (it goes into store keys)",
                ));
            }
        }
        if !key_safe(&c.key_prefix) || c.key_prefix.len() > 64 {
            return Err(err(
                "cluster.key_prefix",
                "must be 1 to 64 visible ASCII characters",
            ));
        }
        if c.store_timeout.is_zero() || c.store_timeout > Duration::from_secs(2) {
            return Err(err(
                "cluster.store_timeout",
                "must be more than 0 and at most 2s (requests wait on the store this long)",
            ));
        }
        Ok(())
    }

    /// Whether this guard shares its table, in words (for `check-config`).
    pub fn cluster_text(&self) -> String {
        match &self.cluster {
            Some(c) => format!(
                "cluster: guard `{}` shares sessions through the store at {} (keys `{}*`, deadline {:?})",
                c.guard_name(),
                redacted_url(&c.redis_url),
                c.key_prefix,
                c.store_timeout
            ),
            None => "cluster: none, a single guard (the session table in memory)".into(),
        }
    }

    /// `[server]`: TLS certificates and names, limits and timeouts.
    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        match (&s.tls_cert, &s.tls_key) {
            (Some(_), None) => {
                return Err(err("server.tls_key", "must be set with server.tls_cert"))
            }
            (None, Some(_)) => {
                return Err(err("server.tls_cert", "must be set with server.tls_key"))
            }
            _ => {}
        }
        if !s.certificates.is_empty() && s.tls_cert.is_none() {
            return Err(err(
                "server.certificate",
                "needs server.tls_cert and server.tls_key: the certificate for every other name",
            ));
        }
        for (i, c) in s.certificates.iter().enumerate() {
            if c.names.is_empty() {
                return Err(err(
                    format!("server.certificate[{i}].names"),
                    "must name at least one host",
                ));
            }
            for n in &c.names {
                let bare = n.strip_prefix("*.").unwrap_or(n);
                if bare.is_empty()
                    || bare.contains('*')
                    || !bare
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '.')
                {
                    return Err(err(
                        format!("server.certificate[{i}].names"),
                        format!("`{n}` is not a host name (or `*.` and a host name)"),
                    ));
                }
            }
        }
        if s.max_connections == 0 {
            return Err(err("server.max_connections", "must be at least 1"));
        }
        if s.max_header_size < 1024 {
            return Err(err("server.max_header_size", "must be at least 1KiB"));
        }
        if s.header_read_timeout.is_zero() {
            return Err(err("server.header_read_timeout", "must be more than 0s"));
        }
        if s.http2_idle_timeout.is_zero() {
            return Err(err(
                "server.http2_idle_timeout",
                "must be more than 0s: an idle HTTP/2 connection must close some time",
            ));
        }
        Ok(())
    }

    /// `[[upstream]]` and `[proxy]`: node URLs, names, weights, their QPS APIs; timeouts.
    fn validate_upstreams(&self) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            return Err(err(
                "upstream",
                "at least one [[upstream]] (a Qlik Sense proxy node) is needed",
            ));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            let key = format!("upstream[{i}].url");
            match u.url.scheme_str() {
                Some("http") | Some("https") => {}
                _ => return Err(err(key, "must start with http:// or https://")),
            }
            if u.url.authority().is_none() {
                return Err(err(key, "has no host"));
            }
            if !matches!(u.url.path(), "" | "/") || u.url.query().is_some() {
                return Err(err(
                    key,
                    "must not have a path or query: name the node only",
                ));
            }
            if let Some(api) = &u.qps_api {
                let key = format!("upstream[{i}].qps_api");
                if self.qps_api.is_none() {
                    return Err(err(
                        key,
                        "needs a [qps_api] section (the client certificate for the QPS REST API)",
                    ));
                }
                if !matches!(api.scheme_str(), Some("http") | Some("https"))
                    || api.authority().is_none()
                {
                    return Err(err(key, "must be an http:// or https:// URL with a host"));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for u in &self.upstreams {
            if !names.insert(u.display_name()) {
                return Err(err(
                    "upstream.name",
                    format!("`{}` is used twice", u.display_name()),
                ));
            }
        }
        if self.proxy.connect_timeout.is_zero() || self.proxy.response_timeout.is_zero() {
            return Err(err("proxy", "timeouts must be more than 0s"));
        }
        if self.upstreams.iter().any(|u| u.weight == 0) {
            return Err(err("upstream.weight", "must be at least 1"));
        }
        Ok(())
    }

    /// `[[virtual_proxy]]`: prefixes, session cookie names, identity headers.
    fn validate_virtual_proxies(&self) -> Result<(), ConfigError> {
        let mut prefixes = std::collections::HashSet::new();
        let mut cookies = std::collections::HashSet::new();
        for (i, vp) in self.virtual_proxies.iter().enumerate() {
            let p = &vp.prefix;
            if !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._~".contains(&b))
            {
                return Err(err(
                    format!("virtual_proxy[{i}].prefix"),
                    "Qlik prefixes are lower-case a-z, 0-9 and - . _ ~ only, without slashes",
                ));
            }
            if !prefixes.insert(p.clone()) {
                return Err(err(
                    format!("virtual_proxy[{i}].prefix"),
                    format!("`{p}` is used twice"),
                ));
            }
            if vp.session_cookie.is_empty() || !vp.session_cookie.bytes().all(is_token_byte) {
                return Err(err(
                    format!("virtual_proxy[{i}].session_cookie"),
                    "must be a cookie name (letters, digits and -._ etc., no spaces)",
                ));
            }
            if !cookies.insert(vp.session_cookie.to_ascii_lowercase()) {
                return Err(err(
                    format!("virtual_proxy[{i}].session_cookie"),
                    "Qlik requires a unique session cookie name per virtual proxy",
                ));
            }
            if let Some(h) = &vp.identity_header {
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    return Err(err(
                        format!("virtual_proxy[{i}].identity_header"),
                        "is not a valid header name",
                    ));
                }
                let lower = h.to_ascii_lowercase();
                for banned in [
                    "x-qlik-security",
                    "x-qlik-user",
                    "x-qlik-proxysession",
                    "x-qlik-proxyid",
                    "x-qlik-trace",
                    "x-qlik-app",
                    "x-qlik-capabilities",
                ] {
                    if lower.contains(banned) {
                        return Err(err(
                            format!("virtual_proxy[{i}].identity_header"),
                            format!("Qlik does not allow header names containing {banned}"),
                        ));
                    }
                }
            } else if vp.identity_from.is_some() {
                return Err(err(
                    format!("virtual_proxy[{i}].identity_from"),
                    "only means something with identity_header",
                ));
            } else if vp.cookieless.is_some() {
                return Err(err(
                    format!("virtual_proxy[{i}].cookieless"),
                    "only means something with identity_header: without it Qlik cannot tell who a request without a cookie is",
                ));
            }
        }
        Ok(())
    }

    /// `[admin]` (a token off loopback) and `[diagnostics]`.
    fn validate_admin_and_diagnostics(&self) -> Result<(), ConfigError> {
        if !self.admin.listen.ip().is_loopback() && self.admin.token_file.is_none() {
            return Err(err(
                "admin.token_file",
                format!(
                    "admin.listen {} is not a loopback address: set a token file, or listen on 127.0.0.1",
                    self.admin.listen
                ),
            ));
        }
        for h in &self.admin.allowed_hosts {
            let ok = !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
            if !ok {
                return Err(err(
                    "admin.allowed_hosts",
                    format!("`{h}` is not a host name or address (no scheme, path or spaces)"),
                ));
            }
        }
        let d = &self.diagnostics;
        if d.events_kept == 0 {
            return Err(err("diagnostics.events_kept", "must be at least 1"));
        }
        if !d.cookie_check_path.starts_with('/') || d.cookie_check_path.len() < 2 {
            return Err(err(
                "diagnostics.cookie_check_path",
                "must be a path like /__qsguard/cookie-check",
            ));
        }
        Ok(())
    }

    /// `[sessions]` and the cookies the guard sets (device, sticky).
    fn validate_sessions(&self) -> Result<(), ConfigError> {
        let ss = &self.sessions;
        if ss.max_per_user == 0 {
            return Err(err("sessions.max_per_user", "must be at least 1"));
        }
        if ss.evict_headroom >= ss.max_per_user {
            return Err(err(
                "sessions.evict_headroom",
                "must be less than sessions.max_per_user",
            ));
        }
        if let Some(name) = &self.proxy.sticky_cookie {
            if name.is_empty() || !name.bytes().all(is_token_byte) {
                return Err(err("proxy.sticky_cookie", "must be a cookie name"));
            }
            if name.eq_ignore_ascii_case(&ss.device_cookie)
                || self
                    .virtual_proxies_or_default()
                    .iter()
                    .any(|vp| vp.session_cookie.eq_ignore_ascii_case(name))
            {
                return Err(err(
                    "proxy.sticky_cookie",
                    "must differ from the session and device cookies",
                ));
            }
        }
        if ss.device_cookie.is_empty() || !ss.device_cookie.bytes().all(is_token_byte) {
            return Err(err("sessions.device_cookie", "must be a cookie name"));
        }
        if self
            .virtual_proxies
            .iter()
            .any(|vp| vp.session_cookie.eq_ignore_ascii_case(&ss.device_cookie))
        {
            return Err(err(
                "sessions.device_cookie",
                "must differ from every virtual proxy's session_cookie",
            ));
        }
        if ss.max_devices < 100 {
            return Err(err(
                "sessions.max_devices",
                "must be at least 100: below that, real browsers would lose their restore",
            ));
        }
        if ss.max_flights == 0 {
            return Err(err(
                "sessions.max_flights",
                "must be at least 1 (a login burst of one browser needs one)",
            ));
        }
        if ss.snapshot_interval.is_zero() {
            return Err(err("sessions.snapshot_interval", "must be more than 0s"));
        }
        if ss.inactivity_timeout.is_zero() {
            return Err(err("sessions.inactivity_timeout", "must be more than 0s"));
        }
        Ok(())
    }

    /// `[health]`.
    fn validate_health(&self) -> Result<(), ConfigError> {
        let h = &self.health;
        if h.interval.is_zero() || h.timeout.is_zero() || h.fall == 0 || h.rise == 0 {
            return Err(err(
                "health",
                "interval and timeout must be more than 0s, fall and rise at least 1",
            ));
        }
        if !h.path.starts_with('/') {
            return Err(err("health.path", "must start with /"));
        }
        Ok(())
    }

    /// `[qps_api]`: the URL and, for https, the client certificate.
    fn validate_qps_api(&self) -> Result<(), ConfigError> {
        if let Some(api) = &self.qps_api {
            if !matches!(api.url.scheme_str(), Some("http") | Some("https"))
                || api.url.authority().is_none()
            {
                return Err(err(
                    "qps_api.url",
                    "must be an http:// or https:// URL with a host",
                ));
            }
            if api.url.scheme_str() == Some("https")
                && (api.client_cert.is_none() || api.client_key.is_none())
            {
                return Err(err(
                    "qps_api.client_cert",
                    "an https QPS API needs client_cert and client_key (Qlik's exported client certificate)",
                ));
            }
        }
        Ok(())
    }

    /// The virtual proxies, with the central proxy added when the file names none.
    pub fn virtual_proxies_or_default(&self) -> Vec<VirtualProxyConfig> {
        if self.virtual_proxies.is_empty() {
            vec![VirtualProxyConfig {
                prefix: String::new(),
                session_cookie: "X-Qlik-Session".into(),
                identity_header: None,
                identity_from: None,
                restore: true,
                inactivity_timeout: None,
                cookieless: None,
            }]
        } else {
            self.virtual_proxies.clone()
        }
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn yes() -> bool {
    true
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_max_header_size() -> u64 {
    32 * 1024
}
fn default_max_body_size() -> u64 {
    4 * 1024 * 1024 * 1024
}
fn default_send_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_grace_period() -> Duration {
    Duration::from_secs(30)
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_pool_max_idle() -> usize {
    256
}
fn default_max_per_user() -> usize {
    5
}
fn default_inactivity_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_on_limit() -> OnLimit {
    OnLimit::Reuse
}
fn default_device_cookie() -> String {
    "qsguard".into()
}
fn default_burst_wait() -> Duration {
    Duration::from_secs(10)
}
fn default_snapshot_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_device_memory() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_max_devices() -> usize {
    100_000
}
fn default_max_flights() -> usize {
    10_000
}
fn default_http2_idle_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_body_min_rate() -> u64 {
    // Apache's mod_reqtimeout default (MinRate=500): a phone on a weak link still makes it.
    500
}

/// A Redis URL without its password (`redis://:secret@host` shows `redis://:***@host`).
pub fn redacted_url(url: &str) -> String {
    let Some(rest) = url.split_once("://") else {
        return url.into();
    };
    match rest.1.rsplit_once('@') {
        Some((auth, host)) => {
            let user = auth.split_once(':').map_or(auth, |(u, _)| u);
            format!("{}://{user}:***@{host}", rest.0)
        }
        None => url.into(),
    }
}

/// `"30m"`, `"10s"`, `"1h 30m"` (humantime).
mod duration {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration like \"30s\", \"5m\" or \"1h\": {e}"
            ))
        })
    }
}

mod opt_duration {
    use super::*;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

fn default_on_node_down() -> OnNodeDown {
    OnNodeDown::NewSession
}

fn opt_uri<'de, D: Deserializer<'de>>(d: D) -> Result<Option<http::Uri>, D::Error> {
    uri(d).map(Some)
}

fn uri<'de, D: Deserializer<'de>>(d: D) -> Result<http::Uri, D::Error> {
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a URL: {e}")))
}

/// A byte count: a plain integer, or a string like `"16KiB"`, `"100MiB"`, `"4GiB"`.
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Int(n) => Ok(n),
        Raw::Str(s) => parse_byte_size(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "`{s}` is not a size like 16384, \"16KiB\", \"100MiB\" or \"4GiB\""
            ))
        }),
    }
}

pub fn parse_byte_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[server]
listen = "127.0.0.1:8443"
[[upstream]]
url = "http://127.0.0.1:4280"
"#;

    #[test]
    fn the_snapshot_goes_to_the_state_directory_unless_the_file_says_where() {
        let mut c = Config::parse(MIN).unwrap();
        c.snapshot_in_state_directory(None);
        assert_eq!(c.sessions.snapshot_file, None);
        assert!(c.snapshot_text().starts_with("no session snapshot"));
        c.snapshot_in_state_directory(Some("relative:/var/lib/qsguard:/var/lib/other".into()));
        assert_eq!(
            c.sessions.snapshot_file.as_deref(),
            Some(Path::new("/var/lib/qsguard/sessions.json"))
        );
        assert!(c.snapshot_text().contains("/var/lib/qsguard/sessions.json"));
        let mut set = Config::parse(&format!(
            "{MIN}[sessions]\nsnapshot_file = \"/srv/s.json\"\n"
        ))
        .unwrap();
        set.snapshot_in_state_directory(Some("/var/lib/qsguard".into()));
        assert_eq!(
            set.sessions.snapshot_file.as_deref(),
            Some(Path::new("/srv/s.json"))
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.server.max_header_size, 32 * 1024);
        assert_eq!(c.sessions.max_per_user, 5);
        assert_eq!(c.sessions.on_limit, OnLimit::Reuse);
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9090");
        assert_eq!(
            c.virtual_proxies_or_default()[0].session_cookie,
            "X-Qlik-Session"
        );
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../config/qsguard.toml");
        Config::parse(text).unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse(&format!("{MIN}\n[sessions]\nmax_per_usr = 4\n")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("max_per_usr"), "{s}");
        assert!(s.contains("unknown field"), "{s}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("[server]\nlisten = \"nope\"\n[[upstream]]\nurl=\"http://a\"", "listen"),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\ntls_cert = \"/x\"\n[[upstream]]\nurl=\"http://a\"",
                "server.tls_key",
            ),
            ("[server]\nlisten = \"127.0.0.1:1\"", "upstream"),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nurl=\"ftp://a\"",
                "upstream[0].url",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nheader_read_timeout = \"soon\"\n[[upstream]]\nurl=\"http://a\"",
                "header_read_timeout",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\nmax_body_size = \"12 parsecs\"\n[[upstream]]\nurl=\"http://a\"",
                "max_body_size",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nurl=\"http://a\"\n[[virtual_proxy]]\nprefix=\"Bad/\"\nsession_cookie=\"X\"",
                "virtual_proxy[0].prefix",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nurl=\"http://a\"\n[[virtual_proxy]]\nprefix=\"a\"\nsession_cookie=\"X\"\nidentity_header=\"X-Qlik-User-Id\"",
                "identity_header",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nurl=\"http://a\"\n[sessions]\non_limit=\"panic\"",
                "on_limit",
            ),
        ];
        for (text, key) in cases {
            let e = Config::parse(text).unwrap_err().to_string();
            assert!(e.contains(key), "error `{e}` should name `{key}`");
        }
    }

    #[test]
    fn multi_node_and_reload_keys_are_checked() {
        let base = "[server]\nlisten = \"127.0.0.1:1\"\ntls_cert = \"/c\"\ntls_key = \"/k\"\n";
        let cases = [
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[server.certificate]]\nnames = [\"a.example\"]\ntls_cert = \"/c\"\ntls_key = \"/k\"\n[[upstream]]\nurl=\"http://a\"".to_string(),
                "server.certificate",
            ),
            (
                format!("{base}[[server.certificate]]\nnames = []\ntls_cert = \"/c\"\ntls_key = \"/k\"\n[[upstream]]\nurl=\"http://a\""),
                "server.certificate[0].names",
            ),
            (
                format!("{base}[[server.certificate]]\nnames = [\"a.*.example\"]\ntls_cert = \"/c\"\ntls_key = \"/k\"\n[[upstream]]\nurl=\"http://a\""),
                "server.certificate[0].names",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nurl=\"http://a\"\nqps_api=\"https://a:4243\"".to_string(),
                "upstream[0].qps_api",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nurl=\"http://a\"\nqps_api=\"a:4243\"\n[qps_api]\nurl=\"http://a:4243\"".to_string(),
                "upstream[0].qps_api",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nurl=\"http://a\"\n[proxy]\nsticky_cookie=\"a b\"".to_string(),
                "proxy.sticky_cookie",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nurl=\"http://a\"\n[proxy]\nsticky_cookie=\"qsguard\"".to_string(),
                "proxy.sticky_cookie",
            ),
            (
                "[server]\nlisten = \"127.0.0.1:1\"\n[[upstream]]\nurl=\"http://a\"\n[sessions]\non_node_down=\"wait\"".to_string(),
                "on_node_down",
            ),
        ];
        for (text, key) in cases {
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains(key), "error `{e}` should name `{key}`");
        }
        let ok = format!(
            "{base}[[server.certificate]]\nnames = [\"qlik.example.com\", \"*.apps.example.com\"]\n\
             tls_cert = \"/c2\"\ntls_key = \"/k2\"\n[[upstream]]\nurl=\"http://a\"\nqps_api=\"https://a:4243\"\n\
             [qps_api]\nurl=\"https://b:4243\"\nclient_cert=\"/c\"\nclient_key=\"/k\"\n[sessions]\non_node_down=\"error\""
        );
        let c = Config::parse(&ok).unwrap();
        assert_eq!(c.server.certificates[0].names.len(), 2);
        assert_eq!(c.sessions.on_node_down, OnNodeDown::Error);
        assert_eq!(
            c.upstreams[0].qps_api.as_ref().unwrap().port_u16(),
            Some(4243)
        );
    }

    #[test]
    fn health_expect_status() {
        let c = Config::parse(MIN).unwrap();
        assert!(c.health.is_up(302) && c.health.is_up(401) && !c.health.is_up(503));
        let c = Config::parse(&format!("{MIN}[health]\nexpect_status = [200, \"3xx\"]\n")).unwrap();
        assert!(c.health.is_up(200) && c.health.is_up(302));
        assert!(!c.health.is_up(204) && !c.health.is_up(401));
        for bad in ["[99]", "[\"6xx\"]", "[\"ok\"]"] {
            let e = Config::parse(&format!("{MIN}[health]\nexpect_status = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("expect_status"), "{e}");
        }
    }

    #[test]
    fn restart_only_keys_are_named() {
        let a = Config::parse(MIN).unwrap();
        let b = Config::parse(&format!(
            "{MIN}[sessions]\nmax_per_user = 3\ndevice_cookie = \"dev\"\n[[virtual_proxy]]\nprefix = \"x\"\nsession_cookie = \"X-Qlik-Session-x\"\n"
        ))
        .unwrap();
        assert_eq!(
            a.restart_only_changes(&b),
            vec!["virtual_proxy", "sessions.device_cookie"],
            "max_per_user is applied by a reload"
        );
        assert!(a.restart_only_changes(&a).is_empty());
    }

    #[test]
    fn cluster_values_are_checked_by_key() {
        let unset = Config::parse(MIN).unwrap();
        assert!(unset.cluster.is_none());
        assert!(unset.cluster_text().contains("single guard"));
        let set = Config::parse(&format!(
            "{MIN}[cluster]\nredis_url = \"redis://:pw@10.0.0.5:6379/0\"\nname = \"guard-a\"\n"
        ))
        .unwrap();
        let c = set.cluster.as_ref().unwrap();
        assert_eq!(c.key_prefix, "qsguard:");
        assert_eq!(c.store_timeout, Duration::from_millis(80));
        assert_eq!(c.guard_name(), "guard-a");
        let text = set.cluster_text();
        let debug = format!("{:?}", set.cluster);
        assert!(
            !debug.contains("pw@") && debug.contains("guard-a"),
            "{debug}"
        );
        assert!(
            text.contains("guard-a") && text.contains("10.0.0.5"),
            "{text}"
        );
        assert!(
            !text.contains("pw"),
            "the store's password is not shown: {text}"
        );
        let cases = [
            ("redis_url = \"http://10.0.0.5\"", "cluster.redis_url"),
            (
                "redis_url = \"redis://h\"\nca_file = \"/etc/hosts\"",
                "cluster.ca_file",
            ),
            (
                "redis_url = \"redis://h\"\nsecret_file = \"/nonexistent/pair.secret\"",
                "cluster.secret_file",
            ),
            (
                "redis_url = \"rediss://h\"\nca_file = \"/nonexistent/ca.pem\"",
                "cluster.ca_file",
            ),
            (
                "redis_url = \"redis://h\"\nname = \"guard a\"",
                "cluster.name",
            ),
            (
                "redis_url = \"redis://h\"\nkey_prefix = \"\"",
                "cluster.key_prefix",
            ),
            (
                "redis_url = \"redis://h\"\nstore_timeout = \"0s\"",
                "cluster.store_timeout",
            ),
            (
                "redis_url = \"redis://h\"\nstore_timeout = \"10s\"",
                "cluster.store_timeout",
            ),
        ];
        let short =
            std::env::temp_dir().join(format!("qsguard-short-secret-{}", std::process::id()));
        std::fs::write(&short, "too short\n").unwrap();
        let e = Config::parse(&format!(
            "{MIN}[cluster]\nredis_url = \"redis://h\"\nsecret_file = \"{}\"\n",
            short.display()
        ))
        .unwrap_err()
        .to_string();
        let _ = std::fs::remove_file(&short);
        assert!(
            e.starts_with("cluster.secret_file") && e.contains("32"),
            "{e}"
        );
        let tls = Config::parse(&format!(
            "{MIN}[cluster]\nredis_url = \"rediss://h:6380/0\"\nca_file = \"/etc/hosts\"\n"
        ))
        .expect("rediss:// with a CA file");
        assert!(tls.cluster.unwrap().ca_file.is_some());
        for (body, key) in cases {
            let e = Config::parse(&format!("{MIN}[cluster]\n{body}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(key), "{body}: {e}");
        }
        assert_eq!(
            unset.restart_only_changes(&set),
            vec!["cluster"],
            "the store connection is made at start"
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("16KiB"), Some(16384));
        assert_eq!(parse_byte_size("100"), Some(100));
        assert_eq!(parse_byte_size("2 MiB"), Some(2 << 20));
        assert_eq!(parse_byte_size("1.5GiB"), None);
        assert_eq!(parse_byte_size("x"), None);
    }
}
