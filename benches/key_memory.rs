//! Memory per cached key: live heap bytes (counted by a wrapper around the binary's allocator,
//! mimalloc: the bytes asked for, and the bytes mimalloc handed out for them in its size
//! classes) and resident memory, per key, after each stage a key goes through in the proxy:
//! cached (the cache entry and the key's state: its buckets and usage counters), used once (the decision and the usage
//! count), flushed (its counts handed to the store, where the embedded store's journal keeps
//! them until a fold), and folded (the journal emptied into the buckets).
//!
//! `cargo bench --bench key_memory [-- KEYS]` (default 200,000 keys)

// A counting allocator has to implement `GlobalAlloc`, an unsafe trait; it only forwards to
// mimalloc. The gateway itself has no `unsafe`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::net::IpAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

#[path = "support/records.rs"]
mod records;

use futures_util::stream::{self, StreamExt};
use http::Method;
use mimalloc::MiMalloc;
use tollgate::auth::cache::{Cached, Lookup};
use tollgate::auth::{authorize, RequestFacts};
use tollgate::config::RouteScopes;
use tollgate::credential::{self, KeyHash, Kind};
use tollgate::metering::flusher::{self, Backlog};
use tollgate::metering::{Meter, Outcome, WallClock};
use tollgate::metrics::Metrics;
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::{Granularity, SharedStore};

/// mimalloc, counting the bytes asked for and not yet freed, and the bytes it handed out for
/// them (its size classes: an allocation of 176 bytes takes 192).
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static HANDED: AtomicIsize = AtomicIsize::new(0);

/// What mimalloc handed out at `ptr` (0 for null).
fn handed(ptr: *const u8) -> isize {
    if ptr.is_null() {
        return 0;
    }
    // SAFETY: `ptr` is a live allocation of mimalloc's (or null, excluded above).
    unsafe { MiMalloc.usable_size(ptr) as isize }
}

// SAFETY: every call is passed to mimalloc unchanged; only the counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        let ptr = unsafe { MiMalloc.alloc(layout) };
        HANDED.fetch_add(handed(ptr), Ordering::Relaxed);
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        HANDED.fetch_sub(handed(ptr), Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let before = handed(ptr);
        // SAFETY: the caller's contract, passed on.
        let moved = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
            HANDED.fetch_add(handed(moved) - before, Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Resident memory, bytes (`VmRSS`).
fn resident() -> isize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<isize>().ok())
        .map_or(0, |kb| kb * 1024)
}

struct Reading {
    live: isize,
    handed: isize,
    resident: isize,
}

fn read() -> Reading {
    Reading {
        live: LIVE.load(Ordering::Relaxed),
        handed: HANDED.load(Ordering::Relaxed),
        resident: resident(),
    }
}

fn report(stage: &str, before: &Reading, keys: usize) -> Reading {
    let now = read();
    let per = |a: isize, b: isize| (a - b) / keys.max(1) as isize;
    println!(
        "{stage:<34} heap {:>6} B/key   in size classes {:>6} B/key   resident {:>6} B/key",
        per(now.live, before.live),
        per(now.handed, before.handed),
        per(now.resident, before.resident)
    );
    now
}

fn main() {
    let keys: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store: SharedStore =
        Arc::new(EmbeddedStore::open(&dir.path().join("bench.db")).expect("store"));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let meter = Arc::new(Meter::new(WallClock::System));
    let cache = records::cache(&store, &meter, &metrics, keys);
    let account = records::account("acc_bench");
    let raws: Vec<String> = (0..keys)
        .map(|_| credential::generate(Kind::Secret))
        .collect();
    let hashes: Vec<KeyHash> = raws.iter().map(|r| KeyHash::of(r)).collect();
    rt.block_on(async {
        store.create_account(&account).await.expect("account");
        // Concurrent creates share their commits.
        stream::iter(raws.iter().enumerate())
            .for_each_concurrent(256, |(i, raw)| {
                let (store, key) = (&store, records::secret_key(i, &account.id, raw));
                async move { store.create_key(&key).await.expect("key") }
            })
            .await;
        // Reads every key once, so that the store's page cache is as full before the
        // measurement as after it: what is counted is the gateway's own structures.
        for hash in &hashes {
            assert!(store.lookup_key(hash).await.expect("lookup").is_some());
        }
    });
    println!("{keys} keys (live heap counted at the allocator; resident = VmRSS)");
    let start = read();

    rt.block_on(async {
        for hash in &hashes {
            assert!(matches!(cache.get(hash).await, Lookup::Found(_)));
        }
    });
    let cached = report("cached", &start, keys);

    let scopes = RouteScopes::default();
    let ip: IpAddr = "127.0.0.1".parse().expect("ip");
    for hash in &hashes {
        let Cached::Fresh(Lookup::Found(key)) = cache.cached(hash) else {
            panic!("not cached");
        };
        let now_ms = meter.clock().now_ms();
        let facts = RequestFacts {
            method: &Method::GET,
            client_ip: ip,
            origin: None,
            referer: None,
            scopes: &scopes,
            shadow: false,
            cost: 1,
            required_scope: None,
            now_ms,
        };
        let permit = authorize(&key, &facts).unwrap_or_else(|_| panic!("refused"));
        permit.key.state.record(now_ms, Outcome { status: 200 });
    }
    let used = report("  + used once", &cached, keys);

    let mut backlog = Backlog::new(usize::MAX, &metrics);
    rt.block_on(flusher::flush_once(&meter, &*store, &metrics, &mut backlog));
    let flushed = report("  + flushed (journal, not folded)", &used, keys);
    // A prune folds the journal first (and here prunes nothing): what the waiting counts took
    // should be gone, not kept for the next minute's keys.
    rt.block_on(store.prune_usage(Granularity::Minute, 0))
        .expect("fold");
    report("  + folded (journal emptied)", &flushed, keys);
    report("total", &start, keys);
}
