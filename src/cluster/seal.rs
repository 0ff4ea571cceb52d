//! Cookie values sealed for the pair's store (`cluster.secret_file`).
//!
//! The store holds a session's hash, never its value, so a dump of it gives no one a session.
//! But a guard that has never seen a session cannot put it back on a request: a browser that
//! lost its cookie, or a script at the limit, would get a new session (or the limit page)
//! through that guard where the other would restore or reuse. With a secret both guards have
//! and the store has not, each record also carries the value sealed (ChaCha20-Poly1305 from
//! `ring`, the crypto the TLS stack already uses; a random nonce per seal; the session's key
//! as associated data, so a sealed value moved to another record does not open). A dump of the
//! store still gives nothing without the file.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};

/// Seals and opens cookie values with the key derived from the pair's secret.
pub struct Sealer {
    key: LessSafeKey,
    /// Tags the links of devices to sessions: the device index is what a restore through
    /// another guard follows, so one written by anyone but a guard must not be followed.
    link_key: [u8; 32],
}

impl Sealer {
    /// The key is derived from the whole secret, so any file of enough random bytes will do.
    pub fn new(secret: &[u8]) -> Sealer {
        let key = blake3::derive_key("qsguard cluster cookie seal v1", secret);
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key)
            .expect("a 32-byte key is what ChaCha20-Poly1305 takes");
        Sealer {
            key: LessSafeKey::new(unbound),
            link_key: blake3::derive_key("qsguard cluster device link v1", secret),
        }
    }

    /// The tag of the link of `device` (hashed) to the session `key`.
    pub fn link_tag(&self, key: &str, device: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.link_key);
        h.update(key.as_bytes())
            .update(b"\0")
            .update(device.as_bytes());
        h.finalize().to_hex()[..32].to_string()
    }

    /// `value` sealed for the record `aad` (the session's store key), as hex.
    pub fn seal(&self, aad: &str, value: &str) -> String {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut out = value.as_bytes().to_vec();
        // Sealing fails only for inputs of hundreds of gigabytes.
        if self
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut out,
            )
            .is_err()
        {
            return String::new();
        }
        let mut text = String::with_capacity(2 * (NONCE_LEN + out.len()));
        for b in nonce.iter().chain(out.iter()) {
            text.push_str(&format!("{b:02x}"));
        }
        text
    }

    /// The value sealed for `aad`, if `sealed` is one this key made for that record.
    pub fn open(&self, aad: &str, sealed: &str) -> Option<String> {
        let bytes = unhex(sealed)?;
        if bytes.len() < NONCE_LEN {
            return None;
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut rest = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut rest)
            .ok()?;
        String::from_utf8(plain.to_vec()).ok()
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_for_its_record() {
        let a = Sealer::new(b"the pair's secret, 32 bytes or more");
        let value = "3f2a9c1e-0d4b-4c8e-9a77-1b2c3d4e5f60";
        let sealed = a.seal("k1", value);
        assert!(!sealed.contains("3f2a9c1e"));
        assert_eq!(a.open("k1", &sealed).as_deref(), Some(value));
        // Another record, another secret, a changed byte, garbage: nothing.
        assert_eq!(a.open("k2", &sealed), None);
        let b = Sealer::new(b"another secret, 32 bytes or more!!");
        assert_eq!(b.open("k1", &sealed), None);
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(a.open("k1", std::str::from_utf8(&tampered).unwrap()), None);
        assert_eq!(a.open("k1", "zz"), None);
        assert_eq!(a.open("k1", ""), None);
        // A fresh nonce every time.
        assert_ne!(a.seal("k1", value), sealed);
        // A link's tag is the pair's, for that session and that device only.
        let t = a.link_tag("k1", "d1");
        assert_eq!(t, a.link_tag("k1", "d1"));
        assert_ne!(t, a.link_tag("k1", "d2"));
        assert_ne!(t, a.link_tag("k2", "d1"));
        assert_ne!(t, b.link_tag("k1", "d1"));
    }
}
