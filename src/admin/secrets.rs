//! An account's OAuth client secrets: `GET/POST …/secrets`, `DELETE …/secrets/{secret_id}`.
//!
//! A client secret (`tgcs_`) is what the client-credentials grant exchanges, with the account id
//! as `client_id`, for access tokens (`POST /oauth/token`). Like a key, only its hash is stored
//! and the raw value is answered once, at creation; lists show `prefix` and `preview`. Deleting a
//! secret revokes every token issued with it: the store removes them, and each is dropped from
//! every instance's key cache. Rule: the last client secret of an account whose `auth_method`
//! is `oauth` cannot be deleted (409 `last_credential`), or the account could not authenticate.

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use super::audit::{self, Action, Change};
use super::auth::{path_param, AccountAccess};
use super::error::ApiError;
use super::AdminState;
use crate::credential::{self, KeyHash, Kind};
use crate::store::{AuthMethod, SecretRecord};

/// A client secret as the API lists it.
#[derive(Serialize)]
pub(crate) struct SecretView {
    id: String,
    /// The OAuth `client_id`: the account id.
    client_id: String,
    prefix: String,
    preview: String,
    created_at: DateTime<Utc>,
}

/// `POST …/secrets`: the view and, this once, the raw secret.
#[derive(Serialize)]
pub(crate) struct CreatedSecret {
    #[serde(flatten)]
    view: SecretView,
    client_secret: String,
}

/// `GET …/secrets`.
#[derive(Serialize)]
pub(crate) struct SecretList {
    secrets: Vec<SecretView>,
}

/// The `{secret_id}` of the path.
pub(crate) struct SecretId(String);

/// `GET …/secrets`, oldest first.
pub(crate) async fn list(
    State(state): State<AdminState>,
    access: AccountAccess,
) -> Result<Json<SecretList>, ApiError> {
    let secrets = state.store.list_secrets(&access.account.id).await?;
    Ok(Json(SecretList {
        secrets: secrets.into_iter().map(SecretView::from).collect(),
    }))
}

/// `POST …/secrets` → 201 with the raw `client_secret`, shown only here. Takes no body.
pub(crate) async fn create(
    State(state): State<AdminState>,
    access: AccountAccess,
) -> Result<(StatusCode, Json<CreatedSecret>), ApiError> {
    let raw = credential::generate(Kind::ClientSecret);
    let secret = SecretRecord {
        id: credential::new_id("sec"),
        account_id: access.account.id.clone(),
        hash: KeyHash::of(&raw),
        prefix: credential::display_prefix(&raw),
        preview: credential::preview(&raw),
        created_at: Utc::now(),
    };
    state.store.create_secret(&secret).await?;
    audit::record(
        &*state.store,
        access.audit_origin(),
        change(Action::CreateSecret, &secret),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedSecret {
            view: SecretView::from(secret),
            client_secret: raw,
        }),
    ))
}

/// `DELETE …/secrets/{secret_id}` → 204; the tokens it issued stop working at once.
pub(crate) async fn delete(
    State(state): State<AdminState>,
    access: AccountAccess,
    SecretId(secret_id): SecretId,
) -> Result<StatusCode, ApiError> {
    let (secret, revoked) = {
        let _lock = state.lock_account(&access.account.id).await?;
        let held = state.store.list_secrets(&access.account.id).await?;
        if !held.iter().any(|s| s.id == secret_id) {
            return Err(ApiError::NotFound("secret"));
        }
        if access.account.auth_method == AuthMethod::Oauth && held.len() == 1 {
            return Err(ApiError::LastCredential);
        }
        state
            .store
            .delete_secret(&access.account.id, &secret_id)
            .await?
            .ok_or(ApiError::NotFound("secret"))?
    };
    for hash in &revoked {
        state.cache.invalidate(hash);
    }
    audit::record(
        &*state.store,
        access.audit_origin(),
        change(Action::DeleteSecret, &secret),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

// === impl SecretView ===

impl From<SecretRecord> for SecretView {
    fn from(s: SecretRecord) -> Self {
        SecretView {
            id: s.id,
            client_id: s.account_id,
            prefix: s.prefix,
            preview: s.preview,
            created_at: s.created_at,
        }
    }
}

// === impl SecretId ===

impl<S: Send + Sync> FromRequestParts<S> for SecretId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        path_param(parts, "secret_id")
            .await?
            .map(SecretId)
            .ok_or(ApiError::NotFound("secret"))
    }
}

// === functions ===

fn change(action: Action, secret: &SecretRecord) -> Change<'_> {
    Change {
        action,
        target_id: &secret.id,
        detail: json!({ "preview": secret.preview }),
    }
}
