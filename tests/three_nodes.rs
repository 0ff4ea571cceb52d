//! Three Qlik nodes behind the guard: balance and affinity for requests and engine
//! WebSockets, a node killed while users work (only its users notice), and a node that is
//! unreachable for a while with `sessions.on_node_down = "error"` (its users see the error
//! page and get their own session back when it returns).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use qsguard::sim::Simulator;

fn nodes_config(nodes: &[SocketAddr], extra: &str) -> String {
    config_text(
        nodes,
        "",
        &format!(
            "[health]\ninterval = \"100ms\"\ntimeout = \"300ms\"\nfall = 2\nrise = 2\n{extra}"
        ),
    )
}

fn name(sim: &Simulator) -> String {
    format!("127.0.0.1:{}", sim.addr().port())
}

/// The node the guard keeps `user`'s live session on.
fn node_of(guard: &qsguard::Guard, user: &str) -> String {
    let g = guard.proxy().sessions().unwrap();
    let now = g.table.now_ms();
    g.table
        .all()
        .into_iter()
        .find(|s| {
            g.table.is_live(s, now)
                && s.owner()
                    .is_some_and(|o| o.to_string().eq_ignore_ascii_case(user))
        })
        .map(|s| s.node.to_string())
        .unwrap_or_else(|| panic!("{user} has no live session"))
}

#[tokio::test]
async fn three_nodes_balance_new_sessions_and_keep_requests_and_websockets_on_their_node() {
    let sims = [sim().await, sim().await, sim().await];
    let addrs: Vec<_> = sims.iter().map(|s| s.addr()).collect();
    let guard = guard_with(&nodes_config(&addrs, "")).await;
    let mut jars = Vec::new();
    for i in 0..9 {
        let mut jar = Jar::new();
        let user = format!("CORP\\t{i}");
        assert_eq!(
            browse_as(guard.addr, "/hdr/hub/", &mut jar, &user)
                .await
                .status,
            200
        );
        jars.push((user, jar));
    }
    for s in &sims {
        assert_eq!(s.counters().sessions_created, 3, "three sessions per node");
    }
    for (user, jar) in jars.iter_mut() {
        for _ in 0..3 {
            assert_eq!(
                browse_as(guard.addr, "/hdr/hub/x", jar, user).await.status,
                200
            );
        }
        let mut ws = ws_as(guard.addr, "/hdr/app/x", user, Some(&cookie_header(jar))).await;
        assert!(echoes(&mut ws, "ping").await);
        ws.close(None).await.unwrap();
    }
    for s in &sims {
        let c = s.counters();
        assert_eq!(
            c.sessions_created, 3,
            "no session made by a request on the wrong node"
        );
        assert_eq!(
            c.unknown_cookie_requests, 0,
            "no cookie sent to a node that does not hold it"
        );
        assert_eq!(
            c.websockets_opened, 3,
            "each node had its own users' WebSockets"
        );
    }
    guard.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_load_moves_its_users_to_new_sessions_and_nobody_else_notices() {
    let [a, b, c] = [sim().await, sim().await, sim().await];
    let guard = guard_with(&nodes_config(&[a.addr(), b.addr(), c.addr()], "")).await;
    let addr = guard.addr;
    let users: Vec<String> = (0..9).map(|i| format!("CORP\\k{i}")).collect();
    let mut jars = Vec::new();
    for u in &users {
        let mut jar = Jar::new();
        browse_as(addr, "/hdr/hub/", &mut jar, u).await;
        jars.push(jar);
    }
    let c_name = name(&c);
    let on_c: Vec<String> = users
        .iter()
        .filter(|u| node_of(&guard, u) == c_name)
        .cloned()
        .collect();
    assert_eq!(on_c.len(), 3);
    let created_elsewhere = a.counters().sessions_created + b.counters().sessions_created;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    // Per user: the statuses seen, in order.
    let seen: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let tasks: Vec<_> = users
        .iter()
        .cloned()
        .zip(jars)
        .map(|(user, mut jar)| {
            let (stop, done, seen) = (stop.clone(), done.clone(), seen.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = browse_as(addr, "/hdr/hub/x", &mut jar, &user).await;
                    seen.lock().unwrap().push((user.clone(), r.status.as_u16()));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    eventually("load running", || done.load(Ordering::Relaxed) >= 50).await;
    let killed_at = seen.lock().unwrap().len();
    c.stop().await;
    let g = guard.proxy().clone();
    eventually("node c marked down", || {
        g.upstreams()
            .nodes()
            .iter()
            .any(|n| n.name == c_name && !n.is_up())
    })
    .await;
    let mark = done.load(Ordering::Relaxed);
    eventually("load after the node went", || {
        done.load(Ordering::Relaxed) >= mark + 90
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let seen = seen.lock().unwrap().clone();
    // Nobody on a or b noticed anything.
    let bad: Vec<_> = seen
        .iter()
        .filter(|(u, s)| !on_c.contains(u) && *s != 200)
        .collect();
    assert!(bad.is_empty(), "users on the other nodes saw: {bad:?}");
    // Node c's users saw at most the error page while it was being found down, then got in.
    for u in &on_c {
        let mine: Vec<u16> = seen[killed_at..]
            .iter()
            .filter(|(x, _)| x == u)
            .map(|(_, s)| *s)
            .collect();
        assert!(
            mine.iter().all(|s| [200, 502, 503].contains(s)),
            "{u}: {mine:?}"
        );
        assert_eq!(mine.last(), Some(&200), "{u} got a new session: {mine:?}");
        assert_ne!(node_of(&guard, u), c_name, "{u} is on a live node now");
    }
    assert_eq!(
        a.counters().sessions_created + b.counters().sessions_created,
        created_elsewhere + 3,
        "exactly node c's three users got new sessions"
    );
    let lost = events(&guard, "session_lost");
    assert_eq!(
        lost.len(),
        3,
        "node c's sessions are reported lost, with their users"
    );
    guard.shutdown().await;
}

/// A TCP relay in front of a node that can be cut (the port refuses) and restored (the same
/// port accepts again): a network outage, while the node itself keeps its sessions.
struct Cable {
    addr: SocketAddr,
    target: SocketAddr,
    cut: Arc<tokio::sync::Notify>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Cable {
    async fn new(target: SocketAddr) -> Cable {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = Cable {
            addr,
            target,
            cut: Arc::default(),
            task: None,
        };
        c.serve(l);
        c
    }

    fn serve(&mut self, l: tokio::net::TcpListener) {
        let (target, cut) = (self.target, self.cut.clone());
        self.task = Some(tokio::spawn(async move {
            let mut open = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    r = l.accept() => {
                        let Ok((mut down, _)) = r else { continue };
                        open.spawn(async move {
                            if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                            }
                        });
                    }
                    _ = cut.notified() => return,
                }
            }
        }));
    }

    async fn cut(&mut self) {
        self.cut.notify_one();
        let _ = self.task.take().unwrap().await;
    }

    async fn restore(&mut self) {
        let addr = self.addr;
        let l = poll_async(
            &format!("listening on {addr} again"),
            Duration::from_secs(2),
            || async move { tokio::net::TcpListener::bind(addr).await.ok() },
        )
        .await;
        self.serve(l);
    }
}

#[tokio::test]
async fn with_on_node_down_error_the_users_of_an_unreachable_node_wait_and_keep_their_session() {
    let (a, b) = (sim().await, sim().await);
    let mut cable = Cable::new(b.addr()).await;
    let guard = guard_with(&nodes_config(
        &[a.addr(), cable.addr],
        "[sessions]\non_node_down = \"error\"\n",
    ))
    .await;
    let mut jars = Vec::new();
    for i in 0..4 {
        let mut jar = Jar::new();
        let user = format!("CORP\\e{i}");
        browse_as(guard.addr, "/hdr/hub/", &mut jar, &user).await;
        jars.push((user, jar));
    }
    let b_name = format!("127.0.0.1:{}", cable.addr.port());
    let (on_b, on_a): (Vec<_>, Vec<_>) = jars
        .into_iter()
        .partition(|(u, _)| node_of(&guard, u) == b_name);
    assert_eq!(on_b.len(), 2);

    cable.cut().await;
    let g = guard.proxy().clone();
    eventually("node b marked down", || {
        g.upstreams()
            .nodes()
            .iter()
            .any(|n| n.name == b_name && !n.is_up())
    })
    .await;
    for (user, jar) in on_b.iter().cloned() {
        let mut jar = jar;
        let r = browse_as(guard.addr, "/hdr/hub/x", &mut jar, &user).await;
        assert_eq!(r.status, 503, "{user} sees the error page");
        assert!(r.text().contains("holds this session"), "{}", r.text());
        assert_eq!(r.header("retry-after").as_deref(), Some("30"));
    }
    for (user, jar) in on_a.iter().cloned() {
        let mut jar = jar;
        assert_eq!(
            browse_as(guard.addr, "/hdr/hub/x", &mut jar, &user)
                .await
                .status,
            200
        );
    }
    assert_eq!(
        a.counters().sessions_created,
        2,
        "nobody was moved to node a"
    );
    assert!(
        events(&guard, "session_lost").is_empty(),
        "the sessions are kept"
    );

    // The cable is back: the same sessions go on, on node b.
    cable.restore().await;
    eventually("node b up again", || {
        g.upstreams().nodes().iter().all(|n| n.is_up())
    })
    .await;
    let created = b.counters().sessions_created;
    for (user, jar) in on_b.iter().cloned() {
        let mut jar = jar;
        assert_eq!(
            browse_as(guard.addr, "/hdr/hub/x", &mut jar, &user)
                .await
                .status,
            200
        );
    }
    assert_eq!(
        b.counters().sessions_created,
        created,
        "their own sessions, not new ones"
    );
    assert_eq!(b.counters().unknown_cookie_requests, 0);
    guard.shutdown().await;
}

#[tokio::test]
async fn when_every_node_is_down_everyone_gets_the_error_page_until_one_is_back() {
    let (a, b) = (sim().await, sim().await);
    let b_addr = b.addr();
    let guard = guard_with(&nodes_config(&[a.addr(), b_addr], "")).await;
    let mut jar = Jar::new();
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\all")
            .await
            .status,
        200
    );
    a.stop().await;
    b.stop().await;
    let g = guard.proxy().clone();
    eventually("both nodes down", || {
        g.upstreams().nodes().iter().all(|n| !n.is_up())
    })
    .await;
    let r = browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\all").await;
    assert_eq!(r.status, 503);
    assert!(
        r.text().contains("Qlik Sense is not reachable right now"),
        "{}",
        r.text()
    );
    let r = browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\new").await;
    assert_eq!(r.status, 503, "a new user too");
    // One node comes back: everyone gets in again.
    let _b = restart_sim(b_addr).await;
    eventually("node b up again", || {
        g.upstreams().nodes().iter().any(|n| n.is_up())
    })
    .await;
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\all")
            .await
            .status,
        200
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn health_checks_count_only_the_expected_answers() {
    let a = sim().await;
    // Qlik answers / with a login redirect: not the 200 this config expects.
    let guard = guard_with(&config_text(
        &[a.addr()],
        "",
        "[health]\ninterval = \"100ms\"\nfall = 2\nrise = 1\nexpect_status = [200]\n",
    ))
    .await;
    let g = guard.proxy().clone();
    eventually("node down on an unexpected answer", || {
        !g.upstreams().nodes()[0].is_up()
    })
    .await;
    let (_, what) = g.upstreams().nodes()[0].last_check().unwrap();
    assert!(what.starts_with("answered "), "{what}");
    guard.shutdown().await;
    // A path that answers 200, or the class of the login redirect: up.
    for health in [
        "path = \"/__sim/echo\"\nexpect_status = [200]",
        "expect_status = [\"3xx\", 401]",
    ] {
        let guard = guard_with(&config_text(
            &[a.addr()],
            "",
            &format!("[health]\ninterval = \"100ms\"\nfall = 1\nrise = 1\n{health}\n"),
        ))
        .await;
        let g = guard.proxy().clone();
        eventually("a check ran", || {
            g.upstreams().nodes()[0].last_check().is_some()
        })
        .await;
        let (_, what) = g.upstreams().nodes()[0].last_check().unwrap();
        assert!(g.upstreams().nodes()[0].is_up(), "{health}: {what}");
        guard.shutdown().await;
    }
}
