//! Every session id the simulators of this process issued: the secrets the test suite's audit
//! looks for in everything the guard writes (logs, events, admin replies, pages). A real QPS
//! keeps no such list; the simulator does because it is the referee, and the referee knows
//! every value the guard must never show.

use std::collections::HashSet;
use std::sync::Mutex;

static ISSUED: Mutex<Option<HashSet<Box<str>>>> = Mutex::new(None);

pub(crate) fn note_issued(id: &str) {
    ISSUED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashSet::new)
        .insert(id.into());
}

/// Whether a simulator of this process issued `value` as a session id.
pub fn issued(value: &str) -> bool {
    ISSUED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|s| s.contains(value))
}

/// How many session ids the simulators of this process issued.
pub fn issued_count() -> usize {
    ISSUED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or(0, |s| s.len())
}

static TOKENS: Mutex<Vec<Box<str>>> = Mutex::new(Vec::new());

/// Remembers an NTLM / Negotiate token (base64, as it travels in `Authorization` or
/// `WWW-Authenticate`): the guard must pass it on, never write it anywhere.
pub(crate) fn note_token(token: &str) {
    let mut t = TOKENS.lock().unwrap_or_else(|e| e.into_inner());
    if !t.iter().any(|x| &**x == token) {
        t.push(token.into());
    }
}

/// Every NTLM / Negotiate token the simulators and their browser clients of this process sent.
pub fn tokens() -> Vec<Box<str>> {
    TOKENS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}
