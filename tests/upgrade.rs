//! Zero-downtime upgrade, with real processes: a running qsguard gets SIGUSR2, starts the
//! binary again on its listening sockets, and stops once the new process serves. Clients
//! keep sending requests (each on a new connection) across the switch: not one may be
//! refused or fail, and the new process knows every session the old one had.

mod common;

use common::*;

/// Live sessions in a `GET /sessions` answer.
fn live(v: &serde_json::Value) -> u64 {
    v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["live"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_takes_over_the_listeners_with_no_refused_connection() {
    let sim = sim().await;
    let dir = TempDir::new("upgrade");
    let config = dir.write(
        "qsguard.toml",
        config_text(
            &[sim.addr()],
            "",
            &format!(
                "[sessions]\nsnapshot_file = \"{}\"\n",
                dir.join("sessions.json").display()
            ),
        ),
    );
    let Running {
        child: old,
        log,
        pid: old_pid,
        addr,
        admin,
    } = start_qsguard(&config).await;
    let mut reap = Reap(vec![old_pid]);

    // Users with sessions, browsing on fresh connections all through the switch.
    let mut load = Load::default();
    load.users(addr, 4, "up");
    load.reaches("load running", 40).await;
    let before = get(admin, "/sessions", &[("host", "localhost")])
        .await
        .json();
    let sessions_before = live(&before);
    assert_eq!(sessions_before, 4, "{before}");
    let created_before = sim.counters().sessions_created;

    let at_signal = load.done();
    kill("-USR2", old_pid);
    let handed = log
        .wait_for("the new process serves", |v| v["new_pid"].is_u64())
        .await;
    let new_pid = handed["new_pid"].as_u64().unwrap();
    reap.0.push(new_pid);
    assert_ne!(new_pid, old_pid);
    // The old process finishes and exits by itself.
    let status = exited(old).await;
    assert!(status.success(), "the old process ends cleanly: {status:?}");
    let mark = load.done();
    eprintln!("requests during the switch: {}", mark - at_signal);
    assert!(mark > at_signal + 4, "the load went on during the switch");
    load.reaches("load on the new process", mark + 40).await;
    assert_eq!(
        load.stop().await,
        0,
        "no request failed or was refused during the switch"
    );

    // The old process's last word (its final snapshot, written to the side file) is merged
    // by the new one once the old one is gone, and the side file removed.
    log.wait_for("the merge", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("after the handover merged"))
    })
    .await;
    assert!(!dir.join("sessions.handover").exists());
    // The new process serves on the same ports and knows every session.
    let health = get(admin, "/healthz", &[("host", "localhost")])
        .await
        .json();
    assert_eq!(health["pid"].as_u64(), Some(new_pid), "{health}");
    let after = get(admin, "/sessions", &[("host", "localhost")])
        .await
        .json();
    assert_eq!(live(&after), sessions_before, "{after}");
    assert_eq!(
        sim.counters().sessions_created,
        created_before,
        "no user got a new Qlik session"
    );

    kill("-TERM", new_pid);
    eventually("the new process stopped", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    reap.0.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_binary_that_cannot_start_leaves_the_old_one_serving() {
    let sim = sim().await;
    let dir = TempDir::new("upgrade-bad");
    let config = dir.write("qsguard.toml", config_text(&[sim.addr()], "", ""));
    let Running {
        child: old,
        log,
        pid,
        addr,
        ..
    } = start_qsguard(&config).await;
    let _reap = Reap(vec![pid]);
    // The new process reads the config file again: broken, it cannot start.
    std::fs::write(&config, "[server]\nlisten = 7\n").unwrap();
    kill("-USR2", pid);
    log.wait_for("the failed upgrade", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("upgrade failed"))
    })
    .await;
    let r = get(addr, "/__sim/echo", &[]).await;
    assert_eq!(r.status, 200, "the old process still serves");
    kill("-TERM", pid);
    assert!(exited(old).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_and_a_bad_one_is_refused() {
    let (a, b) = (sim().await, sim().await);
    let dir = TempDir::new("sighup");
    let config = dir.write("qsguard.toml", config_text(&[a.addr()], "", ""));
    let Running {
        child: guard,
        log,
        pid,
        admin,
        ..
    } = start_qsguard(&config).await;
    let _reap = Reap(vec![pid]);
    let nodes = |v: serde_json::Value| v["upstreams"].as_array().unwrap().len();
    assert_eq!(
        nodes(
            get(admin, "/upstreams", &[("host", "localhost")])
                .await
                .json()
        ),
        1
    );

    std::fs::write(&config, config_text(&[a.addr(), b.addr()], "", "")).unwrap();
    kill("-HUP", pid);
    log.wait_for("the reload", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("config reloaded (SIGHUP)"))
    })
    .await;
    assert_eq!(
        nodes(
            get(admin, "/upstreams", &[("host", "localhost")])
                .await
                .json()
        ),
        2
    );

    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = \"many\"\n",
    )
    .unwrap();
    kill("-HUP", pid);
    let refused = log
        .wait_for("the refusal", |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("reload refused"))
        })
        .await;
    assert!(
        refused["message"].as_str().unwrap().contains("workers"),
        "{refused}"
    );
    assert_eq!(
        nodes(
            get(admin, "/upstreams", &[("host", "localhost")])
                .await
                .json()
        ),
        2,
        "still serving as before"
    );
    kill("-TERM", pid);
    assert!(exited(guard).await.success());
}
