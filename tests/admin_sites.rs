//! An account's sites through the admin API (contract section 5): list, add, delete, the
//! `name_taken` and `plan_limit` rules, and a publishable key allowed from a site on the very
//! next request after it is added. Each test starts its own upstream and gateway on port 0.

#[path = "admin_client.rs"]
mod admin_client;
mod common;

use reqwest::{Method, StatusCode};
use serde_json::json;

use admin_client::{assert_names_field, code, text, AdminClient};
use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{client, expect_echo, expect_refusal};

async fn start() -> (Upstream, Gateway, AdminClient) {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let api = AdminClient::new(gw.admin_url(""), &gw.master);
    (upstream, gw, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sites_are_added_listed_and_deleted() {
    let (_up, _gw, api) = start().await;
    let (_, _, raw) = api.account_with_key("acme").await;

    let (status, site) = api
        .call(
            Method::POST,
            "/v1/account/sites",
            &raw,
            Some(json!({ "name": "HTTPS://Shop.Example.com:443/" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{site}");
    assert_eq!(site["name"], "https://shop.example.com");
    let id = text(&site, "id");
    assert!(id.starts_with("site_"), "{site}");
    assert!(site["created_at"].is_string(), "{site}");
    assert_eq!(
        site.as_object().map(|o| o.len()),
        Some(3),
        "id, name, created_at: {site}"
    );
    let (status, second) = api
        .call(
            Method::POST,
            "/v1/account/sites",
            &raw,
            Some(json!({ "name": "http://localhost:3000" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{second}");

    let (status, list) = api.call(Method::GET, "/v1/account/sites", &raw, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list, json!({ "sites": [site, second] }));

    // The same origin, however written, is taken.
    let (status, err) = api
        .call(
            Method::POST,
            "/v1/account/sites",
            &raw,
            Some(json!({ "name": "https://shop.example.com" })),
        )
        .await;
    assert_eq!((status, code(&err)), (StatusCode::CONFLICT, "name_taken"));
    for body in [
        json!({ "name": "shop.example.com" }),
        json!({ "name": "https://shop.example.com/path" }),
        json!({}),
    ] {
        let (status, err) = api
            .call(Method::POST, "/v1/account/sites", &raw, Some(body))
            .await;
        assert_names_field(status, &err, "name");
    }
    let (status, err) = api
        .call(
            Method::POST,
            "/v1/account/sites",
            &raw,
            Some(json!({ "name": "https://a.example", "colour": 1 })),
        )
        .await;
    assert_names_field(status, &err, "colour");

    let response = client()
        .delete(api.url(&format!("/v1/account/sites/{id}")))
        .bearer_auth(&raw)
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert!(response.bytes().await.expect("body").is_empty());
    let (status, err) = api
        .call(
            Method::DELETE,
            &format!("/v1/account/sites/{id}"),
            &raw,
            None,
        )
        .await;
    assert_eq!((status, code(&err)), (StatusCode::NOT_FOUND, "not_found"));
    let (_, list) = api.call(Method::GET, "/v1/account/sites", &raw, None).await;
    assert_eq!(list, json!({ "sites": [second] }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_max_sites_is_409_plan_limit() {
    let (_up, _gw, api) = start().await;
    let account = api
        .account(json!({ "name": "acme", "plan": { "max_sites": 1 } }))
        .await;
    let path = format!("/v1/accounts/{account}/sites");
    let (status, site) = api
        .master(
            Method::POST,
            &path,
            Some(json!({ "name": "https://a.example" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, err) = api
        .master(
            Method::POST,
            &path,
            Some(json!({ "name": "https://b.example" })),
        )
        .await;
    assert_eq!((status, code(&err)), (StatusCode::CONFLICT, "plan_limit"));

    // Deleting one makes room.
    let (status, _) = api
        .master(
            Method::DELETE,
            &format!("{path}/{}", text(&site, "id")),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api
        .master(
            Method::POST,
            &path,
            Some(json!({ "name": "https://b.example" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishable_key_is_allowed_from_a_site_on_the_next_request() {
    let (_up, gw, api) = start().await;
    let (_, _, secret) = api.account_with_key("acme").await;
    let (status, pk) = api
        .call(
            Method::POST,
            "/v1/account/keys",
            &secret,
            Some(json!({ "name": "web", "type": "publishable", "allowed_origins": ["https://a.example"] })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{pk}");
    let pk = text(&pk, "key");
    let from = |origin: &'static str| {
        client()
            .get(gw.proxy_url("/things"))
            .bearer_auth(&pk)
            .header("origin", origin)
            .send()
    };
    expect_echo(from("https://a.example").await.unwrap()).await;
    expect_refusal(
        from("https://site.example").await.unwrap(),
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
    )
    .await;

    let (status, site) = api
        .call(
            Method::POST,
            "/v1/account/sites",
            &secret,
            Some(json!({ "name": "https://site.example" })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{site}");
    expect_echo(from("https://site.example").await.unwrap()).await;
    expect_echo(from("https://a.example").await.unwrap()).await;

    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/account/sites/{}", text(&site, "id")),
            &secret,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    expect_refusal(
        from("https://site.example").await.unwrap(),
        StatusCode::FORBIDDEN,
        "origin_not_allowed",
    )
    .await;
}
