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

/// The flights of every browser.
pub struct Flights {
    map: DashMap<(DeviceId, usize), Arc<Flight>>,
    next: std::sync::atomic::AtomicU64,
    /// How long a flight may last before it is abandoned (the login dance included).
    lifetime: Duration,
}

impl Flights {
    pub fn new(lifetime: Duration) -> Flights {
        Flights {
            map: DashMap::new(),
            next: std::sync::atomic::AtomicU64::new(1),
            lifetime,
        }
    }

    /// The open flight of this browser on this virtual proxy.
    pub fn get(&self, device: DeviceId, vp: usize) -> Option<Arc<Flight>> {
        let f = self.map.get(&(device, vp))?;
        f.is_open(Instant::now()).then(|| f.clone())
    }

    /// Starts a flight, unless one is open: `Ok(new)` to lead, `Err(open)` to wait for.
    pub fn lead(&self, device: DeviceId, vp: usize) -> Result<Arc<Flight>, Arc<Flight>> {
        let now = Instant::now();
        match self.map.entry((device, vp)) {
            dashmap::Entry::Occupied(mut e) => {
                if e.get().is_open(now) {
                    return Err(e.get().clone());
                }
                let f = self.make();
                e.insert(f.clone());
                Ok(f)
            }
            dashmap::Entry::Vacant(e) => {
                let f = self.make();
                e.insert(f.clone());
                Ok(f)
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
        gone
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
        let flights = Flights::new(Duration::from_secs(30));
        let lead = flights.lead(1, 0).unwrap();
        let waiter = flights.lead(1, 0).unwrap_err();
        assert_eq!(waiter.id, lead.id);
        assert!(
            flights.lead(2, 0).is_ok(),
            "another browser has its own flight"
        );
        assert!(flights.lead(1, 1).is_ok(), "another virtual proxy too");
        let w = tokio::spawn(async move { waiter.wait(Duration::from_secs(5)).await });
        tokio::task::yield_now().await;
        flights.finish(1, 0, Some(lead.id), Outcome::Failed);
        assert!(matches!(w.await.unwrap(), Outcome::Failed));
        assert!(flights.get(1, 0).is_none());
    }

    #[tokio::test]
    async fn waiting_is_bounded_and_old_flights_are_swept() {
        let flights = Flights::new(Duration::from_millis(50));
        let lead = flights.lead(1, 0).unwrap();
        assert!(matches!(
            lead.wait(Duration::from_millis(20)).await,
            Outcome::Failed
        ));
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(flights.get(1, 0).is_none());
        assert_eq!(flights.sweep().len(), 1);
        assert!(flights.is_empty());
    }
}
