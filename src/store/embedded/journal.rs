//! The usage journal: how a flush is made durable without touching a bucket.
//!
//! The flusher sends a batch every second, and a busy key is in most of them; adding each into
//! its minute, hour and day buckets costs about 20 µs of redb work per key per second. Instead
//! a batch is appended to the `usage_journal` table as one value, and kept in memory, merged by
//! (key, minute), as [`Unfolded`]. About once a minute (or sooner, when many buckets are
//! waiting) the unfolded counts are folded into the buckets in one transaction that also empties
//! the journal; so a key costs one bucket update per minute however often it is used. Queries
//! add the unfolded counts to what the buckets hold. Opening the file folds whatever journal a
//! crash left behind, so nothing a flush was told is stored is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{ReadableTable, TableDefinition, WriteTransaction};

use super::{buckets, db_err};
use crate::store::{Granularity, StoreError, UsageCounts, UsageDelta};

/// Fold at least this often.
const FOLD_EVERY: Duration = Duration::from_secs(60);
/// Fold sooner once this many (key, minute) buckets wait, which bounds the memory they take
/// (~200 bytes each). A fold's cost is mostly the pages it rewrites, and with many keys nearly
/// every page of the current minute's rows (and account days') is touched by any fold: fewer,
/// larger folds rewrite them less often per bucket. (Keys' hours and days are rolled up from
/// the minutes later: [`super::rollup`].)
const FOLD_AT: usize = 500_000;

const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("usage_journal");

/// Counts journaled and not yet folded into the buckets.
pub(super) struct Unfolded {
    /// [`FOLD_EVERY`] and [`FOLD_AT`], lowered by tests.
    pub(super) fold_every: Duration,
    pub(super) fold_at: usize,
    keys: HashMap<Arc<str>, KeyCounts>,
    buckets: usize,
    /// When the oldest of them was journaled.
    since: Option<Instant>,
    /// The next journal entry's number.
    next_seq: u64,
}

impl Default for Unfolded {
    fn default() -> Self {
        Unfolded {
            fold_every: FOLD_EVERY,
            fold_at: FOLD_AT,
            keys: HashMap::new(),
            buckets: 0,
            since: None,
            next_seq: 0,
        }
    }
}

/// One key's waiting counts. A key has a minute or two waiting, so they are a short `Vec`
/// (a `BTreeMap` would allocate a 600-byte node per key).
struct KeyCounts {
    account_id: Arc<str>,
    /// (minute, counts, latest use in that minute).
    minutes: Vec<(i64, UsageCounts, i64)>,
}

/// What [`Unfolded::apply`] did with a batch.
pub(super) enum Applied {
    /// Appended to the journal: to be merged into memory once committed.
    Journaled(Vec<UsageDelta>),
    /// Folded into the buckets with everything unfolded: memory to be cleared once committed.
    Folded,
}

// === impl Unfolded ===

impl Unfolded {
    /// Creates the journal table and folds what it holds (a crash's leftovers) into the
    /// buckets.
    pub(super) fn recover(txn: &WriteTransaction) -> Result<Unfolded, StoreError> {
        let mut left: Vec<UsageDelta> = Vec::new();
        let journal = txn.open_table(JOURNAL).map_err(db_err)?;
        for item in journal.iter().map_err(db_err)? {
            let (_, value) = item.map_err(db_err)?;
            decode(value.value(), &mut left)?;
        }
        drop(journal);
        fold_into(txn, &mut left)?;
        Ok(Unfolded::default())
    }

    /// Journals `batch`, or, when a fold is due, folds it with everything unfolded. Run in the
    /// batch's write transaction; the caller then passes the result to [`Unfolded::committed`].
    pub(super) fn apply(
        &self,
        txn: &WriteTransaction,
        batch: Vec<UsageDelta>,
    ) -> Result<Applied, StoreError> {
        let due = self.since.is_some_and(|t| t.elapsed() >= self.fold_every)
            || self.buckets + batch.len() > self.fold_at;
        if due {
            return self.fold_with(txn, batch);
        }
        let mut journal = txn.open_table(JOURNAL).map_err(db_err)?;
        journal
            .insert(self.next_seq, encode(&batch)?.as_slice())
            .map_err(db_err)?;
        Ok(Applied::Journaled(batch))
    }

    /// Folds everything unfolded into the buckets, in `txn`; then [`Unfolded::committed`] with
    /// [`Applied::Folded`].
    pub(super) fn fold(&self, txn: &WriteTransaction) -> Result<Applied, StoreError> {
        self.fold_with(txn, Vec::new())
    }

    /// Folds everything unfolded and `extra` into the buckets.
    fn fold_with(
        &self,
        txn: &WriteTransaction,
        extra: Vec<UsageDelta>,
    ) -> Result<Applied, StoreError> {
        let mut all = self.deltas();
        all.extend(extra);
        fold_into(txn, &mut all)?;
        Ok(Applied::Folded)
    }

    /// Brings memory in line with a committed [`Unfolded::apply`] or [`Unfolded::fold`].
    pub(super) fn committed(&mut self, applied: Applied) {
        match applied {
            Applied::Folded => {
                // A new map, not `clear`: a cleared map keeps its table, sized for the most keys
                // that ever waited (with `FOLD_AT` buckets, 1,048,576 slots of 56 bytes, ~57 MB)
                // for the process's life, though after a burst only the keys used since wait.
                // The cost is the map's regrowth as keys come back, a rehash per doubling
                // (each key moved about twice in all), in the merges after each fold.
                self.keys = HashMap::new();
                self.buckets = 0;
                self.since = None;
            }
            Applied::Journaled(batch) => {
                self.next_seq += 1;
                self.since.get_or_insert_with(Instant::now);
                for d in batch {
                    self.merge(d);
                }
            }
        }
    }

    fn merge(&mut self, d: UsageDelta) {
        let key = self.keys.entry(d.key_id).or_insert_with(|| KeyCounts {
            account_id: Arc::clone(&d.account_id),
            minutes: Vec::new(),
        });
        // The latest batch's account wins (a key moves only by being recreated).
        key.account_id = d.account_id;
        match key.minutes.iter_mut().find(|(m, _, _)| *m == d.minute) {
            Some((_, counts, last_used_ms)) => {
                counts.merge(&d.counts);
                *last_used_ms = (*last_used_ms).max(d.last_used_ms);
            }
            None => {
                // Most keys have one minute waiting: no room for four.
                key.minutes.reserve_exact(1);
                key.minutes.push((d.minute, d.counts, d.last_used_ms));
                self.buckets += 1;
            }
        }
    }

    /// Everything unfolded, one delta per (key, minute).
    fn deltas(&self) -> Vec<UsageDelta> {
        let mut out = Vec::with_capacity(self.buckets);
        for (key_id, key) in &self.keys {
            for &(minute, counts, last_used_ms) in &key.minutes {
                out.push(UsageDelta {
                    key_id: Arc::clone(key_id),
                    account_id: Arc::clone(&key.account_id),
                    minute,
                    counts,
                    last_used_ms,
                });
            }
        }
        out
    }

    /// Adds a key's unfolded counts into `stored`, its buckets of `g` in `[from, to)`.
    pub(super) fn add_key(
        &self,
        key_id: &str,
        g: Granularity,
        from: i64,
        to: i64,
        stored: Vec<(i64, UsageCounts)>,
    ) -> Vec<(i64, UsageCounts)> {
        let Some(key) = self.keys.get(key_id) else {
            return stored;
        };
        let extra = key
            .minutes
            .iter()
            .map(|(minute, counts, _)| (g.of_minute(*minute), counts));
        buckets::merge_sorted(stored, extra, from, to)
    }

    /// Adds an account's unfolded counts into `stored`, its day buckets in `[from, to)`.
    pub(super) fn add_account(
        &self,
        account_id: &str,
        from: i64,
        to: i64,
        stored: Vec<(i64, UsageCounts)>,
    ) -> Vec<(i64, UsageCounts)> {
        // Derived from the keys' minutes: at most `fold_at` of them, read only by the usage API.
        let extra = self
            .keys
            .values()
            .filter(|key| &*key.account_id == account_id)
            .flat_map(|key| &key.minutes)
            .map(|(minute, counts, _)| (Granularity::Day.of_minute(*minute), counts));
        buckets::merge_sorted(stored, extra, from, to)
    }

    /// Whether nothing waits to be folded.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.buckets == 0
    }

    /// The key's latest unfolded use.
    pub(super) fn last_used(&self, key_id: &str) -> Option<i64> {
        let key = self.keys.get(key_id)?;
        key.minutes.iter().map(|(_, _, ms)| *ms).max()
    }
}

/// Adds `all` into the buckets and empties the journal, in `txn`.
fn fold_into(txn: &WriteTransaction, all: &mut [UsageDelta]) -> Result<(), StoreError> {
    if all.is_empty() {
        return Ok(());
    }
    buckets::add(txn, all)?;
    let mut journal = txn.open_table(JOURNAL).map_err(db_err)?;
    journal.retain(|_, _| false).map_err(db_err)?;
    Ok(())
}

/// A batch as one journal value: per delta the key id and account id (`u16` LE length, bytes),
/// the minute, six counts and the last-used time (8 bytes LE each).
fn encode(batch: &[UsageDelta]) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(batch.len() * 96);
    for d in batch {
        for id in [&d.key_id, &d.account_id] {
            let len = u16::try_from(id.len()).map_err(|_| {
                StoreError::Corrupt(format!("usage for an id of {} bytes", id.len()))
            })?;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(id.as_bytes());
        }
        out.extend_from_slice(&d.minute.to_le_bytes());
        for n in d.counts.to_array() {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&d.last_used_ms.to_le_bytes());
    }
    Ok(out)
}

/// Appends the deltas of one journal value to `out`.
fn decode(mut bytes: &[u8], out: &mut Vec<UsageDelta>) -> Result<(), StoreError> {
    let corrupt = || StoreError::Corrupt("usage journal entry is truncated".into());
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, tail) = bytes.split_at_checked(n)?;
        *bytes = tail;
        Some(head)
    }
    let word = |bytes: &mut &[u8]| -> Result<[u8; 8], StoreError> {
        let w = take(bytes, 8).ok_or_else(corrupt)?;
        let mut out = [0u8; 8];
        out.copy_from_slice(w);
        Ok(out)
    };
    let id = |bytes: &mut &[u8]| -> Result<Arc<str>, StoreError> {
        let len = take(bytes, 2).ok_or_else(corrupt)?;
        let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
        let raw = take(bytes, len).ok_or_else(corrupt)?;
        std::str::from_utf8(raw)
            .map(Arc::from)
            .map_err(|_| StoreError::Corrupt("usage journal: an id is not UTF-8".into()))
    };
    while !bytes.is_empty() {
        let key_id = id(&mut bytes)?;
        let account_id = id(&mut bytes)?;
        let minute = i64::from_le_bytes(word(&mut bytes)?);
        let mut n = [0u64; 6];
        for v in &mut n {
            *v = u64::from_le_bytes(word(&mut bytes)?);
        }
        let last_used_ms = i64::from_le_bytes(word(&mut bytes)?);
        out.push(UsageDelta {
            key_id,
            account_id,
            minute,
            counts: UsageCounts::from_array(n),
            last_used_ms,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_reads_back_as_written_and_truncation_is_corrupt() {
        let batch = vec![
            UsageDelta {
                key_id: "key_é".into(),
                account_id: "acc_1".into(),
                minute: -3,
                counts: UsageCounts {
                    requests: 1,
                    success: 2,
                    error: 3,
                    rate_limited: 4,
                    bytes_in: 5,
                    bytes_out: u64::MAX,
                },
                last_used_ms: 99,
            },
            UsageDelta {
                key_id: "".into(),
                account_id: "a".into(),
                minute: i64::MAX,
                counts: UsageCounts::default(),
                last_used_ms: i64::MIN,
            },
        ];
        let bytes = encode(&batch).unwrap();
        let mut back = Vec::new();
        decode(&bytes, &mut back).unwrap();
        assert_eq!(back.len(), 2);
        for (a, b) in batch.iter().zip(&back) {
            assert_eq!(
                (&a.key_id, &a.account_id, a.minute, a.counts, a.last_used_ms),
                (&b.key_id, &b.account_id, b.minute, b.counts, b.last_used_ms)
            );
        }
        for cut in [1, 2, 10, bytes.len() - 1] {
            let mut out = Vec::new();
            assert!(matches!(
                decode(&bytes[..cut], &mut out),
                Err(StoreError::Corrupt(_))
            ));
        }
    }
}
