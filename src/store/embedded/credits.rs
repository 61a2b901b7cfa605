//! [`Credits`] on the embedded store: one [`CreditCounter`] per key, as JSON by key id, changed
//! in one write transaction each. These writes do not move the records' revision: a key's
//! credits are not part of what the key cache holds.

use redb::{TableDefinition, WriteTransaction};

use super::{db_err, encode, get_json, EmbeddedStore};
use crate::store::credits::{self, CreditChange, CreditCounter, CreditGrant, CreditState, Totals};
use crate::store::{Credits, StoreError};

/// Key id → counter JSON.
const CREDITS: TableDefinition<&str, &[u8]> = TableDefinition::new("credits");

/// Creates the table (at open).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(CREDITS).map_err(db_err)?;
    Ok(())
}

impl EmbeddedStore {
    /// Runs `f` on the key's counter (`None` if it has none) in one write transaction, storing
    /// what it leaves.
    async fn with_counter<T, F>(&self, key_id: &str, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Option<CreditCounter>) -> T + Send + 'static,
    {
        let key_id = key_id.to_owned();
        self.write(move |txn| {
            let mut table = txn.open_table(CREDITS).map_err(db_err)?;
            let mut counter: Option<CreditCounter> = get_json(&table, key_id.as_str(), "credits")?;
            let out = f(&mut counter);
            match &counter {
                Some(c) => {
                    table
                        .insert(key_id.as_str(), encode(c)?.as_slice())
                        .map_err(db_err)?;
                }
                None => {
                    table.remove(key_id.as_str()).map_err(db_err)?;
                }
            }
            Ok(out)
        })
        .await
    }
}

#[async_trait::async_trait]
impl Credits for EmbeddedStore {
    async fn take_credits(
        &self,
        key_id: &str,
        instance: &str,
        totals: Totals,
        want: i64,
        now_ms: i64,
    ) -> Result<CreditGrant, StoreError> {
        let instance = instance.to_owned();
        self.with_counter(key_id, move |counter| {
            credits::take(counter, &instance, totals, want, now_ms)
        })
        .await
    }

    async fn give_back_credits(
        &self,
        key_id: &str,
        instance: &str,
        totals: Totals,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let instance = instance.to_owned();
        self.with_counter(key_id, move |counter| {
            credits::give_back(counter, &instance, totals, now_ms)
        })
        .await
    }

    async fn change_credits(
        &self,
        key_id: &str,
        change: CreditChange,
        now_ms: i64,
    ) -> Result<CreditState, StoreError> {
        self.with_counter(key_id, move |counter| {
            credits::change(counter, change, now_ms)
        })
        .await
    }

    async fn credit_state(
        &self,
        key_id: &str,
        now_ms: i64,
    ) -> Result<Option<CreditState>, StoreError> {
        let key_id = key_id.to_owned();
        self.read(move |txn| {
            let table = txn.open_table(CREDITS).map_err(db_err)?;
            let counter: Option<CreditCounter> = get_json(&table, key_id.as_str(), "credits")?;
            Ok(credits::state_at(counter, now_ms))
        })
        .await
    }

    async fn delete_credits(&self, key_id: &str) -> Result<(), StoreError> {
        self.with_counter(key_id, |counter| *counter = None).await
    }
}
