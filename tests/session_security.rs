//! One person's session never reaches another: the device cookie cannot be forged or fixed,
//! restore is a policy, the identity header is believed only from where it can come from, and
//! only a cookie value Qlik confirmed counts as a session.

mod common;

use common::*;

const WIN: &str = "X-Qlik-Session-HTTP";
const HDR: &str = "X-Qlik-Session-hdr-HTTP";
const DEVICE: &str = "qsguard";

fn with_cookie(jar: &Jar, name: &str, value: &str) -> Jar {
    let mut j = without(jar, name);
    j.push((name.to_string(), value.to_string()));
    j
}

/// A visit through the Windows-style login of the simulator (central proxy) as `user`.
async fn win_login(addr: std::net::SocketAddr, path: &str, jar: &mut Jar, user: &str) -> Resp {
    browse_windows(addr, path, jar, user).await
}

/// The `Set-Cookie` line of the device cookie in an answer, if it sets one.
fn device_line(r: &Resp) -> Option<String> {
    r.all("set-cookie")
        .into_iter()
        .find(|c| c.starts_with(&format!("{DEVICE}=")))
}

/// The device cookie value an answer sets, if it sets one.
fn set_device(r: &Resp) -> Option<String> {
    let line = device_line(r)?;
    let value = line[DEVICE.len() + 1..].split(';').next().unwrap_or("");
    Some(value.to_string())
}

/// A browser's visit that must not be handed `session`: it presents only `device`.
async fn tries_device_alone(addr: std::net::SocketAddr, device: &str, user: &str) -> Jar {
    let mut jar = vec![(DEVICE.to_string(), device.to_string())];
    browse_windows(addr, "/hub/", &mut jar, user).await;
    jar
}

#[tokio::test]
async fn a_device_cookie_planted_before_login_leads_to_nothing() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    // The attacker's browser gets a device cookie: its first answer sets one.
    let first = get(guard.addr, "/__sim/echo", &[]).await;
    assert_eq!(first.status, 200);
    let planted = set_device(&first).expect("a device cookie");
    // ... and plants it in the victim's browser before the victim logs in.
    let mut victim = vec![(DEVICE.to_string(), planted.clone())];
    let r = win_login(guard.addr, "/hub/", &mut victim, "CORP\\victim").await;
    assert_eq!(r.status, 200);
    let victims = jar_get(&victim, WIN).expect("the victim has a session");
    assert_ne!(
        jar_get(&victim, DEVICE).as_deref(),
        Some(planted.as_str()),
        "logging in gives the browser a new device id"
    );
    // The attacker presents the planted value without a session cookie.
    let got = tries_device_alone(guard.addr, &planted, "CORP\\mallory").await;
    assert_ne!(
        jar_get(&got, WIN),
        Some(victims.clone()),
        "the victim's session was handed over"
    );
    assert_eq!(sim.live_sessions("CORP\\victim"), 1);
    guard.shutdown().await;
}

#[tokio::test]
async fn a_device_cookie_planted_after_login_is_replaced_not_linked() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut attacker = Jar::new();
    win_login(guard.addr, "/hub/", &mut attacker, "CORP\\mallory2").await;
    let planted = jar_get(&attacker, DEVICE).unwrap();
    let mut victim = Jar::new();
    win_login(guard.addr, "/hub/", &mut victim, "CORP\\victim2").await;
    let victims = jar_get(&victim, WIN).unwrap();
    // The planted value goes along with the victim's live session cookie.
    let mut planted_jar = with_cookie(&victim, DEVICE, &planted);
    let r = win_login(guard.addr, "/hub/x", &mut planted_jar, "CORP\\victim2").await;
    assert_eq!(r.status, 200);
    assert_ne!(
        jar_get(&planted_jar, DEVICE),
        Some(planted.clone()),
        "replaced"
    );
    let got = tries_device_alone(guard.addr, &planted, "CORP\\mallory2").await;
    assert_ne!(jar_get(&got, WIN), Some(victims));
    guard.shutdown().await;
}

#[tokio::test]
async fn a_forged_device_cookie_is_replaced_and_never_restores() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut victim = Jar::new();
    win_login(guard.addr, "/hub/", &mut victim, "CORP\\forged").await;
    let victims = jar_get(&victim, WIN).unwrap();
    let device = jar_get(&victim, DEVICE).unwrap();
    // The id alone (the unsigned form), and the id with another tag: they restore nothing,
    // and the browser's next session comes with a device cookie the guard signed.
    let (id, _) = device.split_once('.').expect("id.tag");
    for forged in [id.to_string(), format!("{id}.{}", "0".repeat(64))] {
        let mut jar = vec![(DEVICE.to_string(), forged.clone())];
        let r = win_login(guard.addr, "/hub/", &mut jar, "CORP\\forger").await;
        assert_eq!(r.status, 200);
        assert_ne!(
            jar_get(&jar, WIN),
            Some(victims.clone()),
            "restored with a forged device"
        );
        let now = jar_get(&jar, DEVICE).unwrap();
        assert!(now != forged && !now.starts_with(id), "replaced: {now}");
    }
    // A value not of the guard's form at all is replaced at once.
    let r = get(
        guard.addr,
        "/hub/",
        &[("cookie", &format!("{DEVICE}=../../etc"))],
    )
    .await;
    assert!(set_device(&r).is_some(), "replaced at once");
    assert_eq!(
        session_guard(&guard)
            .counters
            .restored
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn the_device_cookie_is_secure_behind_a_trusted_https_proxy() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "trusted_proxies = [\"127.0.0.1/32\"]\n",
        "",
    ))
    .await;
    let r = get(guard.addr, "/hub/", &[("x-forwarded-proto", "https")]).await;
    let device = device_line(&r).expect("a device cookie");
    assert!(device.contains("Secure"), "{device}");
    let plain = get(guard.addr, "/hub/", &[]).await;
    let device = device_line(&plain).expect("a device cookie");
    assert!(!device.contains("Secure"), "{device}");
    guard.shutdown().await;
    // From a peer that is not trusted, X-Forwarded-Proto says nothing.
    let untrusted = guard_with(&config_text(
        &[sim.addr()],
        "trusted_proxies = [\"10.0.0.0/8\"]\n",
        "",
    ))
    .await;
    let r = get(untrusted.addr, "/hub/", &[("x-forwarded-proto", "https")]).await;
    let device = device_line(&r).expect("a device cookie");
    assert!(!device.contains("Secure"), "{device}");
    untrusted.shutdown().await;
}

#[tokio::test]
async fn restore_off_sends_a_restarted_browser_to_log_in() {
    let sim = sim().await;
    let text = config_text(&[sim.addr()], "", "").replace(
        "session_cookie = \"X-Qlik-Session-HTTP\"\n",
        "session_cookie = \"X-Qlik-Session-HTTP\"\nrestore = false\n",
    );
    let guard = guard_with(&text).await;
    let mut jar = Jar::new();
    win_login(guard.addr, "/hub/", &mut jar, "CORP\\shared").await;
    let mut restarted = without(&jar, WIN);
    let r = win_login(guard.addr, "/hub/", &mut restarted, "CORP\\shared").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        sim.counters().sessions_created,
        2,
        "a new login, not a restore"
    );
    assert_eq!(
        session_guard(&guard)
            .counters
            .restored
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn on_header_authentication_a_restore_needs_the_header_to_name_the_user() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut jar = Jar::new();
    browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\hana").await;
    let hanas = jar_get(&jar, HDR).unwrap();
    let lost = without(&jar, HDR);
    // No identity header, and another user's: neither gets hana's session.
    for headers in [vec![], vec![("hdr-usr", "CORP\\other")]] {
        let r = get(
            guard.addr,
            "/hdr/hub/",
            &[vec![("cookie", cookie_header(&lost).as_str())], headers].concat(),
        )
        .await;
        assert!(
            !r.all("set-cookie").iter().any(|c| c.contains(&hanas)),
            "restored without the header naming the user"
        );
    }
    // The header naming her: restored.
    let r = get(
        guard.addr,
        "/hdr/hub/",
        &[
            ("cookie", cookie_header(&lost).as_str()),
            ("hdr-usr", "CORP\\hana"),
        ],
    )
    .await;
    assert!(r.all("set-cookie").iter().any(|c| c.contains(&hanas)));
    guard.shutdown().await;
}

#[tokio::test]
async fn the_identity_header_is_believed_only_from_identity_from() {
    let sim = sim().await;
    // Loopback (where the test connects from) is not among the peers the header may come from.
    let text = config_text(&[sim.addr()], "", "").replace(
        "identity_header = \"hdr-usr\"\n",
        "identity_header = \"hdr-usr\"\nidentity_from = [\"10.0.0.0/8\"]\n",
    );
    let guard = guard_with(&text).await;
    let r = get(
        guard.addr,
        "/hdr/__sim/echo?idfrom",
        &[("hdr-usr", "CORP\\ceo")],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = received(&sim, "/hdr/__sim/echo");
    assert!(!seen.is_empty());
    assert!(
        values(&seen, "hdr-usr").is_empty(),
        "the header reached Qlik: {seen:?}"
    );
    let r = get(guard.addr, "/hdr/hub/", &[("hdr-usr", "CORP\\ceo")]).await;
    assert_eq!(r.status, 401, "Qlik sees no identity: {}", r.text());
    assert_eq!(sim.counters().sessions_created, 0);
    assert_eq!(session_guard(&guard).table.live_count("corp\\ceo"), 0);
    guard.shutdown().await;
    // From a peer it is believed from, it passes.
    let text = config_text(&[sim.addr()], "", "").replace(
        "identity_header = \"hdr-usr\"\n",
        "identity_header = \"hdr-usr\"\nidentity_from = [\"127.0.0.1/32\"]\n",
    );
    let guard = guard_with(&text).await;
    let mut jar = Jar::new();
    let r = browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\ceo").await;
    assert_eq!(r.status, 200);
    assert_eq!(session_guard(&guard).table.live_count("corp\\ceo"), 1);
    guard.shutdown().await;
}

#[tokio::test]
async fn made_up_cookie_values_count_towards_no_limit() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    // Six made-up session cookies on a path that answers without a session, with a valid
    // identity header: none of them is a session in Qlik.
    for i in 0..6 {
        let made_up = format!("6f1c3a2e-0000-4000-8000-00000000000{i}");
        let r = get(
            guard.addr,
            "/hdr/__sim/echo",
            &[
                ("cookie", &format!("{HDR}={made_up}")),
                ("hdr-usr", "CORP\\fake"),
            ],
        )
        .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(session_guard(&guard).table.live_count("corp\\fake"), 0);
    // The user still gets in: nothing counted against the limit.
    let mut jar = Jar::new();
    let r = browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\fake").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(session_guard(&guard).table.live_count("corp\\fake"), 1);
    eventually("the made-up values are known dead", || {
        session_guard(&guard).table.unconfirmed() == 0
    })
    .await;
    guard.shutdown().await;
}

#[tokio::test]
async fn a_device_key_rotation_replaces_every_device_cookie() {
    let sim = sim().await;
    let dir = TempDir::new("devkey");
    let snapshot = dir.path().join("sessions.json");
    let token = dir.write("token", "s3cret-token-for-rotation");
    let text = with_admin_token(
        &config_text(
            &[sim.addr()],
            "",
            &format!("[sessions]\nsnapshot_file = \"{}\"\n", snapshot.display()),
        ),
        &token,
    );
    let guard = guard_with(&text).await;
    let key_file = qsguard::session::device::key_file(&snapshot);
    assert!(key_file.exists(), "the key is kept beside the snapshot");
    let mut jar = Jar::new();
    win_login(guard.addr, "/hub/", &mut jar, "CORP\\rot").await;
    let before = jar_get(&jar, DEVICE).unwrap();
    let r = admin_call(
        guard.admin_addr,
        http::Method::POST,
        "/device-key/rotate",
        Some("s3cret-token-for-rotation"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = win_login(guard.addr, "/hub/", &mut jar, "CORP\\rot").await;
    assert_eq!(r.status, 200);
    assert_ne!(
        jar_get(&jar, DEVICE).unwrap(),
        before,
        "replaced after the rotation"
    );
    assert_eq!(sim.counters().sessions_created, 1, "the live session stays");
    guard.shutdown().await;
}

#[tokio::test]
async fn a_planted_device_cookie_does_not_let_its_holder_wait_for_a_login() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let planted = set_device(&get(guard.addr, "/__sim/echo", &[]).await).expect("a device");
    let cookie = format!("{DEVICE}={planted}");
    // The victim's browser, holding the planted value, starts its login dance...
    let first = get(guard.addr, "/hub/", &[("cookie", &cookie)]).await;
    assert_eq!(first.status, 302);
    let login = first.header("location").expect("to the login");
    // ... while the attacker, presenting the same value from elsewhere, waits on its flight.
    let addr = guard.addr;
    let attacker_cookie = cookie.clone();
    let attacker = tokio::spawn(async move {
        get(
            addr,
            "/hub/",
            &[("cookie", &attacker_cookie), ("user-agent", "evil/1.0")],
        )
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut victim = vec![(DEVICE.to_string(), planted.clone())];
    let r = win_login(guard.addr, &login, &mut victim, "CORP\\dancer").await;
    assert_eq!(r.status, 200);
    let victims = jar_get(&victim, WIN).expect("the victim has a session");
    let got = attacker.await.unwrap();
    assert!(
        !got.all("set-cookie").iter().any(|c| c.contains(&victims)),
        "the attacker was handed the session the victim logged in to"
    );
    guard.shutdown().await;
}
