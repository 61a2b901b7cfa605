//! Fleet-wide limits (`limits.mode = "global"`): every instance draws from shared per-window
//! counters in the store, a small lease of tokens at a time, so that a request almost never waits
//! for Redis.
//!
//! Each key holds, per window (fixed UTC minute, hour, day), a local lease of tokens taken from
//! the shared counter with [`LimitBuckets::take_tokens`](crate::store::LimitBuckets::take_tokens), which never lets the counter pass the limit.
//! A request spends one local token per window, synchronously and without I/O. When a lease runs
//! below half, a background refill takes more; only a request that finds a lease empty waits,
//! for refills ([`GlobalLimiter::refill`]) until it gets a token or the shared counter says the
//! window is used up: so no request is refused while the fleet is under its limit. A refill asks
//! for at least as many tokens as there are requests waiting ([`LeaseWait`]), so that a burst
//! costs one round trip rather than one per request. Accuracy: the fleet never admits more than the
//! limit in a window while the store answers; it admits less only by tokens leased to instances
//! that see no further traffic in that window, at most `instances × lease` (lease = limit / 100,
//! at least 1, at most 1 000). When the store fails, `fail_open` falls back to the key's local
//! buckets until a refill succeeds, and `fail_closed` refuses with `store_unavailable`.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

use super::{
    registered, Exhausted, LimitSnapshot, LocalBuckets, Quotas, Replace, Window, WindowState,
};
use crate::config::OnStoreError;
use crate::metrics::{Metrics, StoreCalls};
use crate::store::{LimitBuckets, TokenTake};

/// How long to keep using the local fallback after a failed refill before trying the store again.
const RETRY_AFTER_FAILURE_MS: i64 = 1_000;

/// Why the shared buckets did not admit a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// A window is used up fleet-wide (or locally, in fallback).
    Exhausted(Exhausted),
    /// A lease is empty: await [`GlobalLimiter::refill`] and decide again.
    NeedsLease,
    /// The store is down and `fail_closed` is set.
    StoreDown,
}

/// One key's leases.
pub struct GlobalLimiter {
    account_id: Arc<str>,
    key_id: Arc<str>,
    quotas: Quotas,
    leases: Mutex<[Lease; 3]>,
    store: Arc<dyn LimitBuckets>,
    on_store_error: OnStoreError,
    /// Used instead of the shared counters while the store is failing (fail_open).
    fallback: LocalBuckets,
    /// Until when (ms) the store counts as down; 0 when it answers.
    down_until_ms: AtomicI64,
    /// `take_tokens` calls of every key: failures counted, the outage logged once.
    calls: Arc<StoreCalls>,
    /// Requests waiting for a token: a refill takes at least this many.
    waiting: AtomicU32,
    refilling: AtomicBool,
    refill_lock: tokio::sync::Mutex<()>,
}

/// A request waiting for a lease, counted in [`GlobalLimiter`]'s waiters until dropped.
pub struct LeaseWait<'a> {
    limiter: &'a GlobalLimiter,
}

#[derive(Debug, Clone, Copy, Default)]
struct Lease {
    index: i64,
    tokens: u32,
    /// The shared counter as last reported.
    total: u64,
    /// The shared counter has reached the limit for `index`.
    exhausted: bool,
}

/// Every key's [`GlobalLimiter`], by key id.
pub struct SharedLimiters {
    by_key: DashMap<Arc<str>, Arc<GlobalLimiter>>,
    store: Arc<dyn LimitBuckets>,
    on_store_error: OnStoreError,
    calls: Arc<StoreCalls>,
}

// === impl GlobalLimiter ===

impl GlobalLimiter {
    /// Spends one token from every window, or says why not. Never does I/O; may start a
    /// background refill.
    pub fn check(self: &Arc<Self>, now_ms: i64) -> Result<LimitSnapshot, Shortfall> {
        if self.down_until_ms.load(Ordering::Relaxed) > now_ms {
            return match self.on_store_error {
                OnStoreError::FailOpen => self.fallback.get().check().map_err(Shortfall::Exhausted),
                OnStoreError::FailClosed => Err(Shortfall::StoreDown),
            };
        }
        let mut leases = self.leases.lock();
        let mut snapshot = LimitSnapshot::default();
        let mut low = false;
        for (i, window) in Window::ALL.iter().enumerate() {
            let Some(limit) = self.quotas.per[i] else {
                continue;
            };
            let lease = &mut leases[i];
            lease.enter(window_index(*window, now_ms));
            if lease.tokens == 0 {
                if lease.exhausted {
                    let retry_after = seconds_left(*window, now_ms).max(1);
                    snapshot.windows[i] = Some(state(*window, limit, lease, now_ms));
                    return Err(Shortfall::Exhausted(Exhausted {
                        window: *window,
                        retry_after,
                        snapshot,
                    }));
                }
                drop(leases);
                self.refill_in_background(now_ms);
                return Err(Shortfall::NeedsLease);
            }
        }
        for (i, window) in Window::ALL.iter().enumerate() {
            let Some(limit) = self.quotas.per[i] else {
                continue;
            };
            let lease = &mut leases[i];
            lease.tokens -= 1;
            low |= !lease.exhausted && lease.tokens < lease_size(limit).div_ceil(2);
            snapshot.windows[i] = Some(state(*window, limit, lease, now_ms));
        }
        drop(leases);
        if low {
            self.refill_in_background(now_ms);
        }
        Ok(snapshot)
    }

    /// Counts the caller as waiting for a token until the guard is dropped, so that refills
    /// meanwhile take enough for every waiter.
    pub fn wait(&self) -> LeaseWait<'_> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        LeaseWait { limiter: self }
    }

    /// Takes fresh leases for the windows running low (or too small for the requests waiting),
    /// in one store round trip. Concurrent calls take turns; one that finds the leases already
    /// full enough returns at once.
    pub async fn refill(&self, now_ms: i64) {
        let _one_at_a_time = self.refill_lock.lock().await;
        // The refill this one waited for failed: the store is down for now, and the caller's
        // next check takes the fallback instead of waiting for another deadline.
        if self.down_until_ms.load(Ordering::Relaxed) > now_ms {
            return;
        }
        let takes = self.takes(now_ms);
        if takes.is_empty() {
            return;
        }
        let asked: Vec<TokenTake> = takes.iter().map(|(_, t)| *t).collect();
        match self
            .store
            .take_tokens(&self.account_id, &self.key_id, &asked)
            .await
        {
            Ok(grants) => {
                self.calls.succeeded();
                self.down_until_ms.store(0, Ordering::Relaxed);
                let mut leases = self.leases.lock();
                for ((i, take), grant) in takes.iter().zip(grants) {
                    let lease = &mut leases[*i];
                    if lease.index == take.index {
                        lease.tokens += grant.granted;
                        lease.total = grant.total;
                        lease.exhausted = grant.granted < take.want;
                    }
                }
            }
            Err(e) => {
                self.calls.failed(
                    &e,
                    match self.on_store_error {
                        OnStoreError::FailOpen => {
                            "global limits fall back to each instance's own buckets"
                        }
                        OnStoreError::FailClosed => {
                            "requests under global limits are refused with 503"
                        }
                    },
                );
                self.down_until_ms
                    .store(now_ms + RETRY_AFTER_FAILURE_MS, Ordering::Relaxed);
            }
        }
    }

    /// What a refill asks for: per window running low, enough to fill the lease, or to give
    /// every waiting request a token if that is more.
    fn takes(&self, now_ms: i64) -> Vec<(usize, TokenTake)> {
        let waiting = self.waiting.load(Ordering::Acquire);
        let mut leases = self.leases.lock();
        Window::ALL
            .iter()
            .enumerate()
            .filter_map(|(i, window)| {
                let limit = self.quotas.per[i]?;
                let lease = &mut leases[i];
                lease.enter(window_index(*window, now_ms));
                let size = lease_size(limit);
                let low = lease.tokens < size.div_ceil(2) || lease.tokens < waiting;
                let want = size.max(waiting).saturating_sub(lease.tokens);
                (!lease.exhausted && low && want > 0).then_some((
                    i,
                    TokenTake {
                        window_secs: window.seconds(),
                        index: lease.index,
                        limit: limit.get(),
                        want,
                    },
                ))
            })
            .collect()
    }

    fn refill_in_background(self: &Arc<Self>, now_ms: i64) {
        if self.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                this.refill(now_ms).await;
                this.refilling.store(false, Ordering::Release);
            });
        } else {
            self.refilling.store(false, Ordering::Release);
        }
    }

    /// The windows as last seen, without spending.
    pub fn peek(&self, now_ms: i64) -> LimitSnapshot {
        let leases = self.leases.lock();
        let mut snapshot = LimitSnapshot::default();
        for (i, window) in Window::ALL.iter().enumerate() {
            if let Some(limit) = self.quotas.per[i] {
                let mut lease = leases[i];
                if lease.index < window_index(*window, now_ms) {
                    lease = Lease::default();
                }
                snapshot.windows[i] = Some(state(*window, limit, &lease, now_ms));
            }
        }
        snapshot
    }
}

// === impl Lease ===

impl Lease {
    /// Moves the lease to window `index` if that is a later one (its tokens belong to the past
    /// window). Never back: a request that read the clock just before a boundary spends from
    /// the new window rather than dropping the new lease for the old window's.
    fn enter(&mut self, index: i64) {
        if index > self.index {
            *self = Lease {
                index,
                ..Lease::default()
            };
        }
    }
}

// === impl LeaseWait ===

impl Drop for LeaseWait<'_> {
    fn drop(&mut self) {
        self.limiter.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

// === impl SharedLimiters ===

impl SharedLimiters {
    /// A registry over `store`; failed takes are counted in `metrics`.
    pub fn new(
        store: Arc<dyn LimitBuckets>,
        on_store_error: OnStoreError,
        metrics: &Metrics,
    ) -> Self {
        SharedLimiters {
            by_key: DashMap::new(),
            store,
            on_store_error,
            calls: Arc::new(metrics.store_calls("take_tokens")),
        }
    }

    /// The key's limiter; kept across cache refreshes while its quotas and account are
    /// unchanged (and with it the fallback it was made with), else new, as `replace` allows.
    pub fn for_key(
        &self,
        account_id: &Arc<str>,
        key_id: &Arc<str>,
        quotas: Quotas,
        fallback: LocalBuckets,
        replace: Replace,
    ) -> Arc<GlobalLimiter> {
        registered(
            &self.by_key,
            key_id,
            replace,
            |g| g.quotas == quotas && g.account_id == *account_id,
            || self.make(account_id, key_id, quotas, fallback),
        )
    }

    fn make(
        &self,
        account_id: &Arc<str>,
        key_id: &Arc<str>,
        quotas: Quotas,
        fallback: LocalBuckets,
    ) -> Arc<GlobalLimiter> {
        Arc::new(GlobalLimiter {
            account_id: Arc::clone(account_id),
            key_id: Arc::clone(key_id),
            quotas,
            leases: Mutex::new([Lease::default(); 3]),
            store: Arc::clone(&self.store),
            on_store_error: self.on_store_error,
            fallback,
            down_until_ms: AtomicI64::new(0),
            calls: Arc::clone(&self.calls),
            waiting: AtomicU32::new(0),
            refilling: AtomicBool::new(false),
            refill_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The key's limiter, if it has one.
    pub fn get(&self, key_id: &str) -> Option<Arc<GlobalLimiter>> {
        self.by_key.get(key_id).map(|l| Arc::clone(&l))
    }

    /// Forgets limiters no cached key holds; their leases belong to past windows soon enough.
    pub fn prune_unused(&self) {
        self.by_key.retain(|_, l| Arc::strong_count(l) > 1);
    }
}

// === functions ===

/// Tokens taken per refill: a hundredth of the limit, at least 1 and at most 1 000.
pub fn lease_size(limit: NonZeroU32) -> u32 {
    (limit.get() / 100).clamp(1, 1_000)
}

fn window_index(window: Window, now_ms: i64) -> i64 {
    now_ms.div_euclid(window.seconds() as i64 * 1_000)
}

fn seconds_left(window: Window, now_ms: i64) -> u64 {
    let len_ms = window.seconds() as i64 * 1_000;
    let left_ms = len_ms - now_ms.rem_euclid(len_ms);
    u64::try_from((left_ms + 999) / 1_000).unwrap_or(1)
}

fn state(window: Window, limit: NonZeroU32, lease: &Lease, now_ms: i64) -> WindowState {
    let limit = limit.get();
    let handed_out = u32::try_from(lease.total).unwrap_or(u32::MAX);
    let remaining = limit
        .saturating_sub(handed_out)
        .saturating_add(lease.tokens)
        .min(limit);
    WindowState {
        window,
        limit,
        remaining,
        reset: seconds_left(window, now_ms),
        shared: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_a_hundredth_of_the_limit_within_bounds() {
        let n = |v| NonZeroU32::new(v).unwrap();
        assert_eq!(lease_size(n(60)), 1);
        assert_eq!(lease_size(n(10_000)), 100);
        assert_eq!(lease_size(n(1_000_000_000)), 1_000);
    }

    #[test]
    fn leases_move_only_forward() {
        let mut lease = Lease {
            index: 7,
            tokens: 3,
            total: 10,
            exhausted: false,
        };
        // A request that read the clock in the previous window keeps the current lease.
        lease.enter(6);
        lease.enter(7);
        assert_eq!((lease.index, lease.tokens), (7, 3));
        lease.enter(8);
        assert_eq!((lease.index, lease.tokens, lease.total), (8, 0, 0));
    }

    #[test]
    fn windows_are_fixed_utc_periods() {
        let t = 1_795_438_799_999; // 12:59:59.999
        assert_eq!(
            window_index(Window::Minute, t) + 1,
            window_index(Window::Minute, t + 1)
        );
        assert_eq!(seconds_left(Window::Minute, t), 1);
        assert_eq!(seconds_left(Window::Minute, t + 1), 60);
    }
}
