//! The device cookie: the guard's own name for a browser, and the key to restoring its session.
//!
//! Whoever presents a device id gets its sessions restored, so the value must be one the guard
//! issued: it is `<id>.<tag>`, the id (128 random bits, 32 hex digits) and a keyed BLAKE3 tag
//! of it (64 hex digits). A value that does not verify (made up, altered, signed with a key the
//! guard no longer has) restores nothing, is linked to nothing and names no user; its id only
//! groups the browser's burst (so the first burst after a restart without a snapshot is still
//! one login), and the browser's next session replaces it ([`id_of`]; a value not of this form
//! at all is replaced at once). The tag is compared in constant time (`blake3::Hash`'s
//! equality).
//!
//! The key is kept in a file beside the session snapshot (`<snapshot_file>.device-key`, mode
//! 0600), so a restart keeps the browsers' device cookies valid along with their sessions;
//! without a snapshot it lives in memory only (a restart forgets the devices anyway). An admin
//! rotates it on request (`POST /device-key/rotate`): every device cookie signed with the old
//! key is then replaced on its browser's next request; live sessions stay, only a restore of a
//! cookie lost before that request is no longer possible.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use arc_swap::ArcSwap;

use super::table::DeviceId;

/// The signing key, and where it is kept.
pub struct DeviceKeys {
    key: ArcSwap<[u8; 32]>,
    file: Option<PathBuf>,
    /// Bumped by every rotation, so that a [`DeviceMemo`] of the old key is not believed.
    generation: AtomicU64,
}

/// The last device cookie value one client connection showed, and what it verified to: a
/// browser sends the same value with every request of a keep-alive connection, so its tag is
/// checked once per connection (and key) rather than once per request. It holds the value,
/// so it has no `Debug` and is never logged.
#[derive(Default)]
pub struct DeviceMemo(Option<(u64, Box<str>, Option<DeviceId>)>);

impl DeviceKeys {
    /// The key kept beside `snapshot` (made there on first use), or a key in memory.
    pub fn load(snapshot: Option<&Path>) -> Result<DeviceKeys, String> {
        let Some(snapshot) = snapshot else {
            return Ok(DeviceKeys {
                key: ArcSwap::from_pointee(rand::random()),
                file: None,
                generation: AtomicU64::new(0),
            });
        };
        let file = key_file(snapshot);
        let key = match std::fs::read(&file) {
            Ok(bytes) => parse_key(&bytes).ok_or_else(|| {
                format!(
                    "sessions.snapshot_file: the device key {} is not 64 hex digits (delete it to make a new one: every browser then gets a new device cookie)",
                    file.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = rand::random();
                write_key(&file, &key)?;
                key
            }
            Err(e) => {
                return Err(format!(
                    "sessions.snapshot_file: cannot read the device key {}: {e}",
                    file.display()
                ))
            }
        };
        Ok(DeviceKeys {
            key: ArcSwap::from_pointee(key),
            file: Some(file),
            generation: AtomicU64::new(0),
        })
    }

    /// The cookie value for `id` (on the stack: it is written into a `Set-Cookie` at once).
    pub fn sign(&self, id: DeviceId) -> Signed {
        let mut out = [b'.'; 32 + 1 + 64];
        hex_into(&mut out[..32], &id.to_be_bytes());
        hex_into(&mut out[33..], self.tag(id).as_bytes());
        Signed(out)
    }

    /// The device a cookie value names, if the guard signed it with its current key.
    pub fn verify(&self, value: &str) -> Option<DeviceId> {
        let v = value.as_bytes();
        if v.len() != 32 + 1 + 64 || v[32] != b'.' {
            return None;
        }
        let id = DeviceId::from_be_bytes(hex::<16>(&v[..32])?);
        let tag = blake3::Hash::from_bytes(hex::<32>(&v[33..])?);
        // `blake3::Hash` compares in constant time.
        (tag == self.tag(id)).then_some(id)
    }

    /// [`DeviceKeys::verify`], remembered in `memo` for the connection's next requests.
    pub fn verify_remembered(
        &self,
        value: &str,
        memo: Option<&Mutex<DeviceMemo>>,
    ) -> Option<DeviceId> {
        let Some(memo) = memo else {
            return self.verify(value);
        };
        // Read before the key: a rotation in between makes this entry stale, never wrong.
        let generation = self.generation.load(Ordering::SeqCst);
        let mut memo = memo.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, seen, id)) = &memo.0 {
            if *g == generation && **seen == *value {
                return *id;
            }
        }
        let id = self.verify(value);
        memo.0 = Some((generation, value.into(), id));
        id
    }

    /// A new key: written first (so a restart keeps it), then used.
    pub fn rotate(&self) -> Result<(), String> {
        let key: [u8; 32] = rand::random();
        if let Some(file) = &self.file {
            write_key(file, &key)?;
        }
        self.key.store(std::sync::Arc::new(key));
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    /// The key a pair of guards shares (from their store): used from now on, not written to
    /// the key file (the store keeps it). A cookie signed with the key used so far no longer
    /// verifies, as after a rotation.
    pub fn adopt(&self, key: [u8; 32]) {
        if **self.key.load() == key {
            return;
        }
        self.key.store(std::sync::Arc::new(key));
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Where the key is kept, if anywhere.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    fn tag(&self, id: DeviceId) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key.load());
        h.update(b"qsguard device ");
        h.update(&id.to_be_bytes());
        h.finalize()
    }
}

/// A device cookie value as [`DeviceKeys::sign`] writes it: `<id>.<tag>` in hex.
pub struct Signed([u8; 32 + 1 + 64]);

impl std::ops::Deref for Signed {
    type Target = str;
    fn deref(&self) -> &str {
        // Hex digits and a dot: ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// The id in a device cookie value of the guard's form (`<id>.<tag>`, or the bare id an older
/// qsguard issued), without checking the tag: it keys a browser's flight, nothing more.
pub fn id_of(value: &str) -> Option<DeviceId> {
    let v = value.as_bytes();
    let id = memchr::memchr(b'.', v).map_or(v, |dot| &v[..dot]);
    if id.len() != 32 {
        return None;
    }
    Some(DeviceId::from_be_bytes(hex::<16>(id)?))
}

/// `2 * N` hex digits (either case) as `N` bytes; checked on every request that carries a
/// device cookie, so by table rather than through `from_str_radix`.
fn hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
        bad |= (hi | lo) & 0x10;
        *o = (hi << 4) | (lo & 0x0f);
    }
    (bad == 0).then_some(out)
}

/// A hex digit's value; 0x10 for any other byte.
/// Lower-case hex of `bytes` into `out` (twice as long): a device cookie is minted for every
/// answer to a client without cookies, so no `core::fmt` on that path.
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
}

static NIBBLE: [u8; 256] = {
    let mut t = [0x10u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// `<snapshot_file>.device-key`.
pub fn key_file(snapshot: &Path) -> PathBuf {
    let mut name = snapshot.as_os_str().to_owned();
    name.push(".device-key");
    PathBuf::from(name)
}

fn parse_key(bytes: &[u8]) -> Option<[u8; 32]> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    Some(*blake3::Hash::from_hex(text).ok()?.as_bytes())
}

/// Atomically (a temporary file, fsync, rename), readable by the guard's user only.
fn write_key(file: &Path, key: &[u8; 32]) -> Result<(), String> {
    use std::io::Write;
    let fail = |e: std::io::Error| {
        format!(
            "sessions.snapshot_file: cannot write the device key {}: {e}",
            file.display()
        )
    };
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp).map_err(fail)?;
    f.write_all(blake3::Hash::from_bytes(*key).to_hex().as_bytes())
        .map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, file).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_values_verify_and_nothing_else_does() {
        let k = DeviceKeys::load(None).unwrap();
        let id: DeviceId = 0x0123_4567_89ab_cdef_0011_2233_4455_6677;
        let v = k.sign(id);
        assert_eq!(v.len(), 32 + 1 + 64);
        assert_eq!(
            &*v,
            format!("{id:032x}.{}", k.tag(id).to_hex()),
            "the hex of both"
        );
        assert_eq!(k.verify(&v), Some(id));
        // The unsigned form the guard used to issue, an altered id, an altered tag.
        assert_eq!(k.verify(&format!("{id:032x}")), None);
        let other = k.sign(id + 1);
        let forged = format!("{}{}", &other[..33], &v[33..]);
        assert_eq!(k.verify(&forged), None);
        let mut bad_tag = v.to_string().into_bytes();
        let last = bad_tag.len() - 1;
        bad_tag[last] = if bad_tag[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(k.verify(std::str::from_utf8(&bad_tag).unwrap()), None);
        // Another guard's key (or a rotated one) does not verify.
        assert_eq!(DeviceKeys::load(None).unwrap().verify(&v), None);
        for junk in ["", ".", "zz.zz", &v[..v.len() - 1], &format!("{}0", &*v)] {
            assert_eq!(k.verify(junk), None, "{junk}");
        }
        // Hex digits of either case are the same value; any other byte anywhere is not.
        assert_eq!(k.verify(&v.to_uppercase()), Some(id));
        for at in (0..v.len()).filter(|&i| i != 32) {
            for bad in [b'g', b'G', b'/', b':', b'@', b'`', b' ', 0xff] {
                let mut b = v.to_string().into_bytes();
                b[at] = bad;
                let text = String::from_utf8_lossy(&b);
                assert_eq!(k.verify(&text), None, "{text}");
            }
        }
        assert_eq!(id_of(&v), Some(id));
        assert_eq!(id_of(&format!("{id:032X}")), Some(id));
        for junk in ["", "0123", &format!("{id:032x}0"), &format!("{id:031x}g.")] {
            assert_eq!(id_of(junk), None, "{junk}");
        }
    }

    #[test]
    fn a_remembered_verdict_is_the_verdict_and_forgotten_on_rotation() {
        let k = DeviceKeys::load(None).unwrap();
        let memo = Mutex::new(DeviceMemo::default());
        let v = k.sign(7);
        let forged = format!("{}{}", &v[..33], &k.sign(8)[33..]);
        for _ in 0..2 {
            assert_eq!(k.verify_remembered(&v, Some(&memo)), Some(7));
            assert_eq!(k.verify_remembered(&forged, Some(&memo)), None);
            assert_eq!(k.verify_remembered(&v, Some(&memo)), Some(7));
        }
        k.rotate().unwrap();
        // The same value, remembered as good under the old key, is checked again.
        assert_eq!(k.verify_remembered(&v, Some(&memo)), None);
        assert_eq!(k.verify_remembered(&k.sign(7), Some(&memo)), Some(7));
        assert_eq!(k.verify_remembered(&v, None), None);
    }

    #[test]
    fn the_key_is_kept_beside_the_snapshot_and_rotates() {
        let dir = std::env::temp_dir().join(format!("qsguard-devkey-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let snapshot = dir.join("sessions.json");
        let a = DeviceKeys::load(Some(&snapshot)).unwrap();
        let v = a.sign(42);
        let file = key_file(&snapshot);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A restart reads the same key.
        let b = DeviceKeys::load(Some(&snapshot)).unwrap();
        assert_eq!(b.verify(&v), Some(42));
        b.rotate().unwrap();
        assert_eq!(b.verify(&v), None);
        let c = DeviceKeys::load(Some(&snapshot)).unwrap();
        assert_eq!(c.verify(&b.sign(7)), Some(7));
        std::fs::write(&file, "not a key").unwrap();
        let e = DeviceKeys::load(Some(&snapshot)).err().unwrap();
        assert!(
            e.contains("sessions.snapshot_file") && e.contains("device key"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
