//! A working day of a Qlik site on a compressed clock, played twice from one plan: straight to
//! the simulator, and through the guard (issue 12, "done when"). It reports, side by side,
//! Qlik's refusals, the requests that failed and the sessions Qlik made, and holds the guard to
//! no refusal, no failed request, and far fewer sessions.
//!
//! The day: 8 hours in ticks of 2 minutes, a tick lasting [`TICK`] of real time, so Qlik's
//! 30-minute inactivity timeout is 15 ticks (the simulator and the guard both run with it).
//! 40 users:
//! - 20 office users on Windows authentication and 10 on header authentication: they arrive
//!   in the first hour, load a page (1 to 6 parallel requests, as a page fires them) every 4
//!   to 20 minutes, go to lunch for an hour (their session times out; the first page after
//!   lunch is a reload with a stale cookie), leave in the last hour, some logging out. Some
//!   restart the browser in the morning (the session cookie is gone, the device cookie is
//!   not), some use a second device in the afternoon, some open a private window once;
//! - 3 power users with five devices each, genuinely in use all day, who open a sixth
//!   browser (a private window) in the afternoon;
//! - a wallboard that reloads every tick;
//! - 3 users whose two scripts each call Qlik without a cookie jar on the
//!   header-authentication virtual proxy all day, while the same users browse;
//! - 3 restless users who restart their browser every 40 minutes.
//!
//! Through the guard, the guard is restarted at noon (between two ticks; it reloads its
//! snapshot), as an upgrade or a host reboot would.
//!
//! Every request is checked: a 200 on the page it asked for (a script's call: a 200).
//! Requests of one tick run in parallel; the next tick starts when its time has come and the
//! previous tick's requests are done.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use qsguard::sim::ntlm::{Browser, Scheme};
use qsguard::sim::{SimConfig, Simulator};
use qsguard::Guard;

/// One tick (2 minutes of the day) in real time.
const TICK: Duration = Duration::from_millis(120);
/// 8 hours.
const TICKS: u32 = 240;
/// Qlik's inactivity timeout: 30 minutes = 15 ticks.
const TIMEOUT: Duration = Duration::from_millis(15 * 120);
const LUNCH: u32 = 110;
const NOON: u32 = 120;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % u64::from(hi - lo)) as u32
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Auth {
    Windows,
    Header,
}

/// One thing a user does at a tick.
#[derive(Clone, Debug)]
enum Act {
    /// A page load of `n` parallel requests from browser `b` (the user's jar number).
    Page {
        b: usize,
        n: usize,
    },
    /// The browser is closed and opened again: its session cookie (a browser-session
    /// cookie) is gone, the device cookie (persistent) is not.
    RestartBrowser {
        b: usize,
    },
    /// A private window: a jar of its own, one page, then closed.
    Private,
    Logout {
        b: usize,
    },
    /// A script's `n` calls without cookies (header authentication).
    Calls {
        n: usize,
    },
}

struct User {
    name: String,
    auth: Auth,
    plan: Vec<(u32, Act)>,
}

/// The day's plan, the same for both runs.
fn plan() -> Vec<User> {
    let mut rng = Rng(0x0005_eed0_fda7);
    let mut users = Vec::new();
    let office = |rng: &mut Rng, name: String, auth: Auth| {
        let mut plan = Vec::new();
        let arrive = rng.range(0, 30);
        let back = LUNCH + 30 + rng.range(0, 5);
        let leave = rng.range(210, TICKS);
        let restart = rng.chance(40).then(|| rng.range(arrive + 5, LUNCH));
        let second = rng.chance(30).then(|| rng.range(back, leave));
        let private = rng.chance(20).then(|| rng.range(arrive + 1, leave));
        let mut t = arrive;
        while t < leave {
            if (LUNCH..back).contains(&t) {
                t = back;
                continue;
            }
            plan.push((
                t,
                Act::Page {
                    b: 0,
                    n: rng.range(1, 7) as usize,
                },
            ));
            t += rng.range(2, 11);
        }
        if let Some(r) = restart {
            plan.push((r, Act::RestartBrowser { b: 0 }));
        }
        if let Some(s) = second {
            plan.push((s, Act::Page { b: 1, n: 3 }));
            plan.push((s + 4, Act::Page { b: 1, n: 2 }));
        }
        if let Some(p) = private {
            plan.push((p, Act::Private));
        }
        if rng.chance(50) {
            plan.push((leave, Act::Logout { b: 0 }));
        }
        User { name, auth, plan }
    };
    for i in 0..20 {
        users.push(office(&mut rng, format!("CORP\\win{i}"), Auth::Windows));
    }
    for i in 0..10 {
        users.push(office(&mut rng, format!("CORP\\hdr{i}"), Auth::Header));
    }
    // Power users: five devices in use all day, a sixth browser in the afternoon.
    for i in 0..3 {
        let mut plan = Vec::new();
        for b in 0..5 {
            let mut t = rng.range(0, 10);
            while t < TICKS - 5 {
                plan.push((t, Act::Page { b, n: 2 }));
                t += rng.range(2, 8);
            }
        }
        plan.push((150 + 10 * i, Act::Private));
        users.push(User {
            name: format!("CORP\\power{i}"),
            auth: Auth::Windows,
            plan,
        });
    }
    // The wallboard.
    users.push(User {
        name: "CORP\\wallboard".into(),
        auth: Auth::Windows,
        plan: (0..TICKS).map(|t| (t, Act::Page { b: 0, n: 3 })).collect(),
    });
    // Users with scripts: two scripts each, calling every 1 to 3 ticks, and their browser.
    for i in 0..3 {
        let mut plan = Vec::new();
        for _script in 0..2 {
            let mut t = rng.range(0, 5);
            while t < TICKS {
                plan.push((
                    t,
                    Act::Calls {
                        n: rng.range(1, 4) as usize,
                    },
                ));
                t += rng.range(1, 4);
            }
        }
        let mut t = rng.range(5, 20);
        while t < TICKS {
            plan.push((t, Act::Page { b: 0, n: 4 }));
            t += rng.range(3, 12);
        }
        users.push(User {
            name: format!("CORP\\api{i}"),
            auth: Auth::Header,
            plan,
        });
    }
    // Restless users: a browser restart every 40 minutes.
    for i in 0..3 {
        let mut plan = Vec::new();
        let mut t = rng.range(0, 10);
        while t < TICKS {
            plan.push((t, Act::Page { b: 0, n: 4 }));
            if t % 20 < 4 {
                plan.push((t + 1, Act::RestartBrowser { b: 0 }));
            }
            t += rng.range(2, 6);
        }
        users.push(User {
            name: format!("CORP\\restless{i}"),
            auth: if i == 0 { Auth::Header } else { Auth::Windows },
            plan,
        });
    }
    assert_eq!(users.len(), 40);
    users
}

/// The fewest sessions the day allowed: one per browser per stretch of activity without a
/// pause of Qlik's timeout (a restarted browser keeps its stretch: its session is alive in
/// Qlik), one per private window of a user below the limit, and one per user for their
/// scripts per stretch of calls. Pauses are measured on the run's own clock (`started`: when
/// each tick began), so a loaded machine whose ticks run late is held to what it really did.
fn fewest(users: &[Arc<User>], started: &[Instant]) -> usize {
    let mut n = 0;
    for u in users {
        // A user with five browsers in use is at the limit: a private window goes with one
        // of their sessions (`on_limit = "reuse"`).
        let browsers = u
            .plan
            .iter()
            .filter_map(|(_, a)| match a {
                Act::Page { b, .. } => Some(b + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let mut acts: Vec<&(u32, Act)> = u.plan.iter().collect();
        acts.sort_by_key(|(t, _)| *t);
        let mut last: std::collections::HashMap<Option<usize>, u32> = Default::default();
        for (t, a) in acts {
            let key = match a {
                Act::Page { b, .. } => Some(*b),
                Act::Calls { .. } => None,
                Act::Private => {
                    n += usize::from(browsers < 5);
                    continue;
                }
                Act::RestartBrowser { .. } | Act::Logout { .. } => continue,
            };
            let paused = |l: u32| started[*t as usize] - started[l as usize] >= TIMEOUT;
            if last.get(&key).is_none_or(|&l| paused(l)) {
                n += 1;
            }
            last.insert(key, *t);
        }
    }
    n
}

/// What a run counts.
#[derive(Default)]
struct Tally {
    requests: AtomicUsize,
    failed: AtomicUsize,
    /// The first few failures, for the report.
    examples: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut e = self.examples.lock().unwrap();
        if e.len() < 5 {
            e.push(what);
        }
    }
}

type Jars = Arc<Mutex<Vec<Arc<Mutex<Jar>>>>>;

fn jar_of(jars: &Jars, b: usize) -> Arc<Mutex<Jar>> {
    let mut j = jars.lock().unwrap();
    while j.len() <= b {
        j.push(Arc::new(Mutex::new(Jar::new())));
    }
    j[b].clone()
}

fn prefix(auth: Auth) -> &'static str {
    match auth {
        Auth::Windows => "/",
        Auth::Header => "/hdr/",
    }
}

/// One page load of `n` requests of one browser, sharing its jar. A browser without a session
/// cookie navigates: the page first, then the `n - 1` requests it fires in parallel. One with
/// a cookie (an open page, the cookie perhaps stale) fires all `n` at once, as the hub's
/// requests after a pause do.
async fn page(
    addr: SocketAddr,
    user: &str,
    auth: Auth,
    jar: &Arc<Mutex<Jar>>,
    n: usize,
    tick: u32,
    tally: &Arc<Tally>,
) {
    let navigates = !jar
        .lock()
        .unwrap()
        .iter()
        .any(|(name, _)| name.starts_with("X-Qlik-Session"));
    let mut tasks = Vec::new();
    for i in 0..n {
        if navigates && i == 1 {
            // The page itself has come back: its requests go now.
            for t in tasks.drain(..) {
                let r: Result<(), tokio::task::JoinError> = t.await;
                if let Err(e) = r {
                    tally.fail(format!("{user}: {e}"));
                }
            }
        }
        let (jar, tally, user) = (jar.clone(), tally.clone(), user.to_string());
        tasks.push(tokio::spawn(async move {
            let path = format!("{}hub/t{tick}/r{i}", prefix(auth));
            let browser = (auth == Auth::Windows).then(|| Browser::new(&user, Scheme::Ntlm));
            let extra: Vec<(&str, &str)> = match auth {
                Auth::Header => vec![("hdr-usr", user.as_str())],
                Auth::Windows => vec![],
            };
            tally.requests.fetch_add(1, Ordering::Relaxed);
            let r = Client::plain(addr)
                .link()
                .await
                .browse_shared(&path, &jar, &extra, browser.as_ref(), &mut |_| None)
                .await;
            if r.status != 200 || !r.text().contains(&path) {
                tally.fail(format!("{user} {path}: {}", r.status));
            }
        }));
    }
    for t in tasks {
        if let Err(e) = t.await {
            tally.fail(format!("{user}: {e}"));
        }
    }
}

async fn act(addr: SocketAddr, user: Arc<User>, jars: Jars, a: Act, tick: u32, tally: Arc<Tally>) {
    match a {
        Act::Page { b, n } => {
            let jar = jar_of(&jars, b);
            page(addr, &user.name, user.auth, &jar, n, tick, &tally).await;
        }
        Act::RestartBrowser { b } => {
            let jar = jar_of(&jars, b);
            jar.lock()
                .unwrap()
                .retain(|(name, _)| !name.starts_with("X-Qlik-Session"));
        }
        Act::Private => {
            let jar = Arc::new(Mutex::new(Jar::new()));
            page(addr, &user.name, user.auth, &jar, 1, tick, &tally).await;
        }
        Act::Logout { b } => {
            let jar = jar_of(&jars, b).lock().unwrap().clone();
            let who = (user.auth == Auth::Header).then_some(user.name.as_str());
            tally.requests.fetch_add(1, Ordering::Relaxed);
            let r = logout(addr, prefix(user.auth), &jar, who).await;
            if r.status != 200 {
                tally.fail(format!("{} logout: {}", user.name, r.status));
            }
        }
        Act::Calls { n } => {
            let mut calls = Vec::new();
            for i in 0..n {
                let (tally, name) = (tally.clone(), user.name.clone());
                calls.push(tokio::spawn(async move {
                    tally.requests.fetch_add(1, Ordering::Relaxed);
                    let path = format!("/hdr/api/v1/t{tick}/c{i}");
                    let r = get(addr, &path, &[("hdr-usr", &name)]).await;
                    if r.status != 200 {
                        tally.fail(format!("{name} {path}: {}", r.status));
                    }
                }));
            }
            for c in calls {
                if let Err(e) = c.await {
                    tally.fail(format!("{}: {e}", user.name));
                }
            }
        }
    }
}

/// Where requests go: the simulator, or the guard (which is restarted at noon).
enum Front {
    Straight(SocketAddr),
    Guard {
        guard: Option<Guard>,
        config: String,
    },
}

impl Front {
    fn addr(&self) -> SocketAddr {
        match self {
            Front::Straight(a) => *a,
            Front::Guard { guard, .. } => guard.as_ref().unwrap().addr,
        }
    }
}

struct Report {
    requests: usize,
    failed: usize,
    examples: Vec<String>,
    refusals: u64,
    sessions: u64,
    stretched: u32,
    /// When each tick began.
    started: Vec<Instant>,
}

async fn play(sim: &Simulator, mut front: Front, users: &[Arc<User>]) -> Report {
    let tally = Arc::new(Tally::default());
    let jars: Vec<Jars> = users.iter().map(|_| Jars::default()).collect();
    let start = Instant::now();
    let mut stretched = 0;
    let mut started = Vec::new();
    for tick in 0..TICKS {
        if tick == NOON {
            if let Front::Guard { guard, config } = &mut front {
                guard.take().unwrap().shutdown().await;
                *guard = Some(guard_with(config).await);
            }
        }
        let addr = front.addr();
        started.push(Instant::now());
        let mut tasks = Vec::new();
        for (u, user) in users.iter().enumerate() {
            for (_, a) in user.plan.iter().filter(|(t, _)| *t == tick) {
                tasks.push(tokio::spawn(act(
                    addr,
                    user.clone(),
                    jars[u].clone(),
                    a.clone(),
                    tick,
                    tally.clone(),
                )));
            }
        }
        for t in tasks {
            if let Err(e) = t.await {
                tally.fail(format!("tick {tick}: {e}"));
            }
        }
        let due = start + TICK * (tick + 1);
        let now = Instant::now();
        if now > due {
            stretched += 1;
        } else {
            tokio::time::sleep(due - now).await;
        }
    }
    if let Front::Guard { guard, .. } = front {
        guard.unwrap().shutdown().await;
    }
    let c = sim.counters();
    let examples = tally.examples.lock().unwrap().clone();
    Report {
        requests: tally.requests.load(Ordering::Relaxed),
        failed: tally.failed.load(Ordering::Relaxed),
        examples,
        refusals: c.limit_refusals,
        sessions: c.sessions_created,
        stretched,
        started,
    }
}

fn sim_config() -> SimConfig {
    SimConfig {
        inactivity_timeout: TIMEOUT,
        ..SimConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_day_through_the_guard_has_no_refusal_and_few_sessions() {
    let users: Vec<Arc<User>> = plan().into_iter().map(Arc::new).collect();
    let (straight_sim, guarded_sim) = (sim_with(sim_config()).await, sim_with(sim_config()).await);
    let dir = TempDir::new("day");
    let config = cookieless_reuse(&config_text(
        &[guarded_sim.addr()],
        "",
        &format!(
            "[sessions]\non_limit = \"reuse\"\ninactivity_timeout = \"{}ms\"\nsnapshot_file = \"{}\"\n",
            TIMEOUT.as_millis(),
            dir.join("sessions.json").display()
        ),
    ));
    let guarded = Front::Guard {
        guard: Some(guard_with(&config).await),
        config,
    };
    // One after the other: on two cores, two days at once would stretch each other's ticks.
    let straight = play(&straight_sim, Front::Straight(straight_sim.addr()), &users).await;
    let through = play(&guarded_sim, guarded, &users).await;
    let planned: usize = users.iter().map(|u| u.plan.len()).sum();
    let (fewest_straight, fewest) = (
        fewest(&users, &straight.started),
        fewest(&users, &through.started),
    );
    let table = format!(
        "A working day, 40 users, {planned} planned actions, {TICKS} ticks of 2 minutes ({} ms each)\n\
         | | straight to Qlik | through qsguard |\n\
         | --- | ---: | ---: |\n\
         | requests | {} | {} |\n\
         | Qlik refusals (too many sessions) | {} | {} |\n\
         | failed requests | {} | {} |\n\
         | sessions Qlik made | {} | {} |\n\
         | the fewest the day allowed | {fewest_straight} | {fewest} |\n\
         | ticks that ran late | {} | {} |\n\
         failures straight: {:?}\nfailures through the guard: {:?}",
        TICK.as_millis(),
        straight.requests,
        through.requests,
        straight.refusals,
        through.refusals,
        straight.failed,
        through.failed,
        straight.sessions,
        through.sessions,
        straight.stretched,
        through.stretched,
        straight.examples,
        through.examples,
    );
    eprintln!("{table}");
    // The day is hard enough to matter: straight to Qlik, users are locked out.
    assert!(straight.refusals > 0, "{table}");
    assert_eq!(through.refusals, 0, "{table}");
    assert_eq!(through.failed, 0, "{table}");
    assert!(through.sessions * 3 < straight.sessions, "{table}");
    // And close to the fewest the day allows (a tenth of slack for the moments a compressed
    // clock makes ambiguous: a page at the very tick a session times out).
    assert!(through.sessions as usize <= fewest + fewest / 10, "{table}");
}
