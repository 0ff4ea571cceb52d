//! The session table on disk, so a restart of the guard does not forget sessions: a user at the
//! limit before the restart is still at the limit after it, and a browser restart after a guard
//! restart still gets its session back.
//!
//! The file is JSON with a version number, written atomically (a temporary file, fsync, rename)
//! with mode 0600: it holds the live sessions' cookie values (which are what a restore needs),
//! their owners, nodes and browsers, and nothing else. Sessions that expired while the guard
//! was down are dropped on load; open WebSockets did not survive the restart and count as
//! activity at the moment the snapshot was written.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::identity::User;
use super::SessionGuard;

const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    /// Unix time, milliseconds.
    written_at: u64,
    sessions: Vec<Saved>,
}

#[derive(Serialize, Deserialize)]
struct Saved {
    virtual_proxy: String,
    /// The session cookie's value: the secret this file exists to keep.
    cookie: String,
    node: String,
    owner: Option<(String, String)>,
    /// Device ids (the device cookie values), 32 hex digits.
    devices: Vec<String>,
    /// Milliseconds since its last activity when the snapshot was written.
    idle_ms: u64,
    attributes: String,
    host: Option<String>,
    /// Made for a client without cookies (absent in snapshots of earlier versions: false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    cookieless: bool,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl SessionGuard {
    /// Learns the sessions Qlik has that the guard does not know (made while it was down, or
    /// around it) from the QPS REST API of every node: `GET /qps/<vp/>session` for every
    /// virtual proxy. Returns how many were added; a node whose API fails is named in the
    /// error after the others were asked.
    pub async fn reconcile(&self) -> Result<usize, String> {
        let nodes = self.nodes.load_full();
        // Nodes that share one API (`[qps_api].url` without a `qps_api` per node) are asked
        // once; its sessions go to the node on the API's host, else to the first of them.
        let mut asked: Vec<(String, Arc<str>)> = Vec::new();
        let mut names: Vec<&Arc<str>> = nodes.keys().collect();
        names.sort();
        for name in names {
            let Some(api) = &nodes[name].qps else {
                continue;
            };
            let base = api.base().to_string();
            let on_host = nodes[name].uri.host() == Some(api.host());
            match asked.iter_mut().find(|(b, _)| *b == base) {
                Some(entry) if on_host => entry.1 = name.clone(),
                Some(_) => {}
                None => asked.push((base, name.clone())),
            }
        }
        let mut added = 0;
        let mut failed = Vec::new();
        for (base, node) in asked {
            let api = nodes[&node].qps.as_ref().expect("chosen for its API");
            for (vp, info) in self.virtual_proxies().iter().enumerate() {
                let sessions = match api.sessions(&info.prefix).await {
                    Ok(s) => s,
                    Err(e) => {
                        failed.push(format!("{node} ({base}): {e}"));
                        break;
                    }
                };
                for s in sessions {
                    if s.session_id.is_empty() || self.table.get(vp, &s.session_id).is_some() {
                        continue;
                    }
                    let owner = User::new(&s.user_directory, &s.user_id);
                    self.table.insert(
                        vp,
                        &s.session_id,
                        node.clone(),
                        None,
                        Some(owner),
                        super::default_attributes(false),
                    );
                    added += 1;
                }
            }
        }
        if failed.is_empty() {
            Ok(added)
        } else {
            Err(format!(
                "{added} sessions learnt, but these nodes could not be asked: {}",
                failed.join("; ")
            ))
        }
    }

    /// Writes the live sessions to `path`; returns how many.
    pub fn save_snapshot(&self, path: &Path) -> std::io::Result<usize> {
        let now = self.table.now_ms();
        let sessions: Vec<Saved> = self
            .table
            .all()
            .into_iter()
            .filter(|s| self.table.is_live(s, now))
            .map(|s| {
                let m = s.meta();
                Saved {
                    virtual_proxy: self.virtual_proxies()[s.vp].prefix.clone(),
                    cookie: s.id.to_string(),
                    node: s.node.to_string(),
                    owner: m
                        .owner
                        .as_ref()
                        .map(|u| (u.dir.to_string(), u.id.to_string())),
                    devices: m.devices.iter().map(|d| format!("{d:032x}")).collect(),
                    idle_ms: if s.websockets() > 0 {
                        0
                    } else {
                        now.saturating_sub(s.last_active_ms())
                    },
                    attributes: m.cookie_attributes.clone(),
                    host: m
                        .host
                        .as_ref()
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string),
                    cookieless: m.cookieless,
                }
            })
            .collect();
        let count = sessions.len();
        let body = serde_json::to_vec(&Snapshot {
            version: VERSION,
            written_at: unix_ms(),
            sessions,
        })
        .map_err(std::io::Error::other)?;
        // A temporary name of this process's own (another qsguard may be writing during an
        // upgrade), one writer at a time within it.
        let _one = self.snapshot_lock.lock().unwrap_or_else(|e| e.into_inner());
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        Ok(count)
    }

    /// Loads a snapshot: returns (sessions restored, sessions dropped as expired or unknown).
    pub fn load_snapshot(&self, path: &Path) -> Result<(usize, usize), String> {
        self.read_snapshot(path, false)
    }

    /// Adds the sessions of a snapshot that the table does not know, and takes the later
    /// activity of those it does: what the process this one replaced did after its handover
    /// snapshot. Returns (added or refreshed, dropped as expired).
    pub fn merge_snapshot(&self, path: &Path) -> Result<(usize, usize), String> {
        self.read_snapshot(path, true)
    }

    fn read_snapshot(&self, path: &Path, merge: bool) -> Result<(usize, usize), String> {
        let text =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let snap: Snapshot = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is not a qsguard session snapshot: {e}", path.display()))?;
        if snap.version != VERSION {
            return Err(format!(
                "{} has snapshot version {}, this qsguard reads version {VERSION}",
                path.display(),
                snap.version
            ));
        }
        let down_ms = unix_ms().saturating_sub(snap.written_at);
        let now = self.table.now_ms();
        let (mut loaded, mut dropped) = (0, 0);
        for s in snap.sessions {
            let Some(vp) = self
                .virtual_proxies()
                .iter()
                .position(|v| v.prefix == s.virtual_proxy)
            else {
                dropped += 1;
                continue;
            };
            let idle = s.idle_ms + down_ms;
            if idle >= self.table.timeout_ms(vp) {
                dropped += 1;
                continue;
            }
            let devices: Vec<u128> = s
                .devices
                .iter()
                .filter_map(|d| u128::from_str_radix(d, 16).ok())
                .collect();
            if merge {
                if let Some(known) = self.table.get(vp, &s.cookie) {
                    let at = now.saturating_sub(idle);
                    if self.table.is_live(&known, now) && known.last_active_ms() < at {
                        self.table.touch_at(&known, at);
                        loaded += 1;
                    }
                    continue;
                }
            }
            let owner = s.owner.map(|(dir, id)| User::new(&dir, &id));
            let session = self.table.insert(
                vp,
                &s.cookie,
                Arc::from(s.node.as_str()),
                devices.first().copied(),
                owner,
                s.attributes,
            );
            for d in devices.iter().skip(1) {
                self.table.link_device(&session, *d);
            }
            {
                let mut m = session.meta();
                m.host = s.host.and_then(|h| http::HeaderValue::from_str(&h).ok());
                m.cookieless = s.cookieless;
            }
            self.table.touch_at(&session, now.saturating_sub(idle));
            loaded += 1;
        }
        Ok((loaded, dropped))
    }
}
