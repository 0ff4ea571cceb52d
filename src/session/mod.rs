//! The session guard: the reason to put qsguard in front of Qlik instead of nginx.
//!
//! For every request on a virtual proxy it decides, before the request goes upstream
//! ([`SessionGuard::before`]), and learns, from the response ([`SessionGuard::after`]):
//!
//! | the request carries | the guard does |
//! | --- | --- |
//! | a cookie it knows is live | forward unchanged; touch the session |
//! | a cookie it does not know | forward unchanged; adopt the session and learn its owner |
//! | none, or a dead one, and the browser has a live session here | **restore** it |
//! | the same, and the user is at the limit | `on_limit`: **reuse**, **evict** or the **limit page** |
//! | the same, while another request of the browser is (re)creating its session | **wait** for it |
//! | no cookie at all, header authentication (`cookieless = "reuse"`) | the user's cookie-less session, or **wait** for it |
//!
//! Responses: a new session cookie records a session (its node, its browser; its owner from the
//! identity header, else looked up off the hot path); a logout, a replaced cookie or an engine
//! notification ends one. The table is in [`table`], the burst handling in [`flight`].

pub mod cookies;
pub mod device;
pub mod engine;
pub mod flight;
pub mod fold;
pub mod identity;
mod locate;
pub mod page;
pub mod snapshot;
pub mod table;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Response, Uri};
use http_body_util::Full;

use crate::config::{Config, OnLimit};
use crate::diagnostics::events::{self, Events, Kind};
use crate::head_view::HeadView;
use crate::pages::Page;
use crate::qps::{self, ApiHealth, Owner, PersonalApi, QpsApi, QpsError};
use arc_swap::ArcSwap;
use flight::{Flight, Flights, Lead, Outcome};
use identity::User;
use table::{DeviceId, Session, State, Table};

/// A virtual proxy as the guard needs it.
#[derive(Debug, Clone)]
pub struct VirtualProxy {
    pub prefix: String,
    pub cookie: String,
    pub identity_header: Option<HeaderName>,
    /// `restore`: a browser that lost its cookie gets its own live session back.
    pub restore: bool,
    /// `cookieless = "reuse"` on a header-authentication virtual proxy: a request without
    /// any cookie goes with the user's latest session made for such a request.
    pub cookieless_reuse: bool,
}

/// Counts of what the guard did, for logs now and metrics later.
#[derive(Debug, Default)]
pub struct Counters {
    pub restored: AtomicU64,
    pub reused: AtomicU64,
    pub evicted: AtomicU64,
    pub refused_at_limit: AtomicU64,
    pub bursts_held: AtomicU64,
    pub qps_limit_refusals: AtomicU64,
    pub adopted: AtomicU64,
    pub replaced: AtomicU64,
    /// Requests without cookies sent with a session made for an earlier one.
    pub cookieless_attached: AtomicU64,
    /// Late login steps of a burst the guard answered with the session the browser has.
    pub stragglers_answered: AtomicU64,
}

/// What the guard decided for one request, carried to the response phase.
pub struct Context {
    pub vp: usize,
    pub device: DeviceId,
    /// The browser had no (valid) device cookie, or gets a new one: this response sets it.
    pub new_device: bool,
    /// The request carried a device cookie (valid or not).
    device_sent: bool,
    /// `device` is one the guard signed (or is issuing now). An id from a cookie that does not
    /// verify (signed with a key the guard no longer has: a restart without a snapshot, a
    /// rotation) still keys the browser's flight, so a burst after a restart is coalesced,
    /// but it restores nothing, is linked to nothing, names no user, and is replaced with the
    /// browser's next session.
    device_trusted: bool,
    /// The user named by a header-authentication identity header.
    pub identity: Option<User>,
    /// The user an NTLM Type 3 to the authentication module names: a claim until Qlik
    /// accepts it (its answer carries a ticket).
    pub windows_user: Option<User>,
    /// The request carries neither a session cookie nor a device cookie and names a believed
    /// user: a client that keeps no cookies (a script), or a browser's very first request.
    cookieless: bool,
    /// The session this request goes upstream with.
    pub session: Option<Arc<Session>>,
    /// The guard put `session`'s cookie on the request (restore or reuse): set it back.
    pub set_back: bool,
    /// A session cookie the guard did not know.
    pub unknown: Option<Box<str>>,
    /// The session cookie the request carried, when it was not a live one: what ties a late
    /// step of a login burst to the browser that started it (see [`flight::Landing`]).
    carried: Option<Box<str>>,
    pub logout: bool,
    pub host: Option<HeaderValue>,
    /// `/app/<id>` of an engine WebSocket upgrade.
    pub app: Option<String>,
    pub tls: bool,
    /// What the request holds until it is answered (released when the context is dropped).
    holds: Holds,
    /// Where the request came from (for events, and noted when a session is made for it).
    client: Option<events::Requester>,
    /// The node of the browser's login dance in progress, for a request without a session.
    pub node_hint: Option<Arc<str>>,
    pub peer: IpAddr,
    /// With a pair: hears when the store has the session this answer makes.
    pair_written: Option<tokio::sync::oneshot::Receiver<()>>,
}

/// What a request holds in the guard while it is on its way: a slot in its user's count (when
/// no flight holds it for the login dance) and the lead of its browser's flight. The response
/// phase settles both ([`SessionGuard::after`]); whatever way a request ends before that (a
/// body cut off, Qlik unreachable, the client gone), dropping its context gives them back at
/// once: the flight fails, so the browser's other requests go on, and the slot is released,
/// so the user is not counted at the limit for a session that will not exist.
#[derive(Default)]
struct Holds {
    /// Set once the request holds anything.
    guard: Option<Arc<SessionGuard>>,
    device: DeviceId,
    vp: usize,
    lead: Option<Arc<Flight>>,
    reservation: Option<(User, u64)>,
}

/// Without the cookie values (`unknown` is one): a debug line must not carry them.
impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("vp", &self.vp)
            .field("new_device", &self.new_device)
            .field("identity", &self.identity)
            .field("session", &self.session)
            .field("set_back", &self.set_back)
            .field("unknown", &self.unknown.is_some())
            .field("holds", &self.holds)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Holds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holds")
            .field("lead", &self.lead.as_ref().map(|l| l.id))
            .field("reservation", &self.reservation.as_ref().map(|(_, r)| r))
            .finish()
    }
}

impl Holds {
    /// Ends the flight this request leads with `outcome`, and releases what the flight held.
    fn finish_flight(&mut self, outcome: Outcome) {
        let (Some(g), Some(f)) = (&self.guard, self.lead.take()) else {
            return;
        };
        if let Some(done) = g.flights.finish(self.device, self.vp, Some(f.id), outcome) {
            g.release_flight(&done);
        }
    }

    /// Gives the request's own slot back (a session made meanwhile counts by itself).
    fn release(&mut self) {
        if let (Some(g), Some((u, r))) = (&self.guard, self.reservation.take()) {
            g.release_slot(&u, r);
        }
    }
}

impl Drop for Holds {
    fn drop(&mut self) {
        self.finish_flight(Outcome::Failed);
        self.release();
    }
}

/// How long a slot taken for a session on its way is held, at most (a login dance may take a
/// while: a password prompt).
const RESERVATION_MS: u64 = 60_000;

/// Owner lookups of unconfirmed cookie values at once, at most.
const MAX_LOOKUPS: usize = 32;

/// Devices a session is linked to, at most (a client that keeps its session cookie but never
/// the device cookie would otherwise add one with every request).
const MAX_DEVICES_PER_SESSION: usize = 8;

/// A request as the guard reads it (no copy of the head is made).
pub struct Request<'a, H> {
    pub method: &'a [u8],
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a H,
    /// The client connection's memory of its device cookie (HTTP/1 keep-alive), if any.
    pub device_memo: Option<&'a std::sync::Mutex<device::DeviceMemo>>,
}

/// The decision before the upstream.
pub enum Verdict {
    /// Not a virtual proxy path: no session logic.
    Pass,
    Forward(Box<Context>),
    /// The guard answers itself (limit page, bad identity header, a held login step).
    Answer(Response<Full<Bytes>>),
}

/// Where a user at the limit goes.
enum Limit {
    Proceed(Option<u64>),
    Reuse(Arc<Session>),
    WaitForPending,
    Evict(Arc<Session>, u64),
    Refuse,
}

pub struct SessionGuard {
    pub table: Table,
    flights: Flights,
    vps: Vec<VirtualProxy>,
    /// The limit and what to do at it; a reload replaces it.
    policy: ArcSwap<Policy>,
    device_cookie: String,
    /// How to reach each node's APIs; a reload replaces it.
    nodes: ArcSwap<HashMap<Arc<str>, NodeApis>>,
    personal: PersonalApi,
    /// How each node's QPS REST API is doing (for `/readyz`, `/metrics`, `qsguard doctor`).
    pub qps_health: Arc<ApiHealth>,
    pub counters: Counters,
    csrf_key: [u8; 32],
    /// Signs and checks device cookies.
    pub device_keys: device::DeviceKeys,
    /// Where identity headers are believed from.
    identity: identity::IdentitySources,
    /// Lookups of unconfirmed cookie values in flight (made-up values cannot start more).
    lookups: Arc<tokio::sync::Semaphore>,
    /// Which node holds a cookie the guard does not know (several nodes).
    locator: locate::Locator,
    /// `proxy.sticky_cookie`: a request that carries it names its node already (a reload
    /// replaces it).
    sticky_cookie: arc_swap::ArcSwapOption<String>,
    /// One snapshot writer at a time (the periodic one, shutdown, an upgrade).
    pub(crate) snapshot_lock: std::sync::Mutex<()>,
    events: Arc<Events>,
    /// The pair's shared store (`[cluster]`), if this guard is one of a pair.
    cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The part of `[sessions]` a reload may change.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub(crate) max: usize,
    pub(crate) headroom: usize,
    pub(crate) on_limit: OnLimit,
    pub(crate) burst_wait: Duration,
    pub(crate) on_node_down: crate::config::OnNodeDown,
}

impl Policy {
    /// The count at which `on_limit` applies: with `evict`, `evict_headroom` below the limit.
    fn threshold(&self) -> usize {
        match self.on_limit {
            OnLimit::Evict => self.max - self.headroom,
            _ => self.max,
        }
    }

    fn new(s: &crate::config::SessionsConfig) -> Policy {
        Policy {
            max: s.max_per_user,
            headroom: s.evict_headroom,
            on_limit: s.on_limit,
            burst_wait: s.burst_wait,
            on_node_down: s.on_node_down,
        }
    }
}

/// A node's address for the Personal API, and its QPS REST API when `[qps_api]` is set.
#[derive(Clone)]
pub(crate) struct NodeApis {
    pub(crate) uri: Uri,
    pub(crate) qps: Option<QpsApi>,
}

/// The nodes' APIs for a reload, built before it is applied.
pub struct ReloadedApis(HashMap<Arc<str>, NodeApis>);

/// Each configured node's APIs: the QPS REST API is the node's own `qps_api`, else
/// `[qps_api].url`, reporting to `health` under the node's name. The client certificate is
/// read here, so a reload picks up a renewed one.
fn node_apis(
    config: &Config,
    health: &Arc<ApiHealth>,
) -> Result<HashMap<Arc<str>, NodeApis>, String> {
    let shared = config.qps_api.as_ref().map(QpsApi::new).transpose()?;
    Ok(config
        .upstreams
        .iter()
        .map(|u| {
            let name = Arc::<str>::from(u.display_name());
            let qps = shared.as_ref().map(|api| {
                match &u.qps_api {
                    Some(url) => api.at(url.clone()),
                    None => api.clone(),
                }
                .reporting(name.clone(), health.clone())
            });
            (
                name,
                NodeApis {
                    uri: u.url.clone(),
                    qps,
                },
            )
        })
        .collect())
}

impl SessionGuard {
    pub fn new(config: &Config, events: Arc<Events>) -> Result<SessionGuard, String> {
        let vps: Vec<VirtualProxy> = config
            .virtual_proxies_or_default()
            .into_iter()
            .map(|v| VirtualProxy {
                prefix: v.prefix,
                cookie: v.session_cookie,
                cookieless_reuse: v.identity_header.is_some()
                    && v.cookieless != Some(crate::config::Cookieless::New),
                identity_header: v
                    .identity_header
                    .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
                restore: v.restore,
            })
            .collect();
        let timeouts = config
            .virtual_proxies_or_default()
            .iter()
            .map(|v| {
                v.inactivity_timeout
                    .unwrap_or(config.sessions.inactivity_timeout)
            })
            .collect();
        let s = &config.sessions;
        let tls =
            crate::tls_client::config(config.proxy.upstream_ca.as_deref(), "proxy.upstream_ca")?;
        let identity = identity::IdentitySources::new(config);
        for h in identity.open_headers() {
            tracing::warn!(header = %h, "the identity header {h} is believed from every peer: set identity_from on its virtual proxy (or server.trusted_proxies) to the address of the proxy that authenticates users, or anyone who reaches qsguard can speak for any user");
        }
        let qps_health = Arc::new(ApiHealth::new(events.clone()));
        qps_health.set_configured(config.qps_api.is_some());
        let cluster = match &config.cluster {
            Some(c) => Some(Arc::new(crate::cluster::Cluster::new(c, events.clone())?)),
            None => None,
        };
        Ok(SessionGuard {
            table: {
                let t = Table::new(timeouts, s.device_memory);
                t.set_max_devices(s.max_devices);
                if let Some(c) = &cluster {
                    t.set_journal(c.journal());
                }
                t
            },
            // A login dance may take a while (a password prompt): give it a minute.
            flights: Flights::new(Duration::from_secs(60).max(s.burst_wait), s.max_flights),
            vps,
            policy: ArcSwap::from_pointee(Policy::new(s)),
            device_cookie: s.device_cookie.clone(),
            nodes: ArcSwap::from_pointee(node_apis(config, &qps_health)?),
            personal: PersonalApi::new(tls),
            qps_health,
            counters: Counters::default(),
            csrf_key: rand::random(),
            device_keys: device::DeviceKeys::load(s.snapshot_file.as_deref())?,
            identity,
            lookups: Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS)),
            locator: locate::Locator::new(),
            sticky_cookie: arc_swap::ArcSwapOption::from(
                config.proxy.sticky_cookie.clone().map(Arc::new),
            ),
            snapshot_lock: std::sync::Mutex::new(()),
            events,
            cluster,
        })
    }

    /// The pair's store, when this guard is one of a pair.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// With `[cluster]`: the pair's device-cookie key (so a device cookie one guard issued
    /// verifies on the other), then the store's writer, until `stop`.
    pub async fn join_pair(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let Some(c) = self.cluster.clone() else {
            return;
        };
        match tokio::time::timeout(Duration::from_secs(2), c.device_signing_key()).await {
            Ok(Some(key)) => self.device_keys.adopt(key),
            _ => {
                tracing::warn!(guard = %c.name(), "the cluster store did not give the pair's device-cookie key at start: this guard signs device cookies with its own key until it is back, so the other guard does not know its browsers' devices")
            }
        }
        tokio::spawn(c.run(self.clone(), stop));
    }

    /// Applies a reloaded config: the limit policy, the inactivity timeouts and the nodes'
    /// APIs. The virtual proxies and the device cookie stay as they were at start (the table
    /// is indexed by them); the caller says so in the log.
    pub fn reload(&self, config: &Config, nodes: ReloadedApis, kept: &[&str]) {
        let mut nodes = nodes.0;
        // A node removed from the config but kept for its live sessions (retired) keeps its
        // APIs: its sessions are still owned, evicted and ended through them.
        let old = self.nodes.load();
        for name in kept {
            if let (false, Some(apis)) = (nodes.contains_key(*name), old.get(*name)) {
                nodes.insert(Arc::from(*name), apis.clone());
            }
        }
        // Timeouts by prefix: the virtual proxies themselves stay as they were at start.
        let vps = config.virtual_proxies_or_default();
        self.table.set_timeouts(
            self.vps
                .iter()
                .enumerate()
                .map(|(i, running)| {
                    vps.iter()
                        .find(|v| v.prefix == running.prefix)
                        .map(|v| {
                            v.inactivity_timeout
                                .unwrap_or(config.sessions.inactivity_timeout)
                        })
                        .unwrap_or_else(|| Duration::from_millis(self.table.timeout_ms(i)))
                })
                .collect(),
        );
        self.nodes.store(Arc::new(nodes));
        self.sticky_cookie
            .store(config.proxy.sticky_cookie.clone().map(Arc::new));
        self.qps_health.set_configured(config.qps_api.is_some());
        self.policy.store(Arc::new(Policy::new(&config.sessions)));
    }

    /// The part of a reload that can fail (reading the QPS API's certificates), done before
    /// anything changes.
    pub fn prepare_reload(&self, config: &Config) -> Result<ReloadedApis, String> {
        node_apis(config, &self.qps_health).map(ReloadedApis)
    }

    /// The limit policy now.
    pub(crate) fn policy(&self) -> Policy {
        **self.policy.load()
    }

    pub fn virtual_proxies(&self) -> &[VirtualProxy] {
        &self.vps
    }

    /// The virtual proxy a path belongs to, and the path below its prefix.
    pub fn route<'a>(&self, path: &'a str) -> Option<(usize, &'a str)> {
        let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
        if !first.is_empty() {
            if let Some(i) = self.vps.iter().position(|v| v.prefix == first) {
                return Some((i, &path[1 + first.len()..]));
            }
        }
        self.vps
            .iter()
            .position(|v| v.prefix.is_empty())
            .map(|i| (i, path))
    }

    /// The background work: expiry and abandoned logins. Runs until the guard stops.
    pub async fn sweep_forever(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let min_timeout = (0..self.vps.len())
            .map(|vp| self.table.timeout_ms(vp))
            .min()
            .unwrap_or(60_000);
        let every = Duration::from_millis((min_timeout / 10).clamp(50, 5_000));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
            for s in self.table.sweep() {
                tracing::info!(session = %s.hash, user = %owner_text(&s), vp = %self.vps[s.vp].prefix, "session expired");
            }
            for f in self.flights.sweep() {
                self.release_flight(&f);
            }
        }
    }

    /// Phase "before upstream": see the module docs. In order: read what the request says
    /// ([`SessionGuard::read`]); a cookie the guard knows is live goes on at once (the hot
    /// path); a step of a login dance; a restore, or waiting for the browser's flight; and
    /// last, a new session, within the user's limit.
    pub async fn before<H: HeadView>(
        self: &Arc<Self>,
        req: &Request<'_, H>,
        peer: IpAddr,
        tls: bool,
    ) -> Verdict {
        let Some((vp, rest)) = self.route(req.path) else {
            return Verdict::Pass;
        };
        let (mut ctx, cookie) = match self.read(vp, rest, req, peer, tls) {
            Ok(read) => read,
            Err(page) => return Verdict::Answer(*page),
        };
        if let Some(s) = self.known_live(&mut ctx, &cookie, req.path, req.headers) {
            // A login step with a live cookie: the browser has its session already, and a
            // ticket Qlik issued now would make another one.
            if let Some(step) = LoginStep::of(rest, req) {
                if let Some(page) = self.late_step(&ctx, &s, step, req, true) {
                    return Verdict::Answer(page);
                }
            }
            ctx.session = Some(s);
            return Verdict::Forward(ctx);
        }
        // A cookie this guard does not know, or let expire, that the pair's store knows: a
        // session made or kept in use through the other guard. Adopted on the store's word
        // (a guard of the pair had it from Qlik), it takes the hot path from now on.
        if let (Some(c), Some(value)) = (&self.cluster, cookie.first) {
            if self.adopt_from_pair(c, &mut ctx, value).await {
                ctx.unknown = None;
                if let Some(s) = self.known_live(&mut ctx, &cookie, req.path, req.headers) {
                    ctx.session = Some(s);
                    return Verdict::Forward(ctx);
                }
            }
        }
        self.note_browser(&mut ctx, &cookie, req.headers);
        ctx.carried = cookie.first.map(Box::from);
        // A cookie the guard does not know (a restart without a snapshot, a session made
        // around it): with several nodes, only the node that made it knows it; find that one
        // before the balancer sends it to another, which would make a new session.
        // The sticky cookie, where the browser sends one, is the shortcut: no lookup.
        let sticky = self.sticky_cookie.load();
        let sticky_sent = sticky
            .as_deref()
            .is_some_and(|name| cookies::find(req.headers, [name])[0].first.is_some());
        if let (Some(value), false) = (ctx.unknown.clone(), sticky_sent) {
            if self.locate(&ctx, &value).await.is_some() {
                ctx.unknown = None;
                if let Some(s) = self.known_live(&mut ctx, &cookie, req.path, req.headers) {
                    ctx.session = Some(s);
                    return Verdict::Forward(ctx);
                }
            }
        }
        // The Personal API never creates a session: nothing to guard.
        if is_personal_api(rest) {
            return Verdict::Forward(ctx);
        }
        let ticket =
            has_param(req.query, "qlikTicket") || req.headers.first("x-qlik-ticket").is_some();
        if ticket {
            if let Some((user, confirmed)) = self.accepted_windows_user(&ctx, req.query) {
                // The first the guard knows of this user in this browser: the limit applies
                // now, before the ticket makes the session.
                let (device, vp) = (ctx.device, ctx.vp);
                let verdict = self.limit_for(ctx, req, user, confirmed).await;
                return match verdict {
                    Verdict::Answer(page) => {
                        self.dance_failed(device, vp);
                        Verdict::Answer(page)
                    }
                    // Reused: Qlik would turn the ticket into a new session whatever cookie
                    // came with it, so the browser goes back to its page with the reused one.
                    Verdict::Forward(ctx) if ctx.set_back => {
                        match (ctx.session.clone(), LoginStep::of(rest, req)) {
                            (Some(s), Some(LoginStep::Ticket)) => {
                                self.dance_landed(&ctx, &s);
                                Verdict::Answer(self.redirect_with(&s, &without_ticket(req)))
                            }
                            _ => Verdict::Forward(ctx),
                        }
                    }
                    other => other,
                };
            }
        }
        if is_auth_module(rest) || ticket {
            if let Some(page) = self.late_step_of_landed(&ctx, rest, req) {
                return Verdict::Answer(page);
            }
            return self.login_step(ctx, req.query, ticket).await;
        }
        if ctx.cookieless && self.vps[vp].cookieless_reuse {
            match self.cookieless(ctx).await {
                Ok(verdict) => return verdict,
                Err(back) => ctx = back,
            }
        }
        if !ctx.new_device {
            match self.restore_or_wait(ctx, &cookie, req.headers).await {
                Ok(verdict) => return verdict,
                Err(back) => ctx = back,
            }
        }
        // An unknown cookie may well be live (made before a guard restart, or elsewhere):
        // forward it and learn from the answer. Otherwise this request creates a session.
        if ctx.unknown.is_some() {
            return Verdict::Forward(ctx);
        }
        self.new_session(ctx, req).await
    }

    /// What the request says: its virtual proxy's session cookie, the browser's device cookie,
    /// the identity header (a bad one is answered with a 400).
    fn read<'r, H: HeadView>(
        &self,
        vp: usize,
        rest: &str,
        req: &Request<'r, H>,
        peer: IpAddr,
        tls: bool,
    ) -> Result<(Box<Context>, cookies::Found<'r>), Box<Page>> {
        let info = &self.vps[vp];
        let [cookie, sent_device] = cookies::find(req.headers, [&info.cookie, &self.device_cookie]);
        // A device cookie the guard did not sign is never honoured (see `device_trusted`).
        let (device, new_device, device_trusted) = match sent_device.first {
            Some(v) => match self.device_keys.verify_remembered(v, req.device_memo) {
                Some(d) => (d, false, true),
                None => match device::id_of(v) {
                    Some(d) => (d, false, false),
                    None => (rand::random(), true, true),
                },
            },
            None => (rand::random(), true, true),
        };
        let identity = match &info.identity_header {
            None => None,
            // From a peer it is not believed from, the header is not there (the engine does
            // not forward it either).
            Some(h) if !self.identity.believes(h, peer) => None,
            Some(h) => {
                let mut values = req.headers.values(h.as_str());
                match (values.next(), values.next()) {
                    (None, _) => None,
                    (Some(v), None) => Some(
                        User::parse(v)
                            .map_err(|why| Box::new(crate::pages::bad_identity(h, why)))?,
                    ),
                    (Some(_), Some(_)) => {
                        return Err(Box::new(crate::pages::bad_identity(
                            h,
                            "the identity header was sent twice",
                        )))
                    }
                }
            }
        };
        // Written into its box, not moved there (the several hundred bytes copied otherwise).
        let ctx = Box::write(
            Box::new_uninit(),
            Context {
                vp,
                device,
                new_device,
                device_sent: sent_device.first.is_some(),
                device_trusted,
                cookieless: cookie.count == 0 && sent_device.count == 0 && identity.is_some(),
                identity,
                windows_user: is_auth_module(rest)
                    .then(|| windows_user(req.headers))
                    .flatten(),
                session: None,
                set_back: false,
                unknown: None,
                carried: None,
                logout: req.method == b"DELETE" && is_personal_api(rest),
                host: None,
                app: app_of(rest),
                tls,
                holds: Holds::default(),
                client: None,
                node_hint: None,
                peer,
                pair_written: None,
            },
        );
        Ok((ctx, cookie))
    }

    /// Qlik accepted the browser's NTLM Type 3 (it answered with `ticket`): the user is the
    /// device's now, and, unless the dance was checked for this user at its start, its
    /// ticket will be.
    fn windows_login_accepted(&self, ctx: &Context, user: User, ticket: String) {
        if !ctx.device_trusted {
            return;
        }
        // Remembered (within `sessions.max_devices`) even before the browser has a session:
        // a refusal of its login is then one of a user the guard knows.
        self.table.seen_device(ctx.device, None, ctx.peer, true);
        self.table.set_device_user(ctx.device, &user);
        if let Some(f) = self.flights.get(ctx.device, ctx.vp) {
            let mut d = f.dance();
            let checked = d
                .reservation
                .as_ref()
                .is_some_and(|(u, _)| u.key == user.key);
            if !checked {
                d.windows_user = Some(user);
                d.ticket = Some(ticket.into());
            }
        }
    }

    /// The user of this browser's dance whose Type 3 Qlik accepted and whose limit is still
    /// to be checked (taken: one check per dance), and whether the request brings the very
    /// ticket Qlik answered that Type 3 with. Only then is it that browser's login, confirmed
    /// by Qlik, and may go with one of the user's sessions: a device cookie alone may have
    /// been planted in another browser, and the ticket is a secret of the one Qlik gave it to.
    fn accepted_windows_user(&self, ctx: &Context, query: Option<&str>) -> Option<(User, bool)> {
        if ctx.new_device || !ctx.device_trusted {
            return None;
        }
        let f = self.flights.get(ctx.device, ctx.vp)?;
        let mut d = f.dance();
        let user = d.windows_user.take()?;
        let issued = d.ticket.take();
        let brought = param(query, "qlikTicket");
        let confirmed = issued.is_some() && issued.as_deref() == brought.as_deref();
        Some((user, confirmed))
    }

    /// The hot path: the request's cookie names a session the guard knows is live (and, on a
    /// header-authentication virtual proxy, of the same user): touch it, note the browser.
    /// An unknown cookie is noted in `ctx.unknown`.
    fn known_live<H: HeadView>(
        &self,
        ctx: &mut Context,
        cookie: &cookies::Found<'_>,
        path: &str,
        headers: &H,
    ) -> Option<Arc<Session>> {
        let value = cookie.first?;
        let now = self.table.now_ms();
        let s = match self.table.get(ctx.vp, value) {
            Some(s) if self.table.is_live(&s, now) => s,
            // Not confirmed by Qlik yet: as unknown as before (a lookup is on its way).
            Some(s) if s.state() == State::Unconfirmed => {
                ctx.unknown = Some(value.into());
                return None;
            }
            Some(_) => return None,
            None => {
                ctx.unknown = Some(value.into());
                return None;
            }
        };
        if let (Some(i), Some(o)) = (&ctx.identity, s.owner()) {
            if i.key != o.key {
                return None;
            }
        }
        if cookie.count > 1 {
            ctx.client = Some(requester_of(headers, ctx.peer));
            self.duplicated(ctx, cookie.count, Some(&s));
        }
        self.table.touch_at(&s, now);
        // One look under the lock for both (this is the hot path).
        let (linked, fold_pending) = {
            let mut m = s.meta();
            if m.cookieless && ctx.device_sent {
                // It was made for a request without cookies, but its client keeps them: a
                // browser (whose first request has none), never again one for scripts.
                m.cookieless = false;
            }
            (m.devices.contains(&ctx.device), !m.set_with.is_empty())
        };
        if fold_pending && cookie.count == 1 {
            self.check_folded(&s, ctx, path, headers);
        }
        if !linked && ctx.new_device {
            // The id is the guard's new one, going out with this answer: nobody else has it.
            if s.meta().devices.len() < MAX_DEVICES_PER_SESSION {
                self.table.link_device(&s, ctx.device);
            }
        } else if !linked || !ctx.device_trusted {
            self.new_device_for(ctx, &s);
        }
        if let Some(i) = &ctx.identity {
            if s.meta().owner.is_none() {
                self.table.set_owner(&s, i.clone());
            }
        }
        Some(s)
    }

    /// A cookie value this guard does not know (or let expire) looked up in the pair's store:
    /// when a guard of the pair recorded it as a live session of this virtual proxy, on a
    /// node this guard has, of the user the identity header names (if any), it is this
    /// guard's too. The request's device is linked only when the store says a guard of the
    /// pair linked it, so a device cookie planted beside a stolen session cookie gains
    /// nothing it did not have.
    async fn adopt_from_pair(
        &self,
        c: &crate::cluster::Cluster,
        ctx: &mut Context,
        value: &str,
    ) -> bool {
        if let Some(s) = self.table.get(ctx.vp, value) {
            if !matches!(s.state(), State::Expired | State::Unconfirmed) {
                return false;
            }
        }
        let Some(record) = c.lookup(value).await else {
            return false;
        };
        let Some(s) = self.take_from_pair(ctx.vp, value, &record, ctx.identity.as_ref(), ctx.tls)
        else {
            return false;
        };
        let device = crate::cluster::store::device_key(ctx.device);
        if ctx.device_trusted && !ctx.new_device && record.devices.contains(&device) {
            self.table.link_device(&s, ctx.device);
        }
        true
    }

    /// A session the pair's store records, made this guard's: of virtual proxy `vp`, on a
    /// node this guard has, of the user `identity` names (if any). Inserted, or revived if
    /// this guard had let it expire while the other kept it in use, or confirmed if it was
    /// waiting for Qlik's word. `None` when it does not fit, or this guard knows it ended.
    fn take_from_pair(
        &self,
        vp: usize,
        value: &str,
        record: &crate::cluster::store::SessionRecord,
        identity: Option<&User>,
        tls: bool,
    ) -> Option<Arc<Session>> {
        if record.vp != self.vps[vp].prefix {
            return None;
        }
        let owner = crate::cluster::owner_of(&record.owner)?;
        if identity.is_some_and(|i| i.key != owner.key) {
            return None;
        }
        let node = self
            .nodes
            .load()
            .keys()
            .find(|n| ***n == *record.node)
            .cloned()?;
        let s = match self.table.get(vp, value) {
            Some(s) if s.state() == State::Live => return Some(s),
            Some(s) if s.state() == State::Expired => self.table.revive(&s).then_some(s)?,
            Some(s) if s.state() == State::Unconfirmed => self.table.confirm(&s).then_some(s)?,
            // Ended here (a logout, Qlik's word): dead, whatever the store still says.
            Some(_) => return None,
            None => {
                let attributes = if record.attributes.is_empty() {
                    default_attributes(tls)
                } else {
                    record.attributes.clone()
                };
                self.table.insert(vp, value, node, None, None, attributes)
            }
        };
        self.table.set_owner(&s, owner);
        self.counters.adopted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = %s.hash, user = %owner_text(&s), vp = %self.vps[vp].prefix, from = %record.guard, "a session of the pair adopted from the cluster store");
        Some(s)
    }

    /// A browser this guard does not know a session of: the sessions a guard of the pair
    /// linked to its (signed) device, taken from the store with their sealed values, so that
    /// the restore below finds them. Only with the pair's secret.
    async fn device_sessions_from_pair(&self, ctx: &Context) {
        let Some(c) = self.cluster.as_ref().filter(|c| c.seals()) else {
            return;
        };
        for (value, record) in c.device_sessions(ctx.device).await {
            if let Some(s) =
                self.take_from_pair(ctx.vp, &value, &record, ctx.identity.as_ref(), ctx.tls)
            {
                self.table.link_device(&s, ctx.device);
            }
        }
    }

    /// A request without a live session: note the browser (its login dance's node, Host,
    /// User-Agent, address, user) and a duplicated cookie.
    fn note_browser<H: HeadView>(
        &self,
        ctx: &mut Context,
        cookie: &cookies::Found<'_>,
        headers: &H,
    ) {
        if !ctx.new_device {
            ctx.node_hint = self
                .flights
                .get(ctx.device, ctx.vp)
                .and_then(|f| f.dance().node.clone());
        }
        ctx.host = headers
            .first("host")
            .and_then(|h| HeaderValue::from_bytes(h).ok());
        // A device id minted for this request (128 random bits) is in no table yet: no lookup.
        if !ctx.new_device {
            let ua = headers.first("user-agent").and_then(crate::head_view::text);
            self.table.seen_device(ctx.device, ua, ctx.peer, false);
        }
        ctx.client = Some(requester_of(headers, ctx.peer));
        if cookie.count > 1 {
            self.duplicated(ctx, cookie.count, None);
        }
        if let (Some(i), true) = (&ctx.identity, ctx.device_trusted) {
            self.table.set_device_user(ctx.device, i);
        }
    }

    fn duplicated(&self, ctx: &Context, count: usize, s: Option<&Session>) {
        let cause = format!("the cookie {} was sent {count} times in one request (path-scoped duplicates, or a device on the way appending one)", self.vps[ctx.vp].cookie);
        self.emit(Kind::CookieDuplicated, cause, Some(ctx), s, None);
    }

    /// A step of a login dance (Qlik's authentication module, a ticket). The leader's steps
    /// pass; a second login of the same burst is held, then sent back to the page it asked for
    /// with the session the first one got.
    async fn login_step(&self, ctx: Box<Context>, query: Option<&str>, ticket: bool) -> Verdict {
        let flight = (!ctx.new_device)
            .then(|| self.flights.get(ctx.device, ctx.vp))
            .flatten();
        if let Some(f) = flight {
            let target = param(query, "targetId");
            let leads = ticket
                || f.dance().leader_target.is_none()
                || f.dance().leader_target.as_deref() == target.as_deref();
            if !leads {
                self.counters.bursts_held.fetch_add(1, Ordering::Relaxed);
                self.emit(
                    Kind::BurstHeld,
                    "a second login of the same browser held until the first one has its session",
                    Some(&ctx),
                    None,
                    None,
                );
                let back = target.and_then(|t| f.dance().targets.get(&t).cloned());
                if let Outcome::Session(s) = f.wait(self.policy().burst_wait).await {
                    if !self.same_browser(&ctx, &s) {
                        return Verdict::Forward(ctx);
                    }
                    let hub = hub_of(&self.vps[ctx.vp].prefix);
                    return Verdict::Answer(
                        self.redirect_with(&s, back.as_deref().unwrap_or(&hub)),
                    );
                }
            }
        }
        Verdict::Forward(ctx)
    }

    /// This browser's recent landing whose session is still live, for a request of the burst
    /// that made it: one that carried a cookie the burst's login replaced (a secret of that
    /// browser: a device cookie alone, which another browser may have been planted with, or
    /// no cookie at all, is not enough).
    fn landing_for(&self, ctx: &Context) -> Option<Arc<flight::Landing>> {
        if ctx.new_device || !ctx.device_trusted {
            return None;
        }
        let carried = self.carried(ctx)?;
        let l = self.flights.landing(ctx.device, ctx.vp)?;
        (l.replaced(carried) && self.table.is_live(&l.session, self.table.now_ms())).then_some(l)
    }

    /// The session cookie the request went with, unless it is a live one the guard knows.
    fn carried<'c>(&self, ctx: &'c Context) -> Option<&'c str> {
        match &ctx.session {
            // Taken for live, then sent to log in: dead in Qlik.
            Some(s) if s.state() != State::Live => Some(&s.id),
            Some(_) => None,
            None => ctx.carried.as_deref(),
        }
    }

    /// A login step without a live cookie from a browser whose burst has just made its
    /// session (the signed device cookie, and the browser's address and User-Agent, tie it
    /// to that login): answered with that session.
    fn late_step_of_landed<H: HeadView>(
        &self,
        ctx: &Context,
        rest: &str,
        req: &Request<'_, H>,
    ) -> Option<Page> {
        let step = LoginStep::of(rest, req)?;
        let l = self.landing_for(ctx)?;
        if !self.same_browser(ctx, &l.session) {
            return None;
        }
        self.late_step(ctx, &l.session, step, req, false)
    }

    /// Answers a late login step with `s`, the browser's session: back to the page the step
    /// had asked for, with the cookie. `live_cookie`: the step carried `s` itself (the hot
    /// path); a ticket is then only taken for late when `s` is the session the browser's last
    /// login made, since a ticket may also be a portal logging in another user.
    fn late_step<H: HeadView>(
        &self,
        ctx: &Context,
        s: &Arc<Session>,
        step: LoginStep,
        req: &Request<'_, H>,
        live_cookie: bool,
    ) -> Option<Page> {
        let landing = self
            .flights
            .landing(ctx.device, ctx.vp)
            .filter(|l| Arc::ptr_eq(&l.session, s));
        let hub = hub_of(&self.vps[ctx.vp].prefix);
        let location = match step {
            LoginStep::AuthModule => match param(req.query, "targetId") {
                Some(t) => landing.as_ref().and_then(|l| l.target(&t)).unwrap_or(hub),
                None => return None,
            },
            LoginStep::Ticket => {
                if live_cookie && landing.is_none() {
                    return None;
                }
                without_ticket(req)
            }
        };
        self.counters
            .stragglers_answered
            .fetch_add(1, Ordering::Relaxed);
        self.emit(
            Kind::BurstHeld,
            "a late login step of a burst answered by the guard: the browser already has its session, and Qlik would have made another",
            Some(ctx),
            Some(s),
            None,
        );
        Some(self.redirect_with(s, &location))
    }

    /// A browser the guard knows, without a live cookie: its own session back (restore), or,
    /// while another request of the browser is (re)creating its session, a wait for that one.
    /// `Err` gives the context back when neither applies: this request leads the browser's
    /// flight now and goes on to make a session.
    async fn restore_or_wait<H: HeadView>(
        self: &Arc<Self>,
        mut ctx: Box<Context>,
        cookie: &cookies::Found<'_>,
        headers: &H,
    ) -> Result<Verdict, Box<Context>> {
        let info = &self.vps[ctx.vp];
        let local = || {
            (info.restore && ctx.device_trusted)
                .then(|| {
                    self.table.device_session(
                        ctx.device,
                        ctx.vp,
                        ctx.identity.as_ref(),
                        info.identity_header.is_some(),
                    )
                })
                .flatten()
        };
        let mut restored = local();
        if restored.is_none() && info.restore && ctx.device_trusted {
            // Perhaps a session made through the other guard of the pair.
            self.device_sessions_from_pair(&ctx).await;
            restored = local();
        }
        if let Some(s) = restored {
            self.counters.restored.fetch_add(1, Ordering::Relaxed);
            match (cookie.first, &ctx.unknown) {
                (None, _) => {
                    let why = lost_cause(&s.meta().cookie_attributes, ctx.tls, headers);
                    self.emit(Kind::CookieLost, why, Some(&ctx), Some(&s), None);
                }
                (Some(_), Some(value)) => {
                    let cause = format!(
                        "the browser sent a value of {} (#{}) the guard never issued for this device: changed on the way",
                        info.cookie,
                        self.table.hash(value)
                    );
                    self.emit(Kind::CookieModified, cause, Some(&ctx), Some(&s), None);
                }
                _ => {}
            }
            self.emit(Kind::SessionRestored, "the browser's own session was put back on the request and set again in the browser", Some(&ctx), Some(&s), None);
            tracing::info!(session = %s.hash, user = %owner_text(&s), vp = %info.prefix, "session restored for a browser that lost its cookie");
            return Ok(Verdict::Forward(self.attach(ctx, s)));
        }
        // A request of a burst that comes after the burst's login has made the session: as if
        // it had waited for it.
        if let Some(l) = self.landing_for(&ctx) {
            if self.same_browser(&ctx, &l.session) {
                return Ok(Verdict::Forward(self.attach(ctx, l.session.clone())));
            }
        }
        // A burst: one request (re)creates the session, the others wait for it.
        for _ in 0..2 {
            match self.flights.lead(ctx.device, ctx.vp) {
                Lead::Lead(f) => {
                    self.hold(&mut ctx).lead = Some(f);
                    return Err(ctx);
                }
                // No room for another flight (a flood of new browsers): this one goes on
                // uncoalesced rather than the flights growing without bound.
                Lead::Full => return Err(ctx),
                Lead::Wait(open) => {
                    self.counters.bursts_held.fetch_add(1, Ordering::Relaxed);
                    self.emit(
                        Kind::BurstHeld,
                        "request held while the browser's session is being (re)created",
                        Some(&ctx),
                        None,
                        None,
                    );
                    tracing::debug!(vp = %info.prefix, "request held while the browser's session is being created");
                    if let Outcome::Session(s) = open.wait(self.policy().burst_wait).await {
                        if self.table.is_restorable(&s, self.table.now_ms())
                            && self.same_browser(&ctx, &s)
                        {
                            return Ok(Verdict::Forward(self.attach(ctx, s)));
                        }
                    }
                }
            }
        }
        Err(ctx)
    }

    /// A client without cookies on a header-authentication virtual proxy: Qlik would make a
    /// session per request, each counting towards the user's limit for the inactivity
    /// timeout, so a few scripts would fill the user's five. It goes with the user's latest
    /// session made for such a client (never one made for a browser, never another user's:
    /// the identity header is believed and names the session's owner), or, while one is being
    /// made, waits for it (the user's cookie-less flight). `Err` gives the context back when
    /// this request is to make the session (it leads the flight now).
    async fn cookieless(self: &Arc<Self>, mut ctx: Box<Context>) -> Result<Verdict, Box<Context>> {
        let Some(user) = ctx.identity.clone() else {
            return Err(ctx);
        };
        let flight = self.cookieless_flight(&user);
        for _ in 0..2 {
            if let Some(s) = self.cookieless_session(&user, ctx.vp) {
                return Ok(Verdict::Forward(self.attach_cookieless(ctx, s)));
            }
            match self.flights.lead(flight, ctx.vp) {
                Lead::Lead(f) => {
                    let h = self.hold(&mut ctx);
                    h.device = flight;
                    h.lead = Some(f);
                    return Err(ctx);
                }
                Lead::Full => return Err(ctx),
                Lead::Wait(open) => {
                    if let Outcome::Session(s) = open.wait(self.policy().burst_wait).await {
                        if self.is_cookieless_of(&s, &user, ctx.vp, self.table.now_ms()) {
                            return Ok(Verdict::Forward(self.attach_cookieless(ctx, s)));
                        }
                    }
                }
            }
        }
        Err(ctx)
    }

    /// The key of a user's cookie-less flight: keyed, so that no device cookie can name it.
    fn cookieless_flight(&self, user: &User) -> DeviceId {
        let mut h = blake3::Hasher::new_keyed(&self.csrf_key);
        h.update(b"cookieless flight\0");
        h.update(user.key.as_bytes());
        let b = h.finalize();
        u128::from_le_bytes(b.as_bytes()[..16].try_into().unwrap_or([0; 16]))
    }

    /// The user's most recently active session on `vp` that was made for a cookie-less client.
    fn cookieless_session(&self, user: &User, vp: usize) -> Option<Arc<Session>> {
        let now = self.table.now_ms();
        self.table
            .user_sessions(&user.key)
            .into_iter()
            .filter(|s| self.is_cookieless_of(s, user, vp, now))
            .max_by_key(|s| s.last_active_ms())
    }

    fn is_cookieless_of(&self, s: &Session, user: &User, vp: usize, now: u64) -> bool {
        let m = s.meta();
        s.vp == vp
            && m.cookieless
            && m.owner.as_ref().is_some_and(|o| o.key == user.key)
            && self.table.is_restorable(s, now)
    }

    /// Like [`SessionGuard::attach`], but no device is linked (the client keeps none), and the
    /// session's pending fold check ends: its cookie now also goes to clients that never got
    /// the answer that set it with its companions.
    fn attach_cookieless(&self, mut ctx: Box<Context>, s: Arc<Session>) -> Box<Context> {
        self.table.touch(&s);
        s.meta().set_with.clear();
        self.counters
            .cookieless_attached
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(session = %s.hash, vp = %self.vps[ctx.vp].prefix, "a request without cookies goes with the user's cookie-less session");
        ctx.set_back = true;
        ctx.session = Some(s);
        ctx
    }

    /// This request makes a session: within the user's limit, or by `on_limit` at it.
    async fn new_session<H: HeadView>(
        self: &Arc<Self>,
        ctx: Box<Context>,
        req: &Request<'_, H>,
    ) -> Verdict {
        let trusted = ctx.identity.is_some();
        let user = ctx.identity.clone().or_else(|| {
            (!ctx.new_device)
                .then(|| self.table.device_user(ctx.device))
                .filter(|_| ctx.device_trusted)
                .flatten()
        });
        let Some(user) = user else {
            return Verdict::Forward(ctx);
        };
        self.limit_for(ctx, req, user, trusted).await
    }

    /// A session is about to be made for `user` (`trusted`: named on the request itself):
    /// within the limit, or by `on_limit` at it.
    async fn limit_for<H: HeadView>(
        self: &Arc<Self>,
        mut ctx: Box<Context>,
        req: &Request<'_, H>,
        user: User,
        trusted: bool,
    ) -> Verdict {
        let prefix = &self.vps[ctx.vp].prefix;
        let mut limit = match &self.cluster {
            Some(c) if c.is_up() => self.pair_limit(c, &user, ctx.vp, trusted).await,
            _ => self.limit(&user, ctx.vp, trusted, false),
        };
        if let Limit::WaitForPending = limit {
            limit = Box::pin(self.wait_for_pending(&user, ctx.vp)).await;
            // The wait ends on this guard's count; a pair's slot is the store's to give.
            if let (Limit::Proceed(Some(r)), Some(c)) = (&limit, &self.cluster) {
                if let crate::cluster::Slot::AtLimit =
                    c.reserve(&user, self.policy().threshold(), *r).await
                {
                    self.table.release(&user, *r);
                    limit = Limit::Refuse;
                }
            }
        }
        let max = self.policy().max;
        match limit {
            Limit::Proceed(reservation) => {
                self.keep_reservation(&mut ctx, &user, reservation);
                Verdict::Forward(ctx)
            }
            Limit::Reuse(s) => {
                self.counters.reused.fetch_add(1, Ordering::Relaxed);
                self.emit(Kind::SessionReused, format!("{user} is at the limit of {max}: the request was attached to their most recently active session"), Some(&ctx), Some(&s), Some(&user));
                tracing::info!(session = %s.hash, user = %user, vp = %prefix, "user at the session limit: request attached to their most recent session");
                ctx.holds.finish_flight(Outcome::Session(s.clone()));
                // From now on the cookie also comes back from a client that never got the
                // answer that set the other cookies with it: their absence proves no fold.
                s.meta().set_with.clear();
                Verdict::Forward(self.attach(ctx, s))
            }
            Limit::Evict(victim, reservation) => {
                self.counters.evicted.fetch_add(1, Ordering::Relaxed);
                self.emit(Kind::SessionEvicted, format!("{user} reached the limit of {max} (headroom {}): the least recently active session without an open app was ended", self.policy().headroom), Some(&ctx), Some(&victim), Some(&user));
                tracing::info!(session = %victim.hash, user = %user, vp = %self.vps[victim.vp].prefix, "user at the session limit: least recently active session evicted");
                if let Err(e) = Box::pin(self.end_in_qlik(&victim)).await {
                    tracing::warn!(session = %victim.hash, user = %user, "eviction failed: {e}");
                }
                self.keep_reservation(&mut ctx, &user, Some(reservation));
                Verdict::Forward(ctx)
            }
            Limit::Refuse | Limit::WaitForPending => {
                self.counters
                    .refused_at_limit
                    .fetch_add(1, Ordering::Relaxed);
                self.emit(
                    Kind::RefusedAtLimit,
                    format!("{user} is at the limit of {max}: the limit page was shown"),
                    Some(&ctx),
                    None,
                    Some(&user),
                );
                tracing::warn!(user = %user, vp = %prefix, limit = max, "user at the session limit: limit page shown");
                ctx.holds.finish_flight(Outcome::Failed);
                let path = match req.query {
                    Some(q) => format!("{}?{q}", req.path),
                    None => req.path.to_string(),
                };
                Verdict::Answer(self.limit_page(&user, &ctx, &path))
            }
        }
    }

    /// The request goes upstream with `s`'s cookie (the caller puts it on, see
    /// [`SessionGuard::cookie_to_send`]); the response sets it back in the browser.
    fn attach(&self, mut ctx: Box<Context>, s: Arc<Session>) -> Box<Context> {
        self.table.touch(&s);
        if ctx.device_trusted && s.meta().devices.len() < MAX_DEVICES_PER_SESSION {
            self.table.link_device(&s, ctx.device);
        }
        ctx.set_back = true;
        ctx.unknown = None;
        ctx.session = Some(s);
        ctx
    }

    /// The request's holds, ready to hold something (they release it when dropped).
    fn hold<'c>(self: &Arc<Self>, ctx: &'c mut Context) -> &'c mut Holds {
        let h = &mut ctx.holds;
        if h.guard.is_none() {
            h.guard = Some(self.clone());
            h.device = ctx.device;
            h.vp = ctx.vp;
        }
        h
    }

    /// The slot goes with the flight (held through the login dance) or with this request.
    fn keep_reservation(
        self: &Arc<Self>,
        ctx: &mut Context,
        user: &User,
        reservation: Option<u64>,
    ) {
        let Some(r) = reservation else { return };
        let holds = self.hold(ctx);
        match &holds.lead {
            Some(f) => f.dance().reservation = Some((user.clone(), r)),
            None => holds.reservation = Some((user.clone(), r)),
        }
    }

    fn release_flight(&self, f: &Flight) {
        if let Some((u, r)) = f.dance().reservation.take() {
            self.release_slot(&u, r);
        }
    }

    /// A slot in the user's count given back, here and in the pair's store.
    fn release_slot(&self, user: &User, r: u64) {
        self.table.release(user, r);
        if let Some(c) = &self.cluster {
            c.release(r);
        }
    }

    /// A session made under the request's or its flight's slot: in the pair's store the
    /// slot becomes the session (before the slot is released here).
    fn made_under_slot(
        &self,
        ctx: &Context,
        s: &Arc<Session>,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let c = self.cluster.as_ref()?;
        let mut heard = None;
        if let Some((u, r)) = &ctx.holds.reservation {
            heard = c.made(s, u, *r);
        }
        if let Some(f) = self.flights.get(ctx.device, ctx.vp) {
            if let Some((u, r)) = &f.dance().reservation {
                heard = c.made(s, u, *r).or(heard);
            }
        }
        heard
    }

    /// After the response phase: with a pair, the answer that sets a new session's cookie
    /// waits until the store has the session (see [`crate::cluster::Cluster::settled`]).
    /// `None` (nothing to wait for) on every other answer.
    pub fn settle(
        &self,
        ctx: &mut Context,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
        let heard = ctx.pair_written.take()?;
        let c = self.cluster.clone()?;
        Some(Box::pin(async move { c.settled(heard).await }))
    }

    /// The limit decision of a pair: the store counts the user's sessions and slots through
    /// every guard and grants the slot or not in one atomic step; at the limit, `on_limit`
    /// picks from this guard's own sessions (a reuse or an eviction needs the cookie value,
    /// which only a guard that has seen the session holds). A store that does not answer
    /// leaves the decision to this guard's table.
    async fn pair_limit(
        &self,
        c: &crate::cluster::Cluster,
        user: &User,
        vp: usize,
        trusted: bool,
    ) -> Limit {
        use crate::cluster::Slot;
        let policy = self.policy();
        let (on_limit, threshold) = (policy.on_limit, policy.threshold());
        let r = self.table.with_user(user, |e, t, now| {
            let r = t.new_reservation(vp, now + RESERVATION_MS);
            e.reservations.push(r);
            r.id
        });
        match c.reserve(user, threshold, r).await {
            Slot::Granted => Limit::Proceed(Some(r)),
            Slot::AtLimit => {
                self.table.release(user, r);
                let mut limit = self.limit(user, vp, trusted, true);
                if let (Limit::Refuse | Limit::WaitForPending, OnLimit::Reuse, true) =
                    (&limit, on_limit, trusted)
                {
                    // None of the user's sessions here: one made through the other guard.
                    if let Some(s) = self.reuse_from_pair(c, user, vp).await {
                        limit = Limit::Reuse(s);
                    }
                }
                if let Limit::Evict(victim, r) = &limit {
                    // The victim stops counting in the store before the slot is asked for.
                    c.end_now(victim).await;
                    if let Slot::AtLimit = c.reserve(user, threshold, *r).await {
                        tracing::info!(user = %user, "after the eviction the pair still counts the user at the limit (sessions through the other guard): the new session goes on, as Qlik has one fewer");
                    }
                }
                limit
            }
            Slot::Unavailable => {
                self.table.release(user, r);
                self.limit(user, vp, trusted, false)
            }
        }
    }

    /// The user's most recently active session of `vp` that the pair's store has, with its
    /// sealed value, made this guard's for a reuse (only with the pair's secret).
    async fn reuse_from_pair(
        &self,
        c: &crate::cluster::Cluster,
        user: &User,
        vp: usize,
    ) -> Option<Arc<Session>> {
        let now = self.table.now_ms();
        for (value, record) in c.user_sessions(user).await {
            if let Some(s) = self.take_from_pair(vp, &value, &record, Some(user), false) {
                if self.table.is_restorable(&s, now) {
                    return Some(s);
                }
            }
        }
        None
    }

    /// The limit decision, under the user's entry lock. `pair_full`: the pair's store counts
    /// the user at the limit already, whatever this guard's own table holds.
    fn limit(&self, user: &User, vp: usize, trusted: bool, pair_full: bool) -> Limit {
        let policy = self.policy();
        let (max, on_limit, threshold) = (policy.max, policy.on_limit, policy.threshold());
        let lifetime = RESERVATION_MS;
        self.table.with_user(user, |e, t, now| {
            e.reservations.retain(|r| r.until_ms > now);
            let live: Vec<Arc<Session>> = e
                .sessions
                .iter()
                .filter(|s| t.is_live(s, now))
                .cloned()
                .collect();
            let used = live.len() + e.reservations.len();
            let reserve = |e: &mut table::UserEntry| {
                let r = t.new_reservation(vp, now + lifetime);
                e.reservations.push(r);
                r.id
            };
            if used < threshold && !pair_full {
                return Limit::Proceed(Some(reserve(e)));
            }
            match on_limit {
                OnLimit::Reuse if trusted => {
                    let mine = live
                        .iter()
                        .filter(|s| s.vp == vp && t.is_restorable(s, now))
                        .max_by_key(|s| s.last_active_ms());
                    match mine {
                        Some(s) => Limit::Reuse(s.clone()),
                        None if e.reservations.iter().any(|r| r.vp == vp) => Limit::WaitForPending,
                        None => Limit::Refuse,
                    }
                }
                OnLimit::Evict => {
                    let victim = live
                        .iter()
                        .filter(|s| s.websockets() == 0)
                        .min_by_key(|s| s.last_active_ms());
                    match victim {
                        Some(v) if t.end(v, State::Evicted) => Limit::Evict(v.clone(), reserve(e)),
                        _ if used < max && !pair_full => Limit::Proceed(Some(reserve(e))),
                        _ => Limit::Refuse,
                    }
                }
                _ => Limit::Refuse,
            }
        })
    }

    /// Reuse when the user's sessions on this virtual proxy are all still being created: wait
    /// (bounded) for one to exist.
    async fn wait_for_pending(&self, user: &User, vp: usize) -> Limit {
        let until = tokio::time::Instant::now() + self.policy().burst_wait;
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.table.now_ms();
            if let Some(s) = self
                .table
                .user_sessions(&user.key)
                .into_iter()
                .find(|s| s.vp == vp && self.table.is_restorable(s, now))
            {
                return Limit::Reuse(s);
            }
            match self.limit(user, vp, true, false) {
                Limit::WaitForPending => continue,
                other => return other,
            }
        }
        Limit::Refuse
    }

    /// The `name=value` the request must carry upstream instead of what the browser sent
    /// (restore and reuse).
    pub fn cookie_to_send<'a>(&'a self, ctx: &'a Context) -> Option<(&'a str, &'a str)> {
        match (&ctx.session, ctx.set_back) {
            (Some(s), true) => Some((&self.vps[ctx.vp].cookie, &s.id)),
            _ => None,
        }
    }

    /// Phase "after upstream": learn from the response head; returns the guard's own
    /// `Set-Cookie` values, to be added after Qlik's.
    pub fn after<H: HeadView>(
        self: &Arc<Self>,
        ctx: &mut Context,
        node: &Arc<str>,
        target: &str,
        status: u16,
        headers: &H,
    ) -> Vec<HeaderValue> {
        let mut extra = Vec::new();
        if let Some(user) = ctx.windows_user.take() {
            if let Some(ticket) = ticket_of_redirect(status, headers) {
                self.windows_login_accepted(ctx, user, ticket);
            }
        }
        let info = &self.vps[ctx.vp];
        let set = cookies::set_cookies_named(headers, &info.cookie);
        let fresh = set.iter().rev().find(|c| !c.clears);
        let mut new_session = None;
        if let Some(c) = fresh {
            if ctx.session.as_deref().map(|s| &*s.id) != Some(c.value.as_str()) {
                let (s, written) = self.record_new(ctx, node, c);
                ctx.pair_written = written;
                // `record_new` ended the browser's flight, whoever led it; a user's cookie-less
                // flight is this request's to end.
                ctx.holds.finish_flight(Outcome::Session(s.clone()));
                ctx.holds.lead = None;
                // A new session, a new device id: a value planted in this browser before
                // its user logged in names nothing after it.
                let old_device = ctx.device;
                self.new_device_for(ctx, &s);
                if ctx.device != old_device {
                    self.flights.alias(old_device, ctx.device, ctx.vp);
                }
                // Whatever else this response sets must come back with the session cookie:
                // if only the session cookie does, a device on the way folded the fields.
                let mut with = fold::companions(headers, &info.cookie, target, ctx.tls);
                if ctx.new_device {
                    with.push(fold::Companion::everywhere(&self.device_cookie));
                }
                s.meta().set_with = with;
                new_session = Some(s);
            }
        } else if let Some(target_id) = auth_redirect_target(status, headers) {
            // Qlik sends this request to log in: whatever session it carried is dead in Qlik.
            if let Some(s) = &ctx.session {
                if self.table.end(s, State::Ended) {
                    self.counters.replaced.fetch_add(1, Ordering::Relaxed);
                    self.emit(Kind::SessionReplaced, "Qlik sent the browser to log in again although its session cookie was live: Qlik no longer knew the session, or did not receive the cookie intact", Some(ctx), Some(s), None);
                    tracing::info!(session = %s.hash, user = %owner_text(s), "Qlik no longer knows the session: the browser is sent to log in again");
                }
            }
            // A request of a burst whose login has already made the browser's session, sent
            // to log in because it carried the dead cookie: its login step will be answered
            // with that session (`late_step_of_landed`), so it starts no flight of its own.
            let landed = self.landing_for(ctx);
            if let Some(l) = &landed {
                l.remember_target(target_id.clone(), target);
            }
            // The login dance is this browser's flight: the rest of its burst waits for it.
            // (A new browser gets its device cookie with this answer: its flight is keyed by it.)
            // The flight goes on without this request (it ends when the cookie is set, or is
            // swept after a minute): the request lets go of it without ending it.
            let flight = match ctx.holds.lead.take() {
                Some(f) => Some(f),
                None if landed.is_some() => None,
                None => match self.flights.lead(ctx.device, ctx.vp) {
                    Lead::Lead(f) | Lead::Wait(f) => Some(f),
                    Lead::Full => None,
                },
            };
            if let Some(flight) = flight {
                let mut d = flight.dance();
                if d.node.is_none() {
                    d.node = Some(node.clone());
                }
                if d.leader_target.is_none() {
                    d.leader_target = Some(target_id.clone());
                }
                if let Some(c) = self.carried(ctx) {
                    d.remember_replaced(c);
                }
                d.remember_target(target_id, target);
            }
        } else if let (Some(value), true) = (&ctx.unknown, status < 400) {
            // Qlik did not replace the cookie: it may be a live session the guard has not
            // seen (made before a guard restart, or elsewhere), or a value a client made up
            // on a path that needs no session. Only Qlik's word makes it a session.
            self.confirm_unknown(ctx, value, node);
            ctx.holds.finish_flight(Outcome::Failed);
        } else {
            ctx.holds.finish_flight(Outcome::Failed);
        }
        if ctx.logout && (200..300).contains(&status) {
            if let Some(s) = &ctx.session {
                if self.table.end(s, State::LoggedOut) {
                    tracing::info!(session = %s.hash, user = %owner_text(s), "session logged out");
                }
            }
        }
        if ctx.set_back && new_session.is_none() {
            if let Some(s) = &ctx.session {
                let attrs = s.meta().cookie_attributes.clone();
                if let Some(v) = cookies::session_set_cookie(&info.cookie, &s.id, &attrs) {
                    extra.push(v);
                }
            }
        }
        // Last: the new session (if any) counts now, so the slot it held can go.
        ctx.holds.release();
        extra.extend(self.device_set_cookie(ctx));
        extra
    }

    /// The device cookie for a browser that gets a new one (signed; Secure over https).
    pub(crate) fn device_set_cookie(&self, ctx: &Context) -> Option<HeaderValue> {
        if !ctx.new_device {
            return None;
        }
        cookies::device_set_cookie(
            &self.device_cookie,
            &self.device_keys.sign(ctx.device),
            ctx.tls,
        )
    }

    /// Whether a request waiting on a browser's flight comes from the browser the flight's
    /// session was made for (its address and User-Agent): a device id is all that ties a
    /// burst together, and one planted in a second browser must not let its holder wait for,
    /// and be handed, the session that browser's user logs in to.
    fn same_browser(&self, ctx: &Context, s: &Session) -> bool {
        // The table keeps the first 200 characters of a User-Agent.
        let ua: Option<String> = ctx
            .client
            .as_ref()
            .and_then(|c| c.user_agent.as_deref())
            .map(|u| clipped(u.as_bytes(), 200));
        let devices = s.meta().devices.clone();
        devices.iter().any(|d| {
            let (their_ua, addr) = self.table.device_info(*d);
            addr == Some(ctx.peer) && their_ua == ua
        })
    }

    /// Gives the browser a new device id for its live session `s` (the response sets it):
    /// the new id is linked to `s`, and takes over the old id's sessions that are `s`'s
    /// owner's. An id is only ever linked to a session when the guard has just issued it to
    /// the browser that holds that session, so a device cookie obtained by one browser and
    /// planted in another never leads to the second one's sessions.
    fn new_device_for(&self, ctx: &mut Context, s: &Arc<Session>) {
        if s.meta().devices.len() >= MAX_DEVICES_PER_SESSION {
            return;
        }
        let old = ctx.device;
        let fresh: DeviceId = rand::random();
        self.table.link_device(s, fresh);
        if !ctx.new_device && ctx.device_trusted {
            if let Some(owner) = s.owner() {
                self.table.carry_sessions(old, fresh, &owner);
            }
        }
        if let Some(c) = &ctx.client {
            self.table
                .seen_device(fresh, c.user_agent.as_deref(), ctx.peer, true);
        }
        if let Some(u) = s.owner().or_else(|| ctx.identity.clone()) {
            self.table.set_device_user(fresh, &u);
        }
        ctx.device = fresh;
        ctx.new_device = true;
        ctx.device_trusted = true;
    }

    /// Asks Qlik whether an unknown cookie value is a live session (off the hot path, at most
    /// [`MAX_LOOKUPS`] at once): the value waits in the table, counting towards nothing, until
    /// the answer names its owner; `{"session":"inactive"}` makes it dead.
    fn confirm_unknown(self: &Arc<Self>, ctx: &Context, value: &str, node: &Arc<str>) {
        let Ok(permit) = self.lookups.clone().try_acquire_owned() else {
            return;
        };
        let Some(s) =
            self.table
                .insert_unconfirmed(ctx.vp, value, node.clone(), default_attributes(ctx.tls))
        else {
            return;
        };
        if let Some(h) = &ctx.host {
            s.meta().host = Some(h.clone());
        }
        let device = (!ctx.new_device && ctx.device_trusted).then_some(ctx.device);
        let identity = ctx.identity.clone();
        let host = ctx.host.clone();
        let me = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match me.ask_owner(&s, host.as_ref()).await {
                Ok(Owner::User(u)) => {
                    if identity.as_ref().is_some_and(|i| i.key != u.key) {
                        // Qlik says the cookie is someone else's than the header says.
                        me.table.end(&s, State::Ended);
                        return;
                    }
                    if me.table.confirm(&s) {
                        me.table.set_owner(&s, u);
                        if let Some(d) = device {
                            if s.meta().devices.len() < MAX_DEVICES_PER_SESSION {
                                me.table.link_device(&s, d);
                            }
                        }
                        me.counters.adopted.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(session = %s.hash, user = %owner_text(&s), vp = %me.vps[s.vp].prefix, "a session the guard had not seen was confirmed by Qlik and adopted");
                    }
                }
                Ok(Owner::Inactive) => {
                    me.table.end(&s, State::Ended);
                }
                Err(e) => {
                    tracing::warn!(session = %s.hash, "cannot confirm a session the guard had not seen: {e}");
                }
            }
        });
    }

    /// Qlik set a new session cookie: record the session and end what it replaces.
    fn record_new(
        self: &Arc<Self>,
        ctx: &Context,
        node: &Arc<str>,
        c: &cookies::SetCookie,
    ) -> (Arc<Session>, Option<tokio::sync::oneshot::Receiver<()>>) {
        if let Some(old) = &ctx.session {
            if self.table.end(old, State::Replaced) {
                self.counters.replaced.fetch_add(1, Ordering::Relaxed);
                self.emit(Kind::SessionReplaced, "Qlik answered a live session cookie with a new one: it no longer knew the session (timeout, restart, deletion), or did not receive the cookie intact", Some(ctx), Some(old), None);
                tracing::info!(session = %old.hash, user = %owner_text(old), "Qlik replaced a session cookie (it no longer knew the session)");
            }
        }
        if let Some(value) = &ctx.unknown {
            // Qlik did not know that cookie: remember it as dead.
            let dead = self
                .table
                .insert(ctx.vp, value, node.clone(), None, None, String::new());
            self.table.end(&dead, State::Ended);
        }
        // The browser's device is linked by the caller: a new id, issued with this cookie.
        // The owner is set after the pair's store has been told that the slot became this
        // session: told in the other order, the store would count both for a moment.
        let s = self.table.insert(
            ctx.vp,
            &c.value,
            node.clone(),
            None,
            None,
            c.attributes.clone(),
        );
        let written = self.made_under_slot(ctx, &s);
        if let Some(i) = &ctx.identity {
            self.table.set_owner(&s, i.clone());
        }
        {
            let mut m = s.meta();
            if let Some(h) = &ctx.host {
                m.host = Some(h.clone());
            }
            m.cookieless = ctx.cookieless;
        }
        tracing::info!(session = %s.hash, user = %ctx.identity.as_ref().map(|u| u.to_string()).unwrap_or_else(|| "(resolving)".into()), vp = %self.vps[ctx.vp].prefix, node = %node, "session created");
        if let Some(f) = self
            .flights
            .finish(ctx.device, ctx.vp, None, Outcome::Session(s.clone()))
        {
            self.release_flight(&f);
            // The burst's late steps come within the time its held requests would wait.
            let window = self.policy().burst_wait;
            self.flights.land(ctx.device, ctx.vp, &f, s.clone(), window);
        }
        if ctx.identity.is_none() {
            self.resolve_owner(s.clone(), ctx.host.clone());
        }
        (s, written)
    }

    /// Learns who owns a session, off the hot path.
    fn resolve_owner(self: &Arc<Self>, s: Arc<Session>, host: Option<HeaderValue>) {
        let me = self.clone();
        tokio::spawn(async move {
            match me.ask_owner(&s, host.as_ref()).await {
                Ok(Owner::User(u)) => {
                    tracing::debug!(session = %s.hash, user = %u, "session owner resolved");
                    me.table.set_owner(&s, u);
                }
                Ok(Owner::Inactive) => {
                    me.table.end(&s, State::Ended);
                }
                Err(e) => {
                    tracing::warn!(session = %s.hash, "cannot learn the session's owner: {e}")
                }
            }
        });
    }

    /// The QPS REST API when configured and the cookie value has the shape of a Qlik session
    /// id; else, or when that API fails, the Personal API with the session's own cookie (the
    /// value then goes only in the Cookie header, never in a path).
    async fn ask_owner(&self, s: &Session, host: Option<&HeaderValue>) -> Result<Owner, QpsError> {
        let info = &self.vps[s.vp];
        let (uri, qps) = self.node_apis(&s.node)?;
        if let Some(api) = qps.filter(|_| qps::is_session_id(&s.id)) {
            match api.owner(&info.prefix, &s.id).await {
                Ok(owner) => return Ok(owner),
                Err(e) => {
                    tracing::warn!(session = %s.hash, upstream = %s.node, "the QPS REST API cannot name the session's owner ({e}): asking the Personal API instead")
                }
            }
        }
        self.personal
            .owner(&uri, &info.prefix, host, &info.cookie, &s.id)
            .await
    }

    /// The session's node: its address, and its QPS REST API if any.
    fn node_apis(&self, node: &str) -> Result<(Uri, Option<QpsApi>), QpsError> {
        self.nodes
            .load()
            .get(node)
            .map(|n| (n.uri.clone(), n.qps.clone()))
            .ok_or_else(|| QpsError(format!("the node {node} is no longer configured")))
    }

    /// Ends a session in Qlik, on its node: the node's QPS REST API when configured (and the
    /// cookie value is a Qlik session id), else, or when that API fails, a logout through the
    /// Personal API with the session's own cookie.
    pub async fn end_in_qlik(&self, s: &Session) -> Result<(), QpsError> {
        let info = &self.vps[s.vp];
        let (uri, qps) = self.node_apis(&s.node)?;
        if let Some(api) = qps.filter(|_| qps::is_session_id(&s.id)) {
            match api.end(&info.prefix, &s.id).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(session = %s.hash, upstream = %s.node, "the QPS REST API cannot end the session ({e}): logging it out through the Personal API instead")
                }
            }
        }
        let host = s.meta().host.clone();
        self.personal
            .logout(&uri, &info.prefix, host.as_ref(), &info.cookie, &s.id)
            .await
    }

    /// Qlik's own "too many sessions" page is the failure the guard exists to prevent: when it
    /// gets through anyway (sessions made behind the guard's back), it must show in the log
    /// and the counters, with the user.
    pub fn note_possible_qps_refusal(&self, body: &[u8], user: Option<User>) {
        if is_qps_refusal(body) {
            self.counters
                .qps_limit_refusals
                .fetch_add(1, Ordering::Relaxed);
            self.emit(Kind::QpsLimitRefusal, "Qlik refused a session: too many sessions active in parallel (sessions made without the guard, or a user the guard did not know yet)", None, None, user.as_ref());
            tracing::error!(
                user = %user.map(|u| u.to_string()).unwrap_or_else(|| "(unknown)".into()),
                "Qlik refused a session: too many sessions active in parallel"
            );
        }
    }

    /// Qlik refused a session (its page is `body`) for a user the guard knows, with
    /// `on_limit = "evict"`: the user's least recently active session without an open app
    /// that the guard knows is ended, and the browser is sent back to `path` to log in into
    /// the freed slot. `None`: Qlik's refusal goes to the browser as it is (another policy, a
    /// user the guard does not know, nothing it could end).
    pub async fn refusal_to_login(&self, ctx: &Context, body: &[u8], path: &str) -> Option<Page> {
        if self.policy().on_limit != OnLimit::Evict || !is_qps_refusal(body) {
            return None;
        }
        let user = self.known_user(ctx)?;
        let victim = self.table.with_user(&user, |e, t, now| {
            let v = e
                .sessions
                .iter()
                .filter(|s| t.is_live(s, now) && s.websockets() == 0)
                .min_by_key(|s| s.last_active_ms())
                .cloned()?;
            t.end(&v, State::Evicted).then_some(v)
        })?;
        self.counters.evicted.fetch_add(1, Ordering::Relaxed);
        self.emit(Kind::SessionEvicted, format!("Qlik refused {user} a session (too many sessions active in parallel): the least recently active session without an open app was ended and the browser sent back to log in"), Some(ctx), Some(&victim), Some(&user));
        tracing::info!(session = %victim.hash, user = %user, "Qlik refused a session: least recently active session evicted, the browser logs in again");
        if let Err(e) = self.end_in_qlik(&victim).await {
            tracing::warn!(session = %victim.hash, user = %user, "eviction failed: {e}");
        }
        self.dance_failed(ctx.device, ctx.vp);
        Some(crate::pages::back_to_page(path, None))
    }

    /// The browser's login dance ended with `s`, a session the guard handed it (a reuse at the
    /// ticket): as when Qlik makes one, its held steps go with it, and late ones find it.
    fn dance_landed(&self, ctx: &Context, s: &Arc<Session>) {
        if let Some(f) = self
            .flights
            .finish(ctx.device, ctx.vp, None, Outcome::Session(s.clone()))
        {
            self.release_flight(&f);
            let window = self.policy().burst_wait;
            self.flights.land(ctx.device, ctx.vp, &f, s.clone(), window);
        }
    }

    /// The browser's login dance ended without a session (the limit page, Qlik's refusal):
    /// its flight ends, so its next try leads a new one instead of waiting for this one.
    fn dance_failed(&self, device: DeviceId, vp: usize) {
        if let Some(done) = self.flights.finish(device, vp, None, Outcome::Failed) {
            self.release_flight(&done);
        }
    }

    /// Whose request this is, as far as the guard knows: the identity header, the session's
    /// owner, else the user last seen in this browser (its own device cookie), which a
    /// Windows login names through its Type 3.
    pub fn known_user(&self, ctx: &Context) -> Option<User> {
        ctx.identity
            .clone()
            .or_else(|| ctx.session.as_ref().and_then(|s| s.owner()))
            .or_else(|| {
                (ctx.device_trusted && !ctx.new_device)
                    .then(|| self.table.device_user(ctx.device))
                    .flatten()
            })
    }

    /// Watches an engine WebSocket for the notifications that end its session.
    pub fn engine_observer(self: &Arc<Self>, s: Arc<Session>) -> crate::proxy::tunnel::Observer {
        let me = self.clone();
        let mut watcher = engine::Watcher::default();
        Box::new(move |bytes: &[u8]| {
            watcher.feed(bytes, &mut |n| me.on_engine_notice(&s, n));
        })
    }

    fn on_engine_notice(&self, s: &Session, n: engine::Notice) {
        let state = match n {
            engine::Notice::LoggedOut => State::LoggedOut,
            engine::Notice::TimedOut => State::Expired,
            engine::Notice::Closed => State::Ended,
            engine::Notice::MaxParallelSessionsExceeded => {
                self.counters
                    .qps_limit_refusals
                    .fetch_add(1, Ordering::Relaxed);
                self.emit(
                    Kind::QpsLimitRefusal,
                    "Qlik refused an engine session: OnMaxParallelSessionsExceeded",
                    None,
                    Some(s),
                    None,
                );
                tracing::error!(user = %owner_text(s), session = %s.hash, "Qlik refused an engine session: OnMaxParallelSessionsExceeded");
                return;
            }
        };
        if self.table.end(s, state) {
            tracing::info!(session = %s.hash, user = %owner_text(s), "session ended by Qlik ({n:?})");
        }
    }
    /// Records an event with what is known of the request.
    fn emit(
        &self,
        kind: Kind,
        cause: impl Into<String>,
        ctx: Option<&Context>,
        session: Option<&Session>,
        user: Option<&User>,
    ) {
        self.events
            .emit(self.event(kind, cause, ctx, session, user));
    }

    /// An event with what is known of the request.
    fn event(
        &self,
        kind: Kind,
        cause: impl Into<String>,
        ctx: Option<&Context>,
        session: Option<&Session>,
        user: Option<&User>,
    ) -> events::NewEvent {
        let mut e = events::NewEvent::new(kind, cause);
        if let Some(c) = ctx {
            e.virtual_proxy = Some(self.vps[c.vp].prefix.clone());
            e.device = (!c.new_device).then(|| self.device_hash(c.device));
            e.client = c.client.clone().unwrap_or_else(|| events::Requester {
                peer: Some(c.peer),
                ..Default::default()
            });
        }
        e.user = user
            .cloned()
            .or_else(|| session.and_then(|s| s.owner()))
            .or_else(|| ctx.and_then(|c| c.identity.clone()))
            .map(|u| u.to_string());
        if let Some(s) = session {
            e.cookies.push(events::CookieRef {
                name: self.vps[s.vp].cookie.clone(),
                hash: s.hash.to_string(),
            });
            if e.virtual_proxy.is_none() {
                e.virtual_proxy = Some(self.vps[s.vp].prefix.clone());
            }
        }
        e
    }

    /// A session cookie came back, for the first time on a path: the cookies set with it that
    /// did not come back with it were folded away on the way (reported once per cookie).
    fn check_folded<H: HeadView>(&self, s: &Session, ctx: &Context, path: &str, headers: &H) {
        let missing = {
            let mut m = s.meta();
            if m.set_with.is_empty() {
                return;
            }
            fold::not_returned(&mut m.set_with, path, headers)
        };
        if missing.is_empty() {
            return;
        }
        let mut c = Context::shallow(ctx);
        c.client = Some(requester_of(headers, ctx.peer));
        let names = missing.join(", ");
        let mut e = self.event(
            Kind::SetCookieFolded,
            format!(
                "the session cookie {} came back but {names} set in the same response did not: a device on the way folded the Set-Cookie headers into one (the browser kept only the first)",
                self.vps[s.vp].cookie
            ),
            Some(&c),
            Some(s),
            None,
        );
        e.not_returned = missing;
        self.events.emit(e);
    }

    /// A node went down: its sessions are gone (Qlik keeps sessions in the node's memory).
    pub fn node_lost(&self, node: &str) {
        if self.policy().on_node_down == crate::config::OnNodeDown::Error {
            tracing::warn!(upstream = %node, sessions = self.node_load(node), "the node's sessions are kept for when it is back (sessions.on_node_down = \"error\"): their users see the error page meanwhile");
            return;
        }
        let now = self.table.now_ms();
        for s in self.table.all() {
            if &*s.node == node && self.table.is_live(&s, now) && self.table.end(&s, State::Ended) {
                self.emit(
                    Kind::SessionLost,
                    format!("the Qlik node {node} is down: the session is gone with it"),
                    None,
                    Some(&s),
                    None,
                );
            }
        }
    }

    /// Browsers whose session is being (re)created right now (their flights).
    pub fn flights_open(&self) -> usize {
        self.flights.len()
    }

    /// The login targets the flights remember: (count, bytes).
    pub fn flight_targets(&self) -> (usize, usize) {
        self.flights.targets_held()
    }

    /// Live sessions on a node (for balancing).
    pub fn node_load(&self, node: &str) -> usize {
        self.table.node_sessions(node)
    }

    /// The keyed hash of a device id (device cookies are credentials too).
    pub fn device_hash(&self, device: DeviceId) -> String {
        self.table.hash(&format!("{device:032x}"))
    }

    /// Ends a session from the admin API.
    pub async fn end_by_admin(&self, s: &Session) -> Result<(), QpsError> {
        self.table.end(s, State::EndedByAdmin);
        let r = self.end_in_qlik(s).await;
        tracing::info!(session = %s.hash, user = %owner_text(s), ok = r.is_ok(), "session ended by an admin");
        r
    }

    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// A 302 to `location` that also sets `s`'s cookie.
    fn redirect_with(&self, s: &Session, location: &str) -> crate::pages::Page {
        // A page the client asked for: never a location that leaves this site
        // (`//host/...` is another host to a browser).
        let hub;
        let location = if is_local_path(location) {
            location
        } else {
            hub = hub_of(&self.vps[s.vp].prefix);
            &hub
        };
        let attrs = s.meta().cookie_attributes.clone();
        crate::pages::back_to_page(
            location,
            cookies::session_set_cookie(&self.vps[s.vp].cookie, &s.id, &attrs),
        )
    }

    /// A keyed token binding a form to this browser and user, and to the time its page was
    /// made (CSRF protection; see [`SessionGuard::csrf_check`]).
    pub fn csrf_token(&self, device: DeviceId, user: &User) -> String {
        self.csrf_token_at(device, user, self.table.now_ms())
    }

    /// The device id from a request's device cookie.
    pub fn device_of<H: HeadView>(&self, headers: &H) -> Option<DeviceId> {
        let [device] = cookies::find(headers, [&self.device_cookie]);
        self.device_keys.verify(device.first?)
    }

    /// The user a request speaks for: a valid identity header of any header-auth virtual
    /// proxy, else the browser's last known user.
    pub fn user_of<H: HeadView>(&self, headers: &H, device: Option<DeviceId>) -> Option<User> {
        for vp in &self.vps {
            if let Some(h) = &vp.identity_header {
                if let Some(Ok(u)) = headers.first(h.as_str()).map(User::parse) {
                    return Some(u);
                }
            }
        }
        self.table.device_user(device?)
    }

    /// Seconds until the user's oldest idle session times out (for Retry-After).
    pub fn retry_after(&self, user: &User) -> u64 {
        let now = self.table.now_ms();
        self.table
            .user_sessions(&user.key)
            .iter()
            .filter_map(|s| self.table.expires_in_ms(s, now))
            .min()
            .map(|ms| ms.div_ceil(1000).max(1))
            .unwrap_or_else(|| self.table.timeout_ms(0) / 1000)
    }
}

impl Context {
    /// A copy for an event (no flight, no reservation).
    fn shallow(c: &Context) -> Context {
        Context {
            vp: c.vp,
            device: c.device,
            new_device: c.new_device,
            device_sent: c.device_sent,
            device_trusted: c.device_trusted,
            cookieless: c.cookieless,
            identity: c.identity.clone(),
            windows_user: None,
            session: None,
            set_back: false,
            unknown: None,
            carried: None,
            logout: false,
            host: None,
            app: None,
            tls: c.tls,
            holds: Holds::default(),
            client: c.client.clone(),
            node_hint: None,
            peer: c.peer,
            pair_written: None,
        }
    }
}

/// `v` as text, its first `max` characters (invalid UTF-8 replaced). A value short enough is
/// copied as it is: this runs for every request without a live session.
pub(crate) fn clipped(v: &[u8], max: usize) -> String {
    if v.len() <= max {
        if let Ok(s) = std::str::from_utf8(v) {
            return s.to_owned();
        }
    }
    String::from_utf8_lossy(v).chars().take(max).collect()
}

/// The address chain and User-Agent of a request.
fn requester_of<H: HeadView>(headers: &H, peer: IpAddr) -> events::Requester {
    let joined = |name: &'static str| -> Option<String> {
        let mut values = headers.values(name);
        let mut out = clipped(values.next()?, 300);
        for v in values {
            out.push_str(", ");
            out.push_str(&clipped(v, 300));
        }
        Some(out)
    };
    events::Requester {
        peer: Some(peer),
        forwarded_for: joined("x-forwarded-for"),
        via: joined("via"),
        user_agent: headers.first("user-agent").map(|v| clipped(v, 200)),
    }
}

/// Why a browser may not have sent a cookie the guard set on it.
fn lost_cause<H: HeadView>(attributes: &str, tls: bool, headers: &H) -> String {
    let lower = attributes.to_ascii_lowercase();
    let mut why = String::from(
        "the browser sent no session cookie although the guard had set one on this device: lost between guard and browser",
    );
    let mut hint = false;
    if lower.contains("secure") && !tls {
        hint = true;
        why.push_str("; the cookie is Secure and this request came over plain http, so the browser does not send it");
    }
    let iframe = headers
        .first("sec-fetch-dest")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"iframe"));
    let cross = headers
        .first("sec-fetch-site")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"cross-site"));
    if (iframe || cross) && !lower.contains("samesite=none") {
        hint = true;
        why.push_str("; the page is framed or reached cross-site and the cookie is not SameSite=None, so the browser holds it back");
    }
    if !hint {
        why.push_str(" (a restarted browser drops session cookies; a device on the way may strip Set-Cookie or Cookie)");
    }
    why
}

fn owner_text(s: &Session) -> String {
    s.owner()
        .map(|u| u.to_string())
        .unwrap_or_else(|| "(unknown)".into())
}

pub(crate) fn default_attributes(tls: bool) -> String {
    if tls {
        "Path=/; HttpOnly; Secure".into()
    } else {
        "Path=/; HttpOnly".into()
    }
}

fn hub_of(prefix: &str) -> String {
    if prefix.is_empty() {
        "/hub/".into()
    } else {
        format!("/{prefix}/hub/")
    }
}

fn is_personal_api(rest: &str) -> bool {
    let r = rest.trim_end_matches('/');
    r == "/qps/user"
}

/// A step of a login dance, as a request shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoginStep {
    /// A GET of Qlik's authentication module (`?targetId=`).
    AuthModule,
    /// A GET that brings Qlik's ticket back (`?qlikTicket=`).
    Ticket,
}

impl LoginStep {
    /// Only what a browser's redirect makes: a GET (or HEAD) with the step in its URL; a
    /// form posting credentials, or a WebSocket with a ticket, is no redirect to answer.
    fn of<H: HeadView>(rest: &str, req: &Request<'_, H>) -> Option<LoginStep> {
        if !(req.method == b"GET" || req.method == b"HEAD") {
            return None;
        }
        if is_auth_module(rest) {
            return Some(LoginStep::AuthModule);
        }
        let q = req.query?;
        has_param(Some(q), "qlikTicket")
            .then_some(LoginStep::Ticket)
            .filter(|_| req.headers.first("upgrade").is_none())
    }
}

/// A path on this site: `/...`, but not `//...` or `/\...` (another host to a browser).
fn is_local_path(location: &str) -> bool {
    let b = location.as_bytes();
    b.first() == Some(&b'/') && !matches!(b.get(1), Some(b'/') | Some(b'\\'))
}

/// `query` without the parameter `name` (any case).
fn without_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|kv| {
            !kv.split('=')
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(name))
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn is_auth_module(rest: &str) -> bool {
    rest.starts_with("/internal_windows_authentication")
        || rest.starts_with("/internal_forms_authentication")
}

/// `/app/<id>` (an engine WebSocket) -> the app id.
fn app_of(rest: &str) -> Option<String> {
    let id = rest.strip_prefix("/app/")?;
    let id = id.split('/').next().unwrap_or("");
    (!id.is_empty()).then(|| id.chars().take(100).collect())
}

fn param(query: Option<&str>, name: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.to_string())
}

fn has_param(query: Option<&str>, name: &str) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|kv| {
            kv.split('=')
                .next()
                .is_some_and(|k| k.eq_ignore_ascii_case(name))
        })
    })
}

/// Qlik's "too many sessions" page.
fn is_qps_refusal(body: &[u8]) -> bool {
    const TEXT: &[u8] = b"too many sessions active in parallel";
    body.windows(TEXT.len())
        .any(|w| w.eq_ignore_ascii_case(TEXT))
}

/// The user an `Authorization: NTLM|Negotiate` Type 3 names (domain and user both given).
/// Only from a request with one `Authorization`: with two, the guard could read one user while
/// Qlik checks the other's proof.
fn windows_user<H: HeadView>(headers: &H) -> Option<User> {
    let mut values = headers.values("authorization");
    let (Some(only), None) = (values.next(), values.next()) else {
        return None;
    };
    let (domain, user) = crate::ntlm::authenticate_user(only)?;
    (!domain.is_empty()).then(|| User::new(&domain, &user))
}

/// The ticket of Qlik's answer to a login step that carries one: it accepted the
/// authentication.
fn ticket_of_redirect<H: HeadView>(status: u16, headers: &H) -> Option<String> {
    if !(300..400).contains(&status) {
        return None;
    }
    let l = std::str::from_utf8(headers.first("location")?).ok()?;
    let (_, q) = l.split_once('?')?;
    param(Some(q), "qlikTicket").filter(|t| !t.is_empty())
}

/// The request's path and query without its ticket: where a ticket step goes back to.
fn without_ticket<H: HeadView>(req: &Request<'_, H>) -> String {
    match without_param(req.query.unwrap_or(""), "qlikTicket") {
        q if q.is_empty() => req.path.to_string(),
        q => format!("{}?{q}", req.path),
    }
}

/// The `targetId` of a redirect to Qlik's authentication module.
fn auth_redirect_target<H: HeadView>(status: u16, headers: &H) -> Option<String> {
    if !(300..400).contains(&status) {
        return None;
    }
    let loc = std::str::from_utf8(headers.first("location")?).ok()?;
    let (path, query) = loc.split_once('?').unwrap_or((loc, ""));
    if !(path.contains("/internal_windows_authentication")
        || path.contains("/internal_forms_authentication"))
    {
        return None;
    }
    param(Some(query), "targetId")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clipped_values_keep_their_first_characters() {
        assert_eq!(clipped(b"Mozilla/5.0", 200), "Mozilla/5.0");
        assert_eq!(clipped("\u{e9}\u{e9}\u{e9}".as_bytes(), 2), "\u{e9}\u{e9}");
        assert_eq!(clipped(b"abc", 2), "ab");
        assert_eq!(clipped(b"a\xffb", 200), "a\u{fffd}b");
        assert_eq!(clipped(&[b'x'; 500], 300).len(), 300);
    }

    #[test]
    fn local_paths_and_ticket_removal() {
        assert!(is_local_path("/hub/"));
        assert!(is_local_path("/"));
        for other in [
            "//evil.example/x",
            "/\\evil",
            "https://evil.example/",
            "",
            "hub",
        ] {
            assert!(!is_local_path(other), "{other}");
        }
        assert_eq!(
            without_param("x=1&qlikTicket=a&y=2", "qlikticket"),
            "x=1&y=2"
        );
        assert_eq!(without_param("QLIKTICKET=a", "qlikTicket"), "");
        assert_eq!(without_param("a=1", "qlikTicket"), "a=1");
    }

    #[test]
    fn paths() {
        assert!(is_personal_api("/qps/user"));
        assert!(is_personal_api("/qps/user/"));
        assert!(!is_personal_api("/qps/users"));
        assert!(is_auth_module("/internal_windows_authentication/"));
        assert_eq!(app_of("/app/engineData"), Some("engineData".into()));
        assert_eq!(app_of("/app/"), None);
        assert_eq!(
            param(Some("a=1&targetId=xyz"), "targetid"),
            Some("xyz".into())
        );
        assert!(has_param(Some("x=1&qlikTicket=abc"), "qlikTicket"));
        assert!(!has_param(Some("qlikTicketx=1"), "qlikTicket"));
    }

    #[test]
    fn a_windows_user_only_from_one_authorization() {
        use crate::sim::ntlm::{Browser, Scheme};
        let b = Browser::new("CORP\\jane", Scheme::Ntlm);
        let mut type2 = b"NTLMSSP\0\x02\0\0\0".to_vec();
        type2.resize(56, 0);
        let www = format!("NTLM {}", crate::sim::ntlm::b64_encode(&type2));
        let a3 = b.authenticate([www.as_bytes()]).expect("a type 3");
        let mut h = http::HeaderMap::new();
        h.append("authorization", HeaderValue::from_str(&a3).unwrap());
        assert_eq!(
            windows_user(&h).map(|u| u.to_string()),
            Some("CORP\\jane".into())
        );
        h.append(
            "authorization",
            HeaderValue::from_static("NTLM TlRMTVNTUAABAAAA"),
        );
        assert_eq!(windows_user(&h), None, "two: which one would Qlik check?");
        let mut t1 = http::HeaderMap::new();
        t1.append(
            "authorization",
            HeaderValue::from_str(&b.negotiate()).unwrap(),
        );
        assert_eq!(windows_user(&t1), None);
    }
}
