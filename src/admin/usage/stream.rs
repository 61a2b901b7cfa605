//! A key's buckets as a streamed JSON answer, so that memory stays bounded whatever range an
//! account key asks for (issue 21, item 7: 40 reads of 200,000 minute buckets, 27 MB of JSON
//! each, held whole, took the process to 1.14 GB).
//!
//! The store is read a window of [`WINDOW_BUCKETS`] buckets at a time; each window's buckets,
//! zeros made on the way by [`Filler`], become one chunk of the body. A task makes the chunks
//! and hands them over a channel of one, so a read holds at most a window of stored buckets and
//! three chunks (the one being made, the one in the channel, the one being written), whatever
//! the range. The bytes are those that serializing the whole answer at once gave.
//!
//! The first window is read before the answer's head is sent, so that a store that cannot be
//! reached is still a 503 `store_unavailable`; a failure after that can only cut the body (the
//! status is gone), and is logged. A client that takes no chunk for [`STALL_LIMIT`] has its
//! answer cut, which frees what the read holds (its heavy-read permit among it).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use crate::metering::bucket::{Filler, Interval, Window};
use crate::store::{StoreError, Usage, UsageCounts};

/// Buckets per store read and per chunk: a minute chunk is about 140 KB of JSON, and a read
/// holds at most 1,024 stored buckets (31 times that for months, which only a day retention of
/// decades could fill). 200,000 buckets take 196 reads.
pub(crate) const WINDOW_BUCKETS: u64 = 1_024;

/// How long a chunk waits for the client to take the one before it; then the answer is cut.
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// `{"key_id","interval","from","to", …}`: the answer's fields before `buckets`, in order.
#[derive(Serialize)]
struct Head<'a> {
    key_id: &'a str,
    interval: &'static str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

/// One bucket of a key's usage.
#[derive(Serialize)]
pub(crate) struct Bucket {
    bucket: DateTime<Utc>,
    request_count: u64,
    success_count: u64,
    error_count: u64,
    rate_limited_count: u64,
    bytes_in: u64,
    bytes_out: u64,
}

/// What a streamed read needs: where to read, what is left to make, and the permit it holds.
pub(crate) struct BucketStream {
    store: Arc<dyn Usage>,
    key_id: String,
    interval: Interval,
    filler: Filler,
    /// How long each window's read may take: the answer's deadline (`AdminState`'s).
    deadline: Duration,
    /// Whether a bucket has been written (the next one is preceded by a comma).
    written: bool,
    /// A heavy read's place among [`super::super::MAX_HEAVY_USAGE_READS`], held to the end.
    _permit: Option<OwnedSemaphorePermit>,
}

// === impl Bucket ===

impl Bucket {
    fn new(bucket: DateTime<Utc>, c: UsageCounts) -> Self {
        Bucket {
            bucket,
            request_count: c.requests,
            success_count: c.success,
            error_count: c.error,
            rate_limited_count: c.rate_limited,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
        }
    }
}

// === impl BucketStream ===

impl BucketStream {
    /// A read of `key_id`'s buckets over `filler`'s range, each window's read bounded by
    /// `deadline`, holding `permit` until it ends.
    pub(crate) fn new(
        store: Arc<dyn Usage>,
        key_id: String,
        interval: Interval,
        filler: Filler,
        deadline: Duration,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        BucketStream {
            store,
            key_id,
            interval,
            filler,
            deadline,
            written: false,
            _permit: permit,
        }
    }

    /// The answer: its head and first window read now, the rest streamed by a task.
    pub(crate) async fn respond(
        mut self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<Response, StoreError> {
        let mut first = head(&self.key_id, self.interval, from, to);
        if let Some((window, stored)) = self.next_window().await? {
            self.write(&window, &stored, &mut first);
        }
        if self.filler.remaining() == 0 {
            first.extend_from_slice(b"]}");
            return Ok(json_response(Body::from(first)));
        }
        let (tx, rx) = mpsc::channel::<Result<Bytes, StoreError>>(1);
        tokio::spawn(self.run(Bytes::from(first), tx));
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        Ok(json_response(Body::from_stream(chunks)))
    }

    /// Sends `first`, then a chunk per window, then the closing `]}`; stops when the client
    /// is gone or stalled, or the store fails (the error cuts the body).
    async fn run(mut self, first: Bytes, tx: mpsc::Sender<Result<Bytes, StoreError>>) {
        let mut next = Ok(first);
        loop {
            let failed = next.is_err();
            if tx.send_timeout(next, STALL_LIMIT).await.is_err() || failed {
                return;
            }
            next = match self.next_window().await {
                Ok(Some((window, stored))) => {
                    let mut chunk = Vec::new();
                    self.write(&window, &stored, &mut chunk);
                    if self.filler.remaining() == 0 {
                        chunk.extend_from_slice(b"]}");
                    }
                    Ok(Bytes::from(chunk))
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, key_id = %self.key_id, "admin: a streamed usage answer was cut: the store failed");
                    Err(e)
                }
            };
        }
    }

    /// The next window and its stored buckets (ascending); `None` when every bucket is made.
    async fn next_window(&self) -> Result<Option<(Window, Vec<(i64, UsageCounts)>)>, StoreError> {
        let Some(window) = self.filler.next_window(WINDOW_BUCKETS) else {
            return Ok(None);
        };
        // Bounded as the answer's head is: past the deadline, on a hung disk, the body is cut
        // and the heavy read's place given back.
        let read = self
            .store
            .key_usage(&self.key_id, self.interval.source(), window.lo, window.hi);
        let mut stored = tokio::time::timeout(self.deadline, read)
            .await
            .map_err(|_| {
                StoreError::Unavailable(format!("no answer from the store in {:?}", self.deadline))
            })??;
        // The store answers in order; sorting sorted input is one pass.
        stored.sort_by_key(|(index, _)| *index);
        Ok(Some((window, stored)))
    }

    /// Appends the window's buckets to `out`, comma-separated from those before.
    fn write(&mut self, window: &Window, stored: &[(i64, UsageCounts)], out: &mut Vec<u8>) {
        let written = &mut self.written;
        self.filler.fill(window, stored, |start, counts| {
            if std::mem::replace(written, true) {
                out.push(b',');
            }
            // Serializing plain numbers and a time into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, &Bucket::new(start, counts));
        });
    }
}

// === functions ===

/// `{"key_id":…,"interval":…,"from":…,"to":…,"buckets":[`.
fn head(key_id: &str, interval: Interval, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let _ = serde_json::to_writer(
        &mut out,
        &Head {
            key_id,
            interval: interval.name(),
            from,
            to,
        },
    );
    // Reopen the object that serde closed, for the list.
    out.pop();
    out.extend_from_slice(b",\"buckets\":[");
    out
}

fn json_response(body: Body) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http_body_util::BodyExt;

    use super::*;
    use crate::metering::bucket;
    use crate::store::embedded::EmbeddedStore;
    use crate::store::{BatchId, SharedStore, UsageDelta};

    /// The answer as it was made before streaming: one struct serialized whole.
    #[derive(Serialize)]
    struct Whole {
        key_id: String,
        interval: &'static str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        buckets: Vec<Bucket>,
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn the_streamed_answer_is_the_whole_answer_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(EmbeddedStore::open(&dir.path().join("db")).unwrap());
        let base = t("2026-03-02T00:00:00Z").timestamp() / 60;
        // Counted minutes spread over 40 days, a few of them inside each window of minutes.
        let deltas: Vec<UsageDelta> = (0..400)
            .map(|i| UsageDelta {
                key_id: "key_a".into(),
                account_id: "acc_a".into(),
                minute: base + i * 143,
                counts: UsageCounts {
                    requests: 1 + i as u64 % 5,
                    success: 1,
                    error: i as u64 % 5,
                    rate_limited: i as u64 % 2,
                    bytes_in: 7 * i as u64,
                    bytes_out: 11 * i as u64,
                },
                last_used_ms: (base + i * 143) * 60_000,
            })
            .collect();
        store
            .add_usage(BatchId { writer: 1, seq: 1 }, &deltas)
            .await
            .unwrap();
        for (interval, from, to) in [
            (
                Interval::Minute,
                "2026-03-01T23:58:30Z",
                "2026-03-05T00:00:00Z",
            ),
            (
                Interval::Minute,
                "2026-03-02T00:00:00Z",
                "2026-03-02T00:00:00Z",
            ),
            (
                Interval::Minute,
                "2026-03-02T00:00:00Z",
                "2026-03-02T00:05:00Z",
            ),
            (
                Interval::Hour,
                "2026-03-01T00:00:00Z",
                "2026-06-01T00:00:00Z",
            ),
            (
                Interval::Day,
                "2023-01-01T00:00:00Z",
                "2026-06-01T00:00:00Z",
            ),
            (
                Interval::Week,
                "2020-01-01T00:00:00Z",
                "2026-06-01T00:00:00Z",
            ),
            (
                Interval::Month,
                "1990-01-01T00:00:00Z",
                "2026-04-15T12:00:00Z",
            ),
        ] {
            let (from, to) = (t(from), t(to));
            let (lo, hi) = bucket::source_range(interval, from, to);
            let stored = store
                .key_usage("key_a", interval.source(), lo, hi)
                .await
                .unwrap();
            let whole = Whole {
                key_id: "key_a".to_owned(),
                interval: interval.name(),
                from,
                to,
                buckets: bucket::fill(interval, from, to, &stored)
                    .unwrap()
                    .into_iter()
                    .map(|(start, c)| Bucket::new(start, c))
                    .collect(),
            };
            let filler = Filler::new(interval, from, to).unwrap();
            let answer = BucketStream::new(
                store.clone(),
                "key_a".to_owned(),
                interval,
                filler,
                crate::admin::ANSWER_DEADLINE,
                None,
            )
            .respond(from, to)
            .await
            .unwrap();
            assert_eq!(answer.headers()[header::CONTENT_TYPE], "application/json");
            let body = answer.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                String::from_utf8_lossy(&body),
                serde_json::to_string(&whole).unwrap(),
                "{interval:?} {from} {to}"
            );
        }
    }
}
