//! [`Silence`]: the one rule for "a peer has said nothing for too long", shared by every stream
//! the gateway waits on: a body either way (`proxy::body`, the route's `idle_timeout`), a write
//! to a client that stopped reading (`listener::watched_io`, the send stall), a WebSocket
//! tunnel (`proxy::tunnel`) and an HTTP/2 stream whose client stopped taking its answer
//! (`listener::streams`).
//!
//! The silence is timed only while the stream waits: the timer is armed when a poll first finds
//! nothing (a wait begins) and disarmed by the next poll that finds something. Time between
//! polls, while whoever reads the stream is busy elsewhere (a body's reader blocked on a client
//! that reads slowly, say), is not the peer's silence and does not count against it. A timer
//! that ran from the last progress instead would cut a live peer whose reader had paused.
//!
//! The timer is made the first time a wait begins and reset after that, so a stream that never
//! waits costs a branch per poll and no timer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// How long a stream may wait on its peer without progress.
pub struct Silence {
    limit: Duration,
    /// Made when a wait first begins; `waiting` while one is under way.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
}

impl Silence {
    /// A silence of at most `limit`.
    pub fn new(limit: Duration) -> Self {
        Silence {
            limit,
            timer: None,
            waiting: false,
        }
    }

    /// The longest silence allowed.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// A poll found something: the wait, if there was one, is over.
    pub fn progressed(&mut self) {
        self.waiting = false;
    }

    /// A poll found nothing: starts timing the wait if it has just begun, and says whether it
    /// has lasted the limit (if not, `cx` is woken when it will have).
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let timer = match &mut self.timer {
            Some(timer) if self.waiting => timer,
            Some(timer) => {
                timer.as_mut().reset(Instant::now() + limit);
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep(limit))),
        };
        self.waiting = true;
        timer.as_mut().poll(cx).is_ready()
    }

    /// [`progressed`](Self::progressed) when `polled` is ready, else
    /// [`expired`](Self::expired): `None` while the stream may go on waiting.
    pub fn watch<T>(&mut self, polled: &Poll<T>, cx: &mut Context<'_>) -> Option<Expired> {
        if polled.is_ready() {
            self.progressed();
            None
        } else if self.expired(cx) {
            Some(Expired(self.limit))
        } else {
            None
        }
    }
}

/// The peer said nothing for the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("nothing for {0:?}")]
pub struct Expired(pub Duration);

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(1);

    /// Polls `silence` as a stream that found nothing would, once, without waiting.
    async fn wait_once(silence: &mut Silence) -> bool {
        poll_fn(|cx| Poll::Ready(silence.expired(cx))).await
    }

    /// Polls `silence` as a stream that finds nothing until the limit ends the wait.
    async fn wait_out(silence: &mut Silence) {
        poll_fn(|cx| {
            if silence.expired(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_after_the_limit_from_its_start() {
        let mut silence = Silence::new(LIMIT);
        let started = Instant::now();
        wait_out(&mut silence).await;
        assert_eq!(started.elapsed(), LIMIT);
    }

    /// Polls that find nothing again and again within one wait do not push its end back.
    #[tokio::test(start_paused = true)]
    async fn polls_within_one_wait_keep_its_start() {
        let mut silence = Silence::new(LIMIT);
        let started = Instant::now();
        for _ in 0..9 {
            assert!(!wait_once(&mut silence).await);
            tokio::time::sleep(LIMIT / 10).await;
        }
        wait_out(&mut silence).await;
        assert_eq!(started.elapsed(), LIMIT);
    }

    /// The reader's pause after a progress is not the peer's silence: a wait that begins two
    /// limits after the last progress still gets the whole limit.
    #[tokio::test(start_paused = true)]
    async fn time_between_polls_does_not_count() {
        let mut silence = Silence::new(LIMIT);
        assert!(!wait_once(&mut silence).await);
        silence.progressed();
        tokio::time::sleep(LIMIT * 2).await;
        let started = Instant::now();
        assert!(!wait_once(&mut silence).await, "a new wait began expired");
        wait_out(&mut silence).await;
        assert_eq!(started.elapsed(), LIMIT);
    }

    #[tokio::test(start_paused = true)]
    async fn watch_passes_progress_and_reports_the_end_of_a_wait() {
        let mut silence = Silence::new(LIMIT);
        let found: Poll<()> = Poll::Ready(());
        let nothing: Poll<()> = Poll::Pending;
        let watched = poll_fn(|cx| Poll::Ready(silence.watch(&found, cx))).await;
        assert_eq!(watched, None);
        let watched = poll_fn(|cx| Poll::Ready(silence.watch(&nothing, cx))).await;
        assert_eq!(watched, None);
        tokio::time::sleep(LIMIT).await;
        let watched = poll_fn(|cx| Poll::Ready(silence.watch(&nothing, cx))).await;
        assert_eq!(watched, Some(Expired(LIMIT)));
    }
}
