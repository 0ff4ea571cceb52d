//! The engine WebSocket (`/<prefix/>app/...`) of the simulated QPS.
//!
//! Real clients hold this socket open for a whole work session, and the QPS uses it to tell
//! them their session is gone (JSON-RPC notifications such as `OnSessionTimedOut`) before it
//! closes it. The simulator echoes every message so tests can check data passes through the
//! guard unchanged, and keeps the session alive while the socket is open, as Qlik does.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{HeaderMap, HeaderValue, CONNECTION, SET_COOKIE, UPGRADE};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::http::{html_page, response, Body};
use super::sessions::{EndReason, SessionInfo};
use super::Shared;

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// How long to wait for the client's close frame after ours.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// `Connection: upgrade` (any line, any token position) and `Upgrade: websocket`.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has_token(CONNECTION, "upgrade") && has_token(UPGRADE, "websocket")
}

/// What the socket does once upgraded.
enum Plan {
    /// Attached to a live session: OnConnected, echo, notification when the session ends.
    Session {
        id: String,
        ended: watch::Receiver<Option<EndReason>>,
        _open: OpenGuard,
    },
    /// Refused at the limit: the QPS accepts the upgrade only to say why, then closes.
    Refuse,
    /// The session vanished between authentication and upgrade.
    Gone,
}

/// Keeps the session's open-socket count right however the socket task ends (including an
/// abort on `stop`).
struct OpenGuard {
    shared: Arc<Shared>,
    id: String,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.shared
            .lock()
            .ws_closed(&self.id, tokio::time::Instant::now());
    }
}

/// Completes the WebSocket handshake for `session` (or, with `None`, for a refusal at the
/// limit) and spawns the socket task.
pub(crate) fn accept(
    shared: &Arc<Shared>,
    parts: &mut Parts,
    session: Option<SessionInfo>,
    cookie: Option<HeaderValue>,
) -> Response<Body> {
    if parts.method != Method::GET {
        return html_page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "WebSocket upgrades use GET.",
        );
    }
    let version_ok = parts
        .headers
        .get("sec-websocket-version")
        .is_some_and(|v| v.as_bytes() == b"13");
    if !version_ok {
        let mut r = html_page(
            StatusCode::UPGRADE_REQUIRED,
            "Upgrade required",
            "WebSocket version 13 only.",
        );
        r.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return r;
    }
    let Some(key) = parts
        .headers
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec())
    else {
        return html_page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "Sec-WebSocket-Key is missing.",
        );
    };
    let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
        return html_page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "This connection cannot be upgraded.",
        );
    };
    let plan = match session {
        None => Plan::Refuse,
        Some(s) => match shared.lock().ws_open(&s.id, tokio::time::Instant::now()) {
            Some(ended) => Plan::Session {
                id: s.id.clone(),
                ended,
                _open: OpenGuard {
                    shared: shared.clone(),
                    id: s.id,
                },
            },
            None => Plan::Gone,
        },
    };
    shared.tracker.spawn(run(shared.clone(), on_upgrade, plan));

    let mut r = response(
        StatusCode::SWITCHING_PROTOCOLS,
        "text/plain",
        bytes::Bytes::new(),
    );
    let h = r.headers_mut();
    h.remove(http::header::CONTENT_TYPE);
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(&key)) {
        h.insert("sec-websocket-accept", v);
    }
    if let Some(c) = cookie {
        h.append(SET_COOKIE, c);
    }
    r
}

fn notification(method: &str) -> Message {
    Message::text(format!(
        r#"{{"jsonrpc":"2.0","method":"{method}","params":{{}}}}"#
    ))
}

async fn run(shared: Arc<Shared>, on_upgrade: OnUpgrade, plan: Plan) {
    let Ok(upgraded) = on_upgrade.await else {
        return;
    };
    let mut ws: Ws =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    let (id, mut ended, open) = match plan {
        Plan::Refuse => {
            let _ = ws.send(notification("OnMaxParallelSessionsExceeded")).await;
            close(ws).await;
            return;
        }
        Plan::Gone => {
            let _ = ws.send(notification("OnSessionClosed")).await;
            close(ws).await;
            return;
        }
        Plan::Session { id, ended, _open } => (id, ended, _open),
    };
    let connected = Message::text(
        r#"{"jsonrpc":"2.0","method":"OnConnected","params":{"qSessionState":"SESSION_CREATED"}}"#,
    );
    if ws.send(connected).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            _ = ended.changed() => {
                // Also reached when the session's sender is gone; the last value says why.
                let reason = *ended.borrow();
                let method = reason.map(EndReason::notification).unwrap_or("OnSessionClosed");
                let _ = ws.send(notification(method)).await;
                // The socket counts as closed from here; a client slow to answer the close
                // frame must not keep `websockets_open` up.
                drop(open);
                close(ws).await;
                return;
            }
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else { return };
                shared.lock().activity(&id, tokio::time::Instant::now());
                let ok = match msg {
                    Message::Text(_) | Message::Binary(_) => ws.send(msg).await.is_ok(),
                    // tungstenite queues the pong (or the close reply) itself; push it out now.
                    Message::Ping(_) | Message::Close(_) => ws.flush().await.is_ok(),
                    Message::Pong(_) | Message::Frame(_) => true,
                };
                if !ok {
                    return;
                }
            }
        }
    }
}

/// Sends a normal close frame and waits briefly for the client's reply so the close is clean.
async fn close(mut ws: Ws) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    };
    if ws.close(Some(frame)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
