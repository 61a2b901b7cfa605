//! Changing and deleting accounts through the admin API (contract section 5), with the proxy
//! enforcing each change on the very next request, and the `…/config` view. Each test starts its
//! own upstream and gateway on port 0.

#[path = "admin_client.rs"]
mod admin_client;
mod common;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use admin_client::{assert_names_field, code, text, time, AdminClient};
use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{client, expect_echo, expect_refusal};

async fn start() -> (Upstream, Gateway, AdminClient) {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let api = AdminClient::new(gw.admin_url(""), &gw.master);
    (upstream, gw, api)
}

async fn get_things(gw: &Gateway, key: &str) -> reqwest::Response {
    client()
        .get(gw.proxy_url("/things"))
        .bearer_auth(key)
        .send()
        .await
        .expect("proxy request")
}

// === PATCH ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_account_changes_the_named_fields_and_keeps_the_rest() {
    let (_up, _gw, api) = start().await;
    let (status, created) = api
        .master(
            Method::POST,
            "/v1/accounts",
            Some(json!({
                "name": "Acme",
                "rate_limit": { "per_minute": 10, "per_hour": 100 },
                "network_policy": { "allowed_ips": ["10.0.0.0/8"], "allowed_domains": ["https://acme.example"] },
                "permissions": ["orders:read"],
                "plan": { "max_keys": 5, "max_sites": 2 }
            })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let path = format!("/v1/accounts/{}", text(&created, "id"));

    let (status, account) = api
        .master(
            Method::PATCH,
            &path,
            Some(json!({
                "name": " Acme Ltd ",
                "auth_method": "any",
                "rate_limit": { "per_minute": 20 },
                "network_policy": { "allowed_ips": ["192.168.0.0/16"] },
                "permissions": ["orders:read", "orders:write"],
                "plan": { "max_keys": null }
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{account}");
    assert_eq!(account["id"], created["id"]);
    assert_eq!(account["name"], "Acme Ltd");
    assert_eq!(account["auth_method"], "any");
    // Objects merge field by field; null removes one; arrays are replaced.
    assert_eq!(
        account["rate_limit"],
        json!({ "per_minute": 20, "per_hour": 100 })
    );
    assert_eq!(
        account["network_policy"],
        json!({ "allowed_ips": ["192.168.0.0/16"], "allowed_domains": ["https://acme.example"] })
    );
    assert_eq!(
        account["permissions"],
        json!(["orders:read", "orders:write"])
    );
    assert_eq!(account["plan"], json!({ "max_keys": null, "max_sites": 2 }));
    assert_eq!(account["active"], true);
    assert_eq!(account["created_at"], created["created_at"]);
    assert!(time(&account, "updated_at") >= time(&created, "updated_at"));
    let (_, shown) = api.master(Method::GET, &path, None).await;
    assert_eq!(shown, account);

    let (status, same) = api.master(Method::PATCH, &path, None).await;
    assert_eq!((status, &same), (StatusCode::OK, &account));
    let (status, reset) = api
        .master(
            Method::PATCH,
            &path,
            Some(json!({ "rate_limit": null, "permissions": null })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reset}");
    assert_eq!(
        (&reset["rate_limit"], &reset["permissions"]),
        (&Value::Null, &Value::Null)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_domains_take_domains_wildcards_and_origins_normalised() {
    let (_up, _gw, api) = start().await;
    let domains = [
        "Example.COM",
        "*.Example.org",
        " https://Example.net:443/ ",
        "localhost",
    ];
    let id = api
        .account(json!({ "name": "Acme", "network_policy": { "allowed_domains": domains } }))
        .await;
    let (_, shown) = api
        .master(Method::GET, &format!("/v1/accounts/{id}"), None)
        .await;
    assert_eq!(
        shown["network_policy"]["allowed_domains"],
        json!([
            "example.com",
            "*.example.org",
            "https://example.net",
            "localhost"
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_account_refuses_bad_fields_naming_them() {
    let (_up, _gw, api) = start().await;
    let id = api.account(json!({ "name": "Acme" })).await;
    let path = format!("/v1/accounts/{id}");
    let (_, before) = api.master(Method::GET, &path, None).await;

    for (body, field) in [
        (json!({ "colour": "red" }), "colour"),
        (json!({ "id": "acc_other" }), "id"),
        (json!({ "name": null }), "name"),
        (json!({ "name": " " }), "name"),
        (json!({ "active": null }), "active"),
        (json!({ "active": "no" }), "active"),
        (json!({ "auth_method": "magic" }), "auth_method"),
        (
            json!({ "rate_limit": { "per_minute": 0 } }),
            "rate_limit.per_minute",
        ),
        (
            json!({ "network_policy": { "allowed_ips": ["nope"] } }),
            "network_policy.allowed_ips[0]",
        ),
        (
            json!({ "network_policy": { "allowed_domains": ["not a domain"] } }),
            "network_policy.allowed_domains[0]",
        ),
        (
            json!({ "network_policy": { "allowed_domains": ["a.example", "example.com:8080"] } }),
            "network_policy.allowed_domains[1]",
        ),
        (
            json!({ "network_policy": { "allowed_domains": ["ftp://example.com"] } }),
            "network_policy.allowed_domains[0]",
        ),
        (
            json!({ "network_policy": { "allowed_domains": ["*."] } }),
            "network_policy.allowed_domains[0]",
        ),
        (
            json!({ "network_policy": { "allowed_domains": ["example.com/path"] } }),
            "network_policy.allowed_domains[0]",
        ),
        (json!({ "network_policy": { "colour": 1 } }), "colour"),
        (json!({ "permissions": ["has space"] }), "permissions[0]"),
        (json!({ "plan": { "max_keys": -1 } }), "plan.max_keys"),
    ] {
        let (status, err) = api.master(Method::PATCH, &path, Some(body)).await;
        assert_names_field(status, &err, field);
    }
    let (_, after) = api.master(Method::GET, &path, None).await;
    assert_eq!(after, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_account_is_404_and_only_the_operator_changes_accounts() {
    let (_up, _gw, api) = start().await;
    for method in [Method::PATCH, Method::DELETE] {
        let (status, err) = api
            .master(method, "/v1/accounts/acc_missing", Some(json!({})))
            .await;
        assert_eq!((status, code(&err)), (StatusCode::NOT_FOUND, "not_found"));
    }

    let (account, _, raw) = api.account_with_key("acme").await;
    // An account cannot change its own plan, limits or state, nor delete itself.
    for method in [Method::PATCH, Method::DELETE] {
        let (status, err) = api
            .call(
                method.clone(),
                "/v1/account",
                &raw,
                Some(json!({ "active": false })),
            )
            .await;
        assert_eq!(
            (status, code(&err)),
            (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
        );
        let (status, err) = api
            .call(method, &format!("/v1/accounts/{account}"), &raw, None)
            .await;
        assert_eq!((status, code(&err)), (StatusCode::FORBIDDEN, "forbidden"));
    }
    let (_, shown) = api
        .master(Method::GET, &format!("/v1/accounts/{account}"), None)
        .await;
    assert_eq!(shown["active"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_account_is_refused_on_the_next_request() {
    let (_up, gw, api) = start().await;
    let (account, _, key) = api.account_with_key("acme").await;
    let path = format!("/v1/accounts/{account}");
    expect_echo(get_things(&gw, &key).await).await;

    let (status, body) = api
        .master(Method::PATCH, &path, Some(json!({ "active": false })))
        .await;
    assert_eq!((status, &body["active"]), (StatusCode::OK, &json!(false)));
    expect_refusal(
        get_things(&gw, &key).await,
        StatusCode::UNAUTHORIZED,
        "inactive_credential",
    )
    .await;
    // Its keys cannot manage it either; the operator still can.
    let (status, err) = api.call(Method::GET, "/v1/account", &key, None).await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::UNAUTHORIZED, "inactive_credential")
    );

    let (status, _) = api
        .master(Method::PATCH, &path, Some(json!({ "active": true })))
        .await;
    assert_eq!(status, StatusCode::OK);
    expect_echo(get_things(&gw, &key).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patched_account_ips_apply_on_the_next_request() {
    let (_up, gw, api) = start().await;
    let (account, _, key) = api.account_with_key("acme").await;
    expect_echo(get_things(&gw, &key).await).await;
    api.master(
        Method::PATCH,
        &format!("/v1/accounts/{account}"),
        Some(json!({ "network_policy": { "allowed_ips": ["10.0.0.0/8"] } })),
    )
    .await;
    expect_refusal(
        get_things(&gw, &key).await,
        StatusCode::FORBIDDEN,
        "ip_not_allowed",
    )
    .await;
}

// === DELETE ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_account_loses_every_credential_at_once() {
    let (_up, gw, api) = start().await;
    let (account, _, first) = api.account_with_key("acme").await;
    let second = text(&api.key(&account, json!({ "name": "second" })).await, "key");
    let (_, other_key) = gw.account_with_key().await;
    for key in [&first, &second, &other_key] {
        expect_echo(get_things(&gw, key).await).await;
    }

    let path = format!("/v1/accounts/{account}");
    let (status, body) = api.master(Method::DELETE, &path, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "deleted": true })));
    for key in [&first, &second] {
        expect_refusal(
            get_things(&gw, key).await,
            StatusCode::UNAUTHORIZED,
            "invalid_credential",
        )
        .await;
    }
    expect_echo(get_things(&gw, &other_key).await).await;

    for sub in ["", "/keys", "/sites", "/config"] {
        let (status, err) = api.master(Method::GET, &format!("{path}{sub}"), None).await;
        assert_eq!(
            (status, code(&err)),
            (StatusCode::NOT_FOUND, "not_found"),
            "{sub}"
        );
    }
    let (status, _) = api.master(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, list) = api.master(Method::GET, "/v1/accounts", None).await;
    assert!(
        list["accounts"]
            .as_array()
            .expect("accounts")
            .iter()
            .all(|a| a["id"] != account.as_str()),
        "{list}"
    );
}

// === config ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_shows_the_account_and_the_calling_key() {
    let (_up, _gw, api) = start().await;
    let account = api
        .account(json!({
            "name": "acme",
            "auth_method": "any",
            "rate_limit": { "per_minute": 30 },
            "network_policy": { "allowed_ips": ["10.0.0.0/8", "127.0.0.1"], "allowed_domains": ["https://acme.example"] },
            "permissions": ["account:read", "orders:read"]
        }))
        .await;
    let key = api
        .key(
            &account,
            json!({ "name": "k", "scopes": ["account:read"], "allowed_ips": ["127.0.0.1"] }),
        )
        .await;

    let (status, own) = api
        .call(Method::GET, "/v1/account/config", &text(&key, "key"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{own}");
    assert_eq!(
        own,
        json!({
            "auth_method": "any",
            "rate_limit": {
                "per_minute": 30, "per_hour": 1000, "per_day": 10000,
                "source": { "per_minute": "account", "per_hour": "default", "per_day": "default" }
            },
            "network_policy": {
                "allowed_ips": { "tenant": ["10.0.0.0/8", "127.0.0.1"], "client": ["127.0.0.1"] },
                "allowed_domains": { "tenant": ["https://acme.example"], "client": [] }
            },
            "permissions": { "tenant": ["account:read", "orders:read"], "client": ["account:read"] }
        })
    );

    let (status, operator) = api
        .master(Method::GET, &format!("/v1/accounts/{account}/config"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{operator}");
    assert_eq!(
        operator,
        json!({
            "auth_method": "any",
            "rate_limit": {
                "per_minute": 30, "per_hour": 1000, "per_day": 10000,
                "source": { "per_minute": "account", "per_hour": "default", "per_day": "default" }
            },
            "network_policy": {
                "allowed_ips": { "tenant": ["10.0.0.0/8", "127.0.0.1"], "client": null },
                "allowed_domains": { "tenant": ["https://acme.example"], "client": null }
            },
            "permissions": { "tenant": ["account:read", "orders:read"], "client": null }
        })
    );

    let (plain, _, _) = api.account_with_key("plain").await;
    let (_, view) = api
        .master(Method::GET, &format!("/v1/accounts/{plain}/config"), None)
        .await;
    // Never null: the configured defaults, named as such.
    assert_eq!(
        view["rate_limit"],
        json!({
            "per_minute": 60, "per_hour": 1000, "per_day": 10000,
            "source": { "per_minute": "default", "per_hour": "default", "per_day": "default" }
        })
    );
    assert_eq!(view["auth_method"], "api_key");
    assert_eq!(
        view["permissions"],
        json!({ "tenant": null, "client": null })
    );
}

/// `GET /v1/account` with one of the account's own keys: its `id`, `name`, `auth_method` and
/// `created_at` (RFC 3339 UTC), the same as the operator sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_reads_itself_at_v1_account() {
    let (_up, _gw, api) = start().await;
    let account = api
        .account(json!({ "name": "acme", "auth_method": "any" }))
        .await;
    let key = api.key(&account, json!({ "name": "own" })).await;
    let (status, me) = api
        .call(Method::GET, "/v1/account", &text(&key, "key"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["id"], account.as_str());
    assert_eq!(me["name"], "acme");
    assert_eq!(me["auth_method"], "any");
    let created = text(&me, "created_at");
    assert!(created.ends_with('Z'), "not UTC: {created}");
    let (_, seen) = api
        .master(Method::GET, &format!("/v1/accounts/{account}"), None)
        .await;
    assert_eq!(time(&me, "created_at"), time(&seen, "created_at"));
}

// === bodies and names ===

/// Every admin endpoint that takes a body takes a JSON object: an array (which serde would read
/// as the struct's fields in order, so `["acme"]` made an account named acme), a string, a
/// number or `null` is 400 `invalid_request`, and nothing is created or changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_a_json_object_is_400_on_every_endpoint() {
    let (_up, _gw, api) = start().await;
    let (account, key_id, _) = api.account_with_key("acme").await;
    let base = format!("/v1/accounts/{account}");
    let key = format!("{base}/keys/{key_id}");
    let endpoints = [
        (Method::POST, "/v1/accounts".to_owned()),
        (Method::PATCH, base.clone()),
        (Method::POST, format!("{base}/keys")),
        (Method::PATCH, key.clone()),
        (Method::POST, format!("{key}/renew")),
        (Method::POST, format!("{key}/roll")),
        (Method::POST, format!("{base}/sites")),
    ];
    let (_, before_accounts) = api.master(Method::GET, "/v1/accounts", None).await;
    let (_, before_keys) = api.master(Method::GET, &format!("{base}/keys"), None).await;
    for (method, path) in &endpoints {
        for body in [
            json!(["acme"]),
            json!(["https://example.com"]),
            json!("acme"),
            json!(42),
            Value::Null,
        ] {
            let (status, err) = api.master(method.clone(), path, Some(body.clone())).await;
            assert_eq!(
                (status, code(&err)),
                (StatusCode::BAD_REQUEST, "invalid_request"),
                "{method} {path} with {body}: {err}"
            );
        }
    }
    let (_, after_accounts) = api.master(Method::GET, "/v1/accounts", None).await;
    let (_, after_keys) = api.master(Method::GET, &format!("{base}/keys"), None).await;
    assert_eq!(after_accounts, before_accounts);
    assert_eq!(after_keys, before_keys);
}

/// An account's name is at most 100 characters, like a key's, on create and on PATCH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_name_is_at_most_100_characters() {
    let (_up, _gw, api) = start().await;
    let (status, err) = api
        .master(
            Method::POST,
            "/v1/accounts",
            Some(json!({ "name": "x".repeat(101) })),
        )
        .await;
    assert_names_field(status, &err, "name");
    let id = api.account(json!({ "name": "é".repeat(100) })).await;
    let path = format!("/v1/accounts/{id}");
    let (status, err) = api
        .master(
            Method::PATCH,
            &path,
            Some(json!({ "name": "y".repeat(101) })),
        )
        .await;
    assert_names_field(status, &err, "name");
    let (_, account) = api.master(Method::GET, &path, None).await;
    assert_eq!(text(&account, "name"), "é".repeat(100));
}
