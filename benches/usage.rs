//! Metering costs: the per-request count on a key's usage cell, and reading a busy key's
//! buckets back from the embedded store (90 day buckets; 2 880 minute buckets = 48 h).
//!
//! `cargo bench --bench usage`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tollgate::metering::{Meter, Outcome, Pending, WallClock};
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::{BatchId, Granularity, Store, UsageCounts, UsageDelta};

const NOW_MINUTE: i64 = 29_500_000;

fn bench(c: &mut Criterion) {
    let meter = Meter::new(WallClock::System);
    let cell = meter.cell(&Arc::from("key_bench"), &Arc::from("acc_bench"));
    let clock = WallClock::System;
    c.bench_function("meter/record_one_request", |b| {
        b.iter(|| cell.record(clock.now_ms(), Outcome { status: 200 }))
    });
    let mut pending = Pending::default();
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
                .map(|h| delta(NOW_MINUTE - (90 - day) * 1_440 + h * 60))
                .collect();
            store
                .add_usage(BatchId::first(), &batch)
                .await
                .expect("days");
        }
        let minutes: Vec<UsageDelta> = (0..2_880).map(|m| delta(NOW_MINUTE - 2_880 + m)).collect();
        store
            .add_usage(BatchId::first(), &minutes)
            .await
            .expect("minutes");
    });
    let today = Granularity::Day.of_minute(NOW_MINUTE);
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
                .block_on(store.key_usage(
                    "key_busy",
                    Granularity::Minute,
                    NOW_MINUTE - 2_880,
                    NOW_MINUTE,
                ))
                .expect("query");
            assert_eq!(minutes.len(), 2_880);
        })
    });
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
