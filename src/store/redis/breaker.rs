//! The circuit breaker in front of the Redis connection, so that a hung Redis is treated like a
//! dead one: after [`TRIP_AFTER`] round trips in a row end in an outage (no answer within the
//! deadline, a refused or dropped connection, a cluster without a master) it **opens**, and
//! every call fails at once with [`StoreError::Unavailable`] without touching the socket. After
//! [`COOL_DOWN`] the next call goes through as the one **probe** (half-open) while the others
//! still fail at once; the probe's success closes the breaker, its failure opens it for another
//! cool-down. An error that Redis answered (a script's error, a wrong type) is an answer: Redis is
//! there, so it counts as a success here.
//!
//! The state is exported as the gauge `tollgate_store_breaker_open` (1 while open or probing)
//! and each opening and closing is logged once. Knows nothing of commands: `conn` runs every
//! round trip through [`Breaker::call`].

use std::future::Future;
use std::time::Duration;

use ::redis::{ErrorKind, RedisError};
use parking_lot::Mutex;
use prometheus::IntGauge;
use tokio::time::Instant;

use super::conn::redis_err;
use crate::store::StoreError;

/// Consecutive outages that open the breaker: one slow answer is a blip, three in a row (at the
/// request path's 50 ms deadline, 150 ms of waiting at most) an outage.
pub(super) const TRIP_AFTER: u32 = 3;
/// How long an open breaker refuses before it lets one probe through: Redis coming back is
/// noticed within about this, and a hung Redis sees at most one call per cool-down.
pub(super) const COOL_DOWN: Duration = Duration::from_secs(1);

/// See the module documentation. Shared by every handle of one connection.
pub(super) struct Breaker {
    inner: Mutex<Inner>,
}

struct Inner {
    state: State,
    /// `tollgate_store_breaker_open`, once the store is given the registry's gauge.
    gauge: Option<IntGauge>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Calls go through; `failures` outages in a row so far.
    Closed { failures: u32 },
    /// Calls fail at once until `until`.
    Open { until: Instant },
    /// One call is out as the probe; the others fail at once.
    Probing,
}

/// What a call is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Call,
    Probe,
}

/// An admitted probe: if its call is dropped before it ends (the caller went away), the breaker
/// goes back to open with the cool-down already over, so that the next call probes.
struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    settled: bool,
}

// === impl Breaker ===

impl Breaker {
    /// A closed breaker.
    pub(super) fn new() -> Breaker {
        Breaker {
            inner: Mutex::new(Inner {
                state: State::Closed { failures: 0 },
                gauge: None,
            }),
        }
    }

    /// Reports the state in `gauge` from now on.
    pub(super) fn set_gauge(&self, gauge: IntGauge) {
        let mut inner = self.inner.lock();
        gauge.set(i64::from(!matches!(inner.state, State::Closed { .. })));
        inner.gauge = Some(gauge);
    }

    /// Runs one round trip through the breaker: refused at once while open, else awaited and
    /// its outcome noted.
    pub(super) async fn call<T>(
        &self,
        round_trip: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        let pass = self.admit()?;
        let mut guard = (pass == Pass::Probe).then_some(ProbeGuard {
            breaker: self,
            settled: false,
        });
        let result = round_trip.await;
        let outage = result.as_ref().err().is_some_and(is_outage);
        if let Some(guard) = &mut guard {
            guard.settled = true;
        }
        self.settle(pass, outage);
        result.map_err(|e| redis_err(&e))
    }

    /// Whether calls are refused or probing now.
    #[cfg(test)]
    fn is_open(&self) -> bool {
        !matches!(self.inner.lock().state, State::Closed { .. })
    }

    fn admit(&self) -> Result<Pass, StoreError> {
        let mut inner = self.inner.lock();
        match inner.state {
            State::Closed { .. } => Ok(Pass::Call),
            State::Open { until } if Instant::now() >= until => {
                inner.state = State::Probing;
                Ok(Pass::Probe)
            }
            State::Open { .. } | State::Probing => Err(StoreError::Unavailable(format!(
                "redis circuit breaker open: {TRIP_AFTER} calls in a row failed; \
                 one call a {}s tries again",
                COOL_DOWN.as_secs()
            ))),
        }
    }

    fn settle(&self, pass: Pass, outage: bool) {
        let mut inner = self.inner.lock();
        let next = match (pass, inner.state, outage) {
            (Pass::Probe, _, true) => State::Open {
                until: Instant::now() + COOL_DOWN,
            },
            (Pass::Probe, _, false) => State::Closed { failures: 0 },
            (Pass::Call, State::Closed { failures }, true) if failures + 1 >= TRIP_AFTER => {
                State::Open {
                    until: Instant::now() + COOL_DOWN,
                }
            }
            (Pass::Call, State::Closed { failures }, true) => State::Closed {
                failures: failures + 1,
            },
            (Pass::Call, State::Closed { .. }, false) => State::Closed { failures: 0 },
            // A call let through before the breaker opened: the probe decides, not it.
            (Pass::Call, state, _) => state,
        };
        inner.transition(next);
    }

    fn probe_abandoned(&self) {
        let mut inner = self.inner.lock();
        if inner.state == State::Probing {
            inner.transition(State::Open {
                until: Instant::now(),
            });
        }
    }
}

// === impl Inner ===

impl Inner {
    fn transition(&mut self, next: State) {
        let was_closed = matches!(self.state, State::Closed { .. });
        let now_closed = matches!(next, State::Closed { .. });
        self.state = next;
        if was_closed == now_closed {
            return;
        }
        if let Some(gauge) = &self.gauge {
            gauge.set(i64::from(!now_closed));
        }
        if now_closed {
            tracing::info!("redis circuit breaker closed: a probe call succeeded");
        } else {
            tracing::warn!(
                failures = TRIP_AFTER,
                cool_down_ms = COOL_DOWN.as_millis() as u64,
                "redis circuit breaker open: store calls fail at once, one probe per cool-down"
            );
        }
    }
}

// === impl ProbeGuard ===

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.probe_abandoned();
        }
    }
}

/// Whether an error means Redis is not there (as opposed to an answer that is an error).
fn is_outage(e: &RedisError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::IoError
            | ErrorKind::BusyLoadingError
            | ErrorKind::TryAgain
            | ErrorKind::ClusterDown
            | ErrorKind::MasterDown
            | ErrorKind::ClusterConnectionNotFound
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outage() -> RedisError {
        RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
    }

    async fn fail(b: &Breaker) -> Result<(), StoreError> {
        b.call(async { Err::<(), _>(outage()) }).await
    }

    async fn succeed(b: &Breaker) -> Result<(), StoreError> {
        b.call(async { Ok::<(), RedisError>(()) }).await
    }

    /// A round trip that would hang: refused calls never start it.
    async fn hang(b: &Breaker) -> Result<(), StoreError> {
        b.call(std::future::pending::<Result<(), RedisError>>())
            .await
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_outages_and_then_fails_without_calling() {
        let b = Breaker::new();
        for _ in 0..TRIP_AFTER - 1 {
            assert!(fail(&b).await.is_err());
        }
        assert!(!b.is_open(), "opened before {TRIP_AFTER} failures");
        assert!(fail(&b).await.is_err());
        assert!(b.is_open());
        // A hanging round trip is not even started: the call fails at once.
        let refused = tokio::time::timeout(Duration::from_millis(1), hang(&b)).await;
        assert!(matches!(refused, Ok(Err(StoreError::Unavailable(_)))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count_and_an_answered_error_is_a_success() {
        let b = Breaker::new();
        for _ in 0..5 {
            for _ in 0..TRIP_AFTER - 1 {
                let _ = fail(&b).await;
            }
            succeed(&b).await.unwrap();
        }
        for _ in 0..TRIP_AFTER {
            let answered = RedisError::from((ErrorKind::ResponseError, "ERR", "bad".to_owned()));
            assert!(b.call(async { Err::<(), _>(answered) }).await.is_err());
        }
        assert!(!b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_cool_down_one_probe_goes_through_and_its_success_closes() {
        let b = Breaker::new();
        for _ in 0..TRIP_AFTER {
            let _ = fail(&b).await;
        }
        tokio::time::advance(COOL_DOWN - Duration::from_millis(1)).await;
        assert!(succeed(&b).await.is_err(), "refused during the cool-down");
        tokio::time::advance(Duration::from_millis(1)).await;

        // The probe hangs; meanwhile every other call is refused.
        let probe = b.call(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<(), RedisError>(())
        });
        let others = async {
            tokio::task::yield_now().await;
            succeed(&b).await
        };
        let (probe, other) = tokio::join!(probe, others);
        assert!(other.is_err(), "a second call while probing");
        assert!(probe.is_ok());
        assert!(!b.is_open(), "the probe's success closes");
        succeed(&b).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_for_another_cool_down() {
        let b = Breaker::new();
        for _ in 0..TRIP_AFTER {
            let _ = fail(&b).await;
        }
        tokio::time::advance(COOL_DOWN).await;
        assert!(fail(&b).await.is_err());
        assert!(b.is_open());
        assert!(succeed(&b).await.is_err(), "a new cool-down");
        tokio::time::advance(COOL_DOWN).await;
        succeed(&b).await.unwrap();
        assert!(!b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_lets_the_next_call_probe() {
        let b = Breaker::new();
        for _ in 0..TRIP_AFTER {
            let _ = fail(&b).await;
        }
        tokio::time::advance(COOL_DOWN).await;
        let abandoned = tokio::time::timeout(Duration::from_millis(50), hang(&b)).await;
        assert!(abandoned.is_err(), "the probe was cut off by its caller");
        succeed(&b).await.unwrap();
        assert!(!b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn the_gauge_follows_opening_and_closing() {
        let b = Breaker::new();
        let gauge = IntGauge::new("g", "g").unwrap();
        b.set_gauge(gauge.clone());
        assert_eq!(gauge.get(), 0);
        for _ in 0..TRIP_AFTER {
            let _ = fail(&b).await;
        }
        assert_eq!(gauge.get(), 1);
        tokio::time::advance(COOL_DOWN).await;
        succeed(&b).await.unwrap();
        assert_eq!(gauge.get(), 0);
    }
}
