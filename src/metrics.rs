//! The Prometheus registry and every metric of the contract (section 6), with the handles the
//! request path uses resolved ahead of time. No per-key labels.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Buckets for a proxy: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The `op` labels of `tollgate_store_errors_total`: store methods, and `admin` for the admin
/// API's store calls.
const STORE_OPS: [&str; 8] = [
    "credits",
    "lookup_key",
    "add_usage",
    "prune_usage",
    "ping",
    "take_tokens",
    "publish_invalidation",
    "admin",
];

/// All metrics, registered in one registry.
pub struct Metrics {
    registry: Registry,
    /// `tollgate_requests_total{route,outcome,status_class}`.
    pub requests_total: IntCounterVec,
    /// `tollgate_request_duration_seconds`.
    pub request_duration: Histogram,
    /// `tollgate_upstream_duration_seconds`.
    pub upstream_duration: Histogram,
    /// `tollgate_rate_limited_total{window,shadow}`: `shadow="true"` counts what shadow mode
    /// let through.
    pub rate_limited_total: IntCounterVec,
    /// `tollgate_key_cache_hits_total`.
    pub key_cache_hits: IntCounter,
    /// `tollgate_key_cache_misses_total`.
    pub key_cache_misses: IntCounter,
    /// `tollgate_store_errors_total{op}`.
    pub store_errors_total: IntCounterVec,
    /// `tollgate_usage_flush_duration_seconds`.
    pub usage_flush_duration: Histogram,
    /// `tollgate_usage_pending_events`: (key, minute) buckets waiting to be written.
    pub usage_pending_events: IntGauge,
    /// `tollgate_connections_open`.
    pub connections_open: IntGauge,
    /// `tollgate_store_breaker_open`: 1 while the Redis store's circuit breaker refuses calls
    /// (or lets one probe through), else 0. Not in the contract's list; always 0 on the embedded
    /// store, which has no breaker.
    pub store_breaker_open: IntGauge,
    /// `tollgate_config_reloads_total{result}`: `SIGHUP` reloads, `result="success"` or
    /// `"failure"` (the file failed its checks and the running config kept serving).
    pub config_reloads_total: IntCounterVec,
    /// `tollgate_config_last_reload_successful`: 1 when the last reload (or the start) applied,
    /// 0 while the file on disk is one the gateway refused.
    pub config_last_reload_successful: IntGauge,
    /// `tollgate_config_last_reload_success_timestamp_seconds`: when the config in force was
    /// applied (the start, or the last good reload), in Unix seconds.
    pub config_last_reload_success: Gauge,
}

/// One kind of store call as this instance sees it: every failure is counted in
/// `tollgate_store_errors_total{op}`, and the turns from working to failing and back are logged
/// once each, not per call (a Redis outage under traffic would otherwise log every request).
pub struct StoreCalls {
    op: &'static str,
    errors: IntCounter,
    failing: AtomicBool,
}

/// `forwarded` counters of one route by status class, resolved once: the hot path does no label
/// lookup for a forwarded request.
#[derive(Clone)]
pub struct RouteCounters {
    by_class: [IntCounter; 5],
    /// `outcome="client_closed"`: forwarded, and the client went away before the upstream's
    /// head arrived.
    client_closed: IntCounter,
    /// `outcome="upstream_timeout"`: the upstream's body stalled past the idle timeout and was cut.
    body_stalled: IntCounter,
}

// === impl Metrics ===

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests_total = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Requests by route, outcome and status class",
            ),
            &["route", "outcome", "status_class"],
        )?;
        let request_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_request_duration_seconds",
                "Time from request head to response head",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_upstream_duration_seconds",
                "Time the upstream took to answer",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let rate_limited_total = IntCounterVec::new(
            Opts::new(
                "tollgate_rate_limited_total",
                "Requests refused by a rate-limit window (shadow=\"true\": would have been)",
            ),
            &["window", "shadow"],
        )?;
        let key_cache_hits = IntCounter::new(
            "tollgate_key_cache_hits_total",
            "Key lookups answered by the cache",
        )?;
        let key_cache_misses = IntCounter::new(
            "tollgate_key_cache_misses_total",
            "Key lookups that read the store",
        )?;
        let store_errors_total = IntCounterVec::new(
            Opts::new(
                "tollgate_store_errors_total",
                "Store operations that failed",
            ),
            &["op"],
        )?;
        let usage_flush_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_usage_flush_duration_seconds",
                "Time to write one usage batch",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let usage_pending_events = IntGauge::new(
            "tollgate_usage_pending_events",
            "Usage buckets counted but not yet stored",
        )?;
        let connections_open =
            IntGauge::new("tollgate_connections_open", "Open client connections")?;
        registry.register(Box::new(requests_total.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(rate_limited_total.clone()))?;
        registry.register(Box::new(key_cache_hits.clone()))?;
        registry.register(Box::new(key_cache_misses.clone()))?;
        registry.register(Box::new(store_errors_total.clone()))?;
        registry.register(Box::new(usage_flush_duration.clone()))?;
        registry.register(Box::new(usage_pending_events.clone()))?;
        let store_breaker_open = IntGauge::new(
            "tollgate_store_breaker_open",
            "1 while the store's circuit breaker fails calls at once (Redis not answering)",
        )?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(store_breaker_open.clone()))?;
        let config_reloads_total = IntCounterVec::new(
            Opts::new(
                "tollgate_config_reloads_total",
                "Config reloads (SIGHUP) by result: success or failure",
            ),
            &["result"],
        )?;
        let config_last_reload_successful = IntGauge::new(
            "tollgate_config_last_reload_successful",
            "1 when the last config reload applied, 0 when the file was refused",
        )?;
        let config_last_reload_success = Gauge::new(
            "tollgate_config_last_reload_success_timestamp_seconds",
            "When the config in force was applied (start or last good reload), Unix seconds",
        )?;
        registry.register(Box::new(config_reloads_total.clone()))?;
        registry.register(Box::new(config_last_reload_successful.clone()))?;
        registry.register(Box::new(config_last_reload_success.clone()))?;
        for result in ["success", "failure"] {
            config_reloads_total.with_label_values(&[result]);
        }
        // Exported at zero from the start, so that alerts and rate() see the series before the
        // first event.
        for op in STORE_OPS {
            store_errors_total.with_label_values(&[op]);
        }
        for window in ["minute", "hour", "day"] {
            for shadow in ["false", "true"] {
                rate_limited_total.with_label_values(&[window, shadow]);
            }
        }
        Ok(Metrics {
            registry,
            requests_total,
            request_duration,
            upstream_duration,
            rate_limited_total,
            key_cache_hits,
            key_cache_misses,
            store_errors_total,
            usage_flush_duration,
            usage_pending_events,
            connections_open,
            store_breaker_open,
            config_reloads_total,
            config_last_reload_successful,
            config_last_reload_success,
        })
    }

    /// Records a config applied at start (`reload: false`) or by a reload, or a reload refused
    /// (`applied: false`).
    pub fn config_loaded(&self, reload: bool, applied: bool) {
        if reload {
            let result = if applied { "success" } else { "failure" };
            self.config_reloads_total.with_label_values(&[result]).inc();
        }
        self.config_last_reload_successful.set(i64::from(applied));
        if applied {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.config_last_reload_success.set(now);
        }
    }

    /// The `forwarded` counters of a route.
    pub fn route_counters(&self, route: &str) -> RouteCounters {
        let c = |class: &str| {
            self.requests_total
                .with_label_values(&[route, "forwarded", class])
        };
        RouteCounters {
            by_class: [c("1xx"), c("2xx"), c("3xx"), c("4xx"), c("5xx")],
            client_closed: self
                .requests_total
                .with_label_values(&[route, "client_closed", "4xx"]),
            body_stalled: self.requests_total.with_label_values(&[
                route,
                "upstream_timeout",
                "5xx",
            ]),
        }
    }

    /// Counts a request a rate-limit `window` (`minute`, `hour`, `day`) refused, or in shadow
    /// mode would have refused.
    pub fn rate_limited(&self, window: &str, shadow: bool) {
        let shadow = if shadow { "true" } else { "false" };
        self.rate_limited_total
            .with_label_values(&[window, shadow])
            .inc();
    }

    /// Counts a request the gateway answered itself (`outcome` = the error code).
    pub fn refused(&self, route: &str, code: &str, status: u16) {
        self.requests_total
            .with_label_values(&[route, code, status_class(status)])
            .inc();
    }

    /// The failure counter and transition log of one `op` (a label of `STORE_OPS`).
    pub fn store_calls(&self, op: &'static str) -> StoreCalls {
        StoreCalls {
            op,
            errors: self.store_errors_total.with_label_values(&[op]),
            failing: AtomicBool::new(false),
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

// === impl StoreCalls ===

impl StoreCalls {
    /// Counts a failure; the first one since the calls last worked is logged, with what it
    /// means for traffic (`impact`).
    pub fn failed(&self, error: &dyn Display, impact: &str) {
        self.errors.inc();
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(op = self.op, error = %error, "store calls failing: {impact}");
        }
    }

    /// Notes a success; the first one after a failure is logged.
    pub fn succeeded(&self) {
        // Read first: while all is well, a success costs no write to a shared line.
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(op = self.op, "store calls work again");
        }
    }

    /// Whether the last call failed.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }
}

// === impl RouteCounters ===

impl RouteCounters {
    /// Counts one forwarded request by its status.
    pub fn inc(&self, status: u16) {
        let i = usize::from((status / 100).clamp(1, 5)) - 1;
        self.by_class[i].inc();
    }

    /// Counts one forwarded request whose client went away before the upstream answered.
    pub fn client_closed(&self) {
        self.client_closed.inc();
    }

    /// Counts one forwarded request whose upstream body stalled and was cut.
    pub fn body_stalled(&self) {
        self.body_stalled.inc();
    }
}

fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_calls_count_every_failure_and_flip_once_each_way() {
        let metrics = Metrics::new().expect("metrics");
        let calls = metrics.store_calls("take_tokens");
        calls.succeeded();
        assert!(!calls.is_failing());
        for _ in 0..3 {
            calls.failed(&"refused", "limits fall back to this instance");
        }
        assert!(calls.is_failing());
        assert_eq!(
            metrics
                .store_errors_total
                .with_label_values(&["take_tokens"])
                .get(),
            3
        );
        calls.succeeded();
        assert!(!calls.is_failing());
    }
}
