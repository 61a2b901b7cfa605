//! Accepting connections and serving HTTP/1.1 and HTTP/2 on them, for both listeners: limits on
//! request heads (size, and time against slow clients), on how long a write waits for a client
//! that stopped reading ([`watched_io`]) and an HTTP/2 stream for a client that stopped taking
//! it ([`streams`]), the open-connections gauge, and a graceful drain on shutdown. Takes a *bound* listener, so tests bind port 0.
//!
//! A listener serves cleartext or TLS. On cleartext the first bytes tell HTTP/1 from HTTP/2
//! with prior knowledge (`sniff`); on TLS the handshake (rustls, [`crate::tls`]) must finish
//! within the header timeout, and ALPN picks the protocol (`h2`, else HTTP/1.1). The TLS path
//! is boxed so that a cleartext connection's task is not sized for rustls's state.
//!
//! Each connection is served by hyper's own `http1` or `http2` connection rather than
//! hyper-util's `auto` one, because of what an idle keep-alive connection keeps: `auto` reads
//! the first 24 bytes itself and hands them to hyper, whose next read then doubles its 8 KiB read
//! buffer to 16 KiB for the connection's life, and its task is sized for the larger HTTP/2 state
//! (docs/PERFORMANCE.md, "Idle keep-alive connections").

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

mod streams;
mod watched_io;

use streams::{Stall, Streams};
use watched_io::WatchedIo;

/// Per-connection protocol limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// How long a client may take to send a complete request head.
    pub header_timeout: Duration,
    /// Largest request head, in bytes.
    pub max_header_bytes: usize,
    /// How long in-flight requests get to finish after shutdown starts.
    pub drain: Duration,
    /// How long a write to a client may wait for the client to take bytes ([`WatchedIo`]).
    pub send_stall: Duration,
    /// The most connections open at once; past it the listener stops accepting (new ones wait
    /// in the kernel's queue) until one closes. [`connection_cap`] fits it to the process.
    pub max_connections: usize,
}

/// File descriptors kept for what is not a client connection: the store, Redis, the usage log,
/// the listeners, the process's own files.
const RESERVED_FDS: usize = 256;

/// The most client connections this process can hold: half of its open-files limit (each
/// proxied request may hold an upstream connection beside the client's) less
/// [`RESERVED_FDS`]; no cap when the limit cannot be read or is unlimited. Past the limit,
/// `accept` would fail for every listener alike (admin and `/metrics` included) instead of
/// new connections waiting their turn.
pub fn connection_cap() -> usize {
    open_files_limit().map_or(usize::MAX, |n| (n.saturating_sub(RESERVED_FDS) / 2).max(1))
}

/// The soft limit on open files, from `/proc/self/limits` ("Max open files  SOFT  HARD  files").
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The HTTP version a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 with prior knowledge (the client opened with the connection preface).
    Http2,
}

/// How every HTTP/2 connection opens (RFC 9113 §3.4); no HTTP/1 request starts like it.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest wait between two looks at a connection whose first bytes are still too few to
/// tell its protocol (see `sniff`).
const SNIFF_MAX_DELAY: Duration = Duration::from_millis(64);

/// Both protocols' settings, built once and shared by every connection.
struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<Streams>,
    header_timeout: Duration,
    send_stall: Duration,
}

/// The listen backlog when the system's maximum cannot be read.
const FALLBACK_BACKLOG: u32 = 4096;

/// Binds `addr` with the system's largest listen backlog (`net.core.somaxconn`): a burst of
/// connections waits in the kernel's queue instead of being dropped (tokio's default is 1024,
/// and what a platform raised somaxconn for should not be capped by us).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(system_backlog())
}

/// `net.core.somaxconn`, the most the kernel queues for one listener.
fn system_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or(FALLBACK_BACKLOG, |n| n.clamp(128, i32::MAX as u32))
}

/// Serves `handler` on every connection until `shutdown` turns true, then stops accepting,
/// lets open requests finish within `limits.drain`, and closes the connections still open. With `tls`, every connection is a TLS one.
#[allow(clippy::too_many_arguments)]
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: H,
    limits: ConnLimits,
    connections: Option<IntGauge>,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut http1 = http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // The head's exact size; the read buffer (`max_buf_size`) only bounds what one read
        // may add, and alone let heads of 112 KiB through a 64 KiB limit.
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let streams = TaskTracker::new();
    let mut http2 = http2::Builder::new(Streams::new(streams.clone(), limits.send_stall));
    http2
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let protocols = Arc::new(Protocols {
        http1,
        http2,
        header_timeout: limits.header_timeout,
        send_stall: limits.send_stall,
    });
    // Every connection holds a receiver: a value sent tells them all to finish, and the sender
    // learns when the last one has closed. (hyper-util's `GracefulShutdown` does the same, but
    // cannot watch hyper's upgradeable HTTP/1 connection.)
    let (drain_tx, drain_rx) = watch::channel(());
    let tls = tls.map(TlsAcceptor::from);
    // The connections' tasks, so that those still open when the drain ends can be closed, and
    // counted against `max_connections`.
    let mut open = JoinSet::new();
    let mut full = false;
    loop {
        let was_full = std::mem::replace(&mut full, open.len() >= limits.max_connections);
        if full && !was_full {
            tracing::warn!(
                max = limits.max_connections,
                "connections at the cap: new ones wait in the listen queue until one closes"
            );
        }
        let (stream, peer) = tokio::select! {
            // A set keeps a finished task until it is collected: collected as they end.
            Some(_) = open.join_next(), if !open.is_empty() => continue,
            accepted = listener.accept(), if !full => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let gauge = Open::counted(connections.clone());
        let (handler, protocols, drain) =
            (handler.clone(), Arc::clone(&protocols), drain_rx.clone());
        match &tls {
            None => open.spawn(serve_connection(
                stream, peer, handler, protocols, drain, gauge,
            )),
            Some(acceptor) => open.spawn(Box::pin(serve_tls_connection(
                acceptor.clone(),
                stream,
                peer,
                handler,
                protocols,
                drain,
                gauge,
            ))),
        };
    }
    drop(listener);
    drop(drain_rx);
    drain_tx.send_replace(());
    if tokio::time::timeout(limits.drain, drain_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!(after = ?limits.drain, "in-flight requests did not finish in time; closing them");
    }
    // Closed here, before the background tasks are told to stop: a request cut off counts
    // itself as its handler or answer is dropped, in time for the final flush. An HTTP/2
    // stream runs in a task of its own, which ends once its connection is gone.
    open.shutdown().await;
    if let Err(left) = crate::tasks::finish(&streams, STREAMS_END).await {
        tracing::warn!(left, "HTTP/2 streams did not end with their connections");
    }
}

/// How long HTTP/2 streams get to end once the drain has closed their connections.
const STREAMS_END: Duration = Duration::from_secs(1);

/// One cleartext connection, from its first bytes to its close.
async fn serve_connection<H, Fut, B>(
    stream: TcpStream,
    peer: SocketAddr,
    handler: H,
    protocols: Arc<Protocols>,
    mut drain: watch::Receiver<()>,
    _open: Open,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let protocol = tokio::select! {
        protocol = first_bytes(&stream, peer, protocols.header_timeout) => protocol,
        _ = drain.changed() => None,
    };
    if let Some(protocol) = protocol {
        speak(stream, protocol, peer, handler, &protocols, drain).await;
    }
}

/// One TLS connection: the handshake within the header timeout, then the protocol ALPN chose.
async fn serve_tls_connection<H, Fut, B>(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    handler: H,
    protocols: Arc<Protocols>,
    mut drain: watch::Receiver<()>,
    _open: Open,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let handshake = tokio::time::timeout(protocols.header_timeout, acceptor.accept(stream));
    let accepted = tokio::select! {
        accepted = handshake => accepted,
        _ = drain.changed() => Ok(Err(std::io::Error::other("shutting down"))),
    };
    match accepted {
        Ok(Ok(stream)) => {
            let protocol = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => Protocol::Http2,
                _ => Protocol::Http1,
            };
            speak(stream, protocol, peer, handler, &protocols, drain).await;
        }
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "no TLS handshake in time"),
    }
}

/// A connection in the open-connections gauge from its accept until its task ends (or is
/// dropped), whichever way it ends.
struct Open(Option<IntGauge>);

impl Open {
    fn counted(gauge: Option<IntGauge>) -> Open {
        if let Some(g) = &gauge {
            g.inc();
        }
        Open(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

/// Serves HTTP in `protocol` on `io` until the connection closes or is drained.
async fn speak<I, H, Fut, B>(
    io: I,
    protocol: Protocol,
    peer: SocketAddr,
    handler: H,
    protocols: &Protocols,
    drain: watch::Receiver<()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // HTTP/2 connections are closed once idle (`until_idle_or_drained`): what they do is
    // counted, and `activity` is `Some` exactly for them. An HTTP/1 connection's idle wait for
    // its next head is hyper's header timeout.
    let activity = (protocol == Protocol::Http2).then(|| Arc::new(Activity::default()));
    let counted = activity.clone();
    // Boxed: hyper keeps the slot of the request in flight for the connection's life, sized for
    // the handler's future (the proxy's is ~4.7 KB, the whole path down to the upstream
    // exchange), so an idle connection keeps a pointer instead of ~9 KB; and a move of a box is
    // 8 bytes, one allocation cheaper than the copies (3 % of the CPU per request).
    let service = service_fn(move |req| {
        let running = counted.as_ref().map(Activity::begin);
        let fut = Box::pin(handler(req, peer));
        async move {
            // Run in the stream's own task (HTTP/2), whose watch the answer's body marks.
            let stall = running.as_ref().and_then(|_| Stall::current());
            let response = fut.await.map(|body| Guarded {
                body,
                running,
                stall,
                rest: Bytes::new(),
            });
            Ok::<_, Infallible>(response)
        }
    });
    let io = TokioIo::new(WatchedIo::new(io, protocols.send_stall));
    let ended = match activity {
        None => {
            let conn = pin!(protocols
                .http1
                .serve_connection(io, service)
                .with_upgrades());
            until_drained(conn, http1::UpgradeableConnection::graceful_shutdown, drain).await
        }
        Some(activity) => {
            // Boxed so that the task of every HTTP/1 connection is not sized for HTTP/2's state.
            let mut conn = Box::pin(protocols.http2.serve_connection(io, service));
            let times = (protocols.header_timeout, protocols.send_stall);
            let close = http2::Connection::graceful_shutdown;
            until_idle_or_drained(conn.as_mut(), close, &activity, times, drain).await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// What an HTTP/2 connection has done: requests begun, and requests under way.
#[derive(Default)]
struct Activity {
    begun: AtomicU64,
    running: AtomicUsize,
}

/// A request under way (its handler, then its answer's body); counted in
/// [`Activity::running`] until dropped.
struct Running(Arc<Activity>);

impl Activity {
    fn begin(this: &Arc<Activity>) -> Running {
        this.begun.fetch_add(1, Ordering::Relaxed);
        this.running.fetch_add(1, Ordering::Relaxed);
        Running(Arc::clone(this))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// An answer's body, with its request's [`Running`] guard (HTTP/2's; `None` on HTTP/1)
    /// beside it: the request is under way until hyper drops the body, at its end or with the
    /// stream. On HTTP/2 it also tells its stream's watch ([`Stall`]) whether a piece it gave
    /// is still with the client, and gives its data in pieces of at most [`STALL_PIECE`]: h2
    /// asks for the next piece only once the last has gone out whole, so a client that takes a
    /// large frame slowly but steadily shows progress piece by piece. Everything else is the
    /// body's own, its size hint too (an HTTP/1 answer of known length keeps its
    /// `Content-Length`).
    struct Guarded<B> {
        #[pin]
        body: B,
        running: Option<Running>,
        stall: Option<Arc<Stall>>,
        // What is left of a data frame given in pieces.
        rest: Bytes,
    }
}

/// The largest piece of an HTTP/2 answer given at once: h2's default frame size, so that no
/// frame is split that h2 would not split anyway.
const STALL_PIECE: usize = 16 * 1024;

impl<B: http_body::Body<Data = Bytes>> http_body::Body for Guarded<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        use std::task::Poll;
        let this = self.project();
        let Some(stall) = this.stall else {
            return this.body.poll_frame(cx);
        };
        stall.asked();
        if !this.rest.is_empty() {
            let piece = this.rest.split_to(this.rest.len().min(STALL_PIECE));
            stall.gave();
            return Poll::Ready(Some(Ok(http_body::Frame::data(piece))));
        }
        let frame = match this.body.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        stall.gave();
        let frame = match frame.into_data() {
            Ok(mut data) if data.len() > STALL_PIECE => {
                *this.rest = data.split_off(STALL_PIECE);
                http_body::Frame::data(data)
            }
            Ok(data) => http_body::Frame::data(data),
            Err(frame) => frame,
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let mut hint = self.body.size_hint();
        if !self.rest.is_empty() {
            let rest = self.rest.len() as u64;
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper.saturating_add(rest));
            }
            hint.set_lower(hint.lower().saturating_add(rest));
        }
        hint
    }
}

/// [`until_drained`] for HTTP/2, which hyper never closes for idleness (its header timeout is
/// HTTP/1's, and a client answers keep-alive pings however long it is idle). With `(idle,
/// linger)`, looked at every `idle`:
/// - a connection on which no request has begun since the last look and none is under way (its
///   handler or its answer's body) is asked to close (GOAWAY), as is every connection once the
///   drain starts;
/// - after that, once nothing has been under way on it for `linger` (the send stall's limit),
///   it is dropped. A live client answers the GOAWAY's PING and hyper closes the connection
///   well before; one that never does (it reads nothing, or keeps the connection busy with PINGs
///   of its own) is not waited on for ever, and a client still reading the tail of an answer
///   whose body hyper has already let go of gets as long as a stalled write would.
///
/// Without this a client could hold a connection (its task and file descriptor) for ever by
/// opening it and sending nothing.
async fn until_idle_or_drained<C>(
    mut conn: Pin<&mut C>,
    graceful_shutdown: fn(Pin<&mut C>),
    activity: &Activity,
    (idle, linger): (Duration, Duration),
    mut drain: watch::Receiver<()>,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    let running = || activity.running.load(Ordering::Relaxed) > 0;
    let mut seen = activity.begun.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            ended = conn.as_mut() => return ended,
            _ = drain.changed() => break,
            () = tokio::time::sleep(idle) => {
                let begun = activity.begun.load(Ordering::Relaxed);
                if begun == seen && !running() {
                    break;
                }
                seen = begun;
            }
        }
    }
    graceful_shutdown(conn.as_mut());
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            ended = conn.as_mut() => return ended,
            () = tokio::time::sleep(idle.min(linger)) => {
                if running() {
                    quiet_since = tokio::time::Instant::now();
                } else if quiet_since.elapsed() >= linger {
                    return Ok(());
                }
            }
        }
    }
}

/// Drives `conn` to its end; once the drain starts, asks it to finish its requests and close.
/// Takes the connection pinned by the caller: moved in, it would take room twice in the task.
async fn until_drained<C>(
    mut conn: Pin<&mut C>,
    graceful_shutdown: fn(Pin<&mut C>),
    mut drain: watch::Receiver<()>,
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::select! {
        ended = conn.as_mut() => return ended,
        _ = drain.changed() => graceful_shutdown(conn.as_mut()),
    }
    conn.await
}

/// [`sniff`] within `timeout`; `None` (logged) when the connection fails or stays silent.
async fn first_bytes(stream: &TcpStream, peer: SocketAddr, timeout: Duration) -> Option<Protocol> {
    match tokio::time::timeout(timeout, sniff(stream)).await {
        Ok(Ok(protocol)) => protocol,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection failed before a request");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "no request head in time");
            None
        }
    }
}

/// The protocol of a cleartext connection, from its first bytes, which stay in the socket for
/// hyper to read (`peek`, so no buffer of ours is handed over); `None` when it closes first.
///
/// Almost always the first segment decides. Only when the bytes so far are a beginning of the
/// HTTP/2 preface ("P", "PR", … a split preface) is there nothing new to wait on (the socket
/// stays readable with them): it looks again after a short, doubling delay. The caller bounds
/// the whole by the header timeout.
async fn sniff(stream: &TcpStream) -> std::io::Result<Option<Protocol>> {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut delay = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Ok(None);
        }
        if !H2_PREFACE.starts_with(&first[..n]) {
            return Ok(Some(Protocol::Http1));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(Protocol::Http2));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(SNIFF_MAX_DELAY);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const IDLE: Duration = Duration::from_millis(200);
    const LINGER: Duration = Duration::from_millis(500);

    /// A listener on a free port (header timeout [`IDLE`], send stall [`LINGER`]) answering
    /// "ok"; dropping the sender stops it.
    async fn listening() -> (SocketAddr, watch::Sender<bool>) {
        listening_with(IDLE, usize::MAX).await
    }

    async fn listening_with(
        header_timeout: Duration,
        max_connections: usize,
    ) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let (stop, shutdown) = watch::channel(false);
        let limits = ConnLimits {
            header_timeout,
            max_header_bytes: 64 * 1024,
            drain: Duration::from_secs(1),
            send_stall: LINGER,
            max_connections,
        };
        let answer = |_req: Request<Incoming>, _peer: SocketAddr| async {
            Response::new(String::from("ok"))
        };
        tokio::spawn(serve(listener, None, answer, limits, None, shutdown));
        (addr, stop)
    }

    /// The types of the HTTP/2 frames in `bytes`.
    fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
        let mut types = Vec::new();
        while bytes.len() >= 9 {
            let len =
                usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            types.push(bytes[3]);
            bytes = bytes.get(9 + len..).unwrap_or_default();
        }
        types
    }

    /// hyper never closes an idle HTTP/2 connection (its header timeout is HTTP/1's; a client
    /// answers pings). A client that sends the preface and its SETTINGS and then nothing, not
    /// even the answer to the GOAWAY's PING, is told GOAWAY after the idle period and dropped
    /// once the linger is over.
    #[tokio::test]
    async fn an_idle_http2_connection_is_told_goaway_and_dropped() {
        let (addr, _stop) = listening().await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // The preface, then an empty SETTINGS frame (length 0, type 4, no flags, stream 0).
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .expect("preface");
        let started = Instant::now();
        let mut sent = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sent))
            .await
            .expect("the idle HTTP/2 connection was still open after 5 s")
            .expect("read");
        assert!(
            started.elapsed() >= IDLE + LINGER,
            "{:?}",
            started.elapsed()
        );
        let types = frame_types(&sent);
        assert!(
            types.contains(&7),
            "no GOAWAY among the frames sent: {types:?}"
        );
    }

    /// Sends a GET on `stream` and waits up to `wait` for the start of an answer.
    async fn answered(stream: &mut TcpStream, wait: Duration) -> bool {
        let mut first = [0u8; 12];
        tokio::time::timeout(wait, stream.read_exact(&mut first))
            .await
            .is_ok_and(|read| read.is_ok() && first.starts_with(b"HTTP/1.1 200"))
    }

    /// At `max_connections` the listener stops accepting: a further connection waits in the
    /// kernel's queue, unanswered, until one of the open ones closes, and is then served.
    #[tokio::test]
    async fn past_the_connection_cap_a_connection_waits_for_one_to_close() {
        let (addr, _stop) = listening_with(Duration::from_secs(10), 2).await;
        let get = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";
        let mut open = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(get).await.expect("send");
            assert!(answered(&mut stream, Duration::from_secs(5)).await);
            open.push(stream);
        }
        let mut third = TcpStream::connect(addr)
            .await
            .expect("queued by the kernel");
        third.write_all(get).await.expect("send");
        assert!(
            !answered(&mut third, Duration::from_millis(500)).await,
            "a third connection was served past a cap of two"
        );
        drop(open.pop());
        assert!(
            answered(&mut third, Duration::from_secs(5)).await,
            "the queued connection was not served once one closed"
        );
    }

    /// The limit is read as the shell reads it (`ulimit -n`, the same soft limit, inherited).
    #[test]
    fn the_open_files_limit_is_read_as_the_shell_reads_it() {
        let shell = std::process::Command::new("sh")
            .args(["-c", "ulimit -n"])
            .output()
            .expect("sh");
        let shell = String::from_utf8_lossy(&shell.stdout).trim().to_owned();
        match open_files_limit() {
            Some(n) => {
                assert_eq!(shell, n.to_string());
                assert_eq!(
                    connection_cap(),
                    (n.saturating_sub(RESERVED_FDS) / 2).max(1)
                );
            }
            None => assert_eq!(shell, "unlimited"),
        }
    }
}
