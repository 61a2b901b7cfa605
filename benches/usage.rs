//! Metering costs: the per-request count on a key's state, reading a busy key's buckets
//! back from the embedded store (90 day buckets; 2 880 minute buckets = 48 h), and flushes of
//! a second's traffic over many keys (20 000 deltas each into a store that holds 100 000 keys'
//! last ten minutes), with the journal's folds.
//!
//! The same per-request count in the durable mode (`meter/…_wal`: an event appended for the
//! write-ahead log, whose writer thread runs meanwhile).
//!
//! `cargo bench --bench usage`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::metering::wal::Wal;
use tollgate::metering::{Meter, Outcome, Pending, WallClock};
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::{BatchId, Granularity, Usage, UsageCounts, UsageDelta};

/// "Now" for the buckets written: the top of an hour a day ahead of the wall clock, so that, as
/// in a live gateway, only the minutes counted end an hour (and start its rollup into hour and
/// day buckets), not the clock.
fn now_minute() -> i64 {
    (chrono::Utc::now().timestamp() / 3_600 + 24) * 60
}

fn bench(c: &mut Criterion) {
    let now = now_minute();
    let meter = Meter::new(WallClock::System);
    let cell = meter.cell(&Arc::from("key_bench"), &Arc::from("acc_bench"));
    let clock = WallClock::System;
    c.bench_function("meter/record_one_request", |b| {
        b.iter(|| cell.record(clock.now_ms(), Outcome { status: 200 }))
    });
    let mut pending = Pending::default();
    meter.drain_into(&mut pending);

    // The durable mode: the same call appends an event for the log's writer thread, which
    // writes and fdatasyncs a group every 5 ms meanwhile (to a temporary directory).
    let wal_dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(wal_dir.path(), Duration::from_millis(5)).expect("wal");
    wal.start().expect("writer");
    let wal_meter = Meter::new(WallClock::System).with_wal(Arc::clone(&wal));
    let wal_cell = wal_meter.cell(&Arc::from("key_bench"), &Arc::from("acc_bench"));
    c.bench_function("meter/record_one_request_wal", |b| {
        b.iter(|| wal_cell.record(clock.now_ms(), Outcome { status: 200 }))
    });
    c.bench_function("meter/record_one_request_with_bytes_wal", |b| {
        b.iter(|| {
            let now = clock.now_ms();
            wal_cell.record(now, Outcome { status: 200 });
            wal_cell.record_bytes(now, 100, 1_000);
        })
    });
    c.bench_function("meter/record_one_request_with_bytes", |b| {
        b.iter(|| {
            let now = clock.now_ms();
            cell.record(now, Outcome { status: 200 });
            cell.record_bytes(now, 100, 1_000);
        })
    });
    wal.close();
    meter.drain_into(&mut pending);

    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("usage.db")).expect("store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // A busy key: traffic in every minute of the last 90 days would be 129 600 minutes; the
    // minute buckets kept are 48 h, so write 90 days of day and hour buckets through 90 batches
    // of one minute per hour, then 2 880 minute buckets.
    let one = UsageCounts {
        requests: 10,
        success: 9,
        error: 1,
        rate_limited: 0,
        bytes_in: 100,
        bytes_out: 1000,
    };
    let delta = |minute: i64| UsageDelta {
        key_id: "key_busy".into(),
        account_id: "acc_busy".into(),
        minute,
        counts: one,
        last_used_ms: minute * 60_000,
    };
    rt.block_on(async {
        for day in 0..90 {
            let batch: Vec<UsageDelta> = (0..24)
                .map(|h| delta(now - (90 - day) * 1_440 + h * 60))
                .collect();
            store
                .add_usage(BatchId::first(), &batch)
                .await
                .expect("days");
        }
        let minutes: Vec<UsageDelta> = (0..2_880).map(|m| delta(now - 2_880 + m)).collect();
        store
            .add_usage(BatchId::first(), &minutes)
            .await
            .expect("minutes");
    });
    let today = Granularity::Day.of_minute(now);
    c.bench_function("store/key_usage_90_days", |b| {
        b.iter(|| {
            let days = rt
                .block_on(store.key_usage("key_busy", Granularity::Day, today - 90, today + 1))
                .expect("query");
            assert!(days.len() >= 90);
        })
    });
    c.bench_function("store/key_usage_2880_minutes", |b| {
        b.iter(|| {
            let minutes = rt
                .block_on(store.key_usage("key_busy", Granularity::Minute, now - 2_880, now))
                .expect("query");
            assert_eq!(minutes.len(), 2_880);
        })
    });
    flush_many_keys(c, &rt, now, 1);
    flush_many_keys(c, &rt, now, 3);
}

/// Flushes as the flusher sends them with many keys in rotation: 20 000 distinct keys' deltas in
/// the current minute, into a store holding 100 000 keys' buckets for the last ten minutes. Each
/// key is used once `every` minutes: 1, a key in every minute; 3, a key that was used earlier in
/// the hour but not in the minute before (its hour's index row is there already).
fn flush_many_keys(c: &mut Criterion, rt: &tokio::runtime::Runtime, now: i64, every: i64) {
    const KEYS: usize = 100_000;
    const PER_FLUSH: usize = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("flush.db")).expect("store");
    let one = UsageCounts {
        requests: 1,
        success: 1,
        ..UsageCounts::default()
    };
    let ids: Vec<Arc<str>> = (0..KEYS).map(|i| format!("key_{i:08x}").into()).collect();
    let delta = |i: usize, minute: i64| UsageDelta {
        key_id: ids[i].clone(),
        account_id: "acc_many".into(),
        minute,
        counts: one,
        last_used_ms: minute * 60_000,
    };
    let mut id = BatchId::first();
    rt.block_on(async {
        for minute in now - 10..now {
            let batch: Vec<UsageDelta> = (0..KEYS).map(|i| delta(i, minute)).collect();
            store.add_usage(id, &batch).await.expect("history");
            id = id.next();
        }
    });
    // Keys in a scattered order, as rotation hits them; each flush takes the next 20 000.
    let order: Vec<usize> = (0..KEYS).map(|i| (i * 7_919) % KEYS).collect();
    let mut at = 0;
    let mut group = c.benchmark_group("store");
    group.sample_size(10);
    // Five flushes a minute: every key once. With a key in every minute, an iteration is one
    // minute and carries its share of the folding (the waiting 100 000 buckets bring one about
    // at the sixth flush at the latest). With a key every few minutes, an iteration is five
    // such minutes, 500 000 buckets: exactly one fold an iteration, so that iterations compare.
    let mut minute = now;
    let (name, minutes) = match every {
        1 => ("5_flushes_of_20k_of_100k_keys".to_owned(), 1),
        n => (
            format!("25_flushes_of_20k_of_100k_keys_every_{n}_minutes"),
            5,
        ),
    };
    group.bench_function(name, |b| {
        b.iter(|| {
            for _ in 0..minutes {
                // Each a new minute, as in a gateway that runs for long: every key's bucket in
                // it is new.
                minute += every;
                for _ in 0..5 {
                    let batch: Vec<UsageDelta> = (0..PER_FLUSH)
                        .map(|n| delta(order[(at + n) % KEYS], minute))
                        .collect();
                    at = (at + PER_FLUSH) % KEYS;
                    rt.block_on(store.add_usage(id, &batch)).expect("flush");
                    id = id.next();
                }
            }
        })
    });
    group.finish();
}

#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group! {
        name = benches;
        config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
        targets = bench
    }
}
criterion_main!(group::benches);
