//! The audit log through the admin API (contract section 5): an entry for every change, newest
//! first, one account's entries only, and `limit` / `offset` / `action` / `search` with `total`.
//! Each test starts its own upstream and gateway on port 0.

#[path = "admin_client.rs"]
mod admin_client;
mod common;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate::credential::KeyHash;

use admin_client::{assert_names_field, text, AdminClient};
use common::gateway::Gateway;
use common::upstream::Upstream;

async fn start() -> (Upstream, Gateway, AdminClient) {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let api = AdminClient::new(gw.admin_url(""), &gw.master);
    (upstream, gw, api)
}

fn logs(page: &Value) -> &Vec<Value> {
    page["logs"].as_array().expect("logs")
}

fn actions(page: &Value) -> Vec<&str> {
    logs(page)
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect()
}

/// `(action, actor_id, target_type, target_id)` of an entry.
fn who_what(entry: &Value) -> (String, String, String, String) {
    (
        text(entry, "action"),
        text(entry, "actor_id"),
        text(entry, "target_type"),
        text(entry, "target_id"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_is_audited_newest_first() {
    let (_up, _gw, api) = start().await;
    let (account, main_id, main) = api.account_with_key("acme").await;
    let op = |s: &str| s.to_owned();
    api.master(
        Method::PATCH,
        &format!("/v1/accounts/{account}"),
        Some(json!({ "name": "Acme Ltd", "plan": { "max_sites": 3 } })),
    )
    .await;
    let (_, k2) = api
        .call(
            Method::POST,
            "/v1/account/keys",
            &main,
            Some(json!({ "name": "k2" })),
        )
        .await;
    let k2_id = text(&k2, "id");
    let key_path = format!("/v1/account/keys/{k2_id}");
    let calls = [
        (
            Method::PATCH,
            key_path.clone(),
            json!({ "name": "k2b", "metadata": { "a": 1 } }),
        ),
        (
            Method::POST,
            format!("{key_path}/renew"),
            json!({ "ttl": "1h" }),
        ),
        (
            Method::POST,
            format!("{key_path}/roll"),
            json!({ "grace": "1m" }),
        ),
        (
            Method::POST,
            "/v1/account/sites".to_owned(),
            json!({ "name": "https://a.example" }),
        ),
    ];
    let mut answers = Vec::new();
    for (method, path, body) in calls {
        let (status, answer) = api.call(method, &path, &main, Some(body)).await;
        assert!(status.is_success(), "{path}: {answer}");
        answers.push(answer);
    }
    let (new_id, new_raw, site_id) = (
        text(&answers[2], "id"),
        text(&answers[2], "key"),
        text(&answers[3], "id"),
    );
    let (status, _) = api
        .call(
            Method::DELETE,
            &format!("/v1/account/sites/{site_id}"),
            &main,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let (status, page) = api
        .call(Method::GET, "/v1/account/audit", &main, None)
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let want = [
        ("site.delete", &main_id, "site", &site_id),
        ("site.create", &main_id, "site", &site_id),
        ("key.roll", &main_id, "key", &k2_id),
        ("key.renew", &main_id, "key", &k2_id),
        ("key.update", &main_id, "key", &k2_id),
        ("key.create", &main_id, "key", &k2_id),
        ("account.update", &op("master"), "account", &account),
        ("key.create", &op("master"), "key", &main_id),
        ("account.create", &op("master"), "account", &account),
    ];
    let got: Vec<_> = logs(&page).iter().map(who_what).collect();
    let want: Vec<_> = want
        .iter()
        .map(|(a, actor, t, id)| (op(a), (*actor).clone(), op(t), (*id).clone()))
        .collect();
    assert_eq!(got, want, "{page}");
    assert_eq!(
        (
            page["total"].clone(),
            page["limit"].clone(),
            page["offset"].clone()
        ),
        (json!(9), json!(50), json!(0))
    );

    for entry in logs(&page) {
        assert!(text(entry, "id").starts_with("aud_"), "{entry}");
        assert_eq!(entry["ip"], "127.0.0.1", "{entry}");
        assert!(entry["created_at"].is_string(), "{entry}");
        let mut fields: Vec<&String> = entry.as_object().expect("entry").keys().collect();
        fields.sort();
        assert_eq!(
            fields,
            [
                "action",
                "actor_id",
                "created_at",
                "detail",
                "id",
                "ip",
                "target_id",
                "target_type"
            ],
        );
    }
    let entries = logs(&page);
    assert_eq!(entries[6]["detail"]["changed"], json!(["name", "plan"]));
    assert_eq!(entries[4]["detail"]["changed"], json!(["name", "metadata"]));
    assert_eq!(entries[3]["detail"]["ttl_secs"], 3_600);
    assert_eq!(entries[2]["detail"]["new_key_id"], new_id.as_str());
    assert_eq!(entries[2]["detail"]["grace_secs"], 60);
    assert_eq!(entries[1]["detail"]["name"], "https://a.example");

    // Never a raw key or a hash.
    let all = page.to_string();
    for raw in [&main, &new_raw] {
        assert!(!all.contains(raw.as_str()), "a raw key in the log");
        assert!(
            !all.contains(&KeyHash::of(raw).to_hex()),
            "a hash in the log"
        );
    }
    assert!(!all.contains("tgsk_"), "{all}");

    // The operator reads the same log.
    let (_, same) = api
        .master(Method::GET, &format!("/v1/accounts/{account}/audit"), None)
        .await;
    assert_eq!(same, page);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_pages_and_filters() {
    let (_up, _gw, api) = start().await;
    let account = api.account(json!({ "name": "acme" })).await;
    for i in 0..5 {
        api.key(&account, json!({ "name": format!("Key{i}") }))
            .await;
    }
    let get = |query: &'static str| {
        let path = format!("/v1/accounts/{account}/audit{query}");
        let api = &api;
        async move { api.master(Method::GET, &path, None).await }
    };

    let (status, page) = get("?limit=2").await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(actions(&page), ["key.create", "key.create"]);
    assert_eq!(logs(&page)[0]["detail"]["name"], "Key4");
    assert_eq!(
        (page["total"].clone(), page["limit"].clone()),
        (json!(6), json!(2))
    );
    let (_, page) = get("?limit=2&offset=2").await;
    let names: Vec<&Value> = logs(&page).iter().map(|e| &e["detail"]["name"]).collect();
    assert_eq!(names, [&json!("Key2"), &json!("Key1")]);
    assert_eq!(
        (page["offset"].clone(), page["total"].clone()),
        (json!(2), json!(6))
    );
    let (_, page) = get("?offset=5").await;
    assert_eq!(actions(&page), ["account.create"]);
    let (_, page) = get("?offset=50").await;
    assert_eq!((logs(&page).len(), page["total"].clone()), (0, json!(6)));

    let (_, page) = get("?action=key.create").await;
    assert_eq!((logs(&page).len(), page["total"].clone()), (5, json!(5)));
    let (_, page) = get("?action=account.create&limit=1").await;
    assert_eq!(
        (actions(&page), page["total"].clone()),
        (vec!["account.create"], json!(1))
    );
    let (_, page) = get("?action=key.roll").await;
    assert_eq!((logs(&page).len(), page["total"].clone()), (0, json!(0)));
    let (_, page) = get("?search=key3").await;
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(logs(&page)[0]["detail"]["name"], "Key3");
    let (_, page) = get("?search=key&action=key.create&limit=1&offset=1").await;
    assert_eq!(
        (
            logs(&page)[0]["detail"]["name"].clone(),
            page["total"].clone()
        ),
        (json!("Key3"), json!(5))
    );
    let (_, page) = get("?limit=100").await;
    assert_eq!(logs(&page).len(), 6);

    for (query, field) in [
        ("?limit=0", "limit"),
        ("?limit=101", "limit"),
        ("?limit=ten", "limit"),
        ("?limit=-1", "limit"),
        ("?offset=-1", "offset"),
        ("?offset=x", "offset"),
    ] {
        let (status, err) = get(query).await;
        assert_names_field(status, &err, field);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_sees_only_its_own_entries() {
    let (_up, _gw, api) = start().await;
    let (a, _, raw_a) = api.account_with_key("a").await;
    let (b, b_key, _) = api.account_with_key("b").await;
    api.master(
        Method::PATCH,
        &format!("/v1/accounts/{b}/keys/{b_key}"),
        Some(json!({ "name": "renamed" })),
    )
    .await;

    let (status, page) = api
        .call(Method::GET, "/v1/account/audit", &raw_a, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["total"], 2, "{page}");
    assert!(
        logs(&page)
            .iter()
            .all(|e| e["target_id"] != b.as_str() && e["target_id"] != b_key.as_str()),
        "{page}"
    );
    let (_, page) = api
        .master(
            Method::GET,
            &format!("/v1/accounts/{a}/audit?search={b_key}"),
            None,
        )
        .await;
    assert_eq!(page["total"], 0, "{page}");
}
