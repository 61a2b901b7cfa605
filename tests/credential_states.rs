//! One credential, one answer: every combination of a key's state (active or deactivated,
//! expired or not), its account's (active or not) and the account's `auth_method` (`api_key`,
//! or `oauth`, which refuses API keys) is presented to the proxy, to the admin API and to
//! `/v1/verify`, and all three give the same code — the one `auth::CredentialState::check`
//! gives, on the gateway's clock.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate::metering::WallClock;

use common::gateway::Gateway;
use common::upstream::Upstream;

/// One row of the table.
#[derive(Debug, Clone, Copy)]
struct State {
    key_active: bool,
    expired: bool,
    account_active: bool,
    oauth_only: bool,
}

impl State {
    /// What both callers must answer: the checks in their order.
    fn expected(self) -> Option<&'static str> {
        if !self.key_active {
            Some("inactive_credential")
        } else if self.expired {
            Some("expired_credential")
        } else if !self.account_active {
            Some("inactive_credential")
        } else if self.oauth_only {
            Some("auth_method_not_allowed")
        } else {
            None
        }
    }
}

/// The code of an answer: `None` for a 200.
async fn code(response: reqwest::Response) -> Option<String> {
    if response.status() == StatusCode::OK {
        return None;
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    Some(body["error"]["code"].as_str().unwrap_or("?").to_owned())
}

#[tokio::test]
async fn the_proxy_the_admin_api_and_verify_give_one_answer_for_every_credential_state() {
    let clock = Arc::new(AtomicI64::new(chrono::Utc::now().timestamp_millis()));
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .clock(WallClock::Manual(clock.clone()))
        .start()
        .await;
    let mut rows = Vec::new();
    for bits in 0..16u8 {
        let state = State {
            key_active: bits & 1 == 0,
            expired: bits & 2 != 0,
            account_active: bits & 4 == 0,
            oauth_only: bits & 8 != 0,
        };
        let method = if state.oauth_only { "oauth" } else { "api_key" };
        let account = gw
            .create_account(json!({ "name": format!("state {bits}"), "auth_method": method }))
            .await;
        // A spare key keeps the subject from being the account's last credential.
        gw.create_key(&account, json!({ "name": "spare", "type": "secret" }))
            .await;
        let mut fields = json!({ "name": "subject", "type": "secret" });
        if state.expired {
            fields["ttl"] = json!("1h");
        }
        let (key_id, key) = gw.create_key(&account, fields).await;
        if !state.key_active {
            let path = format!("/v1/accounts/{account}/keys/{key_id}/deactivate");
            let (status, body) = gw.admin(Method::POST, &path, None).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        if !state.account_active {
            let path = format!("/v1/accounts/{account}");
            let (status, body) = gw
                .admin(Method::PATCH, &path, Some(json!({ "active": false })))
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        rows.push((state, key));
    }
    // Two hours on, on the gateway's clock: the keys with a one-hour ttl have expired.
    clock.fetch_add(2 * 3_600_000, Ordering::SeqCst);
    let client = common::client();
    for (state, key) in rows {
        let proxy = code(
            client
                .get(gw.proxy_url("/things"))
                .bearer_auth(&key)
                .send()
                .await
                .expect("proxy"),
        )
        .await;
        let admin = code(
            client
                .get(gw.admin_url("/v1/account"))
                .bearer_auth(&key)
                .send()
                .await
                .expect("admin"),
        )
        .await;
        let (status, verdict) = gw
            .admin(Method::POST, "/v1/verify", Some(json!({ "key": key })))
            .await;
        assert_eq!(status, StatusCode::OK, "{verdict}");
        let verified =
            (verdict["valid"] != true).then(|| verdict["code"].as_str().unwrap_or("?").to_owned());
        let expected = state.expected().map(str::to_owned);
        assert_eq!(proxy, expected, "proxy, {state:?}");
        assert_eq!(admin, expected, "admin API, {state:?}");
        assert_eq!(verified, expected, "verify, {state:?}");
    }
}
