//! A config reload (`SIGHUP`): the file read again and checked exactly as at start, then
//! applied all at once or not at all.
//!
//! Everything that can fail is prepared first (the new proxy, the TLS pairs of new or changed
//! files); only when all of it succeeded is anything swapped. Requests in flight finish on the
//! proxy they started with (each holds its own `Arc`), new ones get the new one; listeners and
//! connections are not touched. Settings bound at start (addresses, the store, TLS on or off,
//! the limit mode) keep their running values, and each one the file changed is named in a
//! warning: they need a restart.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::admin::AdminState;
use crate::auth::cache::KeyCache;
use crate::config::{ConfigError, MeteringSettings, Settings};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::store::{Granularity, SharedStore};
use crate::tls::{self, Certificates, TlsFiles};

/// Why a reload was refused; the config in force keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file failed its checks (every problem is listed).
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// A listener's new certificate or key cannot be served.
    #[error("{listener}.tls: {source}")]
    Tls {
        /// `proxy` or `admin`.
        listener: &'static str,
        /// Why.
        source: tls::TlsError,
    },
    /// The identity header prefix is not a header name.
    #[error("identity.header_prefix: {0}")]
    HeaderPrefix(#[from] http::header::InvalidHeaderName),
}

/// What a reload that applied changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The sections whose settings changed and took effect (`routes`, `limits`, …).
    pub applied: Vec<&'static str>,
    /// Fields the file changed that keep their running value until a restart.
    pub needs_restart: Vec<&'static str>,
}

/// What a reload reaches into: the handles of the running gateway's parts that read settings.
pub(super) struct Reloader {
    /// The settings in force; held through a reload, so that two never interleave.
    pub(super) settings: Mutex<Settings>,
    pub(super) proxy: Arc<ArcSwap<Proxy>>,
    pub(super) cache: Arc<KeyCache>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) admin: AdminState,
    pub(super) store: SharedStore,
    pub(super) flush_interval: watch::Sender<Duration>,
    pub(super) metering: watch::Sender<MeteringSettings>,
    pub(super) proxy_tls: Option<Arc<Certificates>>,
    pub(super) admin_tls: Option<Arc<Certificates>>,
}

// === impl Reloader ===

impl Reloader {
    /// Applies `fresh` (the file as read again), or keeps the running config when it failed
    /// its checks or cannot be applied. Logs and counts the outcome either way.
    pub(super) fn reload(
        &self,
        fresh: Result<Settings, ConfigError>,
    ) -> Result<Reloaded, ReloadError> {
        let outcome = fresh.map_err(ReloadError::from).and_then(|f| self.apply(f));
        self.metrics.config_loaded(true, outcome.is_ok());
        match &outcome {
            Ok(done) => {
                for field in &done.needs_restart {
                    tracing::warn!(
                        field,
                        "config reload: this setting changed in the file but takes effect only \
                         after a restart; the running value is kept"
                    );
                }
                tracing::info!(changed = ?done.applied, "reloaded the config");
            }
            Err(ReloadError::Config(e)) => {
                for p in &e.problems {
                    tracing::error!(
                        file = %e.file.display(),
                        field = %p.field,
                        problem = %p.message,
                        "config reload refused; the running config keeps serving"
                    );
                }
            }
            Err(e) => tracing::error!(
                error = %e,
                "config reload refused; the running config keeps serving"
            ),
        }
        outcome
    }

    fn apply(&self, fresh: Settings) -> Result<Reloaded, ReloadError> {
        let mut running = self.settings.lock();
        let (fresh, needs_restart) = keep_bound_at_start(&running, fresh);
        // Everything that can fail, before anything changes.
        // Upstreams that did not change keep their idle connections.
        let proxy = self.proxy.load().reloaded(&fresh)?;
        let proxy_pair = prepare_tls("proxy", &self.proxy_tls, fresh.proxy.tls.as_ref())?;
        let admin_pair = prepare_tls("admin", &self.admin_tls, fresh.admin.tls.as_ref())?;

        let applied = changed_sections(&running, &fresh);
        self.proxy.store(Arc::new(proxy));
        for (certificates, pair) in [(&self.proxy_tls, proxy_pair), (&self.admin_tls, admin_pair)] {
            if let (Some(certificates), Some((files, pair))) = (certificates, pair) {
                let cert = files.cert.display().to_string();
                certificates.install(files, pair);
                tracing::info!(%cert, "reloaded the TLS certificate");
            }
        }
        self.cache.retune(fresh.cache, fresh.limits.default);
        self.admin.reconfigure(fresh.limits.default, &fresh.routes);
        self.flush_interval
            .send_if_modified(|every| replace(every, fresh.metering.flush_interval));
        self.store.set_retention(&retention(&fresh.metering));
        self.metering.send_replace(fresh.metering.clone());
        *running = fresh;
        Ok(Reloaded {
            applied,
            needs_restart,
        })
    }
}

/// `metering.retention` as the store takes it.
pub(super) fn retention(metering: &MeteringSettings) -> Vec<(Granularity, Duration)> {
    Granularity::ALL
        .into_iter()
        .map(|g| (g, crate::metering::retention::retention_of(metering, g)))
        .collect()
}

fn replace<T: PartialEq>(slot: &mut T, value: T) -> bool {
    let changed = *slot != value;
    *slot = value;
    changed
}

/// A listener's certificate pair read from `files` (the same files again, or new ones) and
/// checked; `None` for a listener without TLS.
fn prepare_tls(
    listener: &'static str,
    certificates: &Option<Arc<Certificates>>,
    files: Option<&TlsFiles>,
) -> Result<Option<(TlsFiles, Arc<rustls::sign::CertifiedKey>)>, ReloadError> {
    let (Some(_), Some(files)) = (certificates, files) else {
        return Ok(None);
    };
    let pair = tls::load(files, std::time::SystemTime::now())
        .map_err(|source| ReloadError::Tls { listener, source })?;
    Ok(Some((files.clone(), pair)))
}

/// `fresh` with the settings bound at start put back to their running values, and the names of
/// those the file changed.
fn keep_bound_at_start(running: &Settings, mut fresh: Settings) -> (Settings, Vec<&'static str>) {
    let mut changed = Vec::new();
    let (f, r) = (&mut fresh, running);
    keep(
        &mut changed,
        "proxy.listen",
        &mut f.proxy.listen,
        &r.proxy.listen,
    );
    keep_tls(&mut changed, "proxy.tls", &mut f.proxy.tls, &r.proxy.tls);
    keep(
        &mut changed,
        "proxy.request_header_timeout",
        &mut f.proxy.request_header_timeout,
        &r.proxy.request_header_timeout,
    );
    keep(
        &mut changed,
        "admin.listen",
        &mut f.admin.listen,
        &r.admin.listen,
    );
    keep_tls(&mut changed, "admin.tls", &mut f.admin.tls, &r.admin.tls);
    keep(
        &mut changed,
        "admin.master_key_env",
        &mut f.admin.master_key_env,
        &r.admin.master_key_env,
    );
    keep(&mut changed, "store", &mut f.store, &r.store);
    keep(
        &mut changed,
        "limits.mode",
        &mut f.limits.mode,
        &r.limits.mode,
    );
    keep(
        &mut changed,
        "limits.on_store_error",
        &mut f.limits.on_store_error,
        &r.limits.on_store_error,
    );
    keep(
        &mut changed,
        "metering.durability",
        &mut f.metering.durability,
        &r.metering.durability,
    );
    (fresh, changed)
}

/// Puts `running` back into `fresh` and names `field` when the file changed it.
fn keep<T: PartialEq + Clone>(
    changed: &mut Vec<&'static str>,
    field: &'static str,
    fresh: &mut T,
    running: &T,
) {
    if fresh != running {
        changed.push(field);
        fresh.clone_from(running);
    }
}

/// Like [`keep`] for a listener's TLS: its certificate files are reloaded, but a listener
/// turned to or from TLS is another listener.
fn keep_tls(
    changed: &mut Vec<&'static str>,
    field: &'static str,
    fresh: &mut Option<TlsFiles>,
    running: &Option<TlsFiles>,
) {
    if fresh.is_some() != running.is_some() {
        changed.push(field);
        fresh.clone_from(running);
    }
}

/// The sections that differ between two configs, for the log.
fn changed_sections(old: &Settings, new: &Settings) -> Vec<&'static str> {
    // Settings are compared through their debug form, which shows every field but the
    // identity secret; that one is compared by value.
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let secret = |s: &Settings| s.identity.signing.as_ref().map(|s| Arc::clone(&s.secret));
    let mut changed = Vec::new();
    for (name, differ) in [
        ("proxy", differs(&old.proxy, &new.proxy)),
        ("admin", differs(&old.admin, &new.admin)),
        ("cache", old.cache != new.cache),
        ("limits", differs(&old.limits, &new.limits)),
        ("metering", differs(&old.metering, &new.metering)),
        (
            "identity",
            differs(&old.identity, &new.identity) || secret(old) != secret(new),
        ),
        ("routes", differs(&old.routes, &new.routes)),
    ] {
        if differ {
            changed.push(name);
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &str) -> Settings {
        let toml = format!(
            "[proxy]\nlisten = \"127.0.0.1:8080\"\n[admin]\nlisten = \"127.0.0.1:9090\"\n\
             [store]\npath = \"a.db\"\n{extra}\n[[routes]]\nname = \"api\"\npath_prefix = \"/\"\n\
             upstreams = [\"http://127.0.0.1:8000\"]\n"
        );
        crate::config::load_from_str(&toml, std::path::Path::new("t.toml"), Vec::new())
            .expect("valid")
    }

    #[test]
    fn settings_bound_at_start_keep_their_running_values_and_are_named() {
        let running = settings("");
        let mut fresh = settings("");
        fresh.proxy.listen = "127.0.0.1:1".parse().expect("addr");
        fresh.store = crate::config::StoreSettings::Embedded {
            path: "b.db".into(),
        };
        fresh.limits.mode = crate::config::LimitMode::Global;
        fresh.cache.ttl = Duration::from_secs(1);
        let (kept, named) = keep_bound_at_start(&running, fresh);
        assert_eq!(named, ["proxy.listen", "store", "limits.mode"]);
        assert_eq!(kept.proxy.listen, running.proxy.listen);
        assert_eq!(kept.store, running.store);
        assert_eq!(kept.limits.mode, running.limits.mode);
        // What a reload may change goes through.
        assert_eq!(kept.cache.ttl, Duration::from_secs(1));
        assert_eq!(changed_sections(&running, &kept), ["cache"]);
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let (kept, named) = keep_bound_at_start(&settings(""), settings(""));
        assert!(named.is_empty());
        assert!(changed_sections(&settings(""), &kept).is_empty());
        let limits = settings("[limits]\ndefault = { per_minute = 5 }");
        assert_eq!(changed_sections(&settings(""), &limits), ["limits"]);
    }
}
