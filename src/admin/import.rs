//! `POST …/keys/import` (contract 5a): keys brought from another system by the SHA-256 of their
//! raw value, which tollgate never sees, so that they keep working when traffic moves here.
//!
//! The body is one key — `hash` (64 hex digits, any case) with the fields of `POST …/keys` — or
//! `{"keys":[…]}` with 1 to [`MAX_BATCH`] of them. Each key is checked exactly as create checks
//! it ([`CreateKey::into_record`] with [`KeyMaterial::imported`]); in a batch a failure names its
//! entry (`keys[3].scopes[0]`), and a hash or name (ignoring ASCII case) given twice is 400
//! naming the later entry. A batch is all or nothing: the plan's `max_keys` must have room for
//! every key, and the store writes them in one operation ([`Records::create_keys`]), so a hash
//! that any key already has (409 `key_exists`) or a name taken in the account (409
//! `name_taken`) leaves nothing created. The answer is 201 with the key, or `{"keys":[…]}`; it
//! has no raw `key`, there being none.
//!
//! An imported key is `imported: true`, with empty `prefix` and `preview`. It works on the proxy
//! at once in raw form, in any of the three credential forms: the import tells the key cache,
//! here and through the store on every instance, that the store now holds imported keys, so
//! a credential without tollgate's checksum is looked up from then on (and unknown hashes cached
//! before, one of which may be this key's, are forgotten). Each key leaves its own `create_key`
//! audit entry with `"imported": true`, written together; never the hash.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::audit::{self, Action};
use super::auth::AccountAccess;
use super::body::{self, JsonBody};
use super::credits::CreditsInput;
use super::error::ApiError;
use super::keys::{self, CreateKey, KeyList, KeyMaterial, KeyView};
use super::AdminState;
use crate::credential::KeyHash;
use crate::store::credits::{CreditChange, Refill};
use crate::store::{
    key_name_index, AccountRecord, KeyRecord, KeyType, RateLimitSpec, Records, StoreError,
};

/// Most keys one request imports.
pub(crate) const MAX_BATCH: usize = 1_000;

/// The largest import body: a full batch at about 1 KiB a key (a key with modest metadata is
/// ~400 bytes). Other admin bodies stay within [`super::MAX_BODY_BYTES`].
pub(crate) const MAX_IMPORT_BODY_BYTES: usize = 1024 * 1024;

/// One key to import: its hash, then exactly the fields of `POST …/keys`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportKey {
    hash: String,
    name: String,
    #[serde(rename = "type", default = "secret")]
    key_type: KeyType,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    allowed_origins: Vec<String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    #[serde(default)]
    rate_limit: Option<RateLimitSpec>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    protected: bool,
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    remaining: Option<i64>,
    #[serde(default)]
    refill: Option<Refill>,
    #[serde(default)]
    external_id: Option<String>,
}

/// What the body asked for: one key, or a batch (whose failures name their entry).
struct ImportBody {
    keys: Vec<ImportKey>,
    batch: bool,
}

/// The answer: the key, or `{"keys":[…]}` for a batch.
#[derive(Serialize)]
#[serde(untagged)]
pub(crate) enum Imported {
    One(Box<KeyView>),
    Batch(KeyList),
}

/// `POST …/keys/import` → 201 with the imported key(s).
pub(crate) async fn import(
    State(state): State<AdminState>,
    access: AccountAccess,
    JsonBody(body): JsonBody<Map<String, Value>, MAX_IMPORT_BODY_BYTES>,
) -> Result<(StatusCode, Json<Imported>), ApiError> {
    let wanted = ImportBody::read(body)?;
    let batch = wanted.batch;
    let grantable = keys::grantable(
        access.account.permissions.as_deref(),
        access.caller_scopes.as_deref(),
    );
    let now = Utc::now();
    let (records, credits): (Vec<KeyRecord>, Vec<Option<CreditChange>>) = wanted
        .into_records(&access.account, grantable.as_deref(), now)?
        .into_iter()
        .unzip();
    {
        let _lock = state.lock_account(&access.account.id).await?;
        keys::ensure_room_for(&*state.store, &access.account, None, records.len(), now).await?;
        // Counters first: a key with a credit pool always has one.
        for (record, change) in records.iter().zip(credits) {
            super::credits::start(&state, record, change).await?;
        }
        create(&*state.store, &records, batch).await?;
    }
    state.cache.imported_keys_added();
    let changes = records
        .iter()
        .map(|record| {
            let detail = json!({
                "name": record.name,
                "type": record.key_type,
                "scopes": record.scopes,
                "imported": true,
            });
            keys::change(Action::CreateKey, &record.id, detail)
        })
        .collect();
    audit::record_all(&*state.store, access.audit_origin(), changes).await;
    let mut views = Vec::with_capacity(records.len());
    for record in records {
        views.push(super::credits::view(&state, record).await?);
    }
    let answer = match (batch, views.len()) {
        (false, 1) => Imported::One(Box::new(views.remove(0))),
        _ => Imported::Batch(KeyList { keys: views }),
    };
    Ok((StatusCode::CREATED, Json(answer)))
}

// === impl ImportBody ===

impl ImportBody {
    /// One key, or `keys` (and nothing else) with 1 to [`MAX_BATCH`] of them.
    fn read(mut body: Map<String, Value>) -> Result<ImportBody, ApiError> {
        let Some(list) = body.remove("keys") else {
            let key = body::from_value(Value::Object(body), "")?;
            return Ok(ImportBody {
                keys: vec![key],
                batch: false,
            });
        };
        if let Some(other) = body.keys().next() {
            return Err(ApiError::field(
                other.as_str(),
                "unknown field: a batch has only `keys`",
            ));
        }
        let Value::Array(list) = list else {
            return Err(ApiError::field(
                "keys",
                "must be an array of keys to import",
            ));
        };
        if list.is_empty() || list.len() > MAX_BATCH {
            return Err(ApiError::field(
                "keys",
                format!("holds {} keys; a batch holds 1 to {MAX_BATCH}", list.len()),
            ));
        }
        let keys = list
            .into_iter()
            .enumerate()
            .map(|(i, entry)| body::from_value(entry, &format!("keys[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ImportBody { keys, batch: true })
    }

    /// Every key checked as create checks it, and no hash or name twice.
    fn into_records(
        self,
        account: &AccountRecord,
        grantable: Option<&[String]>,
        now: DateTime<Utc>,
    ) -> Result<Vec<(KeyRecord, Option<CreditChange>)>, ApiError> {
        let batch = self.batch;
        let records = self
            .keys
            .into_iter()
            .enumerate()
            .map(|(i, key)| {
                let record = key.into_record(account, grantable, now);
                if batch {
                    record.map_err(|e| in_entry(i, e))
                } else {
                    record
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        once_each(records.iter().map(|(r, _)| r))?;
        Ok(records)
    }
}

// === impl ImportKey ===

impl ImportKey {
    fn into_record(
        self,
        account: &AccountRecord,
        grantable: Option<&[String]>,
        now: DateTime<Utc>,
    ) -> Result<(KeyRecord, Option<CreditChange>), ApiError> {
        let hash = parse_hash(&self.hash)?;
        let credits = super::credits::checked(&CreditsInput {
            remaining: self.remaining,
            refill: self.refill,
        })?;
        let create = CreateKey {
            name: self.name,
            key_type: self.key_type,
            scopes: self.scopes,
            allowed_origins: self.allowed_origins,
            allowed_ips: self.allowed_ips,
            rate_limit: self.rate_limit,
            expires_at: self.expires_at,
            ttl: self.ttl,
            metadata: self.metadata,
            protected: self.protected,
            shadow: self.shadow,
            remaining: None,
            refill: None,
            external_id: self.external_id,
        };
        let mut record =
            create.into_record(account, grantable, KeyMaterial::imported(hash), now)?;
        if credits.is_some() {
            record.credit_pool = Some(record.id.clone());
        }
        Ok((record, credits))
    }
}

// === functions ===

fn secret() -> KeyType {
    KeyType::Secret
}

/// The hex SHA-256 of the raw key: 64 hex digits in either case, kept as the digest itself (the
/// store's own hex, where it writes one, is lowercase).
fn parse_hash(text: &str) -> Result<KeyHash, ApiError> {
    let hash = (text.len() == 64)
        .then(|| KeyHash::from_hex(text))
        .flatten();
    hash.ok_or_else(|| {
        ApiError::field(
            "hash",
            "must be the SHA-256 of the raw key as 64 hex digits",
        )
    })
}

/// Refuses a batch that gives a hash, or a name ignoring ASCII case (as the store compares
/// names), twice, naming the later entry.
fn once_each<'a>(records: impl ExactSizeIterator<Item = &'a KeyRecord>) -> Result<(), ApiError> {
    let mut hashes: HashMap<[u8; 32], usize> = HashMap::with_capacity(records.len());
    let mut names: HashMap<String, usize> = HashMap::with_capacity(records.len());
    for (i, record) in records.enumerate() {
        if let Some(first) = hashes.insert(record.hash.0, i) {
            return Err(ApiError::field(
                format!("keys[{i}].hash"),
                format!("the same hash as keys[{first}]"),
            ));
        }
        if let Some(first) = names.insert(key_name_index(&record.name), i) {
            return Err(ApiError::field(
                format!("keys[{i}].name"),
                format!("the same name as keys[{first}] (names are unique ignoring ASCII case)"),
            ));
        }
    }
    Ok(())
}

/// Writes the keys, all or none; a conflict names its entry in a batch.
async fn create(store: &dyn Records, records: &[KeyRecord], batch: bool) -> Result<(), ApiError> {
    match store.create_keys(records).await {
        Ok(()) => Ok(()),
        Err(StoreError::InBatch { index, error }) => {
            let refused = match *error {
                StoreError::AlreadyExists => ApiError::KeyExists,
                other => ApiError::from(other),
            };
            Err(if batch {
                ApiError::InEntry {
                    index,
                    error: Box::new(refused),
                }
            } else {
                refused
            })
        }
        Err(other) => Err(other.into()),
    }
}

/// A field error of entry `index`, named by its path in the batch (`keys[3].ttl`).
fn in_entry(index: usize, error: ApiError) -> ApiError {
    match error {
        ApiError::InvalidField { field, reason } => ApiError::InvalidField {
            field: format!("keys[{index}].{field}"),
            reason,
        },
        other => ApiError::InEntry {
            index,
            error: Box::new(other),
        },
    }
}
