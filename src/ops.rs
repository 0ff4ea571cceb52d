//! The ops commands of the binary: `sessions`, `end-session`, `end-user`, `events` (talking to
//! a running guard's admin listener) and `doctor` (probing the cookie round trip through
//! whatever stands between this machine and the guard, and with `--admin` the guard's own
//! checks from `/readyz`).

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::diagnostics::cookie_check::{needs_tls, COOKIES};

/// Where the admin API is and how to speak to it.
pub struct Admin {
    pub url: String,
    pub token: Option<String>,
}

impl Admin {
    async fn call(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, serde_json::Value), String> {
        let (status, v) = self.call_any(method, path).await?;
        if !status.is_success() {
            let why = v["error"].as_str().unwrap_or("").to_string();
            return Err(format!("the admin API answered {status}: {why}"));
        }
        Ok((status, v))
    }

    /// A call whose answer is read whatever its status (`/readyz` says why in a 503).
    async fn call_any(
        &self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, serde_json::Value), String> {
        let uri: Uri = format!("{}{}", self.url.trim_end_matches('/'), path)
            .parse()
            .map_err(|e| format!("bad admin URL {}: {e}", self.url))?;
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(t) = &self.token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let resp = tokio::time::timeout(Duration::from_secs(75), client.request(req))
            .await
            .map_err(|_| format!("the admin API at {} did not answer", self.url))?
            .map_err(|e| format!("cannot reach the admin API at {}: {e}", self.url))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        Ok((status, v))
    }

    /// The guard's own checks (`GET /readyz`: the nodes, the QPS REST API), written to `out`
    /// for `doctor`; returns whether they all pass.
    pub async fn guard_checks(&self, out: &mut String) -> bool {
        let _ = writeln!(
            out,
            "
guard -> Qlik (from {}/readyz):",
            self.url
        );
        let v = match self.call_any(Method::GET, "/readyz").await {
            Ok((_, v)) if v.is_object() => v,
            Ok((status, _)) => {
                let _ = writeln!(
                    out,
                    "  {:<22} FAILED: the admin API answered {status}",
                    "readyz"
                );
                return false;
            }
            Err(e) => {
                let _ = writeln!(out, "  {:<22} FAILED: {e}", "readyz");
                return false;
            }
        };
        let mut ok = true;
        for u in v["upstreams"].as_array().into_iter().flatten() {
            let reachable = u["reachable"] == true;
            let _ = writeln!(
                out,
                "  {:<22} {}",
                u["upstream"].as_str().unwrap_or("?"),
                if reachable {
                    "reachable"
                } else {
                    "UNREACHABLE"
                }
            );
        }
        if v["ready"] != true {
            ok = false;
            let _ = writeln!(out, "  {:<22} FAILED: no Qlik node is reachable", "ready");
        }
        let api = v["qps_api"].as_str().unwrap_or("?");
        if api.starts_with("failing") {
            ok = false;
            let _ = writeln!(out, "  {:<22} FAILED: {api}", "qps_api");
        } else {
            let _ = writeln!(out, "  {:<22} {api}", "qps_api");
        }
        // A pair's store that does not answer: degraded (each guard keeps its own count).
        if let Some(store) = v["cluster"]["store"].as_str() {
            if store.starts_with("unreachable") {
                ok = false;
                let _ = writeln!(out, "  {:<22} DEGRADED: {store}", "cluster store");
            } else {
                let _ = writeln!(out, "  {:<22} {store}", "cluster store");
            }
        }
        ok
    }

    /// `qsguard sessions`: a readable table of live sessions.
    pub async fn sessions(&self, user: Option<&str>) -> Result<String, String> {
        let path = match user {
            Some(u) => format!("/sessions?user={}", encode(u)),
            None => "/sessions".into(),
        };
        let (_, v) = self.call(Method::GET, &path).await?;
        let now = now_secs();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<24} {:<8} {:<13} {:<12} {:>11} {:>3}  APPS",
            "USER", "VP", "SESSION", "NODE", "LAST ACTIVE", "WS"
        );
        let mut n = 0;
        for u in v["users"].as_array().into_iter().flatten() {
            for s in u["sessions"].as_array().into_iter().flatten() {
                n += 1;
                let idle = now.saturating_sub(s["last_active"].as_u64().unwrap_or(now));
                let vp = s["virtual_proxy"].as_str().unwrap_or("");
                let _ = writeln!(
                    out,
                    "{:<24} {:<8} {:<13} {:<12} {:>11} {:>3}  {}",
                    u["user"].as_str().unwrap_or("?"),
                    if vp.is_empty() { "(central)" } else { vp },
                    s["session"].as_str().unwrap_or("?"),
                    s["node"].as_str().unwrap_or("?"),
                    format!("{idle}s ago"),
                    s["websockets"].as_u64().unwrap_or(0),
                    s["apps"]
                        .as_array()
                        .map(|a| a
                            .iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(","))
                        .unwrap_or_default(),
                );
            }
            if u["at_limit"] == true {
                let _ = writeln!(
                    out,
                    "  ^ {} is at the limit of {}",
                    u["user"].as_str().unwrap_or("?"),
                    v["limit"]
                );
            }
        }
        let _ = writeln!(out, "{n} live session(s)");
        if let Some(guard) = v["cluster"]["guard"].as_str() {
            let _ = writeln!(
                out,
                "(as guard `{guard}` of a pair knows them: the limit counts the sessions of every guard, in the store ({}))",
                v["cluster"]["store"].as_str().unwrap_or("?")
            );
        }
        Ok(out)
    }

    pub async fn end_session(&self, hash: &str) -> Result<String, String> {
        let (_, v) = self
            .call(Method::DELETE, &format!("/sessions/{}", encode(hash)))
            .await?;
        Ok(format!("ended {}\n", v["ended"]))
    }

    pub async fn end_user(&self, user: &str) -> Result<String, String> {
        let (_, v) = self
            .call(Method::DELETE, &format!("/users/{}/sessions", encode(user)))
            .await?;
        Ok(format!(
            "ended {} session(s) of {}\n",
            v["ended"].as_array().map_or(0, |a| a.len()),
            v["user"].as_str().unwrap_or(user)
        ))
    }

    /// `qsguard reload`: what SIGHUP does, with the outcome.
    pub async fn reload(&self) -> Result<String, String> {
        let (_, v) = self.call(Method::POST, "/reload").await?;
        Ok(format!(
            "reloaded: {}\n",
            v["changes"].as_str().unwrap_or("(nothing said)")
        ))
    }

    /// `qsguard upstreams`: the nodes, one line each.
    pub async fn upstreams(&self) -> Result<String, String> {
        let (_, v) = self.call(Method::GET, "/upstreams").await?;
        let mut out = String::new();
        for n in v["upstreams"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "{:<24} {:<9} weight {:<3} live sessions {:<5} in flight {:<4} last check: {}",
                n["name"].as_str().unwrap_or("?"),
                n["state"].as_str().unwrap_or("?"),
                n["weight"],
                n["live_sessions"],
                n["in_flight"],
                n["last_check"]["result"].as_str().unwrap_or("none yet"),
            );
        }
        Ok(out)
    }

    /// `qsguard drain NAME` / `undrain NAME`.
    pub async fn drain(&self, name: &str, on: bool) -> Result<String, String> {
        let action = if on { "drain" } else { "undrain" };
        self.call(
            Method::POST,
            &format!("/upstreams/{}/{action}", encode(name)),
        )
        .await?;
        Ok(if on {
            format!("{name}: draining (no new sessions; its sessions stay until they end)\n")
        } else {
            format!("{name}: takes new sessions again\n")
        })
    }

    /// `qsguard events [--follow]`: prints events, one line each.
    pub async fn events(&self, follow: bool, kind: Option<&str>) -> Result<(), String> {
        let mut since = 0u64;
        loop {
            let mut path = format!("/events?since={since}");
            if let Some(k) = kind {
                path.push_str(&format!("&kind={}", encode(k)));
            }
            if follow {
                path.push_str("&wait=30");
            }
            let (_, v) = self.call(Method::GET, &path).await?;
            for e in v["events"].as_array().into_iter().flatten() {
                since = since.max(e["id"].as_u64().unwrap_or(0));
                println!("{}", event_line(e));
            }
            if !follow {
                return Ok(());
            }
        }
    }
}

/// One event, readable.
pub fn event_line(e: &serde_json::Value) -> String {
    let mut line = format!(
        "#{} {} {:<18} {}",
        e["id"],
        e["time"],
        e["kind"].as_str().unwrap_or("?"),
        e["cause"].as_str().unwrap_or("")
    );
    for (label, key) in [
        ("user", "user"),
        ("vp", "virtual_proxy"),
        ("device", "device"),
    ] {
        if let Some(v) = e[key].as_str() {
            let _ = write!(line, " {label}={v}");
        }
    }
    if let Some(p) = e["client"]["peer"].as_str() {
        let _ = write!(line, " client={p}");
    }
    if let Some(x) = e["client"]["forwarded_for"].as_str() {
        let _ = write!(line, " xff=\"{x}\"");
    }
    if let Some(x) = e["client"]["via"].as_str() {
        let _ = write!(line, " via=\"{x}\"");
    }
    line
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `qsguard doctor URL`: the cookie round trip through the path from here to the guard, and,
/// with `admin`, the guard's own checks (its nodes, its QPS REST API). Returns the report and
/// whether everything passed.
pub async fn doctor(
    url: &str,
    check_path: &str,
    admin: Option<&Admin>,
) -> Result<(String, bool), String> {
    let base: Uri = url
        .parse()
        .map_err(|e| format!("{url} is not a URL: {e}"))?;
    let origin = format!(
        "{}://{}",
        base.scheme_str().unwrap_or("http"),
        base.authority()
            .map(|a| a.as_str())
            .ok_or("the URL needs a host")?
    );
    let tls = base.scheme_str() == Some("https");
    let cfg = crate::tls_client::config(None, "doctor")?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let id = format!("{:020x}", rand::random::<u64>() as u128 * 7919);
    let get = |path: String, cookie: Option<String>| {
        let client = client.clone();
        async move {
            let mut b = Request::get(path.as_str());
            if let Some(c) = cookie {
                b = b.header(header::COOKIE, c);
            }
            let req = b.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
            let resp = tokio::time::timeout(Duration::from_secs(15), client.request(req))
                .await
                .map_err(|_| format!("{path} did not answer within 15 s"))?
                .map_err(|e| format!("cannot reach {path}: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok::<_, String>((parts, body))
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "qsguard doctor: cookie round trip to {origin}{check_path}"
    );

    // Leg 1: guard -> here. Every Set-Cookie should arrive as its own header, unchanged.
    let (parts, body) = get(format!("{origin}{check_path}/set?id={id}"), None).await?;
    if parts.status != StatusCode::OK {
        return Err(format!(
            "{origin}{check_path}/set answered {}: is this a qsguard with the cookie check enabled?",
            parts.status
        ));
    }
    let sent: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let id = sent["id"].as_str().unwrap_or(&id).to_string();
    let lines: Vec<String> = parts
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let _ = writeln!(
        out,
        "\nguard -> here: {} Set-Cookie header(s) for {} cookies set",
        lines.len(),
        COOKIES.len()
    );
    let (jar, mut clean) = judge_set_cookies(&lines, &parts.headers, tls, &mut out);

    // Leg 2: here -> guard. What the guard received back.
    let (_, body) = get(
        format!("{origin}{check_path}/report?id={id}"),
        Some(jar.join("; ")),
    )
    .await?;
    let rep: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    clean &= judge_report(&rep, &mut out);
    let checks = match admin {
        Some(a) => a.guard_checks(&mut out).await,
        None => true,
    };
    let _ = writeln!(
        out,
        "\n{}",
        if clean {
            "clean: cookies cross this path intact in both directions"
        } else {
            "PROBLEM: cookies do not cross this path intact (see above)"
        }
    );
    if !checks {
        let _ = writeln!(out, "PROBLEM: the guard's own checks failed (see above)");
    }
    Ok((out, clean && checks))
}

/// Leg 1 of `doctor` (guard -> here): how each test cookie's `Set-Cookie` arrived, written to
/// `out`; returns the cookies a browser would now send back, and whether all arrived intact.
fn judge_set_cookies(
    lines: &[String],
    headers: &http::HeaderMap,
    tls: bool,
    out: &mut String,
) -> (Vec<String>, bool) {
    let mut clean = true;
    let mut jar = Vec::new();
    for (name, attrs, _) in COOKIES {
        let own = lines.iter().find(|l| l.starts_with(&format!("{name}=")));
        let inside = lines
            .iter()
            .find(|l| !l.starts_with(&format!("{name}=")) && l.contains(&format!("{name}=")));
        let verdict = match (own, inside) {
            (Some(l), _) => {
                let value = l
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .split_once('=')
                    .map(|x| x.1)
                    .unwrap_or("");
                // Do as a browser does: no Secure cookie over http.
                if !needs_tls(attrs) || tls {
                    jar.push(format!("{name}={value}"));
                }
                let kept = attrs.split("; ").all(|a| l.contains(a));
                if kept {
                    "arrived as its own header, attributes intact"
                } else {
                    "arrived, but its attributes were changed"
                }
            }
            (None, Some(_)) => {
                clean = false;
                "FOLDED into another Set-Cookie header (a browser reads it as an attribute and loses it)"
            }
            (None, None) => {
                clean = false;
                "DROPPED on the way"
            }
        };
        let _ = writeln!(out, "  {name:<22} {verdict}");
    }
    for h in ["via", "server", "x-cache", "x-served-by"] {
        for v in headers.get_all(h) {
            let _ = writeln!(
                out,
                "  response header {h}: {}",
                String::from_utf8_lossy(v.as_bytes())
            );
        }
    }
    // A folded header: the browser keeps only the first cookie of it.
    if let Some(folded) = lines
        .iter()
        .find(|l| l.matches("qsguard_check_").count() > 1)
    {
        let first = folded.split(';').next().unwrap_or("").to_string();
        if !jar.contains(&first) {
            jar.push(first);
        }
    }

    (jar, clean)
}

/// Leg 2 of `doctor` (here -> guard): what the guard says it received, written to `out`;
/// returns whether every cookie came back intact.
fn judge_report(rep: &serde_json::Value, out: &mut String) -> bool {
    let _ = writeln!(
        out,
        "\nhere -> guard: {}",
        rep["verdict"].as_str().unwrap_or("?")
    );
    for c in rep["cookies"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<22} {}",
            c["name"].as_str().unwrap_or("?"),
            c["status"].as_str().unwrap_or("?")
        );
    }
    for (label, key) in [
        ("Via", "via"),
        ("X-Forwarded-For", "x_forwarded_for"),
        ("X-Forwarded-Proto", "x_forwarded_proto"),
        ("Forwarded", "forwarded"),
    ] {
        if let Some(v) = rep[key].as_str() {
            let _ = writeln!(
                out,
                "  the guard saw {label}: {v}  (a device on the way announced itself)"
            );
        }
    }
    rep["clean"] == true
}
