//! The Redis store: the same [`Store`] on one Redis server (`redis://host:port`) or on a Redis
//! Cluster (`redis+cluster://h1:p1,h2:p2,…`), shared by every gateway instance.
//!
//! Records are JSON (`serde_json`), as in the embedded store, so that a field added with a serde
//! default reads older records. Redis errors become [`StoreError::Unavailable`]; records or
//! replies that do not decode become [`StoreError::Corrupt`]. The connection comes back by itself.
//!
//! # A hung Redis fails like a dead one
//!
//! Every round trip has a deadline: 50 ms for what a proxied request may wait on
//! ([`Records::lookup_key`](crate::store::Records::lookup_key), [`LimitBuckets::take_tokens`](crate::store::LimitBuckets::take_tokens)) and for [`Store::ping`] (readiness), 2.5 s
//! for the admin API and the background tasks (with the client's 2 s connection and response
//! timeouts below it). And every round trip goes through one circuit breaker (`breaker.rs`):
//! three outages in a row open it, calls then fail at once without touching the socket, one
//! probe a second tries again, and its success closes it. So a Redis that stops answering costs
//! a request at most 50 ms, and once the breaker is open nothing; the key cache never waits
//! for a key it holds at all (see `auth::cache`).
//!
//! # Data model
//!
//! Every key starts with `tg:`. One account's records share the hash tag `{acc_id}`, so they
//! live in one cluster slot and one script or `MULTI` can check and change them together. A
//! key's usage buckets carry the key's own tag `{key_id}` instead, because the usage methods are
//! given a key id without its account. Operator-level singletons share `{_global}`, the usage
//! indexes `{_usage}`; the hash index has one key per hash so that lookups spread over the
//! cluster.
//!
//! | key                                  | type   | contents                                        | TTL        | why |
//! |--------------------------------------|--------|-------------------------------------------------|------------|-----|
//! | `tg:{acc}:account`                   | string | account JSON                                    | —          | the account |
//! | `tg:{acc}:keys`                      | set    | the account's key ids                           | —          | listing its keys; deleting them with it |
//! | `tg:{acc}:key:{key}`                 | hash   | `json` (key JSON), `name`, `hash` (hex)         | —          | the key; name and hash beside the JSON so scripts read them without parsing |
//! | `tg:{acc}:names`                     | hash   | key name, ASCII-lowercased → key id; `""` → `folded` | —     | uniqueness of key names within the account, ignoring ASCII case |
//! | `tg:{acc}:sites`                     | hash   | site id → site JSON                             | —          | the account's sites (read with the key on lookup) |
//! | `tg:{acc}:site_names`                | hash   | origin → site id                                | —          | uniqueness of site names within the account |
//! | `tg:{acc}:audit`                     | list   | audit JSON + `account_id`, newest first         | —          | one account's audit log (kept when the account goes) |
//! | `tg:{acc}:audit_head`                | string | [`ChainHead`] JSON: the newest chained entry's id and hash | — | the account's audit chain ([`audit`]); kept with the log |
//! | `tg:{acc}:account_usage:d`           | zset   | day index (member = score)                      | day TTL    | the account's day buckets in a range, for reads and pruning |
//! | `tg:{acc}:account_usage:d:{day}`     | hash   | `requests success error rate_limited bytes_in bytes_out` | day TTL | the account's day bucket (sum over its keys) |
//! | `tg:{key}:usage:{m,h,d}`             | zset   | bucket index (member = score)                   | per granularity | a key's buckets in a range: one `ZRANGEBYSCORE` |
//! | `tg:{key}:usage:{m,h,d}:{index}`     | hash   | the six counters (`HINCRBY`)                    | per granularity | a key's minute, hour or day bucket |
//! | `tg:{slot tag}:usage_writer:{writer}` | string | the last usage batch (`seq`) applied from one flusher to this slot's buckets | 1 day ([`BATCH_MEMORY`]), renewed per batch | [`Usage::add_usage`](crate::store::Usage::add_usage) exactly once: a retried batch is not counted again |
//! | `tg:keyhash:{hex}`                   | string | `acc_id` `\n` `key_id`                          | —          | [`Records::lookup_key`](crate::store::Records::lookup_key); uniqueness of key hashes |
//! | `tg:{_global}:accounts`              | set    | account ids                                     | —          | [`Records::list_accounts`](crate::store::Records::list_accounts) |
//! | `tg:{_global}:audit`                 | list   | every audit JSON + `account_id`, newest first   | —          | [`AuditLog::list_audit`](crate::store::AuditLog::list_audit) over all accounts |
//! | `tg:{_global}:master_key_hash`       | string | hex                                             | —          | the operator's master key hash |
//! | `tg:{_global}:imported_keys`         | string | how many keys are marked `imported` (`INCRBY`)  | —          | [`Records::has_imported_keys`](crate::store::Records::has_imported_keys), fleet-wide; never below the truth |
//! | `tg:{_usage}:owners:{m,h,d}`         | zset   | bucket index key → (at most) its lowest index   | —          | [`Usage::prune_usage`](crate::store::Usage::prune_usage) finds the owners of old buckets without a scan |
//! | `tg:{_usage}:last_used`              | zset   | key id → last use (ms)                          | —          | `ZADD GT` keeps the maximum; `ZMSCORE` reads many in one call |
//!
//! Bucket TTLs are a backstop behind [`Usage::prune_usage`](crate::store::Usage::prune_usage), renewed on every write (defaults:
//! minute 7 days, hour 400 days, day none; see [`RedisStore::with_bucket_ttl`]). Lists are sorted
//! oldest first by `(created_at, id)` after reading; audit lists are newest first by push order.
//! The audit entry's `account_id` is not part of its serialized JSON, so the stored JSON carries
//! it as an extra field, as in the embedded store.
//!
//! # Atomicity and round trips
//!
//! On a single server every write is atomic: a method's writes go in one `MULTI`/`EXEC` or one
//! Lua script (checks and writes together). On a cluster a script or `MULTI` cannot span slots,
//! so writes that touch an account's slot *and* a global key are two steps, each atomic, ordered
//! so that a failure between them leaves only an index entry that readers ignore:
//!
//! | method | single server | cluster |
//! |---|---|---|
//! | `create_account` | 1 RT, one `MULTI` (`SADD` list + `SET NX`) | 2 RT: add to the account list, then `SET NX` the record (a stray list entry is skipped) |
//! | `update_account`, `get_account`, `ping`, `master_key_hash`, `set_master_key_hash`, `list_sites`, `create_site`, `delete_site`, `last_used` | 1 RT, atomic | same |
//! | `list_accounts`, `list_keys` | 2 RT (ids, then records) | same (records of many slots concurrently) |
//! | `lookup_key` | 2 RT: hash index, then key + account + sites in one `MULTI` | same |
//! | `create_key` | 1 RT: one script checks name, id and hash and writes record, key ids, name and hash index | 2 RT: claim the hash index (`SET NX`), then the account-slot script; the claim is undone if the script refuses |
//! | `create_keys` (a batch of one account's keys, all or none) | 2 RT: count imported keys up (`INCRBY`, when any), then one script checks every name, id and hash and writes them all; refused: the count back down | 3–4 RT: count up, claim every hash index (`SET NX`, all slots at once; `GET` the ones already set, which may be this batch's own retry), then the account-slot script; claims undone and count back down if either refuses |
//! | `has_imported_keys` | 1 RT (`GET`) | same |
//! | `update_key` | 1 RT, one script (name move + record) | same |
//! | `delete_key` | 2 RT: script (record, name, key ids), then compare-and-delete of the hash index (and the imported count down, for an imported key) | same |
//! | `delete_account` | 3 RT: read key ids; one script deletes account, keys, names, sites if the key ids are unchanged (else re-read); then hash indexes and list entry | same, the last step concurrently per slot |
//! | `append_audit` | 2 RT: `GET` the chain head, then one script (account list, head, global list) if the head has not moved, else again from the head it answers | 3 RT: the same script without the global list, then the global list |
//! | `audit_head`, `audit_chain_page` | 1 RT (`GET`; `LRANGE` counted from the tail) | same |
//! | `list_audit` | 1 RT (`LLEN` + `LRANGE` page when unfiltered, else the whole list filtered here) | same |
//! | `add_usage` | 1 RT, one `MULTI`: one `ADD_USAGE` script (writer marker, `HINCRBY`s, indexes) + owners and `ZADD GT` last use | 1 RT: one `ADD_USAGE` script per slot, all slots concurrently |
//! | `key_usage`, `account_usage` | 2 RT: `ZRANGEBYSCORE`, then one pipeline of `HMGET`s | same |
//! | `prune_usage` | 4 RT per 256 owners: owners, their old indexes, one `MULTI` deleting buckets, owner scores | same, per slot concurrently |
//!
//! Usage is counted exactly once per batch ([`BatchId`]): the `ADD_USAGE` script first compares
//! the batch's number with its writer's marker in that slot (`tg:{slot tag}:usage_writer:{w}`,
//! the slot tag being `_usage` on a single server and, on a cluster, a short tag `_s…` of that
//! very slot, so there is one marker per slot and writer whatever the batch ids) and returns
//! without a change if the batch was applied before; otherwise it sets the marker and adds the
//! counts in the same script, so that Redis runs both or neither. A flusher retries a failed batch
//! unchanged until it is taken, so on a cluster a slot that took its part before a failure
//! elsewhere skips it on the retry. The owners and last-use indexes keep a minimum and a maximum
//! and so are safe to apply twice. The marker lives a day past its writer's last batch: a batch
//! applied, unanswered, and then retried more than a day later would count twice.
//!
//! What a cluster cannot give: `append_audit` may land in one list and not the other; a key or account deletion
//! that fails after its records went leaves hash index entries pointing at nothing (lookups ignore
//! them, but `create_key` with that same hash is refused until they are gone). Key ids are unique
//! within their account (keys of two accounts are in two slots); generated ids never collide.
//! Like any remote store, a call that times out may still have been applied.

mod breaker;
mod conn;
mod keys;
mod scripts;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::redis::Value;
use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

use self::conn::{decode, Conn, REQUEST_DEADLINE};
use self::usage::granularity_slot;
use crate::store::{Capabilities, Granularity, LimitBuckets, Store, StoreError};

/// Builds a [`redis::Cmd`](::redis::Cmd) from a name and arguments.
macro_rules! cmd {
    ($name:expr $(, $arg:expr)* $(,)?) => {{
        #[allow(unused_mut)]
        let mut cmd = ::redis::cmd($name);
        $( cmd.arg($arg); )*
        cmd
    }};
}

mod audit;
mod clients;
mod credits;
mod fleet;
mod limits;
mod records;
mod usage;

/// Owners of old buckets handled per round of [`Usage::prune_usage`](crate::store::Usage::prune_usage).
const PRUNE_CHUNK: usize = 256;
/// Attempts of an optimistic script (the data it checks changed under it) before giving up.
const ATTEMPTS: usize = 5;

/// The [`Store`] on Redis or Redis Cluster. Cheap to share: it holds one multiplexed connection
/// (or cluster connection) that every call uses concurrently.
pub struct RedisStore {
    /// For the admin API and the background tasks: 2.5 s per round trip.
    conn: Conn,
    /// The same connection and breaker for what a request may wait on (`lookup_key`,
    /// `take_tokens`) and for `/readyz`'s `ping`: [`REQUEST_DEADLINE`] per round trip, so that a
    /// hung Redis fails them in tens of milliseconds rather than seconds.
    hot: Conn,
    /// A node to subscribe to for invalidations (any node of a cluster receives every publish).
    subscribe_url: String,
    /// Backstop TTLs of usage buckets by granularity (minute, hour, day): renewed on each write,
    /// so a bucket outlives its last write by this much even if pruning never runs. In seconds,
    /// 0 for none; a config reload changes them ([`RedisStore::set_bucket_ttl`]).
    bucket_ttls: [AtomicU64; 3],
    /// This process's appends to one account's audit chain, one at a time ([`audit`]).
    audit_turns: audit::AuditTurns,
}

// === impl RedisStore ===

impl RedisStore {
    /// Shared: every instance pointed at the same Redis sees the same records and counters.
    pub const CAPABILITIES: Capabilities = Capabilities { shared: true };

    /// Connects to `redis://host:port` (one server, through a connection manager that reconnects
    /// by itself) or `redis+cluster://h1:p1,h2:p2,…` (a cluster, discovered from these nodes).
    /// An unreachable server or a bad URL gives [`StoreError::Unavailable`].
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        let conn = Conn::connect(url).await?;
        let subscribe_url = match url.strip_prefix("redis+cluster://") {
            Some(rest) => conn::cluster_nodes(rest)?.swap_remove(0),
            None => url.to_owned(),
        };
        Ok(RedisStore {
            hot: conn.with_deadline(REQUEST_DEADLINE),
            conn,
            subscribe_url,
            bucket_ttls: [
                AtomicU64::new(7 * 86_400),
                AtomicU64::new(400 * 86_400),
                AtomicU64::new(0),
            ],
            audit_turns: audit::AuditTurns::default(),
        })
    }

    /// Sets the backstop TTL of one granularity's buckets (`None`: only pruning removes them).
    /// Keep it above the configured retention: a bucket expires this long after its last write.
    pub fn with_bucket_ttl(self, granularity: Granularity, ttl: Option<Duration>) -> Self {
        self.set_bucket_ttl(granularity, ttl);
        self
    }

    /// Like [`RedisStore::with_bucket_ttl`], on a store in use: writes from now on renew
    /// buckets with `ttl`.
    pub fn set_bucket_ttl(&self, granularity: Granularity, ttl: Option<Duration>) {
        let secs = ttl.map_or(0, |ttl| ttl.as_secs().max(1));
        self.bucket_ttls[granularity_slot(granularity)].store(secs, Ordering::Relaxed);
    }

    /// Reports the circuit breaker's state in `gauge` (`tollgate_store_breaker_open`: 1 while
    /// calls are refused or probing, 0 while closed).
    pub fn with_breaker_gauge(self, gauge: prometheus::IntGauge) -> Self {
        self.conn.breaker().set_gauge(gauge);
        self
    }

    /// Whether this store talks to a cluster.
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    fn bucket_ttl(&self, granularity: Granularity) -> Option<u64> {
        match self.bucket_ttls[granularity_slot(granularity)].load(Ordering::Relaxed) {
            0 => None,
            secs => Some(secs),
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    fn limit_buckets(self: Arc<Self>) -> Option<Arc<dyn LimitBuckets>> {
        Some(self)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.hot.query(&cmd!("PING")).await?;
        Ok(())
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: show the topology only.
        f.debug_struct("RedisStore")
            .field("cluster", &self.conn.is_cluster())
            .field("bucket_ttls", &self.bucket_ttls)
            .finish_non_exhaustive()
    }
}

/// The answer at `position`, leaving nil in its place.
fn take(values: &mut [Value], position: usize) -> Value {
    values
        .get_mut(position)
        .map(|v| std::mem::replace(v, Value::Nil))
        .unwrap_or(Value::Nil)
}

fn to_json<T: Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

fn from_json<T: DeserializeOwned>(json: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Decodes a list of JSON strings.
fn decode_all<T: DeserializeOwned>(value: Value, what: &str) -> Result<Vec<T>, StoreError> {
    let jsons: Vec<String> = decode(value)?;
    jsons.iter().map(|j| from_json(j, what)).collect()
}

fn unexpected(method: &str, reply: &[String]) -> StoreError {
    StoreError::Corrupt(format!("{method}: unexpected script reply {reply:?}"))
}
