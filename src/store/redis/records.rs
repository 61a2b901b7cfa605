//! [`Records`] on Redis: accounts, keys, sites and the master key's hash. How each method maps
//! to round trips and what a cluster cannot make atomic is in the tables of [`super`].
//!
//! The number of imported keys (`tg:{_global}:imported_keys`) lives in another slot than the
//! keys, so it moves in a step of its own, ordered so that it is never below the truth: up
//! before imported keys are written (and down again if the write is refused), down only after
//! they are deleted.

use ::redis::Value;

use super::conn::{decode, Batch};
use super::keys::{self, GLOBAL};
use super::scripts::{self, eval};
use super::{decode_all, from_json, take, to_json, unexpected, RedisStore, ATTEMPTS};
use crate::credential::KeyHash;
use crate::store::{
    key_name_index, AccountRecord, KeyLookup, KeyRecord, Records, SiteRecord, StoreError,
};

#[async_trait::async_trait]
impl Records for RedisStore {
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
            access_token: false,
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
                    self.drop_hash_indexes(&removed, Some(cmd!("SREM", keys::accounts(), id)))
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
        if key.imported {
            // Counted with the batch's bookkeeping.
            return self
                .create_keys(std::slice::from_ref(key))
                .await
                .map_err(StoreError::unbatched);
        }
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

    async fn create_keys(&self, keys: &[KeyRecord]) -> Result<(), StoreError> {
        let Some(first) = keys.first() else {
            return Ok(());
        };
        let account_id = first.account_id.as_str();
        debug_assert!(keys.iter().all(|k| k.account_id == account_id));
        let imported = i64::try_from(keys.iter().filter(|k| k.imported).count()).unwrap_or(0);
        self.count_imported(imported).await?;
        let result = self.write_batch(account_id, keys).await;
        if matches!(result, Err(StoreError::InBatch { .. })) {
            // Refused, so nothing was written: take the count back down. A failure to is only
            // an over-count, which costs malformed credentials a cached lookup.
            if let Err(e) = self.count_imported(-imported).await {
                tracing::warn!(error = %e, "redis store: imported key count left too high");
            }
        }
        result
    }

    async fn has_imported_keys(&self) -> Result<bool, StoreError> {
        let count: Option<i64> = self.conn.query(&cmd!("GET", keys::imported_keys())).await?;
        Ok(count.is_some_and(|n| n > 0))
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

impl RedisStore {
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

    /// Writes one account's keys, all or none: on a single server one script checks and writes
    /// them with their hash indexes; on a cluster, where each hash index has its own slot, the
    /// hashes are claimed first (`SET NX`, all slots at once), then the account's script runs,
    /// and the claims are undone if either step refuses.
    async fn write_batch(&self, account_id: &str, keys: &[KeyRecord]) -> Result<(), StoreError> {
        let mut script_keys = vec![keys::key_ids(account_id), keys::names(account_id)];
        let stride = if self.conn.is_cluster() { 1 } else { 2 };
        let mut args = vec![stride.to_string()];
        let mut indexes = Vec::with_capacity(keys.len());
        for key in keys {
            let hex = key.hash.to_hex();
            let owner = hash_owner(&key.account_id, &key.id);
            script_keys.push(keys::key(account_id, &key.id));
            if stride == 2 {
                script_keys.push(keys::hash_index(&hex));
            }
            indexes.push((hex.clone(), owner.clone()));
            args.extend([key.id.clone(), key.name.clone(), to_json(key)?, hex, owner]);
        }
        let claimed = if self.conn.is_cluster() {
            self.claim_hashes(&indexes).await?
        } else {
            Vec::new()
        };
        let reply: Vec<String> = self
            .conn
            .query(&eval(&scripts::create_keys(), &script_keys, &args))
            .await?;
        let refusal = match reply.as_slice() {
            [status] if status == "ok" => return Ok(()),
            [status, i] => {
                let error = match status.as_str() {
                    "name_taken" => StoreError::NameTaken,
                    "exists" => StoreError::AlreadyExists,
                    _ => return Err(unexpected("create_keys", &reply)),
                };
                let index = i.parse::<usize>().ok().and_then(|i| i.checked_sub(1));
                let index = index.ok_or_else(|| unexpected("create_keys", &reply))?;
                StoreError::InBatch {
                    index,
                    error: Box::new(error),
                }
            }
            _ => return Err(unexpected("create_keys", &reply)),
        };
        self.release_claims(&indexes, &claimed).await?;
        Err(refusal)
    }

    /// Claims each hash index for its key (`SET NX`), all slots at once: the positions this call
    /// claimed, or, when another key holds one, `InBatch` `AlreadyExists` for the first such
    /// entry after the claims made are undone. An entry already holding this very key (a retry
    /// whose answer was lost) counts as held, not claimed.
    async fn claim_hashes(&self, indexes: &[(String, String)]) -> Result<Vec<usize>, StoreError> {
        let mut batch = Batch::read();
        for (hex, owner) in indexes {
            batch.add(hex, cmd!("SET", keys::hash_index(hex), owner, "NX"));
        }
        let answers = self.conn.run(batch).await?;
        let mut claimed = Vec::new();
        let mut held = Vec::new();
        for (position, answer) in answers.into_iter().enumerate() {
            match answer {
                Value::Nil => held.push(position),
                _ => claimed.push(position),
            }
        }
        let mut batch = Batch::read();
        for &position in &held {
            let hex = &indexes[position].0;
            batch.add(hex, cmd!("GET", keys::hash_index(hex)));
        }
        let owners = self.conn.run(batch).await?;
        let foreign = held.iter().zip(owners).find_map(|(&position, value)| {
            let owner = decode::<Option<String>>(value).ok().flatten();
            (owner.as_deref() != Some(indexes[position].1.as_str())).then_some(position)
        });
        let Some(index) = foreign else {
            return Ok(claimed);
        };
        self.release_claims(indexes, &claimed).await?;
        Err(StoreError::InBatch {
            index,
            error: Box::new(StoreError::AlreadyExists),
        })
    }

    /// Undoes the claims at `positions` that still hold their key.
    async fn release_claims(
        &self,
        indexes: &[(String, String)],
        positions: &[usize],
    ) -> Result<(), StoreError> {
        let mut batch = Batch::read();
        for &position in positions {
            let (hex, owner) = &indexes[position];
            batch.add(
                hex,
                eval(scripts::DELETE_IF_EQUAL, &[keys::hash_index(hex)], &[owner]),
            );
        }
        self.conn.run(batch).await?;
        Ok(())
    }

    /// Moves the count of imported keys by `delta` (none for 0).
    async fn count_imported(&self, delta: i64) -> Result<(), StoreError> {
        if delta != 0 {
            let _: i64 = self
                .conn
                .query(&cmd!("INCRBY", keys::imported_keys(), delta))
                .await?;
        }
        Ok(())
    }

    /// Removes hash index entries that still point at these keys, and counts the imported ones
    /// out; after the records are gone, so a failure here leaves only entries that lookups
    /// ignore and a count too high (and it is logged, not returned: the deletion did happen).
    /// `also` is one more command of the `_global` slot.
    async fn drop_hash_indexes(&self, removed: &[KeyRecord], also: Option<::redis::Cmd>) {
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
        let imported = removed.iter().filter(|k| k.imported).count();
        if imported > 0 {
            let delta = -i64::try_from(imported).unwrap_or(i64::MAX);
            batch.add(GLOBAL, cmd!("INCRBY", keys::imported_keys(), delta));
        }
        if let Some(cmd) = also {
            batch.add(GLOBAL, cmd);
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
}

/// The value of a hash index entry: the key's account and id.
fn hash_owner(account_id: &str, key_id: &str) -> String {
    format!("{account_id}\n{key_id}")
}

fn sort_sites(sites: &mut [SiteRecord]) {
    sites.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
}
