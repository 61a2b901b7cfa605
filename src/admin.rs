//! The admin listener: health, metrics, and the management API (contract section 5).
//!
//! | method and path | who | answer |
//! |---|---|---|
//! | `GET /healthz` | anyone | 200 `{"status":"ok"}` |
//! | `GET /readyz` | anyone | 200 `{"status":"ready"}`, or 503 `{"status":"unavailable"}` |
//! | `GET /metrics` | anyone | Prometheus text |
//! | `GET /ui`, `/ui/{path}` | anyone (the app signs in against the API) | `/ui`: 308 to `ui/`; below it the usage dashboard's files ([`ui`]) |
//! | `POST /v1/accounts` | operator | 201 account |
//! | `GET /v1/accounts` | operator | `{"accounts":[…]}` |
//! | `GET /v1/accounts/{account_id}` | operator | account |
//! | `PATCH /v1/accounts/{account_id}` | operator | account (JSON merge patch, `active` too) |
//! | `DELETE /v1/accounts/{account_id}` | operator | `{"deleted":true}`, with its keys, sites |
//! | `GET /v1/account` | account key | `id`, `name`, `auth_method`, `created_at` |
//! | `POST /v1/verify` | operator, or an account key with `keys:verify` | `{"valid","code",…}`: the proxy's decision on a key, `checks` with `explain` |
//! | `GET …/config` | both | the account's and the calling key's rules, `{tenant, client}` |
//! | `POST …/keys` | both | 201 key metadata and the raw `key`, once |
//! | `POST …/keys/import` | both | 201 the imported key (by hash), or `{"keys":[…]}` for a batch of up to 1,000 |
//! | `GET …/keys` | both | `{"keys":[…]}`, metadata only |
//! | `GET …/keys/{key_id}` | both | key metadata |
//! | `PATCH …/keys/{key_id}` | both | key metadata as changed (merge patch) |
//! | `POST …/keys/{key_id}/deactivate`, `…/activate` | both | key metadata |
//! | `POST …/keys/{key_id}/credits` | both | key metadata with its credits after `set` or `add` |
//! | `POST …/keys/{key_id}/renew` | both | key metadata with the new `expires_at` |
//! | `POST …/keys/{key_id}/roll` | both | 201 the new key's metadata and raw `key`, once |
//! | `DELETE …/keys/{key_id}` | both | `{"deleted":true}` |
//! | `GET …/sites` | both | `{"sites":[{"id","name","created_at"}]}` |
//! | `POST …/sites` | both | 201 site |
//! | `DELETE …/sites/{site_id}` | both | 204, no body |
//! | `GET …/secrets` | both | `{"secrets":[{"id","client_id","prefix","preview","created_at"}]}` |
//! | `POST …/secrets` | both | 201 the secret's metadata and the raw `client_secret`, once |
//! | `DELETE …/secrets/{secret_id}` | both | 204; the tokens it issued are revoked |
//! | `GET …/audit` | both | `{"logs":[…],"total","limit","offset"}`, newest first |
//! | `GET …/audit/verify` | both | `{"intact","entries","first_bad_id"}`: the account's hash chain checked |
//! | `GET …/keys/{key_id}/usage` | both | every bucket of `from`..`to` by `interval`, zeros included |
//! | `GET …/usage` | both | `today`, `this_month`, `this_year`, `custom` totals |
//! | `GET …/usage/keys` | both | `total_keys`, `active_keys`, each key's last use and tightest window |
//!
//! `…` is `/v1/accounts/{account_id}` for the operator (master key) and `/v1/account` for an
//! account's own secret key, whose scopes must be null or hold `account:read` (GET) or
//! `account:write` (everything else; 403 `scope_denied` without). An account never sees another:
//! ids of another account's keys and sites are 404, and so is another account's id in the
//! operator's form (its own id there is 403 `forbidden`). Only the operator changes or deletes
//! an account. Errors are
//! `{"error":{"code","message"}}` ([`error::ApiError`]); unknown paths are 404 `not_found`, and
//! bodies over 64 KiB (1 MiB for `…/keys/import`) are 413 `body_too_large`. Every change writes
//! an audit entry.
//!
//! Layout: `auth` (who is calling), `body` (JSON bodies that name the failing field), `patch`
//! (PATCH bodies as JSON merge patches), `error`, `validate` (field checks), `usage` (reading usage back), `audit` (writing and
//! listing entries), `health`, `accounts`, `account_config`, `keys`, `import` (keys by hash), `rotation` (renew and roll),
//! `sites`, `secrets` (OAuth client secrets), `ui` (the dashboard's files), `watched_body` (a request
//! body arrives within 30 s; an answer that leaves it unread says `Connection: close`), `master` (the operator's key at start-up). This module uses the store, the key cache
//! and metrics; never the proxy.

mod account_config;
mod accounts;
mod audit;
mod auth;
mod body;
mod credits;
pub mod error;
mod health;
mod import;
mod keys;
pub mod master;
pub mod oauth;
mod patch;
mod rotation;
mod secrets;
mod sites;
mod ui;
mod usage;
mod validate;
mod verify;
mod watched_body;

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use http::Method;

use crate::auth::cache::KeyCache;
use crate::credential::KeyHash;
use crate::metering::WallClock;
use crate::metrics::{Metrics, StoreCalls};
use crate::store::{RateLimitSpec, SharedStore};

pub use error::ApiError;
use error::StoreFailure;
pub use master::{ensure_master_key, MasterKey, MasterKeyError};

/// Largest request body the admin API reads.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the admin handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AdminState {
    store: SharedStore,
    /// Dropping a key's entry after each change is what makes the proxy enforce it at once.
    cache: Arc<KeyCache>,
    metrics: Arc<Metrics>,
    /// Settled once at start-up ([`ensure_master_key`]); `None` leaves the operator API shut.
    master: Option<KeyHash>,
    /// Held across each check-then-write (plan limit, last credential) in this process, one
    /// stripe per account (by hash of its id), so that writes to different accounts run side by
    /// side; with a shared store, [`AdminState::lock_account`] also takes the account's lock in
    /// the store, so that the rules hold across a fleet.
    writes: Arc<[Arc<tokio::sync::Mutex<()>>]>,
    /// What a config reload changes here: see [`AdminState::reconfigure`].
    live: Arc<ArcSwap<Live>>,
    /// `/readyz` pings: each failure counted (`op="ping"`), the outage logged once.
    pings: Arc<StoreCalls>,
    /// The API's own store calls (`op="admin"`), likewise: see [`watch_store`].
    store_calls: Arc<StoreCalls>,
    /// Places for heavy usage reads ([`MAX_HEAVY_USAGE_READS`]), shared by every account.
    heavy_usage_reads: Arc<tokio::sync::Semaphore>,
    /// Token requests per client id (`POST /oauth/token`), against guessing secrets.
    token_issues: Arc<oauth::IssueLimiter>,
    /// The gateway's clock (the proxy's): credential expiry is judged on it, as on the proxy.
    clock: WallClock,
    /// How long a request may take to its answer ([`ANSWER_DEADLINE`]).
    answer_deadline: std::time::Duration,
    /// The changes under way, each in its own task ([`bound_answer`]); the shutdown waits for
    /// them ([`AdminState::finish_changes`]).
    changes: tokio_util::task::TaskTracker,
}

/// The admin API's view of settings that a reload may change.
#[derive(Clone)]
pub(crate) struct Live {
    /// `limits.default`, for keys whose buckets this instance has not used yet.
    pub(crate) default_limits: RateLimitSpec,
    /// The proxy's routes by name, for `/v1/verify`'s `route`.
    pub(crate) routes: verify::Routes,
}

// === impl AdminState ===

impl AdminState {
    /// State over the given store, cache and metrics, accepting `master_hash` as the operator.
    pub fn new(
        store: SharedStore,
        cache: Arc<KeyCache>,
        metrics: Arc<Metrics>,
        master_hash: Option<KeyHash>,
    ) -> Self {
        AdminState {
            store,
            cache,
            pings: Arc::new(metrics.store_calls("ping")),
            store_calls: Arc::new(metrics.store_calls("admin")),
            metrics,
            master: master_hash,
            writes: (0..WRITE_STRIPES)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
            live: Arc::new(ArcSwap::from_pointee(Live {
                default_limits: crate::config::DEFAULT_RATE_LIMIT,
                routes: verify::routes(&[]),
            })),
            heavy_usage_reads: Arc::new(tokio::sync::Semaphore::new(MAX_HEAVY_USAGE_READS)),
            token_issues: Arc::new(oauth::issue_limiter()),
            clock: WallClock::System,
            answer_deadline: ANSWER_DEADLINE,
            changes: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Waits, `deadline` at most, for the changes still under way (the shutdown, once the
    /// listeners have drained): their usage and their store writes come before the final
    /// flush and the store's close.
    pub async fn finish_changes(&self, deadline: std::time::Duration) {
        if let Err(left) = crate::tasks::finish(&self.changes, deadline).await {
            tracing::warn!(left, "admin changes still waiting on the store at shutdown");
        }
    }

    /// Answers a request that has not been answered within `deadline` of its head with 503
    /// `store_unavailable` instead of [`ANSWER_DEADLINE`] (tests).
    pub fn with_answer_deadline(mut self, deadline: std::time::Duration) -> Self {
        self.answer_deadline = deadline;
        self
    }

    /// Judges credential expiry on `clock` (the proxy's) instead of the system's.
    pub fn with_clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    /// The proxy's routes, whose scopes and cost `/v1/verify` applies by name.
    pub fn with_routes(self, routes: &[crate::config::RouteSettings]) -> Self {
        let default_limits = self.live.load().default_limits;
        self.reconfigure(default_limits, routes);
        self
    }

    /// `limits.default`, for reporting keys and accounts that set no limits.
    pub fn with_default_limits(self, default: RateLimitSpec) -> Self {
        let live = Live {
            default_limits: default,
            ..Live::clone(&self.live.load())
        };
        self.live.store(Arc::new(live));
        self
    }

    /// A config reload: the default limits and the proxy's routes, for every clone of this
    /// state (calls under way finish on what they read).
    pub fn reconfigure(
        &self,
        default_limits: RateLimitSpec,
        routes: &[crate::config::RouteSettings],
    ) {
        self.live.store(Arc::new(Live {
            default_limits,
            routes: verify::routes(routes),
        }));
    }

    /// The settings in force now.
    pub(crate) fn live(&self) -> arc_swap::Guard<Arc<Live>> {
        self.live.load()
    }
}

/// Usage reads of more than 20,000 buckets that may run at once in this process; more wait up
/// to [`HEAVY_USAGE_WAIT`], then answer 503 `usage_busy`. Streamed, each holds about 1 MB
/// (a window of stored buckets and three chunks of JSON), so memory is not what this bounds: the
/// CPU is. The largest read encodes 27 MB of JSON, about 0.1 s of one core in a release build;
/// four at once leave the proxy (which shares the runtime's threads) at least half of a two-core
/// machine, and a fifth caller waits about as long as one of them takes.
pub const MAX_HEAVY_USAGE_READS: usize = 4;

/// How long a heavy usage read waits for a place before it answers 503 `usage_busy`.
const HEAVY_USAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl AdminState {
    /// A place among [`MAX_HEAVY_USAGE_READS`], held until the read's answer is sent;
    /// [`ApiError::UsageBusy`] when none frees up within [`HEAVY_USAGE_WAIT`].
    pub(crate) async fn heavy_usage_read(
        &self,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let places = Arc::clone(&self.heavy_usage_reads);
        match tokio::time::timeout(HEAVY_USAGE_WAIT, places.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a closed one would have no place either.
            Ok(Err(_)) | Err(_) => Err(ApiError::UsageBusy),
        }
    }
}

/// Stripes of the in-process account write lock: two accounts share one with odds 1 in 64.
const WRITE_STRIPES: usize = 64;

/// The stripe of [`AdminState::writes`] that guards `account_id`.
fn write_stripe(account_id: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    account_id.hash(&mut h);
    // The remainder is below WRITE_STRIPES, so it fits a usize.
    (h.finish() % WRITE_STRIPES as u64) as usize
}

/// An account's write lock, in this process and in the store; released on drop.
pub(crate) struct AccountLock {
    _local: tokio::sync::OwnedMutexGuard<()>,
    store: SharedStore,
    name: String,
    token: String,
}

impl AdminState {
    /// Serialises check-then-write changes to one account, across every instance sharing the
    /// store. Waits up to [`LOCK_WAIT`]; a lock that is never released (its holder died) expires
    /// after [`LOCK_TTL`].
    pub(crate) async fn lock_account(&self, account_id: &str) -> Result<AccountLock, ApiError> {
        // The local stripe's wait is bounded by the answer deadline: behind a change that a
        // hung disk holds, a later one (whose answer has gone by then) gives up instead of
        // queueing for as long as the disk hangs, while changes that merely queue behind a slow
        // one in the same stripe (a large import) still get their turn.
        let stripe = Arc::clone(&self.writes[write_stripe(account_id)]).lock_owned();
        let local = tokio::time::timeout(self.answer_deadline, stripe)
            .await
            .map_err(|_| ApiError::AccountBusy)?;
        let token = crate::credential::new_id("lock");
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        loop {
            if self.store.try_lock(account_id, &token, LOCK_TTL).await? {
                return Ok(AccountLock {
                    _local: local,
                    store: Arc::clone(&self.store),
                    name: account_id.to_owned(),
                    token,
                });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::AccountBusy);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

impl Drop for AccountLock {
    fn drop(&mut self) {
        let (store, name, token) = (
            Arc::clone(&self.store),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.token),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = store.unlock(&name, &token).await {
                    tracing::warn!(error = %e, "releasing an account lock failed; it expires by itself");
                }
            });
        }
    }
}

/// How long an API request may take from its head to its answer: its body's
/// [`watched_body::BODY_DEADLINE`] and as long again for the store. A hung disk (the embedded
/// store's calls queue behind blocked threads) would otherwise hold the request, its connection
/// and the account's write stripe for as long as the disk hangs; past it the request is dropped
/// (its stripe released) and answered 503 `store_unavailable`, saying that a change it asked for
/// may still be applied.
pub(crate) const ANSWER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a change waits for another instance's change to the same account.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// How long an account lock lasts if its holder never releases it.
const LOCK_TTL: std::time::Duration = std::time::Duration::from_secs(5);

// === functions ===

/// `POST /oauth/token`, the client-credentials grant, for the proxy listener ([`oauth`]).
pub fn token_router(state: AdminState) -> Router {
    Router::new()
        .route("/oauth/token", post(oauth::token))
        .layer(DefaultBodyLimit::max(MAX_TOKEN_REQUEST_BYTES))
        .layer(middleware::from_fn(watched_body::watch_body))
        .with_state(state)
}

/// The largest token request body: a form or JSON of three short fields.
const MAX_TOKEN_REQUEST_BYTES: usize = 4 * 1024;

/// The admin listener's routes. Serve with
/// `into_make_service_with_connect_info::<SocketAddr>()` so audit entries carry the caller's IP.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/v1/accounts", post(accounts::create).get(accounts::list))
        .route(
            "/v1/accounts/{account_id}",
            get(accounts::get)
                .patch(accounts::update)
                .delete(accounts::delete),
        )
        .route("/v1/account", get(accounts::get_own))
        .route("/v1/verify", post(verify::verify))
        .merge(ui::routes())
        .merge(account_routes("/v1/accounts/{account_id}"))
        .merge(account_routes("/v1/account"))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(state.clone(), bound_answer))
        .layer(middleware::from_fn_with_state(state.clone(), watch_store))
        .layer(middleware::from_fn(watched_body::watch_body))
        .with_state(state)
}

/// Answers a request that its handler has not answered within the state's answer deadline
/// ([`ANSWER_DEADLINE`]) with 503 `store_unavailable`.
///
/// A read (GET, HEAD, and `/v1/verify`, whose effects are in memory) is dropped at the
/// deadline, as it is when its client goes away. A change runs in a task of its own
/// ([`AdminState::changes`], which the shutdown waits for) and goes on after that answer: it
/// ends as it would have (its account's stripe held until the store answers, its audit entry
/// and cache invalidation made), so that no later change to the account reads the state
/// before it, and none of its effects is lost. No change is dropped, not even one whose body is
/// still unread: some change handlers take no body, so a body sent to them anyway stays unread
/// while they write, and dropping one mid-write would lose its cache invalidation (a revoked key would pass until
/// its cache ttl). The cost: a change holding an unread body keeps its HTTP/1 connection open
/// until the store answers.
async fn bound_answer(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let deadline = state.answer_deadline;
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD)
        && request.uri().path() != "/v1/verify";
    let answered = if changes {
        // A task's handle dropped at the deadline leaves the task running.
        tokio::time::timeout(deadline, state.changes.spawn(next.run(request))).await
    } else {
        tokio::time::timeout(deadline, next.run(request))
            .await
            .map(Ok)
    };
    match answered {
        Ok(Ok(response)) => response,
        Ok(Err(failed)) => {
            tracing::error!(error = %failed, "admin: a request's handler failed");
            ApiError::Internal.into_response()
        }
        Err(_) => ApiError::StoreTimeout { deadline, changes }.into_response(),
    }
}

/// Counts the API's requests that failed for an unreachable store, and logs the outage when it
/// begins and when it ends, once each: the first success under `/v1/` after failures ends it
/// (every such answer read the store; the admin API never serves keys or accounts from a cache).
async fn watch_store(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let api = request.uri().path().starts_with("/v1/");
    let response = next.run(request).await;
    match response.extensions().get::<StoreFailure>() {
        Some(StoreFailure(detail)) => state
            .store_calls
            .failed(detail, "admin requests answer 503 store_unavailable"),
        None if api && response.status().is_success() => state.store_calls.succeeded(),
        None => {}
    }
    response
}

/// An account's resources under one base path; both bases reach the same handlers.
fn account_routes(base: &str) -> Router<AdminState> {
    Router::new()
        .route(&format!("{base}/config"), get(account_config::get))
        .route(&format!("{base}/keys"), post(keys::create).get(keys::list))
        .route(&format!("{base}/keys/import"), post(import::import))
        .route(
            &format!("{base}/keys/{{key_id}}"),
            get(keys::get).patch(keys::update).delete(keys::delete),
        )
        .route(
            &format!("{base}/keys/{{key_id}}/deactivate"),
            post(keys::deactivate),
        )
        .route(
            &format!("{base}/keys/{{key_id}}/credits"),
            post(credits::post),
        )
        .route(
            &format!("{base}/keys/{{key_id}}/activate"),
            post(keys::activate),
        )
        .route(
            &format!("{base}/keys/{{key_id}}/renew"),
            post(rotation::renew),
        )
        .route(
            &format!("{base}/keys/{{key_id}}/roll"),
            post(rotation::roll),
        )
        .route(
            &format!("{base}/sites"),
            get(sites::list).post(sites::create),
        )
        .route(&format!("{base}/sites/{{site_id}}"), delete(sites::delete))
        .route(
            &format!("{base}/secrets"),
            get(secrets::list).post(secrets::create),
        )
        .route(
            &format!("{base}/secrets/{{secret_id}}"),
            delete(secrets::delete),
        )
        .route(&format!("{base}/audit"), get(audit::list))
        .route(&format!("{base}/audit/verify"), get(audit::verify))
        .route(&format!("{base}/keys/{{key_id}}/usage"), get(usage::key))
        .route(&format!("{base}/usage"), get(usage::account))
        .route(&format!("{base}/usage/keys"), get(usage::keys))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("path")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
