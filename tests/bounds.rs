//! The guard under hostile input: every map that a client can add to has a cap, and every read
//! of a body has a deadline. Each test drives the guard through real listeners on loopback and
//! asserts the bound, not a timing: a limit that is missing shows as a map past its cap, or as
//! an answer that never comes (the test's own generous wait runs out).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn sessions(guard: &qsguard::Guard) -> &Arc<qsguard::session::SessionGuard> {
    guard.proxy().sessions().expect("the session guard is on")
}

fn random_device() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Sends `head` on a new connection, then one byte every 100 ms (each well within any
/// per-read timeout) until the guard answers; returns what the guard sent within `wait`, and
/// whether it closed the connection.
async fn trickle(addr: std::net::SocketAddr, head: &[u8], wait: Duration) -> (Vec<u8>, bool) {
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(head).await.unwrap();
    let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = answered.clone();
    let writer = tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if wr.write_all(b"x").await.is_err() {
                break;
            }
        }
        wr
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => {
                answered.store(true, std::sync::atomic::Ordering::Relaxed);
                out.extend_from_slice(&buf[..n]);
            }
        }
    };
    answered.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = writer.await;
    (out, closed)
}

/// Browsers that each bring a new device (a made-up device cookie, or none) and get a session:
/// the device map stops at `sessions.max_devices` (here every device has a live session, so
/// none can be forgotten: the newest are not remembered).
#[tokio::test]
async fn device_map_stays_under_its_cap() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\nmax_devices = 100\n",
    ))
    .await;
    for i in 0..260 {
        let user = format!("CORP\\u{i}");
        let mut headers = vec![("hdr-usr", user.as_str())];
        let cookie;
        if i % 2 == 0 {
            cookie = format!("qsguard={}", random_device());
            headers.push(("cookie", cookie.as_str()));
        }
        let r = get(guard.addr, "/hdr/hub/", &headers).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let (_, _, devices) = sessions(&guard).table.sizes();
        assert!(
            devices <= 100,
            "{devices} devices remembered, the cap is 100"
        );
    }
    let (live, _, devices) = sessions(&guard).table.sizes();
    assert_eq!(live, 260, "every browser got its session all the same");
    assert_eq!(devices, 100);
    guard.shutdown().await;
}

/// Unauthenticated browsers (made-up device cookies, no session) each open a login dance: the
/// flights stop at `sessions.max_flights`, and the browsers past it are still answered.
#[tokio::test]
async fn flights_stay_under_their_cap() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\nmax_flights = 5\nburst_wait = \"50ms\"\n",
    ))
    .await;
    for i in 0..30 {
        let cookie = format!("qsguard={}", random_device());
        let r = get(
            guard.addr,
            &format!("/hub/{i}"),
            &[("cookie", cookie.as_str())],
        )
        .await;
        assert_eq!(r.status, 302, "sent to log in: {}", r.text());
        let open = sessions(&guard).flights_open();
        assert!(open <= 5, "{open} flights open, the cap is 5");
    }
    assert_eq!(sessions(&guard).flights_open(), 5);
    guard.shutdown().await;
}

/// One browser that asks for many pages (some with a long target) while its login is under
/// way: its flight remembers at most 16 targets, none longer than 2 KiB.
#[tokio::test]
async fn flight_targets_are_capped_in_number_and_length() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\nburst_wait = \"20ms\"\n",
    ))
    .await;
    let cookie = format!("qsguard={}", random_device());
    for i in 0..40 {
        let path = if i % 3 == 0 {
            format!("/hub/{i}?q={}", "x".repeat(5000))
        } else {
            format!("/hub/{i}")
        };
        let r = get(guard.addr, &path, &[("cookie", cookie.as_str())]).await;
        assert_eq!(r.status, 302, "sent to log in: {}", r.text());
    }
    let (targets, bytes) = sessions(&guard).flight_targets();
    assert_eq!(
        sessions(&guard).flights_open(),
        1,
        "one browser, one flight"
    );
    assert!(targets <= 16, "{targets} targets remembered");
    assert!(
        bytes <= 16 * 2 * 2048,
        "{bytes} bytes of targets remembered"
    );
    guard.shutdown().await;
}

/// The limit page's form that trickles in gets a 408 at `server.header_read_timeout`, instead of
/// holding the connection for as long as the client likes.
#[tokio::test]
async fn end_session_form_that_stalls_is_cut_off() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "header_read_timeout = \"500ms\"",
        "",
    ))
    .await;
    // A byte now and then, each within the per-read pause: only a deadline stops it (the
    // whole form would take 10 s).
    let (got, _) = trickle(
        guard.addr,
        b"POST /__qsguard/end-session HTTP/1.1\r\nHost: qlik.example.com\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nsession=",
        Duration::from_secs(6),
    )
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("end-session form"), "{text}");
    guard.shutdown().await;
}

/// A 4xx HTML page from Qlik is read whole (to look for Qlik's own limit refusal) before the
/// client gets anything: when its body stalls, the client gets a 504 page at
/// `proxy.response_timeout` instead of waiting forever.
#[tokio::test]
async fn refusal_page_body_that_stalls_is_a_504() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = upstream.accept().await {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(
                    b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html\r\nContent-Length: 1000\r\n\r\n<html>too many",
                )
                .await;
            held.push(s);
        }
    });
    let guard = guard_with(&config_text(
        &[addr],
        "",
        "[proxy]\nresponse_timeout = \"500ms\"\n[health]\ninterval = \"1h\"\nfall = 100\n",
    ))
    .await;
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        get(
            guard.addr,
            "/hub/",
            &[("cookie", "X-Qlik-Session-HTTP=abc")],
        )
        .await
    })
    .await
    .expect("an answer, not a wait for ever");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.text().contains("proxy.response_timeout"), "{}", r.text());
    guard.shutdown().await;
}

/// A request body that brings one byte every 100 ms passes every per-read timeout; the
/// minimum rate (`server.body_min_rate`, after a grace of `header_read_timeout`) cuts it off
/// with a 408, while a body at a normal pace goes through.
#[tokio::test]
async fn trickled_request_body_is_cut_by_the_minimum_rate() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "header_read_timeout = \"1s\"\nbody_min_rate = 100",
        "",
    ))
    .await;
    // At pace: 64 KiB at once.
    let big = vec![b'x'; 64 * 1024];
    let ok = send(
        guard.addr,
        http::Request::post("/hub/upload")
            .header("host", "qlik.example.com")
            .body(http_body_util::Full::new(Bytes::from(big)))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_ne!(ok.status, 408, "a fast body is not cut");

    // 10 bytes/s against 100 bytes/s after 1 s of grace: cut within about a second more
    // (the whole body would take almost three hours).
    let (got, closed) = trickle(
        guard.addr,
        b"POST /hub/upload HTTP/1.1\r\nHost: qlik.example.com\r\nContent-Length: 100000\r\n\r\nx",
        Duration::from_secs(10),
    )
    .await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("server.body_min_rate"), "{text}");
    assert!(closed, "the connection is closed after the 408");
    guard.shutdown().await;
}

/// The same minimum rate holds for an HTTP/2 request body, which has no per-read timeout.
#[tokio::test]
async fn trickled_http2_body_is_cut_by_the_minimum_rate() {
    let sim = sim().await;
    let cert = TestCert::new();
    let guard = guard_with(&config_text(
        &[sim.addr()],
        &format!(
            "{}\nheader_read_timeout = \"1s\"\nbody_min_rate = 100",
            cert.server_toml()
        ),
        "",
    ))
    .await;
    let stream = tls_connect(guard.addr, &cert.connector(&[b"h2"])).await;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, String>>(4);
    let body = StreamBody::new(tokio_stream_from(rx));
    let req = http::Request::post("https://localhost/hub/upload")
        .body(body.boxed())
        .unwrap();
    let feeding = tokio::spawn(async move {
        for _ in 0..1000 {
            if tx
                .send(Ok(http_body::Frame::data(Bytes::from_static(b"x"))))
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("an answer while the body still trickles")
        .unwrap();
    assert_eq!(resp.status(), 408);
    feeding.abort();
    guard.shutdown().await;
}

/// A `Stream` over an mpsc receiver, without another crate.
fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// An HTTP/2 connection without a stream is closed (GOAWAY) after `server.http2_idle_timeout`;
/// one with a stream open (a request whose body is still coming) is not idle.
#[tokio::test]
async fn idle_http2_connections_are_closed() {
    let sim = sim().await;
    let cert = TestCert::new();
    let guard = guard_with(&config_text(
        &[sim.addr()],
        &format!("{}\nhttp2_idle_timeout = \"300ms\"", cert.server_toml()),
        "",
    ))
    .await;
    let connect = || async {
        let stream = tls_connect(guard.addr, &cert.connector(&[b"h2"])).await;
        let (sender, conn) = hyper::client::conn::http2::handshake::<
            _,
            _,
            http_body_util::combinators::BoxBody<Bytes, String>,
        >(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        (sender, tokio::spawn(conn))
    };

    // Idle: one request, then nothing.
    let (mut sender, conn) = connect().await;
    let req = http::Request::get("https://localhost/hub/")
        .body(http_body_util::Empty::new().map_err(|e| match e {}).boxed())
        .unwrap();
    let r = sender.send_request(req).await.unwrap();
    let _ = r.into_body().collect().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the guard closes the idle connection");
    // Kept until here: the connection ended with a sender still held, so the guard ended it.
    drop(sender);

    // Busy: a request whose body pauses well past the idle timeout.
    let (mut sender, conn) = connect().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, String>>(4);
    let req = http::Request::post("https://localhost/hub/upload")
        .body(StreamBody::new(tokio_stream_from(rx)).boxed())
        .unwrap();
    // The sender goes back with the answer: a client whose last sender is gone closes the
    // connection itself, which would prove nothing about the guard.
    let pending = tokio::spawn(async move {
        let r = sender.send_request(req).await;
        (r, sender)
    });
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"part one"))))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !conn.is_finished(),
        "a connection with an open stream is not idle"
    );
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(b"part two"))))
        .await
        .unwrap();
    drop(tx);
    let (resp, _sender) = pending.await.unwrap();
    let resp = resp.expect("the request completes");
    assert_ne!(resp.status(), 408);
    let _ = resp.into_body().collect().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("idle again once the stream is done: closed");

    // A client that chose h2 and never sends its preface holds no connection either.
    let mut silent = tls_connect(guard.addr, &cert.connector(&[b"h2"])).await;
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // The guard's own SETTINGS may come first.
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a connection without an HTTP/2 preface is closed after the idle timeout"
    );
    guard.shutdown().await;
}
