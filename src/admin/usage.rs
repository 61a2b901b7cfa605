//! Usage, read back: a key's buckets (`GET …/keys/{key_id}/usage`), the account's totals
//! (`GET …/usage`) and its keys at a glance (`GET …/usage/keys`).
//!
//! Buckets come from the store (written by the metering flusher once per `flush_interval`), so
//! the last second of traffic may not show yet. Every bucket of a range is listed, zeros
//! included; weeks (ISO, Monday) and months (calendar) are sums of UTC days. Rate-limit figures
//! come from this instance's buckets as of the key's last request.
//!
//! A key's buckets are streamed ([`stream`]), and a read of more than [`HEAVY_BUCKETS`] takes
//! one of [`super::MAX_HEAVY_USAGE_READS`] places first (503 `usage_busy` when none frees up in
//! time): memory and CPU stay bounded whatever ranges account keys ask for.

mod stream;

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use axum::Json;
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde::Serialize;

use super::auth::AccountAccess;
use super::error::ApiError;
use super::keys::{fetch, KeyId};
use super::AdminState;
use crate::limits::{LimitSnapshot, Quotas};
use crate::metering::bucket::{Filler, Interval, RangeError};
use crate::store::{Granularity, UsageCounts};
use stream::BucketStream;

/// The default range of a key's usage: the last 90 days.
const DEFAULT_DAYS: i64 = 90;

/// A read of more buckets than this is heavy: it waits for one of
/// [`super::MAX_HEAVY_USAGE_READS`] places. A week of minutes (10,080) or 90 days of hours
/// (2,160), what a dashboard asks for, never waits.
pub(crate) const HEAVY_BUCKETS: u64 = 20_000;

/// `{request_count, success_count, error_count}` of a period.
#[derive(Serialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Totals {
    request_count: u64,
    success_count: u64,
    error_count: u64,
}

/// The account's totals.
#[derive(Serialize)]
pub(crate) struct AccountUsage {
    today: Totals,
    this_month: Totals,
    this_year: Totals,
    #[serde(skip_serializing_if = "Option::is_none")]
    custom: Option<Totals>,
}

/// `GET …/usage/keys`.
#[derive(Serialize)]
pub(crate) struct KeysUsage {
    total_keys: usize,
    active_keys: usize,
    keys: Vec<KeyGlance>,
}

/// One key in `GET …/usage/keys`.
#[derive(Serialize)]
pub(crate) struct KeyGlance {
    key_id: String,
    prefix: String,
    name: String,
    active: bool,
    last_used_at: Option<DateTime<Utc>>,
    rate_limit_remaining: Option<u32>,
    rate_limit_max: Option<u32>,
}

// === handlers ===

/// `GET …/keys/{key_id}/usage?from=&to=&interval=`.
pub(crate) async fn key(
    State(state): State<AdminState>,
    access: AccountAccess,
    KeyId(key_id): KeyId,
    params: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::InvalidBody(format!("query: {e}")))?;
    only(&params, &["from", "to", "interval"])?;
    let now = Utc::now();
    let to = time_param(&params, "to")?.unwrap_or(now);
    // By default the 90 UTC days that end with the one holding `to`.
    let from = time_param(&params, "from")?
        .unwrap_or_else(|| Interval::Day.floor(to) - Duration::days(DEFAULT_DAYS - 1));
    let interval = match params.get("interval") {
        None => Interval::Day,
        Some(s) => Interval::parse(s).ok_or_else(|| {
            ApiError::field("interval", "must be one of minute, hour, day, week, month")
        })?,
    };
    let filler = Filler::new(interval, from, to).map_err(|e| match e {
        RangeError::Reversed => ApiError::field("from", "must not be after `to`"),
        RangeError::TooMany(n) => ApiError::TooManyBuckets(n),
    })?;
    let key = fetch(&*state.store, &access.account.id, &key_id).await?;
    let permit = if filler.remaining() > HEAVY_BUCKETS {
        Some(state.heavy_usage_read().await?)
    } else {
        None
    };
    let deadline = state.answer_deadline;
    let answer = BucketStream::new(
        state.store.clone(),
        key.id,
        interval,
        filler,
        deadline,
        permit,
    );
    Ok(answer.respond(from, to).await?)
}

/// `GET …/usage?start_date=&end_date=`: today, this month, this year (UTC), and the custom
/// range (both dates inclusive) when given.
pub(crate) async fn account(
    State(state): State<AdminState>,
    access: AccountAccess,
    params: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<AccountUsage>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::InvalidBody(format!("query: {e}")))?;
    only(&params, &["start_date", "end_date"])?;
    let custom = match (
        date_param(&params, "start_date")?,
        date_param(&params, "end_date")?,
    ) {
        (Some(start), Some(end)) if start <= end => Some((day_index(start), day_index(end) + 1)),
        (Some(_), Some(_)) => {
            return Err(ApiError::field("start_date", "must not be after end_date"))
        }
        (None, None) => None,
        (Some(_), None) => return Err(ApiError::field("end_date", "is required with start_date")),
        (None, Some(_)) => return Err(ApiError::field("start_date", "is required with end_date")),
    };
    let today = Utc::now().date_naive();
    let year_start = NaiveDate::from_ymd_opt(today.year(), 1, 1).unwrap_or(today);
    let month_start = NaiveDate::from_ymd_opt(today.year(), today.month(), 1).unwrap_or(today);
    let from = custom.map_or(day_index(year_start), |(lo, _)| {
        lo.min(day_index(year_start))
    });
    let to = custom.map_or(day_index(today) + 1, |(_, hi)| hi.max(day_index(today) + 1));
    let days = state
        .store
        .account_usage(&access.account.id, from, to)
        .await?;
    let sum = |lo: i64, hi: i64| {
        let mut t = Totals::default();
        for (day, c) in days.iter().filter(|(d, _)| (lo..hi).contains(d)) {
            let _ = day;
            t.add(c);
        }
        t
    };
    let end = day_index(today) + 1;
    Ok(Json(AccountUsage {
        today: sum(day_index(today), end),
        this_month: sum(day_index(month_start), end),
        this_year: sum(day_index(year_start), end),
        custom: custom.map(|(lo, hi)| sum(lo, hi)),
    }))
}

/// `GET …/usage/keys`: every key of the account with its last use and tightest window.
pub(crate) async fn keys(
    State(state): State<AdminState>,
    access: AccountAccess,
) -> Result<Json<KeysUsage>, ApiError> {
    let keys = state.store.list_keys(&access.account.id).await?;
    let ids: Vec<String> = keys.iter().map(|k| k.id.clone()).collect();
    let last_used = state.store.last_used(&ids).await?;
    let glances: Vec<KeyGlance> = keys
        .iter()
        .zip(last_used)
        .map(|(k, last)| {
            let snapshot = match state.cache.limits_of(&k.id) {
                Some(limiter) => limiter.peek(Utc::now().timestamp_millis()),
                None => LimitSnapshot::full(&Quotas::resolve(
                    k.rate_limit.as_ref(),
                    access.account.rate_limit.as_ref(),
                    &state.live().default_limits,
                )),
            };
            let tightest = snapshot.tightest();
            KeyGlance {
                key_id: k.id.clone(),
                prefix: k.prefix.clone(),
                name: k.name.clone(),
                active: k.active,
                last_used_at: last.and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
                rate_limit_remaining: tightest.map(|w| w.remaining),
                rate_limit_max: tightest.map(|w| w.limit),
            }
        })
        .collect();
    Ok(Json(KeysUsage {
        total_keys: glances.len(),
        active_keys: glances.iter().filter(|g| g.active).count(),
        keys: glances,
    }))
}

// === impl Totals ===

impl Totals {
    fn add(&mut self, c: &UsageCounts) {
        self.request_count += c.requests;
        self.success_count += c.success;
        self.error_count += c.error;
    }
}

// === functions ===

/// Refuses query parameters other than `allowed`, naming the first.
fn only(params: &BTreeMap<String, String>, allowed: &[&str]) -> Result<(), ApiError> {
    match params.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::field(k.clone(), "unknown query parameter")),
        None => Ok(()),
    }
}

/// A query time as the contract accepts it (§5): an RFC 3339 time, an ISO-8601 time without an
/// offset (read as UTC) or a plain date (its midnight, UTC).
fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f") {
        return Some(t.and_utc());
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
}

fn time_param(
    params: &BTreeMap<String, String>,
    name: &str,
) -> Result<Option<DateTime<Utc>>, ApiError> {
    params
        .get(name)
        .map(|s| {
            parse_instant(s).ok_or_else(|| {
                ApiError::field(
                    name,
                    "must be a time like 2026-01-31T00:00:00Z, 2026-01-31T00:00:00 (UTC) or 2026-01-31",
                )
            })
        })
        .transpose()
}

/// A query date: a plain date, or the UTC date of a time given in any form [`parse_instant`]
/// reads.
fn date_param(
    params: &BTreeMap<String, String>,
    name: &str,
) -> Result<Option<NaiveDate>, ApiError> {
    params
        .get(name)
        .map(|s| {
            parse_instant(s)
                .map(|t| t.date_naive())
                .ok_or_else(|| ApiError::field(name, "must be a date like 2026-01-31 or a time"))
        })
        .transpose()
}

/// Days since the epoch (the store's day-bucket index).
fn day_index(date: NaiveDate) -> i64 {
    date.and_time(chrono::NaiveTime::MIN)
        .and_utc()
        .timestamp()
        .div_euclid(Granularity::Day.seconds())
}
