use std::collections::{BTreeMap, BTreeSet};

use super::super::EmbeddedStore;
use super::*;
use crate::store::{BatchId, Granularity, Usage};

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

fn index_rows(db: &redb::Database) -> Vec<(Vec<u8>, i64)> {
    let txn = db.begin_read().unwrap();
    let index = txn.open_table(BY_HOUR_KEY).unwrap();
    index
        .iter()
        .unwrap()
        .map(|row| {
            let (key, _) = row.unwrap();
            let (hour, owner) = key.value();
            (owner.to_vec(), hour)
        })
        .collect()
}

fn hours_of(rows: Vec<(Vec<u8>, i64)>) -> Vec<i64> {
    rows.into_iter().map(|(_, hour)| hour).collect()
}

#[tokio::test]
async fn minute_buckets_are_indexed_by_hour_and_pruned_with_their_rows() {
    let dir = tempfile::TempDir::new().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("u.redb")).unwrap();
    store.unfolded.lock().fold_at = 0;
    let batch: Vec<UsageDelta> = [5, 7, 59, 61, 119, 120, 200].map(at).into();
    store.add_usage(BatchId::first(), &batch).await.unwrap();
    // One row per hour with traffic, however many minutes it holds.
    assert_eq!(hours_of(index_rows(&store.db)), vec![0, 1, 2, 3]);
    assert_eq!(
        minutes(&store, 0, i64::MAX).await,
        vec![5, 7, 59, 61, 119, 120, 200]
    );
    assert_eq!(minutes(&store, 6, 120).await, vec![7, 59, 61, 119]);
    assert_eq!(minutes(&store, 62, 119).await, Vec::<i64>::new());
    let prune = |before| store.prune_usage(Granularity::Minute, before);
    assert_eq!(prune(60).await.unwrap(), 3);
    assert_eq!(hours_of(index_rows(&store.db)), vec![1, 2, 3]);
    // Part of an hour pruned: its row stays for the minutes left.
    assert_eq!(prune(100).await.unwrap(), 1);
    assert_eq!(hours_of(index_rows(&store.db)), vec![1, 2, 3]);
    assert_eq!(minutes(&store, 0, i64::MAX).await, vec![119, 120, 200]);
    // The rest of it, and the hour after, whose later minutes have no traffic.
    assert_eq!(prune(121).await.unwrap(), 2);
    assert_eq!(hours_of(index_rows(&store.db)), vec![3]);
    let key = ["key_a".to_owned()];
    let newest = || store.last_used(&key);
    assert_eq!(newest().await.unwrap(), vec![Some(200 * 60_000 + 7)]);
    assert_eq!(prune(201).await.unwrap(), 1);
    assert!(index_rows(&store.db).is_empty());
    assert_eq!(newest().await.unwrap(), vec![Some(200 * 60_000 + 7)]);
}

/// Every block as stored: (minute, row's first key, the block's keys and buckets).
type Blocks = Vec<(i64, Vec<u8>, Vec<(Vec<u8>, Bucket)>)>;

fn blocks(db: &redb::Database) -> Blocks {
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(BLOCKS).unwrap();
    table
        .iter()
        .unwrap()
        .map(|row| {
            let (key, value) = row.unwrap();
            let (minute, first) = key.value();
            let entries = Entries(value.value())
                .map(|e| e.map(|(o, b)| (o.to_vec(), b)).unwrap())
                .collect();
            (minute, first.to_vec(), entries)
        })
        .collect()
}

fn write(db: &redb::Database, deltas: &[UsageDelta]) {
    let txn = db.begin_write().unwrap();
    create_tables(&txn).unwrap();
    Open::new(&txn).unwrap().add_sorted(deltas).unwrap();
    txn.commit().unwrap();
}

type Model = BTreeMap<(i64, Vec<u8>), (u64, u64, i64)>;

/// What the deltas sum to, per (minute, key): requests, success, the latest last use.
fn model(deltas: &[UsageDelta]) -> Model {
    let mut model = Model::new();
    for d in deltas {
        let sum = model
            .entry((d.minute, d.key_id.as_bytes().to_vec()))
            .or_insert((0, 0, 0));
        sum.0 += d.counts.requests;
        sum.1 += d.counts.success;
        sum.2 = sum.2.max(d.last_used_ms);
    }
    model
}

/// The blocks hold exactly `model`, each row keyed by its first bucket's key, its keys sorted
/// and below the next row's, none over [`MOST`]; and the index has a row for each key's hour
/// with buckets, and no other.
fn check(db: &redb::Database, model: &Model) {
    let blocks = blocks(db);
    let mut stored = Model::new();
    for (i, (minute, first, entries)) in blocks.iter().enumerate() {
        assert!(
            !entries.is_empty() && entries.len() <= MOST,
            "{}",
            entries.len()
        );
        assert_eq!(&entries[0].0, first);
        assert!(entries.windows(2).all(|w| w[0].0 < w[1].0));
        if let Some((next_minute, next_first, _)) = blocks.get(i + 1) {
            if next_minute == minute {
                assert!(entries.last().unwrap().0 < *next_first);
            }
        }
        for (owner, b) in entries {
            let sum = (b.counts.requests, b.counts.success, b.last_used_ms);
            assert!(stored.insert((*minute, owner.clone()), sum).is_none());
        }
    }
    assert_eq!(&stored, model);
    let hours: BTreeSet<(Vec<u8>, i64)> = model
        .keys()
        .map(|(minute, owner)| (owner.clone(), minute.div_euclid(60)))
        .collect();
    let index: BTreeSet<(Vec<u8>, i64)> = index_rows(db).into_iter().collect();
    assert_eq!(index, hours);
}

fn id(n: usize) -> std::sync::Arc<str> {
    format!("key_{n:06}").into()
}

fn delta(n: usize, minute: i64, requests: u64) -> UsageDelta {
    UsageDelta {
        key_id: id(n),
        account_id: "acc_a".into(),
        minute,
        counts: UsageCounts {
            requests,
            success: requests,
            ..UsageCounts::default()
        },
        last_used_ms: minute * 60_000 + i64::try_from(n % 60_000).unwrap(),
    }
}

fn sorted(mut deltas: Vec<UsageDelta>) -> Vec<UsageDelta> {
    deltas.sort_by(|a, b| (a.minute, &a.key_id).cmp(&(b.minute, &b.key_id)));
    deltas
}

/// Folds into blocks sum exactly, whatever falls where: keys new to a minute below its first
/// block, between blocks and inside them, blocks grown past [`MOST`] and split, a key twice in
/// a batch within a chunk and across a chunk's end, ids one a prefix of the next, new buckets
/// in an hour's first minute, after a minute with the key, after a gap, and in a minute
/// nothing was written in before.
#[test]
fn folds_into_blocks_sum_exactly_and_keep_blocks_sorted_and_bounded() {
    let hour_start = 29_000_000 * 60;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut coin = |one_in: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed.is_multiple_of(one_in)
    };
    let dir = tempfile::TempDir::new().unwrap();
    let db = redb::Database::create(dir.path().join("m.redb")).unwrap();
    let mut all = Vec::new();
    let mut fold = |deltas: Vec<UsageDelta>| {
        let deltas = sorted(deltas);
        write(&db, &deltas);
        all.extend(deltas);
        check(&db, &model(&all));
    };
    // Minutes hour_start - 2 ..= hour_start + 1: a random half of 12,000 keys, every key in
    // hour_start + 1.
    let mut history = Vec::new();
    for minute in hour_start - 2..=hour_start + 1 {
        for n in 0..12_000 {
            if minute == hour_start + 1 || coin(2) {
                history.push(delta(n, minute, 1));
            }
        }
    }
    fold(history);
    // The upper half of hour_start + 2's keys, then the lower half (all below its first
    // block), then every third key (into blocks, which grow past MOST and split).
    fold(
        (6_000..12_000)
            .map(|n| delta(n, hour_start + 2, 1))
            .collect(),
    );
    fold(
        (0..6_000)
            .step_by(2)
            .map(|n| delta(n, hour_start + 2, 2))
            .collect(),
    );
    fold(
        (0..12_000)
            .step_by(3)
            .map(|n| delta(n, hour_start + 2, 3))
            .collect(),
    );
    fold(
        (1..6_000)
            .step_by(2)
            .map(|n| delta(n, hour_start + 2, 4))
            .collect(),
    );
    // A key after each of the lower half's: their blocks (about 32 keys each now) pass MOST
    // and are split, where nothing else would add a block to the minute.
    let of_minute = |db: &redb::Database, m: i64| blocks(db).iter().filter(|b| b.0 == m).count();
    let was = of_minute(&db, hour_start + 2);
    fold(
        (0..6_000)
            .map(|n| UsageDelta {
                key_id: format!("key_{n:06}x").into(),
                ..delta(n, hour_start + 2, 1)
            })
            .collect(),
    );
    assert!(of_minute(&db, hour_start + 2) > was);
    // Sparse keys in earlier minutes; a key twice where a chunk ends; a gap; prefixes.
    let mut batch = Vec::new();
    for minute in [hour_start - 1, hour_start] {
        batch.extend((0..12_000).step_by(100).map(|n| delta(n, minute, 2)));
    }
    batch.extend((0..4_096).map(|n| delta(n, hour_start + 3, 3)));
    batch.push(delta(4_095, hour_start + 3, 4));
    batch.extend((4_096..6_000).map(|n| delta(n, hour_start + 3, 3)));
    for n in 0..12_000 {
        if coin(10) {
            batch.push(delta(n, hour_start + 4, 5));
            if coin(3) {
                batch.push(delta(n, hour_start + 4, 6));
            }
        }
    }
    batch.extend((0..300).map(|n| delta(n * 7, hour_start - 5, 7)));
    for minute in [hour_start + 1, hour_start + 3] {
        for short in ["key_1", "key_10", "key_1x", "k"] {
            batch.push(UsageDelta {
                key_id: short.into(),
                ..delta(1, minute, 9)
            });
        }
    }
    let batch = sorted(batch);
    let ids: Vec<&str> = batch
        .iter()
        .filter(|d| d.minute == hour_start + 3)
        .map(|d| &*d.key_id)
        .collect();
    // "k" sorts first, so the chunk's end falls one later than key 4095's first delta.
    assert_eq!(ids[CHUNK - 1..=CHUNK], ["key_004094", "key_004095"]);
    assert_eq!(ids[CHUNK + 1], "key_004095");
    fold(batch);
    // Key 4095 in hour_start + 3: 3 + 4 requests, summed across the chunk's end.
    let txn = db.begin_read().unwrap();
    let table = txn.open_table(BLOCKS).unwrap();
    let found = find(&table, hour_start + 3, b"key_004095").unwrap();
    assert_eq!(found.map(|b| b.counts.requests), Some(7));
    // Keys absent: below the first block, between two, past the last, in an empty minute.
    for (minute, owner) in [
        (hour_start + 2, &b"a"[..]),
        (hour_start + 2, b"key_0000000"),
        (hour_start + 2, b"zz"),
        (hour_start + 10, b"key_000001"),
    ] {
        assert!(find(&table, minute, owner).unwrap().is_none());
    }
}

/// A block that does not decode is a typed error on every path that reads it, not a panic.
#[tokio::test]
async fn a_block_that_does_not_decode_is_corrupt() {
    let dir = tempfile::TempDir::new().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("c.redb")).unwrap();
    store.unfolded.lock().fold_at = 0;
    store.add_usage(BatchId::first(), &[at(5)]).await.unwrap();
    for garbage in [
        &[1u8][..],
        &[3, 0, b'k', b'e', b'y', 1, 2, 3],
        &[0xff, 0xff],
    ] {
        let txn = store.db.begin_write().unwrap();
        txn.open_table(BLOCKS)
            .unwrap()
            .insert((5, &b"key_a"[..]), garbage)
            .unwrap();
        txn.commit().unwrap();
        let read = store.key_usage("key_a", Granularity::Minute, 0, 60).await;
        assert!(matches!(read, Err(StoreError::Corrupt(_))), "{read:?}");
        let add = store.add_usage(BatchId::first().next(), &[at(5)]).await;
        assert!(matches!(add, Err(StoreError::Corrupt(_))), "{add:?}");
        let prune = store.prune_usage(Granularity::Minute, 60).await;
        assert!(matches!(prune, Err(StoreError::Corrupt(_))), "{prune:?}");
    }
}

/// A file from before blocks (one row a bucket, the index key-major) is converted when it is
/// opened: every bucket reads back as it was, the index is time-major, and the old tables are
/// gone.
#[tokio::test]
async fn a_file_of_one_row_a_bucket_is_packed_at_open() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("old.redb");
    let history = sorted(
        (0..100usize)
            .flat_map(|n| {
                let early = i64::try_from(n * 13 % 57).unwrap();
                [early, 61, 62].map(|minute| delta(n, minute, 1 + n as u64))
            })
            .collect(),
    );
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut rows = txn.open_table(ROWS).unwrap();
            let mut index = txn.open_table(BY_KEY_HOUR).unwrap();
            for d in &history {
                let bucket = Bucket {
                    counts: d.counts,
                    last_used_ms: d.last_used_ms,
                };
                let owner = d.key_id.as_bytes();
                rows.insert((d.minute, owner), &buckets::encode(&bucket)[..])
                    .unwrap();
                index.insert((owner, d.minute.div_euclid(60)), ()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let store = EmbeddedStore::open(&path).unwrap();
    check(&store.db, &model(&history));
    let txn = store.db.begin_read().unwrap();
    let names: Vec<String> = txn
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_owned())
        .collect();
    for old in [ROWS.name(), BY_KEY_HOUR.name()] {
        assert!(!names.iter().any(|n| n == old), "{names:?}");
    }
    drop(txn);
    let read = store
        .key_usage("key_000007", Granularity::Minute, 0, 120)
        .await
        .unwrap();
    let got: Vec<(i64, u64)> = read.iter().map(|(m, c)| (*m, c.requests)).collect();
    assert_eq!(got, vec![(34, 8), (61, 8), (62, 8)]);
    // Minutes 61 and 62 hold 100 buckets each: packed [`FILL`] a block.
    let per_minute = |m: i64| blocks(&store.db).iter().filter(|b| b.0 == m).count();
    assert_eq!(per_minute(61), 100usize.div_ceil(FILL));
    // Opened again, nothing is left to pack.
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();
    check(&store.db, &model(&history));
}

/// A file from before blocks with a row that does not decode is refused at open with a typed
/// error, and left as it was: the packing is one transaction, so no block is written and no
/// old row is lost.
#[test]
fn a_corrupt_row_of_the_old_layout_refuses_the_open_and_loses_nothing() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("old.redb");
    let good = buckets::encode(&Bucket {
        counts: delta(1, 3, 1).counts,
        last_used_ms: 0,
    });
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut rows = txn.open_table(ROWS).unwrap();
            rows.insert((3, &b"key_a"[..]), &good[..]).unwrap();
            rows.insert((3, &b"key_b"[..]), &[7u8, 7, 7][..]).unwrap();
            rows.insert((4, &b"key_a"[..]), &good[..]).unwrap();
        }
        txn.commit().unwrap();
    }
    let opened = EmbeddedStore::open(&path);
    assert!(
        matches!(opened, Err(StoreError::Corrupt(_))),
        "{:?}",
        opened.as_ref().err()
    );
    drop(opened);
    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let rows: Vec<(i64, Vec<u8>)> = txn
        .open_table(ROWS)
        .unwrap()
        .iter()
        .unwrap()
        .map(|row| {
            let (key, _) = row.unwrap();
            let (minute, owner) = key.value();
            (minute, owner.to_vec())
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (3, b"key_a".to_vec()),
            (3, b"key_b".to_vec()),
            (4, b"key_a".to_vec())
        ]
    );
    let names: Vec<String> = txn
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_owned())
        .collect();
    assert!(!names.iter().any(|n| n == BLOCKS.name()), "{names:?}");
}
