use super::*;
use crate::metering::{Meter, Outcome, WallClock};
use crate::store::embedded::EmbeddedStore;
use crate::store::{Granularity, SharedStore, UsageCounts};

const MINUTE: i64 = 29_000_000;

/// A log and a store in a new directory, and a meter writing to the log.
pub(in crate::metering) struct Setup {
    _dir: tempfile::TempDir,
    pub log_dir: PathBuf,
    pub store: SharedStore,
    pub wal: Arc<Wal>,
    pub meter: Meter,
}

pub(in crate::metering) fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("usage-wal");
    let store: SharedStore = Arc::new(EmbeddedStore::open(&dir.path().join("t.db")).unwrap());
    let wal = Wal::open(&log_dir, Duration::from_millis(5)).unwrap();
    let meter = Meter::new(WallClock::System).with_wal(Arc::clone(&wal));
    Setup {
        _dir: dir,
        log_dir,
        store,
        wal,
        meter,
    }
}

/// `n` requests of key_a at MINUTE, each with 10 bytes in and 100 out.
pub(in crate::metering) fn record(meter: &Meter, n: u64) {
    let cell = meter.cell(&Arc::from("key_a"), &Arc::from("acc_a"));
    for i in 0..n {
        let ms = MINUTE * 60_000 + i64::try_from(i).unwrap();
        cell.record(ms, Outcome { status: 200 });
        cell.record_bytes(ms, 10, 100);
    }
}

pub(in crate::metering) fn counts(n: u64) -> UsageCounts {
    UsageCounts {
        requests: n,
        success: n,
        bytes_in: 10 * n,
        bytes_out: 100 * n,
        ..Default::default()
    }
}

pub(in crate::metering) async fn stored(store: &SharedStore) -> UsageCounts {
    let buckets = store
        .key_usage("key_a", Granularity::Minute, MINUTE, MINUTE + 1)
        .await
        .unwrap();
    buckets.first().map(|(_, c)| *c).unwrap_or_default()
}

#[test]
fn events_are_in_the_segment_and_in_the_rotated_counts_and_not_in_the_cell() {
    let s = setup();
    record(&s.meter, 3);
    let mut drained = Pending::default();
    s.meter.drain_into(&mut drained);
    assert!(drained.is_empty(), "the cell keeps nothing in this mode");
    let (seq, pending) = s.wal.rotate_blocking().unwrap();
    assert_eq!(seq, 1);
    assert_eq!(pending.batch()[0].counts, counts(3));
    let mut on_disk = Pending::default();
    let segment = SegmentId {
        writer: s.wal.writer(),
        seq,
    };
    usage_wal::read_segment(&s.log_dir, segment, |k, a, ms, e| {
        on_disk.add_event(&Arc::from(k), &Arc::from(a), ms, e);
    })
    .unwrap();
    assert_eq!(on_disk.batch(), pending.batch());
    assert!(
        s.wal.rotate_blocking().is_none(),
        "nothing new, nothing closed"
    );
    // Released segments are deleted by the writer.
    s.wal.release(seq);
    s.wal.close();
    assert!(usage_wal::segments(&s.log_dir).unwrap().is_empty());
}

#[tokio::test]
async fn a_segment_the_store_took_before_the_crash_is_not_counted_again_on_replay() {
    let s = setup();
    record(&s.meter, 5);
    let (seq, pending) = s.wal.rotate_blocking().unwrap();
    // The flusher's write is acknowledged; the crash comes before the segment is deleted.
    s.store
        .add_usage(s.wal.batch_id(seq), &pending.batch())
        .await
        .unwrap();
    let segment = SegmentId {
        writer: s.wal.writer(),
        seq,
    }
    .path_in(&s.log_dir);
    let copy = std::fs::read(&segment).unwrap();
    let replayed = replay(&s.log_dir, &*s.store).await.unwrap();
    assert_eq!(replayed.segments, 1);
    assert_eq!(stored(&s.store).await, counts(5));
    assert!(!segment.exists(), "a replayed segment is deleted");
    // Replayed twice (a crash during the first replay, after the store took it): still once.
    std::fs::write(&segment, copy).unwrap();
    replay(&s.log_dir, &*s.store).await.unwrap();
    assert_eq!(stored(&s.store).await, counts(5));
}

#[tokio::test]
async fn a_segment_the_store_never_got_is_counted_on_replay_once() {
    let s = setup();
    record(&s.meter, 4);
    let _ = s.wal.rotate_blocking().unwrap();
    record(&s.meter, 2);
    let _ = s.wal.rotate_blocking().unwrap();
    let replayed = replay(&s.log_dir, &*s.store).await.unwrap();
    assert_eq!(replayed.segments, 2);
    assert_eq!(stored(&s.store).await, counts(6));
    assert_eq!(replay(&s.log_dir, &*s.store).await.unwrap().segments, 0);
    assert_eq!(stored(&s.store).await, counts(6));
}

#[tokio::test]
async fn a_torn_last_record_is_skipped_and_replay_goes_on() {
    let s = setup();
    record(&s.meter, 3);
    s.wal.write_group(&mut s.wal.segment.lock());
    record(&s.meter, 2);
    let (seq, _) = s.wal.rotate_blocking().unwrap();
    let path = SegmentId {
        writer: s.wal.writer(),
        seq,
    }
    .path_in(&s.log_dir);
    let bytes = std::fs::read(&path).unwrap();
    // Cut the second group in the middle of its last record.
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let replayed = replay(&s.log_dir, &*s.store).await.unwrap();
    assert!(replayed.torn_bytes > 0);
    assert_eq!(replayed.corrupt, 0);
    assert_eq!(stored(&s.store).await, counts(3));
    assert!(!path.exists());
}

#[tokio::test]
async fn a_damaged_segment_is_moved_aside_after_its_intact_groups_are_replayed() {
    let s = setup();
    record(&s.meter, 3);
    s.wal.write_group(&mut s.wal.segment.lock());
    let first_end = std::fs::metadata(
        SegmentId {
            writer: s.wal.writer(),
            seq: 1,
        }
        .path_in(&s.log_dir),
    )
    .unwrap()
    .len();
    record(&s.meter, 2);
    s.wal.write_group(&mut s.wal.segment.lock());
    record(&s.meter, 1);
    let (seq, _) = s.wal.rotate_blocking().unwrap();
    let path = SegmentId {
        writer: s.wal.writer(),
        seq,
    }
    .path_in(&s.log_dir);
    let mut bytes = std::fs::read(&path).unwrap();
    // A flipped bit inside the second of three groups.
    bytes[first_end as usize + 12] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let replayed = replay(&s.log_dir, &*s.store).await.unwrap();
    assert_eq!(replayed.corrupt, 1);
    assert_eq!(stored(&s.store).await, counts(3));
    assert!(!path.exists());
    let aside: Vec<_> = std::fs::read_dir(&s.log_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".corrupt"))
        .collect();
    assert_eq!(aside.len(), 1);
}

#[test]
fn the_writer_thread_puts_events_on_disk_within_its_interval() {
    let s = setup();
    s.wal.start().unwrap();
    record(&s.meter, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let path = SegmentId {
        writer: s.wal.writer(),
        seq: 1,
    }
    .path_in(&s.log_dir);
    while std::fs::metadata(&path).map_or(0, |m| m.len()) <= 24 {
        assert!(std::time::Instant::now() < deadline, "never written");
        std::thread::sleep(Duration::from_millis(1));
    }
    s.wal.close();
    assert!(
        Wal::open(&s.log_dir, Duration::from_millis(5)).is_ok(),
        "close lets go of the lock"
    );
}
