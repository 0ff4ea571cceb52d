//! An HTTP/2 request body that hands on its last bytes only once the stream has ended.
//!
//! An HTTP/2 request with `content-length: 5` whose DATA frames bring 5 bytes and then more is
//! malformed (RFC 9113 8.1.1), but the HTTP/2 server sees the excess only when it arrives. An
//! HTTP/1.1 request to Qlik framed by that length is complete as soon as the fifth byte is
//! written, so Qlik would run a request the client never finished. Holding back each DATA
//! frame until the next one (or the end of the stream) arrives means Qlik gets the last byte
//! only when the stream ended cleanly; a stream that breaks the rule fails the body, and the
//! upstream request stays incomplete (its connection is closed, never reused).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub struct HoldLast<B> {
    inner: B,
    held: Option<Frame<Bytes>>,
    ended: bool,
}

impl<B> HoldLast<B> {
    pub fn new(inner: B) -> Self {
        HoldLast {
            inner,
            held: None,
            ended: false,
        }
    }
}

impl<B> Body for HoldLast<B>
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
        loop {
            if this.ended {
                return Poll::Ready(this.held.take().map(Ok));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(previous) = this.held.replace(frame) {
                        return Poll::Ready(Some(Ok(previous)));
                    }
                }
                Poll::Ready(None) => this.ended = true,
                Poll::Ready(Some(Err(e))) => {
                    this.held = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.held.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = self.inner.size_hint();
        if let Some(d) = self.held.as_ref().and_then(|f| f.data_ref()) {
            let n = d.len() as u64;
            h.set_lower(h.lower() + n);
            if let Some(u) = h.upper() {
                h.set_upper(u + n);
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn the_last_frame_waits_for_the_end_of_the_stream() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, &'static str>>(4);
        let mut body = HoldLast::new(StreamBody::new(tokio_stream_from(rx)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"hello"))))
            .await
            .unwrap();
        let early = tokio::time::timeout(std::time::Duration::from_millis(50), body.frame()).await;
        assert!(early.is_err(), "the only frame so far is held");
        tx.send(Err("more DATA than content-length")).await.unwrap();
        let got = body.frame().await.unwrap();
        assert!(got.is_err(), "the error comes, the held bytes never do");

        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, &'static str>>(4);
        let body = HoldLast::new(StreamBody::new(tokio_stream_from(rx)));
        tx.send(Ok(Frame::data(Bytes::from_static(b"he"))))
            .await
            .unwrap();
        tx.send(Ok(Frame::data(Bytes::from_static(b"llo"))))
            .await
            .unwrap();
        drop(tx);
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"hello");
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
