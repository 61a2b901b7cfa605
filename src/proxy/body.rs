//! Body wrappers that stream without buffering: [`RequestBody`] enforces `max_body_bytes` (also
//! on chunked bodies) and [`ResponseBody`] counts; both add their byte counts to the key's usage
//! when they finish or are dropped. [`ResponseBody`] also holds the upstream connection, and
//! gives it back to the pool when the body has been read to its end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::Checkin;
use crate::metering::{UsageCell, WallClock};

/// Where a body's byte count goes when it ends.
pub struct UsageSink {
    /// The key's cell.
    pub cell: Arc<UsageCell>,
    /// The meter's clock.
    pub clock: WallClock,
}

/// The request body is over the limit; found in the client error's source chain.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit.
    pub limit: u64,
}

/// The client's body on its way upstream.
pub struct RequestBody {
    inner: Incoming,
    seen: u64,
    limit: u64,
    sink: Option<UsageSink>,
}

/// The upstream's body on its way to the client.
pub struct ResponseBody {
    inner: Incoming,
    seen: u64,
    ended: bool,
    sink: Option<UsageSink>,
    conn: Option<Checkin>,
}

// === impl RequestBody ===

impl RequestBody {
    /// Wraps `inner`, failing once more than `limit` bytes arrive.
    pub fn new(inner: Incoming, limit: u64, sink: Option<UsageSink>) -> Self {
        RequestBody {
            inner,
            seen: 0,
            limit,
            sink,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: this.limit,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            other => other.map(|o| o.map(|r| r.map_err(|e| e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let Some(sink) = &self.sink {
            sink.cell.record_bytes(sink.clock.now_ms(), self.seen, 0);
        }
    }
}

// === impl ResponseBody ===

impl ResponseBody {
    /// Wraps `inner`, counting what passes; `conn` goes back to the pool once `inner` has
    /// ended (a body dropped before its end closes the connection).
    pub fn new(inner: Incoming, sink: Option<UsageSink>, conn: Option<Checkin>) -> Self {
        ResponseBody {
            inner,
            seen: 0,
            ended: false,
            sink,
            conn,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.ended = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let Some(sink) = &self.sink {
            sink.cell.record_bytes(sink.clock.now_ms(), 0, self.seen);
        }
        // hyper stops polling a body with a known length once it reports its end, so
        // `is_end_stream` is asked too.
        if let (true, Some(conn)) = (self.ended || self.inner.is_end_stream(), self.conn.take()) {
            conn.give_back();
        }
    }
}

/// Whether an error (or anything in its source chain) is [`BodyTooLarge`].
pub fn is_body_too_large(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<BodyTooLarge>() {
            return true;
        }
        cur = e.source();
    }
    false
}
