//! [`Streams`]: the executor hyper spawns every HTTP/2 stream's task on, which tracks them (so
//! that a drain can wait for them) and resets a stream whose client stopped taking its answer.
//!
//! HTTP/2 answers flow only as far as the client's flow-control window lets them. A client that
//! never reopens a stream's window keeps that stream's task waiting for capacity: the socket
//! stays writable, so [`WatchedIo`](super::watched_io::WatchedIo) sees nothing, and the body is
//! not polled, so its own idle timer does not run either. The stream, its handler's state and
//! the upstream connection its body holds would stay for the connection's life, which the
//! client can make as long as it likes with other streams or pings.
//!
//! So each stream's task is watched ([`Watched`]): its answer's body ([`Stall`], marked by the
//! listener's `Guarded` body) says when a frame it gave is still with the client, that is, when
//! the body is not being asked for its next one. A task that waits in that state for the send
//! stall's limit without the body being asked again is dropped, which resets the stream (h2's
//! `CANCEL`) and drops the body (its upstream connection closed, its request counted), as
//! nginx's `send_timeout` does for an HTTP/2 stream. The rule is [`Silence`]'s: only the
//! time the task waits counts, and every frame taken starts it again.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::silence::Silence;

tokio::task_local! {
    /// The stream whose task is being polled, for its answer's body to find.
    static STREAM: Arc<Stall>;
}

/// The executor of HTTP/2 connections: each stream's task on the listener's [`TaskTracker`],
/// [`Watched`] with the send stall's limit.
#[derive(Clone)]
pub(super) struct Streams {
    tracker: TaskTracker,
    send_stall: Duration,
}

/// What a stream's answer body tells its task's watch.
#[derive(Default)]
pub(super) struct Stall {
    /// Frames the body has given.
    given: AtomicU64,
    /// The last frame given is with the client: the body has not been asked for the next.
    with_client: AtomicBool,
    /// The answer's body has found this (so the task-local need not be set any more).
    found: AtomicBool,
}

pin_project_lite::pin_project! {
    /// A stream's task, dropped once its answer has waited on the client for the limit.
    struct Watched<F> {
        #[pin]
        task: F,
        stall: Arc<Stall>,
        silence: Silence,
        seen: u64,
    }
}

// === impl Streams ===

impl Streams {
    pub(super) fn new(tracker: TaskTracker, send_stall: Duration) -> Self {
        Streams {
            tracker,
            send_stall,
        }
    }
}

impl<F> hyper::rt::Executor<F> for Streams
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, task: F) {
        self.tracker.spawn(Watched {
            task,
            stall: Arc::default(),
            silence: Silence::new(self.send_stall),
            seen: 0,
        });
    }
}

// === impl Stall ===

impl Stall {
    /// The stream of the task being polled, if it is an HTTP/2 stream's.
    pub(super) fn current() -> Option<Arc<Stall>> {
        let stall = STREAM.try_with(Arc::clone).ok()?;
        stall.found.store(true, Ordering::Relaxed);
        Some(stall)
    }

    /// The body is asked for its next frame.
    pub(super) fn asked(&self) {
        self.with_client.store(false, Ordering::Relaxed);
    }

    /// The body gave a frame.
    pub(super) fn gave(&self) {
        self.given.fetch_add(1, Ordering::Relaxed);
        self.with_client.store(true, Ordering::Relaxed);
    }
}

// === impl Watched ===

impl<F: Future> Future for Watched<F> {
    /// `None` when the stream was reset for its stall.
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let task = this.task;
        // The task-local only until the answer's body has found it: a clone and a scope a poll
        // while the handler runs, nothing after.
        let polled = if this.stall.found.load(Ordering::Relaxed) {
            task.poll(cx)
        } else {
            STREAM.sync_scope(Arc::clone(this.stall), || task.poll(cx))
        };
        if let Poll::Ready(out) = polled {
            return Poll::Ready(Some(out));
        }
        let given = this.stall.given.load(Ordering::Relaxed);
        if given != *this.seen {
            *this.seen = given;
            this.silence.progressed();
        }
        if !this.stall.with_client.load(Ordering::Relaxed) {
            // Waiting on its handler or its body, whose own deadlines bound it.
            this.silence.progressed();
            return Poll::Pending;
        }
        if this.silence.expired(cx) {
            tracing::debug!(
                limit = ?this.silence.limit(),
                "an HTTP/2 stream's client took none of its answer; stream reset"
            );
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body::Frame;
    use http_body_util::StreamBody;
    use hyper::body::Incoming;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    use super::super::{serve, ConnLimits};
    use super::*;

    const STALL: Duration = Duration::from_secs(1);
    /// An answer: [`FRAMES`] frames of [`WINDOW`] bytes, given one at a time as a proxied
    /// body's are (a body given whole would be buffered by h2 and its task done).
    const FRAMES: usize = 16;
    const ANSWER: usize = FRAMES * WINDOW as usize;
    /// The client's window for each stream: a sixteenth of the answer.
    const WINDOW: u32 = 16 * 1024;

    /// A cleartext listener whose answers are [`ANSWER`] bytes, with a send stall of [`STALL`].
    async fn listening() -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, shutdown) = watch::channel(false);
        let limits = ConnLimits {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            drain: Duration::from_secs(1),
            send_stall: STALL,
            max_connections: usize::MAX,
        };
        // `/big`: one frame of sixteen windows, then one byte (so that the big one is not the
        // last, whose task ends once it is handed to h2); else [`FRAMES`] of a window each.
        let answer = |req: Request<Incoming>, _peer: SocketAddr| async move {
            let sizes = if req.uri().path() == "/big" {
                vec![ANSWER, 1]
            } else {
                vec![WINDOW as usize; FRAMES]
            };
            let frames = sizes.into_iter().map(|size| {
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![7u8; size])))
            });
            Response::new(StreamBody::new(futures_util::stream::iter(frames)))
        };
        tokio::spawn(serve(listener, None, answer, limits, None, shutdown));
        (addr, stop)
    }

    /// An HTTP/2 connection whose streams' windows are [`WINDOW`] bytes (the connection's is
    /// large: one stalled stream does not hold the others).
    async fn connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(WINDOW)
            .initial_connection_window_size(16 * 1024 * 1024)
            .handshake(tcp)
            .await
            .expect("handshake");
        tokio::spawn(conn);
        client
    }

    /// Sends a GET for `path`; the answer's body.
    async fn get(client: &mut h2::client::SendRequest<Bytes>, path: &str) -> h2::RecvStream {
        let request = Request::get(format!("http://t{path}"))
            .body(())
            .expect("request");
        let (answer, _) = client.send_request(request, true).expect("send");
        answer.await.expect("answer head").into_body()
    }

    /// How a test client gives the bytes it read back to the window.
    #[derive(Clone, Copy)]
    enum Release {
        /// Never.
        None,
        /// `step` bytes at a time, each after `pause`.
        Paced { step: usize, pause: Duration },
    }

    /// Reads `body` to its end, giving the bytes back as `release` says; the bytes read, or the
    /// error that ended it.
    async fn read(body: &mut h2::RecvStream, release: Release) -> Result<usize, h2::Error> {
        let mut got = 0;
        while let Some(frame) = body.data().await {
            let frame = frame?;
            got += frame.len();
            let Release::Paced { step, pause } = release else {
                continue;
            };
            let mut left = frame.len();
            while left > 0 {
                let n = left.min(step);
                tokio::time::sleep(pause).await;
                body.flow_control().release_capacity(n).expect("release");
                left -= n;
            }
        }
        Ok(got)
    }

    const AT_ONCE: Release = Release::Paced {
        step: usize::MAX,
        pause: Duration::ZERO,
    };

    /// A client that never reopens a stream's window: the stream is reset (`CANCEL`) once its
    /// answer has waited on the client for the send stall, and the connection goes on serving.
    #[tokio::test]
    async fn a_stream_whose_client_takes_none_of_its_answer_is_reset() {
        let (addr, _stop) = listening().await;
        let mut client = connect(addr).await;
        let started = Instant::now();
        let mut stalled = get(&mut client, "/").await;
        let ended = tokio::time::timeout(Duration::from_secs(5), read(&mut stalled, Release::None))
            .await
            .expect("the stalled stream was still open after 5 s");
        let error = ended.expect_err("the stalled stream ended whole");
        assert_eq!(error.reason(), Some(h2::Reason::CANCEL), "{error}");
        assert!(started.elapsed() >= STALL, "{:?}", started.elapsed());
        // The connection is not the stream: the next request on it is answered whole.
        let mut next = get(&mut client, "/").await;
        let got = tokio::time::timeout(Duration::from_secs(5), read(&mut next, AT_ONCE))
            .await
            .expect("the next answer in time");
        assert_eq!(got.expect("the next answer"), ANSWER);
    }

    /// Only the stall counts: a client that reopens the window a little every 100 ms takes the
    /// whole answer over more than a stall limit.
    #[tokio::test]
    async fn a_stream_read_slowly_is_not_reset() {
        let (addr, _stop) = listening().await;
        let mut client = connect(addr).await;
        let mut slow = get(&mut client, "/").await;
        let started = Instant::now();
        let paced = Release::Paced {
            step: WINDOW as usize,
            pause: Duration::from_millis(100),
        };
        let got = tokio::time::timeout(Duration::from_secs(20), read(&mut slow, paced))
            .await
            .expect("the slow answer in time");
        assert_eq!(got.expect("a slow reader is not reset"), ANSWER);
        assert!(started.elapsed() > STALL, "{:?}", started.elapsed());
    }

    /// A frame far larger than the client's window, taken slowly but steadily (half a window
    /// every 100 ms: the frame takes 3.2 s, three stall limits, to go out whole) is not reset:
    /// it is given in pieces, and each piece the client takes is progress.
    #[tokio::test]
    async fn a_large_frame_read_slowly_is_not_reset() {
        let (addr, _stop) = listening().await;
        let mut client = connect(addr).await;
        let mut slow = get(&mut client, "/big").await;
        let paced = Release::Paced {
            step: WINDOW as usize / 2,
            pause: Duration::from_millis(100),
        };
        let got = tokio::time::timeout(Duration::from_secs(20), read(&mut slow, paced))
            .await
            .expect("the slow answer in time");
        assert_eq!(got.expect("a steady reader is not reset"), ANSWER + 1);
    }
}
