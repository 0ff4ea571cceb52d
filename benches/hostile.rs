//! A million hostile requests through a guard to the simulator, in one process: memory (RSS)
//! and the guard's table sizes must level off at their caps, not grow with the requests.
//! Not a Criterion bench (`harness = false`): a program that prints a line every 100k
//! requests.
//!
//! ```sh
//! cargo bench --bench hostile                 # 1,000,000 requests, 32 connections
//! cargo bench --bench hostile -- 200000 16    # requests, connections
//! ```
//!
//! Four kinds of request, in turn, each from nobody the guard knows:
//!
//! 1. a made-up session cookie and a made-up device cookie on the central proxy (Windows
//!    login): Qlik sends the browser to log in, so each opens a login dance (a flight);
//! 2. a made-up device cookie, no session cookie: the same, without the session cookie;
//! 3. a cookie-less login on the header-authentication proxy, as one of 2000 users: Qlik makes
//!    a session (up to its limit of 5 per user), the guard remembers a new device each time;
//! 4. a made-up session cookie and device cookie with a valid identity header: Qlik replaces
//!    the cookie, the guard remembers the made-up value as dead (a tombstone, kept for at most
//!    5 minutes).
//!
//! The guard runs with its default caps (`sessions.max_devices = 100000`,
//! `sessions.max_flights = 10000`). RSS is the whole process: guard, simulator and clients.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use qsguard::sim::{SimConfig, Simulator};
use qsguard::{Config, Guard};
use tokio::net::TcpStream;

const USERS: u64 = 2000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn hex128() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn request(i: u64) -> http::Request<Empty<Bytes>> {
    let b = http::Request::get(format!(
        "/{}hub/{}",
        if i % 4 >= 2 { "hdr/" } else { "" },
        i % 997
    ))
    .header("host", "qlik.example.com")
    .header("user-agent", "hostile-bench");
    let b = match i % 4 {
        0 => b.header(
            "cookie",
            format!("X-Qlik-Session-HTTP={}; qsguard={}", hex128(), hex128()),
        ),
        1 => b.header("cookie", format!("qsguard={}", hex128())),
        2 => b.header(
            "hdr-usr",
            format!("BENCH\\u{}", rand::random::<u64>() % USERS),
        ),
        _ => b
            .header(
                "hdr-usr",
                format!("BENCH\\u{}", rand::random::<u64>() % USERS),
            )
            .header(
                "cookie",
                format!("X-Qlik-Session-hdr-HTTP={}; qsguard={}", hex128(), hex128()),
            ),
    };
    b.body(Empty::new()).unwrap()
}

async fn connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the guard");
    tcp.set_nodelay(true).ok();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    sender
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .filter_map(|a| a.parse().ok())
        .collect();
    let total = args.first().copied().unwrap_or(1_000_000);
    let conns = args.get(1).copied().unwrap_or(32);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(total, conns));
}

async fn run(total: u64, conns: u64) {
    let sim = Simulator::start(SimConfig::default(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("simulator starts");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [log]\nrequests = false\n\
         [[upstream]]\nurl = \"http://{}\"\n\
         [[virtual_proxy]]\nprefix = \"\"\nsession_cookie = \"X-Qlik-Session-HTTP\"\n\
         [[virtual_proxy]]\nprefix = \"hdr\"\nsession_cookie = \"X-Qlik-Session-hdr-HTTP\"\nidentity_header = \"hdr-usr\"\n",
        sim.addr()
    );
    let guard = Guard::start(Config::parse(&text).expect("bench config"))
        .await
        .expect("guard starts");
    let g = guard.proxy().sessions().expect("session guard on").clone();
    let addr = guard.addr;

    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    println!(
        "hostile bench: {total} requests over {conns} keep-alive connections; caps: sessions.max_devices = 100000, sessions.max_flights = 10000"
    );
    println!(
        "{:>9} {:>8} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>9} {:>7}",
        "requests",
        "secs",
        "RSS MiB",
        "sessions",
        "users",
        "devices",
        "flights",
        "targets",
        "tgt KiB",
        "errors"
    );
    let report = |n: u64| {
        let (sessions, users, devices) = g.table.sizes();
        let (targets, bytes) = g.flight_targets();
        println!(
            "{:>9} {:>8.1} {:>9.1} {:>9} {:>7} {:>8} {:>8} {:>8} {:>9.1} {:>7}",
            n,
            started.elapsed().as_secs_f64(),
            rss_kib() as f64 / 1024.0,
            sessions,
            users,
            devices,
            g.flights_open(),
            targets,
            bytes as f64 / 1024.0,
            failed.load(Ordering::Relaxed)
        );
    };
    report(0);
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (next, done, failed) = (next.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return;
                }
                if sender.ready().await.is_err() {
                    sender = connect(addr).await;
                }
                match sender.send_request(request(i)).await {
                    Ok(resp) => {
                        let ok = resp.status().as_u16() < 500;
                        let _ = resp.into_body().collect().await;
                        if !ok {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        sender = connect(addr).await;
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut reported = 0;
    while reported < total {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = done.load(Ordering::Relaxed);
        if n >= reported + 100_000 {
            reported = n - n % 100_000;
            report(n);
        }
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    if reported < total {
        report(done.load(Ordering::Relaxed));
    }
    guard.shutdown().await;
    sim.stop().await;
}
