//! Responses through the HTTP/1 engine, against a scripted origin that answers each path with
//! exact bytes: the engine writes the response framing itself (codings kept, one clean length,
//! only allowed trailers), refuses a response it cannot frame exactly with a 502 before any of
//! it reaches the browser, and once a head has gone out, a failure closes the connection and
//! never writes an error page into the body. The access log says how each answer ended.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(3);

/// What the origin answers to a path: the exact bytes, and whether it then closes.
fn script(path: &str) -> (Vec<u8>, bool) {
    let s = |b: &[u8], close: bool| (b.to_vec(), close);
    match path {
        "/gzip-chunked" => s(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false),
        "/short" => s(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", true),
        "/bad-chunk" => s(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n", false),
        "/te-and-cl" => s(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n", false),
        "/connection-names-length" => s(b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello", false),
        "/two-lengths" => s(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", false),
        "/bare-lf" => s(b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello", false),
        "/trailers" => s(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nServer-Timing: db;dur=5\r\nContent-Length: 9\r\nX-Secret: y\r\n\r\n", false),
        "/empty" => s(b"HTTP/1.1 200 OK\r\nContent-Length: 0000\r\n\r\n", false),
        "/head" => s(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", false),
        "/big" => {
            let mut b = b"HTTP/1.1 200 OK\r\nContent-Length: 8000000\r\n\r\n".to_vec();
            b.extend(std::iter::repeat_n(b'x', 8_000_000));
            (b, false)
        }
        _ => s(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
    }
}

async fn setup() -> (qsguard::Guard, SocketAddr) {
    capture_logs();
    let origin = scripted_origin(script).await;
    let guard = guard_with(&config_text(&[origin], "", "")).await;
    (guard, origin)
}

fn split_head(raw: &[u8]) -> (String, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    (
        String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase(),
        raw[end + 4..].to_vec(),
    )
}

fn request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn codings_are_kept_and_only_allowed_trailers_pass() {
    let (guard, _) = setup().await;
    let out = raw(guard.addr, &request("/gzip-chunked"), WAIT).await;
    let (head, body) = split_head(&out);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("\r\ntransfer-encoding: gzip, chunked"),
        "the codings are kept: {head}"
    );
    assert_eq!(body, b"5\r\nhello\r\n0\r\n\r\n");

    let out = raw(guard.addr, &request("/trailers"), WAIT).await;
    let (_, body) = split_head(&out);
    assert_eq!(
        String::from_utf8_lossy(&body),
        "5\r\nhello\r\n0\r\nServer-Timing: db;dur=5\r\n\r\n",
        "the extension and the trailers off the allow-list are dropped"
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn the_engine_writes_one_clean_length() {
    let (guard, _) = setup().await;
    let out = raw(guard.addr, &request("/empty"), WAIT).await;
    let (head, body) = split_head(&out);
    assert!(
        head.lines().any(|l| l == "content-length: 0"),
        "the length is written anew: {head}"
    );
    assert!(body.is_empty());

    // A HEAD answer keeps its length (it describes the GET body) and has no body; the
    // connection goes on.
    let two = b"HEAD /head HTTP/1.1\r\nHost: q\r\n\r\nGET /next HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n";
    let out = raw(guard.addr, two, WAIT).await;
    assert_eq!(statuses(&out), vec![200, 200]);
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(text.contains("content-length: 1234"), "{text}");
    assert!(text.ends_with("\r\n\r\nok"), "{text}");
    guard.shutdown().await;
}

#[tokio::test]
async fn a_response_that_cannot_be_framed_exactly_is_a_502() {
    let (guard, _) = setup().await;
    for path in [
        "/te-and-cl",
        "/connection-names-length",
        "/two-lengths",
        "/bare-lf",
    ] {
        let out = raw(guard.addr, &request(path), WAIT).await;
        assert_eq!(statuses(&out), vec![502], "{path}");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("qsguard"), "{path}: the guard's page");
        assert!(!text.contains("hello"), "{path}: nothing of Qlik's answer");
    }
    assert_eq!(get(guard.addr, "/fine", &[]).await.status, 200);
    guard.shutdown().await;
}

#[tokio::test]
async fn after_the_head_a_failure_closes_the_connection_and_writes_no_page() {
    let (guard, _) = setup().await;
    // Qlik promised 100 bytes, sent 10, and closed.
    let out = raw(guard.addr, &request("/short"), WAIT).await;
    let (head, body) = split_head(&out);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("content-length: 100"), "{head}");
    assert_eq!(body, b"0123456789", "no error page inside the body");
    // A bad chunk after the head: what came before it, then the end of the connection.
    let out = raw(guard.addr, &request("/bad-chunk"), WAIT).await;
    let (head, body) = split_head(&out);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body, b"5\r\nhello\r\n", "no error page inside the body");
    let logs = logged();
    for path in ["/short", "/bad-chunk"] {
        let line = logs
            .lines()
            .find(|l| l.contains("qsguard::access") && l.contains(&format!("path={path} ")))
            .unwrap_or_else(|| panic!("no access line for {path}:\n{logs}"));
        assert!(line.contains("status=200"), "{line}");
        assert!(line.contains("upstream_broke"), "{line}");
    }
    assert!(
        logs.contains("the response broke off after its head was sent"),
        "{logs}"
    );
    assert_eq!(get(guard.addr, "/fine", &[]).await.status, 200);
    guard.shutdown().await;
}

#[tokio::test]
async fn a_client_that_goes_away_is_logged_as_such() {
    let (guard, _) = setup().await;
    // Mid-upload.
    let mut s = TcpStream::connect(guard.addr).await.unwrap();
    s.write_all(b"POST /upload-gone HTTP/1.1\r\nHost: q\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    drop(s);
    // Mid-download.
    let mut s = TcpStream::connect(guard.addr).await.unwrap();
    s.write_all(&request("/big")).await.unwrap();
    let mut first = [0u8; 1024];
    let _ = s.read(&mut first).await.unwrap();
    drop(s);
    eventually("both access lines", || {
        let l = logged();
        l.contains("path=/upload-gone ") && l.contains("path=/big ")
    })
    .await;
    let logs = logged();
    let upload = logs
        .lines()
        .find(|l| l.contains("qsguard::access") && l.contains("path=/upload-gone "))
        .unwrap();
    assert!(upload.contains("status=499"), "{upload}");
    assert!(upload.contains("client_gone"), "{upload}");
    let download = logs
        .lines()
        .find(|l| l.contains("qsguard::access") && l.contains("path=/big "))
        .unwrap();
    assert!(download.contains("status=200"), "{download}");
    assert!(download.contains("client_gone"), "{download}");
    assert!(
        !logs
            .lines()
            .any(|l| l.contains("/upload-gone") && l.contains("status=400")),
        "not a 400"
    );
    guard.shutdown().await;
}
