//! Usage metering: per-key, per-minute counters in memory, written to the store in one batch per
//! `flush_interval` by [`flusher`]; or, with `metering.durability = "wal"`, every event through
//! the write-ahead log of [`wal`] first, so that a crash loses milliseconds of usage, not seconds.
//!
//! The request path touches only its key's [`KeyState`] (held by the cached key): a per-key lock
//! (never a global one, never across an await) and, once per flush interval per key, a push onto
//! a lock-free queue that tells the flusher which keys have counts. Pending counts merge by
//! (key, minute), so memory grows with active key-minutes, not with requests.
//!
//! A key's usage counts share their allocation with its rate-limit buckets
//! ([`KeyLimiter`]): both live as long as the key id is in use, beyond any one cache
//! entry (refreshes, tokens of the key, eviction), so the [`Meter`] keeps them in one registry by
//! key id. A million keys then cost one allocation and one map slot each instead of two.

pub mod bucket;
pub mod flusher;
pub mod retention;
pub mod wal;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::limits::{
    registered, IdSet, Identified, KeyLimiter, ProcessClock, Quotas, Registry, Replace,
};
use crate::store::{UsageCounts, UsageDelta, UsageEvent};
use wal::Wal;

/// Wall-clock milliseconds since the Unix epoch; injectable so that tests can place requests on
/// either side of a minute boundary.
#[derive(Debug, Clone, Default)]
pub enum WallClock {
    /// The system clock.
    #[default]
    System,
    /// A clock the test sets.
    Manual(Arc<AtomicI64>),
}

/// What one finished request adds to its key's minute.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// Final status code.
    pub status: u16,
}

/// What one key id keeps beyond its cache entries: its usage counters (the current minute, and
/// earlier minutes not yet taken by the flusher) and its rate-limit buckets on this instance.
pub struct KeyState {
    key_id: Arc<str>,
    account_id: Arc<str>,
    state: Mutex<CellState>,
    /// Where its counts go: shared by every key of the meter.
    outlet: Arc<Outlet>,
    /// The key's buckets (in `limits.mode = "global"`, the fallback while the store is down).
    /// 64 bytes, so that a key's state with its `Arc` counts fits a 192-byte allocation.
    limiter: KeyLimiter,
}

/// Where every key of one meter sends its counts.
struct Outlet {
    /// The flusher's queue of dirty keys.
    queue: mpsc::Sender<Arc<KeyState>>,
    /// In the durable mode, where every event goes instead of the key's counters.
    wal: Option<Arc<Wal>>,
}

/// A key's counts under its lock: 56 bytes, where the store's form of one minute alone is 48.
#[derive(Default)]
struct CellState {
    minute: i64,
    counts: CellCounts,
    /// Minutes (or parts of one) not yet taken by the flusher, in the store's 64-bit form. Most
    /// keys never have any between two flushes, so the list is boxed: 8 bytes, not 24 (and
    /// two allocations, not one, for the rare key whose minute turns before a flush).
    #[expect(
        clippy::box_collection,
        reason = "the box is the point: one pointer in every key's state, not a Vec's three words"
    )]
    earlier: Option<Box<Vec<(i64, UsageCounts)>>>,
    /// The latest request's time, ms since the epoch.
    last_ms: i64,
    /// Set when the key has counts the flusher has not taken; the request that sets it queues
    /// the key, so the flusher visits only keys with traffic. Under the lock each request
    /// takes anyway, so it costs no word (and no shared line) of its own.
    dirty: bool,
}

/// The current minute's counts in 32 bits each, in [`UsageCounts::to_array`]'s order. A key
/// on one instance cannot make 2^32 requests in a minute (71 million a second), but its bodies
/// can pass 4 GiB: an event that would carry a count past `u32::MAX` moves the minute so far
/// into the key's earlier list in 64-bit form, and counting starts again from zero, so nothing
/// is lost (the flusher merges the parts of one minute).
#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct CellCounts([u32; 6]);

/// The registry of keys' state by key id, and the queue of keys with counts to flush.
pub struct Meter {
    /// A set, found by key id: each state holds its own, so a slot is one pointer.
    keys: IdSet<KeyState>,
    outlet: Arc<Outlet>,
    dirty: Mutex<mpsc::Receiver<Arc<KeyState>>>,
    clock: WallClock,
}

/// Counts taken from the keys' counters and not yet stored, merged by (key, minute).
#[derive(Default)]
pub struct Pending {
    by_bucket: HashMap<(Arc<str>, i64), PendingBucket>,
}

struct PendingBucket {
    account_id: Arc<str>,
    counts: UsageCounts,
    last_used_ms: i64,
}

/// How far the coarse clock may lag the exact one: a kernel tick is 1–10 ms.
const COARSE_LAG_MS: i64 = 20;

/// Milliseconds since the epoch from the exact system clock (0 before 1970).
fn exact_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

// === impl WallClock ===

impl WallClock {
    /// Milliseconds since the epoch, exact where it matters: when `deadline` (a key's expiry)
    /// is within the coarse clock's lag ahead, the exact clock decides, so that a key set to
    /// expire now is refused at once.
    pub fn now_ms_near(&self, deadline: Option<i64>) -> i64 {
        let now = self.now_ms();
        match (self, deadline) {
            (WallClock::System, Some(at)) if at > now && at - now <= COARSE_LAG_MS => {
                exact_ms().max(now)
            }
            _ => now,
        }
    }

    /// Milliseconds since the epoch, from the coarse clock (it lags by up to a kernel tick).
    pub fn now_ms(&self) -> i64 {
        match self {
            // The coarse clock: updated every kernel tick (1–4 ms), read without a syscall.
            WallClock::System => {
                let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
                t.tv_sec
                    .saturating_mul(1000)
                    .saturating_add(t.tv_nsec / 1_000_000)
            }
            WallClock::Manual(ms) => ms.load(Ordering::Relaxed),
        }
    }
}

// === impl KeyState ===

impl KeyState {
    /// The key's id.
    pub fn key_id(&self) -> &Arc<str> {
        &self.key_id
    }

    /// Its account's id.
    pub fn account_id(&self) -> &Arc<str> {
        &self.account_id
    }

    /// The key's rate-limit buckets on this instance.
    pub fn limiter(&self) -> &KeyLimiter {
        &self.limiter
    }

    /// Counts one request identified to this key.
    pub fn record(self: &Arc<Self>, now_ms: i64, outcome: Outcome) {
        self.add(
            now_ms,
            UsageEvent::Response {
                status: outcome.status,
            },
        );
    }

    /// Counts body bytes, when a body finishes.
    pub fn record_bytes(self: &Arc<Self>, now_ms: i64, bytes_in: u64, bytes_out: u64) {
        if bytes_in == 0 && bytes_out == 0 {
            return;
        }
        self.add(
            now_ms,
            UsageEvent::Bytes {
                bytes_in,
                bytes_out,
            },
        );
    }

    fn add(self: &Arc<Self>, now_ms: i64, event: UsageEvent) {
        if let Some(wal) = &self.outlet.wal {
            wal.push(self, now_ms, event);
            return;
        }
        let minute = now_ms.div_euclid(60_000);
        let mut delta = UsageCounts::default();
        delta.count(event);
        let queued = {
            let mut state = self.state.lock();
            if state.minute != minute {
                let old = std::mem::take(&mut state.counts);
                let old_minute = std::mem::replace(&mut state.minute, minute);
                if old != CellCounts::default() {
                    state.set_aside(old_minute, old.widen());
                }
            }
            if !state.counts.try_add(&delta) {
                let mut whole = std::mem::take(&mut state.counts).widen();
                whole.merge(&delta);
                state.set_aside(minute, whole);
            }
            if matches!(event, UsageEvent::Response { .. }) && now_ms > state.last_ms {
                state.last_ms = now_ms;
            }
            std::mem::replace(&mut state.dirty, true)
        };
        if !queued {
            // A send fails only when the meter is gone (shutdown); the counts stay in the state.
            let _ = self.outlet.queue.send(Arc::clone(self));
        }
    }

    fn take(&self, into: &mut Pending) {
        let mut state = self.state.lock();
        state.dirty = false;
        let current = std::mem::take(&mut state.counts);
        let earlier = state.earlier.take();
        let (minute, last_ms) = (state.minute, state.last_ms);
        drop(state);
        for (m, counts) in earlier
            .into_iter()
            .flat_map(|e| *e)
            .chain(std::iter::once((minute, current.widen())))
        {
            if counts != UsageCounts::default() {
                into.add(&self.key_id, &self.account_id, m, &counts, last_ms);
            }
        }
    }

    /// Whether it has counts the flusher has not taken.
    fn is_dirty(&self) -> bool {
        self.state.lock().dirty
    }
}

impl Identified for KeyState {
    fn id(&self) -> &str {
        &self.key_id
    }
}

// === impl CellState ===

impl CellState {
    /// Keeps `counts` of `minute` for the flusher.
    fn set_aside(&mut self, minute: i64, counts: UsageCounts) {
        self.earlier
            .get_or_insert_with(Box::default)
            .push((minute, counts));
    }
}

// === impl CellCounts ===

impl CellCounts {
    /// Adds `delta`, unless a count would pass `u32::MAX`: then nothing is added and it says
    /// so.
    fn try_add(&mut self, delta: &UsageCounts) -> bool {
        // In 64 bits, all six, then one test: no branch per count on the request path.
        let delta = delta.to_array();
        let sum: [u64; 6] = std::array::from_fn(|i| u64::from(self.0[i]).saturating_add(delta[i]));
        if sum.iter().fold(0, |m, s| m | s) > u64::from(u32::MAX) {
            return false;
        }
        // Every sum is at most u32::MAX here.
        self.0 = sum.map(|s| s as u32);
        true
    }

    /// In the store's 64-bit form.
    fn widen(self) -> UsageCounts {
        UsageCounts::from_array(self.0.map(u64::from))
    }
}

// === impl Meter ===

impl Meter {
    /// A meter on the given clock.
    pub fn new(clock: WallClock) -> Self {
        let (queue, dirty) = mpsc::channel();
        Meter {
            keys: DashMap::new(),
            outlet: Arc::new(Outlet { queue, wal: None }),
            dirty: Mutex::new(dirty),
            clock,
        }
    }

    /// The durable mode: every event of every key's state made from now on goes through `wal`.
    #[must_use]
    pub fn with_wal(mut self, wal: Arc<Wal>) -> Self {
        self.outlet = Arc::new(Outlet {
            queue: self.outlet.queue.clone(),
            wal: Some(wal),
        });
        self
    }

    /// The write-ahead log, in the durable mode.
    pub fn wal(&self) -> Option<&Arc<Wal>> {
        self.outlet.wal.as_ref()
    }

    /// The clock every request's minute is read from.
    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    /// The key's state. An existing one is kept while its quotas and account are unchanged, so
    /// that a cache refresh neither refills the buckets nor moves the counts; changed quotas
    /// start fresh buckets, as `replace` allows (and a new state: counts still in the old one
    /// are flushed from it, into the same buckets of the store).
    pub fn key(
        &self,
        key_id: &Arc<str>,
        account_id: &Arc<str>,
        quotas: Quotas,
        replace: Replace,
    ) -> Arc<KeyState> {
        // Two loads of one key id at once (an OAuth client's tokens) get one state.
        registered(
            &self.keys,
            key_id,
            replace,
            |k| k.limiter.quotas() == quotas && k.account_id == *account_id,
            || self.fresh(key_id, account_id, quotas),
        )
    }

    /// The key's state whatever its quotas, created without limits on first use: for counting
    /// usage alone (tests, benches).
    pub fn cell(&self, key_id: &Arc<str>, account_id: &Arc<str>) -> Arc<KeyState> {
        self.key(key_id, account_id, Quotas::default(), Replace::Never)
    }

    fn fresh(&self, key_id: &Arc<str>, account_id: &Arc<str>, quotas: Quotas) -> Arc<KeyState> {
        Arc::new(KeyState {
            key_id: Arc::clone(key_id),
            account_id: Arc::clone(account_id),
            state: Mutex::new(CellState::default()),
            outlet: Arc::clone(&self.outlet),
            limiter: KeyLimiter::new(quotas, &ProcessClock),
        })
    }

    /// The key's state, if it has one (it has been used since start-up).
    pub fn get(&self, key_id: &str) -> Option<Arc<KeyState>> {
        self.keys.lookup(key_id)
    }

    /// Number of keys with state.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Moves every dirty key's counts into `pending`. Called by the flusher only.
    pub fn drain_into(&self, pending: &mut Pending) {
        self.drain_up_to(pending, usize::MAX);
    }

    /// Moves dirty keys' counts into `pending` until it holds `max` buckets or no key is
    /// dirty; returns whether it stopped at `max` (more keys may be waiting). Called by the
    /// flusher only.
    pub fn drain_up_to(&self, pending: &mut Pending, max: usize) -> bool {
        let dirty = self.dirty.lock();
        while pending.len() < max {
            match dirty.try_recv() {
                Ok(cell) => cell.take(pending),
                Err(_) => return false,
            }
        }
        true
    }

    /// Forgets keys' state that nothing holds (no cached key, no flush queue, no log) and
    /// whose buckets are full: such a state is what a new one would be, so forgetting it
    /// changes nothing. Returns how many went.
    pub fn prune_unused(&self) -> usize {
        let before = self.keys.len();
        // The count first: a queued key is held by the queue, so the lock is taken only for
        // states nothing else holds, never contended.
        self.keys.retain(|k, ()| {
            Arc::strong_count(&k.0) > 1 || k.0.is_dirty() || !k.0.limiter.is_full()
        });
        before - self.keys.len()
    }
}

// === impl Pending ===

impl Pending {
    fn add(
        &mut self,
        key_id: &Arc<str>,
        account_id: &Arc<str>,
        minute: i64,
        counts: &UsageCounts,
        last_used_ms: i64,
    ) {
        let bucket = self
            .by_bucket
            .entry((Arc::clone(key_id), minute))
            .or_insert_with(|| PendingBucket {
                account_id: Arc::clone(account_id),
                counts: UsageCounts::default(),
                last_used_ms,
            });
        bucket.counts.merge(counts);
        bucket.last_used_ms = bucket.last_used_ms.max(last_used_ms);
    }

    /// Adds one event of a key at `ms` (the log's path: the event is the unit, not a key's sum).
    fn add_event(&mut self, key_id: &Arc<str>, account_id: &Arc<str>, ms: i64, event: UsageEvent) {
        let mut counts = UsageCounts::default();
        counts.count(event);
        self.add(key_id, account_id, ms.div_euclid(60_000), &counts, ms);
    }

    /// Adds every bucket of `other`.
    pub fn merge(&mut self, other: Pending) {
        if self.by_bucket.is_empty() {
            *self = other;
            return;
        }
        for ((key_id, minute), b) in other.by_bucket {
            self.add(&key_id, &b.account_id, minute, &b.counts, b.last_used_ms);
        }
    }

    /// Takes at most `max` of the buckets (all of them, without copying, when there are no
    /// more).
    pub fn take_at_most(&mut self, max: usize) -> Pending {
        if self.by_bucket.len() <= max {
            return std::mem::take(self);
        }
        // The iterator stops after `max`; what it did not visit stays.
        let by_bucket = self.by_bucket.extract_if(|_, _| true).take(max).collect();
        Pending { by_bucket }
    }

    /// Number of (key, minute) buckets waiting.
    pub fn len(&self) -> usize {
        self.by_bucket.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.by_bucket.is_empty()
    }

    /// The batch to write.
    pub fn batch(&self) -> Vec<UsageDelta> {
        self.by_bucket
            .iter()
            .map(|((key_id, minute), b)| UsageDelta {
                key_id: Arc::clone(key_id),
                account_id: Arc::clone(&b.account_id),
                minute: *minute,
                counts: b.counts,
                last_used_ms: b.last_used_ms,
            })
            .collect()
    }

    /// Its buckets' minutes.
    fn minutes(&self) -> impl Iterator<Item = i64> + '_ {
        self.by_bucket.keys().map(|(_, minute)| *minute)
    }

    /// Drops every bucket before `cutoff`, and buckets of `cutoff` itself while `at_cutoff`
    /// lasts (counting it down); returns how many went.
    fn drop_before(&mut self, cutoff: i64, at_cutoff: &mut usize) -> usize {
        let before = self.by_bucket.len();
        self.by_bucket.retain(|(_, minute), _| {
            if *minute < cutoff {
                return false;
            }
            if *minute == cutoff && *at_cutoff > 0 {
                *at_cutoff -= 1;
                return false;
            }
            true
        });
        before - self.by_bucket.len()
    }

    /// Forgets everything (after a successful write).
    pub fn clear(&mut self) {
        self.by_bucket.clear();
    }
}

// === functions ===

/// Drops the oldest buckets of `parts`, taken together, beyond `max` (the store is away and
/// memory must stay bounded: the newest counts are the ones worth keeping); returns how many
/// were dropped.
pub fn cap_oldest(parts: &mut [&mut Pending], max: usize) -> usize {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let excess = total.saturating_sub(max);
    if excess == 0 {
        return 0;
    }
    let mut minutes: Vec<i64> = parts.iter().flat_map(|p| p.minutes()).collect();
    let cutoff = *minutes.select_nth_unstable(excess - 1).1;
    let older = minutes.iter().filter(|m| **m < cutoff).count();
    let mut at_cutoff = excess - older;
    parts
        .iter_mut()
        .map(|p| p.drop_before(cutoff, &mut at_cutoff))
        .sum()
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    /// A million keys are a million of these: with the `Arc`'s two counts a key's state must
    /// fit 192 bytes, or it takes the 224-byte size class. mimalloc's aligned allocation (the
    /// `GlobalAlloc` path) may ask for the alignment less one more, so 185 bytes is the most
    /// that fits: a 192-byte allocation usually takes 224 (docs/PERFORMANCE.md, round seven).
    #[test]
    fn a_key_state_with_its_counts_fits_192_bytes() {
        let size = std::mem::size_of::<KeyState>();
        let align = std::mem::align_of::<KeyState>();
        assert!(size + 16 + align - 1 <= 192, "{size}");
        assert_eq!(std::mem::size_of::<crate::limits::ById<KeyState>>(), 8);
    }

    #[test]
    fn counts_past_32_bits_in_one_minute_are_kept_whole() {
        let meter = Meter::new(WallClock::System);
        let cell = meter.cell(&Arc::from("key_1"), &Arc::from("acc_1"));
        let near = u64::from(u32::MAX) - 1;
        cell.record_bytes(60_000, near, 1);
        // Carries bytes in past u32::MAX: the minute so far is set aside.
        cell.record_bytes(60_001, 5, 1);
        // Past 32 bits on its own.
        cell.record_bytes(60_002, 1 << 40, 0);
        // Bytes in fit, bytes out do not: nothing of the event is counted twice.
        cell.record_bytes(60_002, 3, 1 << 33);
        cell.record(60_003, Outcome { status: 200 });
        // The next minute, then a flush, then the same minute again.
        cell.record(120_000, Outcome { status: 429 });
        let mut pending = Pending::default();
        meter.drain_into(&mut pending);
        cell.record(120_001, Outcome { status: 200 });
        meter.drain_into(&mut pending);
        let mut batch = pending.batch();
        batch.sort_by_key(|d| d.minute);
        assert_eq!(batch.len(), 2, "one bucket a minute");
        let [first, second] = [batch[0].counts, batch[1].counts];
        assert_eq!(first.bytes_in, near + 5 + (1 << 40) + 3);
        assert_eq!(first.bytes_out, 2 + (1 << 33));
        assert_eq!((first.requests, first.success), (1, 1));
        assert_eq!((second.requests, second.rate_limited), (2, 1));
        assert_eq!(batch[1].last_used_ms, 120_001);
    }

    #[test]
    fn a_minute_that_cannot_take_an_event_is_left_as_it_was() {
        let response = |status| {
            let mut delta = UsageCounts::default();
            delta.count(UsageEvent::Response { status });
            delta
        };
        let full = CellCounts([u32::MAX, 7, u32::MAX, 0, 1, 2]);
        let mut counts = full;
        assert!(
            !counts.try_add(&response(500)),
            "requests would pass u32::MAX"
        );
        assert!(counts == full, "and nothing was added");
        let mut counts = CellCounts([5, 5, 0, 0, u32::MAX - 1, 0]);
        assert!(counts.try_add(&response(200)));
        assert_eq!(
            counts.widen().to_array(),
            [6, 6, 0, 0, u64::from(u32::MAX) - 1, 0]
        );
    }

    #[test]
    fn a_key_keeps_its_state_across_refreshes_until_its_quotas_or_account_change() {
        let meter = Meter::new(WallClock::System);
        let (id, acc) = (Arc::from("key_1"), Arc::from("acc_1"));
        let per_minute = |n| Quotas {
            per: [NonZeroU32::new(n), None, None],
        };
        let a = meter.key(&id, &acc, per_minute(1), Replace::IfChanged);
        a.limiter().check().unwrap();
        a.record(0, Outcome { status: 200 });
        let b = meter.key(&id, &acc, per_minute(1), Replace::IfChanged);
        assert!(Arc::ptr_eq(&a, &b), "a refresh keeps the state");
        assert!(b.limiter().check().is_err(), "and its buckets");
        assert!(
            Arc::ptr_eq(&meter.cell(&id, &acc), &a),
            "whatever the quotas asked"
        );
        let c = meter.key(&id, &acc, per_minute(2), Replace::IfChanged);
        assert!(c.limiter().check().is_ok(), "new quotas, new buckets");
        assert!(Arc::ptr_eq(&meter.get("key_1").unwrap(), &c));
        assert_eq!(meter.len(), 1, "one state an id");
        assert_eq!(
            Arc::strong_count(&a),
            3,
            "a, b and the flusher's queue hold the old state: the registry let go of it"
        );
        let other = meter.cell(&Arc::from("key_2"), &acc);
        assert!(Arc::ptr_eq(&meter.get("key_2").unwrap(), &other));
        assert_eq!(&**meter.get("key_1").unwrap().key_id(), "key_1");
        assert!(meter.get("key_3").is_none());
        let d = meter.key(&id, &Arc::from("acc_2"), per_minute(2), Replace::IfChanged);
        assert!(!Arc::ptr_eq(&c, &d), "another account, another state");
        // The counts of the state left behind are still flushed, into the same bucket.
        d.record(1, Outcome { status: 200 });
        let mut pending = Pending::default();
        meter.drain_into(&mut pending);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending.batch()[0].counts.requests, 2);
    }

    #[test]
    fn a_key_state_is_forgotten_only_when_unheld_clean_and_its_buckets_full() {
        let meter = Meter::new(WallClock::System);
        let (acc, one_a_minute) = (
            Arc::from("acc"),
            Quotas {
                per: [NonZeroU32::new(1), None, None],
            },
        );
        let held = meter.cell(&Arc::from("key_held"), &acc);
        let dirty = meter.cell(&Arc::from("key_dirty"), &acc);
        dirty.record(0, Outcome { status: 200 });
        let spent = meter.key(
            &Arc::from("key_spent"),
            &acc,
            one_a_minute,
            Replace::IfChanged,
        );
        spent.limiter().check().unwrap();
        drop((dirty, spent));
        drop(meter.key(
            &Arc::from("key_unused"),
            &acc,
            one_a_minute,
            Replace::IfChanged,
        ));
        assert_eq!(meter.prune_unused(), 1);
        assert!(meter.get("key_unused").is_none());
        // The spent key's minute refills in a minute: forgotten now, it would pass again.
        assert!(meter.get("key_spent").is_some());
        // The dirty key waits in the flusher's queue: once drained, it goes too.
        let mut pending = Pending::default();
        meter.drain_into(&mut pending);
        assert_eq!(meter.prune_unused(), 1);
        assert!(meter.get("key_dirty").is_none());
        drop(held);
        assert_eq!(meter.prune_unused(), 1);
        assert_eq!(meter.len(), 1);
    }

    /// Loads of one key id at once (the key's and its tokens') share one state.
    #[test]
    fn concurrent_loads_of_one_key_get_one_state() {
        let meter = Meter::new(WallClock::System);
        let quotas = Quotas {
            per: [NonZeroU32::new(10), None, None],
        };
        let states: Vec<Arc<KeyState>> = std::thread::scope(|s| {
            let loads: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        meter.key(
                            &Arc::from("key_1"),
                            &Arc::from("acc"),
                            quotas,
                            Replace::IfChanged,
                        )
                    })
                })
                .collect();
            loads.into_iter().map(|l| l.join().unwrap()).collect()
        });
        assert!(states.iter().all(|k| Arc::ptr_eq(k, &states[0])));
        // A read overtaken by an invalidation keeps the state whatever its quotas.
        let stale = meter.key(
            &Arc::from("key_1"),
            &Arc::from("acc"),
            Quotas::default(),
            Replace::Never,
        );
        assert!(Arc::ptr_eq(&stale, &states[0]));
    }

    #[test]
    fn the_coarse_clock_is_close_and_a_near_deadline_reads_the_exact_one() {
        let clock = WallClock::System;
        for _ in 0..1000 {
            let before = exact_ms();
            let coarse = clock.now_ms();
            assert!(
                (before - COARSE_LAG_MS..=exact_ms()).contains(&coarse),
                "{coarse} vs {before}"
            );
            // A key that expires at this very millisecond is expired, whatever the tick.
            let deadline = exact_ms();
            assert!(clock.now_ms_near(Some(deadline)) >= deadline);
            // A far deadline costs no exact reading and changes nothing.
            assert!(clock.now_ms_near(Some(deadline + 60_000)) < deadline + 60_000);
        }
        let manual = WallClock::Manual(Arc::new(AtomicI64::new(5)));
        assert_eq!(manual.now_ms_near(Some(10)), 5);
    }

    #[test]
    fn requests_either_side_of_a_minute_land_in_different_buckets() {
        let meter = Meter::new(WallClock::System);
        let cell = meter.cell(&Arc::from("k"), &Arc::from("a"));
        let boundary = 60_000 * 29_000_000;
        cell.record(boundary - 1, Outcome { status: 200 });
        cell.record(boundary, Outcome { status: 429 });
        cell.record_bytes(boundary, 10, 20);
        let mut pending = Pending::default();
        meter.drain_into(&mut pending);
        let mut batch = pending.batch();
        batch.sort_by_key(|d| d.minute);
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[0].minute, boundary / 60_000 - 1);
        assert_eq!(
            batch[0].counts,
            UsageCounts {
                requests: 1,
                success: 1,
                ..Default::default()
            }
        );
        assert_eq!(
            batch[1].counts,
            UsageCounts {
                requests: 1,
                error: 1,
                rate_limited: 1,
                bytes_in: 10,
                bytes_out: 20,
                ..Default::default()
            }
        );
    }

    fn minutes_of(pending: &Pending) -> Vec<i64> {
        let mut minutes: Vec<i64> = pending.minutes().collect();
        minutes.sort_unstable();
        minutes
    }

    #[test]
    fn pending_is_capped_oldest_first_across_parts() {
        let meter = Meter::new(WallClock::System);
        let (a, b) = (
            meter.cell(&Arc::from("a"), &Arc::from("acc")),
            meter.cell(&Arc::from("b"), &Arc::from("acc")),
        );
        let (mut older, mut newer) = (Pending::default(), Pending::default());
        for minute in 0..4 {
            a.record(minute * 60_000, Outcome { status: 200 });
        }
        meter.drain_into(&mut older);
        // Minute 3 twice (two keys), so the cut falls inside a minute.
        for minute in 3..8 {
            b.record(minute * 60_000, Outcome { status: 200 });
        }
        meter.drain_into(&mut newer);
        assert_eq!(cap_oldest(&mut [&mut older, &mut newer], 9), 0);
        assert_eq!(cap_oldest(&mut [&mut older, &mut newer], 5), 4);
        assert_eq!(older.len() + newer.len(), 5);
        let mut left = minutes_of(&older);
        left.extend(minutes_of(&newer));
        left.sort_unstable();
        assert_eq!(left, vec![3, 4, 5, 6, 7]);
        assert_eq!(cap_oldest(&mut [&mut older, &mut newer], 2), 3);
        assert!(older.is_empty());
        assert_eq!(minutes_of(&newer), vec![6, 7]);
    }

    #[test]
    fn counts_after_a_drain_are_queued_again_and_merge() {
        let meter = Meter::new(WallClock::System);
        let cell = meter.cell(&Arc::from("k"), &Arc::from("a"));
        let mut pending = Pending::default();
        cell.record(0, Outcome { status: 200 });
        meter.drain_into(&mut pending);
        cell.record(1, Outcome { status: 500 });
        meter.drain_into(&mut pending);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending.batch()[0].counts.requests, 2);
        assert_eq!(pending.batch()[0].counts.error, 1);
    }
}
