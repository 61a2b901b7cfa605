//! A key's credits through the admin API (contract 5a): `remaining` and `refill` at create and
//! by PATCH, shown with `last_refill_at` on every key, and `POST …/keys/{key_id}/credits`
//! (`{"set": N}` or `{"add": N}`). The balance lives in the store's credit counter, not in the
//! key record (whose `credit_pool` names the counter), so spending never rewrites the record
//! and never disturbs the key cache. A change is made to the counter first, then the key's cache
//! entry is dropped everywhere, so every instance's next request asks the store again.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::audit::{self, Action};
use super::auth::AccountAccess;
use super::body::JsonBody;
use super::error::ApiError;
use super::keys::{self, change, KeyId, KeyView};
use super::AdminState;
use crate::store::credits::{CreditChange, CreditState, Refill};
use crate::store::KeyRecord;

/// The largest balance, refill or single change: far beyond any plan, and far from overflow.
const MAX_CREDITS: i64 = 1_000_000_000_000;

/// `remaining`, `refill` and `last_refill_at` of a key view: all null for a key without credits.
#[derive(Debug, Default, Serialize)]
pub(crate) struct CreditsView {
    remaining: Option<i64>,
    refill: Option<Refill>,
    last_refill_at: Option<DateTime<Utc>>,
}

/// `remaining` and `refill` of a create body.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct CreditsInput {
    #[serde(default)]
    pub(crate) remaining: Option<i64>,
    #[serde(default)]
    pub(crate) refill: Option<Refill>,
}

/// The body of `POST …/keys/{key_id}/credits`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreditsRequest {
    #[serde(default)]
    set: Option<i64>,
    #[serde(default)]
    add: Option<i64>,
}

/// `POST …/keys/{key_id}/credits` → the key with its new credits.
pub(crate) async fn post(
    State(state): State<AdminState>,
    access: AccountAccess,
    KeyId(key_id): KeyId,
    JsonBody(req): JsonBody<CreditsRequest>,
) -> Result<Json<KeyView>, ApiError> {
    let change = match (req.set, req.add) {
        (Some(set), None) => CreditChange {
            set: Some(amount("set", set, 0)?),
            ..CreditChange::default()
        },
        (None, Some(add)) => CreditChange {
            add: Some(amount("add", add, -MAX_CREDITS)?),
            ..CreditChange::default()
        },
        _ => return Err(ApiError::field("set", "give exactly one of set and add")),
    };
    let key = {
        let _lock = state.lock_account(&access.account.id).await?;
        let mut key = keys::fetch(&*state.store, &access.account.id, &key_id).await?;
        if key.credit_pool.is_none() {
            if change.add.is_some() {
                return Err(ApiError::field(
                    "add",
                    "the key's credits are unlimited: set a balance first",
                ));
            }
            key.credit_pool = Some(key.id.clone());
            apply(&state, &key, change).await?;
            key.updated_at = Utc::now();
            state.store.update_key(&key).await?;
        } else {
            apply(&state, &key, change).await?;
        }
        key
    };
    state.cache.invalidate(&key.hash);
    let detail = json!({ "name": key.name, "credits": { "set": req.set, "add": req.add } });
    audit::record(
        &*state.store,
        access.audit_origin(),
        change_of(&key, detail),
    )
    .await;
    Ok(Json(view(&state, key).await?))
}

/// The key as the API shows it, with its credits read from the store.
pub(crate) async fn view(state: &AdminState, key: KeyRecord) -> Result<KeyView, ApiError> {
    let credits = match &key.credit_pool {
        None => CreditsView::default(),
        Some(pool) => {
            let now = state.clock.now_ms();
            match state.store.credit_state(pool, now).await? {
                Some(s) => CreditsView::from(s),
                // A pool without a counter grants nothing.
                None => CreditsView {
                    remaining: Some(0),
                    ..CreditsView::default()
                },
            }
        }
    };
    Ok(KeyView::with_credits(key, credits))
}

/// Checks a create body's credits: `Some` when the key is to have credits.
pub(crate) fn checked(input: &CreditsInput) -> Result<Option<CreditChange>, ApiError> {
    let refill = input.refill.map(refill_checked).transpose()?;
    let set = match (input.remaining, refill) {
        (Some(n), _) => amount("remaining", n, 0)?,
        (None, Some(r)) => r.amount,
        (None, None) => return Ok(None),
    };
    Ok(Some(CreditChange {
        set: Some(set),
        add: None,
        refill: Some(refill),
    }))
}

/// Starts the counter of a key being created with credits (before the key exists, so a key that
/// has a `credit_pool` always has a counter).
pub(crate) async fn start(
    state: &AdminState,
    key: &KeyRecord,
    change: Option<CreditChange>,
) -> Result<(), ApiError> {
    match change {
        Some(change) => apply(state, key, change).await,
        None => Ok(()),
    }
}

/// `remaining` and `refill` of a PATCH body, taken out of it (they are not record fields).
pub(crate) struct CreditsPatch {
    remaining: Option<Value>,
    refill: Option<Value>,
}

impl CreditsPatch {
    /// Takes the two fields out of `body`.
    pub(crate) fn take(body: &mut Map<String, Value>) -> Self {
        CreditsPatch {
            remaining: body.remove("remaining"),
            refill: body.remove("refill"),
        }
    }
}

/// Applies a PATCH's `remaining` and `refill` to `key` (whose record is then written by the
/// caller, with a changed `credit_pool`): `remaining: null` makes the key's credits unlimited,
/// a number sets the balance, `refill` sets or (null) removes the refill. Answers the names of
/// what changed.
pub(crate) async fn patch(
    state: &AdminState,
    key: &mut KeyRecord,
    fields: CreditsPatch,
) -> Result<Vec<&'static str>, ApiError> {
    let CreditsPatch { remaining, refill } = fields;
    if remaining.is_none() && refill.is_none() {
        return Ok(Vec::new());
    }
    if remaining
        .as_ref()
        .is_some_and(|v| !v.is_null() && !v.is_i64())
    {
        return Err(ApiError::field(
            "remaining",
            "must be a whole number or null",
        ));
    }
    if let Some(Value::Null) = remaining {
        if let Some(pool) = key.credit_pool.take() {
            if pool == key.id {
                state.store.delete_credits(&pool).await?;
            }
        }
        return Ok(vec!["remaining"]);
    }
    let refill: Option<Option<Refill>> = match refill {
        None => None,
        Some(Value::Null) => Some(None),
        Some(v) => Some(Some(refill_checked(
            serde_json::from_value::<Refill>(v)
                .map_err(|e| ApiError::field("refill", e.to_string()))?,
        )?)),
    };
    let set = match remaining.as_ref().and_then(Value::as_i64) {
        Some(n) => Some(amount("remaining", n, 0)?),
        // Credits start with a refill: at its amount.
        None if key.credit_pool.is_none() => refill.flatten().map(|r| r.amount),
        None => None,
    };
    if key.credit_pool.is_none() && set.is_none() {
        return Ok(Vec::new());
    }
    let pool = key
        .credit_pool
        .get_or_insert_with(|| key.id.clone())
        .clone();
    let now = state.clock.now_ms();
    state
        .store
        .change_credits(
            &pool,
            CreditChange {
                set,
                add: None,
                refill,
            },
            now,
        )
        .await?;
    let mut changed = Vec::new();
    if set.is_some() {
        changed.push("remaining");
    }
    if refill.is_some() {
        changed.push("refill");
    }
    Ok(changed)
}

async fn apply(state: &AdminState, key: &KeyRecord, change: CreditChange) -> Result<(), ApiError> {
    let pool = key.credit_pool.as_deref().unwrap_or(&key.id);
    state
        .store
        .change_credits(pool, change, state.clock.now_ms())
        .await?;
    Ok(())
}

fn change_of<'a>(key: &'a KeyRecord, detail: Value) -> audit::Change<'a> {
    change(Action::UpdateKey, &key.id, detail)
}

fn refill_checked(refill: Refill) -> Result<Refill, ApiError> {
    amount("refill.amount", refill.amount, 1)?;
    Ok(refill)
}

fn amount(field: &str, n: i64, min: i64) -> Result<i64, ApiError> {
    if (min..=MAX_CREDITS).contains(&n) {
        Ok(n)
    } else {
        Err(ApiError::field(
            field,
            format!("{n} is not a whole number from {min} to {MAX_CREDITS}"),
        ))
    }
}

// === impl CreditsView ===

impl From<CreditState> for CreditsView {
    fn from(s: CreditState) -> Self {
        CreditsView {
            remaining: Some(s.remaining),
            refill: s.refill,
            last_refill_at: s.last_refill_at,
        }
    }
}
