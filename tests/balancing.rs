//! Several Qlik nodes behind the guard: new sessions balanced, every session and every login
//! dance kept on its node, a node that goes down and comes back, and draining.

mod common;

use common::*;

fn two_nodes(a: std::net::SocketAddr, b: std::net::SocketAddr, extra: &str) -> String {
    config_text(
        &[a, b],
        "",
        &format!(
            "[health]\ninterval = \"200ms\"\ntimeout = \"500ms\"\nfall = 2\nrise = 1\n{extra}"
        ),
    )
}

#[tokio::test]
async fn new_sessions_are_balanced_and_every_session_stays_on_its_node() {
    let (a, b) = (sim().await, sim().await);
    let guard = guard_with(&two_nodes(a.addr(), b.addr(), "")).await;
    let mut jars = Vec::new();
    for i in 0..6 {
        let mut jar = Jar::new();
        let r = browse_as(guard.addr, "/hdr/hub/", &mut jar, &format!("CORP\\u{i}")).await;
        assert_eq!(r.status, 200);
        jars.push((i, jar));
    }
    assert_eq!(
        a.counters().sessions_created,
        3,
        "balanced by live sessions"
    );
    assert_eq!(b.counters().sessions_created, 3);
    for (i, jar) in jars.iter_mut() {
        for _ in 0..3 {
            let r = browse_as(guard.addr, "/hdr/hub/x", jar, &format!("CORP\\u{i}")).await;
            assert_eq!(r.status, 200);
        }
    }
    // A cookie sent to the wrong node would be unknown there (and make a new session).
    assert_eq!(
        a.counters().unknown_cookie_requests + b.counters().unknown_cookie_requests,
        0
    );
    assert_eq!(
        a.counters().sessions_created + b.counters().sessions_created,
        6
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn a_windows_login_dance_stays_on_the_node_that_started_it() {
    let (a, b) = (sim().await, sim().await);
    let guard = guard_with(&two_nodes(a.addr(), b.addr(), "")).await;
    for i in 0..6 {
        let mut jar = Jar::new();
        let r = browse_windows(guard.addr, "/hub/", &mut jar, &format!("CORP\\w{i}")).await;
        assert_eq!(r.status, 200, "login {i} crossed nodes: {}", r.text());
    }
    let (ca, cb) = (a.counters(), b.counters());
    assert_eq!(ca.sessions_created + cb.sessions_created, 6);
    assert!(
        ca.sessions_created > 0 && cb.sessions_created > 0,
        "both nodes take logins"
    );
    assert_eq!(ca.tickets_redeemed + cb.tickets_redeemed, 6);
    guard.shutdown().await;
}

#[tokio::test]
async fn a_node_down_loses_its_sessions_and_comes_back() {
    let (a, b) = (sim().await, sim().await);
    let b_addr = b.addr();
    let guard = guard_with(&two_nodes(a.addr(), b_addr, "")).await;
    let mut jars = Vec::new();
    for i in 0..4 {
        let mut jar = Jar::new();
        browse_as(guard.addr, "/hdr/hub/", &mut jar, &format!("CORP\\d{i}")).await;
        jars.push(jar);
    }
    let on_a = a.counters().sessions_created;
    b.stop().await;
    let g = guard.proxy().clone();
    eventually("node b marked down", || {
        g.upstreams().nodes().iter().any(|n| !n.is_up())
    })
    .await;
    let lost = events(&guard, "session_lost");
    assert_eq!(lost.len(), 2, "node b's sessions are reported lost");
    // Everyone still gets in: node a's users on their sessions, node b's on new ones on a.
    for (i, jar) in jars.iter_mut().enumerate() {
        let r = browse_as(guard.addr, "/hdr/hub/", jar, &format!("CORP\\d{i}")).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(a.counters().sessions_created, on_a + 2);
    let up = get(guard.admin_addr, "/upstreams", &[("host", "localhost")])
        .await
        .json();
    assert!(
        up["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["state"] == "down"),
        "{up}"
    );
    assert!(
        up["upstreams"][0]["last_check"]["result"].is_string(),
        "{up}"
    );
    assert_eq!(up["upstreams"][0]["in_flight"], 0);
    let metrics = get(guard.admin_addr, "/metrics", &[("host", "localhost")])
        .await
        .text();
    assert!(
        metrics.contains("qsguard_upstream_up{upstream="),
        "{metrics}"
    );
    assert!(
        metrics.contains("qsguard_upstream_live_sessions{upstream="),
        "{metrics}"
    );
    // The node comes back: it takes new sessions again.
    let b = restart_sim(b_addr).await;
    eventually("node b up again", || {
        g.upstreams().nodes().iter().all(|n| n.is_up())
    })
    .await;
    for i in 10..14 {
        browse_as(
            guard.addr,
            "/hdr/hub/",
            &mut Jar::new(),
            &format!("CORP\\d{i}"),
        )
        .await;
    }
    assert!(
        b.counters().sessions_created >= 2,
        "new sessions go to the node that came back"
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn a_drained_node_gets_no_new_sessions_and_keeps_its_own() {
    let (a, b) = (sim().await, sim().await);
    let dir = TempDir::new("drain");
    let token = dir.write("token", "drain-token-of-some-length");
    let text = with_admin_token(&two_nodes(a.addr(), b.addr(), ""), &token);
    let guard = guard_with(&text).await;
    let mut on_b = Jar::new();
    // Two users: one lands on each node.
    browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\x0").await;
    browse_as(guard.addr, "/hdr/hub/", &mut on_b, "CORP\\x1").await;
    let b_name = format!("127.0.0.1:{}", b.addr().port());
    let b_before = b.counters().sessions_created;
    let drain = admin_call(
        guard.admin_addr,
        http::Method::POST,
        &format!("/upstreams/{b_name}/drain"),
        Some("drain-token-of-some-length"),
    )
    .await;
    assert_eq!(drain.status, 200, "{}", drain.text());
    for i in 2..8 {
        browse_as(
            guard.addr,
            "/hdr/hub/",
            &mut Jar::new(),
            &format!("CORP\\x{i}"),
        )
        .await;
    }
    assert_eq!(
        b.counters().sessions_created,
        b_before,
        "no new sessions on the drained node"
    );
    let before = b.counters().requests;
    let r = browse_as(guard.addr, "/hdr/hub/", &mut on_b, "CORP\\x1").await;
    assert_eq!(r.status, 200);
    assert!(
        b.counters().requests > before,
        "the drained node keeps serving its sessions"
    );
    assert_eq!(b.counters().sessions_created, b_before);
    guard.shutdown().await;
}

#[tokio::test]
async fn the_sticky_cookie_finds_the_node_of_a_session_the_guard_has_not_seen_created() {
    let (a, b) = (sim().await, sim().await);
    let text = two_nodes(
        a.addr(),
        b.addr(),
        "[proxy]\nsticky_cookie = \"qsguard_node\"\n",
    );
    let first = guard_with(&text).await;
    let mut jars = Vec::new();
    for i in 0..6 {
        let mut jar = Jar::new();
        let r = browse_as(first.addr, "/hdr/hub/", &mut jar, &format!("CORP\\s{i}")).await;
        assert_eq!(r.status, 200);
        assert!(
            jar.iter().any(|(k, _)| k == "qsguard_node"),
            "the node is named in a cookie: {jar:?}"
        );
        jars.push(jar);
    }
    let values: std::collections::HashSet<_> = jars
        .iter()
        .map(|j| jar_get(j, "qsguard_node").unwrap())
        .collect();
    assert_eq!(values.len(), 2, "one value per node");
    for v in &values {
        assert!(
            !v.contains("127.0.0.1"),
            "the value does not show the node's address"
        );
    }
    // A new guard without a snapshot has seen none of these sessions made: the sticky cookie
    // sends each to its node, where Qlik knows it. (In reverse order: balancing alone would
    // then send some to the other node.)
    first.shutdown().await;
    let second = guard_with(&text).await;
    let created = a.counters().sessions_created + b.counters().sessions_created;
    for (i, jar) in jars.iter_mut().enumerate().rev() {
        for _ in 0..2 {
            let r = browse_as(second.addr, "/hdr/hub/x", jar, &format!("CORP\\s{i}")).await;
            assert_eq!(r.status, 200);
        }
    }
    assert_eq!(
        a.counters().unknown_cookie_requests + b.counters().unknown_cookie_requests,
        0,
        "every session cookie reached the node that holds it"
    );
    assert_eq!(
        a.counters().sessions_created + b.counters().sessions_created,
        created,
        "nobody got a new session"
    );
    second.shutdown().await;

    // With the session guard off, the sticky cookie is all the affinity there is.
    let off = guard_with(&format!("{text}[sessions]\nguard = false\n")).await;
    for (i, jar) in jars.iter_mut().enumerate().rev() {
        let r = browse_as(off.addr, "/hdr/hub/x", jar, &format!("CORP\\s{i}")).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        a.counters().unknown_cookie_requests + b.counters().unknown_cookie_requests,
        0
    );
    off.shutdown().await;
}

#[tokio::test]
async fn a_sticky_cookie_without_a_session_does_not_send_a_new_login_to_a_draining_node() {
    let (a, b) = (sim().await, sim().await);
    let dir = TempDir::new("sticky-drain");
    let token = dir.write("token", "sticky-drain-token-0123");
    let text = with_admin_token(
        &two_nodes(
            a.addr(),
            b.addr(),
            "[proxy]\nsticky_cookie = \"qsguard_node\"\n",
        ),
        &token,
    );
    let guard = guard_with(&text).await;
    let mut jar = Jar::new();
    browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\d0").await;
    let sticky = jar_get(&jar, "qsguard_node").unwrap();
    let g = guard.proxy().clone();
    let node = g
        .upstreams()
        .nodes()
        .iter()
        .find(|n| *n.sticky == *sticky)
        .unwrap()
        .clone();
    let (on, other) = if node.name == format!("127.0.0.1:{}", a.addr().port()) {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let r = admin_call(
        guard.admin_addr,
        http::Method::POST,
        &format!("/upstreams/{}/drain", node.name),
        Some("sticky-drain-token-0123"),
    )
    .await;
    assert_eq!(r.status, 200);
    // Logins that carry only the sticky cookie (the user logged out; the cookie lives on) are
    // new sessions: they go to the node that is not draining.
    let created = on.counters().sessions_created;
    for i in 1..4 {
        let mut j: Jar = vec![("qsguard_node".to_string(), sticky.clone())];
        let r = browse_as(guard.addr, "/hdr/hub/", &mut j, &format!("CORP\\d{i}")).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        on.counters().sessions_created,
        created,
        "none on the draining node"
    );
    assert!(other.counters().sessions_created >= 3);
    // The drained node's own session goes on there.
    let before = on.counters().requests;
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/x", &mut jar, "CORP\\d0")
            .await
            .status,
        200
    );
    assert!(on.counters().requests > before);
    guard.shutdown().await;
}

/// A restart of the guard without a snapshot: it no longer knows which node holds each
/// session, so it asks the nodes (the Personal API with the browser's cookie) before sending a
/// session cookie it does not know; no browser loses its session to a node that does not
/// know it.
#[tokio::test]
async fn a_restart_without_a_snapshot_keeps_every_session_on_its_node() {
    let (a, b) = (sim().await, sim().await);
    let config = two_nodes(a.addr(), b.addr(), "");
    let guard = guard_with(&config).await;
    let mut jars = Vec::new();
    for i in 0..5 {
        let mut jar = Jar::new();
        let user = format!("CORP\\b{i}");
        let r = browse_windows(guard.addr, "/hub/", &mut jar, &user).await;
        assert_eq!(r.status, 200);
        jars.push((user, jar));
    }
    let made = || a.counters().sessions_created + b.counters().sessions_created;
    assert_eq!(made(), 5);
    assert!(a.counters().sessions_created > 0 && b.counters().sessions_created > 0);
    guard.shutdown().await;

    let guard = guard_with(&config).await;
    let mut kept = 0;
    for (user, jar) in jars.iter_mut() {
        let before = jar_get(jar, "X-Qlik-Session-HTTP");
        let r = browse_windows(guard.addr, "/hub/", jar, user).await;
        assert_eq!(r.status, 200);
        if jar_get(jar, "X-Qlik-Session-HTTP") == before && r.text().contains(user.as_str()) {
            kept += 1;
        }
    }
    eprintln!("browsers that kept their session over a restart of a two-node guard: {kept} of 5");
    assert_eq!(kept, 5);
    assert_eq!(made(), 5, "no new session in Qlik");
    // The answer is kept: the next requests go straight to the session's node, nothing else.
    let requests = || a.counters().requests + b.counters().requests;
    let (before, unknown) = (
        requests(),
        a.counters().unknown_cookie_requests + b.counters().unknown_cookie_requests,
    );
    for (user, jar) in jars.iter_mut() {
        let r = browse_windows(guard.addr, "/hub/x", jar, user).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(requests(), before + 5);
    assert_eq!(
        a.counters().unknown_cookie_requests + b.counters().unknown_cookie_requests,
        unknown
    );
    guard.shutdown().await;
}

/// Only a value shaped like a Qlik session id is looked up, once: a made-up value is asked of
/// each node at most once, and one of any other shape never.
#[tokio::test]
async fn an_unknown_cookie_is_looked_up_once_and_only_when_it_could_be_a_session() {
    let (a, b) = (sim().await, sim().await);
    let guard = guard_with(&two_nodes(a.addr(), b.addr(), "")).await;
    let requests = || a.counters().requests + b.counters().requests;
    let send = |value: &'static str| async move {
        let cookie = format!("X-Qlik-Session-hdr-HTTP={value}");
        let r = get(
            guard.addr,
            "/hdr/hub/",
            &[("hdr-usr", "CORP\\made"), ("cookie", &cookie)],
        )
        .await;
        assert_eq!(r.status, 200);
    };
    let start = requests();
    send("0b9c3f1e-5a4d-4e2b-9c8f-7d6e5f4a3b2c").await;
    assert_eq!(
        requests(),
        start + 3,
        "one lookup per node, then the request"
    );
    send("0b9c3f1e-5a4d-4e2b-9c8f-7d6e5f4a3b2c").await;
    assert_eq!(requests(), start + 4, "the answer is kept");
    send("not-a-session-id").await;
    assert_eq!(
        requests(),
        start + 5,
        "no lookup for a value of another shape"
    );
    guard.shutdown().await;
}
