//! The key cache: presented credential hash → [`CachedKey`], so that a known key costs no store
//! I/O. Entries are fresh for `ttl` (unknown hashes for `negative_ttl`), dropped at once by
//! [`KeyCache::invalidate`], and bounded by `max_entries`. Concurrent misses for one hash share
//! one store read. A key in the cache never waits on the store: past its ttl (for up to
//! [`STALE_KEEP`]) the entry is served while one background read refreshes it
//! (stale-while-revalidate); if that read fails, `fail_open` goes on serving it, and
//! `fail_closed` refuses it while the store's reads are failing. Past its ttl an entry is still
//! fresh, without a re-read, while the
//! store's [`revision`](crate::store::Records::revision) has not moved since it was read (the
//! embedded store sees every write; Redis, written by other instances, cannot tell, so there the
//! ttl always means a re-read).
//!
//! It also holds whether the store holds imported keys ([`KeyCache::admits_unchecked`]), read at
//! start-up and again once per ttl when asked, and set at once by an import (here, or on another
//! instance through the invalidation channel), so the proxy never asks the store per request.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use http::HeaderValue;
use tokio::sync::OnceCell;
use tokio::time::Instant;

use super::{CachedKey, IdentityValues, KeyRules, LimitValues};
use crate::config::{CacheSettings, OnStoreError};
use crate::credential::{KeyHash, KeyHashBuilder};
use crate::credits::CreditLeases;
use crate::limits::global::SharedLimiters;
use crate::limits::{KeyLimits, Limiters, LocalBuckets, Quotas, Replace, Window};
use crate::metering::Meter;
use crate::metrics::{Metrics, StoreCalls};
use crate::policy;
use crate::store::{Invalidation, InvalidationEvent, KeyLookup, RateLimitSpec, SharedStore};

/// How long past its ttl an entry is still served (while it is re-read in the background, and as
/// the fallback for `fail_open` while the store is down); after that a use waits for the read.
const STALE_KEEP: Duration = Duration::from_secs(15 * 60);
/// [`STALE_KEEP`] in ms, as entries keep their times.
const STALE_KEEP_MS: u64 = STALE_KEEP.as_millis() as u64;

/// While key lookups fail, stale keys start a background re-read at most this often, across all
/// keys: each would fail at once (the breaker is open), so a task per request would be work for
/// nothing; one now and then finds the store back (and ends `fail_closed`'s refusals).
const RETRY_WHILE_FAILING: Duration = Duration::from_millis(100);

/// What the cache knows about a hash.
pub enum Lookup {
    /// A key (fresh, or stale while the store is down under `fail_open`).
    Found(KeyRef),
    /// No such key.
    NotFound,
    /// The store could not be asked and nothing usable is cached.
    Unavailable,
}

/// What memory alone says about a hash.
pub enum Cached {
    /// A fresh answer.
    Fresh(Lookup),
    /// A key past its ttl (by less than [`STALE_KEEP`]): served while it is re-read in the
    /// background, unless the store is failing under `fail_closed`.
    Stale(KeyRef),
    /// Nothing cached.
    Absent,
}

/// A map slot: a pointer to the key, or to a remembered miss. 16 bytes, under an 8-byte map
/// key (the hash's first eight bytes, [`KeyHash::prefix`]): 24 bytes a key in the map instead
/// of 48 with the whole hash as the map's key, ~50 MB less for a million keys (the tables sit
/// near half full). The entry or the miss holds the whole hash ([`Slot::holds`]): a hash whose
/// prefix another hash's slot has finds nothing there, and the two take turns in the cache
/// (among a million random hashes, one pair shares a prefix with odds of about 1 in 37
/// million).
#[derive(Clone)]
enum Slot {
    Found(KeyRef),
    Missing(Arc<Miss>),
}

/// A hash no key has, remembered until `until`.
struct Miss {
    hash: KeyHash,
    until: Instant,
}

impl Slot {
    /// Whether this is the very slot `other` is (the same entry, or the same miss).
    fn is(&self, other: &Slot) -> bool {
        match (self, other) {
            (Slot::Found(a), Slot::Found(b)) => Arc::ptr_eq(&a.0, &b.0),
            (Slot::Missing(a), Slot::Missing(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Whether it is the slot of `hash`, not of another hash with the same prefix.
    fn holds(&self, hash: &KeyHash) -> bool {
        match self {
            Slot::Found(key) => key.0.hash == *hash,
            Slot::Missing(miss) => miss.hash == *hash,
        }
    }
}

/// A cached key, with what says whether it is still fresh. 168 bytes, so that with its `Arc`
/// counts (184) it takes a 192-byte allocation: the key and account ids are held once, in the
/// key's state (the key id's header value is written per request), the account id's header
/// value is the account's, and the freshness time, the expired flag and the revision are packed
/// (below) for the same reason.
struct Entry {
    key: CachedKey,
    /// The credential's hash: the map finds an entry by its first eight bytes only.
    hash: KeyHash,
    /// The store's revision when the read began ([`crate::store::Records::revision`]), as
    /// [`packed_revision`] keeps it.
    revision: Option<NonZeroU64>,
    /// Until when the entry is fresh, in ms since the cache was made
    /// ([`KeyCache::since_born_ms`]), and in the top bit ([`EXPIRED`]) whether a resync or a
    /// reload expired it: then it is re-read on next use whatever the revision says.
    fresh_until: AtomicU64,
}

/// [`Entry::fresh_until`]'s flag: expired by a resync or a reload.
const EXPIRED: u64 = 1 << 63;

/// A store revision as an entry keeps it: plus one, so that `None` (unknown) costs no tag.
/// The one revision that cannot be kept so (`u64::MAX`) counts as unknown, which only means a
/// re-read once the ttl runs out.
fn packed_revision(revision: Option<u64>) -> Option<NonZeroU64> {
    revision.and_then(|r| NonZeroU64::new(r.wrapping_add(1)))
}

impl Entry {
    /// Until when it is fresh, in ms since the cache was made.
    fn fresh_until_ms(&self) -> u64 {
        self.fresh_until.load(Ordering::Relaxed) & !EXPIRED
    }

    /// Whether at `now_ms` it is less than [`STALE_KEEP`] past its ttl.
    fn within_stale_keep(&self, now_ms: u64) -> bool {
        now_ms < self.fresh_until_ms().saturating_add(STALE_KEEP_MS)
    }
}

/// A shared handle to a cached key (one allocation with its cache bookkeeping); derefs to the
/// [`CachedKey`].
#[derive(Clone)]
pub struct KeyRef(Arc<Entry>);

impl std::ops::Deref for KeyRef {
    type Target = CachedKey;

    fn deref(&self) -> &CachedKey {
        &self.0.key
    }
}

type Loaded = Result<Option<KeyRef>, ()>;

/// See the module documentation.
pub struct KeyCache {
    /// By [`KeyHash::prefix`]: see [`Slot`].
    map: DashMap<u64, Slot, KeyHashBuilder>,
    /// One shared cell per hash being loaded: the first miss reads, later ones wait on it.
    inflight: DashMap<KeyHash, Arc<OnceCell<Loaded>>, KeyHashBuilder>,
    /// Header values shared between cached keys: per set of quotas, and per account (its id as
    /// `Arc<str>` and as a header value). Pruned by [`KeyCache::sweep`] once no key holds them.
    limit_values: DashMap<(Quotas, Quotas), Arc<LimitValues>>,
    account_ids: DashMap<Arc<str>, Arc<HeaderValue>>,
    /// Bumped by every invalidation; a load that started before one does not insert its result,
    /// which may predate the change.
    generation: AtomicU64,
    /// Store reads by hash: failures counted, failure and recovery logged once each.
    lookups: StoreCalls,
    /// While `lookups` fail: when the next background re-read may start, in ms since `born`.
    retry_at_ms: AtomicU64,
    born: Instant,
    /// Whether the store holds imported keys, as last read or learned: see
    /// [`KeyCache::admits_unchecked`]. `true` until first read, so that nothing that might be
    /// an imported key is refused unread.
    imported: AtomicBool,
    /// When `imported` is next read, in ms since `born` (0: at the next ask).
    imported_due_ms: AtomicU64,
    /// A read of `imported` is under way.
    imported_reading: AtomicBool,
    /// Invalidations published to the other instances, likewise.
    publishes: Arc<StoreCalls>,
    store: SharedStore,
    /// Accounts' shared buckets (`shared_rate_limit`); keys' own are in their state
    /// ([`Meter::key`]).
    limiters: Arc<Limiters>,
    /// Set with `limits.mode = "global"`: keys draw on the fleet's counters, with this
    /// instance's buckets as the fallback while the store is down.
    shared: Option<Arc<SharedLimiters>>,
    meter: Arc<Meter>,
    /// Keys' credit leases on this instance.
    credits: Arc<CreditLeases>,
    metrics: Arc<Metrics>,
    /// `[cache]` and `limits.default`, swapped by a reload ([`KeyCache::retune`]); read on
    /// loads, never on a fresh hit.
    tuning: ArcSwap<Tuning>,
    on_store_error: OnStoreError,
}

/// What a config reload may change in the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tuning {
    settings: CacheSettings,
    default_limits: RateLimitSpec,
}

// === impl KeyCache ===

impl KeyCache {
    /// An empty cache over `store`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: SharedStore,
        limiters: Arc<Limiters>,
        meter: Arc<Meter>,
        metrics: Arc<Metrics>,
        settings: CacheSettings,
        default_limits: RateLimitSpec,
        on_store_error: OnStoreError,
    ) -> Self {
        let credits = Arc::new(CreditLeases::new(
            Arc::clone(&store) as Arc<dyn crate::store::Credits>,
            on_store_error,
            &metrics,
        ));
        KeyCache {
            map: DashMap::with_hasher(KeyHashBuilder::default()),
            inflight: DashMap::with_hasher(KeyHashBuilder::default()),
            limit_values: DashMap::new(),
            account_ids: DashMap::new(),
            generation: AtomicU64::new(0),
            lookups: metrics.store_calls("lookup_key"),
            retry_at_ms: AtomicU64::new(0),
            born: Instant::now(),
            imported: AtomicBool::new(true),
            imported_due_ms: AtomicU64::new(0),
            imported_reading: AtomicBool::new(false),
            publishes: Arc::new(metrics.store_calls("publish_invalidation")),
            store,
            limiters,
            shared: None,
            meter,
            credits,
            metrics,
            tuning: ArcSwap::from_pointee(Tuning {
                settings,
                default_limits,
            }),
            on_store_error,
        }
    }

    /// A reload's `[cache]` and `limits.default`. When either changed, every entry is made
    /// stale: each key's next request is still answered from memory (on what the entry holds)
    /// and re-reads it, so that the request after that is decided on the new settings, and no
    /// key waits on the store or loses its fail-open cover. Answers whether anything changed.
    pub fn retune(&self, settings: CacheSettings, default_limits: RateLimitSpec) -> bool {
        let old = **self.tuning.load();
        let fresh = Tuning {
            settings,
            default_limits,
        };
        if old == fresh {
            return false;
        }
        self.tuning.store(Arc::new(fresh));
        if old.settings.ttl != settings.ttl || old.default_limits != default_limits {
            // What keys were built on (their limits, how long they are fresh) changed.
            self.expire_all();
        } else if old.settings.negative_ttl != settings.negative_ttl {
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.map.retain(|_, slot| matches!(slot, Slot::Found(_)));
        }
        if settings.max_entries < old.settings.max_entries {
            self.make_room(settings.max_entries);
        }
        true
    }

    /// Makes keys draw on fleet-wide counters (`limits.mode = "global"`).
    pub fn with_shared_limits(mut self, shared: Arc<SharedLimiters>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// The credit leases of this instance (handed back when idle, and at shutdown).
    pub fn credits(&self) -> &Arc<CreditLeases> {
        &self.credits
    }

    /// The buckets of a key used since start-up (this instance's view).
    pub fn limits_of(&self, key_id: &str) -> Option<KeyLimits> {
        match &self.shared {
            Some(shared) => shared.get(key_id).map(KeyLimits::Global),
            None => self
                .meter
                .get(key_id)
                .map(|k| KeyLimits::Local(LocalBuckets::Key(k))),
        }
    }

    /// The key for `hash`, from memory when fresh or stale, else from the store.
    pub async fn get(self: &Arc<Self>, hash: &KeyHash) -> Lookup {
        self.get_after(hash, self.cached(hash)).await
    }

    /// The asynchronous half of [`KeyCache::get`]: given what [`KeyCache::cached`] said for
    /// `hash`, the answer. Only a hash that memory knows nothing about waits for the store; a
    /// stale key is answered at once and re-read in the background. For a caller that checks
    /// something between the two, such as the credential's format before any store read.
    pub async fn get_after(self: &Arc<Self>, hash: &KeyHash, cached: Cached) -> Lookup {
        // A miss is counted where it goes to the store, so a credential refused between the
        // two halves (malformed) is neither a hit nor a miss.
        match cached {
            Cached::Fresh(lookup) => return lookup,
            Cached::Stale(key) => {
                self.metrics.key_cache_misses.inc();
                return self.revalidate(hash, key);
            }
            Cached::Absent => self.metrics.key_cache_misses.inc(),
        }
        match self.load(hash).await {
            Ok(Some(key)) => Lookup::Found(key),
            Ok(None) => Lookup::NotFound,
            Err(()) => Lookup::Unavailable,
        }
    }

    /// A stale key's answer, without waiting: one background read refreshes it (none is
    /// started while one for this hash is under way). Meanwhile the key is served as it was,
    /// except under `fail_closed` while the store's reads are failing: then it cannot be
    /// verified (the read under way will say when the store is back).
    fn revalidate(self: &Arc<Self>, hash: &KeyHash, key: KeyRef) -> Lookup {
        self.refresh_in_background(hash);
        match self.on_store_error {
            OnStoreError::FailClosed if self.lookups.is_failing() => Lookup::Unavailable,
            OnStoreError::FailOpen | OnStoreError::FailClosed => Lookup::Found(key),
        }
    }

    fn refresh_in_background(self: &Arc<Self>, hash: &KeyHash) {
        // A read under way answers for this key; looked up shared first, as most are.
        if self.inflight.contains_key(hash) || !self.may_retry_while_failing() {
            return;
        }
        let cell = match self.inflight.entry(*hash) {
            MapEntry::Occupied(_) => return,
            MapEntry::Vacant(vacant) => Arc::clone(vacant.insert(Arc::default()).value()),
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.inflight.remove_if(hash, |_, c| Arc::ptr_eq(c, &cell));
            return;
        };
        let (this, hash) = (Arc::clone(self), *hash);
        runtime.spawn(async move {
            let _ = this.load_in(&hash, cell).await;
        });
    }

    /// Whether a background re-read may start: always while lookups work, else once per
    /// [`RETRY_WHILE_FAILING`].
    fn may_retry_while_failing(&self) -> bool {
        if !self.lookups.is_failing() {
            return true;
        }
        let now = self.since_born_ms();
        let at = self.retry_at_ms.load(Ordering::Relaxed);
        let next = now.saturating_add(u64::try_from(RETRY_WHILE_FAILING.as_millis()).unwrap_or(0));
        now >= at
            && self
                .retry_at_ms
                .compare_exchange(at, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The synchronous half of [`KeyCache::get`]: what memory says, without any I/O.
    pub fn cached(&self, hash: &KeyHash) -> Cached {
        let found = match self.slot(hash).as_deref() {
            Some(Slot::Found(key)) if self.fresh(&key.0, || self.since_born_ms()) => {
                Cached::Fresh(Lookup::Found(key.clone()))
            }
            Some(Slot::Missing(miss)) if Instant::now() < miss.until => {
                Cached::Fresh(Lookup::NotFound)
            }
            // Stale: served while it is re-read. An entry expired by a reload whose store
            // revision has not moved is still the store's truth, however old.
            Some(Slot::Found(key))
                if key.0.within_stale_keep(self.since_born_ms())
                    || self.unchanged_since(key.0.revision) =>
            {
                Cached::Stale(key.clone())
            }
            Some(Slot::Found(_) | Slot::Missing(_)) | None => Cached::Absent,
        };
        if let Cached::Fresh(_) = found {
            self.metrics.key_cache_hits.inc();
        }
        found
    }

    /// Whether an entry is still good: unless a resync or a reload expired it (what it was
    /// built on may have changed), while the store says nothing has changed since it was read
    /// (as good as a re-read, and none is made), or else before its `fresh_until`. The
    /// revision comes before the clock, so a hit under an unmoved revision reads no clock.
    fn fresh(&self, entry: &Entry, now_ms: impl FnOnce() -> u64) -> bool {
        let until = entry.fresh_until.load(Ordering::Relaxed);
        until & EXPIRED == 0 && (self.unchanged_since(entry.revision) || now_ms() < until)
    }

    /// Whether the store's revision is known and still `revision`.
    fn unchanged_since(&self, revision: Option<NonZeroU64>) -> bool {
        revision.is_some() && revision == packed_revision(self.store.revision())
    }

    /// Whether a credential that fails tollgate's format or checksum may still name a key: only
    /// while the store holds imported keys (contract 5a), whose raw form is whatever the other
    /// system issued. Answered from memory, without I/O; an answer older than the cache's ttl
    /// is refreshed by one background read (meanwhile the old answer stands).
    pub fn admits_unchecked(self: &Arc<Self>) -> bool {
        let due = self.imported_due_ms.load(Ordering::Relaxed);
        if self.since_born_ms() >= due && !self.imported_reading.swap(true, Ordering::AcqRel) {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let this = Arc::clone(self);
                runtime.spawn(async move {
                    this.read_imported().await;
                    this.imported_reading.store(false, Ordering::Release);
                });
            } else {
                self.imported_reading.store(false, Ordering::Release);
            }
        }
        self.imported.load(Ordering::Relaxed)
    }

    /// Asks the store whether it holds imported keys (at start-up, and by
    /// [`KeyCache::admits_unchecked`] once per ttl). A failed read keeps the answer there was,
    /// `true` before the first: an unknown answer must not refuse an imported key (a malformed
    /// credential then costs a lookup, whose miss is cached).
    pub async fn read_imported(&self) {
        match self.store.has_imported_keys().await {
            Ok(held) => self.imported.store(held, Ordering::Relaxed),
            Err(e) => tracing::warn!(
                error = %e,
                "could not read whether the store holds imported keys; keeping the last answer"
            ),
        }
        let due = self.since_born_ms().saturating_add(
            u64::try_from(self.tuning.load().settings.ttl.as_millis()).unwrap_or(u64::MAX),
        );
        self.imported_due_ms.store(due, Ordering::Relaxed);
    }

    /// Keys were imported through this instance: here and (through the store) on every other
    /// instance, credentials that fail the checksum are looked up from now on, and unknown
    /// hashes are forgotten, since one may be an imported key's.
    pub fn imported_keys_added(&self) {
        self.note_imported();
        self.publish(Invalidation::Imported);
    }

    fn note_imported(&self) {
        self.imported.store(true, Ordering::Relaxed);
        // A read that began before must not put back a miss for an imported key's hash.
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.map.retain(|_, slot| matches!(slot, Slot::Found(_)));
    }

    fn since_born_ms(&self) -> u64 {
        self.ms_since_born(Instant::now())
    }

    /// `at` in ms since the cache was made: the clock entries keep their times on.
    fn ms_since_born(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.born).as_millis()).unwrap_or(u64::MAX)
    }

    /// Drops what is cached for one credential hash, here and (through the store) on every
    /// other instance.
    pub fn invalidate(&self, hash: &KeyHash) {
        self.drop_key(hash);
        self.publish(Invalidation::Key(*hash));
    }

    /// Drops every cached key of an account, here and on every other instance.
    pub fn invalidate_account(&self, account_id: &str) {
        self.drop_account(account_id);
        self.publish(Invalidation::Account(account_id.to_owned()));
    }

    /// Applies an invalidation that arrived from the store's channel (this instance's own
    /// included), without publishing it again.
    pub fn apply(&self, event: &InvalidationEvent) {
        match event {
            InvalidationEvent::Invalidate(Invalidation::Key(hash)) => self.drop_key(hash),
            InvalidationEvent::Invalidate(Invalidation::Account(id)) => self.drop_account(id),
            InvalidationEvent::Invalidate(Invalidation::All) => self.drop_all(),
            InvalidationEvent::Invalidate(Invalidation::Imported) => self.note_imported(),
            InvalidationEvent::Resync => {
                self.expire_all();
                // An import announced while the channel was down was missed: read it again.
                self.imported_due_ms.store(0, Ordering::Relaxed);
            }
        }
    }

    fn drop_key(&self, hash: &KeyHash) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.map
            .remove_if(&hash.prefix(), |_, slot| slot.holds(hash));
    }

    /// The slot of `hash`, if the map holds one (and not another hash's of the same prefix).
    fn slot(&self, hash: &KeyHash) -> Option<dashmap::mapref::one::Ref<'_, u64, Slot>> {
        self.map.get(&hash.prefix()).filter(|slot| slot.holds(hash))
    }

    fn drop_account(&self, account_id: &str) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.map.retain(|_, slot| match slot {
            Slot::Found(key) => &**key.account_id() != account_id,
            Slot::Missing(_) => true,
        });
    }

    fn drop_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.map.clear();
    }

    /// Makes every entry stale: re-read on next use, but still there for `fail_open`.
    fn expire_all(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.map.retain(|_, slot| match slot {
            Slot::Found(key) => {
                key.0.fresh_until.fetch_or(EXPIRED, Ordering::Relaxed);
                true
            }
            Slot::Missing(_) => false,
        });
    }

    /// Publishes without making the caller wait; a failure leaves the other instances on their
    /// ttl, which is the backstop.
    fn publish(&self, what: Invalidation) {
        let (store, publishes) = (Arc::clone(&self.store), Arc::clone(&self.publishes));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                match store.publish_invalidation(&what).await {
                    Ok(()) => publishes.succeeded(),
                    Err(e) => publishes.failed(
                        &e,
                        "changes reach the other instances only when their cache ttl runs out",
                    ),
                }
            });
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Removes expired negative entries and long-stale keys. Run periodically.
    pub fn sweep(&self) {
        let now = Instant::now();
        let now_ms = self.ms_since_born(now);
        self.map.retain(|_, slot| match slot {
            Slot::Found(key) => {
                self.unchanged_since(key.0.revision) || key.0.within_stale_keep(now_ms)
            }
            Slot::Missing(miss) => now < miss.until,
        });
        self.limit_values.retain(|_, v| Arc::strong_count(v) > 1);
        self.account_ids
            .retain(|id, value| Arc::strong_count(id) > 1 || Arc::strong_count(value) > 1);
        // Leases of keys no longer cached: their unspent tokens only ever make the fleet admit
        // less, never more.
        if let Some(shared) = &self.shared {
            shared.prune_unused();
        }
    }

    async fn load(&self, hash: &KeyHash) -> Loaded {
        let cell = Arc::clone(self.inflight.entry(*hash).or_default().value());
        self.load_in(hash, cell).await
    }

    /// Reads `hash` into `cell` (this hash's in-flight read, which other callers may await),
    /// unless a read already filled it.
    async fn load_in(&self, hash: &KeyHash, cell: Arc<OnceCell<Loaded>>) -> Loaded {
        let result = cell.get_or_init(|| self.read_through(hash)).await.clone();
        self.inflight.remove_if(hash, |_, c| Arc::ptr_eq(c, &cell));
        result
    }

    async fn read_through(&self, hash: &KeyHash) -> Loaded {
        let generation = self.generation.load(Ordering::SeqCst);
        // A load that finished between this caller's miss and its joining the in-flight map has
        // already filled the map (it inserts before it leaves the in-flight map): use that.
        let now = Instant::now();
        match self.slot(hash).as_deref() {
            Some(Slot::Found(key)) if self.fresh(&key.0, || self.ms_since_born(now)) => {
                return Ok(Some(key.clone()))
            }
            Some(Slot::Missing(miss)) if now < miss.until => return Ok(None),
            _ => {}
        }
        // Read before the lookup: a write that lands during it moves the revision past this.
        let revision = self.store.revision();
        let found = match crate::store::lookup_credential(&*self.store, hash).await {
            Ok(found) => found,
            Err(e) => {
                self.lookups.failed(
                    &e,
                    "key lookups fail; serving what the cache holds per on_store_error",
                );
                return Err(());
            }
        };
        self.lookups.succeeded();
        let now = Instant::now();
        let tuning = **self.tuning.load();
        // A read that an invalidation overtook is served once but not cached, and must not
        // replace what the registries hold for the key either (that may come from a newer read).
        let replace = if self.generation.load(Ordering::SeqCst) == generation {
            Replace::IfChanged
        } else {
            Replace::Never
        };
        let (slot, result) = match found {
            Some(lookup) => {
                let key = self.entry(hash, &lookup, &tuning, now, revision, replace);
                (Slot::Found(key.clone()), Some(key))
            }
            None => {
                let miss = Miss {
                    hash: *hash,
                    until: now + tuning.settings.negative_ttl,
                };
                (Slot::Missing(Arc::new(miss)), None)
            }
        };
        if self.generation.load(Ordering::SeqCst) == generation {
            self.make_room(tuning.settings.max_entries);
            let inserted = slot.clone();
            self.map.insert(hash.prefix(), slot);
            // An invalidation or a reload that came in since the check: what was read may
            // predate it, so it must not stay.
            if self.generation.load(Ordering::SeqCst) != generation {
                self.map.remove_if(&hash.prefix(), |_, s| s.is(&inserted));
            }
        }
        Ok(result)
    }

    /// Caches a key read elsewhere, as a store read of `hash` that found `lookup` would have
    /// (fresh for the ttl; then re-read from the store like any other entry). For filling a
    /// cache without a store behind it, in benches and tests (the fixture of a million keys):
    /// unlike a read of its own, it cannot tell whether an invalidation came in after `lookup`
    /// was read, so the gateway never calls it.
    pub fn insert(&self, hash: &KeyHash, lookup: &KeyLookup) {
        let tuning = **self.tuning.load();
        let key = self.entry(
            hash,
            lookup,
            &tuning,
            Instant::now(),
            None,
            Replace::IfChanged,
        );
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.make_room(tuning.settings.max_entries);
        self.map.insert(hash.prefix(), Slot::Found(key));
    }

    /// A cache entry for a key read at `now` by `hash`, fresh for the ttl.
    fn entry(
        &self,
        hash: &KeyHash,
        lookup: &KeyLookup,
        tuning: &Tuning,
        now: Instant,
        revision: Option<u64>,
        replace: Replace,
    ) -> KeyRef {
        let ttl_ms = u64::try_from(tuning.settings.ttl.as_millis()).unwrap_or(u64::MAX);
        let until = self.ms_since_born(now).saturating_add(ttl_ms);
        KeyRef(Arc::new(Entry {
            key: self.build(lookup, &tuning.default_limits, replace),
            hash: *hash,
            fresh_until: AtomicU64::new(until.min(EXPIRED - 1)),
            revision: packed_revision(revision),
        }))
    }

    fn make_room(&self, max_entries: usize) {
        if self.map.len() < max_entries {
            return;
        }
        self.sweep();
        let excess = (self.map.len() + 1).saturating_sub(max_entries);
        if excess == 0 {
            return;
        }
        // No recency order is kept (that would cost every hit a write); evict an arbitrary
        // hundredth so that a full cache does not evict on every miss.
        let mut budget = excess.max(max_entries / 100);
        self.map.retain(|_, _| {
            if budget == 0 {
                return true;
            }
            budget -= 1;
            false
        });
    }

    /// `local` as the request path uses it: alone, or as the fallback of leases of the fleet's
    /// buckets registered under `id` (a key's, or an account's shared ones).
    fn limits(
        &self,
        account_id: &Arc<str>,
        id: &Arc<str>,
        quotas: Quotas,
        local: LocalBuckets,
        replace: Replace,
    ) -> KeyLimits {
        match &self.shared {
            Some(shared) => {
                KeyLimits::Global(shared.for_key(account_id, id, quotas, local, replace))
            }
            None => KeyLimits::Local(local),
        }
    }

    /// The shared header values of a key's `quotas` and its account's `shared` ones (empty
    /// when it has none), made on first use.
    fn limit_values(&self, quotas: Quotas, shared: Quotas) -> Arc<LimitValues> {
        let entry = self
            .limit_values
            .entry((quotas, shared))
            .or_insert_with(|| {
                Arc::new(LimitValues {
                    policy: policy_header(&quotas, &shared),
                    per_window: quotas.per.map(|q| q.map(|n| HeaderValue::from(n.get()))),
                })
            });
        Arc::clone(entry.value())
    }

    /// The account's id as shared `Arc<str>` and header value, made on first use.
    fn account_id(&self, id: &str) -> (Arc<str>, Arc<HeaderValue>) {
        if let Some(entry) = self.account_ids.get(id) {
            return (Arc::clone(entry.key()), Arc::clone(entry.value()));
        }
        let entry = self
            .account_ids
            .entry(Arc::from(id))
            .or_insert_with(|| Arc::new(header_value(id)));
        (Arc::clone(entry.key()), Arc::clone(entry.value()))
    }

    /// The cached form of `lookup`; `replace`: whether its quotas may replace the key's state,
    /// its account's shared buckets and their fleet limiters in their registries.
    fn build(
        &self,
        lookup: &KeyLookup,
        default_limits: &RateLimitSpec,
        replace: Replace,
    ) -> CachedKey {
        let (key, account) = (&lookup.key, &lookup.account);
        let key_id: Arc<str> = Arc::from(key.id.as_str());
        let (account_id, account_id_value) = self.account_id(&account.id);
        let quotas = Quotas::resolve(
            key.rate_limit.as_ref(),
            account.rate_limit.as_ref(),
            default_limits,
        );
        let state = self.meter.key(&key_id, &account_id, quotas, replace);
        // Only the windows the account sets: no defaults for shared buckets.
        let shared = account
            .shared_rate_limit
            .as_ref()
            .map(|s| Quotas::resolve(Some(s), None, &RateLimitSpec::default()))
            .unwrap_or_default();
        let cidrs = |list: &[String]| {
            list.iter()
                .filter_map(|s| policy::parse_cidr(s))
                .collect::<Box<[_]>>()
        };
        let origins = key
            .allowed_origins
            .iter()
            .chain(&account.network_policy.allowed_domains)
            .chain(&lookup.site_origins)
            .filter_map(|o| policy::OriginRule::parse(o))
            .collect::<Box<[_]>>();
        let rules = KeyRules {
            account_ips: cidrs(&account.network_policy.allowed_ips),
            key_ips: cidrs(&key.allowed_ips),
            origins,
            scopes: key.scopes.as_ref().map(|s| s.clone().into_boxed_slice()),
        };
        let unrestricted = rules.account_ips.is_empty()
            && rules.key_ips.is_empty()
            && rules.origins.is_empty()
            && rules.scopes.is_none();
        CachedKey {
            identity: IdentityValues {
                account_id: account_id_value,
                scopes: key
                    .scopes
                    .as_ref()
                    .map(|s| Box::new(header_value(&s.join(" ")))),
                // Checked as header-safe when stored; one edited behind the API's back that is
                // not is left out rather than sent empty.
                external_id: key
                    .external_id
                    .as_deref()
                    .and_then(|id| HeaderValue::from_str(id).ok())
                    .map(Box::new),
                limits: self.limit_values(quotas, shared),
            },
            limiter: self.limits(
                &account_id,
                &key_id,
                quotas,
                LocalBuckets::Key(Arc::clone(&state)),
                replace,
            ),
            // An account's buckets are registered under its id, beside its keys' (`key_…`).
            shared_limits: (shared != Quotas::default()).then(|| {
                let local = self.limiters.for_key(&account_id, shared, replace);
                self.limits(
                    &account_id,
                    &account_id,
                    shared,
                    LocalBuckets::Account(local),
                    replace,
                )
            }),
            state,
            credits: key
                .credit_pool
                .as_deref()
                .map(|pool| self.credits.for_key(&Arc::from(pool))),
            key_type: key.key_type,
            key_active: key.active,
            account_active: account.active,
            auth_method: account.auth_method,
            access_token: lookup.access_token,
            expires_at_ms: key.expires_at.map(|t| t.timestamp_millis()),
            shadow: key.shadow,
            metadata: key
                .metadata
                .as_object()
                .is_some_and(|m| !m.is_empty())
                .then(|| Box::new(key.metadata.clone())),
            rules: (!unrestricted).then(|| Box::new(rules)),
        }
    }
}

/// `s` as a header value; ids and scopes are validated ASCII when stored, so the empty fallback
/// is for a record edited behind the API's back.
fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `"minute";q=60;w=60, "hour";q=1000;w=3600, "day";q=10000;w=86400` for the windows in force,
/// then the account's shared ones as `"shared-minute";q=…`.
fn policy_header(quotas: &Quotas, shared: &Quotas) -> Option<HeaderValue> {
    let parts: Vec<String> = [("", quotas), ("shared-", shared)]
        .iter()
        .flat_map(|(prefix, quotas)| {
            Window::ALL.iter().filter_map(move |w| {
                quotas
                    .get(*w)
                    .map(|q| format!("\"{prefix}{}\";q={};w={}", w.name(), q, w.seconds()))
            })
        })
        .collect();
    if parts.is_empty() {
        return None;
    }
    HeaderValue::from_str(&parts.join(", ")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A million entries are a million of these: with the `Arc`'s two counts an entry must fit
    /// 192 bytes, or it takes the 224-byte size class (with mimalloc's aligned allocation, 185
    /// bytes at most: see the key state's test in `metering`).
    #[test]
    fn an_entry_with_its_counts_fits_192_bytes() {
        let size = std::mem::size_of::<Entry>();
        let align = std::mem::align_of::<Entry>();
        assert!(size + 16 + align - 1 <= 192, "{size}");
    }

    #[test]
    fn a_revision_is_kept_exactly_or_counts_as_unknown() {
        assert_eq!(packed_revision(None), None);
        assert_eq!(packed_revision(Some(0)).map(NonZeroU64::get), Some(1));
        assert_eq!(packed_revision(Some(41)).map(NonZeroU64::get), Some(42));
        assert_eq!(packed_revision(Some(u64::MAX)), None);
    }

    /// A million slots are a million of these: a tag and a pointer, under an 8-byte map key.
    #[test]
    fn a_slot_is_two_words() {
        assert!(
            std::mem::size_of::<Slot>() <= 16,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }
}
