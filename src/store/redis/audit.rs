//! The audit log's chain on Redis: appending an entry as the next link of its account's chain,
//! reading the chain's head, and reading the chain oldest first in pages.
//!
//! The hash is SHA-256, which Lua in Redis does not have, so an append is optimistic: read the
//! head (`tg:{acc}:audit_head`), link the entry to it here, and let [`scripts::APPEND_AUDIT`]
//! push it only if the head is still the one read (else it answers the head now in place, and
//! the entry is linked again). Appends to one account from this process take turns first, so
//! only other instances can move the head under an append; [`ATTEMPTS`] bounds the rest.

use std::time::Duration;

use ::redis::Value;

use super::conn::{decode, Batch};
use super::keys::{self, GLOBAL};
use super::scripts::{self, eval};
use super::{decode_all, from_json, take, to_json, unexpected, Conn, RedisStore};
use crate::store::audit_chain::{self, ChainHead};
use crate::store::{AuditChainPage, AuditEntry, AuditLog, AuditPage, AuditQuery, StoreError};

#[async_trait::async_trait]
impl AuditLog for RedisStore {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let mut entry = entry.clone();
        (entry.prev_hash, entry.hash) = (None, None);
        match entry.account_id.clone() {
            Some(account_id) => append(&self.conn, &self.audit_turns, &account_id, entry).await,
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
        head(&self.conn, account_id).await
    }

    async fn audit_chain_page(
        &self,
        account_id: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<AuditChainPage, StoreError> {
        chain_page(&self.conn, account_id, after, limit).await
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
        if query.actions.is_empty() && query.search.is_none() {
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
            if !query.matches_action(&entry.action) {
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
}

/// Attempts of an append whose head another instance moved meanwhile. Each round one
/// contender wins, so this many instances can append to one account at once without a refusal.
const ATTEMPTS: u32 = 20;
/// Stripes of [`AuditTurns`]: two accounts share one with odds 1 in 64.
const STRIPES: usize = 64;

/// Per account (striped), the appends of this process one at a time: they would only make each
/// other retry.
pub(super) struct AuditTurns(Box<[tokio::sync::Mutex<()>]>);

// === impl AuditTurns ===

impl Default for AuditTurns {
    fn default() -> Self {
        AuditTurns((0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect())
    }
}

impl AuditTurns {
    fn of(&self, account_id: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        account_id.hash(&mut h);
        // The remainder is below STRIPES, so it fits a usize.
        &self.0[(h.finish() % STRIPES as u64) as usize]
    }
}

// === functions ===

/// Appends `entry` to its account's list, as the chain's next link, and to the all-accounts
/// list: in the same script on a single server, after it on a cluster (another slot).
pub(super) async fn append(
    conn: &Conn,
    turns: &AuditTurns,
    account_id: &str,
    mut entry: AuditEntry,
) -> Result<(), StoreError> {
    let _turn = turns.of(account_id).lock().await;
    let cluster = conn.is_cluster();
    let head_key = keys::audit_head(account_id);
    let mut script_keys = vec![keys::account_audit(account_id), head_key.clone()];
    if !cluster {
        script_keys.push(keys::audit());
    }
    let mut current: Option<String> = conn
        .query(&redis::cmd("GET").arg(&head_key).clone())
        .await?;
    for attempt in 0..ATTEMPTS {
        let head = current
            .as_deref()
            .map(|text| from_json::<ChainHead>(text, "audit chain head"))
            .transpose()?;
        let new_head = to_json(&audit_chain::link(head.as_ref(), &mut entry))?;
        let json = encode_audit(&entry)?;
        let expected = current.as_deref().unwrap_or("");
        let reply: Vec<String> = conn
            .query(&eval(
                scripts::APPEND_AUDIT,
                &script_keys,
                &[expected, json.as_str(), new_head.as_str()],
            ))
            .await?;
        match reply.as_slice() {
            [ok] if ok == "ok" => {
                if cluster {
                    let push = redis::cmd("LPUSH").arg(keys::audit()).arg(&json).clone();
                    conn.query::<redis::Value>(&push).await?;
                }
                return Ok(());
            }
            [moved, now] if moved == "moved" => {
                current = Some(now.clone()).filter(|now| !now.is_empty());
                let pause = rand::random_range(1..=4) * u64::from(attempt + 1);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            _ => return Err(unexpected("append_audit", &reply)),
        }
    }
    Err(StoreError::Unavailable(format!(
        "audit chain of {account_id}: the head moved under {ATTEMPTS} attempts"
    )))
}

/// The account's chain head.
pub(super) async fn head(conn: &Conn, account_id: &str) -> Result<Option<ChainHead>, StoreError> {
    let text: Option<String> = conn
        .query(&redis::cmd("GET").arg(keys::audit_head(account_id)).clone())
        .await?;
    text.map(|t| from_json(&t, "audit chain head")).transpose()
}

/// Up to `limit` entries, oldest first, after the `after` oldest ones. The list is newest first
/// (`LPUSH`), so positions count from its tail, which appends never move.
pub(super) async fn chain_page(
    conn: &Conn,
    account_id: &str,
    after: Option<u64>,
    limit: usize,
) -> Result<AuditChainPage, StoreError> {
    let skipped = after.unwrap_or(0);
    let (Ok(first), Ok(limit_i)) = (i64::try_from(skipped), i64::try_from(limit)) else {
        return Ok(AuditChainPage::default());
    };
    if limit == 0 {
        return Ok(AuditChainPage::default());
    }
    let range = redis::cmd("LRANGE")
        .arg(keys::account_audit(account_id))
        .arg(-(first.saturating_add(limit_i)))
        .arg(-(first.saturating_add(1)))
        .clone();
    let jsons: Vec<String> = conn.query(&range).await?;
    let read = jsons.len();
    let entries = jsons
        .iter()
        .rev()
        .map(|json| AuditEntry::from_stored(json.as_bytes()))
        .collect();
    Ok(AuditChainPage {
        entries,
        // A short page reached the newest entry.
        next: (read == limit).then(|| skipped + read as u64),
    })
}

/// The entry's JSON with its `account_id`, which the record's own serialization skips.
fn encode_audit(entry: &AuditEntry) -> Result<String, StoreError> {
    let value = entry
        .stored_json()
        .map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))?;
    to_json(&value)
}
