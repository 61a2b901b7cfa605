//! OAuth client secrets on the admin API (contract §5): created with the raw `client_secret`
//! answered once, listed with `preview` only, deleted with the `last_credential` rule for an
//! `oauth` account, and audited.

mod common;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use common::gateway::Gateway;
use common::upstream::Upstream;

async fn create_secret(gw: &Gateway, account: &str) -> Value {
    let (status, body) = gw
        .admin(
            Method::POST,
            &format!("/v1/accounts/{account}/secrets"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body
}

#[tokio::test]
async fn client_secrets_are_shown_once_listed_by_preview_and_audited() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw.create_account(json!({ "name": "client" })).await;
    let created = create_secret(&gw, &account).await;
    let raw = created["client_secret"].as_str().expect("raw secret");
    assert!(raw.starts_with("tgcs_"), "{raw}");
    assert_eq!(
        tollgate::credential::parse(raw),
        Ok(tollgate::credential::Kind::ClientSecret)
    );
    assert_eq!(created["client_id"], json!(account));
    assert_eq!(created["prefix"], json!(&raw[..12]));
    let id = created["id"].as_str().expect("id").to_owned();

    let (status, list) = gw
        .admin(
            Method::GET,
            &format!("/v1/accounts/{account}/secrets"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let secrets = list["secrets"].as_array().expect("secrets");
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0]["id"], json!(id));
    assert!(secrets[0]["preview"]
        .as_str()
        .is_some_and(|p| p.contains('…')));
    assert!(
        !list.to_string().contains(raw),
        "the raw secret is never listed"
    );

    let path = format!("/v1/accounts/{account}/secrets/{id}");
    let (status, _) = gw.admin(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = gw.admin(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (_, audit) = gw
        .admin(Method::GET, &format!("/v1/accounts/{account}/audit"), None)
        .await;
    let actions: Vec<&str> = audit["logs"]
        .as_array()
        .expect("logs")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(actions[..2], ["delete_secret", "create_secret"]);
    assert!(
        !audit.to_string().contains(raw),
        "nor written to the audit log"
    );
}

#[tokio::test]
async fn the_last_client_secret_of_an_oauth_account_cannot_be_deleted() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let account = gw
        .create_account(json!({ "name": "oauth only", "auth_method": "oauth" }))
        .await;
    let first = create_secret(&gw, &account).await;
    let second = create_secret(&gw, &account).await;
    let delete = |secret: &Value| {
        format!(
            "/v1/accounts/{account}/secrets/{}",
            secret["id"].as_str().expect("id")
        )
    };
    let (status, _) = gw.admin(Method::DELETE, &delete(&first), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = gw.admin(Method::DELETE, &delete(&second), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"]["code"], "last_credential");

    // An api_key account may delete its last one: it authenticates with keys.
    let keyed = gw.create_account(json!({ "name": "keys" })).await;
    let only = create_secret(&gw, &keyed).await;
    let path = format!(
        "/v1/accounts/{keyed}/secrets/{}",
        only["id"].as_str().expect("id")
    );
    let (status, _) = gw.admin(Method::DELETE, &path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn another_accounts_secret_is_not_found_and_an_account_manages_its_own() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (account, key) = gw.account_with_key().await;
    let other = gw.create_account(json!({ "name": "other" })).await;
    let theirs = create_secret(&gw, &other).await;
    let client = common::client();
    let own = |method: Method, suffix: &str| {
        client
            .request(
                method,
                gw.admin_url(&format!("/v1/account/secrets{suffix}")),
            )
            .bearer_auth(&key)
    };
    let r = own(
        Method::DELETE,
        &format!("/{}", theirs["id"].as_str().expect("id")),
    )
    .send()
    .await
    .expect("request");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = own(Method::POST, "").send().await.expect("request");
    assert_eq!(r.status(), StatusCode::CREATED);
    let mine: Value = r.json().await.expect("json");
    assert_eq!(mine["client_id"], json!(account));
    // Deleting the account takes its secrets with it.
    let (status, _) = gw
        .admin(Method::DELETE, &format!("/v1/accounts/{account}"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = gw
        .admin(
            Method::GET,
            &format!("/v1/accounts/{account}/secrets"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

// === the token endpoint and access tokens ===

/// An `oauth` account allowed `orders:read`, `orders:write` and `account:read`, with two client
/// secrets:
/// (account id, first raw secret, first secret id, second raw secret).
async fn oauth_client(gw: &Gateway) -> (String, String, String, String) {
    let account = gw
        .create_account(json!({
            "name": "oauth client",
            "auth_method": "oauth",
            "permissions": ["orders:read", "orders:write", "account:read"],
        }))
        .await;
    let first = create_secret(gw, &account).await;
    let second = create_secret(gw, &account).await;
    let raw = |v: &Value| v["client_secret"].as_str().expect("secret").to_owned();
    let id = first["id"].as_str().expect("id").to_owned();
    (account, raw(&first), id, raw(&second))
}

/// A token request's form fields.
type Form<'a> = Vec<(&'a str, &'a str)>;

async fn token_form(gw: &Gateway, form: &[(&str, &str)]) -> reqwest::Response {
    common::client()
        .post(gw.proxy_url("/oauth/token"))
        .form(form)
        .send()
        .await
        .expect("token request")
}

async fn proxy_with(gw: &Gateway, method: Method, path: &str, token: &str) -> (StatusCode, Value) {
    let r = common::client()
        .request(method, gw.proxy_url(path))
        .bearer_auth(token)
        .send()
        .await
        .expect("proxy request");
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn client_credentials_give_a_token_that_acts_for_the_account_within_its_scope() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (account, secret, _, _) = oauth_client(&gw).await;

    // Form body.
    let r = token_form(
        &gw,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &account),
            ("client_secret", &secret),
            ("scope", "orders:read"),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let answer: Value = r.json().await.expect("json");
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["expires_in"], 3600);
    assert_eq!(answer["scope"], "orders:read");
    let token = answer["access_token"].as_str().expect("token").to_owned();
    assert_eq!(
        tollgate::credential::parse(&token),
        Ok(tollgate::credential::Kind::AccessToken)
    );

    // On the proxy: reads pass with the account's identity, writes are outside the scope.
    let (status, echo) = proxy_with(&gw, Method::GET, "/orders/1", &token).await;
    assert_eq!(status, StatusCode::OK, "{echo}");
    assert_eq!(echo["headers"]["x-tollgate-account-id"], json!(account));
    assert_eq!(echo["headers"]["x-tollgate-scopes"], "orders:read");
    let (status, body) = proxy_with(&gw, Method::POST, "/orders", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "scope_denied");

    // JSON body, no scope asked: everything the account may grant.
    let r = common::client()
        .post(gw.proxy_url("/oauth/token"))
        .json(&json!({
            "grant_type": "client_credentials",
            "client_id": account,
            "client_secret": secret,
        }))
        .send()
        .await
        .expect("token request");
    assert_eq!(r.status(), StatusCode::OK);
    let answer: Value = r.json().await.expect("json");
    assert_eq!(answer["scope"], "orders:read orders:write account:read");

    // Basic auth.
    let r = common::client()
        .post(gw.proxy_url("/oauth/token"))
        .basic_auth(&account, Some(&secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("token request");
    assert_eq!(r.status(), StatusCode::OK);
    let full: Value = r.json().await.expect("json");
    let full = full["access_token"].as_str().expect("token").to_owned();

    // On the admin API, like an account key with the same scopes (`account:read` here).
    let r = common::client()
        .get(gw.admin_url("/v1/account"))
        .bearer_auth(&full)
        .send()
        .await
        .expect("admin request");
    assert_eq!(r.status(), StatusCode::OK);
    let own: Value = r.json().await.expect("json");
    assert_eq!(own["id"], json!(account));

    // The account's API keys are not accepted: it authenticates with OAuth only.
    let (_, key) = gw
        .create_key(&account, json!({ "name": "k", "type": "secret" }))
        .await;
    let (status, body) = proxy_with(&gw, Method::GET, "/orders/1", &key).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "auth_method_not_allowed");
}

#[tokio::test]
async fn bad_token_requests_get_the_rfc_6749_errors() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (account, secret, _, _) = oauth_client(&gw).await;
    let wrong = tollgate::credential::generate(tollgate::credential::Kind::ClientSecret);
    let cases: Vec<(Form, StatusCode, &str)> = vec![
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", &account),
                ("client_secret", &wrong),
            ],
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", "acc_nobody"),
                ("client_secret", &secret),
            ],
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", &account),
                ("client_secret", "not-a-secret"),
            ],
            StatusCode::UNAUTHORIZED,
            "invalid_client",
        ),
        (
            vec![
                ("grant_type", "client_credentials"),
                ("client_id", &account),
                ("client_secret", &secret),
                ("scope", "admin"),
            ],
            StatusCode::BAD_REQUEST,
            "invalid_scope",
        ),
        (
            vec![
                ("grant_type", "password"),
                ("client_id", &account),
                ("client_secret", &secret),
            ],
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
        ),
        (
            vec![("client_id", &account), ("client_secret", &secret)],
            StatusCode::BAD_REQUEST,
            "invalid_request",
        ),
    ];
    for (form, status, error) in cases {
        let r = token_form(&gw, &form).await;
        assert_eq!(r.status(), status, "{form:?}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"], error, "{form:?}");
    }
    // A wrong secret over Basic names the scheme.
    let r = common::client()
        .post(gw.proxy_url("/oauth/token"))
        .basic_auth(&account, Some(&wrong))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("token request");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Basic realm=\"tollgate\"");
    // An api_key account cannot use the grant.
    let keyed = gw.create_account(json!({ "name": "keys only" })).await;
    let keyed_secret = create_secret(&gw, &keyed).await;
    let r = token_form(
        &gw,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &keyed),
            (
                "client_secret",
                keyed_secret["client_secret"].as_str().expect("raw"),
            ),
        ],
    )
    .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"], "unauthorized_client");
}

#[tokio::test]
async fn tokens_expire_on_the_gateways_clock_and_die_with_their_secret() {
    use std::sync::atomic::{AtomicI64, Ordering};
    let clock = std::sync::Arc::new(AtomicI64::new(chrono::Utc::now().timestamp_millis()));
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .clock(tollgate::metering::WallClock::Manual(clock.clone()))
        .start()
        .await;
    let (account, secret, secret_id, other_secret) = oauth_client(&gw).await;
    let issue = |secret: String| {
        let (gw, account) = (&gw, account.clone());
        async move {
            let r = token_form(
                gw,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", &account),
                    ("client_secret", &secret),
                ],
            )
            .await;
            let body: Value = r.json().await.expect("json");
            body["access_token"].as_str().expect("token").to_owned()
        }
    };
    let doomed = issue(secret.clone()).await;
    let kept = issue(other_secret.clone()).await;
    assert_eq!(
        proxy_with(&gw, Method::GET, "/orders/1", &doomed).await.0,
        StatusCode::OK
    );

    // Deleting the secret revokes its token at once, cached or not; the other secret's stays.
    let (status, _) = gw
        .admin(
            Method::DELETE,
            &format!("/v1/accounts/{account}/secrets/{secret_id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = proxy_with(&gw, Method::GET, "/orders/1", &doomed).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "invalid_credential");
    assert_eq!(
        proxy_with(&gw, Method::GET, "/orders/1", &kept).await.0,
        StatusCode::OK
    );

    // An hour and a second later (the gateway's clock), the token has expired.
    clock.fetch_add(3_601_000, Ordering::SeqCst);
    let (status, body) = proxy_with(&gw, Method::GET, "/orders/1", &kept).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "expired_credential");
}

#[tokio::test]
async fn token_requests_are_limited_per_client() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let (account, _, _, _) = oauth_client(&gw).await;
    let wrong = tollgate::credential::generate(tollgate::credential::Kind::ClientSecret);
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", account.as_str()),
        ("client_secret", wrong.as_str()),
    ];
    let per_minute = tollgate::admin::oauth::ISSUES_PER_MINUTE;
    for _ in 0..per_minute {
        assert_eq!(
            token_form(&gw, &form).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let r = token_form(&gw, &form).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    // Another client is not held back.
    let other = [
        ("grant_type", "client_credentials"),
        ("client_id", "acc_other"),
        ("client_secret", wrong.as_str()),
    ];
    assert_eq!(
        token_form(&gw, &other).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

/// A token request whose body breaks off (or, at 30 s, never comes) is the client's malformed
/// request: 400 `invalid_request` in the grant's error shape, not a plain-text rejection.
#[tokio::test]
async fn a_token_request_whose_body_breaks_off_is_invalid_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let mut stream = tokio::net::TcpStream::connect(gw.proxy_addr)
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /oauth/token HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ngrant_type=client",
        )
        .await
        .expect("send");
    stream.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut got),
    )
    .await
    .expect("an answer in time")
    .expect("read");
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole answer");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("cache-control: no-store"),
        "{head}"
    );
    let error: Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(error["error"], "invalid_request", "{body}");
}
