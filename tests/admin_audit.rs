//! The audit log through the admin API (contract section 5): an entry for every change, newest
//! first, one account's entries only, and `limit` / `offset` / `action` / `search` with `total`;
//! and its hash chain at `…/audit/verify`, found intact, and found broken where an entry stored in
//! Redis or in the embedded file was rewritten or removed behind the gateway's back.
//! Each test starts its own upstream and gateway (and Redis) on port 0.

#[path = "admin_client.rs"]
mod admin_client;
mod common;
#[path = "common/redis.rs"]
mod redis_harness;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate::credential::KeyHash;

use admin_client::{assert_names_field, code, text, AdminClient};
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
        ("delete_site", &main_id, "site", &site_id),
        ("create_site", &main_id, "site", &site_id),
        ("roll_key", &main_id, "key", &k2_id),
        ("renew_key", &main_id, "key", &k2_id),
        ("update_key", &main_id, "key", &k2_id),
        ("create_key", &main_id, "key", &k2_id),
        ("update_account", &op("master"), "account", &account),
        ("create_key", &op("master"), "key", &main_id),
        ("create_account", &op("master"), "account", &account),
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
                "hash",
                "id",
                "ip",
                "prev_hash",
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
    assert_eq!(actions(&page), ["create_key", "create_key"]);
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
    assert_eq!(actions(&page), ["create_account"]);
    let (_, page) = get("?offset=50").await;
    assert_eq!((logs(&page).len(), page["total"].clone()), (0, json!(6)));

    let (_, page) = get("?action=create_key").await;
    assert_eq!((logs(&page).len(), page["total"].clone()), (5, json!(5)));
    let (_, page) = get("?action=create_account&limit=1").await;
    assert_eq!(
        (actions(&page), page["total"].clone()),
        (vec!["create_account"], json!(1))
    );
    let (_, page) = get("?action=roll_key").await;
    assert_eq!((logs(&page).len(), page["total"].clone()), (0, json!(0)));
    let (_, page) = get("?search=key3").await;
    assert_eq!(page["total"], 1, "{page}");
    assert_eq!(logs(&page)[0]["detail"]["name"], "Key3");
    let (_, page) = get("?search=key&action=create_key&limit=1&offset=1").await;
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
        ("?action=create_keys", "action"),
        ("?action=key.creat", "action"),
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

/// Entries written before the actions were renamed keep their names (the chain hash covers
/// them), and the filter finds them by either name, beside the new entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_under_the_old_action_names_are_found_by_both_names() {
    use tollgate::store::redis::RedisStore;
    use tollgate::store::{AuditEntry, AuditLog};
    let redis = redis_harness::RedisServer::start();
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .redis(&redis.url())
        .start()
        .await;
    let api = AdminClient::new(gw.admin_url(""), &gw.master);
    let account = api.account(json!({ "name": "acme" })).await;
    let store = RedisStore::connect(&redis.url()).await.expect("redis");
    let legacy = AuditEntry {
        id: "aud_legacy".to_owned(),
        account_id: Some(account.clone()),
        actor_id: "master".to_owned(),
        action: "key.create".to_owned(),
        target_type: "key".to_owned(),
        target_id: "key_legacy".to_owned(),
        detail: json!({ "name": "from before" }),
        ip: None,
        created_at: chrono::Utc::now(),
        prev_hash: None,
        hash: None,
    };
    store.append_audit(&legacy).await.expect("append");
    api.key(&account, json!({ "name": "new" })).await;

    for name in ["create_key", "key.create"] {
        let (status, page) = api
            .master(
                Method::GET,
                &format!("/v1/accounts/{account}/audit?action={name}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(actions(&page), ["create_key", "key.create"], "{name}");
    }
    let path = format!("/v1/accounts/{account}/audit/verify");
    assert_eq!(verify(&api, &path, &gw.master).await["intact"], true);
}

// === the hash chain: GET …/audit/verify ===

/// `GET path` (an `…/audit/verify`) with `cred`: 200 and the verdict.
async fn verify(api: &AdminClient, path: &str, cred: &str) -> Value {
    let (status, verdict) = api.call(Method::GET, path, cred, None).await;
    assert_eq!(status, StatusCode::OK, "{path}: {verdict}");
    verdict
}

fn intact(entries: u64) -> Value {
    json!({ "intact": true, "entries": entries, "first_bad_id": null })
}

/// The account's entries, newest first, as `GET …/audit` lists them (one page of 100).
async fn entries(api: &AdminClient, account: &str) -> Vec<Value> {
    let (_, page) = api
        .master(
            Method::GET,
            &format!("/v1/accounts/{account}/audit?limit=100"),
            None,
        )
        .await;
    logs(&page).clone()
}

/// Makes `n` changes to `account` (key creates and renames).
async fn changes(api: &AdminClient, account: &str, n: usize) {
    let key = api.key(account, json!({ "name": "first" })).await;
    let key_id = text(&key, "id");
    for i in 1..n {
        let (status, answer) = api
            .master(
                Method::PATCH,
                &format!("/v1/accounts/{account}/keys/{key_id}"),
                Some(json!({ "name": format!("renamed-{i}") })),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_accounts_chain_is_intact_after_every_change() {
    let (_up, gw, api) = start().await;
    let (account, _, raw) = api.account_with_key("acme").await;
    let path = format!("/v1/accounts/{account}/audit/verify");
    assert_eq!(verify(&api, &path, &gw.master).await, intact(2));
    changes(&api, &account, 5).await;
    assert_eq!(verify(&api, &path, &gw.master).await, intact(7));
    assert_eq!(
        verify(&api, "/v1/account/audit/verify", &raw).await,
        intact(7)
    );

    // The listing shows the links: each entry's prev_hash is the hash of the one before it.
    let listed = entries(&api, &account).await;
    assert_eq!(listed.len(), 7);
    let oldest = &listed[6];
    assert_eq!(oldest["prev_hash"], "0".repeat(64));
    for pair in listed.windows(2) {
        assert_eq!(pair[0]["prev_hash"], pair[1]["hash"], "{}", pair[0]);
        assert_eq!(text(&pair[0], "hash").len(), 64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_or_removed_redis_entry_breaks_the_chain_there() {
    let redis = redis_harness::RedisServer::start();
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .redis(&redis.url())
        .start()
        .await;
    let api = AdminClient::new(gw.admin_url(""), &gw.master);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();

    // Rewriting one entry's detail in place.
    let account = api.account(json!({ "name": "acme" })).await;
    changes(&api, &account, 5).await;
    let list = format!("tg:{{{account}}}:audit");
    let victim = text(&entries(&api, &account).await[2], "id");
    let stored: String = redis::cmd("LINDEX")
        .arg(&list)
        .arg(2)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut forged: Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(forged["id"], victim.as_str());
    forged["detail"] = json!({ "name": "nothing to see" });
    let _: () = redis::cmd("LSET")
        .arg(&list)
        .arg(2)
        .arg(forged.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let path = format!("/v1/accounts/{account}/audit/verify");
    assert_eq!(
        verify(&api, &path, &gw.master).await,
        json!({ "intact": false, "entries": 3, "first_bad_id": victim })
    );

    // Removing one entry: the entry after it no longer follows.
    let account = api.account(json!({ "name": "other" })).await;
    changes(&api, &account, 5).await;
    let list = format!("tg:{{{account}}}:audit");
    let listed = entries(&api, &account).await;
    let stored: String = redis::cmd("LINDEX")
        .arg(&list)
        .arg(3)
        .query_async(&mut conn)
        .await
        .unwrap();
    let removed: i64 = redis::cmd("LREM")
        .arg(&list)
        .arg(1)
        .arg(&stored)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let path = format!("/v1/accounts/{account}/audit/verify");
    assert_eq!(
        verify(&api, &path, &gw.master).await,
        json!({ "intact": false, "entries": 2, "first_bad_id": text(&listed[2], "id") })
    );
}

/// Rewrites (with `Some`) or removes (with `None`) the embedded store's audit entry `id`.
fn edit_embedded_entry(path: &std::path::Path, id: &str, forged_detail: Option<Value>) {
    use redb::{ReadableTable, TableDefinition};
    const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
    let db = redb::Database::open(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut audit = txn.open_table(AUDIT).unwrap();
        let mut found = None;
        for item in audit.iter().unwrap() {
            let (seq, bytes) = item.unwrap();
            let entry: Value = serde_json::from_slice(bytes.value()).unwrap();
            if entry["id"] == id {
                found = Some((seq.value(), entry));
            }
        }
        let (seq, mut entry) = found.expect("the entry is in the file");
        match forged_detail {
            Some(detail) => {
                entry["detail"] = detail;
                let bytes = serde_json::to_vec(&entry).unwrap();
                audit.insert(seq, bytes.as_slice()).unwrap();
            }
            None => {
                audit.remove(seq).unwrap();
            }
        }
    }
    txn.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_or_removed_embedded_entry_breaks_the_chain_there() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(&upstream).await;
    let api = AdminClient::new(gw.admin_url(""), &gw.master);
    let forged = api.account(json!({ "name": "forged" })).await;
    changes(&api, &forged, 4).await;
    let removed = api.account(json!({ "name": "removed" })).await;
    changes(&api, &removed, 4).await;
    let (forged_list, removed_list) = (entries(&api, &forged).await, entries(&api, &removed).await);
    // Newest first: [1] is the second newest.
    let victim = text(&forged_list[1], "id");
    let gone = text(&removed_list[2], "id");
    gw.restart_after(|path| {
        edit_embedded_entry(path, &victim, Some(json!({ "name": "nothing to see" })));
        edit_embedded_entry(path, &gone, None);
    })
    .await;

    let api = AdminClient::new(gw.admin_url(""), &gw.master);
    let path = format!("/v1/accounts/{forged}/audit/verify");
    assert_eq!(
        verify(&api, &path, &gw.master).await,
        json!({ "intact": false, "entries": 3, "first_bad_id": victim })
    );
    let path = format!("/v1/accounts/{removed}/audit/verify");
    assert_eq!(
        verify(&api, &path, &gw.master).await,
        json!({ "intact": false, "entries": 2, "first_bad_id": text(&removed_list[1], "id") })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_redis_appending_at_once_keep_the_chain_intact() {
    let redis = redis_harness::RedisServer::start();
    let upstream = Upstream::start().await;
    let master = tollgate::credential::generate(tollgate::credential::Kind::Master);
    let mut apis = Vec::new();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let gw = Gateway::builder(&upstream)
            .redis(&redis.url())
            .master(&master)
            .start()
            .await;
        apis.push(AdminClient::new(gw.admin_url(""), &master));
        gateways.push(gw);
    }
    let account = apis[0].account(json!({ "name": "acme" })).await;
    let calls = (0..60).map(|i| {
        let (api, account) = (&apis[i % 2], &account);
        async move {
            let (status, answer) = api
                .master(
                    Method::POST,
                    &format!("/v1/accounts/{account}/keys"),
                    Some(json!({ "name": format!("k{i}") })),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{answer}");
        }
    });
    futures_util::future::join_all(calls).await;
    assert_eq!(entries(&apis[1], &account).await.len(), 61);
    for api in &apis {
        let path = format!("/v1/accounts/{account}/audit/verify");
        assert_eq!(verify(api, &path, &master).await, intact(61));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_verifies_its_own_chain_and_no_other() {
    let (_up, _gw, api) = start().await;
    let (a, _, raw_a) = api.account_with_key("a").await;
    let (b, _, _) = api.account_with_key("b").await;
    let reader = api
        .key(&a, json!({ "name": "reader", "scopes": ["account:read"] }))
        .await;
    let reader = text(&reader, "key");
    let writer = api
        .key(&a, json!({ "name": "writer", "scopes": ["account:write"] }))
        .await;
    let writer = text(&writer, "key");

    for cred in [&raw_a, &reader] {
        assert_eq!(
            verify(&api, "/v1/account/audit/verify", cred).await,
            intact(4)
        );
    }
    let (status, err) = api
        .call(Method::GET, "/v1/account/audit/verify", &writer, None)
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::FORBIDDEN, "scope_denied")
    );
    let (status, err) = api
        .call(
            Method::GET,
            &format!("/v1/accounts/{b}/audit/verify"),
            &raw_a,
            None,
        )
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::NOT_FOUND, "not_found"),
        "{err}"
    );
    let (status, _) = api
        .call(
            Method::GET,
            "/v1/account/audit/verify",
            "tgsk_nonsense",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_verifies_any_account_and_an_unknown_one_is_404() {
    let (_up, gw, api) = start().await;
    let (a, _, _) = api.account_with_key("a").await;
    let b = api.account(json!({ "name": "b" })).await;
    for (account, n) in [(&a, 2), (&b, 1)] {
        let path = format!("/v1/accounts/{account}/audit/verify");
        assert_eq!(verify(&api, &path, &gw.master).await, intact(n));
    }
    let (status, err) = api
        .master(Method::GET, "/v1/accounts/acc_nobody/audit/verify", None)
        .await;
    assert_eq!(
        (status, code(&err)),
        (StatusCode::NOT_FOUND, "not_found"),
        "{err}"
    );
}
