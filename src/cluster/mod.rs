//! An active/active pair of guards sharing one truth (issue 14): what one guard knows of a
//! user's sessions, the other must know before it lets that user make one more, or the pair
//! lets a user past Qlik's limit that each guard alone would have held.
//!
//! `store` is the shared part (Redis): the limit decision made atomically in the store, so
//! that concurrent logins through both guards cannot both take the last slot. This module is
//! the guard's side of it, [`Cluster`]:
//!
//! - On a request, the store is asked only to **reserve** a slot for a new session (the limit
//!   decision) and to **look up** a cookie this guard does not know (a session made through
//!   the other guard). Both are bounded by `store_timeout`; a store that is down is not asked
//!   at all, and the guard decides from its own table.
//! - Everything else is written behind the requests by one task ([`Cluster::run`]), in order:
//!   sessions made, owned, linked to a device, ended (the [`Change`]s the table reports), and
//!   once a second the activity of the sessions used since the last second, in one batch.
//!   The live-cookie path makes no store call at all.
//! - When the store is unreachable the task says so (an event, `/metrics`, `/readyz`), keeps
//!   the ends it could not write, probes once a second, and when the store answers again
//!   writes every live session it knows (and a store that came back empty gets all of them:
//!   each guard keeps a mark in the store whose absence says so).

pub mod seal;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterConfig;
use crate::diagnostics::events::{Events, Kind, NewEvent};
use crate::session::identity::User;
use crate::session::table::{Session, State, Table};
use crate::session::SessionGuard;
use store::{NewSession, Reservation, SessionRecord, Store, StoreError, Touch};

/// What the table reports to the store's writer (see [`Table::set_journal`]).
pub enum Change {
    /// A live session whose owner is known now (made, adopted, owner resolved).
    Owned(Arc<Session>),
    /// A session made under a slot the store granted: the slot becomes the session; `done`
    /// hears when the store has it.
    Made(
        Arc<Session>,
        User,
        Reservation,
        Option<tokio::sync::oneshot::Sender<()>>,
    ),
    /// A session ended by a logout, an eviction, Qlik or an admin (not by the timeout: the
    /// other guard may have kept it alive).
    Ended { owner: User, value: Box<str> },
    /// A device linked to a session.
    Linked(Arc<Session>, u128),
}

/// The store's answer to a reservation.
pub enum Slot {
    Granted,
    /// The pair counts `max` for the user already.
    AtLimit,
    /// No answer (down, slow): the guard decides from its own table.
    Unavailable,
}

/// Ends kept while the store is down, at most (beyond, the store's TTL ends them).
const MAX_PENDING_ENDS: usize = 100_000;

/// Activity written back in one call, at most.
const TOUCH_BATCH: usize = 256;

/// How often activity is written back and a down store probed.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// A reservation in the store lives this long unless a session or a release ends it sooner
/// (as the guard's own reservations: a login dance may take a while).
const RESERVATION_TTL: Duration = Duration::from_secs(60);

/// The guard's side of the pair.
pub struct Cluster {
    store: Store,
    name: String,
    key_prefix: String,
    up: AtomicBool,
    /// Since when and why the store is unreachable.
    down: Mutex<Option<(SystemTime, String)>>,
    /// Store calls that failed (a metric).
    pub errors: AtomicU64,
    /// Store calls made (a metric: with the requests served, the calls per request).
    pub calls: AtomicU64,
    /// Of `calls`, those of the once-a-second flush (the mark, activity, re-synchronisation).
    pub flush_calls: AtomicU64,
    tx: mpsc::UnboundedSender<Change>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Change>>>,
    /// The store's reservations by the id of the table's own reservation they go with.
    slots: Mutex<HashMap<u64, Reservation>>,
    events: Arc<Events>,
    /// Seals cookie values for the store (`cluster.secret_file`), if the pair has a secret.
    sealer: Option<seal::Sealer>,
}

impl Cluster {
    pub fn new(config: &ClusterConfig, events: Arc<Events>) -> Result<Cluster, String> {
        let store = Store::new(config).map_err(|e| format!("cluster.redis_url: {e}"))?;
        let sealer = match &config.secret_file {
            Some(f) => Some(seal::Sealer::new(
                &crate::config::pair_secret(f).map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Cluster {
            store,
            name: config.guard_name(),
            key_prefix: config.key_prefix.clone(),
            up: AtomicBool::new(true),
            down: Mutex::new(None),
            errors: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            flush_calls: AtomicU64::new(0),
            tx,
            rx: Mutex::new(Some(rx)),
            slots: Mutex::new(HashMap::new()),
            events,
            sealer,
        })
    }

    /// This guard's name in the pair.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    /// Where the table reports its changes.
    pub fn journal(&self) -> mpsc::UnboundedSender<Change> {
        self.tx.clone()
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Since when and why the store does not answer, while it does not.
    pub fn down_since(&self) -> Option<(SystemTime, String)> {
        self.down.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn failed(&self, what: &str, e: &StoreError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if self.up.swap(false, Ordering::AcqRel) {
            let why = format!("{what}: {e}");
            *self.down.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((SystemTime::now(), why.clone()));
            tracing::warn!(guard = %self.name, "the cluster store is unreachable ({why}): this guard decides from its own table until it answers again");
            self.events.emit(NewEvent::new(
                Kind::StoreUnreachable,
                format!("the cluster store did not answer ({why}): the limit is kept from this guard's own table, and the store is written again when it is back"),
            ));
        }
    }

    fn answered(&self) {
        if !self.up.swap(true, Ordering::AcqRel) {
            let since = self
                .down
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .map(|(t, _)| t.elapsed().unwrap_or_default());
            tracing::info!(guard = %self.name, down_for = ?since, "the cluster store answers again: writing this guard's sessions to it");
            self.events.emit(NewEvent::new(
                Kind::StoreBack,
                format!(
                    "the cluster store answers again after {}: this guard's live sessions are written to it",
                    humantime::format_duration(Duration::from_secs(
                        since.unwrap_or_default().as_secs()
                    ))
                ),
            ));
        }
    }

    async fn call<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Option<T> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match f.await {
            Ok(v) => {
                self.answered();
                Some(v)
            }
            Err(e) => {
                self.failed(what, &e);
                None
            }
        }
    }

    /// The pair's device-cookie key, when the store gives it (at start; see
    /// [`Store::device_signing_key`]).
    pub async fn device_signing_key(&self) -> Option<[u8; 32]> {
        self.call("device key", self.store.device_signing_key())
            .await
    }

    /// A slot for a new session of `user` in the pair's count (under `max`), going with the
    /// table's own reservation `local`. Not asked while the store is down.
    pub async fn reserve(&self, user: &User, max: usize, local: u64) -> Slot {
        if !self.is_up() {
            return Slot::Unavailable;
        }
        let name = owner_name(user);
        match self
            .call("reserve", self.store.reserve(&name, max, RESERVATION_TTL))
            .await
        {
            Some(Some(r)) => {
                self.lock_slots().insert(local, r);
                Slot::Granted
            }
            Some(None) => Slot::AtLimit,
            None => Slot::Unavailable,
        }
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Reservation>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The table's reservation `local` was given back: so is the store's that went with it
    /// (written behind the request).
    pub fn release(self: &Arc<Self>, local: u64) {
        let Some(r) = self.lock_slots().remove(&local) else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.clone();
        rt.spawn(async move {
            if me.is_up() {
                me.call("release", me.store.release(&r)).await;
            }
        });
    }

    /// A session was made under the table's reservation `local`: the store's slot becomes it.
    /// The receiver hears when the store has it (see [`Cluster::settled`]).
    pub fn made(
        &self,
        s: &Arc<Session>,
        user: &User,
        local: u64,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let r = self.lock_slots().remove(&local)?;
        let (done, heard) = tokio::sync::oneshot::channel();
        self.tx
            .send(Change::Made(s.clone(), user.clone(), r, Some(done)))
            .ok()?;
        Some(heard)
    }

    /// Waits (at most `store_timeout`) until the store has a session just made, so that the
    /// browser's next request, whichever guard it reaches, finds it there: the answer that
    /// sets the cookie waits one store write, a login's only.
    pub async fn settled(&self, heard: tokio::sync::oneshot::Receiver<()>) {
        let _ = tokio::time::timeout(self.store.deadline(), heard).await;
    }

    /// Ends a session in the store now (an eviction, before the slot it frees is asked for).
    pub async fn end_now(&self, s: &Session) {
        if let (Some(owner), true) = (s.owner(), self.is_up()) {
            let key = store::session_key(&s.id);
            self.call("end", self.store.end(&owner_name(&owner), &key))
                .await;
        }
    }

    /// The tag of a device's link to a session: keyed with the pair's secret, `"1"` without.
    fn link_tag(&self, key: &str, device: &str) -> String {
        match &self.sealer {
            Some(s) => s.link_tag(key, device),
            None => "1".into(),
        }
    }

    /// Whether the store holds sealed cookie values (the pair has a secret).
    pub fn seals(&self) -> bool {
        self.sealer.is_some()
    }

    /// Opens what the store gives: only values sealed by the pair for the very record they
    /// are in (the record's key is the hash of the value).
    fn opened(&self, found: Vec<(String, SessionRecord)>) -> Vec<(String, SessionRecord)> {
        let Some(sealer) = &self.sealer else {
            return Vec::new();
        };
        found
            .into_iter()
            .filter_map(|(key, r)| {
                let value = sealer.open(&key, r.sealed.as_deref()?)?;
                (store::session_key(&value) == key).then_some((value, r))
            })
            .collect()
    }

    /// The sessions, with their values, that a guard of the pair linked to `device`. Only with
    /// a secret, and not while the store is down.
    pub async fn device_sessions(&self, device: u128) -> Vec<(String, SessionRecord)> {
        if self.sealer.is_none() || !self.is_up() {
            return Vec::new();
        }
        let device = store::device_key(device);
        let found = self
            .call("device sessions", self.store.device_sessions(&device))
            .await
            .unwrap_or_default();
        let Some(sealer) = &self.sealer else {
            return Vec::new();
        };
        // Only links a guard made (tagged with the secret): one written into the store by
        // anyone else does not lead a browser to someone's session.
        self.opened(found)
            .into_iter()
            .filter(|(value, r)| {
                let tag = sealer.link_tag(&store::session_key(value), &device);
                r.device_tags.get(&device) == Some(&tag)
            })
            .collect()
    }

    /// The user's sessions in the pair, with their values, the latest active first. Only with
    /// a secret, and not while the store is down.
    pub async fn user_sessions(&self, user: &User) -> Vec<(String, SessionRecord)> {
        if self.sealer.is_none() || !self.is_up() {
            return Vec::new();
        }
        let found = self
            .call("user sessions", self.store.user_sessions(&owner_name(user)))
            .await
            .unwrap_or_default();
        self.opened(found)
    }

    /// What the store knows of a cookie value this guard does not know. Not asked while the
    /// store is down.
    pub async fn lookup(&self, value: &str) -> Option<SessionRecord> {
        if !self.is_up() {
            return None;
        }
        self.call("lookup", self.store.lookup(&store::session_key(value)))
            .await
            .flatten()
    }

    /// The writer: the table's changes in order, activity once a second, the probe and the
    /// re-synchronisation. Runs until `stop`.
    pub async fn run(self: Arc<Self>, guard: Arc<SessionGuard>, stop: CancellationToken) {
        let Some(mut rx) = self.rx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let prefixes: Vec<String> = guard
            .virtual_proxies()
            .iter()
            .map(|v| v.prefix.clone())
            .collect();
        let mut w = Writer {
            c: &self,
            table: &guard.table,
            prefixes: &prefixes,
            pending_ends: Vec::new(),
            written: HashMap::new(),
            resync: true,
            last: None,
            in_flush: false,
        };
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                change = rx.recv() => match change {
                    Some(c) => w.apply(c).await,
                    None => return,
                },
                _ = tick.tick() => {
                    w.in_flush = true;
                    w.flush().await;
                    w.in_flush = false;
                }
                _ = stop.cancelled() => {
                    // What is queued still goes (bounded: each call has its deadline).
                    while let Ok(c) = rx.try_recv() {
                        w.apply(c).await;
                    }
                    return;
                }
            }
        }
    }
}

/// The owner as the store keeps it (`DIR\id`, as Qlik writes it: the user's `Display`).
fn owner_name(u: &User) -> String {
    u.to_string()
}

/// The owner the store names. Not `User::parse`, which is for identity headers (US-ASCII):
/// an owner Qlik named may be any text.
pub fn owner_of(name: &str) -> Option<User> {
    let (dir, id) = name.split_once('\\')?;
    (!dir.is_empty() && !id.is_empty()).then(|| User::new(dir, id))
}

/// The writer task's state.
struct Writer<'a> {
    c: &'a Cluster,
    table: &'a Table,
    prefixes: &'a [String],
    /// Ends the store did not take (it was down): written when it is back.
    pending_ends: Vec<(String, String)>,
    /// Per session (by address), the activity the store has last been told of.
    written: HashMap<usize, u64>,
    /// Every live session is to be written (start, the store back, a store that lost it).
    resync: bool,
    /// The session last committed, its owner and devices: a login reports the session made,
    /// then its owner and its device, which that one commit has written already.
    last: Option<(Arc<Session>, Arc<str>, Vec<u128>)>,
    /// In the once-a-second flush (its calls are counted apart).
    in_flush: bool,
}

impl Writer<'_> {
    async fn call<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Option<T> {
        if self.in_flush {
            self.c.flush_calls.fetch_add(1, Ordering::Relaxed);
        }
        self.c.call(what, f).await
    }

    /// How long the store is to count `s` from now: its inactivity timeout from its last
    /// activity, plus how late the store may learn of newer activity ([`Writer::every`] and a
    /// flush), so that the store never drops a session Qlik still has.
    fn lives(&self, s: &Session, now: u64) -> Duration {
        let idle = now.saturating_sub(s.last_active_ms());
        let timeout = self.table.timeout_ms(s.vp);
        let late = self.every(s) + FLUSH_EVERY.as_millis() as u64;
        Duration::from_millis((timeout + late).saturating_sub(idle).max(1))
    }

    /// A session's activity is written back when it is this much newer than what the store
    /// has: a minute, or a thirtieth of a shorter timeout. Once a second for every session in
    /// use would cost the store a write per session per second for nothing: the store needs
    /// to know only that the session still lives, not when its last click was.
    fn every(&self, s: &Session) -> u64 {
        (self.table.timeout_ms(s.vp) / 30).clamp(1, 60_000)
    }

    async fn commit(&mut self, s: &Arc<Session>, owner: &User, reservation: Option<&Reservation>) {
        if s.state() != State::Live {
            return;
        }
        let (name, key) = (owner_name(owner), store::session_key(&s.id));
        let (ids, attributes) = {
            let m = s.meta();
            (m.devices.clone(), m.cookie_attributes.clone())
        };
        let sealed = self
            .c
            .sealer
            .as_ref()
            .map(|k| k.seal(&key, &s.id))
            .unwrap_or_default();
        let devices: Vec<(String, String)> = ids
            .iter()
            .map(|d| {
                let device = store::device_key(*d);
                let tag = self.c.link_tag(&key, &device);
                (device, tag)
            })
            .collect();
        let now = self.table.now_ms();
        let record = NewSession {
            owner: &name,
            session: &key,
            node: &s.node,
            vp: self.prefixes.get(s.vp).map_or("", |p| p.as_str()),
            lives: self.lives(s, now),
            devices: &devices,
            sealed: &sealed,
            attributes: &attributes,
        };
        if self
            .call("commit", self.c.store.commit(reservation, &record))
            .await
            .is_none()
        {
            self.resync = true;
            self.last = None;
        } else {
            self.written
                .insert(Arc::as_ptr(s) as usize, s.last_active_ms());
            self.last = Some((s.clone(), owner.key.clone(), ids));
        }
    }

    /// Whether the last commit wrote `s` with `owner` (and `device`) already.
    fn written(&self, s: &Arc<Session>, owner: &User, device: Option<u128>) -> bool {
        self.last.as_ref().is_some_and(|(l, o, ids)| {
            Arc::ptr_eq(l, s) && *o == owner.key && device.is_none_or(|d| ids.contains(&d))
        })
    }

    async fn apply(&mut self, change: Change) {
        if !self.c.is_up() {
            // Made, owned and linked sessions are all written by the re-synchronisation.
            if let Change::Ended { owner, value } = change {
                if self.pending_ends.len() < MAX_PENDING_ENDS {
                    self.pending_ends
                        .push((owner_name(&owner), store::session_key(&value)));
                }
            }
            self.resync = true;
            return;
        }
        match change {
            Change::Owned(s) => {
                if let Some(owner) = s.owner() {
                    if !self.written(&s, &owner, None) {
                        self.commit(&s, &owner, None).await;
                    }
                }
            }
            Change::Made(s, user, r, done) => {
                // The owner Qlik names later wins (`Owned`); until then the user the slot was
                // reserved for is the best the guard knows.
                let owner = s.owner().unwrap_or(user);
                self.commit(&s, &owner, Some(&r)).await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Change::Ended { owner, value } => {
                let (name, key) = (owner_name(&owner), store::session_key(&value));
                if self
                    .call("end", self.c.store.end(&name, &key))
                    .await
                    .is_none()
                {
                    self.pending_ends.push((name, key));
                }
            }
            Change::Linked(s, device) => {
                let owner = s.owner();
                if owner
                    .as_ref()
                    .is_some_and(|o| self.written(&s, o, Some(device)))
                {
                    return;
                }
                if s.state() == State::Live && owner.is_some() {
                    let key = store::session_key(&s.id);
                    let device = store::device_key(device);
                    let tag = self.c.link_tag(&key, &device);
                    self.call("link", self.c.store.link(&key, &device, &tag))
                        .await;
                }
            }
        }
    }

    /// Once a second: probe a down store; write what is owed to one that answers (ends kept
    /// while it was down, every live session after an outage or into a store that lost them),
    /// then the activity since the last flush.
    async fn flush(&mut self) {
        let Some(fresh) = self.call("mark", self.c.store.mark()).await else {
            return;
        };
        if fresh || self.resync {
            if fresh {
                tracing::info!(guard = %self.c.name, "the cluster store has nothing of this guard yet (first start, or a store restarted empty): writing its live sessions");
            }
            self.resync = false;
            for (name, key) in std::mem::take(&mut self.pending_ends) {
                if self
                    .call("end", self.c.store.end(&name, &key))
                    .await
                    .is_none()
                {
                    self.resync = true;
                    return;
                }
            }
            let now = self.table.now_ms();
            for s in self.table.all() {
                if !self.table.is_live(&s, now) {
                    continue;
                }
                if let Some(owner) = s.owner() {
                    self.commit(&s, &owner, None).await;
                    if self.resync {
                        return;
                    }
                }
            }
        }
        self.touch().await;
    }

    /// The activity of the sessions in use that the store has not been told of for
    /// [`Writer::every`], in batches.
    async fn touch(&mut self) {
        let now = self.table.now_ms();
        let mut written = HashMap::with_capacity(self.written.len());
        let mut due: Vec<(Arc<Session>, String, String)> = Vec::new();
        for s in self.table.all() {
            if !self.table.is_live(&s, now) {
                continue;
            }
            let addr = Arc::as_ptr(&s) as usize;
            let told = self.written.get(&addr).copied().unwrap_or(0);
            let active = s.last_active_ms();
            if active > told + self.every(&s) {
                if let Some(owner) = s.owner() {
                    let key = store::session_key(&s.id);
                    due.push((s, owner_name(&owner), key));
                    written.insert(addr, active);
                    continue;
                }
            }
            written.insert(addr, told);
        }
        // Sessions gone from the table are forgotten here too.
        self.written = written;
        for chunk in due.chunks(TOUCH_BATCH) {
            let batch: Vec<Touch<'_>> = chunk
                .iter()
                .map(|(s, owner, key)| Touch {
                    user: owner,
                    session: key,
                    lives: self.lives(s, now),
                })
                .collect();
            if self
                .call("touch", self.c.store.touch(&batch))
                .await
                .is_none()
            {
                self.resync = true;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_through_the_store() {
        let u = User::new("DIR", "Ann");
        let back = owner_of(&owner_name(&u)).unwrap();
        assert_eq!(
            (back.key.as_ref(), back.dir.as_ref(), back.id.as_ref()),
            ("dir\\ann", "DIR", "Ann")
        );
        assert!(owner_of("no-backslash").is_none());
        assert!(owner_of("\\id").is_none());
        assert!(owner_of("dir\\").is_none());
    }

    #[test]
    fn store_keys_hide_what_they_stand_for() {
        let k = store::session_key("3f2a9c1e-0000-4000-8000-123456789abc");
        assert_eq!(k.len(), 32);
        assert!(!k.contains("3f2a9c1e"));
        assert_eq!(
            k,
            store::session_key("3f2a9c1e-0000-4000-8000-123456789abc")
        );
        assert_ne!(
            k,
            store::session_key("3f2a9c1e-0000-4000-8000-123456789abd")
        );
        assert_ne!(store::device_key(1), store::device_key(2));
    }
}
