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
//! | `key_hashes`     | key hash (`[u8; 32]`)             | key id                    | [`Store::lookup_key`]; uniqueness of hashes                |
//! | `account_keys`   | (account id, key id)              | `()`                      | listing an account's keys; deleting them with the account  |
//! | `key_names`      | (account id, [`key_name_index`] of the key name) | key id     | uniqueness of key names within an account, ignoring ASCII case |
//! | `sites`          | (account id, site id)             | site JSON                 | an account's sites, listed by key prefix                   |
//! | `audit`          | sequence (`u64`, ascending)       | entry JSON + `account_id` | the audit log in append order (read backwards: newest first) |
//! | `audit_accounts` | (account id, sequence)            | `()`                      | one account's audit entries without scanning the others    |
//! | `audit_heads`    | account id                        | [`ChainHead`] JSON        | the newest link of the account's audit chain ([`audit_chain`]) |
//! | `key_minutes`, `key_hours`, `key_days`, `account_days` | (index `i64`, owner id as bytes) | 56 bytes: 6 × LE `u64` counts, LE `i64` last used ms | usage buckets, time-major so that a flush touches only the current pages ([`usage`]) |
//! | `key_minutes_by_key_hour`, `key_hours_by_key`, `key_days_by_key`, `account_days_by_account` | (owner id, hour for minutes, else index) | `()` | an owner's buckets from … to; written once per new hour of minutes, or new bucket |
//! | `usage_journal`  | sequence (`u64`)                  | one `add_usage` batch, packed | flushes not yet folded into the buckets ([`journal`]) |
//! | `key_last_used`  | key id                            | ms (`i64`)                | last use of a key whose minute buckets were pruned         |
//! | `usage_writers`  | batch writer (`u64`)              | (last seq applied, ms)    | [`Store::add_usage`] applies each [`BatchId`] once; rows older than [`BATCH_MEMORY`] are dropped |
//! | `meta`           | name (`str`)                      | bytes                     | singletons: `master_key_hash` (32 bytes), `key_names_folded` |
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

mod commit;
mod journal;
mod usage;

use commit::GroupCommit;
use journal::{Applied, Unfolded};

use crate::credential::KeyHash;
use crate::store::audit_chain::{self, ChainHead};
use crate::store::{
    key_name_index, AccountRecord, AuditChainPage, AuditEntry, AuditPage, AuditQuery, BatchId,
    Granularity, KeyLookup, KeyRecord, SiteRecord, Store, StoreError, UsageCounts, UsageDelta,
    BATCH_MEMORY,
};

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
    /// Bumped after every write to accounts, keys or sites: see [`Store::revision`]. Only this
    /// process can write the file (redb locks it), so the counter sees every change.
    revision: AtomicU64,
    /// Usage journaled and not yet in the buckets; locked for every usage call, across its
    /// transaction, so that a query never sees counts both folded and unfolded.
    unfolded: Arc<Mutex<Unfolded>>,
}

// === impl EmbeddedStore ===

impl EmbeddedStore {
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
                usage::create_tables(txn)?;
                txn.open_table(META).map_err(db_err)?;
                fold_key_names(txn)?;
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

    /// Writes an account that must (`exists`) or must not already be there.
    async fn put_account(&self, account: &AccountRecord, exists: bool) -> Result<(), StoreError> {
        let account = account.clone();
        self.write_records(move |txn| {
            let mut accounts = txn.open_table(ACCOUNTS).map_err(db_err)?;
            match (
                accounts.get(account.id.as_str()).map_err(db_err)?.is_some(),
                exists,
            ) {
                (true, false) => return Err(StoreError::AlreadyExists),
                (false, true) => return Err(StoreError::NotFound),
                _ => {}
            }
            let bytes = encode(&account)?;
            accounts
                .insert(account.id.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
        .await
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

#[async_trait]
impl Store for EmbeddedStore {
    fn revision(&self) -> Option<u64> {
        Some(self.revision.load(Ordering::SeqCst))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|txn| {
            txn.open_table(META).map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn lookup_key(&self, hash: &KeyHash) -> Result<Option<KeyLookup>, StoreError> {
        let hash = hash.0;
        self.read(move |txn| {
            let hashes = txn.open_table(KEY_HASHES).map_err(db_err)?;
            let Some(key_id) = hashes.get(hash).map_err(db_err)? else {
                return Ok(None);
            };
            let keys = txn.open_table(KEYS).map_err(db_err)?;
            let Some(key) = get_json::<_, KeyRecord>(&keys, key_id.value(), "key")? else {
                return Ok(None);
            };
            let accounts = txn.open_table(ACCOUNTS).map_err(db_err)?;
            let Some(account) =
                get_json::<_, AccountRecord>(&accounts, key.account_id.as_str(), "account")?
            else {
                return Ok(None);
            };
            let sites = txn.open_table(SITES).map_err(db_err)?;
            let site_origins = account_sites(&sites, &account.id)?
                .into_iter()
                .map(|site| site.name)
                .collect();
            Ok(Some(KeyLookup {
                key,
                account,
                site_origins,
            }))
        })
        .await
    }

    async fn create_account(&self, account: &AccountRecord) -> Result<(), StoreError> {
        self.put_account(account, false).await
    }

    async fn get_account(&self, id: &str) -> Result<Option<AccountRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |txn| {
            let accounts = txn.open_table(ACCOUNTS).map_err(db_err)?;
            get_json(&accounts, id.as_str(), "account")
        })
        .await
    }

    async fn list_accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        self.read(|txn| {
            let accounts = txn.open_table(ACCOUNTS).map_err(db_err)?;
            let mut out = Vec::new();
            for item in accounts.iter().map_err(db_err)? {
                let (_, value) = item.map_err(db_err)?;
                out.push(decode::<AccountRecord>(value.value(), "account")?);
            }
            out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            Ok(out)
        })
        .await
    }

    async fn update_account(&self, account: &AccountRecord) -> Result<(), StoreError> {
        self.put_account(account, true).await
    }

    async fn delete_account(&self, id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let id = id.to_owned();
        self.write_records(move |txn| {
            let mut accounts = txn.open_table(ACCOUNTS).map_err(db_err)?;
            if accounts.remove(id.as_str()).map_err(db_err)?.is_none() {
                return Err(StoreError::NotFound);
            }

            let mut account_keys = txn.open_table(ACCOUNT_KEYS).map_err(db_err)?;
            let key_ids = account_key_ids(&account_keys, &id)?;
            let mut keys = txn.open_table(KEYS).map_err(db_err)?;
            let mut hashes = txn.open_table(KEY_HASHES).map_err(db_err)?;
            let mut names = txn.open_table(KEY_NAMES).map_err(db_err)?;
            let mut removed = Vec::with_capacity(key_ids.len());
            for key_id in &key_ids {
                account_keys
                    .remove((id.as_str(), key_id.as_str()))
                    .map_err(db_err)?;
                let Some(bytes) = keys.remove(key_id.as_str()).map_err(db_err)? else {
                    continue;
                };
                let key = decode::<KeyRecord>(bytes.value(), "key")?;
                drop(bytes);
                remove_key_indexes(&mut hashes, &mut names, &key)?;
                removed.push(key);
            }
            removed.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));

            let mut sites = txn.open_table(SITES).map_err(db_err)?;
            let mut site_ids = Vec::new();
            for item in sites.range(prefix_range(&id)).map_err(db_err)? {
                let (key, _) = item.map_err(db_err)?;
                let (account_id, site_id) = key.value();
                if account_id != id {
                    break;
                }
                site_ids.push(site_id.to_owned());
            }
            for site_id in &site_ids {
                sites
                    .remove((id.as_str(), site_id.as_str()))
                    .map_err(db_err)?;
            }
            Ok(removed)
        })
        .await
    }

    async fn create_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let key = key.clone();
        self.write_records(move |txn| {
            let mut names = txn.open_table(KEY_NAMES).map_err(db_err)?;
            let folded = key_name_index(&key.name);
            let name_key = (key.account_id.as_str(), folded.as_str());
            if names.get(name_key).map_err(db_err)?.is_some() {
                return Err(StoreError::NameTaken);
            }
            let mut keys = txn.open_table(KEYS).map_err(db_err)?;
            let mut hashes = txn.open_table(KEY_HASHES).map_err(db_err)?;
            if keys.get(key.id.as_str()).map_err(db_err)?.is_some()
                || hashes.get(key.hash.0).map_err(db_err)?.is_some()
            {
                return Err(StoreError::AlreadyExists);
            }
            let bytes = encode(&key)?;
            keys.insert(key.id.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            hashes.insert(key.hash.0, key.id.as_str()).map_err(db_err)?;
            names.insert(name_key, key.id.as_str()).map_err(db_err)?;
            let mut account_keys = txn.open_table(ACCOUNT_KEYS).map_err(db_err)?;
            account_keys
                .insert((key.account_id.as_str(), key.id.as_str()), ())
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn get_key(
        &self,
        account_id: &str,
        key_id: &str,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let (account_id, key_id) = (account_id.to_owned(), key_id.to_owned());
        self.read(move |txn| {
            let keys = txn.open_table(KEYS).map_err(db_err)?;
            let key = get_json::<_, KeyRecord>(&keys, key_id.as_str(), "key")?;
            Ok(key.filter(|k| k.account_id == account_id))
        })
        .await
    }

    async fn list_keys(&self, account_id: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let account_id = account_id.to_owned();
        self.read(move |txn| {
            let account_keys = txn.open_table(ACCOUNT_KEYS).map_err(db_err)?;
            let keys = txn.open_table(KEYS).map_err(db_err)?;
            let mut out = Vec::new();
            for key_id in account_key_ids(&account_keys, &account_id)? {
                if let Some(key) = get_json::<_, KeyRecord>(&keys, key_id.as_str(), "key")? {
                    out.push(key);
                }
            }
            out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            Ok(out)
        })
        .await
    }

    async fn update_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let mut key = key.clone();
        self.write_records(move |txn| {
            let mut keys = txn.open_table(KEYS).map_err(db_err)?;
            let old = match get_json::<_, KeyRecord>(&keys, key.id.as_str(), "key")? {
                Some(old) if old.account_id == key.account_id => old,
                _ => return Err(StoreError::NotFound),
            };
            // The hash is immutable: keep the indexed one so that the hash index stays true.
            key.hash = old.hash;
            if old.name != key.name {
                let mut names = txn.open_table(KEY_NAMES).map_err(db_err)?;
                let folded = key_name_index(&key.name);
                let new_name = (key.account_id.as_str(), folded.as_str());
                if let Some(owner) = names.get(new_name).map_err(db_err)? {
                    if owner.value() != key.id {
                        return Err(StoreError::NameTaken);
                    }
                }
                remove_name_index(&mut names, &old)?;
                names.insert(new_name, key.id.as_str()).map_err(db_err)?;
            }
            let bytes = encode(&key)?;
            keys.insert(key.id.as_str(), bytes.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn delete_key(
        &self,
        account_id: &str,
        key_id: &str,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let (account_id, key_id) = (account_id.to_owned(), key_id.to_owned());
        self.write_records(move |txn| {
            let mut keys = txn.open_table(KEYS).map_err(db_err)?;
            let key = match get_json::<_, KeyRecord>(&keys, key_id.as_str(), "key")? {
                Some(key) if key.account_id == account_id => key,
                _ => return Ok(None),
            };
            keys.remove(key_id.as_str()).map_err(db_err)?;
            let mut hashes = txn.open_table(KEY_HASHES).map_err(db_err)?;
            let mut names = txn.open_table(KEY_NAMES).map_err(db_err)?;
            remove_key_indexes(&mut hashes, &mut names, &key)?;
            let mut account_keys = txn.open_table(ACCOUNT_KEYS).map_err(db_err)?;
            account_keys
                .remove((account_id.as_str(), key_id.as_str()))
                .map_err(db_err)?;
            Ok(Some(key))
        })
        .await
    }

    async fn create_site(&self, site: &SiteRecord) -> Result<(), StoreError> {
        let site = site.clone();
        self.write_records(move |txn| {
            let mut sites = txn.open_table(SITES).map_err(db_err)?;
            if account_sites(&sites, &site.account_id)?
                .iter()
                .any(|s| s.id == site.id || s.name == site.name)
            {
                return Err(StoreError::AlreadyExists);
            }
            let bytes = encode(&site)?;
            sites
                .insert(
                    (site.account_id.as_str(), site.id.as_str()),
                    bytes.as_slice(),
                )
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn list_sites(&self, account_id: &str) -> Result<Vec<SiteRecord>, StoreError> {
        let account_id = account_id.to_owned();
        self.read(move |txn| {
            let sites = txn.open_table(SITES).map_err(db_err)?;
            account_sites(&sites, &account_id)
        })
        .await
    }

    async fn delete_site(&self, account_id: &str, site_id: &str) -> Result<bool, StoreError> {
        let (account_id, site_id) = (account_id.to_owned(), site_id.to_owned());
        self.write_records(move |txn| {
            let mut sites = txn.open_table(SITES).map_err(db_err)?;
            let removed = sites
                .remove((account_id.as_str(), site_id.as_str()))
                .map_err(db_err)?
                .is_some();
            Ok(removed)
        })
        .await
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let mut entry = entry.clone();
        (entry.prev_hash, entry.hash) = (None, None);
        self.write(move |txn| {
            let mut audit = txn.open_table(AUDIT).map_err(db_err)?;
            let seq = match audit.last().map_err(db_err)? {
                Some((key, _)) => key.value().saturating_add(1),
                None => 0,
            };
            if let Some(account_id) = entry.account_id.clone() {
                let mut heads = txn.open_table(AUDIT_HEADS).map_err(db_err)?;
                let head: Option<ChainHead> =
                    get_json(&heads, account_id.as_str(), "audit chain head")?;
                let head = audit_chain::link(head.as_ref(), &mut entry);
                heads
                    .insert(account_id.as_str(), encode(&head)?.as_slice())
                    .map_err(db_err)?;
                let mut by_account = txn.open_table(AUDIT_ACCOUNTS).map_err(db_err)?;
                by_account
                    .insert((account_id.as_str(), seq), ())
                    .map_err(db_err)?;
            }
            let bytes = encode_audit(&entry)?;
            audit.insert(seq, bytes.as_slice()).map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn audit_head(&self, account_id: &str) -> Result<Option<ChainHead>, StoreError> {
        let account_id = account_id.to_owned();
        self.read(move |txn| {
            let heads = txn.open_table(AUDIT_HEADS).map_err(db_err)?;
            get_json(&heads, account_id.as_str(), "audit chain head")
        })
        .await
    }

    async fn audit_chain_page(
        &self,
        account_id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<AuditChainPage, StoreError> {
        let account_id = account_id.to_owned();
        self.read(move |txn| {
            let audit = txn.open_table(AUDIT).map_err(db_err)?;
            let by_account = txn.open_table(AUDIT_ACCOUNTS).map_err(db_err)?;
            let start = match after {
                Some(seq) => match seq.checked_add(1) {
                    Some(next) => next,
                    None => return Ok(AuditChainPage::default()),
                },
                None => 0,
            };
            let range = (account_id.as_str(), start)..=(account_id.as_str(), u64::MAX);
            let mut page = AuditChainPage::default();
            let (mut last, mut rows) = (None, 0);
            for item in by_account.range(range).map_err(db_err)?.take(limit) {
                let seq = item.map_err(db_err)?.0.value().1;
                (last, rows) = (Some(seq), rows + 1);
                // An index row without its entry: the entry after it shows the gap.
                if let Some(value) = audit.get(seq).map_err(db_err)? {
                    page.entries.push(AuditEntry::from_stored(value.value()));
                }
            }
            // A short page reached the newest entry.
            page.next = last.filter(|_| rows == limit);
            Ok(page)
        })
        .await
    }

    async fn list_audit(
        &self,
        account_id: Option<&str>,
        query: &AuditQuery,
    ) -> Result<AuditPage, StoreError> {
        let account_id = account_id.map(str::to_owned);
        let query = query.clone();
        self.read(move |txn| {
            let audit = txn.open_table(AUDIT).map_err(db_err)?;
            let search = query.search.as_deref().map(str::to_lowercase);
            let mut page = AuditPage::default();
            let mut consider = |bytes: &[u8]| -> Result<(), StoreError> {
                let entry = decode::<AuditEntry>(bytes, "audit entry")?;
                if query.action.as_ref().is_some_and(|a| *a != entry.action) {
                    return Ok(());
                }
                if let Some(needle) = &search {
                    if !entry.matches(needle) {
                        return Ok(());
                    }
                }
                if page.total >= query.offset && page.entries.len() < query.limit {
                    page.entries.push(entry);
                }
                page.total += 1;
                Ok(())
            };
            match &account_id {
                None => {
                    for item in audit.iter().map_err(db_err)?.rev() {
                        let (_, value) = item.map_err(db_err)?;
                        consider(value.value())?;
                    }
                }
                Some(account_id) => {
                    let by_account = txn.open_table(AUDIT_ACCOUNTS).map_err(db_err)?;
                    let range = (account_id.as_str(), 0)..=(account_id.as_str(), u64::MAX);
                    for item in by_account.range(range).map_err(db_err)?.rev() {
                        let (key, _) = item.map_err(db_err)?;
                        let seq = key.value().1;
                        let Some(value) = audit.get(seq).map_err(db_err)? else {
                            continue;
                        };
                        consider(value.value())?;
                    }
                }
            }
            Ok(page)
        })
        .await
    }

    async fn add_usage(&self, id: BatchId, batch: &[UsageDelta]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut batch = batch.to_vec();
        batch.iter_mut().for_each(usage::keep_last_use_in_minute);
        let now_ms = chrono::Utc::now().timestamp_millis();
        self.write_usage(move |txn, unfolded| {
            // A commit is all or nothing, so a failed call was not applied; but a caller that
            // retries (with the same id) is told "done" without counting twice all the same.
            if !claim_batch(txn, id, now_ms)? {
                return Ok((None, ()));
            }
            Ok((Some(unfolded.apply(txn, batch)?), ()))
        })
        .await
    }

    async fn key_usage(
        &self,
        key_id: &str,
        granularity: Granularity,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let key_id = key_id.to_owned();
        self.read_usage(move |txn, unfolded| {
            let stored = usage::key_buckets(txn, &key_id, granularity, from, to)?;
            Ok(unfolded.add_key(&key_id, granularity, from, to, stored))
        })
        .await
    }

    async fn account_usage(
        &self,
        account_id: &str,
        from_day: i64,
        to_day: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        if from_day >= to_day {
            return Ok(Vec::new());
        }
        let account_id = account_id.to_owned();
        self.read_usage(move |txn, unfolded| {
            let stored = usage::account_days(txn, &account_id, from_day, to_day)?;
            Ok(unfolded.add_account(&account_id, from_day, to_day, stored))
        })
        .await
    }

    async fn last_used(&self, key_ids: &[String]) -> Result<Vec<Option<i64>>, StoreError> {
        let key_ids = key_ids.to_vec();
        self.read_usage(move |txn, unfolded| {
            key_ids
                .iter()
                .map(|id| Ok(usage::last_used(txn, id)?.max(unfolded.last_used(id))))
                .collect()
        })
        .await
    }

    async fn prune_usage(&self, granularity: Granularity, before: i64) -> Result<u64, StoreError> {
        self.write_usage(move |txn, unfolded| {
            let folded = unfolded.fold(txn)?;
            Ok((Some(folded), usage::prune(txn, granularity, before)?))
        })
        .await
    }

    async fn master_key_hash(&self) -> Result<Option<KeyHash>, StoreError> {
        self.read(|txn| {
            let meta = txn.open_table(META).map_err(db_err)?;
            let Some(value) = meta.get(MASTER_KEY_HASH).map_err(db_err)? else {
                return Ok(None);
            };
            let bytes: [u8; 32] = value.value().try_into().map_err(|_| {
                StoreError::Corrupt(format!(
                    "master key hash: expected 32 bytes, found {}",
                    value.value().len()
                ))
            })?;
            Ok(Some(KeyHash(bytes)))
        })
        .await
    }

    async fn set_master_key_hash(&self, hash: &KeyHash) -> Result<(), StoreError> {
        let hash = hash.0;
        self.write(move |txn| {
            let mut meta = txn.open_table(META).map_err(db_err)?;
            meta.insert(MASTER_KEY_HASH, hash.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }
}

/// Records `id` as its writer's last applied batch, unless that writer already has one as
/// recent; forgets writers silent for longer than [`BATCH_MEMORY`]. `false`: already applied.
fn claim_batch(txn: &WriteTransaction, id: BatchId, now_ms: i64) -> Result<bool, StoreError> {
    let mut writers = txn.open_table(USAGE_WRITERS).map_err(db_err)?;
    let last = writers.get(id.writer).map_err(db_err)?.map(|v| v.value().0);
    if last.is_some_and(|seq| seq >= id.seq) {
        return Ok(false);
    }
    writers
        .insert(id.writer, (id.seq, now_ms))
        .map_err(db_err)?;
    let memory_ms = i64::try_from(BATCH_MEMORY.as_millis()).unwrap_or(i64::MAX);
    let cutoff = now_ms.saturating_sub(memory_ms);
    writers
        .retain(|_, (_, applied_ms)| applied_ms >= cutoff)
        .map_err(db_err)?;
    Ok(true)
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

/// The entry's JSON with its `account_id`, which the record's own serialization skips.
fn encode_audit(entry: &AuditEntry) -> Result<Vec<u8>, StoreError> {
    let value = entry
        .stored_json()
        .map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))?;
    encode(&value)
}

/// The range of `(account_id, _)` keys starts here; callers stop at the first other account.
fn prefix_range(account_id: &str) -> std::ops::RangeFrom<(&str, &str)> {
    (account_id, "")..
}

/// An account's sites, oldest first.
fn account_sites(
    sites: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    account_id: &str,
) -> Result<Vec<SiteRecord>, StoreError> {
    let mut out = Vec::new();
    for item in sites.range(prefix_range(account_id)).map_err(db_err)? {
        let (key, value) = item.map_err(db_err)?;
        if key.value().0 != account_id {
            break;
        }
        out.push(decode::<SiteRecord>(value.value(), "site")?);
    }
    out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(out)
}

/// The ids of an account's keys, from the `account_keys` index.
fn account_key_ids(
    index: &impl ReadableTable<(&'static str, &'static str), ()>,
    account_id: &str,
) -> Result<Vec<String>, StoreError> {
    let mut ids = Vec::new();
    for item in index.range(prefix_range(account_id)).map_err(db_err)? {
        let (key, _) = item.map_err(db_err)?;
        let (owner, key_id) = key.value();
        if owner != account_id {
            break;
        }
        ids.push(key_id.to_owned());
    }
    Ok(ids)
}

/// Removes a key's hash and name index entries, each only if it still points at this key.
fn remove_key_indexes(
    hashes: &mut redb::Table<'_, [u8; 32], &'static str>,
    names: &mut redb::Table<'_, (&'static str, &'static str), &'static str>,
    key: &KeyRecord,
) -> Result<(), StoreError> {
    let hash_owned = hashes
        .get(key.hash.0)
        .map_err(db_err)?
        .is_some_and(|id| id.value() == key.id);
    if hash_owned {
        hashes.remove(key.hash.0).map_err(db_err)?;
    }
    remove_name_index(names, key)
}

/// Removes a key's name index entry if it still points at this key.
fn remove_name_index(
    names: &mut redb::Table<'_, (&'static str, &'static str), &'static str>,
    key: &KeyRecord,
) -> Result<(), StoreError> {
    let folded = key_name_index(&key.name);
    let name_key = (key.account_id.as_str(), folded.as_str());
    let name_owned = names
        .get(name_key)
        .map_err(db_err)?
        .is_some_and(|id| id.value() == key.id);
    if name_owned {
        names.remove(name_key).map_err(db_err)?;
    }
    Ok(())
}

/// Re-keys the name index of a file written before names were unique ignoring ASCII case
/// (entries under the name as given) by [`key_name_index`], once: `meta` then records that it
/// is done. Where two keys of an account had names differing only in case, the first in byte
/// order (`SKB` before `skb`) keeps the entry; the other key keeps its name and works as before,
/// but holds no entry until it is renamed.
fn fold_key_names(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META).map_err(db_err)?;
    if meta.get(KEY_NAMES_FOLDED).map_err(db_err)?.is_some() {
        return Ok(());
    }
    let mut names = txn.open_table(KEY_NAMES).map_err(db_err)?;
    let mut entries = Vec::new();
    for entry in names.iter().map_err(db_err)? {
        let (name_key, id) = entry.map_err(db_err)?;
        let (account, name) = name_key.value();
        entries.push((account.to_owned(), name.to_owned(), id.value().to_owned()));
    }
    for (account, name, _) in &entries {
        names
            .remove((account.as_str(), name.as_str()))
            .map_err(db_err)?;
    }
    for (account, name, id) in &entries {
        let folded = key_name_index(name);
        if names
            .get((account.as_str(), folded.as_str()))
            .map_err(db_err)?
            .is_none()
        {
            names
                .insert((account.as_str(), folded.as_str()), id.as_str())
                .map_err(db_err)?;
        }
    }
    meta.insert(KEY_NAMES_FOLDED, &[1u8][..]).map_err(db_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn delta(key: &str, minute: i64, requests: u64, last_used_ms: i64) -> UsageDelta {
        UsageDelta {
            key_id: key.into(),
            account_id: "acc_1".into(),
            minute,
            counts: UsageCounts {
                requests,
                ..UsageCounts::default()
            },
            last_used_ms,
        }
    }

    async fn minutes(store: &EmbeddedStore, key: &str) -> Vec<(i64, u64)> {
        let buckets = store
            .key_usage(key, Granularity::Minute, 0, i64::MAX)
            .await
            .unwrap();
        buckets.into_iter().map(|(m, c)| (m, c.requests)).collect()
    }

    #[tokio::test]
    async fn usage_adds_up_across_journal_fold_and_reopen() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("usage.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        let mut id = BatchId::first();
        // Journaled, not folded: queries see it all the same.
        store
            .add_usage(id, &[delta("key_a", 5, 1, 300_001)])
            .await
            .unwrap();
        assert!(!store.unfolded.lock().is_empty());
        assert_eq!(minutes(&store, "key_a").await, vec![(5, 1)]);
        // A batch past the threshold folds everything, itself included.
        store.unfolded.lock().fold_at = 0;
        id = id.next();
        let batch = [delta("key_a", 5, 2, 300_002), delta("key_a", 6, 4, 360_000)];
        store.add_usage(id, &batch).await.unwrap();
        assert!(store.unfolded.lock().is_empty());
        assert_eq!(minutes(&store, "key_a").await, vec![(5, 3), (6, 4)]);
        // Past the interval, the next batch folds too.
        {
            let mut unfolded = store.unfolded.lock();
            unfolded.fold_at = usize::MAX;
            unfolded.fold_every = Duration::ZERO;
        }
        id = id.next();
        store
            .add_usage(id, &[delta("key_b", 6, 8, 360_500)])
            .await
            .unwrap();
        assert!(!store.unfolded.lock().is_empty());
        id = id.next();
        store
            .add_usage(id, &[delta("key_b", 6, 16, 360_400)])
            .await
            .unwrap();
        assert!(store.unfolded.lock().is_empty());
        // Journaled again, then the process stops: opening folds the journal, and what was
        // folded before is not counted twice.
        store.unfolded.lock().fold_every = Duration::MAX;
        id = id.next();
        store
            .add_usage(id, &[delta("key_a", 6, 32, 360_001)])
            .await
            .unwrap();
        // A retried batch is still applied once while only journaled.
        store
            .add_usage(id, &[delta("key_a", 6, 32, 360_001)])
            .await
            .unwrap();
        drop(store);
        let store = EmbeddedStore::open(&path).unwrap();
        assert!(store.unfolded.lock().is_empty());
        assert_eq!(minutes(&store, "key_a").await, vec![(5, 3), (6, 36)]);
        assert_eq!(minutes(&store, "key_b").await, vec![(6, 24)]);
        let day = store.account_usage("acc_1", 0, 1).await.unwrap();
        assert_eq!(day.len(), 1);
        assert_eq!(day[0].1.requests, 63);
        let hours = store
            .key_usage("key_a", Granularity::Hour, 0, 1)
            .await
            .unwrap();
        assert_eq!(hours[0].1.requests, 39);
        let ids = ["key_a".to_owned(), "key_b".to_owned(), "key_c".to_owned()];
        assert_eq!(
            store.last_used(&ids).await.unwrap(),
            vec![Some(360_001), Some(360_500), None]
        );
    }
}
