//! The records the store keeps, as serde types. These are also the admin API's JSON shapes, minus
//! the fields marked `skip_serializing` there (the key hash is never sent to anyone).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::credential::KeyHash;

/// How an account's callers may authenticate on the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// API keys only.
    #[default]
    ApiKey,
    /// OAuth access tokens only.
    Oauth,
    /// Either.
    Any,
}

/// `secret` or `publishable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyType {
    /// Server-side key (`tgsk_`).
    Secret,
    /// Browser key (`tgpk_`): read-only methods from allowed origins.
    Publishable,
}

/// Per-window request limits; a missing window falls back to the next level (key → account →
/// config default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct RateLimitSpec {
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_minute: Option<u32>,
    /// Requests per hour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_hour: Option<u32>,
    /// Requests per day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_day: Option<u32>,
}

/// Where an account's callers may come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct NetworkPolicy {
    /// CIDRs (or single addresses); empty means any.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// Origins allowed for the account's publishable keys, beside each key's own.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
}

/// Plan limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, remote = "Self")]
pub struct Plan {
    /// Most keys the account may hold.
    #[serde(default)]
    pub max_keys: Option<u32>,
    /// Most sites the account may hold.
    #[serde(default)]
    pub max_sites: Option<u32>,
}

/// A tenant of the gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountRecord {
    /// `acc_…`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// How its callers authenticate.
    #[serde(default)]
    pub auth_method: AuthMethod,
    /// Default limits for its keys.
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// IP and origin policy.
    #[serde(default)]
    pub network_policy: NetworkPolicy,
    /// Scopes the account may grant to its keys; `None` = any.
    #[serde(default)]
    pub permissions: Option<Vec<String>>,
    /// Plan limits.
    #[serde(default)]
    pub plan: Plan,
    /// An inactive account's keys are all refused.
    #[serde(default = "yes")]
    pub active: bool,
    /// One set of buckets all its keys draw from together, on top of each key's own (5a).
    #[serde(default)]
    pub shared_rate_limit: Option<RateLimitSpec>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// An API key. Holds only the hash of the raw credential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// `key_…`.
    pub id: String,
    /// Owning account.
    pub account_id: String,
    /// Unique within the account.
    pub name: String,
    /// Secret or publishable.
    #[serde(rename = "type")]
    pub key_type: KeyType,
    /// SHA-256 of the raw key.
    pub hash: KeyHash,
    /// First 12 characters of the raw key.
    pub prefix: String,
    /// `tgsk_Ab3x…9fQ2`.
    pub preview: String,
    /// Granted scopes; `None` = full access.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Origins allowed for a publishable key.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// CIDRs the key may be used from; empty = any.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// Per-window override of the account's limits.
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// After this the key is refused with `expired_credential`.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The lifetime given at creation, in seconds: `renew` reuses it.
    #[serde(default)]
    pub lifetime_secs: Option<u64>,
    /// Deactivated keys are refused with `inactive_credential`.
    #[serde(default = "yes")]
    pub active: bool,
    /// A protected key cannot be deactivated.
    #[serde(default)]
    pub protected: bool,
    /// Free-form object, echoed back.
    #[serde(default = "empty_object")]
    pub metadata: serde_json::Value,
    /// The store's [`Credits`](crate::store::Credits) counter its requests spend from (contract
    /// 5a): its own id, or on a rolled key its predecessor's, so that both spend one balance
    /// during the grace; `None` = unlimited.
    #[serde(default)]
    pub credit_pool: Option<String>,
    /// The owner's id in the customer's own system (contract 5a).
    #[serde(default)]
    pub external_id: Option<String>,
    /// Brought in by hash from another system (contract 5a).
    #[serde(default)]
    pub imported: bool,
    /// Its limits are counted and their headers sent, but nothing is refused for them.
    #[serde(default)]
    pub shadow: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

/// An origin an account serves its publishable keys from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    /// `site_…`.
    pub id: String,
    /// Owning account.
    pub account_id: String,
    /// The origin, e.g. `https://example.com`.
    pub name: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// An OAuth client secret (`tgcs_`) of an account: its `client_id` is the account id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// `sec_…`.
    pub id: String,
    /// Owning account (the OAuth `client_id`).
    pub account_id: String,
    /// SHA-256 of the raw secret.
    pub hash: KeyHash,
    /// The first 12 characters.
    pub prefix: String,
    /// `tgcs_Ab3x…9fQ2`.
    pub preview: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// An access token (`tgat_`) issued with a client secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// SHA-256 of the raw token.
    pub hash: KeyHash,
    /// The account it acts for.
    pub account_id: String,
    /// The client secret it was issued with; deleting that secret revokes it.
    pub secret_id: String,
    /// Granted scopes; `None` for full access.
    pub scopes: Option<Vec<String>>,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// Issue time.
    pub created_at: DateTime<Utc>,
}

/// One change, for the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// `aud_…`, unique.
    pub id: String,
    /// The account the change concerns; `None` for operator-level entries.
    #[serde(default, skip_serializing)]
    pub account_id: Option<String>,
    /// Who did it: `master` or a key id.
    pub actor_id: String,
    /// e.g. `create_key` (`key.create` on entries written before the rename).
    pub action: String,
    /// e.g. `key`.
    pub target_type: String,
    /// The changed record's id.
    pub target_id: String,
    /// Free-form detail.
    pub detail: serde_json::Value,
    /// Client IP of the caller.
    pub ip: Option<String>,
    /// When.
    pub created_at: DateTime<Utc>,
    /// The `hash` of the entry before this one in its account's chain, or
    /// [`crate::store::audit_chain::GENESIS`]; set by the store on append, absent on entries
    /// written before chaining and on entries without an account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_hash: Option<String>,
    /// SHA-256 over `prev_hash` and this entry's fields ([`crate::store::audit_chain`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
}

/// A page of one account's audit entries, oldest first, for walking its chain
/// ([`crate::store::AuditLog::audit_chain_page`]).
#[derive(Debug, Default)]
pub struct AuditChainPage {
    /// Oldest first; an entry that does not decode is `Err` with its `id` if one could be read.
    pub entries: Vec<Result<AuditEntry, Option<String>>>,
    /// Where the next page starts; `None` when this page reached the newest entry.
    pub next: Option<u64>,
}

/// Filters for [`crate::store::AuditLog::list_audit`].
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Page size.
    pub limit: usize,
    /// Entries to skip.
    pub offset: usize,
    /// Entries whose action is one of these (an action's current and legacy names); empty =
    /// any action.
    pub actions: Vec<String>,
    /// Case-insensitive substring of action, target, actor or detail.
    pub search: Option<String>,
}

impl AuditQuery {
    /// Whether an entry with `action` passes the action filter.
    pub fn matches_action(&self, action: &str) -> bool {
        self.actions.is_empty() || self.actions.iter().any(|a| a == action)
    }
}

/// One page of audit entries.
#[derive(Debug, Clone, Default)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditEntry>,
    /// Entries matching the filters in all.
    pub total: usize,
}

/// What makes a key name unique within its account: the name with ASCII letters lowercased, so
/// that `SKB` and `skb` are one name. The record keeps the name as given. ASCII only, because the
/// Redis scripts fold names themselves with Lua's `string.lower`, which folds ASCII only; both
/// backends must agree on what is taken.
pub fn key_name_index(name: &str) -> String {
    name.to_ascii_lowercase()
}

/// The six counters of a usage bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UsageCounts {
    /// Requests identified to the key.
    pub requests: u64,
    /// Final status < 400.
    pub success: u64,
    /// Final status >= 400, gateway refusals included.
    pub error: u64,
    /// 429s.
    pub rate_limited: u64,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
}

/// One thing a key's usage counts: a finished request (by its final status) or the bytes of
/// its bodies. The metering cells and the usage write-ahead log both count through
/// [`UsageCounts::count`], so the two cannot disagree on what a status adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageEvent {
    /// A request identified to the key, with its final status code.
    Response {
        /// The status.
        status: u16,
    },
    /// Body bytes, counted when a body ends.
    Bytes {
        /// Request body bytes.
        bytes_in: u64,
        /// Response body bytes.
        bytes_out: u64,
    },
}

/// Counts to add to one key's one minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    /// The key (shared with the meter's cell: a batch of a million keys' counts allocates no
    /// string).
    pub key_id: Arc<str>,
    /// Its account (account totals derive from keys).
    pub account_id: Arc<str>,
    /// Minutes since the Unix epoch, UTC.
    pub minute: i64,
    /// What to add.
    pub counts: UsageCounts,
    /// The latest request among these counts, milliseconds since the epoch, within `minute`
    /// (the flusher takes both from one clock reading; the embedded store clamps it there). The
    /// store keeps the maximum it has seen per key.
    pub last_used_ms: i64,
}

/// Which usage batch a write is: its writer (one flusher, a random id) and its number in that
/// writer's sequence. A writer sends its batches one at a time and numbers them 1, 2, 3, …,
/// retrying a batch unchanged (same id) until the store takes it; so a store applies a batch only
/// if its number is above the last one it applied from that writer, and a retry of a batch that
/// was applied but whose answer was lost changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchId {
    /// The writer, random per flusher.
    pub writer: u64,
    /// 1 for the writer's first batch, then one more for each batch after it.
    pub seq: u64,
}

/// The stored bucket sizes. Weeks and months are sums of days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// 60 s buckets.
    Minute,
    /// 3 600 s buckets.
    Hour,
    /// 86 400 s buckets (UTC days).
    Day,
}

impl Granularity {
    /// All three, finest first.
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    /// Bucket length in seconds.
    pub const fn seconds(self) -> i64 {
        match self {
            Granularity::Minute => 60,
            Granularity::Hour => 3_600,
            Granularity::Day => 86_400,
        }
    }

    /// The bucket index (bucket start / length, since the epoch) that holds `minute`.
    pub const fn of_minute(self, minute: i64) -> i64 {
        minute.div_euclid(self.seconds() / 60)
    }
}

/// Implements `Serialize` and an objects-only `Deserialize` for a `#[serde(remote = "Self")]`
/// type: serde's derive would also accept a JSON array in place of the object, which is never
/// what a client meant.
macro_rules! object_only {
    ($ty:ident) => {
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                $ty::serialize(self, s)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visit;
                impl<'de> serde::de::Visitor<'de> for Visit {
                    type Value = $ty;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        map: A,
                    ) -> Result<$ty, A::Error> {
                        $ty::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    }
                }
                d.deserialize_map(Visit)
            }
        }
    };
}

object_only!(RateLimitSpec);
object_only!(NetworkPolicy);
object_only!(Plan);

fn yes() -> bool {
    true
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}

// === impl BatchId ===

impl BatchId {
    /// The first batch of a new writer, with a random writer id.
    pub fn first() -> Self {
        BatchId {
            writer: rand::random(),
            seq: 1,
        }
    }

    /// The writer's next batch.
    #[must_use]
    pub fn next(self) -> Self {
        BatchId {
            writer: self.writer,
            seq: self.seq + 1,
        }
    }
}

// === impl AuditEntry ===

impl AuditEntry {
    /// The entry as stores keep it: its API JSON plus the `account_id` that the API's
    /// serialization leaves out.
    pub fn stored_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        if let (Some(object), Some(account_id)) = (value.as_object_mut(), &self.account_id) {
            object.insert(
                "account_id".to_owned(),
                serde_json::Value::String(account_id.clone()),
            );
        }
        Ok(value)
    }

    /// Decodes a stored entry for a chain walk: an entry that does not decode is `Err` with its
    /// `id`, when the bytes are a JSON object with a string `id`.
    pub fn from_stored(bytes: &[u8]) -> Result<AuditEntry, Option<String>> {
        serde_json::from_slice(bytes).map_err(|_| {
            serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_owned))
        })
    }

    /// Case-insensitive substring match of `needle` (lowercase) over action, target, actor and
    /// detail: the audit log's `search`.
    pub fn matches(&self, needle: &str) -> bool {
        [
            self.action.as_str(),
            self.target_type.as_str(),
            self.target_id.as_str(),
            self.actor_id.as_str(),
        ]
        .iter()
        .any(|field| field.to_lowercase().contains(needle))
            || self.detail.to_string().to_lowercase().contains(needle)
    }
}

// === impl UsageCounts ===

impl UsageCounts {
    /// Adds one event: a response is a request, a success (< 400) or an error, and a 429 also
    /// a rate-limited one; bytes add to the byte counts.
    pub fn count(&mut self, event: UsageEvent) {
        match event {
            UsageEvent::Response { status } => {
                self.requests += 1;
                if status < 400 {
                    self.success += 1;
                } else {
                    self.error += 1;
                }
                if status == 429 {
                    self.rate_limited += 1;
                }
            }
            UsageEvent::Bytes {
                bytes_in,
                bytes_out,
            } => {
                self.bytes_in += bytes_in;
                self.bytes_out += bytes_out;
            }
        }
    }

    /// The six counts in their stored order: requests, success, error, rate limited, bytes
    /// in, bytes out.
    pub fn to_array(&self) -> [u64; 6] {
        [
            self.requests,
            self.success,
            self.error,
            self.rate_limited,
            self.bytes_in,
            self.bytes_out,
        ]
    }

    /// The counts from [`UsageCounts::to_array`]'s order.
    pub fn from_array(n: [u64; 6]) -> UsageCounts {
        let [requests, success, error, rate_limited, bytes_in, bytes_out] = n;
        UsageCounts {
            requests,
            success,
            error,
            rate_limited,
            bytes_in,
            bytes_out,
        }
    }

    /// Adds another set of counts into this one, saturating (a count never wraps).
    pub fn merge(&mut self, other: &UsageCounts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.success = self.success.saturating_add(other.success);
        self.error = self.error.saturating_add(other.error);
        self.rate_limited = self.rate_limited.saturating_add(other.rate_limited);
        self.bytes_in = self.bytes_in.saturating_add(other.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(other.bytes_out);
    }
}
