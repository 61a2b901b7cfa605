//! Who is calling, and which account they may act on.
//!
//! The caller presents a credential in one of the proxy's three forms
//! ([`crate::auth::extract::credential`]). The master key (`tgmk_`) is the operator; an account's
//! own secret key (`tgsk_`) is that account; every other kind is refused with 401. Keys are read
//! from the store, not the proxy's cache, so a key deactivated a moment ago cannot manage anything.
//!
//! Two extractors carry the decision to the handlers: [`Operator`] for `/v1/accounts` itself, and
//! [`AccountAccess`] for an account's resources under either `/v1/accounts/{account_id}/…`
//! (operator) or `/v1/account/…` (the account's own key, with `account:read` for GET and
//! `account:write` for everything else when its scopes are limited; 403 `scope_denied` without).
//!
//! An account never sees another account: an account key on `/v1/accounts/{id}…` with any id
//! but its own gets the operator's 404 for an unknown account, word for word and without a
//! store read, so it cannot tell which ids exist. On its own id it gets 403 `forbidden`,
//! pointing it to `/v1/account/…`.

use std::net::SocketAddr;

use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{ConnectInfo, FromRequestParts, RawPathParams};
use axum::http::request::Parts;

use super::error::ApiError;
use super::AdminState;
use crate::auth::{extract, CredentialState};
use crate::credential::{self, KeyHash, Kind};
use crate::policy;
use crate::refusal::Refusal;
use crate::store::{AccountRecord, KeyType};

/// Scope an account key needs for GET and HEAD on its own account.
pub(crate) const SCOPE_READ: &str = "account:read";
/// Scope an account key needs for every other method.
pub(crate) const SCOPE_WRITE: &str = "account:write";

/// Who made a change, as the audit log names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Actor {
    /// The operator.
    Master,
    /// An account's key, by id.
    Key(String),
}

/// A caller whose credential checked out.
enum Caller {
    Master,
    Account {
        key_id: String,
        scopes: Option<Vec<String>>,
        account: Box<AccountRecord>,
    },
}

/// The operator, proven by the master key.
pub(crate) struct Operator {
    /// The caller's address, for the audit log.
    pub(crate) ip: Option<String>,
}

/// The right to act on one account, which exists.
pub(crate) struct AccountAccess {
    /// Who is acting.
    pub(crate) actor: Actor,
    /// The account acted on, as read at the start of the request.
    pub(crate) account: AccountRecord,
    /// The caller's address, for the audit log.
    pub(crate) ip: Option<String>,
    /// The calling key's scopes when they are limited; `None` for the operator or a full key.
    /// Nobody may grant a new key more than they hold themselves.
    pub(crate) caller_scopes: Option<Vec<String>>,
}

// === impl Actor ===

impl Actor {
    /// `master` or the key id.
    pub(crate) fn id(&self) -> &str {
        match self {
            Actor::Master => "master",
            Actor::Key(id) => id,
        }
    }
}

// === impl Operator ===

impl FromRequestParts<AdminState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, ApiError> {
        match authenticate(parts, state).await? {
            Caller::Master => Ok(Operator {
                ip: client_ip(parts),
            }),
            Caller::Account { account, .. } => {
                let id = path_param(parts, "account_id").await?;
                Err(
                    not_another_account(id.as_deref(), &account.id).unwrap_or(ApiError::Forbidden(
                        "only the master key may manage accounts; an account key uses /v1/account",
                    )),
                )
            }
        }
    }
}

// === impl AccountAccess ===

impl FromRequestParts<AdminState> for AccountAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, ApiError> {
        let caller = authenticate(parts, state).await?;
        let ip = client_ip(parts);
        match (path_param(parts, "account_id").await?, caller) {
            (Some(account_id), Caller::Master) => {
                let account = state
                    .store
                    .get_account(&account_id)
                    .await?
                    .ok_or(ApiError::NotFound("account"))?;
                Ok(AccountAccess {
                    actor: Actor::Master,
                    account,
                    ip,
                    caller_scopes: None,
                })
            }
            (
                None,
                Caller::Account {
                    key_id,
                    scopes,
                    account,
                },
            ) => {
                let needed = if policy::is_read_method(&parts.method) {
                    SCOPE_READ
                } else {
                    SCOPE_WRITE
                };
                if !policy::has_scope(scopes.as_deref(), needed) {
                    return Err(ApiError::ScopeDenied(if needed == SCOPE_READ {
                        "this key lacks the account:read scope"
                    } else {
                        "this key lacks the account:write scope"
                    }));
                }
                Ok(AccountAccess {
                    actor: Actor::Key(key_id),
                    account: *account,
                    ip,
                    caller_scopes: scopes,
                })
            }
            (Some(account_id), Caller::Account { account, .. }) => Err(not_another_account(
                Some(&account_id),
                &account.id,
            )
            .unwrap_or(ApiError::Forbidden(
                "an account key manages its own account at /v1/account",
            ))),
            (None, Caller::Master) => Err(ApiError::Forbidden(
                "the master key manages an account at /v1/accounts/{account_id}",
            )),
        }
    }
}

// === functions ===

/// Checks the presented credential: the master key by constant-time hash comparison, an account
/// key by a store lookup and its state.
async fn authenticate(parts: &Parts, state: &AdminState) -> Result<Caller, ApiError> {
    let presented = extract::credential(&parts.headers).ok_or(ApiError::MissingCredential)?;
    let kind = credential::parse(&presented.raw).map_err(|_| ApiError::InvalidCredential)?;
    let hash = KeyHash::of(&presented.raw);
    match kind {
        Kind::Master => match &state.master {
            Some(master) if master.ct_eq(&hash) => Ok(Caller::Master),
            _ => Err(ApiError::InvalidCredential),
        },
        // An access token acts for its account like a secret key with the token's scopes.
        Kind::Secret | Kind::AccessToken => account_key(state, &hash).await,
        Kind::Publishable => Err(ApiError::WrongCredentialKind("publishable")),
        Kind::ClientSecret => Err(ApiError::WrongCredentialKind("client secret")),
    }
}

async fn account_key(state: &AdminState, hash: &KeyHash) -> Result<Caller, ApiError> {
    let found = crate::store::lookup_credential(&*state.store, hash)
        .await?
        .ok_or(ApiError::InvalidCredential)?;
    let (key, account, token) = (found.key, found.account, found.access_token);
    if key.key_type != KeyType::Secret {
        return Err(ApiError::WrongCredentialKind("publishable"));
    }
    // The proxy's own check, on the proxy's clock: one credential, one answer.
    let credential = CredentialState {
        key_active: key.active,
        account_active: account.active,
        expires_at_ms: key.expires_at.map(|t| t.timestamp_millis()),
        auth_method: account.auth_method,
        access_token: token,
    };
    credential_error(credential.check_on(&state.clock))?;
    Ok(Caller::Account {
        key_id: key.id,
        scopes: key.scopes,
        account: Box::new(account),
    })
}

/// The admin API's error for the proxy's state refusal of a calling credential.
pub(crate) fn credential_error(checked: Result<(), Refusal>) -> Result<(), ApiError> {
    checked.map_err(|refusal| match refusal {
        Refusal::ExpiredCredential => ApiError::ExpiredCredential,
        Refusal::AuthMethodNotAllowed => ApiError::AuthMethodNotAllowed,
        _ => ApiError::InactiveCredential,
    })
}

/// For an account key on the operator's form: another account's id (or one that does not exist)
/// is the 404 an unknown account gets, so that the answer says nothing about other accounts;
/// `None` on its own id or a path without one.
fn not_another_account(path_id: Option<&str>, own_id: &str) -> Option<ApiError> {
    path_id
        .filter(|id| *id != own_id)
        .map(|_| ApiError::NotFound("account"))
}

/// A named path parameter; `None` on routes that do not have it.
pub(crate) async fn path_param(parts: &mut Parts, name: &str) -> Result<Option<String>, ApiError> {
    match RawPathParams::from_request_parts(parts, &()).await {
        Ok(params) => Ok(params
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())),
        Err(RawPathParamsRejection::MissingPathParams(_)) => Ok(None),
        // Ids are ASCII; a parameter that is not UTF-8 names nothing that exists.
        Err(_) => Err(ApiError::NotFound("path")),
    }
}

/// The peer address, when the server was started with connect info.
fn client_ip(parts: &Parts) -> Option<String> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| policy::canonical(addr.ip()).to_string())
}
