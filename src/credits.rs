//! Credits on the request path (contract 5a): each instance spends a key's credits from a local
//! lease, so a request almost never waits for the store, and the store's counter
//! ([`crate::store::credits`]) keeps the fleet exact.
//!
//! A key's [`CreditLease`] holds the credits this instance was granted and has not spent
//! (`tokens`), and what it spent since it last told the store (`spent`). A request whose cost
//! fits in `tokens` spends synchronously; one that does not waits for [`CreditLease::take`],
//! which reports `spent` and asks for enough for this request and a lease beyond it (a
//! twentieth of what was left, 1 to 1 000). A lease idle for [`IDLE_MS`] is handed back
//! ([`CreditLeases::give_back_idle`], every second), as are all of them at shutdown, so the
//! store's figure is exact once traffic stops. An upstream that declares a cost
//! (`X-Tollgate-Cost`) has the difference settled on the lease ([`CreditLease::adjust`]): what
//! it costs beyond the lease is reported as spent and comes off the balance, never below 0.
//!
//! Overspend, across a fleet: a credit is granted once (the store's counter is changed
//! atomically); an instance that dies has its outstanding lease returned after
//! [`LEASE_TTL_MS`](crate::store::credits::LEASE_TTL_MS) of silence, including what it spent
//! since its last report, so at most one lease per dead instance is spent twice. After a `set`
//! an instance may spend what is left of its old lease until the key's cache entry is dropped
//! (the invalidation reaches every instance within milliseconds): at most one lease more.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::config::OnStoreError;
use crate::metrics::{Metrics, StoreCalls};
use crate::store::Credits;

/// A lease unused this long is handed back.
pub const IDLE_MS: i64 = 1_000;

/// After the store had nothing to grant, this instance asks again at most this often (a client
/// hammering a key without credits costs the store one call a second).
const EMPTY_RECHECK_MS: i64 = 1_000;

/// Why credits could not be spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shortfall {
    /// The lease does not cover the cost: await [`CreditLease::take`].
    NeedsTake,
    /// No credits left; whole seconds until the next refill (a day without one).
    Exhausted {
        /// Seconds until the next refill.
        retry_after: u64,
    },
    /// The store could not be asked and `fail_closed` is set.
    StoreDown,
}

/// One key's lease on this instance.
pub struct CreditLease {
    key_id: Arc<str>,
    state: Mutex<LeaseState>,
    take_lock: tokio::sync::Mutex<()>,
    last_used_ms: AtomicI64,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct LeaseState {
    /// The store's epoch the tokens belong to.
    epoch: u64,
    /// Granted, not spent.
    tokens: i64,
    /// Spent since the last report (may pass what was granted: an upstream's declared cost).
    spent: i64,
    /// The key's credits as the store last said.
    remaining: i64,
    /// The next refill (ms); the tokens are void from then on.
    refill_at_ms: Option<i64>,
    /// The store had nothing to grant: until when not to ask again (ms).
    empty_until_ms: i64,
}

/// What every lease shares.
struct Shared {
    store: Arc<dyn Credits>,
    instance: Arc<str>,
    on_store_error: OnStoreError,
    calls: StoreCalls,
}

/// Every key's lease on this instance, by key id.
pub struct CreditLeases {
    by_key: DashMap<Arc<str>, Arc<CreditLease>>,
    shared: Arc<Shared>,
}

// === impl CreditLeases ===

impl CreditLeases {
    /// Leases on `store` for this instance, under a fresh instance id.
    pub fn new(store: Arc<dyn Credits>, on_store_error: OnStoreError, metrics: &Metrics) -> Self {
        CreditLeases {
            by_key: DashMap::new(),
            shared: Arc::new(Shared {
                store,
                instance: Arc::from(crate::credential::new_id("inst")),
                on_store_error,
                calls: metrics.store_calls("credits"),
            }),
        }
    }

    /// The key's lease (kept across cache refreshes: the store knows one lease per instance).
    /// A refresh (the key was changed, its credits perhaps set or added to) lets the next
    /// request ask the store again even if it had nothing a moment ago.
    pub fn for_key(&self, key_id: &Arc<str>) -> Arc<CreditLease> {
        let lease = self
            .by_key
            .entry(Arc::clone(key_id))
            .or_insert_with(|| {
                Arc::new(CreditLease {
                    key_id: Arc::clone(key_id),
                    state: Mutex::new(LeaseState::default()),
                    take_lock: tokio::sync::Mutex::new(()),
                    last_used_ms: AtomicI64::new(0),
                    shared: Arc::clone(&self.shared),
                })
            })
            .clone();
        lease.state.lock().empty_until_ms = 0;
        lease
    }

    /// Hands back the leases idle for [`IDLE_MS`] (all of them with `all`, at shutdown), and
    /// forgets empty ones that no cached key holds.
    pub async fn give_back_idle(&self, now_ms: i64, all: bool) {
        let leases: Vec<Arc<CreditLease>> = self.by_key.iter().map(|e| e.value().clone()).collect();
        for lease in leases {
            if all || now_ms - lease.last_used_ms.load(Ordering::Relaxed) >= IDLE_MS {
                lease.give_back(now_ms).await;
            }
        }
        self.by_key.retain(|_, lease| {
            let state = lease.state.lock();
            Arc::strong_count(lease) > 1 || state.tokens != 0 || state.spent != 0
        });
    }
}

// === impl CreditLease ===

impl CreditLease {
    /// Spends `cost` from the lease, without I/O.
    pub fn try_spend(&self, cost: u32, now_ms: i64) -> Result<(), Shortfall> {
        if cost == 0 {
            return Ok(());
        }
        self.last_used_ms.store(now_ms, Ordering::Relaxed);
        let cost = i64::from(cost);
        let mut state = self.state.lock();
        state.expire(now_ms);
        if state.tokens >= cost {
            state.tokens -= cost;
            state.spent += cost;
            return Ok(());
        }
        if state.empty_until_ms > now_ms {
            return Err(Shortfall::Exhausted {
                retry_after: state.retry_after(now_ms),
            });
        }
        Err(Shortfall::NeedsTake)
    }

    /// Reports what was spent and takes enough for `cost` and a lease beyond it, then spends
    /// `cost`; one take at a time per key (a waiter finds the lease refilled by the one before).
    pub async fn take(&self, cost: u32, now_ms: i64) -> Result<(), Shortfall> {
        let _one_at_a_time = self.take_lock.lock().await;
        match self.try_spend(cost, now_ms) {
            Err(Shortfall::NeedsTake) => {}
            done => return done,
        }
        let cost = i64::from(cost);
        let (epoch, spent, want) = {
            let mut state = self.state.lock();
            let lease = (state.remaining / 20).clamp(1, 1_000);
            let want = (cost - state.tokens).max(0) + lease;
            (state.epoch, std::mem::take(&mut state.spent), want)
        };
        let shared = &self.shared;
        let grant = shared
            .store
            .take_credits(&self.key_id, &shared.instance, epoch, spent, want, now_ms)
            .await;
        let mut state = self.state.lock();
        match grant {
            Ok(grant) => {
                shared.calls.succeeded();
                if grant.epoch != state.epoch {
                    state.tokens = 0;
                }
                state.epoch = grant.epoch;
                state.tokens += grant.granted;
                state.remaining = grant.remaining;
                state.refill_at_ms = grant.refill_at_ms;
                if state.tokens >= cost {
                    state.tokens -= cost;
                    state.spent += cost;
                    Ok(())
                } else {
                    state.empty_until_ms = now_ms + EMPTY_RECHECK_MS;
                    Err(Shortfall::Exhausted {
                        retry_after: state.retry_after(now_ms),
                    })
                }
            }
            Err(e) => {
                state.spent += spent;
                shared.calls.failed(
                    &e,
                    match shared.on_store_error {
                        OnStoreError::FailOpen => "credits are spent on trust and settled later",
                        OnStoreError::FailClosed => "requests of keys with credits get 503",
                    },
                );
                match shared.on_store_error {
                    // Spent on trust: reported as spent with the next take, and taken off the
                    // balance then (never below 0).
                    OnStoreError::FailOpen => {
                        state.spent += cost;
                        Ok(())
                    }
                    OnStoreError::FailClosed => Err(Shortfall::StoreDown),
                }
            }
        }
    }

    /// Settles an upstream's declared cost against the `charged` one: more is spent from the
    /// lease (beyond it, reported as spent and taken off the balance), less is refunded to it.
    pub fn adjust(&self, charged: u32, declared: u32) {
        let (charged, declared) = (i64::from(charged), i64::from(declared));
        let mut state = self.state.lock();
        if declared > charged {
            let extra = declared - charged;
            state.tokens -= extra.min(state.tokens);
            state.spent += extra;
        } else {
            let refund = (charged - declared).min(state.spent);
            state.tokens += refund;
            state.spent -= refund;
        }
    }

    /// The key's credits as this instance last heard, less what it spent since.
    pub fn remaining(&self) -> i64 {
        let state = self.state.lock();
        (state.remaining - state.spent).max(0)
    }

    /// Hands back the unspent tokens and reports what was spent; on failure they stay here.
    async fn give_back(&self, now_ms: i64) {
        let (epoch, spent, unspent) = {
            let mut state = self.state.lock();
            if state.tokens == 0 && state.spent == 0 {
                return;
            }
            let out = (state.epoch, state.spent, state.tokens);
            state.spent = 0;
            state.tokens = 0;
            out
        };
        let shared = &self.shared;
        match shared
            .store
            .give_back_credits(
                &self.key_id,
                &shared.instance,
                epoch,
                spent,
                unspent,
                now_ms,
            )
            .await
        {
            Ok(()) => shared.calls.succeeded(),
            Err(e) => {
                shared
                    .calls
                    .failed(&e, "unspent credits stay leased until the store answers");
                let mut state = self.state.lock();
                if state.epoch == epoch {
                    state.spent += spent;
                    state.tokens += unspent;
                }
            }
        }
    }
}

// === impl LeaseState ===

impl LeaseState {
    /// Past the refill the tokens belong to the old period: void.
    fn expire(&mut self, now_ms: i64) {
        if self.refill_at_ms.is_some_and(|at| now_ms >= at) {
            self.tokens = 0;
            self.spent = 0;
            self.refill_at_ms = None;
            self.empty_until_ms = 0;
        }
    }

    fn retry_after(&self, now_ms: i64) -> u64 {
        match self.refill_at_ms {
            Some(at) => u64::try_from((at - now_ms + 999) / 1_000)
                .unwrap_or(1)
                .max(1),
            None => 86_400,
        }
    }
}
