//! Changing keys through the admin API (contract section 5): PATCH, renew and roll, with the
//! proxy enforcing each change on the very next request; account isolation and the
//! `account:read` / `account:write` scopes on every key path. Each test starts its own upstream
//! and gateway on port 0.

#[path = "admin_client.rs"]
mod admin_client;
mod common;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use admin_client::{about, assert_names_field, code, text, time, AdminClient};
use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{client, eventually, expect_echo, expect_refusal};

/// Bound for every `eventually` in this file.
const WAIT: Duration = Duration::from_secs(5);

async fn start() -> (Upstream, Gateway, AdminClient) {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let api = AdminClient::new(gw.admin_url(""), &gw.master);
    (upstream, gw, api)
}

/// `GET /things` on the proxy with `key`; the status.
async fn proxied(gw: &Gateway, key: &str) -> StatusCode {
    client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(key)
        .send()
        .await
        .expect("proxy request")
        .status()
}

// === create ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_key_refuses_bad_fields_naming_them() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let path = format!("/v1/accounts/{account}/keys");
    for (body, field) in [
        (json!({}), "name"),
        (json!({ "name": "" }), "name"),
        (json!({ "name": "x".repeat(101) }), "name"),
        (json!({ "name": "k", "type": "master" }), "type"),
        (
            json!({ "name": "k", "type": "publishable" }),
            "allowed_origins",
        ),
        (json!({ "name": "k", "ttl": "forever" }), "ttl"),
        (
            json!({ "name": "k", "expires_at": "yesterday" }),
            "expires_at",
        ),
        (json!({ "name": "k", "metadata": "x" }), "metadata"),
        (
            json!({ "name": "k", "allowed_ips": ["300.0.0.1"] }),
            "allowed_ips[0]",
        ),
        (json!({ "name": "k", "colour": "red" }), "colour"),
    ] {
        let (status, err) = api.master(Method::POST, &path, Some(body.clone())).await;
        assert_names_field(status, &err, field);
    }
    // Nothing was created by the refused requests.
    let (_, keys) = api.master(Method::GET, &path, None).await;
    assert_eq!(keys["keys"].as_array().map(Vec::len), Some(0), "{keys}");
}

// === external_id ===

/// Every key shows `external_id` (null when unset) and `imported` (false for a key made here);
/// it is set at create, changed and cleared (`null`) by PATCH, and a value that could not travel
/// as a header is 400 naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_id_is_set_patched_cleared_and_shown_on_every_key() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let plain = api.key(&account, json!({ "name": "plain" })).await;
    assert_eq!(plain["external_id"], Value::Null, "{plain}");
    assert_eq!(plain["imported"], false, "{plain}");
    let owned = api
        .key(
            &account,
            json!({ "name": "owned", "external_id": "cus_42" }),
        )
        .await;
    assert_eq!(owned["external_id"], "cus_42");
    let path = format!("/v1/accounts/{account}/keys/{}", text(&owned, "id"));

    let (status, key) = api
        .master(
            Method::PATCH,
            &path,
            Some(json!({ "external_id": "cus 43" })),
        )
        .await;
    assert_eq!(
        (status, &key["external_id"]),
        (StatusCode::OK, &json!("cus 43"))
    );
    let (_, audit) = api
        .master(
            Method::GET,
            &format!("/v1/accounts/{account}/audit?action=update_key"),
            None,
        )
        .await;
    assert_eq!(
        audit["logs"][0]["detail"]["changed"],
        json!(["external_id"])
    );
    let (status, key) = api
        .master(Method::PATCH, &path, Some(json!({ "external_id": null })))
        .await;
    assert_eq!(
        (status, &key["external_id"]),
        (StatusCode::OK, &Value::Null)
    );
    let (_, shown) = api.master(Method::GET, &path, None).await;
    assert_eq!(shown["external_id"], Value::Null, "{shown}");

    let keys = format!("/v1/accounts/{account}/keys");
    for bad in [
        json!(""),
        json!(" padded"),
        json!("tab\there"),
        json!("caf\u{e9}"),
        json!("x".repeat(256)),
        json!(42),
    ] {
        let (status, err) = api
            .master(Method::PATCH, &path, Some(json!({ "external_id": bad })))
            .await;
        assert_names_field(status, &err, "external_id");
        let (status, err) = api
            .master(
                Method::POST,
                &keys,
                Some(json!({ "name": "bad", "external_id": bad })),
            )
            .await;
        assert_names_field(status, &err, "external_id");
    }
    let longest = api
        .key(
            &account,
            json!({ "name": "long", "external_id": "x".repeat(255) }),
        )
        .await;
    assert_eq!(longest["external_id"], json!("x".repeat(255)));
}

/// `GET …/keys?external_id=X` lists exactly the keys with `X`, on both path forms; other query
/// parameters are ignored as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_listed_by_external_id_on_both_path_forms() {
    let (_up, _gw, api) = start().await;
    let (account, _, raw) = api.account_with_key("acme").await;
    let a1 = api
        .key(&account, json!({ "name": "a1", "external_id": "user a" }))
        .await;
    let a2 = api
        .key(&account, json!({ "name": "a2", "external_id": "user a" }))
        .await;
    api.key(&account, json!({ "name": "b", "external_id": "user b" }))
        .await;
    api.key(&account, json!({ "name": "user a" })).await;
    let other = api.account(json!({ "name": "other" })).await;
    api.key(
        &other,
        json!({ "name": "elsewhere", "external_id": "user a" }),
    )
    .await;

    let names = |list: &Value| -> Vec<String> {
        list["keys"]
            .as_array()
            .map(|keys| keys.iter().map(|k| text(k, "name")).collect())
            .unwrap_or_default()
    };
    let owned = |want: &[&str]| -> Vec<String> { want.iter().map(|s| (*s).to_owned()).collect() };
    let operator = format!("/v1/accounts/{account}/keys");
    for (query, want) in [
        ("?external_id=user%20a", vec!["a1", "a2"]),
        ("?external_id=user+b&colour=red", vec!["b"]),
        ("?external_id=USER%20A", vec![]),
        ("?external_id=", vec![]),
        ("?colour=red", vec!["main", "a1", "a2", "b", "user a"]),
    ] {
        let (status, list) = api
            .master(Method::GET, &format!("{operator}{query}"), None)
            .await;
        assert_eq!(
            (status, names(&list)),
            (StatusCode::OK, owned(&want)),
            "{query}"
        );
        let (status, list) = api
            .call(Method::GET, &format!("/v1/account/keys{query}"), &raw, None)
            .await;
        assert_eq!(
            (status, names(&list)),
            (StatusCode::OK, owned(&want)),
            "own {query}"
        );
    }
    assert_eq!(text(&a1, "external_id"), text(&a2, "external_id"));
}

// === PATCH ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_key_changes_the_named_fields_and_keeps_the_rest() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let created = api
        .key(
            &account,
            json!({
                "name": "main",
                "scopes": ["orders:read"],
                "allowed_ips": ["127.0.0.1"],
                "rate_limit": { "per_minute": 10, "per_hour": 100 },
                "metadata": { "team": "web", "tier": "free" }
            }),
        )
        .await;
    let path = format!("/v1/accounts/{account}/keys/{}", text(&created, "id"));

    let (status, key) = api
        .master(
            Method::PATCH,
            &path,
            Some(json!({
                "name": "  renamed ",
                "scopes": ["orders:read", "orders:write"],
                "allowed_ips": ["10.0.0.0/8", "192.168.1.1"],
                "rate_limit": { "per_minute": 20 },
                "metadata": { "tier": "gold", "team": null, "region": "eu" }
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    assert_eq!(key["name"], "renamed");
    assert_eq!(key["scopes"], json!(["orders:read", "orders:write"]));
    assert_eq!(key["allowed_ips"], json!(["10.0.0.0/8", "192.168.1.1"]));
    // Objects merge field by field; null removes one.
    assert_eq!(
        key["rate_limit"],
        json!({ "per_minute": 20, "per_hour": 100 })
    );
    assert_eq!(key["metadata"], json!({ "tier": "gold", "region": "eu" }));
    assert_eq!(key["id"], created["id"]);
    assert_eq!(key["prefix"], created["prefix"]);
    assert!(
        key.get("key").is_none() && key.get("hash").is_none(),
        "{key}"
    );
    assert!(time(&key, "updated_at") >= time(&created, "updated_at"));

    let (_, shown) = api.master(Method::GET, &path, None).await;
    assert_eq!(shown, key);

    // An empty body changes nothing; null resets an optional field.
    let (status, same) = api.master(Method::PATCH, &path, None).await;
    assert_eq!((status, &same), (StatusCode::OK, &key));
    let (status, reset) = api
        .master(
            Method::PATCH,
            &path,
            Some(json!({ "rate_limit": null, "scopes": null, "allowed_ips": [] })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reset}");
    assert_eq!(reset["rate_limit"], Value::Null);
    assert_eq!(reset["scopes"], Value::Null);
    assert_eq!(reset["allowed_ips"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_key_refuses_bad_fields_naming_them() {
    let (_up, _gw, api) = start().await;
    let account = api
        .account(json!({ "name": "acme", "permissions": ["orders:read", "account:read"] }))
        .await;
    let key = api.key(&account, json!({ "name": "main" })).await;
    let path = format!("/v1/accounts/{account}/keys/{}", text(&key, "id"));

    for (body, field) in [
        (json!({ "colour": "red" }), "colour"),
        (json!({ "name": null }), "name"),
        (json!({ "name": "x".repeat(101) }), "name"),
        (json!({ "name": "" }), "name"),
        (json!({ "scopes": ["orders:write"] }), "scopes[0]"),
        (json!({ "scopes": "orders:read" }), "scopes"),
        (json!({ "allowed_ips": ["not-an-ip"] }), "allowed_ips[0]"),
        (json!({ "allowed_origins": ["nope"] }), "allowed_origins[0]"),
        (
            json!({ "rate_limit": { "per_minute": 0 } }),
            "rate_limit.per_minute",
        ),
        (json!({ "rate_limit": { "per_week": 1 } }), "per_week"),
        (json!({ "metadata": [1] }), "metadata"),
        (json!({ "type": "publishable" }), "type"),
        (json!({ "protected": true }), "protected"),
    ] {
        let (status, err) = api.master(Method::PATCH, &path, Some(body.clone())).await;
        assert_names_field(status, &err, field);
    }
    // Nothing was changed by the refused requests.
    let (_, shown) = api.master(Method::GET, &path, None).await;
    assert_eq!(shown["name"], "main");
    assert_eq!(shown["updated_at"], key["updated_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_key_name_taken_is_409() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    api.key(&account, json!({ "name": "first" })).await;
    let second = api.key(&account, json!({ "name": "second" })).await;
    let path = format!("/v1/accounts/{account}/keys/{}", text(&second, "id"));

    let (status, err) = api
        .master(Method::PATCH, &path, Some(json!({ "name": "first" })))
        .await;
    assert_eq!((status, code(&err)), (StatusCode::CONFLICT, "name_taken"));
    // Another account may use the name.
    let other = api.account(json!({ "name": "other" })).await;
    api.key(&other, json!({ "name": "first" })).await;
    let (status, _) = api
        .master(Method::PATCH, &path, Some(json!({ "name": "second" })))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishable_key_must_keep_an_origin() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let pk = api
        .key(
            &account,
            json!({ "name": "web", "type": "publishable", "allowed_origins": ["https://a.example"] }),
        )
        .await;
    let path = format!("/v1/accounts/{account}/keys/{}", text(&pk, "id"));
    for body in [
        json!({ "allowed_origins": [] }),
        json!({ "allowed_origins": null }),
    ] {
        let (status, err) = api.master(Method::PATCH, &path, Some(body)).await;
        assert_names_field(status, &err, "allowed_origins");
    }
    let (status, key) = api
        .master(
            Method::PATCH,
            &path,
            Some(json!({ "allowed_origins": ["HTTPS://B.example:443/"] })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    assert_eq!(key["allowed_origins"], json!(["https://b.example"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patched_allowed_ips_apply_on_the_next_request() {
    let (_up, gw, api) = start().await;
    let (account, key_id, key) = api.account_with_key("acme").await;
    let path = format!("/v1/accounts/{account}/keys/{key_id}");
    // Cached by this request.
    assert_eq!(proxied(&gw, &key).await, StatusCode::OK);

    let (status, body) = api
        .master(
            Method::PATCH,
            &path,
            Some(json!({ "allowed_ips": ["10.0.0.0/8"] })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let response = client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    expect_refusal(response, StatusCode::FORBIDDEN, "ip_not_allowed").await;

    api.master(Method::PATCH, &path, Some(json!({ "allowed_ips": [] })))
        .await;
    assert_eq!(proxied(&gw, &key).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patched_scopes_apply_on_the_next_request() {
    let (_up, gw, api) = start().await;
    let (account, key_id, key) = api.account_with_key("acme").await;
    let orders = || {
        client()
            .get(gw.proxy_url("/orders/1"))
            .bearer_auth(&key)
            .send()
    };
    expect_echo(orders().await.unwrap()).await;
    api.master(
        Method::PATCH,
        &format!("/v1/accounts/{account}/keys/{key_id}"),
        Some(json!({ "scopes": ["invoices:read"] })),
    )
    .await;
    expect_refusal(
        orders().await.unwrap(),
        StatusCode::FORBIDDEN,
        "scope_denied",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_key_cannot_patch_in_scopes_it_lacks() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let writer = api
        .key(
            &account,
            json!({ "name": "writer", "scopes": ["account:write", "orders:read"] }),
        )
        .await;
    let target = api
        .key(
            &account,
            json!({ "name": "target", "scopes": ["orders:read"] }),
        )
        .await;
    let (raw, path) = (
        text(&writer, "key"),
        format!("/v1/account/keys/{}", text(&target, "id")),
    );

    let (status, err) = api
        .call(
            Method::PATCH,
            &path,
            &raw,
            Some(json!({ "scopes": ["orders:write"] })),
        )
        .await;
    assert_names_field(status, &err, "scopes[0]");
    // Full access from a limited caller means what it holds.
    let (status, key) = api
        .call(Method::PATCH, &path, &raw, Some(json!({ "scopes": null })))
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    assert_eq!(key["scopes"], json!(["account:write", "orders:read"]));
}

// === renew ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_uses_the_original_lifetime_or_the_given_ttl() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let key = api.key(&account, json!({ "name": "k", "ttl": "1h" })).await;
    let path = format!("/v1/accounts/{account}/keys/{}/renew", text(&key, "id"));
    assert!(about(time(&key, "expires_at"), 3_600, 5));

    let (status, renewed) = api.master(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    assert!(about(time(&renewed, "expires_at"), 3_600, 5), "{renewed}");
    assert!(time(&renewed, "expires_at") >= time(&key, "expires_at"));

    let (status, renewed) = api
        .master(Method::POST, &path, Some(json!({ "ttl": "30d" })))
        .await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    assert!(
        about(time(&renewed, "expires_at"), 30 * 86_400, 5),
        "{renewed}"
    );
    // The ttl given is the lifetime from now on.
    let (_, again) = api.master(Method::POST, &path, Some(json!({}))).await;
    assert!(about(time(&again, "expires_at"), 30 * 86_400, 5), "{again}");

    for (body, field) in [
        (json!({ "ttl": "soon" }), "ttl"),
        (json!({ "ttl": "0s" }), "ttl"),
        (json!({ "grace": "1h" }), "grace"),
    ] {
        let (status, err) = api.master(Method::POST, &path, Some(body)).await;
        assert_names_field(status, &err, field);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_a_key_without_a_lifetime_needs_a_ttl() {
    let (_up, _gw, api) = start().await;
    let (account, key_id, _) = api.account_with_key("acme").await;
    let path = format!("/v1/accounts/{account}/keys/{key_id}/renew");

    let (status, err) = api.master(Method::POST, &path, None).await;
    assert_names_field(status, &err, "ttl");
    let (status, key) = api
        .master(Method::POST, &path, Some(json!({ "ttl": "2h" })))
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    assert!(about(time(&key, "expires_at"), 7_200, 5), "{key}");
    // Now it has one.
    let (status, _) = api.master(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::OK);

    let (status, err) = api
        .master(
            Method::POST,
            &format!("/v1/accounts/{account}/keys/key_missing/renew"),
            None,
        )
        .await;
    assert_eq!((status, code(&err)), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_key_passes_again_on_the_next_request() {
    let (_up, gw, api) = start().await;
    // Polling makes many requests; the default 60 a minute would cut them short.
    let account = api
        .account(
            json!({ "name": "acme", "rate_limit": { "per_minute": 100000, "per_hour": 100000 } }),
        )
        .await;
    let key = api.key(&account, json!({ "name": "k", "ttl": "1s" })).await;
    let raw = text(&key, "key");
    let (g, r) = (&gw, &raw);
    let expired = eventually(WAIT, move || async move {
        proxied(g, r).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(expired, "the key still passes {WAIT:?} after a 1s ttl");

    let path = format!("/v1/accounts/{account}/keys/{}/renew", text(&key, "id"));
    let (status, _) = api
        .master(Method::POST, &path, Some(json!({ "ttl": "1h" })))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(proxied(&gw, &raw).await, StatusCode::OK);
}

// === roll ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roll_copies_the_key_and_passes_on_its_name() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let old = api
        .key(
            &account,
            json!({
                "name": "server",
                "scopes": ["orders:read"],
                "allowed_ips": ["127.0.0.1"],
                "rate_limit": { "per_minute": 7 },
                "metadata": { "team": "api" },
                "protected": true,
                "ttl": "10d"
            }),
        )
        .await;
    let old_id = text(&old, "id");
    let path = format!("/v1/accounts/{account}/keys/{old_id}/roll");

    let (status, new) = api.master(Method::POST, &path, None).await;
    assert_eq!(status, StatusCode::CREATED, "{new}");
    let raw = text(&new, "key");
    assert!(
        raw.starts_with("tgsk_") && raw != text(&old, "key"),
        "{new}"
    );
    assert_ne!(new["id"], old["id"]);
    assert_eq!(new["name"], "server");
    for field in [
        "type",
        "scopes",
        "allowed_ips",
        "allowed_origins",
        "rate_limit",
        "metadata",
        "protected",
    ] {
        assert_eq!(new[field], old[field], "{field}");
    }
    assert_eq!(new["active"], true);
    assert!(about(time(&new, "expires_at"), 10 * 86_400, 5), "{new}");

    let (_, retired) = api
        .master(
            Method::GET,
            &format!("/v1/accounts/{account}/keys/{old_id}"),
            None,
        )
        .await;
    let short = &old_id["key_".len().."key_".len() + 8];
    assert_eq!(retired["name"], format!("server (rolled {short})"));
    // Default grace: 24 h.
    assert!(about(time(&retired, "expires_at"), 86_400, 5), "{retired}");
    assert!(retired.get("key").is_none());
    let (_, list) = api
        .master(Method::GET, &format!("/v1/accounts/{account}/keys"), None)
        .await;
    assert_eq!(list["keys"].as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_key_passes_during_the_grace_then_is_refused() {
    let (_up, gw, api) = start().await;
    // Polling makes many requests; the default 60 a minute would cut them short.
    let account = api
        .account(
            json!({ "name": "acme", "rate_limit": { "per_minute": 100000, "per_hour": 100000 } }),
        )
        .await;
    let key = api.key(&account, json!({ "name": "main" })).await;
    let (old_id, old) = (text(&key, "id"), text(&key, "key"));
    assert_eq!(proxied(&gw, &old).await, StatusCode::OK);

    let (status, created) = api
        .master(
            Method::POST,
            &format!("/v1/accounts/{account}/keys/{old_id}/roll"),
            Some(json!({ "grace": "2s" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let new = text(&created, "key");
    assert_eq!(proxied(&gw, &old).await, StatusCode::OK, "within the grace");
    assert_eq!(proxied(&gw, &new).await, StatusCode::OK);

    let (g, n, o) = (&gw, &new, &old);
    let refused = eventually(WAIT, move || async move {
        assert_eq!(proxied(g, n).await, StatusCode::OK, "the new key");
        proxied(g, o).await == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(
        refused,
        "the old key still passes {WAIT:?} after a 2s grace"
    );
    let response = client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(&old)
        .send()
        .await
        .unwrap();
    expect_refusal(response, StatusCode::UNAUTHORIZED, "expired_credential").await;
    assert_eq!(proxied(&gw, &new).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roll_with_zero_grace_refuses_the_old_key_at_once() {
    let (_up, gw, api) = start().await;
    let (account, old_id, old) = api.account_with_key("acme").await;
    // The old key is in the proxy's cache.
    assert_eq!(proxied(&gw, &old).await, StatusCode::OK);

    let (status, created) = api
        .master(
            Method::POST,
            &format!("/v1/accounts/{account}/keys/{old_id}/roll"),
            Some(json!({ "grace": "0s" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let response = client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(&old)
        .send()
        .await
        .unwrap();
    expect_refusal(response, StatusCode::UNAUTHORIZED, "expired_credential").await;
    assert_eq!(proxied(&gw, &text(&created, "key")).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roll_is_allowed_at_the_plan_limit_and_keeps_the_type() {
    let (_up, _gw, api) = start().await;
    let account = api
        .account(json!({ "name": "acme", "plan": { "max_keys": 1 } }))
        .await;
    let pk = api
        .key(
            &account,
            json!({ "name": "web", "type": "publishable", "allowed_origins": ["https://a.example"] }),
        )
        .await;
    let path = format!("/v1/accounts/{account}/keys/{}/roll", text(&pk, "id"));

    let (status, created) = api
        .master(Method::POST, &path, Some(json!({ "grace": "1m" })))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(text(&created, "key").starts_with("tgpk_"), "{created}");
    assert_eq!(created["allowed_origins"], json!(["https://a.example"]));
    // A new key, though, is over the limit.
    let (status, err) = api
        .master(
            Method::POST,
            &format!("/v1/accounts/{account}/keys"),
            Some(json!({ "name": "more" })),
        )
        .await;
    assert_eq!((status, code(&err)), (StatusCode::CONFLICT, "plan_limit"));

    for (body, field) in [
        (json!({ "grace": "later" }), "grace"),
        (json!({ "ttl": "1h" }), "ttl"),
    ] {
        let (status, err) = api.master(Method::POST, &path, Some(body)).await;
        assert_names_field(status, &err, field);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_key_may_roll_only_keys_within_its_scopes() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let writer = api
        .key(
            &account,
            json!({ "name": "writer", "scopes": ["account:write", "orders:read"] }),
        )
        .await;
    let full = api.key(&account, json!({ "name": "full" })).await;
    let narrow = api
        .key(
            &account,
            json!({ "name": "narrow", "scopes": ["orders:read"] }),
        )
        .await;
    let raw = text(&writer, "key");

    let (status, err) = api
        .call(
            Method::POST,
            &format!("/v1/account/keys/{}/roll", text(&full, "id")),
            &raw,
            None,
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::FORBIDDEN, "scope_denied")
    );
    let (status, created) = api
        .call(
            Method::POST,
            &format!("/v1/account/keys/{}/roll", text(&narrow, "id")),
            &raw,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["scopes"], json!(["orders:read"]));
}

// === who may call ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_key_and_site_ids_are_404() {
    let (_up, _gw, api) = start().await;
    let (_, _, raw_a) = api.account_with_key("a").await;
    let (b, b_key, _) = api.account_with_key("b").await;
    let (status, site) = api
        .master(
            Method::POST,
            &format!("/v1/accounts/{b}/sites"),
            Some(json!({ "name": "https://b.example" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let b_site = text(&site, "id");

    for (method, path, body) in [
        (
            Method::PATCH,
            format!("/v1/account/keys/{b_key}"),
            Some(json!({ "name": "stolen" })),
        ),
        (
            Method::POST,
            format!("/v1/account/keys/{b_key}/renew"),
            Some(json!({ "ttl": "1h" })),
        ),
        (Method::POST, format!("/v1/account/keys/{b_key}/roll"), None),
        (Method::DELETE, format!("/v1/account/sites/{b_site}"), None),
        // Through the operator's path form too: B's account, keys and sites are not there.
        (
            Method::PATCH,
            format!("/v1/accounts/{b}/keys/{b_key}"),
            Some(json!({ "name": "stolen" })),
        ),
        (
            Method::POST,
            format!("/v1/accounts/{b}/keys/{b_key}/roll"),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/accounts/{b}/sites/{b_site}"),
            None,
        ),
        (Method::GET, format!("/v1/accounts/{b}/audit"), None),
    ] {
        let (status, err) = api.call(method, &path, &raw_a, body).await;
        assert_eq!(
            (status, code(&err)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{path}"
        );
    }

    let (_, key) = api
        .master(Method::GET, &format!("/v1/accounts/{b}/keys/{b_key}"), None)
        .await;
    assert_eq!(
        (key["name"].clone(), key["expires_at"].clone()),
        (json!("main"), Value::Null)
    );
    let (_, sites) = api
        .master(Method::GET, &format!("/v1/accounts/{b}/sites"), None)
        .await;
    assert_eq!(sites["sites"].as_array().map(Vec::len), Some(1));
    let (_, own) = api
        .call(Method::GET, "/v1/account/sites", &raw_a, None)
        .await;
    assert_eq!(own, json!({ "sites": [] }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_read_key_reads_but_cannot_change_anything() {
    let (_up, _gw, api) = start().await;
    let (account, key_id, _) = api.account_with_key("acme").await;
    let reader = api
        .key(
            &account,
            json!({ "name": "reader", "scopes": ["account:read"] }),
        )
        .await;
    let raw = text(&reader, "key");
    let (status, site) = api
        .master(
            Method::POST,
            &format!("/v1/accounts/{account}/sites"),
            Some(json!({ "name": "https://a.example" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let site_id = text(&site, "id");

    for (method, path, body) in [
        (
            Method::PATCH,
            format!("/v1/account/keys/{key_id}"),
            Some(json!({ "name": "x" })),
        ),
        (
            Method::POST,
            format!("/v1/account/keys/{key_id}/renew"),
            Some(json!({ "ttl": "1h" })),
        ),
        (
            Method::POST,
            format!("/v1/account/keys/{key_id}/roll"),
            None,
        ),
        (
            Method::POST,
            "/v1/account/sites".to_owned(),
            Some(json!({ "name": "https://b.example" })),
        ),
        (Method::DELETE, format!("/v1/account/sites/{site_id}"), None),
    ] {
        let (status, err) = api.call(method, &path, &raw, body).await;
        assert_eq!(
            (status, code(&err)),
            (StatusCode::FORBIDDEN, "scope_denied"),
            "{path}"
        );
    }
    for path in [
        "/v1/account/config",
        "/v1/account/sites",
        "/v1/account/audit",
    ] {
        let (status, body) = api.call(Method::GET, path, &raw, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_key_changes_its_own_keys_at_v1_account() {
    let (_up, gw, api) = start().await;
    let (_, key_id, raw) = api.account_with_key("acme").await;
    let (status, key) = api
        .call(
            Method::PATCH,
            &format!("/v1/account/keys/{key_id}"),
            &raw,
            Some(json!({ "metadata": { "owner": "me" } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    assert_eq!(key["metadata"], json!({ "owner": "me" }));

    // Rolling the calling key itself: the new key takes over.
    let (status, created) = api
        .call(
            Method::POST,
            &format!("/v1/account/keys/{key_id}/roll"),
            &raw,
            Some(json!({ "grace": "0s" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let new = text(&created, "key");
    let (status, err) = api.call(Method::GET, "/v1/account/keys", &raw, None).await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::UNAUTHORIZED, "expired_credential")
    );
    let (status, _) = api.call(Method::GET, "/v1/account/keys", &new, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(proxied(&gw, &new).await, StatusCode::OK);
}

/// Key names are unique in an account ignoring case: `skb` beside `SKB` is 409 `name_taken`,
/// on create and on rename; a key may change the case of its own name, and keeps the name as
/// given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_names_are_unique_ignoring_case() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let keys = format!("/v1/accounts/{account}/keys");
    let first = api.key(&account, json!({ "name": "SKB" })).await;
    assert_eq!(text(&first, "name"), "SKB");
    let (status, err) = api
        .master(Method::POST, &keys, Some(json!({ "name": "skb" })))
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::CONFLICT, "name_taken"),
        "{err}"
    );

    let other = api.key(&account, json!({ "name": "other" })).await;
    let other_path = format!("{keys}/{}", text(&other, "id"));
    let (status, err) = api
        .master(Method::PATCH, &other_path, Some(json!({ "name": "Skb" })))
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::CONFLICT, "name_taken"),
        "{err}"
    );

    let first_path = format!("{keys}/{}", text(&first, "id"));
    let (status, renamed) = api
        .master(Method::PATCH, &first_path, Some(json!({ "name": "skb" })))
        .await;
    assert_eq!(status, StatusCode::OK, "{renamed}");
    assert_eq!(text(&renamed, "name"), "skb");
}
