//! Usage retention: how far back each bucket size is kept (`metering.retention`), and the pruning
//! pass that the app runs hourly.

use std::time::Duration;

use crate::config::MeteringSettings;
use crate::metrics::Metrics;
use crate::store::{Granularity, Usage};

/// The first bucket index of `granularity` still kept at `now_ms`: buckets that ended more than
/// `retention` ago go.
pub fn first_kept(granularity: Granularity, retention: Duration, now_ms: i64) -> i64 {
    let keep_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let cutoff_ms = now_ms.saturating_sub(keep_ms);
    cutoff_ms.div_euclid(granularity.seconds() * 1_000)
}

/// The retention of one bucket size.
pub fn retention_of(settings: &MeteringSettings, granularity: Granularity) -> Duration {
    match granularity {
        Granularity::Minute => settings.retention_minute,
        Granularity::Hour => settings.retention_hour,
        Granularity::Day => settings.retention_day,
    }
}

/// Removes expired buckets of every size. Failures are counted and logged; the next pass retries.
pub async fn prune(store: &dyn Usage, settings: &MeteringSettings, metrics: &Metrics, now_ms: i64) {
    for g in Granularity::ALL {
        let before = first_kept(g, retention_of(settings, g), now_ms);
        match store.prune_usage(g, before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(granularity = ?g, removed = n, "pruned usage buckets"),
            Err(e) => {
                metrics
                    .store_errors_total
                    .with_label_values(&["prune_usage"])
                    .inc();
                tracing::warn!(error = %e, granularity = ?g, "pruning usage failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_keep_exactly_the_retention() {
        let day_ms = 86_400_000;
        let now = 20_000 * day_ms + 1_000; // one second into day 20 000
                                           // 48 h of minutes: the minute that began exactly 48 h before now's minute is the first kept.
        assert_eq!(
            first_kept(Granularity::Minute, Duration::from_secs(48 * 3600), now),
            (now - 2 * day_ms) / 60_000
        );
        assert_eq!(
            first_kept(Granularity::Day, Duration::from_secs(2 * 86_400), now),
            19_998
        );
        assert_eq!(
            first_kept(Granularity::Hour, Duration::from_secs(3600), now),
            20_000 * 24 - 1
        );
    }
}
