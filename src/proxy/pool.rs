//! Upstream connections: HTTP/1.1 keep-alive connections kept idle per thread, over TCP or, for
//! `https://` upstreams, TLS (rustls; SNI and the certificate checked against the upstream's
//! host, within the same connect deadline).
//!
//! Taking a connection and giving it back touches only the current thread's idle list: no lock
//! shared between threads, no task spawned per request (hyper-util's pooled client takes a
//! mutex per checkout and spawns a readiness task per response; the team's performance notes
//! measured the pooled client ~18 % dearer than pinned connections on one core). A connection
//! goes back to the list of the thread that finishes its response body ([`Checkin`], kept by
//! the response body and given back when that body has ended); one whose response was cut off,
//! or that was upgraded, is closed instead. Idle connections older than [`IDLE_TIMEOUT`] or
//! closed by the upstream are dropped when met.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::sync::Arc;

use http::uri::Authority;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use quanta::Instant;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::body::RequestBody;

/// How long a new upstream connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle connection older than this is closed rather than reused (below the 60–75 s that
/// common upstream servers keep an idle connection, so that tollgate closes first).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Idle connections kept per upstream and thread; more are closed.
const MAX_IDLE: usize = 512;
/// Upstreams a pool numbers before a reload starts a new pool instead of continuing it
/// ([`Pool::continued`]): each reload may add the `https://` upstreams again (a new TLS client
/// is a new upstream), so continuing forever would grow without bound.
const MAX_PEERS: usize = 1024;

/// Distinguishes the pools of gateways that share a process (tests start many).
static NEXT_POOL: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static IDLE: RefCell<Vec<IdleList>> = const { RefCell::new(Vec::new()) };
    /// When this thread last closed its expired idle connections ([`purge_expired`]).
    static PURGED: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The idle connections to one upstream on one thread.
struct IdleList {
    key: PoolKey,
    conns: Vec<Idle>,
}

struct Idle {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// Which list a connection belongs to: the pool, and the upstream's slot in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolKey {
    pool: u64,
    slot: usize,
}

/// A gateway's upstream connections. Upstreams are numbered by [`Pool::slot`] at start-up.
pub struct Pool {
    id: u64,
    peers: Vec<Peer>,
}

/// One upstream to connect to: where, and with which TLS client (none: cleartext).
#[derive(Clone)]
struct Peer {
    authority: Authority,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A connection ready to carry one request.
pub struct Conn {
    key: PoolKey,
    /// The connection's sender.
    pub sender: SendRequest<RequestBody>,
    /// Whether it was made for this request (a fresh connection is not retried on).
    pub fresh: bool,
}

/// A connection whose response is still streaming; give it back with [`Checkin::give_back`]
/// once the response body has ended.
pub struct Checkin {
    key: PoolKey,
    sender: SendRequest<RequestBody>,
}

// === impl Pool ===

impl Pool {
    /// A pool with no upstreams yet.
    pub fn new() -> Self {
        Pool {
            id: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
            peers: Vec::new(),
        }
    }

    /// A pool for a reloaded config that continues this one: the same upstreams in the same
    /// slots, so that those the new routes still use keep their idle connections (whose lists
    /// are keyed by pool and slot); new ones are added by [`Pool::slot`]. The idle connections
    /// of upstreams no route uses any more are closed once they expire ([`purge_expired`]).
    pub fn continued(&self) -> Pool {
        if self.peers.len() >= MAX_PEERS {
            return Pool::new();
        }
        Pool {
            id: self.id,
            peers: self.peers.clone(),
        }
    }

    /// The slot of `authority` reached with `tls` (`None`: cleartext), added when new. Called
    /// while building the route table; routes with the same upstream and TLS client share
    /// connections.
    pub fn slot(
        &mut self,
        authority: &Authority,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> usize {
        let same_tls = |p: &Peer| match (&p.tls, tls) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if let Some(i) = self
            .peers
            .iter()
            .position(|p| p.authority == *authority && same_tls(p))
        {
            return i;
        }
        self.peers.push(Peer {
            authority: authority.clone(),
            tls: tls.cloned(),
        });
        self.peers.len() - 1
    }

    /// An idle connection to the upstream in `slot`, else a new one.
    pub async fn checkout(&self, slot: usize) -> io::Result<Conn> {
        let key = PoolKey {
            pool: self.id,
            slot,
        };
        while let Some(mut sender) = take_idle(key) {
            // A connection given back as its response ended may not have been polled into its
            // idle state yet; it is ready at once after that, or reports that it closed.
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Ok(Conn {
                    key,
                    sender,
                    fresh: false,
                });
            }
        }
        self.connect(key).await
    }

    async fn connect(&self, key: PoolKey) -> io::Result<Conn> {
        let peer = self
            .peers
            .get(key.slot)
            .ok_or_else(|| io::Error::other("unknown upstream slot"))?;
        let host = peer
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let connecting = async {
            let port =
                peer.authority
                    .port_u16()
                    .unwrap_or(if peer.tls.is_some() { 443 } else { 80 });
            let stream = TcpStream::connect((host, port)).await?;
            stream.set_nodelay(true)?;
            let Some(tls) = &peer.tls else {
                return handshake(stream).await;
            };
            let name = ServerName::try_from(host.to_owned())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = TlsConnector::from(Arc::clone(tls))
                .connect(name, stream)
                .await?;
            handshake(stream).await
        };
        let sender = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "upstream connect timed out"))??;
        Ok(Conn {
            key,
            sender,
            fresh: true,
        })
    }
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

// === impl Conn ===

impl Conn {
    /// The connection, to be given back when the response body ends.
    pub fn into_checkin(self) -> Checkin {
        Checkin {
            key: self.key,
            sender: self.sender,
        }
    }
}

// === impl Checkin ===

impl Checkin {
    /// Puts the connection on this thread's idle list (or closes it when the list is full).
    pub fn give_back(self) {
        if self.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        purge_expired(now);
        let idle = Idle {
            sender: self.sender,
            since: now,
        };
        // `try_with`: a body dropped while its thread exits just closes the connection.
        let _ = IDLE.try_with(|lists| {
            let mut lists = lists.borrow_mut();
            let list = match lists.iter().position(|l| l.key == self.key) {
                Some(i) => &mut lists[i],
                None => {
                    lists.push(IdleList {
                        key: self.key,
                        conns: Vec::new(),
                    });
                    let last = lists.len() - 1;
                    &mut lists[last]
                }
            };
            if list.conns.len() < MAX_IDLE {
                list.conns.push(idle);
            }
        });
    }
}

/// HTTP/1.1 over `io`, its connection driven by a task of its own.
async fn handshake<I>(io: I) -> io::Result<SendRequest<RequestBody>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Once per [`IDLE_TIMEOUT`] on each thread: closes this thread's expired idle connections in
/// every list, and drops emptied lists. Lists are otherwise only looked at for their own
/// upstream, so those of an upstream that a reload removed would keep their connections open.
fn purge_expired(now: Instant) {
    let due = PURGED
        .try_with(|last| match last.get() {
            Some(at) if now.duration_since(at) < IDLE_TIMEOUT => false,
            _ => {
                last.set(Some(now));
                true
            }
        })
        .unwrap_or(false);
    if !due {
        return;
    }
    let _ = IDLE.try_with(|lists| {
        let mut lists = lists.borrow_mut();
        for list in lists.iter_mut() {
            list.conns
                .retain(|idle| now.duration_since(idle.since) < IDLE_TIMEOUT);
        }
        lists.retain(|list| !list.conns.is_empty());
    });
}

/// The most recently idled live connection of `key` on this thread (it is the warmest, and the
/// oldest ones are the first to expire).
fn take_idle(key: PoolKey) -> Option<SendRequest<RequestBody>> {
    IDLE.try_with(|lists| {
        let mut lists = lists.borrow_mut();
        let list = lists.iter_mut().find(|l| l.key == key)?;
        let now = Instant::now();
        while let Some(idle) = list.conns.pop() {
            if now.duration_since(idle.since) < IDLE_TIMEOUT && !idle.sender.is_closed() {
                return Some(idle.sender);
            }
        }
        None
    })
    .ok()
    .flatten()
}
