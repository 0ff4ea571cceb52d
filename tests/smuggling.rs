//! Request smuggling and malformed requests on raw sockets: each one is answered with a 4xx (501
//! for an unknown transfer coding), never reaches the simulator, and the guard keeps serving.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(3);

/// (name, raw request, expected status)
fn attacks() -> Vec<(&'static str, Vec<u8>, u16)> {
    let smuggled = "GET /__sim/smuggled HTTP/1.1\r\nHost: q\r\n\r\n";
    vec![
        (
            "CL.TE",
            format!("POST /__sim/echo HTTP/1.1\r\nHost: q\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}", 5 + smuggled.len()).into_bytes(),
            400,
        ),
        (
            "TE.CL",
            format!("POST /__sim/echo HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len()).into_bytes(),
            400,
        ),
        (
            "differing Content-Length",
            format!("POST /__sim/echo HTTP/1.1\r\nHost: q\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()).into_bytes(),
            400,
        ),
        (
            "Content-Length list",
            b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nContent-Length: 3, 3\r\n\r\nabc".to_vec(),
            400,
        ),
        (
            "unknown coding",
            b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            501,
        ),
        (
            "obfuscated coding (xchunked)",
            b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".to_vec(),
            501,
        ),
        (
            "obfuscated coding (quoted)",
            b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: \"chunked\"\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "chunked twice",
            b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "space before colon",
            b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "TE on HTTP/1.0",
            b"POST /__sim/echo HTTP/1.0\r\nHost: q\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        ("garbage request line", b"HELLO THERE\r\n\r\n".to_vec(), 400),
        ("obs-fold line folding", b"GET /__sim/echo HTTP/1.1\r\nHost: q\r\nX-A: 1\r\n folded\r\n\r\n".to_vec(), 400),
        ("NUL in a header", b"GET /__sim/echo HTTP/1.1\r\nHost: q\r\nX-A: a\x00b\r\n\r\n".to_vec(), 400),
        (
            "oversized header",
            format!("GET /__sim/echo HTTP/1.1\r\nHost: q\r\nCookie: {}\r\n\r\n", "a".repeat(40_000)).into_bytes(),
            431,
        ),
        ("no Host", b"GET /__sim/echo HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("two Hosts", b"GET /__sim/echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec(), 400),
        ("CONNECT", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n".to_vec(), 405),
        (
            "upgrade with a body",
            format!("GET /app/x HTTP/1.1\r\nHost: q\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()).into_bytes(),
            400,
        ),
    ]
}

#[tokio::test]
async fn attacks_never_reach_qlik_and_the_guard_keeps_serving() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    for (name, bytes, want) in attacks() {
        let before = sim.counters().requests;
        let out = raw(guard.addr, &bytes, WAIT).await;
        assert_eq!(
            statuses(&out),
            vec![want],
            "{name}: {}",
            String::from_utf8_lossy(&out)
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("qsguard"), "{name}: the guard's own page");
        assert_eq!(
            sim.counters().requests,
            before,
            "{name} reached the simulator"
        );
        assert!(
            sim.last_request("/__sim/smuggled").is_none(),
            "{name}: smuggled request reached Qlik"
        );
        assert_eq!(
            get(guard.addr, "/__sim/echo", &[]).await.status,
            200,
            "after {name}"
        );
    }
    guard.shutdown().await;
}

#[tokio::test]
async fn a_bad_request_behind_a_good_one_on_the_same_connection() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut bytes = b"GET /__sim/echo HTTP/1.1\r\nHost: q\r\n\r\n".to_vec();
    bytes.extend_from_slice(b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
    bytes.extend_from_slice(b"GET /__sim/smuggled HTTP/1.1\r\nHost: q\r\n\r\n");
    let out = raw(guard.addr, &bytes, WAIT).await;
    assert_eq!(statuses(&out), vec![200, 400]);
    assert_eq!(sim.counters().requests, 1);
    assert!(sim.last_request("/__sim/smuggled").is_none());
    guard.shutdown().await;
}

#[tokio::test]
async fn valid_chunked_and_pipelined_requests_pass() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let bytes = b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n\
GET /__sim/echo?second HTTP/1.1\r\nHost: q\r\nContent-Length: 0\r\n\r\n\
GET /__sim/echo?third HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n";
    let out = raw(guard.addr, bytes, WAIT).await;
    assert_eq!(statuses(&out), vec![200, 200, 200]);
    assert!(String::from_utf8_lossy(&out).contains("\"body_len\":11"));
    assert_eq!(sim.counters().requests, 3);
    guard.shutdown().await;
}

/// Real time given to the guard to act on what the clock made due, or to show it does nothing
/// (the tests on a [`ManualClock`]).
const SETTLE: Duration = Duration::from_millis(300);

/// Whether the guard has closed `s` (an answer before the end is read and skipped), waiting up
/// to ten seconds of real time for it.
async fn closed_by_guard(s: &mut tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    real_timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_some()
}

/// Whether `s` is still open with nothing to read (the guard has neither answered nor closed).
fn still_open(s: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// `server.header_read_timeout` bounds the whole head from the connection's start: a client
/// dripping a header line every 200 ms is cut off when it ends, not before. On a clock the test
/// moves (see common::clock), so "not before" and "then" are exact.
#[tokio::test(start_paused = true)]
async fn slowloris_is_cut_off_after_the_header_timeout() {
    let clock = ManualClock::hold();
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "header_read_timeout = \"1s\"",
        "",
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(guard.addr).await.unwrap();
    s.write_all(b"GET /__sim/echo HTTP/1.1\r\nHost: q\r\n")
        .await
        .unwrap();
    // The guard waits for the rest of the head: its deadline runs from now.
    real_sleep(SETTLE).await;
    for _ in 0..4 {
        clock.advance(Duration::from_millis(200)).await;
        s.write_all(b"X-a: b\r\n").await.unwrap();
    }
    clock.advance(Duration::from_millis(199)).await;
    real_sleep(SETTLE).await;
    assert!(still_open(&s), "cut off before header_read_timeout");
    clock.advance(Duration::from_millis(1)).await;
    assert!(
        closed_by_guard(&mut s).await,
        "the slow client was not cut off"
    );
    assert_eq!(sim.counters().requests, 0);
    assert_eq!(get(guard.addr, "/__sim/echo", &[]).await.status, 200);
    guard.shutdown().await;
}

/// On a kept-alive connection each request head gets `server.header_read_timeout` from the
/// moment the connection waits for it (the previous answer sent): requests 800 ms apart on a
/// 1 s timeout are all served, and the idle connection is closed 1 s after the last answer,
/// not before. The guard keeps one timer per connection and moves its deadline lazily; this
/// holds it to the exact times.
#[tokio::test(start_paused = true)]
async fn each_kept_alive_request_gets_the_header_timeout_anew() {
    let clock = ManualClock::hold();
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "header_read_timeout = \"1s\"",
        "",
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(guard.addr).await.unwrap();
    for i in 0..3 {
        if i > 0 {
            clock.advance(Duration::from_millis(800)).await;
        }
        s.write_all(b"GET /__sim/echo HTTP/1.1\r\nHost: q\r\n\r\n")
            .await
            .unwrap();
        let answer = read_answer(&mut s).await;
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "request {i} after 800 ms idle: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    real_sleep(SETTLE).await;
    clock.advance(Duration::from_millis(999)).await;
    real_sleep(SETTLE).await;
    assert!(still_open(&s), "closed before header_read_timeout");
    clock.advance(Duration::from_millis(1)).await;
    assert!(
        closed_by_guard(&mut s).await,
        "the idle connection was kept"
    );
    guard.shutdown().await;
}

/// One whole answer with a Content-Length, read in real time.
async fn read_answer(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    real_timeout(Duration::from_secs(10), async {
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the answer ended");
            got.extend_from_slice(&buf[..n]);
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                break;
            }
        }
    })
    .await
    .expect("an answer within 10 s");
    got
}

/// A request body that stops coming for `server.header_read_timeout` is cut off then.
#[tokio::test(start_paused = true)]
async fn a_stalled_request_body_is_cut_off() {
    let clock = ManualClock::hold();
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "header_read_timeout = \"1s\"",
        "",
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(guard.addr).await.unwrap();
    s.write_all(b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    // The head and the first bytes go on to Qlik; then the guard waits for more.
    real_sleep(SETTLE).await;
    clock.advance(Duration::from_millis(999)).await;
    real_sleep(SETTLE).await;
    assert!(still_open(&s), "cut off before header_read_timeout");
    clock.advance(Duration::from_millis(1)).await;
    assert!(
        closed_by_guard(&mut s).await,
        "the stalled upload was not cut off"
    );
    assert_eq!(
        get(guard.addr, "/__sim/echo", &[]).await.status,
        200,
        "the guard still serves"
    );
    guard.shutdown().await;
}

/// The hole this engine once had: `Connection: Content-Length` made it frame the request by
/// its length and then delete the length, so Qlik got a GET without one followed by the start
/// of a planted request, on a connection that went back to the pool and was glued to the next
/// user's request. Now it is a 400, nothing reaches Qlik, and the next user on the pooled
/// connection gets the answer to their own request, with guard on and off.
#[tokio::test]
async fn connection_naming_content_length_cannot_plant_a_request_for_the_next_user() {
    for guard_on in [true, false] {
        let sim = sim().await;
        let extra = if guard_on {
            ""
        } else {
            "[sessions]\nguard = false\n"
        };
        let guard = guard_with(&config_text(&[sim.addr()], "", extra)).await;
        // A kept-alive upstream connection in the pool, for the attack to aim at.
        assert_eq!(get(guard.addr, "/__sim/echo?warm", &[]).await.status, 200);
        let planted = "GET /__sim/canary HTTP/1.1\r\nX: ";
        let attack = format!(
            "GET /hub/ HTTP/1.1\r\nHost: q\r\nConnection: Content-Length\r\nContent-Length: {}\r\n\r\n{planted}",
            planted.len()
        );
        let before = sim.counters().requests;
        let out = raw(guard.addr, attack.as_bytes(), WAIT).await;
        assert_eq!(statuses(&out), vec![400], "guard on: {guard_on}");
        assert_eq!(sim.counters().requests, before, "nothing reached Qlik");
        let victim = get(
            guard.addr,
            "/__sim/echo?victim",
            &[("cookie", "X-Qlik-Session-HTTP=victim-cookie")],
        )
        .await;
        assert_eq!(victim.status, 200);
        assert_eq!(victim.json()["path"], "/__sim/echo?victim");
        assert!(sim.last_request("/__sim/canary").is_none());
        guard.shutdown().await;
    }
}
