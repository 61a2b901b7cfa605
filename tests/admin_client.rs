//! What the `admin_*.rs` tests share: [`AdminClient`], calls to a gateway's admin API with any
//! credential, and readers for error bodies and times.
//!
//! Included with `#[path = "admin_client.rs"] mod admin_client;`; Cargo also builds it as a test
//! crate of its own, which uses none of it (hence the `allow`s).
#![allow(dead_code, unreachable_pub)]

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Calls one admin listener.
pub struct AdminClient {
    base: String,
    master: String,
    http: reqwest::Client,
}

// === impl AdminClient ===

impl AdminClient {
    /// A client for the admin API at `base` (`http://host:port`), whose operator key is `master`.
    pub fn new(base: String, master: &str) -> Self {
        AdminClient {
            base,
            master: master.to_owned(),
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("reqwest client"),
        }
    }

    /// `BASE/path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Any request with `cred` as bearer; the status and the body as JSON (`Null` if it is not
    /// JSON, e.g. empty).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        cred: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.request(method, self.url(path)).bearer_auth(cred);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("admin request");
        let status = response.status();
        let bytes = response.bytes().await.expect("admin answer");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Like [`AdminClient::call`], as the operator.
    pub async fn master(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let master = self.master.clone();
        self.call(method, path, &master, body).await
    }

    /// A new account from `body`; its id.
    pub async fn account(&self, body: Value) -> String {
        let (status, account) = self.master(Method::POST, "/v1/accounts", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "create account: {account}");
        text(&account, "id")
    }

    /// A new key of `account` from `body`, made by the operator; the whole create answer.
    pub async fn key(&self, account: &str, body: Value) -> Value {
        let path = format!("/v1/accounts/{account}/keys");
        let (status, key) = self.master(Method::POST, &path, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "create key: {key}");
        key
    }

    /// An account named `name` with one full-access secret key: (account id, key id, raw key).
    pub async fn account_with_key(&self, name: &str) -> (String, String, String) {
        let account = self.account(json!({ "name": name })).await;
        let key = self.key(&account, json!({ "name": "main" })).await;
        (account, text(&key, "id"), text(&key, "key"))
    }
}

// === functions ===

/// `error.code` of an error body.
pub fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no code>")
}

/// `error.message` of an error body.
pub fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or("<no message>")
}

/// Asserts a 400 `invalid_request` whose message names `field`.
pub fn assert_names_field(status: StatusCode, body: &Value, field: &str) {
    assert_eq!(
        (status, code(body)),
        (StatusCode::BAD_REQUEST, "invalid_request"),
        "{body}"
    );
    assert!(message(body).contains(field), "should name {field}: {body}");
}

/// A string field, which must be there.
pub fn text(value: &Value, field: &str) -> String {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {value}"))
        .to_owned()
}

/// An RFC 3339 time field, which must be there.
pub fn time(value: &Value, field: &str) -> DateTime<Utc> {
    text(value, field)
        .parse()
        .unwrap_or_else(|e| panic!("{field} in {value}: {e}"))
}

/// Whether `at` is within `slack` seconds of now + `secs`.
pub fn about(at: DateTime<Utc>, secs: i64, slack: i64) -> bool {
    let want = Utc::now() + chrono::Duration::seconds(secs);
    (at - want).num_seconds().abs() <= slack
}
