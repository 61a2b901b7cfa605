//! The flusher task: every `flush_interval`, take the dirty keys' counts and write them to the
//! store, in batches of at most [`BATCH_BUCKETS`] (key, minute) buckets. A failed batch is kept
//! as it is, with its id, and sent again on the next tick before anything newer (the store
//! applies each id once, so a write that was applied but whose answer was lost is not counted
//! twice); counts arriving meanwhile merge into the next batch. While the store fails, what
//! waits is capped at `max_buckets`, oldest minutes dropped first; shutdown flushes one last
//! time.
//!
//! With the write-ahead log ([`super::wal`]) the counts come from rotating the log instead of
//! from the cells, a batch's id is (the log's writer, its last segment), and the segments are
//! released once the store took it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::wal::Wal;
use super::{cap_oldest, Meter, Pending};
use crate::metrics::{Metrics, StoreCalls};
use crate::store::{BatchId, StoreError, Usage, UsageDelta};

/// The most (key, minute) buckets kept while the store is failing, about 100 MB: a store that is
/// away longer than that loses the oldest counts first, and says so.
pub const MAX_PENDING_BUCKETS: usize = 1_000_000;

/// The most (key, minute) buckets one batch carries. A flush of many keys' counts is written as
/// several batches of this size, taken from the cells one batch at a time: what a flush holds
/// at once (the counts taken, the batch, its encoding, the store's transaction) is bounded by
/// this and not by the number of keys, so a million keys' flush leaves no million keys' worth
/// of freed memory behind in the allocator.
pub const BATCH_BUCKETS: usize = 10_000;

/// What the flusher carries from one flush to the next.
pub struct Backlog {
    /// The batch last sent without success, with its id: sent again unchanged until the store
    /// takes it, because a failed call may still have been applied.
    in_flight: Option<(BatchId, Pending)>,
    /// Counts drained since that batch was made, merged by (key, minute).
    pending: Pending,
    /// The id the next batch made from `pending` gets (without the log).
    next_id: BatchId,
    /// With the log: the last segment whose counts are in `pending`.
    pending_seq: Option<u64>,
    /// The most buckets kept, in flight and pending together, while the store fails.
    max_buckets: usize,
    /// `add_usage` calls: each failure counted, the outage logged once.
    calls: StoreCalls,
    /// Buckets dropped by the cap since the store began failing.
    dropped: u64,
    /// With the log: a rotation whose flush was cut off (by the shutdown) before it ended. Its
    /// closed segment's counts come from this handle only, so the next flush takes them from
    /// it instead of rotating again.
    rotating: Option<JoinHandle<Option<(u64, Pending)>>>,
}

// === impl Backlog ===

impl Backlog {
    /// An empty backlog that keeps at most `max_buckets` while the store fails
    /// ([`MAX_PENDING_BUCKETS`] in the gateway), counting failures in `metrics`.
    pub fn new(max_buckets: usize, metrics: &Metrics) -> Self {
        Backlog {
            in_flight: None,
            pending: Pending::default(),
            next_id: BatchId::first(),
            pending_seq: None,
            max_buckets,
            calls: metrics.store_calls("add_usage"),
            dropped: 0,
            rotating: None,
        }
    }

    /// (key, minute) buckets waiting, in flight and pending.
    pub fn len(&self) -> usize {
        self.in_flight.as_ref().map_or(0, |(_, b)| b.len()) + self.pending.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Buckets dropped by the cap during the current outage (0 once the store took a batch).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The batch to send: the one in flight, else a new one made from what is pending.
    fn batch(&mut self, wal: Option<&Wal>) -> Option<(BatchId, Vec<UsageDelta>)> {
        if self.in_flight.is_none() && !self.pending.is_empty() {
            let id = match (wal, self.pending_seq.take()) {
                (Some(wal), Some(seq)) => wal.batch_id(seq),
                _ => {
                    let id = self.next_id;
                    self.next_id = id.next();
                    id
                }
            };
            // A batch of the log is one segment's counts under that segment's id: never split.
            let batch = match wal {
                Some(_) => std::mem::take(&mut self.pending),
                None => self.pending.take_at_most(BATCH_BUCKETS),
            };
            self.in_flight = Some((id, batch));
        }
        self.in_flight.as_ref().map(|(id, b)| (*id, b.batch()))
    }

    /// Takes what the log's rotation closed.
    fn rotated(&mut self, closed: Option<(u64, Pending)>) {
        if let Some((seq, counts)) = closed {
            self.pending.merge(counts);
            self.pending_seq = Some(seq);
        }
    }

    /// The store took the batch in flight; its id.
    fn written(&mut self) -> Option<BatchId> {
        let id = self.in_flight.take().map(|(id, _)| id);
        self.calls.succeeded();
        let dropped = std::mem::take(&mut self.dropped);
        if dropped > 0 {
            tracing::error!(
                dropped,
                "the oldest {dropped} (key, minute) buckets of usage were dropped during the outage"
            );
        }
        id
    }

    /// The store did not take the batch in flight: keep it, and cap what waits.
    fn failed(&mut self, error: &StoreError) {
        self.calls
            .failed(error, "usage counts are kept in memory and retried");
        let dropped = match &mut self.in_flight {
            Some((_, batch)) => cap_oldest(&mut [batch, &mut self.pending], self.max_buckets),
            None => cap_oldest(&mut [&mut self.pending], self.max_buckets),
        };
        if self.in_flight.as_ref().is_some_and(|(_, b)| b.is_empty()) {
            self.in_flight = None;
        }
        if dropped > 0 && self.dropped == 0 {
            tracing::error!(
                max_buckets = self.max_buckets,
                "usage waiting for the store reached its cap; dropping the oldest minutes until \
                 the store is back (the number dropped is logged then)"
            );
        }
        self.dropped += dropped as u64;
    }
}

// === functions ===

/// Runs until `shutdown` turns true, then drains and writes what is left (bounded by
/// `final_deadline`). Flushes every `interval`, which a config reload may change.
pub async fn run(
    meter: Arc<Meter>,
    store: Arc<dyn Usage>,
    metrics: Arc<Metrics>,
    mut interval: watch::Receiver<Duration>,
    mut shutdown: watch::Receiver<bool>,
    final_deadline: Duration,
) {
    let mut backlog = Backlog::new(MAX_PENDING_BUCKETS, &metrics);
    let ticker_every = |every: Duration| {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    };
    let mut ticker = ticker_every(*interval.borrow_and_update());
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Ok(()) = interval.changed() => {
                ticker = ticker_every(*interval.borrow_and_update());
                continue;
            }
            _ = shutdown.changed() => break,
        }
        // Raced against the shutdown: on a hung disk a flush never returns, and the shutdown
        // must not wait for it. A batch cut off stays in flight and is sent again, under the
        // same id, by the final flush below (applied once, whichever call lands); a rotation
        // of the log cut off is taken by the final flush from its handle.
        tokio::select! {
            _ = flush_once(&meter, &*store, &metrics, &mut backlog) => {}
            _ = shutdown.changed() => break,
        }
    }
    // Everything into the backlog first: what the deadline cuts off is then counted in the
    // log line below, not left uncounted in the cells.
    if meter.wal().is_none() {
        meter.drain_into(&mut backlog.pending);
    }
    let last = flush_once(&meter, &*store, &metrics, &mut backlog);
    if tokio::time::timeout(final_deadline, last).await.is_err() || !backlog.is_empty() {
        tracing::error!(
            buckets = backlog.len(),
            dropped = backlog.dropped(),
            "usage counts could not be written before shutdown"
        );
    }
    if let Some(wal) = meter.wal().cloned() {
        // What the store did not take stays in the log's segments, replayed at the next start.
        // Bounded too: on a hung disk the close waits on it.
        let closed = tokio::time::timeout(
            final_deadline,
            tokio::task::spawn_blocking(move || wal.close()),
        );
        match closed.await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!("closing the usage log failed"),
            Err(_) => tracing::error!("closing the usage log did not end in time"),
        }
    }
}

/// Rotates the log and takes the closed segment's counts into the backlog. The rotation is
/// kept in the backlog while it runs: a flush dropped here (the shutdown cuts the loop's flush
/// off) leaves its counts for the next flush to take, instead of losing them with it.
async fn rotate(wal: &Arc<Wal>, backlog: &mut Backlog) {
    let rotating = backlog.rotating.get_or_insert_with(|| {
        let wal = Arc::clone(wal);
        tokio::task::spawn_blocking(move || wal.rotate_blocking())
    });
    let rotated = rotating.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "the usage log's rotation failed");
        None
    });
    backlog.rotating = None;
    backlog.rotated(rotated);
}

/// Drains the meter and writes everything waiting: the batch in flight first, then batches of
/// at most [`BATCH_BUCKETS`] made of the counts since, each drained from the cells just before
/// it is sent. Returns whether the store took it all.
///
/// The cells are drained until one drain finds the queue empty, not until it stays empty (a
/// busy key queued again while a batch is written waits for the next flush), and at most
/// [`MAX_PENDING_BUCKETS`] buckets' worth of drains, so that a flush ends under any load. While
/// the store is failing, every cell is drained at once, so that the cap on what waits
/// ([`MAX_PENDING_BUCKETS`]) bounds the memory held for it.
pub async fn flush_once(
    meter: &Meter,
    store: &dyn Usage,
    metrics: &Metrics,
    backlog: &mut Backlog,
) -> bool {
    // The drains of the cells this flush may still make: none with the log (its rotation took
    // the counts) or after a failed batch (everything was drained at once); else at most a full
    // backlog's worth, so that under a load that dirties a batch's worth of keys while each
    // batch is written the flush still ends, and the next one (or a new interval, or shutdown)
    // comes in its turn.
    let mut drains = 0;
    match meter.wal() {
        Some(wal) => {
            // A rotation that an earlier flush began and the shutdown cut off is taken first;
            // then one of this flush's own, for what was counted since.
            let carried = backlog.rotating.is_some();
            rotate(wal, backlog).await;
            if carried {
                rotate(wal, backlog).await;
            }
        }
        None if backlog.in_flight.is_some() => meter.drain_into(&mut backlog.pending),
        None => drains = MAX_PENDING_BUCKETS / BATCH_BUCKETS,
    }
    let wal = meter.wal().map(|w| &**w);
    loop {
        if drains > 0 && backlog.in_flight.is_none() && backlog.pending.len() < BATCH_BUCKETS {
            drains -= 1;
            if !meter.drain_up_to(&mut backlog.pending, BATCH_BUCKETS) {
                // The queue was empty: what is queued from now on waits for the next flush.
                drains = 0;
            }
        }
        metrics
            .usage_pending_events
            .set(i64::try_from(backlog.len()).unwrap_or(i64::MAX));
        let Some((id, batch)) = backlog.batch(wal) else {
            return true;
        };
        let timer = metrics.usage_flush_duration.start_timer();
        let result = store.add_usage(id, &batch).await;
        timer.observe_duration();
        match result {
            Ok(()) => {
                if let (Some(wal), Some(id)) = (wal, backlog.written()) {
                    wal.release(id.seq);
                }
            }
            Err(e) => {
                backlog.failed(&e);
                metrics
                    .usage_pending_events
                    .set(i64::try_from(backlog.len()).unwrap_or(i64::MAX));
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests;
