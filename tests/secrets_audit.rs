//! The secrets audit itself (tests/common/audit.rs) can fail: it finds a session id the
//! simulator issued and a device cookie the guard set, also glued into a path, and it knows a
//! value it never saw is no secret. Every other test of the suite runs its outputs through it.

mod common;

use common::*;

#[tokio::test]
async fn the_audit_finds_issued_values_wherever_they_stand() {
    let sim = sim().await;
    let g = guard(sim.addr()).await;
    let mut jar = Jar::default();
    let r = Client::plain(g.addr)
        .browse_as("/hdr/hub/", &mut jar, "CORP\\audit")
        .await;
    assert_eq!(r.status, 200);
    let session = jar_get(&jar, "X-Qlik-Session-hdr-HTTP").expect("a session cookie");
    let device = jar_get(&jar, "qsguard").expect("a device cookie");
    assert!(qsguard::sim::secrets::issued(&session));
    for text in [
        format!("cannot learn the owner: 400 for GET /qps/hdr/session/{session}"),
        format!("{{\"cookie\":\"{session}\"}}"),
        format!("x{session}y"),
        format!("device={device};"),
    ] {
        assert!(!audit::secrets_in(&text).is_empty(), "not found in {text}");
    }
    let unseen = "0b0e7a52-5c1f-4d6e-9a4b-0c1d2e3f4a5b";
    assert!(audit::secrets_in(&format!("GET /qps/session/{unseen}")).is_empty());
    assert!(qsguard::sim::secrets::issued_count() >= 1);
}

/// NTLM and Negotiate tokens (every leg, both directions) are secrets too: the audit finds
/// one wherever it stands, and a Windows login through the guard leaks none (the log, the
/// answers, the events all went through the audit on the way).
#[tokio::test]
async fn the_audit_finds_ntlm_tokens_and_a_windows_login_leaks_none() {
    let sim = sim().await;
    let g = guard(sim.addr()).await;
    let mut jar = Jar::default();
    let r = browse_windows(g.addr, "/hub/", &mut jar, "CORP\\audit").await;
    assert_eq!(r.status, 200);
    assert_eq!(sim.counters().ntlm_handshakes, 1);
    let tokens = qsguard::sim::secrets::tokens();
    assert!(tokens.len() >= 3, "Type 1, Type 2 and Type 3 are known");
    for t in &tokens {
        assert!(!audit::tokens_in(&format!("Authorization: NTLM {t}\r\n")).is_empty());
    }
    events(&g, "session_restored");
    audit::scan("the log", &logged());
    audit::assert_clean();
    g.shutdown().await;
}
