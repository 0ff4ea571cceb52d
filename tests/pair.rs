//! Two guards, one truth (issue 14), end to end: two guards sharing a real `redis-server`,
//! in front of two simulator nodes. Every test asserts on what the simulators saw (the
//! sessions Qlik made, its refusals, cookies it did not know), not only on the guards' view.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::redis::Redis;
use common::*;
use qsguard::session::table::State;
use qsguard::sim::Simulator;
use qsguard::Guard;

/// The config of guard `name` of a pair sharing `redis`, in front of `nodes`.
fn pair_config(nodes: &[SocketAddr], redis: &Redis, name: &str, sessions: &str) -> String {
    pair_config_with(nodes, redis, name, sessions, "")
}

/// [`pair_config`] with more `[cluster]` lines.
fn pair_config_with(
    nodes: &[SocketAddr],
    redis: &Redis,
    name: &str,
    sessions: &str,
    cluster: &str,
) -> String {
    config_text(
        nodes,
        "",
        &format!(
            "[sessions]\n{sessions}\n[cluster]\nredis_url = \"{}\"\nname = \"{name}\"\nkey_prefix = \"qsguard:pair-test:\"\nstore_timeout = \"200ms\"\n{cluster}\n",
            redis.url()
        ),
    )
}

struct Pair {
    sims: [Simulator; 2],
    a: Guard,
    b: Guard,
}

impl Pair {
    async fn start(redis: &Redis, sessions: &str) -> Pair {
        Pair::start_with(redis, sessions, "").await
    }

    async fn start_with(redis: &Redis, sessions: &str, cluster: &str) -> Pair {
        let sims = [sim().await, sim().await];
        let nodes = [sims[0].addr(), sims[1].addr()];
        let a = guard_with(&pair_config_with(
            &nodes, redis, "guard-a", sessions, cluster,
        ))
        .await;
        let b = guard_with(&pair_config_with(
            &nodes, redis, "guard-b", sessions, cluster,
        ))
        .await;
        Pair { sims, a, b }
    }

    fn created(&self) -> u64 {
        self.sims
            .iter()
            .map(|s| s.counters().sessions_created)
            .sum()
    }

    fn live(&self, user: &str) -> usize {
        self.sims.iter().map(|s| s.live_sessions(user)).sum()
    }

    fn refusals(&self) -> u64 {
        self.sims.iter().map(|s| s.counters().limit_refusals).sum()
    }

    fn unknown_cookies(&self) -> u64 {
        self.sims
            .iter()
            .map(|s| s.counters().unknown_cookie_requests)
            .sum()
    }

    fn guard(&self, i: usize) -> &Guard {
        if i.is_multiple_of(2) {
            &self.a
        } else {
            &self.b
        }
    }

    async fn shutdown(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

const COOKIE: &str = "X-Qlik-Session-hdr-HTTP";

#[tokio::test]
async fn a_browser_alternating_between_the_guards_keeps_one_session_on_one_node() {
    let redis = Redis::start().await;
    let pair = Pair::start(&redis, "").await;
    let mut jar = Jar::new();
    assert_eq!(
        browse_as(pair.a.addr, "/hdr/hub/", &mut jar, "CORP\\alt")
            .await
            .status,
        200
    );
    assert_eq!(pair.created(), 1);
    let value = jar_get(&jar, COOKIE).expect("a session cookie");
    // Every other request through B, which has never seen the session: the store tells it
    // whose it is and on which node it lives.
    for i in 0..20 {
        let r = browse_as(
            pair.guard(i).addr,
            &format!("/hdr/hub/{i}"),
            &mut jar,
            "CORP\\alt",
        )
        .await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    assert_eq!(pair.created(), 1, "one session, whichever guard");
    assert_eq!(
        pair.unknown_cookies(),
        0,
        "every request reached the node that knows its cookie"
    );
    assert_eq!(jar_get(&jar, COOKIE).as_deref(), Some(value.as_str()));
    assert_eq!(session_guard(&pair.b).counters.adopted.load(Relaxed), 1);

    // The browser restarts (its session cookie is gone, its device cookie is not) and comes
    // back through B: its own session is put back, as A would have done.
    let mut restarted = without(&jar, COOKIE);
    let r = browse_as(pair.b.addr, "/hdr/hub/again", &mut restarted, "CORP\\alt").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(jar_get(&restarted, COOKIE).as_deref(), Some(value.as_str()));
    assert_eq!(session_guard(&pair.b).counters.restored.load(Relaxed), 1);
    assert_eq!(pair.created(), 1);
    assert_eq!(pair.refusals(), 0);
    // A dump of the store gives no one a session: no cookie value, no device id, and user
    // names only as the owner of a record, never in a key.
    let dump = redis.dump().await;
    assert!(dump.contains("u:") && dump.contains("s:"), "{dump}");
    assert!(!dump.contains(&value), "{dump}");
    assert!(
        dump.lines()
            .all(|l| !l.split(' ').next().unwrap().to_lowercase().contains("alt")),
        "{dump}"
    );
    common::audit::scan("the cluster store", &dump);
    common::audit::assert_clean();
    pair.shutdown().await;
}

#[tokio::test]
async fn the_limit_holds_across_the_pair_three_through_a_and_two_through_b() {
    let redis = Redis::start().await;
    let pair = Pair::start(&redis, "on_limit = \"error\"").await;
    let mut browsers = Vec::new();
    for i in 0..5 {
        let mut jar = Jar::new();
        let via = if i < 3 { &pair.a } else { &pair.b };
        let r = browse_as(via.addr, "/hdr/hub/", &mut jar, "CORP\\five").await;
        assert_eq!(r.status, 200, "login {i}");
        browsers.push(jar);
    }
    assert_eq!(pair.live("CORP\\five"), 5);
    // Each guard alone has fewer than five: only the store knows the user is at the limit.
    assert_eq!(session_guard(&pair.a).table.live_count("corp\\five"), 3);
    for via in [&pair.a, &pair.b] {
        let mut sixth = Jar::new();
        let page = browse_as(via.addr, "/hdr/hub/", &mut sixth, "CORP\\five").await;
        assert_eq!(page.status, 429, "{}", page.text());
    }
    assert_eq!(pair.live("CORP\\five"), 5);
    assert_eq!(pair.refusals(), 0, "Qlik never had to refuse");
    // The five keep working through either guard.
    for (i, jar) in browsers.iter_mut().enumerate() {
        let r = browse_as(pair.guard(i + 1).addr, "/hdr/hub/", jar, "CORP\\five").await;
        assert_eq!(r.status, 200);
    }
    // A logout through B frees a slot that a new browser takes through A.
    let r = logout(pair.b.addr, "/hdr/", &browsers[0], Some("CORP\\five")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut late = Jar::new();
    let mut status = 0;
    for _ in 0..40 {
        status = browse_as(pair.a.addr, "/hdr/hub/", &mut late, "CORP\\five")
            .await
            .status
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "the slot the logout freed is the pair's");
    assert_eq!(pair.live("CORP\\five"), 5);
    assert_eq!(pair.refusals(), 0);
    pair.shutdown().await;
}

#[tokio::test]
async fn two_hundred_concurrent_logins_through_both_guards_never_pass_the_limit() {
    let redis = Redis::start().await;
    let pair = Pair::start(&redis, "on_limit = \"error\"").await;
    let (a, b) = (pair.a.addr, pair.b.addr);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let user = format!("LOAD\\u{}", i % 20);
        let via = if i % 2 == 0 { a } else { b };
        tasks.push(tokio::spawn(async move {
            let mut jar = Jar::new();
            browse_as(via, &format!("/hdr/hub/{i}"), &mut jar, &user)
                .await
                .status
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let status = t.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
        ok += usize::from(status == 200);
    }
    assert_eq!(pair.refusals(), 0, "Qlik never had to refuse");
    for u in 0..20 {
        let name = format!("LOAD\\u{u}");
        assert_eq!(pair.live(&name), 5, "{name}: ten logins, five slots");
    }
    assert_eq!(ok, 100);
    pair.shutdown().await;
}

/// Requests of `browsers` (each with its live session) through both guards, until `stop`;
/// every answer must be a 200.
async fn keep_browsing(
    guards: [SocketAddr; 2],
    mut browsers: Vec<(String, Jar)>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> usize {
    let mut n = 0;
    while !*stop.borrow() {
        for (user, jar) in browsers.iter_mut() {
            let via = guards[n % 2];
            let r = browse_as(via, &format!("/hdr/hub/{n}"), jar, user).await;
            assert_eq!(r.status, 200, "request {n} through {via}: {}", r.text());
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    n
}

#[tokio::test]
async fn the_store_stopped_and_restarted_mid_load_fails_no_request() {
    let mut redis = Redis::start().await;
    let pair = Pair::start(&redis, "on_limit = \"error\"").await;
    let mut browsers = Vec::new();
    for i in 0..4 {
        let user = format!("CORP\\s{i}");
        let mut jar = Jar::new();
        let r = browse_as(pair.guard(i).addr, "/hdr/hub/", &mut jar, &user).await;
        assert_eq!(r.status, 200);
        browsers.push((user, jar));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(keep_browsing([pair.a.addr, pair.b.addr], browsers, stop_rx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.stop();
    // Both guards notice (a flush a second), say so, and keep serving.
    for g in [&pair.a, &pair.b] {
        let admin = g.admin_addr;
        real_poll_async(
            "readyz says degraded",
            Duration::from_secs(5),
            || async move {
                let r = admin_call(admin, http::Method::GET, "/readyz", None).await;
                (r.status == 200 && r.json()["degraded"] == true).then_some(())
            },
        )
        .await;
    }
    // `qsguard doctor` says so too, and `qsguard sessions` says whose view it lists.
    let admin = qsguard::ops::Admin {
        url: format!("http://{}", pair.a.admin_addr),
        token: None,
    };
    let (report, _) = qsguard::ops::doctor(
        &format!("http://{}", pair.a.addr),
        "/__qsguard/cookie-check",
        Some(&admin),
    )
    .await
    .unwrap();
    common::audit::scan("qsguard doctor", &report);
    assert!(
        report.contains("cluster store") && report.contains("DEGRADED"),
        "{report}"
    );
    let listed = admin.sessions(None).await.unwrap();
    common::audit::scan("qsguard sessions", &listed);
    assert!(listed.contains("guard `guard-a` of a pair"), "{listed}");
    common::audit::assert_clean();
    // New logins while the store is down: decided from each guard's own table.
    let mut fresh = Jar::new();
    assert_eq!(
        browse_as(pair.a.addr, "/hdr/hub/", &mut fresh, "CORP\\down")
            .await
            .status,
        200
    );
    redis.resume().await;
    for g in [&pair.a, &pair.b] {
        let admin = g.admin_addr;
        real_poll_async(
            "readyz says ok again",
            Duration::from_secs(5),
            || async move {
                let r = admin_call(admin, http::Method::GET, "/readyz", None).await;
                (r.json()["degraded"] == false && r.json()["cluster"]["store"] == "ok")
                    .then_some(())
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_tx.send(true).unwrap();
    let served = load.await.expect("no request failed");
    assert!(served > 20, "{served}");
    // The store came back empty: each guard wrote its live sessions to it again, so the
    // pair counts them (the one made while it was down too).
    let store = probe(&redis);
    for user in ["CORP\\s0", "CORP\\s1", "CORP\\s2", "CORP\\s3", "CORP\\down"] {
        let mut counted = 0;
        for _ in 0..100 {
            counted = store.count(user).await.unwrap();
            if counted == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(counted, 1, "{user}");
    }
    for g in [&pair.a, &pair.b] {
        let events = session_guard(g).events();
        use qsguard::diagnostics::events::Kind;
        assert!(events.count(Kind::StoreUnreachable) >= 1);
        assert!(events.count(Kind::StoreBack) >= 1);
    }
    // Each guard says that what it shows is its own view.
    for path in ["/sessions", "/events", "/readyz"] {
        let v = admin_call(pair.b.admin_addr, http::Method::GET, path, None)
            .await
            .json();
        assert_eq!(v["cluster"]["guard"], "guard-b", "{path}: {v}");
        assert!(
            v["cluster"]["shows"]
                .as_str()
                .unwrap()
                .contains("this guard"),
            "{path}"
        );
    }
    let metrics = admin_call(pair.a.admin_addr, http::Method::GET, "/metrics", None)
        .await
        .text();
    assert!(metrics.contains("qsguard_cluster_store_up 1"), "{metrics}");
    assert!(pair.refusals() == 0 && pair.unknown_cookies() == 0);
    pair.shutdown().await;
}

/// A guard of the pair as a process of its own (killed, reloaded and upgraded by signals).
async fn guard_process(dir: &TempDir, nodes: &[SocketAddr], redis: &Redis, name: &str) -> Running {
    let config = dir.write(
        &format!("{name}.toml"),
        pair_config(nodes, redis, name, "on_limit = \"error\""),
    );
    start_qsguard(&config).await
}

/// One request of each browser through `via`; every answer must be a 200.
async fn round(via: SocketAddr, browsers: &mut [(String, Jar)], what: &str) {
    for (i, (user, jar)) in browsers.iter_mut().enumerate() {
        let r = browse_as(via, &format!("/hdr/hub/{i}"), jar, user).await;
        assert_eq!(r.status, 200, "{what}, {user}: {}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_guard_killed_reloaded_or_upgraded_while_the_other_serves() {
    let redis = Redis::start().await;
    let sims = [sim().await, sim().await];
    let nodes = [sims[0].addr(), sims[1].addr()];
    let dir = TempDir::new("pair");
    let a = guard_process(&dir, &nodes, &redis, "guard-a").await;
    let b = guard_process(&dir, &nodes, &redis, "guard-b").await;
    let mut reap = Reap(vec![a.pid, b.pid]);
    let created = || -> u64 { sims.iter().map(|s| s.counters().sessions_created).sum() };

    // Ann has three sessions through A and two through B; four other users one each.
    let mut browsers: Vec<(String, Jar)> = Vec::new();
    for i in 0..5 {
        let mut jar = Jar::new();
        let via = if i < 3 { a.addr } else { b.addr };
        assert_eq!(
            browse_as(via, "/hdr/hub/", &mut jar, "CORP\\ann")
                .await
                .status,
            200
        );
        browsers.push(("CORP\\ann".into(), jar));
    }
    for i in 0..4 {
        let user = format!("CORP\\u{i}");
        let mut jar = Jar::new();
        let via = if i % 2 == 0 { a.addr } else { b.addr };
        assert_eq!(
            browse_as(via, "/hdr/hub/", &mut jar, &user).await.status,
            200
        );
        browsers.push((user, jar));
    }
    assert_eq!(created(), 9);
    round(a.addr, &mut browsers, "through A").await;
    round(b.addr, &mut browsers, "through B").await;

    // A dies without a word while B serves (the same browsers, in other tabs, go on through
    // B all along): the balancer sends everyone to B, which serves every user on their own
    // session, and still counts Ann at the limit.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let through_b = tokio::spawn(keep_browsing([b.addr, b.addr], browsers.clone(), stop_rx));
    tokio::time::sleep(Duration::from_millis(100)).await;
    kill("-KILL", a.pid);
    let _ = exited(a.child).await;
    reap.0.retain(|p| *p != a.pid);
    round(b.addr, &mut browsers, "through B after A died").await;
    stop_tx.send(true).unwrap();
    let served = through_b.await.expect("no request through B failed");
    assert!(served > 9, "the load through B went on: {served}");
    assert_eq!(created(), 9, "no user got a new Qlik session");
    let page = browse_as(b.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\ann").await;
    assert_eq!(page.status, 429, "{}", page.text());

    // A comes back; B is reloaded (SIGHUP) while A serves.
    let a = guard_process(&dir, &nodes, &redis, "guard-a").await;
    reap.0.push(a.pid);
    round(a.addr, &mut browsers, "through the new A").await;
    kill("-HUP", b.pid);
    b.log
        .wait_for("the reload", |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("reloaded"))
        })
        .await;
    round(b.addr, &mut browsers, "through B after its reload").await;

    // A is upgraded (SIGUSR2) while B serves, with requests through A across the switch.
    kill("-USR2", a.pid);
    let mut rounds = 0;
    let handed = loop {
        round(a.addr, &mut browsers, "through A during its upgrade").await;
        round(b.addr, &mut browsers, "through B during A's upgrade").await;
        rounds += 1;
        if let Some(v) = a.log.find(|v| v["new_pid"].is_u64()) {
            break v;
        }
        assert!(rounds < 200, "the upgrade did not finish");
    };
    let new_pid = handed["new_pid"].as_u64().unwrap();
    reap.0.push(new_pid);
    assert!(exited(a.child).await.success());
    round(a.addr, &mut browsers, "through the upgraded A").await;
    assert_eq!(created(), 9, "no user got a new Qlik session");
    let page = browse_as(a.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\ann").await;
    assert_eq!(
        page.status,
        429,
        "Ann is still at the limit: {}",
        page.text()
    );
    let refusals: u64 = sims.iter().map(|s| s.counters().limit_refusals).sum();
    assert_eq!(refusals, 0);

    kill("-TERM", new_pid);
    kill("-TERM", b.pid);
    let _ = exited(b.child).await;
    reap.0.clear();
}

/// Store calls of `guard` so far, but for those of its once-a-second flush.
fn store_calls(guard: &Guard) -> u64 {
    let c = session_guard(guard).cluster().unwrap();
    c.calls.load(Relaxed) - c.flush_calls.load(Relaxed)
}

#[tokio::test]
async fn a_login_costs_two_store_calls_and_a_request_with_a_live_cookie_none() {
    let redis = Redis::start().await;
    let pair = Pair::start(&redis, "").await;
    let mut per_login = 0;
    let mut per_hundred = 0;
    for i in 0..3 {
        let user = format!("CORP\\cost{i}");
        let mut jar = Jar::new();
        let before = store_calls(&pair.a);
        assert_eq!(
            browse_as(pair.a.addr, "/hdr/hub/", &mut jar, &user)
                .await
                .status,
            200
        );
        let after_login =
            real_poll_async("the login's store writes", Duration::from_secs(2), || {
                let n = store_calls(&pair.a);
                async move { (n >= before + 2).then_some(n) }
            })
            .await;
        // What the writer still has to send for the login lands within a few milliseconds.
        tokio::time::sleep(Duration::from_millis(50)).await;
        per_login = per_login.max(store_calls(&pair.a) - before);
        let start = store_calls(&pair.a).max(after_login);
        for j in 0..100 {
            let r = browse_as(pair.a.addr, &format!("/hdr/hub/{j}"), &mut jar, &user).await;
            assert_eq!(r.status, 200);
        }
        per_hundred = per_hundred.max(store_calls(&pair.a) - start);
    }
    eprintln!(
        "store calls: {per_login} per login, {per_hundred} per 100 requests with a live cookie"
    );
    assert_eq!(
        per_login, 2,
        "reserve, and the commit that makes the slot the session"
    );
    assert_eq!(
        per_hundred, 0,
        "the live-cookie path never waits on the store"
    );
    pair.shutdown().await;
}

/// A probe on the pair's store, as a third guard would see it.
fn probe(redis: &Redis) -> qsguard::cluster::store::Store {
    qsguard::cluster::store::Store::new(&qsguard::config::ClusterConfig {
        redis_url: redis.url(),
        name: Some("probe".into()),
        key_prefix: "qsguard:pair-test:".into(),
        store_timeout: Duration::from_millis(500),
        ca_file: None,
        secret_file: None,
    })
    .unwrap()
}

#[tokio::test]
async fn activity_through_one_guard_keeps_a_session_counted_for_the_pair_and_idleness_ends_it() {
    let redis = Redis::start().await;
    let pair = Pair::start(&redis, "inactivity_timeout = \"3s\"").await;
    let store = probe(&redis);
    let (mut busy, mut idle) = (Jar::new(), Jar::new());
    for (jar, user) in [(&mut busy, "CORP\\busy"), (&mut idle, "CORP\\idle")] {
        assert_eq!(
            browse_as(pair.a.addr, "/hdr/hub/", jar, user).await.status,
            200
        );
    }
    real_poll_async("both counted", Duration::from_secs(3), || {
        let store = &store;
        async move {
            (store.count("CORP\\busy").await.ok()? == 1
                && store.count("CORP\\idle").await.ok()? == 1)
                .then_some(())
        }
    })
    .await;
    // B sees the busy session once, then only A for twice the timeout: the store is told,
    // so B counts it too, and B, which let it expire meanwhile, takes it up again (revived)
    // instead of taking it for dead.
    let r = browse_as(pair.b.addr, "/hdr/hub/", &mut busy, "CORP\\busy").await;
    assert_eq!(r.status, 200);
    let value = jar_get(&busy, COOKIE).unwrap();
    let b = session_guard(&pair.b);
    let state = || b.table.get(1, &value).map(|s| s.state());
    assert_eq!(state(), Some(State::Live));
    let start = std::time::Instant::now();
    let mut revived = false;
    while start.elapsed() < Duration::from_secs(6) {
        let r = browse_as(pair.a.addr, "/hdr/hub/", &mut busy, "CORP\\busy").await;
        assert_eq!(r.status, 200);
        if !revived && start.elapsed() > Duration::from_millis(4_200) {
            // Past B's timeout (3 s and the sweep), before its tombstone is gone (3 s more).
            assert_eq!(state(), Some(State::Expired));
            let r = browse_as(pair.b.addr, "/hdr/hub/", &mut busy, "CORP\\busy").await;
            assert_eq!(r.status, 200);
            assert_eq!(state(), Some(State::Live));
            revived = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(revived);
    assert_eq!(pair.created(), 2, "no new session for busy through B");
    assert_eq!(pair.unknown_cookies(), 0);
    assert_eq!(
        store.count("CORP\\busy").await.unwrap(),
        1,
        "kept alive by its activity"
    );
    assert_eq!(
        store.count("CORP\\idle").await.unwrap(),
        0,
        "idle past its timeout"
    );
    pair.shutdown().await;
}

#[tokio::test]
async fn with_the_pairs_secret_a_guard_restores_and_reuses_sessions_it_never_saw() {
    let redis = Redis::start().await;
    let dir = TempDir::new("pair-secret");
    let secret = dir.write(
        "pair.secret",
        "c2VjcmV0IHNoYXJlZCBieSB0aGUgdHdvIGd1YXJkcyBvbmx5IQ==\n",
    );
    let pair = Pair::start_with(
        &redis,
        "on_limit = \"reuse\"",
        &format!("secret_file = \"{}\"", secret.display()),
    )
    .await;

    // A browser's session made through A; the browser restarts (its session cookie gone) and
    // comes back through B, which never saw the session: its own session is put back.
    let mut jar = Jar::new();
    let r = browse_as(pair.a.addr, "/hdr/hub/", &mut jar, "CORP\\far").await;
    assert_eq!(r.status, 200);
    let value = jar_get(&jar, COOKIE).unwrap();
    // The commit is written behind the login: the store has it (with the browser's device)
    // a moment later.
    let store = probe(&redis);
    let key = qsguard::cluster::store::session_key(&value);
    real_poll_async(
        "the session and its device in the store",
        Duration::from_secs(3),
        || {
            let (store, key) = (&store, &key);
            async move {
                let r = store.lookup(key).await.ok()??;
                (!r.devices.is_empty() && r.sealed.is_some()).then_some(())
            }
        },
    )
    .await;
    let mut restarted = without(&jar, COOKIE);
    let r = browse_as(pair.b.addr, "/hdr/hub/back", &mut restarted, "CORP\\far").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        session_guard(&pair.b).counters.restored.load(Relaxed),
        1,
        "restored through B"
    );
    assert_eq!(jar_get(&restarted, COOKIE).as_deref(), Some(value.as_str()));
    assert_eq!(pair.created(), 1, "no second session");

    // Five scripts of one user through A; a sixth through B at the limit goes with one of
    // the five (reuse), which B had never seen.
    for _ in 0..5 {
        let r = browse_as(pair.a.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\bot").await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(pair.live("CORP\\bot"), 5);
    real_poll_async(
        "the five in the store, sealed",
        Duration::from_secs(3),
        || {
            let store = &store;
            async move {
                let found = store.user_sessions("CORP\\bot").await.ok()?;
                (found.iter().filter(|(_, r)| r.sealed.is_some()).count() == 5).then_some(())
            }
        },
    )
    .await;
    let r = browse_as(pair.b.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\bot").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(session_guard(&pair.b).counters.reused.load(Relaxed), 1);
    assert_eq!(pair.live("CORP\\bot"), 5);
    assert_eq!(pair.refusals(), 0);

    // A link of a device to Far's session written into the store by an intruder (without
    // the tag only a guard can make) leads nowhere; the link A made does.
    let c = session_guard(&pair.b).cluster().unwrap();
    let real: u128 = u128::from_str_radix(
        jar_get(&jar, "qsguard").unwrap().split('.').next().unwrap(),
        16,
    )
    .unwrap();
    assert_eq!(c.device_sessions(real).await.len(), 1);
    let forged = qsguard::cluster::store::device_key(0xdead_beef);
    redis
        .cmd(&["SADD", &format!("qsguard:pair-test:d:{forged}"), &key])
        .await;
    redis
        .cmd(&[
            "HSET",
            &format!("qsguard:pair-test:s:{key}"),
            &format!("d:{forged}"),
            "1",
        ])
        .await;
    assert!(c.device_sessions(0xdead_beef).await.is_empty());

    // The store holds the values sealed only.
    let dump = redis.dump().await;
    assert!(!dump.contains(&value), "{dump}");
    common::audit::scan("the cluster store", &dump);
    common::audit::assert_clean();
    pair.shutdown().await;
}

#[tokio::test]
async fn evict_at_the_pairs_limit_ends_one_of_this_guards_sessions_for_the_sixth() {
    let redis = Redis::start().await;
    let pair = Pair::start(&redis, "on_limit = \"evict\"").await;
    for i in 0..5 {
        let via = if i < 3 { pair.a.addr } else { pair.b.addr };
        let r = browse_as(via, "/hdr/hub/", &mut Jar::new(), "CORP\\ev").await;
        assert_eq!(r.status, 200, "login {i}");
    }
    assert_eq!(pair.live("CORP\\ev"), 5);
    // B alone has two: only the store knows the user is at the limit, and B ends the least
    // recently active of its own before the sixth goes to Qlik.
    let r = browse_as(pair.b.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\ev").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(session_guard(&pair.b).counters.evicted.load(Relaxed), 1);
    assert_eq!(pair.live("CORP\\ev"), 5, "one ended for the sixth");
    assert_eq!(pair.created(), 6);
    assert_eq!(pair.refusals(), 0);
    pair.shutdown().await;
}
