//! The audit log: writing the entry that every change leaves behind ([`record`]), reading an
//! account's entries at `GET …/audit` ([`list`]), and checking its hash chain at
//! `GET …/audit/verify` ([`verify`]; the chain itself is `store::audit_chain`).
//!
//! The entry is written after the change succeeded. If that write fails the change stands (and
//! the caller is told it succeeded, since retrying would repeat it); the failure is logged with
//! the entry so that it can be reconstructed. `detail` names what changed and never holds a raw
//! key or a hash.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::auth::{AccountAccess, Actor};
use super::error::ApiError;
use super::AdminState;
use crate::credential;
use crate::store::audit_chain::{ChainVerdict, ChainWalk, Step};
use crate::store::{self, AuditEntry, AuditQuery};

/// Page size when `limit` is not given.
const DEFAULT_LIMIT: usize = 50;
/// Largest page.
const MAX_LIMIT: usize = 100;
/// Entries read per store call while verifying: the walk holds one page at a time, whatever
/// the log's length.
const VERIFY_PAGE: usize = 256;

/// Every kind of change the audit log records. One enum, so that a handler cannot write an
/// action the log's readers do not know, and the action and its target type cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// `create_account` (before: `account.create`).
    CreateAccount,
    /// `update_account` (before: `account.update`).
    UpdateAccount,
    /// `delete_account` (before: `account.delete`).
    DeleteAccount,
    /// `create_key` (before: `key.create`).
    CreateKey,
    /// `update_key` (before: `key.update`).
    UpdateKey,
    /// `activate_key` (before: `key.activate`).
    ActivateKey,
    /// `deactivate_key` (before: `key.deactivate`).
    DeactivateKey,
    /// `delete_key` (before: `key.delete`).
    DeleteKey,
    /// `renew_key` (before: `key.renew`).
    RenewKey,
    /// `roll_key` (before: `key.roll`).
    RollKey,
    /// `create_site` (before: `site.create`).
    CreateSite,
    /// `delete_site` (before: `site.delete`).
    DeleteSite,
    /// `create_secret` (before: `secret.create`).
    CreateSecret,
    /// `delete_secret` (before: `secret.delete`).
    DeleteSecret,
}

/// One change, as the audit log describes it.
pub(crate) struct Change<'a> {
    /// What kind of change.
    pub(crate) action: Action,
    /// The changed record's id.
    pub(crate) target_id: &'a str,
    /// What changed, for people reading the log.
    pub(crate) detail: Value,
}

/// Who did it, from where, to which account.
pub(crate) struct Origin<'a> {
    /// `master` or a key.
    pub(crate) actor: &'a Actor,
    /// The caller's address.
    pub(crate) ip: Option<&'a str>,
    /// The account concerned.
    pub(crate) account_id: Option<&'a str>,
}

// === impl Action ===

impl Action {
    /// Every action, for lookups by name.
    pub(crate) const ALL: [Action; 14] = [
        Action::CreateAccount,
        Action::UpdateAccount,
        Action::DeleteAccount,
        Action::CreateKey,
        Action::UpdateKey,
        Action::ActivateKey,
        Action::DeactivateKey,
        Action::DeleteKey,
        Action::RenewKey,
        Action::RollKey,
        Action::CreateSite,
        Action::DeleteSite,
        Action::CreateSecret,
        Action::DeleteSecret,
    ];

    /// The action as stored and listed (`create_key`, …), the names the systems tollgate
    /// replaces use. No `_` arm: a new action must be named.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::CreateAccount => "create_account",
            Action::UpdateAccount => "update_account",
            Action::DeleteAccount => "delete_account",
            Action::CreateKey => "create_key",
            Action::UpdateKey => "update_key",
            Action::ActivateKey => "activate_key",
            Action::DeactivateKey => "deactivate_key",
            Action::DeleteKey => "delete_key",
            Action::RenewKey => "renew_key",
            Action::RollKey => "roll_key",
            Action::CreateSite => "create_site",
            Action::DeleteSite => "delete_site",
            Action::CreateSecret => "create_secret",
            Action::DeleteSecret => "delete_secret",
        }
    }

    /// The name entries written before the rename carry (`key.create`, …): they keep it, since
    /// each entry's chain hash covers its action, and the filter finds them by either name.
    pub(crate) fn legacy_name(self) -> String {
        let (verb, target) = self.as_str().split_once('_').unwrap_or((self.as_str(), ""));
        format!("{target}.{verb}")
    }

    /// The action called `name`, by its name or its legacy name.
    pub(crate) fn parse(name: &str) -> Option<Action> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == name || a.legacy_name() == name)
    }

    /// The kind of record it changes: `account`, `key`, `site` or `secret`.
    pub(crate) fn target_type(self) -> &'static str {
        match self {
            Action::CreateAccount | Action::UpdateAccount | Action::DeleteAccount => "account",
            Action::CreateKey
            | Action::UpdateKey
            | Action::ActivateKey
            | Action::DeactivateKey
            | Action::DeleteKey
            | Action::RenewKey
            | Action::RollKey => "key",
            Action::CreateSite | Action::DeleteSite => "site",
            Action::CreateSecret | Action::DeleteSecret => "secret",
        }
    }
}

/// The query of `GET …/audit`, as text so that a bad value is refused naming its parameter.
#[derive(Debug, Deserialize)]
pub(crate) struct AuditParams {
    limit: Option<String>,
    offset: Option<String>,
    action: Option<String>,
    search: Option<String>,
}

/// The answer of `GET …/audit`.
#[derive(Serialize)]
pub(crate) struct AuditLog {
    logs: Vec<AuditEntry>,
    total: usize,
    limit: usize,
    offset: usize,
}

/// `GET …/audit?limit=&offset=&action=&search=`: the account's entries, newest first.
pub(crate) async fn list(
    State(state): State<AdminState>,
    access: AccountAccess,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<AuditLog>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::InvalidBody(format!("query: {e}")))?;
    let query = params.into_query()?;
    let page = state
        .store
        .list_audit(Some(&access.account.id), &query)
        .await?;
    Ok(Json(AuditLog {
        logs: page.entries,
        total: page.total,
        limit: query.limit,
        offset: query.offset,
    }))
}

/// `GET …/audit/verify`: walks the account's chain oldest first, in pages, up to the head read
/// at the start, and answers whether every link fits and, if not, the first that does not.
pub(crate) async fn verify(
    State(state): State<AdminState>,
    access: AccountAccess,
) -> Result<Json<ChainVerdict>, ApiError> {
    let account_id = &access.account.id;
    let mut walk = ChainWalk::new(state.store.audit_head(account_id).await?);
    let mut after = None;
    'pages: loop {
        let page = state
            .store
            .audit_chain_page(account_id, after, VERIFY_PAGE)
            .await?;
        for entry in &page.entries {
            let entry = entry.as_ref().map_err(Option::as_deref);
            if walk.check(entry) == Step::Done {
                break 'pages;
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    Ok(Json(walk.finish()))
}

/// Appends the entry for `change`.
pub(crate) async fn record(store: &dyn store::AuditLog, origin: Origin<'_>, change: Change<'_>) {
    let entry = entry(&origin, change);
    if let Err(e) = store.append_audit(&entry).await {
        tracing::error!(error = %e, entry = ?entry, "admin: audit entry not written");
    }
}

/// Appends the entries for `changes`, in order, made by one request (an import of many keys):
/// the store may write them together ([`store::AuditLog::append_audits`]).
pub(crate) async fn record_all(
    store: &dyn store::AuditLog,
    origin: Origin<'_>,
    changes: Vec<Change<'_>>,
) {
    let entries: Vec<AuditEntry> = changes
        .into_iter()
        .map(|change| entry(&origin, change))
        .collect();
    if let Err(e) = store.append_audits(&entries).await {
        tracing::error!(
            error = %e,
            entries = entries.len(),
            first = ?entries.first(),
            "admin: audit entries not written (some may have been)"
        );
    }
}

fn entry(origin: &Origin<'_>, change: Change<'_>) -> AuditEntry {
    AuditEntry {
        id: credential::new_id("aud"),
        account_id: origin.account_id.map(str::to_owned),
        actor_id: origin.actor.id().to_owned(),
        action: change.action.as_str().to_owned(),
        target_type: change.action.target_type().to_owned(),
        target_id: change.target_id.to_owned(),
        detail: change.detail,
        ip: origin.ip.map(str::to_owned),
        created_at: Utc::now(),
        prev_hash: None,
        hash: None,
    }
}

// === impl AuditParams ===

impl AuditParams {
    fn into_query(self) -> Result<AuditQuery, ApiError> {
        let limit = match self.limit.as_deref() {
            None => DEFAULT_LIMIT,
            Some(text) => text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::field(
                        "limit",
                        format!("{text:?} is not a whole number from 1 to {MAX_LIMIT}"),
                    )
                })?,
        };
        let offset = match self.offset.as_deref() {
            None => 0,
            Some(text) => text.trim().parse::<usize>().map_err(|_| {
                ApiError::field(
                    "offset",
                    format!("{text:?} is not a whole number, 0 or more"),
                )
            })?,
        };
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        let actions = match non_empty(self.action) {
            None => Vec::new(),
            Some(name) => {
                let action = Action::parse(&name).ok_or_else(|| {
                    ApiError::field(
                        "action",
                        format!(
                            "{name:?} is not an audit action; one of: {}",
                            Action::ALL.map(Action::as_str).join(", ")
                        ),
                    )
                })?;
                vec![action.as_str().to_owned(), action.legacy_name()]
            }
        };
        Ok(AuditQuery {
            limit,
            offset,
            actions,
            search: non_empty(self.search),
        })
    }
}

// === impl AccountAccess ===

impl super::auth::AccountAccess {
    /// The audit origin of a change made through this access.
    pub(crate) fn audit_origin(&self) -> Origin<'_> {
        Origin {
            actor: &self.actor,
            ip: self.ip.as_deref(),
            account_id: Some(&self.account.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Action;

    #[test]
    fn every_action_has_its_own_name_and_is_found_by_both() {
        let mut names: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
        for a in Action::ALL {
            let (verb, target) = a.as_str().split_once('_').expect("verb_target");
            assert_eq!(target, a.target_type(), "{a:?}");
            assert!(!verb.is_empty(), "{a:?}");
            assert_eq!(a.legacy_name(), format!("{target}.{verb}"));
            assert_eq!(Action::parse(a.as_str()), Some(a));
            assert_eq!(Action::parse(&a.legacy_name()), Some(a));
        }
        assert_eq!(Action::parse("key.creat"), None);
        assert_eq!(Action::parse("create_keys"), None);
        names.sort_unstable();
        names.dedup();
        assert_eq!(
            names.len(),
            Action::ALL.len(),
            "every action has its own name"
        );
    }
}
