//! The access log: one structured line per request, written when the response body has been
//! sent (so the line has the real byte count and duration), never with a cookie value or a
//! query string (a Qlik ticket travels in the query).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body::{Body, Frame, SizeHint};

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

/// Wraps a response body; counts its bytes and writes the log line when it ends or is dropped.
pub struct Logged<B> {
    inner: B,
    record: Option<Box<Record>>,
}

impl<B> Logged<B> {
    pub fn new(inner: B, record: Option<Box<Record>>) -> Self {
        Logged { inner, record }
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            r.emit();
        }
    }
}

impl<B> Body for Logged<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(rec)) = (&r, this.record.as_mut()) {
            if let Some(d) = frame.data_ref() {
                rec.bytes += d.len() as u64;
            }
        }
        if let Poll::Ready(None) = r {
            if let Some(rec) = this.record.take() {
                rec.emit();
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
