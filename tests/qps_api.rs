//! The QPS REST API client against the simulator's API, over plain http and over mutual TLS
//! with rcgen-made certificates (a Qlik-like CA, server and client certificates); the guard's
//! fallback to the Personal API when the REST API fails, how it reports the failure, and
//! cookie values that never reach a REST API path.

mod common;

use std::sync::Arc;

use common::*;
use qsguard::config::QpsApiConfig;
use qsguard::qps::{Owner, QpsApi};
use qsguard::sim::SimConfig;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};

struct Pki {
    dir: TempDir,
    server: Arc<rustls::ServerConfig>,
}

/// A CA, a server certificate for 127.0.0.1, a valid and an expired client certificate.
fn make_pki() -> Pki {
    let dir = TempDir::new("pki");
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    dir.write("root.pem", ca.pem());

    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca, &ca_key)
        .unwrap();

    for (name, expired) in [("client", false), ("expired", true)] {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["QlikClient".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        dir.write(&format!("{name}.pem"), cert.pem());
        dir.write(&format!("{name}_key.pem"), key.serialize_pem());
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server.der().clone()],
            rustls_pki_types::PrivateKeyDer::try_from(server_key.serialize_der()).unwrap(),
        )
        .unwrap();
    Pki {
        dir,
        server: Arc::new(server_cfg),
    }
}

async fn session_for(sim: &qsguard::sim::Simulator, user: &str) -> String {
    let mut jar = Vec::new();
    browse_as(sim.addr(), "/hdr/hub/", &mut jar, user).await;
    jar_get(&jar, "X-Qlik-Session-hdr-HTTP").unwrap()
}

#[tokio::test]
async fn plain_http_api_reads_and_ends_sessions() {
    let sim = sim().await;
    let id = session_for(&sim, "CORP\\Jane").await;
    let api = QpsApi::new(&sim_api_config(&sim)).unwrap();
    match api.owner("hdr", &id).await.unwrap() {
        Owner::User(u) => assert_eq!(u.to_string(), "CORP\\Jane"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        api.owner("hdr", "00000000-0000-4000-8000-000000000000")
            .await
            .unwrap(),
        Owner::Inactive
    );
    let listed = api.sessions("hdr").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].session_id, id);
    api.end("hdr", &id).await.unwrap();
    assert_eq!(sim.counters().sessions_ended_by_api, 1);
    assert_eq!(sim.live_sessions("CORP\\Jane"), 0);
    // Every call carried a fresh Xrfkey in query and header (the simulator refuses otherwise),
    // and exactly one Host: the API's authority (the simulator answers 400 otherwise).
    let seen = sim.api_requests();
    assert_eq!(seen.len(), 4);
    let authority = sim.api_addr().to_string();
    for r in seen {
        assert_eq!(values(&r.headers, "host"), [authority.as_bytes()], "{r:?}");
    }
}

#[tokio::test]
async fn mutual_tls_with_qlik_like_certificates() {
    let pki = make_pki();
    let sim = sim_with(SimConfig {
        api_tls: Some(pki.server.clone()),
        ..SimConfig::default()
    })
    .await;
    let id = session_for(&sim, "CORP\\tls").await;
    let url: http::Uri = format!("https://127.0.0.1:{}", sim.api_addr().port())
        .parse()
        .unwrap();
    let cfg = |cert: &str| QpsApiConfig {
        url: url.clone(),
        client_cert: Some(pki.dir.join(format!("{cert}.pem"))),
        client_key: Some(pki.dir.join(format!("{cert}_key.pem"))),
        ca: Some(pki.dir.join("root.pem")),
    };
    let api = QpsApi::new(&cfg("client")).unwrap();
    assert!(matches!(
        api.owner("hdr", &id).await.unwrap(),
        Owner::User(_)
    ));

    // An https API without a client certificate is refused at configuration time.
    let err = QpsApi::new(&QpsApiConfig {
        client_cert: None,
        client_key: None,
        ..cfg("client")
    })
    .err()
    .unwrap();
    assert!(err.contains("client certificate"), "{err}");

    // An expired client certificate says so.
    let err = QpsApi::new(&cfg("expired")).err().unwrap();
    assert!(err.contains("expired"), "{err}");

    // A CA that did not sign the server's certificate: a clear error, not a hang.
    let other = make_pki();
    let api = QpsApi::new(&QpsApiConfig {
        ca: Some(other.dir.join("root.pem")),
        ..cfg("client")
    })
    .unwrap();
    let err = api.owner("hdr", &id).await.unwrap_err().to_string();
    assert!(err.contains("QPS REST API"), "{err}");
}

#[tokio::test]
async fn the_guard_resolves_owners_through_the_api_when_configured() {
    let pki = make_pki();
    let sim = sim_with(SimConfig {
        api_tls: Some(pki.server.clone()),
        ..SimConfig::default()
    })
    .await;
    let extra = format!(
        "[qps_api]\nurl = \"https://127.0.0.1:{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\nca = \"{}\"\n",
        sim.api_addr().port(),
        pki.dir.join("client.pem").display(),
        pki.dir.join("client_key.pem").display(),
        pki.dir.join("root.pem").display(),
    );
    let guard = guard_with(&config_text(&[sim.addr()], "", &extra)).await;
    let mut jar = Vec::new();
    let r = browse_windows(guard.addr, "/hub/", &mut jar, "CORP\\viaapi").await;
    assert_eq!(r.status, 200);
    let g = guard.proxy().sessions().unwrap().clone();
    eventually("owner learnt over mutual TLS", || {
        g.table.live_count("corp\\viaapi") == 1
    })
    .await;
    guard.shutdown().await;
}

/// A guard whose `[qps_api]` is at `api` (plain http), with `extra` config after it.
async fn guard_with_api(
    sim: &qsguard::sim::Simulator,
    api: &str,
    extra: &str,
) -> qsguard::server::Guard {
    guard_with(&config_text(
        &[sim.addr()],
        "",
        &format!("[qps_api]\nurl = \"{api}\"\n{extra}"),
    ))
    .await
}

#[tokio::test]
async fn a_path_shaped_cookie_value_never_reaches_the_rest_api() {
    for (n, bogus) in [
        "../user/CORP/victim",
        "..%2Fuser%2FCORP%2Fvictim",
        "..%2fuser%2fCORP%2fvictim",
        "%2E%2E%2Fuser%2FCORP%2Fvictim",
        "..\\user\\CORP\\victim",
    ]
    .into_iter()
    .enumerate()
    {
        let sim = sim().await;
        let api = format!("http://{}", sim.api_addr());
        let guard = guard_with_api(
            &sim,
            &api,
            "[sessions]\nmax_per_user = 2\non_limit = \"evict\"\n",
        )
        .await;
        // The victim works on Qlik directly: two sessions.
        for _ in 0..2 {
            assert_eq!(
                get(sim.addr(), "/hdr/hub/", &[("hdr-usr", "CORP\\victim")])
                    .await
                    .status,
                200
            );
        }
        // The attacker's cookie is taken by a page that needs no session. The guard does not
        // adopt it (Qlik never confirms it), so it is never a session to evict; the attacker
        // then opens sessions past the limit, and the guard evicts one of theirs.
        let attacker = format!("CORP\\attacker{n}");
        let cookie = format!("X-Qlik-Session-hdr-HTTP={bogus}");
        let r = get(
            guard.addr,
            "/hdr/__sim/echo",
            &[("hdr-usr", &attacker), ("cookie", &cookie)],
        )
        .await;
        assert_eq!(r.status, 200, "{bogus}");
        for _ in 0..3 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let r = get(guard.addr, "/hdr/hub/", &[("hdr-usr", &attacker)]).await;
            assert_eq!(r.status, 200, "{bogus}");
        }
        poll_for("the eviction", std::time::Duration::from_secs(5), || {
            (!events(&guard, "session_evicted").is_empty()).then_some(())
        })
        .await;
        // The eviction ended one of the attacker's own sessions, not every session of
        // CORP\victim.
        assert_eq!(sim.live_sessions("CORP\\victim"), 2, "{bogus}");
        // Its owner is looked up through the Personal API only (central proxy, no identity).
        let cookie = format!("X-Qlik-Session-HTTP={bogus}");
        let r = get(guard.addr, "/__sim/echo", &[("cookie", &cookie)]).await;
        assert_eq!(r.status, 200);
        poll_for(
            "the Personal API asked with the cookie",
            std::time::Duration::from_secs(5),
            || {
                sim.last_request("/qps/user")
                    .filter(|r| r.method == "GET")
                    .filter(|r| values(&r.headers, "cookie") == [cookie.as_bytes()])
            },
        )
        .await;
        for r in sim.api_requests() {
            let p = r.path_and_query.to_ascii_lowercase();
            assert!(
                !p.contains("user") && !p.contains("..") && !p.contains("%2") && !p.contains('\\'),
                "{bogus}: {} {}",
                r.method,
                r.path_and_query
            );
        }
        guard.shutdown().await;
    }
}

#[tokio::test]
async fn a_failing_rest_api_falls_back_to_the_personal_api_and_is_reported() {
    capture_logs();
    let sim = sim().await;
    // Nothing listens there: every call is refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let dir = TempDir::new("qps-fail");
    let token = dir.write("admin.token", "t0ken-for-the-test");
    let text = with_admin_token(
        &config_text(&[sim.addr()], "", &format!("[qps_api]\nurl = \"{api}\"\n")),
        &token,
    );
    let guard = guard_with(&text).await;
    // The reconciliation at start has already failed, and says so.
    let ready = admin_call(guard.admin_addr, http::Method::GET, "/readyz", None).await;
    assert_eq!(ready.json()["qps_api_failing"][0]["operation"], "list");

    // Owner lookup: the REST API fails, the Personal API (through the node, with the
    // session's own cookie and the browser's Host) names the owner.
    let mut jar = Vec::new();
    let r = browse_windows(guard.addr, "/hub/", &mut jar, "CORP\\fallback").await;
    assert_eq!(r.status, 200);
    let id = jar_get(&jar, "X-Qlik-Session-HTTP").unwrap();
    let g = guard.proxy().sessions().unwrap().clone();
    eventually("owner learnt through the Personal API", || {
        g.table.live_count("corp\\fallback") == 1
    })
    .await;
    let asked = received(&sim, "/qps/user");
    assert_eq!(values(&asked, "host"), [b"qlik.example.com".to_vec()]);

    // Reported: an event with node and operation, a metric, and /readyz (still 200).
    let failed = events(&guard, "qps_api_failed");
    assert!(!failed.is_empty());
    let node = sim.addr().to_string();
    assert!(
        failed.iter().any(|e| {
            let cause = e["cause"].as_str().unwrap();
            cause.contains(&node) && cause.contains("(owner)")
        }),
        "{failed:?}"
    );
    let ready = admin_call(guard.admin_addr, http::Method::GET, "/readyz", None).await;
    assert_eq!(ready.status, 200);
    let said = ready.json()["qps_api"].as_str().unwrap().to_string();
    assert!(said.starts_with("failing since "), "{said}");
    assert!(said.contains("cannot reach the QPS REST API"), "{said}");
    assert_eq!(ready.json()["qps_api_failing"][0]["operation"], "owner");
    let metrics = admin_call(guard.admin_addr, http::Method::GET, "/metrics", None)
        .await
        .text();
    let line =
        format!("qsguard_qps_api_failures_total{{upstream=\"{node}\",operation=\"owner\"}} 1");
    assert!(metrics.contains(&line), "{metrics}");

    // qsguard doctor with --admin: a failed check, and a non-zero exit.
    let out = qsguard_output(vec![
        "doctor".into(),
        format!("http://{}", guard.addr),
        "--admin".into(),
        format!("http://{}", guard.admin_addr),
    ])
    .await;
    let text = output_text(&out);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("qps_api"), "{text}");
    assert!(text.contains("FAILED: failing since"), "{text}");

    // Ending: the REST API fails, the session is logged out with its own cookie.
    let hash = g.table.user_sessions("corp\\fallback")[0].hash.to_string();
    let r = admin_call(
        guard.admin_addr,
        http::Method::DELETE,
        &format!("/sessions/{hash}"),
        Some("t0ken-for-the-test"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sim.counters().logouts, 1);
    assert_eq!(sim.live_sessions("CORP\\fallback"), 0);
    let failed = events(&guard, "qps_api_failed");
    assert!(failed
        .iter()
        .any(|e| e["cause"].as_str().unwrap().contains("(end)")));

    // No session id anywhere: events, readyz, logs.
    let all = serde_json::to_string(&failed).unwrap() + &said + &logged();
    assert!(!all.contains(&id), "the session id leaked");
    guard.shutdown().await;
}
