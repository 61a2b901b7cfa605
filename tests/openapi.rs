//! `docs/openapi.json` kept true: it is OpenAPI 3.1 with the crate's version and every `$ref`
//! resolves; every route of the `//!` table in `src/admin.rs` is documented and nothing else is;
//! every request body refuses unknown fields; and a real gateway, called at every documented path
//! and method with real ids, answers only statuses the document lists, with bodies that match the
//! documented schema (checked by the small [`Checker`] below, not a full JSON Schema validator).
//!
//! The operator's form (`/v1/accounts/{account_id}/…`) is called with the master key and the
//! account's own form (`/v1/account/…`) with one of the account's secret keys, rotating through
//! the three credential forms.

mod common;

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use common::gateway::Gateway;
use common::upstream::Upstream;

/// The document under test.
const DOC: &str = include_str!("../docs/openapi.json");
/// The admin module, whose `//!` table lists every endpoint.
const ADMIN_SRC: &str = include_str!("../src/admin.rs");
/// What `…` stands for in the table: the operator's base and the account's own.
const BASES: [&str; 2] = ["/v1/accounts/{account_id}", "/v1/account"];
/// The HTTP methods the admin API could route.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn doc() -> Value {
    serde_json::from_str(DOC).expect("docs/openapi.json is JSON")
}

// === the document itself ===

#[test]
fn document_is_openapi_3_1_with_the_crate_version() {
    let doc = doc();
    let version = doc["openapi"].as_str().expect("openapi is a string");
    assert!(version.starts_with("3.1."), "openapi: {version}");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let schemes = doc["components"]["securitySchemes"]
        .as_object()
        .expect("security schemes");
    let forms: BTreeSet<String> = schemes
        .values()
        .map(|s| {
            let kind = s["type"].as_str().unwrap_or("");
            match kind {
                "http" => format!("http {}", s["scheme"].as_str().unwrap_or("")),
                "apiKey" => format!("apiKey {} {}", s["in"], s["name"]),
                other => other.to_owned(),
            }
        })
        .collect();
    let expected: BTreeSet<String> = [
        "http bearer",
        "http basic",
        "apiKey \"header\" \"X-API-Key\"",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    assert_eq!(forms, expected, "the three credential forms");
}

#[test]
fn every_ref_resolves() {
    let doc = doc();
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.len() > 50, "only {} $refs found", refs.len());
    for r in refs {
        assert!(resolve_ref(&doc, &r).is_some(), "unresolved $ref {r}");
    }
}

#[test]
fn every_error_code_of_the_document_is_one_the_server_uses() {
    let doc = doc();
    let codes = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
        ["enum"]
        .as_array()
        .expect("Error.code is an enum");
    let source = include_str!("../src/admin/error.rs");
    for code in codes {
        let code = code.as_str().expect("codes are strings");
        assert!(
            source.contains(&format!("\"{code}\"")),
            "{code} is not produced by src/admin/error.rs"
        );
    }
    // And the reverse: every code in `status_and_code` is in the enum.
    for line in source.lines().filter(|l| l.contains("StatusCode::")) {
        if let Some(code) = line.split('"').nth(1) {
            assert!(
                codes.iter().any(|c| c == code),
                "{code} is missing from the Error schema's enum"
            );
        }
    }
}

#[test]
fn request_bodies_refuse_unknown_fields_in_the_document() {
    let doc = doc();
    for (path, method, operation) in operations(&doc) {
        let Some(body) = operation.get("requestBody") else {
            continue;
        };
        let schema = resolve(&doc, &body["content"]["application/json"]["schema"]);
        assert_eq!(
            schema["additionalProperties"],
            json!(false),
            "{method} {path}: the request body must have additionalProperties: false"
        );
        let responses = &operation["responses"];
        assert!(
            responses.get("400").is_some(),
            "{method} {path} takes a body but documents no 400"
        );
    }
}

#[test]
fn every_route_of_the_admin_module_table_is_documented_and_nothing_else() {
    let doc = doc();
    let table = admin_table();
    assert!(table.len() >= 30, "parsed only {} routes", table.len());
    let documented: BTreeSet<(String, String)> = operations(&doc)
        .into_iter()
        .map(|(path, method, _)| (method.to_uppercase(), path))
        .collect();
    let missing: Vec<_> = table.difference(&documented).collect();
    assert!(missing.is_empty(), "routes not documented: {missing:?}");
    let extra: Vec<_> = documented.difference(&table).collect();
    assert!(
        extra.is_empty(),
        "documented but not in src/admin.rs: {extra:?}"
    );
}

// === the running gateway against the document ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_answers_as_documented() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let mut api = Api::new(&gw);
    let master = gw.master.clone();
    let op = |c| Cred::Operator(c);

    // Health, no credential.
    api.call("get", "/healthz", &[], Cred::None, None).await;
    api.call("get", "/readyz", &[], Cred::None, None).await;
    api.call("get", "/metrics", &[], Cred::None, None).await;
    // The dashboard's files, no credential (the app signs in against the API).
    api.call("get", "/ui", &[], Cred::None, None).await;
    let (status, _) = api
        .call("get", "/ui/{path}", &[("path", "app.js")], Cred::None, None)
        .await;
    assert_eq!(status, 200);
    let (status, _) = api
        .call(
            "get",
            "/ui/{path}",
            &[("path", "nothing.js")],
            Cred::None,
            None,
        )
        .await;
    assert_eq!(status, 404);

    // Accounts, as the operator.
    let (status, created) = api
        .call(
            "post",
            "/v1/accounts",
            &[],
            op(0),
            Some(json!({
                "name": "openapi",
                "auth_method": "api_key",
                "rate_limit": { "per_minute": 600, "per_day": 100000 },
                "network_policy": { "allowed_ips": ["0.0.0.0/0", "::/0"], "allowed_domains": [] },
                "permissions": null,
                "plan": { "max_keys": 50, "max_sites": null },
                "active": true,
            })),
        )
        .await;
    assert_eq!(status, 201);
    let account = text(&created, "id");
    let (_, other) = api
        .call(
            "post",
            "/v1/accounts",
            &[],
            op(1),
            Some(json!({ "name": "to delete", "permissions": ["orders:read"] })),
        )
        .await;
    let other = text(&other, "id");
    api.call("get", "/v1/accounts", &[], op(2), None).await;
    let acc = [("account_id", account.as_str())];
    let (status, _) = api
        .call("get", "/v1/accounts/{account_id}", &acc, op(0), None)
        .await;
    assert_eq!(status, 200);
    let (status, patched) = api
        .call(
            "patch",
            "/v1/accounts/{account_id}",
            &[("account_id", other.as_str())],
            op(1),
            Some(json!({ "rate_limit": { "per_minute": 30 }, "plan": { "max_keys": 1 } })),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched["plan"]["max_keys"], 1);

    // The account's own key, made by the operator; a second one keeps it from being the last.
    let (_own_key_id, own) = gw
        .create_key(&account, json!({ "name": "own", "type": "secret" }))
        .await;
    gw.create_key(&account, json!({ "name": "spare", "type": "secret" }))
        .await;
    let (status, verdict) = api
        .call(
            "post",
            "/v1/verify",
            &[],
            op(1),
            Some(json!({ "key": own, "route": "api", "method": "POST", "ip": "::1", "explain": true })),
        )
        .await;
    assert_eq!(
        (status, &verdict["valid"]),
        (200, &json!(true)),
        "{verdict}"
    );
    let own = Cred::Account(own, 0);
    api.call("get", "/v1/account", &[], own.next(1), None).await;

    // Every account resource, in both forms.
    for (base, cred) in [(BASES[0], op(0)), (BASES[1], own.clone())] {
        let ids: Vec<(&str, &str)> = if base == BASES[0] {
            vec![("account_id", account.as_str())]
        } else {
            Vec::new()
        };
        let p = |suffix: &str| format!("{base}{suffix}");
        let (status, _) = api
            .call("get", &p("/config"), &ids, cred.next(0), None)
            .await;
        assert_eq!(status, 200);
        let (status, key) = api
            .call(
                "post",
                &p("/keys"),
                &ids,
                cred.next(1),
                Some(json!({
                    "name": format!("web {}", api.covered.len()),
                    "type": "secret",
                    "scopes": ["orders:read", "orders:write"],
                    "allowed_ips": ["10.0.0.0/8"],
                    "rate_limit": { "per_minute": 10 },
                    "ttl": "30d",
                    "metadata": { "team": "billing" },
                })),
            )
            .await;
        assert_eq!(status, 201);
        let publishable = api
            .call(
                "post",
                &p("/keys"),
                &ids,
                cred.next(2),
                Some(json!({
                    "name": format!("browser {}", api.covered.len()),
                    "type": "publishable",
                    "allowed_origins": ["https://app.example.com"],
                    "expires_at": "2999-01-01T00:00:00Z",
                    "protected": true,
                })),
            )
            .await;
        assert_eq!(publishable.0, 201);
        // Import by hash: one key, then a batch; the same hash again is a documented 409.
        let n = api.covered.len();
        let hash = |i: usize| hex::encode(Sha256::digest(format!("sk_live_{n}_{i}").as_bytes()));
        let (status, imported) = api
            .call(
                "post",
                &p("/keys/import"),
                &ids,
                cred.next(2),
                Some(json!({
                    "hash": hash(0).to_uppercase(),
                    "name": format!("legacy {n}"),
                    "scopes": ["orders:read"],
                    "external_id": "cus_42",
                    "ttl": "30d",
                })),
            )
            .await;
        assert_eq!(
            (status, &imported["imported"]),
            (201, &json!(true)),
            "{imported}"
        );
        let (status, batch) = api
            .call(
                "post",
                &p("/keys/import"),
                &ids,
                cred.next(0),
                Some(json!({ "keys": [
                    { "hash": hash(1), "name": format!("legacy {n} a") },
                    { "hash": hash(2), "name": format!("legacy {n} b"), "type": "publishable",
                      "allowed_origins": ["https://app.example.com"] },
                ] })),
            )
            .await;
        assert_eq!(status, 201);
        assert_eq!(batch["keys"].as_array().map(Vec::len), Some(2), "{batch}");
        let (status, refusal) = api
            .call(
                "post",
                &p("/keys/import"),
                &ids,
                cred.next(1),
                Some(json!({ "hash": hash(0), "name": format!("legacy {n} again") })),
            )
            .await;
        assert_eq!(
            (status, refusal["error"]["code"].clone()),
            (409, json!("key_exists"))
        );
        let (status, _) = api
            .call(
                "post",
                &p("/keys/import"),
                &ids,
                cred.next(2),
                Some(json!({ "keys": [] })),
            )
            .await;
        assert_eq!(status, 400);
        let key_id = text(&key, "id");
        let mut with_key = ids.clone();
        with_key.push(("key_id", key_id.as_str()));
        api.call("get", &p("/keys"), &ids, cred.next(0), None).await;
        api.call("get", &p("/keys/{key_id}"), &with_key, cred.next(1), None)
            .await;
        let (status, credited) = api
            .call(
                "post",
                &p("/keys/{key_id}/credits"),
                &with_key,
                cred.next(2),
                Some(json!({ "set": 1000 })),
            )
            .await;
        assert_eq!((status, &credited["remaining"]), (200, &json!(1000)));
        let (status, changed) = api
            .call(
                "patch",
                &p("/keys/{key_id}"),
                &with_key,
                cred.next(2),
                Some(json!({ "rate_limit": { "per_minute": 20 }, "metadata": { "team": null } })),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(changed["rate_limit"]["per_minute"], 20);
        for action in ["deactivate", "activate"] {
            let (status, _) = api
                .call(
                    "post",
                    &p(&format!("/keys/{{key_id}}/{action}")),
                    &with_key,
                    cred.next(0),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{action}");
        }
        let (status, _) = api
            .call(
                "post",
                &p("/keys/{key_id}/renew"),
                &with_key,
                cred.next(1),
                Some(json!({ "ttl": "7d" })),
            )
            .await;
        assert_eq!(status, 200);
        let (status, rolled) = api
            .call(
                "post",
                &p("/keys/{key_id}/roll"),
                &with_key,
                cred.next(2),
                Some(json!({ "grace": "1h" })),
            )
            .await;
        assert_eq!(status, 201);
        let rolled_id = text(&rolled, "id");
        let mut with_rolled = ids.clone();
        with_rolled.push(("key_id", rolled_id.as_str()));
        let (status, _) = api
            .call(
                "delete",
                &p("/keys/{key_id}"),
                &with_rolled,
                cred.next(0),
                None,
            )
            .await;
        assert_eq!(status, 200);

        let (status, usage) = api
            .call(
                "get",
                &format!(
                    "{}?interval=hour&from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z",
                    p("/keys/{key_id}/usage")
                ),
                &with_key,
                cred.next(1),
                None,
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(usage["buckets"].as_array().map(Vec::len), Some(24));
        let (status, refusal) = api
            .call(
                "get",
                &format!(
                    "{}?interval=minute&from=2000-01-01T00:00:00Z",
                    p("/keys/{key_id}/usage")
                ),
                &with_key,
                cred.next(2),
                None,
            )
            .await;
        assert_eq!(
            (status, refusal["error"]["code"].clone()),
            (400, json!("too_many_buckets"))
        );
        let (status, totals) = api
            .call(
                "get",
                &format!("{}?start_date=2026-01-01&end_date=2026-01-31", p("/usage")),
                &ids,
                cred.next(0),
                None,
            )
            .await;
        assert_eq!(status, 200);
        assert!(totals["custom"].is_object(), "{totals}");
        let (status, _) = api
            .call(
                "get",
                &format!("{}?start_date=2026-01-01", p("/usage")),
                &ids,
                cred.next(1),
                None,
            )
            .await;
        assert_eq!(status, 400);
        let (status, glance) = api
            .call("get", &p("/usage/keys"), &ids, cred.next(2), None)
            .await;
        assert_eq!(status, 200);
        assert!(
            glance["total_keys"].as_u64().is_some_and(|n| n >= 3),
            "{glance}"
        );

        api.call("get", &p("/sites"), &ids, cred.next(1), None)
            .await;
        let origin = format!("https://site{}.example.com", api.covered.len());
        let (status, site) = api
            .call(
                "post",
                &p("/sites"),
                &ids,
                cred.next(2),
                Some(json!({ "name": origin })),
            )
            .await;
        assert_eq!(status, 201);
        // The same origin again is a documented 409.
        let (status, _) = api
            .call(
                "post",
                &p("/sites"),
                &ids,
                cred.next(0),
                Some(json!({ "name": origin })),
            )
            .await;
        assert_eq!(status, 409);
        let site_id = text(&site, "id");
        let mut with_site = ids.clone();
        with_site.push(("site_id", site_id.as_str()));
        let (status, _) = api
            .call(
                "delete",
                &p("/sites/{site_id}"),
                &with_site,
                cred.next(1),
                None,
            )
            .await;
        assert_eq!(status, 204);
        let (status, _) = api
            .call(
                "delete",
                &p("/sites/{site_id}"),
                &with_site,
                cred.next(2),
                None,
            )
            .await;
        assert_eq!(status, 404);

        api.call("get", &p("/secrets"), &ids, cred.next(0), None)
            .await;
        let (status, secret) = api
            .call("post", &p("/secrets"), &ids, cred.next(1), None)
            .await;
        assert_eq!(status, 201);
        assert!(text(&secret, "client_secret").starts_with("tgcs_"));
        let secret_id = text(&secret, "id");
        let mut with_secret = ids.clone();
        with_secret.push(("secret_id", secret_id.as_str()));
        for expected in [204, 404] {
            let (status, _) = api
                .call(
                    "delete",
                    &p("/secrets/{secret_id}"),
                    &with_secret,
                    cred.next(2),
                    None,
                )
                .await;
            assert_eq!(status, expected);
        }

        let (status, page) = api
            .call(
                "get",
                &format!("{}?limit=5&offset=1&search=key", p("/audit")),
                &ids,
                cred.next(0),
                None,
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(page["limit"], 5);
        let (status, _) = api
            .call(
                "get",
                &format!("{}?limit=0", p("/audit")),
                &ids,
                cred.next(1),
                None,
            )
            .await;
        assert_eq!(status, 400);
        let (status, verdict) = api
            .call("get", &p("/audit/verify"), &ids, cred.next(2), None)
            .await;
        assert_eq!(
            (status, &verdict["intact"]),
            (200, &json!(true)),
            "{verdict}"
        );

        // Refusals the document lists.
        let mut unknown_key = ids.clone();
        unknown_key.push(("key_id", "key_00000000000000000000"));
        let (status, _) = api
            .call(
                "get",
                &p("/keys/{key_id}"),
                &unknown_key,
                cred.next(2),
                None,
            )
            .await;
        assert_eq!(status, 404);
        let (status, _) = api
            .call(
                "post",
                &p("/keys"),
                &ids,
                cred.next(0),
                Some(json!({ "name": "own" })),
            )
            .await;
        assert_eq!(status, 409, "name_taken");
        let (status, _) = api.call("get", &p("/keys"), &ids, Cred::None, None).await;
        assert_eq!(status, 401);
        let wrong = if base == BASES[0] { own.clone() } else { op(0) };
        let (status, _) = api.call("get", &p("/config"), &ids, wrong, None).await;
        assert_eq!(status, 403);
        let (status, _) = api
            .call(
                "post",
                &p("/keys"),
                &ids,
                cred.next(1),
                Some(json!({ "name": "x".repeat(101) })),
            )
            .await;
        assert_eq!(status, 400);
    }

    // The last credential and a protected key: documented 409s.
    let lonely = gw.create_account(json!({ "name": "lonely" })).await;
    let (lonely_key, _) = gw
        .create_key(
            &lonely,
            json!({ "name": "only", "type": "secret", "protected": true }),
        )
        .await;
    let only = [
        ("account_id", lonely.as_str()),
        ("key_id", lonely_key.as_str()),
    ];
    let (status, refusal) = api
        .call(
            "delete",
            "/v1/accounts/{account_id}/keys/{key_id}",
            &only,
            op(0),
            None,
        )
        .await;
    assert_eq!(
        (status, refusal["error"]["code"].clone()),
        (409, json!("last_credential"))
    );
    let (status, refusal) = api
        .call(
            "post",
            "/v1/accounts/{account_id}/keys/{key_id}/deactivate",
            &only,
            op(1),
            None,
        )
        .await;
    assert_eq!(
        (status, refusal["error"]["code"].clone()),
        (409, json!("protected_key"))
    );

    // An account key never sees another account: 404 on its id, as on an unknown one. A key
    // without the scope its method needs: 403 `scope_denied`.
    for account_id in [other.as_str(), "acc_nope"] {
        let (status, refusal) = api
            .call(
                "get",
                "/v1/accounts/{account_id}/keys",
                &[("account_id", account_id)],
                own.next(2),
                None,
            )
            .await;
        assert_eq!(
            (status, refusal["error"]["code"].clone()),
            (404, json!("not_found"))
        );
    }
    let (_, reader) = gw
        .create_key(
            &account,
            json!({ "name": "reader", "type": "secret", "scopes": ["account:read"] }),
        )
        .await;
    let (status, refusal) = api
        .call(
            "post",
            "/v1/account/keys",
            &[],
            Cred::Account(reader, 1),
            Some(json!({ "name": "not allowed" })),
        )
        .await;
    assert_eq!(
        (status, refusal["error"]["code"].clone()),
        (403, json!("scope_denied"))
    );

    // Operator-only paths refuse an account key; unknown accounts are 404.
    let (status, _) = api
        .call("get", "/v1/accounts", &[], own.next(0), None)
        .await;
    assert_eq!(status, 403);
    let (status, _) = api.call("get", "/v1/account", &[], op(0), None).await;
    assert_eq!(status, 403);
    let (status, _) = api
        .call(
            "get",
            "/v1/account",
            &[],
            Cred::Raw("tgsk_nonsense".into()),
            None,
        )
        .await;
    assert_eq!(status, 401);
    let (status, _) = api
        .call(
            "get",
            "/v1/accounts/{account_id}",
            &[("account_id", "acc_nope")],
            op(1),
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = api
        .call(
            "post",
            "/v1/accounts",
            &[],
            Cred::Raw(master.clone()),
            Some(json!({ "name": "" })),
        )
        .await;
    assert_eq!(status, 400);

    // Deleting an account, last.
    let (status, deleted) = api
        .call(
            "delete",
            "/v1/accounts/{account_id}",
            &[("account_id", other.as_str())],
            op(2),
            None,
        )
        .await;
    assert_eq!((status, deleted), (200, json!({ "deleted": true })));

    let documented: BTreeSet<(String, String)> = operations(&api.doc)
        .into_iter()
        .map(|(path, method, _)| (method, path))
        .collect();
    let missed: Vec<_> = documented.difference(&api.covered).collect();
    assert!(
        missed.is_empty(),
        "documented operations never called: {missed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_with_an_unknown_field_is_a_documented_400() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let mut api = Api::new(&gw);
    let (account, raw) = gw.account_with_key().await;
    let (key_id, _) = gw
        .create_key(
            &account,
            json!({ "name": "second", "type": "secret", "ttl": "1d" }),
        )
        .await;
    let (status, site) = gw
        .admin(
            Method::POST,
            &format!("/v1/accounts/{account}/sites"),
            Some(json!({ "name": "https://example.com" })),
        )
        .await;
    assert_eq!(status, 201, "{site}");
    let site_id = text(&site, "id");
    let ids = [
        ("account_id", account.as_str()),
        ("key_id", key_id.as_str()),
        ("site_id", site_id.as_str()),
    ];
    let own = Cred::Account(raw, 0);
    let mut sent = 0;
    for (path, method, operation) in operations(&api.doc.clone()) {
        if operation.get("requestBody").is_none() {
            continue;
        }
        let cred = if is_own(&path) {
            own.next(sent)
        } else {
            Cred::Operator(sent)
        };
        let (status, body) = api
            .call(
                &method,
                &path,
                &ids,
                cred,
                Some(json!({ "unknown_field": 1 })),
            )
            .await;
        assert_eq!(status, 400, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{method} {path}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(
            message.contains("unknown_field"),
            "{method} {path}: {message}"
        );
        sent += 1;
    }
    assert!(sent >= 12, "only {sent} operations take a body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_a_path_does_not_document_are_405() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream).await;
    let api = Api::new(&gw);
    let (account, _) = gw.account_with_key().await;
    let ids = [
        ("account_id", account.as_str()),
        ("key_id", "key_x"),
        ("site_id", "site_x"),
        ("secret_id", "sec_x"),
        ("path", "app.js"),
    ];
    let schema = api.doc["components"]["responses"]["MethodNotAllowed"]["content"]
        ["application/json"]["schema"]
        .clone();
    let paths = api.doc["paths"].as_object().expect("paths").clone();
    for (path, item) in paths {
        for method in METHODS.iter().filter(|m| item.get(**m).is_none()) {
            let url = gw.admin_url(&fill(&path, &ids));
            let response = api
                .http
                .request(method.to_uppercase().parse().expect("method"), url)
                .bearer_auth(&gw.master)
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            assert_eq!(status, 405, "{method} {path}: {body}");
            let errors = Checker::new(&api.doc).check(&schema, &body);
            assert!(errors.is_empty(), "{method} {path}: {errors:?}");
        }
    }
}

// === calling the gateway ===

/// A credential for one request. The `usize` picks the form: Bearer, `X-API-Key`, or Basic.
#[derive(Clone)]
enum Cred {
    None,
    /// The master key.
    Operator(usize),
    /// An account's raw secret key.
    Account(String, usize),
    /// This raw value as a bearer token.
    Raw(String),
}

impl Cred {
    /// The same credential in the form after `n` more.
    fn next(&self, n: usize) -> Cred {
        match self {
            Cred::Operator(i) => Cred::Operator(i + n),
            Cred::Account(raw, i) => Cred::Account(raw.clone(), i + n),
            other => other.clone(),
        }
    }
}

/// The document, a client, and which operations have been called.
struct Api<'g> {
    doc: Value,
    gw: &'g Gateway,
    http: reqwest::Client,
    /// (method, path template) of every call so far.
    covered: BTreeSet<(String, String)>,
}

impl<'g> Api<'g> {
    fn new(gw: &'g Gateway) -> Self {
        Api {
            doc: doc(),
            gw,
            http: common::client(),
            covered: BTreeSet::new(),
        }
    }

    /// Calls `method template` (its query, if any, after `?`) with the path parameters filled
    /// from `ids`; asserts that the status is documented for the operation and the body matches
    /// the documented schema; returns the status and the JSON body (`Null` if none).
    async fn call(
        &mut self,
        method: &str,
        template: &str,
        ids: &[(&str, &str)],
        cred: Cred,
        body: Option<Value>,
    ) -> (u16, Value) {
        let path = template.split('?').next().unwrap_or(template);
        let operation = self.doc["paths"][path][method].clone();
        assert!(operation.is_object(), "{method} {path} is not documented");
        if body.is_some() {
            assert!(
                operation.get("requestBody").is_some(),
                "{method} {path} documents no request body"
            );
        }
        let url = self.gw.admin_url(&fill(template, ids));
        let mut request = self
            .http
            .request(method.to_uppercase().parse().expect("method"), url);
        request = match &cred {
            Cred::None => request,
            Cred::Operator(i) => with_form(request, &self.gw.master, *i),
            Cred::Account(raw, i) => with_form(request, raw, *i),
            Cred::Raw(raw) => request.bearer_auth(raw),
        };
        if let Some(body) = &body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("admin request");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let text = response.text().await.expect("admin answer");
        let what = format!("{method} {template} → {status} {text}");

        let responses = &operation["responses"];
        let documented = responses
            .get(status.to_string())
            .or_else(|| responses.get("default"))
            .unwrap_or_else(|| panic!("status not documented: {what}"));
        let documented = resolve(&self.doc, documented).clone();
        let mut json = Value::Null;
        match documented.get("content").and_then(Value::as_object) {
            None => assert!(text.is_empty(), "no body documented: {what}"),
            Some(content) => {
                let media = content_type
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned();
                let schema = &content
                    .get(&media)
                    .unwrap_or_else(|| panic!("content type {media:?} not documented: {what}"))
                    ["schema"];
                let value = if media == "application/json" {
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {what}"))
                } else {
                    Value::String(text)
                };
                let errors = Checker::new(&self.doc).check(schema, &value);
                assert!(errors.is_empty(), "{what}\nschema mismatch: {errors:#?}");
                if media == "application/json" {
                    json = value;
                }
            }
        }
        self.covered.insert((method.to_owned(), path.to_owned()));
        (status, json)
    }
}

/// Presents `raw` as Bearer, `X-API-Key` or Basic, by `form` modulo 3.
fn with_form(request: reqwest::RequestBuilder, raw: &str, form: usize) -> reqwest::RequestBuilder {
    match form % 3 {
        0 => request.bearer_auth(raw),
        1 => request.header("x-api-key", raw),
        _ => request.basic_auth(raw, Some("")),
    }
}

/// `template` with each `{name}` replaced by its id.
fn fill(template: &str, ids: &[(&str, &str)]) -> String {
    let mut path = template.to_owned();
    for (name, value) in ids {
        path = path.replace(&format!("{{{name}}}"), value);
    }
    assert!(!path.contains('{'), "unfilled parameter in {path}");
    path
}

/// Whether `path` is the account's own form, called with its own key.
fn is_own(path: &str) -> bool {
    path == "/v1/account" || path.starts_with("/v1/account/")
}

fn text(body: &Value, field: &str) -> String {
    body[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {body}"))
        .to_owned()
}

// === reading the document ===

/// Every (path, method, operation) of the document.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut out = Vec::new();
    for (path, item) in paths {
        for method in METHODS.iter().chain(&["head", "options", "trace"]) {
            if let Some(operation) = item.get(*method) {
                out.push((path.clone(), (*method).to_owned(), operation.clone()));
            }
        }
    }
    out
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => collect_refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// A local `$ref` (`#/components/...`), JSON-pointer unescaped.
fn resolve_ref<'a>(doc: &'a Value, r: &str) -> Option<&'a Value> {
    let pointer = r.strip_prefix('#')?;
    // The pointer syntax of `$ref` is that of `Value::pointer`, `~0`/`~1` escapes included.
    doc.pointer(pointer)
}

/// `value`, or what it refers to (repeatedly).
fn resolve<'a>(doc: &'a Value, mut value: &'a Value) -> &'a Value {
    for _ in 0..16 {
        match value.get("$ref").and_then(Value::as_str) {
            Some(r) => value = resolve_ref(doc, r).unwrap_or_else(|| panic!("bad $ref {r}")),
            None => return value,
        }
    }
    panic!("$ref chain too long")
}

/// The routes of the `//!` table in `src/admin.rs` as (METHOD, path), with `…` expanded to both
/// bases. A cell like `` `POST …/keys/{key_id}/deactivate`, `…/activate` `` gives two routes: the
/// second replaces the first one's last segment.
fn admin_table() -> BTreeSet<(String, String)> {
    let mut routes = BTreeSet::new();
    for line in ADMIN_SRC.lines() {
        let Some(row) = line.strip_prefix("//! | `") else {
            continue;
        };
        let cell = row.split(" | ").next().unwrap_or("");
        let mut parts = format!("`{cell}")
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect::<Vec<_>>()
            .into_iter();
        let first = parts.next().expect("a route in the first cell");
        let (methods, first_path) = first.split_once(' ').expect("METHOD path");
        let mut paths = vec![first_path.to_owned()];
        for relative in parts {
            let tail = relative.strip_prefix('…').unwrap_or(&relative);
            let previous = paths[0].rsplit_once('/').map_or("", |(head, _)| head);
            paths.push(format!("{previous}{tail}"));
        }
        for method in methods.split('/') {
            for path in &paths {
                match path.strip_prefix('…') {
                    Some(rest) => {
                        for base in BASES {
                            routes.insert((method.to_owned(), format!("{base}{rest}")));
                        }
                    }
                    None => {
                        routes.insert((method.to_owned(), path.clone()));
                    }
                }
            }
        }
    }
    routes
}

// === checking a value against a schema ===

/// A small JSON Schema checker for what the document uses: `$ref`, `allOf`, `oneOf`/`anyOf`,
/// `type` (one or several), `enum`, `const`, `required`, `properties`, `additionalProperties:
/// false`, `items`, `minimum`/`maximum`, `minLength`/`maxLength` and `format: date-time`.
struct Checker<'d> {
    doc: &'d Value,
}

impl<'d> Checker<'d> {
    fn new(doc: &'d Value) -> Self {
        Checker { doc }
    }

    /// Every mismatch, each with its location (`$.keys[0].expires_at: …`).
    fn check(&self, schema: &Value, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.walk(schema, value, "$", &mut errors);
        errors
    }

    fn walk(&self, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = resolve(self.doc, schema);
        let Some(s) = schema.as_object() else {
            return;
        };
        for sub in s
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.walk(sub, value, at, errors);
        }
        for key in ["oneOf", "anyOf"] {
            if let Some(options) = s.get(key).and_then(Value::as_array) {
                let fits = options
                    .iter()
                    .filter(|o| self.check(o, value).is_empty())
                    .count();
                let ok = if key == "oneOf" { fits == 1 } else { fits >= 1 };
                if !ok {
                    errors.push(format!(
                        "{at}: {fits} of the {key} alternatives fit {value}"
                    ));
                }
            }
        }
        if let Some(types) = s.get("type") {
            let types: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if !types.iter().any(|t| has_type(value, t)) {
                errors.push(format!("{at}: {value} is not of type {types:?}"));
                return;
            }
        }
        if let Some(options) = s.get("enum").and_then(Value::as_array) {
            if !options.contains(value) {
                errors.push(format!("{at}: {value} is not one of {options:?}"));
            }
        }
        if let Some(c) = s.get("const") {
            if c != value {
                errors.push(format!("{at}: {value} is not {c}"));
            }
        }
        match value {
            Value::Object(map) => self.object(s, map, at, errors),
            Value::Array(items) => {
                if let Some(item) = s.get("items") {
                    for (i, v) in items.iter().enumerate() {
                        self.walk(item, v, &format!("{at}[{i}]"), errors);
                    }
                }
            }
            Value::String(text) => {
                let len = text.chars().count() as u64;
                if s.get("minLength")
                    .and_then(Value::as_u64)
                    .is_some_and(|m| len < m)
                {
                    errors.push(format!("{at}: {text:?} is too short"));
                }
                if s.get("maxLength")
                    .and_then(Value::as_u64)
                    .is_some_and(|m| len > m)
                {
                    errors.push(format!("{at}: {text:?} is too long"));
                }
                if s.get("format").and_then(Value::as_str) == Some("date-time")
                    && chrono::DateTime::parse_from_rfc3339(text).is_err()
                {
                    errors.push(format!("{at}: {text:?} is not an RFC 3339 date-time"));
                }
            }
            Value::Number(n) => {
                let n = n.as_f64().unwrap_or(f64::NAN);
                if s.get("minimum")
                    .and_then(Value::as_f64)
                    .is_some_and(|m| n < m)
                {
                    errors.push(format!("{at}: {n} is below the minimum"));
                }
                if s.get("maximum")
                    .and_then(Value::as_f64)
                    .is_some_and(|m| n > m)
                {
                    errors.push(format!("{at}: {n} is above the maximum"));
                }
            }
            _ => {}
        }
    }

    fn object(
        &self,
        s: &Map<String, Value>,
        map: &Map<String, Value>,
        at: &str,
        errors: &mut Vec<String>,
    ) {
        for name in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = name.as_str().unwrap_or("");
            if !map.contains_key(name) {
                errors.push(format!("{at}: required property {name:?} is missing"));
            }
        }
        let properties = s.get("properties").and_then(Value::as_object);
        for (name, v) in map {
            match properties.and_then(|p| p.get(name)) {
                Some(sub) => self.walk(sub, v, &format!("{at}.{name}"), errors),
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{at}: property {name:?} is not allowed"));
                }
                None => {}
            }
        }
    }
}

fn has_type(value: &Value, t: &str) -> bool {
    match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        "number" => value.is_number(),
        "integer" => value.is_i64() || value.is_u64(),
        _ => false,
    }
}

#[test]
fn the_checker_finds_what_it_should() {
    let doc = doc();
    let checker = Checker::new(&doc);
    let key = json!({ "$ref": "#/components/schemas/Key" });
    let errors = checker.check(&key, &json!({ "id": 1, "expires_at": "soon" }));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("\"account_id\" is missing")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("$.id: 1 is not of type")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("not an RFC 3339")),
        "{errors:?}"
    );
    let error =
        json!({ "$ref": "#/components/responses/NotFound/content/application~1json/schema" });
    assert!(checker
        .check(
            &error,
            &json!({ "error": { "code": "not_found", "message": "key not found" } })
        )
        .is_empty());
    assert!(!checker
        .check(
            &error,
            &json!({ "error": { "code": "forbidden", "message": "no" } })
        )
        .is_empty());
    let create = json!({ "$ref": "#/components/schemas/KeyCreate" });
    assert!(!checker
        .check(&create, &json!({ "name": "a", "nope": 1 }))
        .is_empty());
    assert!(checker
        .check(&create, &json!({ "name": "a", "scopes": null }))
        .is_empty());
}
