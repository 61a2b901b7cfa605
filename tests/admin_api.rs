//! The admin API over a real socket: accounts, keys and their rules, the credential forms,
//! errors that name their field, health and metrics, cache invalidation and the audit log.
//!
//! Each test starts its own admin listener on `127.0.0.1:0` over its own embedded store.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate::admin::{self, AdminState, MasterKeyError};
use tollgate::auth::cache::{KeyCache, Lookup};
use tollgate::config::{CacheSettings, OnStoreError};
use tollgate::credential::{self, KeyHash, Kind};
use tollgate::limits::Limiters;
use tollgate::metering::{Meter, WallClock};
use tollgate::metrics::Metrics;
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::{AuditQuery, RateLimitSpec, Records, SharedStore};

use common::{hold_the_pool, one_blocking_thread};

// === harness ===

/// A running admin listener and handles on what it shares.
struct Admin {
    base: String,
    http: reqwest::Client,
    master: String,
    store: SharedStore,
    cache: Arc<KeyCache>,
    /// The router's state, for what the gateway calls on it directly (the shutdown's wait).
    state: AdminState,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// How a request presents its credential.
#[derive(Clone, Copy)]
enum Cred<'a> {
    None,
    Bearer(&'a str),
    ApiKey(&'a str),
    Basic(&'a str),
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn start() -> Admin {
    start_with(|state| state).await
}

/// [`start`], with `tweak` applied to the API's state.
async fn start_with(tweak: impl FnOnce(AdminState) -> AdminState) -> Admin {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: SharedStore =
        Arc::new(EmbeddedStore::open(&dir.path().join("db")).expect("open store"));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let cache = Arc::new(KeyCache::new(
        Arc::clone(&store),
        Arc::new(Limiters::new()),
        Arc::new(Meter::new(WallClock::System)),
        Arc::clone(&metrics),
        CacheSettings {
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            max_entries: 1000,
        },
        RateLimitSpec::default(),
        OnStoreError::FailOpen,
    ));
    let master = admin::ensure_master_key(&*store, None)
        .await
        .expect("master key");
    let raw_master = master.generated.expect("a fresh store generates a key");
    let state = tweak(AdminState::new(
        Arc::clone(&store),
        Arc::clone(&cache),
        metrics,
        Some(master.hash),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // With the token endpoint, which the gateway serves on its proxy listener.
    let app = admin::router(state.clone())
        .merge(admin::token_router(state.clone()))
        .into_make_service_with_connect_info::<SocketAddr>();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Admin {
        base: format!("http://{addr}"),
        http: reqwest::Client::new(),
        master: raw_master,
        store,
        cache,
        state,
        server,
        _dir: dir,
    }
}

impl Admin {
    /// Any request; answers the status and the body as JSON (`Null` when it is not JSON).
    async fn send(
        &self,
        method: Method,
        path: &str,
        cred: Cred<'_>,
        body: Option<Vec<u8>>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        req = match cred {
            Cred::None => req,
            Cred::Bearer(c) => req.bearer_auth(c),
            Cred::ApiKey(c) => req.header("x-api-key", c),
            Cred::Basic(c) => req.basic_auth(c, Some("")),
        };
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let bytes = resp.bytes().await.expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        cred: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| serde_json::to_vec(&b).expect("json"));
        self.send(method, path, Cred::Bearer(cred), body).await
    }

    async fn master_call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call(method, path, &self.master, body).await
    }

    async fn create_account(&self, body: Value) -> Value {
        let (status, account) = self
            .master_call(Method::POST, "/v1/accounts", Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{account}");
        account
    }

    async fn account(&self) -> String {
        let account = self.create_account(json!({ "name": "Acme" })).await;
        account["id"].as_str().expect("account id").to_owned()
    }

    /// Creates a key as the operator; answers the create response (with the raw `key`).
    async fn create_key(&self, account_id: &str, body: Value) -> Value {
        let (status, key) = self
            .master_call(
                Method::POST,
                &format!("/v1/accounts/{account_id}/keys"),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        key
    }
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no code>")
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("<no message>")
}

fn text(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
        .to_owned()
}

// === accounts and keys ===

#[tokio::test]
async fn operator_creates_account_and_key_and_raw_key_is_shown_once() {
    let admin = start().await;
    let account = admin
        .create_account(json!({
            "name": "Acme",
            "rate_limit": { "per_minute": 10 },
            "network_policy": { "allowed_ips": ["10.0.0.0/8"], "allowed_domains": ["https://acme.example"] },
            "permissions": ["orders:read", "account:read", "account:write"],
            "plan": { "max_keys": 5 }
        }))
        .await;
    assert!(text(&account, "id").starts_with("acc_"));
    assert_eq!(account["auth_method"], "api_key");
    assert_eq!(account["rate_limit"]["per_minute"], 10);
    let account_id = text(&account, "id");

    let created = admin
        .create_key(
            &account_id,
            json!({ "name": "backend", "scopes": ["orders:read"], "metadata": { "team": "a" } }),
        )
        .await;
    let raw = text(&created, "key");
    assert_eq!(credential::parse(&raw), Ok(Kind::Secret));
    assert_eq!(created["prefix"], credential::display_prefix(&raw));
    assert_eq!(created["preview"], credential::preview(&raw));
    assert_eq!(created["type"], "secret");
    assert_eq!(created["active"], true);
    assert_eq!(created["protected"], false);
    assert_eq!(created["metadata"]["team"], "a");
    assert_eq!(created["account_id"], account_id.as_str());
    assert!(created.get("hash").is_none());

    let key_id = text(&created, "id");
    let (status, shown) = admin
        .master_call(
            Method::GET,
            &format!("/v1/accounts/{account_id}/keys/{key_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(shown.get("key").is_none(), "raw key shown again: {shown}");
    assert!(shown.get("hash").is_none());
    assert_eq!(shown["name"], "backend");

    let (status, got) = admin
        .master_call(Method::GET, &format!("/v1/accounts/{account_id}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["name"], "Acme");
    let (status, all) = admin.master_call(Method::GET, "/v1/accounts", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["accounts"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn listing_never_shows_raw_or_hash() {
    let admin = start().await;
    let account_id = admin.account().await;
    let mut raws = Vec::new();
    for name in ["one", "two"] {
        raws.push(text(
            &admin.create_key(&account_id, json!({ "name": name })).await,
            "key",
        ));
    }
    let (status, list) = admin
        .master_call(
            Method::GET,
            &format!("/v1/accounts/{account_id}/keys"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let keys = list["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 2);
    for key in keys {
        assert!(
            key.get("key").is_none() && key.get("hash").is_none(),
            "{key}"
        );
    }
    let body = list.to_string();
    for raw in &raws {
        assert!(!body.contains(raw.as_str()));
        assert!(!body.contains(&KeyHash::of(raw).to_hex()));
    }
}

#[tokio::test]
async fn last_active_secret_key_cannot_be_deactivated_or_deleted() {
    let admin = start().await;
    let account_id = admin.account().await;
    let first = text(
        &admin
            .create_key(&account_id, json!({ "name": "first" }))
            .await,
        "id",
    );
    let base = format!("/v1/accounts/{account_id}/keys/{first}");

    let (status, body) = admin
        .master_call(Method::POST, &format!("{base}/deactivate"), None)
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "last_credential")
    );
    let (status, body) = admin.master_call(Method::DELETE, &base, None).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "last_credential")
    );

    // A publishable key does not count as a credential for the account's API calls.
    admin
        .create_key(&account_id, json!({ "name": "web", "type": "publishable", "allowed_origins": ["https://a.example"] }))
        .await;
    let (status, _) = admin
        .master_call(Method::POST, &format!("{base}/deactivate"), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    admin
        .create_key(&account_id, json!({ "name": "second" }))
        .await;
    let (status, body) = admin
        .master_call(Method::POST, &format!("{base}/deactivate"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["active"], false);
    let (status, body) = admin
        .master_call(Method::POST, &format!("{base}/activate"), None)
        .await;
    assert_eq!((status, &body["active"]), (StatusCode::OK, &json!(true)));
    let (status, body) = admin.master_call(Method::DELETE, &base, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "deleted": true })));
    let (status, body) = admin.master_call(Method::GET, &base, None).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
}

#[tokio::test]
async fn oauth_accounts_may_remove_their_last_secret_key() {
    let admin = start().await;
    let account = admin
        .create_account(json!({ "name": "o", "auth_method": "oauth" }))
        .await;
    let account_id = text(&account, "id");
    let key = text(
        &admin
            .create_key(&account_id, json!({ "name": "only" }))
            .await,
        "id",
    );
    let (status, _) = admin
        .master_call(
            Method::POST,
            &format!("/v1/accounts/{account_id}/keys/{key}/deactivate"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn protected_key_cannot_be_deactivated() {
    let admin = start().await;
    let account_id = admin.account().await;
    admin
        .create_key(&account_id, json!({ "name": "spare" }))
        .await;
    let created = admin
        .create_key(&account_id, json!({ "name": "root", "protected": true }))
        .await;
    assert_eq!(created["protected"], true);
    let base = format!("/v1/accounts/{account_id}/keys/{}", text(&created, "id"));
    let (status, body) = admin
        .master_call(Method::POST, &format!("{base}/deactivate"), None)
        .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "protected_key")
    );
    let (_, shown) = admin.master_call(Method::GET, &base, None).await;
    assert_eq!(shown["active"], true);
    // Deleting is the explicit, permanent act the contract leaves open.
    let (status, body) = admin.master_call(Method::DELETE, &base, None).await;
    assert_eq!(
        (status, body["deleted"].clone()),
        (StatusCode::OK, json!(true))
    );
}

#[tokio::test]
async fn name_taken_is_409() {
    let admin = start().await;
    let account_id = admin.account().await;
    admin
        .create_key(&account_id, json!({ "name": "dup" }))
        .await;
    let (status, body) = admin
        .master_call(
            Method::POST,
            &format!("/v1/accounts/{account_id}/keys"),
            Some(json!({ "name": "dup" })),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "name_taken"));
    // Another account may use the name.
    let other = admin.account().await;
    admin.create_key(&other, json!({ "name": "dup" })).await;
}

#[tokio::test]
async fn plan_max_keys_is_409() {
    let admin = start().await;
    let account = admin
        .create_account(json!({ "name": "small", "plan": { "max_keys": 2 } }))
        .await;
    let account_id = text(&account, "id");
    admin.create_key(&account_id, json!({ "name": "a" })).await;
    admin.create_key(&account_id, json!({ "name": "b" })).await;
    let (status, body) = admin
        .master_call(
            Method::POST,
            &format!("/v1/accounts/{account_id}/keys"),
            Some(json!({ "name": "c" })),
        )
        .await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "plan_limit"));
}

/// A small account for the plan tests: `max_keys` 2, two keys `a` and `b`; their ids.
async fn full_account(admin: &Admin) -> (String, String, String) {
    let account = admin
        .create_account(json!({ "name": "small", "plan": { "max_keys": 2 } }))
        .await;
    let account_id = text(&account, "id");
    let a = text(
        &admin.create_key(&account_id, json!({ "name": "a" })).await,
        "id",
    );
    let b = text(
        &admin.create_key(&account_id, json!({ "name": "b" })).await,
        "id",
    );
    (account_id, a, b)
}

/// `POST /v1/accounts/{account_id}/keys{then}` by the operator: the status and the answer.
async fn post_keys(
    admin: &Admin,
    account_id: &str,
    then: &str,
    body: Value,
) -> (StatusCode, Value) {
    let path = format!("/v1/accounts/{account_id}/keys{then}");
    admin.master_call(Method::POST, &path, Some(body)).await
}

/// Whether an answer is 409 `plan_limit`.
fn over_plan((status, body): &(StatusCode, Value)) -> bool {
    *status == StatusCode::CONFLICT && code(body) == "plan_limit"
}

/// Sets the key's expiry a second in the past, as time would.
async fn expire(admin: &Admin, account_id: &str, key_id: &str) {
    let mut key = admin
        .store
        .get_key(account_id, key_id)
        .await
        .expect("store")
        .expect("key");
    key.expires_at = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
    admin.store.update_key(&key).await.expect("update");
}

/// `max_keys` counts the keys that can still authenticate: not a rolled key past its grace,
/// nor an expired or a deactivated one.
#[tokio::test]
async fn plan_max_keys_counts_only_keys_that_can_authenticate() {
    let admin = start().await;
    let (account_id, a, b) = full_account(&admin).await;
    let new = |name: &str| json!({ "name": name });
    assert!(over_plan(
        &post_keys(&admin, &account_id, "", new("c")).await
    ));

    // b's old key is past its grace at once; a has expired.
    let rolled = post_keys(
        &admin,
        &account_id,
        &format!("/{b}/roll"),
        json!({ "grace": "0s" }),
    )
    .await;
    assert_eq!(rolled.0, StatusCode::CREATED, "{}", rolled.1);
    expire(&admin, &account_id, &a).await;
    let (status, c) = post_keys(&admin, &account_id, "", new("c")).await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "only b's successor counts: {c}"
    );
    assert!(over_plan(
        &post_keys(&admin, &account_id, "", new("d")).await
    ));

    // A deactivated key leaves room too.
    let c = text(&c, "id");
    let (status, _) = post_keys(&admin, &account_id, &format!("/{c}/deactivate"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, d) = post_keys(&admin, &account_id, "", new("d")).await;
    assert_eq!(status, StatusCode::CREATED, "{d}");
}

/// Whatever makes a key able to authenticate again needs room in the plan, as a new key does,
/// so the limit cannot be passed by deactivating, creating and activating again.
#[tokio::test]
async fn a_key_made_usable_again_needs_room_in_the_plan() {
    let admin = start().await;
    let (account_id, a, b) = full_account(&admin).await;
    let (status, _) = post_keys(&admin, &account_id, &format!("/{b}/deactivate"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, c) = post_keys(&admin, &account_id, "", json!({ "name": "c", "ttl": "1h" })).await;
    assert_eq!(status, StatusCode::CREATED, "{c}");
    let c = text(&c, "id");

    assert!(over_plan(
        &post_keys(&admin, &account_id, &format!("/{b}/activate"), json!({})).await
    ));
    // Rolling a deactivated key adds an active one.
    assert!(over_plan(
        &post_keys(&admin, &account_id, &format!("/{b}/roll"), json!({})).await
    ));
    // Once c has expired, b fits; renewing c would bring it back past the limit.
    expire(&admin, &account_id, &c).await;
    let (status, _) = post_keys(&admin, &account_id, &format!("/{b}/activate"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(over_plan(
        &post_keys(&admin, &account_id, &format!("/{c}/renew"), json!({})).await
    ));

    // A roll replaces a usable key, so it is allowed at the limit; the old key counts until its
    // grace ends, so a second roll meanwhile is not.
    let (status, rolled) = post_keys(
        &admin,
        &account_id,
        &format!("/{a}/roll"),
        json!({ "grace": "1h" }),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{rolled}");
    let successor = text(&rolled, "id");
    assert!(over_plan(
        &post_keys(
            &admin,
            &account_id,
            &format!("/{successor}/roll"),
            json!({})
        )
        .await
    ));
}

#[tokio::test]
async fn publishable_key_requires_allowed_origins() {
    let admin = start().await;
    let account_id = admin.account().await;
    let path = format!("/v1/accounts/{account_id}/keys");
    for body in [
        json!({ "name": "web", "type": "publishable" }),
        json!({ "name": "web", "type": "publishable", "allowed_origins": [] }),
    ] {
        let (status, err) = admin.master_call(Method::POST, &path, Some(body)).await;
        assert_eq!(
            (status, code(&err)),
            (StatusCode::BAD_REQUEST, "invalid_request")
        );
        assert!(message(&err).contains("allowed_origins"), "{err}");
    }
    let (status, err) = admin
        .master_call(Method::POST, &path, Some(json!({ "name": "web", "type": "publishable", "allowed_origins": ["not an origin"] })))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&err).contains("allowed_origins[0]"), "{err}");

    let created = admin
        .create_key(&account_id, json!({ "name": "web", "type": "publishable", "allowed_origins": ["HTTPS://App.Example:443/"] }))
        .await;
    assert_eq!(
        credential::parse(&text(&created, "key")),
        Ok(Kind::Publishable)
    );
    assert_eq!(created["allowed_origins"], json!(["https://app.example"]));
}

#[tokio::test]
async fn expiry_from_ttl_or_expires_at_but_not_both() {
    let admin = start().await;
    let account_id = admin.account().await;
    let path = format!("/v1/accounts/{account_id}/keys");
    let created = admin
        .create_key(&account_id, json!({ "name": "t", "ttl": "30d" }))
        .await;
    let at: chrono::DateTime<chrono::Utc> = text(&created, "expires_at").parse().expect("rfc 3339");
    let days = (at - chrono::Utc::now()).num_hours();
    assert!((29 * 24..=30 * 24).contains(&days), "{days}");

    let cases = [
        (
            json!({ "name": "x", "ttl": "30d", "expires_at": "2999-01-01T00:00:00Z" }),
            "ttl",
        ),
        (json!({ "name": "x", "ttl": "soon" }), "ttl"),
        (
            json!({ "name": "x", "expires_at": "2001-01-01T00:00:00Z" }),
            "expires_at",
        ),
        (
            json!({ "name": "x", "expires_at": "tomorrow" }),
            "expires_at",
        ),
    ];
    for (body, field) in cases {
        let (status, err) = admin.master_call(Method::POST, &path, Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
        assert!(message(&err).contains(field), "{err}");
    }
}

#[tokio::test]
async fn scopes_must_be_within_the_account_permissions() {
    let admin = start().await;
    let account = admin
        .create_account(json!({ "name": "p", "permissions": ["orders:read"] }))
        .await;
    let account_id = text(&account, "id");
    let (status, err) = admin
        .master_call(
            Method::POST,
            &format!("/v1/accounts/{account_id}/keys"),
            Some(json!({ "name": "k", "scopes": ["orders:write"] })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&err).contains("scopes"), "{err}");
    // Full access on a restricted account means everything the account may grant.
    let created = admin.create_key(&account_id, json!({ "name": "k" })).await;
    assert_eq!(created["scopes"], json!(["orders:read"]));
}

// === request errors ===

#[tokio::test]
async fn unknown_field_is_400_naming_it() {
    let admin = start().await;
    let (status, err) = admin
        .master_call(
            Method::POST,
            "/v1/accounts",
            Some(json!({ "name": "a", "colour": "red" })),
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    assert!(message(&err).contains("colour"), "{err}");

    let (status, err) = admin
        .master_call(
            Method::POST,
            "/v1/accounts",
            Some(json!({ "name": "a", "rate_limit": { "per_minute": "many" } })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&err).contains("rate_limit.per_minute"), "{err}");

    let (status, err) = admin
        .master_call(
            Method::POST,
            "/v1/accounts",
            Some(json!({ "name": "a", "rate_limit": { "per_minute": 0 } })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&err).contains("rate_limit.per_minute"), "{err}");

    let (status, err) = admin
        .master_call(Method::POST, "/v1/accounts", Some(json!({ "name": "  " })))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&err).contains("name"), "{err}");
    let (status, err) = admin
        .master_call(Method::POST, "/v1/accounts", Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&err).contains("name"), "{err}");

    let account_id = admin.account().await;
    let (status, err) = admin
        .master_call(
            Method::POST,
            &format!("/v1/accounts/{account_id}/keys"),
            Some(json!({ "name": "k", "metadata": [1] })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&err).contains("metadata"), "{err}");
    let (status, err) = admin
        .master_call(
            Method::POST,
            &format!("/v1/accounts/{account_id}/keys"),
            Some(json!({ "name": "x".repeat(101) })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&err).contains("name"), "{err}");
}

#[tokio::test]
async fn bad_json_is_400() {
    let admin = start().await;
    let (status, err) = admin
        .send(
            Method::POST,
            "/v1/accounts",
            Cred::Bearer(&admin.master),
            Some(b"{\"name\": ".to_vec()),
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let (status, err) = admin
        .send(
            Method::POST,
            "/v1/accounts",
            Cred::Bearer(&admin.master),
            Some(b"[1,2]".to_vec()),
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
}

/// An account named before the 100-character limit (older versions took 200) keeps its name
/// through a PATCH of another field; only a new name must fit.
#[tokio::test]
async fn an_older_long_account_name_survives_a_patch_of_another_field() {
    let admin = start().await;
    let now = chrono::Utc::now();
    let long = "n".repeat(150);
    let record = tollgate::store::AccountRecord {
        id: "acc_older".to_owned(),
        name: long.clone(),
        auth_method: Default::default(),
        rate_limit: None,
        network_policy: Default::default(),
        permissions: None,
        plan: Default::default(),
        active: true,
        shared_rate_limit: None,
        created_at: now,
        updated_at: now,
    };
    admin.store.create_account(&record).await.expect("create");
    let (status, account) = admin
        .master_call(
            Method::PATCH,
            "/v1/accounts/acc_older",
            Some(json!({ "active": false })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{account}");
    assert_eq!(
        (text(&account, "name"), &account["active"]),
        (long, &json!(false))
    );
    let (status, err) = admin
        .master_call(
            Method::PATCH,
            "/v1/accounts/acc_older",
            Some(json!({ "name": "m".repeat(101) })),
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    assert!(message(&err).contains("name"), "{err}");
}

#[tokio::test]
async fn body_over_64_kib_is_413() {
    let admin = start().await;
    let big = format!("{{\"name\":\"{}\"}}", "x".repeat(70 * 1024));
    let (status, err) = admin
        .send(
            Method::POST,
            "/v1/accounts",
            Cred::Bearer(&admin.master),
            Some(big.into_bytes()),
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );
}

/// An answer given before the request's body was read to its end (413 past the bound, 401
/// before the body is looked at) says `Connection: close`: hyper closes such a connection after
/// the answer, and a pooling client that was not told would send its next request into it. A
/// request whose body was read keeps its connection.
#[tokio::test]
async fn an_answer_that_leaves_the_body_unread_says_connection_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let admin = start().await;
    let addr = admin.base.trim_start_matches("http://").to_owned();
    let head_of = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes).to_ascii_lowercase();
        text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
    };
    // Declares 200,000 bytes and sends 100 KiB: past the bound, and never the end.
    let cases = [
        (format!("Authorization: Bearer {}\r\n", admin.master), "413"),
        (String::new(), "401"),
    ];
    for (auth, want) in cases {
        let mut stream = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        let request = format!(
            "POST /v1/accounts HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 200000\r\n\r\n{{\"name\":\"{}",
            "x".repeat(100 * 1024)
        );
        // The gateway may close before it has all of it.
        let _ = stream.write_all(request.as_bytes()).await;
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
        let head = head_of(&got);
        assert!(head.starts_with(&format!("http/1.1 {want}")), "{head}");
        assert!(head.contains("connection: close"), "{head}");
    }
    // A body read to its end: no `close`, and the next request on the same connection is
    // answered.
    let mut stream = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    for name in ["kept 1", "kept 2"] {
        let body = format!("{{\"name\":\"{name}\"}}");
        let request = format!(
            "POST /v1/accounts HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
            admin.master,
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        // Reads the answer: its head, then the body its Content-Length gives.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let complete = |got: &[u8]| {
            let text = String::from_utf8_lossy(got).to_ascii_lowercase();
            let (head, body) = text.split_once("\r\n\r\n")?;
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))?
                .trim()
                .parse()
                .ok()?;
            (body.len() >= length).then(|| head.to_owned())
        };
        let head = loop {
            if let Some(head) = complete(&got) {
                break head;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
                .await
                .expect("an answer in time")
                .expect("read");
            assert!(n > 0, "{name}: the connection closed: {}", head_of(&got));
            got.extend_from_slice(&chunk[..n]);
        };
        assert!(head.starts_with("http/1.1 201"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
    }
}

#[tokio::test]
async fn unknown_path_and_id_are_404_json() {
    let admin = start().await;
    let (status, err) = admin.master_call(Method::GET, "/v1/nothing", None).await;
    assert_eq!((status, code(&err)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, err) = admin
        .master_call(Method::GET, "/v1/accounts/acc_missing", None)
        .await;
    assert_eq!((status, code(&err)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, err) = admin
        .master_call(Method::GET, "/v1/accounts/acc_missing/keys", None)
        .await;
    assert_eq!((status, code(&err)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, err) = admin.master_call(Method::PUT, "/v1/accounts", None).await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
}

// === who may call ===

#[tokio::test]
async fn wrong_master_key_is_401() {
    let admin = start().await;
    let other_master = credential::generate(Kind::Master);
    for (cred, want) in [
        (Cred::None, "missing_credential"),
        (Cred::Bearer(&other_master), "invalid_credential"),
        (Cred::Bearer("not-a-credential"), "invalid_credential"),
        (Cred::ApiKey(&other_master), "invalid_credential"),
    ] {
        let (status, err) = admin.send(Method::GET, "/v1/accounts", cred, None).await;
        assert_eq!((status, code(&err)), (StatusCode::UNAUTHORIZED, want));
    }
    // The real key works in all three forms.
    for cred in [
        Cred::Bearer(&admin.master),
        Cred::ApiKey(&admin.master),
        Cred::Basic(&admin.master),
    ] {
        let (status, _) = admin.send(Method::GET, "/v1/accounts", cred, None).await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn account_key_manages_its_own_keys_at_v1_account() {
    let admin = start().await;
    let account_id = admin.account().await;
    let raw = text(
        &admin
            .create_key(&account_id, json!({ "name": "self" }))
            .await,
        "key",
    );

    let (status, me) = admin.call(Method::GET, "/v1/account", &raw, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["id"], account_id.as_str());
    let (status, created) = admin
        .call(
            Method::POST,
            "/v1/account/keys",
            &raw,
            Some(json!({ "name": "made-by-self" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let new_id = text(&created, "id");
    let (status, list) = admin
        .call(Method::GET, "/v1/account/keys", &raw, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["keys"].as_array().map(Vec::len), Some(2));
    let (status, _) = admin
        .call(
            Method::POST,
            &format!("/v1/account/keys/{new_id}/deactivate"),
            &raw,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // The master key has no account of its own; an account key is not the operator.
    let (status, err) = admin
        .master_call(Method::GET, "/v1/account/keys", None)
        .await;
    assert_eq!((status, code(&err)), (StatusCode::FORBIDDEN, "forbidden"));
    let (status, err) = admin.call(Method::GET, "/v1/accounts", &raw, None).await;
    assert_eq!((status, code(&err)), (StatusCode::FORBIDDEN, "forbidden"));
}

#[tokio::test]
async fn account_key_sees_only_its_own_account() {
    let admin = start().await;
    let a = admin.account().await;
    let b = admin.account().await;
    let raw_a = text(&admin.create_key(&a, json!({ "name": "a" })).await, "key");
    let b_key = text(&admin.create_key(&b, json!({ "name": "b" })).await, "id");

    for (method, path) in [
        (Method::GET, format!("/v1/account/keys/{b_key}")),
        (Method::POST, format!("/v1/account/keys/{b_key}/deactivate")),
        (Method::DELETE, format!("/v1/account/keys/{b_key}")),
    ] {
        let (status, err) = admin.call(method, &path, &raw_a, None).await;
        assert_eq!((status, code(&err)), (StatusCode::NOT_FOUND, "not_found"));
    }
    // The operator's form with another account's id answers as for an account that does not
    // exist, word for word, so an account key cannot probe which ids exist.
    let mut answers = Vec::new();
    for account_id in [b.as_str(), "acc_00000000000000000000"] {
        for (method, path) in [
            (Method::GET, format!("/v1/accounts/{account_id}")),
            (Method::PATCH, format!("/v1/accounts/{account_id}")),
            (Method::DELETE, format!("/v1/accounts/{account_id}")),
            (Method::GET, format!("/v1/accounts/{account_id}/keys")),
            (Method::POST, format!("/v1/accounts/{account_id}/keys")),
            (
                Method::GET,
                format!("/v1/accounts/{account_id}/keys/{b_key}"),
            ),
            (
                Method::POST,
                format!("/v1/accounts/{account_id}/keys/{b_key}/deactivate"),
            ),
            (Method::GET, format!("/v1/accounts/{account_id}/config")),
        ] {
            let (status, err) = admin.call(method, &path, &raw_a, None).await;
            assert_eq!(
                (status, code(&err)),
                (StatusCode::NOT_FOUND, "not_found"),
                "{path}"
            );
            answers.push(err);
        }
    }
    let (of_b, of_nobody) = answers.split_at(answers.len() / 2);
    assert_eq!(of_b, of_nobody);
    // On its own id the account key is pointed to its own form.
    let (status, err) = admin
        .call(Method::GET, &format!("/v1/accounts/{a}/keys"), &raw_a, None)
        .await;
    assert_eq!((status, code(&err)), (StatusCode::FORBIDDEN, "forbidden"));
    let (_, list) = admin
        .call(Method::GET, "/v1/account/keys", &raw_a, None)
        .await;
    let keys = list["keys"].as_array().expect("keys");
    assert!(keys.iter().all(|k| k["account_id"] == a.as_str()), "{list}");
    // B's key is untouched.
    let (_, shown) = admin
        .master_call(Method::GET, &format!("/v1/accounts/{b}/keys/{b_key}"), None)
        .await;
    assert_eq!(shown["active"], true);
}

#[tokio::test]
async fn account_read_scope_cannot_write() {
    let admin = start().await;
    let account_id = admin.account().await;
    admin
        .create_key(&account_id, json!({ "name": "full" }))
        .await;
    let reader = text(
        &admin
            .create_key(
                &account_id,
                json!({ "name": "reader", "scopes": ["account:read"] }),
            )
            .await,
        "key",
    );
    let other = text(
        &admin
            .create_key(
                &account_id,
                json!({ "name": "orders", "scopes": ["orders:read"] }),
            )
            .await,
        "key",
    );

    let (status, _) = admin
        .call(Method::GET, "/v1/account/keys", &reader, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, err) = admin
        .call(
            Method::POST,
            "/v1/account/keys",
            &reader,
            Some(json!({ "name": "nope" })),
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::FORBIDDEN, "scope_denied")
    );
    let (status, err) = admin
        .call(Method::GET, "/v1/account/keys", &other, None)
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::FORBIDDEN, "scope_denied")
    );
}

#[tokio::test]
async fn account_key_cannot_grant_more_than_it_holds() {
    let admin = start().await;
    let account_id = admin.account().await;
    let writer = text(
        &admin
            .create_key(
                &account_id,
                json!({ "name": "w", "scopes": ["account:write", "orders:read"] }),
            )
            .await,
        "key",
    );
    let (status, err) = admin
        .call(
            Method::POST,
            "/v1/account/keys",
            &writer,
            Some(json!({ "name": "x", "scopes": ["orders:write"] })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let (status, created) = admin
        .call(
            Method::POST,
            "/v1/account/keys",
            &writer,
            Some(json!({ "name": "y" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["scopes"], json!(["account:write", "orders:read"]));
}

#[tokio::test]
async fn publishable_key_is_refused_on_admin() {
    let admin = start().await;
    let account_id = admin.account().await;
    admin
        .create_key(&account_id, json!({ "name": "server" }))
        .await;
    let pk = text(
        &admin.create_key(&account_id, json!({ "name": "web", "type": "publishable", "allowed_origins": ["https://a.example"] })).await,
        "key",
    );
    let (status, err) = admin.call(Method::GET, "/v1/account/keys", &pk, None).await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::UNAUTHORIZED, "invalid_credential")
    );
    let (status, _) = admin.call(Method::GET, "/v1/accounts", &pk, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn deactivated_key_cannot_call_the_admin_api() {
    let admin = start().await;
    let account_id = admin.account().await;
    admin
        .create_key(&account_id, json!({ "name": "spare" }))
        .await;
    let created = admin.create_key(&account_id, json!({ "name": "me" })).await;
    let (raw, id) = (text(&created, "key"), text(&created, "id"));
    admin
        .master_call(
            Method::POST,
            &format!("/v1/accounts/{account_id}/keys/{id}/deactivate"),
            None,
        )
        .await;
    let (status, err) = admin
        .call(Method::GET, "/v1/account/keys", &raw, None)
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::UNAUTHORIZED, "inactive_credential")
    );
}

// === health, master key, cache, audit ===

#[tokio::test]
async fn readyz_and_healthz_and_metrics_answer() {
    let admin = start().await;
    let (status, body) = admin.send(Method::GET, "/healthz", Cred::None, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "status": "ok" })));
    let (status, body) = admin.send(Method::GET, "/readyz", Cred::None, None).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({ "status": "ready" }))
    );

    let resp = admin
        .http
        .get(format!("{}/metrics", admin.base))
        .send()
        .await
        .expect("metrics");
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let body = resp.text().await.expect("text");
    assert!(body.contains("tollgate_"), "{body}");
}

#[tokio::test]
async fn ensure_master_key_from_env_rejects_a_bad_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = EmbeddedStore::open(&dir.path().join("db")).expect("store");
    let secret = credential::generate(Kind::Secret);
    let mut broken = credential::generate(Kind::Master);
    let last = if broken.ends_with('0') { "1" } else { "0" };
    broken.replace_range(broken.len() - 1.., last);
    for bad in ["nope", secret.as_str(), broken.as_str()] {
        let err = admin::ensure_master_key(&store, Some(bad))
            .await
            .expect_err(bad);
        assert!(matches!(err, MasterKeyError::NotAMasterKey(_)), "{err}");
        assert!(err.to_string().contains("tgmk_"), "{err}");
        assert!(!err.to_string().contains(bad), "the value leaked: {err}");
    }
    assert_eq!(store.master_key_hash().await.expect("read"), None);

    let good = credential::generate(Kind::Master);
    let master = admin::ensure_master_key(&store, Some(&good))
        .await
        .expect("valid key");
    assert_eq!(master.hash, KeyHash::of(&good));
    assert!(master.generated.is_none());
    // Later starts without the variable keep the stored hash.
    let again = admin::ensure_master_key(&store, None)
        .await
        .expect("stored");
    assert_eq!((again.hash, again.generated), (KeyHash::of(&good), None));
}

#[tokio::test]
async fn deactivate_invalidates_the_cache() {
    let admin = start().await;
    let account_id = admin.account().await;
    admin
        .create_key(&account_id, json!({ "name": "spare" }))
        .await;
    let created = admin
        .create_key(&account_id, json!({ "name": "hot" }))
        .await;
    let hash = KeyHash::of(&text(&created, "key"));
    let active = |lookup: Lookup| match lookup {
        Lookup::Found(key) => key.key_active,
        Lookup::NotFound | Lookup::Unavailable => panic!("key not found in cache"),
    };
    assert!(active(admin.cache.get(&hash).await));

    let path = format!("/v1/accounts/{account_id}/keys/{}", text(&created, "id"));
    let (status, _) = admin
        .master_call(Method::POST, &format!("{path}/deactivate"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !active(admin.cache.get(&hash).await),
        "cache still serves the active key"
    );

    let (status, _) = admin
        .master_call(Method::POST, &format!("{path}/activate"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(active(admin.cache.get(&hash).await));

    let (status, _) = admin.master_call(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(matches!(admin.cache.get(&hash).await, Lookup::NotFound));
}

#[tokio::test]
async fn audit_entries_are_written() {
    let admin = start().await;
    let account_id = admin.account().await;
    let spare = text(
        &admin
            .create_key(&account_id, json!({ "name": "spare" }))
            .await,
        "key",
    );
    let key_id = text(
        &admin.create_key(&account_id, json!({ "name": "k" })).await,
        "id",
    );
    let base = format!("/v1/accounts/{account_id}/keys/{key_id}");
    admin
        .master_call(Method::POST, &format!("{base}/deactivate"), None)
        .await;
    admin
        .master_call(Method::POST, &format!("{base}/activate"), None)
        .await;
    let (status, _) = admin
        .call(
            Method::DELETE,
            &format!("/v1/account/keys/{key_id}"),
            &spare,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let query = AuditQuery {
        limit: 100,
        ..AuditQuery::default()
    };
    let page = admin
        .store
        .list_audit(Some(&account_id), &query)
        .await
        .expect("audit");
    let actions: Vec<&str> = page.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "delete_key",
            "activate_key",
            "deactivate_key",
            "create_key",
            "create_key",
            "create_account"
        ]
    );
    let delete = &page.entries[0];
    assert_eq!(
        (delete.target_type.as_str(), delete.target_id.as_str()),
        ("key", key_id.as_str())
    );
    assert!(delete.actor_id.starts_with("key_"), "{delete:?}");
    assert_eq!(delete.ip.as_deref(), Some("127.0.0.1"));
    let create = &page.entries[3];
    assert_eq!(create.actor_id, "master");
    assert_eq!(create.detail["name"], "k");
    assert!(!serde_json::to_string(&page.entries)
        .expect("json")
        .contains("tgsk_"));
}

#[tokio::test]
async fn account_patch_and_delete_reach_the_cache_and_the_audit_log() {
    let admin = start().await;
    let account_id = admin.account().await;
    let created = admin
        .create_key(&account_id, json!({ "name": "main" }))
        .await;
    let hash = KeyHash::of(&text(&created, "key"));
    let account_active = |lookup: Lookup| match lookup {
        Lookup::Found(key) => key.account_active,
        Lookup::NotFound | Lookup::Unavailable => panic!("key not found in cache"),
    };
    assert!(account_active(admin.cache.get(&hash).await));

    let path = format!("/v1/accounts/{account_id}");
    let (status, _) = admin
        .master_call(Method::PATCH, &path, Some(json!({ "active": false })))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !account_active(admin.cache.get(&hash).await),
        "cache still serves the active account"
    );

    let (status, body) = admin.master_call(Method::DELETE, &path, None).await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "deleted": true })));
    assert!(matches!(admin.cache.get(&hash).await, Lookup::NotFound));
    assert_eq!(admin.store.list_keys(&account_id).await.expect("keys"), []);

    // The entries outlive the account, for the operator's records.
    let query = AuditQuery {
        limit: 100,
        ..AuditQuery::default()
    };
    let page = admin
        .store
        .list_audit(Some(&account_id), &query)
        .await
        .expect("audit");
    let actions: Vec<&str> = page.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "delete_account",
            "update_account",
            "create_key",
            "create_account"
        ]
    );
    assert_eq!(page.entries[0].actor_id, "master");
    assert_eq!(page.entries[0].detail["keys_removed"], 1);
    assert_eq!(page.entries[1].detail["changed"], json!(["active"]));
}

#[tokio::test]
async fn arrays_in_place_of_objects_and_bad_origins_and_far_expiries_are_400() {
    let admin = start().await;
    for body in [
        json!({ "name": "arr", "plan": [5, 3] }),
        json!({ "name": "arr", "rate_limit": [1, 2, 3] }),
        json!({ "name": "arr", "network_policy": [[], []] }),
        json!({ "name": "arr", "network_policy": { "allowed_domains": ["x://y"] } }),
    ] {
        let (status, answer) = admin
            .master_call(Method::POST, "/v1/accounts", Some(body.clone()))
            .await;
        assert_eq!(
            (status, code(&answer)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{body}: {answer}"
        );
    }
    let account_id = admin.account().await;
    let keys = format!("/v1/accounts/{account_id}/keys");
    for body in [
        json!({ "name": "far", "ttl": "100000y" }),
        json!({ "name": "far", "expires_at": "+10000-01-01T00:00:00Z" }),
        json!({ "name": "pk", "type": "publishable", "allowed_origins": ["https://a b"] }),
    ] {
        let (status, answer) = admin
            .master_call(Method::POST, &keys, Some(body.clone()))
            .await;
        assert_eq!(
            (status, code(&answer)),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{body}: {answer}"
        );
    }
}

/// A request the store does not answer (here: the blocking pool's only thread held, as a hung
/// disk holds them all, so the embedded store's calls queue behind it) is answered 503
/// `store_unavailable` at the answer deadline, saying that its change may still be applied. A
/// change with nothing left to read goes on: once the disk answers, it is made whole (here the
/// key's deactivation), and the account's next change is served after it.
#[test]
fn a_request_the_store_does_not_answer_is_answered_at_its_deadline() {
    const DEADLINE: Duration = Duration::from_millis(500);
    one_blocking_thread().block_on(async {
        let admin = start_with(|state| state.with_answer_deadline(DEADLINE)).await;
        let account = admin.create_account(json!({ "name": "hung" })).await;
        let keys = format!("/v1/accounts/{}/keys", account["id"].as_str().expect("id"));
        let new_key =
            |name: &str| admin.master_call(Method::POST, &keys, Some(json!({ "name": name })));
        let (status, key) = new_key("first").await;
        assert_eq!(status, StatusCode::CREATED, "{key}");
        // Not the account's last key, which could not be deactivated.
        let (status, spare) = new_key("spare").await;
        assert_eq!(status, StatusCode::CREATED, "{spare}");
        let key_path = format!("{keys}/{}", key["id"].as_str().expect("key id"));
        let active = || async {
            let (_, key) = admin.master_call(Method::GET, &key_path, None).await;
            key["active"].as_bool()
        };

        let (release, hold) = hold_the_pool();
        let started = std::time::Instant::now();
        let deactivate_path = format!("{key_path}/deactivate");
        let deactivate = admin.master_call(Method::POST, &deactivate_path, None);
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), deactivate)
            .await
            .expect("the request waited on with no deadline");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "store_unavailable");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("may still be applied"), "{message}");
        assert!(started.elapsed() >= DEADLINE, "{:?}", started.elapsed());

        release.send(()).expect("release the pool");
        hold.await.expect("the holder");
        assert!(
            common::eventually(Duration::from_secs(2), || async {
                active().await == Some(false)
            })
            .await,
            "the change answered 503 was not made once the disk answered"
        );
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), new_key("second"))
            .await
            .expect("the account's stripe is still held");
        assert_eq!(status, StatusCode::CREATED, "{body}");
    });
}

/// The shutdown's wait for changes answered at their deadline (`finish_changes`, called once
/// the listeners have drained): with the disk hung past its bound, it ends at the bound; with
/// the disk answering within it, it ends once the change is made, so that the change comes
/// before the final flush and the store's close.
#[test]
fn the_shutdown_waits_for_changes_under_way_within_its_bound() {
    const DEADLINE: Duration = Duration::from_millis(300);
    one_blocking_thread().block_on(async {
        let admin = start_with(|state| state.with_answer_deadline(DEADLINE)).await;
        let account = admin.create_account(json!({ "name": "stopping" })).await;
        let keys = format!("/v1/accounts/{}/keys", account["id"].as_str().expect("id"));
        let mut ids = Vec::new();
        for name in ["first", "spare"] {
            let body = Some(json!({ "name": name }));
            let (status, key) = admin.master_call(Method::POST, &keys, body).await;
            assert_eq!(status, StatusCode::CREATED, "{key}");
            ids.push(key["id"].as_str().expect("key id").to_owned());
        }
        let key_path = format!("{keys}/{}", ids[0]);

        let (release, hold) = hold_the_pool();
        let deactivate = format!("{key_path}/deactivate");
        let (status, body) = admin.master_call(Method::POST, &deactivate, None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        // Hung past the bound: the wait ends at it.
        let bound = Duration::from_millis(400);
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), admin.state.finish_changes(bound))
            .await
            .expect("the wait outlived its bound");
        assert!(started.elapsed() >= bound, "{:?}", started.elapsed());
        // The disk answers 300 ms into the next wait: it ends once the change is made.
        let thaw = Duration::from_millis(300);
        let started = std::time::Instant::now();
        let thawing = tokio::spawn(async move {
            tokio::time::sleep(thaw).await;
            release.send(()).expect("release the pool");
        });
        admin.state.finish_changes(Duration::from_secs(10)).await;
        let waited = started.elapsed();
        assert!(
            (thaw..Duration::from_secs(10)).contains(&waited),
            "{waited:?}"
        );
        thawing.await.expect("thaw");
        hold.await.expect("the holder");
        let (_, key) = admin.master_call(Method::GET, &key_path, None).await;
        assert_eq!(key["active"], false, "{key}");
    });
}

/// The token endpoint is bounded the same way, from its body's end: with the store hung (the
/// pool's only thread held) a grant is answered 503 `temporarily_unavailable`, in the grant's
/// own error shape, at the answer deadline (set here below the credential read's own deadline,
/// so that it is this bound that answers).
#[test]
fn a_token_request_the_store_does_not_answer_is_answered_at_its_deadline() {
    const DEADLINE: Duration = Duration::from_millis(300);
    one_blocking_thread().block_on(async {
        let admin = start_with(|state| state.with_answer_deadline(DEADLINE)).await;
        let account = admin
            .create_account(json!({ "name": "client", "auth_method": "any" }))
            .await;
        let id = account["id"].as_str().expect("id");
        let (status, secret) = admin
            .master_call(
                Method::POST,
                &format!("/v1/accounts/{id}/secrets"),
                Some(json!({})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{secret}");
        let secret = secret["client_secret"].as_str().expect("secret").to_owned();

        let (release, hold) = hold_the_pool();
        let started = std::time::Instant::now();
        let grant = admin
            .http
            .post(format!("{}/oauth/token", admin.base))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", id),
                ("client_secret", &secret),
            ])
            .send();
        let answer = tokio::time::timeout(Duration::from_secs(10), grant)
            .await
            .expect("the grant waited on with no deadline")
            .expect("answer");
        let waited = started.elapsed();
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body: Value = answer.json().await.expect("json");
        assert_eq!(body["error"], "temporarily_unavailable", "{body}");
        assert!(waited >= DEADLINE, "{waited:?}");
        assert!(
            waited < tollgate::store::LOOKUP_DEADLINE,
            "answered by the credential read's deadline, after {waited:?}"
        );
        release.send(()).expect("release the pool");
        hold.await.expect("the holder");
    });
}
