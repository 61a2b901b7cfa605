//! An account's sites: `GET/POST …/sites`, `DELETE …/sites/{site_id}`.
//!
//! A site is an origin (`https://example.com`, stored normalised by
//! [`policy::normalize_origin`]) from which all the account's publishable keys may be used,
//! beside each key's own `allowed_origins`. The key cache merges them in when it reads a key, so
//! after each change the account's cached keys are dropped and the next request sees it. Rules:
//! an origin at most once per account (409 `name_taken`) and the plan's `max_sites` (409
//! `plan_limit`).

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::audit::{self, Action, Change};
use super::auth::{path_param, AccountAccess};
use super::body::JsonBody;
use super::error::ApiError;
use super::AdminState;
use crate::credential;
use crate::policy;
use crate::store::{SiteRecord, StoreError};

/// `POST …/sites`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateSite {
    name: String,
}

/// A site as the API shows it.
#[derive(Serialize)]
pub(crate) struct SiteView {
    id: String,
    name: String,
    created_at: DateTime<Utc>,
}

/// `GET …/sites`.
#[derive(Serialize)]
pub(crate) struct SiteList {
    sites: Vec<SiteView>,
}

/// The `{site_id}` of the path.
pub(crate) struct SiteId(String);

/// `GET …/sites`, oldest first.
pub(crate) async fn list(
    State(state): State<AdminState>,
    access: AccountAccess,
) -> Result<Json<SiteList>, ApiError> {
    let sites = state.store.list_sites(&access.account.id).await?;
    Ok(Json(SiteList {
        sites: sites.into_iter().map(SiteView::from).collect(),
    }))
}

/// `POST …/sites` → 201 site.
pub(crate) async fn create(
    State(state): State<AdminState>,
    access: AccountAccess,
    JsonBody(req): JsonBody<CreateSite>,
) -> Result<(StatusCode, Json<SiteView>), ApiError> {
    let name = policy::normalize_origin(&req.name).ok_or_else(|| {
        ApiError::field(
            "name",
            format!("{:?} is not an origin like https://example.com", req.name),
        )
    })?;
    let site = SiteRecord {
        id: credential::new_id("site"),
        account_id: access.account.id.clone(),
        name,
        created_at: Utc::now(),
    };
    {
        let _lock = state.lock_account(&access.account.id).await?;
        let held = state.store.list_sites(&access.account.id).await?;
        if held.iter().any(|s| s.name == site.name) {
            return Err(ApiError::SiteTaken);
        }
        if let Some(max) = access.account.plan.max_sites {
            if held.len() >= usize::try_from(max).unwrap_or(usize::MAX) {
                return Err(ApiError::PlanLimit { max, what: "sites" });
            }
        }
        state.store.create_site(&site).await.map_err(|e| match e {
            // Another process added the same origin since the check above.
            StoreError::AlreadyExists => ApiError::SiteTaken,
            other => ApiError::from(other),
        })?;
    }
    state.cache.invalidate_account(&access.account.id);
    audit::record(
        &*state.store,
        access.audit_origin(),
        change(Action::CreateSite, &site.id, &site.name),
    )
    .await;
    Ok((StatusCode::CREATED, Json(SiteView::from(site))))
}

/// `DELETE …/sites/{site_id}` → 204.
pub(crate) async fn delete(
    State(state): State<AdminState>,
    access: AccountAccess,
    SiteId(site_id): SiteId,
) -> Result<StatusCode, ApiError> {
    let site = {
        let _lock = state.lock_account(&access.account.id).await?;
        let site = state
            .store
            .list_sites(&access.account.id)
            .await?
            .into_iter()
            .find(|s| s.id == site_id)
            .ok_or(ApiError::NotFound("site"))?;
        if !state
            .store
            .delete_site(&access.account.id, &site.id)
            .await?
        {
            return Err(ApiError::NotFound("site"));
        }
        site
    };
    state.cache.invalidate_account(&access.account.id);
    audit::record(
        &*state.store,
        access.audit_origin(),
        change(Action::DeleteSite, &site.id, &site.name),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

// === impl SiteView ===

impl From<SiteRecord> for SiteView {
    fn from(s: SiteRecord) -> Self {
        SiteView {
            id: s.id,
            name: s.name,
            created_at: s.created_at,
        }
    }
}

// === impl SiteId ===

impl<S: Send + Sync> FromRequestParts<S> for SiteId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        path_param(parts, "site_id")
            .await?
            .map(SiteId)
            .ok_or(ApiError::NotFound("site"))
    }
}

// === functions ===

fn change<'a>(action: Action, site_id: &'a str, origin: &str) -> Change<'a> {
    Change {
        action,
        target_id: site_id,
        detail: json!({ "name": origin }),
    }
}
