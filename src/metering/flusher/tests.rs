use super::*;
use crate::metering::wal::tests::{counts, record, setup, stored};

/// A rotation that an earlier flush began and the shutdown cut off has closed its segment; the
/// events logged after it are in the next segment. The next flush takes the carried rotation's
/// counts and rotates once more for the rest: both reach the store.
#[tokio::test]
async fn a_carried_rotation_is_taken_and_the_next_flush_rotates_again_for_what_came_after() {
    let s = setup();
    let metrics = Metrics::new().unwrap();
    let mut backlog = Backlog::new(MAX_PENDING_BUCKETS, &metrics);
    record(&s.meter, 3);
    let wal = Arc::clone(&s.wal);
    let cut_off = tokio::task::spawn_blocking(move || wal.rotate_blocking());
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while !cut_off.is_finished() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    ended.await.expect("the rotation ends");
    backlog.rotating = Some(cut_off);
    record(&s.meter, 2);

    assert!(flush_once(&s.meter, &*s.store, &metrics, &mut backlog).await);
    assert_eq!(stored(&s.store).await, counts(5));
    assert!(backlog.is_empty() && backlog.rotating.is_none());
}
