//! The key cache against the real embedded store: one store read for concurrent misses,
//! negative entries with their own ttl, the bound on entries, invalidation, and store failures
//! counted on every call but logged once per outage.
//!
//! `ObservedStore` delegates every call to a real `EmbeddedStore` and counts `lookup_key`.

mod common;
#[path = "common/observed_store.rs"]
mod observed_store;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tollgate::auth::cache::{KeyCache, Lookup};
use tollgate::config::{CacheSettings, OnStoreError};
use tollgate::credential::{self, KeyHash, Kind};
use tollgate::limits::Limiters;
use tollgate::metering::{Meter, WallClock};
use tollgate::metrics::Metrics;
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::*;

use observed_store::ObservedStore;

struct Fixture {
    store: Arc<ObservedStore>,
    cache: Arc<KeyCache>,
    metrics: Arc<Metrics>,
    account: AccountRecord,
    _dir: tempfile::TempDir,
}

fn fixture(settings: CacheSettings) -> Fixture {
    fixture_with(settings, OnStoreError::FailOpen)
}

fn fixture_with(settings: CacheSettings, on_store_error: OnStoreError) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let inner = EmbeddedStore::open(&dir.path().join("t.db")).expect("store");
    let store = Arc::new(ObservedStore::new(inner));
    let shared: SharedStore = store.clone();
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let cache = Arc::new(KeyCache::new(
        shared,
        Arc::new(Limiters::new()),
        Arc::new(Meter::new(WallClock::System)),
        Arc::clone(&metrics),
        settings,
        RateLimitSpec {
            per_minute: Some(60),
            per_hour: Some(1000),
            per_day: Some(10_000),
        },
        on_store_error,
    ));
    let now = Utc::now();
    let account = AccountRecord {
        id: credential::new_id("acc"),
        name: "a".into(),
        auth_method: AuthMethod::ApiKey,
        rate_limit: None,
        network_policy: NetworkPolicy::default(),
        permissions: None,
        plan: Plan::default(),
        active: true,
        shared_rate_limit: None,
        created_at: now,
        updated_at: now,
    };
    Fixture {
        store,
        cache,
        metrics,
        account,
        _dir: dir,
    }
}

fn settings() -> CacheSettings {
    CacheSettings {
        ttl: Duration::from_secs(30),
        negative_ttl: Duration::from_secs(5),
        max_entries: 1000,
    }
}

fn key_record(account_id: &str, raw: &str) -> KeyRecord {
    let now = Utc::now();
    KeyRecord {
        id: credential::new_id("key"),
        account_id: account_id.to_owned(),
        name: credential::new_id("name"),
        key_type: KeyType::Secret,
        hash: KeyHash::of(raw),
        prefix: credential::display_prefix(raw),
        preview: credential::preview(raw),
        scopes: None,
        allowed_origins: vec![],
        allowed_ips: vec![],
        rate_limit: None,
        expires_at: None,
        lifetime_secs: None,
        active: true,
        protected: false,
        metadata: serde_json::json!({}),
        credit_pool: None,
        external_id: None,
        imported: false,
        shadow: false,
        created_at: now,
        updated_at: now,
    }
}

async fn with_key(f: &Fixture) -> KeyRecord {
    f.store.create_account(&f.account).await.ok();
    let key = key_record(&f.account.id, &credential::generate(Kind::Secret));
    f.store.create_key(&key).await.expect("create key");
    key
}

fn lookups(f: &Fixture) -> usize {
    f.store.lookups.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_credential_read_the_store_once() {
    let f = fixture(settings());
    let key = with_key(&f).await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let cache = Arc::clone(&f.cache);
        let hash = key.hash;
        tasks.push(tokio::spawn(async move {
            matches!(cache.get(&hash).await, Lookup::Found(_))
        }));
    }
    for t in tasks {
        assert!(t.await.expect("task"));
    }
    assert_eq!(lookups(&f), 1);
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
    assert_eq!(lookups(&f), 1, "a hit does no store read");
}

#[tokio::test(start_paused = true)]
async fn unknown_credentials_are_remembered_for_the_negative_ttl() {
    let f = fixture(settings());
    f.store.create_account(&f.account).await.expect("account");
    let raw = credential::generate(Kind::Secret);
    let hash = KeyHash::of(&raw);
    assert!(matches!(f.cache.get(&hash).await, Lookup::NotFound));
    assert!(matches!(f.cache.get(&hash).await, Lookup::NotFound));
    assert_eq!(lookups(&f), 1);
    // Created behind the cache's back (no invalidation): still unknown until negative_ttl.
    f.store
        .create_key(&key_record(&f.account.id, &raw))
        .await
        .expect("key");
    assert!(matches!(f.cache.get(&hash).await, Lookup::NotFound));
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(matches!(f.cache.get(&hash).await, Lookup::Found(_)));
    assert_eq!(lookups(&f), 2);
}

#[tokio::test(start_paused = true)]
async fn a_cached_key_is_reread_after_its_ttl() {
    let f = fixture(settings());
    let mut key = with_key(&f).await;
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(k) if k.key_active));
    key.active = false;
    f.store.update_key(&key).await.expect("update");
    assert!(
        matches!(f.cache.get(&key.hash).await, Lookup::Found(k) if k.key_active),
        "ttl not over"
    );
    tokio::time::advance(Duration::from_secs(31)).await;
    // Past its ttl the key is answered at once, as it was, while a read refreshes it.
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(k) if k.key_active));
    assert!(
        common::eventually(Duration::from_secs(1), || async {
            matches!(f.cache.get(&key.hash).await, Lookup::Found(k) if !k.key_active)
        })
        .await,
        "the background read did not refresh the entry"
    );
}

/// Stale-while-revalidate: a key past its ttl never waits for the store. Every use answers at
/// once from memory and one background read (not one per use) refreshes it.
#[tokio::test(start_paused = true)]
async fn a_stale_key_is_answered_at_once_and_refreshed_by_one_read() {
    let f = fixture(settings());
    let mut key = with_key(&f).await;
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
    key.active = false;
    f.store.update_key(&key).await.expect("update");
    tokio::time::advance(Duration::from_secs(31)).await;
    for _ in 0..100 {
        // No await point lets the refresh run in between: every one of these is answered
        // from memory.
        assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(k) if k.key_active));
    }
    assert!(
        common::eventually(Duration::from_secs(1), || async {
            matches!(f.cache.get(&key.hash).await, Lookup::Found(k) if !k.key_active)
        })
        .await
    );
    assert_eq!(
        lookups(&f),
        2,
        "one read to cache the key, one to refresh it"
    );
}

/// With the store failing, a stale key keeps passing under `fail_open` (the refreshes fail in
/// the background) and is refused under `fail_closed` once a read has failed; both come back
/// when the store does.
#[tokio::test(start_paused = true)]
async fn a_stale_key_with_the_store_down_passes_under_fail_open_only() {
    for policy in [OnStoreError::FailOpen, OnStoreError::FailClosed] {
        let f = fixture_with(settings(), policy);
        let key = with_key(&f).await;
        assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
        // A write moves the store's revision: past its ttl the entry is stale, not kept fresh.
        f.store.update_key(&key).await.expect("update");
        f.store.down.store(true, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(31)).await;
        // The first use past the ttl cannot know yet that the store is down.
        assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
        let failed = || async { store_errors(&f, "lookup_key") >= 1 };
        assert!(common::eventually(Duration::from_secs(1), failed).await);
        for _ in 0..3 {
            let got = f.cache.get(&key.hash).await;
            match policy {
                OnStoreError::FailOpen => assert!(matches!(got, Lookup::Found(_))),
                OnStoreError::FailClosed => assert!(matches!(got, Lookup::Unavailable)),
            }
            tokio::task::yield_now().await;
        }
        f.store.down.store(false, Ordering::SeqCst);
        assert!(
            common::eventually(Duration::from_secs(1), || async {
                matches!(f.cache.get(&key.hash).await, Lookup::Found(_))
            })
            .await,
            "{policy:?}: the key passes again once the store answers"
        );
    }
}

/// The embedded store sees every write, so an entry past its ttl is kept without a re-read
/// while nothing changed; the first change anywhere in accounts, keys or sites, even one made
/// behind the cache's back, makes the next use past the ttl read again.
#[tokio::test(start_paused = true)]
async fn past_its_ttl_a_key_is_reread_only_when_the_store_changed() {
    let f = fixture(settings());
    let mut key = with_key(&f).await;
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
    assert_eq!(lookups(&f), 1);
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(k) if k.key_active));
    }
    f.cache.sweep();
    tokio::time::advance(Duration::from_secs(20 * 60)).await;
    f.cache.sweep();
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
    assert_eq!(lookups(&f), 1, "re-read although nothing changed");
    key.active = false;
    f.store.update_key(&key).await.expect("update");
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(k) if !k.key_active));
    assert_eq!(lookups(&f), 2);
}

/// The cache's map finds a slot by the hash's first eight bytes: a hash that shares them with
/// another's finds nothing of the other's (key or miss), the two take turns in the slot, and
/// invalidating one leaves the other's entry alone.
#[tokio::test]
async fn hashes_sharing_their_first_bytes_never_answer_for_each_other() {
    let f = fixture(settings());
    f.store.create_account(&f.account).await.expect("account");
    let with_rest = |rest: u8| {
        let mut hash = [rest; 32];
        hash[..8].copy_from_slice(&[0x5a; 8]);
        KeyHash(hash)
    };
    let mut a = key_record(&f.account.id, "a");
    a.hash = with_rest(1);
    let mut b = key_record(&f.account.id, "b");
    b.hash = with_rest(2);
    let unknown = with_rest(3);
    for key in [&a, &b] {
        f.store.create_key(key).await.expect("create key");
    }
    let id_of = |found: Lookup| match found {
        Lookup::Found(k) => k.key_id().to_string(),
        Lookup::NotFound => "not found".to_owned(),
        Lookup::Unavailable => "unavailable".to_owned(),
    };
    assert_eq!(id_of(f.cache.get(&a.hash).await), a.id);
    assert_eq!(id_of(f.cache.get(&b.hash).await), b.id);
    assert_eq!(lookups(&f), 2);
    // b's read took the slot: a is read again, and is a again.
    assert_eq!(id_of(f.cache.get(&a.hash).await), a.id);
    assert_eq!(lookups(&f), 3);
    assert_eq!(id_of(f.cache.get(&a.hash).await), a.id);
    assert_eq!(lookups(&f), 3, "a hit does no store read");
    // A miss of the same first bytes is not a, and a is not that miss.
    assert_eq!(id_of(f.cache.get(&unknown).await), "not found");
    assert_eq!(id_of(f.cache.get(&a.hash).await), a.id);
    assert_eq!(lookups(&f), 5);
    // Invalidating b, whose slot a holds now, leaves a cached.
    f.cache.invalidate(&b.hash);
    assert_eq!(id_of(f.cache.get(&a.hash).await), a.id);
    assert_eq!(lookups(&f), 5);
    assert_eq!(f.cache.len(), 1);
}

#[tokio::test]
async fn invalidation_takes_effect_on_the_next_lookup() {
    let f = fixture(settings());
    let mut key = with_key(&f).await;
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(k) if k.key_active));
    key.active = false;
    f.store.update_key(&key).await.expect("update");
    f.cache.invalidate(&key.hash);
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(k) if !k.key_active));
    f.store
        .delete_key(&f.account.id, &key.id)
        .await
        .expect("delete");
    f.cache.invalidate_account(&f.account.id);
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::NotFound));
}

#[tokio::test]
async fn the_cache_holds_at_most_max_entries() {
    let f = fixture(CacheSettings {
        max_entries: 10,
        ..settings()
    });
    f.store.create_account(&f.account).await.expect("account");
    for _ in 0..50 {
        let key = key_record(&f.account.id, &credential::generate(Kind::Secret));
        f.store.create_key(&key).await.expect("key");
        assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
        assert!(f.cache.len() <= 10, "cache grew to {}", f.cache.len());
    }
}

/// `tollgate_store_errors_total{op}` as the fixture's metrics hold it.
fn store_errors(f: &Fixture, op: &str) -> u64 {
    f.metrics.store_errors_total.with_label_values(&[op]).get()
}

#[tokio::test]
async fn store_failures_are_counted_per_call_and_logged_once_per_outage() {
    let logs = common::capture_logs();
    let f = fixture(settings());
    let key = with_key(&f).await;
    f.store.down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        assert!(matches!(
            f.cache
                .get(&KeyHash::of(&credential::generate(Kind::Secret)))
                .await,
            Lookup::Unavailable
        ));
        // Published from a task of its own: the change is not held up by the store.
        f.cache.invalidate(&key.hash);
    }
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            store_errors(&f, "publish_invalidation") == 3
        })
        .await,
        "publish failures counted: {}",
        store_errors(&f, "publish_invalidation")
    );
    assert_eq!(store_errors(&f, "lookup_key"), 3);
    for op in ["lookup_key", "publish_invalidation"] {
        let op = format!("op=\"{op}\"");
        assert_eq!(
            logs.count(&["store calls failing", &op]),
            1,
            "{}",
            logs.text()
        );
        assert_eq!(logs.count(&["store calls work again", &op]), 0);
    }

    f.store.down.store(false, Ordering::SeqCst);
    for _ in 0..2 {
        assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
        f.cache.invalidate(&key.hash);
    }
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            logs.count(&["store calls work again", "op=\"publish_invalidation\""]) == 1
        })
        .await,
        "{}",
        logs.text()
    );
    assert_eq!(
        logs.count(&["store calls work again", "op=\"lookup_key\""]),
        1
    );
    assert_eq!(logs.count(&["store calls failing"]), 2, "{}", logs.text());
    assert_eq!(store_errors(&f, "publish_invalidation"), 3);
}

/// A key read that the store does not answer (here: the blocking pool's only thread held, as a
/// hung disk holds them all, so the embedded store's read queues behind it) is given up at
/// `LOOKUP_DEADLINE`: the lookup answers `Unavailable` (a request, `store_unavailable`) instead
/// of waiting on, and is counted as a failed store call. Once the pool is free the key reads.
#[test]
fn a_key_read_the_store_does_not_answer_is_given_up_at_its_deadline() {
    common::one_blocking_thread().block_on(async {
        let f = fixture(settings());
        let key = with_key(&f).await;
        let (release, hold) = common::hold_the_pool();

        let started = std::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), f.cache.get(&key.hash))
            .await
            .expect("the lookup waited on with no deadline");
        assert!(matches!(answer, Lookup::Unavailable));
        assert!(
            started.elapsed() >= LOOKUP_DEADLINE,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(store_errors(&f, "lookup_key"), 1);

        release.send(()).expect("release the pool");
        hold.await.expect("the holder");
        assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
    });
}

/// Keys of one account with the same quotas share their account id and limit header values
/// instead of each holding copies; a key with its own rate limit gets its own values.
#[tokio::test]
async fn keys_share_what_they_have_in_common() {
    let f = fixture(settings());
    let (a, b) = (with_key(&f).await, with_key(&f).await);
    let mut own = key_record(&f.account.id, &credential::generate(Kind::Secret));
    own.rate_limit = Some(RateLimitSpec {
        per_minute: Some(5),
        per_hour: None,
        per_day: None,
    });
    f.store.create_key(&own).await.expect("create key");
    let get = |hash| {
        let cache = Arc::clone(&f.cache);
        async move {
            match cache.get(&hash).await {
                Lookup::Found(k) => k,
                _ => panic!("key not found"),
            }
        }
    };
    let (a, b, own) = (get(a.hash).await, get(b.hash).await, get(own.hash).await);
    assert!(Arc::ptr_eq(a.account_id(), b.account_id()));
    assert!(Arc::ptr_eq(&a.identity.limits, &b.identity.limits));
    assert!(!Arc::ptr_eq(&a.identity.limits, &own.identity.limits));
    assert_eq!(a.identity.scopes_header(), "*");
    assert_eq!(
        own.identity.limits.per_window[0]
            .as_ref()
            .map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    assert_eq!(*a.identity.account_id, f.account.id.as_str());
    assert!(Arc::ptr_eq(&a.identity.account_id, &b.identity.account_id));
}

/// A config reload's cache settings: a changed ttl has every key re-read (answered from memory
/// meanwhile, even long past its ttl, since the store did not change), a changed `negative_ttl`
/// forgets the misses, a smaller `max_entries` evicts at once, and the same settings change
/// nothing.
#[tokio::test(start_paused = true)]
async fn a_retune_rereads_what_its_change_needs_and_nothing_else() {
    let f = fixture(settings());
    let key = with_key(&f).await;
    let unknown = KeyHash::of(&credential::generate(Kind::Secret));
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
    assert!(matches!(f.cache.get(&unknown).await, Lookup::NotFound));
    assert_eq!(lookups(&f), 2);
    let default = RateLimitSpec {
        per_minute: Some(60),
        per_hour: Some(1000),
        per_day: Some(10_000),
    };
    assert!(!f.cache.retune(settings(), default), "nothing changed");

    // negative_ttl: the miss is read again, the key is not.
    let shorter_misses = CacheSettings {
        negative_ttl: Duration::from_secs(1),
        ..settings()
    };
    assert!(f.cache.retune(shorter_misses, default));
    assert!(matches!(f.cache.get(&unknown).await, Lookup::NotFound));
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
    assert_eq!(lookups(&f), 3, "only the miss was read again");

    // ttl, an hour after the key was read: answered from memory at once, re-read behind it.
    tokio::time::advance(Duration::from_secs(3600)).await;
    let longer = CacheSettings {
        ttl: Duration::from_secs(60),
        ..shorter_misses
    };
    assert!(f.cache.retune(longer, default));
    assert!(
        matches!(
            f.cache.cached(&key.hash),
            tollgate::auth::cache::Cached::Stale(_)
        ),
        "served while it is re-read, not waited for"
    );
    assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
    common::eventually(Duration::from_secs(5), || async { lookups(&f) == 4 }).await;
    assert_eq!(lookups(&f), 4, "the key was re-read once");

    // max_entries below what is held: evicted at once.
    f.store.create_account(&f.account).await.ok();
    for _ in 0..20 {
        let other = key_record(&f.account.id, &credential::generate(Kind::Secret));
        f.store.create_key(&other).await.expect("key");
        assert!(matches!(f.cache.get(&other.hash).await, Lookup::Found(_)));
    }
    assert!(f.cache.len() > 10);
    let fewer = CacheSettings {
        max_entries: 10,
        ..longer
    };
    assert!(f.cache.retune(fewer, default));
    assert!(f.cache.len() < 10, "{} entries", f.cache.len());
}
