//! The operator's account endpoints — `POST /v1/accounts`, `GET /v1/accounts`,
//! `GET/PATCH/DELETE /v1/accounts/{account_id}` — and an account's view of itself,
//! `GET /v1/account`.
//!
//! An account cannot change or delete itself: its rate limit, plan, permissions and `active`
//! flag are the operator's to set, so `PATCH` and `DELETE` exist only on the operator's path.
//! After a change every cached key of the account is dropped, so the proxy applies it on the
//! next request; deleting an account removes its keys and sites and drops each key's entry, which
//! revokes all its credentials at once.
//!
//! A PATCH is a JSON merge patch ([`Patch`]) over the create fields plus `active`. Narrowing
//! `permissions` or `plan` leaves existing keys and sites as they are; it only limits new ones.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::audit::{self, Action, Change, Origin};
use super::auth::{AccountAccess, Actor, Operator};
use super::body::JsonBody;
use super::error::ApiError;
use super::keys::Deleted;
use super::patch::Patch;
use super::{validate, AdminState};
use crate::credential;
use crate::store::{AccountRecord, AuthMethod, NetworkPolicy, Plan, RateLimitSpec};

/// Longest account name.
const MAX_NAME_CHARS: usize = 100;

/// The fields PATCH may name.
const PATCHABLE: [&str; 8] = [
    "name",
    "auth_method",
    "rate_limit",
    "shared_rate_limit",
    "network_policy",
    "permissions",
    "plan",
    "active",
];

/// Fields that have no "unset" state, so `null` is refused rather than guessed at.
const NOT_NULL: [&str; 3] = ["name", "auth_method", "active"];

/// What the operator sets on an account: the body of `POST /v1/accounts`, and what a PATCH is
/// applied to. Create takes `active` too (default true), so an account can start disabled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccountFields {
    name: String,
    #[serde(default)]
    auth_method: AuthMethod,
    #[serde(default)]
    rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    shared_rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    network_policy: NetworkPolicy,
    #[serde(default)]
    permissions: Option<Vec<String>>,
    #[serde(default)]
    plan: Plan,
    #[serde(default = "yes")]
    active: bool,
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
    JsonBody(req): JsonBody<AccountFields>,
) -> Result<(StatusCode, Json<AccountRecord>), ApiError> {
    let fields = req.validated(None)?;
    let now = Utc::now();
    let account = fields.into_record(credential::new_id("acc"), now, now);
    state.store.create_account(&account).await?;
    audit::record(
        &*state.store,
        Origin {
            actor: &Actor::Master,
            ip: operator.ip.as_deref(),
            account_id: Some(&account.id),
        },
        Change {
            action: Action::CreateAccount,
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

/// `PATCH /v1/accounts/{account_id}` → the account as changed.
pub(crate) async fn update(
    State(state): State<AdminState>,
    access: AccountAccess,
    JsonBody(body): JsonBody<Map<String, Value>>,
) -> Result<Json<AccountRecord>, ApiError> {
    let patch = Patch::new(body, &PATCHABLE, &NOT_NULL)?;
    let (account, changed) = {
        let _lock = state.lock_account(&access.account.id).await?;
        // Re-read under the lock: the extractor's copy may predate a concurrent change.
        let current = state
            .store
            .get_account(&access.account.id)
            .await?
            .ok_or(ApiError::NotFound("account"))?;
        let before = AccountFields::of(&current);
        let after = patch.apply(&before)?.validated(Some(&before))?;
        let changed = after.changed_from(&before);
        if changed.is_empty() {
            return Ok(Json(current));
        }
        let account = after.into_record(current.id, current.created_at, Utc::now());
        state.store.update_account(&account).await?;
        (account, changed)
    };
    state.cache.invalidate_account(&account.id);
    audit::record(
        &*state.store,
        access.audit_origin(),
        Change {
            action: Action::UpdateAccount,
            target_id: &account.id,
            detail: json!({ "changed": changed, "active": account.active }),
        },
    )
    .await;
    Ok(Json(account))
}

/// `DELETE /v1/accounts/{account_id}` → `{"deleted":true}`: the account, its keys and its sites.
pub(crate) async fn delete(
    State(state): State<AdminState>,
    access: AccountAccess,
) -> Result<Json<Deleted>, ApiError> {
    let (removed, revoked) = {
        let _lock = state.lock_account(&access.account.id).await?;
        // Client secrets first, each taking its tokens: a failure here leaves the account.
        let mut revoked = Vec::new();
        for secret in state.store.list_secrets(&access.account.id).await? {
            if let Some((_, tokens)) = state
                .store
                .delete_secret(&access.account.id, &secret.id)
                .await?
            {
                revoked.extend(tokens);
            }
        }
        (
            state.store.delete_account(&access.account.id).await?,
            revoked,
        )
    };
    for hash in removed.iter().map(|k| &k.hash).chain(&revoked) {
        state.cache.invalidate(hash);
    }
    state.cache.invalidate_account(&access.account.id);
    audit::record(
        &*state.store,
        access.audit_origin(),
        Change {
            action: Action::DeleteAccount,
            target_id: &access.account.id,
            detail: json!({ "name": access.account.name, "keys_removed": removed.len() }),
        },
    )
    .await;
    Ok(Json(Deleted::yes()))
}

// === impl AccountFields ===

impl AccountFields {
    /// The fields as `account` holds them now.
    fn of(account: &AccountRecord) -> Self {
        AccountFields {
            name: account.name.clone(),
            auth_method: account.auth_method,
            rate_limit: account.rate_limit,
            shared_rate_limit: account.shared_rate_limit,
            network_policy: account.network_policy.clone(),
            permissions: account.permissions.clone(),
            plan: account.plan,
            active: account.active,
        }
    }

    /// Checks every field, trimming the name and normalising CIDRs and origins; a `rate_limit`
    /// with no window set is no rate limit. A name unchanged from `before` (the account being
    /// patched) is kept as it is: a PATCH of another field must not fail on a name that an older
    /// version accepted.
    fn validated(self, before: Option<&AccountFields>) -> Result<Self, ApiError> {
        let name = match before {
            Some(before) if before.name == self.name => self.name,
            _ => validate::name("name", &self.name, MAX_NAME_CHARS)?,
        };
        validate::rate_limit("rate_limit", self.rate_limit.as_ref())?;
        validate::rate_limit("shared_rate_limit", self.shared_rate_limit.as_ref())?;
        let network_policy = NetworkPolicy {
            allowed_ips: validate::cidrs(
                "network_policy.allowed_ips",
                &self.network_policy.allowed_ips,
            )?,
            allowed_domains: validate::domains(
                "network_policy.allowed_domains",
                &self.network_policy.allowed_domains,
            )?,
        };
        if let Some(permissions) = &self.permissions {
            validate::scope_names("permissions", permissions)?;
        }
        Ok(AccountFields {
            name,
            rate_limit: self.rate_limit.filter(|r| *r != RateLimitSpec::default()),
            shared_rate_limit: self
                .shared_rate_limit
                .filter(|r| *r != RateLimitSpec::default()),
            network_policy,
            ..self
        })
    }

    /// Names of the fields that differ from `other`, in [`PATCHABLE`] order. Each name stands
    /// beside its own comparison, so no reordering can label one field with another's name.
    fn changed_from(&self, other: &AccountFields) -> Vec<&'static str> {
        let fields = [
            ("name", self.name != other.name),
            ("auth_method", self.auth_method != other.auth_method),
            ("rate_limit", self.rate_limit != other.rate_limit),
            (
                "shared_rate_limit",
                self.shared_rate_limit != other.shared_rate_limit,
            ),
            (
                "network_policy",
                self.network_policy != other.network_policy,
            ),
            ("permissions", self.permissions != other.permissions),
            ("plan", self.plan != other.plan),
            ("active", self.active != other.active),
        ];
        debug_assert!(fields.iter().map(|(n, _)| *n).eq(PATCHABLE));
        fields
            .into_iter()
            .filter_map(|(name, differs)| differs.then_some(name))
            .collect()
    }

    fn into_record(
        self,
        id: String,
        created_at: chrono::DateTime<Utc>,
        updated_at: chrono::DateTime<Utc>,
    ) -> AccountRecord {
        AccountRecord {
            id,
            name: self.name,
            auth_method: self.auth_method,
            rate_limit: self.rate_limit,
            network_policy: self.network_policy,
            permissions: self.permissions,
            plan: self.plan,
            active: self.active,
            shared_rate_limit: self.shared_rate_limit,
            created_at,
            updated_at,
        }
    }
}

// === functions ===

fn yes() -> bool {
    true
}
