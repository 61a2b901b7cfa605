//! Usage buckets in the embedded store, laid out for the writes that fill them.
//!
//! The writes come from the journal's folds ([`super::journal`]): one delta per key and minute,
//! into the minute buckets (and the accounts' days); keys' hours and days are summed from the
//! minutes once the hour is over ([`super::rollup`]). With many keys, a key-major table
//! (`(key id, index)`) puts those updates on leaf pages scattered over the whole file, and every
//! commit copies each of them (redb is copy-on-write). So buckets are stored time-major, where
//! a fold's updates fall on the few pages of the current minute (a rollup's on those of one
//! hour and one day): the keys' minutes in blocks of many keys ([`super::minutes`]), hours and
//! days a row `(index, owner)` each ([`Family`]). A key-major index answers "this owner's
//! buckets from … to"; its rows are the scattered writes, so they are few: one per new bucket
//! for hours and days (written an hour at a time), one per key and hour for minutes. A key's
//! last-used time rides in its buckets, so no per-key row is written either: it is the newest
//! minute bucket's, or, once that is pruned, the `key_last_used` row that pruning leaves behind.

use std::collections::{BTreeMap, HashMap};

use redb::{ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction};

use super::minutes;
use super::rollup::{self, Rolled};
use super::{db_err, META};
use crate::store::{Granularity, StoreError, UsageCounts, UsageDelta};

/// Six LE `u64` counts, then the LE `i64` last-used time in milliseconds.
pub(super) const BUCKET_BYTES: usize = 56;

type ByTime = TableDefinition<'static, (i64, &'static [u8]), &'static [u8]>;
type ByOwner = TableDefinition<'static, (&'static [u8], i64), ()>;

/// The last-used time kept for a key whose minute buckets were all pruned.
const KEY_LAST_USED: TableDefinition<&str, i64> = TableDefinition::new("key_last_used");

/// One family of buckets a row each: a time-major table of counts and its owner-major index,
/// a row `(owner, index)` for each bucket.
pub(super) struct Family {
    pub(super) by_time: ByTime,
    by_owner: ByOwner,
}

pub(super) const KEY_HOURS: Family = Family::new("key_hours", "key_hours_by_key");
pub(super) const KEY_DAYS: Family = Family::new("key_days", "key_days_by_key");
const ACCOUNT_DAYS: Family = Family::new("account_days", "account_days_by_account");

/// A bucket's contents.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Bucket {
    pub(super) counts: UsageCounts,
    pub(super) last_used_ms: i64,
}

impl Bucket {
    /// Adds `other`'s counts; the later last use.
    pub(super) fn merge(&mut self, other: &Bucket) {
        self.counts.merge(&other.counts);
        self.last_used_ms = self.last_used_ms.max(other.last_used_ms);
    }
}

// === impl Family ===

impl Family {
    const fn new(by_time: &'static str, by_owner: &'static str) -> Family {
        Family {
            by_time: TableDefinition::new(by_time),
            by_owner: TableDefinition::new(by_owner),
        }
    }

    pub(super) fn open<'txn>(&self, txn: &'txn WriteTransaction) -> Result<Open<'txn>, StoreError> {
        Ok(Open {
            by_time: txn.open_table(self.by_time).map_err(db_err)?,
            by_owner: txn.open_table(self.by_owner).map_err(db_err)?,
        })
    }

    /// `owner`'s buckets with `from <= index < to`, ascending.
    fn read(
        &self,
        txn: &ReadTransaction,
        owner: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
        let by_time = txn.open_table(self.by_time).map_err(db_err)?;
        let by_owner = txn.open_table(self.by_owner).map_err(db_err)?;
        let mut out = Vec::new();
        let id = owner.as_bytes();
        for item in by_owner.range((id, from)..(id, to)).map_err(db_err)? {
            let (key, _) = item.map_err(db_err)?;
            let index = key.value().1;
            match read_bucket(&by_time, (index, id))? {
                Some(bucket) => out.push((index, bucket.counts)),
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "usage index names a missing bucket {owner}@{index}"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Removes every bucket with index `< before`, and its index row.
    fn prune(&self, txn: &WriteTransaction, before: i64) -> Result<u64, StoreError> {
        let mut open = self.open(txn)?;
        let mut expired: Vec<(i64, Vec<u8>)> = Vec::new();
        let none: &[u8] = &[];
        for item in open
            .by_time
            .range((i64::MIN, none)..(before, none))
            .map_err(db_err)?
        {
            let (key, _) = item.map_err(db_err)?;
            let (index, owner) = key.value();
            expired.push((index, owner.to_vec()));
        }
        for (index, owner) in &expired {
            open.by_time
                .remove((*index, owner.as_slice()))
                .map_err(db_err)?;
            open.by_owner
                .remove((owner.as_slice(), *index))
                .map_err(db_err)?;
        }
        Ok(expired.len() as u64)
    }
}

/// A family's tables, open in a write transaction.
pub(super) struct Open<'txn> {
    by_time: Table<'txn, (i64, &'static [u8]), &'static [u8]>,
    by_owner: Table<'txn, (&'static [u8], i64), ()>,
}

impl Open<'_> {
    /// Adds `counts` into `owner`'s bucket `index`, creating it (and its index row) if new.
    pub(super) fn add(
        &mut self,
        index: i64,
        owner: &[u8],
        counts: &UsageCounts,
        last_used_ms: i64,
    ) -> Result<(), StoreError> {
        let mut bucket = match read_bucket(&self.by_time, (index, owner))? {
            Some(bucket) => bucket,
            None => {
                self.by_owner.insert((owner, index), ()).map_err(db_err)?;
                Bucket::default()
            }
        };
        bucket.merge(&Bucket {
            counts: *counts,
            last_used_ms,
        });
        self.by_time
            .insert((index, owner), encode(&bucket).as_slice())
            .map_err(db_err)?;
        Ok(())
    }
}

/// Creates the usage tables (packing minute buckets from before blocks, [`minutes`]).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    for family in [&KEY_HOURS, &KEY_DAYS, &ACCOUNT_DAYS] {
        family.open(txn)?;
    }
    minutes::create_tables(txn)?;
    txn.open_table(KEY_LAST_USED).map_err(db_err)?;
    Ok(())
}

/// Adds a batch into the keys' minute buckets and the accounts' day buckets, and into the keys'
/// hour and day buckets only where its minute is rolled up already ([`rollup`]): the rest reach
/// them by [`rollup::step`].
pub(super) fn add(txn: &WriteTransaction, batch: &mut [UsageDelta]) -> Result<(), StoreError> {
    // In index order the updates walk each table's current pages once, front to back.
    batch.sort_unstable_by(|a, b| (a.minute, &a.key_id).cmp(&(b.minute, &b.key_id)));
    minutes::Open::new(txn)?.add_sorted(batch)?;
    let rolled = Rolled::load(&txn.open_table(META).map_err(db_err)?)?;
    for (g, family) in [
        (Granularity::Hour, &KEY_HOURS),
        (Granularity::Day, &KEY_DAYS),
    ] {
        let mut buckets = family.open(txn)?;
        for d in batch.iter() {
            let owner = d.key_id.as_bytes();
            if rolled.covers(owner, d.minute) {
                buckets.add(g.of_minute(d.minute), owner, &d.counts, d.last_used_ms)?;
            }
        }
    }
    // An account has many keys in a batch: one update per account and day. (Only minute
    // buckets' last use is ever read.)
    let mut by_account: HashMap<(&str, i64), UsageCounts> = HashMap::new();
    for d in batch.iter() {
        let day = Granularity::Day.of_minute(d.minute);
        by_account
            .entry((&d.account_id, day))
            .or_default()
            .merge(&d.counts);
    }
    let mut accounts = ACCOUNT_DAYS.open(txn)?;
    for ((account_id, day), counts) in by_account {
        accounts.add(day, account_id.as_bytes(), &counts, 0)?;
    }
    Ok(())
}

/// Clamps a delta's last use into its minute, as the flusher sends it anyway: then a newer
/// minute bucket's last use is always the later one, and the newest bucket holds the key's last
/// use (see [`last_used`]). Applied once, where a batch enters the store.
pub(super) fn keep_last_use_in_minute(d: &mut UsageDelta) {
    let start = d.minute.saturating_mul(60_000);
    d.last_used_ms = d.last_used_ms.clamp(start, start.saturating_add(59_999));
}

/// A key's buckets of one granularity with `from <= index < to`, ascending; hours and days with
/// the minutes not yet rolled up into them.
pub(super) fn key_buckets(
    txn: &ReadTransaction,
    key_id: &str,
    g: Granularity,
    from: i64,
    to: i64,
) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
    let family = match g {
        Granularity::Minute => return minutes::read(txn, key_id, from, to),
        Granularity::Hour => &KEY_HOURS,
        Granularity::Day => &KEY_DAYS,
    };
    let stored = family.read(txn, key_id, from, to)?;
    rollup::add_unrolled(txn, key_id, g, from, to, stored)
}

/// `stored` (ascending, distinct) plus the `extra` counts whose index is in `[from, to)`.
pub(super) fn merge_sorted<'a>(
    stored: Vec<(i64, UsageCounts)>,
    extra: impl Iterator<Item = (i64, &'a UsageCounts)>,
    from: i64,
    to: i64,
) -> Vec<(i64, UsageCounts)> {
    let mut all: BTreeMap<i64, UsageCounts> = stored.into_iter().collect();
    for (index, counts) in extra.filter(|(i, _)| (from..to).contains(i)) {
        all.entry(index).or_default().merge(counts);
    }
    all.into_iter().collect()
}

/// An account's day buckets with `from <= day < to`, ascending.
pub(super) fn account_days(
    txn: &ReadTransaction,
    account_id: &str,
    from: i64,
    to: i64,
) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
    ACCOUNT_DAYS.read(txn, account_id, from, to)
}

/// When the key was last used: its newest minute bucket's time, or what pruning kept.
pub(super) fn last_used(txn: &ReadTransaction, key_id: &str) -> Result<Option<i64>, StoreError> {
    let kept = txn
        .open_table(KEY_LAST_USED)
        .map_err(db_err)?
        .get(key_id)
        .map_err(db_err)?
        .map(|v| v.value());
    let newest = minutes::newest(txn, key_id)?.map(|bucket| bucket.last_used_ms);
    Ok(kept.max(newest))
}

/// Removes the buckets of one granularity with index `< before` (for days, the accounts' too).
/// Pruned minute buckets leave their key's last-used time in `key_last_used`; a minute bucket
/// not yet rolled up into its hour and day stays until it is.
pub(super) fn prune(
    txn: &WriteTransaction,
    g: Granularity,
    before: i64,
) -> Result<u64, StoreError> {
    let removed = if g == Granularity::Minute {
        let rolled = Rolled::load(&txn.open_table(META).map_err(db_err)?)?;
        let before = before.min(rolled.start());
        // One write per key, with the latest of its pruned buckets.
        let mut latest: HashMap<String, i64> = HashMap::new();
        let removed = minutes::prune(txn, before, |key_id, bucket| {
            let ms = latest.entry(key_id.to_owned()).or_insert(i64::MIN);
            *ms = (*ms).max(bucket.last_used_ms);
            Ok(())
        })?;
        let mut kept = txn.open_table(KEY_LAST_USED).map_err(db_err)?;
        for (key_id, ms) in latest {
            let seen = kept
                .get(key_id.as_str())
                .map_err(db_err)?
                .map(|v| v.value());
            if seen.is_none_or(|s| s < ms) {
                kept.insert(key_id.as_str(), ms).map_err(db_err)?;
            }
        }
        removed
    } else if g == Granularity::Hour {
        KEY_HOURS.prune(txn, before)?
    } else {
        KEY_DAYS.prune(txn, before)? + ACCOUNT_DAYS.prune(txn, before)?
    };
    Ok(removed)
}

fn read_bucket(
    table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
    key: (i64, &[u8]),
) -> Result<Option<Bucket>, StoreError> {
    match table.get(key).map_err(db_err)? {
        Some(bytes) => decode(bytes.value()).map(Some),
        None => Ok(None),
    }
}

pub(super) fn encode(bucket: &Bucket) -> [u8; BUCKET_BYTES] {
    let fields = bucket.counts.to_array();
    let mut out = [0u8; BUCKET_BYTES];
    let (counts, last_used) = out.split_at_mut(48);
    for (chunk, field) in counts.chunks_exact_mut(8).zip(fields) {
        chunk.copy_from_slice(&field.to_le_bytes());
    }
    last_used.copy_from_slice(&bucket.last_used_ms.to_le_bytes());
    out
}

pub(super) fn decode(bytes: &[u8]) -> Result<Bucket, StoreError> {
    let bytes: &[u8; BUCKET_BYTES] = bytes.try_into().map_err(|_| {
        StoreError::Corrupt(format!(
            "usage bucket: expected {BUCKET_BYTES} bytes, found {}",
            bytes.len()
        ))
    })?;
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        w
    };
    let mut n = [0u64; 6];
    for (i, v) in n.iter_mut().enumerate() {
        *v = u64::from_le_bytes(word(i));
    }
    Ok(Bucket {
        counts: UsageCounts::from_array(n),
        last_used_ms: i64::from_le_bytes(word(6)),
    })
}
