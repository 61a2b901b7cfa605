//! A hung store is treated like a dead one within tens of milliseconds. Redis is frozen with
//! SIGSTOP (`RedisServer::pause`): its connections stay open and nothing answers, the case that
//! timeouts alone turn into seconds of waiting per request. With Redis frozen:
//!
//! - a cached key keeps answering at once, also past its cache ttl (stale-while-revalidate);
//! - an unknown key gets 503 `store_unavailable` at once, and `/readyz` 503;
//! - the circuit breaker opens (`tollgate_store_breaker_open` 1), so calls stop waiting at all;
//!
//! and after `resume` everything recovers without a restart: the breaker closes, a key that was
//! refused during the freeze passes, and the usage counted meanwhile reaches the store, once.
//!
//! A connection that went half-open instead (it stays up and nothing passes on it, while a new
//! one would get through) is replaced, and the store works again within seconds.
//!
//! "At once" is asserted as under [`QUICK`] per request: far above the tens of milliseconds this
//! takes, so that a loaded CI machine cannot fail it, and far below the ~2 s a request waited
//! before (the Redis client's response timeout).

mod common;
#[path = "common/redis.rs"]
mod redis_harness;
#[path = "common/relay.rs"]
mod relay;

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate::config::OnStoreError;
use tollgate::credential::{self, Kind};

use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{client, eventually, expect_echo, expect_refusal};
use redis_harness::RedisServer;
use relay::Relay;

/// The most one request may take while Redis is frozen.
const QUICK: Duration = Duration::from_millis(500);
/// The cache ttl of these tests: short, so that the freeze outlasts it several times.
const TTL: Duration = Duration::from_millis(200);
/// How long traffic with the cached key goes on while Redis is frozen (several ttls, and past
/// the breaker's cool-down, so that a probe meets the frozen Redis too).
const FROZEN_FOR: Duration = Duration::from_millis(1_500);
/// A bound for recoveries.
const SETTLE: Duration = Duration::from_secs(10);
const ALL_TIME: &str = "interval=month&from=2020-01-01T00:00:00Z&to=2030-01-01T00:00:00Z";

async fn gateway(redis: &RedisServer, upstream: &Upstream, policy: OnStoreError) -> Gateway {
    Gateway::builder(upstream)
        .redis(&redis.url())
        .tweak(move |s| {
            s.cache.ttl = TTL;
            s.limits.on_store_error = policy;
            s.metering.flush_interval = Duration::from_millis(50);
            // Out of the way: every request here should pass, however fast the machine.
            s.limits.default.per_minute = Some(1_000_000);
        })
        .start()
        .await
}

/// One request with `key` and how long it took.
async fn timed(client: &reqwest::Client, gw: &Gateway, key: &str) -> (reqwest::Response, Duration) {
    let sent = Instant::now();
    let response = gw.get_with_key(client, "/things", key).await;
    (response, sent.elapsed())
}

async fn readyz(client: &reqwest::Client, gw: &Gateway) -> (StatusCode, Duration) {
    let sent = Instant::now();
    let status = client
        .get(gw.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz")
        .status();
    (status, sent.elapsed())
}

/// A new key of `account`: (id, raw key).
async fn new_key(gw: &Gateway, account: &str, name: &str) -> (String, String) {
    gw.create_key(account, json!({ "name": name, "type": "secret" }))
        .await
}

/// The key's request count as the store has it (`None` while the admin API cannot read it).
async fn stored_requests(gw: &Gateway, account: &str, key_id: &str) -> Option<u64> {
    let path = format!("/v1/accounts/{account}/keys/{key_id}/usage?{ALL_TIME}");
    let (status, body) = gw.admin(Method::GET, &path, None).await;
    if status != StatusCode::OK {
        return None;
    }
    let buckets = body["buckets"].as_array()?;
    Some(
        buckets
            .iter()
            .filter_map(|b: &Value| b["request_count"].as_u64())
            .sum(),
    )
}

fn freeze(redis: &RedisServer) {
    tokio::task::block_in_place(|| redis.pause());
}

fn thaw(redis: &RedisServer) {
    tokio::task::block_in_place(|| redis.resume());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_hung_a_cached_key_never_waits_and_the_rest_fails_fast_fail_open() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gw = gateway(&redis, &upstream, OnStoreError::FailOpen).await;
    let client = client();
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, key) = new_key(&gw, &account, "hot").await;
    // Never used before the freeze: memory knows nothing of it.
    let (_, unused) = new_key(&gw, &account, "cold").await;
    expect_echo(gw.get_with_key(&client, "/things", &key).await).await;
    let mut sent = 1;
    assert_eq!(gw.metric("tollgate_store_breaker_open", &[]).await, 0.0);

    freeze(&redis);
    // (a) The cached key: fresh, then past its ttl again and again; every answer at once.
    let frozen = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut latencies = Vec::new();
    while frozen.elapsed() < FROZEN_FOR {
        let (response, took) = timed(&client, &gw, &key).await;
        expect_echo(response).await;
        sent += 1;
        latencies.push(took);
        slowest = slowest.max(took);
        assert!(
            took < QUICK,
            "request {sent} took {took:?} with redis frozen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort();
    eprintln!(
        "redis frozen, fail_open: {} requests with the cached key over {:?} (ttl {TTL:?}), \
         p50 {:?}, max {slowest:?}",
        latencies.len(),
        frozen.elapsed(),
        latencies[latencies.len() / 2]
    );

    // (b) A key memory does not hold cannot be verified: 503 at once.
    for key in [unused.clone(), credential::generate(Kind::Secret)] {
        let (response, took) = timed(&client, &gw, &key).await;
        expect_refusal(
            response,
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
        )
        .await;
        assert!(took < QUICK, "unknown key took {took:?}");
    }
    // (c) Not ready, said at once.
    let (status, took) = readyz(&client, &gw).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < QUICK, "/readyz took {took:?}");
    // The breaker is open: store calls no longer wait at all.
    assert_eq!(gw.metric("tollgate_store_breaker_open", &[]).await, 1.0);
    // The admin API fails rather than hangs.
    let started = Instant::now();
    let (status, _) = gw
        .admin(
            Method::POST,
            &format!("/v1/accounts/{account}/keys"),
            Some(json!({ "name": "during", "type": "secret" })),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < QUICK,
        "admin took {:?}",
        started.elapsed()
    );

    // (d) Redis thaws: ready again, the breaker closes, every key works.
    thaw(&redis);
    assert!(
        eventually(SETTLE, || async {
            readyz(&client, &gw).await.0 == StatusCode::OK
        })
        .await,
        "/readyz did not recover"
    );
    assert!(
        eventually(SETTLE, || async {
            gw.metric("tollgate_store_breaker_open", &[]).await == 0.0
        })
        .await,
        "the breaker did not close"
    );
    expect_echo(gw.get_with_key(&client, "/things", &unused).await).await;
    let (_, created) = new_key(&gw, &account, "after").await;
    expect_echo(gw.get_with_key(&client, "/things", &created).await).await;
    expect_echo(gw.get_with_key(&client, "/things", &key).await).await;
    sent += 1;

    // (e) Every request with the cached key, during the freeze too, is counted exactly once.
    let counted = eventually(SETTLE, || async {
        let got = stored_requests(&gw, &account, &key_id).await;
        assert!(got.is_none_or(|n| n <= sent), "counted {got:?} of {sent}");
        got == Some(sent)
    })
    .await;
    assert!(
        counted,
        "usage: {:?} of {sent}",
        stored_requests(&gw, &account, &key_id).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_hung_fail_closed_refuses_a_stale_key_at_once() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gw = gateway(&redis, &upstream, OnStoreError::FailClosed).await;
    let client = client();
    let (_, key) = gw.account_with_key().await;
    expect_echo(gw.get_with_key(&client, "/things", &key).await).await;

    freeze(&redis);
    // Fresh, the key passes; once stale and a re-read has failed, it cannot be verified: 503.
    // Every answer at once, whichever it is.
    let mut answers = Vec::new();
    let frozen = Instant::now();
    while frozen.elapsed() < FROZEN_FOR {
        let (response, took) = timed(&client, &gw, &key).await;
        assert!(took < QUICK, "request took {took:?} with redis frozen");
        answers.push(response.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = answers
        .iter()
        .position(|s| *s == StatusCode::SERVICE_UNAVAILABLE)
        .unwrap_or_else(|| panic!("never refused: {answers:?}"));
    assert!(
        answers[..first].iter().all(|s| *s == StatusCode::OK)
            && answers[first..]
                .iter()
                .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE),
        "{answers:?}"
    );
    let (status, took) = readyz(&client, &gw).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(took < QUICK, "/readyz took {took:?}");

    thaw(&redis);
    assert!(
        eventually(SETTLE, || async {
            gw.get_with_key(&client, "/things", &key).await.status() == StatusCode::OK
        })
        .await,
        "the key passes again once Redis answers"
    );
}

/// A gateway whose Redis is behind a [`Relay`], and what it runs on.
async fn relayed() -> (RedisServer, Relay, Upstream, Gateway) {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port()).await;
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .redis(&relay.redis_url())
        .start()
        .await;
    (redis, relay, upstream, gw)
}

/// A connection to Redis gone half-open (up, and nothing passes: a partition, a dropped NAT
/// entry, a hung proxy in front of Redis) is replaced once a call has had no answer and a ping
/// on it none either, and the store works again without a restart. Before, every call failed
/// until the kernel gave up on the connection (up to a quarter of an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_to_redis_is_replaced() {
    let (_redis, relay, _upstream, gw) = relayed().await;
    let create = |name: &'static str| {
        let gw = &gw;
        async move {
            gw.admin(Method::POST, "/v1/accounts", Some(json!({ "name": name })))
                .await
                .0
        }
    };
    assert_eq!(create("before").await, StatusCode::CREATED);
    relay.hold();
    let held = Instant::now();
    let recovered = eventually(SETTLE, || async {
        create("after").await == StatusCode::CREATED
    })
    .await;
    assert!(recovered, "the store did not work again within {SETTLE:?}");
    eprintln!(
        "the store worked again {:.1} s after its connection went half-open",
        held.elapsed().as_secs_f64()
    );
}

/// The same under proxy traffic alone, whose calls have the 50 ms deadline and which opens the
/// breaker at once (so that no longer call reaches the connection): unknown keys get 503
/// `store_unavailable` while the connection is half-open, and 401 `invalid_credential` (the
/// store answered) once it has been replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_is_replaced_under_proxy_traffic_alone() {
    let (_redis, relay, _upstream, gw) = relayed().await;
    let client = client();
    let unknown = || credential::generate(Kind::Secret);
    expect_refusal(
        gw.get_with_key(&client, "/things", &unknown()).await,
        StatusCode::UNAUTHORIZED,
        "invalid_credential",
    )
    .await;
    relay.hold();
    let held = Instant::now();
    let (gw, client) = (&gw, &client);
    let recovered = eventually(SETTLE, || async move {
        let response = gw.get_with_key(client, "/things", &unknown()).await;
        response.status() == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(
        recovered,
        "unknown keys still got no answer from the store after {SETTLE:?}"
    );
    eprintln!(
        "the store answered the proxy again {:.1} s after its connection went half-open",
        held.elapsed().as_secs_f64()
    );
}
