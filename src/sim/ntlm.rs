//! NTLMSSP (MS-NLMP) and its SPNEGO wrapping, as the simulated QPS's Windows authentication
//! and the simulator's browser client speak them.
//!
//! The message layout is the real one (signature `NTLMSSP\0`, message type, security buffers
//! of length / maximum length / offset, flags, UTF-16LE names), so a proxy in front sees what
//! it would see at a real site, SPNEGO included for `Negotiate`. Only the proof is simplified:
//! instead of NTLMv2's HMAC-MD5 over the NT hash, the `NTProofStr` is a keyed BLAKE3 hash of
//! the server challenge and the client blob, keyed by the account (the "password" of each
//! simulated account is derived from its name). What matters for a proxy holds: the answer is
//! only good for the challenge that one connection was given.
//!
//! Written by hand for the referee; the guard has its own reader (no code is shared).

pub(crate) const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";

const NEGOTIATE_UNICODE: u32 = 0x0000_0001;
const NEGOTIATE_OEM: u32 = 0x0000_0002;
const REQUEST_TARGET: u32 = 0x0000_0004;
const NEGOTIATE_NTLM: u32 = 0x0000_0200;
const NEGOTIATE_ALWAYS_SIGN: u32 = 0x0000_8000;
const TARGET_TYPE_DOMAIN: u32 = 0x0001_0000;
const NEGOTIATE_EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
const NEGOTIATE_TARGET_INFO: u32 = 0x0080_0000;
const NEGOTIATE_VERSION: u32 = 0x0200_0000;
const NEGOTIATE_128: u32 = 0x2000_0000;
const NEGOTIATE_56: u32 = 0x8000_0000;

/// What a browser on Windows asks for in its NEGOTIATE_MESSAGE.
const CLIENT_FLAGS: u32 = NEGOTIATE_UNICODE
    | NEGOTIATE_OEM
    | REQUEST_TARGET
    | NEGOTIATE_NTLM
    | NEGOTIATE_ALWAYS_SIGN
    | NEGOTIATE_EXTENDED_SESSIONSECURITY
    | NEGOTIATE_VERSION
    | NEGOTIATE_128
    | NEGOTIATE_56;

/// Windows 10 build 19041, NTLM revision 15: the VERSION field browsers send.
const VERSION: [u8; 8] = [10, 0, 0x61, 0x4a, 0, 0, 0, 15];

/// OID 1.3.6.1.5.5.2 (SPNEGO), DER.
const OID_SPNEGO: &[u8] = &[0x06, 0x06, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x02];
/// OID 1.3.6.1.4.1.311.2.2.10 (NTLMSSP), DER.
const OID_NTLMSSP: &[u8] = &[
    0x06, 0x0a, 0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x02, 0x02, 0x0a,
];

/// The two schemes a QPS offers in its `401`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Ntlm,
    /// NTLM wrapped in SPNEGO (what a browser falls back to where Kerberos is not set up).
    Negotiate,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Ntlm => "NTLM",
            Scheme::Negotiate => "Negotiate",
        }
    }

    /// The scheme and its token of an `Authorization` or `WWW-Authenticate` value.
    pub(crate) fn split(value: &[u8]) -> Option<(Scheme, &[u8])> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let (name, rest) = text.split_once(' ').unwrap_or((text, ""));
        let scheme = if name.eq_ignore_ascii_case("NTLM") {
            Scheme::Ntlm
        } else if name.eq_ignore_ascii_case("Negotiate") {
            Scheme::Negotiate
        } else {
            return None;
        };
        Some((scheme, rest.trim().as_bytes()))
    }
}

/// A message from the browser, as the server reads it.
#[derive(Debug)]
pub(crate) enum ClientMessage {
    Negotiate { flags: u32 },
    Authenticate(Authenticate),
}

/// The names and the answer of an AUTHENTICATE_MESSAGE (Type 3).
#[derive(Debug)]
pub(crate) struct Authenticate {
    pub domain: String,
    pub user: String,
    nt_response: Vec<u8>,
}

/// Reads the token of an `Authorization` value: raw NTLMSSP, or (for `Negotiate`) SPNEGO
/// around it. `Err` says why it is not a message the server can take.
pub(crate) fn read_client(scheme: Scheme, b64: &[u8]) -> Result<ClientMessage, &'static str> {
    let raw = b64_decode(b64).ok_or("the token is not base64")?;
    let msg = match scheme {
        Scheme::Ntlm => raw.as_slice(),
        Scheme::Negotiate if raw.starts_with(SIGNATURE) => raw.as_slice(),
        Scheme::Negotiate => spnego_inner(&raw).ok_or("no NTLMSSP mechanism token in SPNEGO")?,
    };
    if msg.len() < 12 || &msg[..8] != SIGNATURE {
        return Err("no NTLMSSP signature");
    }
    match u32_at(msg, 8) {
        Some(1) => Ok(ClientMessage::Negotiate {
            flags: u32_at(msg, 12).ok_or("a NEGOTIATE_MESSAGE without flags")?,
        }),
        Some(3) => read_authenticate(msg).map(ClientMessage::Authenticate),
        _ => Err("not a NEGOTIATE or AUTHENTICATE message"),
    }
}

fn read_authenticate(msg: &[u8]) -> Result<Authenticate, &'static str> {
    if msg.len() < 64 {
        return Err("an AUTHENTICATE_MESSAGE shorter than its fixed fields");
    }
    let flags = u32_at(msg, 60).ok_or("no flags")?;
    let bad = "a security buffer points outside the message";
    let nt = security_buffer(msg, 20).ok_or(bad)?;
    let domain = security_buffer(msg, 28).ok_or(bad)?;
    let user = security_buffer(msg, 36).ok_or(bad)?;
    let text = |b: &[u8]| -> Result<String, &'static str> {
        if flags & NEGOTIATE_UNICODE != 0 {
            from_utf16le(b).ok_or("a name that is not UTF-16LE")
        } else if b.is_ascii() {
            Ok(String::from_utf8_lossy(b).into_owned())
        } else {
            Err("an OEM name outside ASCII")
        }
    };
    // NTProofStr (16) + the NTLMv2 blob's fixed part (28) at least.
    if nt.len() < 44 {
        return Err("no NTLMv2 response");
    }
    Ok(Authenticate {
        domain: text(domain)?,
        user: text(user)?,
        nt_response: nt.to_vec(),
    })
}

/// The CHALLENGE_MESSAGE (Type 2) for `challenge`, naming the server's domain.
pub(crate) fn challenge_message(challenge: [u8; 8], client_flags: u32, domain: &str) -> Vec<u8> {
    let flags = NEGOTIATE_UNICODE
        | REQUEST_TARGET
        | NEGOTIATE_NTLM
        | NEGOTIATE_ALWAYS_SIGN
        | TARGET_TYPE_DOMAIN
        | NEGOTIATE_EXTENDED_SESSIONSECURITY
        | NEGOTIATE_TARGET_INFO
        | NEGOTIATE_VERSION
        | (client_flags & (NEGOTIATE_128 | NEGOTIATE_56));
    let mut m = Vec::with_capacity(160);
    m.extend_from_slice(SIGNATURE);
    m.extend_from_slice(&2u32.to_le_bytes());
    m.extend_from_slice(&[0; 8]); // TargetNameFields
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&challenge);
    m.extend_from_slice(&[0; 8]); // Reserved
    m.extend_from_slice(&[0; 8]); // TargetInfoFields
    m.extend_from_slice(&VERSION);
    let name = utf16le(domain);
    let mut info = Vec::new();
    for (id, value) in [(2u16, &name), (1u16, &utf16le("QLIKNODE"))] {
        info.extend_from_slice(&id.to_le_bytes());
        info.extend_from_slice(&(value.len() as u16).to_le_bytes());
        info.extend_from_slice(value);
    }
    info.extend_from_slice(&[0; 4]); // MsvAvEOL
    put_buffer(&mut m, 12, &name);
    put_buffer(&mut m, 40, &info);
    m
}

/// Whether the Type 3's answer was made for `challenge` by the account it names.
pub(crate) fn answer_fits(a: &Authenticate, challenge: &[u8; 8]) -> bool {
    let (proof, blob) = a.nt_response.split_at(16);
    proof == nt_proof(&a.domain, &a.user, challenge, blob)
}

/// A fresh server challenge.
pub(crate) fn new_challenge() -> [u8; 8] {
    rand::random()
}

/// The token of a `WWW-Authenticate` answer carrying `type2`, in the client's scheme.
pub(crate) fn server_token(scheme: Scheme, type2: &[u8]) -> String {
    match scheme {
        Scheme::Ntlm => b64_encode(type2),
        // negTokenResp { negState accept-incomplete, supportedMech NTLMSSP, responseToken }
        Scheme::Negotiate => b64_encode(&der(
            0xa1,
            &der(
                0x30,
                &[
                    der(0xa0, &[0x0a, 0x01, 0x01]),
                    der(0xa1, OID_NTLMSSP),
                    der(0xa2, &der(0x04, type2)),
                ]
                .concat(),
            ),
        )),
    }
}

fn nt_proof(domain: &str, user: &str, challenge: &[u8; 8], blob: &[u8]) -> [u8; 16] {
    let account = format!("{}\\{}", domain.to_uppercase(), user.to_uppercase());
    let key = blake3::derive_key("qsguard simulator: NTLM account key", account.as_bytes());
    let mut h = blake3::Hasher::new_keyed(&key);
    h.update(challenge);
    h.update(blob);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// The browser's side of the handshake: what the simulator's clients (the tests, the demo's
/// scripted browser) send.
#[derive(Clone, Debug)]
pub struct Browser {
    pub scheme: Scheme,
    pub domain: String,
    pub user: String,
    pub workstation: String,
}

impl Browser {
    /// A browser logged on to Windows as `DOMAIN\user`, answering with `scheme`.
    pub fn new(account: &str, scheme: Scheme) -> Browser {
        let (domain, user) = account.split_once('\\').unwrap_or(("", account));
        Browser {
            scheme,
            domain: domain.to_string(),
            user: user.to_string(),
            workstation: "WS-TEST".to_string(),
        }
    }

    /// The `Authorization` value of the first leg (Type 1).
    pub fn negotiate(&self) -> String {
        let mut m = Vec::with_capacity(40);
        m.extend_from_slice(SIGNATURE);
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&CLIENT_FLAGS.to_le_bytes());
        m.extend_from_slice(&[0; 16]); // DomainNameFields, WorkstationFields (not supplied)
        m.extend_from_slice(&VERSION);
        // Empty buffers still point at the end of the fixed part.
        m[20..24].copy_from_slice(&40u32.to_le_bytes());
        m[28..32].copy_from_slice(&40u32.to_le_bytes());
        let token = match self.scheme {
            Scheme::Ntlm => b64_encode(&m),
            // NegTokenInit { mechTypes [NTLMSSP], mechToken }
            Scheme::Negotiate => b64_encode(&der(
                0x60,
                &[
                    OID_SPNEGO.to_vec(),
                    der(
                        0xa0,
                        &der(
                            0x30,
                            &[
                                der(0xa0, &der(0x30, OID_NTLMSSP)),
                                der(0xa2, &der(0x04, &m)),
                            ]
                            .concat(),
                        ),
                    ),
                ]
                .concat(),
            )),
        };
        super::secrets::note_token(&token);
        format!("{} {token}", self.scheme.name())
    }

    /// The `Authorization` value of the third leg (Type 3), answering the challenge in the
    /// `WWW-Authenticate` values of the server's `401`; `None` when they hold no challenge.
    pub fn authenticate<'a>(
        &self,
        www_authenticate: impl IntoIterator<Item = &'a [u8]>,
    ) -> Option<String> {
        let type2 = www_authenticate.into_iter().find_map(|v| {
            let (scheme, token) = Scheme::split(v)?;
            if scheme != self.scheme || token.is_empty() {
                return None;
            }
            let raw = b64_decode(token)?;
            if raw.starts_with(SIGNATURE) {
                Some(raw)
            } else {
                spnego_inner(&raw).map(<[u8]>::to_vec)
            }
        })?;
        if type2.len() < 32 || u32_at(&type2, 8) != Some(2) {
            return None;
        }
        let mut challenge = [0u8; 8];
        challenge.copy_from_slice(&type2[24..32]);
        let info = security_buffer(&type2, 40).unwrap_or(&[]);
        // NTLMv2 blob: RespType, HiRespType, reserved, timestamp, client challenge, reserved,
        // the server's target info, and the end.
        let mut blob = vec![1, 1, 0, 0, 0, 0, 0, 0];
        let ft = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| (d.as_secs() + 11_644_473_600) * 10_000_000)
            .unwrap_or(0);
        blob.extend_from_slice(&ft.to_le_bytes());
        blob.extend_from_slice(&rand::random::<[u8; 8]>());
        blob.extend_from_slice(&[0; 4]);
        blob.extend_from_slice(info);
        blob.extend_from_slice(&[0; 4]);
        let mut nt = nt_proof(&self.domain, &self.user, &challenge, &blob).to_vec();
        nt.extend_from_slice(&blob);
        let mut m = Vec::with_capacity(256);
        m.extend_from_slice(SIGNATURE);
        m.extend_from_slice(&3u32.to_le_bytes());
        m.resize(88, 0); // six buffers, flags, version, MIC
        let flags = CLIENT_FLAGS & !NEGOTIATE_OEM;
        m[60..64].copy_from_slice(&flags.to_le_bytes());
        m[64..72].copy_from_slice(&VERSION);
        put_buffer(&mut m, 12, &[0; 24]); // LmChallengeResponse: zeros with NTLMv2
        put_buffer(&mut m, 20, &nt);
        put_buffer(&mut m, 28, &utf16le(&self.domain));
        put_buffer(&mut m, 36, &utf16le(&self.user));
        put_buffer(&mut m, 44, &utf16le(&self.workstation));
        put_buffer(&mut m, 52, &[]);
        let token = match self.scheme {
            Scheme::Ntlm => b64_encode(&m),
            // negTokenResp { responseToken }
            Scheme::Negotiate => b64_encode(&der(0xa1, &der(0x30, &der(0xa2, &der(0x04, &m))))),
        };
        super::secrets::note_token(&token);
        Some(format!("{} {token}", self.scheme.name()))
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// The bytes a security buffer (len, maxlen, offset at `field`) points at, if inside `msg`.
fn security_buffer(msg: &[u8], field: usize) -> Option<&[u8]> {
    let len = u16_at(msg, field)? as usize;
    let max = u16_at(msg, field + 2)? as usize;
    let off = u32_at(msg, field + 4)? as usize;
    if max < len {
        return None;
    }
    msg.get(off..off.checked_add(len)?)
}

/// Appends `data` to the payload and points the security buffer at `field` to it.
fn put_buffer(msg: &mut Vec<u8>, field: usize, data: &[u8]) {
    let off = msg.len() as u32;
    let len = data.len() as u16;
    msg[field..field + 2].copy_from_slice(&len.to_le_bytes());
    msg[field + 2..field + 4].copy_from_slice(&len.to_le_bytes());
    msg[field + 4..field + 8].copy_from_slice(&off.to_le_bytes());
    msg.extend_from_slice(data);
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn from_utf16le(b: &[u8]) -> Option<String> {
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units).ok()
}

/// One DER element (definite length).
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

/// One DER element at the front of `b`: (tag, content, rest). Indefinite and overlong
/// lengths are refused, as a DER reader must.
fn der_next(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n].iter().fold(0usize, |a, x| (a << 8) | *x as usize);
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// The NTLMSSP message inside an SPNEGO token: the OCTET STRING (a mechToken or
/// responseToken) that holds one, found by walking the DER structure.
fn spnego_inner(b: &[u8]) -> Option<&[u8]> {
    let mut rest = b;
    while !rest.is_empty() {
        let (tag, content, next) = der_next(rest)?;
        if tag == 0x04 && content.starts_with(SIGNATURE) {
            return Some(content);
        }
        if tag & 0x20 != 0 {
            if let Some(found) = spnego_inner(content) {
                return Some(found);
            }
        }
        rest = next;
    }
    None
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub(crate) fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64 with padding; anything else is refused.
pub(crate) fn b64_decode(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (i, q) in s.chunks(4).enumerate() {
        let last = i == s.len() / 4 - 1;
        let pad = q.iter().rev().take_while(|b| **b == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &b in &q[..4 - pad] {
            let v = B64.iter().position(|x| *x == b)? as u32;
            n = n << 6 | v;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            assert_eq!(
                b64_decode(b64_encode(data).as_bytes()).as_deref(),
                Some(data)
            );
        }
        assert_eq!(b64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64_encode(b"fo"), "Zm8=");
        assert_eq!(b64_decode(b"Zm8"), None);
        assert_eq!(b64_decode(b"Z=8="), None);
        assert_eq!(b64_decode(b"Zm8*"), None);
    }

    fn token_of(header: &str) -> (Scheme, Vec<u8>) {
        let (s, t) = Scheme::split(header.as_bytes()).expect("a scheme");
        (s, t.to_vec())
    }

    fn handshake(scheme: Scheme) {
        let b = Browser::new("CORP\\jane", scheme);
        let (s, t1) = token_of(&b.negotiate());
        assert_eq!(s, scheme);
        let ClientMessage::Negotiate { flags } = read_client(s, &t1).expect("type 1") else {
            panic!("not a type 1")
        };
        assert_ne!(flags & NEGOTIATE_UNICODE, 0);
        let challenge = new_challenge();
        let type2 = challenge_message(challenge, flags, "CORP");
        assert_eq!(&type2[..8], SIGNATURE);
        assert_eq!(&type2[24..32], &challenge);
        let www = format!("{} {}", scheme.name(), server_token(scheme, &type2));
        let a3 = b.authenticate([www.as_bytes()]).expect("type 3");
        let (s, t3) = token_of(&a3);
        let ClientMessage::Authenticate(a) = read_client(s, &t3).expect("type 3 reads") else {
            panic!("not a type 3")
        };
        assert_eq!((a.domain.as_str(), a.user.as_str()), ("CORP", "jane"));
        assert!(answer_fits(&a, &challenge));
        // Another connection's challenge: the answer does not fit.
        assert!(!answer_fits(&a, &new_challenge()));
    }

    #[test]
    fn a_handshake_fits_only_its_own_challenge() {
        handshake(Scheme::Ntlm);
        handshake(Scheme::Negotiate);
    }

    #[test]
    fn malformed_messages_are_refused() {
        let b = Browser::new("CORP\\jane", Scheme::Ntlm);
        let type2 = challenge_message(new_challenge(), CLIENT_FLAGS, "CORP");
        let www = format!("NTLM {}", b64_encode(&type2));
        let a3 = b.authenticate([www.as_bytes()]).expect("type 3");
        let (_, t3) = token_of(&a3);
        let mut raw = b64_decode(&t3).expect("base64");
        // The user name's offset points past the end.
        raw[40..44].copy_from_slice(&4000u32.to_le_bytes());
        assert!(read_client(Scheme::Ntlm, b64_encode(&raw).as_bytes()).is_err());
        assert!(read_client(Scheme::Ntlm, b"bm90IG50bG0=").is_err());
        assert!(read_client(Scheme::Negotiate, b"YIIBAAA=").is_err());
    }
}
