//! Windows authentication as the guard sees it pass: which `Authorization` and
//! `WWW-Authenticate` values belong to a connection-bound handshake (NTLM, and Negotiate,
//! which falls back to NTLM wherever Kerberos is not set up), and whom an NTLM
//! AUTHENTICATE_MESSAGE (Type 3) names.
//!
//! NTLM authenticates the TCP connection, not a request: the server keeps its challenge per
//! connection, so the proxy must keep the legs of a handshake on one upstream connection and
//! never hand that connection to anyone else (`proxy::bound`). The Type 3 carries the domain
//! and user names in clear (MS-NLMP 2.2.1.3), also inside SPNEGO, which lets the session
//! guard know the user before Qlik makes a session. A Kerberos ticket names nobody the guard
//! can read. Tokens are read in place and never kept, logged or compared.

use crate::head_view::HeadView;

const SIGNATURE: &[u8] = b"NTLMSSP\0";
const NEGOTIATE_UNICODE: u32 = 0x0000_0001;

/// Whether an `Authorization` or `WWW-Authenticate` value is of a connection-bound scheme.
pub fn is_connection_auth(value: &[u8]) -> bool {
    let value = value.trim_ascii_start();
    let scheme_end = value.iter().position(|b| *b == b' ').unwrap_or(value.len());
    let scheme = &value[..scheme_end];
    scheme.eq_ignore_ascii_case(b"NTLM") || scheme.eq_ignore_ascii_case(b"Negotiate")
}

/// A request in a connection-bound handshake: it carries `Authorization: NTLM|Negotiate`.
pub fn request_binds<H: HeadView>(head: &H) -> bool {
    head.values("authorization").any(is_connection_auth)
}

/// A response that starts or continues a connection-bound handshake: a `401` offering NTLM
/// or Negotiate (with or without a challenge).
pub fn response_binds<H: HeadView>(status: u16, head: &H) -> bool {
    status == 401 && head.values("www-authenticate").any(is_connection_auth)
}

/// Qlik's Windows authentication module, `/<prefix/>internal_windows_authentication/`, where
/// the NTLM / Negotiate handshake happens.
pub fn is_windows_auth_path(path: &str) -> bool {
    let mut segments = path.trim_start_matches('/').split('/');
    let module = "internal_windows_authentication";
    segments.next() == Some(module) || segments.next() == Some(module)
}

/// A request that cannot be served over HTTP/2: a connection-bound handshake needs one TCP
/// connection per client, and HTTP/2 multiplexes clients' streams over shared state (RFC
/// 9113 `HTTP_1_1_REQUIRED`, what IIS answers).
pub fn needs_http1<H: HeadView>(path: &str, head: &H) -> bool {
    is_windows_auth_path(path) || request_binds(head)
}

/// The (domain, user) an `Authorization: NTLM|Negotiate <Type 3>` names; `None` for any
/// other value (a Type 1, a Kerberos ticket, an anonymous Type 3, something malformed).
pub fn authenticate_user(value: &[u8]) -> Option<(String, String)> {
    let value = value.trim_ascii();
    let space = value.iter().position(|b| *b == b' ')?;
    if !is_connection_auth(&value[..space]) {
        return None;
    }
    let token = decode_base64(value[space..].trim_ascii())?;
    // Raw NTLMSSP, or NTLMSSP inside SPNEGO: the message's offsets count from its signature.
    let at = token
        .windows(SIGNATURE.len())
        .position(|w| w == SIGNATURE)?;
    let msg = &token[at..];
    if le32(msg, 8)? != 3 {
        return None;
    }
    let flags = le32(msg, 60)?;
    let domain = name(msg, 28, flags)?;
    let user = name(msg, 36, flags)?;
    (!user.is_empty()).then_some((domain, user))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The text a security buffer (length, maximum length, offset) at `field` points at.
fn name(msg: &[u8], field: usize, flags: u32) -> Option<String> {
    let len = u16::from_le_bytes(msg.get(field..field + 2)?.try_into().ok()?) as usize;
    let off = le32(msg, field + 4)? as usize;
    let bytes = msg.get(off..off.checked_add(len)?)?;
    let text = if flags & NEGOTIATE_UNICODE != 0 {
        if !len.is_multiple_of(2) {
            return None;
        }
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).ok()?
    } else {
        std::str::from_utf8(bytes).ok()?.to_string()
    };
    // A name with a backslash or a control character names no Qlik user.
    (!text.chars().any(|c| c == '\\' || c.is_control())).then_some(text)
}

fn decode_base64(s: &[u8]) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s
        .strip_suffix(b"==")
        .or_else(|| s.strip_suffix(b"="))
        .unwrap_or(s);
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in s {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::ntlm::{Browser, Scheme};

    #[test]
    fn windows_auth_paths() {
        assert!(is_windows_auth_path("/internal_windows_authentication/"));
        assert!(is_windows_auth_path(
            "/win/internal_windows_authentication/"
        ));
        assert!(is_windows_auth_path("/internal_windows_authentication"));
        assert!(!is_windows_auth_path("/hub/"));
        assert!(!is_windows_auth_path(
            "/a/b/internal_windows_authentication/"
        ));
        assert!(!is_windows_auth_path("/internal_forms_authentication/"));
    }

    #[test]
    fn schemes() {
        assert!(is_connection_auth(b"NTLM TlRMTVNTUAAB"));
        assert!(is_connection_auth(b"negotiate YIIB"));
        assert!(is_connection_auth(b"Negotiate"));
        assert!(!is_connection_auth(b"NTLMx abc"));
        assert!(!is_connection_auth(b"Basic dXNlcjpwYXNz"));
        assert!(!is_connection_auth(b"Bearer x"));
    }

    /// The simulator's browser is the referee's encoder: the guard's reader, written apart,
    /// must find the names in both wrappings, and nothing in a Type 1.
    #[test]
    fn the_type_3_names_its_user() {
        for scheme in [Scheme::Ntlm, Scheme::Negotiate] {
            let b = Browser::new("CORP\\Jäne", scheme);
            assert_eq!(authenticate_user(b.negotiate().as_bytes()), None);
            // A challenge as a server would send it (any challenge will do for the names).
            let mut type2 = b"NTLMSSP\0\x02\0\0\0".to_vec();
            type2.resize(56, 0);
            let www = format!("{} {}", scheme.name(), crate::sim::ntlm::b64_encode(&type2));
            let a3 = b.authenticate([www.as_bytes()]).expect("a type 3");
            assert_eq!(
                authenticate_user(a3.as_bytes()),
                Some(("CORP".into(), "Jäne".into())),
                "{scheme:?}"
            );
        }
        assert_eq!(authenticate_user(b"NTLM !!!"), None);
        assert_eq!(authenticate_user(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(authenticate_user(b"Negotiate YIIBAAA="), None);
    }
}
