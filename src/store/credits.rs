//! A key's credits (contract 5a) as the store keeps them: the balance not leased out, the
//! refill, and the leases that instances hold. Pure: the embedded backend runs these methods in
//! a write transaction, and the Redis backend's `CREDITS` script is the same state machine in Lua
//! (the conformance suite holds both to one behaviour).
//!
//! An instance spends credits from a local lease and reports what it spent when it next takes
//! or gives back. The store counts, per instance, what it leased and has not been told was spent
//! (`outstanding`), so an instance that dies is found by its silence ([`LEASE_TTL_MS`]) and its
//! outstanding credits go back to the balance: none is lost. A credit is never granted twice:
//! every grant comes off the balance in one atomic step. What a dead instance spent since its
//! last report is returned with the rest, so it is spent again: the overspend is at most what
//! each dying instance spent since its last report, which is at most one lease.
//!
//! A refill (`daily` at 00:00 UTC, `monthly` on the 1st) and a `set` start a new `epoch`: the
//! balance is replaced and every lease of the old epoch is void, so reports about it change
//! nothing.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// An instance silent for this long is taken for dead and its leases return to the balance.
pub const LEASE_TTL_MS: i64 = 30_000;

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

/// One instance's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The epoch it was granted in.
    pub epoch: u64,
    /// Granted and not yet reported spent.
    pub outstanding: i64,
    /// The instance's last call, ms since the epoch.
    pub seen_ms: i64,
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
    /// Credits granted (0 when none are left).
    pub granted: i64,
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
    /// reported spent). Errs high by what instances spent since their last report.
    pub fn remaining(&self) -> i64 {
        let held: i64 = self
            .leases
            .values()
            .filter(|l| l.epoch == self.epoch)
            .map(|l| l.outstanding)
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
            let alive = now_ms - lease.seen_ms < LEASE_TTL_MS;
            if !alive && lease.epoch == epoch {
                returned = returned.saturating_add(lease.outstanding);
            }
            alive
        });
        self.balance = self.balance.saturating_add(returned);
    }

    /// `instance` reports `spent` credits of its lease from `epoch` since its last call and asks
    /// for `want` more: the report is settled first (what it spent beyond its lease comes off the
    /// balance, never below 0; a report about a void lease changes nothing), then up to `want`
    /// is granted from the balance.
    pub fn take(
        &mut self,
        instance: &str,
        epoch: u64,
        spent: i64,
        want: i64,
        now_ms: i64,
    ) -> CreditGrant {
        self.advance(now_ms);
        self.settle(instance, spent * i64::from(epoch == self.epoch), 0, now_ms);
        let granted = want.clamp(0, self.balance.max(0));
        self.balance -= granted;
        let epoch = self.epoch;
        let lease = self.leases.entry(instance.to_owned()).or_insert(Lease {
            epoch,
            outstanding: 0,
            seen_ms: now_ms,
        });
        lease.outstanding = lease.outstanding.saturating_add(granted);
        CreditGrant {
            granted,
            epoch,
            remaining: self.remaining(),
            refill_at_ms: self.refill_at_ms(),
        }
    }

    /// `instance` reports `spent` and hands back `unspent` of the lease it holds from `epoch`;
    /// a lease of an earlier epoch is void, and its report changes nothing.
    pub fn give_back(&mut self, instance: &str, epoch: u64, spent: i64, unspent: i64, now_ms: i64) {
        self.advance(now_ms);
        if epoch == self.epoch {
            self.settle(instance, spent, unspent, now_ms);
        }
        if self
            .leases
            .get(instance)
            .is_some_and(|l| l.outstanding == 0)
        {
            self.leases.remove(instance);
        }
    }

    /// Applies a report to the instance's lease of this epoch (a lease of an earlier one is
    /// replaced): `spent` and `unspent` leave it, `unspent` back to the balance, and what was
    /// spent beyond it comes off the balance.
    fn settle(&mut self, instance: &str, spent: i64, unspent: i64, now_ms: i64) {
        let epoch = self.epoch;
        let lease = self.leases.entry(instance.to_owned()).or_insert(Lease {
            epoch,
            outstanding: 0,
            seen_ms: now_ms,
        });
        if lease.epoch != epoch {
            *lease = Lease {
                epoch,
                outstanding: 0,
                seen_ms: now_ms,
            };
            // Spent from a void lease: that balance was replaced.
            return;
        }
        lease.seen_ms = now_ms;
        let unspent = unspent.clamp(0, lease.outstanding);
        let after = lease
            .outstanding
            .saturating_sub(unspent)
            .saturating_sub(spent.max(0));
        lease.outstanding = after.max(0);
        self.balance = self
            .balance
            .saturating_add(unspent)
            .saturating_add(after.min(0))
            .max(0);
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

    #[test]
    fn grants_never_pass_the_balance_and_reports_settle_leases() {
        let mut c = CreditCounter::new(10, None, T);
        let a = c.take("a", 0, 0, 4, T);
        assert_eq!((a.granted, a.remaining), (4, 10));
        let b = c.take("b", 0, 0, 8, T);
        assert_eq!((b.granted, c.balance), (6, 0));
        assert_eq!(c.take("c", 0, 0, 1, T).granted, 0);
        // a spent 3 and gives back 1: 1 returns, b still holds 6.
        c.give_back("a", a.epoch, 3, 1, T);
        assert_eq!((c.balance, c.remaining()), (1, 7));
        // b spent 6 and 2 more the upstream declared: 2 come off the balance, not below 0.
        c.take("b", 0, 8, 0, T);
        assert_eq!((c.balance, c.remaining()), (0, 0));
    }

    #[test]
    fn a_silent_instances_lease_returns_and_void_leases_change_nothing() {
        let mut c = CreditCounter::new(10, None, T);
        let a = c.take("a", 0, 0, 5, T);
        c.take("b", 0, 0, 1, T + LEASE_TTL_MS);
        assert_eq!(c.balance, 9, "a's 5 returned once it fell silent");
        c.change(
            CreditChange {
                set: Some(3),
                ..CreditChange::default()
            },
            T + LEASE_TTL_MS,
        );
        c.give_back("a", a.epoch, 5, 0, T + LEASE_TTL_MS);
        assert_eq!(
            (c.balance, c.remaining()),
            (3, 3),
            "a report of a void lease"
        );
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
        c.take("a", 0, 0, 5, T);
        let next = (day + 1) * 86_400_000;
        let g = c.take("a", 0, 5, 1, next);
        assert_eq!(
            (g.granted, g.remaining, c.last_refill_ms),
            (1, 100, Some(next))
        );
        assert_eq!(period_start(RefillInterval::Monthly, 683), {
            // 1970 + 56 years + 11 months: 2026-12-01.
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0)
                .unwrap()
                .timestamp_millis()
        });
        assert_eq!(period_of(RefillInterval::Monthly, T), 683);
    }
}
