//! [`Records`] on the embedded store: accounts, keys, sites and the master key's hash, each
//! call one redb transaction. A write that may change what a lookup answers goes through
//! `write_records`, which moves the store's revision on. The number of imported keys is kept in
//! `meta` (`imported_keys`), moved in the transaction that creates or deletes them.

use std::sync::atomic::Ordering;

use redb::{ReadableTable, WriteTransaction};

use super::{
    db_err, decode, encode, get_json, EmbeddedStore, ACCOUNTS, ACCOUNT_KEYS, IMPORTED_KEYS, KEYS,
    KEY_HASHES, KEY_NAMES, KEY_NAMES_FOLDED, MASTER_KEY_HASH, META, SITES,
};
use crate::credential::KeyHash;
use crate::store::{
    key_name_index, AccountRecord, KeyLookup, KeyRecord, Records, SiteRecord, StoreError,
};

#[async_trait::async_trait]
impl Records for EmbeddedStore {
    fn revision(&self) -> Option<u64> {
        Some(self.revision.load(Ordering::SeqCst))
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
                access_token: false,
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
            let mut removed: Vec<KeyRecord> = Vec::with_capacity(key_ids.len());
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
            let imported = removed.iter().filter(|k| k.imported).count();
            count_imported(txn, -i64::try_from(imported).unwrap_or(i64::MAX))?;

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
        self.write_records(move |txn| insert_keys(txn, std::slice::from_ref(&key)))
            .await
            .map_err(StoreError::unbatched)
    }

    async fn create_keys(&self, keys: &[KeyRecord]) -> Result<(), StoreError> {
        let keys = keys.to_vec();
        self.write_records(move |txn| insert_keys(txn, &keys)).await
    }

    async fn has_imported_keys(&self) -> Result<bool, StoreError> {
        self.read(|txn| {
            let meta = txn.open_table(META).map_err(db_err)?;
            Ok(imported_count(&meta)? > 0)
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
            // The hash is immutable: keep the indexed one so that the hash index stays true; so
            // is `imported`, which the count of imported keys follows.
            key.hash = old.hash;
            key.imported = old.imported;
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
            if key.imported {
                count_imported(txn, -1)?;
            }
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

impl EmbeddedStore {
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

/// Writes `keys` with their indexes in one transaction, each checked against what is stored
/// and the entries before it; a conflict is [`StoreError::InBatch`] (`NameTaken` if its account
/// has its name ignoring ASCII case, `AlreadyExists` if its id or hash is taken), and the
/// caller's transaction is then aborted, so nothing is written. Counts the imported ones.
fn insert_keys(txn: &WriteTransaction, keys: &[KeyRecord]) -> Result<(), StoreError> {
    let mut names = txn.open_table(KEY_NAMES).map_err(db_err)?;
    let mut records = txn.open_table(KEYS).map_err(db_err)?;
    let mut hashes = txn.open_table(KEY_HASHES).map_err(db_err)?;
    let mut account_keys = txn.open_table(ACCOUNT_KEYS).map_err(db_err)?;
    for (index, key) in keys.iter().enumerate() {
        let refused = |error| StoreError::InBatch {
            index,
            error: Box::new(error),
        };
        let folded = key_name_index(&key.name);
        let name_key = (key.account_id.as_str(), folded.as_str());
        if names.get(name_key).map_err(db_err)?.is_some() {
            return Err(refused(StoreError::NameTaken));
        }
        if records.get(key.id.as_str()).map_err(db_err)?.is_some()
            || hashes.get(key.hash.0).map_err(db_err)?.is_some()
        {
            return Err(refused(StoreError::AlreadyExists));
        }
        let bytes = encode(key)?;
        records
            .insert(key.id.as_str(), bytes.as_slice())
            .map_err(db_err)?;
        hashes.insert(key.hash.0, key.id.as_str()).map_err(db_err)?;
        names.insert(name_key, key.id.as_str()).map_err(db_err)?;
        account_keys
            .insert((key.account_id.as_str(), key.id.as_str()), ())
            .map_err(db_err)?;
    }
    let imported = keys.iter().filter(|k| k.imported).count();
    count_imported(txn, i64::try_from(imported).unwrap_or(i64::MAX))
}

/// The number of imported keys, as `meta` holds it (none written yet: 0).
fn imported_count(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64, StoreError> {
    let Some(value) = meta.get(IMPORTED_KEYS).map_err(db_err)? else {
        return Ok(0);
    };
    let bytes: [u8; 8] = value.value().try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "imported key count: expected 8 bytes, found {}",
            value.value().len()
        ))
    })?;
    Ok(u64::from_le_bytes(bytes))
}

/// Moves the number of imported keys by `delta`, within the transaction that creates or deletes
/// them (never below 0).
fn count_imported(txn: &WriteTransaction, delta: i64) -> Result<(), StoreError> {
    if delta == 0 {
        return Ok(());
    }
    let mut meta = txn.open_table(META).map_err(db_err)?;
    let now = imported_count(&meta)?.saturating_add_signed(delta);
    meta.insert(IMPORTED_KEYS, now.to_le_bytes().as_slice())
        .map_err(db_err)?;
    Ok(())
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
pub(super) fn fold_key_names(txn: &WriteTransaction) -> Result<(), StoreError> {
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
