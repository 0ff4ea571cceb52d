//! A private `redis-server` for a test: loopback, a port picked free, nothing written to
//! disk. It is required, not optional: without `redis-server` on the PATH the test fails and
//! says how to install it (`.ci/run` does), so a missing store never reads as a pass.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// Serving TLS only, with this certificate and key.
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
            tls: None,
        };
        r.resume().await;
        r
    }

    /// A store that speaks TLS only (`rediss://`), with this certificate and key.
    pub async fn start_tls(cert: &std::path::Path, key: &std::path::Path) -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
            tls: Some((cert.to_path_buf(), key.to_path_buf())),
        };
        r.resume().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port, with an empty store, and waits until it answers.
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1"]);
        match &self.tls {
            None => cmd.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => cmd
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = cmd
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server is needed by the cluster tests (apt-get install -y redis-server): {e}")
            });
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        for _ in 0..200 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
                if self.tls.is_some() {
                    // No PING without a handshake: listening is what can be seen.
                    return;
                }
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 16];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && matches!(s.read(&mut buf).await, Ok(n) if buf[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server on port {} did not answer", self.port);
    }

    /// Runs one command on the store (a test writing into it as an intruder would).
    pub async fn cmd(&self, args: &[&str]) {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test's redis-server");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        let _: redis::Value = cmd.query_async(&mut c).await.expect("the command");
    }

    /// Every key and every value in the store, as text (for the secrets audit: a dump of the
    /// store must give no one a session).
    pub async fn dump(&self) -> String {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test's redis-server");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut c)
            .await
            .unwrap();
        let mut out = String::new();
        for k in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&k)
                .query_async(&mut c)
                .await
                .unwrap();
            let value: Vec<String> = match kind.as_str() {
                "hash" => redis::cmd("HGETALL")
                    .arg(&k)
                    .query_async(&mut c)
                    .await
                    .unwrap(),
                "zset" => redis::cmd("ZRANGE")
                    .arg(&k)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut c)
                    .await
                    .unwrap(),
                "string" => vec![redis::cmd("GET").arg(&k).query_async(&mut c).await.unwrap()],
                other => vec![format!("({other})")],
            };
            out.push_str(&format!("{k} {}\n", value.join(" ")));
        }
        out
    }

    /// Kills it (no shutdown courtesy: a store that dies is what the guard must survive).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}
