//! Graceful shutdown (`server.grace_period`): a request in flight is answered within the grace
//! period, what is still open when it ends is cut then (not before, and not never), no
//! connection is accepted once the shutdown started, and WebSocket tunnels close after the
//! requests in flight. HTTP/1.1 and HTTP/2 (both over TLS) get the same assertions.
//!
//! The tests run on a tokio clock that moves only when they move it ([`ManualClock`]): the
//! grace period, the simulator's slow answer and every other timer of the guard fire exactly
//! when the test has moved the clock past them, so "not before" and "then" are exact, and no
//! test waits ten real seconds. What travels on real sockets meanwhile is waited for in real
//! time: [`SETTLE`] to let the guard act (or show it does nothing), [`PROMPT`] as the bound
//! on what must happen.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use qsguard::sim::Simulator;
use qsguard::Guard;
use tokio::task::JoinHandle;

/// `server.grace_period` in these tests.
const GRACE: Duration = Duration::from_secs(10);
/// Real time given to the guard to act on what the clock made due (or to show that it does
/// nothing): loopback bytes need microseconds, this is three orders of magnitude more.
const SETTLE: Duration = Duration::from_millis(300);
/// Real-time bound on what must happen once it is due.
const PROMPT: Duration = Duration::from_secs(10);

/// The simulator and the guard in front of it over TLS (so that ALPN picks the protocol), with
/// a grace period of [`GRACE`].
struct Bench {
    sim: Simulator,
    guard: Guard,
    client: Client,
    _cert: TestCert,
}

impl Bench {
    async fn start(proto: Proto) -> Bench {
        let sim = sim().await;
        let cert = TestCert::new();
        let guard = guard_with(&with_grace(
            &config_text(&[sim.addr()], &cert.server_toml(), ""),
            GRACE,
        ))
        .await;
        let client = Client::tls(guard.addr, &cert, proto);
        Bench {
            sim,
            guard,
            client,
            _cert: cert,
        }
    }

    async fn in_flight(&self, ms: u64) -> JoinHandle<Result<Resp, String>> {
        in_flight(&self.client, &self.sim, ms).await
    }
}

/// `GET /__sim/slow?ms=<ms>` sent now; once this returns, the simulator has the request (and
/// answers it `ms` later on the test's clock).
async fn in_flight(client: &Client, sim: &Simulator, ms: u64) -> JoinHandle<Result<Resp, String>> {
    let link = client.link().await;
    let path = format!("/__sim/slow?ms={ms}");
    let req = http::Request::get(&path)
        .header("host", "qlik.example.com")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let answer = tokio::spawn(async move { link.send(req).await });
    real_poll_for("the slow request at the simulator", PROMPT, || {
        sim.last_request(&path)
    })
    .await;
    answer
}

/// `config` with `grace_period` instead of the default of [`config_text`].
fn with_grace(config: &str, grace: Duration) -> String {
    const DEFAULT: &str = "grace_period = \"5s\"";
    assert!(config.contains(DEFAULT), "{config}");
    config.replace(
        DEFAULT,
        &format!("grace_period = \"{}ms\"", grace.as_millis()),
    )
}

/// Starts the shutdown, and returns once the guard has begun it (the listener is closed, and
/// the grace period runs from the clock's present time); the handle ends when the guard has
/// stopped.
async fn shut_down(guard: Guard) -> JoinHandle<()> {
    let addr = guard.addr;
    guard.stopper().cancel();
    let stopped = tokio::spawn(guard.wait());
    real_poll_async("the listener closed", PROMPT, || async move {
        refused(addr).await.then_some(())
    })
    .await;
    // The shutdown task runs on this runtime as soon as the test waits; it must have started
    // the grace period before the test moves the clock, or the period would start late.
    real_sleep(SETTLE).await;
    stopped
}

/// Whether a TCP connection to `addr` is refused now.
async fn refused(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_is_answered_within_the_grace_period() {
    for proto in Proto::BOTH {
        let clock = ManualClock::hold();
        let b = Bench::start(proto).await;
        // Qlik answers 6 s after the shutdown started, 4 s before the grace period ends.
        let slow = b.in_flight(6_000).await;
        let stopped = shut_down(b.guard).await;
        clock.advance(Duration::from_millis(5_999)).await;
        real_sleep(SETTLE).await;
        assert!(
            !slow.is_finished(),
            "{proto:?}: the request in flight ended before Qlik answered: {:?}",
            slow.await
        );
        assert!(
            !stopped.is_finished(),
            "{proto:?}: the shutdown did not wait for the request in flight"
        );
        clock.advance(Duration::from_millis(1)).await;
        let resp = real_timeout(PROMPT, slow)
            .await
            .unwrap_or_else(|| panic!("{proto:?}: Qlik's answer did not reach the client"))
            .unwrap()
            .unwrap_or_else(|e| panic!("{proto:?}: the request in flight was cut: {e}"));
        assert_eq!(resp.status, 200, "{proto:?}");
        assert_eq!(resp.text(), "slept 6000 ms\n", "{proto:?}");
        // The clock stays where it is: the shutdown ends with the last connection, it does not
        // wait out the grace period.
        real_timeout(PROMPT, stopped)
            .await
            .unwrap_or_else(|| {
                panic!("{proto:?}: the shutdown did not end once the request was answered")
            })
            .unwrap();
        assert_eq!(clock.elapsed(), Duration::from_secs(6), "{proto:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn what_is_still_open_when_the_grace_period_ends_is_cut_then() {
    for proto in Proto::BOTH {
        let clock = ManualClock::hold();
        let b = Bench::start(proto).await;
        // Qlik would answer after a minute: far past the grace period.
        let slow = b.in_flight(60_000).await;
        let stopped = shut_down(b.guard).await;
        clock.advance(GRACE - Duration::from_millis(1)).await;
        real_sleep(SETTLE).await;
        assert!(
            !slow.is_finished(),
            "{proto:?}: the request was cut before the grace period ended: {:?}",
            slow.await
        );
        assert!(
            !stopped.is_finished(),
            "{proto:?}: stopped within the grace period"
        );
        clock.advance(Duration::from_millis(1)).await;
        let cut = real_timeout(PROMPT, slow)
            .await
            .unwrap_or_else(|| {
                panic!("{proto:?}: the request is still open after the grace period")
            })
            .unwrap();
        assert!(
            cut.is_err(),
            "{proto:?}: the connection was closed, the request not answered: {cut:?}"
        );
        real_timeout(PROMPT, stopped)
            .await
            .unwrap_or_else(|| panic!("{proto:?}: the shutdown did not end after the cut"))
            .unwrap();
        assert_eq!(clock.elapsed(), GRACE, "{proto:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn no_connection_is_accepted_once_the_shutdown_started() {
    for proto in Proto::BOTH {
        let clock = ManualClock::hold();
        let b = Bench::start(proto).await;
        let addr = b.guard.addr;
        let slow = b.in_flight(6_000).await;
        // Once the shutdown started (see shut_down), new connections are refused...
        let stopped = shut_down(b.guard).await;
        assert!(refused(addr).await, "{proto:?}");
        // ...and still refused later in the grace period, while the request in flight goes on.
        clock.advance(Duration::from_secs(5)).await;
        assert!(refused(addr).await, "{proto:?}: accepting again");
        assert!(
            !slow.is_finished(),
            "{proto:?}: the request in flight ended early: {:?}",
            slow.await
        );
        clock.advance(Duration::from_secs(1)).await;
        let resp = real_timeout(PROMPT, slow)
            .await
            .unwrap_or_else(|| panic!("{proto:?}: no answer"))
            .unwrap()
            .unwrap_or_else(|e| panic!("{proto:?}: the request in flight was cut: {e}"));
        assert_eq!(resp.status, 200, "{proto:?}");
        real_timeout(PROMPT, stopped)
            .await
            .unwrap_or_else(|| panic!("{proto:?}: the shutdown did not end"))
            .unwrap();
        assert_eq!(
            b.sim.counters().requests,
            1,
            "{proto:?}: only the request in flight reached Qlik"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn tunnels_close_once_the_requests_in_flight_are_done() {
    use futures_util::StreamExt;
    let clock = ManualClock::hold();
    let sim = sim().await;
    let guard = guard_with(&with_grace(&config_text(&[sim.addr()], "", ""), GRACE)).await;
    let mut ws = real_timeout(PROMPT, ws_as(guard.addr, "/hdr/app/x", "CORP\\down", None))
        .await
        .expect("the WebSocket opens");
    real_timeout(PROMPT, next_text(&mut ws))
        .await
        .expect("Qlik's greeting");
    let slow = in_flight(&Client::plain(guard.addr), &sim, 6_000).await;
    let stopped = shut_down(guard).await;
    clock.advance(Duration::from_millis(5_999)).await;
    real_sleep(SETTLE).await;
    assert!(
        real_timeout(PROMPT, echoes(&mut ws, "still here"))
            .await
            .expect("an echo"),
        "the tunnel works while a request is in flight"
    );
    clock.advance(Duration::from_millis(1)).await;
    let resp = real_timeout(PROMPT, slow)
        .await
        .expect("the answer")
        .unwrap()
        .expect("answered");
    assert_eq!(resp.status, 200);
    // Then the tunnel is closed, without more time passing.
    let closed = real_timeout(PROMPT, async {
        loop {
            match ws.next().await {
                Some(Ok(m)) if !m.is_close() => continue,
                _ => break,
            }
        }
    })
    .await;
    assert!(closed.is_some(), "the tunnel was closed by the shutdown");
    real_timeout(PROMPT, stopped)
        .await
        .expect("the shutdown ends")
        .unwrap();
    real_poll_for("the close reaching Qlik", PROMPT, || {
        (sim.counters().websockets_open == 0).then_some(())
    })
    .await;
}
