//! The secrets audit: no cookie value may appear in anything the guard writes.
//!
//! Every session id a simulator of this test process issued (the simulator records them, see
//! `qsguard::sim::secrets`), every NTLM / Negotiate token its Windows authentication and its
//! browser client sent (`Authorization`, `WWW-Authenticate`), and every long cookie value the
//! guard set in a browser (its device cookie, a restored session) is a secret. The shared helpers pass everything the guard says
//! through [`scan`]: each log line (in-process and from qsguard processes), each event, each
//! admin reply and each page or response head (except `Set-Cookie`, where the values belong).
//! A secret found is a leak: the next helper call fails the test with [`assert_clean`], and the
//! leak is also written under `target/tmp/secrets-audit/`, which `.ci/run` checks after the
//! whole suite, so a leak found after a test's last helper call still fails CI.
//!
//! Answers from the simulator's own listeners are Qlik's, not the guard's: they are exempt
//! ([`exempt`]), like a test reading the QPS REST API directly.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;

static SECRETS: Mutex<Option<HashSet<String>>> = Mutex::new(None);
static EXEMPT: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());
static LEAKS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Answers from `addr` (a simulator listener) are not the guard's output.
pub fn exempt(addr: SocketAddr) {
    lock(&EXEMPT).push(addr);
}

pub fn is_exempt(addr: SocketAddr) -> bool {
    lock(&EXEMPT).contains(&addr)
}

/// Remembers the values of the cookies a response sets (long ones: session ids, device ids;
/// a sticky cookie's short node tag is no secret).
pub fn note_set_cookie(value: &[u8]) {
    let text = String::from_utf8_lossy(value);
    let pair = text.split(';').next().unwrap_or("");
    if let Some((_, v)) = pair.split_once('=') {
        let v = v.trim();
        if v.len() >= 20 {
            lock(&SECRETS)
                .get_or_insert_with(HashSet::new)
                .insert(v.to_string());
        }
    }
}

fn is_secret(token: &str) -> bool {
    qsguard::sim::secrets::issued(token)
        || lock(&SECRETS).as_ref().is_some_and(|s| s.contains(token))
}

fn is_guid_at(b: &[u8], i: usize) -> bool {
    b.len() >= i + 36
        && (0..36).all(|k| match k {
            8 | 13 | 18 | 23 => b[i + k] == b'-',
            _ => b[i + k].is_ascii_hexdigit(),
        })
}

/// The secrets in `text`: each token (letters, digits, `-`, `.`, `_`) and every GUID-shaped
/// stretch inside one (a session id glued to a path or a word).
pub fn secrets_in(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let token_byte = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'.' || c == b'_';
    for token in text.split(|c: char| !c.is_ascii() || !token_byte(c as u8)) {
        if token.len() < 20 {
            continue;
        }
        if is_secret(token) {
            found.push(token.to_string());
            continue;
        }
        let b = token.as_bytes();
        for i in 0..b.len().saturating_sub(35) {
            if is_guid_at(b, i) && is_secret(&token[i..i + 36]) {
                found.push(token[i..i + 36].to_string());
            }
        }
    }
    found
}

/// The NTLM / Negotiate tokens in `text` (base64: `+`, `/` and `=` end no token here).
pub fn tokens_in(text: &str) -> Vec<String> {
    qsguard::sim::secrets::tokens()
        .iter()
        .filter(|t| text.contains(&***t))
        .map(|t| t.to_string())
        .collect()
}

/// Looks for secrets in what the guard wrote (`source` says where it came from).
pub fn scan(source: &str, text: &str) {
    let mut found = secrets_in(text);
    found.extend(tokens_in(text));
    if found.is_empty() {
        return;
    }
    let mut shown = text.to_string();
    for s in &found {
        shown = shown.replace(s.as_str(), "<SECRET>");
    }
    let shown: String = shown.chars().take(400).collect();
    let leak = format!("{source}: a cookie value or an NTLM token appeared in: {shown}");
    eprintln!("SECRETS AUDIT: {leak}");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("secrets-audit");
    let _ = std::fs::create_dir_all(&dir);
    let file = dir.join(format!("leaks-{}.txt", std::process::id()));
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        use std::io::Write;
        let _ = writeln!(f, "{leak}");
    }
    lock(&LEAKS).push(leak);
}

/// A response head and body from the guard: every field but `Set-Cookie` and
/// `WWW-Authenticate` (Qlik's challenge, passed on: where that value belongs), and the body
/// (unless it is the simulator's echo of the request).
pub fn scan_response(source: &str, headers: &http::HeaderMap, body: &[u8]) {
    for (name, value) in headers {
        if name == http::header::SET_COOKIE {
            note_set_cookie(value.as_bytes());
        } else if name != http::header::WWW_AUTHENTICATE {
            scan(source, &String::from_utf8_lossy(value.as_bytes()));
        }
    }
    // The simulator's echo repeats the request in its body: Qlik's answer, passed through.
    if !headers.contains_key("x-sim-reflects") {
        scan(source, &String::from_utf8_lossy(body));
    }
}

/// Raw bytes from the guard (one or more HTTP/1.1 answers): `Set-Cookie` lines are where
/// values belong; everything else is looked at.
pub fn scan_raw(source: &str, raw: &[u8]) {
    let text = String::from_utf8_lossy(raw);
    // Within one answer, after the simulator's echo header, the body is Qlik's echo.
    let mut echo = false;
    for line in text.split("\r\n") {
        if line.starts_with("HTTP/1.") {
            echo = false;
        }
        match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("set-cookie") => {
                note_set_cookie(value.trim().as_bytes())
            }
            Some((name, _)) if name.eq_ignore_ascii_case("www-authenticate") => {}
            Some((name, _)) if name.eq_ignore_ascii_case("x-sim-reflects") => echo = true,
            _ if echo => {}
            _ => scan(source, line),
        }
    }
}

/// Fails the calling test if any leak was found in this process so far.
pub fn assert_clean() {
    let leaks = lock(&LEAKS);
    assert!(
        leaks.is_empty(),
        "the secrets audit found cookie values in the guard's output:\n{}",
        leaks.join("\n")
    );
}
