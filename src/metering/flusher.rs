//! The flusher task: every `flush_interval`, take the dirty cells' counts and write them to the
//! store in one batch. A failed write keeps the counts pending (merged, so memory stays bounded
//! by key-minutes) and retries on the next tick; shutdown flushes one last time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{Meter, Pending};
use crate::metrics::Metrics;
use crate::store::SharedStore;

/// The most (key, minute) buckets kept while the store is failing, about 100 MB: a store that is
/// away longer than that loses the oldest counts first, and says so.
pub const MAX_PENDING_BUCKETS: usize = 1_000_000;

/// Runs until `shutdown` turns true, then drains and writes what is left (bounded by
/// `final_deadline`).
pub async fn run(
    meter: Arc<Meter>,
    store: SharedStore,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    final_deadline: Duration,
) {
    let mut pending = Pending::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => break,
        }
        flush_once(&meter, &store, &metrics, &mut pending, &mut failing).await;
    }
    let last = flush_once(&meter, &store, &metrics, &mut pending, &mut failing);
    if tokio::time::timeout(final_deadline, last).await.is_err() || !pending.is_empty() {
        tracing::error!(
            buckets = pending.len(),
            "usage counts could not be written before shutdown"
        );
    }
}

/// Drains the meter and writes everything pending; returns whether the store took it.
pub async fn flush_once(
    meter: &Meter,
    store: &SharedStore,
    metrics: &Metrics,
    pending: &mut Pending,
    failing: &mut bool,
) -> bool {
    meter.drain_into(pending);
    metrics
        .usage_pending_events
        .set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
    if pending.is_empty() {
        return true;
    }
    let batch = pending.batch();
    let timer = metrics.usage_flush_duration.start_timer();
    let result = store.add_usage(&batch).await;
    timer.observe_duration();
    match result {
        Ok(()) => {
            pending.clear();
            metrics.usage_pending_events.set(0);
            if std::mem::take(failing) {
                tracing::info!("usage writes recovered");
            }
            true
        }
        Err(e) => {
            metrics
                .store_errors_total
                .with_label_values(&["add_usage"])
                .inc();
            if !std::mem::replace(failing, true) {
                tracing::warn!(error = %e, buckets = pending.len(), "usage write failed; counts kept and retried");
            }
            false
        }
    }
}
