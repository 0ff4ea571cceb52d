//! The session guard's decision is a future inside every request's future, and an HTTP/2
//! stream's future was moved several times before it ran (hyper spawned a task per stream,
//! copying the whole future into the task's cell; today it is written into its box once, but
//! every state of it is still that size). A cold path awaited inline (ending a session in Qlik, waiting for a pending
//! login) made `before()` 4.9 KB and an HTTP/2 request through the guard cost 155k instead of
//! 81k instructions (`benches/cost.sh`, row guard-h2), nearly all of it `memcpy`. Cold paths
//! are boxed; this keeps them so.

use std::sync::Arc;

use qsguard::session::{Request, SessionGuard};

#[test]
fn the_guards_decision_is_a_small_future() {
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
"#,
    )
    .unwrap();
    let events = Arc::new(qsguard::diagnostics::events::Events::new(100));
    let g = Arc::new(SessionGuard::new(&config, events).unwrap());
    let headers = http::HeaderMap::new();
    let req = Request {
        method: b"GET",
        path: "/",
        query: None,
        headers: &headers,
        device_memo: None,
    };
    let before = g.before(&req, "127.0.0.1".parse().unwrap(), false);
    let size = std::mem::size_of_val(&before);
    // 2.6 KB today (release and debug differ a little); 4.9 KB with the cold paths inline.
    assert!(
        size <= 3500,
        "SessionGuard::before's future is {size} bytes"
    );
}
