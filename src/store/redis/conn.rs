//! The connection to Redis, single server or cluster, behind one type, and the [`Batch`] that
//! runs a method's commands in as few round trips as the topology allows.
//!
//! A single server gets one [`ConnectionManager`] (multiplexed, reconnects by itself); a cluster
//! gets one [`ClusterConnection`] (routes each command or single-slot pipeline to its node). Every
//! round trip is bounded: connection and response timeouts on the client, and a deadline here
//! per handle — [`REQUEST_DEADLINE`] for the calls a proxied request may wait on,
//! [`CALL_DEADLINE`] for the admin API and the background tasks — and every round trip goes
//! through the connection's one [`Breaker`], so that once Redis stops answering, calls fail at
//! once instead of each waiting out its deadline.
//!
//! The connection manager reconnects when its connection breaks (a reset, an end of stream), but
//! not when it merely goes quiet: a timeout is an error it retries on the same connection. A
//! connection gone half-open (a partition, a dropped NAT or conntrack entry, a proxy in front of
//! Redis that hung) would then fail every call until the kernel gave up on it, up to a quarter of
//! an hour. So any round trip that times out, at either deadline, has the connection checked in
//! the background ([`Shared::check`], one check at a time): a `PING` straight on it, past the
//! breaker, that gets no answer within [`CALL_DEADLINE`] has a single server's manager replaced.
//! A busy Redis that answers late is slow, not gone, and keeps its connection; calls that were
//! under way on a connection already replaced check the new one, which answers.
//!
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError, RedisFuture, Value};

use super::breaker::Breaker;
use crate::store::StoreError;

/// Connecting to one server or node gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A command or pipeline without an answer after this fails (and the connection is replaced).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The deadline of one round trip of the admin API or a background task (the flusher, pruning,
/// publishing), reconnection attempts included: a backstop above the client's own timeouts, so
/// that no store call waits longer, whatever state the client is in.
const CALL_DEADLINE: Duration = Duration::from_millis(2_500);
/// The deadline of one round trip that a proxied request may be waiting on (the key lookup of a
/// cache miss, a global limit's token take) and of `/readyz`'s ping. A healthy Redis answers in
/// well under a millisecond (63 µs on localhost, ~1 ms across a zone, a few ms at the p99 of a
/// busy server), so 50 ms is an order of magnitude above any healthy answer — a slow one does not
/// fail — yet short enough that a hung Redis costs a request no more than a user could notice,
/// and only until [`Breaker`] opens.
pub(super) const REQUEST_DEADLINE: Duration = Duration::from_millis(50);

/// A handle to the shared connection with its deadline per round trip; cheap to clone. Every
/// handle of one connection shares its [`Breaker`].
#[derive(Clone)]
pub(super) struct Conn {
    shared: Arc<Shared>,
    breaker: Arc<Breaker>,
    deadline: Duration,
}

/// What every handle of one connection shares: the link in use, and how to replace it.
struct Shared {
    link: parking_lot::RwLock<Link>,
    /// A single server's (a cluster connection keeps its nodes' connections itself).
    renewal: Option<Renewal>,
}

/// Clears a [`Renewal`]'s `busy` flag when dropped.
struct Done<'a>(&'a AtomicBool);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// How a single server's connection manager is made again, and whether a check (and a
/// replacement) is under way.
struct Renewal {
    client: ::redis::Client,
    config: ConnectionManagerConfig,
    busy: AtomicBool,
}

/// The two topologies, each implementing [`ConnectionLike`]; this enum does too, by delegation,
/// so that every store method is written once. Both are cheap handles to a shared connection.
#[derive(Clone)]
enum Link {
    /// `redis://host:port`.
    Single(ConnectionManager),
    /// `redis+cluster://h1:p1,h2:p2,…`.
    Cluster(ClusterConnection),
}

/// Commands of one store method, each tagged with the hash tag (hence the cluster slot) of its
/// keys. On a single server the whole batch is one pipeline: one round trip, and one
/// `MULTI`/`EXEC` when atomic. On a cluster each tag's commands are one pipeline (one
/// `MULTI`/`EXEC` when atomic) sent to its node, the tags of one step concurrently, and the steps
/// (separated by [`Batch::then`]) one after the other.
pub(super) struct Batch {
    atomic: bool,
    step: usize,
    cmds: Vec<(usize, String, Cmd)>,
}

// === impl Conn ===

impl Conn {
    /// Connects to `redis://…` (one server) or `redis+cluster://h1:p1,h2:p2,…` (a cluster, from
    /// any of its nodes); the handle has [`CALL_DEADLINE`] and a closed breaker.
    pub(super) async fn connect(url: &str) -> Result<Conn, StoreError> {
        let (link, renewal) = Link::connect(url).await?;
        Ok(Conn {
            shared: Arc::new(Shared {
                link: parking_lot::RwLock::new(link),
                renewal,
            }),
            breaker: Arc::new(Breaker::new()),
            deadline: CALL_DEADLINE,
        })
    }

    /// Another handle to the same connection and breaker, whose round trips have `deadline`.
    pub(super) fn with_deadline(&self, deadline: Duration) -> Conn {
        Conn {
            deadline,
            ..self.clone()
        }
    }

    /// The breaker all handles of this connection share.
    pub(super) fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub(super) fn is_cluster(&self) -> bool {
        self.shared.renewal.is_none()
    }

    /// Runs one command.
    pub(super) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut link = self.shared.link.read().clone();
        let attempt = async {
            match cmd.query_async::<Value>(&mut link).await {
                Err(e) if link.never_sent(&e) => cmd.query_async::<Value>(&mut link).await,
                other => other,
            }
        };
        let value = self.round_trip(attempt).await?;
        decode(value)
    }

    /// Runs a batch; the answers come back in the order the commands were added.
    pub(super) async fn run(&self, batch: Batch) -> Result<Vec<Value>, StoreError> {
        if batch.cmds.is_empty() {
            return Ok(Vec::new());
        }
        let total = batch.cmds.len();
        if !self.is_cluster() {
            let mut pipe = Pipeline::with_capacity(total);
            if batch.atomic {
                pipe.atomic();
            }
            for (_, _, cmd) in batch.cmds {
                pipe.add_command(cmd);
            }
            return self.run_pipeline(pipe).await;
        }

        let mut answers: Vec<Option<Value>> = vec![None; total];
        let last_step = batch.cmds.iter().map(|(s, _, _)| *s).max().unwrap_or(0);
        let mut cmds: Vec<Option<(usize, String, Cmd)>> =
            batch.cmds.into_iter().map(Some).collect();
        for step in 0..=last_step {
            // One pipeline per tag, in the order the tags first appear.
            let mut groups: Vec<(String, Vec<usize>, Pipeline)> = Vec::new();
            for (position, slot) in cmds.iter_mut().enumerate() {
                if slot.as_ref().is_none_or(|(s, _, _)| *s != step) {
                    continue;
                }
                let Some((_, tag, cmd)) = slot.take() else {
                    continue;
                };
                let group = match groups.iter().position(|(t, _, _)| *t == tag) {
                    Some(i) => &mut groups[i],
                    None => {
                        let mut pipe = Pipeline::new();
                        if batch.atomic {
                            pipe.atomic();
                        }
                        groups.push((tag, Vec::new(), pipe));
                        let last = groups.len() - 1;
                        &mut groups[last]
                    }
                };
                group.1.push(position);
                group.2.add_command(cmd);
            }
            let mut positions_of = Vec::with_capacity(groups.len());
            let mut futures: Vec<BoxedRun<'_>> = Vec::with_capacity(groups.len());
            for (_, positions, pipe) in groups {
                positions_of.push(positions);
                futures.push(Box::pin(self.run_pipeline(pipe)));
            }
            let results = join_all(futures).await;
            for (positions, result) in positions_of.iter().zip(results) {
                let values = result?;
                if values.len() != positions.len() {
                    return Err(StoreError::Corrupt(format!(
                        "redis answered {} replies to {} commands",
                        values.len(),
                        positions.len()
                    )));
                }
                for (position, value) in positions.iter().zip(values) {
                    answers[*position] = Some(value);
                }
            }
        }
        Ok(answers
            .into_iter()
            .map(|v| v.unwrap_or(Value::Nil))
            .collect())
    }

    async fn run_pipeline(&self, pipe: Pipeline) -> Result<Vec<Value>, StoreError> {
        let mut link = self.shared.link.read().clone();
        let attempt = async {
            match pipe.query_async::<Vec<Value>>(&mut link).await {
                Err(e) if link.never_sent(&e) => pipe.query_async::<Vec<Value>>(&mut link).await,
                other => other,
            }
        };
        self.round_trip(attempt).await
    }

    /// One round trip: through the breaker (refused at once while it is open), bounded by this
    /// handle's deadline. One without an answer has the connection checked.
    async fn round_trip<T>(
        &self,
        attempt: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        let bounded = async {
            let result = deadline(self.deadline, attempt).await;
            if result.as_ref().is_err_and(RedisError::is_timeout) {
                Shared::check(&self.shared);
            }
            result
        };
        self.breaker.call(bounded).await
    }
}

// === impl Shared ===

impl Shared {
    /// Checks a single server's connection in the background (one check at a time): a `PING`
    /// on it that gets no answer within [`CALL_DEADLINE`] has the manager replaced. A check
    /// pings the link in use, so calls that time out on a link already replaced check the new
    /// one, which answers. Calls made after a replacement go over the new connection; the old
    /// one closes when the calls still on it end.
    fn check(this: &Arc<Shared>) {
        let Some(renewal) = &this.renewal else {
            return;
        };
        if renewal.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let shared = Arc::clone(this);
        tokio::spawn(async move {
            let Some(renewal) = &shared.renewal else {
                return;
            };
            // Cleared however the check ends (a panic, the runtime shutting down mid-way).
            let _done = Done(&renewal.busy);
            let mut link = shared.link.read().clone();
            let ping = ::redis::cmd("PING");
            let answer = deadline(CALL_DEADLINE, ping.query_async::<Value>(&mut link)).await;
            // An answer, however late, is a live connection; a broken one the manager
            // replaces by itself.
            if answer.is_err_and(|e| e.is_timeout()) {
                shared.replace(renewal).await;
            }
        });
    }

    /// Makes a new manager and puts it in place of the one in use.
    async fn replace(&self, renewal: &Renewal) {
        let fresh =
            ConnectionManager::new_with_config(renewal.client.clone(), renewal.config.clone());
        match deadline(CALL_DEADLINE, fresh).await {
            Ok(fresh) => {
                *self.link.write() = Link::Single(fresh);
                tracing::warn!(
                    "redis did not answer a ping within {} ms; connection replaced",
                    CALL_DEADLINE.as_millis()
                );
            }
            Err(e) => tracing::debug!(error = %e, "replacing the redis connection failed"),
        }
    }
}

// === impl Link ===

impl Link {
    /// The link to `url`, and how to make it again when it is a single server's.
    async fn connect(url: &str) -> Result<(Link, Option<Renewal>), StoreError> {
        let shown = redact(url);
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let nodes = cluster_nodes(rest)?;
            let client = ClusterClientBuilder::new(nodes)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                // Retries are for redirections and node failover; keep them few and quick so
                // that an unreachable cluster still fails a call within the deadline.
                .retries(2)
                .min_retry_wait(10)
                .max_retry_wait(200)
                .build()
                .map_err(|e| StoreError::Unavailable(format!("redis cluster {shown}: {e}")))?;
            let conn = deadline(CALL_DEADLINE, client.get_async_connection())
                .await
                .map_err(|e| {
                    unavailable(&format!("cannot connect to redis cluster {shown}"), &e)
                })?;
            return Ok((Link::Cluster(conn), None));
        }
        if !url.starts_with("redis://") {
            return Err(StoreError::Unavailable(format!(
                "unsupported redis url {shown:?}: expected redis://host:port or \
                 redis+cluster://host:port,host:port,…"
            )));
        }
        let client = ::redis::Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("redis url {shown:?}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT)
            // No backoff inside a reconnection (its first retry alone sleeps 1–2 s): a failed
            // reconnection is tried again by the next call, see `never_sent`.
            .set_number_of_retries(0);
        let conn = deadline(
            CALL_DEADLINE,
            ConnectionManager::new_with_config(client.clone(), config.clone()),
        )
        .await
        .map_err(|e| unavailable(&format!("cannot connect to redis {shown}"), &e))?;
        let renewal = Renewal {
            client,
            config,
            busy: AtomicBool::new(false),
        };
        Ok((Link::Single(conn), Some(renewal)))
    }

    /// The connection manager answers a call with the error of the last failed reconnection
    /// (without sending anything) and only then starts a new one. Such a call is safe to repeat
    /// at once, on the new connection: so the first call after Redis comes back (the breaker's
    /// probe) succeeds, however long ago the last reconnection failed. (The manager marks these errors only in their
    /// message; if that changes, the call simply fails as before.)
    ///
    /// Likewise a write that failed with a broken pipe or a reset connection on a connection
    /// that Redis closed (it restarted) reached nobody; the manager reconnects on that error.
    fn never_sent(&self, e: &RedisError) -> bool {
        if !matches!(self, Link::Single(_)) || !e.is_io_error() {
            return false;
        }
        let text = e.to_string();
        text.contains("Reconnecting failed")
            || text.contains("broken pipe")
            || text.contains("Broken pipe")
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Link::Single(conn) => conn.req_packed_command(cmd),
            Link::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Link::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Link::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Link::Single(conn) => conn.get_db(),
            Link::Cluster(conn) => conn.get_db(),
        }
    }
}

// === impl Batch ===

impl Batch {
    /// Writes: one `MULTI`/`EXEC` per slot (per batch on a single server).
    pub(super) fn atomic() -> Batch {
        Batch {
            atomic: true,
            step: 0,
            cmds: Vec::new(),
        }
    }

    /// Reads: plain pipelines.
    pub(super) fn read() -> Batch {
        Batch {
            atomic: false,
            step: 0,
            cmds: Vec::new(),
        }
    }

    /// Adds a command whose keys all carry the hash tag `tag`; returns its answer's position.
    pub(super) fn add(&mut self, tag: &str, cmd: Cmd) -> usize {
        self.cmds.push((self.step, tag.to_owned(), cmd));
        self.cmds.len() - 1
    }

    /// On a cluster, the commands added from now on are sent once the earlier ones succeeded.
    pub(super) fn then(&mut self) {
        self.step += 1;
    }

    pub(super) fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }
}

type BoxedRun<'a> = Pin<Box<dyn Future<Output = Result<Vec<Value>, StoreError>> + Send + 'a>>;

/// Polls the futures together and returns their outputs in order (the slots of one cluster
/// step go out concurrently, so the step costs one round trip).
async fn join_all<T>(futures: Vec<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut pending: Vec<_> = futures.into_iter().map(Some).collect();
    let mut outputs: Vec<Option<T>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for (slot, output) in pending.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => {
                        *output = Some(value);
                        *slot = None;
                    }
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// Bounds one round trip by `limit`.
async fn deadline<T>(
    limit: Duration,
    future: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, RedisError> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        // A timeout as the client's own are (`is_timeout`), with the text the soak test reads.
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from redis within {} ms", limit.as_millis()),
        ))),
    }
}

/// The URL with any `user:password@` replaced by `***@`, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// `h1:p1,h2:p2` (optionally `user:pass@` before the list) → `redis://…` per node.
pub(super) fn cluster_nodes(list: &str) -> Result<Vec<String>, StoreError> {
    let (auth, hosts) = match list.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), list),
    };
    let nodes: Vec<String> = hosts
        .trim_end_matches('/')
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{auth}{h}"))
        .collect();
    if nodes.is_empty() {
        return Err(StoreError::Unavailable(format!(
            "redis+cluster url names no node: {list:?}"
        )));
    }
    Ok(nodes)
}

/// Redis failed or could not be reached: the call may be retried. A reply of the wrong shape
/// (`WRONGTYPE`, or a type the caller did not expect) is a corrupt record instead.
pub(super) fn redis_err(e: &RedisError) -> StoreError {
    if e.kind() == ErrorKind::TypeError || e.code() == Some("WRONGTYPE") {
        return StoreError::Corrupt(format!("unexpected redis reply: {e}"));
    }
    StoreError::Unavailable(format!("redis: {e}"))
}

fn unavailable(context: &str, e: &RedisError) -> StoreError {
    StoreError::Unavailable(format!("{context}: {e}"))
}

/// Converts one answer to the type expected.
pub(super) fn decode<T: FromRedisValue>(value: Value) -> Result<T, StoreError> {
    ::redis::from_owned_redis_value(value)
        .map_err(|e| StoreError::Corrupt(format!("unexpected redis reply: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_every_node() {
        assert_eq!(
            cluster_nodes("h1:7000,h2:7001").unwrap(),
            vec!["redis://h1:7000", "redis://h2:7001"]
        );
        assert_eq!(
            cluster_nodes("u:p@h1:7000, h2:7001/").unwrap(),
            vec!["redis://u:p@h1:7000", "redis://u:p@h2:7001"]
        );
        assert!(cluster_nodes("").is_err());
    }

    #[test]
    fn messages_never_show_passwords() {
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://***@h:1/0");
        assert_eq!(
            redact("redis+cluster://:s@a:1,b:2"),
            "redis+cluster://***@a:1,b:2"
        );
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
