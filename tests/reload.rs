//! Reloading the config while the guard serves (`POST /reload`, what SIGHUP does): nodes
//! added and removed under load with no failed request, a removed node kept for its live
//! sessions, the listener moved with open connections and WebSockets untouched, and an
//! invalid config refused while the old one keeps serving.

mod common;

use std::path::PathBuf;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use qsguard::{Config, Guard};

const TOKEN: &str = "reload-token-of-some-length";

/// A config file and the admin token, in a directory of their own.
struct Files {
    dir: TempDir,
    config: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = TempDir::new(tag);
        dir.write("token", TOKEN);
        let config = dir.join("qsguard.toml");
        Files { dir, config }
    }

    /// Writes the config for `nodes` (plus `server_extra` in `[server]`, `extra` at the end).
    fn write(&self, nodes: &[std::net::SocketAddr], server_extra: &str, extra: &str) {
        let text = config_text(
            nodes,
            server_extra,
            &format!("[health]\ninterval = \"200ms\"\nfall = 2\nrise = 1\n{extra}"),
        );
        std::fs::write(
            &self.config,
            with_admin_token(&text, &self.dir.join("token")),
        )
        .unwrap();
    }

    async fn start(&self) -> Guard {
        Guard::start(Config::load(&self.config).unwrap())
            .await
            .unwrap()
    }
}

async fn reload(guard: &Guard) -> Resp {
    admin_call(guard.admin_addr, http::Method::POST, "/reload", Some(TOKEN)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_added_and_removed_by_reload_under_load_with_no_failed_request() {
    let (a, b) = (sim().await, sim().await);
    let files = Files::new("reload-nodes");
    files.write(&[a.addr()], "", "");
    let guard = files.start().await;
    let mut load = Load::default();
    load.users(guard.addr, 6, "a");
    load.reaches("load running", 30).await;

    // Add node b: new sessions now go to it (it has none), the running ones stay on a.
    files.write(&[a.addr(), b.addr()], "", "");
    let r = reload(&guard).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["changes"].as_str().unwrap().contains("nodes:"),
        "{}",
        r.text()
    );
    load.users(guard.addr, 4, "b");
    let mark = load.done();
    load.reaches("more load", mark + 40).await;
    assert!(
        b.counters().sessions_created >= 3,
        "new sessions went to the added node"
    );

    // Take node a out of the config while it holds live sessions: it is retired, not cut.
    files.write(&[b.addr()], "", "");
    let r = reload(&guard).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let up = get(guard.admin_addr, "/upstreams", &[("host", "localhost")])
        .await
        .json();
    let a_name = format!("127.0.0.1:{}", a.addr().port());
    let a_entry = up["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == a_name.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("a is kept while it has sessions: {up}"));
    assert_eq!(a_entry["state"], "retired", "{up}");
    let a_requests = a.counters().requests;
    let mark = load.done();
    load.reaches("load after removing a", mark + 40).await;
    assert!(
        a.counters().requests > a_requests,
        "the removed node keeps serving its sessions"
    );
    let a_created = a.counters().sessions_created;
    for i in 0..4 {
        browse_as(
            guard.addr,
            "/hdr/hub/",
            &mut Jar::new(),
            &format!("CORP\\n{i}"),
        )
        .await;
    }
    assert_eq!(
        a.counters().sessions_created,
        a_created,
        "no new session on a removed node"
    );

    assert_eq!(load.stop().await, 0, "no request failed across the reloads");
    assert_eq!(
        a.counters().unknown_cookie_requests + b.counters().unknown_cookie_requests,
        0,
        "no session cookie was ever sent to a node that does not hold it"
    );

    // Once a's users have logged out, the retired node goes.
    let g = guard.proxy().clone();
    let sessions = g.sessions().unwrap().clone();
    for s in sessions.table.all() {
        if s.node.as_ref() == a_name {
            sessions
                .table
                .end(&s, qsguard::session::table::State::Ended);
        }
    }
    eventually("retired node dropped", || g.upstreams().nodes().len() == 1).await;
    guard.shutdown().await;
}

#[tokio::test]
async fn an_invalid_config_is_refused_and_the_running_one_stays() {
    let a = sim().await;
    let files = Files::new("reload-bad");
    files.write(&[a.addr()], "", "");
    let guard = files.start().await;
    let mut jar = Jar::new();
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\k")
            .await
            .status,
        200
    );

    // An unknown key: refused, naming it.
    let good = std::fs::read_to_string(&files.config).unwrap();
    std::fs::write(
        &files.config,
        good.replace("[health]\n", "[health]\nintervall = \"1s\"\n"),
    )
    .unwrap();
    let r = reload(&guard).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.json()["error"].as_str().unwrap().contains("intervall"),
        "{}",
        r.text()
    );

    // A certificate file that is not there: refused, naming the key.
    files.write(
        &[a.addr()],
        "tls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"",
        "",
    );
    let r = reload(&guard).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("server.tls_cert"),
        "{}",
        r.text()
    );

    // A QPS API certificate that cannot be read, with a new weight on the way: refused, and
    // the weight is not half-applied.
    files.write(
        &[a.addr()],
        "",
        "[qps_api]\nurl = \"https://127.0.0.1:4243\"\nclient_cert = \"/nonexistent/client.pem\"\nclient_key = \"/nonexistent/client_key.pem\"\n",
    );
    let text = std::fs::read_to_string(&files.config).unwrap().replace(
        &format!("url = \"http://{}\"\n", a.addr()),
        &format!("url = \"http://{}\"\nweight = 7\n", a.addr()),
    );
    std::fs::write(&files.config, text).unwrap();
    let r = reload(&guard).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("qps_api.client_cert"), "{}", r.text());
    assert_eq!(guard.proxy().upstreams().nodes()[0].weight(), 1);

    // An address already taken: refused, and nothing half-applied.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = sim().await;
    files.write(&[b.addr()], "", "");
    let text = std::fs::read_to_string(&files.config).unwrap().replacen(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{}\"", taken.local_addr().unwrap()),
        1,
    );
    std::fs::write(&files.config, text).unwrap();
    let r = reload(&guard).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("server.listen"),
        "{}",
        r.text()
    );
    assert_eq!(
        guard.proxy().upstreams().nodes().len(),
        1,
        "the nodes did not change"
    );
    assert_eq!(b.counters().requests, 0);

    // Still serving the same session, with the old config.
    let before = a.counters().sessions_created;
    assert_eq!(
        browse_as(guard.addr, "/hdr/hub/", &mut jar, "CORP\\k")
            .await
            .status,
        200
    );
    assert_eq!(a.counters().sessions_created, before);

    // Without the token a reload is refused.
    let r = admin_call(guard.admin_addr, http::Method::POST, "/reload", None).await;
    assert_eq!(r.status, 401);
    guard.shutdown().await;
}

#[tokio::test]
async fn a_reload_moves_the_listener_and_open_connections_and_websockets_go_on() {
    let a = sim().await;
    let files = Files::new("reload-listen");
    files.write(&[a.addr()], "", "[sessions]\nmax_per_user = 5\n");
    let guard = files.start().await;
    let old = guard.addr;

    // A WebSocket and a kept-alive connection, open across the reload.
    let mut jar = Jar::new();
    browse_as(old, "/hdr/hub/", &mut jar, "CORP\\ws").await;
    let mut ws = ws_as(old, "/hdr/app/x", "CORP\\ws", Some(&cookie_header(&jar))).await;
    let stream = tokio::net::TcpStream::connect(old).await.unwrap();
    let (mut kept, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let ask = |path: &str| {
        http::Request::get(path)
            .header("host", "qlik.example.com")
            .header("hdr-usr", "CORP\\kept")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(
        kept.send_request(ask("/hdr/hub/")).await.unwrap().status(),
        200
    );

    // Move the listener to a free port, and change a limit on the way.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let text = std::fs::read_to_string(&files.config)
        .unwrap()
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{free}\""),
            1,
        )
        .replace("max_per_user = 5", "max_per_user = 3");
    std::fs::write(&files.config, text).unwrap();
    let r = reload(&guard).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains(&free.to_string()), "{}", r.text());
    assert_eq!(guard.control().addr(), free);
    assert_eq!(guard.proxy().sessions().unwrap().max_per_user(), 3);

    // The new address serves; the old one takes no new connection.
    assert_eq!(
        browse_as(free, "/hdr/hub/", &mut Jar::new(), "CORP\\new")
            .await
            .status,
        200
    );
    eventually("old listener closed", || {
        std::net::TcpStream::connect(old).is_err()
    })
    .await;
    // What was open goes on.
    assert_eq!(
        kept.send_request(ask("/hdr/hub/y")).await.unwrap().status(),
        200
    );
    assert!(
        echoes(&mut ws, "still here").await,
        "the WebSocket opened before the reload still carries frames"
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn a_config_without_a_file_says_there_is_nothing_to_reload() {
    let a = sim().await;
    let guard = guard(a.addr()).await;
    let e = guard.control().reload().unwrap_err();
    assert!(e.contains("without a config file"), "{e}");
    guard.shutdown().await;
}

#[tokio::test]
async fn reuse_port_lets_a_second_guard_bind_the_same_port() {
    let a = sim().await;
    let first = guard_with(&config_text(&[a.addr()], "reuse_port = true", "")).await;
    let port = first.addr.port();
    let same = |reuse: bool| {
        config_text(&[a.addr()], &format!("reuse_port = {reuse}"), "").replacen(
            "127.0.0.1:0",
            &format!("127.0.0.1:{port}"),
            1,
        )
    };
    let e = Guard::start(Config::parse(&same(false)).unwrap())
        .await
        .err()
        .expect("the port is taken without reuse_port");
    assert!(e.contains("server.listen"), "{e}");
    let second = Guard::start(Config::parse(&same(true)).unwrap())
        .await
        .unwrap();
    assert_eq!(second.addr, first.addr);
    first.shutdown().await;
    assert_eq!(get(second.addr, "/__sim/echo", &[]).await.status, 200);
    second.shutdown().await;
}

#[tokio::test]
async fn the_reload_upstreams_and_drain_commands() {
    let (a, b) = (sim().await, sim().await);
    let files = Files::new("reload-cli");
    files.write(&[a.addr()], "", "");
    let guard = files.start().await;
    let admin = format!("http://{}", guard.admin_addr);
    let token = files.dir.join("token").display().to_string();
    let run = |args: Vec<String>| async move {
        let out = qsguard_output(args).await;
        (out.status.success(), output_text(&out))
    };
    let with = |cmd: &[&str]| {
        let mut v: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
        v.extend([
            "--admin".into(),
            admin.clone(),
            "--token-file".into(),
            token.clone(),
        ]);
        v
    };
    files.write(&[a.addr(), b.addr()], "", "");
    let (ok, out) = run(with(&["reload"])).await;
    assert!(ok && out.starts_with("reloaded:"), "{out}");
    let b_name = format!("127.0.0.1:{}", b.addr().port());
    let (ok, out) = run(with(&["upstreams"])).await;
    assert!(
        ok && out.lines().count() == 2 && out.contains(&b_name),
        "{out}"
    );
    let (ok, out) = run(with(&["drain", &b_name])).await;
    assert!(ok && out.contains("draining"), "{out}");
    let (_, out) = run(with(&["upstreams"])).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with(&b_name) && l.contains("draining")),
        "{out}"
    );
    let (ok, _) = run(with(&["undrain", &b_name])).await;
    assert!(ok);
    // A bad config: the command fails and says why.
    std::fs::write(&files.config, "[server]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let (ok, out) = run(with(&["reload"])).await;
    assert!(!ok, "{out}");
    assert!(out.contains("422") && out.contains("upstream"), "{out}");
    assert_eq!(
        guard.proxy().upstreams().nodes().len(),
        2,
        "the running config stays"
    );
    guard.shutdown().await;
}

#[tokio::test]
async fn a_reload_reads_a_new_admin_token() {
    let a = sim().await;
    let files = Files::new("reload-token");
    files.write(&[a.addr()], "", "");
    let guard = files.start().await;
    let name = format!("127.0.0.1:{}", a.addr().port());
    let undrain = format!("/upstreams/{name}/undrain");
    let drain = |token: &'static str| {
        let (admin, path) = (guard.admin_addr, undrain.clone());
        async move {
            admin_call(admin, http::Method::POST, &path, Some(token))
                .await
                .status
        }
    };
    assert_eq!(drain(TOKEN).await, 200);
    std::fs::write(files.dir.join("token"), "the-rotated-token-0123456789").unwrap();
    assert_eq!(
        drain(TOKEN).await,
        200,
        "the old token rules until the reload"
    );
    // The reload itself is authorised by the token in force: the old one.
    let r = reload(&guard).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        drain(TOKEN).await,
        401,
        "the old token is refused after the reload"
    );
    assert_eq!(drain("the-rotated-token-0123456789").await, 200);
    guard.shutdown().await;
}

#[tokio::test]
async fn a_retired_node_keeps_its_api_and_a_named_node_cannot_move_under_its_sessions() {
    let (a, b) = (sim().await, sim().await);
    let files = Files::new("reload-retired-api");
    files.write(&[a.addr(), b.addr()], "", "");
    let guard = files.start().await;
    for i in 0..4 {
        browse_as(
            guard.addr,
            "/hdr/hub/",
            &mut Jar::new(),
            &format!("CORP\\r{i}"),
        )
        .await;
    }
    let b_name = format!("127.0.0.1:{}", b.addr().port());
    let g = guard.proxy().sessions().unwrap().clone();
    let on_b = g
        .table
        .all()
        .into_iter()
        .find(|s| *s.node == *b_name)
        .unwrap();
    // b leaves the config while it holds sessions: retired, and its sessions can still be
    // ended in Qlik through its API.
    files.write(&[a.addr()], "", "");
    assert_eq!(reload(&guard).await.status, 200);
    let r = admin_call(
        guard.admin_addr,
        http::Method::DELETE,
        &format!("/sessions/{}", on_b.hash),
        Some(TOKEN),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(b.counters().logouts, 1, "ended on node b itself");

    // A node with a name of its own cannot change its URL while it holds sessions.
    let named = |url: std::net::SocketAddr| {
        let text = std::fs::read_to_string(&files.config).unwrap();
        let start = text.find("[[upstream]]").unwrap();
        let end = text.find("[[virtual_proxy]]").unwrap();
        format!(
            "{}[[upstream]]\nurl = \"http://{url}\"\nname = \"qlik1\"\n{}",
            &text[..start],
            &text[end..]
        )
    };
    std::fs::write(&files.config, named(a.addr())).unwrap();
    assert_eq!(reload(&guard).await.status, 200);
    browse_as(guard.addr, "/hdr/hub/", &mut Jar::new(), "CORP\\named").await;
    std::fs::write(&files.config, named(b.addr())).unwrap();
    let r = reload(&guard).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("upstream[0].url") && r.text().contains("qlik1"),
        "{}",
        r.text()
    );
    guard.shutdown().await;
}
