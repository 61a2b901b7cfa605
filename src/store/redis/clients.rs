//! [`Clients`] on Redis. An account's secrets are one hash in its slot; a secret's hash index
//! and each token live under their own hash (spread over a cluster, like key hashes), the
//! token with a TTL that ends with it, so Redis forgets expired tokens by itself. A secret's
//! tokens are also listed in a set in the account's slot, which deleting the secret walks:
//!
//! | key | type | contents | TTL |
//! |---|---|---|---|
//! | `tg:{acc}:secrets` | hash | secret id → secret JSON | — |
//! | `tg:{acc}:secret_tokens:{sec}` | set | the hashes (hex) of the tokens it issued | the latest token's expiry |
//! | `tg:secrethash:{hex}` | string | `acc_id` `\n` `sec_id` | — |
//! | `tg:tokenhash:{hex}` | string | token JSON | the token's expiry |
//!
//! Creating a secret claims its hash index first (`SET NX`), then the record (`HSETNX`),
//! undoing the claim if the id is taken. Deleting one removes the record, then its tokens and
//! index: a failure between leaves tokens that a deleted secret cannot be checked against, so
//! the token check also finds the secret (see `admin::oauth`).

use chrono::Utc;

use super::conn::{decode, Batch};
use super::keys;
use super::scripts::{self, eval};
use super::{from_json, to_json, RedisStore};
use crate::credential::KeyHash;
use crate::store::{Clients, SecretRecord, StoreError, TokenRecord};

#[async_trait::async_trait]
impl Clients for RedisStore {
    async fn create_secret(&self, secret: &SecretRecord) -> Result<(), StoreError> {
        let hex = secret.hash.to_hex();
        let owner = format!("{}\n{}", secret.account_id, secret.id);
        let claimed: Option<String> = self
            .conn
            .query(&cmd!("SET", keys::secret_hash(&hex), &owner, "NX"))
            .await?;
        if claimed.is_none() {
            return Err(StoreError::AlreadyExists);
        }
        let set: i64 = self
            .conn
            .query(&cmd!(
                "HSETNX",
                keys::secrets(&secret.account_id),
                &secret.id,
                to_json(secret)?
            ))
            .await?;
        if set == 0 {
            let _: i64 = self
                .conn
                .query(&eval(
                    scripts::DELETE_IF_EQUAL,
                    &[keys::secret_hash(&hex)],
                    &[owner],
                ))
                .await?;
            return Err(StoreError::AlreadyExists);
        }
        Ok(())
    }

    async fn list_secrets(&self, account_id: &str) -> Result<Vec<SecretRecord>, StoreError> {
        let jsons: Vec<String> = self
            .conn
            .query(&cmd!("HVALS", keys::secrets(account_id)))
            .await?;
        let mut out = jsons
            .iter()
            .map(|j| from_json::<SecretRecord>(j, "client secret"))
            .collect::<Result<Vec<_>, _>>()?;
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    async fn find_secret(&self, hash: &KeyHash) -> Result<Option<SecretRecord>, StoreError> {
        let owner: Option<String> = self
            .hot
            .query(&cmd!("GET", keys::secret_hash(&hash.to_hex())))
            .await?;
        let Some((account_id, secret_id)) = owner.as_deref().and_then(|o| o.split_once('\n'))
        else {
            return Ok(None);
        };
        let json: Option<String> = self
            .hot
            .query(&cmd!("HGET", keys::secrets(account_id), secret_id))
            .await?;
        let secret = json
            .map(|j| from_json::<SecretRecord>(&j, "client secret"))
            .transpose()?;
        // An index entry left by an interrupted deletion points at nothing, or at a secret
        // with another hash.
        Ok(secret.filter(|s| s.hash == *hash))
    }

    async fn delete_secret(
        &self,
        account_id: &str,
        secret_id: &str,
    ) -> Result<Option<(SecretRecord, Vec<KeyHash>)>, StoreError> {
        let json: Option<String> = self
            .conn
            .query(&cmd!("HGET", keys::secrets(account_id), secret_id))
            .await?;
        let Some(secret) = json
            .map(|j| from_json::<SecretRecord>(&j, "client secret"))
            .transpose()?
        else {
            return Ok(None);
        };
        let removed: i64 = self
            .conn
            .query(&cmd!("HDEL", keys::secrets(account_id), secret_id))
            .await?;
        if removed == 0 {
            // Deleted meanwhile by another caller, who revokes its tokens.
            return Ok(None);
        }
        let tokens_key = keys::secret_tokens(account_id, secret_id);
        let listed: Vec<String> = self.conn.query(&cmd!("SMEMBERS", &tokens_key)).await?;
        // One round trip for all of them (per slot on a cluster: each token has its own tag).
        let mut batch = Batch::atomic();
        for hex in &listed {
            batch.add(hex, cmd!("DEL", keys::token(hex)));
        }
        let replies = if batch.is_empty() {
            Vec::new()
        } else {
            self.conn.run(batch).await?
        };
        // Those that had expired are gone already: only the ones removed now are revoked.
        let mut hexes = Vec::with_capacity(listed.len());
        for (hex, reply) in listed.into_iter().zip(replies) {
            if decode::<i64>(reply)? > 0 {
                hexes.push(hex);
            }
        }
        let _: i64 = self.conn.query(&cmd!("DEL", &tokens_key)).await?;
        let _: i64 = self
            .conn
            .query(&eval(
                scripts::DELETE_IF_EQUAL,
                &[keys::secret_hash(&secret.hash.to_hex())],
                &[format!("{account_id}\n{secret_id}")],
            ))
            .await?;
        let revoked = hexes.iter().filter_map(|h| KeyHash::from_hex(h)).collect();
        Ok(Some((secret, revoked)))
    }

    async fn create_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        let hex = token.hash.to_hex();
        let ttl_ms = (token.expires_at - Utc::now()).num_milliseconds().max(1);
        let tokens_key = keys::secret_tokens(&token.account_id, &token.secret_id);
        // Listed first: a token that exists is always found by its secret's deletion. In one
        // transaction, so that the list cannot expire between the add and the new expiry (it
        // lives as long as its longest token; a token added to a list in its last millisecond
        // was lost with it).
        let mut listed = Batch::atomic();
        listed.add(&token.account_id, cmd!("SADD", &tokens_key, &hex));
        listed.add(
            &token.account_id,
            cmd!("PEXPIRE", &tokens_key, ttl_ms, "GT"),
        );
        listed.add(
            &token.account_id,
            cmd!("PEXPIRE", &tokens_key, ttl_ms, "NX"),
        );
        self.conn.run(listed).await?;
        let set: Option<String> = self
            .conn
            .query(&cmd!(
                "SET",
                keys::token(&hex),
                to_json(token)?,
                "PX",
                ttl_ms,
                "NX"
            ))
            .await?;
        if set.is_none() {
            return Err(StoreError::AlreadyExists);
        }
        Ok(())
    }

    async fn find_token(&self, hash: &KeyHash) -> Result<Option<TokenRecord>, StoreError> {
        let json: Option<String> = self
            .hot
            .query(&cmd!("GET", keys::token(&hash.to_hex())))
            .await?;
        json.map(|j| from_json(&j, "access token")).transpose()
    }

    async fn prune_tokens(&self, _now: chrono::DateTime<Utc>) -> Result<u64, StoreError> {
        // Tokens and their secrets' token sets carry TTLs: Redis drops them itself.
        Ok(0)
    }
}
