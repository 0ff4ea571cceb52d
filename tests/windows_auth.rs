//! Windows authentication through the guard, against the simulator's connection-bound NTLM
//! handshake: logins at nine o'clock (many browsers at once, the pool cold or busy), an
//! authenticated upstream connection never serving another client, and NTLM over HTTP/2.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use qsguard::sim::ntlm::{Browser, Scheme};

const WIN: &str = "X-Qlik-Session-HTTP";

/// `n` browsers of `n` users `CORP\<tag><i>` log in at the same moment, half with NTLM, half
/// with Negotiate; returns (logins that ended on the hub, the slowest login).
async fn logins_at_once(addr: std::net::SocketAddr, n: usize, tag: &str) -> (usize, Duration) {
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let start = start.clone();
        let user = format!("CORP\\{tag}{i}");
        tasks.push(tokio::spawn(async move {
            let scheme = if i % 2 == 0 {
                Scheme::Ntlm
            } else {
                Scheme::Negotiate
            };
            let browser = Browser::new(&user, scheme);
            let mut jar = Jar::new();
            start.wait().await;
            let t = Instant::now();
            let r = Client::plain(addr)
                .link()
                .await
                .browse_with("/hub/", &mut jar, &[], Some(&browser))
                .await;
            let ok = r.status == 200 && r.text().contains(&user);
            (ok && jar_get(&jar, WIN).is_some(), t.elapsed())
        }));
    }
    let mut ok = 0;
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (good, took) = t.await.unwrap();
        ok += good as usize;
        slowest = slowest.max(took);
    }
    (ok, slowest)
}

/// Rounds of 20 simultaneous logins: every one gets in as its own user, no handshake fails.
async fn rounds(
    sim: &qsguard::sim::Simulator,
    addr: std::net::SocketAddr,
    tag: &str,
    rounds: usize,
) {
    for round in 0..rounds {
        let before = sim.counters();
        let tag = format!("{tag}{round}x");
        let (ok, slowest) = logins_at_once(addr, 20, &tag).await;
        let c = sim.counters();
        let failures = c.ntlm_failures() - before.ntlm_failures();
        eprintln!(
            "round {round}: {ok}/20 logged in, {} without a challenge, {} with another's, slowest {slowest:?}",
            c.ntlm_no_challenge - before.ntlm_no_challenge,
            c.ntlm_bad_answer - before.ntlm_bad_answer,
        );
        assert_eq!(
            (ok, failures),
            (20, 0),
            "round {round}: logins that got in, handshakes that failed"
        );
        assert_eq!(c.ntlm_handshakes - before.ntlm_handshakes, 20);
        for i in 0..20 {
            assert_eq!(sim.live_sessions(&format!("CORP\\{tag}{i}")), 1);
        }
        assert!(
            slowest < Duration::from_secs(5),
            "round {round}: a login took {slowest:?}"
        );
    }
    assert_eq!(sim.counters().limit_refusals, 0);
}

#[tokio::test]
async fn twenty_browsers_log_in_at_once() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    rounds(&sim, guard.addr, "nine", 5).await;
    guard.shutdown().await;
}

#[tokio::test]
async fn twenty_browsers_log_in_while_the_pool_is_busy() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut load = Load::default();
    load.users(guard.addr, 8, "busy");
    load.reaches("the pool is warm", 40).await;
    rounds(&sim, guard.addr, "warm", 5).await;
    assert_eq!(load.stop().await, 0, "the other traffic went on");
    guard.shutdown().await;
}

fn get_req(path: &str, auth: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::get(path).header("host", "qlik.example.com");
    if let Some(a) = auth {
        b = b.header("authorization", a);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

/// The serial number of the upstream connection `/__sim/echo` came on.
fn upstream_conn(r: &Resp) -> u64 {
    r.json()["connection"]
        .as_u64()
        .expect("the echo names its connection")
}

/// A client connection whose handshake has started owns its upstream connection: many other
/// clients hammering the node never get it (so never replace its challenge), the owner's
/// next requests go over it, and the Type 3 completes.
#[tokio::test]
async fn an_authenticated_upstream_connection_serves_no_other_client() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let client = Client::plain(guard.addr);
    let login = client.get("/hub/", &[]).await;
    let auth = login.header("location").expect("to the login");
    let jane = Browser::new("CORP\\jane", Scheme::Ntlm);
    let mut owner = client.h1_conn().await.unwrap();
    let r = owner
        .send(get_req(&auth, Some(&jane.negotiate())))
        .await
        .unwrap();
    assert_eq!(r.status, 401);
    let www: Vec<Vec<u8>> = r
        .headers
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.as_bytes().to_vec())
        .collect();
    let mine = upstream_conn(&owner.send(get_req("/__sim/echo", None)).await.unwrap());
    // Others, on connections of their own, many at once.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut c = client.h1_conn().await.unwrap();
            for _ in 0..10 {
                seen.push(upstream_conn(
                    &c.send(get_req("/__sim/echo", None)).await.unwrap(),
                ));
            }
            seen
        }));
    }
    for t in tasks {
        let seen = t.await.unwrap();
        assert!(
            !seen.contains(&mine),
            "another client's request went over the authenticated connection"
        );
    }
    let again = upstream_conn(&owner.send(get_req("/__sim/echo", None)).await.unwrap());
    assert_eq!(again, mine, "the owner's requests keep to its connection");
    let a3 = jane
        .authenticate(www.iter().map(Vec::as_slice))
        .expect("a challenge");
    let r = owner.send(get_req(&auth, Some(&a3))).await.unwrap();
    assert_eq!(r.status, 302, "{}", r.text());
    assert_eq!(sim.counters().ntlm_failures(), 0);
    // Its owner gone, the connection goes too: nobody else ever gets it.
    drop(owner);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..20 {
        let r = client.get("/__sim/echo", &[]).await;
        assert_ne!(upstream_conn(&r), mine);
    }
    guard.shutdown().await;
}

static AFTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A Qlik node that closes the connection right after its NTLM challenge.
fn closes_after_challenge(path: &str) -> (Vec<u8>, bool) {
    match path {
        "/hub/ntlm" => (
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: NTLM\r\nContent-Length: 0\r\n\r\n"
                .to_vec(),
            true,
        ),
        "/hub/after" => {
            AFTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                false,
            )
        }
        _ => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
            false,
        ),
    }
}

/// The private connection breaks: the client connection is closed with it, and its next
/// request never goes to another upstream connection.
#[tokio::test]
async fn a_broken_private_connection_closes_the_client_connection() {
    let origin = scripted_origin(closes_after_challenge).await;
    let guard = guard(origin).await;
    let type1 = Browser::new("CORP\\jane", Scheme::Ntlm).negotiate();
    let two = format!(
        "GET /hub/ntlm HTTP/1.1\r\nHost: q\r\nAuthorization: {type1}\r\n\r\n\
         GET /hub/after HTTP/1.1\r\nHost: q\r\n\r\n"
    );
    let out = raw(guard.addr, two.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(
        statuses(&out),
        [401, 502],
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(String::from_utf8_lossy(&out).contains("connection: close"));
    assert_eq!(AFTER.load(std::sync::atomic::Ordering::SeqCst), 0);
    guard.shutdown().await;
}

/// Over HTTP/2 the authentication path (and any NTLM leg) is refused with
/// `RST_STREAM(HTTP_1_1_REQUIRED)`, the connection stays usable, and a browser that falls back
/// to HTTP/1.1 for the handshake logs in and goes on over HTTP/2.
#[tokio::test]
async fn over_http2_the_handshake_is_sent_to_http1() {
    let sim = sim().await;
    let cert = TestCert::new();
    let guard = guard_with(&cert.config(&[sim.addr()], "", "")).await;
    let client = Client::tls(guard.addr, &cert, Proto::Http2);
    let stream = tls_connect(guard.addr, &cert.connector(&[b"h2"])).await;
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let type1 = Browser::new("CORP\\h2", Scheme::Negotiate).negotiate();
    for (path, auth) in [
        ("/internal_windows_authentication/?targetId=x", None),
        ("/win/internal_windows_authentication/", None),
        ("/hub/", Some(type1.as_str())),
    ] {
        let mut b = Request::get(format!("https://qlik.example.com{path}"));
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        h2.ready().await.unwrap();
        let e = h2
            .send_request(b.body(Full::new(Bytes::new())).unwrap())
            .await
            .expect_err("the stream is reset");
        assert!(client::is_http_1_1_required(&e), "{path}: {e:?}");
    }
    // The connection itself goes on.
    h2.ready().await.unwrap();
    let r = h2
        .send_request(
            Request::get("https://qlik.example.com/__sim/echo")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .expect("another stream is served");
    assert_eq!(r.status(), 200);
    // A browser: the hub over HTTP/2, the handshake over HTTP/1.1, the hub again over HTTP/2.
    let mut jar = Jar::new();
    let link = client.link().await;
    let browser = Browser::new("CORP\\h2", Scheme::Negotiate);
    let r = link
        .browse_with("/hub/", &mut jar, &[], Some(&browser))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("CORP\\h2"));
    let r = link.browse("/hub/", &mut jar, &[]).await;
    assert_eq!(r.status, 200);
    let c = sim.counters();
    assert_eq!(
        (c.ntlm_handshakes, c.ntlm_failures(), c.sessions_created),
        (1, 0, 1)
    );
    guard.shutdown().await;
}

/// A user with five sessions, each made by a browser of its own through the guard.
async fn at_the_limit(addr: std::net::SocketAddr, user: &str) {
    for _ in 0..5 {
        let r = browse_windows(addr, "/hub/", &mut Jar::new(), user).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

/// A user at the limit opens a private window (a browser the guard has never seen): the
/// Type 3 names the user, so the guard's limit applies before the ticket makes a session.
/// `error`: the guard's page, and Qlik refuses nothing.
#[tokio::test]
async fn a_private_window_at_the_limit_gets_the_guards_page() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\non_limit = \"error\"\n",
    ))
    .await;
    at_the_limit(guard.addr, "CORP\\full").await;
    assert_eq!(sim.live_sessions("CORP\\full"), 5);
    let r = browse_windows(guard.addr, "/hub/", &mut Jar::new(), "CORP\\full").await;
    assert_eq!(r.status, 429, "{}", r.text());
    let c = sim.counters();
    assert_eq!((c.sessions_created, c.limit_refusals), (5, 0));
    assert_eq!(c.ntlm_failures(), 0);
    // Another user's private window is not held up.
    let r = browse_windows(guard.addr, "/hub/", &mut Jar::new(), "CORP\\other").await;
    assert_eq!(r.status, 200);
    guard.shutdown().await;
}

/// `reuse`: the private window goes with the user's most recently active session. Qlik
/// accepted the Type 3 and answered with a ticket; the browser brings that very ticket back,
/// so the guard sends it to its page with the reused session instead (Qlik would have turned
/// the ticket into a sixth session and refused it).
#[tokio::test]
async fn a_private_window_at_the_limit_goes_with_the_users_latest_session() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\non_limit = \"reuse\"\n",
    ))
    .await;
    at_the_limit(guard.addr, "CORP\\reuse").await;
    let mut jar = Jar::new();
    let r = browse_windows(guard.addr, "/hub/private", &mut jar, "CORP\\reuse").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("/hub/private") && r.text().contains("CORP\\reuse"));
    let c = sim.counters();
    assert_eq!((c.sessions_created, c.limit_refusals), (5, 0));
    let got = jar_get(&jar, "X-Qlik-Session-HTTP").unwrap();
    assert!(sim.session_ids("CORP\\reuse").contains(&got));
    guard.shutdown().await;
}

/// Reuse at the ticket is for the browser Qlik gave the ticket to: a request with the same
/// device cookie (planted in another browser) but another ticket gets the limit page, never
/// one of the user's sessions.
#[tokio::test]
async fn reuse_at_the_ticket_needs_the_ticket_qlik_issued() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\non_limit = \"reuse\"\n",
    ))
    .await;
    at_the_limit(guard.addr, "CORP\\victim").await;
    // The victim's private window, step by step: Qlik's redirect to log in (the guard sets
    // a device cookie), the handshake, Qlik's ticket.
    let first = get(guard.addr, "/hub/", &[]).await;
    assert_eq!(first.status, 302);
    let device = first
        .all("set-cookie")
        .into_iter()
        .find(|c| c.starts_with("qsguard="))
        .map(|c| c.split(';').next().unwrap().to_string())
        .expect("a device cookie");
    let login = first.header("location").unwrap();
    let req = http::Request::get(&login)
        .header("host", "qlik.example.com")
        .header("cookie", &device)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let ticketed = Client::plain(guard.addr)
        .ntlm(&req, &Browser::new("CORP\\victim", Scheme::Ntlm))
        .await
        .unwrap();
    assert_eq!(ticketed.status, 302);
    assert!(ticketed.header("location").unwrap().contains("qlikTicket="));
    // Another browser holding the same device cookie, with a ticket of its own making.
    let r = get(
        guard.addr,
        "/hub/?qlikTicket=0123456789",
        &[("cookie", &device)],
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r
        .all("set-cookie")
        .iter()
        .all(|c| !c.starts_with("X-Qlik-Session-HTTP=")));
    assert_eq!(sim.counters().limit_refusals, 0);
    guard.shutdown().await;
}

/// `evict`: the private window gets in, the least recently active idle session makes room,
/// and Qlik refuses nothing.
#[tokio::test]
async fn a_private_window_at_the_limit_evicts_the_oldest_idle_session() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\non_limit = \"evict\"\n",
    ))
    .await;
    at_the_limit(guard.addr, "CORP\\busy").await;
    let oldest = sim.session_ids("CORP\\busy");
    let r = browse_windows(guard.addr, "/hub/", &mut Jar::new(), "CORP\\busy").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("CORP\\busy"));
    let c = sim.counters();
    assert_eq!((c.sessions_created, c.limit_refusals), (6, 0));
    assert_eq!(sim.live_sessions("CORP\\busy"), 5);
    assert_ne!(sim.session_ids("CORP\\busy"), oldest);
    guard.shutdown().await;
}

/// Qlik refuses a user the guard knows (two of the five sessions were made without the
/// guard): with `evict`, the guard ends the user's least recently active idle session it
/// knows and sends the browser back to log in, which then gets in.
#[tokio::test]
async fn a_refusal_for_a_known_user_is_turned_into_a_login() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\non_limit = \"evict\"\n",
    ))
    .await;
    for _ in 0..3 {
        let r = browse_windows(guard.addr, "/hub/", &mut Jar::new(), "CORP\\split").await;
        assert_eq!(r.status, 200);
    }
    for _ in 0..2 {
        let r = browse_windows(sim.addr(), "/hub/", &mut Jar::new(), "CORP\\split").await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(sim.live_sessions("CORP\\split"), 5);
    let t = Instant::now();
    let r = browse_windows(guard.addr, "/hub/", &mut Jar::new(), "CORP\\split").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Not held for `burst_wait` by the dance Qlik refused.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(r.text().contains("CORP\\split"));
    assert_eq!(
        sim.counters().limit_refusals,
        1,
        "Qlik refused once, then let it in"
    );
    assert_eq!(sim.live_sessions("CORP\\split"), 5);
    assert_eq!(events(&guard, "qps_limit_refusal").len(), 1);
    assert_eq!(events(&guard, "session_evicted").len(), 1);
    guard.shutdown().await;
}

/// Follows redirects on the one connection `c`, answering a Windows `401` with the handshake
/// there too, as a browser on a kept-alive connection does.
async fn browse_on(c: &mut client::H1, path: &str, jar: &mut Jar, extra: &[(&str, &str)]) -> Resp {
    let b = Browser::new("CORP\\two", Scheme::Ntlm);
    let mut path = path.to_string();
    let mut auth: Option<String> = None;
    for _ in 0..10 {
        let mut req = Request::get(&path).header("host", "qlik.example.com");
        let cookie = cookie_header(jar);
        if !cookie.is_empty() {
            req = req.header("cookie", cookie);
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        if let Some(a) = auth.take() {
            req = req.header("authorization", a);
        }
        let r = c
            .send(req.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        for sc in r.all("set-cookie") {
            let pair = sc.split(';').next().unwrap_or("");
            if let Some((k, v)) = pair.split_once('=') {
                jar.retain(|(n, _)| n != k);
                jar.push((k.to_string(), v.to_string()));
            }
        }
        if r.status == 401 {
            let www: Vec<Vec<u8>> = r
                .headers
                .get_all("www-authenticate")
                .iter()
                .map(|v| v.as_bytes().to_vec())
                .collect();
            auth = Some(match b.authenticate(www.iter().map(Vec::as_slice)) {
                Some(a3) => a3,
                None => b.negotiate(),
            });
            continue;
        }
        if r.status.is_redirection() {
            path = r.header("location").unwrap();
            continue;
        }
        return r;
    }
    panic!("too many redirects");
}

/// Two nodes: a browser connection that logged in on one node (and owns a connection to it)
/// sends a request of a session that lives on the other node: it goes there, not over the
/// private connection, where the session would be unknown and a new one made.
#[tokio::test]
async fn a_private_connection_does_not_take_another_nodes_session() {
    let (a, b) = (sim().await, sim().await);
    let guard = guard_with(&config_text(&[a.addr(), b.addr()], "", "")).await;
    let client = Client::plain(guard.addr);
    let mut c = client.h1_conn().await.unwrap();
    let mut jar = Jar::new();
    let r = browse_on(&mut c, "/hub/", &mut jar, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (home, other) = if a.live_sessions("CORP\\two") == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    // The same browser, on another connection, opens the header-auth virtual proxy: its
    // session goes to the other node (the least loaded).
    let r = client.browse_as("/hdr/hub/", &mut jar, "CORP\\two").await;
    assert_eq!(r.status, 200);
    assert_eq!(other.live_sessions("CORP\\two"), 1);
    // Back on the first connection, with that session.
    let r = browse_on(&mut c, "/hdr/hub/x", &mut jar, &[("hdr-usr", "CORP\\two")]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(home.counters().unknown_cookie_requests, 0);
    assert_eq!(
        a.counters().sessions_created + b.counters().sessions_created,
        2,
        "no session lost to the wrong node"
    );
    // The private connection is still the browser connection's own.
    let r = browse_on(&mut c, "/hub/", &mut jar, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(home.counters().ntlm_failures(), 0);
    guard.shutdown().await;
}

/// A browser the guard knows logs in again (Qlik ended its session): the legs of its one
/// handshake are one login, none of them is held as a second login of the browser.
#[tokio::test]
async fn the_legs_of_one_handshake_are_not_held_as_a_second_login() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut jar = Jar::new();
    assert_eq!(
        browse_windows(guard.addr, "/hub/", &mut jar, "CORP\\again")
            .await
            .status,
        200
    );
    let id = sim.session_ids("CORP\\again")[0].clone();
    end_in_qlik(&sim, "", &id).await;
    let t = Instant::now();
    let r = browse_windows(guard.addr, "/hub/", &mut jar, "CORP\\again").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let held = session_guard(&guard)
        .counters
        .bursts_held
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(held, 0);
    assert_eq!(sim.counters().ntlm_handshakes, 2);
    guard.shutdown().await;
}
