//! Quotas and owners (contract section 5a, and `shadow` of section 2) through the proxy and the
//! admin API: shadow mode on a route and on a key. Every test starts its own upstream and
//! gateway on port 0.

mod common;

use reqwest::StatusCode;
use serde_json::json;

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
    assert_eq!(rate_limited(&gw, "minute", "true").await, 2.0);

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
