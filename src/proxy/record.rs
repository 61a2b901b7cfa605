//! The one record step, like pingora's `logging` phase: a request that the proxy forwards — or
//! starts to — is counted exactly once, in `requests_total` and, when a key was identified, in
//! the key's usage, whatever happens to its client afterwards.
//!
//! A [`Record`] is made before the request goes upstream and travels with it: held by the
//! forward step while the upstream's head is awaited, then by the response body. Whoever holds
//! it last counts it when it is dropped, so a client that hangs up (and so has hyper drop the
//! handler's future or the body) cannot get upstream work done uncounted:
//!
//! | how it ended | status counted | `outcome` |
//! |---|---|---|
//! | the body was sent, or the client left during it | the upstream's | `forwarded` |
//! | the upstream's body stalled past `idle_timeout` and was cut | 504 | `upstream_timeout` |
//! | the client left before the upstream's head arrived | 499 | `client_closed` |
//! | the gateway refused it after all (502, 504, 400, 413) | — | [`Record::refused`]: the refusal step counts it |

use std::sync::Arc;

use super::body::UsageSink;
use crate::metering::Outcome;
use crate::metrics::RouteCounters;

/// The status a request is metered with when its client went away before the upstream's head
/// arrived (nginx's "client closed request").
pub const CLIENT_CLOSED: u16 = 499;

/// One forwarded request, counted once when dropped.
pub struct Record {
    counters: Arc<RouteCounters>,
    /// The key's usage cell and the request's minute (ms), when a key was identified.
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

// === impl Record ===

impl Record {
    /// A request about to be sent upstream, for `usage` (the key's cell and the request's time)
    /// when a key was identified.
    pub fn new(counters: Arc<RouteCounters>, usage: Option<(UsageSink, i64)>) -> Self {
        Record {
            counters,
            usage,
            state: State::Waiting,
        }
    }

    /// The upstream's head arrived.
    pub fn answered(&mut self, status: u16) {
        self.state = State::Answered(status);
    }

    /// The upstream's body stalled and was cut.
    pub fn cut(&mut self) {
        self.state = State::Cut;
    }

    /// The gateway answers with a refusal instead, which the refusal step counts.
    pub fn refused(mut self) {
        self.state = State::Done;
    }

    /// Adds the response body's bytes to the key's usage.
    pub fn bytes_out(&self, n: u64) {
        if let Some((sink, _)) = &self.usage {
            sink.cell.record_bytes(sink.clock.now_ms(), 0, n);
        }
    }

    /// Counts the request now, instead of when dropped (an upgrade: its tunnel outlives it).
    pub fn finish(mut self) {
        self.count();
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
            sink.cell.record(*now_ms, Outcome { status });
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.count();
    }
}
