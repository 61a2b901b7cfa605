//! The one record step, like pingora's `logging` phase: every request the proxy answers or
//! sends upstream is counted exactly once, in `requests_total` and, when a key was identified,
//! in the key's usage (requests that name no valid key are not metered). Nothing else in the
//! proxy touches those counters.
//!
//! A request's [`Ticket`] is filled in as the stages learn what it is metered under: its route
//! (`-` until one matched) and its key (once identified). A refusal, wherever it came from, is
//! counted from the ticket. A request that goes upstream is counted by its [`Record`] instead,
//! made from the ticket just before it is sent; the record travels with the request: held by the
//! send step while the upstream's head is awaited, then by the response body. Whoever holds it
//! last counts it when it is dropped, so a client that hangs up (and so has hyper drop the
//! handler's future or the body) cannot get upstream work done uncounted:
//!
//! | how it ended | counted by | status counted | `outcome` |
//! |---|---|---|---|
//! | refused by the gateway (before going upstream, or after: 502, 504, 400, 413, a 101 nobody asked for) | [`Ticket::refused`] | the refusal's | its code; a 429 also in `rate_limited_total` |
//! | the body was sent, or the client left during it | the [`Record`], dropped | the upstream's | `forwarded` |
//! | upgraded: the upstream's 101 became a tunnel | [`Record::upgraded`], at once | 101 | `forwarded` |
//! | the upstream's body stalled past `idle_timeout` and was cut | the [`Record`], dropped | 504 | `upstream_timeout` |
//! | the client left before the upstream's head arrived | the [`Record`], dropped | 499 | `client_closed` |
//!
//! Byte counts are added where the bytes are seen (the two bodies, the tunnel), through a
//! [`UsageSink`].

use std::sync::Arc;

use super::route::Route;
use crate::auth::cache::KeyRef;
use crate::auth::extract::Source;
use crate::limits::LimitSnapshot;
use crate::metering::{KeyState, Outcome, WallClock};
use crate::metrics::{Metrics, RouteCounters};
use crate::refusal::Refusal;

/// The status a request is metered with when its client went away before the upstream's head
/// arrived (nginx's "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

/// What a request is metered under, filled in by the stages as they learn it. Borrows its route
/// and moves its key in, so keeping one costs no allocation and no reference count.
#[derive(Default)]
pub struct Ticket<'a> {
    /// The matched route; `None` (metered as route `-`) until one matched.
    route: Option<&'a Route>,
    /// The key, once the credential named one.
    key: Option<Identified>,
}

/// A request identified to a key.
pub struct Identified {
    /// The key.
    pub key: KeyRef,
    /// The request's time (ms since the epoch) as the key's checks read it; the minute its usage
    /// counts in.
    pub now_ms: i64,
    /// The header the credential came in, removed before forwarding.
    pub source: Source,
    /// The key's windows once they were checked (after spending this request, or the 429's),
    /// for the answer's limit headers; `None` before.
    pub limits: Option<LimitSnapshot>,
}

/// Where byte counts go: the key's state, read against the meter's clock.
pub struct UsageSink {
    state: Arc<KeyState>,
    clock: WallClock,
}

/// One request sent upstream, counted once: when dropped, or at [`Record::upgraded`].
pub struct Record {
    counters: Arc<RouteCounters>,
    /// The key's state and the request's minute (ms), when a key was identified.
    usage: Option<(UsageSink, i64)>,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent or being sent; no head yet.
    Waiting,
    /// The upstream's head arrived with this status.
    Answered(u16),
    /// The upstream's body stalled and was cut.
    Cut,
    /// Counted elsewhere, or already.
    Done,
}

// === impl Ticket ===

impl<'a> Ticket<'a> {
    /// The request matched `route`.
    pub fn routed(&mut self, route: &'a Route) {
        self.route = Some(route);
    }

    /// The matched route, if any.
    pub fn route(&self) -> Option<&'a Route> {
        self.route
    }

    /// The request is `key`'s from here on, whatever its outcome; read at `now_ms`, presented in
    /// `source`.
    pub fn identified(&mut self, key: KeyRef, now_ms: i64, source: Source) -> &mut Identified {
        self.key.insert(Identified {
            key,
            now_ms,
            source,
            limits: None,
        })
    }

    /// The key, once identified.
    pub fn key(&self) -> Option<&Identified> {
        self.key.as_ref()
    }

    /// Where the bytes of the request's body go, when a key was identified.
    pub fn usage_sink(&self, clock: &WallClock) -> Option<UsageSink> {
        self.key.as_ref().map(|i| i.usage_sink(clock))
    }

    /// The record of the request about to be sent upstream on `route`: from here on it counts the
    /// request, unless [`Record::refused`] hands it back to [`Ticket::refused`].
    pub fn forwarding(&self, route: &Route, clock: &WallClock) -> Record {
        Record {
            counters: Arc::clone(&route.counters),
            usage: self.key.as_ref().map(|i| (i.usage_sink(clock), i.now_ms)),
            state: State::Waiting,
        }
    }

    /// Counts a request the gateway answered with `refusal`: by its code under the route (`-`
    /// before one matched), by window when rate-limited, and in the key's usage once identified.
    pub fn refused(&self, metrics: &Metrics, refusal: Refusal) {
        let (status, code) = refusal.status_and_code();
        let route = self.route.map_or("-", |r| r.name.as_str());
        metrics.refused(route, code, status.as_u16());
        if let Refusal::RateLimited { window, .. } = refusal {
            metrics.rate_limited(window.name(), false);
        }
        if let Some(i) = &self.key {
            let status = status.as_u16();
            i.key.state.record(i.now_ms, Outcome { status });
        }
    }
}

// === impl Identified ===

impl Identified {
    fn usage_sink(&self, clock: &WallClock) -> UsageSink {
        UsageSink {
            state: Arc::clone(&self.key.state),
            clock: clock.clone(),
        }
    }
}

// === impl UsageSink ===

impl UsageSink {
    /// Adds bytes received from the client (`bytes_in`) and sent to it (`bytes_out`).
    pub fn add(&self, bytes_in: u64, bytes_out: u64) {
        self.state
            .record_bytes(self.clock.now_ms(), bytes_in, bytes_out);
    }
}

// === impl Record ===

impl Record {
    /// The upstream's head arrived.
    pub fn answered(&mut self, status: u16) {
        self.state = State::Answered(status);
    }

    /// The upstream's body stalled and was cut.
    pub fn cut(&mut self) {
        self.state = State::Cut;
    }

    /// The gateway answers with a refusal instead, which [`Ticket::refused`] counts.
    pub fn refused(mut self) {
        self.state = State::Done;
    }

    /// Adds the response body's bytes to the key's usage.
    pub fn bytes_out(&self, n: u64) {
        if let Some((sink, _)) = &self.usage {
            sink.add(0, n);
        }
    }

    /// The answer became a tunnel, which outlives it: counts the request now, and gives the
    /// tunnel the key's sink for the bytes that pass.
    pub fn upgraded(mut self) -> Option<UsageSink> {
        self.count();
        self.usage.take().map(|(sink, _)| sink)
    }

    fn count(&mut self) {
        let status = match self.state {
            State::Done => return,
            State::Waiting => {
                self.counters.client_closed();
                CLIENT_CLOSED
            }
            State::Answered(status) => {
                self.counters.inc(status);
                status
            }
            State::Cut => {
                self.counters.body_stalled();
                504
            }
        };
        self.state = State::Done;
        if let Some((sink, now_ms)) = &self.usage {
            sink.state.record(*now_ms, Outcome { status });
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.count();
    }
}

#[cfg(test)]
mod tests;
