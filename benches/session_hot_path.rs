//! The session guard's work on a request whose cookie is live: parse the cookies, look the
//! session up, touch it (and the response side with nothing to learn). Target: under one
//! microsecond with 100k sessions in the table.
//!
//! Run: `cargo bench --bench session_hot_path`

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use qsguard::session::identity::User;
use qsguard::session::{Request, SessionGuard, Verdict};

const SESSIONS: usize = 100_000;

fn guard() -> Arc<SessionGuard> {
    let config = qsguard::Config::parse(
        r#"
[server]
listen = "127.0.0.1:0"
[[upstream]]
url = "http://127.0.0.1:9"
name = "n1"
[[virtual_proxy]]
prefix = ""
session_cookie = "X-Qlik-Session"
[[virtual_proxy]]
prefix = "hdr"
session_cookie = "X-Qlik-Session-hdr"
identity_header = "hdr-usr"
"#,
    )
    .unwrap();
    let events = Arc::new(qsguard::diagnostics::events::Events::new(100));
    let g = Arc::new(SessionGuard::new(&config, events).unwrap());
    for i in 0..SESSIONS {
        let user = User::new("BENCH", &format!("user{}", i / 5));
        g.table.insert(
            i % 2,
            &format!("{:08x}-0d4b-4c8e-9a77-1b2c3d4e5f60", i),
            "n1".into(),
            Some(i as u128),
            Some(user),
            "Path=/; HttpOnly; SameSite=Lax; Secure".into(),
        );
    }
    g
}

fn request(i: usize) -> http::request::Parts {
    let cookie = format!(
        "_ga=GA1.2.3; X-Qlik-Session={:08x}-0d4b-4c8e-9a77-1b2c3d4e5f60; qsguard={:032x}; other=1",
        i, i as u128
    );
    let (parts, ()) = http::Request::get("/sense/app/8a9c1e2f-0d4b-4c8e/sheet/abc")
        .header("host", "qlik.example.com")
        .header(
            "user-agent",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0",
        )
        .header("cookie", cookie)
        .body(())
        .unwrap()
        .into_parts();
    parts
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let g = guard();
    let node: Arc<str> = "n1".into();
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    // Requests of sessions spread over the table (even ids are on the central proxy).
    let templates: Vec<_> = (0..1024)
        .map(|k| request((k * 97 % (SESSIONS / 2)) * 2))
        .collect();
    let mut k = 0;
    let empty = http::HeaderMap::new();
    c.bench_function("live cookie: before + after, 100k sessions", |b| {
        b.iter(|| {
            let parts = &templates[k % templates.len()];
            k += 1;
            let req = Request {
                method: parts.method.as_str().as_bytes(),
                path: parts.uri.path(),
                query: parts.uri.query(),
                headers: &parts.headers,
                device_memo: None,
            };
            let verdict = g
                .before(&req, peer, true)
                .now_or_never()
                .expect("no wait on the hot path");
            let Verdict::Forward(mut ctx) = verdict else {
                panic!("not forwarded")
            };
            assert!(ctx.session.is_some());
            black_box(g.after(&mut ctx, &node, req.path, 200, &empty));
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
