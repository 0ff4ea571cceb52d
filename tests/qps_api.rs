//! The QPS REST API client against the simulator's API, over plain http and over mutual TLS
//! with rcgen-made certificates (a Qlik-like CA, server and client certificates).

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
        api.owner("hdr", "no-such-session").await.unwrap(),
        Owner::Inactive
    );
    let listed = api.sessions("hdr").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].session_id, id);
    api.end("hdr", &id).await.unwrap();
    assert_eq!(sim.counters().sessions_ended_by_api, 1);
    assert_eq!(sim.live_sessions("CORP\\Jane"), 0);
    // Every call carried a fresh Xrfkey in query and header (the simulator refuses otherwise).
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
    let r = browse(
        guard.addr,
        "/hub/",
        &mut jar,
        &[("x-sim-user", "CORP\\viaapi")],
    )
    .await;
    assert_eq!(r.status, 200);
    let g = guard.proxy().sessions().unwrap().clone();
    eventually("owner learnt over mutual TLS", || {
        g.table.live_count("corp\\viaapi") == 1
    })
    .await;
    guard.shutdown().await;
}
