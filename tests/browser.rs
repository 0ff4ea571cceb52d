//! One end-to-end test in a real browser: headless Chromium (Debian's `chromium`, installed by
//! `.ci/run`) logs in through the guard to the simulator, is closed and started again with the
//! same profile, and lands on the hub in the same Qlik session (the restore); then it opens the
//! cookie-check page, whose script reports a clean path.
//!
//! Without Chromium on the machine the test says so and passes, unless
//! `QSGUARD_REQUIRE_BROWSER=1` (set by `.ci/run`), where a missing browser is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

fn chromium() -> Option<PathBuf> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Starts Chromium on `url` with the profile `profile`, lets the page's scripts run for up to
/// `budget_ms` of virtual time, and returns the DOM it ends on. Each call is a new browser
/// process: one call, one "browser start".
async fn chromium_dom(bin: &Path, profile: &Path, url: &str, budget_ms: u32) -> String {
    let args = vec![
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-quic".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        format!("--user-data-dir={}", profile.display()),
        format!("--virtual-time-budget={budget_ms}"),
        "--dump-dom".into(),
        url.to_string(),
    ];
    let bin = bin.to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .arg("90")
            .arg(&bin)
            .args(&args)
            .output()
            .expect("chromium runs")
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_real_browser_keeps_its_qlik_session_across_a_restart() {
    let Some(bin) = chromium() else {
        if std::env::var("QSGUARD_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
            panic!(
                "QSGUARD_REQUIRE_BROWSER=1 but no Chromium is installed (apt-get install chromium)"
            );
        }
        eprintln!(
            "skipped: no Chromium on this machine (apt-get install chromium to run this test)"
        );
        return;
    };
    // Windows authentication: Chromium answers the NTLM challenge as DEMO\alice (the
    // credentials in the URL) with a real NTLMv2 proof, which the simulator cannot check, so
    // it takes any proof on the connection holding the challenge, as in the demo.
    let mut config = qsguard::sim::SimConfig::default();
    config.virtual_proxies[0].auth = qsguard::sim::SimAuth::Windows {
        accept_any_proof: true,
    };
    let sim = sim_with(config).await;
    let guard = guard(sim.addr()).await;
    let profile = TempDir::new("chromium");
    let hub = format!(
        "http://DEMO%5Calice:secret@127.0.0.1:{}/hub/stream/1",
        guard.addr.port()
    );

    let first = chromium_dom(&bin, &profile, &hub, 2000).await;
    assert!(
        first.contains("<p id=\"path\">/hub/stream/1</p>"),
        "the login ends on the hub: {first}"
    );
    assert_eq!(sim.counters().sessions_created, 1);
    assert_eq!(sim.live_sessions("DEMO\\alice"), 1);
    assert_eq!(sim.counters().ntlm_handshakes, 1);

    // The browser is closed and started again with the same profile: its Qlik cookie (a
    // browser-session cookie) is gone, the guard's device cookie is not.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = chromium_dom(&bin, &profile, &hub, 2000).await;
    assert!(
        second.contains("<p id=\"path\">/hub/stream/1</p>"),
        "back on the hub: {second}"
    );
    let c = sim.counters();
    assert_eq!(
        c.sessions_created, 1,
        "the same Qlik session, not a new one"
    );
    assert_eq!(c.limit_refusals, 0);
    let g = guard.proxy().sessions().unwrap();
    assert_eq!(
        g.counters
            .restored
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "restored once, for the restarted browser"
    );

    // The cookie-check page in the same browser: its script runs the test and shows the result.
    let check = format!(
        "http://127.0.0.1:{}/__qsguard/cookie-check",
        guard.addr.port()
    );
    let page = chromium_dom(&bin, &profile, &check, 5000).await;
    assert!(page.contains("Result: clean"), "{page}");
    assert!(page.contains("qsguard_check_long"), "{page}");

    // The same page behind a device that folds Set-Cookie headers, and one that strips a
    // cookie: the page tells this browser what went wrong.
    let folding = mangler(guard.addr, Mangle::FoldSetCookie).await;
    let page = chromium_dom(
        &bin,
        &profile,
        &format!("http://{folding}/__qsguard/cookie-check"),
        5000,
    )
    .await;
    assert!(page.contains("Result: folded"), "{page}");
    let stripping = mangler(guard.addr, Mangle::StripCookie("qsguard_check_lax")).await;
    let page = chromium_dom(
        &bin,
        &profile,
        &format!("http://{stripping}/__qsguard/cookie-check"),
        5000,
    )
    .await;
    assert!(page.contains("Result: dropped"), "{page}");
    assert!(
        page.contains("Via: 1.1 mangler"),
        "the middlebox is named: {page}"
    );

    guard.shutdown().await;
}
