//! Usage metering end to end: exact counts under concurrency, minute boundaries on an injected
//! clock, no loss when the store fails for a while (and a bounded, oldest-first loss when it
//! fails for too long), and no double count when Redis applies a write whose answer is lost.

mod common;
#[path = "common/observed_store.rs"]
mod observed_store;
#[path = "common/redis.rs"]
mod redis_harness;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use tollgate::metering::flusher::{self, Backlog, MAX_PENDING_BUCKETS};
use tollgate::metering::{Meter, Outcome, WallClock};
use tollgate::metrics::Metrics;
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::redis::RedisStore;
use tollgate::store::*;

use common::client;
use common::gateway::Gateway;
use common::upstream::Upstream;
use observed_store::ObservedStore;
use redis_harness::RedisServer;

/// The sum of a key's day buckets.
async fn key_total(store: &EmbeddedStore, key_id: &str) -> UsageCounts {
    let mut total = UsageCounts::default();
    for (_, c) in store
        .key_usage(key_id, Granularity::Day, 0, i64::MAX)
        .await
        .expect("usage")
    {
        total.merge(&c);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_from_fifty_clients_across_three_keys_are_counted_exactly() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .tweak(|s| {
            s.limits.default = RateLimitSpec {
                per_minute: Some(1_000_000),
                per_hour: Some(1_000_000),
                per_day: Some(1_000_000),
            }
        })
        .start()
        .await;
    let (account_a, key_1) = gw.account_with_key().await;
    let (key_2_id, key_2) = gw.create_key(&account_a, json!({ "name": "second" })).await;
    let (account_b, key_3) = gw.account_with_key().await;
    let keys = Arc::new([key_1, key_2, key_3]);
    let client = client();
    let mut tasks = Vec::new();
    for c in 0..50 {
        let (client, keys, url) = (client.clone(), Arc::clone(&keys), gw.proxy_url("/things"));
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
                // Client c sends request i with key (c + i) % 3: every key gets a known share.
                let key = &keys[(c + i) % 3];
                let response = client
                    .get(&url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(response.status(), StatusCode::OK);
                let _ = response.bytes().await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let expected = |n: usize| {
        (0..50)
            .flat_map(|c| (0..200).map(move |i| (c + i) % 3))
            .filter(|k| *k == n)
            .count() as u64
    };
    let key_ids = [
        id_of(&gw, &account_a, 0).await,
        key_2_id,
        id_of(&gw, &account_b, 0).await,
    ];
    let path = gw.store_path();
    let _dir = gw.stop().await;
    let store = EmbeddedStore::open(&path).expect("reopen");
    let mut sum = 0;
    for (n, key_id) in key_ids.iter().enumerate() {
        let total = key_total(&store, key_id).await;
        assert_eq!(
            (total.requests, total.success, total.error),
            (expected(n), expected(n), 0),
            "key {n}"
        );
        sum += total.requests;
    }
    assert_eq!(sum, 10_000);
    let a: u64 = store
        .account_usage(&account_a, 0, i64::MAX)
        .await
        .expect("a")
        .iter()
        .map(|(_, c)| c.requests)
        .sum();
    let b: u64 = store
        .account_usage(&account_b, 0, i64::MAX)
        .await
        .expect("b")
        .iter()
        .map(|(_, c)| c.requests)
        .sum();
    assert_eq!((a, b), (expected(0) + expected(1), expected(2)));
}

/// The id of the `n`th key of an account, through the admin API.
async fn id_of(gw: &Gateway, account_id: &str, n: usize) -> String {
    let (_, keys) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/v1/accounts/{account_id}/keys"),
            None,
        )
        .await;
    keys["keys"][n]["id"].as_str().expect("key id").to_owned()
}

#[tokio::test]
async fn requests_either_side_of_a_minute_boundary_land_in_different_buckets() {
    // 2026-11-23T12:59:59.999Z and 13:00:00.000Z.
    let before = 1_795_438_799_999_i64;
    let clock = Arc::new(AtomicI64::new(before));
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .clock(WallClock::Manual(Arc::clone(&clock)))
        .start()
        .await;
    let (account_id, key) = gw.account_with_key().await;
    let client = client();
    let send = || client.get(gw.proxy_url("/x")).bearer_auth(&key).send();
    assert_eq!(send().await.expect("send").status(), StatusCode::OK);
    clock.store(before + 1, Ordering::SeqCst);
    assert_eq!(send().await.expect("send").status(), StatusCode::OK);
    assert_eq!(send().await.expect("send").status(), StatusCode::OK);
    let key_id = id_of(&gw, &account_id, 0).await;
    let path = gw.store_path();
    let _dir = gw.stop().await;
    let store = EmbeddedStore::open(&path).expect("reopen");
    let minutes = store
        .key_usage(&key_id, Granularity::Minute, 0, i64::MAX)
        .await
        .expect("usage");
    let m = (before + 1) / 60_000;
    let requests: Vec<(i64, u64)> = minutes.iter().map(|(i, c)| (*i, c.requests)).collect();
    assert_eq!(requests, vec![(m - 1, 1), (m, 2)]);
    let hours = store
        .key_usage(&key_id, Granularity::Hour, 0, i64::MAX)
        .await
        .expect("usage");
    assert_eq!(
        hours
            .iter()
            .map(|(i, c)| (*i, c.requests))
            .collect::<Vec<_>>(),
        vec![(m / 60 - 1, 1), (m / 60, 2)]
    );
}

/// An embedded store behind an off switch, switched off: (its directory, the switch, the store).
fn switched_off_store() -> (tempfile::TempDir, Arc<ObservedStore>, SharedStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let switchable = Arc::new(ObservedStore::new(
        EmbeddedStore::open(&dir.path().join("u.db")).expect("store"),
    ));
    switchable.down.store(true, Ordering::SeqCst);
    let store: SharedStore = switchable.clone();
    (dir, switchable, store)
}

#[tokio::test]
async fn counts_survive_a_store_outage_and_are_written_once_it_is_back() {
    let (_dir, switchable, store) = switched_off_store();
    let meter = Meter::new(WallClock::System);
    let metrics = Metrics::new().expect("metrics");
    let cell = meter.cell(&Arc::from("key_out"), &Arc::from("acc_out"));
    let minute_ms = 60_000 * 29_000_000;
    let mut backlog = Backlog::new(MAX_PENDING_BUCKETS, &metrics);
    for round in 0..5 {
        for _ in 0..100 {
            cell.record(minute_ms + round * 60_000, Outcome { status: 200 });
        }
        assert!(!flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
    }
    // Five minutes of traffic wait as five merged buckets, not 500 events.
    assert_eq!(backlog.len(), 5);
    assert_eq!(metrics.usage_pending_events.get(), 5);
    switchable.down.store(false, Ordering::SeqCst);
    assert!(flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
    assert!(backlog.is_empty());
    assert_eq!(metrics.usage_pending_events.get(), 0);
    let total = key_total(&switchable.inner, "key_out").await;
    assert_eq!(total.requests, 500);
    // Nothing is written twice.
    assert!(flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
    assert_eq!(key_total(&switchable.inner, "key_out").await.requests, 500);
}

#[tokio::test]
async fn usage_waiting_for_a_failed_store_is_capped_oldest_minutes_first() {
    const CAP: usize = 4;
    let (_dir, switchable, store) = switched_off_store();
    let meter = Meter::new(WallClock::System);
    let metrics = Metrics::new().expect("metrics");
    let cell = meter.cell(&Arc::from("key_cap"), &Arc::from("acc_cap"));
    let first_minute = 29_000_000_i64;
    let mut backlog = Backlog::new(CAP, &metrics);
    // Ten minutes of traffic while the store is away: the first minute's batch is in flight,
    // the later ones pending; together they never pass the cap.
    for m in 0..10 {
        cell.record((first_minute + m) * 60_000, Outcome { status: 200 });
        assert!(!flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
        assert!(
            backlog.len() <= CAP,
            "minute {m}: {} buckets",
            backlog.len()
        );
    }
    assert_eq!(backlog.len(), CAP);
    assert_eq!(backlog.dropped(), 6);
    assert_eq!(metrics.usage_pending_events.get(), CAP as i64);

    switchable.down.store(false, Ordering::SeqCst);
    assert!(flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
    assert!(backlog.is_empty());
    assert_eq!(
        backlog.dropped(),
        0,
        "the count restarts with the next outage"
    );
    let minutes: Vec<i64> = switchable
        .inner
        .key_usage("key_cap", Granularity::Minute, 0, i64::MAX)
        .await
        .expect("usage")
        .iter()
        .map(|(minute, counts)| {
            assert_eq!(counts.requests, 1);
            minute - first_minute
        })
        .collect();
    assert_eq!(minutes, vec![6, 7, 8, 9], "the newest minutes were kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_write_redis_applied_but_answered_too_late_is_counted_once() {
    let redis = RedisServer::start();
    let redis_store = Arc::new(RedisStore::connect(&redis.url()).await.expect("redis"));
    let store: SharedStore = redis_store.clone();
    let meter = Meter::new(WallClock::System);
    let metrics = Metrics::new().expect("metrics");
    let (key_id, account_id) = ("key_late", "acc_late");
    let cell = meter.cell(&Arc::from(key_id), &Arc::from(account_id));
    let minute_ms = 60_000 * 29_000_000;
    let requests = |n: u64| {
        for _ in 0..n {
            cell.record(minute_ms, Outcome { status: 200 });
        }
    };
    let total = || async {
        let days = redis_store
            .key_usage(key_id, Granularity::Day, 0, i64::MAX)
            .await
            .expect("usage");
        days.iter().map(|(_, c)| c.requests).sum::<u64>()
    };
    let mut backlog = Backlog::new(MAX_PENDING_BUCKETS, &metrics);
    requests(100);
    assert!(flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
    assert_eq!(total().await, 100);

    // Redis freezes with the next batch on its socket: the client gives up after its deadline,
    // and Redis applies the batch when it thaws. The gateway cannot tell this from a write that
    // never arrived.
    requests(50);
    tokio::task::block_in_place(|| redis.pause());
    let failed = flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await;
    tokio::task::block_in_place(|| redis.resume());
    assert!(!failed, "the write timed out for the client");
    assert!(
        common::eventually(Duration::from_secs(5), || async { total().await == 150 }).await,
        "redis applied the batch it received before it froze: {}",
        total().await
    );

    // New traffic, then the retry: the frozen batch again (recognised, not added), then the new
    // counts in a batch of their own.
    requests(25);
    assert_eq!(backlog.len(), 1);
    assert!(flusher::flush_once(&meter, &*store, &metrics, &mut backlog).await);
    assert!(backlog.is_empty());
    assert_eq!(total().await, 175, "every request counted exactly once");
    let minute = redis_store
        .key_usage(key_id, Granularity::Minute, 0, i64::MAX)
        .await
        .expect("minutes");
    assert_eq!(minute.len(), 1);
    assert_eq!(
        (minute[0].1.requests, minute[0].1.success),
        (175, 175),
        "the minute bucket"
    );
    let account: u64 = redis_store
        .account_usage(account_id, 0, i64::MAX)
        .await
        .expect("account")
        .iter()
        .map(|(_, c)| c.requests)
        .sum();
    assert_eq!(account, 175, "the account's day");
}
