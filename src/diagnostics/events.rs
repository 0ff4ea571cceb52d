//! Cookie events: every anomaly the guard can see, with its cause, so an ops team can find the
//! box that eats the cookie.
//!
//! Each event is written as a `tracing` line (target `qsguard::event`), counted per kind for
//! the metrics, and kept in a bounded ring (`[diagnostics] events_kept`) that the admin API
//! and `qsguard events` read. Cookie values never appear: only their keyed hashes.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Notify;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The browser sent no session cookie although the guard had set one on this device.
    CookieLost,
    /// The browser sent a session cookie value the guard never issued for this device.
    CookieModified,
    /// The same cookie name twice in one request.
    CookieDuplicated,
    /// Of several cookies set in one response only the first came back.
    SetCookieFolded,
    /// Qlik answered a live cookie with a new one, or sent its browser to log in again.
    SessionReplaced,
    SessionRestored,
    SessionReused,
    SessionEvicted,
    RefusedAtLimit,
    /// Qlik's own "too many sessions active in parallel" (page or engine notification).
    QpsLimitRefusal,
    /// Requests of a browser held while its session was being (re)created.
    BurstHeld,
    /// A Qlik node went down: its sessions are gone (Qlik cannot move them).
    SessionLost,
    /// A call to a node's QPS REST API failed (the node and the operation are in the cause);
    /// the guard fell back to the Personal API where it could.
    QpsApiFailed,
    /// The pair's store (`[cluster]`) did not answer: the guard decides from its own table.
    StoreUnreachable,
    /// The pair's store answers again: the guard wrote its sessions to it.
    StoreBack,
}

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::CookieLost,
        Kind::CookieModified,
        Kind::CookieDuplicated,
        Kind::SetCookieFolded,
        Kind::SessionReplaced,
        Kind::SessionRestored,
        Kind::SessionReused,
        Kind::SessionEvicted,
        Kind::RefusedAtLimit,
        Kind::QpsLimitRefusal,
        Kind::BurstHeld,
        Kind::SessionLost,
        Kind::QpsApiFailed,
        Kind::StoreUnreachable,
        Kind::StoreBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::CookieLost => "cookie_lost",
            Kind::CookieModified => "cookie_modified",
            Kind::CookieDuplicated => "cookie_duplicated",
            Kind::SetCookieFolded => "set_cookie_folded",
            Kind::SessionReplaced => "session_replaced",
            Kind::SessionRestored => "session_restored",
            Kind::SessionReused => "session_reused",
            Kind::SessionEvicted => "session_evicted",
            Kind::RefusedAtLimit => "refused_at_limit",
            Kind::QpsLimitRefusal => "qps_limit_refusal",
            Kind::BurstHeld => "burst_held",
            Kind::SessionLost => "session_lost",
            Kind::QpsApiFailed => "qps_api_failed",
            Kind::StoreUnreachable => "store_unreachable",
            Kind::StoreBack => "store_back",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.as_str() == s)
    }

    fn index(self) -> usize {
        Kind::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }
}

/// Where a request came from, as far as the guard can tell.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Requester {
    pub peer: Option<IpAddr>,
    pub forwarded_for: Option<String>,
    pub via: Option<String>,
    pub user_agent: Option<String>,
}

/// A cookie involved, by name and keyed hash.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CookieRef {
    pub name: String,
    pub hash: String,
}

/// One event.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: u64,
    /// Seconds since the Unix epoch.
    pub time: u64,
    pub kind: Kind,
    pub cause: String,
    pub virtual_proxy: Option<String>,
    pub user: Option<String>,
    /// The device cookie's hash.
    pub device: Option<String>,
    pub client: Requester,
    pub cookies: Vec<CookieRef>,
    /// Names (never values) of cookies set with a session that the browser did not send back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_returned: Vec<String>,
}

/// A new event, before it gets its id and time.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: Kind,
    pub cause: String,
    pub virtual_proxy: Option<String>,
    pub user: Option<String>,
    pub device: Option<String>,
    pub client: Requester,
    pub cookies: Vec<CookieRef>,
    pub not_returned: Vec<String>,
}

impl NewEvent {
    pub fn new(kind: Kind, cause: impl Into<String>) -> NewEvent {
        NewEvent {
            kind,
            cause: cause.into(),
            virtual_proxy: None,
            user: None,
            device: None,
            client: Requester::default(),
            cookies: Vec::new(),
            not_returned: Vec::new(),
        }
    }
}

/// The ring of recent events and the per-kind counts.
pub struct Events {
    ring: Mutex<VecDeque<Event>>,
    capacity: usize,
    next: AtomicU64,
    counts: [AtomicU64; Kind::ALL.len()],
    /// Wakes `qsguard events --follow` long-polls.
    pub notify: Notify,
}

impl Events {
    pub fn new(capacity: usize) -> Events {
        Events {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity: capacity.max(1),
            next: AtomicU64::new(1),
            counts: Default::default(),
            notify: Notify::new(),
        }
    }

    pub fn emit(&self, e: NewEvent) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.counts[e.kind.index()].fetch_add(1, Ordering::Relaxed);
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        tracing::info!(
            target: "qsguard::event",
            kind = e.kind.as_str(),
            cause = %e.cause,
            vp = e.virtual_proxy.as_deref().unwrap_or("-"),
            user = e.user.as_deref().unwrap_or("-"),
            device = e.device.as_deref().unwrap_or("-"),
            client = %e.client.peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            forwarded_for = e.client.forwarded_for.as_deref().unwrap_or("-"),
            via = e.client.via.as_deref().unwrap_or("-"),
            cookies = %e.cookies.iter().map(|c| format!("{}#{}", c.name, c.hash)).collect::<Vec<_>>().join(","),
            not_returned = %e.not_returned.join(","),
        );
        let event = Event {
            id,
            time,
            kind: e.kind,
            cause: e.cause,
            virtual_proxy: e.virtual_proxy,
            user: e.user,
            device: e.device,
            client: e.client,
            cookies: e.cookies,
            not_returned: e.not_returned,
        };
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(event);
        }
        self.notify.notify_waiters();
    }

    pub fn count(&self, kind: Kind) -> u64 {
        self.counts[kind.index()].load(Ordering::Relaxed)
    }

    /// Events after id `since` (0: all kept), filtered, oldest first.
    pub fn query(&self, since: u64, kind: Option<Kind>, user: Option<&str>) -> Vec<Event> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter()
            .filter(|e| e.id > since)
            .filter(|e| kind.is_none_or(|k| e.kind == k))
            .filter(|e| {
                user.is_none_or(|u| e.user.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(u)))
            })
            .cloned()
            .collect()
    }

    pub fn last_id(&self) -> u64 {
        self.next.load(Ordering::Relaxed) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_bounded_and_counts_survive_it() {
        let ev = Events::new(3);
        for i in 0..5 {
            let mut e = NewEvent::new(Kind::CookieLost, format!("#{i}"));
            e.user = Some(if i % 2 == 0 {
                "CORP\\a".into()
            } else {
                "CORP\\b".into()
            });
            ev.emit(e);
        }
        ev.emit(NewEvent::new(Kind::BurstHeld, "x"));
        let all = ev.query(0, None, None);
        assert_eq!(all.len(), 3);
        assert_eq!(all.last().unwrap().id, 6);
        assert_eq!(ev.count(Kind::CookieLost), 5);
        assert_eq!(ev.query(0, Some(Kind::CookieLost), None).len(), 2);
        assert_eq!(ev.query(0, None, Some("corp\\a")).len(), 1);
        assert_eq!(ev.query(5, None, None).len(), 1);
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
    }
}
