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
