//! [`Usage`] on the embedded store: a batch is journaled in one write transaction
//! ([`super::journal`]) and folded into the time-major buckets ([`super::buckets`]) later;
//! reads add what is journaled and not yet folded, so they see every committed batch.

use redb::{ReadableTable, WriteTransaction};

use super::{buckets, db_err, rollup, EmbeddedStore, USAGE_WRITERS};
use crate::store::{
    BatchId, Granularity, StoreError, Usage, UsageCounts, UsageDelta, BATCH_MEMORY,
};

#[async_trait::async_trait]
impl Usage for EmbeddedStore {
    async fn add_usage(&self, id: BatchId, batch: &[UsageDelta]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut batch = batch.to_vec();
        batch.iter_mut().for_each(buckets::keep_last_use_in_minute);
        let now_ms = chrono::Utc::now().timestamp_millis();
        // An hour is over once the clock, or the newest minute counted, is past it.
        let newest = batch.iter().map(|d| d.minute).max().unwrap_or(i64::MIN);
        let rollup_now = now_ms.div_euclid(60_000).max(newest);
        self.write_usage(move |txn, unfolded| {
            // A commit is all or nothing, so a failed call was not applied; but a caller that
            // retries (with the same id) is told "done" without counting twice all the same.
            if !claim_batch(txn, id, now_ms)? {
                return Ok((None, ()));
            }
            let applied = unfolded.apply(txn, batch)?;
            rollup::step(txn, rollup_now)?;
            Ok((Some(applied), ()))
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
            let stored = buckets::key_buckets(txn, &key_id, granularity, from, to)?;
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
            let stored = buckets::account_days(txn, &account_id, from_day, to_day)?;
            Ok(unfolded.add_account(&account_id, from_day, to_day, stored))
        })
        .await
    }

    async fn last_used(&self, key_ids: &[String]) -> Result<Vec<Option<i64>>, StoreError> {
        let key_ids = key_ids.to_vec();
        self.read_usage(move |txn, unfolded| {
            key_ids
                .iter()
                .map(|id| Ok(buckets::last_used(txn, id)?.max(unfolded.last_used(id))))
                .collect()
        })
        .await
    }

    async fn prune_usage(&self, granularity: Granularity, before: i64) -> Result<u64, StoreError> {
        let now = now_minute();
        self.write_usage(move |txn, unfolded| {
            let folded = unfolded.fold(txn)?;
            rollup::step(txn, now)?;
            Ok((Some(folded), buckets::prune(txn, granularity, before)?))
        })
        .await
    }
}

/// The wall clock's minute (since the epoch).
pub(super) fn now_minute() -> i64 {
    chrono::Utc::now().timestamp_millis().div_euclid(60_000)
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
