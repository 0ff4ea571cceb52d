//! The binary: check-config and the demo.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{qsguard_bin as qsguard, TempDir};

#[test]
fn check_config_accepts_the_example_and_names_bad_keys() {
    let ok = qsguard()
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/qsguard.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // The example sets the snapshot; under systemd an unset one goes to the state directory,
    // and check-config says where (or that there is none).
    assert!(String::from_utf8_lossy(&ok.stdout)
        .contains("sessions are kept across restarts in /var/lib/qsguard/sessions.json"));

    let dir = TempDir::new("cli");
    let bad = dir.write(
        "bad.toml",
        "[server]\nlisten = \"127.0.0.1:8443\"\nmax_conections = 5\n[[upstream]]\nurl = \"http://127.0.0.1:1\"\n",
    );
    let unset = dir.write(
        "unset.toml",
        "[server]\nlisten = \"127.0.0.1:8443\"\n[[upstream]]\nurl = \"http://127.0.0.1:1\"\n",
    );
    let said = |state: Option<&str>| {
        let mut c = qsguard();
        c.args(["check-config", unset.to_str().unwrap()]);
        match state {
            Some(d) => c.env("STATE_DIRECTORY", d),
            None => c.env_remove("STATE_DIRECTORY"),
        };
        let out = c.output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(said(None).contains("no session snapshot"));
    assert!(said(Some("/var/lib/qsguard"))
        .contains("sessions are kept across restarts in /var/lib/qsguard/sessions.json"));
    let out = qsguard()
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_conections") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn check_config_says_what_a_pair_shares_without_the_password() {
    let dir = TempDir::new("cli-cluster");
    let base = "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[upstream]]\nurl = \"http://127.0.0.1:1\"\n";
    let pair = dir.write(
        "pair.toml",
        format!("{base}[cluster]\nredis_url = \"redis://:hunter2@10.0.0.5:6379/0\"\nname = \"guard-a\"\n"),
    );
    let out = qsguard()
        .args(["check-config", pair.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("cluster: guard `guard-a`"), "{said}");
    assert!(!said.contains("hunter2"), "the store's password: {said}");

    let bad = dir.write(
        "bad.toml",
        format!("{base}[cluster]\nredis_url = \"http://10.0.0.5\"\n"),
    );
    let out = qsguard()
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster.redis_url"), "{err}");
}

/// `qsguard demo` on ephemeral ports (plus `extra` arguments), killed on drop.
struct Demo {
    child: std::process::Child,
    /// The guard's address, from the hub URL the demo prints.
    addr: String,
    /// Kept open: a demo that prints to a closed pipe would fail.
    _stdout: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Demo {
    /// Lets the last log lines out, stops the demo and returns what it wrote to stderr (piped).
    fn stop_and_read_log(&mut self) -> String {
        use std::io::Read;
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .expect("the demo's stderr is piped")
            .read_to_string(&mut err)
            .unwrap();
        common::audit::scan("the demo's log", &err);
        err
    }

    fn start(extra: &[&str], stderr: Stdio) -> Demo {
        let mut child = qsguard()
            .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let started = Instant::now();
        let mut hub = None;
        while started.elapsed() < Duration::from_secs(30) {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(i) = line.find("http://") {
                if line.contains("/hub/") && !line.contains("curl") {
                    hub = Some(line[i..].trim().to_string());
                    break;
                }
            }
        }
        let mut demo = Demo {
            child,
            addr: String::new(),
            _stdout: lines,
        };
        let hub = hub.expect("the demo prints the hub URL");
        demo.addr = hub
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        demo
    }

    /// Writes `request` on a new connection and reads the answer until the guard closes.
    fn exchange(&self, request: &[u8]) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn demo_prints_its_urls_and_serves_the_hub() {
    let demo = Demo::start(&["--log-level", "warn"], Stdio::inherit());
    let out = demo.exchange(b"GET /hub/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    assert!(
        out.starts_with("HTTP/1.1 302"),
        "the hub starts the login dance: {out}"
    );
    assert!(out.contains("internal_windows_authentication"), "{out}");
}

#[test]
fn json_access_log_has_one_line_per_request_and_no_secrets() {
    let mut demo = Demo::start(&["--log-format", "json"], Stdio::piped());
    demo.exchange(
        b"GET /hub/stream?qlikTicket=TICKETSECRET HTTP/1.1\r\nHost: localhost\r\n\
Cookie: X-Qlik-Session-HTTP=COOKIESECRET; qsguard=00112233445566778899aabbccddeeff\r\nConnection: close\r\n\r\n",
    );
    let err = demo.stop_and_read_log();
    assert!(
        !err.contains("COOKIESECRET"),
        "a cookie value was logged: {err}"
    );
    assert!(!err.contains("TICKETSECRET"), "a ticket was logged: {err}");
    let access: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "qsguard::access")
        .collect();
    assert_eq!(access.len(), 1, "{err}");
    let line = &access[0];
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/hub/stream");
    assert!(
        line["status"].is_u64() && line["ms"].is_number() && line["bytes"].is_u64(),
        "{line}"
    );
    assert_eq!(line["upstream"], "sim-node1");
}

#[test]
fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let mut demo = Demo::start(&["--log-format", "text"], Stdio::piped());
    demo.exchange(b"GET /hub/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let err = demo.stop_and_read_log();
    assert!(err.contains("INFO"), "something was logged: {err}");
    assert!(
        !err.contains('\u{1b}'),
        "escape sequences in a log that is not a terminal: {err:?}"
    );
}
