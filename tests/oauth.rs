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
    assert_eq!(actions[..2], ["secret.delete", "secret.create"]);
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
