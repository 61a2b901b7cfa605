//! The usage write-ahead log's files (`metering.durability = "wal"`): segments of length- and
//! CRC-framed groups of usage events. This module knows bytes and files only; when events are
//! written, when a segment closes and what replay does with one is `metering::wal`'s business.
//!
//! A segment is the file `{writer:016x}-{seq:020}.wal` in the log's directory:
//!
//! ```text
//! header   b"TGUWAL01" | writer u64 LE | seq u64 LE                       (24 bytes)
//! group    len u32 LE | crc32 u32 LE (of the payload) | payload (len bytes)   (repeated)
//! payload  records, each a tag byte then:
//!   1 key       index u32 | key_len u16 | key id | account_len u16 | account id
//!   2 response  index u32 | ms i64 | status u16                           (15 bytes)
//!   3 bytes     index u32 | ms i64 | bytes_in u64 | bytes_out u64         (29 bytes)
//! ```
//!
//! All integers are little-endian. A key record gives a key its index for the rest of its
//! segment, before the first event that uses it. A group is written with one `write` and then
//! `fdatasync`ed, so a crash can only cut the last group short: a last group that is incomplete
//! or fails its CRC is a torn tail, skipped. Anything else that does not decode is corruption.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::UsageEvent;

const MAGIC: &[u8; 8] = b"TGUWAL01";
const HEADER_BYTES: usize = 24;
const FRAME_BYTES: usize = 8;
/// A length field above this is damage, not a group cut short: one group holds at most a
/// sync interval's events, a few MB at the most.
const MAX_GROUP_BYTES: usize = 256 << 20;
const TAG_KEY: u8 = 1;
const TAG_RESPONSE: u8 = 2;
const TAG_BYTES: u8 = 3;
const EXTENSION: &str = "wal";

/// A segment's identity: the writer (one per process start, random) and its number in that
/// writer's sequence. It is also the usage batch id the segment is replayed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SegmentId {
    /// The writer.
    pub writer: u64,
    /// 1, 2, 3, … per writer.
    pub seq: u64,
}

/// Why a segment could not be read in full.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// Reading the file failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The segment.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The bytes at `offset` are damaged (not a torn last group). The groups before it were
    /// handed to the caller.
    #[error("{path} is corrupt at byte {offset}: {why} ({groups} groups before it are intact)")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the damage starts.
        offset: usize,
        /// What is wrong.
        why: &'static str,
        /// Intact groups read before it.
        groups: usize,
    },
}

/// What reading a segment found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SegmentRead {
    /// Intact groups.
    pub groups: usize,
    /// Bytes of a torn last group (or header) skipped; 0 when the segment ended cleanly.
    pub torn_bytes: usize,
}

/// Builds one group: events are encoded into a buffer that starts with room for the frame, and
/// each key is defined once per segment.
#[derive(Debug)]
pub struct GroupEncoder {
    buf: Vec<u8>,
    /// Each key's index in the current segment.
    keys: HashMap<Arc<str>, u32>,
}

/// The segment being appended to.
#[derive(Debug)]
pub struct SegmentFile {
    file: File,
    id: SegmentId,
}

// === impl SegmentId ===

impl SegmentId {
    /// Its file name.
    pub fn file_name(self) -> String {
        format!("{:016x}-{:020}.{EXTENSION}", self.writer, self.seq)
    }

    /// Its path in `dir`.
    pub fn path_in(self, dir: &Path) -> PathBuf {
        dir.join(self.file_name())
    }

    /// The id a segment's file name gives; `None` for other files.
    pub fn parse(file_name: &str) -> Option<SegmentId> {
        let stem = file_name.strip_suffix(".wal")?;
        let (writer, seq) = stem.split_once('-')?;
        if writer.len() != 16 || seq.len() != 20 {
            return None;
        }
        Some(SegmentId {
            writer: u64::from_str_radix(writer, 16).ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

// === impl GroupEncoder ===

impl Default for GroupEncoder {
    fn default() -> Self {
        GroupEncoder {
            buf: vec![0; FRAME_BYTES],
            keys: HashMap::new(),
        }
    }
}

impl GroupEncoder {
    /// Appends one event of `key_id` (of `account_id`) at `ms`.
    pub fn push(&mut self, key_id: &Arc<str>, account_id: &str, ms: i64, event: UsageEvent) {
        let index = match self.keys.get(&**key_id) {
            Some(index) => *index,
            None => {
                let index = u32::try_from(self.keys.len()).unwrap_or(u32::MAX);
                self.keys.insert(Arc::clone(key_id), index);
                self.buf.push(TAG_KEY);
                self.buf.extend_from_slice(&index.to_le_bytes());
                put_str(&mut self.buf, key_id);
                put_str(&mut self.buf, account_id);
                index
            }
        };
        match event {
            UsageEvent::Response { status } => {
                self.buf.push(TAG_RESPONSE);
                self.buf.extend_from_slice(&index.to_le_bytes());
                self.buf.extend_from_slice(&ms.to_le_bytes());
                self.buf.extend_from_slice(&status.to_le_bytes());
            }
            UsageEvent::Bytes {
                bytes_in,
                bytes_out,
            } => {
                self.buf.push(TAG_BYTES);
                self.buf.extend_from_slice(&index.to_le_bytes());
                self.buf.extend_from_slice(&ms.to_le_bytes());
                self.buf.extend_from_slice(&bytes_in.to_le_bytes());
                self.buf.extend_from_slice(&bytes_out.to_le_bytes());
            }
        }
    }

    /// Whether the group holds no event.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == FRAME_BYTES
    }

    /// The framed group, ready to append.
    pub fn frame(&mut self) -> &[u8] {
        let payload = &self.buf[FRAME_BYTES..];
        let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        let crc = crc32fast::hash(payload);
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4..FRAME_BYTES].copy_from_slice(&crc.to_le_bytes());
        &self.buf
    }

    /// Starts the next group of the same segment.
    pub fn next_group(&mut self) {
        self.buf.truncate(FRAME_BYTES);
    }

    /// Starts a new segment: keys are defined again, and whatever the unwritten group held
    /// (its key records included) is forgotten.
    pub fn next_segment(&mut self) {
        self.next_group();
        self.keys.clear();
    }
}

// === impl SegmentFile ===

impl SegmentFile {
    /// Creates the segment `id` in `dir` with its header, durably (file and directory entry).
    pub fn create(dir: &Path, id: SegmentId) -> io::Result<SegmentFile> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(id.path_in(dir))?;
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&id.writer.to_le_bytes());
        header[16..].copy_from_slice(&id.seq.to_le_bytes());
        file.write_all(&header)?;
        file.sync_data()?;
        File::open(dir)?.sync_all()?;
        Ok(SegmentFile { file, id })
    }

    /// The segment's id.
    pub fn id(&self) -> SegmentId {
        self.id
    }

    /// Appends a framed group and waits until it is on disk.
    pub fn append(&mut self, group: &[u8]) -> io::Result<()> {
        self.file.write_all(group)?;
        self.file.sync_data()
    }
}

// === functions ===

/// Creates the log directory if needed and locks it for this process: two gateways appending
/// to and replaying one directory would count each other's segments.
pub fn lock_dir(dir: &Path) -> io::Result<File> {
    fs::create_dir_all(dir)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} is in use by another tollgate process", dir.display()),
        )),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The segments in `dir`, by writer and then number (the order they must be replayed in).
pub fn segments(dir: &Path) -> io::Result<Vec<SegmentId>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(id) = entry.file_name().to_str().and_then(SegmentId::parse) {
            found.push(id);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Reads segment `id` from `dir`, handing each event of each intact group to `each` (key id,
/// account id, ms, event), a group at a time. A torn last group is skipped and reported in the
/// answer; damage elsewhere is an error, after the groups before it were handed over.
pub fn read_segment(
    dir: &Path,
    id: SegmentId,
    mut each: impl FnMut(&str, &str, i64, UsageEvent),
) -> Result<SegmentRead, SegmentError> {
    let path = id.path_in(dir);
    let bytes = fs::read(&path).map_err(|source| SegmentError::Io {
        path: path.clone(),
        source,
    })?;
    let mut read = SegmentRead::default();
    let corrupt = |offset: usize, why: &'static str, groups: usize| SegmentError::Corrupt {
        path: path.clone(),
        offset,
        why,
        groups,
    };
    if bytes.len() < HEADER_BYTES {
        // Cut short right after it was created.
        read.torn_bytes = bytes.len();
        return Ok(read);
    }
    if &bytes[..8] != MAGIC {
        return Err(corrupt(0, "not a usage log segment", 0));
    }
    if bytes[8..16] != id.writer.to_le_bytes() || bytes[16..24] != id.seq.to_le_bytes() {
        return Err(corrupt(8, "the header does not match the file name", 0));
    }
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut events: Vec<(u32, i64, UsageEvent)> = Vec::new();
    let mut at = HEADER_BYTES;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let Some((len, crc)) = frame(rest) else {
            read.torn_bytes = rest.len();
            break;
        };
        if len > MAX_GROUP_BYTES {
            return Err(corrupt(
                at,
                "a group length beyond any group written",
                read.groups,
            ));
        }
        let Some(payload) = rest.get(FRAME_BYTES..FRAME_BYTES + len) else {
            read.torn_bytes = rest.len();
            break;
        };
        let ends_file = FRAME_BYTES + len == rest.len();
        if crc32fast::hash(payload) != crc {
            if ends_file {
                read.torn_bytes = rest.len();
                break;
            }
            return Err(corrupt(at, "a group fails its CRC", read.groups));
        }
        events.clear();
        decode_group(payload, &mut keys, &mut events)
            .map_err(|why| corrupt(at, why, read.groups))?;
        for (index, ms, event) in events.drain(..) {
            // decode_group checked every index.
            if let Some((key_id, account_id)) = keys.get(index as usize) {
                each(key_id, account_id, ms, event);
            }
        }
        read.groups += 1;
        at += FRAME_BYTES + len;
    }
    Ok(read)
}

/// Renames a damaged segment to `….wal.corrupt`, out of the replay's way but kept for a look.
pub fn move_aside(dir: &Path, id: SegmentId) -> io::Result<PathBuf> {
    let from = id.path_in(dir);
    let to = dir.join(format!("{}.corrupt", id.file_name()));
    fs::rename(&from, &to)?;
    Ok(to)
}

/// Deletes a segment whose counts the store has.
pub fn remove(dir: &Path, id: SegmentId) -> io::Result<()> {
    match fs::remove_file(id.path_in(dir)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    // Key and account ids are short; a longer one is cut at a char boundary below 64 KiB.
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    buf.extend_from_slice(&u16::try_from(end).unwrap_or(0).to_le_bytes());
    buf.extend_from_slice(&s.as_bytes()[..end]);
}

/// A group's length and CRC, when its frame is complete.
fn frame(rest: &[u8]) -> Option<(usize, u32)> {
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    let crc = u32::from_le_bytes(rest.get(4..FRAME_BYTES)?.try_into().ok()?);
    Some((usize::try_from(len).ok()?, crc))
}

/// Decodes one CRC-checked payload: key records into `keys`, events into `events`.
fn decode_group(
    payload: &[u8],
    keys: &mut Vec<(String, String)>,
    events: &mut Vec<(u32, i64, UsageEvent)>,
) -> Result<(), &'static str> {
    let mut r = Reader(payload);
    while let Some(tag) = r.u8() {
        let index = r.u32().ok_or("a record cut short")?;
        match tag {
            TAG_KEY => {
                let key_id = r.str().ok_or("a key record cut short")?;
                let account_id = r.str().ok_or("a key record cut short")?;
                if index as usize != keys.len() {
                    return Err("key indexes out of order");
                }
                keys.push((key_id, account_id));
            }
            TAG_RESPONSE | TAG_BYTES => {
                if index as usize >= keys.len() {
                    return Err("an event of an undefined key");
                }
                let ms = r.i64().ok_or("an event cut short")?;
                let event = if tag == TAG_RESPONSE {
                    UsageEvent::Response {
                        status: r.u16().ok_or("an event cut short")?,
                    }
                } else {
                    UsageEvent::Bytes {
                        bytes_in: r.u64().ok_or("an event cut short")?,
                        bytes_out: r.u64().ok_or("an event cut short")?,
                    }
                };
                events.push((index, ms, event));
            }
            _ => return Err("an unknown record type"),
        }
    }
    Ok(())
}

/// Reads little-endian fields off the front of a payload.
struct Reader<'a>(&'a [u8]);

// === impl Reader ===

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.take().map(i64::from_le_bytes)
    }

    fn str(&mut self) -> Option<String> {
        let len = usize::from(self.u16()?);
        let bytes = self.0.get(..len)?;
        self.0 = &self.0[len..];
        String::from_utf8(bytes.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests;
