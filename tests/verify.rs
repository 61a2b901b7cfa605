//! `POST /v1/verify` (contract 5b) against a running gateway: the proxy's decision on a key, on
//! the proxy's buckets and credits and counted in its usage; `explain`; who may verify what; bad
//! bodies. The walk of every credential state through the proxy, the admin API and verify is in
//! `credential_states.rs`. Every test starts its own upstream and gateway on port 0.

mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{client, expect_refusal};

async fn start() -> (Upstream, Gateway) {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    (upstream, gw)
}

/// `POST /v1/verify` with `cred`: 200 and the verdict.
async fn verify_as(gw: &Gateway, cred: &str, body: Value) -> Value {
    let response = client()
        .post(gw.admin_url("/v1/verify"))
        .bearer_auth(cred)
        .json(&body)
        .send()
        .await
        .expect("verify");
    let status = response.status();
    let verdict: Value = response.json().await.expect("JSON");
    assert_eq!(status, StatusCode::OK, "{body} → {verdict}");
    verdict
}

/// The checks an explanation lists: (check, outcome).
fn checks(verdict: &Value) -> Vec<(String, String)> {
    verdict["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| {
            (
                c["check"].as_str().expect("check").to_owned(),
                c["outcome"].as_str().expect("outcome").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_key_is_verified_on_the_proxys_buckets_and_explained() {
    let (_up, gw) = start().await;
    verified_on_the_proxys_buckets(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redis_a_valid_key_is_verified_on_the_proxys_buckets_and_explained() {
    let redis = redis_harness::RedisServer::start();
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .redis(&redis.url())
        .start()
        .await;
    verified_on_the_proxys_buckets(&gw).await;
}

async fn verified_on_the_proxys_buckets(gw: &Gateway) {
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (key_id, key) = gw
        .create_key(
            &account,
            json!({
                "name": "k",
                "scopes": ["orders:read"],
                "rate_limit": { "per_minute": 2 },
                "metadata": { "plan": "gold" },
                "remaining": 10
            }),
        )
        .await;
    let verdict = verify_as(gw, &gw.master, json!({ "key": key, "explain": true })).await;
    assert_eq!(verdict["valid"], true, "{verdict}");
    assert_eq!(verdict["code"], "valid");
    assert_eq!(verdict["account_id"], account.as_str());
    assert_eq!(verdict["key_id"], key_id.as_str());
    assert_eq!(verdict["key_type"], "secret");
    assert_eq!(verdict["scopes"], json!(["orders:read"]));
    assert_eq!(verdict["metadata"], json!({ "plan": "gold" }));
    assert_eq!(
        verdict["ratelimit"]["minute"],
        json!({ "limit": 2, "remaining": 1, "reset": 30 })
    );
    assert_eq!(verdict["ratelimit"]["day"]["limit"], 10_000);
    assert!(
        verdict["remaining"].as_i64().is_some_and(|n| n == 9),
        "{verdict}"
    );
    let names: Vec<String> = checks(&verdict).into_iter().map(|(c, _)| c).collect();
    assert_eq!(
        names,
        [
            "format",
            "lookup",
            "active",
            "expiry",
            "account",
            "auth_method",
            "ip",
            "origin",
            "method",
            "scope",
            "minute",
            "hour",
            "day",
            "credits"
        ]
    );
    assert!(
        checks(&verdict).iter().all(|(_, o)| o == "pass"),
        "{verdict}"
    );
    // Cached now: the lookup was answered from memory, and the format check skipped.
    let again = verify_as(gw, &gw.master, json!({ "key": key, "explain": true })).await;
    assert_eq!(again["checks"][0]["check"], "lookup");
    assert_eq!(again["checks"][0]["detail"]["answered_by"], "memory");
    // The proxy and verify draw from one set of buckets: the minute's 2 are spent.
    let refused = client()
        .get(gw.proxy_url("/x"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("proxy");
    expect_refusal(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let limited = verify_as(gw, &gw.master, json!({ "key": key, "explain": true })).await;
    assert_eq!(
        (limited["valid"].clone(), limited["code"].clone()),
        (json!(false), json!("rate_limited"))
    );
    assert_eq!(
        checks(&limited).last(),
        Some(&("minute".to_owned(), "fail".to_owned()))
    );

    // Counted in the key's usage: 3 verifications and the proxy's 429.
    let path = format!("/v1/accounts/{account}/keys/{key_id}/usage?interval=day");
    let mut counted = Value::Null;
    for _ in 0..40 {
        let (_, usage) = gw.admin(Method::GET, &path, None).await;
        counted = usage["buckets"]
            .as_array()
            .and_then(|b| b.last().cloned())
            .unwrap_or(Value::Null);
        if counted["request_count"] == 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        (
            counted["request_count"].clone(),
            counted["success_count"].clone(),
            counted["rate_limited_count"].clone()
        ),
        (json!(4), json!(2), json!(2)),
        "{counted}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_the_proxys_code_and_stop_the_explanation_there() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .routes(format!(
            r#"
[[routes]]
name = "orders"
path_prefix = "/orders"
upstreams = ["{}"]
scopes = {{ read = "orders:read", write = "orders:write" }}
cost = 4
"#,
            upstream.url()
        ))
        .start()
        .await;
    let account = gw.create_account(json!({ "name": "acme" })).await;
    let (_, reader) = gw
        .create_key(
            &account,
            json!({ "name": "reader", "scopes": ["orders:read"], "allowed_ips": ["10.0.0.0/8"], "remaining": 5 }),
        )
        .await;
    let (_, browser) = gw
        .create_key(
            &account,
            json!({ "name": "browser", "type": "publishable", "allowed_origins": ["https://app.example.com"] }),
        )
        .await;
    let master = gw.master.clone();
    let code = |v: &Value| {
        (
            v["valid"].clone(),
            v["code"].as_str().unwrap_or("?").to_owned(),
        )
    };
    let unknown = tollgate::credential::generate(tollgate::credential::Kind::Secret);
    for (body, expected, last_check) in [
        (json!({ "key": unknown }), "invalid_credential", "lookup"),
        (
            json!({ "key": "tgsk_notakey" }),
            "invalid_credential",
            "format",
        ),
        (json!({ "key": reader }), "ip_not_allowed", "ip"),
        (
            json!({ "key": reader, "ip": "192.0.2.1" }),
            "ip_not_allowed",
            "ip",
        ),
        (
            json!({ "key": reader, "ip": "10.1.2.3", "route": "orders", "method": "POST" }),
            "scope_denied",
            "scope",
        ),
        (
            json!({ "key": reader, "ip": "10.1.2.3", "scope": "orders:write" }),
            "scope_denied",
            "scope",
        ),
        (json!({ "key": browser }), "origin_not_allowed", "origin"),
        (
            json!({ "key": browser, "origin": "https://app.example.com", "method": "delete" }),
            "publishable_key_write",
            "method",
        ),
    ] {
        let mut asked = body.clone();
        asked["explain"] = json!(true);
        let verdict = verify_as(&gw, &master, asked).await;
        assert_eq!(
            code(&verdict),
            (json!(false), expected.to_owned()),
            "{body}: {verdict}"
        );
        assert_eq!(
            checks(&verdict).last(),
            Some(&(last_check.to_owned(), "fail".to_owned())),
            "{body}: {verdict}"
        );
    }
    // The route's cost: 4 of 5, then 1 is not enough for 4; cost 0 checks without spending.
    let on_route = json!({ "key": reader, "ip": "10.1.2.3", "route": "orders" });
    let first = verify_as(&gw, &master, on_route.clone()).await;
    assert_eq!(code(&first), (json!(true), "valid".to_owned()));
    assert_eq!(first["remaining"], 1);
    let second = verify_as(&gw, &master, on_route.clone()).await;
    assert_eq!(code(&second), (json!(false), "usage_exceeded".to_owned()));
    let mut free = on_route.clone();
    free["cost"] = json!(0);
    assert_eq!(
        code(&verify_as(&gw, &master, free).await),
        (json!(true), "valid".to_owned())
    );
    let mut one = on_route;
    one["cost"] = json!(1);
    let last = verify_as(&gw, &master, one).await;
    assert_eq!(
        (code(&last), last["remaining"].clone()),
        ((json!(true), "valid".to_owned()), json!(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_key_verifies_only_its_own_accounts_keys() {
    let (_up, gw) = start().await;
    let mine = gw.create_account(json!({ "name": "mine" })).await;
    let (_, verifier) = gw
        .create_key(
            &mine,
            json!({ "name": "verifier", "scopes": ["keys:verify"] }),
        )
        .await;
    let (_, own) = gw.create_key(&mine, json!({ "name": "own" })).await;
    let (_, full) = gw.create_key(&mine, json!({ "name": "full" })).await;
    let (_, reader) = gw
        .create_key(
            &mine,
            json!({ "name": "reader", "scopes": ["account:read"] }),
        )
        .await;
    let theirs = gw.create_account(json!({ "name": "theirs" })).await;
    let (_, other) = gw.create_key(&theirs, json!({ "name": "other" })).await;
    let unknown = tollgate::credential::generate(tollgate::credential::Kind::Secret);

    let ok = verify_as(&gw, &verifier, json!({ "key": own })).await;
    assert_eq!(ok["valid"], true, "{ok}");
    // A full-access key may verify too.
    assert_eq!(
        verify_as(&gw, &full, json!({ "key": own })).await["valid"],
        true
    );
    // Another account's key and an unknown one get the same answer, explanation included.
    let foreign = verify_as(&gw, &verifier, json!({ "key": other, "explain": true })).await;
    let mut nothing = verify_as(&gw, &verifier, json!({ "key": unknown, "explain": true })).await;
    assert_eq!(foreign["code"], "invalid_credential");
    // The unknown key's lookup went to the store; the other account's key may be cached.
    nothing["checks"][1]["detail"]["answered_by"] =
        foreign["checks"][1]["detail"]["answered_by"].clone();
    assert_eq!(foreign, nothing);
    assert_eq!(foreign["account_id"], Value::Null);

    let response = client()
        .post(gw.admin_url("/v1/verify"))
        .bearer_auth(&reader)
        .json(&json!({ "key": own }))
        .send()
        .await
        .expect("verify");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "scope_denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_400_naming_the_field() {
    let (_up, gw) = start().await;
    let (_, key) = gw.account_with_key().await;
    for (body, field) in [
        (json!({}), "key"),
        (json!({ "key": key, "colour": "red" }), "colour"),
        (json!({ "key": key, "ip": "300.1.1.1" }), "ip"),
        (json!({ "key": key, "route": "nowhere" }), "route"),
        (json!({ "key": key, "method": "GE T" }), "method"),
        (json!({ "key": key, "cost": -1 }), "cost"),
        (json!({ "key": key, "cost": 2_000_000 }), "cost"),
        (json!({ "key": "x".repeat(600) }), "key"),
        (json!({ "key": key, "explain": "yes" }), "explain"),
    ] {
        let (status, err) = gw
            .admin(Method::POST, "/v1/verify", Some(body.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {err}");
        assert_eq!(err["error"]["code"], "invalid_request");
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(field)),
            "{body}: {err}"
        );
    }
    let response = client()
        .post(gw.admin_url("/v1/verify"))
        .json(&json!({ "key": key }))
        .send()
        .await
        .expect("verify");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
}
