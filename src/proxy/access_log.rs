//! The access log: one structured line per request, written when the response body has been
//! sent ([`crate::proxy::lifecycle::Finish`]) (so the line has the real byte count and duration), never with a cookie value or a
//! query string (a Qlik ticket travels in the query).

use std::time::Instant;

use http::{Method, StatusCode};

/// What the line says about one request.
pub struct Record {
    pub method: Method,
    /// The path without the query.
    pub path: String,
    pub status: StatusCode,
    pub upstream: Option<String>,
    pub started: Instant,
    pub bytes: u64,
    pub peer: std::net::IpAddr,
    /// How the answer ended: `ok`, or why it did not (`client_gone`, `client_stalled`,
    /// `upstream_broke`).
    pub end: &'static str,
}

impl Record {
    pub(crate) fn emit(&self) {
        tracing::info!(
            target: "qsguard::access",
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            ms = self.started.elapsed().as_secs_f64() * 1000.0,
            bytes = self.bytes,
            client = %self.peer,
            end = self.end,
        );
    }
}
