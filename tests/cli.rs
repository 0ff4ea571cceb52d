//! The binary: check-config and the demo.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn qsguard() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qsguard"))
}

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

    let dir = std::env::temp_dir().join(format!("qsguard-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:8443\"\nmax_conections = 5\n[[upstream]]\nurl = \"http://127.0.0.1:1\"\n",
    )
    .unwrap();
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
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_prints_its_urls_and_serves_the_hub() {
    let mut child = qsguard()
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
        .stdout(Stdio::piped())
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
    let hub = hub.expect("the demo prints the hub URL");
    let addr = hub
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    use std::io::{Read, Write};
    s.write_all(b"GET /hub/ HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.1 302"),
        "the hub starts the login dance: {out}"
    );
    assert!(out.contains("internal_windows_authentication"), "{out}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn json_access_log_has_one_line_per_request_and_no_secrets() {
    let mut child = qsguard()
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut addr = None;
    while let Some(Ok(line)) = lines.next() {
        if line.contains("/hub/") && !line.contains("curl") {
            let i = line.find("http://").unwrap();
            addr = Some(line[i + 7..].split('/').next().unwrap().to_string());
            break;
        }
    }
    let addr = addr.expect("demo URL");
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(
        b"GET /hub/stream?qlikTicket=TICKETSECRET HTTP/1.1\r\nHost: localhost\r\n\
Cookie: X-Qlik-Session-HTTP=COOKIESECRET; qsguard=00112233445566778899aabbccddeeff\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let _ = child.wait();
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
