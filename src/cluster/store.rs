//! The session store two guards share, in Redis: per user, the sessions that count towards
//! the limit and the reservations (creations on their way to Qlik); per session, its owner and
//! node, so the other guard can send a browser it has never seen to the node that knows it.
//!
//! Why Lua scripts: a limit check and the reservation it grants must be one step in the store,
//! or two guards read "4 of 5" at once and both reserve. A script runs alone in Redis, and it
//! reads the time from Redis itself (`TIME`), so two guards with clocks apart agree on what has
//! expired. Everything a guard leaves behind expires by itself: a reservation after its TTL (a
//! guard that died mid-login), a session after its inactivity timeout unless activity is
//! written back.
//!
//! Session keys are the keyed hash of the cookie value, never the value: the other guard gets
//! the cookie from the browser anyway, so the store never needs it, and a dump of the store
//! gives no one a session. Every call has a deadline (`store_timeout`): past it the caller
//! decides from its own table.

use std::fmt;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use crate::config::ClusterConfig;

/// Prunes what has expired, counts sessions and reservations; under `max` (ARGV[1]) adds a
/// reservation (ARGV[2]) for ARGV[3] ms. Returns {granted, count before}. With max 0 it only
/// counts.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local n = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2])
local max = tonumber(ARGV[1])
if n >= max then return {0, n} end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[2])
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return {1, n}
"#;

/// A session made (or met) by a guard: its reservation (ARGV[1], may be empty) becomes the
/// session ARGV[2], live for ARGV[3] ms, owned by ARGV[4] on node ARGV[5] through guard ARGV[6],
/// on the virtual proxy ARGV[7], its cookie value sealed ARGV[8] (may be empty) and Qlik's
/// cookie attributes ARGV[9]; ARGV[11..] are pairs of a (hashed) device the guard linked to it
/// and the link's tag, each device indexed under the key prefix ARGV[10] (`d:<device>`: the
/// sessions of a device).
const COMMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[2], ARGV[1]) end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call('HSET', KEYS[3], 'owner', ARGV[4], 'node', ARGV[5], 'guard', ARGV[6], 'vp', ARGV[7], 'a', ARGV[9])
if ARGV[8] ~= '' then redis.call('HSET', KEYS[3], 'v', ARGV[8]) end
for i = 11, #ARGV, 2 do
  redis.call('HSET', KEYS[3], 'd:' .. ARGV[i], ARGV[i + 1])
  local d = ARGV[10] .. 'd:' .. ARGV[i]
  redis.call('SADD', d, ARGV[2])
  if redis.call('PTTL', d) < ttl then redis.call('PEXPIRE', d, ttl) end
end
redis.call('PEXPIRE', KEYS[3], ttl)
return 1
"#;

/// A device (ARGV[1], hashed; the link's tag ARGV[4]) linked to a session (KEYS[1], whose key
/// is ARGV[3]) that is still in the store, and indexed under ARGV[2]: a session ended meanwhile
/// is not brought back as a record without a lifetime.
const LINK: &str = r#"
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('HSET', KEYS[1], 'd:' .. ARGV[1], ARGV[4])
  redis.call('SADD', ARGV[2], ARGV[3])
  if redis.call('PTTL', ARGV[2]) < ttl then redis.call('PEXPIRE', ARGV[2], ttl) end
  return 1
end
return 0
"#;

/// Activity written back: per session, its user's set (KEYS[2i-1]) and record (KEYS[2i]),
/// the session key (ARGV[2i-1]) and how long it now lives (ARGV[2i], ms). Only sessions still
/// in the store are extended (`XX`): one ended meanwhile by the other guard stays ended.
const TOUCH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = 0
for i = 1, #ARGV, 2 do
  local ttl = tonumber(ARGV[i + 1])
  if redis.call('ZSCORE', KEYS[i], ARGV[i]) then
    redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[i])
    if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
    redis.call('PEXPIRE', KEYS[i + 1], ttl)
    n = n + 1
  end
end
return n
"#;

/// Why a store call gave no answer; the caller goes on from its own table either way.
#[derive(Debug)]
pub enum StoreError {
    /// No answer within `store_timeout`.
    Timeout,
    /// Redis or the connection failed (the text is Redis's, which never holds a key's value).
    Redis(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Timeout => write!(f, "the store did not answer in time"),
            StoreError::Redis(e) => write!(f, "the store failed: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<redis::RedisError> for StoreError {
    fn from(e: redis::RedisError) -> Self {
        StoreError::Redis(e.to_string())
    }
}

/// A slot a guard holds in its user's count while a session is made. Its id names the guard,
/// so an operator reading the store sees whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    user: String,
    id: String,
}

/// What the store says of a session one guard made: whose it is and on which node it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub owner: String,
    pub node: String,
    /// The guard that made or met it.
    pub guard: String,
    /// The virtual proxy's prefix.
    pub vp: String,
    /// The hashed device ids a guard of the pair linked to it (see [`device_key`]).
    pub devices: Vec<String>,
    /// Each link's tag (keyed with the pair's secret, `"1"` without one): with a secret, a
    /// device listed without its tag was not linked by a guard.
    pub device_tags: std::collections::HashMap<String, String>,
    /// The cookie value, sealed with the pair's secret (`cluster.secret_file`), if the guards
    /// have one.
    pub sealed: Option<String>,
    /// Qlik's attributes for the cookie (to set it back as Qlik did).
    pub attributes: String,
}

/// A session as [`Store::commit`] records it.
pub struct NewSession<'a> {
    pub owner: &'a str,
    /// The session's key: [`session_key`] of the cookie value.
    pub session: &'a str,
    pub node: &'a str,
    pub vp: &'a str,
    pub lives: Duration,
    /// Hashed device ids ([`device_key`]) and the tags of their links.
    pub devices: &'a [(String, String)],
    /// The cookie value sealed with the pair's secret, or empty.
    pub sealed: &'a str,
    pub attributes: &'a str,
}

/// A record as Redis gives it, if it is one.
fn record_of(fields: &std::collections::HashMap<String, String>) -> Option<SessionRecord> {
    Some(SessionRecord {
        owner: fields.get("owner")?.clone(),
        node: fields.get("node")?.clone(),
        guard: fields.get("guard").cloned().unwrap_or_default(),
        vp: fields.get("vp").cloned().unwrap_or_default(),
        devices: fields
            .keys()
            .filter_map(|k| k.strip_prefix("d:"))
            .map(str::to_string)
            .collect(),
        device_tags: fields
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("d:")?.to_string(), v.clone())))
            .collect(),
        sealed: fields.get("v").filter(|v| !v.is_empty()).cloned(),
        attributes: fields.get("a").cloned().unwrap_or_default(),
    })
}

/// A session's key in the store: a hash of the cookie value. Qlik's session ids are random
/// (128 bits), so the hash is as unguessable as the id and cannot be turned back into it; it
/// is the same on every guard of the pair without a key they would have to share.
pub fn session_key(value: &str) -> String {
    short_hash("qsguard cluster session key v1", value.as_bytes())
}

/// A device id as the store keeps it (the id itself is a browser's secret).
pub fn device_key(device: u128) -> String {
    short_hash("qsguard cluster device key v1", &device.to_be_bytes())
}

/// A user as a key part: names stay out of the keys (an operator listing keys sees no one),
/// and `DIR\Ann` and `dir\ann` are one user (Qlik compares without case).
fn user_part(user: &str) -> String {
    short_hash(
        "qsguard cluster user key v1",
        user.to_lowercase().as_bytes(),
    )
}

fn short_hash(context: &str, input: &[u8]) -> String {
    let h = blake3::Hasher::new_derive_key(context)
        .update(input)
        .finalize();
    h.to_hex()[..32].to_string()
}

/// Activity of one session, written back in a batch.
pub struct Touch<'a> {
    pub user: &'a str,
    pub session: &'a str,
    pub lives: Duration,
}

/// The connection to the shared store (reconnected by the client crate's `ConnectionManager`).
#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    prefix: String,
    guard: String,
    deadline: Duration,
    reserve: Script,
    commit: Script,
    touch: Script,
    link: Script,
}

impl Store {
    /// Does not wait for the store: a guard starts and serves while the store is down, and
    /// the first call that finds it back uses it.
    pub fn new(config: &ClusterConfig) -> Result<Store, StoreError> {
        let client = match &config.ca_file {
            // rediss:// with the CA that signed the store's certificate; without one, the
            // client crate checks it against the system's roots.
            Some(ca) => {
                let root = std::fs::read(ca).map_err(|e| {
                    StoreError::Redis(format!("cannot read cluster.ca_file {}: {e}", ca.display()))
                })?;
                redis::Client::build_with_tls(
                    config.redis_url.as_str(),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(root),
                    },
                )?
            }
            None => redis::Client::open(config.redis_url.as_str())?,
        };
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.store_timeout))
            .set_response_timeout(Some(config.store_timeout))
            // Reconnects are retried by the next call, not in a loop inside this one.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager)?;
        Ok(Store {
            conn,
            prefix: config.key_prefix.clone(),
            guard: config.guard_name(),
            deadline: config.store_timeout,
            reserve: Script::new(RESERVE),
            commit: Script::new(COMMIT),
            touch: Script::new(TOUCH),
            link: Script::new(LINK),
        })
    }

    /// How long a call may take.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Users are compared without case (as Qlik does), so both guards key `DIR\Ann` and
    /// `dir\ann` alike.
    fn user_keys(&self, user: &str) -> (String, String) {
        let user = user_part(user);
        (
            format!("{}u:{user}:s", self.prefix),
            format!("{}u:{user}:r", self.prefix),
        )
    }

    fn session_key(&self, session: &str) -> String {
        format!("{}s:{session}", self.prefix)
    }

    async fn within<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.deadline, call).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Takes a slot for a new session of `user` when the pair's count (live sessions and
    /// reservations through either guard) is under `max`; `None` when the user is at the limit.
    /// The slot is given back by [`Store::commit`] or [`Store::release`], or expires after
    /// `ttl` if this guard dies first.
    pub async fn reserve(
        &self,
        user: &str,
        max: usize,
        ttl: Duration,
    ) -> Result<Option<Reservation>, StoreError> {
        let (sessions, reservations) = self.user_keys(user);
        let id = format!("{}:{:016x}", self.guard, rand::random::<u64>());
        let mut conn = self.conn.clone();
        let (granted, _count): (i64, i64) = self
            .within(
                self.reserve
                    .key(&sessions)
                    .key(&reservations)
                    .arg(max)
                    .arg(&id)
                    .arg(ttl.as_millis().max(1) as u64)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok((granted == 1).then(|| Reservation {
            user: user.to_string(),
            id,
        }))
    }

    /// Sessions and reservations the pair counts for `user` now.
    pub async fn count(&self, user: &str) -> Result<usize, StoreError> {
        let (sessions, reservations) = self.user_keys(user);
        let mut conn = self.conn.clone();
        let (_, count): (i64, i64) = self
            .within(
                self.reserve
                    .key(&sessions)
                    .key(&reservations)
                    .arg(0)
                    .arg("")
                    .arg(1)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(count.max(0) as usize)
    }

    /// A slot given back without a session (the login was abandoned or Qlik refused).
    pub async fn release(&self, reservation: &Reservation) -> Result<(), StoreError> {
        let (_, reservations) = self.user_keys(&reservation.user);
        let mut conn = self.conn.clone();
        let _: i64 = self
            .within(
                redis::cmd("ZREM")
                    .arg(&reservations)
                    .arg(&reservation.id)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// Records a session (`s.session` is the keyed hash of its cookie), live for `s.lives`;
    /// the reservation it was made under, if any, becomes it. A session met without one
    /// (adopted) is recorded the same way.
    pub async fn commit(
        &self,
        reservation: Option<&Reservation>,
        s: &NewSession<'_>,
    ) -> Result<(), StoreError> {
        let (sessions, reservations) = self.user_keys(s.owner);
        let record = self.session_key(s.session);
        let mut conn = self.conn.clone();
        let mut call = self.commit.prepare_invoke();
        call.key(&sessions)
            .key(&reservations)
            .key(&record)
            .arg(reservation.map_or("", |r| r.id.as_str()))
            .arg(s.session)
            .arg(s.lives.as_millis().max(1) as u64)
            .arg(s.owner)
            .arg(s.node)
            .arg(&self.guard)
            .arg(s.vp)
            .arg(s.sealed)
            .arg(s.attributes)
            .arg(&self.prefix);
        for (d, tag) in s.devices {
            call.arg(d).arg(tag);
        }
        let _: i64 = self.within(call.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// A device linked to a session after it was committed; false when the store no longer
    /// has the session.
    pub async fn link(&self, session: &str, device: &str, tag: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let n: i64 = self
            .within(
                self.link
                    .key(self.session_key(session))
                    .arg(device)
                    .arg(format!("{}d:{device}", self.prefix))
                    .arg(session)
                    .arg(tag)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(n == 1)
    }

    /// Sets this guard's mark in the store; true when it was missing: the store is new to this
    /// guard (its first start, or a store restarted empty), so what the guard knows must be
    /// written again.
    pub async fn mark(&self) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let set: Option<String> = self
            .within(
                redis::cmd("SET")
                    .arg(format!("{}g:{}", self.prefix, self.guard))
                    .arg(1)
                    .arg("NX")
                    .query_async(&mut conn),
            )
            .await?;
        Ok(set.is_some())
    }

    /// The device-cookie signing key of the pair: the first guard to ask makes it, the others
    /// read it, so a device cookie one guard issued verifies on the other. (It signs ids only:
    /// with it one can make a cookie for an id, but the ids linked to sessions are secrets of
    /// their browsers and are in the store only hashed.)
    pub async fn device_signing_key(&self) -> Result<[u8; 32], StoreError> {
        let key = format!("{}device-key", self.prefix);
        let fresh: [u8; 32] = rand::random();
        let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
        let mut conn = self.conn.clone();
        let (_, got): (Option<String>, String) = self
            .within(
                redis::pipe()
                    .cmd("SET")
                    .arg(&key)
                    .arg(&hex)
                    .arg("NX")
                    .cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn),
            )
            .await?;
        let mut out = [0u8; 32];
        let bytes = got.as_bytes();
        if bytes.len() != 64 {
            return Err(StoreError::Redis(format!(
                "{key} is not 64 hex digits (delete it: the guards make a new one)"
            )));
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&got[2 * i..2 * i + 2], 16)
                .map_err(|_| StoreError::Redis(format!("{key} is not 64 hex digits")))?;
        }
        Ok(out)
    }

    /// Whose a session is and where it lives, when a guard meets a cookie it does not know.
    pub async fn lookup(&self, session: &str) -> Result<Option<SessionRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let fields: std::collections::HashMap<String, String> = self
            .within(
                redis::cmd("HGETALL")
                    .arg(self.session_key(session))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(record_of(&fields))
    }

    /// The records of `keys` (session keys), in one round trip; sessions gone are left out.
    async fn records(&self, keys: &[String]) -> Result<Vec<(String, SessionRecord)>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("HGETALL").arg(self.session_key(k));
        }
        let mut conn = self.conn.clone();
        let all: Vec<std::collections::HashMap<String, String>> =
            self.within(pipe.query_async(&mut conn)).await?;
        Ok(keys
            .iter()
            .zip(all)
            .filter_map(|(k, f)| record_of(&f).map(|r| (k.clone(), r)))
            .collect())
    }

    /// The sessions a guard of the pair linked to a device (hashed, [`device_key`]).
    pub async fn device_sessions(
        &self,
        device: &str,
    ) -> Result<Vec<(String, SessionRecord)>, StoreError> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = self
            .within(
                redis::cmd("SMEMBERS")
                    .arg(format!("{}d:{device}", self.prefix))
                    .query_async(&mut conn),
            )
            .await?;
        self.records(&keys).await
    }

    /// The user's sessions the pair counts, the one that lives longest (the latest active)
    /// first.
    pub async fn user_sessions(
        &self,
        user: &str,
    ) -> Result<Vec<(String, SessionRecord)>, StoreError> {
        let (sessions, _) = self.user_keys(user);
        let mut conn = self.conn.clone();
        let keys: Vec<String> = self
            .within(
                redis::cmd("ZREVRANGE")
                    .arg(&sessions)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn),
            )
            .await?;
        self.records(&keys).await
    }

    /// A session ended (logout, eviction, Qlik replaced it): it stops counting for both guards.
    pub async fn end(&self, owner: &str, session: &str) -> Result<(), StoreError> {
        let (sessions, _) = self.user_keys(owner);
        let mut conn = self.conn.clone();
        let _: () = self
            .within(
                redis::pipe()
                    .atomic()
                    .cmd("ZREM")
                    .arg(&sessions)
                    .arg(session)
                    .ignore()
                    .cmd("DEL")
                    .arg(self.session_key(session))
                    .ignore()
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    /// Activity of many sessions in one round trip; returns how many the store still had.
    pub async fn touch(&self, batch: &[Touch<'_>]) -> Result<usize, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.touch.prepare_invoke();
        for t in batch {
            invocation
                .key(self.user_keys(t.user).0)
                .key(self.session_key(t.session))
                .arg(t.session)
                .arg(t.lives.as_millis().max(1) as u64);
        }
        let mut conn = self.conn.clone();
        let n: i64 = self.within(invocation.invoke_async(&mut conn)).await?;
        Ok(n.max(0) as usize)
    }
}
