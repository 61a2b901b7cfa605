//! `POST /v1/verify` on a cached key, through the admin API's router as the listener runs it
//! (routing, the master key's check, the JSON body, the decision, the answer), without the TCP
//! connection: what the admin listener adds to a verification, per call. And the same with
//! `explain`.
//!
//! `cargo bench --bench verify`

use std::sync::Arc;

#[path = "support/records.rs"]
mod records;

use criterion::{criterion_main, Criterion};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tollgate::admin::{self, AdminState};
use tollgate::auth::cache::Lookup;
use tollgate::credential::{self, KeyHash, Kind};
use tollgate::metering::{Meter, WallClock};
use tollgate::metrics::Metrics;
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::SharedStore;
use tower::ServiceExt;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: SharedStore =
        Arc::new(EmbeddedStore::open(&dir.path().join("bench.db")).expect("store"));
    let meter = Arc::new(Meter::new(WallClock::System));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let cache = records::cache(&store, &meter, &metrics, 1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let master = credential::generate(Kind::Master);
    let raw = credential::generate(Kind::Secret);
    rt.block_on(async {
        let account = records::account("acc_bench");
        store.create_account(&account).await.expect("account");
        let key = records::secret_key(0, &account.id, &raw);
        store.create_key(&key).await.expect("key");
        assert!(matches!(cache.get(&key.hash).await, Lookup::Found(_)));
    });
    let state = AdminState::new(
        Arc::clone(&store),
        Arc::clone(&cache),
        Arc::clone(&metrics),
        Some(KeyHash::of(&master)),
    );
    let router = admin::router(state);
    for (name, body) in [
        ("verify/cached_key", format!(r#"{{"key":"{raw}"}}"#)),
        (
            "verify/cached_key_explain",
            format!(r#"{{"key":"{raw}","explain":true}}"#),
        ),
    ] {
        let call = || {
            let request = Request::post("/v1/verify")
                .header("authorization", format!("Bearer {master}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body.clone()))
                .expect("request");
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await.expect("answer");
                assert_eq!(response.status(), StatusCode::OK);
                let bytes = response.into_body().collect().await.expect("body");
                assert!(bytes.to_bytes().starts_with(b"{\"valid\":true"));
            }
        };
        c.bench_function(name, |b| b.iter(|| rt.block_on(call())));
    }
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
criterion_main!(group::benches);
