//! Keys' hour and day buckets rolled up from their minute buckets once an hour is over.
//!
//! A fold ([`super::journal`]) adds each (key, minute) delta into its minute bucket only. Once
//! an hour has ended, [`step`] reads that hour's minute buckets (time-major: one contiguous range
//! per minute), sums them per key, and adds each key's sum into its hour and day buckets. A key
//! used in every minute costs its hour and day buckets one update an hour instead of sixty, and
//! a fold rewrites the current pages of one table instead of three. The sums are taken in chunks
//! of at most [`CHUNK_KEYS`] keys and [`STEP_ROWS`] rows per step, a step with each usage write,
//! so that neither a write's time nor its memory grows with the number of keys; the progress
//! ([`Rolled`]) is a `meta` row written in the same transaction as the sums.
//!
//! Every count is in its hour and day bucket exactly once, whatever the progress: a delta for a
//! minute already rolled (counts that arrive late, a replayed log) goes into all three buckets
//! at once, as every delta did before rollups; reads of hours and days add the minute buckets
//! not yet rolled ([`add_unrolled`]); minute buckets are pruned only once rolled.
//! Account day buckets are not rolled up: a fold adds one sum per account and day, which is
//! already few writes.

use std::collections::BTreeMap;
use std::ops::Bound;

use redb::{ReadTransaction, ReadableTable, WriteTransaction};

use super::buckets::{self, Bucket, KEY_DAYS, KEY_HOURS, KEY_MINUTES};
use super::{db_err, META};
use crate::store::{Granularity, StoreError, UsageCounts};

/// The `meta` row that holds [`Rolled`].
const ROLLED: &str = "usage_rolled";
/// At most this many keys' sums in memory, and written, per chunk.
const CHUNK_KEYS: usize = 2_048;
/// A step takes further chunks until it has read this many minute buckets.
const STEP_ROWS: usize = 20_000;

const NO_OWNER: &[u8] = &[];

/// How far the minute buckets are rolled into hours and days: every minute before `start`, and
/// in `start`'s span (from `start` to the end of its hour) the keys up to `cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rolled {
    start: i64,
    cursor: Option<Vec<u8>>,
}

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
    let minutes = txn.open_table(KEY_MINUTES.by_time).map_err(db_err)?;
    let hours = txn.open_table(KEY_HOURS.by_time).map_err(db_err)?;
    let newest = minutes
        .last()
        .map_err(db_err)?
        .map(|(key, _)| key.value().0);
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

/// Rolls up minute buckets of spans that ended before `now_minute`, at most [`STEP_ROWS`] of
/// them (give or take a chunk), in `txn`.
pub(super) fn step(txn: &WriteTransaction, now_minute: i64) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META).map_err(db_err)?;
    let was = Rolled::load(&meta)?;
    let mut at = was.clone();
    let minutes = txn.open_table(KEY_MINUTES.by_time).map_err(db_err)?;
    let mut hours = KEY_HOURS.open(txn)?;
    let mut days = KEY_DAYS.open(txn)?;
    let this_hour = now_minute.div_euclid(60).saturating_mul(60);
    let mut read = 0;
    loop {
        if at.cursor.is_none() {
            // Minutes without buckets need no rolling: skip to the next that has one (but not
            // into the hour under way, which is not over).
            let next = match minutes
                .range((at.start, NO_OWNER)..)
                .map_err(db_err)?
                .next()
            {
                Some(item) => Some(item.map_err(db_err)?.0.value().0),
                None => None,
            };
            at.start = at.start.max(next.unwrap_or(this_hour).min(this_hour));
        }
        let end = at.span_end();
        if end > now_minute {
            break;
        }
        let (sums, rows) = sum_chunk(&minutes, &at)?;
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
    minutes: &impl ReadableTable<(i64, &'static [u8]), &'static [u8]>,
    at: &Rolled,
) -> Result<(BTreeMap<Vec<u8>, Bucket>, usize), StoreError> {
    let mut sums: BTreeMap<Vec<u8>, Bucket> = BTreeMap::new();
    let mut rows = 0;
    for minute in at.start..at.span_end() {
        let from = match at.cursor.as_deref() {
            Some(last) => Bound::Excluded((minute, last)),
            None => Bound::Included((minute, NO_OWNER)),
        };
        let to = Bound::Excluded((minute.saturating_add(1), NO_OWNER));
        for item in minutes.range((from, to)).map_err(db_err)? {
            let (key, value) = item.map_err(db_err)?;
            let owner = key.value().1;
            // Full: only keys up to the last kept one count (the rest are the next chunk's).
            if sums.len() >= CHUNK_KEYS
                && sums
                    .last_key_value()
                    .is_some_and(|(last, _)| owner > last.as_slice())
            {
                break;
            }
            rows += 1;
            let bucket = buckets::decode(value.value())?;
            match sums.get_mut(owner) {
                Some(sum) => sum.merge(&bucket),
                None => {
                    sums.insert(owner.to_vec(), bucket);
                    if sums.len() > CHUNK_KEYS {
                        sums.pop_last();
                    }
                }
            }
        }
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
mod tests {
    use super::super::{usage, EmbeddedStore};
    use super::*;
    use crate::store::{BatchId, Usage, UsageDelta};

    /// The first minute of a day a week ahead: the wall clock ends none of its hours during a
    /// test, so only the minutes counted do.
    fn ahead() -> i64 {
        (usage::now_minute().div_euclid(1_440) + 7) * 1_440
    }

    fn delta(key: &str, minute: i64, requests: u64) -> UsageDelta {
        UsageDelta {
            key_id: key.into(),
            account_id: "acc_r".into(),
            minute,
            counts: UsageCounts {
                requests,
                ..UsageCounts::default()
            },
            last_used_ms: minute * 60_000,
        }
    }

    /// A store whose every batch is folded at once, so that minutes are in their table.
    fn open(path: &std::path::Path) -> EmbeddedStore {
        let store = EmbeddedStore::open(path).unwrap();
        store.unfolded.lock().fold_at = 0;
        store
    }

    /// A new store in a temporary directory (gone with the returned guard).
    fn fresh() -> (tempfile::TempDir, std::path::PathBuf, EmbeddedStore) {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("r.redb");
        let store = open(&path);
        (dir, path, store)
    }

    async fn add(store: &EmbeddedStore, id: &mut BatchId, batch: &[UsageDelta]) {
        store.add_usage(*id, batch).await.unwrap();
        *id = id.next();
    }

    async fn requests(
        store: &EmbeddedStore,
        key: &str,
        g: Granularity,
        from: i64,
        to: i64,
    ) -> Vec<(i64, u64)> {
        let buckets = store.key_usage(key, g, from, to).await.unwrap();
        buckets.into_iter().map(|(i, c)| (i, c.requests)).collect()
    }

    fn progress(store: &EmbeddedStore) -> Rolled {
        let txn = store.db.begin_read().unwrap();
        Rolled::load(&txn.open_table(META).unwrap()).unwrap()
    }

    fn hour_rows(store: &EmbeddedStore) -> u64 {
        use redb::ReadableTableMetadata;
        let txn = store.db.begin_read().unwrap();
        txn.open_table(KEY_HOURS.by_time).unwrap().len().unwrap()
    }

    #[tokio::test]
    async fn hours_and_days_read_the_same_before_and_after_the_rollup_and_late_counts_land_once() {
        let (_dir, path, store) = fresh();
        let (mut id, m) = (BatchId::first(), ahead());
        let (h, d) = (m / 60, m / 1_440);
        let hours = |key| requests(&store, key, Granularity::Hour, h, h + 2);
        let days = |key| requests(&store, key, Granularity::Day, d - 1, d + 1);
        let minute_batch = [
            delta("key_a", m + 1, 1),
            delta("key_a", m + 2, 2),
            delta("key_b", m + 30, 8),
            delta("key_a", m + 59, 4),
        ];
        add(&store, &mut id, &minute_batch).await;
        // The hour is not over: its minutes are in no hour bucket yet, and reads add them.
        assert!(progress(&store).start <= m);
        assert_eq!(hour_rows(&store), 0);
        assert_eq!(hours("key_a").await, vec![(h, 7)]);
        assert_eq!(days("key_a").await, vec![(d, 7)]);
        assert_eq!(hours("key_b").await, vec![(h, 8)]);
        // A minute of the next hour ends it: rolled up in the same write.
        add(&store, &mut id, &[delta("key_a", m + 60, 16)]).await;
        assert_eq!(
            progress(&store),
            Rolled {
                start: m + 60,
                cursor: None
            }
        );
        assert_eq!(hour_rows(&store), 2);
        assert_eq!(hours("key_a").await, vec![(h, 7), (h + 1, 16)]);
        assert_eq!(days("key_a").await, vec![(d, 23)]);
        assert_eq!(hours("key_b").await, vec![(h, 8)]);
        // Counts that arrive for a rolled minute go into its hour and day at once.
        add(&store, &mut id, &[delta("key_b", m + 5, 32)]).await;
        assert_eq!(hours("key_b").await, vec![(h, 40)]);
        assert_eq!(days("key_b").await, vec![(d, 40)]);
        let minutes = requests(&store, "key_b", Granularity::Minute, m, m + 60).await;
        assert_eq!(minutes, vec![(m + 5, 32), (m + 30, 8)]);
        // The progress is in the file.
        drop(store);
        let store = open(&path);
        assert_eq!(progress(&store).start, m + 60);
        let hours = requests(&store, "key_a", Granularity::Hour, h, h + 2).await;
        assert_eq!(hours, vec![(h, 7), (h + 1, 16)]);
        let days = requests(&store, "key_b", Granularity::Day, d, d + 1).await;
        assert_eq!(days, vec![(d, 40)]);
    }

    #[tokio::test]
    async fn an_hour_of_many_keys_rolls_up_in_bounded_steps_and_reads_stay_exact_between_them() {
        let (_dir, path, store) = fresh();
        let (mut id, m) = (BatchId::first(), ahead());
        let (h, d) = (m / 60, m / 1_440);
        let keys: Vec<String> = (0..5_000).map(|i| format!("key_{i:05}")).collect();
        // 25,000 minute buckets: two full chunks reach the step's row budget.
        let batch: Vec<UsageDelta> = keys
            .iter()
            .flat_map(|k| (0..5).map(move |i| delta(k, m + i * 7, 1)))
            .collect();
        add(&store, &mut id, &batch).await;
        add(&store, &mut id, &[delta("key_x", m + 60, 1)]).await;
        let at = progress(&store);
        assert_eq!(at.start, m);
        assert_eq!(at.cursor.as_deref(), Some(&b"key_04095"[..]));
        assert_eq!(hour_rows(&store), 4_096);
        for key in ["key_00000", "key_04095", "key_04096", "key_04999"] {
            let hours = requests(&store, key, Granularity::Hour, h - 1, h + 1).await;
            assert_eq!(hours, vec![(h, 5)], "{key}");
            let days = requests(&store, key, Granularity::Day, d, d + 1).await;
            assert_eq!(days, vec![(d, 5)], "{key}");
        }
        // The progress survives a restart, and the next write finishes the hour.
        drop(store);
        let store = open(&path);
        assert_eq!(progress(&store), at);
        add(&store, &mut id, &[delta("key_x", m + 61, 1)]).await;
        assert_eq!(
            progress(&store),
            Rolled {
                start: m + 60,
                cursor: None
            }
        );
        assert_eq!(hour_rows(&store), 5_000);
        for key in ["key_00000", "key_04096", "key_04999"] {
            let hours = requests(&store, key, Granularity::Hour, h - 1, h + 1).await;
            assert_eq!(hours, vec![(h, 5)], "{key}");
        }
        let hours = requests(&store, "key_x", Granularity::Hour, h, h + 2).await;
        assert_eq!(hours, vec![(h + 1, 2)]);
    }

    #[tokio::test]
    async fn a_file_from_before_rollups_counts_its_hours_once() {
        let (_dir, path, store) = fresh();
        let (mut id, m) = (BatchId::first(), ahead());
        let h = m / 60;
        // As before rollups: every delta into all three buckets, and no progress row.
        let everything = Rolled {
            start: i64::MAX,
            cursor: None,
        };
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(ROLLED, everything.encode().as_slice())
            .unwrap();
        txn.commit().unwrap();
        add(
            &store,
            &mut id,
            &[delta("key_a", m + 3, 1), delta("key_a", m + 9, 2)],
        )
        .await;
        assert_eq!(hour_rows(&store), 1);
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META).unwrap().remove(ROLLED).unwrap();
        txn.commit().unwrap();
        drop(store);
        // Opened by this version: what the file holds counts as rolled.
        let store = open(&path);
        assert_eq!(progress(&store).start, m + 10);
        let hours = requests(&store, "key_a", Granularity::Hour, h, h + 1).await;
        assert_eq!(hours, vec![(h, 3)]);
        add(
            &store,
            &mut id,
            &[delta("key_a", m + 9, 4), delta("key_a", m + 10, 8)],
        )
        .await;
        let hours = requests(&store, "key_a", Granularity::Hour, h, h + 1).await;
        assert_eq!(hours, vec![(h, 15)]);
        add(&store, &mut id, &[delta("key_a", m + 60, 16)]).await;
        let hours = requests(&store, "key_a", Granularity::Hour, h, h + 2).await;
        assert_eq!(hours, vec![(h, 15), (h + 1, 16)]);
        assert_eq!(hour_rows(&store), 1);
    }

    #[tokio::test]
    async fn minute_buckets_outlive_their_retention_until_rolled_up() {
        let (_dir, _, store) = fresh();
        let (mut id, m) = (BatchId::first(), ahead());
        let h = m / 60;
        add(
            &store,
            &mut id,
            &[delta("key_a", m + 1, 1), delta("key_a", m + 2, 2)],
        )
        .await;
        let prune = || store.prune_usage(Granularity::Minute, m + 100);
        assert_eq!(prune().await.unwrap(), 0);
        let hours = requests(&store, "key_a", Granularity::Hour, h, h + 1).await;
        assert_eq!(hours, vec![(h, 3)]);
        add(&store, &mut id, &[delta("key_a", m + 61, 4)]).await;
        // Rolled now: the hour's minutes go, the next hour's (not rolled) stay.
        assert_eq!(prune().await.unwrap(), 2);
        let minutes = requests(&store, "key_a", Granularity::Minute, m, m + 120).await;
        assert_eq!(minutes, vec![(m + 61, 4)]);
        let hours = requests(&store, "key_a", Granularity::Hour, h, h + 2).await;
        assert_eq!(hours, vec![(h, 3), (h + 1, 4)]);
    }

    #[test]
    fn progress_reads_back_and_bad_rows_are_corrupt() {
        for rolled in [
            Rolled {
                start: i64::MIN,
                cursor: None,
            },
            Rolled {
                start: 29_000_017,
                cursor: Some(b"key_\xff".to_vec()),
            },
            Rolled {
                start: -5,
                cursor: Some(Vec::new()),
            },
        ] {
            assert_eq!(Rolled::decode(&rolled.encode()).unwrap(), rolled);
        }
        for bad in [&[][..], &[1, 2, 3], &[0, 0, 0, 0, 0, 0, 0, 0, 2, b'k']] {
            assert!(matches!(Rolled::decode(bad), Err(StoreError::Corrupt(_))));
        }
    }

    #[test]
    fn a_span_is_covered_before_its_start_and_up_to_its_cursor() {
        let rolled = Rolled {
            start: 125,
            cursor: Some(b"key_m".to_vec()),
        };
        assert_eq!(rolled.span_end(), 180);
        assert!(rolled.covers(b"key_z", 124));
        assert!(rolled.covers(b"key_a", 125));
        assert!(rolled.covers(b"key_m", 179));
        assert!(!rolled.covers(b"key_n", 125));
        assert!(!rolled.covers(b"key_a", 180));
        let fresh = Rolled {
            start: i64::MIN,
            cursor: None,
        };
        assert!(!fresh.covers(b"key_a", i64::MIN));
        assert_eq!(
            fresh.span_end(),
            i64::MIN.div_euclid(60).saturating_add(1) * 60
        );
    }
}
