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
//! ([`Store::lookup_key`], [`Store::take_tokens`]) and for [`Store::ping`] (readiness), 2.5 s
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
//! | `tg:{slot tag}:usage_writer:{writer}` | string | the last usage batch (`seq`) applied from one flusher to this slot's buckets | 1 day ([`BATCH_MEMORY`]), renewed per batch | [`Store::add_usage`] exactly once: a retried batch is not counted again |
//! | `tg:keyhash:{hex}`                   | string | `acc_id` `\n` `key_id`                          | —          | [`Store::lookup_key`]; uniqueness of key hashes |
//! | `tg:{_global}:accounts`              | set    | account ids                                     | —          | [`Store::list_accounts`] |
//! | `tg:{_global}:audit`                 | list   | every audit JSON + `account_id`, newest first   | —          | [`Store::list_audit`] over all accounts |
//! | `tg:{_global}:master_key_hash`       | string | hex                                             | —          | the operator's master key hash |
//! | `tg:{_usage}:owners:{m,h,d}`         | zset   | bucket index key → (at most) its lowest index   | —          | [`Store::prune_usage`] finds the owners of old buckets without a scan |
//! | `tg:{_usage}:last_used`              | zset   | key id → last use (ms)                          | —          | `ZADD GT` keeps the maximum; `ZMSCORE` reads many in one call |
//!
//! Bucket TTLs are a backstop behind [`Store::prune_usage`], renewed on every write (defaults:
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
//! | `update_key` | 1 RT, one script (name move + record) | same |
//! | `delete_key` | 2 RT: script (record, name, key ids), then compare-and-delete of the hash index | same |
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
mod pubsub;
mod scripts;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use ::redis::Value;
use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

use tokio::sync::mpsc;

use self::conn::{decode, Batch, Conn, REQUEST_DEADLINE};
use self::keys::{COUNTERS, GLOBAL, USAGE};
use self::scripts::eval;
use crate::credential::KeyHash;
use crate::store::audit_chain::ChainHead;
use crate::store::{
    key_name_index, AccountRecord, AuditChainPage, AuditEntry, AuditPage, AuditQuery, BatchId,
    Granularity, Invalidation, InvalidationEvent, KeyLookup, KeyRecord, SiteRecord, Store,
    StoreError, TokenGrant, TokenTake, UsageCounts, UsageDelta, BATCH_MEMORY,
};

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

/// Owners of old buckets handled per round of [`Store::prune_usage`].
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
    /// so a bucket outlives its last write by this much even if pruning never runs.
    bucket_ttls: [Option<Duration>; 3],
    /// This process's appends to one account's audit chain, one at a time ([`audit`]).
    audit_turns: audit::AuditTurns,
}

// === impl RedisStore ===

impl RedisStore {
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
                Some(Duration::from_secs(7 * 86_400)),
                Some(Duration::from_secs(400 * 86_400)),
                None,
            ],
            audit_turns: audit::AuditTurns::default(),
        })
    }

    /// Sets the backstop TTL of one granularity's buckets (`None`: only pruning removes them).
    /// Keep it above the configured retention: a bucket expires this long after its last write.
    pub fn with_bucket_ttl(mut self, granularity: Granularity, ttl: Option<Duration>) -> Self {
        self.bucket_ttls[granularity_slot(granularity)] = ttl;
        self
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
        self.bucket_ttls[granularity_slot(granularity)].map(|ttl| ttl.as_secs().max(1))
    }

    /// The key ids of an account and whether the account exists, in one atomic read.
    async fn account_key_ids(&self, account_id: &str) -> Result<(bool, Vec<String>), StoreError> {
        let mut batch = Batch::atomic();
        let exists = batch.add(account_id, cmd!("EXISTS", keys::account(account_id)));
        let ids = batch.add(account_id, cmd!("SMEMBERS", keys::key_ids(account_id)));
        let mut values = self.conn.run(batch).await?;
        let exists: bool = decode(take(&mut values, exists))?;
        let ids: Vec<String> = decode(take(&mut values, ids))?;
        Ok((exists, ids))
    }

    /// The buckets of one bucket index with `from <= index < to`, ascending.
    async fn read_buckets(
        &self,
        tag: &str,
        index_key: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let members: Vec<String> = self
            .conn
            .query(&cmd!("ZRANGEBYSCORE", index_key, from, format!("({to}")))
            .await?;
        let mut indexes = Vec::with_capacity(members.len());
        for member in &members {
            let index: i64 = member.parse().map_err(|_| {
                StoreError::Corrupt(format!("bucket index {member:?} in {index_key}"))
            })?;
            // Scores are doubles: keep the exact bounds here.
            if (from..to).contains(&index) {
                indexes.push(index);
            }
        }
        let mut batch = Batch::read();
        for index in &indexes {
            batch.add(
                tag,
                cmd!("HMGET", keys::bucket(index_key, *index), &COUNTERS[..]),
            );
        }
        let values = self.conn.run(batch).await?;
        let mut out = Vec::with_capacity(indexes.len());
        for (index, value) in indexes.into_iter().zip(values) {
            let fields: Vec<Option<u64>> = decode(value)?;
            // A bucket whose TTL ran out before pruning left its index entry behind.
            if fields.iter().all(Option::is_none) {
                continue;
            }
            out.push((index, counts_from(&fields)?));
        }
        out.sort_by_key(|(index, _)| *index);
        Ok(out)
    }

    /// Removes hash index entries that still point at these keys; after the records are gone,
    /// so a failure here leaves only entries that lookups ignore (and it is logged, not
    /// returned: the deletion did happen).
    async fn drop_hash_indexes(&self, removed: &[KeyRecord], also: Option<(&str, ::redis::Cmd)>) {
        let mut batch = Batch::atomic();
        for key in removed {
            let hex = key.hash.to_hex();
            batch.add(
                &hex,
                eval(
                    scripts::DELETE_IF_EQUAL,
                    &[keys::hash_index(&hex)],
                    &[hash_owner(&key.account_id, &key.id)],
                ),
            );
        }
        if let Some((tag, cmd)) = also {
            batch.add(tag, cmd);
        }
        if batch.is_empty() {
            return;
        }
        if let Err(e) = self.conn.run(batch).await {
            tracing::warn!(
                error = %e,
                keys = removed.len(),
                "redis store: records deleted but their index entries were not; lookups ignore them"
            );
        }
    }

    /// One round of pruning: the owners in `owners_key` scored below `before`, minus those
    /// already done. Returns the buckets removed and whether there was anything to do.
    async fn prune_round(
        &self,
        granularity: Granularity,
        before: i64,
        done: &mut HashSet<String>,
    ) -> Result<Option<u64>, StoreError> {
        let owners_key = keys::owners(granularity);
        let candidates: Vec<String> = self
            .conn
            .query(&cmd!(
                "ZRANGEBYSCORE",
                &owners_key,
                "-inf",
                format!("({before}"),
                "LIMIT",
                0,
                2 * PRUNE_CHUNK
            ))
            .await?;
        let owners: Vec<(String, String)> = candidates
            .into_iter()
            .filter(|owner| !done.contains(owner))
            .take(PRUNE_CHUNK)
            .filter_map(|owner| keys::tag_of(&owner).map(str::to_owned).map(|t| (owner, t)))
            .collect();
        if owners.is_empty() {
            return Ok(None);
        }

        let mut batch = Batch::read();
        for (owner, tag) in &owners {
            batch.add(
                tag,
                cmd!("ZRANGEBYSCORE", owner, "-inf", format!("({before}")),
            );
        }
        let old_lists = self.conn.run(batch).await?;

        let mut batch = Batch::atomic();
        let mut removals = Vec::new();
        let mut firsts = Vec::with_capacity(owners.len());
        for ((owner, tag), old) in owners.iter().zip(old_lists) {
            let old: Vec<String> = decode(old)?;
            if !old.is_empty() {
                let buckets: Vec<String> = old.iter().map(|i| format!("{owner}:{i}")).collect();
                batch.add(tag, cmd!("DEL", buckets));
                removals.push(batch.add(tag, cmd!("ZREM", owner, &old)));
            }
            firsts.push(batch.add(tag, cmd!("ZRANGE", owner, 0, 0, "WITHSCORES")));
        }
        let mut values = self.conn.run(batch).await?;
        let mut removed = 0u64;
        for position in removals {
            removed += decode::<u64>(take(&mut values, position))?;
        }

        let mut batch = Batch::atomic();
        for ((owner, _), position) in owners.iter().zip(firsts) {
            let first: Vec<(String, f64)> = decode(take(&mut values, position))?;
            match first.first() {
                Some((_, lowest)) => batch.add(USAGE, cmd!("ZADD", &owners_key, *lowest, owner)),
                None => batch.add(USAGE, cmd!("ZREM", &owners_key, owner)),
            };
            done.insert(owner.clone());
        }
        self.conn.run(batch).await?;
        Ok(Some(removed))
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

#[async_trait]
impl Store for RedisStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let _: String = self.hot.query(&cmd!("PING")).await?;
        Ok(())
    }

    async fn lookup_key(&self, hash: &KeyHash) -> Result<Option<KeyLookup>, StoreError> {
        let owner: Option<String> = self
            .hot
            .query(&cmd!("GET", keys::hash_index(&hash.to_hex())))
            .await?;
        let Some(owner) = owner else {
            return Ok(None);
        };
        let Some((account_id, key_id)) = owner.split_once('\n') else {
            return Err(StoreError::Corrupt(format!("hash index entry {owner:?}")));
        };
        let mut batch = Batch::atomic();
        let key = batch.add(
            account_id,
            cmd!("HGET", keys::key(account_id, key_id), "json"),
        );
        let account = batch.add(account_id, cmd!("GET", keys::account(account_id)));
        let sites = batch.add(account_id, cmd!("HVALS", keys::sites(account_id)));
        let mut values = self.hot.run(batch).await?;

        let Some(key) = decode::<Option<String>>(take(&mut values, key))? else {
            return Ok(None);
        };
        let key: KeyRecord = from_json(&key, "key")?;
        // An entry left behind by a deletion that failed halfway points at nothing, or at a key
        // re-created with another hash.
        if key.hash.0 != hash.0 || key.account_id != account_id {
            return Ok(None);
        }
        let Some(account) = decode::<Option<String>>(take(&mut values, account))? else {
            return Ok(None);
        };
        let account: AccountRecord = from_json(&account, "account")?;
        let mut sites = decode_all::<SiteRecord>(take(&mut values, sites), "site")?;
        sort_sites(&mut sites);
        Ok(Some(KeyLookup {
            key,
            account,
            site_origins: sites.into_iter().map(|s| s.name).collect(),
        }))
    }

    async fn create_account(&self, account: &AccountRecord) -> Result<(), StoreError> {
        let json = to_json(account)?;
        let mut batch = Batch::atomic();
        // The list entry first: if the second step fails, a stray entry is skipped by readers.
        batch.add(GLOBAL, cmd!("SADD", keys::accounts(), &account.id));
        batch.then();
        let set = batch.add(
            &account.id,
            cmd!("SET", keys::account(&account.id), json, "NX"),
        );
        let mut values = self.conn.run(batch).await?;
        match take(&mut values, set) {
            Value::Nil => Err(StoreError::AlreadyExists),
            _ => Ok(()),
        }
    }

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        let json: Option<String> = self.conn.query(&cmd!("GET", keys::account(id))).await?;
        json.map(|j| from_json(&j, "account")).transpose()
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        let ids: Vec<String> = self.conn.query(&cmd!("SMEMBERS", keys::accounts())).await?;
        let mut batch = Batch::read();
        for id in &ids {
            batch.add(id, cmd!("GET", keys::account(id)));
        }
        let mut out = Vec::with_capacity(ids.len());
        for value in self.conn.run(batch).await? {
            if let Some(json) = decode::<Option<String>>(value)? {
                out.push(from_json::<AccountRecord>(&json, "account")?);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn update_account(&self, account: &AccountRecord) -> Result<(), StoreError> {
        let json = to_json(account)?;
        let set: Value = self
            .conn
            .query(&cmd!("SET", keys::account(&account.id), json, "XX"))
            .await?;
        match set {
            Value::Nil => Err(StoreError::NotFound),
            _ => Ok(()),
        }
    }

    async fn delete_account(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        for _ in 0..ATTEMPTS {
            let (exists, key_ids) = self.account_key_ids(id).await?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            let mut script_keys = vec![
                keys::account(id),
                keys::key_ids(id),
                keys::names(id),
                keys::sites(id),
                keys::site_names(id),
            ];
            script_keys.extend(key_ids.iter().map(|k| keys::key(id, k)));
            let reply: Vec<String> = self
                .conn
                .query(&eval(scripts::DELETE_ACCOUNT, &script_keys, &key_ids))
                .await?;
            match reply.split_first() {
                Some((status, jsons)) if status == "ok" => {
                    let mut removed = jsons
                        .iter()
                        .map(|j| from_json::<KeyRecord>(j, "key"))
                        .collect::<Result<Vec<_>, _>>()?;
                    removed.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
                    self.drop_hash_indexes(
                        &removed,
                        Some((GLOBAL, cmd!("SREM", keys::accounts(), id))),
                    )
                    .await;
                    return Ok(removed);
                }
                Some((status, _)) if status == "not_found" => return Err(StoreError::NotFound),
                Some((status, _)) if status == "changed" => continue,
                _ => return Err(unexpected("delete_account", &reply)),
            }
        }
        Err(StoreError::Unavailable(format!(
            "account {id} kept changing during deletion; try again"
        )))
    }

    async fn create_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let json = to_json(key)?;
        let hex = key.hash.to_hex();
        let index = keys::hash_index(&hex);
        let owner = hash_owner(&key.account_id, &key.id);
        let mut script_keys = vec![
            keys::key(&key.account_id, &key.id),
            keys::key_ids(&key.account_id),
            keys::names(&key.account_id),
        ];
        let args = [key.id.as_str(), &key.name, &json, &hex, &owner];

        // On a cluster the hash index is in another slot: claim it first (`SET NX`), then write
        // the account's slot, and undo the claim if that refuses. A claim already holding this
        // very key's entry is a retry of a create whose answer was lost: the script decides.
        let mut claimed = false;
        if self.conn.is_cluster() {
            let claim: Value = self.conn.query(&cmd!("SET", &index, &owner, "NX")).await?;
            let existing: Option<String> = match claim {
                Value::Nil => self.conn.query(&cmd!("GET", &index)).await?,
                _ => None,
            };
            match existing {
                None => claimed = true,
                Some(existing) if existing == owner => {}
                Some(_) => {
                    let taken: bool = self
                        .conn
                        .query(&cmd!(
                            "HEXISTS",
                            keys::names(&key.account_id),
                            key_name_index(&key.name)
                        ))
                        .await?;
                    return Err(if taken {
                        StoreError::NameTaken
                    } else {
                        StoreError::AlreadyExists
                    });
                }
            }
        } else {
            script_keys.push(index.clone());
        }

        let status: String = self
            .conn
            .query(&eval(&scripts::create_key(), &script_keys, &args))
            .await?;
        let refusal = match status.as_str() {
            "ok" => return Ok(()),
            "name_taken" => StoreError::NameTaken,
            "exists" => StoreError::AlreadyExists,
            _ => return Err(unexpected("create_key", &[status])),
        };
        if claimed {
            let _: i64 = self
                .conn
                .query(&eval(scripts::DELETE_IF_EQUAL, &[&index], &[&owner]))
                .await?;
        }
        Err(refusal)
    }

    async fn get_key(
        &self,
        account_id: &str,
        key_id: &str,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let json: Option<String> = self
            .conn
            .query(&cmd!("HGET", keys::key(account_id, key_id), "json"))
            .await?;
        let key = json
            .map(|j| from_json::<KeyRecord>(&j, "key"))
            .transpose()?;
        Ok(key.filter(|k| k.account_id == account_id))
    }

    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let ids: Vec<String> = self
            .conn
            .query(&cmd!("SMEMBERS", keys::key_ids(account_id)))
            .await?;
        let mut batch = Batch::read();
        for id in &ids {
            batch.add(account_id, cmd!("HGET", keys::key(account_id, id), "json"));
        }
        let mut out = Vec::with_capacity(ids.len());
        for value in self.conn.run(batch).await? {
            if let Some(json) = decode::<Option<String>>(value)? {
                out.push(from_json::<KeyRecord>(&json, "key")?);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn update_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let mut key = key.clone();
        let script_keys = [
            keys::key(&key.account_id, &key.id),
            keys::names(&key.account_id),
        ];
        for _ in 0..ATTEMPTS {
            let json = to_json(&key)?;
            let args = [key.id.as_str(), &key.name, &json, &key.hash.to_hex()];
            let reply: Vec<Option<String>> = self
                .conn
                .query(&eval(&scripts::update_key(), &script_keys, &args))
                .await?;
            match reply.as_slice() {
                [Some(status)] if status == "ok" => return Ok(()),
                [Some(status)] if status == "not_found" => return Err(StoreError::NotFound),
                [Some(status)] if status == "name_taken" => return Err(StoreError::NameTaken),
                // The hash is immutable: keep the stored one, which the hash index points at.
                [Some(status), stored] if status == "hash" => {
                    key.hash = stored
                        .as_deref()
                        .and_then(KeyHash::from_hex)
                        .ok_or_else(|| {
                            StoreError::Corrupt(format!("key {}: stored hash {stored:?}", key.id))
                        })?;
                }
                _ => {
                    let shown: Vec<String> = reply.into_iter().flatten().collect();
                    return Err(unexpected("update_key", &shown));
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "key {} kept changing during update; try again",
            key.id
        )))
    }

    async fn delete_key(
        &self,
        account_id: &str,
        key_id: &str,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let script_keys = [
            keys::key(account_id, key_id),
            keys::names(account_id),
            keys::key_ids(account_id),
        ];
        let json: Option<String> = self
            .conn
            .query(&eval(scripts::DELETE_KEY, &script_keys, &[key_id]))
            .await?;
        let Some(json) = json else {
            return Ok(None);
        };
        let key: KeyRecord = from_json(&json, "key")?;
        self.drop_hash_indexes(std::slice::from_ref(&key), None)
            .await;
        Ok(Some(key))
    }

    async fn create_site(&self, site: &SiteRecord) -> Result<(), StoreError> {
        let json = to_json(site)?;
        let script_keys = [
            keys::sites(&site.account_id),
            keys::site_names(&site.account_id),
        ];
        let created: i64 = self
            .conn
            .query(&eval(
                scripts::CREATE_SITE,
                &script_keys,
                &[site.id.as_str(), &site.name, &json],
            ))
            .await?;
        if created == 1 {
            Ok(())
        } else {
            Err(StoreError::AlreadyExists)
        }
    }

    async fn list_sites(&self, account_id: &str) -> Result<Vec<SiteRecord>, StoreError> {
        let values: Value = self
            .conn
            .query(&cmd!("HVALS", keys::sites(account_id)))
            .await?;
        let mut sites = decode_all::<SiteRecord>(values, "site")?;
        sort_sites(&mut sites);
        Ok(sites)
    }

    async fn delete_site(&self, account_id: &str, site_id: &str) -> Result<bool, StoreError> {
        let script_keys = [keys::sites(account_id), keys::site_names(account_id)];
        let removed: i64 = self
            .conn
            .query(&eval(scripts::DELETE_SITE, &script_keys, &[site_id]))
            .await?;
        Ok(removed == 1)
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let mut entry = entry.clone();
        (entry.prev_hash, entry.hash) = (None, None);
        match entry.account_id.clone() {
            Some(account_id) => {
                audit::append(&self.conn, &self.audit_turns, &account_id, entry).await
            }
            None => {
                let json = encode_audit(&entry)?;
                self.conn
                    .query::<Value>(&cmd!("LPUSH", keys::audit(), &json))
                    .await?;
                Ok(())
            }
        }
    }

    async fn audit_head(&self, account_id: &str) -> Result<Option<ChainHead>, StoreError> {
        audit::head(&self.conn, account_id).await
    }

    async fn audit_chain_page(
        &self,
        account_id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<AuditChainPage, StoreError> {
        audit::chain_page(&self.conn, account_id, after, limit).await
    }

    async fn list_audit(
        &self,
        account_id: Option<&str>,
        query: &AuditQuery,
    ) -> Result<AuditPage, StoreError> {
        let (tag, list) = match account_id {
            Some(id) => (id, keys::account_audit(id)),
            None => (GLOBAL, keys::audit()),
        };
        if query.action.is_none() && query.search.is_none() {
            // Unfiltered: the page and the length, without reading the rest.
            let mut batch = Batch::atomic();
            let total = batch.add(tag, cmd!("LLEN", &list));
            let page = (query.limit > 0).then(|| {
                let start = i64::try_from(query.offset).unwrap_or(i64::MAX);
                let stop = start.saturating_add(i64::try_from(query.limit).unwrap_or(i64::MAX) - 1);
                batch.add(tag, cmd!("LRANGE", &list, start, stop))
            });
            let mut values = self.conn.run(batch).await?;
            let total: usize = decode(take(&mut values, total))?;
            let entries = match page {
                Some(page) => decode_all::<AuditEntry>(take(&mut values, page), "audit entry")?,
                None => Vec::new(),
            };
            return Ok(AuditPage { entries, total });
        }

        let all: Vec<String> = self.conn.query(&cmd!("LRANGE", &list, 0, -1)).await?;
        let search = query.search.as_deref().map(str::to_lowercase);
        let mut page = AuditPage::default();
        for json in &all {
            let entry: AuditEntry = from_json(json, "audit entry")?;
            if query.action.as_ref().is_some_and(|a| *a != entry.action) {
                continue;
            }
            if search
                .as_deref()
                .is_some_and(|needle| !entry.matches(needle))
            {
                continue;
            }
            if page.total >= query.offset && page.entries.len() < query.limit {
                page.entries.push(entry);
            }
            page.total += 1;
        }
        Ok(page)
    }

    async fn add_usage(&self, id: BatchId, batch: &[UsageDelta]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let (buckets, last_used) = merge_batch(batch);
        let cluster = self.conn.is_cluster();
        // Per slot (one, on a single server): the script's keys and arguments, opened by the
        // writer's marker of that slot and the batch's number.
        let mut slots: BTreeMap<u16, (Vec<String>, Vec<String>)> = BTreeMap::new();
        // Per granularity: bucket index key → its lowest index in this batch.
        let mut owners: [BTreeMap<&str, i64>; 3] = Default::default();
        for ((index_key, index), (tag, g, counts)) in &buckets {
            let slot = if cluster { keys::slot_of(tag) } else { 0 };
            let (script_keys, args) = slots.entry(slot).or_insert_with(|| {
                let marker = keys::usage_writer(script_tag(cluster, slot), id.writer);
                let ttl = BATCH_MEMORY.as_secs();
                (vec![marker], vec![id.seq.to_string(), ttl.to_string()])
            });
            script_keys.push(keys::bucket(index_key, *index));
            script_keys.push(index_key.clone());
            args.push(index.to_string());
            args.push(self.bucket_ttl(*g).unwrap_or(0).to_string());
            args.extend(counter_values(counts).iter().map(i64::to_string));
            let lowest = owners[granularity_slot(*g)]
                .entry(index_key.as_str())
                .or_insert(*index);
            *lowest = (*lowest).min(*index);
        }

        let mut writes = Batch::atomic();
        for (slot, (script_keys, args)) in &slots {
            writes.add(
                script_tag(cluster, *slot),
                eval(scripts::ADD_USAGE, script_keys, args),
            );
        }
        // The usage indexes keep a minimum and a maximum: applying them twice changes nothing,
        // so they need no marker.
        for g in Granularity::ALL {
            let lowest = &owners[granularity_slot(g)];
            if lowest.is_empty() {
                continue;
            }
            let mut zadd = cmd!("ZADD", keys::owners(g), "LT");
            for (owner, index) in lowest {
                zadd.arg(*index).arg(*owner);
            }
            writes.add(USAGE, zadd);
        }
        let mut zadd = cmd!("ZADD", keys::last_used(), "GT");
        for (key_id, ms) in &last_used {
            zadd.arg(*ms).arg(*key_id);
        }
        writes.add(USAGE, zadd);
        self.conn.run(writes).await?;
        Ok(())
    }

    async fn key_usage(
        &self,
        key_id: &str,
        granularity: Granularity,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        self.read_buckets(key_id, &keys::key_usage(key_id, granularity), from, to)
            .await
    }

    async fn account_usage(
        &self,
        account_id: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        self.read_buckets(
            account_id,
            &keys::account_usage(account_id),
            from_day,
            to_day,
        )
        .await
    }

    async fn last_used(&self, key_ids: &[String]) -> Result<Vec<Option<i64>>, StoreError> {
        if key_ids.is_empty() {
            return Ok(Vec::new());
        }
        let scores: Vec<Option<f64>> = self
            .conn
            .query(&cmd!("ZMSCORE", keys::last_used(), key_ids))
            .await?;
        // Milliseconds since the epoch are far below 2^53: exact as doubles.
        Ok(scores.into_iter().map(|s| s.map(|ms| ms as i64)).collect())
    }

    async fn prune_usage(&self, granularity: Granularity, before: i64) -> Result<u64, StoreError> {
        let mut done = HashSet::new();
        let mut removed = 0;
        while let Some(n) = self.prune_round(granularity, before, &mut done).await? {
            removed += n;
        }
        Ok(removed)
    }

    async fn take_tokens(
        &self,
        _account_id: &str,
        key_id: &str,
        takes: &[TokenTake],
    ) -> Result<Vec<TokenGrant>, StoreError> {
        let counters: Vec<String> = takes
            .iter()
            .map(|t| keys::rate_counter(key_id, t.window_secs, t.index))
            .collect();
        let args: Vec<u64> = takes
            .iter()
            .flat_map(|t| [u64::from(t.limit), u64::from(t.want), t.window_secs * 2])
            .collect();
        let reply: Vec<u64> = self
            .hot
            .query(&eval(scripts::TAKE_TOKENS, &counters, &args))
            .await?;
        if reply.len() != takes.len() * 2 {
            return Err(StoreError::Corrupt(format!(
                "take_tokens answered {} values",
                reply.len()
            )));
        }
        Ok(reply
            .chunks(2)
            .map(|pair| TokenGrant {
                granted: u32::try_from(pair[0]).unwrap_or(0),
                total: pair[1],
            })
            .collect())
    }

    async fn try_lock(&self, name: &str, token: &str, ttl: Duration) -> Result<bool, StoreError> {
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let reply: Option<String> = self
            .conn
            .query(&cmd!("SET", keys::lock(name), token, "NX", "PX", millis))
            .await?;
        Ok(reply.is_some())
    }

    async fn unlock(&self, name: &str, token: &str) -> Result<(), StoreError> {
        let _deleted: i64 = self
            .conn
            .query(&eval(
                scripts::DELETE_IF_EQUAL,
                &[keys::lock(name)],
                &[token],
            ))
            .await?;
        Ok(())
    }

    async fn publish_invalidation(&self, what: &Invalidation) -> Result<(), StoreError> {
        let payload = match what {
            Invalidation::Key(hash) => format!("k:{}", hash.to_hex()),
            Invalidation::Account(id) => format!("a:{id}"),
            Invalidation::All => "*".to_owned(),
        };
        let _receivers: i64 = self
            .conn
            .query(&cmd!("PUBLISH", keys::INVALIDATIONS, payload))
            .await?;
        Ok(())
    }

    async fn subscribe_invalidations(&self) -> Option<mpsc::Receiver<InvalidationEvent>> {
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(pubsub::follow(self.subscribe_url.clone(), tx));
        Some(rx)
    }

    async fn master_key_hash(&self) -> Result<Option<KeyHash>, StoreError> {
        let hex: Option<String> = self
            .conn
            .query(&cmd!("GET", keys::master_key_hash()))
            .await?;
        hex.map(|hex| {
            KeyHash::from_hex(&hex)
                .ok_or_else(|| StoreError::Corrupt(format!("master key hash: {hex:?}")))
        })
        .transpose()
    }

    async fn set_master_key_hash(&self, hash: &KeyHash) -> Result<(), StoreError> {
        let _: () = self
            .conn
            .query(&cmd!("SET", keys::master_key_hash(), hash.to_hex()))
            .await?;
        Ok(())
    }
}

/// The value of a hash index entry: the key's account and id.
fn hash_owner(account_id: &str, key_id: &str) -> String {
    format!("{account_id}\n{key_id}")
}

fn granularity_slot(granularity: Granularity) -> usize {
    match granularity {
        Granularity::Minute => 0,
        Granularity::Hour => 1,
        Granularity::Day => 2,
    }
}

/// A batch's counts merged per bucket — (bucket index key, index) → (hash tag, granularity,
/// counts) — and each key's latest use.
type MergedBatch<'a> = (
    BTreeMap<(String, i64), (String, Granularity, UsageCounts)>,
    BTreeMap<&'a str, i64>,
);

/// Merges a batch: one script argument per counter per distinct bucket.
fn merge_batch(batch: &[UsageDelta]) -> MergedBatch<'_> {
    let mut buckets: BTreeMap<(String, i64), (String, Granularity, UsageCounts)> = BTreeMap::new();
    let mut last_used: BTreeMap<&str, i64> = BTreeMap::new();
    for delta in batch {
        for g in Granularity::ALL {
            let index = g.of_minute(delta.minute);
            let bucket = buckets
                .entry((keys::key_usage(&delta.key_id, g), index))
                .or_insert_with(|| (delta.key_id.clone(), g, UsageCounts::default()));
            bucket.2.merge(&delta.counts);
        }
        let day = Granularity::Day.of_minute(delta.minute);
        let bucket = buckets
            .entry((keys::account_usage(&delta.account_id), day))
            .or_insert_with(|| {
                (
                    delta.account_id.clone(),
                    Granularity::Day,
                    UsageCounts::default(),
                )
            });
        bucket.2.merge(&delta.counts);
        let seen = last_used.entry(delta.key_id.as_str()).or_insert(i64::MIN);
        *seen = (*seen).max(delta.last_used_ms);
    }
    (buckets, last_used)
}

/// The tag of a usage script's slot: a tag of that very slot on a cluster; on a single server,
/// where one script takes the whole batch, the usage indexes' tag.
fn script_tag(cluster: bool, slot: u16) -> &'static str {
    if cluster {
        keys::slot_tag(slot)
    } else {
        USAGE
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

fn sort_sites(sites: &mut [SiteRecord]) {
    sites.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
}

fn unexpected(method: &str, reply: &[String]) -> StoreError {
    StoreError::Corrupt(format!("{method}: unexpected script reply {reply:?}"))
}

/// The entry's JSON with its `account_id`, which the record's own serialization skips.
fn encode_audit(entry: &AuditEntry) -> Result<String, StoreError> {
    let value = entry
        .stored_json()
        .map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))?;
    to_json(&value)
}

/// Counters as Redis integers (signed 64-bit), saturating.
fn counter_values(counts: &UsageCounts) -> [i64; 6] {
    counts
        .to_array()
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

fn counts_from(fields: &[Option<u64>]) -> Result<UsageCounts, StoreError> {
    let fields: &[Option<u64>; 6] = fields.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "usage bucket: expected 6 counters, found {}",
            fields.len()
        ))
    })?;
    Ok(UsageCounts::from_array(fields.map(|f| f.unwrap_or(0))))
}
