//! Engine WebSockets through the guard: the upgrade, frames both ways untouched, and a tunnel
//! that stays open across an idle period (QSGUARD_WS_IDLE_SECS, default 2; CI runs it with 65
//! so that no minute-scale idle timer anywhere on the path goes unnoticed).

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn idle_period() -> Duration {
    let secs = std::env::var("QSGUARD_WS_IDLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    Duration::from_secs(secs)
}

#[tokio::test]
async fn engine_websocket_echo_survives_an_idle_period() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut ws = ws_as(guard.addr, "/hdr/app/engineData", "CORP\\ws", None).await;
    let hello = next_text(&mut ws).await;
    assert!(hello.contains("OnConnected"), "{hello}");
    assert_eq!(sim.counters().websockets_open, 1);

    ws.send(Message::text(
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"GetDocList\"}",
    ))
    .await
    .unwrap();
    assert_eq!(
        next_text(&mut ws).await,
        "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"GetDocList\"}"
    );
    let binary: Vec<u8> = (0..70_000u32).map(|i| (i % 256) as u8).collect();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => assert_eq!(b.to_vec(), binary),
        other => panic!("expected the binary echo, got {other:?}"),
    }

    tokio::time::sleep(idle_period()).await;
    ws.send(Message::text("after the pause")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "after the pause");
    assert_eq!(guard.proxy().open_tunnels(), 1);

    ws.close(None).await.unwrap();
    // The close handshake: Qlik answers the close frame, then the browser drops the socket.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
    drop(ws);
    eventually_within(
        "the close reaching Qlik and the tunnel going",
        Duration::from_millis(2500),
        || sim.counters().websockets_open == 0 && guard.proxy().open_tunnels() == 0,
    )
    .await;
    assert_eq!(sim.counters().websockets_open, 0, "the close reached Qlik");
    assert_eq!(guard.proxy().open_tunnels(), 0, "the tunnel is gone");
    guard.shutdown().await;
}

/// `server.websocket_idle_timeout`: a tunnel without a byte either way for that long is closed
/// then, and every byte restarts the wait. On a clock the test moves (see common::clock), so
/// "not before" and "then" are exact; what crosses the sockets is waited for in real time.
#[tokio::test(start_paused = true)]
async fn websocket_idle_timeout_when_configured() {
    const PROMPT: Duration = Duration::from_secs(10);
    let clock = ManualClock::hold();
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "websocket_idle_timeout = \"500ms\"",
        "",
    ))
    .await;
    let mut ws = real_timeout(PROMPT, ws_as(guard.addr, "/hdr/app/x", "CORP\\idle", None))
        .await
        .expect("the upgrade");
    real_timeout(PROMPT, next_text(&mut ws))
        .await
        .expect("Qlik's greeting");
    // Just before the timeout, and again just before it counted from that echo: still open.
    for round in 0..2 {
        clock.advance(Duration::from_millis(499)).await;
        let echoed = real_timeout(PROMPT, echoes(&mut ws, &format!("round {round}")))
            .await
            .expect("an echo");
        assert!(
            echoed,
            "round {round}: the tunnel was closed before it was idle"
        );
    }
    clock.advance(Duration::from_millis(500)).await;
    let r = real_timeout(PROMPT, ws.next())
        .await
        .expect("the tunnel closed once idle for the timeout");
    assert!(
        matches!(r, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
        "the configured idle timeout closes the tunnel: {r:?}"
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn refused_upgrade_closes_the_connection() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    // The central proxy needs a session for the engine: without one Qlik refuses the upgrade.
    let out = raw(
        guard.addr,
        b"GET /app/engineData HTTP/1.1\r\nHost: q\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n\
GET /__sim/smuggled HTTP/1.1\r\nHost: q\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    let codes = statuses(&out);
    assert_eq!(codes.len(), 1, "{}", String::from_utf8_lossy(&out));
    assert_ne!(codes[0], 101);
    assert!(sim.last_request("/__sim/smuggled").is_none());
    guard.shutdown().await;
}
