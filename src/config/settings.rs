//! Typed, validated settings: what the rest of tollgate reads. Nothing here is parsed again after
//! start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use ipnet::IpNet;

use crate::store::RateLimitSpec;
pub use crate::store::StoreSettings;
use crate::tls::TlsFiles;

/// Everything the config file says, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The proxy listener.
    pub proxy: ProxySettings,
    /// The admin listener.
    pub admin: AdminSettings,
    /// Where records live.
    pub store: StoreSettings,
    /// The key cache.
    pub cache: CacheSettings,
    /// Rate limits.
    pub limits: LimitSettings,
    /// Usage metering.
    pub metering: MeteringSettings,
    /// Identity headers sent upstream.
    pub identity: IdentitySettings,
    /// Routes, in file order.
    pub routes: Vec<RouteSettings>,
}

/// `[proxy]`.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Address to bind.
    pub listen: SocketAddr,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Largest request body accepted, chunked bodies included.
    pub max_body_bytes: u64,
    /// How long a client may take to send its request head.
    pub request_header_timeout: Duration,
    /// Also serve `/v1/account/*` on the proxy listener.
    pub expose_account_api: bool,
    /// Serve TLS with this certificate and key instead of cleartext.
    pub tls: Option<TlsFiles>,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Address to bind.
    pub listen: SocketAddr,
    /// The environment variable that may hold the raw master key.
    pub master_key_env: String,
    /// Serve TLS with this certificate and key instead of cleartext.
    pub tls: Option<TlsFiles>,
}

/// `[cache]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// A cached key is re-read after this.
    pub ttl: Duration,
    /// An unknown credential is remembered as unknown for this long.
    pub negative_ttl: Duration,
    /// Most entries held.
    pub max_entries: usize,
}

/// `limits.default` when the config file does not set it: the one place these numbers live.
pub const DEFAULT_RATE_LIMIT: RateLimitSpec = RateLimitSpec {
    per_minute: Some(60),
    per_hour: Some(1_000),
    per_day: Some(10_000),
};

/// `[limits]`.
#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    /// Per-instance or fleet-wide.
    pub mode: LimitMode,
    /// What to do when a key cannot be verified because the store is down.
    pub on_store_error: OnStoreError,
    /// Limits for keys and accounts that set none.
    pub default: RateLimitSpec,
    /// The limit-header styles sent (`limits.headers`).
    pub headers: LimitHeaders,
}

/// `limits.headers`: which styles of limit headers a keyed response carries (contract §4).
/// Operators choose, as with Envoy's `enable_x_ratelimit_headers` or Kong's
/// `hide_client_headers`; all three by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitHeaders {
    /// `ietf`: `RateLimit-Policy` and `RateLimit` (structured fields).
    pub ietf: bool,
    /// `legacy`: `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`.
    pub legacy: bool,
    /// `per_window`: `X-RateLimit-Limit-Minute|Hour|Day`, `X-RateLimit-Remaining-…`.
    pub per_window: bool,
}

impl LimitHeaders {
    /// Every style: the default.
    pub const ALL: LimitHeaders = LimitHeaders {
        ietf: true,
        legacy: true,
        per_window: true,
    };
    /// No limit headers (`headers = []`).
    pub const NONE: LimitHeaders = LimitHeaders {
        ietf: false,
        legacy: false,
        per_window: false,
    };
}

/// `limits.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMode {
    /// Each instance counts alone.
    Local,
    /// All instances draw from shared counters in Redis.
    Global,
}

/// `limits.on_store_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Serve what can be served from cache; refuse only what cannot be verified.
    FailOpen,
    /// Answer 503 `store_unavailable` for anything not verifiable.
    FailClosed,
}

/// `[metering]`.
#[derive(Debug, Clone)]
pub struct MeteringSettings {
    /// How often counters are written to the store.
    pub flush_interval: Duration,
    /// What a crash may lose.
    pub durability: Durability,
    /// How long minute buckets are kept.
    pub retention_minute: Duration,
    /// How long hour buckets are kept.
    pub retention_hour: Duration,
    /// How long day buckets are kept.
    pub retention_day: Duration,
}

/// `metering.durability`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    /// Counts live in memory until the next flush: a crash loses up to `flush_interval`.
    Interval,
    /// Every event goes to a write-ahead log on disk within `sync_interval` (group commit); a
    /// crash loses at most that much.
    Wal {
        /// The log's directory (local to this instance).
        path: PathBuf,
        /// How often buffered events are written and `fdatasync`ed.
        sync_interval: Duration,
    },
}

/// `[identity]`.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// Prefix of the identity headers, `X-Tollgate-` by default.
    pub header_prefix: String,
    /// With `signing_secret_env`: every forwarded request of a key carries a signed identity.
    pub signing: Option<IdentitySigning>,
}

/// How the `X-Tollgate-Identity` header is signed (JWS HS256).
#[derive(Clone)]
pub struct IdentitySigning {
    /// The HMAC key: the value of the variable `signing_secret_env` names, at least 32 bytes.
    pub secret: Arc<[u8]>,
    /// `exp - iat` of every signed identity (`signed_ttl`, 60 s by default).
    pub ttl: Duration,
}

impl std::fmt::Debug for IdentitySigning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("IdentitySigning")
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// `[[routes]]`.
#[derive(Debug, Clone)]
pub struct RouteSettings {
    /// Route name: a metrics label.
    pub name: String,
    /// Longest matching prefix wins.
    pub path_prefix: String,
    /// Only requests for this host (without port), when set.
    pub host: Option<String>,
    /// Round-robin targets.
    pub upstreams: Vec<Upstream>,
    /// Whether a credential is needed.
    pub auth: RouteAuth,
    /// Scopes needed for read and write methods.
    pub scopes: RouteScopes,
    /// Remove `path_prefix` before forwarding.
    pub strip_prefix: bool,
    /// Upstream response-head deadline.
    pub timeout: Duration,
    /// The longest silence inside a streamed body, either way: a stalled upstream body is cut
    /// (counted as `upstream_timeout`), a stalled client body refused (`bad_request`).
    pub idle_timeout: Duration,
    /// Credits a passed request spends (contract 5a), unless the upstream says otherwise.
    pub cost: u32,
    /// Limits are counted and their headers sent, but nothing is refused for them.
    pub shadow: bool,
    /// The TLS client for its `https://` upstreams (`tls_ca`, `tls_client_cert`/`_key`), built
    /// and checked once; `None` when every upstream is `http://`.
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
}

/// One upstream base URL, split once.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host:port`.
    pub authority: Authority,
    /// Path prefix to prepend, without trailing slash; empty for none.
    pub base_path: String,
}

/// `auth` of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteAuth {
    /// A valid credential is needed.
    Required,
    /// Anyone; no checks, no metering.
    Public,
}

/// `scopes` of a route.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteScopes {
    /// Needed for GET, HEAD, OPTIONS.
    pub read: Option<String>,
    /// Needed for every other method.
    pub write: Option<String>,
}
