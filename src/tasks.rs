//! [`finish`]: the end of a group of background tasks at shutdown (HTTP/2 streams, WebSocket
//! tunnels, admin changes), waited for within a bound so that none can hold the stop.

use std::time::Duration;

use tokio_util::task::TaskTracker;

/// Closes `tracker` and waits, `deadline` at most, for its tasks to end; on time `Ok`, else the
/// number of tasks still running, for the caller's log.
pub async fn finish(tracker: &TaskTracker, deadline: Duration) -> Result<(), usize> {
    tracker.close();
    tokio::time::timeout(deadline, tracker.wait())
        .await
        .map_err(|_| tracker.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn tasks_that_end_in_time_are_waited_for_and_others_counted() {
        let tracker = TaskTracker::new();
        tracker.spawn(tokio::time::sleep(Duration::from_secs(1)));
        assert_eq!(finish(&tracker, Duration::from_secs(2)).await, Ok(()));
        let tracker = TaskTracker::new();
        tracker.spawn(std::future::pending::<()>());
        tracker.spawn(tokio::time::sleep(Duration::from_secs(1)));
        assert_eq!(finish(&tracker, Duration::from_secs(2)).await, Err(1));
    }
}
