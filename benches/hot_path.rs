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
use tollgate::store::SharedStore;

struct Fixture {
    cache: Arc<KeyCache>,
    meter: Arc<Meter>,
    raws: Vec<String>,
    _dir: tempfile::TempDir,
}

fn fixture(keys: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: SharedStore =
        Arc::new(EmbeddedStore::open(&dir.path().join("bench.db")).expect("store"));
    let meter = Arc::new(Meter::new(WallClock::System));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let cache = records::cache(&store, &meter, &metrics, keys);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let account = records::account("acc_bench");
    let mut raws = Vec::with_capacity(keys);
    rt.block_on(async {
        store.create_account(&account).await.expect("account");
        for i in 0..keys {
            let raw = credential::generate(Kind::Secret);
            let key = records::secret_key(i, &account.id, &raw);
            store.create_key(&key).await.expect("key");
            assert!(matches!(cache.get(&key.hash).await, Lookup::Found(_)));
            raws.push(raw);
        }
    });
    Fixture {
        cache,
        meter,
        raws,
        _dir: dir,
    }
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
    permit.key.usage.record(now_ms, Outcome { status: 200 });
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
        b.iter(|| signer.sign(&key.identity, 1_765_015_200))
    });
    let many = fixture(10_000);
    let mut i = 0usize;
    c.bench_function("verify_limit_meter/10k_keys_rotating", |b| {
        b.iter_batched(
            || {
                i = (i + 7919) % many.raws.len();
                i
            },
            |i| step(&many, &many.raws[i], &scopes, ip),
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
