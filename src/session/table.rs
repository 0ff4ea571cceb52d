//! The session table: every Qlik session the guard has seen, in memory, with indexes by user
//! and by device.
//!
//! The hot path is one map look-up by cookie value and an atomic store (the "touch"); nothing
//! on it takes a lock that another map's lock could be waiting on. The three maps are updated
//! one after the other, never with one map's lock held while taking another's, so there is no
//! lock order to get wrong. A user's limit decision runs under that user's entry lock (see
//! [`Table::with_user`]), which is what keeps counts exact when many requests of one user
//! arrive at once.
//!
//! Ended sessions stay a while as tombstones (so "a cookie the guard knows is dead" is known),
//! then the sweeper removes them: memory follows the number of live sessions.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;

use super::identity::User;

/// A browser, known by the guard's device cookie (random 128 bits).
pub type DeviceId = u128;

/// Where the table's millisecond clock starts (about 34 years: any idle time fits below it).
const CLOCK_BASE_MS: u64 = 1 << 40;

/// How long an ended session is remembered as dead, at most (and at most the longest
/// inactivity timeout: a browser holding a dead cookie longer than that is a new visit).
const TOMBSTONE: Duration = Duration::from_secs(300);

/// Slack on Qlik's inactivity timeout: Qlik's clock for a session starts a little after the
/// guard's, so the guard counts a session a little longer and restores it a little less long.
/// At most a fiftieth of the timeout: the gap between the two clocks is a request's transit
/// time, and a slack near the timeout itself (a test's compressed day) would have the guard
/// take a session Qlik has dropped for live for a good share of its life.
const CLOCK_SLACK_MS: u64 = 2_000;

fn slack_ms(timeout_ms: u64) -> u64 {
    CLOCK_SLACK_MS.min(timeout_ms / 50)
}

/// How long an unconfirmed cookie value is remembered while Qlik is asked about it.
const UNCONFIRMED_MS: u64 = 60_000;

/// At most this many unconfirmed values at once: made-up cookies cannot grow the table.
pub const MAX_UNCONFIRMED: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    Live = 0,
    LoggedOut = 1,
    Expired = 2,
    Evicted = 3,
    Replaced = 4,
    /// Ended by Qlik (engine notification, or Qlik said it is not a live session).
    Ended = 5,
    /// Ended by an admin through the guard.
    EndedByAdmin = 6,
    /// A cookie value the guard did not make and Qlik has not confirmed yet: it counts towards
    /// no limit and no node, and is never restored, until a lookup names its owner.
    Unconfirmed = 7,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Live,
            1 => State::LoggedOut,
            2 => State::Expired,
            3 => State::Evicted,
            4 => State::Replaced,
            5 => State::Ended,
            7 => State::Unconfirmed,
            _ => State::EndedByAdmin,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Live => "live",
            State::LoggedOut => "logged out",
            State::Expired => "expired",
            State::Evicted => "evicted",
            State::Replaced => "replaced by upstream",
            State::Ended => "ended by Qlik",
            State::EndedByAdmin => "ended by an admin",
            State::Unconfirmed => "not confirmed by Qlik",
        }
    }
}

/// What changes rarely, behind a small lock.
#[derive(Debug, Default)]
pub struct Meta {
    pub owner: Option<User>,
    pub devices: Vec<DeviceId>,
    /// App ids of the open engine WebSockets.
    pub apps: Vec<String>,
    /// Qlik's attributes for the cookie (Path, HttpOnly, SameSite, Secure), for restores.
    pub cookie_attributes: String,
    /// The Host the browser used (Qlik's host allow list checks it on the guard's own calls).
    pub host: Option<http::HeaderValue>,
    pub ended_ms: u64,
    /// The cookies set in the same response as its cookie, until the cookie first comes back
    /// on their path (then the ones missing are a fold: see [`super::fold`]).
    pub set_with: Vec<super::fold::Companion>,
    /// Made for a request without any cookie (header authentication): other such requests of
    /// its owner may go with it (`cookieless = "reuse"`).
    pub cookieless: bool,
}

/// One Qlik session.
pub struct Session {
    pub vp: usize,
    /// The cookie value: a secret, never logged or shown (see `hash`).
    pub id: Box<str>,
    /// A short keyed hash of the cookie value, for logs, events and the admin API.
    pub hash: Box<str>,
    /// The upstream node that created it (a Qlik session lives in one node's memory).
    pub node: Arc<str>,
    pub created: SystemTime,
    last_active_ms: AtomicU64,
    websockets: AtomicU32,
    state: AtomicU8,
    meta: Mutex<Meta>,
}

/// By its hash: the cookie value is a secret, also in a debug line.
impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("hash", &self.hash)
            .field("vp", &self.vp)
            .field("node", &self.node)
            .field("state", &self.state())
            .finish()
    }
}

impl Session {
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn websockets(&self) -> u32 {
        self.websockets.load(Ordering::Acquire)
    }

    pub fn last_active_ms(&self) -> u64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }

    pub fn meta(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn owner(&self) -> Option<User> {
        self.meta().owner.clone()
    }
}

/// A user's sessions and the session creations in progress for them.
#[derive(Debug)]
pub struct UserEntry {
    pub user: User,
    pub sessions: Vec<Arc<Session>>,
    /// Session creations under way (a request is on its way to Qlik without a session, or
    /// in the login dance): they count towards the limit until they end.
    pub reservations: Vec<Reservation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub id: u64,
    pub vp: usize,
    pub until_ms: u64,
}

/// A browser.
#[derive(Debug, Default)]
pub struct DeviceEntry {
    pub sessions: Vec<Arc<Session>>,
    pub last_user: Option<User>,
    pub user_agent: Option<String>,
    pub addr: Option<IpAddr>,
    pub last_seen_ms: u64,
}

/// The table.
pub struct Table {
    epoch: Instant,
    /// Per virtual proxy; atomics so that a reload can change them.
    timeouts_ms: Vec<AtomicU64>,
    by_id: Vec<DashMap<Box<str>, Arc<Session>>>,
    users: DashMap<Arc<str>, UserEntry>,
    devices: DashMap<DeviceId, DeviceEntry>,
    hash_key: [u8; 32],
    device_memory_ms: u64,
    tombstone_ms: u64,
    next_reservation: AtomicU64,
    /// Live sessions per node (for balancing new sessions).
    per_node: DashMap<Arc<str>, i64>,
    /// Unconfirmed values in the table now.
    unconfirmed: std::sync::atomic::AtomicUsize,
    /// The most devices remembered at once (`sessions.max_devices`).
    max_devices: AtomicUsize,
    /// Taken only to add a device: the count check and the insert must be one step, or
    /// concurrent new browsers would each see room and together pass the cap.
    device_admission: Mutex<()>,
    /// New devices not remembered because the map was full of browsers with live sessions.
    pub devices_refused: AtomicU64,
    /// After a scan at the cap found nothing to forget: no new scan before this (table ms),
    /// so that a flood at a full map costs a look-up per request, not a scan of the map.
    no_room_until_ms: AtomicU64,
    /// Where changes go that a pair's other guards must know (see [`crate::cluster`]): set
    /// once at start with `[cluster]`, never on a single guard.
    journal: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<crate::cluster::Change>>,
}

/// What `max_devices` is when nobody sets it (the config's default).
pub const DEFAULT_MAX_DEVICES: usize = 100_000;

impl Table {
    /// `timeouts`: the inactivity timeout of each virtual proxy, by index.
    pub fn new(timeouts: Vec<Duration>, device_memory: Duration) -> Table {
        Table {
            epoch: Instant::now(),
            by_id: timeouts.iter().map(|_| DashMap::new()).collect(),
            timeouts_ms: timeouts
                .iter()
                .map(|t| AtomicU64::new(t.as_millis() as u64))
                .collect(),
            users: DashMap::new(),
            devices: DashMap::new(),
            hash_key: rand::random(),
            device_memory_ms: device_memory.as_millis() as u64,
            tombstone_ms: timeouts
                .iter()
                .max()
                .copied()
                .unwrap_or(TOMBSTONE)
                .min(TOMBSTONE)
                .as_millis() as u64,
            next_reservation: AtomicU64::new(1),
            per_node: DashMap::new(),
            unconfirmed: std::sync::atomic::AtomicUsize::new(0),
            max_devices: AtomicUsize::new(DEFAULT_MAX_DEVICES),
            device_admission: Mutex::new(()),
            devices_refused: AtomicU64::new(0),
            no_room_until_ms: AtomicU64::new(0),
            journal: std::sync::OnceLock::new(),
        }
    }

    /// From now on, sessions owned, linked and ended are reported to `to` (a pair's store).
    pub fn set_journal(&self, to: tokio::sync::mpsc::UnboundedSender<crate::cluster::Change>) {
        let _ = self.journal.set(to);
    }

    fn report(&self, change: impl FnOnce() -> crate::cluster::Change) {
        if let Some(j) = self.journal.get() {
            let _ = j.send(change());
        }
    }

    /// The cap on remembered devices (at least 1).
    pub fn set_max_devices(&self, max: usize) {
        self.max_devices.store(max.max(1), Ordering::Relaxed);
    }

    /// The device's entry, created if there is room. Every new device comes through here, so
    /// the map never passes `max_devices`: a made-up device cookie, or a client that never
    /// keeps one, must not be able to grow the guard's memory without bound.
    fn device_entry(
        &self,
        device: DeviceId,
    ) -> Option<dashmap::mapref::one::RefMut<'_, DeviceId, DeviceEntry>> {
        if let Some(d) = self.devices.get_mut(&device) {
            return Some(d);
        }
        let _admit = self
            .device_admission
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let max = self.max_devices.load(Ordering::Relaxed);
        if self.devices.len() >= max && !self.devices.contains_key(&device) {
            self.forget_idle_devices(max);
        }
        if self.devices.len() >= max && !self.devices.contains_key(&device) {
            let n = self.devices_refused.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    max_devices = max,
                    refused = n + 1,
                    "the device map is full of browsers with live sessions: a new browser is not remembered (raise sessions.max_devices)"
                );
            }
            return None;
        }
        Some(self.devices.entry(device).or_default())
    }

    /// Makes room at the cap: forgets the least recently seen devices that have no live
    /// session. A 64th of the cap goes at once, so that the scan (the whole map) is paid once
    /// per many new devices, not on each.
    fn forget_idle_devices(&self, max: usize) {
        let now = self.now_ms();
        if now < self.no_room_until_ms.load(Ordering::Relaxed) {
            return;
        }
        let mut idle: Vec<(u64, DeviceId)> = self
            .devices
            .iter()
            .filter(|d| !d.sessions.iter().any(|s| self.is_live(s, now)))
            .map(|d| (d.last_seen_ms, *d.key()))
            .collect();
        let n = (max / 64).max(1).min(idle.len());
        if n == 0 {
            // Every browser has a live session: none will have ended within a second.
            self.no_room_until_ms.store(now + 1_000, Ordering::Relaxed);
            return;
        }
        if n < idle.len() {
            idle.select_nth_unstable(n - 1);
        }
        for (_, id) in &idle[..n] {
            // Checked again: a session may have been linked since the scan.
            self.devices
                .remove_if(id, |_, d| !d.sessions.iter().any(|s| self.is_live(s, now)));
        }
    }

    /// Milliseconds on the table's clock. It starts far from zero so that a session restored
    /// from a snapshot can have been active before the table existed.
    pub fn now_ms(&self) -> u64 {
        CLOCK_BASE_MS + self.epoch.elapsed().as_millis() as u64
    }

    /// Milliseconds since the table started, as wall-clock time.
    pub fn wall(&self, ms: u64) -> SystemTime {
        let age = Duration::from_millis(self.now_ms().saturating_sub(ms));
        SystemTime::now() - age
    }

    pub fn timeout_ms(&self, vp: usize) -> u64 {
        self.timeouts_ms
            .get(vp)
            .map_or(30 * 60_000, |t| t.load(Ordering::Relaxed))
    }

    /// New inactivity timeouts (a reload), by virtual proxy index.
    pub fn set_timeouts(&self, timeouts: Vec<Duration>) {
        for (slot, t) in self.timeouts_ms.iter().zip(timeouts) {
            slot.store(t.as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// The short keyed hash shown wherever a cookie value would be.
    pub fn hash(&self, value: &str) -> String {
        let h = blake3::keyed_hash(&self.hash_key, value.as_bytes());
        h.to_hex()[..12].to_string()
    }

    /// Counts towards the limit: live, and open or active within the timeout (plus slack).
    pub fn is_live(&self, s: &Session, now_ms: u64) -> bool {
        s.state() == State::Live
            && (s.websockets() > 0
                || now_ms.saturating_sub(s.last_active_ms()) <= {
                    let t = self.timeout_ms(s.vp);
                    t + slack_ms(t)
                })
    }

    /// Safe to hand to a browser: Qlik surely still knows it.
    pub fn is_restorable(&self, s: &Session, now_ms: u64) -> bool {
        s.state() == State::Live
            && (s.websockets() > 0
                || now_ms.saturating_sub(s.last_active_ms()) < {
                    let t = self.timeout_ms(s.vp);
                    t - slack_ms(t)
                })
    }

    /// Milliseconds until `s` times out (0 when it has an open WebSocket: it will not).
    pub fn expires_in_ms(&self, s: &Session, now_ms: u64) -> Option<u64> {
        if s.websockets() > 0 {
            return None;
        }
        let t = self.timeout_ms(s.vp);
        Some((s.last_active_ms() + t + slack_ms(t)).saturating_sub(now_ms))
    }

    pub fn get(&self, vp: usize, value: &str) -> Option<Arc<Session>> {
        self.by_id.get(vp)?.get(value).map(|e| e.value().clone())
    }

    pub fn touch(&self, s: &Session) {
        self.touch_at(s, self.now_ms());
    }

    pub fn touch_at(&self, s: &Session, now_ms: u64) {
        s.last_active_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Records a session Qlik created (or one the guard adopts). Returns the existing entry
    /// when the value is already known.
    pub fn insert(
        &self,
        vp: usize,
        value: &str,
        node: Arc<str>,
        device: Option<DeviceId>,
        owner: Option<User>,
        cookie_attributes: String,
    ) -> Arc<Session> {
        let map = &self.by_id[vp];
        let session = match map.entry(value.into()) {
            dashmap::Entry::Occupied(e) => return e.get().clone(),
            dashmap::Entry::Vacant(e) => {
                let s = Arc::new(self.new_session(vp, value, node, State::Live, cookie_attributes));
                e.insert(s.clone());
                *self.per_node.entry(s.node.clone()).or_insert(0) += 1;
                s
            }
        };
        if let Some(d) = device {
            self.link_device(&session, d);
        }
        if let Some(u) = owner {
            self.set_owner(&session, u);
        }
        session
    }

    /// A session record, active now, in `state` (not yet in any map).
    fn new_session(
        &self,
        vp: usize,
        value: &str,
        node: Arc<str>,
        state: State,
        cookie_attributes: String,
    ) -> Session {
        Session {
            vp,
            hash: self.hash(value).into(),
            id: value.into(),
            node,
            created: SystemTime::now(),
            last_active_ms: AtomicU64::new(self.now_ms()),
            websockets: AtomicU32::new(0),
            state: AtomicU8::new(state as u8),
            meta: Mutex::new(Meta {
                cookie_attributes,
                ..Meta::default()
            }),
        }
    }

    /// Remembers a cookie value the guard did not make, until Qlik confirms it
    /// ([`Table::confirm`]) or not. `None` when the value is known already or
    /// [`MAX_UNCONFIRMED`] values wait already.
    pub fn insert_unconfirmed(
        &self,
        vp: usize,
        value: &str,
        node: Arc<str>,
        cookie_attributes: String,
    ) -> Option<Arc<Session>> {
        if self.unconfirmed.load(Ordering::Relaxed) >= MAX_UNCONFIRMED {
            return None;
        }
        let map = self.by_id.get(vp)?;
        match map.entry(value.into()) {
            dashmap::Entry::Occupied(_) => None,
            dashmap::Entry::Vacant(e) => {
                let s = Arc::new(self.new_session(
                    vp,
                    value,
                    node,
                    State::Unconfirmed,
                    cookie_attributes,
                ));
                self.unconfirmed.fetch_add(1, Ordering::Relaxed);
                e.insert(s.clone());
                Some(s)
            }
        }
    }

    /// Qlik confirmed an unconfirmed value as a live session: from now on it counts.
    pub fn confirm(&self, s: &Session) -> bool {
        let confirmed = s
            .state
            .compare_exchange(
                State::Unconfirmed as u8,
                State::Live as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if confirmed {
            self.unconfirmed.fetch_sub(1, Ordering::Relaxed);
            self.touch(s);
            *self.per_node.entry(s.node.clone()).or_insert(0) += 1;
        }
        confirmed
    }

    /// Unconfirmed values in the table now.
    pub fn unconfirmed(&self) -> usize {
        self.unconfirmed.load(Ordering::Relaxed)
    }

    /// Notes that `device` uses `session` (unless the device map is full: see
    /// [`Table::set_max_devices`]).
    pub fn link_device(&self, session: &Arc<Session>, device: DeviceId) {
        if session.meta().devices.contains(&device) {
            return;
        }
        let owner = session.owner();
        {
            let Some(mut d) = self.device_entry(device) else {
                return;
            };
            d.last_seen_ms = self.now_ms();
            if !d.sessions.iter().any(|s| Arc::ptr_eq(s, session)) {
                d.sessions.push(session.clone());
            }
            if owner.is_some() {
                d.last_user = owner;
            }
        }
        let added = {
            let mut m = session.meta();
            let added = !m.devices.contains(&device);
            if added {
                m.devices.push(device);
            }
            added && m.owner.is_some()
        };
        if added && session.state() == State::Live {
            self.report(|| crate::cluster::Change::Linked(session.clone(), device));
        }
    }

    /// A browser's new device id `to` takes over the sessions of its old one `from` that are
    /// `owner`'s: the old id may have been planted by someone else, whose sessions must not
    /// follow the browser.
    pub fn carry_sessions(&self, from: DeviceId, to: DeviceId, owner: &User) {
        let mine: Vec<Arc<Session>> = match self.devices.get(&from) {
            Some(d) => d
                .sessions
                .iter()
                .filter(|s| {
                    s.state() == State::Live && s.owner().is_some_and(|o| o.key == owner.key)
                })
                .cloned()
                .collect(),
            None => return,
        };
        for s in mine {
            self.link_device(&s, to);
        }
    }

    /// Records who owns a session (once known), and indexes it under that user.
    pub fn set_owner(&self, session: &Arc<Session>, user: User) {
        let devices = {
            let mut m = session.meta();
            if m.owner.as_ref() == Some(&user) {
                return;
            }
            m.owner = Some(user.clone());
            m.devices.clone()
        };
        self.with_user(&user, |u, _, _| {
            if !u.sessions.iter().any(|s| Arc::ptr_eq(s, session)) {
                u.sessions.push(session.clone());
            }
        });
        for d in devices {
            if let Some(mut e) = self.devices.get_mut(&d) {
                e.last_user = Some(user.clone());
            }
        }
        if session.state() == State::Live {
            self.report(|| crate::cluster::Change::Owned(session.clone()));
        }
    }

    /// A session this guard had let expire that the pair's store says is live (the other
    /// guard kept it in use): live again, counted for its owner and node.
    pub fn revive(&self, s: &Arc<Session>) -> bool {
        let revived = s
            .state
            .compare_exchange(
                State::Expired as u8,
                State::Live as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if revived {
            self.touch(s);
            *self.per_node.entry(s.node.clone()).or_insert(0) += 1;
            if let Some(owner) = s.owner() {
                self.with_user(&owner, |u, _, _| {
                    if !u.sessions.iter().any(|x| Arc::ptr_eq(x, s)) {
                        u.sessions.push(s.clone());
                    }
                });
            }
        }
        revived
    }

    /// Ends a live session; returns false when it had ended already.
    pub fn end(&self, s: &Session, state: State) -> bool {
        let ended = s
            .state
            .compare_exchange(
                State::Live as u8,
                state as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if ended {
            let owner = {
                let mut m = s.meta();
                m.ended_ms = self.now_ms();
                m.owner.clone()
            };
            if let Some(mut n) = self.per_node.get_mut(&s.node) {
                *n -= 1;
            }
            // Expiry is this guard's view only: the other guard may have kept it in use.
            if let (Some(owner), false) = (owner, state == State::Expired) {
                self.report(|| crate::cluster::Change::Ended {
                    owner,
                    value: s.id.clone(),
                });
            }
            return true;
        }
        // Qlik said an unconfirmed value is no session: it is remembered as dead.
        let refuted = s
            .state
            .compare_exchange(
                State::Unconfirmed as u8,
                state as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok();
        if refuted {
            self.unconfirmed.fetch_sub(1, Ordering::Relaxed);
            s.meta().ended_ms = self.now_ms();
        }
        refuted
    }

    pub fn websocket_opened(&self, s: &Session, app: Option<String>) {
        s.websockets.fetch_add(1, Ordering::AcqRel);
        if let Some(a) = app {
            s.meta().apps.push(a);
        }
        self.touch(s);
    }

    pub fn websocket_closed(&self, s: &Session, app: Option<&str>) {
        // The WebSocket kept the session alive until now: its inactivity clock starts here.
        self.touch(s);
        let _ = s
            .websockets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if let Some(a) = app {
            let mut m = s.meta();
            if let Some(i) = m.apps.iter().position(|x| x == a) {
                m.apps.remove(i);
            }
        }
    }

    /// Notes the browser's user agent and address (for the limit page and the admin API).
    /// Only browsers the table already knows, or `create`: a client that never keeps a cookie
    /// would otherwise add an entry with every request.
    pub fn seen_device(
        &self,
        device: DeviceId,
        user_agent: Option<&str>,
        addr: IpAddr,
        create: bool,
    ) {
        let found = match create {
            true => self.device_entry(device),
            false => self.devices.get_mut(&device),
        };
        let Some(mut d) = found else { return };
        d.last_seen_ms = self.now_ms();
        d.addr = Some(addr);
        if let Some(ua) = user_agent {
            if d.user_agent.as_deref() != Some(ua) {
                d.user_agent = Some(super::clipped(ua.as_bytes(), 200));
            }
        }
    }

    pub fn set_device_user(&self, device: DeviceId, user: &User) {
        if let Some(mut d) = self.devices.get_mut(&device) {
            if d.last_user.as_ref() != Some(user) {
                d.last_user = Some(user.clone());
            }
        }
    }

    pub fn device_user(&self, device: DeviceId) -> Option<User> {
        self.devices.get(&device)?.last_user.clone()
    }

    /// The browser's user agent and address.
    pub fn device_info(&self, device: DeviceId) -> (Option<String>, Option<IpAddr>) {
        match self.devices.get(&device) {
            Some(d) => (d.user_agent.clone(), d.addr),
            None => (None, None),
        }
    }

    /// The device's most recently active restorable session on `vp`, if its owner is not
    /// known to differ from `user`; with `owner_named`, only a session whose owner is known
    /// and is `user` (header authentication: the header must name the session's user).
    pub fn device_session(
        &self,
        device: DeviceId,
        vp: usize,
        user: Option<&User>,
        owner_named: bool,
    ) -> Option<Arc<Session>> {
        let now = self.now_ms();
        let d = self.devices.get(&device)?;
        d.sessions
            .iter()
            .filter(|s| s.vp == vp && self.is_restorable(s, now))
            .filter(|s| match (user, s.owner()) {
                (Some(u), Some(o)) => u.key == o.key,
                _ => !owner_named,
            })
            .max_by_key(|s| s.last_active_ms())
            .cloned()
    }

    /// Runs `f` on the user's entry under its lock: the place for limit decisions.
    pub fn with_user<R>(&self, user: &User, f: impl FnOnce(&mut UserEntry, &Table, u64) -> R) -> R {
        let now = self.now_ms();
        let mut e = self
            .users
            .entry(user.key.clone())
            .or_insert_with(|| UserEntry {
                user: user.clone(),
                sessions: Vec::new(),
                reservations: Vec::new(),
            });
        f(&mut e, self, now)
    }

    pub fn new_reservation(&self, vp: usize, until_ms: u64) -> Reservation {
        Reservation {
            id: self.next_reservation.fetch_add(1, Ordering::Relaxed),
            vp,
            until_ms,
        }
    }

    pub fn release(&self, user: &User, reservation: u64) {
        if let Some(mut e) = self.users.get_mut(&user.key) {
            e.reservations.retain(|r| r.id != reservation);
        }
    }

    /// The user's live sessions, most recently active first.
    pub fn user_sessions(&self, user_key: &str) -> Vec<Arc<Session>> {
        let now = self.now_ms();
        let mut v: Vec<Arc<Session>> = match self.users.get(user_key) {
            Some(e) => e
                .sessions
                .iter()
                .filter(|s| self.is_live(s, now))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        v.sort_by_key(|s| std::cmp::Reverse(s.last_active_ms()));
        v
    }

    /// Session creations under way for the user (slots held by requests and login dances).
    pub fn reservations(&self, user_key: &str) -> usize {
        self.users.get(user_key).map_or(0, |e| e.reservations.len())
    }

    pub fn live_count(&self, user_key: &str) -> usize {
        let now = self.now_ms();
        self.users
            .get(user_key)
            .map(|e| e.sessions.iter().filter(|s| self.is_live(s, now)).count())
            .unwrap_or(0)
    }

    /// Every user with at least one live session, and those sessions.
    pub fn users(&self) -> Vec<(User, Vec<Arc<Session>>)> {
        let mut out: Vec<(User, Vec<Arc<Session>>)> = self
            .users
            .iter()
            .map(|e| (e.user.clone(), e.key().clone()))
            .map(|(u, k)| {
                let s = self.user_sessions(&k);
                (u, s)
            })
            .filter(|(_, s)| !s.is_empty())
            .collect();
        out.sort_by(|a, b| a.0.key.cmp(&b.0.key));
        out
    }

    /// Every session, live or tombstone.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.by_id
            .iter()
            .flat_map(|m| m.iter().map(|e| e.value().clone()).collect::<Vec<_>>())
            .collect()
    }

    /// Sessions created on `node` and not ended (those that timed out count until the sweeper
    /// has seen them).
    pub fn node_sessions(&self, node: &str) -> usize {
        self.per_node
            .get(node)
            .map(|n| (*n).max(0) as usize)
            .unwrap_or(0)
    }

    pub fn find_by_hash(&self, hash: &str) -> Option<Arc<Session>> {
        self.by_id.iter().find_map(|m| {
            m.iter()
                .find(|e| &*e.value().hash == hash)
                .map(|e| e.value().clone())
        })
    }

    /// Sizes of the maps: (sessions incl. tombstones, users, devices).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.by_id.iter().map(|m| m.len()).sum(),
            self.users.len(),
            self.devices.len(),
        )
    }

    /// Expires idle sessions, forgets old tombstones, stale reservations, and devices not seen
    /// for `device_memory`. Returns the sessions it expired now.
    pub fn sweep(&self) -> Vec<Arc<Session>> {
        let now = self.now_ms();
        let mut expired = Vec::new();
        let tomb = self.tombstone_ms;
        for map in &self.by_id {
            map.retain(|_, s| {
                if s.state() == State::Unconfirmed {
                    let keep = now.saturating_sub(s.last_active_ms()) < UNCONFIRMED_MS;
                    if !keep {
                        self.unconfirmed.fetch_sub(1, Ordering::Relaxed);
                    }
                    return keep;
                }
                if s.state() == State::Live && !self.is_live(s, now) && self.end(s, State::Expired)
                {
                    expired.push(s.clone());
                }
                s.state() == State::Live || now.saturating_sub(s.meta().ended_ms) < tomb
            });
        }
        self.users.retain(|_, e| {
            e.sessions.retain(|s| s.state() == State::Live);
            e.reservations.retain(|r| r.until_ms > now);
            !e.sessions.is_empty() || !e.reservations.is_empty()
        });
        let memory = self.device_memory_ms;
        self.devices.retain(|_, d| {
            d.sessions.retain(|s| {
                s.state() == State::Live || now.saturating_sub(s.meta().ended_ms) < tomb
            });
            !d.sessions.is_empty() || now.saturating_sub(d.last_seen_ms) < memory
        });
        // Give the maps' memory back after a wave of sessions has gone.
        for map in &self.by_id {
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
        }
        if self.devices.capacity() > 64 && self.devices.len() < self.devices.capacity() / 4 {
            self.devices.shrink_to_fit();
        }
        if self.users.capacity() > 64 && self.users.len() < self.users.capacity() / 4 {
            self.users.shrink_to_fit();
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(timeout_ms: u64) -> Table {
        Table::new(
            vec![Duration::from_millis(timeout_ms); 2],
            Duration::from_millis(timeout_ms),
        )
    }

    #[test]
    fn indexes_follow_inserts_and_owners() {
        let t = table(60_000);
        let jane = User::new("CORP", "jane");
        let s = t.insert(0, "abc", "n1".into(), Some(7), None, String::new());
        assert!(t.get(0, "abc").is_some());
        assert!(
            t.get(1, "abc").is_none(),
            "a cookie of one virtual proxy is unknown on another"
        );
        assert_eq!(t.live_count(&jane.key), 0);
        t.set_owner(&s, jane.clone());
        assert_eq!(t.live_count(&jane.key), 1);
        assert_eq!(t.device_user(7), Some(jane.clone()));
        assert!(t.device_session(7, 0, Some(&jane), false).is_some());
        let bob = User::new("CORP", "bob");
        assert!(
            t.device_session(7, 0, Some(&bob), false).is_none(),
            "never another user's session"
        );
        assert!(t.end(&s, State::LoggedOut));
        assert!(!t.end(&s, State::Expired));
        assert_eq!(t.live_count(&jane.key), 0);
        assert_ne!(&*s.hash, "abc");
        assert_eq!(s.hash.len(), 12);
    }

    #[test]
    fn the_clock_slack_is_two_seconds_at_most_and_a_fiftieth_of_the_timeout() {
        assert_eq!(slack_ms(30 * 60_000), CLOCK_SLACK_MS);
        assert_eq!(slack_ms(60_000), 1_200);
        assert_eq!(slack_ms(3_000), 60);
        let t = Table::new(vec![Duration::from_millis(500)], Duration::from_secs(60));
        let s = t.insert(0, "a", "n1".into(), None, None, String::new());
        let at = s.last_active_ms();
        assert!(t.is_live(&s, at + 510) && !t.is_live(&s, at + 511));
        assert!(t.is_restorable(&s, at + 489) && !t.is_restorable(&s, at + 490));
        assert_eq!(t.expires_in_ms(&s, at), Some(510));
    }

    #[test]
    fn each_virtual_proxy_has_its_own_timeout() {
        let t = Table::new(
            vec![Duration::from_millis(10), Duration::from_secs(3600)],
            Duration::from_secs(60),
        );
        let short = t.insert(0, "a", "n1".into(), None, None, String::new());
        let long = t.insert(1, "b", "n1".into(), None, None, String::new());
        std::thread::sleep(Duration::from_millis(CLOCK_SLACK_MS + 30));
        let now = t.now_ms();
        assert!(!t.is_live(&short, now));
        assert!(t.is_live(&long, now));
    }

    #[test]
    fn websockets_keep_sessions_live() {
        let t = table(0);
        let s = t.insert(
            0,
            "x",
            "n1".into(),
            None,
            Some(User::new("a", "b")),
            String::new(),
        );
        t.websocket_opened(&s, Some("app1".into()));
        std::thread::sleep(Duration::from_millis(CLOCK_SLACK_MS + 20));
        assert!(t.is_live(&s, t.now_ms()));
        assert!(t.sweep().is_empty());
        t.websocket_closed(&s, Some("app1"));
        assert!(s.meta().apps.is_empty());
    }

    #[test]
    fn the_device_map_is_capped() {
        let addr: IpAddr = [127, 0, 0, 1].into();
        // Browsers without a session: the least recently seen are forgotten for new ones.
        let t = table(60_000);
        t.set_max_devices(64);
        for d in 0..1000u128 {
            t.seen_device(d, None, addr, true);
            assert!(t.sizes().2 <= 64);
        }
        assert!(t.device_info(999).1.is_some(), "the newest is remembered");
        assert!(t.device_info(0).1.is_none(), "the oldest is forgotten");

        // Browsers with a live session are never forgotten: a new one is not remembered.
        let t = table(60_000);
        t.set_max_devices(10);
        for d in 0..10u128 {
            t.insert(
                0,
                &format!("c{d}"),
                "n1".into(),
                Some(d),
                None,
                String::new(),
            );
        }
        let late = t.insert(0, "late", "n1".into(), Some(99), None, String::new());
        assert_eq!(t.sizes().2, 10);
        assert!(t.device_session(0, 0, None, false).is_some());
        assert!(t.device_session(99, 0, None, false).is_none());
        assert!(
            late.meta().devices.is_empty(),
            "the session says no device either"
        );
        assert_eq!(t.devices_refused.load(Ordering::Relaxed), 1);
        // Once a session has ended, its browser can make room (after the pause that keeps a
        // flood at a full map from scanning it on every request).
        let s0 = t.get(0, "c0").unwrap();
        t.end(&s0, State::LoggedOut);
        t.link_device(&late, 99);
        assert!(
            t.device_session(99, 0, None, false).is_none(),
            "not within the pause"
        );
        std::thread::sleep(Duration::from_millis(1_050));
        t.link_device(&late, 99);
        assert!(t.device_session(99, 0, None, false).is_some());
        assert_eq!(t.sizes().2, 10);
    }

    #[test]
    fn hundred_thousand_sessions_come_and_go() {
        let t = Table::new(vec![Duration::from_millis(1); 1], Duration::from_millis(1));
        let before = t.sizes();
        for i in 0..100_000u32 {
            let u = User::new("D", &format!("u{}", i % 5000));
            t.insert(
                0,
                &format!("cookie-{i}"),
                "n1".into(),
                Some(i as u128),
                Some(u),
                String::new(),
            );
        }
        assert_eq!(t.sizes().0, 100_000);
        std::thread::sleep(Duration::from_millis(CLOCK_SLACK_MS + 50));
        let expired = t.sweep();
        assert_eq!(expired.len(), 100_000);
        assert_eq!(t.sizes().1, 0, "users without live sessions are forgotten");
        // Tombstones go after their retention (here: the 1 ms timeout).
        std::thread::sleep(Duration::from_millis(5));
        t.sweep();
        assert_eq!(t.sizes(), before, "the table returns to its size");
    }
}
