//! What the benches set up before measuring: one account, secret keys in it, and a key cache
//! whose limits never refuse.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tollgate::auth::cache::KeyCache;
use tollgate::config::{CacheSettings, OnStoreError};
use tollgate::credential::{self, KeyHash};
use tollgate::limits::Limiters;
use tollgate::metering::Meter;
use tollgate::metrics::Metrics;
use tollgate::store::{AccountRecord, KeyRecord, KeyType, RateLimitSpec, SharedStore};

/// Limits high enough that no bench request is refused: every window is still checked.
const BIG: RateLimitSpec = RateLimitSpec {
    per_minute: Some(1_000_000_000),
    per_hour: Some(1_000_000_000),
    per_day: Some(1_000_000_000),
};

/// A cache over `store` with room for twice `keys`, an hour's TTL and [`BIG`] limits.
pub(crate) fn cache(
    store: &SharedStore,
    meter: &Arc<Meter>,
    metrics: &Arc<Metrics>,
    keys: usize,
) -> Arc<KeyCache> {
    Arc::new(KeyCache::new(
        Arc::clone(store),
        Arc::new(Limiters::new()),
        Arc::clone(meter),
        Arc::clone(metrics),
        CacheSettings {
            ttl: Duration::from_secs(3600),
            negative_ttl: Duration::from_secs(5),
            max_entries: keys * 2,
        },
        BIG,
        OnStoreError::FailOpen,
    ))
}

/// An active account with no limits of its own.
pub(crate) fn account(id: &str) -> AccountRecord {
    let now = Utc::now();
    AccountRecord {
        id: id.into(),
        name: "bench".into(),
        auth_method: Default::default(),
        rate_limit: None,
        network_policy: Default::default(),
        permissions: None,
        plan: Default::default(),
        active: true,
        shared_rate_limit: None,
        created_at: now,
        updated_at: now,
    }
}

/// The `i`th active secret key of `account_id`, for the raw credential `raw`.
pub(crate) fn secret_key(i: usize, account_id: &str, raw: &str) -> KeyRecord {
    let now = Utc::now();
    KeyRecord {
        id: format!("key_{i}"),
        account_id: account_id.to_owned(),
        name: format!("k{i}"),
        key_type: KeyType::Secret,
        hash: KeyHash::of(raw),
        prefix: credential::display_prefix(raw),
        preview: credential::preview(raw),
        scopes: None,
        allowed_origins: vec![],
        allowed_ips: vec![],
        rate_limit: None,
        expires_at: None,
        lifetime_secs: None,
        active: true,
        protected: false,
        metadata: serde_json::json!({}),
        credit_pool: None,
        external_id: None,
        imported: false,
        shadow: false,
        created_at: now,
        updated_at: now,
    }
}
