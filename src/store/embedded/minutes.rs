//! The keys' minute buckets in the embedded store, packed in blocks.
//!
//! A fold ([`super::journal`]) brings one delta per key and minute, and a million keys used
//! each minute bring a million. Stored one redb row a bucket, as hours and days are
//! ([`super::buckets`]), each costs an insert: a walk from the root, a search and a rebuild of
//! its leaf, with the page cache's hashing on every page it touches. So a minute's buckets are
//! packed into blocks of consecutive keys: the row `(minute, first key)` holds the buckets of
//! that minute from its own key up to the next row's, sorted, [`FILL`] of them when written new
//! and at most [`MOST`]. A fold reads and rewrites a block once for all of its keys' deltas; a
//! point read finds the one block that can hold a key (the last row at or before
//! `(minute, key)`) and searches it. A block is `[u16 LE key length, key, bucket]` repeated.
//!
//! The index says which hours a key has minute buckets in: a row `(hour, key)` says the key may
//! have some in that hour, and reads probe its sixty minutes. It is written when a key's bucket
//! is made without one the minute before (in the hour) and the row is not there yet, so a busy
//! key adds one row an hour. It is time-major like the blocks: a fold asks about the current
//! hour's rows only, in key order, so its lookups fall on that hour's pages from front to back.
//! Keyed by key first, the same lookups landed on pages spread over every hour kept (42 % of a
//! fold's samples in a profile of the load script with a million keys, a third of them in
//! reads from the file; 35 % and a quarter time-major: round thirteen in docs/PERFORMANCE.md).
//! A read of one key looks its index row up in each hour that has blocks, a seek and a lookup
//! an hour. Files from before (a table of one row a bucket, and the key-major index) are
//! converted when they are opened ([`create_tables`]).

use std::collections::HashSet;
use std::ops::{Bound, ControlFlow};

use redb::{ReadTransaction, ReadableTable, Table, TableDefinition, TableHandle, WriteTransaction};

use super::buckets::{self, Bucket, BUCKET_BYTES};
use super::db_err;
use crate::store::{StoreError, UsageCounts, UsageDelta};

/// `(minute, first key)` → a block of that minute's buckets.
pub(super) const BLOCKS: TableDefinition<(i64, &[u8]), &[u8]> =
    TableDefinition::new("key_minute_blocks");
/// `(hour, key)` → (): the key may have minute buckets in the hour.
pub(super) const BY_HOUR_KEY: TableDefinition<(i64, &[u8]), ()> =
    TableDefinition::new("key_minutes_by_hour_key");
/// The layout before blocks, `(minute, key)` → bucket: packed into [`BLOCKS`] at open.
const ROWS: TableDefinition<(i64, &[u8]), &[u8]> = TableDefinition::new("key_minutes");
/// The index before it was time-major, `(key, hour)` → (): turned into [`BY_HOUR_KEY`] at open.
const BY_KEY_HOUR: TableDefinition<(&[u8], i64), ()> =
    TableDefinition::new("key_minutes_by_key_hour");

/// Buckets in a block written new (~1.3 KB with the gateway's 24-byte key ids: three to a page).
const FILL: usize = 16;
/// A block grown past this many buckets (a later fold's keys between its own) is written again
/// as blocks of about [`FILL`].
const MOST: usize = 40;
/// The most deltas [`Open::add_sorted`] holds at a time, which bounds the memory a fold of
/// half a million buckets adds.
const CHUNK: usize = 4096;

const NO_OWNER: &[u8] = &[];

/// The keys' minute tables, open in a write transaction.
pub(super) struct Open<'txn> {
    blocks: Table<'txn, (i64, &'static [u8]), &'static [u8]>,
    by_hour_key: Table<'txn, (i64, &'static [u8]), ()>,
}

impl<'txn> Open<'txn> {
    pub(super) fn new(txn: &'txn WriteTransaction) -> Result<Open<'txn>, StoreError> {
        Ok(Open {
            blocks: txn.open_table(BLOCKS).map_err(db_err)?,
            by_hour_key: txn.open_table(BY_HOUR_KEY).map_err(db_err)?,
        })
    }
}

impl Open<'_> {
    /// Adds keys' deltas, sorted by (minute, key id), into their minute buckets (a key twice in
    /// the batch sums), [`CHUNK`] deltas of one minute at a time.
    pub(super) fn add_sorted(&mut self, sorted: &[UsageDelta]) -> Result<(), StoreError> {
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

    /// [`Open::add_sorted`] for deltas of one minute, sorted by key id: each block that holds
    /// (or is to hold) some of their keys is read and written once.
    fn add_chunk(&mut self, minute: i64, chunk: &[UsageDelta]) -> Result<(), StoreError> {
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
        // The minute before in the hour: a key with a bucket there has its index row.
        let mut before = (minute.rem_euclid(60) != 0)
            .then(|| minute.checked_sub(1))
            .flatten()
            .map(Probe::new);
        let mut rest = merged.as_slice();
        while let Some(&(owner, _)) = rest.first() {
            let place = Place::of(&self.blocks, minute, owner)?;
            let n = rest.iter().take_while(|(o, _)| place.covers(o)).count();
            let (region, tail) = rest.split_at(n);
            rest = tail;
            let stored: Vec<(&[u8], Bucket)> = Entries(place.bytes()).collect::<Result<_, _>>()?;
            let mut all: Vec<(&[u8], Bucket)> = Vec::with_capacity(stored.len() + region.len());
            let mut old = stored.iter().peekable();
            for (owner, delta) in region {
                while let Some(entry) = old.next_if(|(o, _)| o < owner) {
                    all.push(*entry);
                }
                let mut bucket = match old.next_if(|(o, _)| o == owner) {
                    Some((_, bucket)) => *bucket,
                    None => {
                        let before_is_there = match &mut before {
                            Some(probe) => probe.contains(&self.blocks, owner)?,
                            None => false,
                        };
                        if !before_is_there {
                            self.index(owner, minute)?;
                        }
                        Bucket::default()
                    }
                };
                bucket.merge(delta);
                all.push((owner, bucket));
            }
            all.extend(old);
            self.write(minute, place.block.is_none(), &all)?;
        }
        Ok(())
    }

    /// Writes `all` (sorted, the keys of one block's place) as one block, or as blocks of
    /// about [`FILL`] when they are `new` or more than [`MOST`]; the first keeps the row of the
    /// block they were in, whose first key is still theirs.
    fn write(&mut self, minute: i64, new: bool, all: &[(&[u8], Bucket)]) -> Result<(), StoreError> {
        let pieces = if new || all.len() > MOST {
            all.len().div_ceil(FILL)
        } else {
            1
        };
        let per = all.len().div_ceil(pieces.max(1)).max(1);
        for piece in all.chunks(per) {
            put(&mut self.blocks, minute, piece)?;
        }
        Ok(())
    }

    /// Writes `owner`'s index row for `minute`'s hour unless it is there: a read finds it
    /// (a key used every few minutes) where writing it again would copy its leaf page for
    /// nothing.
    fn index(&mut self, owner: &[u8], minute: i64) -> Result<(), StoreError> {
        let row = (minute.div_euclid(60), owner);
        if self.by_hour_key.get(row).map_err(db_err)?.is_none() {
            self.by_hour_key.insert(row, ()).map_err(db_err)?;
        }
        Ok(())
    }
}

/// Whether keys have a bucket in one minute, asked in ascending order: the place last read is
/// kept, so keys of one block cost one read.
struct Probe {
    minute: i64,
    place: Option<Place>,
}

impl Probe {
    fn new(minute: i64) -> Probe {
        Probe {
            minute,
            place: None,
        }
    }

    fn contains(
        &mut self,
        table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
        owner: &[u8],
    ) -> Result<bool, StoreError> {
        let place = match self.place.take() {
            Some(place) if place.covers(owner) => place,
            _ => Place::of(table, self.minute, owner)?,
        };
        let found = find_in(place.bytes(), owner)?.is_some();
        self.place = Some(place);
        Ok(found)
    }
}

/// Where a key falls among a minute's blocks: the block that can hold it (`None` before the
/// minute's first), and the first key of the block after it, where the place ends.
struct Place {
    block: Option<Copied>,
    next: Option<Vec<u8>>,
}

impl Place {
    fn of(
        table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
        minute: i64,
        owner: &[u8],
    ) -> Result<Place, StoreError> {
        Ok(Place {
            block: holding(table, minute, owner)?,
            next: next_first(table, minute, owner)?,
        })
    }

    /// Whether `owner` falls here too.
    fn covers(&self, owner: &[u8]) -> bool {
        self.block
            .as_ref()
            .is_none_or(|(first, _)| owner >= first.as_slice())
            && self.next.as_deref().is_none_or(|next| owner < next)
    }

    /// The block's bytes; none before the minute's first block.
    fn bytes(&self) -> &[u8] {
        self.block.as_ref().map_or(&[], |(_, bytes)| bytes)
    }
}

/// A block read out: its row's first key, and its bytes.
type Copied = (Vec<u8>, Vec<u8>);

/// The block of `minute` that can hold `owner` (the last at or before it).
fn holding(
    table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
    minute: i64,
    owner: &[u8],
) -> Result<Option<Copied>, StoreError> {
    let row = table
        .range((minute, NO_OWNER)..=(minute, owner))
        .map_err(db_err)?
        .next_back()
        .transpose()
        .map_err(db_err)?;
    Ok(row.map(|(key, value)| (key.value().1.to_vec(), value.value().to_vec())))
}

/// The first key of `minute`'s first block after `owner`.
fn next_first(
    table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
    minute: i64,
    owner: &[u8],
) -> Result<Option<Vec<u8>>, StoreError> {
    let after = (Bound::Excluded((minute, owner)), Bound::Unbounded);
    let row = table
        .range::<(i64, &[u8])>(after)
        .map_err(db_err)?
        .next()
        .transpose()
        .map_err(db_err)?;
    Ok(row.and_then(|(key, _)| {
        let (m, first) = key.value();
        (m == minute).then(|| first.to_vec())
    }))
}

/// `owner`'s bucket of `minute`.
fn find(
    table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
    minute: i64,
    owner: &[u8],
) -> Result<Option<Bucket>, StoreError> {
    match holding(table, minute, owner)? {
        Some((_, block)) => find_in(&block, owner),
        None => Ok(None),
    }
}

/// `owner`'s bucket in `block`.
fn find_in(block: &[u8], owner: &[u8]) -> Result<Option<Bucket>, StoreError> {
    for entry in Entries(block) {
        let (o, bucket) = entry?;
        match o.cmp(owner) {
            std::cmp::Ordering::Less => {}
            std::cmp::Ordering::Equal => return Ok(Some(bucket)),
            std::cmp::Ordering::Greater => break,
        }
    }
    Ok(None)
}

/// A block's buckets with their keys, in order.
struct Entries<'a>(&'a [u8]);

impl<'a> Iterator for Entries<'a> {
    type Item = Result<(&'a [u8], Bucket), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let entry = self.split();
        if entry.is_err() {
            self.0 = &[];
        }
        Some(entry)
    }
}

impl<'a> Entries<'a> {
    fn split(&mut self) -> Result<(&'a [u8], Bucket), StoreError> {
        let corrupt = || StoreError::Corrupt("usage minute block does not decode".into());
        let (len, rest) = self.0.split_first_chunk::<2>().ok_or_else(corrupt)?;
        let len = usize::from(u16::from_le_bytes(*len));
        if rest.len() < len + BUCKET_BYTES {
            return Err(corrupt());
        }
        let (owner, rest) = rest.split_at(len);
        let (bucket, rest) = rest.split_at(BUCKET_BYTES);
        self.0 = rest;
        Ok((owner, buckets::decode(bucket)?))
    }
}

fn push_entry(out: &mut Vec<u8>, owner: &[u8], bucket: &Bucket) -> Result<(), StoreError> {
    let len = u16::try_from(owner.len())
        .map_err(|_| StoreError::Corrupt(format!("usage key id of {} bytes", owner.len())))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(owner);
    out.extend_from_slice(&buckets::encode(bucket));
    Ok(())
}

/// Writes `piece` (sorted, not empty) as the block of `minute` at its first key.
fn put<O: AsRef<[u8]>>(
    blocks: &mut Table<'_, (i64, &'static [u8]), &'static [u8]>,
    minute: i64,
    piece: &[(O, Bucket)],
) -> Result<(), StoreError> {
    let Some((first, _)) = piece.first() else {
        return Ok(());
    };
    let mut bytes = Vec::with_capacity(piece.len() * (BUCKET_BYTES + 32));
    for (owner, bucket) in piece {
        push_entry(&mut bytes, owner.as_ref(), bucket)?;
    }
    blocks
        .insert((minute, first.as_ref()), bytes.as_slice())
        .map_err(db_err)?;
    Ok(())
}

/// Creates the tables, and converts a file's minute buckets and index from before (in the
/// transaction that opens the file, so all or none of them).
pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut blocks = txn.open_table(BLOCKS).map_err(db_err)?;
    let mut by_hour_key = txn.open_table(BY_HOUR_KEY).map_err(db_err)?;
    let (mut rows, mut key_major) = (false, false);
    for table in txn.list_tables().map_err(db_err)? {
        rows |= table.name() == ROWS.name();
        key_major |= table.name() == BY_KEY_HOUR.name();
    }
    if rows {
        pack_rows(txn, &mut blocks)?;
        txn.delete_table(ROWS).map_err(db_err)?;
    }
    if key_major {
        let old = txn.open_table(BY_KEY_HOUR).map_err(db_err)?;
        for row in old.iter().map_err(db_err)? {
            let (key, _) = row.map_err(db_err)?;
            let (owner, hour) = key.value();
            by_hour_key.insert((hour, owner), ()).map_err(db_err)?;
        }
        drop(old);
        txn.delete_table(BY_KEY_HOUR).map_err(db_err)?;
    }
    Ok(())
}

/// Packs the minute buckets of the layout before blocks (one row a bucket) into blocks.
fn pack_rows(
    txn: &WriteTransaction,
    blocks: &mut Table<'_, (i64, &'static [u8]), &'static [u8]>,
) -> Result<(), StoreError> {
    let rows = txn.open_table(ROWS).map_err(db_err)?;
    // The block being filled, [`FILL`] buckets of one minute at most.
    let mut piece: Vec<(Vec<u8>, Bucket)> = Vec::with_capacity(FILL);
    let mut of_minute = None;
    for row in rows.iter().map_err(db_err)? {
        let (key, value) = row.map_err(db_err)?;
        let (minute, owner) = key.value();
        if let Some(m) = of_minute.filter(|m| *m != minute || piece.len() == FILL) {
            put(blocks, m, &piece)?;
            piece.clear();
        }
        of_minute = Some(minute);
        piece.push((owner.to_vec(), buckets::decode(value.value())?));
    }
    if let Some(m) = of_minute {
        put(blocks, m, &piece)?;
    }
    Ok(())
}

/// `owner`'s minute buckets with `from <= minute < to`, ascending: for each hour that has
/// blocks, the index says whether to look for the key in its minutes.
pub(super) fn read(
    txn: &ReadTransaction,
    owner: &str,
    from: i64,
    to: i64,
) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
    let mut out = Vec::new();
    let blocks = txn.open_table(BLOCKS).map_err(db_err)?;
    let by_hour_key = txn.open_table(BY_HOUR_KEY).map_err(db_err)?;
    let id = owner.as_bytes();
    let mut at = from;
    while at < to {
        let Some(first) = first_from(&blocks, at)?.filter(|m| *m < to) else {
            break;
        };
        let hour = first.div_euclid(60);
        let minutes = of_hour(hour);
        if by_hour_key.get((hour, id)).map_err(db_err)?.is_some() {
            for minute in first..minutes.end.min(to) {
                if let Some(bucket) = find(&blocks, minute, id)? {
                    out.push((minute, bucket.counts));
                }
            }
        }
        if minutes.end <= first {
            break; // the last hour of time
        }
        at = minutes.end;
    }
    Ok(out)
}

/// `owner`'s newest minute bucket: the hours that have blocks, newest first, as in [`read`].
pub(super) fn newest(txn: &ReadTransaction, owner: &str) -> Result<Option<Bucket>, StoreError> {
    let blocks = txn.open_table(BLOCKS).map_err(db_err)?;
    let by_hour_key = txn.open_table(BY_HOUR_KEY).map_err(db_err)?;
    let id = owner.as_bytes();
    let mut before = None;
    while let Some(last) = last_before(&blocks, before)? {
        let hour = last.div_euclid(60);
        let start = of_hour(hour).start;
        if by_hour_key.get((hour, id)).map_err(db_err)?.is_some() {
            for minute in (start..=last).rev() {
                if let Some(bucket) = find(&blocks, minute, id)? {
                    return Ok(Some(bucket));
                }
            }
        }
        before = Some(start);
    }
    Ok(None)
}

/// The last minute before `end` with blocks (of all, when `None`).
fn last_before(
    table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
    end: Option<i64>,
) -> Result<Option<i64>, StoreError> {
    let end = end.map_or(Bound::Unbounded, |end| Bound::Excluded((end, NO_OWNER)));
    let row = table
        .range::<(i64, &[u8])>((Bound::Unbounded, end))
        .map_err(db_err)?
        .next_back()
        .transpose()
        .map_err(db_err)?;
    Ok(row.map(|(key, _)| key.value().0))
}

/// The minutes of `hour`.
fn of_hour(hour: i64) -> std::ops::Range<i64> {
    let start = hour.saturating_mul(60);
    start..start.saturating_add(60)
}

/// The first minute at or after `from` with buckets.
pub(super) fn first_from(
    table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
    from: i64,
) -> Result<Option<i64>, StoreError> {
    let row = table
        .range((from, NO_OWNER)..)
        .map_err(db_err)?
        .next()
        .transpose()
        .map_err(db_err)?;
    Ok(row.map(|(key, _)| key.value().0))
}

/// The last minute with buckets.
pub(super) fn last(
    table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
) -> Result<Option<i64>, StoreError> {
    Ok(table.last().map_err(db_err)?.map(|(key, _)| key.value().0))
}

/// Gives `f` the buckets of `minute` whose keys come after `after` (every one when `None`),
/// in key order, until it breaks.
pub(super) fn each_after(
    table: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
    minute: i64,
    after: Option<&[u8]>,
    mut f: impl FnMut(&[u8], &Bucket) -> ControlFlow<()>,
) -> Result<(), StoreError> {
    // From the block that holds `after`: its later keys are after it too.
    let start = match after {
        Some(after) => holding(table, minute, after)?.map(|(first, _)| first),
        None => None,
    };
    let start = start.as_deref().unwrap_or(NO_OWNER);
    for row in table.range((minute, start)..).map_err(db_err)? {
        let (key, block) = row.map_err(db_err)?;
        if key.value().0 != minute {
            break;
        }
        for entry in Entries(block.value()) {
            let (owner, bucket) = entry?;
            if after.is_some_and(|after| owner <= after) {
                continue;
            }
            if f(owner, &bucket).is_break() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Removes every minute bucket before `before`, handing each to `removed` first, and the index
/// rows of hours none of whose buckets is left; how many buckets went.
pub(super) fn prune(
    txn: &WriteTransaction,
    before: i64,
    mut removed: impl FnMut(&str, &Bucket) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let mut blocks = txn.open_table(BLOCKS).map_err(db_err)?;
    let mut by_hour_key = txn.open_table(BY_HOUR_KEY).map_err(db_err)?;
    let mut expired: Vec<(i64, Vec<u8>)> = Vec::new();
    let mut hours: HashSet<(Vec<u8>, i64)> = HashSet::new();
    let mut count = 0u64;
    for row in blocks
        .range((i64::MIN, NO_OWNER)..(before, NO_OWNER))
        .map_err(db_err)?
    {
        let (key, block) = row.map_err(db_err)?;
        let (minute, first) = key.value();
        for entry in Entries(block.value()) {
            let (owner, bucket) = entry?;
            let id = std::str::from_utf8(owner)
                .map_err(|_| StoreError::Corrupt("usage bucket owner is not UTF-8".into()))?;
            removed(id, &bucket)?;
            hours.insert((owner.to_vec(), minute.div_euclid(60)));
            count += 1;
        }
        expired.push((minute, first.to_vec()));
    }
    for (minute, first) in &expired {
        blocks.remove((*minute, first.as_slice())).map_err(db_err)?;
    }
    // An hour's index row goes once none of its buckets is left.
    for (owner, hour) in hours {
        let minutes = of_hour(hour);
        let mut left = false;
        for minute in minutes.start.max(before)..minutes.end {
            if find(&blocks, minute, &owner)?.is_some() {
                left = true;
                break;
            }
        }
        if !left {
            by_hour_key
                .remove((hour, owner.as_slice()))
                .map_err(db_err)?;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests;
