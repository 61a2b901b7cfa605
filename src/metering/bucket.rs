//! Usage bucket maths, pure: the intervals of the usage API, their UTC alignment (ISO weeks
//! start on Monday, months on the 1st), and turning stored day/hour/minute buckets into every
//! bucket of a range, zeros included.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};

use crate::store::{Granularity, UsageCounts};

/// The most buckets one usage query may return.
pub const MAX_BUCKETS: u64 = 200_000;

/// A usage API interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interval {
    /// Minute buckets.
    Minute,
    /// Hour buckets.
    Hour,
    /// UTC days.
    Day,
    /// ISO weeks (Monday 00:00 UTC), summed from days.
    Week,
    /// Calendar months (UTC), summed from days.
    Month,
}

/// Why a range cannot be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// `from` is after `to`.
    #[error("from is after to")]
    Reversed,
    /// More than [`MAX_BUCKETS`] buckets.
    #[error("the range holds {0} buckets, more than 200000")]
    TooMany(u64),
}

// === impl Interval ===

impl Interval {
    /// Parses `minute|hour|day|week|month`.
    pub fn parse(s: &str) -> Option<Interval> {
        Some(match s {
            "minute" => Interval::Minute,
            "hour" => Interval::Hour,
            "day" => Interval::Day,
            "week" => Interval::Week,
            "month" => Interval::Month,
            _ => return None,
        })
    }

    /// Its name in the API.
    pub fn name(self) -> &'static str {
        match self {
            Interval::Minute => "minute",
            Interval::Hour => "hour",
            Interval::Day => "day",
            Interval::Week => "week",
            Interval::Month => "month",
        }
    }

    /// The stored buckets it is built from.
    pub fn source(self) -> Granularity {
        match self {
            Interval::Minute => Granularity::Minute,
            Interval::Hour => Granularity::Hour,
            Interval::Day | Interval::Week | Interval::Month => Granularity::Day,
        }
    }

    /// The start of the bucket holding `t`; at the earliest instant chrono holds, that instant
    /// when the bucket would start before it.
    pub fn floor(self, t: DateTime<Utc>) -> DateTime<Utc> {
        let secs = t.timestamp();
        let aligned = |len: i64| {
            Utc.timestamp_opt(secs.div_euclid(len) * len, 0)
                .single()
                .unwrap_or(t)
        };
        match self {
            Interval::Minute => aligned(60),
            Interval::Hour => aligned(3_600),
            Interval::Day => aligned(86_400),
            Interval::Week => {
                let day = aligned(86_400);
                day.checked_sub_signed(Duration::days(i64::from(
                    day.weekday().num_days_from_monday(),
                )))
                .unwrap_or(DateTime::<Utc>::MIN_UTC)
            }
            Interval::Month => {
                let first =
                    NaiveDate::from_ymd_opt(t.year(), t.month(), 1).unwrap_or(t.date_naive());
                Utc.from_utc_datetime(&first.and_time(chrono::NaiveTime::MIN))
            }
        }
    }

    /// The start of the bucket after the one starting at `start`; the last instant chrono holds
    /// when that is past it (nothing starts after it, so a range ends there).
    pub fn next(self, start: DateTime<Utc>) -> DateTime<Utc> {
        let after = |d: Duration| {
            start
                .checked_add_signed(d)
                .unwrap_or(DateTime::<Utc>::MAX_UTC)
        };
        match self {
            Interval::Minute => after(Duration::minutes(1)),
            Interval::Hour => after(Duration::hours(1)),
            Interval::Day => after(Duration::days(1)),
            Interval::Week => after(Duration::weeks(1)),
            Interval::Month => {
                let (y, m) = if start.month() == 12 {
                    (start.year() + 1, 1)
                } else {
                    (start.year(), start.month() + 1)
                };
                NaiveDate::from_ymd_opt(y, m, 1).map_or(after(Duration::days(31)), |d| {
                    Utc.from_utc_datetime(&d.and_time(chrono::NaiveTime::MIN))
                })
            }
        }
    }

    /// How many buckets start in `[floor(from), to)`, without listing them.
    pub fn count(self, from: DateTime<Utc>, to: DateTime<Utc>) -> u64 {
        let start = self.floor(from);
        if to <= start {
            return 0;
        }
        let span = (to - start).num_seconds();
        let per = |len: i64| u64::try_from((span + len - 1) / len).unwrap_or(u64::MAX);
        match self {
            Interval::Minute => per(60),
            Interval::Hour => per(3_600),
            Interval::Day => per(86_400),
            Interval::Week => per(7 * 86_400),
            Interval::Month => {
                let months =
                    (to.year() - start.year()) * 12 + to.month() as i32 - start.month() as i32;
                let months = u64::try_from(months).unwrap_or(0);
                if self.floor(to) == to {
                    months
                } else {
                    months + 1
                }
            }
        }
    }
}

/// Every bucket of `interval` that starts in `[floor(from), to)`, with the stored buckets
/// (`(index, counts)` of `interval.source()`) summed into them and zeros elsewhere; the whole
/// range at once, as [`Filler`] makes it a window at a time.
pub fn fill(
    interval: Interval,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    stored: &[(i64, UsageCounts)],
) -> Result<Vec<(DateTime<Utc>, UsageCounts)>, RangeError> {
    let mut filler = Filler::new(interval, from, to)?;
    let mut stored = stored.to_vec();
    stored.sort_by_key(|(index, _)| *index);
    let mut out = Vec::with_capacity(usize::try_from(filler.remaining()).unwrap_or(0));
    while let Some(window) = filler.next_window(u64::MAX) {
        filler.fill(&window, &stored, |start, counts| out.push((start, counts)));
    }
    Ok(out)
}

/// Makes the buckets of a range a window at a time, so that neither the stored buckets nor the
/// answer need be held whole: [`Filler::next_window`] says which stored buckets to read next,
/// [`Filler::fill`] turns them into that window's buckets, zeros included, in order.
///
/// The windows partition [`source_range`], so each stored bucket lands in the same bucket as
/// with [`fill`], and the concatenated windows are exactly its answer.
#[derive(Debug, Clone)]
pub struct Filler {
    interval: Interval,
    /// Start of the next bucket to make.
    next: DateTime<Utc>,
    to: DateTime<Utc>,
    /// The end of [`source_range`]: the last window reads up to it.
    source_end: i64,
}

/// One read's worth of a [`Filler`]'s range: the stored-bucket indexes `[lo, hi)` to read, and
/// the buckets that start before `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First stored-bucket index to read.
    pub lo: i64,
    /// One past the last.
    pub hi: i64,
    end: DateTime<Utc>,
}

// === impl Filler ===

impl Filler {
    /// A filler for `[floor(from), to)`: refused as [`fill`] refuses it.
    pub fn new(
        interval: Interval,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Self, RangeError> {
        if from > to {
            return Err(RangeError::Reversed);
        }
        let n = interval.count(from, to);
        if n > MAX_BUCKETS {
            return Err(RangeError::TooMany(n));
        }
        Ok(Filler {
            interval,
            next: interval.floor(from),
            to,
            source_end: source_range(interval, from, to).1,
        })
    }

    /// How many buckets are still to be made.
    pub fn remaining(&self) -> u64 {
        self.interval.count(self.next, self.to)
    }

    /// The next window: up to `max_buckets` buckets (at least one); `None` once every bucket is
    /// made. A window reads at most `max_buckets` stored buckets of its source (31 times that
    /// for months, 7 for weeks).
    pub fn next_window(&self, max_buckets: u64) -> Option<Window> {
        if self.next >= self.to {
            return None;
        }
        let len = self.interval.source().seconds();
        let lo = self.next.timestamp().div_euclid(len);
        let mut end = self.interval.next(self.next);
        let mut made = 1;
        while end < self.to && made < max_buckets {
            end = self.interval.next(end);
            made += 1;
        }
        let hi = if end >= self.to {
            self.source_end
        } else {
            end.timestamp().div_euclid(len)
        };
        Some(Window { lo, hi, end })
    }

    /// Hands `emit` every bucket of `window`, in order, with the `stored` buckets (ascending, as
    /// read for the window) summed into them and zeros elsewhere.
    pub fn fill(
        &mut self,
        window: &Window,
        stored: &[(i64, UsageCounts)],
        mut emit: impl FnMut(DateTime<Utc>, UsageCounts),
    ) {
        let len = self.interval.source().seconds();
        let mut stored = stored.iter().peekable();
        let mut start = self.next;
        while start < window.end && start < self.to {
            let mut sum = UsageCounts::default();
            while let Some((index, counts)) = stored.peek() {
                let Some(t) = index
                    .checked_mul(len)
                    .and_then(|secs| Utc.timestamp_opt(secs, 0).single())
                else {
                    stored.next();
                    continue;
                };
                let bucket = self.interval.floor(t);
                if bucket > start {
                    break;
                }
                if bucket == start {
                    sum.merge(counts);
                }
                stored.next();
            }
            emit(start, sum);
            start = self.interval.next(start);
        }
        self.next = start;
    }
}

/// The stored-bucket index range `[from, to)` that covers the buckets of [`fill`].
pub fn source_range(interval: Interval, from: DateTime<Utc>, to: DateTime<Utc>) -> (i64, i64) {
    let len = interval.source().seconds();
    let start = interval.floor(from).timestamp().div_euclid(len);
    let end = to.timestamp().div_euclid(len) + 1;
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_INTERVALS: [Interval; 5] = [
        Interval::Minute,
        Interval::Hour,
        Interval::Day,
        Interval::Week,
        Interval::Month,
    ];

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn requests(n: u64) -> UsageCounts {
        UsageCounts {
            requests: n,
            ..Default::default()
        }
    }

    #[test]
    fn weeks_start_on_monday_and_months_on_the_first() {
        // 2026-11-23 is a Monday.
        assert_eq!(
            Interval::Week.floor(t("2026-11-29T23:59:59Z")),
            t("2026-11-23T00:00:00Z")
        );
        assert_eq!(
            Interval::Week.floor(t("2026-11-23T00:00:00Z")),
            t("2026-11-23T00:00:00Z")
        );
        assert_eq!(
            Interval::Week.floor(t("2026-11-22T12:00:00Z")),
            t("2026-11-16T00:00:00Z")
        );
        assert_eq!(
            Interval::Month.floor(t("2026-12-31T23:00:00Z")),
            t("2026-12-01T00:00:00Z")
        );
        assert_eq!(
            Interval::Month.next(t("2026-12-01T00:00:00Z")),
            t("2027-01-01T00:00:00Z")
        );
    }

    #[test]
    fn every_bucket_in_range_is_listed_with_zeros() {
        let stored = vec![(29_590_000, requests(3))];
        let from = t("2026-04-05T00:00:00Z");
        let to = from + Duration::minutes(5);
        let buckets = fill(Interval::Minute, from, to, &[]).unwrap();
        assert_eq!(buckets.len(), 5);
        assert!(buckets.iter().all(|(_, c)| *c == UsageCounts::default()));
        let at = Utc.timestamp_opt(29_590_000 * 60, 0).unwrap();
        let one = fill(Interval::Minute, at, at + Duration::minutes(2), &stored).unwrap();
        assert_eq!(
            one,
            vec![
                (at, requests(3)),
                (at + Duration::minutes(1), UsageCounts::default())
            ]
        );
    }

    #[test]
    fn weeks_and_months_sum_their_days() {
        // Days 20 416 (Mon 2025-11-24) .. 20 422 (Sun 2025-11-30), and 20 423 (Mon 2025-12-01).
        let stored: Vec<(i64, UsageCounts)> = (20_416..=20_423).map(|d| (d, requests(1))).collect();
        let weeks = fill(
            Interval::Week,
            t("2025-11-24T00:00:00Z"),
            t("2025-12-08T00:00:00Z"),
            &stored,
        )
        .unwrap();
        assert_eq!(
            weeks,
            vec![
                (t("2025-11-24T00:00:00Z"), requests(7)),
                (t("2025-12-01T00:00:00Z"), requests(1))
            ]
        );
        let months = fill(
            Interval::Month,
            t("2025-11-15T00:00:00Z"),
            t("2025-12-15T00:00:00Z"),
            &stored,
        )
        .unwrap();
        assert_eq!(
            months,
            vec![
                (t("2025-11-01T00:00:00Z"), requests(7)),
                (t("2025-12-01T00:00:00Z"), requests(1))
            ]
        );
    }

    /// The whole-range answer as it was made before windows: every stored bucket summed into
    /// a map by the start of its bucket, then every bucket of the range listed.
    fn reference(
        interval: Interval,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        stored: &[(i64, UsageCounts)],
    ) -> Vec<(DateTime<Utc>, UsageCounts)> {
        let len = interval.source().seconds();
        let mut sums = std::collections::BTreeMap::<DateTime<Utc>, UsageCounts>::new();
        for (index, counts) in stored {
            let t = Utc.timestamp_opt(index * len, 0).unwrap();
            sums.entry(interval.floor(t)).or_default().merge(counts);
        }
        let mut out = Vec::new();
        let mut start = interval.floor(from);
        while start < to {
            out.push((start, sums.get(&start).copied().unwrap_or_default()));
            start = interval.next(start);
        }
        out
    }

    #[test]
    fn windows_of_any_size_make_the_same_buckets_as_the_whole_range() {
        let mut seed = 0x2545_f491_u64;
        let mut random = move |n: u64| -> u64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for interval in ALL_INTERVALS {
            // About 200 buckets each, unaligned, aligned, and empty.
            let long = match interval {
                Interval::Minute => Duration::minutes(200),
                Interval::Hour => Duration::hours(200),
                Interval::Day => Duration::days(200),
                Interval::Week => Duration::weeks(200),
                Interval::Month => Duration::days(200 * 30),
            };
            for (from, to) in [
                (t("2026-01-15T10:07:31Z"), t("2026-01-15T10:07:31Z") + long),
                (t("2025-12-29T00:00:00Z"), t("2025-12-29T00:00:00Z") + long),
                (t("2026-02-03T04:05:06Z"), t("2026-02-03T04:05:06Z")),
            ] {
                let Ok(filler) = Filler::new(interval, from, to) else {
                    continue;
                };
                let (lo, hi) = source_range(interval, from, to);
                // Stored buckets on both sides of the range too (a window reads none of them), a third
                // of indexes non-zero.
                let stored: Vec<(i64, UsageCounts)> = (lo - 40..hi + 40)
                    .filter(|_| random(3) == 0)
                    .map(|i| (i, requests(1 + i.rem_euclid(9) as u64)))
                    .collect();
                // The whole range's answer from what a read of its source range gives.
                let read: Vec<_> = stored
                    .iter()
                    .copied()
                    .filter(|(i, _)| (lo..hi).contains(i))
                    .collect();
                let want = reference(interval, from, to, &read);
                assert_eq!(fill(interval, from, to, &read).unwrap(), want);
                for size in [1, 2, 5, 7, 1_000] {
                    let mut filler = filler.clone();
                    let mut got = Vec::new();
                    let mut reads = Vec::new();
                    while let Some(w) = filler.next_window(size) {
                        reads.push((w.lo, w.hi));
                        let part: Vec<_> = stored
                            .iter()
                            .copied()
                            .filter(|(i, _)| (w.lo..w.hi).contains(i))
                            .collect();
                        filler.fill(&w, &part, |start, c| got.push((start, c)));
                    }
                    assert_eq!(got, want, "{interval:?} size {size}");
                    // The reads partition the whole range's.
                    if let (Some(first), Some(last)) = (reads.first(), reads.last()) {
                        assert_eq!((first.0, last.1), (lo, hi), "{interval:?} size {size}");
                    }
                    assert!(reads.windows(2).all(|p| p[0].1 == p[1].0), "{reads:?}");
                    assert_eq!(filler.remaining(), 0);
                }
            }
        }
    }

    /// Found by the `usage_query` fuzz target: at the ends of chrono's range, the week's floor
    /// and the next bucket overflowed (`DateTime - TimeDelta` panicked), and so did a stored
    /// index times its length.
    #[test]
    fn the_ends_of_time_are_buckets_not_panics() {
        let (min, max) = (DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC);
        for interval in ALL_INTERVALS {
            assert!(interval.floor(min) <= min, "{interval:?}");
            assert!(interval.floor(max) <= max, "{interval:?}");
            assert_eq!(interval.next(max), max, "{interval:?}");
            let near_max = max - Duration::hours(1);
            let buckets = fill(interval, near_max, max, &[(i64::MAX, requests(1))]).unwrap();
            assert_eq!(
                buckets.len() as u64,
                interval.count(near_max, max),
                "{interval:?}"
            );
            let near_min = min + Duration::hours(1);
            let buckets = fill(interval, min, near_min, &[(i64::MIN, requests(1))]).unwrap();
            assert_eq!(
                buckets.len() as u64,
                interval.count(min, near_min),
                "{interval:?}"
            );
        }
    }

    #[test]
    fn ranges_are_checked() {
        let a = t("2026-01-01T00:00:00Z");
        assert_eq!(
            fill(Interval::Day, a, a - Duration::days(1), &[]),
            Err(RangeError::Reversed)
        );
        assert_eq!(
            Interval::Minute.count(a, a + Duration::minutes(200_000)),
            200_000
        );
        assert!(fill(Interval::Minute, a, a + Duration::minutes(200_000), &[]).is_ok());
        assert_eq!(
            fill(Interval::Minute, a, a + Duration::minutes(200_001), &[]),
            Err(RangeError::TooMany(200_001))
        );
        assert_eq!(
            Interval::Month.count(t("2026-01-15T00:00:00Z"), t("2026-03-01T00:00:00Z")),
            2
        );
        assert_eq!(
            Interval::Month.count(t("2026-01-15T00:00:00Z"), t("2026-03-02T00:00:00Z")),
            3
        );
    }
}
