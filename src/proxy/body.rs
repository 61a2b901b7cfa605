//! Body wrappers that stream without buffering: [`RequestBody`] enforces `max_body_bytes` (also
//! on chunked bodies) and [`ResponseBody`] counts; both add their byte counts to the key's usage
//! (through the record step's [`UsageSink`]) when they finish or are dropped. [`ResponseBody`] also holds the upstream connection, and
//! gives it back to the pool when the body has been read to its end, and the request's
//! [`Record`], which counts the request when the body is done.
//!
//! Both bound the silence inside a body by the route's `idle_timeout`: a client body that stalls
//! fails as [`ClientBodyError::Stalled`] (400), an upstream body that stalls is cut and counted
//! as `upstream_timeout`. The timer is armed only when a body first has to wait, so a body that
//! arrives whole costs no timer. A client body that breaks its own framing fails as
//! [`ClientBodyError::Framing`] (400, never a 502).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::pool::Checkin;
use super::record::{Record, UsageSink};

/// A boxed error, as hyper's client takes from a request body.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body is over the limit; found in the client error's source chain.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit.
    pub limit: u64,
}

/// The client's request body failed: the client's fault, answered 400 `bad_request`; found in
/// the upstream error's source chain.
#[derive(Debug, thiserror::Error)]
pub enum ClientBodyError {
    /// It broke its own framing (a bad chunk, a bare LF, shorter than its `Content-Length`) or
    /// the connection failed under it.
    #[error("the request body is malformed or incomplete: {0}")]
    Framing(hyper::Error),
    /// Nothing arrived for longer than the route's `idle_timeout`.
    #[error("the request body stalled for longer than {0:?}")]
    Stalled(Duration),
}

/// The upstream's body stalled for longer than the route's `idle_timeout` and was cut.
#[derive(Debug, thiserror::Error)]
#[error("the upstream's body stalled for longer than {0:?}")]
pub struct UpstreamBodyStalled(Duration);

/// The longest silence a body may keep: armed when the body first has to wait, pushed back by
/// every frame after that.
struct Idle {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

/// The client's body on its way upstream.
pub struct RequestBody {
    inner: Incoming,
    seen: u64,
    limit: u64,
    idle: Idle,
    sink: Option<UsageSink>,
}

/// The upstream's body on its way to the client.
pub struct ResponseBody {
    inner: Incoming,
    seen: u64,
    ended: bool,
    idle: Idle,
    record: Option<Record>,
    conn: Option<Checkin>,
}

// === impl Idle ===

impl Idle {
    fn new(limit: Duration) -> Self {
        Idle { limit, timer: None }
    }

    /// A frame arrived: the silence starts again (only once a wait has armed the timer).
    fn progressed(&mut self) {
        if let Some(timer) = &mut self.timer {
            timer.as_mut().reset(Instant::now() + self.limit);
        }
    }

    /// The body has to wait: whether the silence has lasted too long (else `cx` is woken when
    /// it will have).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx).is_ready()
    }
}

// === impl RequestBody ===

impl RequestBody {
    /// Wraps `inner`, failing once more than `limit` bytes arrive or nothing has for `idle`.
    pub fn new(inner: Incoming, limit: u64, idle: Duration, sink: Option<UsageSink>) -> Self {
        RequestBody {
            inner,
            seen: 0,
            limit,
            idle: Idle::new(idle),
            sink,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.progressed();
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
            Poll::Ready(Some(Err(e))) => {
                Poll::Ready(Some(Err(Box::new(ClientBodyError::Framing(e)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if this.idle.expired(cx) => Poll::Ready(Some(Err(Box::new(
                ClientBodyError::Stalled(this.idle.limit),
            )))),
            Poll::Pending => Poll::Pending,
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
            sink.add(self.seen, 0);
        }
    }
}

// === impl ResponseBody ===

impl ResponseBody {
    /// Wraps `inner`, counting what passes and cutting it after `idle` of silence; `conn` goes
    /// back to the pool once `inner` has ended (a body dropped before its end closes the
    /// connection); `record` counts the request when the body is dropped.
    pub fn new(
        inner: Incoming,
        idle: Duration,
        record: Option<Record>,
        conn: Option<Checkin>,
    ) -> Self {
        ResponseBody {
            inner,
            seen: 0,
            ended: false,
            idle: Idle::new(idle),
            record,
            conn,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.progressed();
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Pending if this.idle.expired(cx) => {
                if let Some(record) = &mut this.record {
                    record.cut();
                }
                Poll::Ready(Some(Err(Box::new(UpstreamBodyStalled(this.idle.limit)))))
            }
            Poll::Pending => Poll::Pending,
        }
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
        if let Some(record) = self.record.take() {
            record.bytes_out(self.seen);
            drop(record);
        }
        // hyper stops polling a body with a known length once it reports its end, so
        // `is_end_stream` is asked too.
        if let (true, Some(conn)) = (self.ended || self.inner.is_end_stream(), self.conn.take()) {
            conn.give_back();
        }
    }
}

/// Whether an error (or anything in its source chain) is a `T`: [`BodyTooLarge`] or
/// [`ClientBodyError`] in what hyper's client reports.
pub fn caused_by<T: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.is::<T>() {
            return true;
        }
        cur = e.source();
    }
    false
}
