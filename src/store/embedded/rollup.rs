//! Keys' hour and day buckets rolled up from their minute buckets once an hour is over.
//!
//! A fold ([`super::journal`]) adds each (key, minute) delta into its minute bucket only. Once
//! an hour has ended, [`step`] reads that hour's minute buckets (time-major: one contiguous range
//! per minute), sums them per key, and adds each key's sum into its hour and day buckets. A key
//! used in every minute costs its hour and day buckets one update an hour instead of sixty, and
//! a fold rewrites the current pages of one table instead of three. The sums are taken in chunks
//! of at most [`CHUNK_KEYS`] keys, chunks until [`STEP_ROWS`] rows are read, a step with each
//! usage write, so that neither a write's time nor its memory grows with the number of keys; the
//! progress ([`Rolled`]) is a `meta` row written in the same transaction as the sums.
//!
//! An hour is over once the wall clock or the newest minute counted is past it. A minute ahead
//! of the clock (the clock stepped back after counting it) moves the progress that far, and
//! until the clock catches up deltas count as late: exact, but written into all three buckets,
//! as before rollups.
//!
//! Every count is in its hour and day bucket exactly once, whatever the progress: a delta for a
//! minute already rolled (counts that arrive late, a replayed log) goes into all three buckets
//! at once, as every delta did before rollups; reads of hours and days add the minute buckets
//! not yet rolled ([`add_unrolled`]); minute buckets are pruned only once rolled.
//! Account day buckets are not rolled up: a fold adds one sum per account and day, which is
//! already few writes.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use redb::{ReadTransaction, ReadableTable, WriteTransaction};

use super::buckets::{self, Bucket, KEY_DAYS, KEY_HOURS};
use super::{db_err, minutes, META};
use crate::store::{Granularity, StoreError, UsageCounts};

/// The `meta` row that holds [`Rolled`].
const ROLLED: &str = "usage_rolled";
/// At most this many keys' sums in memory, and written, per chunk.
const CHUNK_KEYS: usize = 2_048;
/// A step takes further chunks until it has read this many minute buckets (checked between
/// chunks: a chunk of busy keys reads up to 60 × [`CHUNK_KEYS`]).
const STEP_ROWS: usize = 20_000;

/// How far the minute buckets are rolled into hours and days: every minute before `start`, and
/// in `start`'s span (from `start` to the end of its hour) the keys up to `cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rolled {
    start: i64,
    cursor: Option<Vec<u8>>,
}

// === impl Rolled ===

impl Rolled {
    /// The end (exclusive) of the span being rolled: the end of `start`'s hour.
    fn span_end(&self) -> i64 {
        self.start
            .div_euclid(60)
            .saturating_add(1)
            .saturating_mul(60)
    }

    /// Whether `owner`'s bucket of `minute` is in its hour and day buckets.
    pub(super) fn covers(&self, owner: &[u8], minute: i64) -> bool {
        minute < self.start
            || (minute < self.span_end()
                && self.cursor.as_deref().is_some_and(|last| owner <= last))
    }

    /// The first minute not wholly rolled: minute buckets before it may be pruned.
    pub(super) fn start(&self) -> i64 {
        self.start
    }

    /// The progress as stored.
    pub(super) fn load(
        meta: &impl ReadableTable<&'static str, &'static [u8]>,
    ) -> Result<Rolled, StoreError> {
        let value = meta
            .get(ROLLED)
            .map_err(db_err)?
            .ok_or_else(|| StoreError::Corrupt(format!("meta row {ROLLED} is missing")))?;
        Rolled::decode(value.value())
    }

    /// LE `i64` start, then the cursor's bytes when there is one (a flag byte before them).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.cursor.as_ref().map_or(0, Vec::len));
        out.extend_from_slice(&self.start.to_le_bytes());
        if let Some(cursor) = &self.cursor {
            out.push(1);
            out.extend_from_slice(cursor);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Rolled, StoreError> {
        let corrupt = || StoreError::Corrupt(format!("meta row {ROLLED} does not decode"));
        let (start, rest) = bytes.split_first_chunk::<8>().ok_or_else(corrupt)?;
        let cursor = match rest.split_first() {
            None => None,
            Some((1, cursor)) => Some(cursor.to_vec()),
            Some(_) => return Err(corrupt()),
        };
        Ok(Rolled {
            start: i64::from_le_bytes(*start),
            cursor,
        })
    }
}

/// Writes the first progress row of a file that has none: one from before rollups has every
/// minute bucket it holds in its hours and days already, so those count as rolled; a new file
/// (no usage yet) starts from the beginning of time.
pub(super) fn init(txn: &WriteTransaction, now_minute: i64) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META).map_err(db_err)?;
    if meta.get(ROLLED).map_err(db_err)?.is_some() {
        return Ok(());
    }
    let blocks = txn.open_table(minutes::BLOCKS).map_err(db_err)?;
    let hours = txn.open_table(KEY_HOURS.by_time).map_err(db_err)?;
    let newest = minutes::last(&blocks)?;
    let start = if newest.is_none() && hours.first().map_err(db_err)?.is_none() {
        i64::MIN
    } else {
        newest.map_or(now_minute, |m| now_minute.max(m.saturating_add(1)))
    };
    let rolled = Rolled {
        start,
        cursor: None,
    };
    meta.insert(ROLLED, rolled.encode().as_slice())
        .map_err(db_err)?;
    Ok(())
}

/// Rolls up minute buckets of spans that ended before `now_minute`, in `txn`: chunks until
/// [`STEP_ROWS`] buckets are read.
pub(super) fn step(txn: &WriteTransaction, now_minute: i64) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META).map_err(db_err)?;
    let was = Rolled::load(&meta)?;
    let mut at = was.clone();
    let blocks = txn.open_table(minutes::BLOCKS).map_err(db_err)?;
    let mut hours = KEY_HOURS.open(txn)?;
    let mut days = KEY_DAYS.open(txn)?;
    let this_hour = now_minute.div_euclid(60).saturating_mul(60);
    let mut read = 0;
    loop {
        if at.cursor.is_none() {
            // Minutes without buckets need no rolling: skip to the next that has one (but not
            // into the hour under way, which is not over).
            let next = minutes::first_from(&blocks, at.start)?;
            at.start = at.start.max(next.unwrap_or(this_hour).min(this_hour));
        }
        let end = at.span_end();
        // Not over yet; or, at the end of time, nothing after it (the last span's end saturates).
        if end > now_minute || end <= at.start {
            break;
        }
        let (sums, rows) = sum_chunk(&blocks, &at)?;
        let (hour, day) = (
            Granularity::Hour.of_minute(at.start),
            Granularity::Day.of_minute(at.start),
        );
        for (owner, sum) in &sums {
            hours.add(hour, owner, &sum.counts, sum.last_used_ms)?;
            days.add(day, owner, &sum.counts, sum.last_used_ms)?;
        }
        read += rows;
        at = match sums.last_key_value() {
            // Full: keys after the last one may be left.
            Some((last, _)) if sums.len() >= CHUNK_KEYS => Rolled {
                start: at.start,
                cursor: Some(last.clone()),
            },
            _ => Rolled {
                start: end,
                cursor: None,
            },
        };
        if read >= STEP_ROWS {
            break;
        }
    }
    if at != was {
        meta.insert(ROLLED, at.encode().as_slice())
            .map_err(db_err)?;
    }
    Ok(())
}

/// The sums of the first [`CHUNK_KEYS`] keys after the cursor over `at`'s span, and how many
/// minute buckets were read for them.
fn sum_chunk(
    blocks: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
    at: &Rolled,
) -> Result<(BTreeMap<Vec<u8>, Bucket>, usize), StoreError> {
    let mut sums: BTreeMap<Vec<u8>, Bucket> = BTreeMap::new();
    let mut rows = 0;
    for minute in at.start..at.span_end() {
        minutes::each_after(blocks, minute, at.cursor.as_deref(), |owner, bucket| {
            // Full: only keys up to the last kept one count (the rest are the next chunk's).
            if sums.len() >= CHUNK_KEYS
                && sums
                    .last_key_value()
                    .is_some_and(|(last, _)| owner > last.as_slice())
            {
                return ControlFlow::Break(());
            }
            rows += 1;
            match sums.get_mut(owner) {
                Some(sum) => sum.merge(bucket),
                None => {
                    sums.insert(owner.to_vec(), *bucket);
                    if sums.len() > CHUNK_KEYS {
                        sums.pop_last();
                    }
                }
            }
            ControlFlow::Continue(())
        })?;
    }
    Ok((sums, rows))
}

/// Adds `key_id`'s minute buckets not yet rolled up into `stored`, its buckets of `g` (hours or
/// days) in `[from, to)`.
pub(super) fn add_unrolled(
    txn: &ReadTransaction,
    key_id: &str,
    g: Granularity,
    from: i64,
    to: i64,
    stored: Vec<(i64, UsageCounts)>,
) -> Result<Vec<(i64, UsageCounts)>, StoreError> {
    let rolled = Rolled::load(&txn.open_table(META).map_err(db_err)?)?;
    let per = g.seconds() / 60;
    let from_minute = from.saturating_mul(per).max(rolled.start);
    let to_minute = to.saturating_mul(per);
    if from_minute >= to_minute {
        return Ok(stored);
    }
    let minutes = buckets::key_buckets(txn, key_id, Granularity::Minute, from_minute, to_minute)?;
    let unrolled = minutes
        .iter()
        .filter(|(minute, _)| !rolled.covers(key_id.as_bytes(), *minute))
        .map(|(minute, counts)| (g.of_minute(*minute), counts));
    Ok(buckets::merge_sorted(stored, unrolled, from, to))
}

#[cfg(test)]
mod tests;
