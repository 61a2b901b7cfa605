//! Wiring: settings → store, shared state, bound listeners and background tasks → a
//! [`Running`] gateway that stops gracefully. Tests start a whole gateway with [`start`] on
//! port 0. A [`Running`] gateway reloads its config ([`Running::reload`], on `SIGHUP`).

mod reload;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::ConnectInfo;
use http_body_util::Either;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::admin::{self, AdminState};
use crate::auth::cache::KeyCache;
use crate::config::{ConfigError, Durability, LimitMode, MeteringSettings, Settings};
use crate::credits::{self, CreditLeases};
use crate::limits::global::SharedLimiters;
use crate::limits::Limiters;
use crate::listener::{self, ConnLimits};
use crate::metering::wal::{self, Wal};
use crate::metering::{flusher, retention, Meter, WallClock};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::store::{self, OpenOptions, SharedStore};
use crate::tls::Certificates;
use reload::Reloader;
pub use reload::{ReloadError, Reloaded};

/// How long in-flight requests get to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);
/// Largest request head accepted.
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// How long a write to a client may wait for the client to take any bytes before the
/// connection is closed (nginx's `send_timeout`, whose default this is): a client that stops
/// reading an answer holds its upstream connection no longer than this.
const SEND_STALL: Duration = Duration::from_secs(60);
/// How often the cache and registries drop what is no longer needed.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// `limits.mode = "global"` on a store that instances cannot share.
    #[error("limits.mode = \"global\" needs a store shared by every instance (store.backend = \"redis\")")]
    NotShared,
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The master key setup failed.
    #[error("master key: {0}")]
    MasterKey(#[from] admin::master::MasterKeyError),
    /// Metrics could not be registered (a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A listener's TLS certificate or key cannot be served.
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The usage write-ahead log could not be opened or replayed.
    #[error("{0}")]
    UsageLog(#[from] crate::metering::wal::WalError),
    /// A configured header prefix is not a valid header name.
    #[error("identity header prefix: {0}")]
    HeaderPrefix(#[from] http::header::InvalidHeaderName),
}

/// Start-up inputs that do not come from the config file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The raw master key, when the configured variable holds one.
    pub master_key: Option<String>,
    /// The wall clock for metering (tests inject one).
    pub clock: WallClock,
}

/// A started gateway.
pub struct Running {
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// A master key generated at this start (no key was configured or stored); show it once.
    pub generated_master_key: Option<String>,
    /// Stops the listeners (phase one of a shutdown).
    stop_serving: watch::Sender<bool>,
    /// The listeners: they drain in-flight requests before they end.
    serving: JoinSet<()>,
    /// Stops the flusher and the other background tasks (phase two, after the drain).
    stop_background: watch::Sender<bool>,
    background: JoinSet<()>,
    /// What [`Running::reload`] changes.
    reloader: Reloader,
}

/// Opens the store, binds both listeners and starts serving.
pub async fn start(settings: Settings, options: StartOptions) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new()?);
    let store = store::open(
        &settings.store,
        OpenOptions {
            retention: reload::retention(&settings.metering),
            breaker_gauge: Some(metrics.store_breaker_open.clone()),
        },
    )
    .await?;
    let mut meter = Meter::new(options.clock);
    if let Durability::Wal {
        path,
        sync_interval,
    } = &settings.metering.durability
    {
        meter = meter.with_wal(open_usage_log(path, *sync_interval, &store).await?);
    }
    let meter = Arc::new(meter);
    let limiters = Arc::new(Limiters::new());
    let mut cache = KeyCache::new(
        Arc::clone(&store),
        Arc::clone(&limiters),
        Arc::clone(&meter),
        Arc::clone(&metrics),
        settings.cache,
        settings.limits.default,
        settings.limits.on_store_error,
    );
    if settings.limits.mode == LimitMode::Global {
        // Config allows global limits only on a shared store (`check-config` says so).
        let buckets = Arc::clone(&store)
            .limit_buckets()
            .ok_or(StartError::NotShared)?;
        let shared = SharedLimiters::new(buckets, settings.limits.on_store_error, &metrics);
        cache = cache.with_shared_limits(Arc::new(shared));
    }
    let cache = Arc::new(cache);
    // Before any request: whether a malformed credential may be an imported key.
    cache.read_imported().await;
    let master = admin::master::ensure_master_key(&*store, options.master_key.as_deref()).await?;
    // Swapped whole by a reload; each request holds the one it started with.
    let proxy = Arc::new(ArcSwap::from_pointee(Proxy::new(
        &settings,
        Arc::clone(&cache),
        Arc::clone(&meter),
        Arc::clone(&metrics),
    )?));
    let admin_state = AdminState::new(
        Arc::clone(&store),
        Arc::clone(&cache),
        Arc::clone(&metrics),
        Some(master.hash),
    )
    .with_default_limits(settings.limits.default)
    .with_routes(&settings.routes)
    .with_clock(meter.clock().clone());
    let admin_router = admin::router(admin_state.clone());

    let proxy_tls = settings
        .proxy
        .tls
        .clone()
        .map(Certificates::open)
        .transpose()?;
    let admin_tls = settings
        .admin
        .tls
        .clone()
        .map(Certificates::open)
        .transpose()?;
    let proxy_listener = bind(settings.proxy.listen).await?;
    let admin_listener = bind(settings.admin.listen).await?;
    let proxy_addr = local_addr(&proxy_listener, settings.proxy.listen)?;
    let admin_addr = local_addr(&admin_listener, settings.admin.listen)?;
    let limits = ConnLimits {
        header_timeout: settings.proxy.request_header_timeout,
        max_header_bytes: MAX_HEADER_BYTES,
        drain: DRAIN,
        send_stall: SEND_STALL,
        max_connections: listener::connection_cap(),
    };
    // Two phases: the listeners stop and drain first, so that requests finishing during the
    // drain are still counted by the flusher's final write.
    let (stop_serving, signal) = watch::channel(false);
    let (stop_background, background_signal) = watch::channel(false);
    let mut serving = JoinSet::new();
    let mut background = JoinSet::new();
    // With `expose_account_api`, `/v1/account` and `/v1/account/…` on the proxy listener go to
    // the admin router (the operator's `/v1/accounts` never does); everything else is proxied.
    // The choice is made here so that `proxy` and `admin` stay independent of each other.
    let account_api = admin_router.clone();
    // `POST /oauth/token` (the client-credentials grant) is on the proxy listener too.
    let token_api = admin::token_router(admin_state.clone());
    let serving_proxy = Arc::clone(&proxy);
    serving.spawn(listener::serve(
        proxy_listener,
        proxy_tls.as_ref().map(Certificates::server_config),
        move |req: http::Request<hyper::body::Incoming>, peer| {
            let proxy = serving_proxy.load_full();
            let path = req.uri().path();
            let admin = if path == "/oauth/token" {
                Some(token_api.clone())
            } else if proxy.exposes_account_api() && is_account_path(path) {
                Some(account_api.clone())
            } else {
                None
            };
            async move {
                match admin {
                    Some(router) => call_admin(router, req, peer).await.map(Either::Right),
                    None => proxy.handle(req, peer).await.map(Either::Left),
                }
            }
        },
        limits,
        Some(metrics.connections_open.clone()),
        signal.clone(),
    ));
    serving.spawn(listener::serve(
        admin_listener,
        admin_tls.as_ref().map(Certificates::server_config),
        move |req: http::Request<hyper::body::Incoming>, peer| {
            call_admin(admin_router.clone(), req, peer)
        },
        limits,
        None,
        signal,
    ));
    let signal = background_signal;
    let (flush_interval, flush_every) = watch::channel(settings.metering.flush_interval);
    background.spawn(flusher::run(
        Arc::clone(&meter),
        store.clone(),
        Arc::clone(&metrics),
        flush_every,
        signal.clone(),
        DRAIN,
    ));
    // Shared stores tell every instance about changes made through any of them.
    if let Some(events) = store.subscribe_invalidations().await {
        background.spawn(follow_invalidations(
            Arc::clone(&cache),
            events,
            signal.clone(),
        ));
    }
    background.spawn(give_back_credits(
        Arc::clone(cache.credits()),
        meter.clock().clone(),
        signal.clone(),
    ));
    let (metering, metering_now) = watch::channel(settings.metering.clone());
    let cleanup = Sweep {
        cache: Arc::clone(&cache),
        meter: Arc::clone(&meter),
        limiters,
        store: Arc::clone(&store),
        metrics: Arc::clone(&metrics),
        metering: metering_now,
    };
    background.spawn(sweep(cleanup, signal));
    tracing::info!(%proxy_addr, %admin_addr, routes = settings.routes.len(), "tollgate is serving");
    metrics.config_loaded(false, true);
    Ok(Running {
        proxy_addr,
        admin_addr,
        generated_master_key: master.generated,
        stop_serving,
        serving,
        stop_background,
        background,
        reloader: Reloader {
            settings: parking_lot::Mutex::new(settings),
            proxy,
            cache,
            metrics,
            admin: admin_state,
            store,
            flush_interval,
            metering,
            proxy_tls,
            admin_tls,
        },
    })
}

// === impl Running ===

impl Running {
    /// What `SIGHUP` does, given the config file as read again: a config that passed its
    /// checks is applied to new requests (routes and upstreams, default limits, trusted proxies,
    /// cache ttls, metering, identity, the listeners' TLS certificates, read again even from
    /// unchanged files); requests in flight finish on the old one and no connection is dropped.
    /// Settings bound at start are kept and named in [`Reloaded::needs_restart`]. A config
    /// that failed its checks, or one whose certificates cannot be served, changes nothing:
    /// every problem is logged and the running config keeps serving. Counted in
    /// `tollgate_config_reloads_total{result}`.
    pub fn reload(&self, fresh: Result<Settings, ConfigError>) -> Result<Reloaded, ReloadError> {
        self.reloader.reload(fresh)
    }

    /// Stops accepting, lets in-flight requests finish (bounded), closes WebSocket tunnels,
    /// flushes usage, and returns when every task has ended and the store is closed.
    pub async fn shutdown(mut self) {
        let _ = self.stop_serving.send(true);
        join_all(&mut self.serving).await;
        // WebSocket tunnels outlive their connections' tasks: closed once the drain is over,
        // and counted before the final flush. Admin changes answered at their deadline run on
        // in tasks of their own: waited for (the drain's time at most) for the same reason.
        self.reloader.proxy.load().tunnels().close().await;
        self.reloader.admin.finish_changes(DRAIN).await;
        let _ = self.stop_background.send(true);
        join_all(&mut self.background).await;
        tracing::info!("tollgate stopped");
    }
}

async fn join_all(tasks: &mut JoinSet<()>) {
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            tracing::error!(error = %e, "a task failed during shutdown");
        }
    }
}

/// `/v1/account` or below it: the account API's own paths.
fn is_account_path(path: &str) -> bool {
    path.strip_prefix("/v1/account")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

async fn call_admin(
    router: axum::Router,
    mut req: http::Request<hyper::body::Incoming>,
    peer: SocketAddr,
) -> http::Response<axum::body::Body> {
    req.extensions_mut().insert(ConnectInfo(peer));
    match router.oneshot(req).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// Opens the usage log, replays what a crash left in it into the store (before anything is
/// served, so that no count waits on traffic) and starts its writer.
async fn open_usage_log(
    dir: &std::path::Path,
    sync_interval: Duration,
    store: &SharedStore,
) -> Result<Arc<Wal>, StartError> {
    let log = Wal::open(dir, sync_interval)?;
    let replayed = wal::replay(dir, &**store).await?;
    if replayed.segments > 0 {
        tracing::info!(
            segments = replayed.segments,
            buckets = replayed.buckets,
            torn_bytes = replayed.torn_bytes,
            corrupt = replayed.corrupt,
            "replayed the usage log left by the last run"
        );
    }
    log.start()?;
    Ok(log)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    crate::listener::bind(addr).map_err(|source| StartError::Bind { addr, source })
}

fn local_addr(listener: &TcpListener, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })
}

/// Applies invalidations published by any instance until shutdown.
async fn follow_invalidations(
    cache: Arc<KeyCache>,
    mut events: tokio::sync::mpsc::Receiver<crate::store::InvalidationEvent>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => cache.apply(&event),
                None => return,
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// What the periodic clean-up touches.
struct Sweep {
    cache: Arc<KeyCache>,
    meter: Arc<Meter>,
    limiters: Arc<Limiters>,
    store: SharedStore,
    metrics: Arc<Metrics>,
    /// `[metering]` in force (retention), changed by a reload.
    metering: watch::Receiver<MeteringSettings>,
}

/// Every second, hands back the credit leases of keys idle for a second; at shutdown (after the
/// drain) all of them, so that the store's figures are exact once this instance stops.
async fn give_back_credits(
    leases: Arc<CreditLeases>,
    clock: WallClock,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(credits::IDLE_MS as u64));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => break,
        }
        // Raced against the shutdown, as the last hand-back is bounded: a hung store must not
        // hold it. A lease not handed back returns by itself once this instance is silent.
        tokio::select! {
            () = leases.give_back_idle(clock.now_ms(), false) => {}
            _ = shutdown.changed() => break,
        }
    }
    let last = leases.give_back_idle(clock.now_ms(), true);
    if tokio::time::timeout(HAND_BACK_DEADLINE, last)
        .await
        .is_err()
    {
        tracing::warn!(
            "credit leases not all handed back at shutdown; the store takes them back once \
             this instance is silent"
        );
    }
}

/// How long the shutdown waits for the credit leases to be handed back.
const HAND_BACK_DEADLINE: Duration = Duration::from_secs(5);

async fn sweep(s: Sweep, mut shutdown: watch::Receiver<bool>) {
    let Sweep {
        cache,
        meter,
        limiters,
        store,
        metrics,
        metering,
    } = s;
    let mut ticker = tokio::time::interval(SWEEP_EVERY);
    let mut rounds: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        // Hourly, starting with the first tick: expired usage buckets. Raced against the
        // shutdown: on a hung disk a prune never returns.
        if rounds.is_multiple_of(60) {
            let settings = metering.borrow().clone();
            let now_ms = meter.clock().now_ms();
            let prune = async {
                retention::prune(&*store, &settings, &metrics, now_ms).await;
                if let Err(e) = store.prune_tokens(chrono::Utc::now()).await {
                    tracing::warn!(error = %e, "expired access tokens not pruned; next hour again");
                }
            };
            tokio::select! {
                () = prune => {}
                _ = shutdown.changed() => return,
            }
        }
        rounds += 1;
        cache.sweep();
        meter.prune_unused();
        // Hourly; an account's buckets idle for 25 hours have refilled even their day window.
        if rounds.is_multiple_of(60) {
            limiters.prune_idle(25);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_the_account_paths_are_the_account_api() {
        assert!(super::is_account_path("/v1/account"));
        assert!(super::is_account_path("/v1/account/keys"));
        assert!(!super::is_account_path("/v1/accounts"));
        assert!(!super::is_account_path("/v1/accounts/acc_1/keys"));
        assert!(!super::is_account_path("/v1/accountx"));
    }
}
