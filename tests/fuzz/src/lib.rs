//! What the admin fuzz targets share: the real admin router over an embedded store in a temp
//! dir, built once per process, with one account, one key and the operator's key, called
//! in-process (no socket) on a runtime of its own.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::ConnectInfo;
use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use tollgate::admin::{self, AdminState};
use tollgate::auth::cache::KeyCache;
use tollgate::config::{CacheSettings, OnStoreError};
use tollgate::credential::{self, KeyHash, Kind};
use tollgate::limits::Limiters;
use tollgate::metering::{Meter, WallClock};
use tollgate::metrics::Metrics;
use tollgate::store::embedded::EmbeddedStore;
use tollgate::store::{RateLimitSpec, SharedStore};

/// The admin API of one process.
pub struct AdminApp {
    runtime: tokio::runtime::Runtime,
    router: Router,
    master: String,
    /// An account made at start.
    pub account: String,
    /// A key of [`AdminApp::account`].
    pub key: String,
    _dir: tempfile::TempDir,
}

/// One answer.
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: HeaderMap,
    /// Its whole body.
    pub body: Bytes,
}

static APP: OnceLock<AdminApp> = OnceLock::new();

/// The process's admin API, made on first use.
pub fn app() -> &'static AdminApp {
    APP.get_or_init(AdminApp::start)
}

// === impl AdminApp ===

impl AdminApp {
    fn start() -> AdminApp {
        // tmpfs when there is one: the store syncs every commit, and a fuzzer commits a lot.
        let dir = match tempfile::tempdir_in("/dev/shm") {
            Ok(dir) => dir,
            Err(_) => tempfile::tempdir().expect("a temp dir"),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let store: SharedStore =
            Arc::new(EmbeddedStore::open(&dir.path().join("fuzz.db")).expect("the store opens"));
        let metrics = Arc::new(Metrics::new().expect("metrics"));
        let default_limits = RateLimitSpec {
            per_minute: Some(60),
            per_hour: Some(1_000),
            per_day: Some(10_000),
        };
        let cache = KeyCache::new(
            Arc::clone(&store),
            Arc::new(Limiters::new()),
            Arc::new(Meter::new(WallClock::default())),
            Arc::clone(&metrics),
            CacheSettings {
                ttl: std::time::Duration::from_secs(30),
                negative_ttl: std::time::Duration::from_secs(5),
                max_entries: 10_000,
            },
            default_limits,
            OnStoreError::FailOpen,
        );
        let master = credential::generate(Kind::Master);
        let state = AdminState::new(store, Arc::new(cache), metrics, Some(KeyHash::of(&master)));
        let mut app = AdminApp {
            runtime,
            router: admin::router(state),
            master,
            account: String::new(),
            key: String::new(),
            _dir: dir,
        };
        let made = app.call(Method::POST, "/v1/accounts", br#"{"name":"fuzz"}"#.to_vec());
        assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
        app.account = id_of(&made.body);
        let path = format!("/v1/accounts/{}/keys", app.account);
        let made = app.call(Method::POST, &path, br#"{"name":"fuzz-key"}"#.to_vec());
        assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
        app.key = id_of(&made.body);
        app
    }

    /// `method path_and_query` with `body` as JSON, as the operator.
    pub fn call(&self, method: Method, path_and_query: &str, body: Vec<u8>) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header("authorization", format!("Bearer {}", self.master))
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body))
            .expect("a request");
        let peer: SocketAddr = ([127, 0, 0, 1], 40_000).into();
        request.extensions_mut().insert(ConnectInfo(peer));
        let router = self.router.clone();
        self.runtime.block_on(async move {
            let response = match router.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let (parts, body) = response.into_parts();
            let body = body.collect().await.expect("the body").to_bytes();
            Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        })
    }
}

// === impl Answer ===

impl Answer {
    /// Checks what every answer must be: no 5xx, and a JSON body unless it is a 204.
    pub fn assert_well_formed(&self, what: &str) -> Option<serde_json::Value> {
        let body = String::from_utf8_lossy(&self.body);
        assert!(
            !self.status.is_server_error(),
            "{what}: {} {body}",
            self.status
        );
        assert!(
            self.status.is_success() || self.status.is_client_error(),
            "{what}: {} {body}",
            self.status
        );
        if self.status == StatusCode::NO_CONTENT {
            return None;
        }
        let json = self
            .headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        assert!(json, "{what}: {} without a JSON content type", self.status);
        let value: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{what}: {} body is not JSON ({e}): {body}", self.status));
        if self.status.is_client_error() {
            assert!(value["error"]["code"].is_string(), "{what}: {body}");
        }
        Some(value)
    }
}

fn id_of(body: &[u8]) -> String {
    let value: serde_json::Value = serde_json::from_slice(body).expect("JSON");
    value["id"].as_str().expect("an id").to_owned()
}
