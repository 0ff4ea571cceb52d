//! Finding the node of a session cookie the guard does not know, before it is forwarded.
//!
//! A Qlik session lives in one node's memory. A guard that restarted without its snapshot (or
//! sees a session made behind its back) would send such a cookie wherever balancing points,
//! and a node that does not know it makes a new session: every user on the other nodes loses
//! theirs. With several nodes the guard asks each node's Personal API (`GET /<prefix>/qps/user`
//! with the cookie, in the `Cookie` header only, never in a URL), all at once; the node that
//! names the owner is the session's node, and the session is adopted into the table, which is
//! where the answer is kept. A cookie no node knows is remembered as such for a while in a
//! fixed-size cache, so a browser that keeps sending it is not looked up again and again.
//!
//! Bounds: only values shaped like a Qlik session id are looked up; lookups share the
//! guard's owner-lookup permits (32 in flight; without a permit the cookie goes on as before,
//! unlocated); requests with the same cookie wait for one lookup; the negative cache is a
//! fixed array. So a flood of made-up cookies costs at most 32 lookups at a time and no memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::OnceCell;

use super::identity::User;
use super::table::Session;
use super::{default_attributes, Context, SessionGuard, MAX_DEVICES_PER_SESSION};
use crate::qps::{self, Owner};

/// Entries of the cache of cookies no node knew (direct-mapped: a newer value takes an older
/// one's place).
const NOT_FOUND_SLOTS: usize = 4096;

/// How long "no node knows it" is believed: a session id no node knows will not become known
/// (Qlik makes new ids), so this only bounds how stale a wrong answer (a node that was down)
/// can be.
const NOT_FOUND_FOR: Duration = Duration::from_secs(300);

/// The longest the nodes are given to answer together: a node that is down must not hold a
/// browser's request for the API client's whole timeout.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// Lookups in progress (one per cookie value) and the cookies no node knew.
pub(crate) struct Locator {
    running: Lookups,
    /// Per slot: the keyed hash of a value no node knew, and until when (table clock, ms).
    not_found: Box<[(AtomicU64, AtomicU64)]>,
    key: [u8; 32],
}

impl Locator {
    pub(crate) fn new() -> Locator {
        Locator {
            running: DashMap::new(),
            not_found: (0..NOT_FOUND_SLOTS)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            key: rand::random(),
        }
    }

    fn slot(&self, vp: usize, value: &str) -> (usize, u64) {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&(vp as u64).to_le_bytes());
        h.update(value.as_bytes());
        let b = h.finalize();
        let v = u64::from_le_bytes(b.as_bytes()[..8].try_into().unwrap_or([0; 8])) | 1;
        ((v >> 32) as usize % NOT_FOUND_SLOTS, v)
    }

    fn known_missing(&self, vp: usize, value: &str, now: u64) -> bool {
        let (i, h) = self.slot(vp, value);
        let (hash, until) = &self.not_found[i];
        hash.load(Ordering::Relaxed) == h && until.load(Ordering::Relaxed) > now
    }

    fn remember_missing(&self, vp: usize, value: &str, until: u64) {
        let (i, h) = self.slot(vp, value);
        self.not_found[i].0.store(h, Ordering::Relaxed);
        self.not_found[i].1.store(until, Ordering::Relaxed);
    }
}

/// A lookup in progress, forgotten when its leader is done with it.
struct Running<'a> {
    map: &'a Lookups,
    key: (usize, Box<str>),
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.map.remove(&self.key);
    }
}

type Lookups = DashMap<(usize, Box<str>), Arc<OnceCell<Option<Arc<Session>>>>>;

impl SessionGuard {
    /// The session an unknown cookie names, found on its node and adopted; `None` when there
    /// is one node (nothing to choose), the value is not shaped like a session id, the table
    /// already has it (dead, or waiting for its owner), no node knows it, Qlik names a user
    /// other than the identity header's, or no lookup could be started.
    pub(super) async fn locate(
        self: &Arc<Self>,
        ctx: &Context,
        value: &str,
    ) -> Option<Arc<Session>> {
        if self.nodes.load().len() < 2 || !qps::is_session_id(value) {
            return None;
        }
        let now = self.table.now_ms();
        if self.table.get(ctx.vp, value).is_some() || self.locator.known_missing(ctx.vp, value, now)
        {
            return None;
        }
        let key = (ctx.vp, Box::<str>::from(value));
        let existing = self.locator.running.get(&key).map(|c| c.clone());
        let cell = match existing {
            Some(c) => c,
            None => {
                // Only a request that gets a permit starts a lookup; the others with the same
                // cookie wait for it.
                let permit = self.lookups.clone().try_acquire_owned().ok()?;
                let cell = self.locator.running.entry(key.clone()).or_default().clone();
                // Gone from `running` however this request ends (answered, or dropped midway:
                // a waiter then finishes the lookup).
                let _running = Running {
                    map: &self.locator.running,
                    key,
                };
                let found = cell
                    .get_or_init(|| self.find_node(ctx, value))
                    .await
                    .clone();
                drop(permit);
                return self.adopted_for(ctx, found);
            }
        };
        let found = cell
            .get_or_init(|| self.find_node(ctx, value))
            .await
            .clone();
        self.adopted_for(ctx, found)
    }

    /// The located session, if this request may go with it: the identity header, when there
    /// is one, must name its owner.
    fn adopted_for(&self, ctx: &Context, s: Option<Arc<Session>>) -> Option<Arc<Session>> {
        let s = s?;
        match (&ctx.identity, s.owner()) {
            (Some(i), Some(o)) if i.key != o.key => None,
            _ => Some(s),
        }
    }

    /// Asks every node at once; the first that names an owner holds the session.
    async fn find_node(&self, ctx: &Context, value: &str) -> Option<Arc<Session>> {
        let info = &self.vps[ctx.vp];
        let nodes = self.nodes.load_full();
        let host = ctx.host.as_ref();
        let mut asks: FuturesUnordered<_> = nodes
            .iter()
            .map(|(name, apis)| async move {
                let r = self
                    .personal
                    .owner(&apis.uri, &info.prefix, host, &info.cookie, value)
                    .await;
                (name.clone(), r)
            })
            .collect();
        let (mut all_said_no, mut found) = (true, None::<(Arc<str>, User)>);
        let ask = async {
            while let Some((node, r)) = asks.next().await {
                match r {
                    Ok(Owner::User(u)) => {
                        found = Some((node, u));
                        return;
                    }
                    Ok(Owner::Inactive) => {}
                    Err(e) => {
                        all_said_no = false;
                        tracing::warn!(upstream = %node, "cannot ask the node whether it holds a session the guard does not know: {e}");
                    }
                }
            }
        };
        if tokio::time::timeout(LOOKUP_TIMEOUT, ask).await.is_err() {
            all_said_no = false;
        }
        let Some((node, owner)) = found else {
            if all_said_no {
                let until = self.table.now_ms() + NOT_FOUND_FOR.as_millis() as u64;
                self.locator.remember_missing(ctx.vp, value, until);
            }
            return None;
        };
        if ctx.identity.as_ref().is_some_and(|i| i.key != owner.key) {
            // Qlik says the cookie is someone else's than the header says: not this request's
            // session, and not adopted on its word.
            return None;
        }
        let s = self.table.insert(
            ctx.vp,
            value,
            node.clone(),
            None,
            Some(owner),
            default_attributes(ctx.tls),
        );
        if let Some(h) = &ctx.host {
            s.meta().host = Some(h.clone());
        }
        if ctx.device_trusted && !ctx.new_device && s.meta().devices.len() < MAX_DEVICES_PER_SESSION
        {
            self.table.link_device(&s, ctx.device);
        }
        self.counters.adopted.fetch_add(1, Ordering::Relaxed);
        tracing::info!(session = %s.hash, user = %super::owner_text(&s), vp = %info.prefix, upstream = %node, "a session the guard did not know was found on its node and adopted");
        Some(s)
    }
}
