//! Body wrappers that stream without buffering: [`RequestBody`] enforces `max_body_bytes` (also
//! on chunked bodies) and [`ResponseBody`] counts; both add their byte counts to the key's usage
//! (through the record step's [`UsageSink`]) when they finish or are dropped. [`ResponseBody`] also holds the upstream connection, and
//! gives it back to the pool when the body has been read to its end, and the request's
//! [`Record`], which counts the request when the body is done.
//!
//! Both bound the silence inside a body by the route's `idle_timeout`: a client body that stalls
//! fails as [`ClientBodyError::Stalled`] (400), an upstream body that stalls is cut and counted
//! as `upstream_timeout`. Only the body's own waits are timed ([`Silence`]), not the time its
//! reader takes between polls: a reader held up by a client that reads slowly does not make a
//! live peer look silent. A body that arrives whole costs no timer. A client body that breaks
//! its own framing fails as
//! [`ClientBodyError::Framing`] (400, never a 502).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::Checkin;
use super::record::{Record, UsageSink};
use crate::silence::Silence;

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

/// The client's body on its way upstream.
pub struct RequestBody {
    inner: Incoming,
    seen: u64,
    limit: u64,
    idle: Silence,
    sink: Option<UsageSink>,
}

/// The upstream's body on its way to the client.
pub struct ResponseBody {
    inner: Incoming,
    seen: u64,
    ended: bool,
    idle: Silence,
    record: Option<Record>,
    conn: Option<Checkin>,
}

// === impl RequestBody ===

impl RequestBody {
    /// Wraps `inner`, failing once more than `limit` bytes arrive or nothing has for `idle`.
    pub fn new(inner: Incoming, limit: u64, idle: Duration, sink: Option<UsageSink>) -> Self {
        RequestBody {
            inner,
            seen: 0,
            limit,
            idle: Silence::new(idle),
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
                ClientBodyError::Stalled(this.idle.limit()),
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
            idle: Silence::new(idle),
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
                Poll::Ready(Some(Err(Box::new(UpstreamBodyStalled(this.idle.limit())))))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::{sleep, Instant};

    use super::*;

    const LIMIT: Duration = Duration::from_secs(1);

    /// An upstream on an in-memory pipe that answers with a chunked body, one chunk after each
    /// pause in `chunks` (from when it has read the request), and the answer's body as
    /// hyper's client gives it.
    async fn upstream(chunks: Vec<(Duration, &'static str)>) -> Incoming {
        let (ours, mut theirs): (DuplexStream, DuplexStream) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = theirs.read(&mut buf).await.expect("read the request");
                assert!(n > 0, "the client closed before its request");
                head.extend_from_slice(&buf[..n]);
            }
            let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            theirs.write_all(answer).await.expect("write the head");
            for (pause, chunk) in chunks {
                sleep(pause).await;
                let framed = format!("{:x}\r\n{chunk}\r\n", chunk.len());
                theirs.write_all(framed.as_bytes()).await.expect("write");
            }
            theirs.write_all(b"0\r\n\r\n").await.expect("write the end");
            // Held open: the end of the pipe is not an answer's end.
            std::future::pending::<()>().await;
        });
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(ours))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let request = http::Request::builder()
            .uri("/")
            .header("host", "upstream")
            .body(Empty::<Bytes>::new())
            .expect("request");
        send.send_request(request)
            .await
            .expect("answer")
            .into_body()
    }

    async fn next(body: &mut ResponseBody) -> Result<Option<Bytes>, BoxError> {
        match body.frame().await {
            Some(Ok(frame)) => Ok(frame.into_data().ok()),
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// The reader stops polling for two limits after a frame (held up by a client that reads
    /// slowly); the upstream's next chunk comes half a limit after the reader is back. That is
    /// no silence of the upstream's, and the body goes on.
    #[tokio::test(start_paused = true)]
    async fn a_reader_that_pauses_after_a_frame_does_not_make_the_upstream_silent() {
        let incoming = upstream(vec![
            (LIMIT / 10, "first"),
            (LIMIT * 2 + LIMIT / 2, "second"),
        ])
        .await;
        let mut body = ResponseBody::new(incoming, LIMIT, None, None);
        // The first poll waits (the timer is armed), then the first chunk comes.
        assert_eq!(
            next(&mut body).await.expect("first").as_deref(),
            Some(&b"first"[..])
        );
        sleep(LIMIT * 2).await;
        let back = Instant::now();
        let second = next(&mut body).await.expect("the upstream was cut");
        assert_eq!(second.as_deref(), Some(&b"second"[..]));
        assert!(back.elapsed() < LIMIT, "{:?}", back.elapsed());
        assert_eq!(next(&mut body).await.expect("end"), None);
    }

    /// The other side of the same rule: an upstream that says nothing for the limit while the
    /// reader waits on it is cut, a limit after the wait began.
    #[tokio::test(start_paused = true)]
    async fn an_upstream_silent_for_the_limit_is_cut() {
        let incoming = upstream(vec![(LIMIT / 10, "first"), (LIMIT * 3, "late")]).await;
        let mut body = ResponseBody::new(incoming, LIMIT, None, None);
        assert_eq!(
            next(&mut body).await.expect("first").as_deref(),
            Some(&b"first"[..])
        );
        let waited = Instant::now();
        let cut = next(&mut body)
            .await
            .expect_err("a silent upstream goes on");
        assert!(caused_by::<UpstreamBodyStalled>(cut.as_ref()), "{cut}");
        assert_eq!(waited.elapsed(), LIMIT);
    }
}
