//! The access log: one structured line per request, written when the response body has been
//! sent ([`crate::proxy::lifecycle::Finish`]) (so the line has the real byte count and
//! duration), never with a cookie value or a query string (a Qlik ticket travels in the query).
//!
//! The line is a `tracing` event (target `qsguard::access`, level INFO), so `--log-level` and
//! `RUST_LOG` select it like any other. In the qsguard binary, where the log goes to a file,
//! journald or a pipe, the line is written by [`Line`] instead of tracing-subscriber's
//! formatter, byte for byte in the same layout (text or JSON; a unit test holds the two to
//! that): one line per request is the hottest thing the guard logs, and the generic formatter
//! spends more instructions on it (field visitors, `core::fmt`, float printing) than the whole
//! proxying of the request. At a terminal (colours) and under another subscriber (the tests),
//! the event goes through tracing as before.

use std::cell::RefCell;
use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode};

use crate::logging::LogFormat;

/// What the line says about one request.
pub struct Record {
    pub method: Method,
    /// The path without the query.
    pub path: String,
    pub status: StatusCode,
    pub upstream: Option<String>,
    /// From the request's head to the end of its answer.
    pub took: Duration,
    pub bytes: u64,
    pub peer: std::net::IpAddr,
    /// How the answer ended: `ok`, or why it did not (`client_gone`, `client_stalled`,
    /// `upstream_broke`).
    pub end: &'static str,
}

/// The layout the binary's log uses, when the guard writes access lines itself.
static DIRECT: OnceLock<LogFormat> = OnceLock::new();

/// From now on access lines are written straight to stderr in `format` (set once by
/// [`crate::logging::init`], for a log that is not a terminal).
pub(crate) fn write_directly(format: LogFormat) {
    let _ = DIRECT.set(format);
}

impl Record {
    pub(crate) fn emit(&self) {
        let micros = self.took.as_micros() as u64;
        match DIRECT.get() {
            Some(&format) => {
                if tracing::enabled!(target: "qsguard::access", tracing::Level::INFO) {
                    thread_local!(static BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(256)));
                    BUF.with_borrow_mut(|buf| {
                        buf.clear();
                        Line::new(self, micros, SystemTime::now()).write(format, buf);
                        // One write(2), as tracing-subscriber does; a failing stderr is
                        // nothing the request can do anything about.
                        let _ = std::io::stderr().lock().write_all(buf);
                    });
                }
            }
            None => self.trace(micros),
        }
    }

    /// The line as a tracing event, for whatever subscriber is installed.
    fn trace(&self, micros: u64) {
        tracing::info!(
            target: "qsguard::access",
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            ms = micros as f64 / 1000.0,
            bytes = self.bytes,
            client = %self.peer,
            end = self.end,
        )
    }
}

/// One access line's values, ready to be written.
struct Line<'a> {
    record: &'a Record,
    micros: u64,
    now: SystemTime,
}

impl<'a> Line<'a> {
    fn new(record: &'a Record, micros: u64, now: SystemTime) -> Self {
        Line {
            record,
            micros,
            now,
        }
    }

    /// The line tracing-subscriber's `fmt` (text, no colours) or `json().flatten_event(true)`
    /// layer would write for the event in [`Record::emit`].
    fn write(&self, format: LogFormat, out: &mut Vec<u8>) {
        let r = self.record;
        let mut n = itoa::Buffer::new();
        match format {
            LogFormat::Text => {
                timestamp(self.now, out);
                out.extend_from_slice(b"  INFO qsguard::access: method=");
                out.extend_from_slice(r.method.as_str().as_bytes());
                out.extend_from_slice(b" path=");
                out.extend_from_slice(r.path.as_bytes());
                out.extend_from_slice(b" status=");
                out.extend_from_slice(n.format(r.status.as_u16()).as_bytes());
                out.extend_from_slice(b" upstream=");
                debug_str(r.upstream.as_deref().unwrap_or("-"), out);
                out.extend_from_slice(b" ms=");
                millis(self.micros, out);
                out.extend_from_slice(b" bytes=");
                out.extend_from_slice(n.format(r.bytes).as_bytes());
                out.extend_from_slice(b" client=");
                super::headers::write_ip(out, r.peer);
                out.extend_from_slice(b" end=");
                debug_str(r.end, out);
                out.push(b'\n');
            }
            LogFormat::Json => {
                out.extend_from_slice(b"{\"timestamp\":\"");
                timestamp(self.now, out);
                out.extend_from_slice(b"\",\"level\":\"INFO\",\"method\":");
                json_str(r.method.as_str(), out);
                out.extend_from_slice(b",\"path\":");
                json_str(&r.path, out);
                out.extend_from_slice(b",\"status\":");
                out.extend_from_slice(n.format(r.status.as_u16()).as_bytes());
                out.extend_from_slice(b",\"upstream\":");
                json_str(r.upstream.as_deref().unwrap_or("-"), out);
                out.extend_from_slice(b",\"ms\":");
                millis(self.micros, out);
                out.extend_from_slice(b",\"bytes\":");
                out.extend_from_slice(n.format(r.bytes).as_bytes());
                out.extend_from_slice(b",\"client\":\"");
                super::headers::write_ip(out, r.peer);
                out.extend_from_slice(b"\",\"end\":");
                json_str(r.end, out);
                out.extend_from_slice(b",\"target\":\"qsguard::access\"}\n");
            }
        }
    }
}

/// RFC 3339 UTC with microseconds, as tracing-subscriber's default timer writes it.
fn timestamp(now: SystemTime, out: &mut Vec<u8>) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (y, mo, d) = super::datetime::civil_from_days(secs / 86400);
    let (h, mi, s) = ((secs % 86400) / 3600, (secs % 3600) / 60, secs % 60);
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(n.format(y).as_bytes());
    for (sep, v, width) in [
        (b'-', mo as u64, 2),
        (b'-', d as u64, 2),
        (b'T', h, 2),
        (b':', mi, 2),
        (b':', s, 2),
        (b'.', since.subsec_micros() as u64, 6),
    ] {
        out.push(sep);
        padded(v, width, out);
    }
    out.push(b'Z');
}

fn padded(v: u64, width: usize, out: &mut Vec<u8>) {
    let mut n = itoa::Buffer::new();
    let digits = n.format(v).as_bytes();
    out.extend(std::iter::repeat_n(
        b'0',
        width.saturating_sub(digits.len()),
    ));
    out.extend_from_slice(digits);
}

/// Milliseconds with up to three decimals, as `{:?}` (tracing) and serde_json print the `f64`
/// `micros / 1000`, the shortest form that reads back the same: `5.705`, `5.7`, `5.0`.
fn millis(micros: u64, out: &mut Vec<u8>) {
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(n.format(micros / 1000).as_bytes());
    let frac = micros % 1000;
    if frac == 0 {
        out.extend_from_slice(b".0");
        return;
    }
    let digits = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let keep = 3 - digits.iter().rev().take_while(|&&d| d == b'0').count();
    out.push(b'.');
    out.extend_from_slice(&digits[..keep]);
}

/// A string as `{:?}` writes it (what tracing-subscriber does with a `&str` field).
fn debug_str(s: &str, out: &mut Vec<u8>) {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// A JSON string, escaped as serde_json escapes it.
fn json_str(s: &str, out: &mut Vec<u8>) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(path: &str, upstream: Option<&str>, peer: &str, end: &'static str) -> Record {
        Record {
            method: Method::from_bytes(b"GET").unwrap(),
            path: path.into(),
            status: StatusCode::from_u16(502).unwrap(),
            upstream: upstream.map(str::to_string),
            took: Duration::from_micros(1234),
            bytes: 12345,
            peer: peer.parse().unwrap(),
            end,
        }
    }

    /// What tracing-subscriber writes for the event, set up as `logging::init` sets it up.
    fn by_tracing(r: &Record, micros: u64, format: LogFormat) -> String {
        let sink = Sink::default();
        let writer = sink.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone());
        let emit = || r.trace(micros);
        match format {
            LogFormat::Text => tracing::subscriber::with_default(builder.finish(), emit),
            LogFormat::Json => {
                tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), emit)
            }
        }
        let out = sink.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    /// The timestamp's place in a line: the text line starts with it, the JSON line has it
    /// as its first value.
    fn without_timestamp(line: &str) -> String {
        let at = line.find("20").expect("a timestamp");
        format!("{}{}", &line[..at], &line[at + 27..])
    }

    #[test]
    fn the_direct_line_is_the_line_tracing_writes() {
        let records = [
            record("/hub/", Some("qlik1"), "10.1.2.3", "ok"),
            record("/a\"b\\c", None, "::1", "client_gone"),
            record(
                "/x",
                Some("node \"é\"\t2"),
                "::ffff:10.0.0.1",
                "upstream_broke",
            ),
        ];
        for r in &records {
            for micros in [0, 1, 999, 1000, 5705, 5700, 123_456_789, 10_000_010] {
                for format in [LogFormat::Text, LogFormat::Json] {
                    let expected = by_tracing(r, micros, format);
                    let mut ours = Vec::new();
                    Line::new(r, micros, SystemTime::now()).write(format, &mut ours);
                    let ours = String::from_utf8(ours).unwrap();
                    assert_eq!(
                        without_timestamp(&ours),
                        without_timestamp(&expected),
                        "{format:?}, {micros} µs"
                    );
                }
            }
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::new(secs, micros * 1000);
            let mut out = Vec::new();
            timestamp(t, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(at(1_796_423_058, 723_305), "2026-12-04T22:24:18.723305Z");
        assert_eq!(at(4_102_444_799, 999_999), "2099-12-31T23:59:59.999999Z");
    }
}
