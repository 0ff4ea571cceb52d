//! Diagnostics for ops: every event kind from a scripted scenario (a cookie-mangling
//! middlebox in the test stands between client and guard for the "lost on the way" cases), the
//! admin API with and without its token, the ops commands against a running guard, and the
//! cookie self-test and `qsguard doctor` through clean, stripping and folding paths.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn cookies_lost_modified_duplicated_and_folded_on_the_way() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let user = "CORP\\ops";
    // A browser logs in through a clean path.
    let mut jar = Jar::new();
    assert_eq!(
        browse_windows(guard.addr, "/hub/", &mut jar, user)
            .await
            .status,
        200
    );
    let session = jar_get(&jar, "X-Qlik-Session-HTTP").unwrap();

    // A middlebox strips the session cookie: lost on the way, and restored.
    let strip = mangler(guard.addr, Mangle::StripCookie("X-Qlik-Session-HTTP")).await;
    assert_eq!(
        get(strip, "/hub/", &[("cookie", &cookie_header(&jar))])
            .await
            .status,
        200
    );
    let lost = events(&guard, "cookie_lost");
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0]["client"]["via"], "1.1 mangler");
    assert_eq!(lost[0]["virtual_proxy"], "");
    assert!(lost[0]["device"].is_string());
    assert_eq!(events(&guard, "session_restored").len(), 1);

    // A middlebox changes the value: modified on the way.
    let modify = mangler(guard.addr, Mangle::ModifyCookie("X-Qlik-Session-HTTP")).await;
    assert_eq!(
        get(modify, "/hub/", &[("cookie", &cookie_header(&jar))])
            .await
            .status,
        200
    );
    assert_eq!(events(&guard, "cookie_modified").len(), 1);

    // The same cookie twice in one request.
    let twice = format!("{}; X-Qlik-Session-HTTP={session}", cookie_header(&jar));
    get(guard.addr, "/hub/", &[("cookie", &twice)]).await;
    assert_eq!(events(&guard, "cookie_duplicated").len(), 1);

    // A middlebox folds the Set-Cookie headers of the login answer: the browser keeps only
    // the first cookie (Qlik's), not the device cookie set with it.
    let fold = mangler(guard.addr, Mangle::FoldSetCookie).await;
    let mut folded = Jar::new();
    let r = browse_as(fold, "/hdr/hub/", &mut folded, "CORP\\fold").await;
    assert_eq!(r.status, 200);
    assert!(
        !folded.iter().any(|(n, _)| n == "qsguard"),
        "the device cookie was lost in the fold"
    );
    browse_as(fold, "/hdr/hub/", &mut folded, "CORP\\fold").await;
    let f = events(&guard, "set_cookie_folded");
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["user"], "CORP\\fold");

    // No event, log line or metric shows a cookie value.
    let all =
        serde_json::to_string(&guard.proxy().diagnostics.events.query(0, None, None)).unwrap();
    assert!(
        !all.contains(&session),
        "a cookie value leaked into an event"
    );
    let metrics = get(guard.admin_addr, "/metrics", &[("host", "localhost")])
        .await
        .text();
    assert!(
        metrics.contains("qsguard_events_total{kind=\"cookie_lost\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("qsguard_events_total{kind=\"set_cookie_folded\"} 1"));
    assert!(!metrics.contains(&session));
    guard.shutdown().await;
}

/// Qlik (and the systems around it) set more than one cookie with a session: whichever of
/// them does not come back while the session cookie does is named, by name only.
#[tokio::test]
async fn every_cookie_set_with_a_session_is_named_when_it_does_not_come_back() {
    let mut cfg = qsguard::sim::SimConfig::default();
    cfg.virtual_proxies[1].also_sets = vec!["qlik-lb=n1; Path=/; HttpOnly".into()];
    let sim = sim_with(cfg).await;
    let guard = guard(sim.addr()).await;
    let twice = |via: std::net::SocketAddr, user: &'static str| async move {
        let mut jar = Jar::new();
        assert_eq!(
            browse_as(via, "/hdr/hub/", &mut jar, user).await.status,
            200
        );
        browse_as(via, "/hdr/hub/", &mut jar, user).await;
        jar
    };

    // A clean path: every cookie comes back, nothing to report.
    let jar = twice(guard.addr, "CORP\\clean").await;
    assert!(jar_get(&jar, "qlik-lb").is_some() && jar_get(&jar, "qsguard").is_some());
    assert!(events(&guard, "set_cookie_folded").is_empty());

    // A middlebox folds the Set-Cookie fields: only Qlik's session cookie survives; both the
    // other cookie Qlik set and the guard's device cookie are named.
    twice(
        mangler(guard.addr, Mangle::FoldSetCookie).await,
        "CORP\\fold",
    )
    .await;
    let f = events(&guard, "set_cookie_folded");
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0]["user"], "CORP\\fold");
    assert_eq!(
        f[0]["not_returned"],
        serde_json::json!(["qlik-lb", "qsguard"])
    );
    assert!(f[0]["cause"].as_str().unwrap().contains("qlik-lb, qsguard"));
    assert_eq!(f[0]["cookies"][0]["name"], "X-Qlik-Session-hdr-HTTP");

    // The device cookie comes back but Qlik's other one never does: still a fold, named alone
    // (before, only a lost device cookie raised it).
    twice(
        mangler(guard.addr, Mangle::StripCookie("qlik-lb")).await,
        "CORP\\strip",
    )
    .await;
    let f = events(&guard, "set_cookie_folded");
    assert_eq!(f.len(), 2, "{f:?}");
    assert_eq!(f[1]["user"], "CORP\\strip");
    assert_eq!(f[1]["not_returned"], serde_json::json!(["qlik-lb"]));
    guard.shutdown().await;
}

/// A session handed to another client at the limit (`on_limit = "reuse"`) comes back from a
/// client that never got Qlik's other cookies: their absence is no fold.
#[tokio::test]
async fn a_reused_session_coming_back_without_the_others_cookies_is_no_fold() {
    let mut cfg = qsguard::sim::SimConfig::default();
    cfg.virtual_proxies[1].also_sets = vec!["qlik-lb=n1; Path=/".into()];
    let sim = sim_with(cfg).await;
    let guard = guard(sim.addr()).await;
    for _ in 0..5 {
        browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\full").await;
    }
    let mut sixth = Jar::new();
    browse_as(guard.addr, "/hdr/hub/", &mut sixth, "CORP\\full").await;
    assert_eq!(events(&guard, "session_reused").len(), 1);
    assert!(jar_get(&sixth, "qlik-lb").is_none());
    browse_as(guard.addr, "/hdr/hub/", &mut sixth, "CORP\\full").await;
    assert!(events(&guard, "set_cookie_folded").is_empty());
    assert_eq!(sim.counters().sessions_created, 5);
    guard.shutdown().await;
}

#[tokio::test]
async fn session_events_from_the_guards_decisions() {
    let sim = sim().await;
    // reuse, then refused at the limit (no session on this virtual proxy to reuse)
    let reuse = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\non_limit = \"reuse\"\n",
    ))
    .await;
    for _ in 0..6 {
        browse_as(reuse.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\r").await;
    }
    assert_eq!(events(&reuse, "session_reused").len(), 1);
    let error = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\non_limit = \"error\"\n",
    ))
    .await;
    for _ in 0..6 {
        browse_as(error.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\e").await;
    }
    assert_eq!(events(&error, "refused_at_limit").len(), 1);
    let evict = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\non_limit = \"evict\"\n",
    ))
    .await;
    for _ in 0..6 {
        browse_as(evict.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\v").await;
    }
    assert_eq!(events(&evict, "session_evicted").len(), 1);
    // Qlik's own refusal: five sessions made behind the guard's back.
    for _ in 0..5 {
        browse_as(sim.addr(), "/hdr/hub/", &mut Jar::new(), "CORP\\q").await;
    }
    browse_as(error.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\q").await;
    let q = events(&error, "qps_limit_refusal");
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["user"], "CORP\\q");
    // Replaced: Qlik forgets a live session; the next request is sent to log in again.
    let mut jar = Jar::new();
    browse_windows(reuse.addr, "/hub/", &mut jar, "CORP\\gone").await;
    let id = sim.session_ids("CORP\\gone")[0].clone();
    end_in_qlik(&sim, "", &id).await;
    // A burst of three parallel requests: one leads the new login, the others are held.
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut j = jar.clone();
        let addr = reuse.addr;
        tasks.push(tokio::spawn(async move {
            browse_windows(addr, &format!("/hub/p{i}"), &mut j, "CORP\\gone")
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(!events(&reuse, "session_replaced").is_empty());
    assert!(!events(&reuse, "burst_held").is_empty());
    for g in [reuse, error, evict] {
        g.shutdown().await;
    }
}

/// The admin token these tests use, in `dir`, and the guard's config that reads it.
const ADMIN_TOKEN: &str = "an-admin-token-of-some-length";

fn token_config(sim: &qsguard::sim::Simulator, dir: &TempDir) -> (String, std::path::PathBuf) {
    let tf = dir.write("admin.token", format!("{ADMIN_TOKEN}\n"));
    (
        with_admin_token(&config_text(&[sim.addr()], "", ""), &tf),
        tf,
    )
}

#[tokio::test]
async fn admin_api_with_and_without_token() {
    let sim = sim().await;
    let dir = TempDir::new("admin");
    let (config, _) = token_config(&sim, &dir);
    let guard = guard_with(&config).await;
    for _ in 0..2 {
        browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\adm").await;
    }
    // Reading on loopback needs no token.
    let s = admin_call(
        guard.admin_addr,
        http::Method::GET,
        "/sessions?user=CORP%5Cadm",
        None,
    )
    .await;
    assert_eq!(s.status, 200);
    let v = s.json();
    assert_eq!(v["users"][0]["user"], "CORP\\adm");
    assert_eq!(v["users"][0]["live"], 2);
    let hash = v["users"][0]["sessions"][0]["session"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(hash.len(), 12);
    assert!(
        !s.text().contains(&sim.session_ids("CORP\\adm")[0]),
        "no cookie value in the admin API"
    );
    // Changing needs it.
    assert_eq!(
        admin_call(
            guard.admin_addr,
            http::Method::DELETE,
            &format!("/sessions/{hash}"),
            None
        )
        .await
        .status,
        401
    );
    assert_eq!(
        admin_call(
            guard.admin_addr,
            http::Method::DELETE,
            &format!("/sessions/{hash}"),
            Some("wrong-token-wrong-token")
        )
        .await
        .status,
        401
    );
    let ok = admin_call(
        guard.admin_addr,
        http::Method::DELETE,
        &format!("/sessions/{hash}"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(sim.live_sessions("CORP\\adm"), 1, "ended in Qlik");
    let all = admin_call(
        guard.admin_addr,
        http::Method::DELETE,
        "/users/CORP%5Cadm/sessions",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(all.status, 200);
    assert_eq!(sim.live_sessions("CORP\\adm"), 0);
    assert_eq!(
        admin_call(guard.admin_addr, http::Method::GET, "/readyz", None)
            .await
            .status,
        200
    );
    let ev = admin_call(
        guard.admin_addr,
        http::Method::GET,
        "/events?kind=nope",
        None,
    )
    .await;
    assert_eq!(ev.status, 400);
    assert_eq!(
        admin_call(guard.admin_addr, http::Method::GET, "/events?since=0", None)
            .await
            .status,
        200
    );
    guard.shutdown().await;

    // Without a token file nothing can be changed.
    let open = common::guard(sim.addr()).await;
    assert_eq!(
        admin_call(open.admin_addr, http::Method::DELETE, "/sessions/abc", None)
            .await
            .status,
        403
    );
    open.shutdown().await;
    // And a non-loopback admin listener without a token is refused at start.
    let bad = config_text(&[sim.addr()], "", "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"0.0.0.0:0\"",
    );
    let e = qsguard::Config::parse(&bad).unwrap_err().to_string();
    assert!(e.contains("admin.token_file"), "{e}");
}

#[tokio::test]
async fn ops_commands_against_a_running_guard() {
    let sim = sim().await;
    let dir = TempDir::new("cli");
    let (config, tf) = token_config(&sim, &dir);
    let guard = guard_with(&config).await;
    for _ in 0..3 {
        browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\cli").await;
    }
    let admin = format!("http://{}", guard.admin_addr);
    let run = qsguard_output;
    let out = run(vec!["sessions".into(), "--admin".into(), admin.clone()]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("CORP\\cli") && text.contains("3 live session(s)"),
        "{text}"
    );
    let hash = guard
        .proxy()
        .sessions()
        .unwrap()
        .table
        .user_sessions("corp\\cli")[0]
        .hash
        .to_string();
    // Ending needs the token.
    let out = run(vec![
        "end-session".into(),
        hash.clone(),
        "--admin".into(),
        admin.clone(),
    ])
    .await;
    assert!(!out.status.success());
    let out = run(vec![
        "end-session".into(),
        hash,
        "--admin".into(),
        admin.clone(),
        "--token-file".into(),
        tf.display().to_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sim.live_sessions("CORP\\cli"), 2);
    let out = run(vec![
        "end-user".into(),
        "CORP\\cli".into(),
        "--admin".into(),
        admin.clone(),
        "--token-file".into(),
        tf.display().to_string(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sim.live_sessions("CORP\\cli"), 0);
    // Events: a restore makes two; `events` prints them one per line.
    let mut jar = Jar::new();
    browse_windows(guard.addr, "/hub/", &mut jar, "CORP\\ev").await;
    let mut restarted = without(&jar, "X-Qlik-Session-HTTP");
    browse(guard.addr, "/hub/", &mut restarted, &[]).await;
    let out = run(vec!["events".into(), "--admin".into(), admin.clone()]).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("cookie_lost") && text.contains("session_restored"),
        "{text}"
    );
    // --follow prints new events as they happen.
    let mut follow = qsguard_bin()
        .args([
            "events",
            "--follow",
            "--kind",
            "cookie_duplicated",
            "--admin",
            &admin,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let twice = format!("{}; X-Qlik-Session-HTTP=x", cookie_header(&restarted));
    get(guard.addr, "/hub/", &[("cookie", &twice)]).await;
    let stdout = follow.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .next()
            .and_then(|l| l.ok())
    });
    let line = tokio::time::timeout(Duration::from_secs(10), line)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.contains("cookie_duplicated"), "{line}");
    let _ = follow.kill();
    let _ = follow.wait();
    guard.shutdown().await;
}

async fn doctor(addr: std::net::SocketAddr) -> (i32, String) {
    let out = qsguard_output(vec!["doctor".into(), format!("http://{addr}")]).await;
    (out.status.code().unwrap_or(-1), output_text(&out))
}

#[tokio::test]
async fn doctor_and_cookie_check_find_stripping_and_folding_middleboxes() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let (code, text) = doctor(guard.addr).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("clean"), "{text}");

    let clean_box = mangler(guard.addr, Mangle::Clean).await;
    let (code, text) = doctor(clean_box).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("the guard saw Via: 1.1 mangler"), "{text}");

    let folding = mangler(guard.addr, Mangle::FoldSetCookie).await;
    let (code, text) = doctor(folding).await;
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("FOLDED"), "{text}");
    assert!(text.contains("folded: only the first"), "{text}");

    let dropping = mangler(guard.addr, Mangle::DropSetCookies).await;
    let (code, text) = doctor(dropping).await;
    assert_eq!(code, 3, "{text}");
    assert!(text.contains("DROPPED"), "{text}");

    let stripping = mangler(guard.addr, Mangle::StripCookie("qsguard_check_lax")).await;
    let (code, text) = doctor(stripping).await;
    assert_eq!(code, 3, "{text}");
    assert!(
        text.contains("qsguard_check_lax") && text.contains("missing"),
        "{text}"
    );

    // The page itself is served, and nothing of it reached Qlik.
    let page = get(guard.addr, "/__qsguard/cookie-check", &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("Cookie check"));
    assert_eq!(sim.counters().requests, 0);
    guard.shutdown().await;

    // It can be switched off; then the path is Qlik's like any other.
    let off = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[diagnostics]\ncookie_check = false\n",
    ))
    .await;
    get(off.addr, "/__qsguard/cookie-check", &[]).await;
    assert_eq!(sim.counters().requests, 1);
    off.shutdown().await;
}

/// `GET /events?wait=` long-polls: it answers as soon as an event comes, and with nothing at
/// the end of the wait, not before. On a clock the test moves (see common::clock).
#[tokio::test(start_paused = true)]
async fn events_follow_waits_for_new_events() {
    const SETTLE: Duration = Duration::from_millis(300);
    const PROMPT: Duration = Duration::from_secs(10);
    let clock = ManualClock::hold();
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let admin = guard.admin_addr;
    let poll = |query: String| {
        tokio::spawn(async move {
            admin_call(admin, http::Method::GET, &format!("/events?{query}"), None).await
        })
    };
    let waiting = poll("since=0&wait=10".into());
    real_sleep(SETTLE).await;
    clock.advance(Duration::from_millis(9_999)).await;
    real_sleep(SETTLE).await;
    assert!(!waiting.is_finished(), "the long poll waits");
    get(
        guard.addr,
        "/hub/",
        &[("cookie", "X-Qlik-Session-HTTP=a; X-Qlik-Session-HTTP=b")],
    )
    .await;
    let r = real_timeout(PROMPT, waiting)
        .await
        .expect("answered when the event came")
        .unwrap();
    assert_eq!(r.json()["events"][0]["kind"], "cookie_duplicated");
    let last = r.json()["last"].as_u64().unwrap();
    // Nothing new: the answer comes, empty, when the wait ends.
    let waiting = poll(format!("since={last}&wait=2"));
    real_sleep(SETTLE).await;
    clock.advance(Duration::from_millis(1_999)).await;
    real_sleep(SETTLE).await;
    assert!(!waiting.is_finished(), "the long poll waits its whole time");
    clock.advance(Duration::from_millis(1)).await;
    let r = real_timeout(PROMPT, waiting)
        .await
        .expect("answered when the wait ended")
        .unwrap();
    assert_eq!(r.json()["events"], serde_json::json!([]), "{}", r.text());
    guard.shutdown().await;
}
