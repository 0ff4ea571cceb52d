//! What a request holds in the session guard (a slot in its user's count, its browser's
//! flight) is given back the moment the request ends, whichever way it ends: here, a client
//! that cuts its request body off half-way. Before, the slot and the flight stayed held for up
//! to a minute, and the user could see the limit page without being at the limit.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn a_body_cut_off_gives_back_the_users_slot_and_the_browsers_flight_at_once() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let g = guard.proxy().sessions().expect("the guard is on").clone();
    let user = "CORP\\cut";
    let key = qsguard::session::identity::User::parse(user.as_bytes())
        .unwrap()
        .key;
    // A browser the guard knows (it has the device cookie), whose session has ended: its next
    // request makes a new session, leading its flight and holding a slot.
    let mut jar = Jar::new();
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut jar, user)
            .await
            .status,
        200
    );
    let logout = Request::delete("/hdr/qps/user")
        .header("host", "qlik.example.com")
        .header("hdr-usr", user)
        .header("cookie", cookie_header(&jar))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(guard.addr, logout).await.unwrap().status, 200);
    let device = jar
        .iter()
        .find(|(k, _)| k == "qsguard")
        .map(|(_, v)| v.clone())
        .expect("a device cookie");

    let mut s = tokio::net::TcpStream::connect(guard.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /hdr/hub/upload HTTP/1.1\r\nHost: q\r\nhdr-usr: {user}\r\nCookie: qsguard={device}\r\nContent-Length: 100\r\n\r\n0123456789"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    eventually(
        "the request holds a slot and leads the browser's flight",
        || g.table.reservations(&key) == 1 && g.flights_open() == 1,
    )
    .await;
    // The client goes away half-way through its body.
    drop(s);
    let cut = std::time::Instant::now();
    eventually("the slot and the flight are given back", || {
        g.table.reservations(&key) == 0 && g.flights_open() == 0
    })
    .await;
    assert!(
        cut.elapsed() < Duration::from_secs(2),
        "given back at once, not after the flight's minute"
    );
    assert_eq!(
        sim.counters().sessions_created,
        1,
        "no session was made for it"
    );
    guard.shutdown().await;
}
