//! Importing keys by hash (contract 5a, `POST …/keys/import`): a raw key from another system,
//! known here only by its SHA-256, works on the proxy at once in all three credential forms; one
//! key or a batch of up to 1,000, checked as create checks them, all or nothing; conflicts are
//! 409s; and a malformed credential costs a store lookup only once the store holds imported
//! keys. Two gateways on one Redis: `tests/fleet.rs::a_key_imported_on_one_instance_works_on_the_other`.

#[path = "admin_client.rs"]
mod admin_client;
mod common;

use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tollgate::credential::{self, Kind};

use admin_client::{assert_names_field, code, message, text, AdminClient};
use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{client, expect_echo, expect_refusal};

async fn start() -> (Upstream, Gateway, AdminClient) {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let api = AdminClient::new(gw.admin_url(""), &gw.master);
    (upstream, gw, api)
}

/// The hex SHA-256 of `raw`, as the other system would hand it over.
fn sha256(raw: &str) -> String {
    hex::encode(Sha256::digest(raw.as_bytes()))
}

/// A raw key in another system's format: no tollgate prefix, no checksum.
fn foreign_key(tag: &str) -> String {
    format!("sk_live_51Habc{tag}XyZ0123456789abcdefghijklmnopq")
}

/// `GET /things` on the proxy with `raw` in credential form `form` (0 Bearer, 1 `X-API-Key`,
/// 2 Basic).
fn presented(gw: &Gateway, raw: &str, form: usize) -> RequestBuilder {
    let request = client().get(gw.proxy_url("/things"));
    match form {
        0 => request.bearer_auth(raw),
        1 => request.header("x-api-key", raw),
        _ => request.basic_auth(raw, Some("")),
    }
}

async fn proxied_status(gw: &Gateway, raw: &str) -> StatusCode {
    presented(gw, raw, 0)
        .send()
        .await
        .expect("proxy request")
        .status()
}

async fn cache_misses(gw: &Gateway) -> f64 {
    gw.metric("tollgate_key_cache_misses_total", &[]).await
}

/// `POST /v1/accounts/{account}/keys/import` as the operator.
async fn import(api: &AdminClient, account: &str, body: Value) -> (StatusCode, Value) {
    let path = format!("/v1/accounts/{account}/keys/import");
    api.master(Method::POST, &path, Some(body)).await
}

/// The names of the account's keys, oldest first.
async fn key_names(api: &AdminClient, account: &str) -> Vec<String> {
    let (_, list) = api
        .master(Method::GET, &format!("/v1/accounts/{account}/keys"), None)
        .await;
    list["keys"]
        .as_array()
        .map(|keys| keys.iter().map(|k| text(k, "name")).collect())
        .unwrap_or_default()
}

/// `n` keys to import, named `{prefix} {i}`, each the hash of [`foreign_key`].
fn batch(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({ "hash": sha256(&foreign_key(&format!("{prefix}{i}"))), "name": format!("{prefix} {i}") }))
        .collect()
}

// === one key ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_key_works_at_once_in_every_credential_form() {
    let (upstream, gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let raw = foreign_key("one");
    expect_refusal(
        presented(&gw, &raw, 0).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_credential",
    )
    .await;

    // Upper-case hex is accepted; the key has no raw value to show.
    let (status, key) = import(
        &api,
        &account,
        json!({
            "hash": sha256(&raw).to_uppercase(),
            "name": "legacy",
            "scopes": ["orders:read", "orders:write"],
            "external_id": "cus_42",
        }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    assert_eq!(key["imported"], true);
    assert_eq!((&key["prefix"], &key["preview"]), (&json!(""), &json!("")));
    assert!(key.get("key").is_none(), "no raw key: {key}");
    assert!(!key.to_string().contains(&sha256(&raw)), "no hash: {key}");
    let key_id = text(&key, "id");

    for form in 0..3 {
        let echo = expect_echo(presented(&gw, &raw, form).send().await.unwrap()).await;
        let headers = echo["headers"].as_object().expect("headers");
        assert_eq!(headers["x-tollgate-account-id"], account.as_str(), "{form}");
        assert_eq!(headers["x-tollgate-key-id"], key_id.as_str(), "{form}");
        assert_eq!(headers["x-tollgate-scopes"], "orders:read orders:write");
        assert_eq!(headers["x-tollgate-external-id"], "cus_42");
        assert!(
            !headers.contains_key("authorization") && !headers.contains_key("x-api-key"),
            "the credential went upstream: {headers:?}"
        );
    }
    assert_eq!(upstream.requests_seen(), 3);

    // Listed like any key; audited as a key creation marked imported, without the hash.
    let (_, shown) = api
        .master(
            Method::GET,
            &format!("/v1/accounts/{account}/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(shown["imported"], true, "{shown}");
    let (_, audit) = api
        .master(
            Method::GET,
            &format!("/v1/accounts/{account}/audit?action=create_key"),
            None,
        )
        .await;
    let entry = &audit["logs"][0];
    assert_eq!(entry["target_id"], key_id.as_str(), "{audit}");
    assert_eq!(entry["detail"]["imported"], true, "{entry}");
    assert_eq!(entry["detail"]["name"], "legacy", "{entry}");
    let detail = entry["detail"].to_string().to_lowercase();
    assert!(!detail.contains(&sha256(&raw)) && !detail.contains(&raw.to_lowercase()));

    // A raw key refused (and remembered as unknown) a moment before its import works at once.
    let later = foreign_key("later");
    assert_eq!(proxied_status(&gw, &later).await, StatusCode::UNAUTHORIZED);
    let (status, body) = import(
        &api,
        &account,
        json!({ "hash": sha256(&later), "name": "later" }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(proxied_status(&gw, &later).await, StatusCode::OK);
}

/// A key of another tollgate (a well-formed `tgsk_` credential) moves by its hash too; and an
/// account key imports into its own account at `/v1/account/keys/import`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tollgate_key_from_elsewhere_is_imported_by_its_hash() {
    let (_up, gw, api) = start().await;
    let (_, _, own) = api.account_with_key("acme").await;
    let raw = credential::generate(Kind::Secret);
    assert_eq!(proxied_status(&gw, &raw).await, StatusCode::UNAUTHORIZED);
    let (status, key) = api
        .call(
            Method::POST,
            "/v1/account/keys/import",
            &own,
            Some(json!({ "hash": sha256(&raw), "name": "moved" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    assert_eq!(key["imported"], true);
    for form in 0..3 {
        expect_echo(presented(&gw, &raw, form).send().await.unwrap()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_checks_every_field_as_create_does() {
    let (_up, _gw, api) = start().await;
    let account = api
        .account(json!({ "name": "acme", "permissions": ["orders:read", "account:write"] }))
        .await;
    let hash = sha256(&foreign_key("fields"));
    for (body, field) in [
        (json!({ "name": "k" }), "hash"),
        (json!({ "hash": hash }), "name"),
        (json!({ "hash": "abc", "name": "k" }), "hash"),
        (json!({ "hash": format!("{hash}0"), "name": "k" }), "hash"),
        (
            json!({ "hash": format!("g{}", &hash[1..]), "name": "k" }),
            "hash",
        ),
        (json!({ "hash": 42, "name": "k" }), "hash"),
        (json!({ "hash": hash, "name": "" }), "name"),
        (
            json!({ "hash": hash, "name": "k", "type": "publishable" }),
            "allowed_origins",
        ),
        (
            json!({ "hash": hash, "name": "k", "scopes": ["orders:write"] }),
            "scopes[0]",
        ),
        (
            json!({ "hash": hash, "name": "k", "ttl": "forever" }),
            "ttl",
        ),
        (
            json!({ "hash": hash, "name": "k", "external_id": " x" }),
            "external_id",
        ),
        (
            json!({ "hash": hash, "name": "k", "allowed_ips": ["nope"] }),
            "allowed_ips[0]",
        ),
        (
            json!({ "hash": hash, "name": "k", "colour": "red" }),
            "colour",
        ),
        (json!({ "keys": [], }), "keys"),
        (json!({ "keys": {} }), "keys"),
        (
            json!({ "keys": [{ "hash": hash, "name": "k" }], "name": "x" }),
            "name",
        ),
        (
            json!({ "keys": [{ "hash": hash, "name": "k", "rate_limit": { "per_minute": 0 } }] }),
            "keys[0].rate_limit.per_minute",
        ),
        (
            json!({ "keys": [{ "hash": hash, "name": "k", "scopes": [1] }] }),
            "keys[0].scopes[0]",
        ),
        (json!({ "keys": [{ "name": "k" }] }), "keys[0]"),
    ] {
        let (status, err) = import(&api, &account, body.clone()).await;
        assert_names_field(status, &err, field);
    }
    assert!(key_names(&api, &account).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_or_name_already_taken_is_409_and_the_plan_counts_the_batch() {
    let (_up, gw, api) = start().await;
    let account = api
        .account(json!({ "name": "acme", "plan": { "max_keys": 4 } }))
        .await;
    let made = api.key(&account, json!({ "name": "made here" })).await;
    let other = api.account(json!({ "name": "other" })).await;
    let elsewhere = foreign_key("elsewhere");
    let (status, _) = import(
        &api,
        &other,
        json!({ "hash": sha256(&elsewhere), "name": "theirs" }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);

    // The hash of a key made here, or of one imported into another account: key_exists.
    for raw in [text(&made, "key"), elsewhere] {
        let (status, err) =
            import(&api, &account, json!({ "hash": sha256(&raw), "name": "k" })).await;
        assert_eq!(
            (status, code(&err)),
            (StatusCode::CONFLICT, "key_exists"),
            "{err}"
        );
    }
    let (status, err) = import(
        &api,
        &account,
        json!({ "hash": sha256(&foreign_key("n")), "name": "MADE HERE" }),
    )
    .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::CONFLICT, "name_taken"),
        "{err}"
    );

    // In a batch the 409 names the entry, and nothing of the batch is created.
    let mut keys = batch("b", 3);
    keys[2]["hash"] = json!(sha256(&text(&made, "key")));
    let (status, err) = import(&api, &account, json!({ "keys": keys })).await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::CONFLICT, "key_exists"),
        "{err}"
    );
    assert!(message(&err).contains("keys[2]"), "{err}");
    let mut keys = batch("c", 3);
    keys[1]["name"] = json!("Made Here");
    let (status, err) = import(&api, &account, json!({ "keys": keys })).await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::CONFLICT, "name_taken"),
        "{err}"
    );
    assert!(message(&err).contains("keys[1]"), "{err}");

    // max_keys 4 with one key: a batch of 4 does not fit, a batch of 3 does.
    let (status, err) = import(&api, &account, json!({ "keys": batch("d", 4) })).await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::CONFLICT, "plan_limit"),
        "{err}"
    );
    assert_eq!(key_names(&api, &account).await, ["made here"]);
    let (status, body) = import(&api, &account, json!({ "keys": batch("d", 3) })).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(key_names(&api, &account).await.len(), 4);
    assert_eq!(
        proxied_status(&gw, &foreign_key("d2")).await,
        StatusCode::OK
    );
}

// === batches ===

/// A thousand keys in one request: one bad entry (at 500) creates nothing and is named; fixed,
/// all thousand are created in order, each audited, and work on the proxy. A hash or name given
/// twice names the later entry, and more than a thousand is refused naming `keys`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_a_thousand_is_all_or_nothing() {
    let (_up, gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let mut keys = batch("k", 1000);
    for (i, key) in keys.iter_mut().enumerate() {
        key["external_id"] = json!(format!("user {}", i % 10));
        key["metadata"] = json!({ "migrated_from": "legacy", "row": i });
    }
    let good = keys[500]["hash"].clone();
    keys[500]["hash"] = json!("not a hash");
    let (status, err) = import(&api, &account, json!({ "keys": keys })).await;
    assert_names_field(status, &err, "keys[500].hash");
    assert!(key_names(&api, &account).await.is_empty());

    let mut twice = batch("t", 3);
    twice[2]["hash"] = twice[0]["hash"].clone();
    let (status, err) = import(&api, &account, json!({ "keys": twice })).await;
    assert_names_field(status, &err, "keys[2].hash");
    let mut twice = batch("t", 3);
    twice[1]["name"] = json!("T 0");
    let (status, err) = import(&api, &account, json!({ "keys": twice })).await;
    assert_names_field(status, &err, "keys[1].name");
    let (status, err) = import(&api, &account, json!({ "keys": batch("x", 1001) })).await;
    assert_names_field(status, &err, "keys");
    // The import body may hold 1 MiB (other bodies 64 KiB), and no more.
    let mut padded = batch("p", 1000);
    for key in &mut padded {
        key["metadata"] = json!({ "note": "x".repeat(1100) });
    }
    let (status, err) = import(&api, &account, json!({ "keys": padded })).await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
        "{err}"
    );
    assert!(message(&err).contains("1048576"), "{err}");
    assert!(key_names(&api, &account).await.is_empty());

    keys[500]["hash"] = good;
    let (status, created) = import(&api, &account, json!({ "keys": keys })).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let created = created["keys"].as_array().expect("keys").clone();
    assert_eq!(created.len(), 1000);
    for (i, key) in created.iter().enumerate().step_by(111) {
        assert_eq!(key["name"], format!("k {i}"));
        assert_eq!(key["imported"], true);
        assert_eq!(key["external_id"], format!("user {}", i % 10));
    }
    assert_eq!(key_names(&api, &account).await.len(), 1000);
    let (_, audit) = api
        .master(
            Method::GET,
            &format!("/v1/accounts/{account}/audit?action=create_key&limit=1"),
            None,
        )
        .await;
    assert_eq!(audit["total"], 1000, "{audit}");
    for i in [0, 500, 999] {
        let echo = expect_echo(
            presented(&gw, &foreign_key(&format!("k{i}")), i % 3)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(echo["headers"]["x-tollgate-key-id"], created[i]["id"]);
    }
    let (status, listed) = api
        .master(
            Method::GET,
            &format!("/v1/accounts/{account}/keys?external_id=user%207"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["keys"].as_array().map(Vec::len), Some(100));
}

// === the proxy's format check ===

/// Without imported keys a credential that fails the checksum is refused without a lookup (the
/// cache-miss counter stays); once the store holds one, such a credential is looked up (a miss)
/// and still refused, its miss cached. A credential over 512 bytes is never looked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_credentials_are_looked_up_only_once_keys_are_imported() {
    let (_up, gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    let malformed = foreign_key("nobody");
    let overlong = format!("sk_live_{}", "x".repeat(600));

    let before = cache_misses(&gw).await;
    for raw in [&malformed, &overlong] {
        expect_refusal(
            presented(&gw, raw, 0).send().await.unwrap(),
            StatusCode::UNAUTHORIZED,
            "invalid_credential",
        )
        .await;
    }
    assert_eq!(
        cache_misses(&gw).await,
        before,
        "no lookup without imported keys"
    );

    let (status, body) = import(
        &api,
        &account,
        json!({ "hash": sha256(&foreign_key("someone")), "name": "imported" }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let before = cache_misses(&gw).await;
    expect_refusal(
        presented(&gw, &malformed, 1).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_credential",
    )
    .await;
    assert_eq!(cache_misses(&gw).await, before + 1.0, "one lookup");
    expect_refusal(
        presented(&gw, &malformed, 2).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_credential",
    )
    .await;
    assert_eq!(cache_misses(&gw).await, before + 1.0, "the miss is cached");
    expect_refusal(
        presented(&gw, &overlong, 0).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_credential",
    )
    .await;
    assert_eq!(
        cache_misses(&gw).await,
        before + 1.0,
        "an overlong one is never looked up"
    );
}

/// Deleting the last imported key brings the checksum's shortcut back once the cache's ttl has
/// passed (the answer is read again then, never per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shortcut_returns_when_the_last_imported_key_is_gone() {
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .tweak(|s| s.cache.ttl = std::time::Duration::from_millis(200))
        .start()
        .await;
    let api = AdminClient::new(gw.admin_url(""), &gw.master);
    let (account, _, _) = api.account_with_key("acme").await;
    let (status, key) = import(
        &api,
        &account,
        json!({ "hash": sha256(&foreign_key("gone")), "name": "soon gone" }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let (status, _) = api
        .master(
            Method::DELETE,
            &format!("/v1/accounts/{account}/keys/{}", text(&key, "id")),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // Each malformed credential is a new hash: counted while the flag is up, not after.
    let mut n = 0;
    let settled = common::eventually(std::time::Duration::from_secs(5), || {
        n += 1;
        let raw = foreign_key(&format!("probe{n}"));
        let gw = &gw;
        async move {
            let before = cache_misses(gw).await;
            let status = proxied_status(gw, &raw).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            cache_misses(gw).await == before
        }
    })
    .await;
    assert!(settled, "malformed credentials are still looked up");
}
