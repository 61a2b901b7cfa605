//! The embedded store: one [redb] file on local disk, crash-safe and transactional.
//!
//! Every [`Store`] method is one redb transaction (reads in a read transaction, changes in one
//! write transaction), run on the blocking pool with [`tokio::task::spawn_blocking`] because redb
//! is synchronous. A write returns once it is durable; concurrent writes share one fsync
//! ([`commit`]). redb errors become
//! [`StoreError::Unavailable`]; records that do not decode become [`StoreError::Corrupt`].
//!
//! # Data model
//!
//! Records are stored as `serde_json` bytes, so that a field added with a serde default reads
//! older files.
//!
//! | table            | key                               | value                     | why                                                        |
//! |------------------|-----------------------------------|---------------------------|------------------------------------------------------------|
//! | `accounts`       | account id (`str`)                | account JSON              | the accounts                                               |
//! | `keys`           | key id (`str`)                    | key JSON                  | the keys                                                   |
//! | `key_hashes`     | key hash (`[u8; 32]`)             | key id                    | [`Records::lookup_key`](crate::store::Records::lookup_key); uniqueness of hashes                |
//! | `account_keys`   | (account id, key id)              | `()`                      | listing an account's keys; deleting them with the account  |
//! | `key_names`      | (account id, [`key_name_index`] of the key name) | key id     | uniqueness of key names within an account, ignoring ASCII case |
//! | `sites`          | (account id, site id)             | site JSON                 | an account's sites, listed by key prefix                   |
//! | `audit`          | sequence (`u64`, ascending)       | entry JSON + `account_id` | the audit log in append order (read backwards: newest first) |
//! | `audit_accounts` | (account id, sequence)            | `()`                      | one account's audit entries without scanning the others    |
//! | `audit_heads`    | account id                        | [`ChainHead`] JSON        | the newest link of the account's audit chain ([`audit_chain`]) |
//! | `key_minute_blocks` | (minute `i64`, the block's first key id as bytes) | a block of up to 40 buckets of keys from the row's up to the next row's ([`minutes`]) | keys' minute buckets, time-major and packed so that a fold touches only the current pages and writes a block once for its keys ([`usage`]) |
//! | `key_hours`, `key_days`, `account_days` | (index `i64`, owner id as bytes) | 56 bytes: 6 × LE `u64` counts, LE `i64` last used ms | usage buckets, time-major; keys' hours and days are rolled up from their minutes once the hour is over ([`rollup`]) |
//! | `key_minutes_by_hour_key` | (hour `i64`, key id as bytes) | `()` | the hours a key has minute buckets in; written once per key and hour, time-major so that a fold's lookups stay in the current hour's pages ([`minutes`]) |
//! | `key_hours_by_key`, `key_days_by_key`, `account_days_by_account` | (owner id, index) | `()` | an owner's buckets from … to; written once per new bucket |
//! | `usage_journal`  | sequence (`u64`)                  | one `add_usage` batch, packed | flushes not yet folded into the buckets ([`journal`]) |
//! | `key_last_used`  | key id                            | ms (`i64`)                | last use of a key whose minute buckets were pruned         |
//! | `usage_writers`  | batch writer (`u64`)              | (last seq applied, ms)    | [`Usage::add_usage`](crate::store::Usage::add_usage) applies each [`BatchId`] once; rows older than [`BATCH_MEMORY`] are dropped |
//! | `meta`           | name (`str`)                      | bytes                     | singletons: `master_key_hash` (32 bytes), `key_names_folded`, `imported_keys` (LE `u64`: how many keys are imported), `usage_rolled` (how far minutes are rolled up into hours and days: LE `i64` minute, then `1` and a key id while an hour is part done) |
//!
//! Lists are sorted oldest first by `(created_at, id)`; the audit log is newest first by append
//! order. The audit entry's `account_id` is not part of its serialized JSON (it is
//! `skip_serializing` for the API), so the stored JSON carries it as an extra `account_id` field.
//!
//! An append reads the account's chain head, links the entry to it and moves the head in the
//! same write transaction, so the chain is linear: redb runs one write transaction at a time.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use redb::{Database, ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use serde::de::DeserializeOwned;
use serde::Serialize;

mod audit;
mod buckets;
mod clients;
mod commit;
mod credits;
mod journal;
mod minutes;
mod records;
mod rollup;
mod usage;

use commit::GroupCommit;
use journal::{Applied, Unfolded};

use crate::store::{Capabilities, Fleet, Store, StoreError};

const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const KEY_HASHES: TableDefinition<[u8; 32], &str> = TableDefinition::new("key_hashes");
const ACCOUNT_KEYS: TableDefinition<(&str, &str), ()> = TableDefinition::new("account_keys");
const KEY_NAMES: TableDefinition<(&str, &str), &str> = TableDefinition::new("key_names");
const SITES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("sites");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const AUDIT_ACCOUNTS: TableDefinition<(&str, u64), ()> = TableDefinition::new("audit_accounts");
const AUDIT_HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_heads");
const USAGE_WRITERS: TableDefinition<u64, (u64, i64)> = TableDefinition::new("usage_writers");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const MASTER_KEY_HASH: &str = "master_key_hash";
/// How many keys marked `imported` the store holds (LE `u64`; absent: none).
const IMPORTED_KEYS: &str = "imported_keys";
/// Set once `key_names` is keyed by [`key_name_index`] (see `fold_key_names`).
const KEY_NAMES_FOLDED: &str = "key_names_folded";
/// redb's page cache.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// The [`Store`] on a local redb file. Cheap to share: it holds the database behind an [`Arc`].
pub struct EmbeddedStore {
    db: Arc<Database>,
    /// Every write after `open` commits through it.
    commits: Arc<GroupCommit>,
    path: PathBuf,
    /// Bumped after every write to accounts, keys or sites: see [`Records::revision`](crate::store::Records::revision). Only this
    /// process can write the file (redb locks it), so the counter sees every change.
    revision: AtomicU64,
    /// Usage journaled and not yet in the buckets; locked for every usage call, across its
    /// transaction, so that a query never sees counts both folded and unfolded.
    unfolded: Arc<Mutex<Unfolded>>,
}

// === impl EmbeddedStore ===

impl EmbeddedStore {
    /// Not shared: redb locks the file to one process.
    pub const CAPABILITIES: Capabilities = Capabilities { shared: false };

    /// Opens the database at `path`, creating it and its parent directories if needed, and
    /// creates every table. A file that is locked (already open, in this process or another) or
    /// cannot be opened gives [`StoreError::Unavailable`] naming the path.
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot create directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        // redb's default page cache is 1 GiB, which a gateway fills with key records it also
        // holds in its own key cache; 64 MiB keeps the hot pages of indexes and usage.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot open database {}: {e}", path.display()))
            })?;
        let commits = GroupCommit::default();
        let unfolded = commits
            .write(&db, |txn| {
                txn.open_table(ACCOUNTS).map_err(db_err)?;
                txn.open_table(KEYS).map_err(db_err)?;
                txn.open_table(KEY_HASHES).map_err(db_err)?;
                txn.open_table(ACCOUNT_KEYS).map_err(db_err)?;
                txn.open_table(KEY_NAMES).map_err(db_err)?;
                txn.open_table(SITES).map_err(db_err)?;
                txn.open_table(AUDIT).map_err(db_err)?;
                txn.open_table(AUDIT_ACCOUNTS).map_err(db_err)?;
                txn.open_table(AUDIT_HEADS).map_err(db_err)?;
                txn.open_table(USAGE_WRITERS).map_err(db_err)?;
                buckets::create_tables(txn)?;
                clients::create_tables(txn)?;
                credits::create_tables(txn)?;
                txn.open_table(META).map_err(db_err)?;
                records::fold_key_names(txn)?;
                rollup::init(txn, usage::now_minute())?;
                Unfolded::recover(txn)
            })
            .map_err(|e| match e {
                StoreError::Unavailable(msg) => StoreError::Unavailable(format!(
                    "cannot initialize database {}: {msg}",
                    path.display()
                )),
                other => other,
            })?;
        Ok(EmbeddedStore {
            revision: AtomicU64::new(0),
            unfolded: Arc::new(Mutex::new(unfolded)),
            db: Arc::new(db),
            commits: Arc::new(commits),
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the blocking pool with the database and its group commit.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database, &GroupCommit) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let commits = Arc::clone(&self.commits);
        tokio::task::spawn_blocking(move || f(&db, &commits))
            .await
            .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
    }

    /// Runs `f` in one read transaction with the unfolded usage, both as of one moment.
    async fn read_usage<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction, &Unfolded) -> Result<T, StoreError> + Send + 'static,
    {
        let unfolded = Arc::clone(&self.unfolded);
        self.run(move |db, _| {
            let unfolded = unfolded.lock();
            let txn = db.begin_read().map_err(db_err)?;
            f(&txn, &unfolded)
        })
        .await
    }

    /// Runs `f` in one write transaction with the unfolded usage; what it did to the journal
    /// reaches memory once the transaction is committed, and the call returns once that commit
    /// is durable.
    async fn write_usage<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction, &Unfolded) -> Result<(Option<Applied>, T), StoreError>
            + Send
            + 'static,
    {
        let unfolded = Arc::clone(&self.unfolded);
        self.run(move |db, commits| {
            commits.job(db, move |db| {
                let mut unfolded = unfolded.lock();
                let (applied, value) = commit::transaction(db, |txn| f(txn, &unfolded))?;
                if let Some(applied) = applied {
                    unfolded.committed(applied);
                }
                Ok(value)
            })
        })
        .await
    }

    /// Runs `f` in one read transaction on the blocking pool.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.run(move |db, _| {
            let txn = db.begin_read().map_err(db_err)?;
            f(&txn)
        })
        .await
    }

    /// Runs `f` in one write transaction on the blocking pool; commits if it succeeds (returning
    /// once the commit is durable), aborts otherwise.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.run(move |db, commits| commits.write(db, f)).await
    }

    /// [`EmbeddedStore::write`] for a change that may change what `lookup_key` answers: the
    /// revision moves on once it is over (also when it failed: a wasted re-read is harmless).
    async fn write_records<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        let result = self.write(f).await;
        self.revision.fetch_add(1, Ordering::SeqCst);
        result
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Any redb error: the backend failed and the operation did not happen.
fn db_err(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    StoreError::Unavailable(e.to_string())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// Reads and decodes one JSON value by key.
fn get_json<'a, K, T>(
    table: &impl ReadableTable<K, &'static [u8]>,
    key: K::SelfType<'a>,
    what: &str,
) -> Result<Option<T>, StoreError>
where
    K: redb::Key + 'static,
    T: DeserializeOwned,
{
    match table.get(key).map_err(db_err)? {
        Some(bytes) => decode(bytes.value(), what).map(Some),
        None => Ok(None),
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|txn| {
            txn.open_table(META).map_err(db_err)?;
            Ok(())
        })
        .await
    }
}

/// Only this process can open the file: there is no other instance to tell.
impl Fleet for EmbeddedStore {}
