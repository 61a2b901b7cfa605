//! [`Gateway`]: a whole tollgate (proxy and admin listeners on port 0, embedded store in a temp
//! dir, or a Redis given with [`GatewayBuilder::redis`]) started in-process with `app::start`,
//! with helpers for the admin API and `/metrics`.
//!
//! The config is written as TOML and read with `config::load_with_env`, so the tests go through
//! the same loader as `tollgate serve`. [`default_routes`] are the routes most tests use; a test
//! that needs others passes its own with [`GatewayBuilder::routes`].

use std::net::SocketAddr;
use std::path::PathBuf;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tempfile::TempDir;
use tollgate::app::{self, ReloadError, Reloaded, Running, StartOptions};
use tollgate::config::{self, Settings};
use tollgate::credential::{self, Kind};
use tollgate::metering::WallClock;

use super::upstream::{dead_url, Upstream};

/// A settings change applied after loading the file.
type Tweak = Box<dyn FnOnce(&mut Settings) + Send>;

/// A running gateway. Dropping it aborts its tasks; [`Gateway::stop`] stops it gracefully.
pub struct Gateway {
    /// Where the proxy listens (changes on [`Gateway::restart`]).
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens (changes on [`Gateway::restart`]).
    pub admin_addr: SocketAddr,
    /// The raw master key the gateway was started with.
    pub master: String,
    settings: Settings,
    clock: WallClock,
    running: Option<Running>,
    client: reqwest::Client,
    /// Holds the config file and the store; removed on drop.
    _dir: TempDir,
}

/// How to start a [`Gateway`].
pub struct GatewayBuilder {
    upstream_url: String,
    routes: Option<String>,
    tweaks: Vec<Tweak>,
    clock: WallClock,
    redis_url: Option<String>,
    master: Option<String>,
}

// === impl GatewayBuilder ===

impl GatewayBuilder {
    /// Replaces [`default_routes`] with these `[[routes]]` tables.
    pub fn routes(mut self, toml: impl Into<String>) -> Self {
        self.routes = Some(toml.into());
        self
    }

    /// Changes the loaded settings before start (e.g. `max_body_bytes`, `trusted_proxies`).
    pub fn tweak(mut self, f: impl FnOnce(&mut Settings) + Send + 'static) -> Self {
        self.tweaks.push(Box::new(f));
        self
    }

    /// Meters on this clock instead of the system's.
    pub fn clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    /// Uses the Redis at `url` (`redis://…` or `redis+cluster://…`) as the store instead of an
    /// embedded one. Instances of one fleet share it; give them one [`GatewayBuilder::master`].
    pub fn redis(mut self, url: &str) -> Self {
        self.redis_url = Some(url.to_owned());
        self
    }

    /// Starts with this raw master key instead of a fresh one. The master key's hash lives in the
    /// store, and each start writes its own: every instance on one shared store needs the same.
    pub fn master(mut self, key: &str) -> Self {
        self.master = Some(key.to_owned());
        self
    }

    /// Writes the config, loads it, applies the tweaks and starts the gateway.
    pub async fn start(self) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let routes = match self.routes {
            Some(r) => r,
            None => default_routes(&self.upstream_url, &dead_url().await),
        };
        let store = match &self.redis_url {
            Some(url) => format!("backend = \"redis\"\nredis_url = '{url}'"),
            None => format!(
                "backend = \"embedded\"\npath = '{}'",
                dir.path().join("tollgate.db").display()
            ),
        };
        let toml = format!(
            r#"[proxy]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[store]
{store}

{routes}
"#
        );
        let config_path: PathBuf = dir.path().join("tollgate.toml");
        std::fs::write(&config_path, toml).expect("write config");
        let mut settings =
            config::load_with_env(&config_path, Vec::new()).expect("the test config loads");
        for tweak in self.tweaks {
            tweak(&mut settings);
        }
        let master = self
            .master
            .unwrap_or_else(|| credential::generate(Kind::Master));
        let running = start(&settings, &master, &self.clock).await;
        Gateway {
            proxy_addr: running.proxy_addr,
            admin_addr: running.admin_addr,
            master,
            settings,
            clock: self.clock,
            running: Some(running),
            client: super::client(),
            _dir: dir,
        }
    }
}

// === impl Gateway ===

impl Gateway {
    /// A gateway with [`default_routes`] in front of `upstream`.
    pub async fn start(upstream: &Upstream) -> Gateway {
        Gateway::builder(upstream).start().await
    }

    /// A gateway in front of `upstream`, to be configured.
    pub fn builder(upstream: &Upstream) -> GatewayBuilder {
        GatewayBuilder {
            upstream_url: upstream.url(),
            routes: None,
            tweaks: Vec::new(),
            clock: WallClock::System,
            redis_url: None,
            master: None,
        }
    }

    /// What `SIGHUP` does to the running gateway ([`tollgate::app::Running::reload`]) when the
    /// file is unchanged: the certificates are read again. Whether it applied.
    pub fn reload(&self) -> bool {
        self.reload_config(Ok(self.settings.clone())).is_ok()
    }

    /// Reloads the running gateway with its settings changed by `change`; on success they are
    /// also what [`Gateway::restart`] starts with.
    pub fn reload_with(
        &mut self,
        change: impl FnOnce(&mut Settings),
    ) -> Result<Reloaded, ReloadError> {
        let mut fresh = self.settings.clone();
        change(&mut fresh);
        let outcome = self.reload_config(Ok(fresh.clone()));
        if outcome.is_ok() {
            self.settings = fresh;
        }
        outcome
    }

    /// Reloads with these `[[routes]]` tables instead of the running ones.
    pub fn reload_routes(&mut self, toml: &str) -> Result<Reloaded, ReloadError> {
        let routes = routes_of(toml);
        self.reload_with(|s| s.routes = routes)
    }

    /// Reloads with `fresh` as the config file read again (an `Err` is a file that failed its
    /// checks).
    pub fn reload_config(
        &self,
        fresh: Result<Settings, config::ConfigError>,
    ) -> Result<Reloaded, ReloadError> {
        self.running.as_ref().expect("running").reload(fresh)
    }

    /// `http://PROXY/path`.
    pub fn proxy_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy_addr)
    }

    /// `GET http://PROXY/path` with `key` as a bearer credential, on `client`'s connections.
    pub async fn get_with_key(
        &self,
        client: &reqwest::Client,
        path: &str,
        key: &str,
    ) -> reqwest::Response {
        client
            .get(self.proxy_url(path))
            .bearer_auth(key)
            .send()
            .await
            .expect("send through the proxy")
    }

    /// `http://ADMIN/path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// Calls the admin API as the operator; the answer's status and JSON (`Null` if not JSON).
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        json: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .request(method, self.admin_url(path))
            .bearer_auth(&self.master);
        if let Some(json) = json {
            request = request.json(&json);
        }
        let response = request.send().await.expect("admin request");
        let status = response.status();
        let text = response.text().await.expect("admin answer");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `POST /v1/accounts`; the new account's id.
    pub async fn create_account(&self, json: Value) -> String {
        let (status, body) = self.admin(Method::POST, "/v1/accounts", Some(json)).await;
        assert_eq!(status, StatusCode::CREATED, "create account: {body}");
        body["id"].as_str().expect("account id").to_owned()
    }

    /// `POST /v1/accounts/{id}/keys`; the key's id and raw value.
    pub async fn create_key(&self, account_id: &str, json: Value) -> (String, String) {
        let path = format!("/v1/accounts/{account_id}/keys");
        let (status, body) = self.admin(Method::POST, &path, Some(json)).await;
        assert_eq!(status, StatusCode::CREATED, "create key: {body}");
        let id = body["id"].as_str().expect("key id").to_owned();
        let key = body["key"].as_str().expect("raw key").to_owned();
        (id, key)
    }

    /// An account with default settings and one secret key with full access: (account, raw key).
    pub async fn account_with_key(&self) -> (String, String) {
        let account = self
            .create_account(serde_json::json!({ "name": "acme" }))
            .await;
        let (_, key) = self
            .create_key(
                &account,
                serde_json::json!({ "name": "main", "type": "secret" }),
            )
            .await;
        (account, key)
    }

    /// `GET /metrics` on the admin listener.
    pub async fn metrics(&self) -> String {
        let response = self
            .client
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("metrics request");
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.expect("metrics text")
    }

    /// The value of one sample (`name` with exactly these labels, in any order); 0 if absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        super::sample(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    /// Stops gracefully and starts again on the same config and store. The listeners get new
    /// ports: use [`Gateway::proxy_url`] again afterwards.
    pub async fn restart(&mut self) {
        self.restart_after(|_| {}).await;
    }

    /// Stops gracefully, runs `offline` while nothing holds the store (e.g. to edit the
    /// embedded file, given its path), and starts again like [`Gateway::restart`].
    pub async fn restart_after(&mut self, offline: impl FnOnce(&std::path::Path)) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        if let tollgate::config::StoreSettings::Embedded { path } = &self.settings.store {
            offline(path);
        }
        let running = start(&self.settings, &self.master, &self.clock).await;
        self.proxy_addr = running.proxy_addr;
        self.admin_addr = running.admin_addr;
        self.running = Some(running);
    }

    /// Stops gracefully: in-flight requests finish, usage is flushed, the store is closed.
    /// Returns the directory that holds the store, which is deleted when dropped.
    pub async fn stop(mut self) -> TempDir {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        self._dir
    }

    /// Stops at once, as a killed process would: every task is aborted, nothing is flushed or
    /// handed back.
    pub fn kill(mut self) {
        drop(self.running.take());
    }

    /// The store file (embedded gateways only).
    pub fn store_path(&self) -> PathBuf {
        match &self.settings.store {
            tollgate::config::StoreSettings::Embedded { path } => path.clone(),
            tollgate::config::StoreSettings::Redis { .. } => panic!("this gateway runs on Redis"),
        }
    }
}

// === functions ===

/// The routes that these `[[routes]]` tables configure, checked by the config loader.
pub fn routes_of(toml: &str) -> Vec<tollgate::config::RouteSettings> {
    let file =
        format!("[proxy]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{toml}");
    config::load_from_str(&file, std::path::Path::new("routes.toml"), Vec::new())
        .expect("the routes load")
        .routes
}

/// The routes most tests use, in front of `upstream`:
///
/// | name | prefix | what |
/// |---|---|---|
/// | `api` | `/` | keyed |
/// | `public` | `/public` | `auth = "public"` |
/// | `orders` | `/orders` | scopes `orders:read` / `orders:write` |
/// | `slow` | `/slow` | `timeout = "300ms"` |
/// | `dead` | `/dead` | an upstream where nothing listens (`dead`) |
pub fn default_routes(upstream: &str, dead: &str) -> String {
    format!(
        r#"
[[routes]]
name = "api"
path_prefix = "/"
upstreams = ["{upstream}"]

[[routes]]
name = "public"
path_prefix = "/public"
upstreams = ["{upstream}"]
auth = "public"

[[routes]]
name = "orders"
path_prefix = "/orders"
upstreams = ["{upstream}"]
scopes = {{ read = "orders:read", write = "orders:write" }}

[[routes]]
name = "slow"
path_prefix = "/slow"
upstreams = ["{upstream}"]
timeout = "300ms"

[[routes]]
name = "dead"
path_prefix = "/dead"
upstreams = ["{dead}"]
"#
    )
}

async fn start(settings: &Settings, master: &str, clock: &WallClock) -> Running {
    let options = StartOptions {
        master_key: Some(master.to_owned()),
        clock: clock.clone(),
    };
    app::start(settings.clone(), options)
        .await
        .expect("the gateway starts")
}
