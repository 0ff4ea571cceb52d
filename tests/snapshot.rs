//! A restart of the guard does not forget sessions: the snapshot keeps counts exact (a user at
//! the limit before the restart is still at the limit after it) and restores still work.

mod common;

use std::time::Duration;

use common::*;
use qsguard::sim::SimConfig;

fn snapshot_config(sim: std::net::SocketAddr, file: &std::path::Path, extra: &str) -> String {
    config_text(
        &[sim],
        "",
        &format!(
            "[sessions]\non_limit = \"error\"\nsnapshot_file = \"{}\"\n{extra}",
            file.display()
        ),
    )
}

#[tokio::test]
async fn a_user_at_the_limit_is_still_at_the_limit_after_a_restart() {
    let sim = sim().await;
    let dir = TempDir::new("snap");
    let file = dir.join("sessions.json");
    let first = guard_with(&snapshot_config(sim.addr(), &file, "")).await;
    for _ in 0..5 {
        let r = browse_as(first.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\full").await;
        assert_eq!(r.status, 200);
    }
    // And a Windows-auth browser, for a restore after the restart.
    let mut jar = Jar::new();
    browse_windows(first.addr, "/hub/", &mut jar, "CORP\\win").await;
    let g = first.proxy().sessions().unwrap().clone();
    eventually("owner learnt", || g.table.live_count("corp\\win") == 1).await;
    first.shutdown().await;

    let meta = std::fs::metadata(&file).expect("the snapshot was written at shutdown");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "it holds cookie values"
        );
    }

    let second = guard_with(&snapshot_config(sim.addr(), &file, "")).await;
    let g = second.proxy().sessions().unwrap().clone();
    assert_eq!(g.table.live_count("corp\\full"), 5);
    let sixth = browse_as(second.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\full").await;
    assert_eq!(sixth.status, 429, "still at the limit after the restart");
    assert_eq!(sim.counters().limit_refusals, 0, "Qlik never had to refuse");
    // The Windows browser restarts too: its device cookie still finds its session.
    let created = sim.counters().sessions_created;
    let mut restarted = without(&jar, "X-Qlik-Session-HTTP");
    let r = browse_windows(second.addr, "/hub/", &mut restarted, "CORP\\win").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        sim.counters().sessions_created,
        created,
        "restored, not recreated"
    );
    second.shutdown().await;
}

#[tokio::test]
async fn sessions_that_expired_while_the_guard_was_down_are_dropped() {
    let sim = sim_with(SimConfig {
        inactivity_timeout: Duration::from_millis(700),
        ..SimConfig::default()
    })
    .await;
    let dir = TempDir::new("snap-exp");
    let file = dir.join("sessions.json");
    let first = guard_with(&snapshot_config(
        sim.addr(),
        &file,
        "inactivity_timeout = \"700ms\"",
    ))
    .await;
    browse_as(first.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\gone").await;
    first.shutdown().await;
    // Real time: the snapshot dates activity by the wall clock, which tokio's clock cannot move.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = guard_with(&snapshot_config(
        sim.addr(),
        &file,
        "inactivity_timeout = \"700ms\"",
    ))
    .await;
    assert_eq!(second.proxy().sessions().unwrap().table.sizes().0, 0);
    second.shutdown().await;

    // A file that is not a snapshot is refused with a warning; the guard starts anyway.
    std::fs::write(
        &file,
        "{\"version\": 99, \"written_at\": 0, \"sessions\": []}",
    )
    .unwrap();
    let third = guard_with(&snapshot_config(sim.addr(), &file, "")).await;
    assert_eq!(get(third.addr, "/__sim/echo", &[]).await.status, 200);
    third.shutdown().await;
}

#[tokio::test]
async fn sessions_made_behind_the_guards_back_are_counted_at_start() {
    let sim = sim().await;
    // Five sessions of one user made directly on Qlik, while no guard was running.
    for _ in 0..5 {
        browse_as(sim.addr(), "/hdr/hub/", &mut Jar::new(), "CORP\\behind").await;
    }
    let extra = format!(
        "[sessions]\non_limit = \"error\"\n[qps_api]\nurl = \"http://{}\"\n",
        sim.api_addr()
    );
    let guard = guard_with(&config_text(&[sim.addr()], "", &extra)).await;
    let g = guard.proxy().sessions().unwrap().clone();
    eventually("reconciled", || g.table.live_count("corp\\behind") == 5).await;
    let r = browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\behind").await;
    assert_eq!(r.status, 429, "the guard knows the user is at the limit");
    assert_eq!(sim.counters().limit_refusals, 0);
    guard.shutdown().await;
}

#[tokio::test]
async fn reconciliation_asks_every_node_and_keeps_each_session_on_its_node() {
    let (a, b) = (sim().await, sim().await);
    // Three sessions made on node a and two on node b, all behind the guard's back.
    for (node, n) in [(&a, 3), (&b, 2)] {
        for _ in 0..n {
            browse_as(node.addr(), "/hdr/hub/", &mut Jar::new(), "CORP\\twonodes").await;
        }
    }
    // Node a's API from [qps_api].url, node b's from its own qps_api.
    let text = config_text(
        &[a.addr(), b.addr()],
        "",
        &format!(
            "[sessions]\non_limit = \"error\"\n[qps_api]\nurl = \"http://{}\"\n",
            a.api_addr()
        ),
    )
    .replace(
        &format!("url = \"http://{}\"\n", b.addr()),
        &format!(
            "url = \"http://{}\"\nqps_api = \"http://{}\"\n",
            b.addr(),
            b.api_addr()
        ),
    );
    let guard = guard_with(&text).await;
    let g = guard.proxy().sessions().unwrap().clone();
    eventually("both nodes reconciled", || {
        g.table.live_count("corp\\twonodes") == 5
    })
    .await;
    let per_node = |port: u16| {
        g.table
            .all()
            .iter()
            .filter(|s| s.node.as_ref() == format!("127.0.0.1:{port}"))
            .count()
    };
    assert_eq!(per_node(a.addr().port()), 3);
    assert_eq!(per_node(b.addr().port()), 2);
    let r = browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\twonodes").await;
    assert_eq!(r.status, 429, "the user is at the limit across both nodes");
    // Ending one of node b's sessions goes to node b's API.
    let on_b = g
        .table
        .all()
        .into_iter()
        .find(|s| s.node.as_ref() == format!("127.0.0.1:{}", b.addr().port()))
        .unwrap();
    g.end_in_qlik(&on_b).await.unwrap();
    assert_eq!(b.live_sessions("CORP\\twonodes"), 1, "ended on node b");
    assert_eq!(a.live_sessions("CORP\\twonodes"), 3);
    guard.shutdown().await;
}

#[tokio::test]
async fn a_predecessors_last_snapshot_is_merged_not_replacing_what_the_table_knows() {
    let sim = sim().await;
    let dir = TempDir::new("merge");
    let side = dir.join("sessions.handover");
    // The old process: two users, one of whom the new process also knows.
    let old = guard(sim.addr()).await;
    let mut shared = Jar::new();
    browse_as(old.addr, "/hdr/hub/", &mut shared, "CORP\\both").await;
    browse_as(old.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\late").await;
    let new = guard(sim.addr()).await;
    // The new process learnt the shared session (adopted from its cookie) and one of its own.
    browse_as(new.addr, "/hdr/hub/x", &mut shared, "CORP\\both").await;
    browse_as(new.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\mine").await;
    old.proxy()
        .sessions()
        .unwrap()
        .save_snapshot(&side)
        .unwrap();
    let g = new.proxy().sessions().unwrap().clone();
    let (merged, dropped) = g.merge_snapshot(&side).unwrap();
    assert_eq!(
        (merged, dropped),
        (1, 0),
        "the late session added; the shared one known"
    );
    for user in ["corp\\both", "corp\\late", "corp\\mine"] {
        assert_eq!(g.table.live_count(user), 1, "{user}");
    }
    old.shutdown().await;
    new.shutdown().await;
}
