//! A key's credits (contract 5a) as the store keeps them: the balance not leased out, the
//! refill, and the leases that instances hold. Pure: the embedded backend runs these methods in
//! a write transaction, and the Redis backend's `CREDITS` script is the same state machine in Lua
//! (the conformance suite holds both to one behaviour).
//!
//! An instance spends credits from a local lease and tells the store, with each take or give-back,
//! its running totals for the epoch: what it was granted as far as it knows, what it spent, what
//! it handed back. Totals, not differences, so every call is idempotent: a call whose answer was
//! lost (a timeout after Redis applied it) is simply followed by the next one, which carries the
//! same or larger totals, and nothing is counted twice; a grant whose answer was lost is handed
//! over by the next take ([`CreditCounter::take`] compares what the instance says it received
//! with what it was granted). The store therefore knows, per instance, what it holds
//! (`granted - spent - returned`), so an instance that dies is found by its silence
//! ([`LEASE_TTL_MS`]) and what it held goes back to the balance: none is lost. A credit is never
//! granted twice: every grant comes off the balance in one atomic step. What a dead instance
//! spent since its last report goes back with the rest, so it is spent again: the overspend is
//! at most what each dying instance spent since its last report, which is at most one lease.
//!
//! A refill (`daily` at 00:00 UTC, `monthly` on the 1st) and a `set` start a new `epoch`: the
//! balance is replaced and every lease of the old epoch is void, so reports about it change
//! nothing.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// An instance silent for this long is taken for dead and what it holds returns to the balance
/// (its lease is kept, marked handed back, so that a late report is not counted again).
pub const LEASE_TTL_MS: i64 = 30_000;

/// A lease silent for this long is forgotten. An instance that reports after that has its
/// totals taken as already counted (it handed everything back long before).
pub const LEASE_FORGET_MS: i64 = 7 * 86_400_000;

/// How often a key's credits are refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefillInterval {
    /// At 00:00 UTC every day.
    Daily,
    /// At 00:00 UTC on the first of every month.
    Monthly,
}

/// `refill` of a key: the balance is set to `amount` at the start of every interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refill {
    /// `daily` or `monthly`.
    pub interval: RefillInterval,
    /// The balance after each refill.
    pub amount: i64,
}

/// One instance's lease: its running totals for the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The epoch it was granted in.
    pub epoch: u64,
    /// Granted to the instance, in all.
    pub granted: i64,
    /// Spent, as the instance last reported (may pass what it was granted: an upstream's
    /// declared cost).
    pub spent: i64,
    /// Handed back, as the instance last reported.
    pub returned: i64,
    /// Of `spent`, what upstreams said cost less afterwards (back in the instance's lease).
    #[serde(default)]
    pub refunded: i64,
    /// What its spending beyond its grants has taken off the balance.
    pub debited: i64,
    /// The instance's last call, ms since the epoch.
    pub seen_ms: i64,
}

/// An instance's running totals for one epoch, as it reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// The epoch they belong to.
    pub epoch: u64,
    /// Granted, as far as the instance received it.
    pub received: i64,
    /// Spent.
    pub spent: i64,
    /// Handed back.
    pub returned: i64,
    /// Of `spent`, what upstreams said cost less afterwards.
    pub refunded: i64,
}

/// A key's credits in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditCounter {
    /// Credits not leased to any instance.
    pub balance: i64,
    /// The refill, if any.
    pub refill: Option<Refill>,
    /// The refill period the balance belongs to (see [`period_of`]).
    pub period: i64,
    /// When the last refill happened, ms since the epoch.
    pub last_refill_ms: Option<i64>,
    /// Bumped by every refill and `set`.
    pub epoch: u64,
    /// By instance id.
    pub leases: BTreeMap<String, Lease>,
}

/// What a take granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditGrant {
    /// Credits handed over by this call (0 when none are left): new ones, and any granted
    /// before whose answer the instance did not receive.
    pub granted: i64,
    /// Everything granted to the instance in this epoch ([`Totals::received`] from now on).
    pub received: i64,
    /// The epoch the grant belongs to.
    pub epoch: u64,
    /// The key's credits after the take ([`CreditCounter::remaining`]).
    pub remaining: i64,
    /// The next refill, ms since the epoch; `None` without a refill.
    pub refill_at_ms: Option<i64>,
}

impl CreditGrant {
    /// What a key without a counter is granted: nothing.
    pub const NOTHING: CreditGrant = CreditGrant {
        granted: 0,
        received: 0,
        epoch: 0,
        remaining: 0,
        refill_at_ms: None,
    };
}

/// A change made through the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CreditChange {
    /// A new balance (a new epoch: every lease is void).
    pub set: Option<i64>,
    /// Credits added to the balance (or taken off, when negative; never below 0).
    pub add: Option<i64>,
    /// A new refill: `Some(None)` removes it.
    pub refill: Option<Option<Refill>>,
}

/// What the admin API shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditState {
    /// [`CreditCounter::remaining`].
    pub remaining: i64,
    /// The refill.
    pub refill: Option<Refill>,
    /// The last refill.
    pub last_refill_at: Option<DateTime<Utc>>,
}

// === impl CreditCounter ===

impl CreditCounter {
    /// A fresh counter of `balance` credits.
    pub fn new(balance: i64, refill: Option<Refill>, now_ms: i64) -> Self {
        CreditCounter {
            balance: balance.max(0),
            refill,
            period: refill.map_or(0, |r| period_of(r.interval, now_ms)),
            last_refill_ms: None,
            epoch: 0,
            leases: BTreeMap::new(),
        }
    }

    /// The key's credits: the balance and what instances hold of this epoch (granted, not yet
    /// reported spent or handed back). Errs high by what instances spent since their last
    /// report.
    pub fn remaining(&self) -> i64 {
        let held: i64 = self
            .leases
            .values()
            .filter(|l| l.epoch == self.epoch)
            .map(Lease::held)
            .sum();
        self.balance.saturating_add(held)
    }

    /// Refills when a new period has begun, and returns the leases of silent instances.
    pub fn advance(&mut self, now_ms: i64) {
        if let Some(refill) = self.refill {
            let period = period_of(refill.interval, now_ms);
            if period > self.period {
                self.period = period;
                self.balance = refill.amount.max(0);
                self.last_refill_ms = Some(period_start(refill.interval, period));
                self.new_epoch();
            }
        }
        let epoch = self.epoch;
        let mut returned = 0i64;
        self.leases.retain(|_, lease| {
            let silent = now_ms - lease.seen_ms;
            if silent >= LEASE_TTL_MS && lease.epoch == epoch {
                let held = lease.held();
                lease.returned = lease.returned.saturating_add(held);
                returned = returned.saturating_add(held);
            }
            lease.epoch == epoch && silent < LEASE_FORGET_MS
        });
        self.balance = self.balance.saturating_add(returned);
    }

    /// `instance` reports its totals and asks for `want` more: the report is settled first
    /// (what it handed back returns to the balance; what it spent beyond its grants comes off
    /// it, never below 0; a report about a void epoch changes nothing), then what it was
    /// granted and did not receive is handed over again, and up to `want` more granted.
    pub fn take(&mut self, instance: &str, totals: Totals, want: i64, now_ms: i64) -> CreditGrant {
        self.advance(now_ms);
        let lease = self.settle(instance, totals, now_ms);
        let missing = (lease.granted - self.received(totals)).max(0);
        let fresh = (want - missing).clamp(0, self.balance.max(0));
        self.balance -= fresh;
        let epoch = self.epoch;
        let lease = self.lease(instance, totals, now_ms);
        lease.granted = lease.granted.saturating_add(fresh);
        let received = lease.granted;
        CreditGrant {
            granted: missing + fresh,
            received,
            epoch,
            remaining: self.remaining(),
            refill_at_ms: self.refill_at_ms(),
        }
    }

    /// `instance` reports its totals (having handed back what it held unspent): settled as by
    /// [`CreditCounter::take`].
    pub fn give_back(&mut self, instance: &str, totals: Totals, now_ms: i64) {
        self.advance(now_ms);
        self.settle(instance, totals, now_ms);
    }

    /// What the instance received of this epoch's grants (nothing, by totals of another epoch).
    fn received(&self, totals: Totals) -> i64 {
        if totals.epoch == self.epoch {
            totals.received.max(0)
        } else {
            0
        }
    }

    /// The instance's lease of this epoch. Without one (its first call, or its lease was
    /// forgotten after [`LEASE_FORGET_MS`]), `totals` of this epoch are taken as counted
    /// already, and totals of another epoch as nothing.
    fn lease(&mut self, instance: &str, totals: Totals, now_ms: i64) -> &mut Lease {
        let epoch = self.epoch;
        let counted = totals.epoch == epoch;
        let lease = self.leases.entry(instance.to_owned()).or_insert_with(|| {
            let (granted, spent, returned, refunded) = if counted {
                (
                    totals.received.max(0),
                    totals.spent.max(0),
                    totals.returned.max(0),
                    totals.refunded.max(0),
                )
            } else {
                (0, 0, 0, 0)
            };
            let mut lease = Lease {
                epoch,
                granted,
                spent,
                returned,
                refunded,
                debited: 0,
                seen_ms: now_ms,
            };
            lease.debited = lease.beyond();
            lease
        });
        lease.seen_ms = now_ms;
        lease
    }

    /// Applies an instance's totals to its lease of this epoch, each at most once (totals only
    /// grow): what it handed back returns to the balance, and what it spent beyond what it was
    /// granted comes off the balance. Totals of another epoch change nothing. Answers the lease.
    fn settle(&mut self, instance: &str, totals: Totals, now_ms: i64) -> Lease {
        let current = totals.epoch == self.epoch;
        let lease = self.lease(instance, totals, now_ms);
        let (mut refund, mut debit) = (0, 0);
        if current {
            let returned = totals.returned.max(lease.returned);
            refund = returned - lease.returned;
            lease.returned = returned;
            lease.spent = totals.spent.max(lease.spent);
            lease.refunded = totals.refunded.max(lease.refunded);
            let beyond = lease.beyond();
            debit = (beyond - lease.debited).max(0);
            lease.debited = lease.debited.max(beyond);
        }
        let lease = *lease;
        self.balance = self
            .balance
            .saturating_add(refund)
            .saturating_sub(debit)
            .max(0);
        lease
    }

    /// An admin change: a new refill, then `set` (a new epoch) or `add`.
    pub fn change(&mut self, change: CreditChange, now_ms: i64) {
        self.advance(now_ms);
        if let Some(refill) = change.refill {
            self.refill = refill;
            self.period = refill.map_or(0, |r| period_of(r.interval, now_ms));
        }
        if let Some(set) = change.set {
            self.balance = set.max(0);
            self.new_epoch();
        }
        if let Some(add) = change.add {
            self.balance = self.balance.saturating_add(add).max(0);
        }
    }

    /// What the admin API shows.
    pub fn state(&self) -> CreditState {
        CreditState {
            remaining: self.remaining(),
            refill: self.refill,
            last_refill_at: self
                .last_refill_ms
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
        }
    }

    /// The next refill, ms since the epoch.
    pub fn refill_at_ms(&self) -> Option<i64> {
        self.refill
            .map(|r| period_start(r.interval, self.period.saturating_add(1)))
    }

    fn new_epoch(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.leases.clear();
    }
}

// === a key's counter, present or not ===

/// [`CreditCounter::take`] on a key's counter; a key without one is granted nothing.
pub fn take(
    counter: &mut Option<CreditCounter>,
    instance: &str,
    totals: Totals,
    want: i64,
    now_ms: i64,
) -> CreditGrant {
    match counter {
        Some(c) => c.take(instance, totals, want, now_ms),
        None => CreditGrant::NOTHING,
    }
}

/// [`CreditCounter::give_back`] on a key's counter, if it has one.
pub fn give_back(counter: &mut Option<CreditCounter>, instance: &str, totals: Totals, now_ms: i64) {
    if let Some(c) = counter {
        c.give_back(instance, totals, now_ms);
    }
}

/// [`CreditCounter::change`] on a key's counter, made (empty) when it has none.
pub fn change(
    counter: &mut Option<CreditCounter>,
    change: CreditChange,
    now_ms: i64,
) -> CreditState {
    let c = counter.get_or_insert_with(|| CreditCounter::new(0, None, now_ms));
    c.change(change, now_ms);
    c.state()
}

/// A key's credits as of `now_ms` (a refill due is counted), read without writing.
pub fn state_at(counter: Option<CreditCounter>, now_ms: i64) -> Option<CreditState> {
    counter.map(|mut c| {
        c.advance(now_ms);
        c.state()
    })
}

// === impl Lease ===

impl Lease {
    /// Granted and neither reported spent nor handed back.
    pub fn held(&self) -> i64 {
        (self.granted - self.net_spent() - self.returned).max(0)
    }

    /// Spent, less what was refunded.
    fn net_spent(&self) -> i64 {
        self.spent - self.refunded
    }

    /// Spent and handed back beyond what was granted: what must come off the balance.
    fn beyond(&self) -> i64 {
        (self.net_spent() + self.returned - self.granted).max(0)
    }
}

// === functions ===

/// The refill period `now_ms` falls in: days, or months, since 1970-01.
pub fn period_of(interval: RefillInterval, now_ms: i64) -> i64 {
    match interval {
        RefillInterval::Daily => now_ms.div_euclid(86_400_000),
        RefillInterval::Monthly => {
            let t = Utc
                .timestamp_millis_opt(now_ms)
                .single()
                .unwrap_or(DateTime::<Utc>::MIN_UTC);
            i64::from(t.year() - 1970) * 12 + i64::from(t.month0())
        }
    }
}

/// When period `period` begins, ms since the epoch.
pub fn period_start(interval: RefillInterval, period: i64) -> i64 {
    match interval {
        RefillInterval::Daily => period.saturating_mul(86_400_000),
        RefillInterval::Monthly => {
            let year = i32::try_from(1970 + period.div_euclid(12)).unwrap_or(i32::MAX);
            let month = u32::try_from(period.rem_euclid(12) + 1).unwrap_or(1);
            Utc.with_ymd_and_hms(year, month, 1, 0, 0, 0)
                .single()
                .map_or(i64::MAX, |t| t.timestamp_millis())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_796_256_000_000; // 2026-12-03T00:00Z

    fn totals(epoch: u64, received: i64, spent: i64, returned: i64) -> Totals {
        Totals {
            epoch,
            received,
            spent,
            returned,
            refunded: 0,
        }
    }

    #[test]
    fn grants_never_pass_the_balance_and_reports_settle_once() {
        let mut c = CreditCounter::new(10, None, T);
        let a = c.take("a", Totals::default(), 4, T);
        assert_eq!((a.granted, a.received, a.remaining), (4, 4, 10));
        let b = c.take("b", Totals::default(), 8, T);
        assert_eq!((b.granted, c.balance), (6, 0));
        assert_eq!(c.take("c", Totals::default(), 1, T).granted, 0);
        // a spent 3 and hands back 1; the same report twice counts once.
        c.give_back("a", totals(a.epoch, 4, 3, 1), T);
        c.give_back("a", totals(a.epoch, 4, 3, 1), T);
        assert_eq!((c.balance, c.remaining()), (1, 7));
        // b spent 6 and 2 more that the upstream declared: 2 come off the balance, not below 0.
        c.take("b", totals(b.epoch, 6, 8, 0), 0, T);
        c.take("b", totals(b.epoch, 6, 8, 0), 0, T);
        assert_eq!((c.balance, c.remaining()), (0, 0));
    }

    #[test]
    fn a_grant_whose_answer_was_lost_is_handed_over_by_the_next_take() {
        let mut c = CreditCounter::new(10, None, T);
        let lost = c.take("a", Totals::default(), 4, T);
        // The instance never saw `lost`: it asks again with nothing received.
        let again = c.take("a", Totals::default(), 4, T);
        assert_eq!((lost.granted, again.granted, again.received), (4, 4, 4));
        assert_eq!(c.balance, 6, "granted once");
    }

    #[test]
    fn a_silent_instances_lease_returns_and_void_leases_change_nothing() {
        let mut c = CreditCounter::new(10, None, T);
        let a = c.take("a", Totals::default(), 5, T);
        c.take("b", Totals::default(), 1, T + LEASE_TTL_MS);
        assert_eq!(c.balance, 9, "a's 5 returned once it fell silent");
        c.change(
            CreditChange {
                set: Some(3),
                ..CreditChange::default()
            },
            T + LEASE_TTL_MS,
        );
        c.give_back("a", totals(a.epoch, 5, 5, 0), T + LEASE_TTL_MS);
        assert_eq!(
            (c.balance, c.remaining()),
            (3, 3),
            "a report of a void lease"
        );
    }

    #[test]
    fn a_late_report_after_a_reclaim_is_not_counted_twice() {
        let mut c = CreditCounter::new(10, None, T);
        let a = c.take("a", Totals::default(), 5, T);
        // a is silent past the ttl: its 5 return.
        c.advance(T + LEASE_TTL_MS);
        assert_eq!(c.balance, 10);
        // It was only slow: it spent 2 meanwhile and now hands back the other 3.
        c.give_back("a", totals(a.epoch, 5, 2, 3), T + LEASE_TTL_MS + 1);
        assert_eq!(
            (c.balance, c.remaining()),
            (8, 8),
            "2 spent, nothing returned twice"
        );
        // Forgotten after a week: its totals are taken as counted.
        let later = T + LEASE_TTL_MS + 1 + LEASE_FORGET_MS;
        c.advance(later);
        assert!(c.leases.is_empty());
        c.give_back("a", totals(a.epoch, 5, 2, 3), later);
        assert_eq!(c.balance, 8);
    }

    #[test]
    fn refills_replace_the_balance_at_the_start_of_each_period() {
        let refill = Refill {
            interval: RefillInterval::Daily,
            amount: 100,
        };
        let mut c = CreditCounter::new(5, Some(refill), T);
        let day = period_of(RefillInterval::Daily, T);
        assert_eq!(c.refill_at_ms(), Some((day + 1) * 86_400_000));
        let first = c.take("a", Totals::default(), 5, T);
        let next = (day + 1) * 86_400_000;
        let g = c.take("a", totals(first.epoch, 5, 5, 0), 1, next);
        assert_eq!(
            (g.granted, g.remaining, c.last_refill_ms),
            (1, 100, Some(next))
        );
        assert_eq!(
            period_start(RefillInterval::Monthly, 683),
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0)
                .unwrap()
                .timestamp_millis()
        );
        assert_eq!(period_of(RefillInterval::Monthly, T), 683);
    }
}
