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
        last_used_ms: minute.saturating_mul(60_000),
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
    // Late counts in the half-rolled hour: into the hour at once up to the cursor, by the rollup
    // after it.
    let late = [delta("key_00000", m + 3, 10), delta("key_04999", m + 3, 10)];
    add(&store, &mut id, &late).await;
    assert_eq!(hour_rows(&store), 4_096);
    for key in ["key_00000", "key_04999"] {
        let hours = requests(&store, key, Granularity::Hour, h, h + 1).await;
        assert_eq!(hours, vec![(h, 15)], "{key}");
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
    for (key, n) in [("key_00000", 15), ("key_04096", 5), ("key_04999", 15)] {
        let hours = requests(&store, key, Granularity::Hour, h - 1, h + 1).await;
        assert_eq!(hours, vec![(h, n)], "{key}");
    }
    let hours = requests(&store, "key_x", Granularity::Hour, h, h + 2).await;
    assert_eq!(hours, vec![(h + 1, 2)]);
}

#[tokio::test]
async fn a_chunk_keeps_the_smallest_keys_when_later_minutes_bring_smaller_ones() {
    let (_dir, _, store) = fresh();
    let (mut id, m) = (BatchId::first(), ahead());
    let h = m / 60;
    // Ten minutes of keys 1000–3999 (a chunk reads 2,048 of each: the step's budget), then a
    // minute of keys 0–999, which push the largest out of the chunk.
    let key = |i: usize| format!("key_{i:05}");
    let mut batch: Vec<UsageDelta> = (0..10)
        .flat_map(|minute| (1_000..4_000).map(move |i| delta(&key(i), m + minute, 1)))
        .collect();
    batch.extend((0..1_000).map(|i| delta(&key(i), m + 10, 1)));
    add(&store, &mut id, &batch).await;
    add(&store, &mut id, &[delta("key_x", m + 60, 1)]).await;
    let at = progress(&store);
    assert_eq!(
        (at.start, at.cursor.as_deref()),
        (m, Some(&b"key_02047"[..]))
    );
    assert_eq!(hour_rows(&store), 2_048);
    for (i, n) in [
        (0, 1),
        (999, 1),
        (1_000, 10),
        (2_047, 10),
        (2_048, 10),
        (3_999, 10),
    ] {
        let hours = requests(&store, &key(i), Granularity::Hour, h, h + 1).await;
        assert_eq!(hours, vec![(h, n)], "{}", key(i));
    }
}

#[tokio::test]
async fn counts_still_in_the_journal_when_their_hour_is_rolled_land_in_it_once() {
    let (_dir, _, store) = fresh();
    {
        // Journaled, never folded by a flush.
        let mut unfolded = store.unfolded.lock();
        unfolded.fold_at = usize::MAX;
        unfolded.fold_every = std::time::Duration::MAX;
    }
    let (mut id, m) = (BatchId::first(), ahead());
    let (h, d) = (m / 60, m / 1_440);
    add(&store, &mut id, &[delta("key_a", m + 1, 1)]).await;
    add(&store, &mut id, &[delta("key_a", m + 60, 2)]).await;
    // The hour is over and its minute is in no table: the rollup passes it.
    assert_eq!(progress(&store).start, m + 60);
    let hours = || requests(&store, "key_a", Granularity::Hour, h, h + 2);
    assert_eq!(hours().await, vec![(h, 1), (h + 1, 2)]);
    // Folded (pruning folds first): the passed minute goes into its hour and day at once.
    store
        .prune_usage(Granularity::Minute, i64::MIN)
        .await
        .unwrap();
    assert!(store.unfolded.lock().is_empty());
    assert_eq!(hour_rows(&store), 1);
    assert_eq!(hours().await, vec![(h, 1), (h + 1, 2)]);
    let days = requests(&store, "key_a", Granularity::Day, d, d + 1).await;
    assert_eq!(days, vec![(d, 3)]);
}

#[tokio::test]
async fn the_ends_of_time_stop_the_step() {
    let (_dir, _, store) = fresh();
    let mut id = BatchId::first();
    let ends = [delta("key_a", i64::MIN, 1), delta("key_a", i64::MAX, 2)];
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        store.add_usage(id, &ends),
    )
    .await
    .expect("the step ends")
    .unwrap();
    id = id.next();
    let minutes = requests(&store, "key_a", Granularity::Minute, i64::MIN, i64::MAX).await;
    assert_eq!(minutes, vec![(i64::MIN, 1)]);
    add(&store, &mut id, &[delta("key_a", 0, 4)]).await;
    let hours = requests(&store, "key_a", Granularity::Hour, i64::MIN, 1).await;
    assert_eq!(
        hours,
        vec![(Granularity::Hour.of_minute(i64::MIN), 1), (0, 4)]
    );
}

/// `store` with `batch` written as before rollups (every delta into all three buckets, no
/// progress row), closed and opened again.
async fn written_before_rollups(
    store: EmbeddedStore,
    path: &std::path::Path,
    id: &mut BatchId,
    batch: &[UsageDelta],
) -> EmbeddedStore {
    let set = |rolled: Option<Rolled>| {
        let txn = store.db.begin_write().unwrap();
        let mut meta = txn.open_table(META).unwrap();
        match rolled {
            Some(rolled) => meta.insert(ROLLED, rolled.encode().as_slice()).map(drop),
            None => meta.remove(ROLLED).map(drop),
        }
        .unwrap();
        drop(meta);
        txn.commit().unwrap();
    };
    set(Some(Rolled {
        start: i64::MAX,
        cursor: None,
    }));
    add(&store, id, batch).await;
    assert_eq!(hour_rows(&store), 1);
    set(None);
    drop(store);
    open(path)
}

#[tokio::test]
async fn a_file_from_before_rollups_with_past_minutes_starts_at_the_clock() {
    let (_dir, path, store) = fresh();
    let mut id = BatchId::first();
    let batch = [delta("key_a", 1_000, 1), delta("key_a", 1_001, 2)];
    let before = usage::now_minute();
    let store = written_before_rollups(store, &path, &mut id, &batch).await;
    let start = progress(&store).start;
    assert!((before..=usage::now_minute()).contains(&start));
    let hours = requests(&store, "key_a", Granularity::Hour, 0, 100).await;
    assert_eq!(hours, vec![(16, 3)]);
    add(&store, &mut id, &[delta("key_a", 1_002, 4)]).await;
    let days = requests(&store, "key_a", Granularity::Day, 0, 1).await;
    assert_eq!(days, vec![(0, 7)]);
}

#[tokio::test]
async fn a_file_from_before_rollups_counts_its_hours_once() {
    let (_dir, path, store) = fresh();
    let (mut id, m) = (BatchId::first(), ahead());
    let h = m / 60;
    let batch = [delta("key_a", m + 3, 1), delta("key_a", m + 9, 2)];
    let store = written_before_rollups(store, &path, &mut id, &batch).await;
    // Opened by this version: what the file holds counts as rolled, up to its newest minute
    // (here ahead of the clock).
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
    assert!(fresh.span_end() > i64::MIN && fresh.span_end() <= i64::MIN + 60);
    let last = Rolled {
        start: i64::MAX - 5,
        cursor: None,
    };
    assert_eq!(last.span_end(), i64::MAX);
}
