//! The session guard against the simulator: every test asserts on the simulator's counters (what
//! Qlik would have seen), not only on the guard's view.

mod common;

use std::time::Duration;

use common::*;
use qsguard::sim::ntlm::{Browser, Scheme};
use qsguard::sim::SimConfig;

fn sessions_cfg(extra: &str) -> String {
    format!("[sessions]\n{extra}\n")
}

#[tokio::test]
async fn restore_after_browser_restarts_costs_no_session() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut jar = Jar::new();
    let r = browse_windows(guard.addr, "/hub/", &mut jar, "CORP\\jane").await;
    assert_eq!(r.status, 200);
    assert_eq!(sim.counters().sessions_created, 1);
    eventually("the owner is learnt through the Personal API", || {
        session_guard(&guard).table.live_count("corp\\jane") == 1
    })
    .await;
    // Six browser restarts: the Qlik cookie (a browser-session cookie) is gone each time, the
    // guard's device cookie is not.
    for i in 0..6 {
        let mut restarted = without(&jar, "X-Qlik-Session-HTTP");
        let r = browse_windows(
            guard.addr,
            &format!("/hub/stream/{i}"),
            &mut restarted,
            "CORP\\jane",
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains(&format!("/hub/stream/{i}")));
        assert!(
            restarted.iter().any(|(n, _)| n == "X-Qlik-Session-HTTP"),
            "the cookie is set back"
        );
    }
    let c = sim.counters();
    assert_eq!(c.sessions_created, 1, "one session, not seven");
    assert_eq!(c.limit_refusals, 0);
    assert_eq!(c.unknown_cookie_requests, 0);
    assert_eq!(sim.live_sessions("CORP\\jane"), 1);
    assert_eq!(
        session_guard(&guard)
            .counters
            .restored
            .load(std::sync::atomic::Ordering::Relaxed),
        6
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn sixth_browser_with_error_policy_gets_the_limit_page() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        &sessions_cfg("on_limit = \"error\""),
    ))
    .await;
    let mut browsers: Vec<Jar> = Vec::new();
    for _ in 0..5 {
        let mut jar = Jar::new();
        assert_eq!(
            browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\max")
                .await
                .status,
            200
        );
        browsers.push(jar);
    }
    assert_eq!(sim.live_sessions("CORP\\max"), 5);
    let mut sixth = Jar::new();
    let page = browse_as(guard.addr, "/hdr/hub/", &mut sixth, "CORP\\max").await;
    assert_eq!(page.status, 429);
    let retry: u64 = page.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 30 * 60 + 2, "{retry}");
    let text = page.text();
    assert!(text.contains("at most <strong>5</strong>"), "{text}");
    assert_eq!(
        text.matches("End this session").count(),
        5,
        "the user's five sessions are listed"
    );
    assert_eq!(sim.counters().limit_refusals, 0, "Qlik never had to refuse");
    assert_eq!(sim.counters().sessions_created, 5);
    // The browsers that have a session keep working.
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut browsers[0], "CORP\\max")
            .await
            .status,
        200
    );

    // The page's button ends one of the user's own sessions; then the sixth browser gets in.
    let csrf = between(&text, "name=\"csrf\" value=\"", "\"");
    let hash = between(&text, "name=\"session\" value=\"", "\"");
    let cookie = cookie_header(&sixth);
    let forged = post_form(
        guard.addr,
        &cookie,
        &format!("session={hash}&csrf=0000&return=%2Fhdr%2Fhub%2F"),
    )
    .await;
    assert_eq!(forged.status, 403, "a wrong CSRF token ends nothing");
    let ended = post_form(
        guard.addr,
        &cookie,
        &format!("session={hash}&csrf={csrf}&return=%2Fhdr%2Fhub%2F"),
    )
    .await;
    assert_eq!(ended.status, 303, "{}", ended.text());
    assert_eq!(ended.header("location").as_deref(), Some("/hdr/hub/"));
    assert_eq!(sim.live_sessions("CORP\\max"), 4);
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut sixth, "CORP\\max")
            .await
            .status,
        200
    );
    assert_eq!(sim.counters().limit_refusals, 0);
    guard.shutdown().await;
}

async fn post_form(addr: std::net::SocketAddr, cookie: &str, body: &str) -> Resp {
    Client::plain(addr)
        .link()
        .await
        .post(
            "/__qsguard/end-session",
            &[
                ("cookie", cookie),
                ("hdr-usr", "CORP\\max"),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            body,
        )
        .await
}

#[tokio::test]
async fn reuse_lets_eight_cookieless_clients_in() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        &sessions_cfg("on_limit = \"reuse\""),
    ))
    .await;
    for i in 0..8 {
        let mut jar = Jar::new();
        let r = browse_as(
            guard.addr,
            &format!("/hdr/hub/{i}"),
            &mut jar,
            "CORP\\robot",
        )
        .await;
        assert_eq!(r.status, 200, "client {i}: {}", r.text());
        assert!(r.text().contains(&format!("/hdr/hub/{i}")));
    }
    let c = sim.counters();
    assert_eq!(c.limit_refusals, 0);
    assert_eq!(c.sessions_created, 5);
    assert_eq!(sim.live_sessions("CORP\\robot"), 5);
    assert_eq!(session_guard(&guard).table.live_count("corp\\robot"), 5);
    guard.shutdown().await;
}

#[tokio::test]
async fn reuse_is_not_given_on_a_device_cookie_alone() {
    // Windows authentication: the guard knows the user only through the device cookie, so at
    // the limit it shows the page instead of handing over one of the user's other sessions.
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        &sessions_cfg("on_limit = \"reuse\""),
    ))
    .await;
    let g = session_guard(&guard);
    let user = "CORP\\win";
    let mut first = Jar::new();
    browse_windows(guard.addr, "/hub/", &mut first, user).await;
    let mut second = Jar::new();
    browse_windows(guard.addr, "/hub/", &mut second, user).await;
    eventually("owners resolved", || g.table.live_count("corp\\win") == 2).await;
    // The second browser logs out: the guard still knows whose browser it is.
    let r = logout(guard.addr, "/", &second, None).await;
    assert_eq!(r.status, 200);
    assert_eq!(g.table.live_count("corp\\win"), 1);
    // Four sessions made elsewhere; the guard adopts them when they pass through it.
    for _ in 0..4 {
        let mut other = Jar::new();
        browse_windows(sim.addr(), "/hub/", &mut other, user).await;
        let r = browse(guard.addr, "/hub/", &mut without(&other, "qsguard"), &[]).await;
        assert_eq!(r.status, 200);
    }
    eventually("adopted sessions resolved", || {
        g.table.live_count("corp\\win") == 5
    })
    .await;
    assert_eq!(sim.live_sessions("CORP\\win"), 5);
    let created = sim.counters().sessions_created;
    let mut again = without(&second, "X-Qlik-Session-HTTP");
    let r = browse_windows(guard.addr, "/hub/", &mut again, user).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(sim.counters().sessions_created, created);
    assert_eq!(sim.counters().limit_refusals, 0);
    assert!(
        !again.iter().any(|(n, _)| n == "X-Qlik-Session-HTTP"),
        "no other browser's session was handed over"
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn evict_ends_the_oldest_idle_session_and_admits_the_new_one() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        &sessions_cfg("on_limit = \"evict\""),
    ))
    .await;
    let mut first = Jar::new();
    browse_as(guard.addr, "/hdr/hub/", &mut first, "CORP\\eve").await;
    let oldest = jar_get(&first, "X-Qlik-Session-hdr-HTTP").unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\eve").await;
    }
    assert_eq!(sim.live_sessions("CORP\\eve"), 5);
    let r = browse_as(guard.addr, "/hdr/hub/new", &mut Jar::new(), "CORP\\eve").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sim.live_sessions("CORP\\eve"), 5);
    assert!(
        !sim.session_ids("CORP\\eve").contains(&oldest),
        "the least recently active went"
    );
    let c = sim.counters();
    assert_eq!(c.limit_refusals, 0);
    assert_eq!(
        c.logouts, 1,
        "ended through the Personal API with its own cookie"
    );
    assert_eq!(c.sessions_created, 6);
    guard.shutdown().await;
}

#[tokio::test]
async fn evict_through_the_qps_rest_api_when_configured() {
    let sim = sim().await;
    let extra = format!(
        "{}[qps_api]\nurl = \"http://{}\"\n",
        sessions_cfg("on_limit = \"evict\""),
        sim.api_addr()
    );
    let guard = guard_with(&config_text(&[sim.addr()], "", &extra)).await;
    for _ in 0..6 {
        let r = browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\api").await;
        assert_eq!(r.status, 200);
    }
    let c = sim.counters();
    assert_eq!(c.sessions_ended_by_api, 1);
    assert_eq!(c.limit_refusals, 0);
    assert_eq!(sim.live_sessions("CORP\\api"), 5);
    guard.shutdown().await;
}

#[tokio::test]
async fn expiry_frees_a_slot() {
    let sim = sim_with(SimConfig {
        inactivity_timeout: Duration::from_millis(700),
        ..SimConfig::default()
    })
    .await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        &sessions_cfg("on_limit = \"error\"\ninactivity_timeout = \"700ms\""),
    ))
    .await;
    for _ in 0..5 {
        browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\exp").await;
    }
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\exp")
            .await
            .status,
        429
    );
    // 700 ms of Qlik's timeout plus the guard's clock slack. Real time: the guard's session
    // table runs on std::time::Instant, which a paused tokio clock does not move.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    assert_eq!(sim.live_sessions("CORP\\exp"), 0);
    assert_eq!(session_guard(&guard).table.live_count("corp\\exp"), 0);
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\exp")
            .await
            .status,
        200
    );
    assert_eq!(sim.counters().limit_refusals, 0);
    // The background sweeper forgets what ended: only the new session is left in the table.
    eventually("expired sessions swept", || {
        session_guard(&guard).table.sizes().0 == 1
    })
    .await;
    guard.shutdown().await;
}

#[tokio::test]
async fn logout_frees_a_slot() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        &sessions_cfg("on_limit = \"error\""),
    ))
    .await;
    let mut jars = Vec::new();
    for _ in 0..5 {
        let mut jar = Jar::new();
        browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\out").await;
        jars.push(jar);
    }
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\out")
            .await
            .status,
        429
    );
    let r = logout(guard.addr, "/hdr/", &jars[2], Some("CORP\\out")).await;
    assert_eq!(r.status, 200);
    assert_eq!(sim.counters().logouts, 1);
    assert_eq!(session_guard(&guard).table.live_count("corp\\out"), 4);
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\out")
            .await
            .status,
        200
    );
    assert_eq!(sim.counters().limit_refusals, 0);
    guard.shutdown().await;
}

/// Ten parallel page requests of one browser whose cookie is dead.
async fn burst(
    addr: std::net::SocketAddr,
    jar: &Jar,
    prefix: &str,
    extra: Vec<(&'static str, String)>,
    windows: Option<&'static str>,
) -> Vec<Resp> {
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut jar = jar.clone();
        let extra = extra.clone();
        let path = format!("{prefix}hub/page{i}");
        tasks.push(tokio::spawn(async move {
            let headers: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let browser = windows.map(|u| Browser::new(u, Scheme::Ntlm));
            let r = Client::plain(addr)
                .link()
                .await
                .browse_with(&path, &mut jar, &headers, browser.as_ref())
                .await;
            assert!(
                r.text().contains(&path),
                "request {i} ends on the page it asked for: {}",
                r.text()
            );
            r
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn dead_cookie_burst_makes_one_session_windows_login() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut jar = Jar::new();
    browse_windows(guard.addr, "/hub/", &mut jar, "CORP\\burst").await;
    assert_eq!(sim.counters().sessions_created, 1);
    // Qlik ends the session behind the guard's back (an admin, a QPS restart...).
    let id = sim.session_ids("CORP\\burst")[0].clone();
    end_in_qlik(&sim, "", &id).await;
    let before = sim.counters().sessions_created;
    let rs = burst(guard.addr, &jar, "/", vec![], Some("CORP\\burst")).await;
    assert!(rs.iter().all(|r| r.status == 200));
    let c = sim.counters();
    assert_eq!(
        c.sessions_created - before,
        1,
        "one new session for the whole burst"
    );
    assert_eq!(c.limit_refusals, 0);
    assert_eq!(sim.live_sessions("CORP\\burst"), 1);
    guard.shutdown().await;
}

#[tokio::test]
async fn dead_cookie_burst_makes_one_session_header_auth() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut jar = Jar::new();
    browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\hb").await;
    // The user logs out through the guard; the browser keeps the now dead cookie.
    logout(guard.addr, "/hdr/", &jar, Some("CORP\\hb")).await;
    assert_eq!(sim.live_sessions("CORP\\hb"), 0);
    let before = sim.counters().sessions_created;
    let rs = burst(
        guard.addr,
        &jar,
        "/hdr/",
        vec![("hdr-usr", "CORP\\hb".into())],
        None,
    )
    .await;
    assert!(rs.iter().all(|r| r.status == 200));
    assert_eq!(sim.counters().sessions_created - before, 1);
    assert_eq!(sim.live_sessions("CORP\\hb"), 1);
    assert_eq!(sim.counters().limit_refusals, 0);
    guard.shutdown().await;
}

/// A known gap, kept as a reproducer until the guard handles it: with header authentication, a
/// session Qlik ended behind the guard's back (an admin in the QMC, a QPS restart) is still
/// live to the guard, so every request of the browser's next burst takes the hot path with the
/// dead cookie. Qlik makes a new session for each of them (header authentication needs no
/// login), and those past the limit get Qlik's "too many sessions" page: 8 parallel requests
/// make 5 sessions and 3 refusals (the Windows variant above is safe: Qlik sends a dead
/// cookie to log in, and the guard holds the burst's logins).
#[tokio::test]
#[ignore = "known gap: a header-auth burst with a cookie Qlik ended behind the guard's back makes a session per request"]
async fn dead_cookie_burst_makes_one_session_header_auth_ended_in_qlik() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut jar = Jar::new();
    browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\hq").await;
    let id = sim.session_ids("CORP\\hq")[0].clone();
    end_in_qlik(&sim, "hdr", &id).await;
    let before = sim.counters().sessions_created;
    let addr = guard.addr;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut jar = jar.clone();
        let path = format!("/hdr/hub/page{i}");
        tasks.push(tokio::spawn(async move {
            browse_as(addr, &path, &mut jar, "CORP\\hq").await.status
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().as_u16());
    }
    let c = sim.counters();
    assert_eq!(
        (statuses, c.sessions_created - before, c.limit_refusals),
        (vec![200; 8], 1, 0),
        "(statuses, sessions made, Qlik's refusals)"
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn two_hundred_parallel_requests_of_twenty_users_keep_counts_exact() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        &sessions_cfg("on_limit = \"reuse\""),
    ))
    .await;
    let addr = guard.addr;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let user = format!("LOAD\\u{}", i % 20);
        tasks.push(tokio::spawn(async move {
            let mut jar = Jar::new();
            browse_as(addr, &format!("/hdr/hub/{i}"), &mut jar, &user)
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(sim.counters().limit_refusals, 0);
    for u in 0..20 {
        let name = format!("LOAD\\u{u}");
        let in_qlik = sim.live_sessions(&name);
        assert_eq!(in_qlik, 5, "{name}");
        assert_eq!(
            session_guard(&guard).table.live_count(&name.to_lowercase()),
            in_qlik,
            "{name}"
        );
    }
    guard.shutdown().await;
}

#[tokio::test]
async fn malformed_identity_header_is_refused_before_qlik() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    for bad in ["noslash", "A\\B\\C", "\\x", "CORP\\"] {
        let r = get(guard.addr, "/hdr/hub/", &[("hdr-usr", bad)]).await;
        assert_eq!(r.status, 400, "{bad}");
    }
    let raw_resp = raw(
        guard.addr,
        b"GET /hdr/hub/ HTTP/1.1\r\nHost: q\r\nhdr-usr: CORP\\j\xc3\xa4ne\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(statuses(&raw_resp), vec![400]);
    assert_eq!(sim.counters().requests, 0, "never reached Qlik");
    guard.shutdown().await;
}

#[tokio::test]
async fn engine_notifications_and_qps_refusals_are_seen() {
    use futures_util::StreamExt;
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut jar = Jar::new();
    browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\ws").await;
    let mut ws = ws_as(
        guard.addr,
        "/hdr/app/myapp",
        "CORP\\ws",
        Some(&cookie_header(&jar)),
    )
    .await;
    ws.next().await.unwrap().unwrap();
    let g = session_guard(&guard);
    eventually("the open app is listed", || {
        g.table
            .user_sessions("corp\\ws")
            .first()
            .is_some_and(|s| s.meta().apps == vec!["myapp".to_string()])
    })
    .await;
    // The session is ended in Qlik directly: the engine says OnSessionClosed, the guard hears it.
    let id = sim.session_ids("CORP\\ws")[0].clone();
    end_in_qlik(&sim, "hdr", &id).await;
    while let Some(Ok(_)) = ws.next().await {}
    eventually("the guard marks it ended", || {
        g.table.live_count("corp\\ws") == 0
    })
    .await;

    // Five sessions made behind the guard's back: Qlik's own refusal is detected and counted.
    for _ in 0..5 {
        browse_as(sim.addr(), "/hdr/hub/", &mut Jar::new(), "CORP\\behind").await;
    }
    let r = browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\behind").await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("too many sessions active in parallel"));
    assert_eq!(sim.counters().limit_refusals, 1);
    assert_eq!(
        g.counters
            .qps_limit_refusals
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn guard_off_is_a_plain_proxy() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        &sessions_cfg("guard = false"),
    ))
    .await;
    assert!(guard.proxy().sessions().is_none());
    let r = get(guard.addr, "/__sim/echo", &[]).await;
    assert!(r.all("set-cookie").is_empty(), "no device cookie");
    guard.shutdown().await;
}

#[tokio::test]
async fn after_a_guard_restart_unknown_cookies_are_adopted_and_bursts_still_make_one_session() {
    let sim = sim().await;
    let old = guard(sim.addr()).await;
    let mut jar = Jar::new();
    browse_as(old.addr, "/hdr/hub/", &mut jar, "CORP\\rs").await;
    old.shutdown().await;
    // A new guard knows nothing: the browser's cookie is unknown to it, but live in Qlik.
    let guard = guard(sim.addr()).await;
    let created = sim.counters().sessions_created;
    let rs = burst(
        guard.addr,
        &jar,
        "/hdr/",
        vec![("hdr-usr", "CORP\\rs".into())],
        None,
    )
    .await;
    assert!(rs.iter().all(|r| r.status == 200));
    assert_eq!(
        sim.counters().sessions_created,
        created,
        "the live session is adopted, not replaced"
    );
    // Adopted once Qlik confirmed it (the owner lookup runs off the hot path).
    eventually("the adopted session counts", || {
        session_guard(&guard).table.live_count("corp\\rs") == 1
    })
    .await;
    // Now Qlik ends it behind the guard's back; the next burst makes exactly one new session.
    let id = sim.session_ids("CORP\\rs")[0].clone();
    end_in_qlik(&sim, "hdr", &id).await;
    let guard2 = guard_with(&config_text(&[sim.addr()], "", "")).await;
    let rs = burst(
        guard2.addr,
        &jar,
        "/hdr/",
        vec![("hdr-usr", "CORP\\rs".into())],
        None,
    )
    .await;
    assert!(rs.iter().all(|r| r.status == 200));
    assert_eq!(sim.counters().sessions_created, created + 1);
    assert_eq!(sim.live_sessions("CORP\\rs"), 1);
    assert_eq!(sim.counters().limit_refusals, 0);
    guard.shutdown().await;
    guard2.shutdown().await;
}

#[tokio::test]
async fn clients_that_keep_no_cookies_leave_nothing_behind() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    for _ in 0..50 {
        assert_eq!(get(guard.addr, "/__sim/echo", &[]).await.status, 200);
    }
    assert_eq!(
        session_guard(&guard).table.sizes(),
        (0, 0, 0),
        "no session, user or device entries"
    );
    guard.shutdown().await;
}
