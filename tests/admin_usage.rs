//! The usage API (contract section 5): a key's buckets by interval with zeros, the 200,000-bucket
//! cap, week and month sums equal to their days, account totals, and the keys at a glance.
//! Requests are placed in time with an injected metering clock; the flusher runs every 50 ms.

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate::metering::WallClock;

use common::gateway::Gateway;
use common::upstream::Upstream;
use common::{client, eventually};

const DAY_MS: i64 = 86_400_000;

struct Fixture {
    _upstream: Upstream,
    gw: Gateway,
    clock: Arc<AtomicI64>,
    account_id: String,
    key: String,
    key_id: String,
}

async fn fixture() -> Fixture {
    let clock = Arc::new(AtomicI64::new(Utc::now().timestamp_millis()));
    let upstream = Upstream::start().await;
    let gw = Gateway::builder(&upstream)
        .clock(WallClock::Manual(Arc::clone(&clock)))
        .tweak(|s| s.metering.flush_interval = Duration::from_millis(50))
        .start()
        .await;
    let account_id = gw
        .create_account(json!({ "name": "usage", "rate_limit": { "per_minute": 1000, "per_hour": 100000, "per_day": 1000000 } }))
        .await;
    let (key_id, key) = gw.create_key(&account_id, json!({ "name": "k" })).await;
    Fixture {
        _upstream: upstream,
        gw,
        clock,
        account_id,
        key,
        key_id,
    }
}

impl Fixture {
    /// Sends `n` requests at `at_ms` (metering time), `failing` of them to a dead upstream.
    async fn traffic(&self, at_ms: i64, n: usize, failing: usize) {
        self.clock.store(at_ms, Ordering::SeqCst);
        let client = client();
        for i in 0..n {
            let path = if i < failing { "/dead/x" } else { "/ok" };
            let r = client
                .get(self.gw.proxy_url(path))
                .bearer_auth(&self.key)
                .send()
                .await
                .expect("send");
            let _ = r.bytes().await;
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.gw.admin(Method::GET, path, None).await
    }

    /// Waits until the key's total (all time, by day) reaches `n`.
    async fn flushed(&self, n: u64) {
        let path = format!(
            "/v1/accounts/{}/keys/{}/usage?from=2020-01-01T00:00:00Z&to=2030-01-01T00:00:00Z&interval=month",
            self.account_id, self.key_id
        );
        let ok = eventually(Duration::from_secs(5), || async {
            let (_, body) = self.get(&path).await;
            total(&body) == n
        })
        .await;
        assert!(ok, "usage never reached {n}");
    }
}

fn total(body: &Value) -> u64 {
    body["buckets"].as_array().map_or(0, |b| {
        b.iter()
            .map(|x| x["request_count"].as_u64().unwrap_or(0))
            .sum()
    })
}

fn ts(s: &str) -> i64 {
    DateTime::parse_from_rfc3339(s)
        .expect("time")
        .timestamp_millis()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_buckets_are_listed_with_zeros_and_exact_counts() {
    let f = fixture().await;
    f.traffic(ts("2026-03-10T10:15:30Z"), 3, 1).await;
    f.traffic(ts("2026-03-10T10:17:00Z"), 2, 0).await;
    f.flushed(5).await;
    let base = format!("/v1/accounts/{}/keys/{}/usage", f.account_id, f.key_id);
    let (status, body) = f
        .get(&format!(
            "{base}?from=2026-03-10T10:15:00Z&to=2026-03-10T10:18:00Z&interval=minute"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["key_id"], f.key_id.as_str());
    assert_eq!(body["interval"], "minute");
    let buckets = body["buckets"].as_array().expect("buckets");
    let counts: Vec<(String, u64, u64, u64)> = buckets
        .iter()
        .map(|b| {
            (
                b["bucket"].as_str().unwrap_or("").to_owned(),
                b["request_count"].as_u64().unwrap_or(0),
                b["success_count"].as_u64().unwrap_or(0),
                b["error_count"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        counts,
        vec![
            ("2026-03-10T10:15:00Z".to_owned(), 3, 2, 1),
            ("2026-03-10T10:16:00Z".to_owned(), 0, 0, 0),
            ("2026-03-10T10:17:00Z".to_owned(), 2, 2, 0),
        ]
    );
    for field in ["rate_limited_count", "bytes_in", "bytes_out"] {
        assert!(buckets[0][field].is_u64(), "{field} in {}", buckets[0]);
    }
    // Defaults: the last 90 days by day, today included.
    let (status, body) = f.get(&base).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["interval"], "day");
    assert_eq!(body["buckets"].as_array().map(Vec::len), Some(90));
    // The same through the account's own path.
    let (status, own) = f
        .gw
        .admin(Method::GET, &format!("/v1/accounts/{}/keys/{}/usage?interval=hour&from=2026-03-10T10:00:00Z&to=2026-03-10T11:00:00Z", f.account_id, f.key_id), None)
        .await;
    assert_eq!((status, total(&own)), (StatusCode::OK, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weeks_and_months_are_the_sums_of_their_days() {
    let f = fixture().await;
    // Sun 2026-03-01, Mon 03-02, Sun 03-08, Mon 03-09, Tue 03-31, Wed 04-01.
    let days = [
        ("2026-03-01", 1),
        ("2026-03-02", 2),
        ("2026-03-08", 3),
        ("2026-03-09", 4),
        ("2026-03-31", 5),
        ("2026-04-01", 6),
    ];
    for (day, n) in days {
        f.traffic(ts(&format!("{day}T12:00:00Z")), n, 0).await;
    }
    f.flushed(21).await;
    let base = format!(
        "/v1/accounts/{}/keys/{}/usage?from=2026-02-23T00:00:00Z&to=2026-04-06T00:00:00Z",
        f.account_id, f.key_id
    );
    let series = |body: &Value| -> Vec<(String, u64)> {
        body["buckets"]
            .as_array()
            .expect("buckets")
            .iter()
            .map(|b| {
                (
                    b["bucket"].as_str().unwrap_or("")[..10].to_owned(),
                    b["request_count"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    let (_, by_day) = f.get(&format!("{base}&interval=day")).await;
    let (_, by_week) = f.get(&format!("{base}&interval=week")).await;
    let (_, by_month) = f.get(&format!("{base}&interval=month")).await;
    let days = series(&by_day);
    let weeks = series(&by_week);
    let months = series(&by_month);
    // Each week is the sum of its seven days, each month the sum of its days.
    for (start, sum) in &weeks {
        let first = days
            .iter()
            .position(|(d, _)| d == start)
            .expect("week starts on a listed day");
        let of_days: u64 = days[first..(first + 7).min(days.len())]
            .iter()
            .map(|(_, n)| n)
            .sum();
        assert_eq!(*sum, of_days, "week of {start}");
    }
    for (start, sum) in &months {
        let of_days: u64 = days
            .iter()
            .filter(|(d, _)| d[..7] == start[..7])
            .map(|(_, n)| n)
            .sum();
        assert_eq!(*sum, of_days, "month of {start}");
    }
    assert_eq!(
        weeks,
        vec![
            ("2026-02-23".into(), 1),
            ("2026-03-02".into(), 5),
            ("2026-03-09".into(), 4),
            ("2026-03-16".into(), 0),
            ("2026-03-23".into(), 0),
            ("2026-03-30".into(), 11),
        ]
    );
    assert_eq!(
        months,
        vec![
            ("2026-02-01".into(), 0),
            ("2026-03-01".into(), 15),
            ("2026-04-01".into(), 6)
        ]
    );
}

#[tokio::test]
async fn bad_ranges_are_400() {
    let f = fixture().await;
    let base = format!("/v1/accounts/{}/keys/{}/usage", f.account_id, f.key_id);
    let cases = [
        (
            "?from=2026-01-01T00:00:00Z&to=2026-12-01T00:00:00Z&interval=minute",
            "too_many_buckets",
        ),
        (
            "?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z",
            "invalid_request",
        ),
        ("?interval=fortnight", "invalid_request"),
        ("?from=yesterday", "invalid_request"),
        ("?colour=blue", "invalid_request"),
    ];
    for (query, code) in cases {
        let (status, body) = f.get(&format!("{base}{query}")).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{query}: {body}"
        );
    }
    // Exactly 200,000 minute buckets is allowed.
    let (status, _) = f
        .get(&format!(
            "{base}?from=2026-01-01T00:00:00Z&to=2026-05-19T21:20:00Z&interval=minute"
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = f
        .get(&format!(
            "/v1/accounts/{}/keys/key_nope/usage",
            f.account_id
        ))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_totals_cover_today_this_month_this_year_and_a_custom_range() {
    let f = fixture().await;
    let now = Utc::now().timestamp_millis();
    f.traffic(now, 4, 1).await;
    f.traffic(now - 400 * DAY_MS, 2, 0).await;
    f.flushed(6).await;
    let base = format!("/v1/accounts/{}/usage", f.account_id);
    let (status, body) = f.get(&base).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["today"],
        json!({ "request_count": 4, "success_count": 3, "error_count": 1 })
    );
    assert_eq!(body["this_month"]["request_count"], 4);
    assert_eq!(body["this_year"]["request_count"], 4);
    assert!(body.get("custom").is_none());
    let old = chrono::DateTime::from_timestamp_millis(now - 400 * DAY_MS)
        .expect("date")
        .date_naive();
    let (status, body) = f
        .get(&format!("{base}?start_date={old}&end_date={old}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["custom"],
        json!({ "request_count": 2, "success_count": 2, "error_count": 0 })
    );
    let (status, body) = f.get(&format!("{base}?start_date={old}")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_at_a_glance_show_last_use_and_the_tightest_window() {
    let f = fixture().await;
    let (_, spare) =
        f.gw.create_key(
            &f.account_id,
            json!({ "name": "spare", "rate_limit": { "per_minute": 5 } }),
        )
        .await;
    let _ = spare;
    // The day is the tightest window: it refills one request in 86.4 s, so what the key has
    // left now (read off its buckets at the time of asking) is what the traffic left.
    let (status, body) =
        f.gw.admin(
            Method::PATCH,
            &format!("/v1/accounts/{}/keys/{}", f.account_id, f.key_id),
            Some(json!({ "rate_limit": { "per_minute": 100000, "per_day": 1000 } })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let now = Utc::now().timestamp_millis();
    f.traffic(now, 3, 0).await;
    f.flushed(3).await;
    let (status, body) = f
        .get(&format!("/v1/accounts/{}/usage/keys", f.account_id))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["total_keys"].as_u64(), body["active_keys"].as_u64()),
        (Some(2), Some(2))
    );
    let keys = body["keys"].as_array().expect("keys");
    let used = keys
        .iter()
        .find(|k| k["key_id"] == f.key_id.as_str())
        .expect("used key");
    assert_eq!(used["rate_limit_max"], 1000);
    assert_eq!(used["rate_limit_remaining"], 997);
    let last = used["last_used_at"].as_str().expect("last_used_at");
    assert_eq!(
        DateTime::parse_from_rfc3339(last)
            .expect("rfc3339")
            .timestamp_millis(),
        now
    );
    let unused = keys.iter().find(|k| k["name"] == "spare").expect("spare");
    assert_eq!(
        (
            unused["rate_limit_max"].as_u64(),
            unused["rate_limit_remaining"].as_u64()
        ),
        (Some(5), Some(5))
    );
    assert!(unused["last_used_at"].is_null());
    assert!(unused["prefix"]
        .as_str()
        .is_some_and(|p| p.starts_with("tgsk_")));
}

/// At most `MAX_HEAVY_USAGE_READS` reads of more than 20,000 buckets run at once: with that many
/// answers stalled by clients that read nothing, one more heavy read waits its deadline and is
/// 503 `usage_busy` with `Retry-After`, while a light read is served at once; when the stalled
/// clients go, their places free and a heavy read is served whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_usage_reads_are_bounded_and_the_one_too_many_is_503_usage_busy() {
    let f = fixture().await;
    let base = format!("/v1/accounts/{}/keys/{}/usage", f.account_id, f.key_id);
    let heavy = f.gw.admin_url(&format!(
        "{base}?from=2026-01-01T00:00:00Z&to=2026-05-19T21:20:00Z&interval=minute"
    ));
    let light = format!("{base}?from=2026-01-01T00:00:00Z&to=2026-01-08T00:00:00Z&interval=minute");
    let get = |url: String| {
        let master = f.gw.master.clone();
        async move {
            client()
                .get(url)
                .bearer_auth(master)
                .send()
                .await
                .expect("usage request")
        }
    };
    // Each answer has begun (its head is sent once it holds a place); none is read.
    let mut stalled = Vec::new();
    for _ in 0..tollgate::admin::MAX_HEAVY_USAGE_READS {
        let response = get(heavy.clone()).await;
        assert_eq!(response.status(), StatusCode::OK);
        stalled.push(response);
    }
    let (status, body) = f.get(&light).await;
    assert_eq!(
        (status, body["buckets"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(10_080))
    );
    let busy = get(heavy.clone()).await;
    assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        busy.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let body: Value = busy.json().await.expect("JSON error");
    assert_eq!(body["error"]["code"], "usage_busy", "{body}");

    drop(stalled);
    let served = eventually(Duration::from_secs(10), || async {
        let response = get(heavy.clone()).await;
        if response.status() != StatusCode::OK {
            return false;
        }
        let body: Value = response.json().await.expect("the whole answer is JSON");
        body["buckets"].as_array().map(Vec::len) == Some(200_000)
    })
    .await;
    assert!(served, "the places of the stalled reads were never freed");
}

/// Query times in every form the contract accepts (§5): RFC 3339, an ISO-8601 time without an
/// offset (UTC) and a plain date, for the key's `from`/`to` and the account's `start_date` and
/// `end_date` alike; each form gives the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_times_may_be_rfc_3339_naive_iso_or_plain_dates() {
    let f = fixture().await;
    f.traffic(ts("2026-03-10T10:15:30Z"), 3, 0).await;
    f.flushed(3).await;
    let base = format!("/v1/accounts/{}/keys/{}/usage", f.account_id, f.key_id);
    let mut answers = Vec::new();
    for (from, to) in [
        ("2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z"),
        ("2026-03-10T00:00:00", "2026-03-11T00:00:00"),
        ("2026-03-10", "2026-03-11"),
    ] {
        let (status, body) = f
            .get(&format!("{base}?interval=hour&from={from}&to={to}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{from}..{to}: {body}");
        assert_eq!(total(&body), 3, "{from}..{to}");
        answers.push(body["buckets"].clone());
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");

    let totals = format!("/v1/accounts/{}/usage", f.account_id);
    for (start, end) in [
        ("2026-03-10", "2026-03-10"),
        ("2026-03-10T00:00:00Z", "2026-03-10T23:59:59Z"),
        ("2026-03-10T08:00:00", "2026-03-10T20:00:00"),
    ] {
        let (status, body) = f
            .get(&format!("{totals}?start_date={start}&end_date={end}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{start}..{end}: {body}");
        assert_eq!(body["custom"]["request_count"], 3, "{start}..{end}");
    }
    let (status, _) = f
        .get(&format!(
            "{totals}?start_date=10/03/2026&end_date=2026-03-10"
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
