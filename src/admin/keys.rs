//! An account's API keys, under `/v1/accounts/{account_id}/keys` (operator) and
//! `/v1/account/keys` (the account's own key); both forms reach these handlers through
//! [`AccountAccess`], which has already resolved and read the account. Renewing and rolling a
//! key are in [`super::rotation`], importing keys by hash in [`super::import`].
//!
//! Only `KeyHash::of(raw)` is stored; the raw key is in the create answer and nowhere else.
//! After every change the key's cache entry is dropped, so the proxy enforces the change on the
//! very next request. Rules checked here: the plan's `max_keys`, the account's `permissions`
//! (a key asking for full access on an account with `permissions` gets exactly those), the last
//! usable secret key of an `api_key` account, and `protected` keys (not deactivated; deleting
//! one is an explicit, permanent act the contract allows).
//!
//! `max_keys` counts the keys that can still authenticate ([`can_authenticate`]: active and not
//! expired, so neither a rolled key past its grace nor a deactivated one). Whatever makes a key
//! able to authenticate needs room, as a new key does: create, activate, renew of an expired
//! key, and roll ([`ensure_room`]); otherwise deactivate, create, activate would pass the limit.
//!
//! A PATCH is a JSON merge patch ([`Patch`]) over `name`, `scopes`, `allowed_origins`,
//! `allowed_ips`, `rate_limit`, `metadata` and `external_id` (`null` clears it), checked as
//! create checks them. New `scopes` must be within what the caller may grant; scopes the PATCH
//! does not name are left as they are.
//!
//! `external_id` is the key owner's id in the customer's own system (contract 5a): shown with the
//! key, forwarded upstream as `X-Tollgate-External-Id`, and `GET …/keys?external_id=X` lists only
//! the keys that carry exactly `X`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::audit::{self, Action, Change};
use super::auth::{path_param, AccountAccess};
use super::body::JsonBody;
use super::credits::{self, CreditsInput, CreditsPatch, CreditsView};
use super::error::ApiError;
use super::patch::Patch;
use super::{validate, AdminState};
use crate::credential::{self, KeyHash, Kind};
use crate::store::credits::Refill;
use crate::store::{AccountRecord, AuthMethod, KeyRecord, KeyType, RateLimitSpec, Records};

/// Longest key name.
pub(crate) const MAX_NAME_CHARS: usize = 100;

/// The fields PATCH may name.
const PATCHABLE: [&str; 8] = [
    "name",
    "scopes",
    "allowed_origins",
    "allowed_ips",
    "rate_limit",
    "metadata",
    "shadow",
    "external_id",
];

/// `POST …/keys` (and, with a `hash`, each key of `POST …/keys/import`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateKey {
    pub(super) name: String,
    #[serde(rename = "type", default = "secret")]
    pub(super) key_type: KeyType,
    #[serde(default)]
    pub(super) scopes: Option<Vec<String>>,
    #[serde(default)]
    pub(super) allowed_origins: Vec<String>,
    #[serde(default)]
    pub(super) allowed_ips: Vec<String>,
    #[serde(default)]
    pub(super) rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    pub(super) expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub(super) ttl: Option<String>,
    #[serde(default)]
    pub(super) metadata: Option<Value>,
    #[serde(default)]
    pub(super) protected: bool,
    #[serde(default)]
    pub(super) shadow: bool,
    #[serde(default)]
    pub(super) remaining: Option<i64>,
    #[serde(default)]
    pub(super) refill: Option<Refill>,
    #[serde(default)]
    pub(super) external_id: Option<String>,
}

/// What a new key's record holds of its credential: the hash, what lists show of the raw value,
/// and whether the key was imported.
pub(crate) struct KeyMaterial {
    hash: KeyHash,
    prefix: String,
    preview: String,
    imported: bool,
}

/// A key as the API shows it: everything but the hash.
#[derive(Debug, Serialize)]
pub(crate) struct KeyView {
    id: String,
    account_id: String,
    name: String,
    #[serde(rename = "type")]
    key_type: KeyType,
    prefix: String,
    preview: String,
    scopes: Option<Vec<String>>,
    allowed_origins: Vec<String>,
    allowed_ips: Vec<String>,
    rate_limit: Option<RateLimitSpec>,
    expires_at: Option<DateTime<Utc>>,
    active: bool,
    protected: bool,
    metadata: Value,
    shadow: bool,
    #[serde(flatten)]
    credits: CreditsView,
    /// `null` when unset.
    external_id: Option<String>,
    /// Brought in by hash (`…/keys/import`); its `prefix` and `preview` are empty.
    imported: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// The create answer: the metadata and, this once, the raw key.
#[derive(Serialize)]
pub(crate) struct CreatedKey {
    #[serde(flatten)]
    pub(crate) view: KeyView,
    pub(crate) key: String,
}

/// What a PATCH may change on a key, as the patch is applied to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFields {
    name: String,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    #[serde(default)]
    rate_limit: Option<RateLimitSpec>,
    #[serde(default = "empty_object")]
    metadata: Value,
    #[serde(default)]
    shadow: bool,
    external_id: Option<String>,
}

/// The query of `GET …/keys`; other parameters are ignored.
#[derive(Debug, Deserialize)]
pub(crate) struct ListParams {
    /// Only the keys whose `external_id` is exactly this.
    external_id: Option<String>,
}

/// `GET …/keys`, and a batch import's answer.
#[derive(Serialize)]
pub(crate) struct KeyList {
    pub(super) keys: Vec<KeyView>,
}

/// `DELETE …/keys/{key_id}`.
#[derive(Serialize)]
pub(crate) struct Deleted {
    deleted: bool,
}

/// The `{key_id}` of the path.
pub(crate) struct KeyId(pub(crate) String);

/// `POST …/keys` → 201 with the raw key.
pub(crate) async fn create(
    State(state): State<AdminState>,
    access: AccountAccess,
    JsonBody(req): JsonBody<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let raw = credential::generate(match req.key_type {
        KeyType::Secret => Kind::Secret,
        KeyType::Publishable => Kind::Publishable,
    });
    let grantable = grantable(
        access.account.permissions.as_deref(),
        access.caller_scopes.as_deref(),
    );
    let now = Utc::now();
    let credits = credits::checked(&CreditsInput {
        remaining: req.remaining,
        refill: req.refill,
    })?;
    let material = KeyMaterial::issued(&raw);
    let mut record = req.into_record(&access.account, grantable.as_deref(), material, now)?;
    if credits.is_some() {
        record.credit_pool = Some(record.id.clone());
    }
    {
        let _lock = state.lock_account(&access.account.id).await?;
        ensure_room(&*state.store, &access.account, None, now).await?;
        credits::start(&state, &record, credits).await?;
        state.store.create_key(&record).await?;
    }
    // A request with this credential may have been refused a moment ago and cached as unknown.
    state.cache.invalidate(&record.hash);
    let detail = json!({ "name": record.name, "type": record.key_type, "scopes": record.scopes });
    audit::record(
        &*state.store,
        access.audit_origin(),
        change(Action::CreateKey, &record.id, detail),
    )
    .await;
    let created = CreatedKey {
        view: credits::view(&state, record).await?,
        key: raw,
    };
    Ok((StatusCode::CREATED, Json(created)))
}

/// `GET …/keys[?external_id=X]`.
pub(crate) async fn list(
    State(state): State<AdminState>,
    access: AccountAccess,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<KeyList>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::InvalidBody(format!("query: {e}")))?;
    let keys = state.store.list_keys(&access.account.id).await?;
    let mut views = Vec::with_capacity(keys.len());
    for key in keys.into_iter().filter(|k| {
        params
            .external_id
            .as_ref()
            .is_none_or(|wanted| k.external_id.as_ref() == Some(wanted))
    }) {
        views.push(credits::view(&state, key).await?);
    }
    Ok(Json(KeyList { keys: views }))
}

/// `GET …/keys/{key_id}`.
pub(crate) async fn get(
    State(state): State<AdminState>,
    access: AccountAccess,
    KeyId(key_id): KeyId,
) -> Result<Json<KeyView>, ApiError> {
    let key = fetch(&*state.store, &access.account.id, &key_id).await?;
    Ok(Json(credits::view(&state, key).await?))
}

/// `PATCH …/keys/{key_id}` → the key as changed.
pub(crate) async fn update(
    State(state): State<AdminState>,
    access: AccountAccess,
    KeyId(key_id): KeyId,
    JsonBody(mut body): JsonBody<serde_json::Map<String, Value>>,
) -> Result<Json<KeyView>, ApiError> {
    let credit_fields = CreditsPatch::take(&mut body);
    let patch = Patch::new(body, &PATCHABLE, &["name"])?;
    let grantable = grantable(
        access.account.permissions.as_deref(),
        access.caller_scopes.as_deref(),
    );
    let (key, changed) = {
        let _lock = state.lock_account(&access.account.id).await?;
        let mut key = fetch(&*state.store, &access.account.id, &key_id).await?;
        let before = KeyFields::of(&key);
        let mut after = patch.apply(&before)?.validated(key.key_type)?;
        after.scopes = if patch.touches("scopes") {
            scopes_within(after.scopes, grantable.as_deref())?
        } else {
            before.scopes.clone()
        };
        let mut changed = after.changed_from(&before);
        let pool = key.credit_pool.clone();
        changed.extend(credits::patch(&state, &mut key, credit_fields).await?);
        if changed.is_empty() {
            return Ok(Json(credits::view(&state, key).await?));
        }
        // Only the credit counter changed: the record stays as it is (and is still audited).
        let counter_only =
            changed.iter().all(|c| ["remaining", "refill"].contains(c)) && pool == key.credit_pool;
        if !counter_only {
            after.write_to(&mut key);
            key.updated_at = Utc::now();
            state.store.update_key(&key).await?;
        }
        (key, changed)
    };
    state.cache.invalidate(&key.hash);
    let detail = json!({ "name": key.name, "changed": changed });
    audit::record(
        &*state.store,
        access.audit_origin(),
        change(Action::UpdateKey, &key.id, detail),
    )
    .await;
    Ok(Json(credits::view(&state, key).await?))
}

/// `POST …/keys/{key_id}/deactivate`.
pub(crate) async fn deactivate(
    State(state): State<AdminState>,
    access: AccountAccess,
    KeyId(key_id): KeyId,
) -> Result<Json<KeyView>, ApiError> {
    set_active(&state, &access, &key_id, false).await.map(Json)
}

/// `POST …/keys/{key_id}/activate`.
pub(crate) async fn activate(
    State(state): State<AdminState>,
    access: AccountAccess,
    KeyId(key_id): KeyId,
) -> Result<Json<KeyView>, ApiError> {
    set_active(&state, &access, &key_id, true).await.map(Json)
}

/// Switches a key on or off: a protected key, or the account's last usable secret key, is not
/// switched off, and one is not switched back on past the plan's `max_keys`. The change reaches
/// the proxy's cache before the answer, and is audited.
async fn set_active(
    state: &AdminState,
    access: &AccountAccess,
    key_id: &str,
    active: bool,
) -> Result<KeyView, ApiError> {
    let now = Utc::now();
    let key = {
        let _lock = state.lock_account(&access.account.id).await?;
        let mut key = fetch(&*state.store, &access.account.id, key_id).await?;
        if !active {
            if key.protected {
                return Err(ApiError::ProtectedKey);
            }
            ensure_not_last(&*state.store, &access.account, &key).await?;
        }
        let was_usable = can_authenticate(&key, now);
        key.active = active;
        if !was_usable && can_authenticate(&key, now) {
            ensure_room(&*state.store, &access.account, Some(&key.id), now).await?;
        }
        key.updated_at = now;
        state.store.update_key(&key).await?;
        key
    };
    state.cache.invalidate(&key.hash);
    let action = if active {
        Action::ActivateKey
    } else {
        Action::DeactivateKey
    };
    let detail = json!({ "name": key.name });
    audit::record(
        &*state.store,
        access.audit_origin(),
        change(action, &key.id, detail),
    )
    .await;
    credits::view(state, key).await
}

/// `DELETE …/keys/{key_id}` → `{"deleted":true}`.
pub(crate) async fn delete(
    State(state): State<AdminState>,
    access: AccountAccess,
    KeyId(key_id): KeyId,
) -> Result<Json<Deleted>, ApiError> {
    let key = {
        let _lock = state.lock_account(&access.account.id).await?;
        let key = fetch(&*state.store, &access.account.id, &key_id).await?;
        ensure_not_last(&*state.store, &access.account, &key).await?;
        state
            .store
            .delete_key(&access.account.id, &key.id)
            .await?
            .ok_or(ApiError::NotFound("key"))?
    };
    forget_credits(&state, &key).await?;
    state.cache.invalidate(&key.hash);
    let detail = json!({ "name": key.name });
    audit::record(
        &*state.store,
        access.audit_origin(),
        change(Action::DeleteKey, &key.id, detail),
    )
    .await;
    Ok(Json(Deleted::yes()))
}

/// Deletes a deleted key's credit counter unless another key of its account (its rolled
/// successor) spends from it.
async fn forget_credits(state: &AdminState, key: &KeyRecord) -> Result<(), ApiError> {
    let Some(pool) = &key.credit_pool else {
        return Ok(());
    };
    let shared = state
        .store
        .list_keys(&key.account_id)
        .await?
        .iter()
        .any(|k| k.credit_pool.as_ref() == Some(pool));
    if !shared {
        state.store.delete_credits(pool).await?;
    }
    Ok(())
}

// === impl CreateKey ===

impl CreateKey {
    /// Checks every field against the account and what the caller may grant, and builds the
    /// record of the credential `material`.
    pub(super) fn into_record(
        self,
        account: &AccountRecord,
        grantable: Option<&[String]>,
        material: KeyMaterial,
        now: DateTime<Utc>,
    ) -> Result<KeyRecord, ApiError> {
        let name = validate::name("name", &self.name, MAX_NAME_CHARS)?;
        let scopes = scopes_within(self.scopes, grantable)?;
        let allowed_origins = validate::origins("allowed_origins", &self.allowed_origins)?;
        if self.key_type == KeyType::Publishable && allowed_origins.is_empty() {
            return Err(ApiError::field(
                "allowed_origins",
                "is required for a publishable key",
            ));
        }
        let allowed_ips = validate::cidrs("allowed_ips", &self.allowed_ips)?;
        validate::rate_limit("rate_limit", self.rate_limit.as_ref())?;
        let (expires_at, lifetime_secs) =
            validate::expiry(self.expires_at, self.ttl.as_deref(), now)?;
        let metadata = match self.metadata {
            None => Value::Object(serde_json::Map::new()),
            Some(v @ Value::Object(_)) => v,
            Some(_) => return Err(ApiError::field("metadata", "must be a JSON object")),
        };
        let external_id = self
            .external_id
            .map(|id| validate::external_id("external_id", &id))
            .transpose()?;
        Ok(KeyRecord {
            id: credential::new_id("key"),
            account_id: account.id.clone(),
            name,
            key_type: self.key_type,
            hash: material.hash,
            prefix: material.prefix,
            preview: material.preview,
            scopes,
            allowed_origins,
            allowed_ips,
            rate_limit: self.rate_limit,
            expires_at,
            lifetime_secs,
            active: true,
            protected: self.protected,
            metadata,
            credit_pool: None,
            external_id,
            imported: material.imported,
            shadow: self.shadow,
            created_at: now,
            updated_at: now,
        })
    }
}

// === impl KeyMaterial ===

impl KeyMaterial {
    /// A credential made here: its hash, and its first 12 characters and preview for lists.
    pub(crate) fn issued(raw: &str) -> Self {
        KeyMaterial {
            hash: KeyHash::of(raw),
            prefix: credential::display_prefix(raw),
            preview: credential::preview(raw),
            imported: false,
        }
    }

    /// A key brought in by the hash of a raw value never seen here: its `prefix` and `preview`
    /// are empty strings (nothing of the raw value is known, and the hash is never shown).
    pub(crate) fn imported(hash: KeyHash) -> Self {
        KeyMaterial {
            hash,
            prefix: String::new(),
            preview: String::new(),
            imported: true,
        }
    }
}

// === impl KeyFields ===

impl KeyFields {
    fn of(key: &KeyRecord) -> Self {
        KeyFields {
            name: key.name.clone(),
            scopes: key.scopes.clone(),
            allowed_origins: key.allowed_origins.clone(),
            allowed_ips: key.allowed_ips.clone(),
            rate_limit: key.rate_limit,
            metadata: key.metadata.clone(),
            shadow: key.shadow,
            external_id: key.external_id.clone(),
        }
    }

    /// Checks every field but `scopes` (which depend on the caller) as create does.
    fn validated(self, key_type: KeyType) -> Result<Self, ApiError> {
        let name = validate::name("name", &self.name, MAX_NAME_CHARS)?;
        let allowed_origins = validate::origins("allowed_origins", &self.allowed_origins)?;
        if key_type == KeyType::Publishable && allowed_origins.is_empty() {
            return Err(ApiError::field(
                "allowed_origins",
                "a publishable key must keep at least one origin",
            ));
        }
        let allowed_ips = validate::cidrs("allowed_ips", &self.allowed_ips)?;
        validate::rate_limit("rate_limit", self.rate_limit.as_ref())?;
        if !self.metadata.is_object() {
            return Err(ApiError::field("metadata", "must be a JSON object"));
        }
        let external_id = self
            .external_id
            .map(|id| validate::external_id("external_id", &id))
            .transpose()?;
        Ok(KeyFields {
            name,
            allowed_origins,
            allowed_ips,
            rate_limit: self.rate_limit.filter(|r| *r != RateLimitSpec::default()),
            external_id,
            ..self
        })
    }

    /// Names of the fields that differ from `other`, in [`PATCHABLE`] order. Each name stands
    /// beside its own comparison, so no reordering can label one field with another's name.
    fn changed_from(&self, other: &KeyFields) -> Vec<&'static str> {
        let fields = [
            ("name", self.name != other.name),
            ("scopes", self.scopes != other.scopes),
            (
                "allowed_origins",
                self.allowed_origins != other.allowed_origins,
            ),
            ("allowed_ips", self.allowed_ips != other.allowed_ips),
            ("rate_limit", self.rate_limit != other.rate_limit),
            ("metadata", self.metadata != other.metadata),
            ("shadow", self.shadow != other.shadow),
            ("external_id", self.external_id != other.external_id),
        ];
        debug_assert!(fields.iter().map(|(n, _)| *n).eq(PATCHABLE));
        fields
            .into_iter()
            .filter_map(|(name, differs)| differs.then_some(name))
            .collect()
    }

    fn write_to(self, key: &mut KeyRecord) {
        key.name = self.name;
        key.scopes = self.scopes;
        key.allowed_origins = self.allowed_origins;
        key.allowed_ips = self.allowed_ips;
        key.rate_limit = self.rate_limit;
        key.metadata = self.metadata;
        key.shadow = self.shadow;
        key.external_id = self.external_id;
    }
}

// === impl Deleted ===

impl Deleted {
    /// `{"deleted":true}`.
    pub(crate) fn yes() -> Self {
        Deleted { deleted: true }
    }
}

// === impl KeyView ===

impl From<KeyRecord> for KeyView {
    fn from(k: KeyRecord) -> Self {
        KeyView {
            id: k.id,
            account_id: k.account_id,
            name: k.name,
            key_type: k.key_type,
            prefix: k.prefix,
            preview: k.preview,
            scopes: k.scopes,
            allowed_origins: k.allowed_origins,
            allowed_ips: k.allowed_ips,
            rate_limit: k.rate_limit,
            expires_at: k.expires_at,
            active: k.active,
            protected: k.protected,
            metadata: k.metadata,
            shadow: k.shadow,
            credits: CreditsView::default(),
            external_id: k.external_id,
            imported: k.imported,
            created_at: k.created_at,
            updated_at: k.updated_at,
        }
    }
}

impl KeyView {
    /// The view of `key` with its credits.
    pub(crate) fn with_credits(key: KeyRecord, credits: CreditsView) -> Self {
        KeyView {
            credits,
            ..KeyView::from(key)
        }
    }
}

// === impl KeyId ===

impl<S: Send + Sync> FromRequestParts<S> for KeyId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        path_param(parts, "key_id")
            .await?
            .map(KeyId)
            .ok_or(ApiError::NotFound("key"))
    }
}

// === functions ===

fn secret() -> KeyType {
    KeyType::Secret
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

pub(crate) fn change<'a>(action: Action, key_id: &'a str, detail: Value) -> Change<'a> {
    Change {
        action,
        target_id: key_id,
        detail,
    }
}

/// One key of the account; another account's key is as absent as an unknown one.
pub(crate) async fn fetch(
    store: &dyn Records,
    account_id: &str,
    key_id: &str,
) -> Result<KeyRecord, ApiError> {
    store
        .get_key(account_id, key_id)
        .await?
        .ok_or(ApiError::NotFound("key"))
}

/// The scopes a new key may receive: the account's permissions, narrowed to the caller's own
/// scopes when those are limited; `None` = anything.
pub(crate) fn grantable(
    permissions: Option<&[String]>,
    caller: Option<&[String]>,
) -> Option<Vec<String>> {
    match (permissions, caller) {
        (None, None) => None,
        (Some(only), None) | (None, Some(only)) => Some(only.to_vec()),
        (Some(p), Some(c)) => Some(p.iter().filter(|s| c.contains(s)).cloned().collect()),
    }
}

/// Requested scopes, each one grantable; `None` (full access) becomes everything grantable when
/// that is limited.
fn scopes_within(
    requested: Option<Vec<String>>,
    grantable: Option<&[String]>,
) -> Result<Option<Vec<String>>, ApiError> {
    let Some(requested) = requested else {
        return Ok(grantable.map(<[String]>::to_vec));
    };
    validate::scope_names("scopes", &requested)?;
    if let Some(grantable) = grantable {
        if let Some((i, s)) = requested
            .iter()
            .enumerate()
            .find(|(_, s)| !grantable.contains(s))
        {
            return Err(ApiError::field(
                format!("scopes[{i}]"),
                format!("{s:?} is not among the account's permissions or the caller's scopes"),
            ));
        }
    }
    Ok(Some(requested))
}

/// Whether the key can still authenticate at `now`: active and not expired. A rolled key's grace
/// ends at its expiry, so this covers it too. Only these keys count towards `max_keys`.
pub(crate) fn can_authenticate(key: &KeyRecord, now: DateTime<Utc>) -> bool {
    key.active && key.expires_at.is_none_or(|at| at > now)
}

/// Refuses one more key that can authenticate when the account already has `plan.max_keys` of
/// them, not counting `replacing` (the key a roll replaces, or the one being made usable).
pub(crate) async fn ensure_room(
    store: &dyn Records,
    account: &AccountRecord,
    replacing: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    ensure_room_for(store, account, replacing, 1, now).await
}

/// Refuses `adding` more keys that can authenticate unless all of them fit within
/// `plan.max_keys`, not counting `replacing`.
pub(crate) async fn ensure_room_for(
    store: &dyn Records,
    account: &AccountRecord,
    replacing: Option<&str>,
    adding: usize,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let Some(max) = account.plan.max_keys else {
        return Ok(());
    };
    let usable = store
        .list_keys(&account.id)
        .await?
        .iter()
        .filter(|k| Some(k.id.as_str()) != replacing && can_authenticate(k, now))
        .count();
    if usable.saturating_add(adding) > usize::try_from(max).unwrap_or(usize::MAX) {
        return Err(ApiError::PlanLimit { max, what: "keys" });
    }
    Ok(())
}

/// Refuses to remove the last usable secret key of an account that authenticates by API key.
async fn ensure_not_last(
    store: &dyn Records,
    account: &AccountRecord,
    key: &KeyRecord,
) -> Result<(), ApiError> {
    let now = Utc::now();
    let usable_secret = |k: &KeyRecord| k.key_type == KeyType::Secret && can_authenticate(k, now);
    if account.auth_method != AuthMethod::ApiKey || !usable_secret(key) {
        return Ok(());
    }
    let others = store
        .list_keys(&account.id)
        .await?
        .iter()
        .filter(|k| k.id != key.id && usable_secret(k))
        .count();
    if others == 0 {
        return Err(ApiError::LastCredential);
    }
    Ok(())
}
