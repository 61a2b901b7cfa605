//! The config file's shape as serde reads it: strings and numbers, every field optional, unknown
//! fields collected (in `unknown`) so that each is reported with its path. [`super::validate`] turns it into typed [`super::Settings`].

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::Deserialize;

/// Unknown fields of a section, collected so that every one is reported, not just the first.
pub(crate) type Unknown = BTreeMap<String, IgnoredAny>;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawProxy {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) listen: Option<String>,
    pub(crate) tls: Option<RawTls>,
    pub(crate) trusted_proxies: Option<Vec<String>>,
    pub(crate) max_body_bytes: Option<u64>,
    pub(crate) request_header_timeout: Option<String>,
    pub(crate) expose_account_api: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawTls {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) cert: String,
    pub(crate) key: String,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawAdmin {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) listen: Option<String>,
    pub(crate) master_key_env: Option<String>,
    pub(crate) tls: Option<RawTls>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawStore {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) backend: Option<String>,
    pub(crate) path: Option<String>,
    pub(crate) redis_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawCache {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) ttl: Option<String>,
    pub(crate) negative_ttl: Option<String>,
    pub(crate) max_entries: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawLimits {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) mode: Option<String>,
    pub(crate) on_store_error: Option<String>,
    pub(crate) default: Option<RawWindows>,
    pub(crate) headers: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawWindows {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) per_minute: Option<u32>,
    pub(crate) per_hour: Option<u32>,
    pub(crate) per_day: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawMetering {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) flush_interval: Option<String>,
    pub(crate) durability: Option<String>,
    pub(crate) wal_path: Option<String>,
    pub(crate) wal_sync_interval: Option<String>,
    pub(crate) retention: Option<RawRetention>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawRetention {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) minute: Option<String>,
    pub(crate) hour: Option<String>,
    pub(crate) day: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawIdentity {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) header_prefix: Option<String>,
    pub(crate) signing_secret_env: Option<String>,
    pub(crate) signed_ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawRoute {
    /// Fields this version does not know; each is reported by name.
    #[serde(flatten)]
    pub(crate) unknown: Unknown,
    pub(crate) name: Option<String>,
    pub(crate) path_prefix: Option<String>,
    pub(crate) host: Option<String>,
    pub(crate) upstreams: Option<Vec<String>>,
    pub(crate) auth: Option<String>,
    pub(crate) scopes: Option<BTreeMap<String, String>>,
    pub(crate) strip_prefix: Option<bool>,
    pub(crate) timeout: Option<String>,
    pub(crate) idle_timeout: Option<String>,
    pub(crate) cost: Option<i64>,
    pub(crate) shadow: Option<bool>,
    pub(crate) tls_ca: Option<String>,
    pub(crate) tls_client_cert: Option<String>,
    pub(crate) tls_client_key: Option<String>,
}
