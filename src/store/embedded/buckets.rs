//! Usage buckets in the embedded store, laid out for the writes that fill them.
//!
//! The writes come from the journal's folds ([`super::journal`]): one delta per key and minute,
//! into the minute buckets (and the accounts' days); keys' hours and days are summed from the
//! minutes once the hour is over ([`super::rollup`]). With many keys, a key-major table
//! (`(key id, minute)`) puts those updates on leaf pages scattered over the whole file, and every
//! commit copies each of them (redb is copy-on-write). So each family of buckets is stored
//! time-major, `(index, owner)`, where a fold's updates fall on the few pages of the current
//! minute (a rollup's on those of one hour and one day). A key-major index answers "this key's
//! buckets from … to"; its rows are the scattered writes, so they are few: one per new bucket
//! for hours and days, and one per key and hour for minutes (a row `(owner, hour)` says "may
//! have minute buckets in this hour", and reads probe its 60 minutes). A key's last-used time
//! rides in its buckets, so no per-key row is written either: it is the newest minute bucket's,
//! or, once that is pruned, the `key_last_used` row that pruning leaves behind.

use std::collections::{BTreeMap, HashMap, HashSet};

use redb::{ReadTransaction, ReadableTable, Table, TableDefinition, WriteTransaction};

use super::rollup::{self, Rolled};
use super::{db_err, META};
use crate::store::{Granularity, StoreError, UsageCounts, UsageDelta};

/// Six LE `u64` counts, then the LE `i64` last-used time in milliseconds.
const BUCKET_BYTES: usize = 56;

type ByTime = TableDefinition<'static, (i64, &'static [u8]), &'static [u8]>;
type ByOwner = TableDefinition<'static, (&'static [u8], i64), ()>;

/// The last-used time kept for a key whose minute buckets were all pruned.
const KEY_LAST_USED: TableDefinition<&str, i64> = TableDefinition::new("key_last_used");

/// One family of buckets: a time-major table of counts and its owner-major index. An index row
/// `(owner, group)` says that the owner may have buckets `group × span … group × span + span − 1`;
/// for minutes a group is an hour, so that a busy key adds one index row an hour, not one a
/// minute (index rows are scattered over the file by key, so each insert costs a page copy).
pub(super) struct Family {
    pub(super) by_time: ByTime,
    by_owner: ByOwner,
    span: i64,
}

pub(super) const KEY_MINUTES: Family = Family::new("key_minutes", "key_minutes_by_key_hour", 60);
pub(super) const KEY_HOURS: Family = Family::new("key_hours", "key_hours_by_key", 1);
pub(super) const KEY_DAYS: Family = Family::new("key_days", "key_days_by_key", 1);
const ACCOUNT_DAYS: Family = Family::new("account_days", "account_days_by_account", 1);

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
    const fn new(by_time: &'static str, by_owner: &'static str, span: i64) -> Family {
        Family {
            by_time: TableDefinition::new(by_time),
            by_owner: TableDefinition::new(by_owner),
            span,
        }
    }

    /// The indexes of a group's buckets.
    fn members(&self, group: i64) -> std::ops::Range<i64> {
        let start = group.saturating_mul(self.span);
        start..start.saturating_add(self.span)
    }

    fn of_keys(g: Granularity) -> &'static Family {
        match g {
            Granularity::Minute => &KEY_MINUTES,
            Granularity::Hour => &KEY_HOURS,
            Granularity::Day => &KEY_DAYS,
        }
    }

    pub(super) fn open<'txn>(&self, txn: &'txn WriteTransaction) -> Result<Open<'txn>, StoreError> {
        Ok(Open {
            by_time: txn.open_table(self.by_time).map_err(db_err)?,
            by_owner: txn.open_table(self.by_owner).map_err(db_err)?,
            span: self.span,
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
        let groups = (id, from.div_euclid(self.span))..=(id, (to - 1).div_euclid(self.span));
        for item in by_owner.range(groups).map_err(db_err)? {
            let (key, _) = item.map_err(db_err)?;
            let members = self.members(key.value().1);
            for index in members.start.max(from)..members.end.min(to) {
                match read_bucket(&by_time, (index, id))? {
                    Some(bucket) => out.push((index, bucket.counts)),
                    // A group's row says "may have": only a row of one bucket must find it.
                    None if self.span == 1 => {
                        return Err(StoreError::Corrupt(format!(
                            "usage index names a missing bucket {owner}@{index}"
                        )))
                    }
                    None => {}
                }
            }
        }
        Ok(out)
    }

    /// `owner`'s newest bucket.
    fn newest(&self, txn: &ReadTransaction, owner: &str) -> Result<Option<Bucket>, StoreError> {
        let by_owner = txn.open_table(self.by_owner).map_err(db_err)?;
        let by_time = txn.open_table(self.by_time).map_err(db_err)?;
        let owner = owner.as_bytes();
        let groups = by_owner
            .range((owner, i64::MIN)..=(owner, i64::MAX))
            .map_err(db_err)?;
        for item in groups.rev() {
            let group = item.map_err(db_err)?.0.value().1;
            for index in self.members(group).rev() {
                if let Some(bucket) = read_bucket(&by_time, (index, owner))? {
                    return Ok(Some(bucket));
                }
            }
        }
        Ok(None)
    }

    /// Removes every bucket with index `< before`, handing each to `removed` first.
    fn prune(
        &self,
        txn: &WriteTransaction,
        before: i64,
        mut removed: impl FnMut(&str, &Bucket) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let mut open = self.open(txn)?;
        let mut expired: Vec<(i64, Vec<u8>)> = Vec::new();
        let none: &[u8] = &[];
        for item in open
            .by_time
            .range((i64::MIN, none)..(before, none))
            .map_err(db_err)?
        {
            let (key, value) = item.map_err(db_err)?;
            let (index, owner) = key.value();
            let id = std::str::from_utf8(owner)
                .map_err(|_| StoreError::Corrupt("usage bucket owner is not UTF-8".into()))?;
            removed(id, &decode(value.value())?)?;
            expired.push((index, owner.to_vec()));
        }
        let mut groups: HashSet<(&[u8], i64)> = HashSet::new();
        for (index, owner) in &expired {
            open.by_time
                .remove((*index, owner.as_slice()))
                .map_err(db_err)?;
            groups.insert((owner.as_slice(), index.div_euclid(self.span)));
        }
        // A group's index row goes once none of its buckets is left.
        for (owner, group) in groups {
            let members = self.members(group);
            let mut left = false;
            for index in members.start.max(before)..members.end {
                if read_bucket(&open.by_time, (index, owner))?.is_some() {
                    left = true;
                    break;
                }
            }
            if !left {
                open.by_owner.remove((owner, group)).map_err(db_err)?;
            }
        }
        Ok(expired.len() as u64)
    }
}

/// A family's tables, open in a write transaction.
pub(super) struct Open<'txn> {
    by_time: Table<'txn, (i64, &'static [u8]), &'static [u8]>,
    by_owner: Table<'txn, (&'static [u8], i64), ()>,
    span: i64,
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
                // A read on the current pages, not the index's.
                let before_is_there = match self.before_in_group(index) {
                    Some(before) => read_bucket(&self.by_time, (before, owner))?.is_some(),
                    None => false,
                };
                self.create(index, owner, before_is_there)?
            }
        };
        bucket.merge(&Bucket {
            counts: *counts,
            last_used_ms,
        });
        self.put(index, owner, &bucket)
    }

    /// The index before `index` in its group, whose bucket, if there, shows that the group's
    /// index row is written already; `None` for a group's first index (and the first index
    /// there is, which has none before it).
    fn before_in_group(&self, index: i64) -> Option<i64> {
        if index.rem_euclid(self.span) == 0 {
            None
        } else {
            index.checked_sub(1)
        }
    }

    /// A new bucket at `index`: its group's index row is written unless `before_is_there` (the
    /// owner's bucket at [`Open::before_in_group`] is).
    fn create(
        &mut self,
        index: i64,
        owner: &[u8],
        before_is_there: bool,
    ) -> Result<Bucket, StoreError> {
        if !before_is_there {
            let group = index.div_euclid(self.span);
            // A group of many indexes may have its row from an earlier bucket than the one
            // just before (a key used every few minutes): a read finds it, where writing it
            // again would copy its leaf page, on pages scattered by owner, for nothing.
            let written =
                self.span > 1 && self.by_owner.get((owner, group)).map_err(db_err)?.is_some();
            if !written {
                self.by_owner.insert((owner, group), ()).map_err(db_err)?;
            }
        }
        Ok(Bucket::default())
    }

    /// Adds keys' deltas sorted by (minute, key id) into the keys' minute buckets (this
    /// family's index must be the minute: a coarser one would bring one key's deltas of two
    /// minutes into one index, apart), as [`Open::add`] of each in turn would (a key twice in
    /// the batch, in one chunk or two, sums), but reads what is there with walks over the
    /// current pages ([`scan`]) instead of a point lookup a delta: up to [`CHUNK`] deltas of
    /// one minute at a time, which bounds the memory a fold of half a million buckets adds.
    pub(super) fn add_minutes_sorted(&mut self, sorted: &[UsageDelta]) -> Result<(), StoreError> {
        debug_assert_eq!(
            self.span, KEY_MINUTES.span,
            "only the minutes are indexed by minute"
        );
        let mut rest = sorted;
        while let Some(first) = rest.first() {
            let minute = first.minute;
            let run = rest
                .iter()
                .take(CHUNK)
                .take_while(|d| d.minute == minute)
                .count();
            let (chunk, tail) = rest.split_at(run);
            self.add_chunk(minute, chunk)?;
            rest = tail;
        }
        Ok(())
    }

    /// [`Open::add_minutes_sorted`] for deltas of one minute, sorted by key id.
    fn add_chunk(&mut self, index: i64, chunk: &[UsageDelta]) -> Result<(), StoreError> {
        let mut merged: Vec<(&[u8], Bucket)> = Vec::with_capacity(chunk.len());
        for d in chunk {
            let delta = Bucket {
                counts: d.counts,
                last_used_ms: d.last_used_ms,
            };
            match merged.last_mut() {
                Some((owner, bucket)) if *owner == d.key_id.as_bytes() => bucket.merge(&delta),
                _ => merged.push((d.key_id.as_bytes(), delta)),
            }
        }
        let owners: Vec<&[u8]> = merged.iter().map(|(owner, _)| *owner).collect();
        let existing = scan(&self.by_time, index, &owners)?;
        // For the new buckets, whether the one before each is there.
        let new_owners: Vec<&[u8]> = owners
            .iter()
            .zip(&existing)
            .filter(|(_, bucket)| bucket.is_none())
            .map(|(owner, _)| *owner)
            .collect();
        let before = match self.before_in_group(index) {
            Some(before) if !new_owners.is_empty() => scan(&self.by_time, before, &new_owners)?,
            _ => vec![None; new_owners.len()],
        };
        let mut before_is_there = before.iter().map(Option::is_some);
        for ((owner, delta), stored) in merged.iter().zip(existing) {
            let mut bucket = match stored {
                Some(bucket) => bucket,
                None => self.create(index, owner, before_is_there.next().unwrap_or(false))?,
            };
            bucket.merge(delta);
            self.put(index, owner, &bucket)?;
        }
        Ok(())
    }

    fn put(&mut self, index: i64, owner: &[u8], bucket: &Bucket) -> Result<(), StoreError> {
        self.by_time
            .insert((index, owner), encode(bucket).as_slice())
            .map_err(db_err)?;
        Ok(())
    }
}

/// Creates the usage tables.
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    for family in [&KEY_MINUTES, &KEY_HOURS, &KEY_DAYS, &ACCOUNT_DAYS] {
        family.open(txn)?;
    }
    txn.open_table(KEY_LAST_USED).map_err(db_err)?;
    Ok(())
}

/// Adds a batch into the keys' minute buckets and the accounts' day buckets, and into the keys'
/// hour and day buckets only where its minute is rolled up already ([`rollup`]): the rest reach
/// them by [`rollup::step`].
pub(super) fn add(txn: &WriteTransaction, batch: &mut [UsageDelta]) -> Result<(), StoreError> {
    // In index order the updates walk each table's current pages once, front to back.
    batch.sort_unstable_by(|a, b| (a.minute, &a.key_id).cmp(&(b.minute, &b.key_id)));
    let rolled = Rolled::load(&txn.open_table(META).map_err(db_err)?)?;
    for g in Granularity::ALL {
        let mut buckets = Family::of_keys(g).open(txn)?;
        if g == Granularity::Minute {
            buckets.add_minutes_sorted(batch)?;
            continue;
        }
        for d in batch.iter() {
            let owner = d.key_id.as_bytes();
            if g == Granularity::Minute || rolled.covers(owner, d.minute) {
                let index = g.of_minute(d.minute);
                buckets.add(index, owner, &d.counts, d.last_used_ms)?;
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
    let stored = Family::of_keys(g).read(txn, key_id, from, to)?;
    match g {
        Granularity::Minute => Ok(stored),
        Granularity::Hour | Granularity::Day => {
            rollup::add_unrolled(txn, key_id, g, from, to, stored)
        }
    }
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
    let newest = KEY_MINUTES
        .newest(txn, key_id)?
        .map(|bucket| bucket.last_used_ms);
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
    let mut removed = if g == Granularity::Minute {
        let rolled = Rolled::load(&txn.open_table(META).map_err(db_err)?)?;
        let before = before.min(rolled.start());
        // One write per key, with the latest of its pruned buckets.
        let mut latest: HashMap<String, i64> = HashMap::new();
        let removed = KEY_MINUTES.prune(txn, before, |key_id, bucket| {
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
    } else {
        Family::of_keys(g).prune(txn, before, |_, _| Ok(()))?
    };
    if g == Granularity::Day {
        removed += ACCOUNT_DAYS.prune(txn, before, |_, _| Ok(()))?;
    }
    Ok(removed)
}

/// The most deltas [`Open::add_minutes_sorted`] reads and writes at a time.
const CHUNK: usize = 4096;

/// After this many rows of other owners in a row, [`scan`] seeks to its next owner instead of
/// walking on: a seek costs about what a point lookup does, a row walked past much less.
const RESEEK_AFTER: usize = 32;

/// The buckets at `index` of `owners` (ascending, distinct), as [`read_bucket`] of each would
/// give them: read by walking the index's rows from the first owner to the last, seeking again
/// past a long run of other owners' rows, so that dense owners cost a row each and sparse ones
/// no more than a lookup each.
fn scan(
    table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
    index: i64,
    owners: &[&[u8]],
) -> Result<Vec<Option<Bucket>>, StoreError> {
    let mut out = vec![None; owners.len()];
    let Some(&last) = owners.last() else {
        return Ok(out);
    };
    let mut next = 0;
    while let Some(&from) = owners.get(next) {
        let mut rows = table.range((index, from)..=(index, last)).map_err(db_err)?;
        let mut passed = 0;
        loop {
            let Some(row) = rows.next() else {
                return Ok(out);
            };
            let (key, value) = row.map_err(db_err)?;
            let owner = key.value().1;
            while owners.get(next).is_some_and(|o| *o < owner) {
                next += 1;
            }
            match owners.get(next) {
                None => return Ok(out),
                Some(o) if *o == owner => {
                    out[next] = Some(decode(value.value())?);
                    next += 1;
                    passed = 0;
                }
                Some(_) => {
                    passed += 1;
                    if passed >= RESEEK_AFTER {
                        break;
                    }
                }
            }
        }
    }
    Ok(out)
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

fn encode(bucket: &Bucket) -> [u8; BUCKET_BYTES] {
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

#[cfg(test)]
mod tests {
    use super::super::EmbeddedStore;
    use super::*;
    use crate::store::{BatchId, Usage};

    fn at(minute: i64) -> UsageDelta {
        UsageDelta {
            key_id: "key_a".into(),
            account_id: "acc_a".into(),
            minute,
            counts: UsageCounts {
                requests: 1,
                ..UsageCounts::default()
            },
            last_used_ms: minute * 60_000 + 7,
        }
    }

    async fn minutes(store: &EmbeddedStore, from: i64, to: i64) -> Vec<i64> {
        let buckets = store
            .key_usage("key_a", Granularity::Minute, from, to)
            .await
            .unwrap();
        buckets.into_iter().map(|(m, _)| m).collect()
    }

    fn index_rows(store: &EmbeddedStore) -> Vec<i64> {
        let txn = store.db.begin_read().unwrap();
        let index = txn.open_table(KEY_MINUTES.by_owner).unwrap();
        index
            .iter()
            .unwrap()
            .map(|row| row.unwrap().0.value().1)
            .collect()
    }

    #[tokio::test]
    async fn minute_buckets_are_indexed_by_hour_and_pruned_with_their_rows() {
        let dir = tempfile::TempDir::new().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("u.redb")).unwrap();
        store.unfolded.lock().fold_at = 0;
        let batch: Vec<UsageDelta> = [5, 7, 59, 61, 119, 120, 200].map(at).into();
        store.add_usage(BatchId::first(), &batch).await.unwrap();
        // One row per hour with traffic, however many minutes it holds.
        assert_eq!(index_rows(&store), vec![0, 1, 2, 3]);
        assert_eq!(
            minutes(&store, 0, i64::MAX).await,
            vec![5, 7, 59, 61, 119, 120, 200]
        );
        assert_eq!(minutes(&store, 6, 120).await, vec![7, 59, 61, 119]);
        assert_eq!(minutes(&store, 62, 119).await, Vec::<i64>::new());
        let prune = |before| store.prune_usage(Granularity::Minute, before);
        assert_eq!(prune(60).await.unwrap(), 3);
        assert_eq!(index_rows(&store), vec![1, 2, 3]);
        // Part of an hour pruned: its row stays for the minutes left.
        assert_eq!(prune(100).await.unwrap(), 1);
        assert_eq!(index_rows(&store), vec![1, 2, 3]);
        assert_eq!(minutes(&store, 0, i64::MAX).await, vec![119, 120, 200]);
        // The rest of it, and the hour after, whose later minutes have no traffic.
        assert_eq!(prune(121).await.unwrap(), 2);
        assert_eq!(index_rows(&store), vec![3]);
        let key = ["key_a".to_owned()];
        let newest = || store.last_used(&key);
        assert_eq!(newest().await.unwrap(), vec![Some(200 * 60_000 + 7)]);
        assert_eq!(prune(201).await.unwrap(), 1);
        assert!(index_rows(&store).is_empty());
        assert_eq!(newest().await.unwrap(), vec![Some(200 * 60_000 + 7)]);
    }

    /// The rows of a minute table (index, owner, bucket) and of its index (owner, hour).
    type Dump = (Vec<(i64, Vec<u8>, Vec<u8>)>, Vec<(Vec<u8>, i64)>);

    /// Everything in the keys' minute tables, both ways round.
    fn dump(db: &redb::Database) -> Dump {
        let txn = db.begin_read().unwrap();
        let by_time = txn.open_table(KEY_MINUTES.by_time).unwrap();
        let by_owner = txn.open_table(KEY_MINUTES.by_owner).unwrap();
        let rows = by_time
            .iter()
            .unwrap()
            .map(|row| {
                let (key, value) = row.unwrap();
                let (index, owner) = key.value();
                (index, owner.to_vec(), value.value().to_vec())
            })
            .collect();
        let groups = by_owner
            .iter()
            .unwrap()
            .map(|row| {
                let (key, _) = row.unwrap();
                let (owner, group) = key.value();
                (owner.to_vec(), group)
            })
            .collect();
        (rows, groups)
    }

    /// Writes `deltas` (sorted) into the keys' minute tables: one `add` a delta, or
    /// `add_minutes_sorted`.
    fn write(db: &redb::Database, deltas: &[UsageDelta], sorted: bool) {
        let txn = db.begin_write().unwrap();
        {
            let mut open = KEY_MINUTES.open(&txn).unwrap();
            if sorted {
                open.add_minutes_sorted(deltas).unwrap();
            } else {
                for d in deltas {
                    let index = d.minute;
                    open.add(index, d.key_id.as_bytes(), &d.counts, d.last_used_ms)
                        .unwrap();
                }
            }
        }
        txn.commit().unwrap();
    }

    /// `add_minutes_sorted` leaves the minute tables as one lookup and write a delta does: keys dense
    /// among the stored rows (walked) and sparse (sought), a key twice in a batch within a chunk
    /// and across a chunk's end, new buckets in an hour's first minute, after a minute with the
    /// key, after a gap, and in a minute nothing was written in before.
    #[test]
    fn sorted_adds_write_what_one_add_a_delta_writes() {
        let hour_start = 29_000_000 * 60;
        let id = |n: usize| -> std::sync::Arc<str> { format!("key_{n:06}").into() };
        let delta = |n: usize, minute: i64, requests: u64| UsageDelta {
            key_id: id(n),
            account_id: "acc_a".into(),
            minute,
            counts: UsageCounts {
                requests,
                success: requests,
                ..UsageCounts::default()
            },
            last_used_ms: minute * 60_000 + i64::try_from(n % 60_000).unwrap(),
        };
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut coin = |one_in: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed.is_multiple_of(one_in)
        };
        // Stored before: minutes hour_start - 2 ..= hour_start + 1 for a random half of 12,000
        // keys, every key in hour_start + 1.
        let mut history = Vec::new();
        for minute in hour_start - 2..=hour_start + 1 {
            for n in 0..12_000 {
                if minute == hour_start + 1 || coin(2) {
                    history.push(delta(n, minute, 1));
                }
            }
        }
        // The batch: in hour_start - 1 and hour_start, every 100th key (sparse: ~50 stored rows
        // between, past `RESEEK_AFTER`); in hour_start + 1, keys 0..4095, key 4095 twice (the chunk ends
        // between the two), then keys up to 6,000 (dense); in hour_start + 2 (nothing stored
        // yet), a random tenth of the keys, some twice; and in hour_start - 5, after a gap.
        let mut batch = Vec::new();
        for minute in [hour_start - 1, hour_start] {
            batch.extend((0..12_000).step_by(100).map(|n| delta(n, minute, 2)));
        }
        batch.extend((0..4_096).map(|n| delta(n, hour_start + 1, 3)));
        batch.push(delta(4_095, hour_start + 1, 4));
        batch.extend((4_096..6_000).map(|n| delta(n, hour_start + 1, 3)));
        for n in 0..12_000 {
            if coin(10) {
                batch.push(delta(n, hour_start + 2, 5));
                if coin(3) {
                    batch.push(delta(n, hour_start + 2, 6));
                }
            }
        }
        batch.extend((0..300).map(|n| delta(n * 7, hour_start - 5, 7)));
        // In hour_start + 3 (nothing stored): keys 0..4095 and key 4095 twice again, so that
        // the first chunk makes the bucket the second adds to.
        batch.extend((0..4_096).map(|n| delta(n, hour_start + 3, 1)));
        batch.push(delta(4_095, hour_start + 3, 1));
        // Ids of other lengths, one a prefix of the next (`key_1` < `key_10` < `key_1x`), all
        // after the numbered ones so that the chunks' ends stay where they are.
        for minute in [hour_start + 1, hour_start + 3] {
            for short in ["key_1", "key_10", "key_1x"] {
                batch.push(UsageDelta {
                    key_id: short.into(),
                    ..delta(1, minute, 9)
                });
            }
        }
        history.sort_by(|a, b| (a.minute, &a.key_id).cmp(&(b.minute, &b.key_id)));
        batch.sort_by(|a, b| (a.minute, &a.key_id).cmp(&(b.minute, &b.key_id)));
        // A chunk ends between the two deltas of key 4095 in both minutes.
        for minute in [hour_start + 1, hour_start + 3] {
            let ids: Vec<&str> = batch
                .iter()
                .filter(|d| d.minute == minute)
                .map(|d| &*d.key_id)
                .collect();
            assert_eq!(ids[CHUNK - 1..=CHUNK], ["key_004095"; 2]);
        }

        let dir = tempfile::TempDir::new().unwrap();
        let [one_by_one, sorted] =
            ["a.redb", "b.redb"].map(|name| redb::Database::create(dir.path().join(name)).unwrap());
        for db in [&one_by_one, &sorted] {
            write(db, &history, false);
        }
        write(&one_by_one, &batch, false);
        write(&sorted, &batch, true);
        let (rows, groups) = dump(&sorted);
        assert_eq!(
            (&rows, &groups),
            (&dump(&one_by_one).0, &dump(&one_by_one).1)
        );
        // The batch did add: key 4095's bucket in hour_start + 1 holds 1 + 3 + 4 requests.
        let key = (hour_start + 1, b"key_004095".to_vec());
        let stored = rows
            .iter()
            .find(|(i, o, _)| (*i, o.clone()) == key)
            .unwrap();
        assert_eq!(decode(&stored.2).unwrap().counts.requests, 8);
        let key = (hour_start + 3, b"key_004095".to_vec());
        let stored = rows.iter().find(|(i, o, _)| (*i, o.clone()) == key);
        assert_eq!(
            stored.map(|s| decode(&s.2).unwrap().counts.requests),
            Some(2)
        );
        assert!(groups.contains(&(b"key_000000".to_vec(), (hour_start - 5).div_euclid(60))));
    }
}
