//! A key's lifetime: `POST …/keys/{key_id}/renew` moves its expiry, `POST …/keys/{key_id}/roll`
//! replaces it with a new key that takes over its name and settings while the old one runs out
//! its grace.
//!
//! Renew: `expires_at` = now + `ttl`, the `ttl` defaulting to the lifetime the key was made with
//! (`lifetime_secs`); a `ttl` given becomes the key's lifetime for later renewals.
//!
//! Roll: the new key has the old one's type, scopes, origins, IPs, rate limit, metadata,
//! `external_id`, credits and `protected` flag, and its lifetime (expiring that long from now;
//! a key with an end date but no lifetime passes that date on). The new key takes the name; the
//! old one becomes `"{name} (rolled {8 chars of its id})"` (the name part shortened to stay within
//! 100 characters) and expires at the earlier of its own expiry and now + `grace` (default 24 h,
//! `"0s"` ends it at once). Dropping the old key's cache entry makes the proxy apply that expiry
//! on the next request. The new key is active even when the old one was deactivated (rolling is
//! how a suspect key is replaced). It hands out a raw key, so an account key may roll only keys
//! whose scopes it holds itself.
//!
//! Plan `max_keys` ([`keys::ensure_room`]): a roll replaces the old key, so the count leaves the
//! old key out and a roll is allowed at the limit. The old key still counts during its grace, so
//! a second roll before the grace ends, or a roll of a deactivated or expired key (which adds a
//! key that can authenticate), needs room like a new key. Renewing an expired key does too.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Duration, Utc};
use serde::Deserialize;
use serde_json::json;

use super::audit::{self, Action};
use super::auth::AccountAccess;
use super::body::JsonBody;
use super::error::ApiError;
use super::keys::{self, CreatedKey, KeyId, KeyView, MAX_NAME_CHARS};
use super::{validate, AdminState};
use crate::credential::{self, KeyHash, Kind};
use crate::store::{KeyRecord, KeyType};

/// Grace of a roll when the body gives none.
const DEFAULT_GRACE: Duration = Duration::hours(24);

/// `POST …/keys/{key_id}/renew`; the body may be empty.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RenewKey {
    #[serde(default)]
    ttl: Option<String>,
}

/// `POST …/keys/{key_id}/roll`; the body may be empty.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RollKey {
    #[serde(default)]
    grace: Option<String>,
}

/// `POST …/keys/{key_id}/renew` → the key with its new `expires_at`.
pub(crate) async fn renew(
    State(state): State<AdminState>,
    access: AccountAccess,
    KeyId(key_id): KeyId,
    JsonBody(req): JsonBody<RenewKey>,
) -> Result<Json<KeyView>, ApiError> {
    let now = Utc::now();
    let key = {
        let _lock = state.lock_account(&access.account.id).await?;
        let mut key = keys::fetch(&*state.store, &access.account.id, &key_id).await?;
        let was_usable = keys::can_authenticate(&key, now);
        let lifetime = match req.ttl.as_deref() {
            Some(ttl) => validate::expiry(None, Some(ttl), now)?.1,
            None => key.lifetime_secs,
        }
        .ok_or_else(|| {
            ApiError::field(
                "ttl",
                "is required: the key was made without a lifetime to renew it by",
            )
        })?;
        key.expires_at = Some(after(now, lifetime, "ttl")?);
        key.lifetime_secs = Some(lifetime);
        if !was_usable && keys::can_authenticate(&key, now) {
            keys::ensure_room(&*state.store, &access.account, Some(&key.id), now).await?;
        }
        key.updated_at = now;
        state.store.update_key(&key).await?;
        key
    };
    state.cache.invalidate(&key.hash);
    let detail = json!({
        "name": key.name,
        "expires_at": key.expires_at,
        "ttl_secs": key.lifetime_secs,
    });
    audit::record(
        &*state.store,
        access.audit_origin(),
        keys::change(Action::RenewKey, &key.id, detail),
    )
    .await;
    Ok(Json(super::credits::view(&state, key).await?))
}

/// `POST …/keys/{key_id}/roll` → 201 with the new key's metadata and raw value.
pub(crate) async fn roll(
    State(state): State<AdminState>,
    access: AccountAccess,
    KeyId(key_id): KeyId,
    JsonBody(req): JsonBody<RollKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let grace = grace(req.grace.as_deref())?;
    let now = Utc::now();
    let grace_end = now
        .checked_add_signed(grace)
        .ok_or_else(|| ApiError::field("grace", "is too long"))?;
    let (old, new, raw) = {
        let _lock = state.lock_account(&access.account.id).await?;
        let old = keys::fetch(&*state.store, &access.account.id, &key_id).await?;
        caller_holds(access.caller_scopes.as_deref(), old.scopes.as_deref())?;
        keys::ensure_room(&*state.store, &access.account, Some(&old.id), now).await?;
        let raw = credential::generate(match old.key_type {
            KeyType::Secret => Kind::Secret,
            KeyType::Publishable => Kind::Publishable,
        });
        let new = successor(&old, &raw, now)?;
        let retired = KeyRecord {
            name: rolled_name(&old.name, &old.id),
            expires_at: Some(old.expires_at.map_or(grace_end, |at| at.min(grace_end))),
            updated_at: now,
            ..old.clone()
        };
        // Rename first: the new key takes the name, which the store keeps unique.
        state.store.update_key(&retired).await?;
        if let Err(e) = state.store.create_key(&new).await {
            if let Err(undo) = state.store.update_key(&old).await {
                tracing::error!(
                    error = %undo,
                    key_id = %old.id,
                    "admin: a failed roll left the old key renamed"
                );
            }
            return Err(e.into());
        }
        (retired, new, raw)
    };
    state.cache.invalidate(&old.hash);
    state.cache.invalidate(&new.hash);
    let detail = json!({
        "name": new.name,
        "new_key_id": new.id,
        "grace_secs": grace.num_seconds(),
        "old_expires_at": old.expires_at,
    });
    audit::record(
        &*state.store,
        access.audit_origin(),
        keys::change(Action::RollKey, &old.id, detail),
    )
    .await;
    let created = CreatedKey {
        view: super::credits::view(&state, new).await?,
        key: raw,
    };
    Ok((StatusCode::CREATED, Json(created)))
}

// === functions ===

/// The key that replaces `old`, for the raw credential `raw`.
fn successor(old: &KeyRecord, raw: &str, now: DateTime<Utc>) -> Result<KeyRecord, ApiError> {
    let expires_at = match old.lifetime_secs {
        Some(secs) => Some(after(now, secs, "lifetime")?),
        None => old.expires_at,
    };
    Ok(KeyRecord {
        id: credential::new_id("key"),
        hash: KeyHash::of(raw),
        prefix: credential::display_prefix(raw),
        preview: credential::preview(raw),
        expires_at,
        active: true,
        imported: false,
        created_at: now,
        updated_at: now,
        ..old.clone()
    })
}

/// `"{name} (rolled {first 8 characters of the id after key_})"`, within the name limit.
fn rolled_name(name: &str, id: &str) -> String {
    let short: String = id
        .strip_prefix("key_")
        .unwrap_or(id)
        .chars()
        .take(8)
        .collect();
    let suffix = format!(" (rolled {short})");
    let room = MAX_NAME_CHARS.saturating_sub(suffix.chars().count());
    let base: String = name.chars().take(room).collect();
    format!("{}{suffix}", base.trim_end())
}

/// The `grace` of a roll: a duration such as `"24h"`; zero is allowed.
fn grace(text: Option<&str>) -> Result<Duration, ApiError> {
    let Some(text) = text else {
        return Ok(DEFAULT_GRACE);
    };
    let grace = humantime::parse_duration(text).map_err(|e| {
        ApiError::field(
            "grace",
            format!("{text:?} is not a duration like \"24h\" ({e})"),
        )
    })?;
    Duration::from_std(grace).map_err(|_| ApiError::field("grace", "is too long"))
}

/// `now` + `secs`, or a 400 naming `field` when that is past the calendar's end.
fn after(now: DateTime<Utc>, secs: u64, field: &str) -> Result<DateTime<Utc>, ApiError> {
    i64::try_from(secs)
        .ok()
        .and_then(Duration::try_seconds)
        .and_then(|d| now.checked_add_signed(d))
        .filter(|at| *at <= validate::latest_expiry())
        .ok_or_else(|| {
            ApiError::field(
                field,
                "is too long: the key must expire before the year 10000",
            )
        })
}

/// A caller with limited scopes may not obtain a raw key with scopes it does not hold.
fn caller_holds(caller: Option<&[String]>, key: Option<&[String]>) -> Result<(), ApiError> {
    let Some(caller) = caller else { return Ok(()) };
    match key {
        Some(scopes) if scopes.iter().all(|s| caller.contains(s)) => Ok(()),
        _ => Err(ApiError::ScopeDenied(
            "this key may not roll a key with scopes it does not hold itself",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolled_name_keeps_the_id_and_the_limit() {
        assert_eq!(
            rolled_name("web", "key_AbCdEfGhIjKl"),
            "web (rolled AbCdEfGh)"
        );
        let long = rolled_name(&"x".repeat(100), "key_AbCdEfGhIjKl");
        assert_eq!(long.chars().count(), 100);
        assert!(long.ends_with(" (rolled AbCdEfGh)"), "{long}");
    }

    #[test]
    fn grace_defaults_to_a_day_and_allows_zero() {
        assert_eq!(grace(None).ok(), Some(Duration::hours(24)));
        assert_eq!(grace(Some("0s")).ok(), Some(Duration::zero()));
        assert_eq!(grace(Some("2s")).ok(), Some(Duration::seconds(2)));
        assert!(grace(Some("soon")).is_err());
    }

    #[test]
    fn only_held_scopes_may_be_rolled() {
        let held = ["a".to_owned(), "b".to_owned()];
        assert!(caller_holds(None, None).is_ok());
        assert!(caller_holds(Some(&held), Some(&held[..1])).is_ok());
        assert!(caller_holds(Some(&held[..1]), Some(&held)).is_err());
        assert!(caller_holds(Some(&held), None).is_err());
    }
}
