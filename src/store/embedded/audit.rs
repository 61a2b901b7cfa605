//! [`AuditLog`] on the embedded store. An append reads the account's chain head, links the
//! entry to it and moves the head in the same write transaction, so the chain is linear: redb
//! runs one write transaction at a time.

use redb::{ReadableTable, WriteTransaction};

use super::{db_err, decode, encode, get_json, EmbeddedStore, AUDIT, AUDIT_ACCOUNTS, AUDIT_HEADS};
use crate::store::audit_chain::{self, ChainHead};
use crate::store::{AuditChainPage, AuditEntry, AuditLog, AuditPage, AuditQuery, StoreError};

#[async_trait::async_trait]
impl AuditLog for EmbeddedStore {
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.append_audits(std::slice::from_ref(entry)).await
    }

    /// One write transaction for all of them: one commit to wait for, not one per entry.
    async fn append_audits(&self, entries: &[AuditEntry]) -> Result<(), StoreError> {
        let entries = entries.to_vec();
        self.write(move |txn| {
            for entry in entries {
                append(txn, entry)?;
            }
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
                if !query.matches_action(&entry.action) {
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
}

/// Appends `entry` as the log's next sequence number and, with an account, the next link of that
/// account's chain (whatever links the caller set).
fn append(txn: &WriteTransaction, mut entry: AuditEntry) -> Result<(), StoreError> {
    (entry.prev_hash, entry.hash) = (None, None);
    let mut audit = txn.open_table(AUDIT).map_err(db_err)?;
    let seq = match audit.last().map_err(db_err)? {
        Some((key, _)) => key.value().saturating_add(1),
        None => 0,
    };
    if let Some(account_id) = entry.account_id.clone() {
        let mut heads = txn.open_table(AUDIT_HEADS).map_err(db_err)?;
        let head: Option<ChainHead> = get_json(&heads, account_id.as_str(), "audit chain head")?;
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
}

/// The entry's JSON with its `account_id`, which the record's own serialization skips.
fn encode_audit(entry: &AuditEntry) -> Result<Vec<u8>, StoreError> {
    let value = entry
        .stored_json()
        .map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))?;
    encode(&value)
}
