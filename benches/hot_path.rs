//! The per-request policy step on a cached key: SHA-256, cache lookup, the decision (state,
//! network, scope, three GCRA windows) and the usage count. No store I/O. And the signed
//! identity header, which the proxy adds per request when it is configured.
//!
//! `cargo bench --bench hot_path`

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

#[path = "support/records.rs"]
mod records;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::Method;
use tollgate::auth::cache::{Cached, KeyCache, Lookup};
use tollgate::auth::{authorize, RequestFacts};
use tollgate::config::RouteScopes;
use tollgate::credential::{self, KeyHash, Kind};
use tollgate::metering::{Meter, Outcome, WallClock};
use tollgate::metrics::Metrics;
use tollgate::proxy::signed::Signer;
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::{KeyLookup, SharedStore};

struct Fixture {
    cache: Arc<KeyCache>,
    meter: Arc<Meter>,
    raws: Vec<String>,
    _dir: tempfile::TempDir,
}

/// An empty cache over an empty embedded store, with room for `keys`.
fn empty(keys: usize) -> (Fixture, SharedStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: SharedStore =
        Arc::new(EmbeddedStore::open(&dir.path().join("bench.db")).expect("store"));
    let meter = Arc::new(Meter::new(WallClock::System));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let cache = records::cache(&store, &meter, &metrics, keys);
    let fixture = Fixture {
        cache,
        meter,
        raws: Vec::with_capacity(keys),
        _dir: dir,
    };
    (fixture, store)
}

/// `keys` keys created in the store and read into the cache through it.
fn fixture(keys: usize) -> Fixture {
    let (mut f, store) = empty(keys);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let account = records::account("acc_bench");
    rt.block_on(async {
        store.create_account(&account).await.expect("account");
        for i in 0..keys {
            let raw = credential::generate(Kind::Secret);
            let key = records::secret_key(i, &account.id, &raw);
            store.create_key(&key).await.expect("key");
            assert!(matches!(f.cache.get(&key.hash).await, Lookup::Found(_)));
            f.raws.push(raw);
        }
    });
    f
}

/// `keys` keys put straight into the cache (`KeyCache::insert`), as a gateway that has been up a
/// while holds them: a million keys in a few seconds, where creating them through the store
/// takes minutes.
fn fixture_in_memory(keys: usize) -> Fixture {
    let (mut f, _store) = empty(keys);
    let account = records::account("acc_bench");
    for i in 0..keys {
        let raw = credential::generate(Kind::Secret);
        let key = records::secret_key(i, &account.id, &raw);
        let hash = key.hash;
        let lookup = KeyLookup {
            key,
            account: account.clone(),
            site_origins: Vec::new(),
            access_token: false,
        };
        f.cache.insert(&hash, &lookup);
        f.raws.push(raw);
    }
    f
}

/// The step the proxy runs for a request on a cached key (`Proxy::authenticate`: a key found in
/// memory skips the format check, which only guards the store).
fn step(f: &Fixture, raw: &str, scopes: &RouteScopes, ip: IpAddr) {
    let Cached::Fresh(Lookup::Found(key)) = f.cache.cached(&KeyHash::of(raw)) else {
        panic!("not cached");
    };
    let now_ms = f.meter.clock().now_ms();
    let facts = RequestFacts {
        method: &Method::GET,
        client_ip: ip,
        origin: None,
        referer: None,
        scopes,
        shadow: false,
        cost: 1,
        required_scope: None,
        now_ms,
    };
    let permit = authorize(&key, &facts).unwrap_or_else(|_| panic!("refused"));
    permit.key.state.record(now_ms, Outcome { status: 200 });
}

fn bench(c: &mut Criterion) {
    let scopes = RouteScopes::default();
    let ip: IpAddr = "127.0.0.1".parse().expect("ip");
    let hot = fixture(1);
    c.bench_function("verify_limit_meter/hot_key", |b| {
        b.iter(|| step(&hot, &hot.raws[0], &scopes, ip))
    });
    // The signed identity header (`identity.signing_secret_env`), added per forwarded request.
    let signer = Signer::new(
        b"an-identity-secret-of-at-least-32-bytes!",
        Duration::from_secs(60),
        http::HeaderName::from_static("x-tollgate-identity"),
    );
    let Cached::Fresh(Lookup::Found(key)) = hot.cache.cached(&KeyHash::of(&hot.raws[0])) else {
        panic!("not cached");
    };
    c.bench_function("sign_identity", |b| {
        b.iter(|| signer.sign(key.identity(), 1_765_015_200))
    });
    rotating(c, "verify_limit_meter/10k_keys_rotating", &fixture(10_000));
    // A million keys, none of them in the CPU's caches when it is asked for. MILLION_KEYS sets
    // another count.
    let n = std::env::var("MILLION_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    rotating(
        c,
        "verify_limit_meter/1m_keys_rotating",
        &fixture_in_memory(n),
    );
}

/// The step over the fixture's keys in turn, a stride of a prime apart.
fn rotating(c: &mut Criterion, name: &str, f: &Fixture) {
    let (scopes, ip) = (RouteScopes::default(), IpAddr::from([127, 0, 0, 1]));
    let mut i = 0usize;
    c.bench_function(name, |b| {
        b.iter_batched(
            || {
                i = (i + 7919) % f.raws.len();
                i
            },
            |i| step(f, &f.raws[i], &scopes, ip),
            BatchSize::SmallInput,
        )
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
