//! The admin API against a browser on another site (DNS rebinding), calls without a token,
//! and the limit page's CSRF token.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::Method;
use http_body_util::Full;
use qsguard::session::identity::User;

async fn admin_get(admin: std::net::SocketAddr, path: &str, host: &str) -> Resp {
    send(
        admin,
        http::Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap()
}

/// A page on evil.example that resolves its name to 127.0.0.1 reaches the admin port with
/// `Host: evil.example`: refused with 421 before anything is read or changed. Localhost names,
/// the listener's own address and `admin.allowed_hosts` pass.
#[tokio::test]
async fn admin_refuses_host_names_that_are_not_its_own() {
    let sim = sim().await;
    let config = config_text(&[sim.addr()], "", "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"qsguard-admin.corp.example\"]\n",
    );
    let guard = guard_with(&config).await;
    let admin = guard.admin_addr;
    for host in [
        "evil.example",
        &format!("evil.example:{}", admin.port()),
        "localhost.evil.example",
    ] {
        for path in ["/sessions", "/metrics", "/healthz"] {
            let r = admin_get(admin, path, host).await;
            assert_eq!(r.status, 421, "{host} {path}");
            assert!(r.text().contains("admin.allowed_hosts"), "{}", r.text());
        }
    }
    for host in [
        "localhost".to_string(),
        format!("localhost:{}", admin.port()),
        admin.to_string(),
        "[::1]".to_string(),
        "qsguard-admin.corp.example".to_string(),
    ] {
        assert_eq!(
            admin_get(admin, "/sessions", &host).await.status,
            200,
            "{host}"
        );
    }
    // An absolute target names the host too, and wins over the Host field (RFC 9112 3.2.2).
    let raw_reply = raw(
        admin,
        b"GET http://evil.example/sessions HTTP/1.1\r\nHost: localhost\r\n\r\n",
        std::time::Duration::from_millis(500),
    )
    .await;
    assert_eq!(statuses(&raw_reply), vec![421]);
    guard.shutdown().await;
}

/// Off loopback the listener needs a token (config validation); with a token, a GET from a
/// loopback peer is answered without one, and changes always need it.
#[tokio::test]
async fn reads_without_a_token_only_from_loopback() {
    let bad = config_text(&[([127, 0, 0, 1], 1).into()], "", "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"0.0.0.0:0\"",
    );
    let e = qsguard::Config::parse(&bad).expect_err("a non-loopback admin needs a token");
    assert_eq!(e.key, "admin.token_file", "{e}");

    let sim = sim().await;
    let dir = TempDir::new("admin-token");
    let token = "0123456789abcdef0123";
    let file = dir.write("token", token);
    let config = with_admin_token(&config_text(&[sim.addr()], "", ""), &file).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"0.0.0.0:0\"",
    );
    let guard = guard_with(&config).await;
    let admin: std::net::SocketAddr = ([127, 0, 0, 1], guard.admin_addr.port()).into();
    let r = admin_call(admin, Method::GET, "/sessions", None).await;
    assert_eq!(r.status, 200, "a loopback peer reads: {}", r.text());
    let r = admin_call(admin, Method::POST, "/reload", None).await;
    assert_eq!(r.status, 401, "changes need the token");
    let r = admin_call(admin, Method::DELETE, "/sessions/abc", Some(token)).await;
    assert_eq!(r.status, 404, "with it, the call is made: {}", r.text());
    guard.shutdown().await;
}

/// The limit page's form token carries its issue time under the guard's key: an old token,
/// one whose time was changed, or one of another browser or user ends nothing.
#[tokio::test]
async fn limit_page_token_expires_and_is_bound_to_browser_and_user() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\nmax_per_user = 1\non_limit = \"error\"\n",
    ))
    .await;
    let g: Arc<qsguard::session::SessionGuard> = guard.proxy().sessions().unwrap().clone();
    let mut first = Jar::new();
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut first, "CORP\\ann")
            .await
            .status,
        200
    );
    let mut second = Jar::new();
    let page = browse_as(guard.addr, "/hdr/hub/", &mut second, "CORP\\ann").await;
    assert_eq!(page.status, 429);
    let text = page.text();
    let token = between(&text, "name=\"csrf\" value=\"", "\"");
    let hash = between(&text, "name=\"session\" value=\"", "\"");
    let cookie = cookie_header(&second);
    let device = qsguard::session::device::id_of(&jar_get(&second, "qsguard").unwrap()).unwrap();
    let ann = User::new("CORP", "ann");
    let form = |csrf: &str| format!("session={hash}&csrf={csrf}&return=%2Fhdr%2Fhub%2F");

    let now = g.table.now_ms();
    let old = g.csrf_token_at(device, &ann, now - 11 * 60_000);
    let r = post_form(guard.addr, &cookie, "CORP\\ann", &form(&old)).await;
    assert_eq!(r.status, 403);
    assert!(r.text().contains("expired"), "{}", r.text());

    let (_, mac) = token.split_once('.').expect("issue time . hash");
    let moved = format!("{:x}.{mac}", now + 5 * 60_000);
    let r = post_form(guard.addr, &cookie, "CORP\\ann", &form(&moved)).await;
    assert_eq!(r.status, 403, "the issue time is signed");

    let other = g.csrf_token_at(device ^ 1, &ann, now);
    let r = post_form(guard.addr, &cookie, "CORP\\ann", &form(&other)).await;
    assert_eq!(r.status, 403, "another browser's token");
    let bob = g.csrf_token_at(device, &User::new("CORP", "bob"), now);
    let r = post_form(guard.addr, &cookie, "CORP\\ann", &form(&bob)).await;
    assert_eq!(r.status, 403, "another user's token");
    assert_eq!(sim.live_sessions("CORP\\ann"), 1, "nothing was ended");

    let r = post_form(guard.addr, &cookie, "CORP\\ann", &form(&token)).await;
    assert_eq!(r.status, 303, "the page's own token, in time: {}", r.text());
    assert_eq!(sim.live_sessions("CORP\\ann"), 0);
    guard.shutdown().await;
}

fn between(text: &str, start: &str, end: &str) -> String {
    let i = text.find(start).expect("marker") + start.len();
    let j = text[i..].find(end).unwrap() + i;
    text[i..j].to_string()
}

async fn post_form(addr: std::net::SocketAddr, cookie: &str, user: &str, body: &str) -> Resp {
    send(
        addr,
        http::Request::post("/__qsguard/end-session")
            .header("host", "qlik.example.com")
            .header("cookie", cookie)
            .header("hdr-usr", user)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap(),
    )
    .await
    .unwrap()
}
