//! Zero-downtime upgrade, with real processes: a running qsguard gets SIGUSR2, starts the
//! binary again on its listening sockets, and stops once the new process serves. Clients
//! keep sending requests (each on a new connection) across the switch: not one may be
//! refused or fail, and the new process knows every session the old one had.

mod common;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// The log lines a qsguard process (and the process it hands over to, which inherits its
/// stderr) writes, collected as they come.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<serde_json::Value>>>);

impl Log {
    fn follow(&self, stderr: std::process::ChildStderr) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    lines.lock().unwrap().push(v);
                } else {
                    eprintln!("{line}");
                }
            }
        });
    }

    fn find(&self, f: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        self.0.lock().unwrap().iter().find(|v| f(v)).cloned()
    }

    async fn wait_for(
        &self,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        for _ in 0..600 {
            if let Some(v) = self.find(&f) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no log line for {what}: {:?}", self.0.lock().unwrap());
    }
}

/// Live sessions in a `GET /sessions` answer.
fn live(v: &serde_json::Value) -> u64 {
    v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["live"].as_u64().unwrap())
        .sum()
}

/// Kills the processes a test started if it ends early (a failed assertion), so that no
/// qsguard outlives the test run.
struct Reap(Vec<u64>);

impl Drop for Reap {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A directory of its own with the config `config(dir)` in it as qsguard.toml; returns the
/// directory and the file.
fn config_dir(
    tag: &str,
    config: impl FnOnce(&std::path::Path) -> String,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "qsguard-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("qsguard.toml");
    std::fs::write(&file, config(&dir)).unwrap();
    (dir, file)
}

/// A qsguard process started on `config`, once it listens: the process, its log, its PID
/// and its main and admin addresses.
async fn start(
    config: &std::path::Path,
) -> (
    std::process::Child,
    Log,
    u64,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qsguard"))
        .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::default();
    log.follow(child.stderr.take().unwrap());
    let up = log
        .wait_for("listening", |v| v["message"] == "qsguard listening")
        .await;
    let addr = |key: &str| up[key].as_str().unwrap().parse().unwrap();
    let pid = u64::from(child.id());
    (child, log, pid, addr("addr"), addr("admin_addr"))
}

fn kill(signal: &str, pid: u64) {
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_takes_over_the_listeners_with_no_refused_connection() {
    let sim = sim().await;
    let (dir, config) = config_dir("upgrade", |dir| {
        config_text(
            &[sim.addr()],
            "",
            &format!(
                "[sessions]\nsnapshot_file = \"{}\"\n",
                dir.join("sessions.json").display()
            ),
        )
    });
    let (mut old, log, old_pid, addr, admin) = start(&config).await;
    let mut reap = Reap(vec![old_pid]);

    // Users with sessions, browsing on fresh connections all through the switch.
    let (stop, failed, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let users: Vec<_> = (0..4)
        .map(|i| {
            let (stop, failed, done) = (stop.clone(), failed.clone(), done.clone());
            tokio::spawn(async move {
                let user = format!("CORP\\up{i}");
                let mut jar = Jar::new();
                while !stop.load(Ordering::Relaxed) {
                    let (j, u) = (jar.clone(), user.clone());
                    let r = tokio::spawn(async move {
                        let mut j = j;
                        let r = browse_as(addr, "/hdr/hub/x", &mut j, &u).await;
                        (r.status, j)
                    })
                    .await;
                    match r {
                        Ok((s, j)) if s == 200 => jar = j,
                        other => {
                            eprintln!("{user}: {:?}", other.map(|(s, _)| s));
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    eventually("load running", || done.load(Ordering::Relaxed) >= 40).await;
    let before = get(admin, "/sessions", &[]).await.json();
    let sessions_before = live(&before);
    assert_eq!(sessions_before, 4, "{before}");
    let created_before = sim.counters().sessions_created;

    let at_signal = done.load(Ordering::Relaxed);
    kill("-USR2", old_pid);
    let handed = log
        .wait_for("the new process serves", |v| v["new_pid"].is_u64())
        .await;
    let new_pid = handed["new_pid"].as_u64().unwrap();
    reap.0.push(new_pid);
    assert_ne!(new_pid, old_pid);
    // The old process finishes and exits by itself.
    let exited = tokio::task::spawn_blocking(move || old.wait().unwrap())
        .await
        .unwrap();
    assert!(exited.success(), "the old process ends cleanly: {exited:?}");
    let mark = done.load(Ordering::Relaxed);
    eprintln!("requests during the switch: {}", mark - at_signal);
    assert!(mark > at_signal + 4, "the load went on during the switch");
    eventually("load on the new process", || {
        done.load(Ordering::Relaxed) >= mark + 40
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for u in users {
        u.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
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
    let health = get(admin, "/healthz", &[]).await.json();
    assert_eq!(health["pid"].as_u64(), Some(new_pid), "{health}");
    let after = get(admin, "/sessions", &[]).await.json();
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
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_binary_that_cannot_start_leaves_the_old_one_serving() {
    let sim = sim().await;
    let (dir, config) = config_dir("upgrade-bad", |_| config_text(&[sim.addr()], "", ""));
    let (mut old, log, pid, addr, _) = start(&config).await;
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
    let exited = tokio::task::spawn_blocking(move || old.wait().unwrap())
        .await
        .unwrap();
    assert!(exited.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_and_a_bad_one_is_refused() {
    let (a, b) = (sim().await, sim().await);
    let (dir, config) = config_dir("sighup", |_| config_text(&[a.addr()], "", ""));
    let (mut guard, log, pid, _, admin) = start(&config).await;
    let _reap = Reap(vec![pid]);
    let nodes = |v: serde_json::Value| v["upstreams"].as_array().unwrap().len();
    assert_eq!(nodes(get(admin, "/upstreams", &[]).await.json()), 1);

    std::fs::write(&config, config_text(&[a.addr(), b.addr()], "", "")).unwrap();
    kill("-HUP", pid);
    log.wait_for("the reload", |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("config reloaded (SIGHUP)"))
    })
    .await;
    assert_eq!(nodes(get(admin, "/upstreams", &[]).await.json()), 2);

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
        nodes(get(admin, "/upstreams", &[]).await.json()),
        2,
        "still serving as before"
    );
    kill("-TERM", pid);
    let exited = tokio::task::spawn_blocking(move || guard.wait().unwrap())
        .await
        .unwrap();
    assert!(exited.success());
    let _ = std::fs::remove_dir_all(&dir);
}
