//! Configuration: a TOML file plus `TOLLGATE__SECTION__FIELD` environment overrides, read with
//! the `config` crate into raw serde structs ([`raw`]), then checked once by [`validate`] into
//! typed [`Settings`]. Every problem is collected with its field path and reported together.
//!
//! From the environment a list field is comma-separated ([`LIST_FIELDS`]); `routes` cannot be
//! overridden there at all (an entry of an array of tables has no variable name), and a
//! `TOLLGATE__ROUTES…` variable is reported as a problem rather than ignored.

mod raw;
mod settings;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use settings::{
    AdminSettings, CacheSettings, Durability, IdentitySettings, IdentitySigning, LimitHeaders,
    LimitMode, LimitSettings, MeteringSettings, OnStoreError, ProxySettings, RouteAuth,
    RouteScopes, RouteSettings, Settings, StoreSettings, Upstream, DEFAULT_RATE_LIMIT,
};

use crate::store::RateLimitSpec;
use crate::tls::{self, TlsFiles, UpstreamTlsFiles};
use raw::*;

/// The environment prefix of overrides: `TOLLGATE__PROXY__LISTEN=…`.
const ENV_PREFIX: &str = "TOLLGATE";
const SECTIONS: &[&str] = &[
    "proxy", "admin", "store", "cache", "limits", "metering", "identity", "routes",
];
/// The fields that hold a list. From the environment a list is comma-separated
/// (`TOLLGATE__PROXY__TRUSTED_PROXIES=10.0.0.0/8,192.168.0.0/16`, spaces allowed) and an empty
/// value is the empty list; every other field keeps its commas. A new list field belongs here.
/// `routes[].upstreams` is not: `routes` is an array of tables, whose entries no variable can
/// name, so [`EnvOverrides`] refuses `TOLLGATE__ROUTES…` outright.
const LIST_FIELDS: &[&str] = &["proxy.trusted_proxies", "limits.headers"];
/// The longest `metering.wal_sync_interval`: the durable mode promises to lose at most this.
/// Largest route `cost`: more than any sensible price, and small enough that a day of requests
/// at it cannot overflow a credit count.
pub const MAX_COST: u32 = 1_000_000;
const MAX_WAL_SYNC_INTERVAL: Duration = Duration::from_millis(50);

/// The longest duration a field takes: 100 years. Durations are added to clock readings
/// (`Instant::now() + cache.negative_ttl`), which panics when the sum overflows; humantime
/// accepts up to 2^64 seconds.
const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// One thing wrong with a config, named by its field path (`proxy.listen`, `routes[0].upstreams`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted field path.
    pub field: String,
    /// Why it is wrong.
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    /// The file read.
    pub file: PathBuf,
    /// All problems, in field order.
    pub problems: Vec<Problem>,
}

impl ConfigError {
    /// An error of one problem.
    fn one(file: &Path, field: &str, message: String) -> Self {
        ConfigError {
            file: file.to_owned(),
            problems: vec![Problem {
                field: field.to_owned(),
                message,
            }],
        }
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{}: {n} problem{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  {}: {}: {}", self.file.display(), p.field, p.message)?;
        }
        Ok(())
    }
}

/// Reads `path` and the process environment into settings.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    load_with_env(path, env)
}

/// Like [`load`], with the environment given (for tests).
pub fn load_with_env(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let fail = |field: &str, message: String| ConfigError::one(path, field, message);
    if !path.is_file() {
        return Err(fail(
            "(file)",
            "cannot read the file: it does not exist".to_owned(),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail("(file)", format!("cannot read the file: {e}")))?;
    load_from_str(&text, path, env)
}

/// Like [`load_with_env`], with the file's TOML text given; `file` only names it in problems.
/// Public for the fuzz targets (`tests/fuzz`), which feed it text without touching the disk.
pub fn load_from_str(
    toml: &str,
    file: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    let fail = |field: &str, message: String| ConfigError::one(file, field, message);
    let env: BTreeMap<String, String> = env.into_iter().collect();
    let overrides = EnvOverrides::read(env.clone());
    let built = overrides
        .over(toml)
        .map_err(|(field, e)| fail(field, e.to_string()))?;
    let mut v = Validator {
        env,
        ..Validator::default()
    };
    for name in &overrides.routes {
        v.problem(
            "routes",
            format!(
                "{name}: routes cannot be overridden from the environment (no variable can name \
                 an entry of an array of tables); change them in the file"
            ),
        );
    }
    let top: BTreeMap<String, config::Value> = match built.clone().try_deserialize() {
        Ok(top) => top,
        Err(e) => return Err(fail("(file)", e.to_string())),
    };
    for key in top.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            v.problem(
                &toml_key(key),
                format!("unknown section; expected one of {}", SECTIONS.join(", ")),
            );
        }
    }
    let settings = v.settings(&built);
    match settings {
        Some(s) if v.problems.is_empty() => Ok(s),
        _ => Err(ConfigError {
            file: file.to_owned(),
            problems: v.problems,
        }),
    }
}

/// Collects problems while turning raw sections into settings.
#[derive(Default)]
struct Validator {
    problems: Vec<Problem>,
    /// The process environment, for the variables the config names (the identity secret).
    env: BTreeMap<String, String>,
}

/// The shortest identity signing secret accepted, in bytes.
const MIN_SIGNING_SECRET: usize = 32;

/// The `TOLLGATE__…` variables, less what the config crate cannot express: an empty list (it
/// would read `""` as a list of one empty entry) and anything under `routes`.
#[derive(Default)]
struct EnvOverrides {
    /// For the config crate's environment source.
    vars: config::Map<String, String>,
    /// [`LIST_FIELDS`] set to an empty value.
    empty_lists: Vec<&'static str>,
    /// Names of variables that try to override `routes`.
    routes: Vec<String>,
}

// === impl EnvOverrides ===

impl EnvOverrides {
    fn read(env: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut out = EnvOverrides::default();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("TOLLGATE__") else {
                continue;
            };
            // As the config crate names it: `PROXY__TRUSTED_PROXIES` → `proxy.trusted_proxies`.
            let field = rest.to_lowercase().replace("__", ".");
            if field == "routes" || field.starts_with("routes.") {
                out.routes.push(name);
            } else if let Some(list) = LIST_FIELDS
                .iter()
                .find(|f| **f == field && value.trim().is_empty())
            {
                out.empty_lists.push(list);
            } else {
                out.vars.insert(name, value);
            }
        }
        out
    }

    /// The file's TOML text under these overrides; on failure, the field to blame.
    fn over(&self, toml: &str) -> Result<config::Config, (&'static str, config::ConfigError)> {
        let environment = LIST_FIELDS.iter().fold(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .source(Some(self.vars.clone())),
            |environment, field| environment.with_list_parse_key(field),
        );
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .add_source(environment);
        for field in self.empty_lists.iter().copied() {
            builder = builder
                .set_override(field, Vec::<String>::new())
                .map_err(|e| (field, e))?;
        }
        builder.build().map_err(|e| ("(file)", e))
    }
}

// === impl Validator ===

impl Validator {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.to_owned(),
            message: message.into(),
        });
    }

    /// Deserializes one section; a missing section is its defaults, a type error becomes a
    /// problem naming the field (`proxy.max_body_bytes`).
    fn section<T: serde::de::DeserializeOwned + Default>(
        &mut self,
        cfg: &config::Config,
        name: &str,
    ) -> T {
        let value = match cfg.get::<config::Value>(name) {
            Ok(v) => v,
            Err(config::ConfigError::NotFound(_)) => return T::default(),
            Err(e) => {
                self.problem(name, e.to_string());
                return T::default();
            }
        };
        // A type error is reported, the offending field removed, and the section read again, so
        // that one bad field does not hide the problems of its neighbours.
        let mut value = value;
        for _ in 0..64 {
            match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(v) => return v,
                Err(e) => {
                    let path = e.path().to_string();
                    let field = match path.as_str() {
                        "" | "." => name.to_owned(),
                        p if p.starts_with('[') => format!("{name}{p}"),
                        p => format!("{name}.{p}"),
                    };
                    self.problem(&field, e.inner().to_string());
                    if !remove_at(&mut value, e.path()) {
                        break;
                    }
                }
            }
        }
        T::default()
    }

    /// Reports every field of `unknown` as `path.field`.
    fn unknown(&mut self, path: &str, unknown: &Unknown) {
        for field in unknown.keys() {
            self.problem(&format!("{path}.{}", toml_key(field)), "unknown field");
        }
    }

    fn settings(&mut self, cfg: &config::Config) -> Option<Settings> {
        let proxy: RawProxy = self.section(cfg, "proxy");
        let admin: RawAdmin = self.section(cfg, "admin");
        let store: RawStore = self.section(cfg, "store");
        let cache: RawCache = self.section(cfg, "cache");
        let limits: RawLimits = self.section(cfg, "limits");
        let metering: RawMetering = self.section(cfg, "metering");
        let identity: RawIdentity = self.section(cfg, "identity");
        let routes: Vec<RawRoute> = self.section(cfg, "routes");
        let proxy = self.proxy(proxy);
        let admin = self.admin(admin);
        let store = self.store(store);
        let cache = self.cache(cache);
        let limits = self.limits(limits);
        let metering = self.metering(metering, store.as_ref());
        let identity = self.identity(identity);
        let routes = self.routes(routes);
        let global = limits.as_ref().is_some_and(|l| l.mode == LimitMode::Global);
        if global && store.as_ref().is_some_and(|s| !s.capabilities().shared) {
            self.problem(
                "limits.mode",
                "\"global\" shares limits through Redis: it needs store.backend = \"redis\"",
            );
        }
        Some(Settings {
            proxy: proxy?,
            admin: admin?,
            store: store?,
            cache,
            limits: limits?,
            metering,
            identity: identity?,
            routes,
        })
    }

    fn addr(&mut self, field: &str, raw: Option<String>, default: &str) -> Option<SocketAddr> {
        let raw = raw.unwrap_or_else(|| default.to_owned());
        match raw.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(
                    field,
                    format!("`{raw}` is not an address like 127.0.0.1:8080"),
                );
                None
            }
        }
    }

    fn duration(&mut self, field: &str, raw: Option<String>, default: &str) -> Duration {
        let raw = raw.unwrap_or_else(|| default.to_owned());
        match humantime::parse_duration(&raw) {
            Ok(d) if d > MAX_DURATION => {
                self.problem(field, "must be at most 100 years");
                Duration::from_secs(1)
            }
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.problem(field, "must be longer than zero");
                Duration::from_secs(1)
            }
            Err(e) => {
                self.problem(
                    field,
                    format!("`{raw}` is not a duration like \"250ms\", \"30s\" or \"5m\": {e}"),
                );
                Duration::from_secs(1)
            }
        }
    }

    fn cidrs(&mut self, field: &str, raw: &[String]) -> Vec<IpNet> {
        let mut out = Vec::with_capacity(raw.len());
        for (i, s) in raw.iter().enumerate() {
            match crate::policy::parse_cidr(s) {
                Some(net) => out.push(net),
                None => self.problem(
                    &format!("{field}[{i}]"),
                    format!("`{s}` is not a CIDR or IP address"),
                ),
            }
        }
        out
    }

    fn proxy(&mut self, raw: RawProxy) -> Option<ProxySettings> {
        self.unknown("proxy", &raw.unknown);
        let tls = raw.tls.and_then(|t| self.tls("proxy.tls", t));
        let listen = self.addr("proxy.listen", raw.listen, "0.0.0.0:8080");
        let trusted_proxies = self.cidrs(
            "proxy.trusted_proxies",
            &raw.trusted_proxies.unwrap_or_default(),
        );
        let max_body_bytes = raw.max_body_bytes.unwrap_or(10 * 1024 * 1024);
        let request_header_timeout = self.duration(
            "proxy.request_header_timeout",
            raw.request_header_timeout,
            "10s",
        );
        Some(ProxySettings {
            listen: listen?,
            trusted_proxies,
            max_body_bytes,
            request_header_timeout,
            expose_account_api: raw.expose_account_api.unwrap_or(false),
            tls,
        })
    }

    /// A route's `tls_ca`, `tls_client_cert` and `tls_client_key`; `None` when a client
    /// certificate lacks its key or the other way round.
    fn upstream_tls_files(
        &mut self,
        at: &dyn Fn(&str) -> String,
        ca: Option<String>,
        cert: Option<String>,
        key: Option<String>,
    ) -> Option<UpstreamTlsFiles> {
        let client = match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
            }),
            (None, None) => None,
            (Some(_), None) => {
                self.problem(&at("tls_client_key"), "is required with tls_client_cert");
                return None;
            }
            (None, Some(_)) => {
                self.problem(&at("tls_client_cert"), "is required with tls_client_key");
                return None;
            }
        };
        Some(UpstreamTlsFiles {
            ca: ca.map(PathBuf::from),
            client,
        })
    }

    /// `tls = { cert, key }`: both files read and checked now (`tls::load`), so that a
    /// certificate that cannot be served fails `check-config` and the start, not handshakes.
    fn tls(&mut self, field: &str, raw: RawTls) -> Option<TlsFiles> {
        self.unknown(field, &raw.unknown);
        let files = TlsFiles {
            cert: PathBuf::from(raw.cert),
            key: PathBuf::from(raw.key),
        };
        match tls::load(&files, std::time::SystemTime::now()) {
            Ok(_) => Some(files),
            Err(e) => {
                self.problem(field, e.to_string());
                None
            }
        }
    }

    fn admin(&mut self, raw: RawAdmin) -> Option<AdminSettings> {
        self.unknown("admin", &raw.unknown);
        let listen = self.addr("admin.listen", raw.listen, "127.0.0.1:9090");
        let master_key_env = raw
            .master_key_env
            .unwrap_or_else(|| "TOLLGATE_MASTER_KEY".to_owned());
        if master_key_env.is_empty() {
            self.problem("admin.master_key_env", "must name an environment variable");
        }
        let tls = raw.tls.and_then(|t| self.tls("admin.tls", t));
        Some(AdminSettings {
            listen: listen?,
            master_key_env,
            tls,
        })
    }

    fn store(&mut self, raw: RawStore) -> Option<StoreSettings> {
        self.unknown("store", &raw.unknown);
        match raw.backend.as_deref().unwrap_or("embedded") {
            "embedded" => {
                if raw.redis_url.is_some() {
                    self.problem("store.redis_url", "only used with backend = \"redis\"");
                }
                let path = raw.path.unwrap_or_else(|| "data/tollgate.db".to_owned());
                if path.is_empty() {
                    self.problem("store.path", "must not be empty");
                    return None;
                }
                Some(StoreSettings::Embedded {
                    path: PathBuf::from(path),
                })
            }
            "redis" => {
                if raw.path.is_some() {
                    self.problem("store.path", "only used with backend = \"embedded\"");
                }
                let Some(url) = raw.redis_url else {
                    self.problem(
                        "store.redis_url",
                        "is required with backend = \"redis\" (redis://host:port or redis+cluster://h1:p1,h2:p2,…)",
                    );
                    return None;
                };
                match check_redis_url(&url) {
                    Ok(()) => Some(StoreSettings::Redis { url }),
                    Err(why) => {
                        self.problem("store.redis_url", why);
                        None
                    }
                }
            }
            other => {
                self.problem(
                    "store.backend",
                    format!("`{other}` is not one of \"embedded\", \"redis\""),
                );
                None
            }
        }
    }

    fn cache(&mut self, raw: RawCache) -> CacheSettings {
        self.unknown("cache", &raw.unknown);
        let ttl = self.duration("cache.ttl", raw.ttl, "30s");
        let negative_ttl = self.duration("cache.negative_ttl", raw.negative_ttl, "5s");
        let max_entries = raw.max_entries.unwrap_or(1_000_000);
        if max_entries == 0 {
            self.problem("cache.max_entries", "must be at least 1");
        }
        CacheSettings {
            ttl,
            negative_ttl,
            max_entries: usize::try_from(max_entries).unwrap_or(usize::MAX),
        }
    }

    fn limits(&mut self, raw: RawLimits) -> Option<LimitSettings> {
        self.unknown("limits", &raw.unknown);
        let mode = match raw.mode.as_deref().unwrap_or("local") {
            "local" => Some(LimitMode::Local),
            "global" => Some(LimitMode::Global),
            other => {
                self.problem(
                    "limits.mode",
                    format!("`{other}` is not one of \"local\", \"global\""),
                );
                None
            }
        };
        let on_store_error = match raw.on_store_error.as_deref().unwrap_or("fail_open") {
            "fail_open" => Some(OnStoreError::FailOpen),
            "fail_closed" => Some(OnStoreError::FailClosed),
            other => {
                self.problem(
                    "limits.on_store_error",
                    format!("`{other}` is not one of \"fail_open\", \"fail_closed\""),
                );
                None
            }
        };
        let d = raw.default.unwrap_or_default();
        self.unknown("limits.default", &d.unknown);
        let default = RateLimitSpec {
            per_minute: d.per_minute.or(DEFAULT_RATE_LIMIT.per_minute),
            per_hour: d.per_hour.or(DEFAULT_RATE_LIMIT.per_hour),
            per_day: d.per_day.or(DEFAULT_RATE_LIMIT.per_day),
        };
        for (name, v) in [
            ("per_minute", default.per_minute),
            ("per_hour", default.per_hour),
            ("per_day", default.per_day),
        ] {
            if v == Some(0) {
                self.problem(&format!("limits.default.{name}"), "must be at least 1");
            }
        }
        let headers = match raw.headers {
            None => LimitHeaders::ALL,
            Some(styles) => self.limit_headers(&styles),
        };
        Some(LimitSettings {
            mode: mode?,
            on_store_error: on_store_error?,
            default,
            headers,
        })
    }

    /// `limits.headers`: any of the three styles; the empty list sends none.
    fn limit_headers(&mut self, styles: &[String]) -> LimitHeaders {
        let mut headers = LimitHeaders::NONE;
        for style in styles {
            match style.trim() {
                "ietf" => headers.ietf = true,
                "legacy" => headers.legacy = true,
                "per_window" => headers.per_window = true,
                other => self.problem(
                    "limits.headers",
                    format!("`{other}` is not one of \"ietf\", \"legacy\", \"per_window\""),
                ),
            }
        }
        headers
    }

    fn metering(&mut self, raw: RawMetering, store: Option<&StoreSettings>) -> MeteringSettings {
        self.unknown("metering", &raw.unknown);
        let durability = self.durability(&raw, store);
        let flush_interval = self.duration("metering.flush_interval", raw.flush_interval, "1s");
        let r = raw.retention.unwrap_or_default();
        self.unknown("metering.retention", &r.unknown);
        MeteringSettings {
            flush_interval,
            durability,
            retention_minute: self.duration("metering.retention.minute", r.minute, "48h"),
            retention_hour: self.duration("metering.retention.hour", r.hour, "90d"),
            retention_day: self.duration("metering.retention.day", r.day, "1100d"),
        }
    }

    /// `metering.durability` with its `wal_*` fields: the log's directory defaults to one
    /// beside the embedded store's file (`data/tollgate.db` → `data/tollgate.usage-wal`), else
    /// `data/usage-wal`; the sync interval to 5 ms, at most 50 ms (what a crash may lose).
    fn durability(&mut self, raw: &RawMetering, store: Option<&StoreSettings>) -> Durability {
        match raw.durability.as_deref().unwrap_or("interval") {
            "interval" => {
                for (field, set) in [
                    ("metering.wal_path", raw.wal_path.is_some()),
                    (
                        "metering.wal_sync_interval",
                        raw.wal_sync_interval.is_some(),
                    ),
                ] {
                    if set {
                        self.problem(field, "only used with durability = \"wal\"");
                    }
                }
                Durability::Interval
            }
            "wal" => {
                let sync_interval = self.duration(
                    "metering.wal_sync_interval",
                    raw.wal_sync_interval.clone(),
                    "5ms",
                );
                if sync_interval > MAX_WAL_SYNC_INTERVAL {
                    self.problem(
                        "metering.wal_sync_interval",
                        "must be at most 50ms: it is what a crash may lose",
                    );
                }
                let path = match (&raw.wal_path, store) {
                    (Some(path), _) => PathBuf::from(path),
                    (None, Some(StoreSettings::Embedded { path })) => {
                        let stem = path.file_stem().map_or_else(
                            || "tollgate".into(),
                            |s| s.to_string_lossy().into_owned(),
                        );
                        path.with_file_name(format!("{stem}.usage-wal"))
                    }
                    (None, _) => PathBuf::from("data/usage-wal"),
                };
                if path.as_os_str().is_empty() {
                    self.problem("metering.wal_path", "must not be empty");
                }
                Durability::Wal {
                    path,
                    sync_interval,
                }
            }
            other => {
                self.problem(
                    "metering.durability",
                    format!("`{other}` is not one of \"interval\", \"wal\""),
                );
                Durability::Interval
            }
        }
    }

    fn identity(&mut self, raw: RawIdentity) -> Option<IdentitySettings> {
        self.unknown("identity", &raw.unknown);
        let ttl = self.duration("identity.signed_ttl", raw.signed_ttl, "60s");
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&ttl) {
            self.problem(
                "identity.signed_ttl",
                "must be between 1s and 1h: it is how long a captured header can be replayed",
            );
        }
        let signing = raw
            .signing_secret_env
            .and_then(|name| self.signing_secret(&name))
            .map(|secret| IdentitySigning { secret, ttl });
        let header_prefix = raw
            .header_prefix
            .unwrap_or_else(|| "X-Tollgate-".to_owned());
        if header_prefix.is_empty()
            || http::HeaderName::from_bytes(format!("{header_prefix}Key-Id").as_bytes()).is_err()
        {
            self.problem(
                "identity.header_prefix",
                format!("`{header_prefix}` cannot start a header name"),
            );
            return None;
        }
        Some(IdentitySettings {
            header_prefix,
            signing,
        })
    }

    /// The value of `name` in the environment, as an HMAC-SHA256 key: at least 32 bytes (RFC 7518
    /// §3.2 asks for a key as long as the hash).
    fn signing_secret(&mut self, name: &str) -> Option<Arc<[u8]>> {
        const FIELD: &str = "identity.signing_secret_env";
        match self.env.get(name).filter(|v| !v.is_empty()) {
            None => {
                self.problem(FIELD, format!("the variable `{name}` is not set"));
                None
            }
            Some(v) if v.len() < MIN_SIGNING_SECRET => {
                self.problem(
                    FIELD,
                    format!(
                        "the secret in `{name}` has {} bytes; at least {MIN_SIGNING_SECRET} are needed",
                        v.len()
                    ),
                );
                None
            }
            Some(v) => Some(Arc::from(v.as_bytes())),
        }
    }

    fn routes(&mut self, raw: Vec<RawRoute>) -> Vec<RouteSettings> {
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, r) in raw.into_iter().enumerate() {
            let at = |f: &str| format!("routes[{i}].{f}");
            self.unknown(&format!("routes[{i}]"), &r.unknown);
            let name = r.name.unwrap_or_default();
            if name.is_empty() {
                self.problem(&at("name"), "is required");
            } else if !names.insert(name.clone()) {
                self.problem(&at("name"), format!("`{name}` is used by an earlier route"));
            }
            let path_prefix = r.path_prefix.unwrap_or_else(|| "/".to_owned());
            if !path_prefix.starts_with('/') {
                self.problem(
                    &at("path_prefix"),
                    format!("`{path_prefix}` must start with /"),
                );
            } else {
                // Requests are matched on their normalised path, so a prefix in any other form
                // would never match.
                match crate::target::normalise(&path_prefix) {
                    Ok(std::borrow::Cow::Borrowed(_)) => {}
                    Ok(std::borrow::Cow::Owned(normal)) => self.problem(
                        &at("path_prefix"),
                        format!("`{path_prefix}` is not in normal form; write `{normal}`"),
                    ),
                    Err(e) => self.problem(&at("path_prefix"), format!("`{path_prefix}`: {e}")),
                }
            }
            let upstreams = r.upstreams.unwrap_or_default();
            if upstreams.is_empty() {
                self.problem(&at("upstreams"), "needs at least one upstream URL");
            }
            let upstreams: Vec<Upstream> = upstreams
                .iter()
                .enumerate()
                .filter_map(|(j, u)| match parse_upstream(u) {
                    Ok(up) => Some(up),
                    Err(why) => {
                        self.problem(&format!("routes[{i}].upstreams[{j}]"), why);
                        None
                    }
                })
                .collect();
            let auth = match r.auth.as_deref().unwrap_or("required") {
                "required" => RouteAuth::Required,
                "public" => RouteAuth::Public,
                other => {
                    self.problem(
                        &at("auth"),
                        format!("`{other}` is not one of \"required\", \"public\""),
                    );
                    RouteAuth::Required
                }
            };
            let mut scopes = RouteScopes::default();
            for (k, v) in r.scopes.unwrap_or_default() {
                match k.as_str() {
                    "read" => scopes.read = Some(v),
                    "write" => scopes.write = Some(v),
                    other => self.problem(
                        &at(&format!("scopes.{other}")),
                        "unknown field; expected read or write",
                    ),
                }
            }
            let cost = match r.cost {
                None => 1,
                Some(n) => u32::try_from(n)
                    .ok()
                    .filter(|n| *n <= MAX_COST)
                    .unwrap_or_else(|| {
                        self.problem(
                            &at("cost"),
                            format!("{n} is not a whole number from 0 to {MAX_COST}"),
                        );
                        1
                    }),
            };
            let timeout = self.duration(&at("timeout"), r.timeout, "30s");
            let idle_timeout = self.duration(&at("idle_timeout"), r.idle_timeout, "30s");
            let any_https = upstreams
                .iter()
                .any(|u| u.scheme == http::uri::Scheme::HTTPS);
            let tls_files =
                self.upstream_tls_files(&at, r.tls_ca, r.tls_client_cert, r.tls_client_key);
            let upstream_tls = match (any_https, tls_files) {
                (true, Some(files)) => {
                    match tls::upstream_client_config(&files, std::time::SystemTime::now()) {
                        Ok(config) => Some(config),
                        Err(e) => {
                            self.problem(&at("upstreams"), format!("https: {e}"));
                            None
                        }
                    }
                }
                (false, Some(files)) if files != UpstreamTlsFiles::default() => {
                    self.problem(
                        &at("tls_ca"),
                        "tls_* fields are only used with https:// upstreams",
                    );
                    None
                }
                _ => None,
            };
            out.push(RouteSettings {
                name,
                path_prefix,
                host: r.host.map(|h| h.to_ascii_lowercase()),
                upstreams,
                auth,
                scopes,
                strip_prefix: r.strip_prefix.unwrap_or(false),
                timeout,
                idle_timeout,
                cost,
                shadow: r.shadow.unwrap_or(false),
                upstream_tls,
            });
        }
        out
    }
}

/// A key as TOML writes it in a dotted path: bare when it can be, else quoted, so that an
/// empty key or one with a dot in it still names one field (`""`, `"a.b"`).
fn toml_key(key: &str) -> std::borrow::Cow<'_, str> {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare {
        std::borrow::Cow::Borrowed(key)
    } else {
        std::borrow::Cow::Owned(format!("{key:?}"))
    }
}

/// Removes the field a deserialization error points at; `false` when the path leads nowhere.
fn remove_at(value: &mut config::Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in parents {
        cur = match (seg, &mut cur.kind) {
            (Segment::Map { key }, config::ValueKind::Table(t)) => match t.get_mut(key) {
                Some(v) => v,
                None => return false,
            },
            (Segment::Seq { index }, config::ValueKind::Array(a)) => match a.get_mut(*index) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, &mut cur.kind) {
        (Segment::Map { key }, config::ValueKind::Table(t)) => t.remove(key).is_some(),
        _ => false,
    }
}

/// `redis://host[:port][/db]` or `redis+cluster://h1:p1,h2:p2,…`.
fn check_redis_url(url: &str) -> Result<(), String> {
    if let Some(nodes) = url.strip_prefix("redis+cluster://") {
        let nodes: Vec<&str> = nodes.split(',').map(str::trim).collect();
        if nodes.iter().any(|n| n.is_empty() || !n.contains(':')) {
            return Err(format!(
                "`{url}`: list the cluster nodes as host:port,host:port,…"
            ));
        }
        return Ok(());
    }
    match url.strip_prefix("redis://") {
        Some(rest) if !rest.is_empty() => Ok(()),
        _ => Err(format!(
            "`{url}` must start with redis:// or redis+cluster://"
        )),
    }
}

/// Splits `http://host:port/base` once, at start-up.
fn parse_upstream(raw: &str) -> Result<Upstream, String> {
    let uri: http::Uri = raw
        .parse()
        .map_err(|e| format!("`{raw}` is not a URL: {e}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => http::uri::Scheme::HTTP,
        Some("https") => http::uri::Scheme::HTTPS,
        _ => return Err(format!("`{raw}` must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{raw}` has no host"))?;
    if uri.query().is_some() {
        return Err(format!("`{raw}` must not have a query"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok(Upstream {
        scheme,
        authority,
        base_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(toml: &str) -> Vec<Problem> {
        match load_from_str(toml, Path::new("t.toml"), Vec::new()) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems,
        }
    }

    /// Found by the `config` fuzz target: a section or field with an empty name (`[""]`) was
    /// reported with an empty field path, which names nothing.
    #[test]
    fn an_empty_or_dotted_key_is_named_quoted() {
        let got = problems("[[res]]\n[\"\"]\n");
        let fields: Vec<&str> = got.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"\"\""), "{got:?}");
        assert!(fields.contains(&"res"), "{got:?}");
        let got = problems("[proxy]\n\"\" = 1\n\"a.b\" = 2\n");
        let fields: Vec<&str> = got.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"proxy.\"\""), "{got:?}");
        assert!(fields.contains(&"proxy.\"a.b\""), "{got:?}");
        assert!(got.iter().all(|p| !p.field.is_empty()));
    }

    /// Found by the `config` fuzz target's property (every accepted duration can be added to a
    /// clock reading): `cache.ttl = "500000000000years"` was accepted, and the key cache's
    /// `Instant::now() + ttl` would have panicked on the first lookup.
    #[test]
    fn a_duration_past_100_years_is_a_problem() {
        let got = problems("[cache]\nttl = \"500000000000years\"\n");
        assert!(
            got.iter()
                .any(|p| p.field == "cache.ttl" && p.message.contains("100 years")),
            "{got:?}"
        );
        assert!(problems("[cache]\nttl = \"100years\"\n").is_empty());
        let got = problems(
            "[[routes]]\nname = \"a\"\nupstreams = [\"http://u\"]\nidle_timeout = \"101y\"\n",
        );
        assert!(
            got.iter().any(|p| p.field == "routes[0].idle_timeout"),
            "{got:?}"
        );
    }
}
