//! Writing the audit entry that every change leaves behind.
//!
//! The entry is written after the change succeeded. If that write fails the change stands (and
//! the caller is told it succeeded, since retrying would repeat it); the failure is logged with
//! the entry so that it can be reconstructed.

use chrono::Utc;
use serde_json::Value;

use super::auth::Actor;
use crate::credential;
use crate::store::{AuditEntry, Store};

/// One change, as the audit log describes it.
pub(crate) struct Change<'a> {
    /// e.g. `key.create`.
    pub(crate) action: &'static str,
    /// e.g. `key`.
    pub(crate) target_type: &'static str,
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

/// Appends the entry for `change`.
pub(crate) async fn record(store: &dyn Store, origin: Origin<'_>, change: Change<'_>) {
    let entry = AuditEntry {
        id: credential::new_id("aud"),
        account_id: origin.account_id.map(str::to_owned),
        actor_id: origin.actor.id().to_owned(),
        action: change.action.to_owned(),
        target_type: change.target_type.to_owned(),
        target_id: change.target_id.to_owned(),
        detail: change.detail,
        ip: origin.ip.map(str::to_owned),
        created_at: Utc::now(),
    };
    if let Err(e) = store.append_audit(&entry).await {
        tracing::error!(error = %e, entry = ?entry, "admin: audit entry not written");
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
