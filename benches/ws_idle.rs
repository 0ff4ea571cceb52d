//! Helper for the idle-WebSocket memory measurement of `benches/load.sh` (not a Criterion
//! bench: `harness = false`, it is a plain program with its own `main`).
//!
//! Two modes:
//!
//! * `ws_idle server ADDR` — a WebSocket echo upstream on ADDR (e.g. `127.0.0.1:18085`): accepts
//!   any number of connections on any path and echoes every text/binary message back.
//! * `ws_idle client URL N HOLD_SECS` — opens N WebSocket connections to URL (a `ws://` URL,
//!   normally pointing at a proxy in front of the server), sends one text message on each and
//!   waits for its echo (so the tunnel is proven end to end), then prints `ready N` on stdout
//!   and keeps all of them open and idle for HOLD_SECS seconds before exiting.
//!
//! The client exits non-zero (with a message on stderr) if any connection, send or echo fails,
//! so the script never measures a half-open set.

use std::process::ExitCode;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// How many connection handshakes the client runs at once: enough to be quick, few enough not
/// to overflow a proxy's listen backlog.
const CONNECT_CONCURRENCY: usize = 64;

fn usage() -> ExitCode {
    eprintln!("usage: ws_idle server ADDR\n       ws_idle client URL N HOLD_SECS");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench` to harness-less benches; ignore such flags so that a plain
    // `cargo bench --bench ws_idle` does not fail, it only prints the usage.
    let args: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    match args.as_slice() {
        ["server", addr] => rt.block_on(server(addr)),
        ["client", url, n, hold] => {
            let (Ok(n), Ok(hold)) = (n.parse::<usize>(), hold.parse::<u64>()) else {
                return usage();
            };
            rt.block_on(client(url, n, hold))
        }
        [] => {
            // Run with no arguments (e.g. by `cargo bench`): nothing to measure on its own.
            eprintln!("ws_idle: helper for benches/load.sh; nothing to do without arguments");
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}

/// The echo upstream: one task per connection, for as long as the peer keeps it.
async fn server(addr: &str) -> ExitCode {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ws_idle server: cannot listen on {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: back off briefly instead of spinning.
                eprintln!("ws_idle server: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            // A proxy's health check is a plain GET: a Qlik node answers it, and so does this.
            let mut stream = stream;
            if !is_upgrade(&stream).await {
                use tokio::io::AsyncWriteExt;
                let mut head = [0u8; 4096];
                let _ = tokio::io::AsyncReadExt::read(&mut stream, &mut head).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                    )
                    .await;
                return;
            }
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                if matches!(msg, Message::Close(_)) || (echo && ws.send(msg).await.is_err()) {
                    break;
                }
                // Pings are answered by tungstenite itself.
            }
        });
    }
}

/// Whether the request waiting on `stream` asks for a WebSocket (its head, peeked, names an
/// `Upgrade`).
async fn is_upgrade(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    for _ in 0..1000 {
        let Ok(n) = stream.peek(&mut buf).await else {
            return false;
        };
        let head = &buf[..n];
        if n == 0 || n == buf.len() || head.windows(4).any(|w| w == b"\r\n\r\n") {
            return head
                .to_ascii_lowercase()
                .windows(8)
                .any(|w| w == b"upgrade:");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Opens one connection, sends one message and reads its echo.
async fn open_one(url: String, i: usize) -> Result<Ws, String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .map_err(|e| format!("connection {i}: handshake: {e}"))?;
    let text = format!("hello {i}");
    ws.send(Message::text(text.clone()))
        .await
        .map_err(|e| format!("connection {i}: send: {e}"))?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Err(_) => return Err(format!("connection {i}: no echo within 10s")),
            Ok(None) => return Err(format!("connection {i}: closed before the echo")),
            Ok(Some(Err(e))) => return Err(format!("connection {i}: read: {e}")),
            Ok(Some(Ok(Message::Text(t)))) if t.as_str() == text => return Ok(ws),
            Ok(Some(Ok(Message::Text(t)))) => {
                return Err(format!(
                    "connection {i}: echo {:?}, expected {text:?}",
                    t.as_str()
                ))
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

async fn client(url: &str, n: usize, hold_secs: u64) -> ExitCode {
    let results: Vec<Result<Ws, String>> = futures_util::stream::iter(0..n)
        .map(|i| open_one(url.to_string(), i))
        .buffer_unordered(CONNECT_CONCURRENCY)
        .collect()
        .await;
    let mut open = Vec::with_capacity(n);
    let mut failed = 0usize;
    for r in results {
        match r {
            Ok(ws) => open.push(ws),
            Err(e) => {
                if failed < 5 {
                    eprintln!("ws_idle client: {e}");
                }
                failed += 1;
            }
        }
    }
    if failed > 0 {
        eprintln!("ws_idle client: {failed} of {n} connections failed");
        return ExitCode::from(1);
    }
    let mut out = tokio::io::stdout();
    let _ = out
        .write_all(format!("ready {}\n", open.len()).as_bytes())
        .await;
    let _ = out.flush().await;
    // Idle: nobody reads or writes; the connections just stay open.
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    drop(open);
    ExitCode::SUCCESS
}
