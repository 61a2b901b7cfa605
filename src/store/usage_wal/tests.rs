use super::*;

const WRITER: u64 = 0xfeed;

fn id(seq: u64) -> SegmentId {
    SegmentId {
        writer: WRITER,
        seq,
    }
}

fn response(status: u16) -> UsageEvent {
    UsageEvent::Response { status }
}

/// A segment of two groups: (key_a 200, key_b 429) then (key_a bytes 10/20, key_b 500).
fn two_groups(dir: &Path) -> (u64, u64) {
    let (a, b): (Arc<str>, Arc<str>) = (Arc::from("key_a"), Arc::from("key_b"));
    let mut file = SegmentFile::create(dir, id(7)).unwrap();
    let mut enc = GroupEncoder::default();
    enc.push(&a, "acc_1", 1_000, response(200));
    enc.push(&b, "acc_2", 1_001, response(429));
    file.append(enc.frame()).unwrap();
    let first_end = fs::metadata(id(7).path_in(dir)).unwrap().len();
    enc.next_group();
    enc.push(
        &a,
        "acc_1",
        1_002,
        UsageEvent::Bytes {
            bytes_in: 10,
            bytes_out: 20,
        },
    );
    enc.push(&b, "acc_2", 1_003, response(500));
    file.append(enc.frame()).unwrap();
    let second_end = fs::metadata(id(7).path_in(dir)).unwrap().len();
    (first_end, second_end)
}

/// What a read handed over: (key id, account id, ms) per event.
type Seen = Vec<(String, String, i64)>;

fn read_all(dir: &Path) -> (Result<SegmentRead, SegmentError>, Seen) {
    let mut seen = Vec::new();
    let read = read_segment(dir, id(7), |key, account, ms, _| {
        seen.push((key.to_owned(), account.to_owned(), ms));
    });
    (read, seen)
}

#[test]
fn a_segment_reads_back_every_event_with_its_key_and_account() {
    let dir = tempfile::tempdir().unwrap();
    two_groups(dir.path());
    let mut events = Vec::new();
    let read = read_segment(dir.path(), id(7), |key, account, ms, event| {
        events.push((key.to_owned(), account.to_owned(), ms, event));
    })
    .unwrap();
    assert_eq!(
        read,
        SegmentRead {
            groups: 2,
            torn_bytes: 0
        }
    );
    let s = |v: &str| v.to_owned();
    assert_eq!(
        events,
        vec![
            (s("key_a"), s("acc_1"), 1_000, response(200)),
            (s("key_b"), s("acc_2"), 1_001, response(429)),
            (
                s("key_a"),
                s("acc_1"),
                1_002,
                UsageEvent::Bytes {
                    bytes_in: 10,
                    bytes_out: 20
                }
            ),
            (s("key_b"), s("acc_2"), 1_003, response(500)),
        ]
    );
}

#[test]
fn a_last_group_cut_anywhere_is_a_torn_tail_and_the_groups_before_it_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let (first_end, second_end) = two_groups(dir.path());
    let path = id(7).path_in(dir.path());
    let whole = fs::read(&path).unwrap();
    for cut in first_end + 1..second_end {
        fs::write(&path, &whole[..cut as usize]).unwrap();
        let (read, seen) = read_all(dir.path());
        let read = read.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
        assert_eq!(read.groups, 1, "cut at {cut}");
        assert_eq!(read.torn_bytes as u64, cut - first_end);
        assert_eq!(seen.len(), 2);
    }
    // A header cut short (a crash right after the file was made) is an empty torn segment.
    fs::write(&path, &whole[..10]).unwrap();
    let (read, seen) = read_all(dir.path());
    assert_eq!(read.unwrap().torn_bytes, 10);
    assert!(seen.is_empty());
}

#[test]
fn a_last_group_that_fails_its_crc_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (_, second_end) = two_groups(dir.path());
    let path = id(7).path_in(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    bytes[second_end as usize - 1] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let (read, seen) = read_all(dir.path());
    assert_eq!(read.unwrap().groups, 1);
    assert_eq!(seen.len(), 2);
}

#[test]
fn a_damaged_group_before_the_last_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (first_end, _) = two_groups(dir.path());
    let path = id(7).path_in(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    bytes[first_end as usize - 1] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let (read, seen) = read_all(dir.path());
    match read {
        Err(SegmentError::Corrupt { offset, groups, .. }) => {
            assert_eq!(offset, HEADER_BYTES);
            assert_eq!(groups, 0);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert!(seen.is_empty());
    let aside = move_aside(dir.path(), id(7)).unwrap();
    assert!(aside.exists() && !path.exists());
    assert!(segments(dir.path()).unwrap().is_empty());
}

#[test]
fn segments_are_listed_by_writer_then_number_and_other_files_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [
        SegmentId { writer: 2, seq: 1 },
        SegmentId { writer: 1, seq: 10 },
        SegmentId { writer: 1, seq: 9 },
    ];
    for id in ids {
        SegmentFile::create(dir.path(), id).unwrap();
        assert_eq!(SegmentId::parse(&id.file_name()), Some(id));
    }
    fs::write(dir.path().join("notes.txt"), "x").unwrap();
    let _lock = lock_dir(dir.path()).unwrap();
    assert!(lock_dir(dir.path()).is_err(), "a second user is refused");
    assert_eq!(segments(dir.path()).unwrap(), vec![ids[2], ids[1], ids[0]]);
    remove(dir.path(), ids[0]).unwrap();
    remove(dir.path(), ids[0]).unwrap();
    assert_eq!(segments(dir.path()).unwrap().len(), 2);
}
