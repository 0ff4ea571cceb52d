//! Session (re)creation in flight, one per browser and virtual proxy.
//!
//! When a page whose cookie is dead fires ten requests at once, Qlik re-authenticates each one
//! and each can make a session: one page load burns the user's five. So while one request of a
//! browser is (re)establishing its session on a virtual proxy, the browser's other requests
//! that would do the same wait (bounded by `sessions.burst_wait`) and then go with the session
//! the first one got.
//!
//! A flight spans the whole login dance: the first request without a live cookie, Qlik's
//! redirect to the authentication module (`targetId`), the ticket redirect, and the response
//! that finally sets the cookie. Other requests of the burst that were already redirected to
//! the authentication module are held there and then sent back to the page they asked for.
//!
//! A flight that made a session is remembered a while after it ends, as a [`Landing`]. A
//! browser's requests follow their redirects each on its own clock, sharing one cookie jar:
//! a request of the burst may reach the authentication module, or come back with its ticket,
//! only after the first login has ended, with the dead cookie or already with the new one.
//! Forwarded, Qlik would issue it a ticket, and each ticket makes a session. The landing is
//! what lets the guard answer such a late step itself: the session its browser already has,
//! and the page the request had asked for.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::watch;

use super::identity::User;
use super::table::{DeviceId, Session};

/// How a flight ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Pending,
    /// The session the flight made (or found live).
    Session(Arc<Session>),
    /// It made none (an error page, a refused login, a timeout).
    Failed,
}

/// Targets remembered per login dance. A real burst has a handful of requests; the cap is what
/// keeps one browser (or one made-up device cookie) from storing thousands.
pub const MAX_TARGETS: usize = 16;

/// Dead session cookies remembered per login dance: a burst carries one (a page's requests
/// share the browser's jar), a few if the jar changed while it started.
pub const MAX_REPLACED: usize = 4;

/// The longest target remembered. Qlik's hub and app URLs are far shorter; a longer one is not
/// stored, and its held login is sent to the hub instead of back to it.
pub const MAX_TARGET_LEN: usize = 2048;

/// The login dance as the guard saw it.
#[derive(Debug, Default)]
pub struct Dance {
    /// The `targetId` of the leader's redirect to the authentication module.
    pub leader_target: Option<String>,
    /// `targetId` -> the path and query the request had asked for.
    pub targets: HashMap<String, String>,
    /// The slot this flight holds in its user's count, when the user is known.
    pub reservation: Option<(User, u64)>,
    /// The node the login dance runs on: its `targetId` and ticket exist only there.
    pub node: Option<std::sync::Arc<str>>,
    /// The user whose NTLM Type 3 Qlik accepted in this dance, when the limit was not
    /// checked for that user at its start (a browser the guard did not know): checked at the
    /// ticket, before Qlik makes the session.
    pub windows_user: Option<User>,
    /// The ticket Qlik answered that user's Type 3 with.
    pub ticket: Option<Box<str>>,
    /// The dead session cookies the burst's requests carried when Qlik sent them to log in:
    /// only a request carrying one of them is a late step of this burst.
    replaced: Vec<Box<str>>,
}

impl Dance {
    /// Remembers a dead session cookie a request of this burst carried.
    pub fn remember_replaced(&mut self, value: &str) {
        if self.replaced.len() < MAX_REPLACED && !self.replaced.iter().any(|v| **v == *value) {
            self.replaced.push(value.into());
        }
    }

    /// Remembers the page a login step asked for, within [`MAX_TARGETS`] and
    /// [`MAX_TARGET_LEN`]; false when it was not kept (its browser goes to the hub instead).
    pub fn remember_target(&mut self, target_id: String, target: &str) -> bool {
        if target.len() > MAX_TARGET_LEN || target_id.len() > MAX_TARGET_LEN {
            return false;
        }
        if self.targets.len() >= MAX_TARGETS && !self.targets.contains_key(&target_id) {
            return false;
        }
        self.targets.insert(target_id, target.to_string());
        true
    }
}

#[derive(Debug)]
pub struct Flight {
    pub id: u64,
    pub deadline: Instant,
    pub dance: Mutex<Dance>,
    outcome: watch::Sender<Outcome>,
}

impl Flight {
    pub fn dance(&self) -> std::sync::MutexGuard<'_, Dance> {
        self.dance.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `wait` for the outcome.
    pub async fn wait(&self, wait: Duration) -> Outcome {
        let mut rx = self.outcome.subscribe();
        let done = tokio::time::timeout(wait, async {
            loop {
                if !matches!(*rx.borrow_and_update(), Outcome::Pending) {
                    return rx.borrow().clone();
                }
                if rx.changed().await.is_err() {
                    return Outcome::Failed;
                }
            }
        })
        .await;
        done.unwrap_or(Outcome::Failed)
    }

    fn is_open(&self, now: Instant) -> bool {
        now < self.deadline && matches!(*self.outcome.borrow(), Outcome::Pending)
    }
}

/// What [`Flights::lead`] found.
pub enum Lead {
    /// A new flight: this request leads it.
    Lead(Arc<Flight>),
    /// The browser's open flight: wait for it.
    Wait(Arc<Flight>),
    /// No room for another flight: the request goes on without one (no coalescing).
    Full,
}

/// A flight that ended with a session, for the late steps of its burst (see the module docs).
#[derive(Debug)]
pub struct Landing {
    pub session: Arc<Session>,
    until: Instant,
    /// `targetId` -> the page asked for: the dance's, and those of Qlik's later redirects of
    /// the same burst to the authentication module.
    targets: Mutex<HashMap<String, String>>,
    /// The dance's dead cookies ([`Dance::remember_replaced`]).
    replaced: Vec<Box<str>>,
}

impl Landing {
    /// Whether `carried` is a cookie this landing's login replaced.
    pub fn replaced(&self, carried: &str) -> bool {
        self.replaced.iter().any(|v| **v == *carried)
    }

    /// The page a login step with this `targetId` had asked for.
    pub fn target(&self, target_id: &str) -> Option<String> {
        let t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        t.get(target_id).cloned()
    }

    /// Remembers the page of a late redirect to the authentication module, within the same
    /// caps as a dance's.
    pub fn remember_target(&self, target_id: String, target: &str) {
        let mut t = self.targets.lock().unwrap_or_else(|e| e.into_inner());
        if target.len() > MAX_TARGET_LEN || target_id.len() > MAX_TARGET_LEN {
            return;
        }
        if t.len() < MAX_TARGETS || t.contains_key(&target_id) {
            t.insert(target_id, target.to_string());
        }
    }
}

/// The flights of every browser.
pub struct Flights {
    /// Flights that made a session, kept a while after they end (at most `max`).
    landed: DashMap<(DeviceId, usize), Arc<Landing>>,
    landed_count: AtomicUsize,
    map: DashMap<(DeviceId, usize), Arc<Flight>>,
    next: std::sync::atomic::AtomicU64,
    /// How long a flight may last before it is abandoned (the login dance included).
    lifetime: Duration,
    /// Entries in `map`, counted apart so that the cap check and the insert are one step
    /// (`DashMap::len` would let concurrent new browsers all see room).
    count: AtomicUsize,
    max: usize,
}

impl Flights {
    /// `max`: the most flights open at once (`sessions.max_flights`). Each unauthenticated
    /// browser can open one, so without a cap a flood of made-up device cookies grows the map
    /// (and each flight's targets) for as long as a flight lives.
    pub fn new(lifetime: Duration, max: usize) -> Flights {
        Flights {
            landed: DashMap::new(),
            landed_count: AtomicUsize::new(0),
            map: DashMap::new(),
            next: std::sync::atomic::AtomicU64::new(1),
            lifetime,
            count: AtomicUsize::new(0),
            max: max.max(1),
        }
    }

    /// The open flight of this browser on this virtual proxy.
    pub fn get(&self, device: DeviceId, vp: usize) -> Option<Arc<Flight>> {
        let f = self.map.get(&(device, vp))?;
        f.is_open(Instant::now()).then(|| f.clone())
    }

    /// Starts a flight, unless one is open (wait for it) or there is no room.
    pub fn lead(&self, device: DeviceId, vp: usize) -> Lead {
        let now = Instant::now();
        match self.map.entry((device, vp)) {
            dashmap::Entry::Occupied(mut e) => {
                if e.get().is_open(now) {
                    return Lead::Wait(e.get().clone());
                }
                // An ended flight not swept yet: its place is reused, the count stays.
                let f = self.make();
                e.insert(f.clone());
                Lead::Lead(f)
            }
            dashmap::Entry::Vacant(e) => {
                let room = self
                    .count
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < self.max).then_some(n + 1)
                    });
                if room.is_err() {
                    return Lead::Full;
                }
                let f = self.make();
                e.insert(f.clone());
                Lead::Lead(f)
            }
        }
    }

    fn make(&self) -> Arc<Flight> {
        let (tx, _) = watch::channel(Outcome::Pending);
        Arc::new(Flight {
            id: self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            deadline: Instant::now() + self.lifetime,
            dance: Mutex::new(Dance::default()),
            outcome: tx,
        })
    }

    /// Ends the browser's flight on this virtual proxy (if it is `flight`, or any when None)
    /// and wakes its waiters. Returns the ended flight.
    pub fn finish(
        &self,
        device: DeviceId,
        vp: usize,
        only: Option<u64>,
        outcome: Outcome,
    ) -> Option<Arc<Flight>> {
        let (_, f) = self
            .map
            .remove_if(&(device, vp), |_, f| only.is_none_or(|id| f.id == id))?;
        self.count.fetch_sub(1, Ordering::AcqRel);
        f.outcome.send_replace(outcome);
        Some(f)
    }

    /// Remembers for `window` that `flight` (this browser's, now ended) made `session`: its
    /// burst's late steps find it with [`Flights::landing`].
    pub fn land(
        &self,
        device: DeviceId,
        vp: usize,
        flight: &Flight,
        session: Arc<Session>,
        window: Duration,
    ) {
        let (targets, replaced) = {
            let mut d = flight.dance();
            (
                std::mem::take(&mut d.targets),
                std::mem::take(&mut d.replaced),
            )
        };
        let landing = Arc::new(Landing {
            session,
            until: Instant::now() + window,
            targets: Mutex::new(targets),
            replaced,
        });
        self.put_landing((device, vp), landing);
    }

    /// The same landing under the browser's new device id (issued with the session), so a
    /// late step that already carries the new cookies finds the pages asked for too.
    pub fn alias(&self, from: DeviceId, to: DeviceId, vp: usize) {
        if let Some(l) = self.landing(from, vp) {
            self.put_landing((to, vp), l);
        }
    }

    fn put_landing(&self, key: (DeviceId, usize), landing: Arc<Landing>) {
        match self.landed.entry(key) {
            dashmap::Entry::Occupied(mut e) => {
                e.insert(landing);
            }
            dashmap::Entry::Vacant(e) => {
                let room =
                    self.landed_count
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            (n < self.max).then_some(n + 1)
                        });
                if room.is_ok() {
                    e.insert(landing);
                }
            }
        }
    }

    /// This browser's recent landing on this virtual proxy, if any.
    pub fn landing(&self, device: DeviceId, vp: usize) -> Option<Arc<Landing>> {
        let l = self.landed.get(&(device, vp))?;
        (Instant::now() < l.until).then(|| l.clone())
    }

    /// Drops flights past their deadline; returns them (their reservations are to release).
    pub fn sweep(&self) -> Vec<Arc<Flight>> {
        let now = Instant::now();
        let mut landed_gone = 0;
        self.landed.retain(|_, l| {
            let keep = now < l.until;
            landed_gone += usize::from(!keep);
            keep
        });
        self.landed_count.fetch_sub(landed_gone, Ordering::AcqRel);
        let mut gone = Vec::new();
        self.map.retain(|_, f| {
            if f.is_open(now) {
                true
            } else {
                f.outcome.send_replace(Outcome::Failed);
                gone.push(f.clone());
                false
            }
        });
        self.count.fetch_sub(gone.len(), Ordering::AcqRel);
        gone
    }

    /// The targets remembered by all flights: (count, bytes).
    pub fn targets_held(&self) -> (usize, usize) {
        self.map.iter().fold((0, 0), |(n, b), f| {
            let d = f.dance();
            let bytes: usize = d.targets.iter().map(|(k, v)| k.len() + v.len()).sum();
            (n + d.targets.len(), b + bytes)
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leads_the_others_wait_for_its_outcome() {
        let flights = Flights::new(Duration::from_secs(30), 100);
        let Lead::Lead(lead) = flights.lead(1, 0) else {
            panic!("the first leads")
        };
        let Lead::Wait(waiter) = flights.lead(1, 0) else {
            panic!("the second waits")
        };
        assert_eq!(waiter.id, lead.id);
        assert!(
            matches!(flights.lead(2, 0), Lead::Lead(_)),
            "another browser has its own flight"
        );
        assert!(
            matches!(flights.lead(1, 1), Lead::Lead(_)),
            "another virtual proxy too"
        );
        let w = tokio::spawn(async move { waiter.wait(Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        flights.finish(1, 0, Some(lead.id), Outcome::Failed);
        assert!(matches!(w.await.unwrap(), Outcome::Failed));
        assert!(flights.get(1, 0).is_none());
    }

    #[tokio::test]
    async fn waiting_is_bounded_and_old_flights_are_swept() {
        let flights = Flights::new(Duration::from_millis(50), 100);
        let Lead::Lead(lead) = flights.lead(1, 0) else {
            panic!("the first leads")
        };
        assert!(matches!(
            lead.wait(Duration::from_millis(20)).await,
            Outcome::Failed
        ));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(flights.get(1, 0).is_none());
        assert_eq!(flights.sweep().len(), 1);
        assert!(flights.is_empty());
    }

    #[test]
    fn the_number_of_flights_is_capped() {
        let flights = Flights::new(Duration::from_secs(60), 3);
        for d in 0..3 {
            assert!(matches!(flights.lead(d, 0), Lead::Lead(_)));
        }
        assert!(
            matches!(flights.lead(99, 0), Lead::Full),
            "no room: no flight"
        );
        assert!(
            matches!(flights.lead(0, 0), Lead::Wait(_)),
            "an open flight is still found at the cap"
        );
        assert_eq!(flights.len(), 3);
        let f = flights.get(1, 0).unwrap();
        flights.finish(1, 0, Some(f.id), Outcome::Failed);
        assert!(
            matches!(flights.lead(99, 0), Lead::Lead(_)),
            "a finished flight makes room"
        );
        assert!(matches!(flights.lead(100, 0), Lead::Full));
    }

    #[test]
    fn targets_are_capped_in_number_and_length() {
        let mut d = Dance::default();
        assert!(!d.remember_target("long".into(), &"/x".repeat(MAX_TARGET_LEN)));
        for i in 0..MAX_TARGETS * 4 {
            d.remember_target(format!("t{i}"), "/hub/");
        }
        assert_eq!(d.targets.len(), MAX_TARGETS);
        assert!(
            d.remember_target("t0".into(), "/hub/again"),
            "a known id is updated"
        );
    }

    #[tokio::test]
    async fn a_landing_keeps_the_session_and_targets_for_its_window_only() {
        use crate::session::table::Table;
        let table = Table::new(vec![Duration::from_secs(60)], Duration::from_secs(60));
        let s = table.insert(0, "v", "n1".into(), None, None, String::new());
        let flights = Flights::new(Duration::from_secs(60), 2);
        let Lead::Lead(f) = flights.lead(1, 0) else {
            panic!("leads")
        };
        f.dance().remember_target("t1".into(), "/hub/page1");
        for dead in ["d1", "d2", "d1", "d3", "d4", "d5"] {
            f.dance().remember_replaced(dead);
        }
        flights.finish(1, 0, Some(f.id), Outcome::Session(s.clone()));
        flights.land(1, 0, &f, s.clone(), Duration::from_millis(50));
        let l = flights.landing(1, 0).expect("landed");
        assert!(Arc::ptr_eq(&l.session, &s));
        assert_eq!(l.target("t1").as_deref(), Some("/hub/page1"));
        assert!(l.replaced("d1") && l.replaced("d4"));
        assert!(!l.replaced("d5"), "at most {MAX_REPLACED} dead cookies");
        assert!(!l.replaced("v"), "the live one is not a replaced one");
        l.remember_target("t2".into(), "/hub/page2");
        // The browser's new device id finds the same landing.
        flights.alias(1, 7, 0);
        assert_eq!(
            flights.landing(7, 0).unwrap().target("t2").as_deref(),
            Some("/hub/page2")
        );
        assert!(flights.landing(1, 1).is_none(), "per virtual proxy");
        // At most `max` landings.
        flights.alias(1, 8, 0);
        assert!(flights.landing(8, 0).is_none());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(flights.landing(1, 0).is_none(), "the window is over");
        flights.sweep();
        assert!(flights.landed.is_empty());
        flights.alias(1, 8, 0);
        assert_eq!(flights.landed_count.load(Ordering::Acquire), 0);
    }
}
