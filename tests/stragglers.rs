//! Late steps of a dead-cookie burst (issue 12, part 1).
//!
//! A page whose session cookie is dead fires its requests at once. Those that reach Qlik are
//! each sent to the authentication module; the guard lets one of them log in and holds the
//! others. But a browser is not a test client: its requests share one cookie jar, and each
//! follows its redirects on its own clock. A request of the burst may reach the
//! authentication module (or come back with its ticket) only after the first login has ended,
//! now carrying the new, live cookie; forwarded, Qlik would issue it a ticket and make a
//! session for it. These tests replay such bursts with the browser's shared jar and a random
//! pause before every step of every request, so that stragglers land at every moment of the
//! login dance, many times over: one session per burst, every time.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use qsguard::sim::ntlm::{Browser, Scheme};
use qsguard::Guard;

/// A small deterministic generator: each round's pauses come from its seed, printed when the
/// round fails, so a failing schedule can be read back.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A pause for one step: none half the time, else up to `max_ms`, and now and then a
    /// long one, so that some requests arrive well after the first login has ended.
    fn pause(&mut self, max_ms: u64) -> Option<Duration> {
        match self.next() % 8 {
            0..=3 => None,
            4..=6 => Some(Duration::from_millis(self.next() % max_ms)),
            _ => Some(Duration::from_millis(max_ms + self.next() % (4 * max_ms))),
        }
    }
}

/// How the browser's session died before the burst.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// Ended in Qlik behind the guard's back (an admin, a QPS restart): the guard still takes
    /// the cookie for live, so every request of the burst reaches Qlik.
    InQlik,
    /// Logged out through the guard: the guard knows the cookie is dead.
    LoggedOut,
}

/// One burst of `n` page loads of one browser (one shared jar), each step of each request
/// after a pause drawn from `seed`. Returns the answers' statuses and whether each ended on
/// the page it asked for.
async fn burst(
    addr: std::net::SocketAddr,
    jar: &Arc<Mutex<Jar>>,
    user: &'static str,
    n: usize,
    seed: u64,
) -> Vec<(u16, bool)> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let jar = jar.clone();
        let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(i as u64 + 1) | 1);
        tasks.push(tokio::spawn(async move {
            let path = format!("/hub/page{i}");
            let browser = Browser::new(user, Scheme::Ntlm);
            let mut pause = move |step: usize| rng.pause(if step == 0 { 20 } else { 60 });
            let r = Client::plain(addr)
                .link()
                .await
                .browse_shared(&path, &jar, &[], Some(&browser), &mut pause)
                .await;
            (r.status.as_u16(), r.text().contains(&path))
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn kill(sim: &qsguard::sim::Simulator, guard: &Guard, jar: &Arc<Mutex<Jar>>, how: Death) {
    match how {
        Death::InQlik => {
            let id = sim.session_ids("CORP\\straggler")[0].clone();
            end_in_qlik(sim, "", &id).await;
        }
        Death::LoggedOut => {
            let jar = jar.lock().unwrap().clone();
            let r = logout(guard.addr, "/", &jar, None).await;
            assert_eq!(r.status, 200, "logout: {}", r.text());
        }
    }
    assert_eq!(sim.live_sessions("CORP\\straggler"), 0);
}

async fn rounds(how: Death, rounds: u64) {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let jar = Arc::new(Mutex::new(Jar::new()));
    {
        let mut j = Jar::new();
        let r = browse_windows(guard.addr, "/hub/", &mut j, "CORP\\straggler").await;
        assert_eq!(r.status, 200);
        *jar.lock().unwrap() = j;
    }
    let mut made = Vec::new();
    for round in 0..rounds {
        kill(&sim, &guard, &jar, how).await;
        let before = sim.counters();
        let seed = 0x9e37_79b9_7f4a_7c15 ^ (round + 1).wrapping_mul(0x1000_0001);
        let answers = burst(guard.addr, &jar, "CORP\\straggler", 10, seed).await;
        let after = sim.counters();
        assert!(
            answers
                .iter()
                .all(|&(status, on_page)| status == 200 && on_page),
            "{how:?} round {round} (seed {seed:#x}): every request ends on its page: {answers:?}"
        );
        assert_eq!(
            after.limit_refusals - before.limit_refusals,
            0,
            "{how:?} round {round} (seed {seed:#x}): Qlik refused nothing"
        );
        made.push(after.sessions_created - before.sessions_created);
        assert_eq!(
            sim.live_sessions("CORP\\straggler"),
            1,
            "{how:?} round {round} (seed {seed:#x}): one live session in Qlik; sessions made per round so far: {made:?}"
        );
    }
    assert!(
        made.iter().all(|&m| m == 1),
        "{how:?}: one session made per burst, every round: {made:?}"
    );
    let c = &session_guard(&guard).counters;
    let answered = c
        .stragglers_answered
        .load(std::sync::atomic::Ordering::Relaxed);
    let held = c.bursts_held.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{how:?}: {rounds} bursts, {held} requests held, {answered} late login steps answered by the guard");
    if let Death::InQlik = how {
        // The schedules do put requests after the first login: the case this file is for.
        assert!(answered > 0, "no late login step in {rounds} bursts");
    }
    guard.shutdown().await;
}

#[tokio::test]
async fn stragglers_of_a_burst_whose_session_qlik_ended_make_no_session() {
    rounds(Death::InQlik, 25).await;
}

#[tokio::test]
async fn stragglers_of_a_burst_after_a_logout_make_no_session() {
    rounds(Death::LoggedOut, 15).await;
}

/// A login step that arrives with the browser's live cookie never reaches Qlik: the guard
/// sends it back to its page with the cookie. A ticket is only taken for a late step of the
/// browser's last login (otherwise it may be a portal logging another user in), and the page
/// it is sent back to is always on this site.
#[tokio::test]
async fn a_login_step_with_a_live_cookie_is_answered_by_the_guard() {
    let sim = sim().await;
    let guard = guard(sim.addr()).await;
    let mut jar = Jar::new();
    let r = browse_windows(guard.addr, "/hub/", &mut jar, "CORP\\late").await;
    assert_eq!(r.status, 200);
    let cookie = cookie_header(&jar);
    let session = jar_get(&jar, "X-Qlik-Session-HTTP").expect("a session cookie");
    let before = sim.counters();

    // The authentication module, with a target the guard never saw: the hub.
    let r = get(
        guard.addr,
        "/internal_windows_authentication/?targetId=0123456789abcdef",
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location").as_deref(), Some("/hub/"));
    assert!(r
        .all("set-cookie")
        .iter()
        .any(|c| c.starts_with(&format!("X-Qlik-Session-HTTP={session}"))));

    // A ticket coming back after the login: back to the page without it.
    let r = get(
        guard.addr,
        "/hub/stream?x=1&qlikTicket=abcdef&y=2",
        &[("cookie", &cookie)],
    )
    .await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location").as_deref(), Some("/hub/stream?x=1&y=2"));

    // A path that a browser reads as another host is never a place to send it.
    for evil in [
        "//evil.example/x?qlikTicket=abc",
        "/\\evil.example/x?qlikTicket=abc",
    ] {
        let r = get(guard.addr, evil, &[("cookie", &cookie)]).await;
        assert_eq!(
            (r.status.as_u16(), r.header("location").as_deref()),
            (302, Some("/hub/")),
            "{evil}"
        );
    }

    let after = sim.counters();
    assert_eq!(
        after.requests, before.requests,
        "none of these reached Qlik"
    );
    assert_eq!(after.sessions_created, before.sessions_created);

    // A POST to the authentication module (a form) is no redirect to answer: it goes on.
    let r = send(
        guard.addr,
        http::Request::post("/internal_windows_authentication/?targetId=x")
            .header("host", "qlik.example.com")
            .header("cookie", &cookie)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_ne!(r.status, 302);
    assert_eq!(sim.counters().requests, after.requests + 1);
    guard.shutdown().await;
}

/// Once the flight's landing is over, a ticket with a live cookie is Qlik's to redeem: the
/// guard does not stand between a portal and its ticket login.
#[tokio::test]
async fn a_ticket_with_a_live_cookie_of_an_older_login_goes_to_qlik() {
    let sim = sim().await;
    let guard = guard_with(&config_text(
        &[sim.addr()],
        "",
        "[sessions]\nburst_wait = \"1s\"\n",
    ))
    .await;
    let mut jar = Jar::new();
    browse_windows(guard.addr, "/hub/", &mut jar, "CORP\\portal").await;
    real_sleep(Duration::from_millis(1_300)).await;
    let before = sim.counters().requests;
    let r = get(
        guard.addr,
        "/hub/?qlikTicket=abcdef",
        &[("cookie", &cookie_header(&jar))],
    )
    .await;
    // The simulator does not know this ticket.
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(sim.counters().requests, before + 1);
    guard.shutdown().await;
}
