//! Usage queries: arbitrary query strings on `GET …/keys/{id}/usage` (`from`, `to`, `interval`)
//! and `GET …/usage` (`start_date`, `end_date`) through the real router in-process, and the
//! bucket maths of `metering::bucket` on arbitrary instants. Never a panic, never a 5xx; a range
//! of more than 200 000 buckets is refused (400 `too_many_buckets`), never allocated.

#![no_main]

use chrono::{DateTime, Utc};
use http::Method;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tollgate::metering::bucket::{self, Interval, RangeError};
use tollgate::store::UsageCounts;
use tollgate_fuzz::app;

const INTERVALS: [Interval; 5] = [
    Interval::Minute,
    Interval::Hour,
    Interval::Day,
    Interval::Week,
    Interval::Month,
];

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => key_usage(rest),
        1 => account_usage(rest),
        _ => {
            let _ = maths(&mut Unstructured::new(rest));
        }
    }
});

fn key_usage(query: &[u8]) {
    let app = app();
    let path = format!(
        "/v1/accounts/{}/keys/{}/usage?{}",
        app.account,
        app.key,
        escape(query)
    );
    let answer = app.call(Method::GET, &path, Vec::new());
    let Some(value) = answer.assert_well_formed(&path) else {
        return;
    };
    if answer.status.is_success() {
        let buckets = value["buckets"].as_array().expect("buckets");
        assert!(buckets.len() as u64 <= bucket::MAX_BUCKETS, "{path}");
    }
}

fn account_usage(query: &[u8]) {
    let app = app();
    let path = format!("/v1/accounts/{}/usage?{}", app.account, escape(query));
    app.call(Method::GET, &path, Vec::new())
        .assert_well_formed(&path);
}

/// The query as the fuzzer wrote it, with what a URI cannot hold percent-encoded.
fn escape(query: &[u8]) -> String {
    let mut out = String::with_capacity(query.len());
    for &b in query {
        let keep = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'_' | b'~' | b'&' | b'=' | b'%' | b'+' | b':' | b',' | b'/'
            );
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `count`, `fill` and `source_range` on any two instants chrono can hold.
fn maths(u: &mut Unstructured<'_>) -> Result<()> {
    let interval = *u.choose(&INTERVALS)?;
    let from = instant(u)?;
    let to = if u.arbitrary()? {
        instant(u)?
    } else {
        // Near `from`, so that ranges that are answered are common.
        let span = i64::from(u.arbitrary::<u32>()?);
        DateTime::from_timestamp(from.timestamp().saturating_add(span), 0).unwrap_or(from)
    };
    let stored: Vec<(i64, UsageCounts)> = (0..u.int_in_range(0..=4)?)
        .map(|_| {
            Ok((
                u.arbitrary()?,
                UsageCounts {
                    requests: 1,
                    ..Default::default()
                },
            ))
        })
        .collect::<Result<_>>()?;
    let n = interval.count(from, to);
    let _ = bucket::source_range(interval, from, to);
    match bucket::fill(interval, from, to, &stored) {
        Ok(buckets) => {
            assert!(from <= to);
            assert!(n <= bucket::MAX_BUCKETS);
            assert_eq!(buckets.len() as u64, n, "{interval:?} {from} {to}");
            assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0));
        }
        Err(RangeError::Reversed) => assert!(from > to),
        Err(RangeError::TooMany(m)) => assert!(m > bucket::MAX_BUCKETS && m == n),
    }
    Ok(())
}

fn instant(u: &mut Unstructured<'_>) -> Result<DateTime<Utc>> {
    let min = DateTime::<Utc>::MIN_UTC.timestamp();
    let max = DateTime::<Utc>::MAX_UTC.timestamp();
    let secs = u.int_in_range(min..=max)?;
    Ok(DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::UNIX_EPOCH))
}
