//! The store: every durable record (accounts, keys by hash, sites, audit entries, usage buckets,
//! the master key's hash) behind async traits, one per role, so that the embedded and Redis
//! backends are interchangeable and one conformance suite per role
//! (`tests/store_conformance.rs`) runs on each.
//!
//! | role | trait | who uses it |
//! |---|---|---|
//! | accounts, keys, sites, the master key; keys by hash | [`Records`] | the key cache (lookups), the admin API |
//! | OAuth client secrets and the access tokens issued with them | [`Clients`] | the admin API, the token endpoint |
//! | the audit log and its hash chains | [`AuditLog`] | the admin API |
//! | usage buckets and last use | [`Usage`] | the metering flusher, its write-ahead log and pruning; usage reads |
//! | window counters shared by a fleet | [`LimitBuckets`] | `limits::global` — only a shared store has them |
//! | what instances of a fleet tell each other | [`Fleet`] | the key cache (invalidations), the admin API (locks) |
//!
//! [`Store`] is all of them, plus readiness ([`Store::ping`]) and what the backend can do
//! ([`Capabilities`]): callers ask the store, never which backend the config named. A caller
//! that needs one role takes that role (`Arc<dyn Usage>`), cut from the [`SharedStore`].
//! [`open`] is the one place that turns [`StoreSettings`] into a store.
//!
//! Each backend keeps one file per role (`embedded/records.rs`, `redis/usage.rs`, …) beside
//! the file that opens it. Only this module and its children touch disk or the network.
//! Nothing here runs on the request path of a cached key: the proxy reads a key once per cache
//! miss ([`Records::lookup_key`]) and the metering flusher writes usage in batches
//! ([`Usage::add_usage`]).

pub mod audit_chain;
pub mod credits;
pub mod embedded;
mod model;
pub mod redis;
pub mod usage_wal;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use model::{
    key_name_index, AccountRecord, AuditChainPage, AuditEntry, AuditPage, AuditQuery, AuthMethod,
    BatchId, Granularity, KeyRecord, KeyType, NetworkPolicy, Plan, RateLimitSpec, SecretRecord,
    SiteRecord, TokenRecord, UsageCounts, UsageDelta, UsageEvent,
};

use crate::credential::KeyHash;

/// How long a store remembers the last usage batch it applied from a writer ([`BatchId`]): a
/// retry arriving later than this after the writer's last successful write would be applied
/// again. The flusher retries every `flush_interval`, so only a store that applied a batch and
/// then stayed unreachable for a whole day could see one.
pub const BATCH_MEMORY: std::time::Duration = std::time::Duration::from_secs(86_400);

/// A shared handle to whichever backend the config chose.
pub type SharedStore = Arc<dyn Store>;

/// What can go wrong in a store call. Conflicts are facts the admin API turns into 409s;
/// `Unavailable` is the backend being unreachable or failing, which callers may retry.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another key of the account already has this name.
    #[error("name already taken")]
    NameTaken,
    /// A record with this id or hash already exists.
    #[error("record already exists")]
    AlreadyExists,
    /// The record to update or delete does not exist.
    #[error("record not found")]
    NotFound,
    /// The backend cannot be reached or failed; the operation did not happen.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored record could not be decoded (written by an incompatible version, or corrupted).
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// Entry `index` (from 0) of a batch write was refused with `error` (a conflict: `NameTaken`
    /// or `AlreadyExists`); nothing of the batch was written.
    #[error("batch entry {index}: {error}")]
    InBatch {
        /// The entry's position in the batch.
        index: usize,
        /// Why it was refused.
        error: Box<StoreError>,
    },
}

/// What cached state to drop on every instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// One credential.
    Key(KeyHash),
    /// Every key of an account.
    Account(String),
    /// Everything.
    All,
    /// Keys were imported (contract 5a): look up credentials that fail the checksum from now on,
    /// and forget unknown hashes (one may be an imported key's).
    Imported,
}

/// What an invalidation subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvalidationEvent {
    /// Drop this.
    Invalidate(Invalidation),
    /// The subscription was (re)established and may have missed messages: treat every cached
    /// entry as stale.
    Resync,
}

/// One window counter to take tokens from: the window's length, which window (its start in
/// seconds since the epoch / its length), its limit, and how many tokens are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenTake {
    /// Window length in seconds (60, 3 600, 86 400).
    pub window_secs: u64,
    /// Window index.
    pub index: i64,
    /// The most the counter may reach.
    pub limit: u32,
    /// Tokens wanted.
    pub want: u32,
}

/// What a [`TokenTake`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenGrant {
    /// Tokens granted (0..=want).
    pub granted: u32,
    /// The counter after the take: tokens handed out to all instances in this window.
    pub total: u64,
}

/// A key found by its hash, with the account it belongs to: everything the checks need, in one
/// read.
#[derive(Debug, Clone)]
pub struct KeyLookup {
    /// The key record.
    pub key: KeyRecord,
    /// Its account.
    pub account: AccountRecord,
    /// The account's sites (origins), which are allowed origins for its publishable keys.
    pub site_origins: Vec<String>,
    /// The credential was an access token, seen as a key ([`lookup_credential`]).
    pub access_token: bool,
}

/// The longest a credential's read from the store may take, all its calls together
/// ([`lookup_credential`]): past it the read is [`StoreError::Unavailable`], so a request that
/// waits on it (a cold key on the proxy, a key or token calling the account API) is answered
/// instead of waiting on. Redis's round trips have their own, shorter deadlines (50 ms each);
/// this one is what bounds the embedded store's, whose reads on the blocking pool have none of
/// their own (a hung disk holds the pool's threads, and the next reads queue behind them). A
/// read from a file in the page cache takes tens of µs; one that queues behind a million keys'
/// first reads, a few ms.
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(1);

/// The key with this hash, or else the access token with it, seen as a key of the account: its
/// id the client secret's (limits and usage are the client's, whatever token it holds), a secret
/// key with the token's scopes, expiring with it. A miss on both is two reads; a credential
/// whose checksum fails gets here only while the store holds imported keys
/// ([`Records::has_imported_keys`]). Within [`LOOKUP_DEADLINE`].
pub async fn lookup_credential(
    store: &dyn Store,
    hash: &KeyHash,
) -> Result<Option<KeyLookup>, StoreError> {
    tokio::time::timeout(LOOKUP_DEADLINE, read_credential(store, hash))
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer from the store in {LOOKUP_DEADLINE:?}"
            )))
        })
}

/// [`lookup_credential`] without its deadline.
async fn read_credential(
    store: &dyn Store,
    hash: &KeyHash,
) -> Result<Option<KeyLookup>, StoreError> {
    if let Some(found) = store.lookup_key(hash).await? {
        return Ok(Some(found));
    }
    let Some(token) = store.find_token(hash).await? else {
        return Ok(None);
    };
    let Some(account) = store.get_account(&token.account_id).await? else {
        return Ok(None);
    };
    let key = KeyRecord {
        id: token.secret_id.clone(),
        account_id: token.account_id.clone(),
        name: "oauth".to_owned(),
        key_type: KeyType::Secret,
        hash: token.hash,
        prefix: String::new(),
        preview: String::new(),
        scopes: token.scopes,
        allowed_origins: Vec::new(),
        allowed_ips: Vec::new(),
        rate_limit: None,
        expires_at: Some(token.expires_at),
        lifetime_secs: None,
        active: true,
        protected: false,
        metadata: serde_json::Value::Null,
        credit_pool: None,
        external_id: None,
        imported: false,
        shadow: false,
        created_at: token.created_at,
        updated_at: token.created_at,
    };
    Ok(Some(KeyLookup {
        key,
        account,
        site_origins: Vec::new(),
        access_token: true,
    }))
}

/// Where the store is: `[store]` of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSettings {
    /// The on-disk embedded database at this path.
    Embedded {
        /// Database file.
        path: PathBuf,
    },
    /// Redis: `redis://…` (one server) or `redis+cluster://h1:p1,…`.
    Redis {
        /// The URL as configured.
        url: String,
    },
}

/// What a backend can do, asked of the store (or, before it is opened, of its settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Several gateway instances can use the store at once: it has [`LimitBuckets`], and its
    /// [`Fleet`] reaches the other instances. A store that only this process can open (the
    /// embedded one) has nobody to share with.
    pub shared: bool,
}

/// How to open a store, beside where: what the rest of the gateway decided that a backend may
/// use.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// How long usage buckets of each granularity are kept (pruning removes them then). A
    /// backend that can expire records sets twice this as a backstop behind pruning.
    pub retention: Vec<(Granularity, Duration)>,
    /// Set to 1 while the backend's circuit breaker is open, 0 while it is closed.
    pub breaker_gauge: Option<prometheus::IntGauge>,
}

// === impl StoreError ===

impl StoreError {
    /// For a batch of one: the entry's own error in place of [`StoreError::InBatch`].
    pub fn unbatched(self) -> StoreError {
        match self {
            StoreError::InBatch { error, .. } => *error,
            other => other,
        }
    }
}

// === impl StoreSettings ===

impl StoreSettings {
    /// What the backend these settings name can do.
    pub const fn capabilities(&self) -> Capabilities {
        match self {
            StoreSettings::Embedded { .. } => embedded::EmbeddedStore::CAPABILITIES,
            StoreSettings::Redis { .. } => redis::RedisStore::CAPABILITIES,
        }
    }
}

/// Opens the store that `settings` name: the embedded file on the blocking pool (redb opens
/// synchronously and may recover a journal), Redis by connecting.
pub async fn open(
    settings: &StoreSettings,
    options: OpenOptions,
) -> Result<SharedStore, StoreError> {
    match settings {
        StoreSettings::Embedded { path } => {
            let path = path.clone();
            let store = tokio::task::spawn_blocking(move || embedded::EmbeddedStore::open(&path))
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))??;
            Ok(Arc::new(store))
        }
        StoreSettings::Redis { url } => {
            let mut store = redis::RedisStore::connect(url).await?;
            store.set_retention(&options.retention);
            if let Some(gauge) = options.breaker_gauge {
                store = store.with_breaker_gauge(gauge);
            }
            Ok(Arc::new(store))
        }
    }
}

/// The whole store: every role, readiness and capabilities. Every method of every role is one
/// atomic operation on the backend.
#[async_trait]
pub trait Store: Records + Clients + AuditLog + Usage + Credits + Fleet + 'static {
    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Succeeds when the backend is reachable and answering (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    /// The shared window counters, for a store whose [`Capabilities::shared`] is set; `None`
    /// otherwise.
    fn limit_buckets(self: Arc<Self>) -> Option<Arc<dyn LimitBuckets>> {
        None
    }
}

/// Keys' credits (contract 5a): the balance, the refill and the leases instances hold, one
/// [`credits::CreditCounter`] per key whose record has `credits` set, changed atomically.
#[async_trait]
pub trait Credits: Send + Sync {
    /// `instance` reports its running totals and asks for `want` more
    /// ([`credits::CreditCounter::take`]; idempotent: totals only grow); a key without a
    /// counter grants nothing.
    async fn take_credits(
        &self,
        key_id: &str,
        instance: &str,
        totals: credits::Totals,
        want: i64,
        now_ms: i64,
    ) -> Result<credits::CreditGrant, StoreError>;
    /// `instance` reports its running totals, having handed back what it held
    /// ([`credits::CreditCounter::give_back`]).
    async fn give_back_credits(
        &self,
        key_id: &str,
        instance: &str,
        totals: credits::Totals,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// Applies an admin change, making the counter (empty) if the key has none yet.
    async fn change_credits(
        &self,
        key_id: &str,
        change: credits::CreditChange,
        now_ms: i64,
    ) -> Result<credits::CreditState, StoreError>;
    /// The key's credits as of `now_ms` (a refill due is counted); `None` without a counter.
    async fn credit_state(
        &self,
        key_id: &str,
        now_ms: i64,
    ) -> Result<Option<credits::CreditState>, StoreError>;
    /// Forgets the key's counter (the key is deleted, or its credits are now unlimited).
    async fn delete_credits(&self, key_id: &str) -> Result<(), StoreError>;
}

/// Accounts, keys and sites, the master key's hash, and keys found by their hash.
#[async_trait]
pub trait Records: Send + Sync {
    /// A number that moves on whenever a write may change what [`Records::lookup_key`] answers,
    /// read without I/O; `None` when the backend cannot tell (other processes write to it, as
    /// with Redis). The key cache keeps an entry past its ttl without a re-read while this has
    /// not moved since the entry was read.
    fn revision(&self) -> Option<u64> {
        None
    }

    /// The key with this hash, its account and the account's site origins, in one read; `None`
    /// when the key or the account does not exist.
    async fn lookup_key(&self, hash: &KeyHash) -> Result<Option<KeyLookup>, StoreError>;

    /// Creates an account; `AlreadyExists` if the id is taken.
    async fn create_account(&self, account: &AccountRecord) -> Result<(), StoreError>;
    /// One account.
    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError>;
    /// All accounts, oldest first.
    async fn list_accounts(&self) -> Result<Vec<AccountRecord>, StoreError>;
    /// Replaces an existing account; `NotFound` if there is none.
    async fn update_account(&self, account: &AccountRecord) -> Result<(), StoreError>;
    /// Deletes an account with its keys and sites, returning the keys it removed (so that
    /// callers can invalidate caches); `NotFound` if there is none.
    async fn delete_account(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError>;

    /// Creates a key; `NameTaken` if its account has a key of that name ignoring ASCII case
    /// ([`key_name_index`]), `AlreadyExists` if the id or hash exists.
    async fn create_key(&self, key: &KeyRecord) -> Result<(), StoreError>;
    /// Creates all of `keys` (of one account) or none, as one operation: a conflict refuses the
    /// whole batch with [`StoreError::InBatch`] naming the entry, whose error is `NameTaken` (its
    /// name, ignoring ASCII case, is taken in the account or by an earlier entry) or
    /// `AlreadyExists` (its id or hash is taken by any key, or by an earlier entry). When several
    /// entries conflict, which one is named may differ between backends. Keys marked `imported`
    /// count towards [`Records::has_imported_keys`] (so does one made by `create_key`).
    async fn create_keys(&self, keys: &[KeyRecord]) -> Result<(), StoreError>;
    /// Whether the store holds a key marked `imported` (contract 5a): the proxy then looks up a
    /// credential that fails tollgate's own checksum, since an imported key's raw form has none.
    /// Kept as a count beside the keys (fleet-wide on a shared store); it may stay `true` for a
    /// while after the last imported key is gone if a deletion failed halfway, never `false`
    /// while one is there. A key's `imported` flag never changes after it is created.
    async fn has_imported_keys(&self) -> Result<bool, StoreError>;
    /// One key of one account.
    async fn get_key(
        &self,
        account_id: &str,
        key_id: &str,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// All keys of an account, oldest first.
    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>, StoreError>;
    /// Replaces an existing key (same id, account and hash); `NameTaken` if renamed onto a
    /// name another key holds (ignoring ASCII case: a key may change the case of its own name),
    /// `NotFound` if absent.
    async fn update_key(&self, key: &KeyRecord) -> Result<(), StoreError>;
    /// Deletes a key and its hash index, returning it; `Ok(None)` if it did not exist.
    async fn delete_key(
        &self,
        account_id: &str,
        key_id: &str,
    ) -> Result<Option<KeyRecord>, StoreError>;

    /// Adds a site; `AlreadyExists` if the account has one with this name.
    async fn create_site(&self, site: &SiteRecord) -> Result<(), StoreError>;
    /// An account's sites, oldest first.
    async fn list_sites(&self, account_id: &str) -> Result<Vec<SiteRecord>, StoreError>;
    /// Deletes a site; `false` if it did not exist.
    async fn delete_site(&self, account_id: &str, site_id: &str) -> Result<bool, StoreError>;

    /// The stored hash of the operator's master key.
    async fn master_key_hash(&self) -> Result<Option<KeyHash>, StoreError>;
    /// Stores the master key's hash, replacing any earlier one.
    async fn set_master_key_hash(&self, hash: &KeyHash) -> Result<(), StoreError>;
}

/// OAuth clients: each account's client secrets, and the access tokens issued with them.
#[async_trait]
pub trait Clients: Send + Sync {
    /// Adds a client secret; `AlreadyExists` if its id or hash exists.
    async fn create_secret(&self, secret: &SecretRecord) -> Result<(), StoreError>;
    /// An account's client secrets, oldest first.
    async fn list_secrets(&self, account_id: &str) -> Result<Vec<SecretRecord>, StoreError>;
    /// The client secret with this hash.
    async fn find_secret(&self, hash: &KeyHash) -> Result<Option<SecretRecord>, StoreError>;
    /// Deletes a client secret and every token issued with it, answering the secret and the
    /// tokens' hashes (for the caches to drop); `None` if there was no such secret.
    async fn delete_secret(
        &self,
        account_id: &str,
        secret_id: &str,
    ) -> Result<Option<(SecretRecord, Vec<KeyHash>)>, StoreError>;
    /// Stores an access token until it expires (a backend may forget it after that).
    async fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// The token with this hash (expired or not, while it is still stored).
    async fn find_token(&self, hash: &KeyHash) -> Result<Option<TokenRecord>, StoreError>;
    /// Forgets the tokens that expired before `now`; answers how many this call removed (a
    /// backend that expires them by itself removes none here).
    async fn prune_tokens(&self, now: chrono::DateTime<chrono::Utc>) -> Result<u64, StoreError>;
}

/// The audit log: every account's chain of entries, and the all-accounts log.
#[async_trait]
pub trait AuditLog: Send + Sync {
    /// Appends an audit entry. An entry with an account becomes the next link of that account's
    /// chain ([`audit_chain`]): the store sets its `prev_hash` and `hash` (whatever the caller
    /// set) from the account's head, and moves the head, atomically with the append, so that
    /// concurrent appends (from several instances, too) keep the chain linear. An entry without
    /// an account joins only the all-accounts log, unchained.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;
    /// Appends `entries` in order, each as [`AuditLog::append_audit`] would; stops at the first
    /// that fails. A backend whose writes wait for the disk writes them together (an import of
    /// 1,000 keys is 1,000 entries).
    async fn append_audits(&self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        for entry in entries {
            self.append_audit(entry).await?;
        }
        Ok(())
    }
    /// The head of an account's audit chain (its newest chained entry's id and hash); `None`
    /// before its first chained entry.
    async fn audit_head(
        &self,
        account_id: &str,
    ) -> Result<Option<audit_chain::ChainHead>, StoreError>;
    /// Up to `limit` of an account's audit entries, oldest first, starting after position
    /// `after` (a previous page's `next`; `None` for the oldest). Entries appended meanwhile
    /// come after, never inside, the pages already read.
    async fn audit_chain_page(
        &self,
        account_id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<AuditChainPage, StoreError>;
    /// Audit entries, newest first, filtered to one account when `account_id` is given.
    async fn list_audit(
        &self,
        account_id: Option<&str>,
        query: &AuditQuery,
    ) -> Result<AuditPage, StoreError>;
}

/// Usage buckets (per key: minute, hour, day; per account: day) and each key's last use.
#[async_trait]
pub trait Usage: Send + Sync {
    /// Adds a batch of per-key, per-minute counts: the key's minute, hour and day buckets, its
    /// account's day bucket, and its last-used time. Exactly once per [`BatchId`]: a batch whose
    /// `seq` is not above the last one applied from its writer (within [`BATCH_MEMORY`]) changes
    /// nothing. On error the caller cannot know whether it was applied (a timeout may come after
    /// the write), and retries the same batch with the same id.
    async fn add_usage(&self, id: BatchId, batch: &[UsageDelta]) -> Result<(), StoreError>;
    /// A key's buckets of one granularity with `from <= index < to` (index = bucket start in
    /// seconds since the epoch / bucket length), ascending; buckets without traffic are absent.
    async fn key_usage(
        &self,
        key_id: &str,
        granularity: Granularity,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError>;
    /// An account's day buckets (the sum over its keys) with `from_day <= day < to_day`.
    async fn account_usage(
        &self,
        account_id: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError>;
    /// When each key was last used (milliseconds since the epoch), in the order given.
    async fn last_used(&self, key_ids: &[String]) -> Result<Vec<Option<i64>>, StoreError>;
    /// Removes the buckets of one granularity (keys' and, for days, accounts') with index
    /// `< before`; returns how many were removed.
    async fn prune_usage(&self, granularity: Granularity, before: i64) -> Result<u64, StoreError>;
    /// How long buckets of each granularity are kept (`metering.retention`), at start and after a
    /// config reload. Pruning enforces it; a backend may also expire buckets by itself, well
    /// after it (Redis: twice the retention after the last write). Nothing by default.
    fn set_retention(&self, retention: &[(Granularity, Duration)]) {
        let _ = retention;
    }
}

/// Window counters that every instance of a fleet takes tokens from ([`Store::limit_buckets`]).
#[async_trait]
pub trait LimitBuckets: Send + Sync {
    /// Takes up to `want` tokens from each of a key's shared window counters (one per entry of
    /// `takes`), never letting a counter pass its `limit`; answers what was granted and each
    /// counter's total after the take. Used by `limits.mode = "global"`.
    async fn take_tokens(
        &self,
        account_id: &str,
        key_id: &str,
        takes: &[TokenTake],
    ) -> Result<Vec<TokenGrant>, StoreError>;
}

/// What the instances sharing a store tell each other: cache invalidations, and locks for rules
/// that check and then write. The defaults are right for a store that only one process uses.
#[async_trait]
pub trait Fleet: Send + Sync {
    /// Tells every instance sharing this store to drop what it caches for `what`. A store that
    /// is not shared has nobody to tell.
    async fn publish_invalidation(&self, what: &Invalidation) -> Result<(), StoreError> {
        let _ = what;
        Ok(())
    }

    /// Invalidations published by any instance (this one included), as a channel that a task
    /// drains; `None` for a store that is not shared. After every (re)subscription the channel
    /// first yields [`InvalidationEvent::Resync`]: messages may have been missed.
    async fn subscribe_invalidations(
        &self,
    ) -> Option<tokio::sync::mpsc::Receiver<InvalidationEvent>> {
        None
    }

    /// Takes the named lock for `ttl` if nobody holds it (`true`), marking it with `token`. For
    /// rules that check and then write (plan limits, the last credential) across instances. A
    /// store that is not shared has no other writers: the default always grants.
    async fn try_lock(
        &self,
        name: &str,
        token: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let _ = (name, token, ttl);
        Ok(true)
    }

    /// Releases the named lock if it still carries `token`.
    async fn unlock(&self, name: &str, token: &str) -> Result<(), StoreError> {
        let _ = (name, token);
        Ok(())
    }
}
