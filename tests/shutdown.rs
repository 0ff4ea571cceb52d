//! Graceful shutdown: in-flight requests finish, new connections are refused, tunnels close.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn in_flight_request_finishes_during_shutdown() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let addr = guard.addr;
    let slow = tokio::spawn(async move { get(addr, "/__sim/slow?ms=1500", &[]).await });
    // Let the request reach the simulator before the shutdown starts.
    for _ in 0..100 {
        if sim.last_request("/__sim/slow").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stopper = guard.stopper();
    let stopped = tokio::spawn(guard.wait());
    stopper.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connection is accepted during shutdown"
    );
    let resp = slow.await.unwrap();
    assert_eq!(resp.status, 200, "the in-flight request was answered");
    tokio::time::timeout(Duration::from_secs(5), stopped)
        .await
        .expect("shutdown finishes once the request is done")
        .unwrap();
}

#[tokio::test]
async fn grace_period_bounds_the_wait() {
    let sim = sim().await;
    let text = config_text(&[sim.addr()], "", "")
        .replace("grace_period = \"5s\"", "grace_period = \"300ms\"");
    let guard = guard_with(&text).await;
    let addr = guard.addr;
    let slow = tokio::spawn(async move { send_slow(addr).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    guard.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "shutdown waited past the grace period"
    );
    let _ = slow.await;
}

async fn send_slow(addr: std::net::SocketAddr) -> Result<Resp, String> {
    use bytes::Bytes;
    use http_body_util::Full;
    send(
        addr,
        http::Request::get("/__sim/slow?ms=3000")
            .header("host", "q")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn tunnels_close_once_in_flight_requests_are_done() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut req = format!("ws://{}/hdr/app/x", guard.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("hdr-usr", "CORP\\down".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(guard.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
    ws.next().await.unwrap().unwrap();
    let addr = guard.addr;
    let slow = tokio::spawn(async move { get(addr, "/__sim/slow?ms=800", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(guard.shutdown());
    assert_eq!(
        slow.await.unwrap().status,
        200,
        "the request in flight finished"
    );
    // The tunnel is closed after that, not before.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(m)) if !m.is_close() => continue,
                _ => break,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the tunnel was closed by the shutdown");
    assert!(started.elapsed() >= Duration::from_millis(500));
    stopping.await.unwrap();
}
