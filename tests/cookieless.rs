//! Clients without cookies on a header-authentication virtual proxy (`cookieless`): scripts
//! that send the identity header and keep no cookie jar. Qlik makes a session per request for
//! them; the guard sends each with the user's session made for such a client.

mod common;

use std::net::SocketAddr;

use common::*;

const HDR_COOKIE: &str = "X-Qlik-Session-hdr-HTTP";

/// One request without cookies as `user`; returns the status and the session cookie set on
/// the answer.
async fn script(addr: SocketAddr, path: &str, user: &str) -> (u16, Option<String>) {
    let mut jar = Jar::new();
    let r = browse_as(addr, path, &mut jar, user).await;
    (r.status.as_u16(), jar_get(&jar, HDR_COOKIE))
}

/// `scripts` clients of one user, each sending `calls` requests without cookies, all at once.
async fn scripts(
    addr: SocketAddr,
    user: &'static str,
    scripts: usize,
    calls: usize,
) -> Vec<String> {
    let tasks: Vec<_> = (0..scripts)
        .map(|i| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                for c in 0..calls {
                    let (status, cookie) = script(addr, &format!("/hdr/hub/{i}/{c}"), user).await;
                    assert_eq!(status, 200, "script {i}, call {c}");
                    got.push(cookie.expect("the session cookie is set on every answer"));
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test]
async fn scripts_without_cookies_share_one_session_per_user() {
    let sim = sim().await;
    let guard = guard_with(&cookieless_reuse(&config_text(&[sim.addr()], "", ""))).await;
    let cookies = scripts(guard.addr, "CORP\\robot", 8, 5).await;
    let (status, other) = script(guard.addr, "/hdr/hub/", "CORP\\other").await;
    assert_eq!(status, 200);
    let c = sim.counters();
    // Eight scripts in parallel, 40 calls: one session, and every answer sets it (a client
    // that keeps cookies stays on it).
    assert_eq!(c.sessions_created, 2, "{c:?}");
    assert_eq!(c.limit_refusals, 0);
    assert_eq!(sim.live_sessions("CORP\\robot"), 1);
    assert!(cookies.iter().all(|v| *v == cookies[0]));
    assert_ne!(
        other.as_deref(),
        Some(cookies[0].as_str()),
        "another user's session"
    );
    let g = session_guard(&guard);
    assert_eq!(
        g.counters
            .cookieless_attached
            .load(std::sync::atomic::Ordering::Relaxed),
        39
    );
    // A client that keeps the cookie it was given goes on with it, as a browser does.
    let r = get(
        guard.addr,
        "/hdr/hub/kept",
        &[
            ("hdr-usr", "CORP\\robot"),
            ("cookie", &format!("{HDR_COOKIE}={}", cookies[0])),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(sim.counters().sessions_created, 2);
    guard.shutdown().await;

    // The same day with `cookieless = "new"` (Qlik's own way): a session per call until the
    // user's five are full.
    let sim = sim_with(Default::default()).await;
    let guard = guard_with(&config_text(&[sim.addr()], "", "")).await;
    scripts(guard.addr, "CORP\\robot", 8, 5).await;
    let made = sim.counters().sessions_created;
    eprintln!("cookieless = \"new\": 8 scripts x 5 calls made {made} sessions; \"reuse\": 1");
    assert_eq!(made, 5);
    assert_eq!(sim.live_sessions("CORP\\robot"), 5);
    guard.shutdown().await;
}

/// A session made for a browser (its request carried the guard's device cookie) never goes
/// to a client without cookies, and a cookie-less session never to another user.
#[tokio::test]
async fn a_browsers_session_and_another_users_are_never_handed_over() {
    let sim = sim().await;
    let guard = guard_with(&cookieless_reuse(&config_text(&[sim.addr()], "", ""))).await;
    // A browser that has the guard's device cookie (from the central virtual proxy) opens the
    // hub on the header-authentication one: a browser's session.
    let mut browser = Jar::new();
    browse_windows(guard.addr, "/hub/", &mut browser, "CORP\\robot").await;
    assert!(jar_get(&browser, "qsguard").is_some());
    let r = browse_as(guard.addr, "/hdr/hub/", &mut browser, "CORP\\robot").await;
    assert_eq!(r.status, 200);
    let browsers = jar_get(&browser, HDR_COOKIE).unwrap();
    assert_eq!(sim.counters().sessions_created, 2);

    let (_, first) = script(guard.addr, "/hdr/hub/", "CORP\\robot").await;
    let first = first.unwrap();
    assert_ne!(first, browsers, "a browser's session went to a script");
    assert_eq!(sim.counters().sessions_created, 3);
    let (_, other) = script(guard.addr, "/hdr/hub/", "CORP\\other").await;
    assert_ne!(other.as_deref(), Some(first.as_str()));
    assert_eq!(sim.counters().sessions_created, 4);
    let (_, again) = script(guard.addr, "/hdr/hub/", "CORP\\robot").await;
    assert_eq!(again.as_deref(), Some(first.as_str()));
    assert_eq!(sim.counters().sessions_created, 4);
    guard.shutdown().await;
}

/// A browser's very first request carries no cookie at all, as a script's does: its session is
/// made as one for a cookie-less client. Once the browser's next request brings the guard's
/// device cookie back, it is a browser's session, and a script no longer goes with it.
#[tokio::test]
async fn a_browser_whose_first_request_had_no_cookie_keeps_its_session_to_itself() {
    let sim = sim().await;
    let guard = guard_with(&cookieless_reuse(&config_text(&[sim.addr()], "", ""))).await;
    let mut browser = Jar::new();
    browse_as(guard.addr, "/hdr/hub/", &mut browser, "CORP\\fresh").await;
    assert!(jar_get(&browser, "qsguard").is_some());
    let r = browse_as(guard.addr, "/hdr/hub/next", &mut browser, "CORP\\fresh").await;
    assert_eq!(r.status, 200);
    let browsers = jar_get(&browser, HDR_COOKIE).unwrap();
    assert_eq!(sim.counters().sessions_created, 1);
    let (status, scripts) = script(guard.addr, "/hdr/hub/", "CORP\\fresh").await;
    assert_eq!(status, 200);
    assert_ne!(
        scripts.as_deref(),
        Some(browsers.as_str()),
        "a browser's session went to a script"
    );
    assert_eq!(sim.counters().sessions_created, 2);
    guard.shutdown().await;
}

/// The session the scripts share ended in Qlik (an admin, a QPS restart): Qlik makes a new one
/// for the next call, and the guard goes on with that one.
#[tokio::test]
async fn a_shared_session_gone_in_qlik_is_replaced_by_one_new_session() {
    let sim = sim().await;
    let guard = guard_with(&cookieless_reuse(&config_text(&[sim.addr()], "", ""))).await;
    let (_, first) = script(guard.addr, "/hdr/hub/", "CORP\\robot").await;
    let first = first.unwrap();
    end_in_qlik(&sim, "hdr", &first).await;
    let (status, second) = script(guard.addr, "/hdr/hub/", "CORP\\robot").await;
    assert_eq!(status, 200);
    let second = second.unwrap();
    assert_ne!(second, first);
    assert_eq!(sim.counters().sessions_created, 2);
    for _ in 0..3 {
        let (_, next) = script(guard.addr, "/hdr/hub/", "CORP\\robot").await;
        assert_eq!(next.as_deref(), Some(second.as_str()));
    }
    assert_eq!(sim.counters().sessions_created, 2);
    assert_eq!(sim.live_sessions("CORP\\robot"), 1);
    guard.shutdown().await;
}

#[test]
fn cookieless_needs_header_authentication() {
    let text = config_text(&[SocketAddr::from(LOOPBACK)], "", "")
        .replace("cookieless = \"new\"\n", "")
        .replace(
            "session_cookie = \"X-Qlik-Session-HTTP\"\n",
            "session_cookie = \"X-Qlik-Session-HTTP\"\ncookieless = \"reuse\"\n",
        );
    let e = qsguard::Config::parse(&text).unwrap_err().to_string();
    assert!(
        e.contains("virtual_proxy[0].cookieless") && e.contains("identity_header"),
        "{e}"
    );
    let bad = config_text(&[SocketAddr::from(LOOPBACK)], "", "").replace("\"new\"", "\"always\"");
    let e = qsguard::Config::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("cookieless"), "{e}");
}
