//! Quotas and owners (contract section 5a, and `shadow` of section 2) through the proxy and the
//! admin API: shadow mode on a route and on a key, an account's shared limit, and credits
//! (spent by route cost or the upstream's `X-Tollgate-Cost`, refused with `usage_exceeded`,
//! refilled, changed by PATCH and `…/credits`). Every test starts its own upstream and gateway
//! on port 0; the fleet-wide credit tests are in `fleet.rs`.

mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{client, expect_echo, expect_refusal, header};

/// `api` at `/` as usual, and `trial` at `/trial` in shadow mode.
fn routes(upstream: &Upstream) -> String {
    let url = upstream.url();
    format!(
        r#"
[[routes]]
name = "api"
path_prefix = "/"
upstreams = ["{url}"]

[[routes]]
name = "trial"
path_prefix = "/trial"
upstreams = ["{url}"]
shadow = true

[[routes]]
name = "pricey"
path_prefix = "/pricey"
upstreams = ["{url}"]
cost = 3

[[routes]]
name = "free"
path_prefix = "/free"
upstreams = ["{url}"]
cost = 0
"#
    )
}

async fn rate_limited(gw: &Gateway, window: &str, shadow: &str) -> f64 {
    gw.metric(
        "tollgate_rate_limited_total",
        &[("window", window), ("shadow", shadow)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_route_counts_its_limits_and_refuses_nothing() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .routes(routes(&upstream))
        .start()
        .await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (_, key) = gw
        .create_key(
            &account,
            json!({ "name": "k", "rate_limit": { "per_minute": 2 } }),
        )
        .await;
    let client = client();

    for remaining in ["1", "0"] {
        let passed = gw.get_with_key(&client, "/trial/x", &key).await;
        assert_eq!(header(&passed, "ratelimit-remaining"), Some(remaining));
        expect_echo(passed).await;
    }
    // Over the limit: passed, with the headers of the window that would have refused it.
    for _ in 0..2 {
        let over = gw.get_with_key(&client, "/trial/x", &key).await;
        assert_eq!(over.status(), StatusCode::OK);
        assert_eq!(header(&over, "ratelimit-remaining"), Some("0"));
        assert_eq!(header(&over, "x-ratelimit-remaining-minute"), Some("0"));
        assert!(header(&over, "retry-after").is_none());
        expect_echo(over).await;
    }
    assert_eq!(rate_limited(&gw, "minute", "true").await, 2.0);
    assert_eq!(rate_limited(&gw, "minute", "false").await, 0.0);

    // The same key on a route that is not in shadow mode is refused: one set of buckets.
    let refused = gw.get_with_key(&client, "/x", &key).await;
    expect_refusal(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(rate_limited(&gw, "minute", "false").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_key_is_never_refused_for_its_limits_and_can_be_switched_off() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .routes(routes(&upstream))
        .start()
        .await;
    shadow_key(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_shadow_key_is_never_refused_for_its_limits() {
    let redis = redis_harness::RedisServer::start();
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .routes(routes(&upstream))
        .redis(&redis.url())
        .start()
        .await;
    shadow_key(&gw).await;
}

async fn shadow_key(gw: &Gateway) {
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (status, created) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/v1/accounts/{account}/keys"),
            Some(json!({ "name": "k", "rate_limit": { "per_minute": 1 }, "shadow": true })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["shadow"], true);
    let (key_id, key) = (
        created["id"].as_str().expect("id").to_owned(),
        created["key"].as_str().expect("key").to_owned(),
    );
    let client = client();
    for _ in 0..3 {
        let passed = gw.get_with_key(&client, "/x", &key).await;
        assert_eq!(passed.status(), StatusCode::OK);
        expect_echo(passed).await;
    }
    assert_eq!(rate_limited(gw, "minute", "true").await, 2.0);

    let (status, patched) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/v1/accounts/{account}/keys/{key_id}"),
            Some(json!({ "shadow": false })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["shadow"], false);
    let refused = gw.get_with_key(&client, "/x", &key).await;
    expect_refusal(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

    let (status, err) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/v1/accounts/{account}/keys/{key_id}"),
            Some(json!({ "shadow": "yes" })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_keys_draw_together_on_its_shared_limit() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw
        .create_account(json!({ "name": "acme", "shared_rate_limit": { "per_minute": 3 } }))
        .await;
    let (_, a) = gw
        .create_key(
            &account,
            json!({ "name": "a", "rate_limit": { "per_minute": 2 } }),
        )
        .await;
    let (_, b) = gw.create_key(&account, json!({ "name": "b" })).await;
    let client = client();

    // a: its own 2 per minute are tighter than the shared 3 (2 left): its own window shows.
    let first = gw.get_with_key(&client, "/x", &a).await;
    assert_eq!(
        header(&first, "ratelimit-policy"),
        Some("\"minute\";q=2;w=60, \"hour\";q=1000;w=3600, \"day\";q=10000;w=86400, \"shared-minute\";q=3;w=60")
    );
    assert_eq!(header(&first, "x-ratelimit-remaining-minute"), Some("1"));
    assert_eq!(header(&first, "x-ratelimit-limit-minute"), Some("2"));
    expect_echo(first).await;
    // b: 60 of its own, 1 left of the shared 3: the shared window shows.
    let second = gw.get_with_key(&client, "/x", &b).await;
    assert_eq!(header(&second, "x-ratelimit-limit-minute"), Some("3"));
    assert_eq!(header(&second, "x-ratelimit-remaining-minute"), Some("1"));
    assert_eq!(header(&second, "ratelimit-limit"), Some("3"));
    assert!(header(&second, "ratelimit").is_some_and(|v| v.starts_with("\"shared-minute\";r=1;t=")));
    expect_echo(second).await;
    let third = gw.get_with_key(&client, "/x", &b).await;
    expect_echo(third).await;
    // The shared buckets are used up: a key with room of its own is refused.
    for key in [&a, &b] {
        let refused = gw.get_with_key(&client, "/x", key).await;
        assert_eq!(header(&refused, "x-ratelimit-remaining-minute"), Some("0"));
        assert!(header(&refused, "retry-after").is_some());
        let error = expect_refusal(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
        assert_eq!(error["window"], "minute");
    }
    // Another account is not touched.
    let (_, other) = gw.account_with_key().await;
    expect_echo(gw.get_with_key(&client, "/x", &other).await).await;

    // Taken off by PATCH: the keys have their own limits again. b spent 3 of its own 60 (the
    // refused request too: the key's buckets are checked first), and this is the fourth.
    let (status, patched) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/v1/accounts/{account}"),
            Some(json!({ "shared_rate_limit": null })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["shared_rate_limit"], serde_json::Value::Null);
    let again = gw.get_with_key(&client, "/x", &b).await;
    assert_eq!(header(&again, "x-ratelimit-remaining-minute"), Some("56"));
    expect_echo(again).await;

    let (status, err) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/v1/accounts/{account}"),
            Some(json!({ "shared_rate_limit": { "per_minute": 0 } })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("shared_rate_limit")));
}

/// `GET …/keys/{key_id}` as the operator.
async fn key_view(gw: &Gateway, account: &str, key_id: &str) -> Value {
    let (status, key) = gw
        .admin(
            Method::GET,
            &format!("/v1/accounts/{account}/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    key
}

/// Waits until the key's `remaining` is `want` (leases go back to the store after a second
/// idle): the last view.
async fn remaining_becomes(gw: &Gateway, account: &str, key_id: &str, want: i64) -> Value {
    let mut last = Value::Null;
    for _ in 0..50 {
        last = key_view(gw, account, key_id).await;
        if last["remaining"] == want {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("remaining never became {want}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_are_spent_by_route_cost_and_refused_when_used_up() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .routes(routes(&upstream))
        .start()
        .await;
    credits_spent_and_refused(&gw, &upstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_credits_are_spent_by_route_cost_and_refused_when_used_up() {
    let redis = redis_harness::RedisServer::start();
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .routes(routes(&upstream))
        .redis(&redis.url())
        .start()
        .await;
    credits_spent_and_refused(&gw, &upstream).await;
}

async fn credits_spent_and_refused(gw: &Gateway, upstream: &Upstream) {
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (status, created) = gw
        .admin(
            Method::POST,
            &format!("/v1/accounts/{account}/keys"),
            Some(json!({ "name": "k", "remaining": 5 })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        (
            created["remaining"].clone(),
            created["refill"].clone(),
            created["last_refill_at"].clone()
        ),
        (json!(5), Value::Null, Value::Null)
    );
    let key_id = created["id"].as_str().expect("id").to_owned();
    let key = created["key"].as_str().expect("key").to_owned();
    let client = client();

    // 1 + 3 of 5; a free route costs nothing.
    expect_echo(gw.get_with_key(&client, "/x", &key).await).await;
    expect_echo(gw.get_with_key(&client, "/pricey/x", &key).await).await;
    expect_echo(gw.get_with_key(&client, "/free/x", &key).await).await;
    let seen = upstream.requests_seen();
    // 1 left: a cost of 3 is refused before it goes upstream.
    let refused = gw.get_with_key(&client, "/pricey/x", &key).await;
    assert_eq!(
        header(&refused, "retry-after"),
        Some("86400"),
        "no refill: a day"
    );
    assert!(
        header(&refused, "ratelimit-limit").is_some(),
        "limit headers too"
    );
    expect_refusal(refused, StatusCode::TOO_MANY_REQUESTS, "usage_exceeded").await;
    assert_eq!(upstream.requests_seen(), seen);
    expect_echo(gw.get_with_key(&client, "/x", &key).await).await;
    let used_up = gw.get_with_key(&client, "/x", &key).await;
    expect_refusal(used_up, StatusCode::TOO_MANY_REQUESTS, "usage_exceeded").await;
    remaining_becomes(gw, &account, &key_id, 0).await;
    let usage_exceeded = gw
        .metric(
            "tollgate_requests_total",
            &[
                ("route", "api"),
                ("outcome", "usage_exceeded"),
                ("status_class", "4xx"),
            ],
        )
        .await;
    assert_eq!(usage_exceeded, 1.0);

    // Added to: usable at once.
    let (status, added) = gw
        .admin(
            Method::POST,
            &format!("/v1/accounts/{account}/keys/{key_id}/credits"),
            Some(json!({ "add": 2 })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{added}");
    assert_eq!(added["remaining"], 2);
    expect_echo(gw.get_with_key(&client, "/x", &key).await).await;
    expect_echo(gw.get_with_key(&client, "/x", &key).await).await;
    let used_up = gw.get_with_key(&client, "/x", &key).await;
    expect_refusal(used_up, StatusCode::TOO_MANY_REQUESTS, "usage_exceeded").await;

    // Set, then unlimited by PATCH, then limited again.
    let (_, set) = gw
        .admin(
            Method::POST,
            &format!("/v1/accounts/{account}/keys/{key_id}/credits"),
            Some(json!({ "set": 1 })),
        )
        .await;
    assert_eq!(set["remaining"], 1);
    expect_echo(gw.get_with_key(&client, "/x", &key).await).await;
    let path = format!("/v1/accounts/{account}/keys/{key_id}");
    let (status, unlimited) = gw
        .admin(Method::PATCH, &path, Some(json!({ "remaining": null })))
        .await;
    assert_eq!(status, StatusCode::OK, "{unlimited}");
    assert_eq!(unlimited["remaining"], Value::Null);
    for _ in 0..3 {
        expect_echo(gw.get_with_key(&client, "/x", &key).await).await;
    }
    let (_, limited) = gw
        .admin(Method::PATCH, &path, Some(json!({ "remaining": 0 })))
        .await;
    assert_eq!(limited["remaining"], 0);
    // Every change is audited, the credit changes too.
    let (_, audit) = gw
        .admin(
            Method::GET,
            &format!("/v1/accounts/{account}/audit?action=update_key"),
            None,
        )
        .await;
    let changes: Vec<Value> = audit["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .map(|e| e["detail"].clone())
        .collect();
    assert_eq!(changes.len(), 4, "{audit}");
    assert_eq!(changes[0]["changed"], json!(["remaining"]));
    assert_eq!(changes[1]["changed"], json!(["remaining"]));
    assert_eq!(changes[2]["credits"], json!({ "set": 1, "add": null }));
    let used_up = gw.get_with_key(&client, "/x", &key).await;
    expect_refusal(used_up, StatusCode::TOO_MANY_REQUESTS, "usage_exceeded").await;

    for (body, field) in [
        (json!({ "set": 1, "add": 1 }), "set"),
        (json!({}), "set"),
        (json!({ "set": -1 }), "set"),
        (json!({ "add": "many" }), "add"),
        (json!({ "take": 1 }), "take"),
    ] {
        let (status, err) = gw
            .admin(
                Method::POST,
                &format!("/v1/accounts/{account}/keys/{key_id}/credits"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(field)),
            "{err}"
        );
    }
    for body in [
        json!({ "name": "bad", "remaining": -5 }),
        json!({ "name": "bad", "refill": { "interval": "hourly", "amount": 5 } }),
        json!({ "name": "bad", "refill": { "interval": "daily", "amount": 0 } }),
    ] {
        let (status, err) = gw
            .admin(
                Method::POST,
                &format!("/v1/accounts/{account}/keys"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_declares_what_a_request_cost() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .routes(routes(&upstream))
        .start()
        .await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, key) = gw
        .create_key(&account, json!({ "name": "k", "remaining": 10 }))
        .await;
    let client = client();
    // 4 instead of the route's 1; the header does not reach the client.
    let answer = gw.get_with_key(&client, "/x/cost?n=4", &key).await;
    assert!(header(&answer, "x-tollgate-cost").is_none());
    expect_echo(answer).await;
    // 0: refunded.
    expect_echo(gw.get_with_key(&client, "/x/cost?n=0", &key).await).await;
    remaining_becomes(&gw, &account, &key_id, 6).await;
    // More than is left takes it to zero, not below.
    expect_echo(gw.get_with_key(&client, "/x/cost?n=50", &key).await).await;
    remaining_becomes(&gw, &account, &key_id, 0).await;
    let used_up = gw.get_with_key(&client, "/x", &key).await;
    expect_refusal(used_up, StatusCode::TOO_MANY_REQUESTS, "usage_exceeded").await;
    // A key without credits: the header is still removed.
    let (_, plain) = gw.account_with_key().await;
    let answer = gw.get_with_key(&client, "/x/cost?n=4", &plain).await;
    assert!(header(&answer, "x-tollgate-cost").is_none());
    expect_echo(answer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_refill_at_the_start_of_each_day() {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    use tollgate::metering::WallClock;

    let upstream = Upstream::start().await;
    let day_ms = 86_400_000;
    let start = chrono::Utc::now().timestamp_millis();
    // 23:59:00 UTC of today.
    let now = Arc::new(AtomicI64::new(
        start - start.rem_euclid(day_ms) + day_ms - 60_000,
    ));
    let gw = Gateway::builder(&upstream)
        .clock(WallClock::Manual(Arc::clone(&now)))
        .start()
        .await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, key) = gw
        .create_key(
            &account,
            json!({ "name": "k", "remaining": 1, "refill": { "interval": "daily", "amount": 3 } }),
        )
        .await;
    let client = client();
    expect_echo(gw.get_with_key(&client, "/x", &key).await).await;
    let refused = gw.get_with_key(&client, "/x", &key).await;
    assert_eq!(
        header(&refused, "retry-after"),
        Some("60"),
        "a minute to midnight"
    );
    expect_refusal(refused, StatusCode::TOO_MANY_REQUESTS, "usage_exceeded").await;

    now.fetch_add(61_000, Ordering::SeqCst);
    for _ in 0..3 {
        expect_echo(gw.get_with_key(&client, "/x", &key).await).await;
    }
    let refused = gw.get_with_key(&client, "/x", &key).await;
    expect_refusal(refused, StatusCode::TOO_MANY_REQUESTS, "usage_exceeded").await;
    let view = remaining_becomes(&gw, &account, &key_id, 0).await;
    assert_eq!(view["refill"], json!({ "interval": "daily", "amount": 3 }));
    let midnight = now.load(Ordering::SeqCst) - now.load(Ordering::SeqCst).rem_euclid(day_ms);
    let expected = chrono::DateTime::from_timestamp_millis(midnight).expect("time");
    let shown: chrono::DateTime<chrono::Utc> = view["last_refill_at"]
        .as_str()
        .expect("last_refill_at")
        .parse()
        .expect("RFC 3339");
    assert_eq!(shown, expected);
}
