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
}

impl Dance {
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

/// The flights of every browser.
pub struct Flights {
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

    /// Drops flights past their deadline; returns them (their reservations are to release).
    pub fn sweep(&self) -> Vec<Arc<Flight>> {
        let now = Instant::now();
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
}
