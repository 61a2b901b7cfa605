//! `GET …/config`: the rules in force for the caller, side by side — `tenant` is the account,
//! `client` the calling key (its `allowed_ips`, `allowed_origins` and `scopes`). On the operator's
//! path there is no calling key, so every `client` is null; a key's null `scopes` means full
//! access, and the account's null `permissions` means any scope. `allowed_domains.tenant` is the
//! account's network policy; its sites are listed at `…/sites`. `rate_limit` is what is in
//! force for the account's keys that set no limits of their own: per window the account's value,
//! else the configured default, with a `source` naming which.

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
    rate_limit: LimitsInForce,
    network_policy: NetworkView,
    permissions: Layers<Option<Vec<String>>>,
}

/// `rate_limit` of the answer: each window's limit and where it comes from.
#[derive(Serialize)]
struct LimitsInForce {
    per_minute: Option<u32>,
    per_hour: Option<u32>,
    per_day: Option<u32>,
    source: Sources,
}

/// Per window, `account` (the account's own limit) or `default` (`limits.default`).
#[derive(Serialize)]
struct Sources {
    per_minute: &'static str,
    per_hour: &'static str,
    per_day: &'static str,
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
        rate_limit: LimitsInForce::of(account.rate_limit.as_ref(), &state.live().default_limits),
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

// === impl LimitsInForce ===

impl LimitsInForce {
    /// Per window, the account's limit, else the default.
    fn of(account: Option<&RateLimitSpec>, default: &RateLimitSpec) -> Self {
        let pick = |f: fn(&RateLimitSpec) -> Option<u32>| match account.and_then(f) {
            Some(n) => (Some(n), "account"),
            None => (f(default), "default"),
        };
        let (per_minute, minute) = pick(|s| s.per_minute);
        let (per_hour, hour) = pick(|s| s.per_hour);
        let (per_day, day) = pick(|s| s.per_day);
        LimitsInForce {
            per_minute,
            per_hour,
            per_day,
            source: Sources {
                per_minute: minute,
                per_hour: hour,
                per_day: day,
            },
        }
    }
}
