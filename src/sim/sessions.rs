//! The in-memory session table of one simulated QPS node: sessions, tickets, pending
//! Windows-authentication targets, counters and the request log.
//!
//! Everything sits behind one mutex (simplicity beats speed in a test referee). The rules that
//! make Qlik hurt are enforced here in one place: the per-user limit is counted across all
//! virtual proxies, tickets and targets are single use and short lived, and a session ends after
//! the inactivity timeout unless an engine WebSocket is open on it. Ending a session tells its
//! engine WebSockets why through a watch channel, so they can send the matching notification.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::http::{guid, token};
use super::{SimCounters, SimRequest};

/// How long a ticket (and a pending Windows-auth target id) may wait to be used.
pub(crate) const TICKET_LIFETIME: Duration = Duration::from_secs(60);
/// How many requests `last_request` can look back over.
const REQUEST_LOG_LEN: usize = 256;

/// A user as `UserDirectory\UserId`; Qlik compares both case-insensitively.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct User {
    pub dir: String,
    pub id: String,
}

impl User {
    /// Parses `DIRECTORY\userid` the way header authentication demands it: US-ASCII,
    /// printable, exactly one backslash, both parts non-empty.
    pub(crate) fn parse(s: &[u8]) -> Option<User> {
        if !s.iter().all(|b| (0x20..0x7f).contains(b)) {
            return None;
        }
        let s = std::str::from_utf8(s).ok()?;
        let (dir, id) = s.split_once('\\')?;
        if dir.is_empty() || id.is_empty() || id.contains('\\') {
            return None;
        }
        Some(User {
            dir: dir.to_string(),
            id: id.to_string(),
        })
    }

    /// Any non-empty directory and id without backslashes or control characters; for names
    /// that arrive through the REST API or the simulator's own accessors, which Qlik does not
    /// restrict to US-ASCII.
    pub(crate) fn lenient(s: &str) -> Option<User> {
        let (dir, id) = s.split_once('\\')?;
        User::from_parts(dir, id)
    }

    pub(crate) fn from_parts(dir: &str, id: &str) -> Option<User> {
        let ok = |p: &str| !p.is_empty() && !p.contains('\\') && !p.chars().any(char::is_control);
        if ok(dir) && ok(id) {
            Some(User {
                dir: dir.to_string(),
                id: id.to_string(),
            })
        } else {
            None
        }
    }

    /// The key the limit is counted under.
    pub(crate) fn key(&self) -> String {
        format!("{}\\{}", self.dir.to_lowercase(), self.id.to_lowercase())
    }
}

/// Why a session ended; decides the engine notification and the counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EndReason {
    /// `DELETE /qps/user` through the virtual proxy.
    LoggedOut,
    /// `DELETE` on the QPS REST API.
    ClosedByApi,
    /// Inactivity timeout.
    TimedOut,
    /// Header authentication presented a different user than the session's.
    Replaced,
}

impl EndReason {
    /// The JSON-RPC method the engine WebSocket receives before it is closed.
    pub(crate) fn notification(self) -> &'static str {
        match self {
            EndReason::LoggedOut => "OnSessionLoggedOut",
            EndReason::ClosedByApi | EndReason::Replaced => "OnSessionClosed",
            EndReason::TimedOut => "OnSessionTimedOut",
        }
    }
}

pub(crate) struct Session {
    pub vp: usize,
    pub user: User,
    last_activity: Instant,
    /// Open engine WebSockets; while non-zero the session cannot time out.
    ws_open: usize,
    ended: watch::Sender<Option<EndReason>>,
}

/// A copy of a session's identity, handed out so nobody holds the lock while answering.
#[derive(Clone, Debug)]
pub(crate) struct SessionInfo {
    pub id: String,
    pub user: User,
}

struct Ticket {
    vp: usize,
    user: User,
    expires: Instant,
}

struct Target {
    vp: usize,
    path_and_query: String,
    expires: Instant,
}

/// Why a session could not be created.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CreateError {
    /// The user already has `max_sessions_per_user` live sessions.
    Limit,
    /// A session with the requested id exists already (REST API `POST .../session`).
    Duplicate,
}

pub(crate) struct State {
    sessions: HashMap<String, Session>,
    tickets: HashMap<String, Ticket>,
    targets: HashMap<String, Target>,
    pub counters: SimCounters,
    requests: VecDeque<SimRequest>,
    /// What the QPS REST API listener received, in order.
    api_requests: VecDeque<SimRequest>,
    max_per_user: usize,
    timeouts: Vec<Duration>,
}

impl State {
    pub(crate) fn new(max_per_user: usize, timeouts: Vec<Duration>) -> State {
        State {
            sessions: HashMap::new(),
            tickets: HashMap::new(),
            targets: HashMap::new(),
            counters: SimCounters::default(),
            requests: VecDeque::new(),
            api_requests: VecDeque::new(),
            max_per_user,
            timeouts,
        }
    }

    fn timeout(&self, vp: usize) -> Duration {
        self.timeouts
            .get(vp)
            .copied()
            .unwrap_or(Duration::from_secs(30 * 60))
    }

    pub(crate) fn record(&mut self, req: SimRequest) {
        self.counters.requests += 1;
        if self.requests.len() >= REQUEST_LOG_LEN {
            self.requests.pop_front();
        }
        self.requests.push_back(req);
    }

    pub(crate) fn record_api(&mut self, req: SimRequest) {
        if self.api_requests.len() >= REQUEST_LOG_LEN {
            self.api_requests.pop_front();
        }
        self.api_requests.push_back(req);
    }

    pub(crate) fn api_requests(&self) -> Vec<SimRequest> {
        self.api_requests.iter().cloned().collect()
    }

    pub(crate) fn last_request(&self, prefix: &str) -> Option<SimRequest> {
        self.requests
            .iter()
            .rev()
            .find(|r| r.path_and_query.starts_with(prefix))
            .cloned()
    }

    /// Ends every session idle for its virtual proxy's timeout and drops stale tickets and
    /// targets. Called by the sweeper and before every decision that depends on liveness, so
    /// an expired session never counts, even between two sweeps.
    pub(crate) fn expire(&mut self, now: Instant) {
        let due: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.ws_open == 0 && now.duration_since(s.last_activity) >= self.timeout(s.vp)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.end(&id, EndReason::TimedOut);
        }
        self.tickets.retain(|_, t| t.expires > now);
        self.targets.retain(|_, t| t.expires > now);
    }

    /// The live session `id` of virtual proxy `vp`, its activity refreshed; `None` if the id is
    /// unknown, expired or belongs to another virtual proxy.
    pub(crate) fn touch(&mut self, vp: usize, id: &str, now: Instant) -> Option<SessionInfo> {
        self.expire(now);
        let s = self.sessions.get_mut(id)?;
        if s.vp != vp {
            return None;
        }
        s.last_activity = now;
        Some(SessionInfo {
            id: id.to_string(),
            user: s.user.clone(),
        })
    }

    /// Refreshes activity without the vp check; used by engine WebSocket traffic.
    pub(crate) fn activity(&mut self, id: &str, now: Instant) {
        if let Some(s) = self.sessions.get_mut(id) {
            s.last_activity = now;
        }
    }

    pub(crate) fn get(&mut self, vp: usize, id: &str, now: Instant) -> Option<SessionInfo> {
        self.expire(now);
        self.sessions
            .get(id)
            .filter(|s| s.vp == vp)
            .map(|s| SessionInfo {
                id: id.to_string(),
                user: s.user.clone(),
            })
    }

    /// Sessions of one virtual proxy, optionally only those of `user`, sorted by id so API
    /// answers are stable.
    pub(crate) fn list(
        &mut self,
        vp: usize,
        user: Option<&User>,
        now: Instant,
    ) -> Vec<SessionInfo> {
        self.expire(now);
        let key = user.map(User::key);
        let mut v: Vec<SessionInfo> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.vp == vp)
            .filter(|(_, s)| key.as_ref().is_none_or(|k| &s.user.key() == k))
            .map(|(id, s)| SessionInfo {
                id: id.clone(),
                user: s.user.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Live sessions of a user across all virtual proxies (what the limit counts).
    pub(crate) fn count_user(&mut self, user: &User, now: Instant) -> usize {
        self.expire(now);
        let key = user.key();
        self.sessions
            .values()
            .filter(|s| s.user.key() == key)
            .count()
    }

    pub(crate) fn ids_of_user(&mut self, user: &User, now: Instant) -> Vec<String> {
        self.expire(now);
        let key = user.key();
        let mut v: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.user.key() == key)
            .map(|(id, _)| id.clone())
            .collect();
        v.sort();
        v
    }

    /// Creates a session unless the user is at the limit (counted across all virtual proxies);
    /// a refusal is counted in `limit_refusals`.
    pub(crate) fn create(
        &mut self,
        vp: usize,
        user: &User,
        id: Option<String>,
        now: Instant,
    ) -> Result<SessionInfo, CreateError> {
        if self.count_user(user, now) >= self.max_per_user {
            self.counters.limit_refusals += 1;
            return Err(CreateError::Limit);
        }
        let id = match id {
            Some(id) if self.sessions.contains_key(&id) => return Err(CreateError::Duplicate),
            Some(id) => id,
            None => guid(),
        };
        super::secrets::note_issued(&id);
        let (ended, _) = watch::channel(None);
        self.sessions.insert(
            id.clone(),
            Session {
                vp,
                user: user.clone(),
                last_activity: now,
                ws_open: 0,
                ended,
            },
        );
        self.counters.sessions_created += 1;
        Ok(SessionInfo {
            id,
            user: user.clone(),
        })
    }

    /// Ends a session, counts it by reason and tells its engine WebSockets.
    pub(crate) fn end(&mut self, id: &str, reason: EndReason) -> Option<SessionInfo> {
        let s = self.sessions.remove(id)?;
        match reason {
            EndReason::LoggedOut => self.counters.logouts += 1,
            EndReason::ClosedByApi => self.counters.sessions_ended_by_api += 1,
            EndReason::TimedOut => self.counters.sessions_timed_out += 1,
            EndReason::Replaced => {}
        }
        // send_replace stores the value even when no WebSocket is listening.
        s.ended.send_replace(Some(reason));
        Some(SessionInfo {
            id: id.to_string(),
            user: s.user,
        })
    }

    /// Registers an engine WebSocket on a live session; returns the receiver that learns why
    /// the session ended. Counted in `websockets_opened`/`websockets_open`.
    pub(crate) fn ws_open(
        &mut self,
        id: &str,
        now: Instant,
    ) -> Option<watch::Receiver<Option<EndReason>>> {
        let s = self.sessions.get_mut(id)?;
        s.ws_open += 1;
        s.last_activity = now;
        self.counters.websockets_opened += 1;
        self.counters.websockets_open += 1;
        Some(s.ended.subscribe())
    }

    /// Undoes `ws_open`; the inactivity clock restarts from the moment the socket closed.
    pub(crate) fn ws_closed(&mut self, id: &str, now: Instant) {
        self.counters.websockets_open = self.counters.websockets_open.saturating_sub(1);
        if let Some(s) = self.sessions.get_mut(id) {
            s.ws_open = s.ws_open.saturating_sub(1);
            s.last_activity = now;
        }
    }

    /// Remembers where a Windows-auth redirect came from; returns the target id.
    pub(crate) fn new_target(&mut self, vp: usize, path_and_query: String, now: Instant) -> String {
        let id = guid();
        self.targets.insert(
            id.clone(),
            Target {
                vp,
                path_and_query,
                expires: now + TICKET_LIFETIME,
            },
        );
        id
    }

    /// The original path of a pending target of `vp`, without consuming it (a 401 challenge
    /// must leave it usable for the browser's retry).
    pub(crate) fn peek_target(&mut self, vp: usize, id: &str, now: Instant) -> Option<String> {
        self.expire(now);
        self.targets
            .get(id)
            .filter(|t| t.vp == vp)
            .map(|t| t.path_and_query.clone())
    }

    pub(crate) fn consume_target(&mut self, id: &str) {
        self.targets.remove(id);
    }

    pub(crate) fn issue_ticket(&mut self, vp: usize, user: &User, now: Instant) -> String {
        let t = token(16);
        self.tickets.insert(
            t.clone(),
            Ticket {
                vp,
                user: user.clone(),
                expires: now + TICKET_LIFETIME,
            },
        );
        t
    }

    /// Redeems a ticket once; a ticket is only good on the virtual proxy it was issued for.
    pub(crate) fn redeem_ticket(&mut self, vp: usize, ticket: &str, now: Instant) -> Option<User> {
        self.expire(now);
        if self.tickets.get(ticket).is_some_and(|t| t.vp == vp) {
            let t = self.tickets.remove(ticket)?;
            self.counters.tickets_redeemed += 1;
            Some(t.user)
        } else {
            None
        }
    }

    /// Shortest inactivity timeout, to pace the sweeper.
    pub(crate) fn min_timeout(&self) -> Duration {
        self.timeouts
            .iter()
            .copied()
            .min()
            .unwrap_or(Duration::from_secs(30 * 60))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_parsing() {
        assert_eq!(
            User::parse(b"DIR\\bob"),
            Some(User {
                dir: "DIR".into(),
                id: "bob".into()
            })
        );
        for bad in [
            &b"DIR"[..],
            b"\\bob",
            b"DIR\\",
            b"A\\b\\c",
            b"D\xc3\xa9\\x",
            b"D\\x\x01",
        ] {
            assert_eq!(User::parse(bad), None, "{:?}", bad);
        }
        assert_eq!(
            User::parse(b"Dir\\Bob").map(|u| u.key()),
            Some("dir\\bob".into())
        );
    }

    #[tokio::test]
    async fn limit_counts_across_vps_and_expiry_frees() {
        let mut st = State::new(2, vec![Duration::from_millis(50), Duration::from_secs(60)]);
        let u = User::parse(b"D\\u").expect("valid user");
        let now = Instant::now();
        assert!(st.create(0, &u, None, now).is_ok());
        assert!(st.create(1, &u, None, now).is_ok());
        assert_eq!(st.create(1, &u, None, now).err(), Some(CreateError::Limit));
        assert_eq!(st.counters.limit_refusals, 1);
        // The vp-0 session times out, freeing one slot.
        let later = now + Duration::from_millis(60);
        assert!(st.create(1, &u, None, later).is_ok());
        assert_eq!(st.counters.sessions_timed_out, 1);
    }
}
