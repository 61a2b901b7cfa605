//! The record's outcomes, each counted once in `requests_total` and in the key's usage.

use std::sync::atomic::AtomicI64;

use super::*;
use crate::metering::{Meter, Pending};

const NOW_MS: i64 = 1_700_000_000_000;

/// A way for a record to end: its name, what is done to it, the `requests_total` sample it
/// leaves, and the key's (requests, errors).
type Case = (&'static str, fn(Record), &'static str, (u64, u64));

/// Every `requests_total` sample (`outcome`, `status_class`) a route's counters hold.
const COUNTERS: [(&str, &str); 7] = [
    ("forwarded", "1xx"),
    ("forwarded", "2xx"),
    ("forwarded", "3xx"),
    ("forwarded", "4xx"),
    ("forwarded", "5xx"),
    ("client_closed", "4xx"),
    ("upstream_timeout", "5xx"),
];

/// What a keyed request's record counted once `end` was done with it: every non-zero
/// `requests_total` sample as `outcome/status_class`, and the key's (requests, errors).
fn counted(end: impl FnOnce(Record)) -> (Vec<String>, (u64, u64)) {
    let metrics = Metrics::new().expect("metrics");
    let meter = Meter::new(WallClock::Manual(Arc::new(AtomicI64::new(NOW_MS))));
    let sink = UsageSink {
        state: meter.cell(&Arc::from("key"), &Arc::from("account")),
        clock: meter.clock().clone(),
    };
    end(Record {
        counters: Arc::new(metrics.route_counters("r")),
        usage: Some((sink, NOW_MS)),
        state: State::Waiting,
    });
    let samples = COUNTERS
        .iter()
        .filter_map(|(outcome, class)| {
            let n = metrics
                .requests_total
                .with_label_values(&["r", outcome, class])
                .get();
            (n != 0).then(|| format!("{outcome}/{class} {n}"))
        })
        .collect();
    let mut pending = Pending::default();
    meter.drain_into(&mut pending);
    let usage = pending.batch().iter().fold((0, 0), |(r, e), d| {
        (r + d.counts.requests, e + d.counts.error)
    });
    (samples, usage)
}

#[test]
fn every_way_a_forwarded_request_ends_is_counted_once() {
    let cases: [Case; 5] = [
        (
            "answered",
            |mut r| r.answered(200),
            "forwarded/2xx 1",
            (1, 0),
        ),
        (
            "client gone before the head",
            drop,
            "client_closed/4xx 1",
            (1, 1),
        ),
        (
            "body cut",
            |mut r| {
                r.answered(200);
                r.cut();
            },
            "upstream_timeout/5xx 1",
            (1, 1),
        ),
        (
            "upgraded, then dropped",
            |mut r| {
                r.answered(101);
                assert!(r.upgraded().is_some(), "the tunnel gets the key's sink");
            },
            "forwarded/1xx 1",
            (1, 0),
        ),
        (
            "answered 500",
            |mut r| r.answered(500),
            "forwarded/5xx 1",
            (1, 1),
        ),
    ];
    for (case, end, sample, usage) in cases {
        assert_eq!(counted(end), (vec![sample.to_owned()], usage), "{case}");
    }
}

#[test]
fn a_record_that_steps_aside_for_a_refusal_counts_nothing() {
    let nothing = counted(|mut r| {
        r.answered(101);
        r.refused();
    });
    assert_eq!(nothing, (vec![], (0, 0)));
}
