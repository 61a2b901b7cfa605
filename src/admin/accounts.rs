//! The operator's account endpoints — `POST /v1/accounts`, `GET /v1/accounts`,
//! `GET /v1/accounts/{account_id}` — and an account's view of itself, `GET /v1/account`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::audit::{self, Change, Origin};
use super::auth::{AccountAccess, Actor, Operator};
use super::body::JsonBody;
use super::error::ApiError;
use super::{validate, AdminState};
use crate::credential;
use crate::store::{AccountRecord, AuthMethod, NetworkPolicy, Plan, RateLimitSpec};

/// Longest account name.
const MAX_NAME_CHARS: usize = 200;

/// `POST /v1/accounts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateAccount {
    name: String,
    #[serde(default)]
    auth_method: AuthMethod,
    #[serde(default)]
    rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    network_policy: NetworkPolicy,
    #[serde(default)]
    permissions: Option<Vec<String>>,
    #[serde(default)]
    plan: Plan,
}

/// `GET /v1/accounts`.
#[derive(Serialize)]
pub(crate) struct AccountList {
    accounts: Vec<AccountRecord>,
}

/// What an account sees of itself.
#[derive(Serialize)]
pub(crate) struct OwnAccount {
    id: String,
    name: String,
    auth_method: AuthMethod,
    created_at: chrono::DateTime<Utc>,
}

/// `POST /v1/accounts` → 201 account.
pub(crate) async fn create(
    State(state): State<AdminState>,
    operator: Operator,
    JsonBody(req): JsonBody<CreateAccount>,
) -> Result<(StatusCode, Json<AccountRecord>), ApiError> {
    let account = req.into_record()?;
    state.store.create_account(&account).await?;
    audit::record(
        &*state.store,
        Origin {
            actor: &Actor::Master,
            ip: operator.ip.as_deref(),
            account_id: Some(&account.id),
        },
        Change {
            action: "account.create",
            target_type: "account",
            target_id: &account.id,
            detail: json!({ "name": account.name, "auth_method": account.auth_method }),
        },
    )
    .await;
    Ok((StatusCode::CREATED, Json(account)))
}

/// `GET /v1/accounts`.
pub(crate) async fn list(
    State(state): State<AdminState>,
    _operator: Operator,
) -> Result<Json<AccountList>, ApiError> {
    let accounts = state.store.list_accounts().await?;
    Ok(Json(AccountList { accounts }))
}

/// `GET /v1/accounts/{account_id}`.
pub(crate) async fn get(access: AccountAccess) -> Json<AccountRecord> {
    Json(access.account)
}

/// `GET /v1/account`: the calling key's account, in brief.
pub(crate) async fn get_own(access: AccountAccess) -> Json<OwnAccount> {
    let a = access.account;
    Json(OwnAccount {
        id: a.id,
        name: a.name,
        auth_method: a.auth_method,
        created_at: a.created_at,
    })
}

// === impl CreateAccount ===

impl CreateAccount {
    fn into_record(self) -> Result<AccountRecord, ApiError> {
        let name = validate::name("name", &self.name, MAX_NAME_CHARS)?;
        validate::rate_limit("rate_limit", self.rate_limit.as_ref())?;
        let network_policy = NetworkPolicy {
            allowed_ips: validate::cidrs(
                "network_policy.allowed_ips",
                &self.network_policy.allowed_ips,
            )?,
            allowed_domains: validate::origins(
                "network_policy.allowed_domains",
                &self.network_policy.allowed_domains,
            )?,
        };
        if let Some(permissions) = &self.permissions {
            validate::scope_names("permissions", permissions)?;
        }
        let now = Utc::now();
        Ok(AccountRecord {
            id: credential::new_id("acc"),
            name,
            auth_method: self.auth_method,
            rate_limit: self.rate_limit,
            network_policy,
            permissions: self.permissions,
            plan: self.plan,
            active: true,
            shared_rate_limit: None,
            created_at: now,
            updated_at: now,
        })
    }
}
