//! WebSocket upgrades past the gateway: once the upstream answers `101 Switching Protocols`,
//! the client's connection and the upstream's are joined until either side closes. The request
//! is counted when the tunnel opens (its [`Record`] cannot wait for a body that never ends); the
//! bytes that pass count when it closes, however it closes. Only WebSocket upgrades are asked
//! for upstream ([`headers::requested_upgrade`](super::headers::requested_upgrade)).
//!
//! A tunnel is bounded like a body: one in which neither side has sent anything for the route's
//! `idle_timeout`, and at least [`IDLE_FLOOR`], is closed ([`Silence`], timed only while both
//! directions wait). The tunnels live in [`Tunnels`], which the shutdown closes once the
//! listeners have drained, so that their bytes are counted before the final flush.
//!
//! Why the floor: WebSocket peers keep a quiet tunnel alive with heartbeats, commonly every
//! 25–30 s (socket.io, Phoenix), and before this bound a quiet tunnel lived as long as its
//! peers did. A route's `idle_timeout` (30 s by default) is the silence allowed inside a body
//! and would cut such tunnels; five minutes (Envoy's stream idle timeout) does not, and still
//! ends the tunnels nobody uses. A route with a longer `idle_timeout` gets that.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderValue;
use http::Response;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::record::{Record, UsageSink};
use crate::refusal::Refusal;
use crate::silence::Silence;

/// How long the shutdown waits for closed tunnels to count their bytes.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The shortest silence both ways that closes a tunnel, whatever the route's `idle_timeout`.
pub const IDLE_FLOOR: Duration = Duration::from_secs(300);

/// The open tunnels, shared by every config a reload makes.
#[derive(Default)]
pub struct Tunnels {
    tracker: TaskTracker,
    closing: CancellationToken,
}

/// How a tunnel ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// A side's connection could not be upgraded.
    NotUpgraded,
    /// One side closed it, or failed.
    Closed,
    /// Neither side sent anything for the limit.
    Idle,
    /// The gateway is stopping.
    ShutDown,
}

/// The bytes a tunnel has moved: written to the upstream (the key's bytes in) and to the client
/// (its bytes out), and read from either (only to see that the tunnel is not silent).
#[derive(Default)]
struct Moved {
    up: AtomicU64,
    down: AtomicU64,
    read: AtomicU64,
}

/// One side of a tunnel, counting what passes through it into [`Moved`].
struct Counted<'m, I> {
    io: I,
    written: &'m AtomicU64,
    read: &'m AtomicU64,
}

// === impl Tunnels ===

impl Tunnels {
    /// Counts the request and joins the client to the upstream once both connections are
    /// upgraded (`asked`: the protocol the client asked for and its side of the tunnel), until
    /// either closes or both are silent for `idle` (the route's `idle_timeout`, at least
    /// [`IDLE_FLOOR`]). A 101 to a request that asked for no upgrade, or one that cannot be
    /// upgraded, is refused instead.
    pub fn open(
        &self,
        response: &mut Response<Incoming>,
        record: Record,
        asked: Option<(HeaderValue, Option<OnUpgrade>)>,
        idle: Duration,
    ) -> Result<(), Refusal> {
        let Some((_, Some(client))) = asked else {
            record.refused();
            return Err(Refusal::UpstreamUnavailable);
        };
        let upstream = hyper::upgrade::on(response);
        let closing = self.closing.clone();
        let idle = tunnel_idle(idle);
        self.tracker
            .spawn(join(client, upstream, record.upgraded(), idle, closing));
        Ok(())
    }

    /// Closes every tunnel (and any opened after this), and waits a little for them to count
    /// their bytes.
    pub async fn close(&self) {
        self.closing.cancel();
        if let Err(left) = crate::tasks::finish(&self.tracker, CLOSE_WAIT).await {
            tracing::warn!(left, "tunnels still open after they were closed");
        }
    }

    /// How many tunnels are open.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no tunnel is open.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

/// The silence both ways that closes a tunnel on a route with `idle_timeout`.
fn tunnel_idle(idle_timeout: Duration) -> Duration {
    idle_timeout.max(IDLE_FLOOR)
}

/// Joins an upgraded client connection to the upgraded upstream one until either side closes,
/// neither sends anything for `idle`, or `closing` (the upgrades' wait included); the bytes that
/// passed count as the key's bytes in and out.
async fn join(
    client: OnUpgrade,
    upstream: OnUpgrade,
    sink: Option<UsageSink>,
    idle: Duration,
    closing: CancellationToken,
) {
    let moved = Moved::default();
    let joined = async {
        match tokio::join!(client, upstream) {
            (Ok(c), Ok(u)) => run(TokioIo::new(c), TokioIo::new(u), &moved, idle).await,
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "upgrade failed");
                Ended::NotUpgraded
            }
        }
    };
    let ended = tokio::select! {
        ended = joined => ended,
        () = closing.cancelled() => Ended::ShutDown,
    };
    tracing::debug!(?ended, "tunnel closed");
    if let Some(sink) = sink {
        sink.add(
            moved.up.load(Ordering::Relaxed),
            moved.down.load(Ordering::Relaxed),
        );
    }
}

/// Copies both ways between `client` and `upstream`, counting into `moved`, until either side
/// closes or fails, or neither sends anything for `idle`.
async fn run<C, U>(client: C, upstream: U, moved: &Moved, idle: Duration) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Counted::new(client, &moved.down, &moved.read);
    let mut upstream = Counted::new(upstream, &moved.up, &moved.read);
    let copying = tokio::io::copy_bidirectional(&mut client, &mut upstream);
    until_silent(copying, moved, idle).await
}

/// Runs `copying` until it ends, or until a wait of both directions has moved no byte for
/// `idle`.
async fn until_silent<F>(copying: F, moved: &Moved, idle: Duration) -> Ended
where
    F: Future<Output = io::Result<(u64, u64)>>,
{
    let mut copying = pin!(copying);
    let mut silence = Silence::new(idle);
    let mut seen = 0;
    poll_fn(|cx| {
        if let Poll::Ready(result) = copying.as_mut().poll(cx) {
            if let Err(e) = result {
                tracing::debug!(error = %e, "upgraded connection ended with an error");
            }
            return Poll::Ready(Ended::Closed);
        }
        let now = moved.total();
        if now != seen {
            seen = now;
            silence.progressed();
        }
        if silence.expired(cx) {
            Poll::Ready(Ended::Idle)
        } else {
            Poll::Pending
        }
    })
    .await
}

// === impl Moved ===

impl Moved {
    fn total(&self) -> u64 {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        load(&self.up)
            .wrapping_add(load(&self.down))
            .wrapping_add(load(&self.read))
    }
}

// === impl Counted ===

impl<'m, I> Counted<'m, I> {
    fn new(io: I, written: &'m AtomicU64, read: &'m AtomicU64) -> Self {
        Counted { io, written, read }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Counted<'_, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        self.read.fetch_add(n, Ordering::Relaxed);
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Counted<'_, I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::time::Instant;

    use super::*;

    const IDLE: Duration = Duration::from_secs(1);

    /// A tunnel between two in-memory pipes: its run, and the far ends (the client's, the
    /// upstream's), which echo nothing.
    fn pipes() -> ((DuplexStream, DuplexStream), (DuplexStream, DuplexStream)) {
        let (client_near, client_far) = tokio::io::duplex(64 * 1024);
        let (up_near, up_far) = tokio::io::duplex(64 * 1024);
        ((client_near, up_near), (client_far, up_far))
    }

    /// Sends `n` bytes from the client's far end and reads them at the upstream's.
    async fn pass(client: &mut DuplexStream, upstream: &mut DuplexStream, n: usize) {
        client.write_all(&vec![1u8; n]).await.expect("write");
        let mut got = vec![0u8; n];
        upstream.read_exact(&mut got).await.expect("read");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tunnel_silent_both_ways_for_the_limit_is_closed_and_counted() {
        let ((client, upstream), (mut client_far, mut up_far)) = pipes();
        let moved = Moved::default();
        let tunnel = tokio::time::timeout(IDLE * 100, run(client, upstream, &moved, IDLE));
        let talk = async {
            pass(&mut client_far, &mut up_far, 1_000).await;
            Instant::now()
        };
        let (ended, last_byte) = tokio::join!(tunnel, talk);
        assert_eq!(ended, Ok(Ended::Idle));
        assert_eq!(last_byte.elapsed(), IDLE);
        assert_eq!(moved.up.load(Ordering::Relaxed), 1_000);
        assert_eq!(moved.down.load(Ordering::Relaxed), 0);
    }

    /// Only silence counts: a byte each way every third of the limit keeps the tunnel open for
    /// ten limits; then the silence closes it.
    #[tokio::test(start_paused = true)]
    async fn a_tunnel_that_keeps_talking_stays_open() {
        let ((client, upstream), (mut client_far, mut up_far)) = pipes();
        let moved = Moved::default();
        let tunnel = tokio::time::timeout(IDLE * 100, run(client, upstream, &moved, IDLE));
        let talk = async {
            let started = Instant::now();
            while started.elapsed() < IDLE * 10 {
                tokio::time::sleep(IDLE / 3).await;
                pass(&mut client_far, &mut up_far, 1).await;
                pass(&mut up_far, &mut client_far, 1).await;
            }
            Instant::now()
        };
        let (ended, last_byte) = tokio::join!(tunnel, talk);
        assert_eq!(ended, Ok(Ended::Idle));
        assert_eq!(last_byte.elapsed(), IDLE);
        let (up, down) = (
            moved.up.load(Ordering::Relaxed),
            moved.down.load(Ordering::Relaxed),
        );
        assert_eq!(up, down);
        assert!(up >= 30, "{up}");
    }

    #[test]
    fn a_tunnel_gets_the_routes_idle_timeout_but_not_less_than_the_floor() {
        assert_eq!(
            tunnel_idle(Duration::from_secs(30)),
            Duration::from_secs(300)
        );
        assert_eq!(
            tunnel_idle(Duration::from_secs(900)),
            Duration::from_secs(900)
        );
    }
}
