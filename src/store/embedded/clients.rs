//! [`Clients`] on the embedded store: client secrets by account and by hash, access tokens by
//! hash, and each secret's tokens, so that deleting a secret revokes them in the same
//! transaction. Expired tokens are removed by [`Clients::prune_tokens`] (hourly, with usage
//! pruning), or with their secret.

use chrono::{DateTime, Utc};
use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{db_err, decode, encode, get_json, EmbeddedStore};
use crate::credential::KeyHash;
use crate::store::{Clients, SecretRecord, StoreError, TokenRecord};

/// (account id, secret id) → secret JSON.
const SECRETS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("secrets");
/// Secret hash → (account id, secret id).
const SECRET_HASHES: TableDefinition<[u8; 32], (&str, &str)> =
    TableDefinition::new("secret_hashes");
/// Token hash → token JSON.
const TOKENS: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("tokens");
/// (secret id, token hash) → (): the tokens a secret issued.
const SECRET_TOKENS: TableDefinition<(&str, [u8; 32]), ()> = TableDefinition::new("secret_tokens");

/// Creates the tables (at open).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(SECRETS).map_err(db_err)?;
    txn.open_table(SECRET_HASHES).map_err(db_err)?;
    txn.open_table(TOKENS).map_err(db_err)?;
    txn.open_table(SECRET_TOKENS).map_err(db_err)?;
    Ok(())
}

#[async_trait::async_trait]
impl Clients for EmbeddedStore {
    async fn create_secret(&self, secret: &SecretRecord) -> Result<(), StoreError> {
        let secret = secret.clone();
        self.write(move |txn| {
            let mut secrets = txn.open_table(SECRETS).map_err(db_err)?;
            let mut hashes = txn.open_table(SECRET_HASHES).map_err(db_err)?;
            let key = (secret.account_id.as_str(), secret.id.as_str());
            if secrets.get(key).map_err(db_err)?.is_some()
                || hashes.get(secret.hash.0).map_err(db_err)?.is_some()
            {
                return Err(StoreError::AlreadyExists);
            }
            secrets
                .insert(key, encode(&secret)?.as_slice())
                .map_err(db_err)?;
            hashes.insert(secret.hash.0, key).map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn list_secrets(&self, account_id: &str) -> Result<Vec<SecretRecord>, StoreError> {
        let account_id = account_id.to_owned();
        self.read(move |txn| {
            let secrets = txn.open_table(SECRETS).map_err(db_err)?;
            let mut out = Vec::new();
            for item in secrets.range((account_id.as_str(), "")..).map_err(db_err)? {
                let (key, value) = item.map_err(db_err)?;
                if key.value().0 != account_id {
                    break;
                }
                out.push(decode::<SecretRecord>(value.value(), "client secret")?);
            }
            out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
            Ok(out)
        })
        .await
    }

    async fn find_secret(&self, hash: &KeyHash) -> Result<Option<SecretRecord>, StoreError> {
        let hash = hash.0;
        self.read(move |txn| {
            let hashes = txn.open_table(SECRET_HASHES).map_err(db_err)?;
            let Some(owner) = hashes.get(hash).map_err(db_err)? else {
                return Ok(None);
            };
            let secrets = txn.open_table(SECRETS).map_err(db_err)?;
            get_json(&secrets, owner.value(), "client secret")
        })
        .await
    }

    async fn delete_secret(
        &self,
        account_id: &str,
        secret_id: &str,
    ) -> Result<Option<(SecretRecord, Vec<KeyHash>)>, StoreError> {
        let (account_id, secret_id) = (account_id.to_owned(), secret_id.to_owned());
        self.write(move |txn| {
            let mut secrets = txn.open_table(SECRETS).map_err(db_err)?;
            let Some(secret) = secrets
                .remove((account_id.as_str(), secret_id.as_str()))
                .map_err(db_err)?
                .map(|v| decode::<SecretRecord>(v.value(), "client secret"))
                .transpose()?
            else {
                return Ok(None);
            };
            let mut hashes = txn.open_table(SECRET_HASHES).map_err(db_err)?;
            hashes.remove(secret.hash.0).map_err(db_err)?;
            let revoked = remove_tokens(txn, &secret.id)?;
            Ok(Some((secret, revoked)))
        })
        .await
    }

    async fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let token = token.clone();
        self.write(move |txn| {
            let mut tokens = txn.open_table(TOKENS).map_err(db_err)?;
            if tokens.get(token.hash.0).map_err(db_err)?.is_some() {
                return Err(StoreError::AlreadyExists);
            }
            tokens
                .insert(token.hash.0, encode(&token)?.as_slice())
                .map_err(db_err)?;
            let mut by_secret = txn.open_table(SECRET_TOKENS).map_err(db_err)?;
            by_secret
                .insert((token.secret_id.as_str(), token.hash.0), ())
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn find_token(&self, hash: &KeyHash) -> Result<Option<TokenRecord>, StoreError> {
        let hash = hash.0;
        self.read(move |txn| {
            let tokens = txn.open_table(TOKENS).map_err(db_err)?;
            get_json(&tokens, hash, "access token")
        })
        .await
    }

    async fn prune_tokens(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        self.write(move |txn| {
            let mut tokens = txn.open_table(TOKENS).map_err(db_err)?;
            let mut expired = Vec::new();
            for item in tokens.iter().map_err(db_err)? {
                let (hash, value) = item.map_err(db_err)?;
                let token = decode::<TokenRecord>(value.value(), "access token")?;
                if token.expires_at < now {
                    expired.push((hash.value(), token.secret_id));
                }
            }
            let mut by_secret = txn.open_table(SECRET_TOKENS).map_err(db_err)?;
            for (hash, secret_id) in &expired {
                tokens.remove(*hash).map_err(db_err)?;
                by_secret
                    .remove((secret_id.as_str(), *hash))
                    .map_err(db_err)?;
            }
            Ok(expired.len() as u64)
        })
        .await
    }
}

/// Removes every token of `secret_id`, answering their hashes.
fn remove_tokens(txn: &WriteTransaction, secret_id: &str) -> Result<Vec<KeyHash>, StoreError> {
    let mut by_secret = txn.open_table(SECRET_TOKENS).map_err(db_err)?;
    let mut hashes = Vec::new();
    for item in by_secret
        .range((secret_id, [0u8; 32])..=(secret_id, [u8::MAX; 32]))
        .map_err(db_err)?
    {
        let (key, _) = item.map_err(db_err)?;
        hashes.push(key.value().1);
    }
    let mut tokens = txn.open_table(TOKENS).map_err(db_err)?;
    for hash in &hashes {
        by_secret.remove((secret_id, *hash)).map_err(db_err)?;
        tokens.remove(*hash).map_err(db_err)?;
    }
    Ok(hashes.into_iter().map(KeyHash).collect())
}
