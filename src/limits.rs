//! Per-key rate limits: a GCRA bucket per window — minute, hour, day — and the values of the
//! limit headers.
//!
//! State only, no I/O. A key's [`KeyLimiter`] lives in its [`KeyState`], beside its usage
//! counts, in the meter's registry by key id, so that its buckets outlive cache refreshes; an
//! account's shared buckets live in the [`Limiters`] registry by account id. The key cache keeps
//! an `Arc` to them beside the cached key so that the request path reaches the buckets without
//! a second map lookup. [`KeyLimiter`] and [`Limiters`] are generic over governor's `Clock` so
//! tests can drive time by hand (a key's state runs on [`ProcessClock`]).
//!
//! Each window is the generic cell rate algorithm as governor runs it (the same arithmetic, so
//! the same answers), kept as one atomic integer per window instead of a governor
//! `RateLimiter` per window: a key's three buckets take 24 bytes of state, not ~100, which is
//! most of what a million cached keys' limiters cost.

pub mod global;

use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use governor::clock::{Clock, ReasonablyRealtime};
use governor::nanos::Nanos;

use crate::metering::KeyState;
use crate::store::RateLimitSpec;

/// The process's monotonic clock as governor reads it: `CLOCK_MONOTONIC_COARSE`, which the
/// kernel updates every tick (1–4 ms) and the vDSO reads in ~5 ns, against ~11 ns for the TSC
/// through quanta; a check reads it once per window. A refill is then counted a tick late at
/// worst, which no per-minute, -hour or -day limit can tell. Zero-sized, where governor's
/// `QuantaClock` carries a 40-byte `quanta::Clock` in each of a key's three buckets.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessClock;

impl Clock for ProcessClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
        let secs = u64::try_from(t.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
        Nanos::new(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
    }
}

impl ReasonablyRealtime for ProcessClock {}

const NANOS: u64 = 1_000_000_000;

/// A limit window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// 60 s.
    Minute,
    /// 3 600 s.
    Hour,
    /// 86 400 s.
    Day,
}

/// The effective per-window limits of a key; `None` = that window is not limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Quotas {
    /// Requests per minute, hour, day, in [`Window::ALL`] order.
    pub per: [Option<NonZeroU32>; 3],
}

/// One window's state after a check, for the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowState {
    /// Which window.
    pub window: Window,
    /// Its limit.
    pub limit: u32,
    /// Requests that would pass right now.
    pub remaining: u32,
    /// Whole seconds until it is full again (or, when empty, until it has room).
    pub reset: u64,
    /// The account's shared buckets (`shared_rate_limit`), not the key's own.
    pub shared: bool,
}

/// What the windows said for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LimitSnapshot {
    /// In [`Window::ALL`] order; `None` for windows not limited.
    pub windows: [Option<WindowState>; 3],
}

/// A refused request: the first window that had no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    /// That window.
    pub window: Window,
    /// Whole seconds until it has room (at least 1).
    pub retry_after: u64,
    /// All windows as they stand, the exhausted one at zero.
    pub snapshot: LimitSnapshot,
}

/// The three buckets of one key: per window, GCRA's theoretical arrival time of the next
/// request (`tat`, in nanoseconds of the clock; 0 before the first request).
///
/// With `t` the window's length over its limit (the time one request takes to refill) and `tau
/// = t × (limit − 1)` (how far ahead of now `tat` may run: the burst), a request at `now` passes
/// when `now ≥ tat − tau`, and moves `tat` to `max(tat, now) + t`. What is left after it is
/// `min(now + tau + t − tat, tau + t) / t` requests. These are governor's `Gcra` and
/// `StateSnapshot::remaining_burst_capacity`, step for step.
pub struct KeyLimiter<C: Clock<Instant = Nanos> = ProcessClock> {
    quotas: Quotas,
    /// Per window, `t` in nanoseconds (0: the window is not limited). Derivable from `quotas`,
    /// and kept so that a check makes no division.
    interval: [u64; 3],
    /// What a window has left is read off its `tat` at the time of asking (a 429's windows
    /// not reached, the usage API), so no remaining count is kept beside it: the buckets are 64
    /// bytes, which [`crate::metering::KeyState`] needs to fit its size class.
    tat: [AtomicU64; 3],
    /// Prune rounds since the last check; see [`Limiters::prune_idle`].
    idle_rounds: AtomicU32,
    clock: C,
}

/// This instance's buckets of a key (in the allocation of its [`KeyState`], beside its usage
/// counts) or of an account's shared limits (in [`Limiters`]).
#[derive(Clone)]
pub enum LocalBuckets {
    /// A key's.
    Key(Arc<KeyState>),
    /// An account's `shared_rate_limit`.
    Account(Arc<KeyLimiter>),
}

/// Whether a read of a key may replace what a registry holds under its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Read since the last invalidation: its quotas (and account) replace different ones, with
    /// fresh buckets.
    IfChanged,
    /// Overtaken by an invalidation (served once, not cached), or counting usage alone: takes
    /// what is registered whatever its quotas, since that may come from a newer read.
    Never,
}

/// A key's buckets as the request path sees them: this instance's, or the fleet's.
#[derive(Clone)]
pub enum KeyLimits {
    /// `limits.mode = "local"`.
    Local(LocalBuckets),
    /// `limits.mode = "global"`.
    Global(Arc<global::GlobalLimiter>),
}

/// Limiters by id: the accounts' shared buckets (a key's own are in its [`KeyState`]).
pub struct Limiters<C: Clock<Instant = Nanos> = ProcessClock> {
    by_key: DashMap<Arc<str>, Arc<KeyLimiter<C>>>,
    clock: C,
}

// === impl Window ===

impl Window {
    /// Shortest first: the order in which windows are checked.
    pub const ALL: [Window; 3] = [Window::Minute, Window::Hour, Window::Day];

    /// `minute`, `hour`, `day`.
    pub const fn name(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
        }
    }

    /// Whole seconds until a bucket of `limit` per window with `remaining` left is full again
    /// (rounded up; exact, in integers).
    pub(crate) fn refill_secs(self, limit: u32, remaining: u32) -> u64 {
        let missing = u64::from(limit.saturating_sub(remaining));
        (missing * self.seconds()).div_ceil(u64::from(limit.max(1)))
    }

    /// Length in seconds.
    pub const fn seconds(self) -> u64 {
        match self {
            Window::Minute => 60,
            Window::Hour => 3_600,
            Window::Day => 86_400,
        }
    }

    /// Position in [`Window::ALL`].
    pub const fn index(self) -> usize {
        match self {
            Window::Minute => 0,
            Window::Hour => 1,
            Window::Day => 2,
        }
    }
}

// === impl Quotas ===

impl Quotas {
    /// Per window: the key's value, else the account's, else the default.
    pub fn resolve(
        key: Option<&RateLimitSpec>,
        account: Option<&RateLimitSpec>,
        default: &RateLimitSpec,
    ) -> Quotas {
        let pick = |f: fn(&RateLimitSpec) -> Option<u32>| {
            key.and_then(f)
                .or_else(|| account.and_then(f))
                .or_else(|| f(default))
                .and_then(NonZeroU32::new)
        };
        Quotas {
            per: [
                pick(|s| s.per_minute),
                pick(|s| s.per_hour),
                pick(|s| s.per_day),
            ],
        }
    }

    /// The limit of one window.
    pub fn get(&self, window: Window) -> Option<NonZeroU32> {
        self.per[window.index()]
    }
}

// === impl KeyLimiter ===

impl<C: Clock<Instant = Nanos> + Clone> KeyLimiter<C> {
    /// Fresh, full buckets.
    pub fn new(quotas: Quotas, clock: &C) -> Self {
        // governor's `Quota::with_period(window / n)`: whole nanoseconds, at least one.
        let interval = |w: Window| {
            quotas
                .get(w)
                .map_or(0, |n| (w.seconds() * NANOS / u64::from(n.get())).max(1))
        };
        KeyLimiter {
            quotas,
            interval: [
                interval(Window::Minute),
                interval(Window::Hour),
                interval(Window::Day),
            ],
            tat: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            idle_rounds: AtomicU32::new(0),
            clock: C::clone(clock),
        }
    }

    /// Spends one request from every window, shortest first, stopping at the first that has no
    /// room. A request refused by a longer window has still spent from the shorter ones.
    pub fn check(&self) -> Result<LimitSnapshot, Exhausted> {
        if self.idle_rounds.load(Ordering::Relaxed) != 0 {
            self.idle_rounds.store(0, Ordering::Relaxed);
        }
        let now = self.clock.now().as_u64();
        let mut snapshot = LimitSnapshot::default();
        for window in Window::ALL {
            let i = window.index();
            let Some(limit) = self.quotas.per[i] else {
                continue;
            };
            let limit = limit.get();
            match self.spend(i, limit, now) {
                Ok(remaining) => {
                    snapshot.windows[i] = Some(WindowState {
                        window,
                        limit,
                        remaining,
                        reset: window.refill_secs(limit, remaining),
                        shared: false,
                    });
                }
                Err(wait_ns) => {
                    let retry_after = wait_ns.div_ceil(NANOS).max(1);
                    snapshot.windows[i] = Some(WindowState {
                        window,
                        limit,
                        remaining: 0,
                        reset: retry_after,
                        shared: false,
                    });
                    self.fill_unchecked(&mut snapshot, i + 1, now);
                    return Err(Exhausted {
                        window,
                        retry_after,
                        snapshot,
                    });
                }
            }
        }
        Ok(snapshot)
    }

    /// The quotas the buckets were made for.
    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    /// Whether every window is full (as a new limiter's are): forgetting these buckets and
    /// making new ones would change nothing.
    pub fn is_full(&self) -> bool {
        let now = self.clock.now().as_u64();
        self.tat
            .iter()
            .all(|tat| tat.load(Ordering::Acquire) <= now)
    }

    /// Counts one prune round without a check; returns the rounds since the last check.
    pub(crate) fn count_idle_round(&self) -> u32 {
        self.idle_rounds.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// One request from window `i` at `now`: the requests left after it, or the nanoseconds
    /// until it would have room.
    fn spend(&self, i: usize, limit: u32, now: u64) -> Result<u32, u64> {
        let t = self.interval[i];
        let tau = t * u64::from(limit - 1);
        let tat = &self.tat[i];
        let mut prev = tat.load(Ordering::Acquire);
        loop {
            let earliest = prev.saturating_sub(tau);
            if now < earliest {
                return Err(earliest - now);
            }
            let next = prev.max(now) + t;
            match tat.compare_exchange_weak(prev, next, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => {
                    let left = (now + tau + t).saturating_sub(next).min(tau + t) / t;
                    return Ok(u32::try_from(left).unwrap_or(limit));
                }
                Err(current) => prev = current,
            }
        }
    }

    /// The windows as they stand now, without spending: what the usage API reports.
    pub fn peek(&self) -> LimitSnapshot {
        let mut snapshot = LimitSnapshot::default();
        self.fill_unchecked(&mut snapshot, 0, self.clock.now().as_u64());
        snapshot
    }

    /// Windows `from` on as they stand at `now`, without spending.
    fn fill_unchecked(&self, snapshot: &mut LimitSnapshot, from: usize, now: u64) {
        for window in &Window::ALL[from..] {
            let i = window.index();
            if let Some(limit) = self.quotas.per[i] {
                let limit = limit.get();
                let remaining = self.left(i, limit, now);
                snapshot.windows[i] = Some(WindowState {
                    window: *window,
                    limit,
                    remaining,
                    reset: window.refill_secs(limit, remaining),
                    shared: false,
                });
            }
        }
    }

    /// The requests window `i` would pass at `now`: `min(now + tau + t − tat, tau + t) / t`,
    /// what [`KeyLimiter::spend`] reports after a request, before one.
    fn left(&self, i: usize, limit: u32, now: u64) -> u32 {
        let t = self.interval[i];
        let full = t * u64::from(limit);
        let tat = self.tat[i].load(Ordering::Acquire);
        let left = (now + full).saturating_sub(tat).min(full) / t;
        u32::try_from(left).unwrap_or(limit)
    }
}

// === impl LimitSnapshot ===

impl LimitSnapshot {
    /// Full windows for these quotas: a key not used since start-up.
    pub fn full(quotas: &Quotas) -> LimitSnapshot {
        let mut snapshot = LimitSnapshot::default();
        for (i, window) in Window::ALL.iter().enumerate() {
            if let Some(limit) = quotas.per[i] {
                let limit = limit.get();
                snapshot.windows[i] = Some(WindowState {
                    window: *window,
                    limit,
                    remaining: limit,
                    reset: 0,
                    shared: false,
                });
            }
        }
        snapshot
    }

    /// The key's windows and its account's shared ones as the headers show them: per window,
    /// whichever has fewer remaining (the key's on a tie), marked `shared` when it is the
    /// account's.
    pub fn with_shared(mut self, shared: &LimitSnapshot) -> LimitSnapshot {
        for (own, theirs) in self.windows.iter_mut().zip(&shared.windows) {
            if let Some(theirs) = theirs {
                if own.is_none_or(|o| theirs.remaining < o.remaining) {
                    *own = Some(WindowState {
                        shared: true,
                        ..*theirs
                    });
                }
            }
        }
        self
    }

    /// The window with the fewest remaining (the shorter on a tie): the one the single-window
    /// headers describe.
    pub fn tightest(&self) -> Option<WindowState> {
        self.windows
            .iter()
            .flatten()
            .copied()
            .min_by_key(|w| w.remaining)
    }
}

// === impl LocalBuckets ===

impl LocalBuckets {
    /// The buckets.
    pub fn get(&self) -> &KeyLimiter {
        match self {
            LocalBuckets::Key(k) => k.limiter(),
            LocalBuckets::Account(a) => a,
        }
    }
}

// === impl KeyLimits ===

impl KeyLimits {
    /// Spends one request from every window (see [`KeyLimiter::check`] and
    /// [`global::GlobalLimiter::check`]).
    pub fn check(&self, now_ms: i64) -> Result<LimitSnapshot, global::Shortfall> {
        match self {
            KeyLimits::Local(l) => l.get().check().map_err(global::Shortfall::Exhausted),
            KeyLimits::Global(g) => g.check(now_ms),
        }
    }

    /// The windows without spending.
    pub fn peek(&self, now_ms: i64) -> LimitSnapshot {
        match self {
            KeyLimits::Local(l) => l.get().peek(),
            KeyLimits::Global(g) => g.peek(now_ms),
        }
    }

    /// For global limits, waits for a lease refill; a no-op locally.
    pub async fn refill(&self, now_ms: i64) {
        if let KeyLimits::Global(g) = self {
            g.refill(now_ms).await;
        }
    }

    /// For global limits, counts the caller among the requests waiting for a lease (refills
    /// take enough for all of them) until the guard is dropped; `None` locally.
    pub fn wait(&self) -> Option<global::LeaseWait<'_>> {
        match self {
            KeyLimits::Local(_) => None,
            KeyLimits::Global(g) => Some(g.wait()),
        }
    }
}

// === impl Limiters ===

impl Limiters<ProcessClock> {
    /// A registry on the real clock.
    pub fn new() -> Self {
        Self::with_clock(ProcessClock)
    }
}

impl Default for Limiters<ProcessClock> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Clock<Instant = Nanos> + Clone> Limiters<C> {
    /// A registry on the given clock.
    pub fn with_clock(clock: C) -> Self {
        Limiters {
            by_key: DashMap::new(),
            clock,
        }
    }

    /// The limiter under `id` (an account's shared buckets). An existing one is kept while its
    /// quotas are unchanged, so that a cache refresh does not refill the buckets; changed
    /// quotas start fresh buckets, as `replace` allows.
    pub fn for_key(&self, id: &Arc<str>, quotas: Quotas, replace: Replace) -> Arc<KeyLimiter<C>> {
        // The keys of an account reloaded at once get one set of shared buckets.
        registered(
            &self.by_key,
            id,
            replace,
            |l| l.quotas == quotas,
            || Arc::new(KeyLimiter::new(quotas, &self.clock)),
        )
    }

    /// Counts one prune round and forgets limiters that no cached key holds and that have not
    /// been checked for more than `rounds` rounds. Called hourly with 25 rounds, a limiter is
    /// dropped only once even its day bucket has refilled, so forgetting it changes nothing.
    pub fn prune_idle(&self, rounds: u32) -> usize {
        let before = self.by_key.len();
        self.by_key
            .retain(|_, l| l.count_idle_round() <= rounds || Arc::strong_count(l) > 1);
        before - self.by_key.len()
    }

    /// Number of limiters.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

// === functions ===

/// A registry of values by id: a map from the id ([`Limiters`], [`global::SharedLimiters`]), or
/// a set of values that carry their own ([`IdSet`]: the meter's key states), whose slot is then
/// one pointer instead of two beside the id's 16 bytes.
pub(crate) trait Registry<T> {
    /// The value under `id`, read under the shard's shared lock.
    fn lookup(&self, id: &str) -> Option<Arc<T>>;

    /// The value under `id` if `keep` says it may stay, else `make`'s, registered in its place
    /// under the shard's write lock (the map form makes it under the lock; the set form
    /// beforehand, since its entry is found by a value).
    fn keep_or_make(
        &self,
        id: &Arc<str>,
        keep: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Arc<T>,
    ) -> Arc<T>;
}

impl<T> Registry<T> for DashMap<Arc<str>, Arc<T>> {
    fn lookup(&self, id: &str) -> Option<Arc<T>> {
        self.get(id).map(|v| Arc::clone(&v))
    }

    fn keep_or_make(
        &self,
        id: &Arc<str>,
        keep: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Arc<T>,
    ) -> Arc<T> {
        match self.entry(Arc::clone(id)) {
            MapEntry::Occupied(e) if keep(e.get()) => Arc::clone(e.get()),
            MapEntry::Occupied(mut e) => {
                let made = make();
                e.insert(Arc::clone(&made));
                made
            }
            MapEntry::Vacant(e) => Arc::clone(e.insert(make()).value()),
        }
    }
}

/// What a value in an [`IdSet`] is found by.
pub(crate) trait Identified {
    /// Its id: unchanged for the value's life.
    fn id(&self) -> &str;
}

/// A value in an [`IdSet`]: hashed and compared by its id, and so found by a `&str`.
pub(crate) struct ById<T>(pub(crate) Arc<T>);

/// A registry whose values carry their own ids: a slot is the 8-byte pointer.
pub(crate) type IdSet<T> = DashMap<ById<T>, ()>;

impl<T: Identified> Borrow<str> for ById<T> {
    fn borrow(&self) -> &str {
        self.0.id()
    }
}

/// As `str` hashes, so that a lookup by `&str` finds it.
impl<T: Identified> Hash for ById<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id().hash(state);
    }
}

impl<T: Identified> PartialEq for ById<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.id() == other.0.id()
    }
}

impl<T: Identified> Eq for ById<T> {}

impl<T: Identified> Registry<T> for IdSet<T> {
    fn lookup(&self, id: &str) -> Option<Arc<T>> {
        self.get(id).map(|v| Arc::clone(&v.key().0))
    }

    fn keep_or_make(
        &self,
        id: &Arc<str>,
        keep: impl Fn(&T) -> bool,
        make: impl FnOnce() -> Arc<T>,
    ) -> Arc<T> {
        // A set's entry is found by a value, so the new one is made first, and dropped when
        // the one there may stay: only when a concurrent load registered it first (the usual
        // call, a cache refresh, is answered by the shared read before this).
        let made = make();
        debug_assert_eq!(made.id(), &**id, "a value is registered under its own id");
        match self.entry(ById(Arc::clone(&made))) {
            MapEntry::Occupied(e) if keep(&e.key().0) => Arc::clone(&e.key().0),
            MapEntry::Occupied(e) => {
                // Puts the entry's key, `made`, in place of the old one (dashmap 6's
                // `replace_entry`; `meter`'s tests check that a lookup then finds `made`).
                e.replace_entry(());
                made
            }
            MapEntry::Vacant(e) => {
                e.insert(());
                made
            }
        }
    }
}

/// The value of `map` under `id` while `fits` says it may stay (or whatever it is, with
/// [`Replace::Never`]), else a new one from `make` in its place. Registered under the shard's
/// lock, so that callers at once get one value, and read under a shared lock first, so that the
/// usual call (a cache refresh) takes no write lock.
pub(crate) fn registered<T>(
    map: &impl Registry<T>,
    id: &Arc<str>,
    replace: Replace,
    fits: impl Fn(&T) -> bool,
    make: impl FnOnce() -> Arc<T>,
) -> Arc<T> {
    let fits = |value: &T| replace == Replace::Never || fits(value);
    if let Some(existing) = map.lookup(id) {
        if fits(&existing) {
            return existing;
        }
    }
    map.keep_or_make(id, fits, make)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn quotas(m: u32, h: u32, d: u32) -> Quotas {
        Quotas {
            per: [NonZeroU32::new(m), NonZeroU32::new(h), NonZeroU32::new(d)],
        }
    }

    #[test]
    fn refill_seconds_round_up_exactly() {
        assert_eq!(Window::Minute.refill_secs(3, 1), 40);
        assert_eq!(Window::Minute.refill_secs(7, 0), 60);
        assert_eq!(Window::Minute.refill_secs(7, 7), 0);
        assert_eq!(Window::Minute.refill_secs(7, 9), 0);
        assert_eq!(Window::Day.refill_secs(1000, 999), 87);
        assert_eq!(Window::Hour.refill_secs(u32::MAX, 0), 3600);
    }

    #[test]
    fn key_overrides_account_overrides_default_per_window() {
        let default = RateLimitSpec {
            per_minute: Some(60),
            per_hour: Some(1000),
            per_day: Some(10_000),
        };
        let account = RateLimitSpec {
            per_minute: Some(30),
            per_hour: Some(500),
            per_day: None,
        };
        let key = RateLimitSpec {
            per_minute: Some(5),
            per_hour: None,
            per_day: None,
        };
        assert_eq!(
            Quotas::resolve(Some(&key), Some(&account), &default),
            quotas(5, 500, 10_000)
        );
        assert_eq!(
            Quotas::resolve(None, None, &default),
            quotas(60, 1000, 10_000)
        );
    }

    #[test]
    fn minute_window_refuses_after_its_limit_and_refills_over_time() {
        let clock = FakeRelativeClock::default();
        let limiter = KeyLimiter::new(quotas(3, 100, 1000), &clock);
        let first = limiter.check().unwrap();
        assert_eq!(first.windows[0].unwrap().remaining, 2);
        assert_eq!(first.windows[0].unwrap().reset, 20);
        limiter.check().unwrap();
        let third = limiter.check().unwrap();
        assert_eq!(third.tightest().unwrap().window, Window::Minute);
        assert_eq!(third.tightest().unwrap().remaining, 0);
        let refused = limiter.check().unwrap_err();
        assert_eq!(refused.window, Window::Minute);
        assert_eq!(refused.retry_after, 20);
        assert_eq!(refused.snapshot.windows[1].unwrap().remaining, 97);
        clock.advance(Duration::from_secs(20));
        assert!(limiter.check().is_ok());
        assert!(limiter.check().is_err());
    }

    /// The integer GCRA gives governor's answers: the same passes and refusals, the same
    /// remaining counts and the same waits, over random sequences of requests and pauses.
    #[test]
    fn the_windows_answer_as_governor_does() {
        use governor::middleware::StateInformationMiddleware;
        use governor::{Quota, RateLimiter};

        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (m, h, d) in [
            (3, 100, 1000),
            (1, 2, 3),
            (60, 0, 0),
            (0, 0, 5),
            (1000, 5000, 7),
        ] {
            let q = quotas(m, h, d);
            let clock = FakeRelativeClock::default();
            let ours = KeyLimiter::new(q, &clock);
            let theirs: Vec<_> = Window::ALL
                .iter()
                .map(|w| {
                    q.get(*w).map(|n| {
                        let quota = Quota::with_period(Duration::from_secs(w.seconds()) / n.get())
                            .expect("period")
                            .allow_burst(n);
                        RateLimiter::direct_with_clock(quota, clock.clone())
                            .with_middleware::<StateInformationMiddleware>()
                    })
                })
                .collect();
            for _ in 0..5_000 {
                if next() % 3 == 0 {
                    clock.advance(Duration::from_nanos(next() % 30_000_000_000));
                    continue;
                }
                let mut expected = Ok(Vec::new());
                for (i, bucket) in theirs.iter().enumerate() {
                    let Some(bucket) = bucket else { continue };
                    match bucket.check() {
                        Ok(state) => {
                            if let Ok(v) = &mut expected {
                                v.push((i, state.remaining_burst_capacity()));
                            }
                        }
                        Err(not_until) => {
                            let wait = not_until.wait_time_from(clock.now());
                            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                            expected = Err((i, secs.max(1)));
                            break;
                        }
                    }
                }
                // What a peek says is left is what the check then finds: one spent from each
                // window that passes, none in a window that refuses, the rest untouched.
                let left = |s: &LimitSnapshot, i: usize| s.windows[i].map(|w| w.remaining);
                let before = ours.peek();
                let checked = ours.check();
                match &checked {
                    Ok(after) => {
                        for i in 0..3 {
                            assert_eq!(left(&before, i), left(after, i).map(|r| r + 1));
                        }
                    }
                    Err(e) => {
                        let refused = e.window.index();
                        assert_eq!(left(&before, refused), Some(0));
                        for i in 0..refused {
                            assert_eq!(left(&before, i), left(&e.snapshot, i).map(|r| r + 1));
                        }
                        for i in refused + 1..3 {
                            assert_eq!(left(&before, i), left(&e.snapshot, i));
                        }
                    }
                }
                let got = match checked {
                    Ok(snapshot) => Ok(snapshot
                        .windows
                        .iter()
                        .enumerate()
                        .filter_map(|(i, w)| w.map(|w| (i, w.remaining)))
                        .collect()),
                    Err(e) => Err((e.window.index(), e.retry_after)),
                };
                assert_eq!(got, expected, "quotas {m}/{h}/{d} at {:?}", clock.now());
            }
        }
    }

    #[test]
    fn the_day_window_refuses_when_minutes_still_have_room() {
        let clock = FakeRelativeClock::default();
        let limiter = KeyLimiter::new(quotas(10, 100, 2), &clock);
        limiter.check().unwrap();
        limiter.check().unwrap();
        let refused = limiter.check().unwrap_err();
        assert_eq!(refused.window, Window::Day);
        assert_eq!(refused.retry_after, 43_200);
    }

    /// What the usage API and a 429's other windows report is what would pass at the time of
    /// asking: refills since the last check count.
    #[test]
    fn a_peek_sees_the_refill_since_the_last_check_and_spends_nothing() {
        let clock = FakeRelativeClock::default();
        let limiter = KeyLimiter::new(quotas(3, 100, 1000), &clock);
        let full = limiter.peek();
        assert_eq!(full.windows[0].unwrap().remaining, 3);
        assert_eq!(full.windows[0].unwrap().reset, 0);
        for _ in 0..3 {
            limiter.check().unwrap();
        }
        let empty = limiter.peek();
        assert_eq!(empty.windows[0].unwrap().remaining, 0);
        assert_eq!(empty.windows[0].unwrap().reset, 60);
        assert_eq!(empty.windows[1].unwrap().remaining, 97);
        clock.advance(Duration::from_secs(20));
        let later = limiter.peek();
        assert_eq!(later.windows[0].unwrap().remaining, 1);
        assert_eq!(later.windows[0].unwrap().reset, 40);
        assert_eq!(limiter.peek(), later, "a peek spends nothing");
        // Refused by the minute, the hour is reported as it stands, not spent.
        limiter.check().unwrap();
        let refused = limiter.check().unwrap_err();
        assert_eq!(refused.window, Window::Minute);
        assert_eq!(refused.snapshot.windows[1].unwrap().remaining, 96);
        assert_eq!(limiter.peek().windows[1].unwrap().remaining, 96);
    }

    /// Each cached key holds two of these: kept at a tag and a pointer, the entry keeps its
    /// size class.
    #[test]
    fn a_key_s_limits_are_two_words() {
        assert!(std::mem::size_of::<KeyLimits>() <= 16);
        assert!(std::mem::size_of::<Option<KeyLimits>>() <= 16);
        assert_eq!(std::mem::size_of::<KeyLimiter>(), 64);
    }

    #[test]
    fn registry_keeps_buckets_across_refreshes_until_quotas_change() {
        let clock = FakeRelativeClock::default();
        let limiters = Limiters::with_clock(clock);
        let id: Arc<str> = Arc::from("key_1");
        let a = limiters.for_key(&id, quotas(1, 10, 10), Replace::IfChanged);
        a.check().unwrap();
        let b = limiters.for_key(&id, quotas(1, 10, 10), Replace::IfChanged);
        assert!(b.check().is_err(), "same buckets after a refresh");
        let c = limiters.for_key(&id, quotas(2, 10, 10), Replace::IfChanged);
        assert!(c.check().is_ok(), "new quotas, new buckets");
        // A read that an invalidation overtook takes the buckets as they are.
        let stale = limiters.for_key(&id, quotas(1, 10, 10), Replace::Never);
        assert!(Arc::ptr_eq(&stale, &c));
        drop(stale);
        let other: Arc<str> = Arc::from("acc_2");
        let fresh = limiters.for_key(&other, quotas(1, 10, 10), Replace::Never);
        assert_eq!(fresh.quotas(), quotas(1, 10, 10));
        assert!(Arc::ptr_eq(
            &fresh,
            &limiters.for_key(&other, quotas(1, 10, 10), Replace::IfChanged)
        ));
        drop(fresh);
        drop((a, b));
        assert_eq!(limiters.prune_idle(2), 0, "held by a cached key");
        drop(c);
        assert_eq!(limiters.prune_idle(2), 0, "idle for two rounds only");
        assert_eq!(limiters.prune_idle(2), 2);
        assert!(limiters.is_empty());
    }
}
