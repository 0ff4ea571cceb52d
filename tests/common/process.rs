//! qsguard as a process: the binary cargo built for this test run, its JSON log as it comes,
//! signals, and a guard against leftover processes.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A command for the qsguard binary of this build.
pub fn qsguard_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qsguard"))
}

/// Runs the binary with `args` to its end (off the runtime's threads) and returns its output.
pub async fn qsguard_output(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || qsguard_bin().args(args).output().unwrap())
        .await
        .unwrap()
}

/// The log lines a qsguard process (and the process it hands over to, which inherits its
/// stderr) writes, collected as they come.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<serde_json::Value>>>);

impl Log {
    pub fn follow(&self, stderr: std::process::ChildStderr) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                super::audit::scan("a qsguard process's log", &line);
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    lines.lock().unwrap().push(v);
                } else {
                    eprintln!("{line}");
                }
            }
        });
    }

    pub fn find(&self, f: impl Fn(&serde_json::Value) -> bool) -> Option<serde_json::Value> {
        self.0.lock().unwrap().iter().find(|v| f(v)).cloned()
    }

    /// Waits (up to 30 s) for a line that `f` accepts.
    pub async fn wait_for(
        &self,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        super::try_poll_for(Duration::from_secs(30), || self.find(&f))
            .await
            .unwrap_or_else(|| panic!("no log line for {what}: {:?}", self.0.lock().unwrap()))
    }

    /// Whether a line whose message starts with `start` was written.
    pub fn says(&self, start: &str) -> bool {
        self.find(|v| v["message"].as_str().is_some_and(|m| m.starts_with(start)))
            .is_some()
    }
}

/// Kills the processes a test started if it ends early (a failed assertion), so that no
/// qsguard outlives the test run.
pub struct Reap(pub Vec<u64>);

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

/// A qsguard process started on a config file, once it listens.
pub struct Running {
    pub child: Child,
    pub log: Log,
    pub pid: u64,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

/// Starts `qsguard --config <config> --log-format json` and waits until it listens.
pub async fn start_qsguard(config: &Path) -> Running {
    let mut child = qsguard_bin()
        .args(["--config", config.to_str().unwrap(), "--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Log::default();
    log.follow(child.stderr.take().unwrap());
    let pid = u64::from(child.id());
    let reap = Reap(vec![pid]);
    let up = log
        .wait_for("listening", |v| v["message"] == "qsguard listening")
        .await;
    std::mem::forget(reap);
    let addr = |key: &str| up[key].as_str().unwrap().parse().unwrap();
    Running {
        child,
        log,
        pid,
        addr: addr("addr"),
        admin: addr("admin_addr"),
    }
}

/// Sends `signal` (as `kill` spells it: `-TERM`, `-USR2`...) to `pid`.
pub fn kill(signal: &str, pid: u64) {
    let ok = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal} {pid}");
}

/// Waits (off the runtime's threads) for the process to exit.
pub async fn exited(mut child: Child) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap()
}

/// What a finished command printed: its stdout, then its stderr.
pub fn output_text(out: &Output) -> String {
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    super::audit::scan("a qsguard command's output", &text);
    super::audit::assert_clean();
    text
}
