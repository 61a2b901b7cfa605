//! [`ApiError`]: every way an admin request can fail, each variant with its status and code
//! beside it, and the one place where they become `{"error":{"code","message"}}` responses.
//!
//! Converting to a response has no side effects. A corrupt record is logged where the
//! [`StoreError`] is converted, because only there is its detail still known; an unreachable
//! store carries its detail in the response's extensions ([`StoreFailure`]), where the admin
//! router's one middleware counts it and logs the outage once, not per request.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::store::StoreError;

/// Why an admin request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `invalid_request`: the body is not JSON of the expected shape. The message names the
    /// field (`rate_limit.per_minute: invalid type…`).
    #[error("{0}")]
    InvalidBody(String),
    /// 400 `invalid_request`: a well-typed field has a value that is not allowed.
    #[error("{field}: {reason}")]
    InvalidField {
        /// Path of the field, e.g. `allowed_origins[1]`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// 401 `missing_credential`: no credential in any of the three accepted headers.
    #[error("a credential is required: Authorization: Bearer, X-API-Key, or Basic")]
    MissingCredential,
    /// 401 `invalid_credential`: malformed, unknown, or not the master key.
    #[error("the credential is not valid")]
    InvalidCredential,
    /// 401 `invalid_credential`: a kind of credential that never reaches the admin API.
    #[error("{0} credentials cannot be used on the admin API")]
    WrongCredentialKind(&'static str),
    /// 401 `expired_credential`: the key's `expires_at` has passed.
    #[error("the credential has expired")]
    ExpiredCredential,
    /// 401 `inactive_credential`: the key or its account is deactivated.
    #[error("the credential is inactive")]
    InactiveCredential,
    /// 401 `auth_method_not_allowed`: the account does not accept this kind of credential (an
    /// API key of an `oauth` account, a token of an `api_key` one).
    #[error("the account does not accept this kind of credential")]
    AuthMethodNotAllowed,
    /// 403 `forbidden`: a valid credential on the wrong path form (the master key on
    /// `/v1/account/…`, an account key on `/v1/accounts` or its own `/v1/accounts/{id}/…`), or
    /// an account that accepts only OAuth. Another account's id is [`ApiError::NotFound`].
    #[error("{0}")]
    Forbidden(&'static str),
    /// 403 `scope_denied`: an account key without the scope the call needs (`account:read`,
    /// `account:write`), or asking for a key with scopes it does not hold itself.
    #[error("{0}")]
    ScopeDenied(&'static str),
    /// 404 `not_found`: no such path, account or key (or not one the caller may see).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// 405 `method_not_allowed`.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// 409 `name_taken`: the account already has a key with this name.
    #[error("the account already has a key named like this")]
    NameTaken,
    /// 409 `name_taken`: the account already has this site (origin).
    #[error("the account already has this site")]
    SiteTaken,
    /// 409 `already_exists`: the generated id collided with an existing record.
    #[error("a record with this id already exists; retry")]
    AlreadyExists,
    /// 409 `key_exists`: a key being imported has the hash of a key that exists (in any
    /// account): that raw key is already a credential here.
    #[error("a key with this hash already exists")]
    KeyExists,
    /// One entry of a batch (`keys[index]`) was refused with `error`, whose status and code
    /// the answer takes; nothing of the batch was done.
    #[error("keys[{index}]: {error}")]
    InEntry {
        /// The entry's position in `keys`, from 0.
        index: usize,
        /// Why it was refused.
        error: Box<ApiError>,
    },
    /// 400 `too_many_buckets`: a usage query over 200 000 buckets.
    #[error("the range holds {0} buckets; at most 200000 may be asked for at once")]
    TooManyBuckets(u64),
    /// 409 `plan_limit`: the account's plan allows no more of these.
    #[error("the account's plan allows at most {max} {what}")]
    PlanLimit {
        /// The plan's limit.
        max: u32,
        /// What is limited: `keys` or `sites`.
        what: &'static str,
    },
    /// 409 `last_credential`: the change would leave an `api_key` account without an active
    /// secret key.
    #[error("this is the account's last active secret key; create another one first")]
    LastCredential,
    /// 409 `protected_key`: the key is marked `protected`.
    #[error("the key is protected and cannot be deactivated")]
    ProtectedKey,
    /// 413 `body_too_large`.
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// 500 `internal_error`: a stored record could not be decoded.
    #[error("a stored record could not be read")]
    StoreCorrupt,
    /// 503 `store_unavailable`: the store could not be reached; nothing was changed. The detail
    /// is for the log, never the body.
    #[error("the store is unavailable; retry later")]
    StoreUnavailable(String),
    /// 503 `store_unavailable`: the request was not answered within its deadline (a hung
    /// store); unlike [`ApiError::StoreUnavailable`], a change it asked for (`changes`) may
    /// still be applied.
    #[error("{}", store_timeout_message(*deadline, *changes))]
    StoreTimeout {
        /// The deadline that passed.
        deadline: std::time::Duration,
        /// Whether the request asked for a change (any method but GET and HEAD, and not
        /// `/v1/verify`).
        changes: bool,
    },
    /// 500 `internal_error`: the request's handler failed (a bug), logged where it happened.
    #[error("the request failed inside the gateway")]
    Internal,
    /// 503 `usage_busy`, with `Retry-After: 1`: as many heavy usage reads as may run at once
    /// ([`super::MAX_HEAVY_USAGE_READS`]) kept running for longer than a read may wait.
    #[error("too many large usage reads are running; retry shortly, or ask for fewer buckets")]
    UsageBusy,
    /// 503 `store_unavailable`: another change to the account (on this or another instance)
    /// held its lock for longer than a change may wait.
    #[error("another change to this account is in progress; retry later")]
    AccountBusy,
}

/// [`ApiError::StoreTimeout`]'s message: a change may still be applied, a read changed nothing.
fn store_timeout_message(deadline: std::time::Duration, changes: bool) -> String {
    if changes {
        format!(
            "the store did not answer within {deadline:?}; the change this request asked for \
             may still be applied: read it back before retrying"
        )
    } else {
        format!("the store did not answer within {deadline:?}; retry later")
    }
}

/// Set on the response of a request that failed because the store could not be reached: the
/// store's own words, for the log.
#[derive(Debug, Clone)]
pub(crate) struct StoreFailure(pub(crate) String);

// === impl ApiError ===

impl ApiError {
    /// A field-level validation failure.
    pub(crate) fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::InvalidField {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The HTTP status and the contract's error code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidBody(_) | ApiError::InvalidField { .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            ApiError::TooManyBuckets(_) => (StatusCode::BAD_REQUEST, "too_many_buckets"),
            ApiError::MissingCredential => (StatusCode::UNAUTHORIZED, "missing_credential"),
            ApiError::InvalidCredential | ApiError::WrongCredentialKind(_) => {
                (StatusCode::UNAUTHORIZED, "invalid_credential")
            }
            ApiError::ExpiredCredential => (StatusCode::UNAUTHORIZED, "expired_credential"),
            ApiError::InactiveCredential => (StatusCode::UNAUTHORIZED, "inactive_credential"),
            ApiError::AuthMethodNotAllowed => (StatusCode::UNAUTHORIZED, "auth_method_not_allowed"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::ScopeDenied(_) => (StatusCode::FORBIDDEN, "scope_denied"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::NameTaken | ApiError::SiteTaken => (StatusCode::CONFLICT, "name_taken"),
            ApiError::AlreadyExists => (StatusCode::CONFLICT, "already_exists"),
            ApiError::KeyExists => (StatusCode::CONFLICT, "key_exists"),
            ApiError::InEntry { error, .. } => error.status_and_code(),
            ApiError::PlanLimit { .. } => (StatusCode::CONFLICT, "plan_limit"),
            ApiError::LastCredential => (StatusCode::CONFLICT, "last_credential"),
            ApiError::ProtectedKey => (StatusCode::CONFLICT, "protected_key"),
            ApiError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::StoreCorrupt | ApiError::Internal => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
            }
            ApiError::StoreUnavailable(_)
            | ApiError::StoreTimeout { .. }
            | ApiError::AccountBusy => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            ApiError::UsageBusy => (StatusCode::SERVICE_UNAVAILABLE, "usage_busy"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = json!({ "error": { "code": code, "message": self.to_string() } });
        let mut response = (status, Json(body)).into_response();
        match self {
            ApiError::StoreUnavailable(detail) => {
                response.extensions_mut().insert(StoreFailure(detail));
            }
            ApiError::StoreTimeout { deadline, .. } => {
                let detail = format!("no answer within {deadline:?}");
                response.extensions_mut().insert(StoreFailure(detail));
            }
            ApiError::UsageBusy => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken => ApiError::NameTaken,
            StoreError::AlreadyExists => ApiError::AlreadyExists,
            // A caller that cares which entry names it (import); for the rest, the conflict.
            StoreError::InBatch { error, .. } => ApiError::from(*error),
            // A record that vanished between our read and write: it is gone either way.
            StoreError::NotFound => ApiError::NotFound("record"),
            StoreError::Unavailable(detail) => ApiError::StoreUnavailable(detail),
            StoreError::Corrupt(detail) => {
                tracing::error!(error = %detail, "admin: corrupt record in store");
                ApiError::StoreCorrupt
            }
        }
    }
}
