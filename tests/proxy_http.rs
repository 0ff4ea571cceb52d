//! The proxy core against the Qlik simulator: cookies and Set-Cookie untouched, Host kept,
//! X-Forwarded-* set, hop-by-hop fields removed, the login dance, limits, and upstream failures.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

#[tokio::test]
async fn cookie_bytes_reach_qlik_unchanged() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let long = "v".repeat(3000);
    let odd = [
        "X-Qlik-Session-HTTP=3f2a9c1e-0d4b-4c8e-9a77-1b2c3d4e5f60".to_string(),
        // Quotes, '=' inside values, empty values, no space after ';', many cookies, a long one.
        // (Whitespace around a whole field value is not part of it, RFC 9110 5.5.)
        "a=\"quoted value\"; b=x=y==; c=; d=1;e=2;  f = spaced".to_string(),
        (0..60)
            .map(|i| format!("c{i}=v{i}"))
            .collect::<Vec<_>>()
            .join("; "),
        format!("long={long}; X-Qlik-Session-HTTP=second"),
    ];
    for cookie in &odd {
        let resp = get(guard.addr, "/__sim/echo", &[("cookie", cookie)]).await;
        assert_eq!(resp.status, 200);
        let h = received(&sim, "/__sim/echo");
        assert_eq!(
            values(&h, "cookie"),
            vec![cookie.as_bytes().to_vec()],
            "cookie changed on the way"
        );
    }
    guard.shutdown().await;
}

#[tokio::test]
async fn every_set_cookie_reaches_the_browser_in_order() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let set = [
        "X-Qlik-Session-HTTP=abc; Path=/; HttpOnly; SameSite=Lax",
        "other=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/",
        "third=\"q=1\"; Secure; SameSite=None",
    ];
    let query: Vec<String> = set
        .iter()
        .map(|s| format!("set_cookie={}", urlencode(s)))
        .collect();
    let resp = get(guard.addr, &format!("/__sim/echo?{}", query.join("&")), &[]).await;
    let all = resp.all("set-cookie");
    assert_eq!(
        all[..3],
        set,
        "Qlik's cookies arrive unchanged and in order"
    );
    // A new browser also gets the guard's device cookie, as a header of its own, after them.
    assert_eq!(all.len(), 4);
    assert!(all[3].starts_with("qsguard="), "{all:?}");
    // And on the wire, each one is its own header line (never folded with commas).
    let raw_resp = raw(
        guard.addr,
        format!(
            "GET /__sim/echo?{} HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n",
            query.join("&")
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&raw_resp).to_ascii_lowercase();
    assert_eq!(text.matches("\r\nset-cookie: ").count(), 4, "{text}");
    guard.shutdown().await;
}

#[tokio::test]
async fn host_is_kept_and_forwarded_headers_are_set() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let resp = get(
        guard.addr,
        "/__sim/echo",
        &[
            ("host", "Qlik.Example.com:8443"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    let h = received(&sim, "/__sim/echo");
    assert_eq!(values(&h, "host"), vec![b"Qlik.Example.com:8443".to_vec()]);
    // The test client is not a trusted proxy: its claims are replaced.
    assert_eq!(values(&h, "x-forwarded-for"), vec![b"127.0.0.1".to_vec()]);
    assert_eq!(values(&h, "x-forwarded-proto"), vec![b"http".to_vec()]);
    assert_eq!(
        values(&h, "x-forwarded-host"),
        vec![b"Qlik.Example.com:8443".to_vec()]
    );
    guard.shutdown().await;

    // From a trusted peer the chain is appended to.
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "trusted_proxies = [\"127.0.0.0/8\"]",
        "",
    ))
    .await;
    get(
        guard.addr,
        "/__sim/echo",
        &[
            ("x-forwarded-for", "198.51.100.9"),
            ("x-forwarded-proto", "https"),
        ],
    )
    .await;
    let h = received(&sim, "/__sim/echo");
    assert_eq!(
        values(&h, "x-forwarded-for"),
        vec![b"198.51.100.9, 127.0.0.1".to_vec()]
    );
    assert_eq!(values(&h, "x-forwarded-proto"), vec![b"https".to_vec()]);
    guard.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_fields_do_not_reach_qlik() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    get(
        guard.addr,
        "/__sim/echo",
        &[
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "secret"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("proxy-connection", "keep-alive"),
            ("x-end-to-end", "kept"),
        ],
    )
    .await;
    let h = received(&sim, "/__sim/echo");
    for gone in ["x-hop", "keep-alive", "te", "proxy-connection"] {
        assert!(values(&h, gone).is_empty(), "{gone} reached Qlik");
    }
    assert_eq!(values(&h, "x-end-to-end"), vec![b"kept".to_vec()]);
    guard.shutdown().await;
}

#[tokio::test]
async fn windows_login_dance_through_the_guard() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut jar = Vec::new();
    let resp = browse_windows(guard.addr, "/hub/stream/mine", &mut jar, "CORP\\jane").await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        resp.text().contains("/hub/stream/mine"),
        "ends on the page it asked for"
    );
    assert!(jar.iter().any(|(k, _)| k == "X-Qlik-Session-HTTP"));
    assert_eq!(sim.counters().sessions_created, 1);
    assert_eq!(sim.live_sessions("CORP\\jane"), 1);
    // The session cookie keeps working: no new session on the next request.
    let again = browse(guard.addr, "/hub/", &mut jar, &[]).await;
    assert_eq!(again.status, 200);
    assert_eq!(sim.counters().sessions_created, 1);
    let me = browse(guard.addr, "/qps/user", &mut jar, &[]).await.json();
    assert_eq!(me["userId"], "jane");
    guard.shutdown().await;
}

#[tokio::test]
async fn body_limits_and_bodies_pass() {
    let sim = sim().await;
    let guard = guard_with(&config_text(&[sim.addr()], "max_body_size = \"1KiB\"", "")).await;
    let ok = send(
        guard.addr,
        Request::post("/__sim/echo")
            .header("host", "q")
            .body(Full::new(Bytes::from(vec![b'x'; 1000])))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["body_len"], 1000);
    let before = sim.counters().requests;
    let big = raw(
        guard.addr,
        b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nContent-Length: 5000\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(statuses(&big), vec![413]);
    assert_eq!(
        sim.counters().requests,
        before,
        "the oversized upload never reached Qlik"
    );
    // A chunked upload that grows past the limit is cut off too.
    let mut chunked =
        b"POST /__sim/echo HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend(std::iter::repeat_n(b'y', 0x200));
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(guard.addr, &chunked, Duration::from_secs(2)).await;
    assert_eq!(
        statuses(&resp),
        vec![413],
        "{}",
        String::from_utf8_lossy(&resp)
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn upstream_down_then_back() {
    let sim = sim().await;
    let addr = sim.addr();
    let guard = guard(addr).await;
    assert_eq!(get(guard.addr, "/__sim/echo", &[]).await.status, 200);
    sim.stop().await;
    let down = get(guard.addr, "/hub/", &[]).await;
    assert_eq!(down.status, 502);
    assert!(down
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let page = down.text();
    assert!(
        page.contains("Qlik Sense is not reachable right now"),
        "{page}"
    );
    assert!(page.contains("cannot connect"), "{page}");
    // The guard recovers by itself once the node is back on the same address.
    let sim = restart_sim(addr).await;
    let front = guard.addr;
    poll_async(
        "the guard to recover when the upstream came back",
        Duration::from_secs(5),
        || async move { (get(front, "/__sim/echo", &[]).await.status == 200).then_some(()) },
    )
    .await;
    assert!(sim.counters().requests >= 1);
    guard.shutdown().await;
}

#[tokio::test]
async fn slow_upstream_gets_504_and_unreachable_gets_502() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[proxy]\nresponse_timeout = \"300ms\"\n",
    ))
    .await;
    let resp = get(guard.addr, "/__sim/slow?ms=2000", &[]).await;
    assert_eq!(resp.status, 504);
    assert!(resp.text().contains("did not answer in time"));
    // And the guard still serves.
    assert_eq!(get(guard.addr, "/__sim/echo", &[]).await.status, 200);
    guard.shutdown().await;

    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let lonely = common::guard(closed).await;
    let resp = get(lonely.addr, "/hub/", &[]).await;
    assert_eq!(resp.status, 502);
    lonely.shutdown().await;
}

/// `proxy.response_timeout` runs from each request's send on a kept-alive connection to Qlik:
/// a connection that sat idle in the pool for longer than the timeout still gives its next
/// request the whole timeout, and a slow answer on it still gets its 504. (The guard keeps one
/// timer per Qlik connection and moves its deadline lazily.)
#[tokio::test]
async fn the_response_timeout_starts_anew_on_a_reused_connection() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[proxy]\nresponse_timeout = \"400ms\"\n",
    ))
    .await;
    assert_eq!(get(guard.addr, "/__sim/echo", &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        get(guard.addr, "/__sim/slow?ms=250", &[]).await.status,
        200,
        "an answer within the timeout, after the pooled connection sat idle past it"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        get(guard.addr, "/__sim/slow?ms=1200", &[]).await.status,
        504
    );
    assert_eq!(get(guard.addr, "/__sim/echo", &[]).await.status, 200);
    guard.shutdown().await;
}

#[tokio::test]
async fn admin_health() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let h = get(guard.admin_addr, "/healthz", &[("host", "localhost")]).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    assert_eq!(
        get(guard.admin_addr, "/nope", &[("host", "localhost")])
            .await
            .status,
        404
    );
    assert_eq!(sim.counters().requests, 0, "admin calls never reach Qlik");
    guard.shutdown().await;
}

#[tokio::test]
async fn max_connections_makes_new_clients_wait() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sim = sim().await;
    let guard = guard_with(&config_text(&[sim.addr()], "max_connections = 1", "")).await;
    // The first client holds the only slot with an idle keep-alive connection.
    let mut first = tokio::net::TcpStream::connect(guard.addr).await.unwrap();
    first
        .write_all(b"GET /__sim/echo HTTP/1.1\r\nHost: q\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The second one is not served while the first is open...
    let mut second = tokio::net::TcpStream::connect(guard.addr).await.unwrap();
    second
        .write_all(b"GET /__sim/echo HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), second.read(&mut buf)).await;
    assert!(early.is_err(), "served past max_connections");
    // ...and is served as soon as the slot is free.
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    guard.shutdown().await;
}

/// A 3 MiB answer arrives whole; a client that stops reading a 64 MiB one is let go after
/// `server.send_timeout`. On a clock the test moves (see common::clock): the send timeout fires
/// when the test moves the clock past it, not after three real seconds.
#[tokio::test(start_paused = true)]
async fn large_answers_pass_and_a_client_that_stops_reading_is_let_go() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let clock = ManualClock::hold();
    let sim = sim().await;
    let guard = guard_with(&config_text(&[sim.addr()], "send_timeout = \"1s\"", "")).await;
    let big = get(guard.addr, "/__sim/bytes?n=3145728", &[]).await;
    assert_eq!(big.status, 200);
    assert_eq!(big.body.len(), 3 << 20);
    // A client asks for 64 MiB and stops reading.
    let n = 64usize << 20;
    let mut s = tokio::net::TcpStream::connect(guard.addr).await.unwrap();
    s.write_all(format!("GET /__sim/bytes?n={n} HTTP/1.1\r\nHost: q\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // The socket buffers fill up (megabytes, in milliseconds on loopback), then the guard's
    // write waits; once the clock passes send_timeout, the guard gives up.
    real_sleep(Duration::from_millis(500)).await;
    clock.advance(Duration::from_millis(1_001)).await;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let ended = real_timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
    })
    .await;
    assert!(ended.is_some(), "the guard still holds the stalled client");
    assert!(
        got < n,
        "the connection was closed before the whole answer ({got} bytes)"
    );
    assert_eq!(get(guard.addr, "/__sim/echo", &[]).await.status, 200);
    guard.shutdown().await;
}
