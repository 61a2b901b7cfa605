//! Records the benches store before measuring: one account, and secret keys in it.

use chrono::Utc;
use tollgate::credential::{self, KeyHash};
use tollgate::store::{AccountRecord, KeyRecord, KeyType};

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
        remaining: None,
        external_id: None,
        imported: false,
        created_at: now,
        updated_at: now,
    }
}
