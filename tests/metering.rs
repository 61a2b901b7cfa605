//! The metering write path against the real embedded store: counts merge per key and minute,
//! reach the store in one batch per flush, and nothing is counted twice.

use std::sync::Arc;

use tollgate::metering::flusher;
use tollgate::metering::flusher::{Backlog, MAX_PENDING_BUCKETS};
use tollgate::metering::{Meter, Outcome, WallClock};
use tollgate::metrics::Metrics;
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::{SharedStore, UsageCounts};

#[tokio::test]
async fn counts_reach_the_store_once_per_flush_and_merge_per_minute() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: SharedStore =
        Arc::new(EmbeddedStore::open(&dir.path().join("m.db")).expect("store"));
    let meter = Meter::new(WallClock::System);
    let metrics = Metrics::new().expect("metrics");
    let a = meter.cell(&Arc::from("key_a"), &Arc::from("acc"));
    let b = meter.cell(&Arc::from("key_b"), &Arc::from("acc"));
    let minute_ms = 60_000 * 28_000_000;
    for i in 0..100 {
        a.record(
            minute_ms + i,
            Outcome {
                status: if i % 10 == 0 { 429 } else { 200 },
            },
        );
    }
    b.record(minute_ms + 59_999, Outcome { status: 500 });
    b.record(minute_ms + 60_000, Outcome { status: 204 });
    a.record_bytes(minute_ms, 1_000, 2_000);

    let mut backlog = Backlog::new(MAX_PENDING_BUCKETS, &metrics);
    assert!(flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
    assert!(backlog.is_empty());
    // A second flush with no new traffic writes nothing more.
    assert!(flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);

    let m = minute_ms / 60_000;
    let a_usage = store
        .key_usage("key_a", tollgate::store::Granularity::Minute, m, m + 2)
        .await
        .expect("usage");
    assert_eq!(
        a_usage,
        vec![(
            m,
            UsageCounts {
                requests: 100,
                success: 90,
                error: 10,
                rate_limited: 10,
                bytes_in: 1_000,
                bytes_out: 2_000
            }
        )]
    );
    let b_usage = store
        .key_usage("key_b", tollgate::store::Granularity::Minute, m, m + 2)
        .await
        .expect("usage");
    assert_eq!(
        b_usage,
        vec![
            (
                m,
                UsageCounts {
                    requests: 1,
                    error: 1,
                    ..Default::default()
                }
            ),
            (
                m + 1,
                UsageCounts {
                    requests: 1,
                    success: 1,
                    ..Default::default()
                }
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_on_one_key_are_all_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: SharedStore =
        Arc::new(EmbeddedStore::open(&dir.path().join("m.db")).expect("store"));
    let meter = Arc::new(Meter::new(WallClock::System));
    let metrics = Metrics::new().expect("metrics");
    let cell = meter.cell(&Arc::from("key_hot"), &Arc::from("acc"));
    let now = 60_000 * 28_000_000;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let cell = Arc::clone(&cell);
        tasks.push(tokio::spawn(async move {
            for _ in 0..5_000 {
                cell.record(now, Outcome { status: 200 });
            }
        }));
    }
    let mut backlog = Backlog::new(MAX_PENDING_BUCKETS, &metrics);
    // Flush while the writers run, then once more after they finish.
    flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await;
    for t in tasks {
        t.await.expect("writer");
    }
    assert!(flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
    let m = now / 60_000;
    let usage = store
        .key_usage("key_hot", tollgate::store::Granularity::Minute, m, m + 1)
        .await
        .expect("usage");
    assert_eq!(usage[0].1.requests, 40_000);
}

/// A flush of more keys than one batch holds (`BATCH_BUCKETS`) is written as several bounded
/// batches, loses nothing and counts nothing twice; and a key that is busy during the flush,
/// queued again after each drain, does not keep the flush going: what it counts meanwhile waits
/// for the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_of_many_keys_goes_in_bounded_batches_and_ends_under_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: SharedStore =
        Arc::new(EmbeddedStore::open(&dir.path().join("m.db")).expect("store"));
    let meter = Arc::new(Meter::new(WallClock::System));
    let metrics = Metrics::new().expect("metrics");
    let now = 60_000 * 28_000_000;
    let keys = 2 * flusher::BATCH_BUCKETS + 5_000;
    let cells: Vec<_> = (0..keys)
        .map(|i| meter.cell(&Arc::from(format!("key_{i}")), &Arc::from("acc_many")))
        .collect();
    for cell in &cells {
        cell.record(now, Outcome { status: 200 });
    }
    // The busy key counts all through the flush.
    let hot = meter.cell(&Arc::from("key_hot"), &Arc::from("acc_many"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (hot, stop) = (Arc::clone(&hot), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                hot.record(now, Outcome { status: 200 });
                n += 1;
                if n.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            n
        })
    };
    let mut backlog = Backlog::new(MAX_PENDING_BUCKETS, &metrics);
    assert!(flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
    let batches = metrics.usage_flush_duration.get_sample_count();
    assert!(
        (3..=4).contains(&batches),
        "{keys} keys in batches of at most {}: {batches} writes",
        flusher::BATCH_BUCKETS
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let hot_requests = writer.await.expect("writer");
    assert!(flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
    assert!(backlog.is_empty());

    let m = now / 60_000;
    let day = tollgate::store::Granularity::Day.of_minute(m);
    let account = store
        .account_usage("acc_many", day, day + 1)
        .await
        .expect("account usage");
    assert_eq!(account.len(), 1);
    assert_eq!(account[0].1.requests, keys as u64 + hot_requests);
    for i in [0, flusher::BATCH_BUCKETS, keys - 1] {
        let usage = store
            .key_usage(
                &format!("key_{i}"),
                tollgate::store::Granularity::Minute,
                m,
                m + 1,
            )
            .await
            .expect("usage");
        assert_eq!(
            usage,
            vec![(
                m,
                UsageCounts {
                    requests: 1,
                    success: 1,
                    ..Default::default()
                }
            )]
        );
    }
}
