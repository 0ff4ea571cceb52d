//! Who a request or a session belongs to: Qlik's (UserDirectory, UserId), compared without
//! regard to case as Qlik does, and the header-authentication value that carries it.

use std::fmt;
use std::sync::Arc;

/// A Qlik user. `key` is the lower-cased `dir\id` used for counting; `dir` and `id` keep the
/// spelling first seen, for display.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct User {
    pub key: Arc<str>,
    pub dir: Arc<str>,
    pub id: Arc<str>,
}

impl User {
    pub fn new(dir: &str, id: &str) -> User {
        User {
            key: format!("{}\\{}", dir.to_lowercase(), id.to_lowercase()).into(),
            dir: dir.into(),
            id: id.into(),
        }
    }

    /// Parses `DIRECTORY\userid` as header authentication (dynamic mode) expects it: US-ASCII,
    /// exactly one backslash, both parts non-empty, no control characters.
    pub fn parse(value: &[u8]) -> Result<User, &'static str> {
        if !value.is_ascii() {
            return Err("the identity header must be US-ASCII");
        }
        if value.iter().any(|&b| b.is_ascii_control()) {
            return Err("the identity header has a control character");
        }
        let text =
            std::str::from_utf8(value).map_err(|_| "the identity header must be US-ASCII")?;
        let text = text.trim();
        let mut parts = text.split('\\');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(dir), Some(id), None) if !dir.trim().is_empty() && !id.trim().is_empty() => {
                Ok(User::new(dir.trim(), id.trim()))
            }
            _ => Err("the identity header must be DIRECTORY\\userid"),
        }
    }
}

impl fmt::Display for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\\{}", self.dir, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_compares_without_case() {
        let a = User::parse(b"CORP\\Jane").unwrap();
        let b = User::parse(b" corp\\JANE ").unwrap();
        assert_eq!(a.key, b.key);
        assert_eq!(a.to_string(), "CORP\\Jane");
    }

    #[test]
    fn rejects_what_qlik_would_not_take() {
        for bad in [
            &b"jane"[..],
            b"CORP\\",
            b"\\jane",
            b"A\\B\\C",
            "CORP\\j\u{e4}ne".as_bytes(),
            b"CORP\\ja\tne",
            b"",
        ] {
            assert!(
                User::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

/// Where each header-authentication virtual proxy's identity header may come from
/// (`identity_from`, else `server.trusted_proxies`). Qlik believes the header from anyone who
/// reaches it, so the guard is where the rule is kept: from any other peer the header is
/// removed before Qlik sees it ([`IdentitySources::drops`]), and the guard ignores it.
#[derive(Debug, Clone, Default)]
pub struct IdentitySources(Vec<(http::HeaderName, Option<Vec<ipnet::IpNet>>)>);

impl IdentitySources {
    /// From the config; `None` nets (neither key set) believe every peer, with a warning at
    /// start ([`IdentitySources::open_headers`]).
    pub fn new(config: &crate::config::Config) -> IdentitySources {
        let trusted = &config.server.trusted_proxies;
        IdentitySources(
            config
                .virtual_proxies_or_default()
                .into_iter()
                .filter_map(|v| {
                    let h = http::HeaderName::from_bytes(v.identity_header?.as_bytes()).ok()?;
                    let from = v
                        .identity_from
                        .or_else(|| (!trusted.is_empty()).then(|| trusted.clone()));
                    Some((h, from))
                })
                .collect(),
        )
    }

    /// Whether `header` (an identity header) is believed from `peer`.
    pub fn believes(&self, header: &http::HeaderName, peer: std::net::IpAddr) -> bool {
        let peer = match peer {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(peer),
            v4 => v4,
        };
        self.0.iter().filter(|(h, _)| h == header).all(|(_, from)| {
            from.as_ref()
                .is_none_or(|n| n.iter().any(|n| n.contains(&peer)))
        })
    }

    /// Whether a request field called `name` from `peer` is an identity header not believed
    /// from there (it does not go to Qlik).
    pub fn drops(&self, name: &[u8], peer: std::net::IpAddr) -> bool {
        !self.0.is_empty()
            && self.0.iter().any(|(h, _)| {
                h.as_str().as_bytes().eq_ignore_ascii_case(name) && !self.believes(h, peer)
            })
    }

    /// Identity headers believed from every peer (neither `identity_from` nor
    /// `trusted_proxies` set): the guard warns about them at start.
    pub fn open_headers(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(_, from)| from.is_none())
            .map(|(h, _)| h.as_str())
            .collect()
    }
}
