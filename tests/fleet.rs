//! Many instances behind one load balancer, on one Redis (real `redis-server` processes on free
//! ports, never 6379): keys made on one instance pass on the others, deactivations, deletions,
//! rolls and account deactivations reach every instance within a second, global limits hold
//! across the fleet (and refuse nothing while it is under them), usage is counted exactly once,
//! a Redis outage during traffic is survived per `on_store_error` (under global limits too) and
//! logged once, and the admin API's check-then-write rules (last credential, plan limit) hold
//! when two instances take the writes.

mod common;
#[path = "common/redis.rs"]
mod redis_harness;
#[path = "common/relay.rs"]
mod relay;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use http::HeaderValue;
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};
use sha2::Digest;
use tollgate::auth::{self, CachedKey, IdentityValues, RequestFacts};
use tollgate::config::{LimitMode, OnStoreError, RouteScopes, Settings};
use tollgate::credential::{self, Kind};
use tollgate::limits::global::SharedLimiters;
use tollgate::limits::{KeyLimits, LocalBuckets, Quotas, Replace};
use tollgate::metering::{Meter, WallClock};
use tollgate::store::redis::RedisStore;
use tollgate::store::{AuthMethod, KeyType, LimitBuckets, RateLimitSpec};

use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{client, eventually, expect_echo, expect_refusal};
use redis_harness::{RedisCluster, RedisServer};
use relay::Relay;

/// The propagation bound of the contract: a change made on one instance is in force on every
/// instance within this.
const PROPAGATION: Duration = Duration::from_secs(1);
/// How long a state change (readyz flipping, usage reaching its total) may take in these tests.
const SETTLE: Duration = Duration::from_secs(10);
/// The whole-history range of the usage queries.
const ALL_TIME: &str = "interval=month&from=2020-01-01T00:00:00Z&to=2030-01-01T00:00:00Z";

// === helpers ===

/// `n` gateways on the store at `redis_url`, in front of `upstream`, with one master key; each
/// gets `tweak` and its own clock from `clock(i)`.
async fn fleet(
    redis_url: &str,
    upstream: &Upstream,
    n: usize,
    clock: impl Fn(usize) -> WallClock,
    tweak: impl Fn(&mut Settings) + Clone + Send + 'static,
) -> Vec<Gateway> {
    let master = credential::generate(Kind::Master);
    let mut gateways = Vec::with_capacity(n);
    for i in 0..n {
        let gw = Gateway::builder(upstream)
            .redis(redis_url)
            .master(&master)
            .clock(clock(i))
            .tweak(tweak.clone())
            .start()
            .await;
        gateways.push(gw);
    }
    gateways
}

/// Three instances whose cache keeps a key ten minutes: only an invalidation makes them re-read.
async fn long_ttl_fleet(redis: &RedisServer, upstream: &Upstream) -> Vec<Gateway> {
    fleet(&redis.url(), upstream, 3, system, |s| {
        s.cache.ttl = Duration::from_secs(600);
    })
    .await
}

/// The system clock for every instance.
fn system(_: usize) -> WallClock {
    WallClock::System
}

/// `GET /things` on `gw`'s proxy with `key`.
async fn call(client: &reqwest::Client, gw: &Gateway, key: &str) -> Response {
    client
        .get(gw.proxy_url("/things"))
        .bearer_auth(key)
        .send()
        .await
        .expect("proxy request")
}

/// The status of a proxy answer and, for the gateway's own errors, the error code.
async fn outcome(response: Response) -> (StatusCode, Option<String>) {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().map(str::to_owned);
    (status, code)
}

/// `GET /readyz` on `gw`'s admin listener.
async fn readyz(client: &reqwest::Client, gw: &Gateway) -> StatusCode {
    client
        .get(gw.admin_url("/readyz"))
        .send()
        .await
        .expect("readyz request")
        .status()
}

/// Polls `/readyz` until it answers `want`, within [`SETTLE`].
async fn wait_ready(client: &reqwest::Client, gw: &Gateway, want: StatusCode) {
    assert!(
        eventually(SETTLE, || async { readyz(client, gw).await == want }).await,
        "/readyz did not answer {want} within {SETTLE:?}"
    );
}

/// A fresh account and one secret key with `rate_limit` (or the defaults): (account, key id,
/// raw key), made through `gw`.
async fn account_and_key(gw: &Gateway, rate_limit: Option<Value>) -> (String, String, String) {
    // Room for every test's traffic: a 429 would hide what the test looks at.
    let account = gw
        .create_account(json!({
            "name": "fleet",
            "rate_limit": { "per_minute": 100000, "per_hour": 1000000, "per_day": 10000000 }
        }))
        .await;
    let mut body = json!({ "name": "main", "type": "secret" });
    if let Some(limit) = rate_limit {
        body["rate_limit"] = limit;
    }
    let (key_id, key) = gw.create_key(&account, body).await;
    (account, key_id, key)
}

/// The key's usage over all time, summed over its buckets: (requests, success, error); `None`
/// when the admin API cannot answer (the store is down).
async fn usage_total(gw: &Gateway, account: &str, key_id: &str) -> Option<(u64, u64, u64)> {
    let path = format!("/v1/accounts/{account}/keys/{key_id}/usage?{ALL_TIME}");
    let (status, body) = gw.admin(Method::GET, &path, None).await;
    if status != StatusCode::OK {
        return None;
    }
    let buckets = body["buckets"].as_array().expect("usage buckets");
    let sum = |field: &str| {
        buckets
            .iter()
            .map(|b| b[field].as_u64().expect("a count"))
            .sum::<u64>()
    };
    Some((
        sum("request_count"),
        sum("success_count"),
        sum("error_count"),
    ))
}

/// Polls the key's usage on `gw` until its request count is `want` (within [`SETTLE`]), failing
/// at once if it ever passes `want` (something was counted twice).
async fn wait_usage(gw: &Gateway, account: &str, key_id: &str, want: u64) -> (u64, u64, u64) {
    let last = Mutex::new(None);
    let reached = eventually(SETTLE, || {
        let last = &last;
        async move {
            let total = usage_total(gw, account, key_id).await;
            if let Some((requests, _, _)) = total {
                assert!(
                    requests <= want,
                    "usage counted {requests} of {want} requests"
                );
            }
            *last.lock().expect("lock") = total;
            total.is_some_and(|(requests, _, _)| requests == want)
        }
    })
    .await;
    assert!(
        reached,
        "usage did not reach {want} requests within {SETTLE:?}; last seen {last:?}"
    );
    let total = *last.lock().expect("lock");
    total.expect("a usage total")
}

/// `sorted[p%]` by the nearest-rank method.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// Kills Redis as a crash would, but keeps its data as a Redis with persistence would: writes
/// are held first (`CLIENT PAUSE … WRITE`: a write that arrives now is never applied, so the
/// gateway sees it fail and retries it), then the data set is saved (`SAVE`, loaded again by
/// [`RedisServer::restart`] from the same directory), then the process is killed with SIGKILL.
/// The harness's servers run without persistence; without this a restart would come back empty
/// and no "after recovery" total could match.
fn crash_keeping_data(redis: &mut RedisServer) {
    blocking(|| {
        assert_eq!(
            redis
                .command(&["CLIENT", "PAUSE", "30000", "WRITE"])
                .as_deref(),
            Some("OK"),
            "CLIENT PAUSE"
        );
        assert_eq!(redis.command(&["SAVE"]).as_deref(), Some("OK"), "SAVE");
        redis.kill();
    });
}

fn restart(redis: &mut RedisServer) {
    blocking(|| redis.restart());
}

/// Runs `f`, which blocks the thread for a moment: on a multi-thread runtime with
/// `block_in_place`, so that the gateway's tasks move to another worker meanwhile; on the
/// current-thread runtime of the log-reading tests, as it is.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => f(),
        _ => tokio::task::block_in_place(f),
    }
}

/// A change made through one instance that every instance must enforce within [`PROPAGATION`].
#[derive(Debug, Clone, Copy)]
enum Change {
    DeactivateKey,
    DeleteKey,
    /// A roll with no grace: the old key expires at once.
    RollKey,
    /// `PATCH /v1/accounts/{id}` with `active: false`.
    DeactivateAccount,
}

impl Change {
    const ALL: [Change; 4] = [
        Change::DeactivateKey,
        Change::DeleteKey,
        Change::RollKey,
        Change::DeactivateAccount,
    ];

    fn name(self) -> &'static str {
        match self {
            Change::DeactivateKey => "key deactivation",
            Change::DeleteKey => "key deletion",
            Change::RollKey => "key roll (grace 0)",
            Change::DeactivateAccount => "account deactivation",
        }
    }

    /// The error code the key gets once the change is in force.
    fn refusal(self) -> &'static str {
        match self {
            Change::DeactivateKey | Change::DeactivateAccount => "inactive_credential",
            Change::DeleteKey => "invalid_credential",
            Change::RollKey => "expired_credential",
        }
    }

    /// Makes the change to the key through `gw`; a roll answers with the new raw key.
    async fn make(self, gw: &Gateway, account: &str, key_id: &str) -> Option<String> {
        let key_path = format!("/v1/accounts/{account}/keys/{key_id}");
        let (want, (status, body)) = match self {
            Change::DeactivateKey => (
                StatusCode::OK,
                gw.admin(Method::POST, &format!("{key_path}/deactivate"), None)
                    .await,
            ),
            Change::DeleteKey => (
                StatusCode::OK,
                gw.admin(Method::DELETE, &key_path, None).await,
            ),
            Change::RollKey => (
                StatusCode::CREATED,
                gw.admin(
                    Method::POST,
                    &format!("{key_path}/roll"),
                    Some(json!({ "grace": "0s" })),
                )
                .await,
            ),
            Change::DeactivateAccount => (
                StatusCode::OK,
                gw.admin(
                    Method::PATCH,
                    &format!("/v1/accounts/{account}"),
                    Some(json!({ "active": false })),
                )
                .await,
            ),
        };
        assert_eq!(status, want, "{}: {body}", self.name());
        body["key"].as_str().map(str::to_owned)
    }
}

/// Polls `gw` with `key` until it is refused with 401 `code`; how long after `since` that was.
/// Any answer other than a pass or that refusal fails the test, and so does a pass after 5 s.
async fn refused_after(
    client: &reqwest::Client,
    gw: &Gateway,
    key: &str,
    code: &str,
    since: Instant,
) -> Duration {
    loop {
        let (status, got) = outcome(call(client, gw, key).await).await;
        let waited = since.elapsed();
        match status {
            StatusCode::UNAUTHORIZED => {
                assert_eq!(got.as_deref(), Some(code));
                return waited;
            }
            StatusCode::OK => {}
            other => panic!("{other} {got:?} while waiting for {code}"),
        }
        assert!(
            waited < Duration::from_secs(5),
            "the key still passes after {waited:?}; waiting for {code}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `n` instances under global limits on one clock pinned 20 s into the current minute (one
/// minute window throughout), with `tweak`; the clock, to move to the next minute.
async fn global_fleet(
    redis_url: &str,
    upstream: &Upstream,
    n: usize,
    tweak: impl Fn(&mut Settings) + Clone + Send + 'static,
) -> (Arc<AtomicI64>, Vec<Gateway>) {
    let now_ms = Utc::now().timestamp_millis();
    let now = Arc::new(AtomicI64::new(now_ms - now_ms.rem_euclid(60_000) + 20_000));
    let clock = WallClock::Manual(Arc::clone(&now));
    let gws = fleet(
        redis_url,
        upstream,
        n,
        |_| clock.clone(),
        move |s| {
            s.limits.mode = LimitMode::Global;
            tweak(s);
        },
    )
    .await;
    (now, gws)
}

/// A key limit of `per_minute`, with room in the longer windows.
fn per_minute(limit: u32) -> Value {
    json!({ "per_minute": limit, "per_hour": 100_000, "per_day": 1_000_000 })
}

/// `n` requests with `key` on `gw`, one after another `every` apart: the answers.
async fn paced(
    client: &reqwest::Client,
    gw: &Gateway,
    key: &str,
    n: usize,
    every: Duration,
) -> Vec<(StatusCode, Option<String>)> {
    let mut answers = Vec::with_capacity(n);
    for _ in 0..n {
        answers.push(outcome(call(client, gw, key).await).await);
        tokio::time::sleep(every).await;
    }
    answers
}

/// `count` requests with `key` at once, request n on instance n % the fleet's size: the answers.
async fn at_once(
    client: &reqwest::Client,
    gws: &[Gateway],
    key: &str,
    count: usize,
) -> Vec<(StatusCode, Option<String>)> {
    futures_util::future::join_all(
        (0..count)
            .map(|n| async move { outcome(call(client, &gws[n % gws.len()], key).await).await }),
    )
    .await
}

/// Lines logged when `op` starts failing and when it works again.
fn transitions(logs: &common::Logs, op: &str) -> (usize, usize) {
    let op = format!("op=\"{op}\"");
    (
        logs.count(&["store calls failing", &op]),
        logs.count(&["store calls work again", &op]),
    )
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_on_one_instance_passes_on_the_others() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gws = fleet(&redis.url(), &upstream, 3, system, |_| {}).await;
    let client = client();

    let (account, key_id, key) = account_and_key(&gws[0], None).await;
    for (i, gw) in gws.iter().enumerate().skip(1) {
        let echo = expect_echo(call(&client, gw, &key).await).await;
        assert_eq!(
            echo["headers"]["x-tollgate-key-id"], key_id,
            "instance {i} forwards with the key's identity: {echo}"
        );
        // The shared master key works on every instance, and they see one set of records.
        let (status, body) = gw
            .admin(Method::GET, &format!("/v1/accounts/{account}"), None)
            .await;
        assert_eq!(status, StatusCode::OK, "instance {i}: {body}");
        assert_eq!(body["id"], account.as_str());
    }
    // And a key made on another instance passes on the first.
    let (_, key_2) = gws[2]
        .create_key(&account, json!({ "name": "second", "type": "secret" }))
        .await;
    expect_echo(call(&client, &gws[0], &key_2).await).await;
}

/// Keys imported by hash on one instance (contract 5a) work in raw form on another at once, with
/// a ten-minute cache ttl, so only the invalidation channel can tell it: before any import it
/// refuses a credential without tollgate's checksum unread, after the first import it looks such
/// credentials up, and a raw key it had refused (and remembered as unknown) a moment before its
/// import passes within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_imported_on_one_instance_works_on_the_other() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gws = fleet(&redis.url(), &upstream, 2, system, |s| {
        s.cache.ttl = Duration::from_secs(600);
        s.cache.negative_ttl = Duration::from_secs(600);
    })
    .await;
    let client = client();
    let account = gws[0].create_account(json!({ "name": "fleet" })).await;
    let importer = &gws[0];
    let import = |raw: &str, name: &str| {
        let body =
            json!({ "hash": hex::encode(sha2::Sha256::digest(raw.as_bytes())), "name": name });
        let path = format!("/v1/accounts/{account}/keys/import");
        async move {
            let (status, key) = importer.admin(Method::POST, &path, Some(body)).await;
            assert_eq!(status, StatusCode::CREATED, "{key}");
            key
        }
    };

    let first = "sk_live_51Habc_first_0123456789";
    assert_eq!(
        outcome(call(&client, &gws[1], first).await).await,
        (
            StatusCode::UNAUTHORIZED,
            Some("invalid_credential".to_owned())
        )
    );
    let key = import(first, "first").await;
    let passes = |raw: &'static str| {
        let client = &client;
        let gw = &gws[1];
        move || async move { call(client, gw, raw).await.status() == StatusCode::OK }
    };
    assert!(
        eventually(PROPAGATION, passes(first)).await,
        "the imported key does not pass on the other instance within {PROPAGATION:?}"
    );
    let echo = expect_echo(call(&client, &gws[1], first).await).await;
    assert_eq!(echo["headers"]["x-tollgate-key-id"], key["id"]);

    // Refused and remembered as unknown on the other instance, then imported: it passes there
    // within a second, not after the ten-minute negative ttl.
    let second = "sk_live_51Habc_second_0123456789";
    assert_eq!(
        call(&client, &gws[1], second).await.status(),
        StatusCode::UNAUTHORIZED
    );
    import(second, "second").await;
    assert!(
        eventually(PROPAGATION, passes(second)).await,
        "a key refused before its import still does not pass after {PROPAGATION:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_one_instance_is_enforced_on_all_within_a_second() {
    const ROUNDS: usize = 20;
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gws = long_ttl_fleet(&redis, &upstream).await;
    let client = client();
    let mut report = Vec::new();
    for change in Change::ALL {
        // Its "main" key stays active, so that the last-credential rule allows every change to
        // the round's key.
        let (shared_account, _, _) = account_and_key(&gws[0], None).await;
        let mut delays = Vec::with_capacity(ROUNDS * 2);
        for round in 0..ROUNDS {
            let (account, key_id, key) = match change {
                Change::DeactivateAccount => account_and_key(&gws[0], None).await,
                _ => {
                    let name = json!({ "name": format!("round-{round}"), "type": "secret" });
                    let (key_id, key) = gws[0].create_key(&shared_account, name).await;
                    (shared_account.clone(), key_id, key)
                }
            };
            for gw in &gws {
                expect_echo(call(&client, gw, &key).await).await;
            }
            let successor = change.make(&gws[0], &account, &key_id).await;
            let changed = Instant::now();
            // On the instance that made the change, at once.
            expect_refusal(
                call(&client, &gws[0], &key).await,
                StatusCode::UNAUTHORIZED,
                change.refusal(),
            )
            .await;
            let polls = gws[1..]
                .iter()
                .map(|gw| refused_after(&client, gw, &key, change.refusal(), changed));
            delays.extend(futures_util::future::join_all(polls).await);
            // A roll's new key passes everywhere.
            if let Some(successor) = successor {
                for gw in &gws {
                    expect_echo(call(&client, gw, &successor).await).await;
                }
            }
        }
        delays.sort();
        let (p50, p99, max) = (
            percentile(&delays, 50),
            percentile(&delays, 99),
            percentile(&delays, 100),
        );
        eprintln!(
            "{} propagation over {} (instance, key) pairs: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            change.name(),
            delays.len(),
            ms(p50),
            ms(p99),
            ms(max)
        );
        report.push((change, p50, p99, max));
    }
    for (change, p50, p99, max) in report {
        assert!(
            max < PROPAGATION,
            "a {} took {max:?} to reach an instance (p50 {p50:?}, p99 {p99:?})",
            change.name()
        );
    }
}

/// An instance whose connections to Redis went half-open (they stay up and nothing passes, as
/// after a partition or a dropped NAT entry) finds its quiet invalidation channel dead by its
/// pings, subscribes again (and resyncs), and enforces a change made elsewhere long before its
/// cache ttl (ten minutes) would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_an_instance_whose_channel_went_half_open() {
    let redis = RedisServer::start();
    let relay = Relay::start(redis.port()).await;
    let upstream = Upstream::start().await;
    let master = credential::generate(Kind::Master);
    let long_ttl = |s: &mut Settings| s.cache.ttl = Duration::from_secs(600);
    let direct = Gateway::builder(&upstream)
        .redis(&redis.url())
        .master(&master)
        .tweak(long_ttl)
        .start()
        .await;
    let relayed = Gateway::builder(&upstream)
        .redis(&relay.redis_url())
        .master(&master)
        .tweak(long_ttl)
        .start()
        .await;
    let client = client();
    let (account, key_id, key) = account_and_key(&direct, None).await;
    // Cached on the relayed instance, after any invalidation the key's creation published has
    // landed (it would empty the cache, and a held store cannot fill it).
    expect_echo(call(&client, &relayed, &key).await).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    expect_echo(call(&client, &relayed, &key).await).await;
    relay.hold();
    Change::DeactivateAccount
        .make(&direct, &account, &key_id)
        .await;
    let changed = Instant::now();
    loop {
        let (status, got) = outcome(call(&client, &relayed, &key).await).await;
        match status {
            StatusCode::UNAUTHORIZED => {
                assert_eq!(got.as_deref(), Some("inactive_credential"));
                break;
            }
            StatusCode::OK => {}
            other => panic!("{other} {got:?} while waiting for the deactivation"),
        }
        assert!(
            changed.elapsed() < SETTLE,
            "the deactivated key still passes on the half-open instance after {:?}",
            changed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "a change reached the half-open instance after {:.1} s",
        changed.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_limit_holds_across_three_instances() {
    const SENT: usize = 300;
    const CLIENTS: usize = 6;
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let (now, gws) = global_fleet(&redis.url(), &upstream, 3, |_| {}).await;
    let (_, _, key) = account_and_key(&gws[0], Some(per_minute(60))).await;

    let client = client();
    let gws = Arc::new(gws);
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, gws, key, admitted) = (
            client.clone(),
            Arc::clone(&gws),
            key.clone(),
            Arc::clone(&admitted),
        );
        tasks.push(tokio::spawn(async move {
            // Client c sends requests c, c + CLIENTS, …, request n to instance n % 3.
            for n in (c..SENT).step_by(CLIENTS) {
                let response = call(&client, &gws[n % 3], &key).await;
                if response.status() == StatusCode::TOO_MANY_REQUESTS {
                    // Every 429 carries the limit headers and Retry-After (contract §4).
                    assert_eq!(
                        common::header(&response, "ratelimit-limit"),
                        Some("60"),
                        "request {n}: RateLimit-Limit on a 429"
                    );
                    assert!(
                        common::header(&response, "retry-after")
                            .and_then(|v| v.parse::<u64>().ok())
                            .is_some_and(|s| (1..=60).contains(&s)),
                        "request {n}: Retry-After on a 429"
                    );
                }
                let (status, code) = outcome(response).await;
                match status {
                    StatusCode::OK => {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    StatusCode::TOO_MANY_REQUESTS => {
                        assert_eq!(code.as_deref(), Some("rate_limited"));
                    }
                    other => panic!("request {n}: {other} {code:?}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("client");
    }
    let admitted = admitted.load(Ordering::Relaxed);
    eprintln!("global limit 60/minute over 3 instances: {admitted} of {SENT} requests admitted");
    // Never more than the limit; fewer only by the leases left on instances (3 × 1 token).
    assert!(
        (57..=60).contains(&admitted),
        "{admitted} requests admitted under a fleet-wide limit of 60/minute"
    );

    // The next minute has room again, on every instance.
    now.fetch_add(60_000, Ordering::SeqCst);
    for (i, gw) in gws.iter().enumerate() {
        let response = call(&client, gw, &key).await;
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "instance {i} in the next minute"
        );
    }
}

/// An account's `shared_rate_limit` under global limits: three keys on three instances draw on
/// one fleet-wide set of buckets, on top of their own roomy ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_shared_limit_holds_across_instances_and_keys() {
    const SENT: usize = 90;
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    // fail_closed: a refill that misses its deadline on a loaded machine refuses (503) rather
    // than falling back to each instance's own buckets, so the count stays exact.
    let (_now, gws) = global_fleet(&redis.url(), &upstream, 3, |s| {
        s.limits.on_store_error = OnStoreError::FailClosed;
    })
    .await;
    let account = gws[0]
        .create_account(json!({
            "name": "shared",
            "shared_rate_limit": { "per_minute": 30 }
        }))
        .await;
    let mut keys = Vec::new();
    for i in 0..3 {
        let body = json!({ "name": format!("k{i}"), "rate_limit": per_minute(1000) });
        keys.push(gws[0].create_key(&account, body).await.1);
    }
    let client = client();
    // Each key used once on each instance first, one at a time, so that the burst finds them
    // cached: a cold key waits for a store read, which a loaded machine may see time out (503).
    let mut admitted = 0;
    for gw in &gws {
        for key in &keys {
            assert_eq!(call(&client, gw, key).await.status(), StatusCode::OK);
            admitted += 1;
        }
    }
    let mut tasks = Vec::new();
    let gws = Arc::new(gws);
    for n in admitted..SENT {
        let (client, gws, key) = (client.clone(), Arc::clone(&gws), keys[n % 3].clone());
        tasks.push(tokio::spawn(async move {
            let response = call(&client, &gws[(n / 3) % 3], &key).await;
            outcome(response).await
        }));
    }
    let mut store_down = 0;
    for task in tasks {
        match task.await.expect("request") {
            (StatusCode::OK, _) => admitted += 1,
            (StatusCode::TOO_MANY_REQUESTS, code) => {
                assert_eq!(code.as_deref(), Some("rate_limited"))
            }
            (StatusCode::SERVICE_UNAVAILABLE, code) => {
                assert_eq!(code.as_deref(), Some("store_unavailable"));
                store_down += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    eprintln!(
        "shared limit 30/minute over 3 keys on 3 instances: {admitted} of {SENT} admitted, \
         {store_down} refused while a refill missed its deadline"
    );
    // Never more than the limit; fewer only by the leases left on instances (3 × 1 token), or
    // while the store was slow.
    assert!(admitted <= 30, "{admitted} admitted");
    assert!(admitted + store_down >= 27, "{admitted} admitted");
}

/// `GET …/keys/{key_id}` `remaining` on `gw`.
async fn remaining(gw: &Gateway, account: &str, key_id: &str) -> i64 {
    let (status, key) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/v1/accounts/{account}/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    key["remaining"].as_i64().expect("remaining")
}

/// `remaining` once `done` says so (within 5 s), else the test fails with the last value.
async fn remaining_until(
    gw: &Gateway,
    account: &str,
    key_id: &str,
    done: impl Fn(i64) -> bool,
) -> i64 {
    let mut last = 0;
    for _ in 0..50 {
        last = remaining(gw, account, key_id).await;
        if done(last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("remaining stayed at {last}");
}

/// Credits spent by three instances at once come out exact: every admitted request spent one,
/// none twice, and once the leases are handed back the balance is exactly what was not spent. An
/// instance killed while holding a lease loses none of it: after its silence the store takes it
/// back, and at most what it spent since its last report is spent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_spent_by_three_instances_are_exact_and_a_dead_ones_lease_returns() {
    const CREDITS: i64 = 100;
    const SENT: usize = 150;
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    // fail_closed: a take that misses its deadline on a loaded machine refuses (503) instead of
    // spending on trust, so that every admitted request is one the store granted.
    let (now, mut gws) = global_fleet(&redis.url(), &upstream, 3, |s| {
        s.limits.on_store_error = OnStoreError::FailClosed;
    })
    .await;
    let (account, key_id, key) = account_and_key(&gws[0], Some(per_minute(100_000))).await;
    let (status, set) = gws[0]
        .admin(
            reqwest::Method::POST,
            &format!("/v1/accounts/{account}/keys/{key_id}/credits"),
            Some(json!({ "set": CREDITS })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    let client = client();
    let gws_at_once = Arc::new(std::mem::take(&mut gws));
    let mut tasks = Vec::new();
    for n in 0..SENT {
        let (client, gws, key) = (client.clone(), Arc::clone(&gws_at_once), key.clone());
        tasks.push(tokio::spawn(async move {
            outcome(call(&client, &gws[n % 3], &key).await).await
        }));
    }
    let (mut admitted, mut store_down) = (0i64, 0);
    for task in tasks {
        match task.await.expect("request") {
            (StatusCode::OK, _) => admitted += 1,
            (StatusCode::TOO_MANY_REQUESTS, code) => {
                assert_eq!(code.as_deref(), Some("usage_exceeded"))
            }
            (StatusCode::SERVICE_UNAVAILABLE, _) => store_down += 1,
            other => panic!("{other:?}"),
        }
    }
    eprintln!("{CREDITS} credits, {SENT} requests on 3 instances: {admitted} admitted, {store_down} store_unavailable");
    assert!(admitted <= CREDITS, "{admitted} admitted");
    // Fewer only while the last credits sat in another instance's lease (a few each), or while
    // the store missed a deadline.
    assert!(admitted + store_down >= CREDITS - 9, "{admitted} admitted");
    // Idle leases go back (the instances' clocks move a second on; the task runs each second).
    now.fetch_add(2_000, Ordering::SeqCst);
    let mut gws = Arc::try_unwrap(gws_at_once).unwrap_or_else(|_| panic!("gateways shared"));
    let left = CREDITS - admitted;
    remaining_until(&gws[1], &account, &key_id, |n| n == left).await;

    // Instance 2 spends 10 and is killed holding what is left of its lease.
    let (_, set) = gws[0]
        .admin(
            reqwest::Method::POST,
            &format!("/v1/accounts/{account}/keys/{key_id}/credits"),
            Some(json!({ "set": 50 })),
        )
        .await;
    assert_eq!(set["remaining"], 50);
    for _ in 0..10 {
        assert_eq!(call(&client, &gws[2], &key).await.status(), StatusCode::OK);
    }
    gws.pop().expect("instance 2").kill();
    // Its silence outlasts the lease ttl: the store takes its lease back on the next call.
    now.fetch_add(31_000, Ordering::SeqCst);
    assert_eq!(call(&client, &gws[0], &key).await.status(), StatusCode::OK);
    now.fetch_add(2_000, Ordering::SeqCst);
    // 11 spent: 39 left, plus at most what instance 2 spent since its last report (one
    // lease: 50 / 20 + 1 = 3 credits).
    let last = remaining_until(&gws[1], &account, &key_id, |n| (39..=42).contains(&n)).await;
    eprintln!("after instance 2 died: {last} of 50 left, 11 spent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_burst_under_the_global_limit_is_never_refused() {
    // 15 requests at once on each of 3 instances, under a fleet-wide 60/minute whose leases are
    // one token each: every request but one per instance finds its lease empty.
    const BURST: usize = 45;
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let (_now, gws) = global_fleet(&redis.url(), &upstream, 3, |_| {}).await;
    let (_, _, key) = account_and_key(&gws[0], Some(per_minute(60))).await;
    let client = client();
    // The key cached on every instance (3 of the 60), and a connection open for every request
    // of the burst (a malformed credential costs no token), so that the burst arrives at once.
    for gw in &gws {
        expect_echo(call(&client, gw, &key).await).await;
    }
    at_once(&client, &gws, "tgsk_not-a-key", BURST).await;
    let answers = at_once(&client, &gws, &key, BURST).await;
    let refused: Vec<_> = answers
        .iter()
        .enumerate()
        .filter(|(_, (status, _))| *status != StatusCode::OK)
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {BURST} concurrent requests were refused while the fleet was under its limit of \
         60/minute: {refused:?}",
        refused.len()
    );
    // What is left of the window is still the fleet's, and no more: 12, less at most the
    // leases left on the instances (one token each).
    let mut admitted = 0;
    for n in 0..30 {
        let (status, code) = outcome(call(&client, &gws[n % 3], &key).await).await;
        match status {
            StatusCode::OK => admitted += 1,
            StatusCode::TOO_MANY_REQUESTS => assert_eq!(code.as_deref(), Some("rate_limited")),
            other => panic!("request {n} after the burst: {other} {code:?}"),
        }
    }
    eprintln!("global limit 60/minute: a burst of {BURST} all admitted, then {admitted} of 30");
    assert!(
        (9..=12).contains(&admitted),
        "{admitted} more admitted after a burst of {BURST} under 60/minute"
    );
}

/// A key as the proxy would have cached it, its limits drawn from `shared` (one instance's).
fn cached_key(shared: &SharedLimiters, key_id: &str, per_minute: u32) -> CachedKey {
    let (key_id, account_id): (Arc<str>, Arc<str>) = (Arc::from(key_id), Arc::from("acc_race"));
    let spec = RateLimitSpec {
        per_minute: Some(per_minute),
        per_hour: Some(100_000),
        per_day: Some(1_000_000),
    };
    let quotas = Quotas::resolve(Some(&spec), None, &spec);
    let state = Meter::new(WallClock::System).key(&key_id, &account_id, quotas, Replace::IfChanged);
    let fallback = LocalBuckets::Key(Arc::clone(&state));
    let value = HeaderValue::from_static("x");
    CachedKey {
        access_token: false,
        key_type: KeyType::Secret,
        key_active: true,
        account_active: true,
        auth_method: AuthMethod::ApiKey,
        expires_at_ms: None,
        shadow: false,
        rules: None,
        credits: None,
        metadata: None,
        limiter: KeyLimits::Global(shared.for_key(
            &account_id,
            &key_id,
            quotas,
            fallback,
            Replace::IfChanged,
        )),
        shared_limits: None,
        state,
        identity: IdentityValues {
            account_id: Arc::new(value),
            scopes: None,
            external_id: None,
            limits: Default::default(),
        },
    }
}

/// The decision itself, without HTTP in between: many requests at once on every instance find
/// their lease empty, and the ones whose refill another request spent first must wait for the
/// next rather than be refused. (Over HTTP the requests arrive too far apart to hit this often.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_decisions_under_the_global_limit_are_never_refused() {
    const ROUNDS: usize = 30;
    const PER_INSTANCE: usize = 50;
    // Leases of one token: every request past the first finds its lease empty.
    const LIMIT: u32 = 199;
    let redis = RedisServer::start();
    let metrics = tollgate::metrics::Metrics::new().expect("metrics");
    let mut instances = Vec::new();
    for _ in 0..3 {
        let store: Arc<dyn LimitBuckets> =
            Arc::new(RedisStore::connect(&redis.url()).await.expect("redis"));
        instances.push(SharedLimiters::new(store, OnStoreError::FailOpen, &metrics));
    }
    let scopes = RouteScopes::default();
    let mut refused = Vec::new();
    for round in 0..ROUNDS {
        let key_id = format!("key_race_{round}");
        let keys: Vec<Arc<CachedKey>> = instances
            .iter()
            .map(|shared| Arc::new(cached_key(shared, &key_id, LIMIT)))
            .collect();
        let now_ms = Utc::now().timestamp_millis();
        let mut tasks = Vec::new();
        for n in 0..3 * PER_INSTANCE {
            let key = Arc::clone(&keys[n % 3]);
            let scopes = scopes.clone();
            tasks.push(tokio::spawn(async move {
                let facts = RequestFacts {
                    method: &Method::GET,
                    client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
                    origin: None,
                    referer: None,
                    scopes: &scopes,
                    shadow: false,
                    cost: 1,
                    required_scope: None,
                    now_ms,
                };
                auth::decide(&key, &facts).await.err().map(|(r, _)| r)
            }));
        }
        for task in tasks {
            if let Some(refusal) = task.await.expect("decision") {
                refused.push((round, refusal));
            }
        }
    }
    assert!(
        refused.is_empty(),
        "{} of {} decisions refused while the fleet was under its limit: {refused:?}",
        refused.len(),
        ROUNDS * 3 * PER_INSTANCE
    );
}

// The outage tests below read the logs: tokio's current-thread runtime, so that every task of
// the gateway logs on the test's thread.

/// One instance under global limits with `on_store_error`, a key of 10/minute that has passed
/// three times; Redis crashes, paced traffic goes on for 1.6 s (so that the limiter tries Redis
/// again after its 1 s pause), and `judge` looks at the answers. Every failed `take_tokens` is
/// counted and the outage logged once; after Redis comes back the key passes on the shared
/// counters again, and the recovery is logged once.
async fn global_limits_outage(
    on_store_error: OnStoreError,
    judge: impl FnOnce(&[(StatusCode, Option<String>)]),
) {
    let logs = common::capture_logs();
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gws = fleet(&redis.url(), &upstream, 1, system, move |s| {
        s.limits.mode = LimitMode::Global;
        s.limits.on_store_error = on_store_error;
    })
    .await;
    let gw = &gws[0];
    let client = client();
    let (_, _, key) = account_and_key(gw, Some(per_minute(10))).await;
    for _ in 0..3 {
        expect_echo(call(&client, gw, &key).await).await;
    }

    crash_keeping_data(&mut redis);
    judge(&paced(&client, gw, &key, 20, Duration::from_millis(80)).await);
    let errors = gw
        .metric("tollgate_store_errors_total", &[("op", "take_tokens")])
        .await;
    assert!(errors >= 2.0, "take_tokens failures counted: {errors}");
    assert_eq!(transitions(&logs, "take_tokens"), (1, 0), "{}", logs.text());

    restart(&mut redis);
    assert!(
        eventually(SETTLE, || async {
            call(&client, gw, &key).await.status() == StatusCode::OK
        })
        .await,
        "the key passes on the shared counters again"
    );
    for _ in 0..3 {
        expect_echo(call(&client, gw, &key).await).await;
    }
    assert_eq!(transitions(&logs, "take_tokens"), (1, 1), "{}", logs.text());
}

#[tokio::test]
async fn global_limits_with_redis_down_fail_open_serve_cached_keys_on_local_limits() {
    global_limits_outage(OnStoreError::FailOpen, |answers| {
        // The cached key passes until its own minute bucket on this instance (10) is spent, then
        // is rate limited; never a 503. (One more may pass on a token leased before the outage,
        // one on the bucket's refill.)
        let passed = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
        let limited = (
            StatusCode::TOO_MANY_REQUESTS,
            Some("rate_limited".to_owned()),
        );
        assert!(
            answers
                .iter()
                .all(|a| a.0 == StatusCode::OK || *a == limited),
            "{answers:?}"
        );
        assert!((10..=12).contains(&passed), "{passed} passed: {answers:?}");
    })
    .await;
}

#[tokio::test]
async fn global_limits_with_redis_down_fail_closed_answer_503() {
    global_limits_outage(OnStoreError::FailClosed, |answers| {
        // A token leased before the outage may still be spent; after that the limits cannot be
        // verified: 503 store_unavailable, every time.
        let unavailable = (
            StatusCode::SERVICE_UNAVAILABLE,
            Some("store_unavailable".to_owned()),
        );
        let first = answers
            .iter()
            .position(|a| *a == unavailable)
            .unwrap_or_else(|| panic!("never refused: {answers:?}"));
        assert!(first <= 1, "{answers:?}");
        assert!(
            answers[first..].iter().all(|a| *a == unavailable),
            "{answers:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_outage_is_logged_once_by_readyz_and_the_admin_api_not_per_request() {
    let logs = common::capture_logs();
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gws = fleet(&redis.url(), &upstream, 1, system, |_| {}).await;
    let gw = &gws[0];
    let client = client();
    wait_ready(&client, gw, StatusCode::OK).await;

    crash_keeping_data(&mut redis);
    for _ in 0..5 {
        assert_eq!(readyz(&client, gw).await, StatusCode::SERVICE_UNAVAILABLE);
        let (status, body) = gw.admin(Method::GET, "/v1/accounts", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    }
    assert_eq!(transitions(&logs, "ping"), (1, 0), "{}", logs.text());
    assert_eq!(transitions(&logs, "admin"), (1, 0), "{}", logs.text());
    let errors = |op: &'static str| async move {
        gw.metric("tollgate_store_errors_total", &[("op", op)])
            .await
    };
    assert_eq!(errors("admin").await, 5.0);
    assert!(errors("ping").await >= 5.0);

    restart(&mut redis);
    wait_ready(&client, gw, StatusCode::OK).await;
    for _ in 0..3 {
        assert_eq!(readyz(&client, gw).await, StatusCode::OK);
        let (status, body) = gw.admin(Method::GET, "/v1/accounts", None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(transitions(&logs, "ping"), (1, 1), "{}", logs.text());
    assert_eq!(transitions(&logs, "admin"), (1, 1), "{}", logs.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_from_three_instances_is_counted_exactly_once() {
    const PER_CLIENT: usize = 100;
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    // Each instance on its own pinned clock, the middle one latest: `last_used_at` must be the
    // latest use across the fleet, whichever instance flushes last.
    let now_ms = Utc::now().timestamp_millis();
    let base = now_ms - now_ms.rem_euclid(60_000) + 10_000;
    let offsets = [0, 3_000, 1_000];
    let flush_fast = |s: &mut Settings| {
        s.metering.flush_interval = Duration::from_millis(50);
        s.limits.default = RateLimitSpec {
            per_minute: Some(1_000_000),
            per_hour: Some(1_000_000),
            per_day: Some(1_000_000),
        };
    };
    let gws = fleet(
        &redis.url(),
        &upstream,
        3,
        |i| WallClock::Manual(Arc::new(AtomicI64::new(base + offsets[i]))),
        flush_fast,
    )
    .await;
    let (account, key_id, key) = account_and_key(&gws[0], None).await;

    let client = client();
    let gws = Arc::new(gws);
    let mut tasks = Vec::new();
    for c in 0..3 {
        let (client, gws, key) = (client.clone(), Arc::clone(&gws), key.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_CLIENT {
                expect_echo(call(&client, &gws[(c + i) % 3], &key).await).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("client");
    }
    let sent = 3 * PER_CLIENT as u64;
    let total = wait_usage(&gws[1], &account, &key_id, sent).await;
    assert_eq!(total, (sent, sent, 0), "(requests, success, error)");

    let (status, body) = gws[2]
        .admin(
            Method::GET,
            &format!("/v1/accounts/{account}/usage/keys"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let entry = body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["key_id"] == key_id.as_str())
        .unwrap_or_else(|| panic!("the key in {body}"))
        .clone();
    let last_used: DateTime<Utc> = entry["last_used_at"]
        .as_str()
        .unwrap_or_else(|| panic!("last_used_at in {entry}"))
        .parse()
        .expect("last_used_at is RFC 3339");
    assert_eq!(
        last_used.timestamp_millis(),
        base + 3_000,
        "last_used_at is the latest use on any instance: {entry}"
    );

    // Stopping flushes whatever is left; nothing may be written twice.
    let gws = Arc::into_inner(gws).expect("clients are done");
    let mut dirs = Vec::new();
    for gw in gws {
        dirs.push(gw.stop().await);
    }
    let master = credential::generate(Kind::Master);
    let reader = Gateway::builder(&upstream)
        .redis(&redis.url())
        .master(&master)
        .start()
        .await;
    assert_eq!(
        usage_total(&reader, &account, &key_id).await,
        Some((sent, sent, 0)),
        "the total after every instance stopped"
    );
}

/// Steady traffic with one key on one gateway, one request at a time, until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<(StatusCode, Option<String>)>>,
}

impl Traffic {
    fn start(client: &reqwest::Client, gw: &Gateway, key: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (client, url, key) = (client.clone(), gw.proxy_url("/things"), key.to_owned());
        let (stop_flag, counter) = (Arc::clone(&stop), Arc::clone(&sent));
        let task = tokio::spawn(async move {
            let mut refused = Vec::new();
            while !stop_flag.load(Ordering::Relaxed) {
                let response = client
                    .get(&url)
                    .bearer_auth(&key)
                    .send()
                    .await
                    .expect("proxy request");
                counter.fetch_add(1, Ordering::Relaxed);
                let (status, code) = outcome(response).await;
                if status != StatusCode::OK {
                    refused.push((status, code));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            refused
        });
        Traffic { stop, sent, task }
    }

    /// Requests sent so far.
    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops; (requests sent, the answers other than 200).
    async fn stop(self) -> (u64, Vec<(StatusCode, Option<String>)>) {
        self.stop.store(true, Ordering::Relaxed);
        let refused = self.task.await.expect("traffic");
        (self.sent.load(Ordering::Relaxed), refused)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fail_open() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gws = fleet(&redis.url(), &upstream, 1, system, |s| {
        s.metering.flush_interval = Duration::from_millis(50);
    })
    .await;
    let gw = &gws[0];
    let client = client();
    wait_ready(&client, gw, StatusCode::OK).await;
    let (account, key_id, key) = account_and_key(gw, None).await;
    expect_echo(call(&client, gw, &key).await).await;
    let mut sent = 1;

    // Redis dies during traffic, and comes back.
    let traffic = Traffic::start(&client, gw, &key);
    assert!(
        eventually(SETTLE, || async {
            usage_total(gw, &account, &key_id)
                .await
                .is_some_and(|(n, _, _)| n > 5)
        })
        .await,
        "traffic is counted before the outage"
    );
    crash_keeping_data(&mut redis);
    let at_crash = traffic.sent();
    wait_ready(&client, gw, StatusCode::SERVICE_UNAVAILABLE).await;
    // The cached key keeps passing (the traffic task checks every answer), more of it now.
    for _ in 0..20 {
        expect_echo(call(&client, gw, &key).await).await;
        sent += 1;
    }
    // A key this instance never saw cannot be verified: refused, not let in.
    let unknown = credential::generate(Kind::Secret);
    expect_refusal(
        call(&client, gw, &unknown).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
    )
    .await;
    // So is a malformed one, without a lookup.
    expect_refusal(
        call(&client, gw, "tgsk_not-a-key").await,
        StatusCode::UNAUTHORIZED,
        "invalid_credential",
    )
    .await;
    let at_restart = traffic.sent();
    assert!(at_restart > at_crash, "traffic went on during the outage");
    restart(&mut redis);
    wait_ready(&client, gw, StatusCode::OK).await;
    let (during, refused) = traffic.stop().await;
    sent += during;
    assert!(
        refused.is_empty(),
        "the cached key was refused during the outage (fail_open): {refused:?}"
    );
    for _ in 0..5 {
        expect_echo(call(&client, gw, &key).await).await;
        sent += 1;
    }
    eprintln!("fail_open outage: {sent} requests with the cached key, all passed");
    // Counts held while Redis was away are written once it is back: nothing lost, nothing twice.
    let total = wait_usage(gw, &account, &key_id, sent).await;
    assert_eq!(total, (sent, sent, 0), "(requests, success, error)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fail_closed() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gws = fleet(&redis.url(), &upstream, 1, system, |s| {
        s.limits.on_store_error = OnStoreError::FailClosed;
        s.cache.ttl = Duration::from_millis(300);
        s.metering.flush_interval = Duration::from_millis(50);
    })
    .await;
    let gw = &gws[0];
    let client = client();
    wait_ready(&client, gw, StatusCode::OK).await;
    let (_, _, key) = account_and_key(gw, None).await;
    expect_echo(call(&client, gw, &key).await).await;

    crash_keeping_data(&mut redis);
    wait_ready(&client, gw, StatusCode::SERVICE_UNAVAILABLE).await;
    // Once its entry is stale the key cannot be verified: 503, never a pass, never a 401.
    let last = Mutex::new(None);
    let refused = eventually(SETTLE, || {
        let (client, key, last) = (&client, &key, &last);
        async move {
            let got = outcome(call(client, gw, key).await).await;
            assert!(
                got.0 == StatusCode::OK || got.0 == StatusCode::SERVICE_UNAVAILABLE,
                "while Redis is down: {got:?}"
            );
            *last.lock().expect("lock") = Some(got.clone());
            got == (
                StatusCode::SERVICE_UNAVAILABLE,
                Some("store_unavailable".to_owned()),
            )
        }
    })
    .await;
    assert!(
        refused,
        "the key was not refused with 503 store_unavailable: {last:?}"
    );
    expect_refusal(
        call(&client, gw, &key).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
    )
    .await;
    expect_refusal(
        call(&client, gw, &credential::generate(Kind::Secret)).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
    )
    .await;

    restart(&mut redis);
    wait_ready(&client, gw, StatusCode::OK).await;
    assert!(
        eventually(SETTLE, || async {
            call(&client, gw, &key).await.status() == StatusCode::OK
        })
        .await,
        "the key passes again once Redis is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_fleet() {
    let cluster = tokio::task::block_in_place(RedisCluster::start);
    let upstream = Upstream::start().await;
    let gws = fleet(&cluster.url(), &upstream, 2, system, |s| {
        s.cache.ttl = Duration::from_secs(600);
    })
    .await;
    let client = client();
    let (account, _, _) = account_and_key(&gws[0], None).await;
    let (key_id, key) = gws[0]
        .create_key(&account, json!({ "name": "second", "type": "secret" }))
        .await;
    for gw in &gws {
        expect_echo(call(&client, gw, &key).await).await;
    }
    let path = format!("/v1/accounts/{account}/keys/{key_id}/deactivate");
    let (status, body) = gws[0].admin(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::OK, "deactivate: {body}");
    let deactivated = Instant::now();
    assert!(
        eventually(PROPAGATION, || async {
            outcome(call(&client, &gws[1], &key).await).await
                == (
                    StatusCode::UNAUTHORIZED,
                    Some("inactive_credential".to_owned()),
                )
        })
        .await,
        "the deactivation did not reach the other instance within {PROPAGATION:?}"
    );
    eprintln!(
        "cluster: deactivation reached the other instance after {:.1} ms",
        ms(deactivated.elapsed())
    );
    // And back: an activation on the second instance reaches the first.
    let path = format!("/v1/accounts/{account}/keys/{key_id}/activate");
    let (status, body) = gws[1].admin(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::OK, "activate: {body}");
    assert!(
        eventually(PROPAGATION, || async {
            call(&client, &gws[0], &key).await.status() == StatusCode::OK
        })
        .await,
        "the activation did not reach the first instance within {PROPAGATION:?}"
    );
}

/// Concurrent admin writes through different instances (a load balancer in front of the admin
/// listeners sends them anywhere) must not both pass a check that only one of them may: here
/// two deactivations, of an account's only two secret keys, on two instances at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_credential_rule_holds_across_instances() {
    const ROUNDS: usize = 20;
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gws = fleet(&redis.url(), &upstream, 2, system, |_| {}).await;
    let mut broken = Vec::new();
    for round in 0..ROUNDS {
        let (account, first, _) = account_and_key(&gws[0], None).await;
        let (second, _) = gws[0]
            .create_key(&account, json!({ "name": "second", "type": "secret" }))
            .await;
        let deactivate = |key_id: &str| format!("/v1/accounts/{account}/keys/{key_id}/deactivate");
        let (path_a, path_b) = (deactivate(&first), deactivate(&second));
        let ((a, body_a), (b, body_b)) = tokio::join!(
            gws[0].admin(Method::POST, &path_a, None),
            gws[1].admin(Method::POST, &path_b, None),
        );
        for (status, body) in [(a, &body_a), (b, &body_b)] {
            if status != StatusCode::OK {
                assert_eq!(status, StatusCode::CONFLICT, "{body}");
                assert_eq!(body["error"]["code"], "last_credential", "{body}");
            }
        }
        let (_, keys) = gws[1]
            .admin(Method::GET, &format!("/v1/accounts/{account}/keys"), None)
            .await;
        let active = keys["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .filter(|k| k["active"] == true)
            .count();
        if active == 0 {
            broken.push((round, a.as_u16(), b.as_u16()));
        }
    }
    assert!(
        broken.is_empty(),
        "in {} of {ROUNDS} rounds both of an account's two secret keys were deactivated, one on \
         each instance, leaving none active (one must be 409 last_credential); \
         (round, status A, status B): {broken:?}",
        broken.len()
    );
}

/// The same across instances for a plan limit: three creations at once on an account allowed
/// one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_limit_holds_across_instances() {
    const ROUNDS: usize = 20;
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gws = fleet(&redis.url(), &upstream, 3, system, |_| {}).await;
    let mut broken = Vec::new();
    for round in 0..ROUNDS {
        let account = gws[0]
            .create_account(json!({ "name": "small", "plan": { "max_keys": 1 } }))
            .await;
        let path = format!("/v1/accounts/{account}/keys");
        let create = |gw: &'static str| json!({ "name": gw, "type": "secret" });
        let (a, b, c) = tokio::join!(
            gws[0].admin(Method::POST, &path, Some(create("a"))),
            gws[1].admin(Method::POST, &path, Some(create("b"))),
            gws[2].admin(Method::POST, &path, Some(create("c"))),
        );
        for (status, body) in [&a, &b, &c] {
            if *status != StatusCode::CREATED {
                assert_eq!(*status, StatusCode::CONFLICT, "{body}");
                assert_eq!(body["error"]["code"], "plan_limit", "{body}");
            }
        }
        let (_, keys) = gws[0].admin(Method::GET, &path, None).await;
        let held = keys["keys"].as_array().expect("keys").len();
        if held != 1 {
            broken.push((round, held));
        }
    }
    assert!(
        broken.is_empty(),
        "an account with plan.max_keys = 1 got more keys in {} of {ROUNDS} rounds \
         (round, keys): {broken:?}",
        broken.len()
    );
}

/// Deleting a client secret on one instance revokes the tokens it issued on every instance
/// within the second, though each holds the token in its cache for ten minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_client_secret_revokes_its_tokens_on_every_instance_within_a_second() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let gws = long_ttl_fleet(&redis, &upstream).await;
    let client = client();
    let account = gws[0]
        .create_account(json!({ "name": "oauth fleet", "auth_method": "any" }))
        .await;
    let path = format!("/v1/accounts/{account}/secrets");
    let (_, secret) = gws[0].admin(reqwest::Method::POST, &path, None).await;
    let raw = secret["client_secret"].as_str().expect("secret").to_owned();
    let r = client
        .post(gws[1].proxy_url("/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", account.as_str()),
            ("client_secret", raw.as_str()),
        ])
        .send()
        .await
        .expect("token request");
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.expect("json");
    let token = answer["access_token"].as_str().expect("token").to_owned();
    for gw in &gws {
        expect_echo(call(&client, gw, &token).await).await;
    }
    let secret_id = secret["id"].as_str().expect("id");
    let (status, _) = gws[2]
        .admin(
            reqwest::Method::DELETE,
            &format!("{path}/{secret_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let deleted = Instant::now();
    let polls = gws
        .iter()
        .map(|gw| refused_after(&client, gw, &token, "invalid_credential", deleted));
    for delay in futures_util::future::join_all(polls).await {
        assert!(delay < PROPAGATION, "revoked only after {delay:?}");
    }
}
