//! The session guard and the header rules end to end, over HTTP/1.1 and HTTP/2 with the same
//! assertions: every test runs once per protocol (both over TLS, ALPN choosing), so the two
//! transports cannot drift apart again (they once had two copies of the cookie replacement
//! and of X-Forwarded-Proto). The guard speaks HTTP/1.1 to Qlik either way; what Qlik
//! receives is read from the simulator.
//!
//! A browser here is a [`Link`]: over HTTP/1.1 every request on a connection of its own (so
//! parallel requests are parallel connections, as a browser's are), over HTTP/2 every request
//! a stream of one connection.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use qsguard::sim::ntlm::{Browser, Scheme};
use qsguard::sim::Simulator;
use qsguard::Guard;

/// The simulator, and the guard in front of it over TLS.
struct Bench {
    sim: Simulator,
    guard: Guard,
    client: Client,
    _cert: TestCert,
}

impl Bench {
    /// `server_extra` goes into `[server]`, `extra` after the virtual proxies.
    async fn start(proto: Proto, server_extra: &str, extra: &str) -> Bench {
        let sim = sim().await;
        let cert = TestCert::new();
        let guard = guard_with(&cert.config(&[sim.addr()], server_extra, extra)).await;
        let client = Client::tls(guard.addr, &cert, proto);
        Bench {
            sim,
            guard,
            client,
            _cert: cert,
        }
    }

    fn counter(
        &self,
        which: fn(&qsguard::session::Counters) -> &std::sync::atomic::AtomicU64,
    ) -> u64 {
        which(&session_guard(&self.guard).counters).load(Ordering::Relaxed)
    }

    async fn stop(self) {
        self.guard.shutdown().await;
    }
}

const HDR_COOKIE: &str = "X-Qlik-Session-hdr-HTTP";
const CENTRAL_COOKIE: &str = "X-Qlik-Session-HTTP";

/// The `Set-Cookie` values of a response that set `name`, as `name=value` pairs.
fn sets(r: &Resp, name: &str) -> Vec<String> {
    r.all("set-cookie")
        .iter()
        .map(|c| c.split(';').next().unwrap_or("").to_string())
        .filter(|p| p.starts_with(&format!("{name}=")))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The limit
// ---------------------------------------------------------------------------------------------

/// At `max_per_user` (3 here, below Qlik's 5, so the guard's own limit is what stops the
/// browser) a new browser of the user gets the guard's page, never a session; the page's
/// button ends one of the user's sessions and then the browser gets in.
#[tokio::test]
async fn the_limit_page_at_max_per_user() {
    for proto in Proto::BOTH {
        let b = Bench::start(
            proto,
            "",
            "[sessions]\non_limit = \"error\"\nmax_per_user = 3\n",
        )
        .await;
        let user = "CORP\\max";
        let mut browsers = Vec::new();
        for i in 0..3 {
            let mut jar = Jar::new();
            let r = b.client.browse_as("/hdr/hub/", &mut jar, user).await;
            assert_eq!(r.status, 200, "{proto:?}: browser {i}: {}", r.text());
            browsers.push(jar);
        }
        assert_eq!(b.sim.live_sessions(user), 3, "{proto:?}");
        let mut fourth = Jar::new();
        let page = b.client.browse_as("/hdr/hub/", &mut fourth, user).await;
        assert_eq!(page.status, 429, "{proto:?}: {}", page.text());
        let retry: u64 = page.header("retry-after").unwrap().parse().unwrap();
        assert!(retry > 0, "{proto:?}: retry-after {retry}");
        // The guard's own page says how long it is and when it was written, on both
        // transports (over HTTP/2 the guard sets them itself).
        assert_eq!(
            page.header("content-length"),
            Some(page.body.len().to_string()),
            "{proto:?}"
        );
        assert!(
            page.header("date").is_some_and(|d| d.ends_with(" GMT")),
            "{proto:?}: {:?}",
            page.header("date")
        );
        assert!(
            page.header("content-type")
                .unwrap()
                .starts_with("text/html"),
            "{proto:?}"
        );
        let text = page.text();
        assert!(
            text.contains("at most <strong>3</strong>"),
            "{proto:?}: {text}"
        );
        assert_eq!(
            text.matches("End this session").count(),
            3,
            "{proto:?}: the user's sessions are listed"
        );
        assert!(sets(&page, HDR_COOKIE).is_empty(), "{proto:?}: no session");
        let c = b.sim.counters();
        assert_eq!(
            c.sessions_created, 3,
            "{proto:?}: Qlik never saw the fourth"
        );
        assert_eq!(c.limit_refusals, 0, "{proto:?}");
        assert_eq!(b.counter(|c| &c.refused_at_limit), 1, "{proto:?}");
        // The browsers that have a session keep working.
        let r = b
            .client
            .browse_as("/hdr/hub/", &mut browsers[0], user)
            .await;
        assert_eq!(r.status, 200, "{proto:?}");
        assert_eq!(b.sim.counters().sessions_created, 3, "{proto:?}");

        // The page's button (over the same protocol) ends one; then the fourth browser gets in.
        let link = b.client.link().await;
        let cookie = cookie_header(&fourth);
        let form = |body: String| {
            let (link, cookie) = (link.clone(), cookie.clone());
            async move {
                link.post(
                    "/__qsguard/end-session",
                    &[
                        ("cookie", &cookie),
                        ("hdr-usr", user),
                        ("content-type", "application/x-www-form-urlencoded"),
                    ],
                    &body,
                )
                .await
            }
        };
        let csrf = between(&text, "name=\"csrf\" value=\"", "\"");
        let hash = between(&text, "name=\"session\" value=\"", "\"");
        let forged = form(format!("session={hash}&csrf=0000&return=%2Fhdr%2Fhub%2F")).await;
        assert_eq!(
            forged.status, 403,
            "{proto:?}: a wrong CSRF token ends nothing"
        );
        assert_eq!(b.sim.live_sessions(user), 3, "{proto:?}");
        let ended = form(format!("session={hash}&csrf={csrf}&return=%2Fhdr%2Fhub%2F")).await;
        assert_eq!(ended.status, 303, "{proto:?}: {}", ended.text());
        assert_eq!(
            ended.header("location").as_deref(),
            Some("/hdr/hub/"),
            "{proto:?}"
        );
        assert_eq!(b.sim.live_sessions(user), 2, "{proto:?}");
        let r = b.client.browse_as("/hdr/hub/", &mut fourth, user).await;
        assert_eq!(r.status, 200, "{proto:?}: {}", r.text());
        assert_eq!(b.sim.live_sessions(user), 3, "{proto:?}");
        assert_eq!(b.sim.counters().limit_refusals, 0, "{proto:?}");
        b.stop().await;
    }
}

/// `on_limit = "reuse"` (header authentication): cookie-less clients of one user past the
/// limit are attached to the user's sessions, none is refused, and Qlik never goes past it.
#[tokio::test]
async fn reuse_attaches_clients_past_the_limit_to_the_users_sessions() {
    for proto in Proto::BOTH {
        let b = Bench::start(
            proto,
            "",
            "[sessions]\non_limit = \"reuse\"\nmax_per_user = 3\n",
        )
        .await;
        let user = "CORP\\robot";
        for i in 0..5 {
            let path = format!("/hdr/hub/{i}");
            let r = b.client.browse_as(&path, &mut Jar::new(), user).await;
            assert_eq!(r.status, 200, "{proto:?}: client {i}: {}", r.text());
            assert!(r.text().contains(&path), "{proto:?}: client {i}");
        }
        let c = b.sim.counters();
        assert_eq!(c.sessions_created, 3, "{proto:?}");
        assert_eq!(c.limit_refusals, 0, "{proto:?}");
        assert_eq!(b.sim.live_sessions(user), 3, "{proto:?}");
        assert_eq!(b.counter(|c| &c.reused), 2, "{proto:?}");
        assert_eq!(
            session_guard(&b.guard).table.live_count("corp\\robot"),
            3,
            "{proto:?}"
        );
        b.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Restore, bursts, evicted and ended sessions
// ---------------------------------------------------------------------------------------------

/// A browser that lost its Qlik cookie (a restart) but kept the guard's device cookie gets its
/// own session back on the request (Qlik sees the old cookie) and set again in the browser,
/// with no login dance and no new session.
#[tokio::test]
async fn a_restarted_browser_gets_its_session_back_through_the_device_cookie() {
    for proto in Proto::BOTH {
        let b = Bench::start(proto, "", "").await;
        let mut jar = Jar::new();
        let r = b
            .client
            .browse_windows("/hub/", &mut jar, "CORP\\jane")
            .await;
        assert_eq!(r.status, 200, "{proto:?}");
        let session = jar_get(&jar, CENTRAL_COOKIE).expect("a session cookie");
        assert!(
            jar_get(&jar, "qsguard").is_some(),
            "{proto:?}: device cookie"
        );
        for i in 0..3 {
            let restarted = without(&jar, CENTRAL_COOKIE);
            let path = format!("/hub/stream/{i}");
            // No redirect is followed: the answer must come at once.
            let r = b
                .client
                .get(&path, &[("cookie", &cookie_header(&restarted))])
                .await;
            assert_eq!(r.status, 200, "{proto:?}: {}", r.text());
            assert!(r.text().contains(&path), "{proto:?}");
            assert_eq!(
                sets(&r, CENTRAL_COOKIE),
                vec![format!("{CENTRAL_COOKIE}={session}")],
                "{proto:?}: set back in the browser"
            );
            let sent = texts(&received(&b.sim, &path), "cookie");
            assert!(
                sent.len() == 1 && sent[0].contains(&format!("{CENTRAL_COOKIE}={session}")),
                "{proto:?}: Qlik got the session: {sent:?}"
            );
        }
        let c = b.sim.counters();
        assert_eq!(c.sessions_created, 1, "{proto:?}: one session, not four");
        assert_eq!(c.limit_refusals, 0, "{proto:?}");
        assert_eq!(b.sim.live_sessions("CORP\\jane"), 1, "{proto:?}");
        assert_eq!(b.counter(|c| &c.restored), 3, "{proto:?}");
        b.stop().await;
    }
}

/// Eight parallel page requests of one browser whose session died (over HTTP/2: eight streams
/// of one connection) make one new session, and each ends on the page it asked for: with
/// Windows authentication after Qlik ended the session behind the guard's back (the logins of
/// the burst are held while the first one dances), and with header authentication after a
/// logout through the guard (the cookie is known dead).
#[tokio::test]
async fn one_browsers_parallel_logins_make_one_session() {
    for proto in Proto::BOTH {
        let b = Bench::start(proto, "", "").await;
        let cases = [
            ("/", None, "CORP\\burst"),
            ("/hdr/", Some("hdr-usr"), "CORP\\hb"),
        ];
        for (prefix, header, user) in cases {
            let what = format!("{proto:?} {prefix}");
            let mut jar = Jar::new();
            // Windows authentication: a browser logged on as `user`; else the header.
            let windows = header.is_none().then(|| Browser::new(user, Scheme::Ntlm));
            let extra: Vec<(&str, &str)> = header.map(|h| (h, user)).into_iter().collect();
            let r = b
                .client
                .link()
                .await
                .browse_with(&format!("{prefix}hub/"), &mut jar, &extra, windows.as_ref())
                .await;
            assert_eq!(r.status, 200, "{what}");
            if prefix == "/" {
                // An admin, a QPS restart...: Qlik sends the browser to log in again.
                let id = b.sim.session_ids(user)[0].clone();
                end_in_qlik(&b.sim, "", &id).await;
            } else {
                let r = b.client.logout(prefix, &jar, Some(user)).await;
                assert_eq!(r.status, 200, "{what}");
            }
            assert_eq!(b.sim.live_sessions(user), 0, "{what}");
            let before = b.sim.counters().sessions_created;
            let link = b.client.link().await;
            let mut tasks = Vec::new();
            for i in 0..8 {
                let (link, mut jar) = (link.clone(), jar.clone());
                let (windows, extra) = (windows.clone(), extra.clone());
                let path = format!("{prefix}hub/page{i}");
                tasks.push(tokio::spawn(async move {
                    let r = link
                        .browse_with(&path, &mut jar, &extra, windows.as_ref())
                        .await;
                    (path, r)
                }));
            }
            for t in tasks {
                let (path, r) = t.await.unwrap();
                assert_eq!(r.status, 200, "{what}: {path}: {}", r.text());
                assert!(
                    r.text().contains(&path),
                    "{what}: ends on the page it asked for: {}",
                    r.text()
                );
            }
            let c = b.sim.counters();
            assert_eq!(
                c.sessions_created - before,
                1,
                "{what}: one new session for the whole burst"
            );
            assert_eq!(c.limit_refusals, 0, "{what}");
            assert_eq!(b.sim.live_sessions(user), 1, "{what}");
        }
        assert!(b.counter(|c| &c.bursts_held) > 0, "{proto:?}");
        b.stop().await;
    }
}

/// `on_limit = "evict"`: the user's least recently active session goes to make room for a new
/// browser; the evicted browser, coming back with its dead cookie, is not handed anything
/// dead and gets a session again within the limit; a session ended in Qlik behind the guard's
/// back is replaced, and the guard's count follows Qlik's.
#[tokio::test]
async fn evicted_and_ended_sessions_are_replaced_within_the_limit() {
    for proto in Proto::BOTH {
        let b = Bench::start(
            proto,
            "",
            "[sessions]\non_limit = \"evict\"\nmax_per_user = 3\n",
        )
        .await;
        let user = "CORP\\eve";
        let live = |b: &Bench| session_guard(&b.guard).table.live_count("corp\\eve");
        let mut jars = Vec::new();
        for _ in 0..3 {
            let mut jar = Jar::new();
            let r = b.client.browse_as("/hdr/hub/", &mut jar, user).await;
            assert_eq!(r.status, 200, "{proto:?}");
            jars.push(jar);
            // The table's clock counts milliseconds: keep the activity apart.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let oldest = jar_get(&jars[0], HDR_COOKIE).unwrap();
        let mut fourth = Jar::new();
        let r = b.client.browse_as("/hdr/hub/new", &mut fourth, user).await;
        assert_eq!(r.status, 200, "{proto:?}: {}", r.text());
        let ids = b.sim.session_ids(user);
        assert_eq!(ids.len(), 3, "{proto:?}");
        assert!(
            !ids.contains(&oldest),
            "{proto:?}: the least recently active went"
        );
        let c = b.sim.counters();
        assert_eq!(c.sessions_created, 4, "{proto:?}");
        assert_eq!(c.logouts, 1, "{proto:?}: ended with its own cookie");
        assert_eq!(c.limit_refusals, 0, "{proto:?}");
        assert_eq!(b.counter(|c| &c.evicted), 1, "{proto:?}");
        assert_eq!(live(&b), 3, "{proto:?}");

        // The evicted browser comes back with its dead cookie.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let r = b
            .client
            .browse_as("/hdr/hub/back", &mut jars[0], user)
            .await;
        assert_eq!(r.status, 200, "{proto:?}: {}", r.text());
        assert!(r.text().contains("/hdr/hub/back"), "{proto:?}");
        let again = jar_get(&jars[0], HDR_COOKIE).unwrap();
        assert_ne!(again, oldest, "{proto:?}: a new session, not the dead one");
        assert!(b.sim.session_ids(user).contains(&again), "{proto:?}");
        assert_eq!(b.sim.live_sessions(user), 3, "{proto:?}");
        assert_eq!(b.sim.counters().limit_refusals, 0, "{proto:?}");
        assert_eq!(live(&b), 3, "{proto:?}");

        // Qlik ends the fourth browser's session behind the guard's back.
        let gone = jar_get(&fourth, HDR_COOKIE).unwrap();
        end_in_qlik(&b.sim, "hdr", &gone).await;
        assert_eq!(b.sim.live_sessions(user), 2, "{proto:?}");
        let r = b
            .client
            .browse_as("/hdr/hub/after", &mut fourth, user)
            .await;
        assert_eq!(r.status, 200, "{proto:?}: {}", r.text());
        let replaced = jar_get(&fourth, HDR_COOKIE).unwrap();
        assert_ne!(replaced, gone, "{proto:?}");
        assert_eq!(b.sim.live_sessions(user), 3, "{proto:?}");
        eventually("the guard's count following Qlik's", || live(&b) == 3).await;
        assert_eq!(b.sim.counters().limit_refusals, 0, "{proto:?}");
        b.stop().await;
    }
}

/// With several `Cookie` fields, a restore puts the browser's session in place of the pair
/// that was changed on the way, where it stands (the second field here), every other byte
/// kept: not appended to the first field next to the stale pair. Over HTTP/2 the fields are
/// first joined into one (RFC 9113 8.2.3), so the joined value is the same for both.
#[tokio::test]
async fn with_several_cookie_fields_a_restore_replaces_the_pair_where_it_stands() {
    for proto in Proto::BOTH {
        let b = Bench::start(proto, "", "").await;
        let user = "CORP\\fields";
        let mut jar = Jar::new();
        let r = b.client.browse_as("/hdr/hub/", &mut jar, user).await;
        assert_eq!(r.status, 200, "{proto:?}");
        let session = jar_get(&jar, HDR_COOKIE).unwrap();
        let device = jar_get(&jar, "qsguard").unwrap();
        let stale = format!("b=2; {HDR_COOKIE}=changed-on-the-way; c=3");
        let dev = format!("qsguard={device}");
        let r = b
            .client
            .get(
                "/hdr/hub/fields",
                &[
                    ("hdr-usr", user),
                    ("cookie", "a=1"),
                    ("cookie", &stale),
                    ("cookie", &dev),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{proto:?}: {}", r.text());
        assert_eq!(
            sets(&r, HDR_COOKIE),
            vec![format!("{HDR_COOKIE}={session}")],
            "{proto:?}: set back in the browser"
        );
        let fields = texts(&received(&b.sim, "/hdr/hub/fields"), "cookie");
        assert_eq!(
            fields.join("; "),
            format!("a=1; b=2; {HDR_COOKIE}={session}; c=3; qsguard={device}"),
            "{proto:?}: the pair replaced where it stood: {fields:?}"
        );
        let expected_fields = match proto {
            Proto::Http1 => 3,
            Proto::Http2 => 1,
        };
        assert_eq!(fields.len(), expected_fields, "{proto:?}: {fields:?}");
        assert_eq!(b.sim.counters().sessions_created, 1, "{proto:?}");
        assert_eq!(b.counter(|c| &c.restored), 1, "{proto:?}");
        assert_eq!(events(&b.guard, "cookie_modified").len(), 1, "{proto:?}");
        b.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Header rules
// ---------------------------------------------------------------------------------------------

/// Hop-by-hop fields stop at the guard, both ways. Requests: over HTTP/1.1 the
/// connection-specific fields and those `Connection` names are removed; HTTP/2 forbids them
/// (RFC 9113 8.2.2; a request with them is refused, see h2_framing.rs), so there only
/// `te: trailers` can come, and it is removed too. Responses: Qlik's hop-by-hop fields (here
/// from a scripted origin, the simulator sends none) never reach the client, end-to-end ones
/// and every `Set-Cookie` do.
#[tokio::test]
async fn hop_by_hop_fields_stop_at_the_guard_both_ways() {
    const HOP: [&str; 7] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "x-hop",
    ];
    for proto in Proto::BOTH {
        let b = Bench::start(proto, "", "").await;
        let mut sent = vec![("te", "trailers"), ("x-end-to-end", "kept")];
        if proto == Proto::Http1 {
            sent.extend([
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "secret"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
            ]);
        }
        let r = b.client.get("/__sim/echo", &sent).await;
        assert_eq!(r.status, 200, "{proto:?}: {}", r.text());
        let h = received(&b.sim, "/__sim/echo");
        for gone in HOP {
            assert!(
                values(&h, gone).is_empty(),
                "{proto:?}: {gone} reached Qlik"
            );
        }
        assert_eq!(texts(&h, "x-end-to-end"), ["kept"], "{proto:?}");
        b.stop().await;

        let origin = scripted_origin(|_| {
            (
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret\r\n\
Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTrailer: X-Checksum\r\n\
Set-Cookie: a=1\r\nX-End-To-End: kept\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok"
                    .to_vec(),
                false,
            )
        })
        .await;
        let cert = TestCert::new();
        let guard = guard_with(&cert.config(&[origin], "", "")).await;
        let r = Client::tls(guard.addr, &cert, proto)
            .get("/answer", &[])
            .await;
        assert_eq!(r.status, 200, "{proto:?}");
        assert_eq!(r.text(), "ok", "{proto:?}");
        for gone in HOP {
            assert!(
                r.all(gone).is_empty(),
                "{proto:?}: {gone} reached the client"
            );
        }
        assert_eq!(r.all("x-end-to-end"), vec!["kept"], "{proto:?}");
        let cookies = r.all("set-cookie");
        assert_eq!(cookies[..2], ["a=1", "b=2"], "{proto:?}");
        guard.shutdown().await;
    }
}

/// Every `Set-Cookie` of Qlik's reaches the browser as it was, in order, as many as there
/// were (a name set twice, an exact duplicate, an `Expires` with its comma: none folded or
/// dropped), and the guard's device cookie comes after them, once.
#[tokio::test]
async fn set_cookie_order_and_multiplicity_are_kept() {
    let set = [
        "a=1; Path=/",
        "b=2; HttpOnly",
        "a=3; Path=/x",
        "a=1; Path=/",
        "third=\"q=1\"; Secure; SameSite=None",
        "e=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/",
    ];
    let query: Vec<String> = set
        .iter()
        .map(|s| format!("set_cookie={}", urlencode(s)))
        .collect();
    let path = format!("/__sim/echo?{}", query.join("&"));
    for proto in Proto::BOTH {
        let b = Bench::start(proto, "", "").await;
        let r = b.client.get(&path, &[]).await;
        assert_eq!(r.status, 200, "{proto:?}");
        let all = r.all("set-cookie");
        assert_eq!(all.len(), set.len() + 1, "{proto:?}: {all:?}");
        assert_eq!(
            all[..set.len()],
            set,
            "{proto:?}: Qlik's, unchanged and in order"
        );
        assert!(all[set.len()].starts_with("qsguard="), "{proto:?}: {all:?}");
        // A browser that has its device cookie gets Qlik's alone.
        let device = all[set.len()].split(';').next().unwrap().to_string();
        let r = b.client.get(&path, &[("cookie", &device)]).await;
        assert_eq!(r.all("set-cookie"), set, "{proto:?}");
        b.stop().await;
    }
}

/// From a trusted proxy, the X-Forwarded-For chain is continued and the last X-Forwarded-Proto
/// (the one the nearest proxy wrote) is kept; from anyone else both are the guard's own: the
/// peer's address and the scheme it used (https here).
#[tokio::test]
async fn a_trusted_x_forwarded_proto_keeps_its_last_value() {
    let claims = [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-proto", "http"),
        ("x-forwarded-for", "198.51.100.9"),
        ("x-forwarded-for", "203.0.113.5"),
        ("x-forwarded-host", "portal.example.com"),
    ];
    for proto in Proto::BOTH {
        let b = Bench::start(proto, "trusted_proxies = [\"127.0.0.0/8\"]", "").await;
        let r = b.client.get("/__sim/echo", &claims).await;
        assert_eq!(r.status, 200, "{proto:?}");
        let h = received(&b.sim, "/__sim/echo");
        assert_eq!(texts(&h, "x-forwarded-proto"), ["http"], "{proto:?}");
        assert_eq!(
            texts(&h, "x-forwarded-for"),
            ["198.51.100.9, 203.0.113.5, 127.0.0.1"],
            "{proto:?}"
        );
        assert_eq!(
            texts(&h, "x-forwarded-host"),
            ["portal.example.com"],
            "{proto:?}"
        );
        b.stop().await;

        let b = Bench::start(proto, "", "").await;
        let r = b.client.get("/__sim/echo", &claims).await;
        assert_eq!(r.status, 200, "{proto:?}");
        let h = received(&b.sim, "/__sim/echo");
        assert_eq!(texts(&h, "x-forwarded-proto"), ["https"], "{proto:?}");
        assert_eq!(texts(&h, "x-forwarded-for"), ["127.0.0.1"], "{proto:?}");
        assert_eq!(
            texts(&h, "x-forwarded-host"),
            ["qlik.example.com"],
            "{proto:?}"
        );
        b.stop().await;
    }
}
