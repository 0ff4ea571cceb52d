//! Header operations on the way through: hop-by-hop removal, the X-Forwarded-* chain, and the
//! HTTP/2 cookie join. Each is a small function with its own tests, because each one is a place
//! where a proxy can quietly break Qlik (a lost cookie, a wrong Host, a forged client address).

use std::net::IpAddr;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// The fields RFC 9110 7.6.1 names as connection-specific, plus the legacy ones browsers and
/// old proxies still send.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop fields, including every field named in any `Connection` header.
/// `Host` is never removed: Qlik needs it, and a client that names it in `Connection` is
/// trying to make the proxy forward a request without one.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|t| HeaderName::from_bytes(trim(t)).ok())
            .filter(|n| n != header::HOST)
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

/// Is this request asking for a WebSocket (or other) protocol upgrade?
pub fn upgrade_requested(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| trim(t).eq_ignore_ascii_case(b"upgrade"))
    });
    if wants {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Puts back the two fields an upgrade needs, after the hop-by-hop removal took them out.
pub fn restore_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// HTTP/2 may split `cookie` into several fields (RFC 9113 8.2.3); an HTTP/1.1 upstream must get
/// one field, joined with "; ". The bytes of each cookie stay as they are.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = BytesMut::from(first.as_bytes());
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    // Built only from valid field values and "; ": still a valid field value.
    if let Ok(v) = HeaderValue::from_maybe_shared(joined.freeze()) {
        headers.insert(header::COOKIE, v);
    }
}

/// Which peers may hand us an X-Forwarded-* chain.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets X-Forwarded-For/-Proto/-Host. From a trusted peer the chain is kept and the peer
/// appended; from anyone else whatever the client sent is replaced, so a client cannot claim
/// another address.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted: &TrustedProxies,
    tls: bool,
    host: Option<&HeaderValue>,
) {
    let peer = canonical(peer);
    let trust = trusted.trusts(peer);
    let mut peer_text = peer.to_string();
    if trust && headers.contains_key(&X_FORWARDED_FOR) {
        let mut chain = BytesMut::new();
        for v in headers.get_all(&X_FORWARDED_FOR).iter() {
            if !chain.is_empty() {
                chain.extend_from_slice(b", ");
            }
            chain.extend_from_slice(v.as_bytes());
        }
        chain.extend_from_slice(b", ");
        chain.extend_from_slice(peer_text.as_bytes());
        peer_text = String::from_utf8_lossy(&chain).into_owned();
    }
    if let Ok(v) = HeaderValue::from_str(&peer_text) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if !(trust && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
    }
    if !(trust && headers.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
}

use crate::proxy::h1::parse::trim_ows as trim;

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("connection", "X-Other"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-connection", "keep-alive"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("cookie", "X-Qlik-Session=abc"),
            ("host", "qlik"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["cookie", "host"]);
    }

    #[test]
    fn host_survives_being_named_in_connection() {
        let mut h = map(&[("connection", "host, close"), ("host", "qlik.example.com")]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.get("host").unwrap(), "qlik.example.com");
    }

    #[test]
    fn upgrade_detection_and_restore() {
        let mut h = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        let proto = upgrade_requested(&h).unwrap();
        remove_hop_by_hop(&mut h);
        assert!(h.get("upgrade").is_none());
        restore_upgrade(&mut h, proto);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
        assert!(upgrade_requested(&map(&[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn split_cookies_are_joined_bytes_intact() {
        let mut h = map(&[
            ("cookie", "X-Qlik-Session=a=b\"c"),
            ("cookie", "qsguard=0123"),
            ("cookie", "z="),
        ]);
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(all, vec!["X-Qlik-Session=a=b\"c; qsguard=0123; z="]);
        let mut one = map(&[("cookie", "a=1;b=2")]);
        join_cookies(&mut one);
        assert_eq!(one.get("cookie").unwrap(), "a=1;b=2");
    }

    #[test]
    fn forwarded_from_untrusted_peer_is_replaced() {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
        ]);
        let host = HeaderValue::from_static("qlik.example.com");
        set_forwarded(
            &mut h,
            "192.0.2.7".parse().unwrap(),
            &trusted,
            false,
            Some(&host),
        );
        assert_eq!(h.get("x-forwarded-for").unwrap(), "192.0.2.7");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "qlik.example.com");
    }

    #[test]
    fn forwarded_from_trusted_peer_is_appended() {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]);
        let mut h = map(&[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "10.1.1.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "portal.example.com"),
        ]);
        let host = HeaderValue::from_static("qlik-internal");
        // An IPv4-mapped IPv6 peer is the IPv4 address for the trust check.
        set_forwarded(
            &mut h,
            "::ffff:10.2.2.2".parse().unwrap(),
            &trusted,
            false,
            Some(&host),
        );
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "198.51.100.1, 10.1.1.1, 10.2.2.2"
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(h.get("x-forwarded-host").unwrap(), "portal.example.com");
    }
}
