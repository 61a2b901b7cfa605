//! `GET …/config`: the rules in force for the caller, side by side — `tenant` is the account,
//! `client` the calling key (its `allowed_ips`, `allowed_origins` and `scopes`). On the operator's
//! path there is no calling key, so every `client` is null; a key's null `scopes` means full
//! access, and the account's null `permissions` means any scope. `allowed_domains.tenant` is the
//! account's network policy; its sites are listed at `…/sites`.

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use super::auth::{AccountAccess, Actor};
use super::error::ApiError;
use super::AdminState;
use crate::store::{AuthMethod, KeyRecord, RateLimitSpec};

/// The answer.
#[derive(Serialize)]
pub(crate) struct ConfigView {
    auth_method: AuthMethod,
    rate_limit: Option<RateLimitSpec>,
    network_policy: NetworkView,
    permissions: Layers<Option<Vec<String>>>,
}

/// `network_policy` of the answer.
#[derive(Serialize)]
struct NetworkView {
    allowed_ips: Layers<Vec<String>>,
    allowed_domains: Layers<Vec<String>>,
}

/// One rule at both levels.
#[derive(Serialize)]
struct Layers<T> {
    tenant: T,
    client: Option<T>,
}

/// `GET …/config`.
pub(crate) async fn get(
    State(state): State<AdminState>,
    access: AccountAccess,
) -> Result<Json<ConfigView>, ApiError> {
    let key: Option<KeyRecord> = match &access.actor {
        Actor::Master => None,
        // Just authenticated with this key; gone only if deleted in the meantime.
        Actor::Key(id) => Some(
            state
                .store
                .get_key(&access.account.id, id)
                .await?
                .ok_or(ApiError::InvalidCredential)?,
        ),
    };
    let account = access.account;
    let policy = account.network_policy;
    Ok(Json(ConfigView {
        auth_method: account.auth_method,
        rate_limit: account.rate_limit,
        network_policy: NetworkView {
            allowed_ips: Layers {
                tenant: policy.allowed_ips,
                client: key.as_ref().map(|k| k.allowed_ips.clone()),
            },
            allowed_domains: Layers {
                tenant: policy.allowed_domains,
                client: key.as_ref().map(|k| k.allowed_origins.clone()),
            },
        },
        permissions: Layers {
            tenant: account.permissions,
            client: key.map(|k| k.scopes),
        },
    }))
}
