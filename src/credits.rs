//! Credits on the request path (contract 5a): each instance spends a key's credits from a local
//! lease, so a request almost never waits for the store, and the store's counter
//! ([`crate::store::credits`]) keeps the fleet exact.
//!
//! A key's [`CreditLease`] holds the credits this instance was granted and has not spent
//! (`tokens`), and its running totals for the store's epoch: received, spent, handed back. A
//! request whose cost fits in `tokens` spends synchronously; one that does not waits for
//! [`CreditLease::take`], which reports the totals and asks for enough for this request and a
//! lease beyond it (a twentieth of what was left, 1 to 1 000). Totals make every call
//! idempotent (`store::credits`): a call that failed, or whose answer was lost, changes
//! nothing here, and the next call carries what it carried. A lease idle for [`IDLE_MS`] is
//! handed back ([`CreditLeases::give_back_idle`], every second), as are all of them at
//! shutdown, so the store's figure is exact once traffic stops. An upstream that declares a
//! cost (`X-Tollgate-Cost`) has the difference settled on the lease ([`CreditLease::adjust`]):
//! what it costs beyond the lease is spent all the same and comes off the balance (never below
//! 0), what it costs less is handed back.
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
use crate::store::credits::Totals;
use crate::store::Credits;

/// A lease unused this long is handed back.
pub const IDLE_MS: i64 = 1_000;

/// The longest a request waits for a take, whatever the store does (each store call has its own
/// deadline too; this bounds a compare-and-set that keeps losing to other instances).
const TAKE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);

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
    /// The running totals of the store's epoch that the tokens belong to.
    totals: Totals,
    /// `spent`, `returned` and `refunded` of the totals as the store last acknowledged them.
    reported: (i64, i64, i64),
    /// Granted, not spent.
    tokens: i64,
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
        // Once a second on an instance whose keys have no credits: nothing to walk.
        if self.by_key.is_empty() {
            return;
        }
        let leases: Vec<Arc<CreditLease>> = self.by_key.iter().map(|e| e.value().clone()).collect();
        for lease in leases {
            if all || now_ms - lease.last_used_ms.load(Ordering::Relaxed) >= IDLE_MS {
                lease.give_back(now_ms).await;
            }
        }
        self.by_key
            .retain(|_, lease| Arc::strong_count(lease) > 1 || !lease.settled());
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
            state.totals.spent += cost;
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
    /// Waits [`TAKE_DEADLINE`] at most, the wait for the take before it included: behind a
    /// take that the store does not answer, each waiter gives up at its own deadline instead of
    /// queueing a second for every one ahead of it.
    pub async fn take(&self, cost: u32, now_ms: i64) -> Result<(), Shortfall> {
        // Its only waits are the lock and the store's call; what follows them does not wait,
        // so a grant is applied whole or not at all.
        tokio::time::timeout(TAKE_DEADLINE, self.take_in_turn(cost, now_ms))
            .await
            .unwrap_or_else(|_| {
                let late = crate::store::StoreError::Unavailable(format!(
                    "no credits granted within {TAKE_DEADLINE:?}"
                ));
                self.not_granted(&late, i64::from(cost))
            })
    }

    /// [`CreditLease::take`] without its deadline.
    async fn take_in_turn(&self, cost: u32, now_ms: i64) -> Result<(), Shortfall> {
        let _one_at_a_time = self.take_lock.lock().await;
        match self.try_spend(cost, now_ms) {
            Err(Shortfall::NeedsTake) => {}
            done => return done,
        }
        let cost = i64::from(cost);
        let (totals, want) = {
            let state = self.state.lock();
            let lease = (state.remaining / 20).clamp(1, 1_000);
            (state.totals, (cost - state.tokens).max(0) + lease)
        };
        let shared = &self.shared;
        let grant = shared
            .store
            .take_credits(&self.key_id, &shared.instance, totals, want, now_ms)
            .await;
        let mut state = self.state.lock();
        match grant {
            Ok(grant) => {
                shared.calls.succeeded();
                if grant.epoch == state.totals.epoch {
                    state.reported = (totals.spent, totals.returned, totals.refunded);
                } else {
                    // A refill or a `set`: what this instance held and spent is void.
                    *state = LeaseState {
                        totals: Totals {
                            epoch: grant.epoch,
                            ..Totals::default()
                        },
                        ..LeaseState::default()
                    };
                }
                state.tokens += grant.granted;
                state.totals.received = grant.received;
                state.remaining = grant.remaining;
                state.refill_at_ms = grant.refill_at_ms;
                if state.tokens >= cost {
                    state.tokens -= cost;
                    state.totals.spent += cost;
                    Ok(())
                } else {
                    state.empty_until_ms = now_ms + EMPTY_RECHECK_MS;
                    Err(Shortfall::Exhausted {
                        retry_after: state.retry_after(now_ms),
                    })
                }
            }
            Err(e) => {
                drop(state);
                self.not_granted(&e, cost)
            }
        }
    }

    /// A take the store did not grant (`e`): counted and logged, then `cost` is spent on trust
    /// (`fail_open`) or refused (`fail_closed`).
    fn not_granted(&self, e: &crate::store::StoreError, cost: i64) -> Result<(), Shortfall> {
        let shared = &self.shared;
        shared.calls.failed(
            e,
            match shared.on_store_error {
                OnStoreError::FailOpen => "credits are spent on trust and settled later",
                OnStoreError::FailClosed => "requests of keys with credits get 503",
            },
        );
        match shared.on_store_error {
            // Spent on trust: the next report carries it, and what passes the grants comes off
            // the balance then (never below 0).
            OnStoreError::FailOpen => {
                self.state.lock().totals.spent += cost;
                Ok(())
            }
            OnStoreError::FailClosed => Err(Shortfall::StoreDown),
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
            state.totals.spent += extra;
        } else {
            // Totals only grow: what it cost less is counted as refunded, back in the lease.
            let refund = charged - declared;
            state.tokens += refund;
            state.totals.refunded += refund;
        }
    }

    /// The key's credits as this instance last heard, less what it spent since.
    pub fn remaining(&self) -> i64 {
        let state = self.state.lock();
        let net = |spent: i64, refunded: i64| spent - refunded;
        let since = net(state.totals.spent, state.totals.refunded)
            - net(state.reported.0, state.reported.2);
        (state.remaining - since).max(0)
    }

    /// Hands back the unspent tokens and reports the totals. A failure changes nothing: the
    /// totals already say the tokens were handed back, and the next call carries them.
    async fn give_back(&self, now_ms: i64) {
        let totals = {
            let mut state = self.state.lock();
            if state.tokens == 0 && !state.unreported() {
                return;
            }
            let tokens = std::mem::take(&mut state.tokens);
            state.totals.returned += tokens;
            state.totals
        };
        let shared = &self.shared;
        match shared
            .store
            .give_back_credits(&self.key_id, &shared.instance, totals, now_ms)
            .await
        {
            Ok(()) => {
                shared.calls.succeeded();
                let mut state = self.state.lock();
                if state.totals.epoch == totals.epoch {
                    state.reported = (totals.spent, totals.returned, totals.refunded);
                }
            }
            Err(e) => shared.calls.failed(
                &e,
                "credits are handed back with the next call that succeeds",
            ),
        }
    }

    /// Whether nothing is held or unreported (the lease can be forgotten).
    fn settled(&self) -> bool {
        let state = self.state.lock();
        state.tokens == 0 && !state.unreported()
    }
}

// === impl LeaseState ===

impl LeaseState {
    /// Past the refill the tokens belong to the old period: void.
    fn expire(&mut self, now_ms: i64) {
        if self.refill_at_ms.is_some_and(|at| now_ms >= at) {
            *self = LeaseState {
                totals: Totals {
                    epoch: self.totals.epoch,
                    ..Totals::default()
                },
                ..LeaseState::default()
            };
        }
    }

    /// Spent or handed back since the store last acknowledged it.
    fn unreported(&self) -> bool {
        (
            self.totals.spent,
            self.totals.returned,
            self.totals.refunded,
        ) != self.reported
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedStore;

    /// Takes behind one that the store does not answer (the embedded store's only blocking
    /// thread held, as a hung disk holds them) each give up at their own deadline, the wait for
    /// the lock included: three at once all end within about one deadline, where one after
    /// another they took a deadline each.
    #[test]
    fn takes_queued_behind_a_hung_one_end_at_their_own_deadline() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(1)
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("db")).expect("store"));
        let metrics = Metrics::new().expect("metrics");
        let leases = CreditLeases::new(store, OnStoreError::FailClosed, &metrics);
        let lease = leases.for_key(&Arc::from("key_a"));
        runtime.block_on(async {
            let (release, held) = std::sync::mpsc::channel::<()>();
            let hold = tokio::task::spawn_blocking(move || held.recv().ok());
            let started = std::time::Instant::now();
            let takes = futures_util::future::join_all((0..3).map(|_| lease.take(1, 0))).await;
            let took = started.elapsed();
            for take in takes {
                assert!(matches!(take, Err(Shortfall::StoreDown)));
            }
            assert!(took >= TAKE_DEADLINE, "{took:?}");
            assert!(
                took < TAKE_DEADLINE * 2,
                "queued one after another: {took:?}"
            );
            release.send(()).expect("release the pool");
            hold.await.expect("the holder");
        });
    }
}
