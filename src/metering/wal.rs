//! The durable metering mode (`metering.durability = "wal"`): every usage event goes to a
//! write-ahead log that is on disk within `wal_sync_interval`, so a crash (SIGKILL included)
//! loses at most that interval's events instead of a whole `flush_interval`.
//!
//! - **Request path**: [`Wal::push`] appends a 40-byte event to one of [`SHARDS`] buffers,
//!   picked per thread, under that buffer's lock (a push; no syscall, no encoding). In this mode
//!   the key's [`KeyState`] keeps no counts: the log is the only path, so what the store gets
//!   and what the disk holds cannot differ.
//! - **Group commit**: a writer thread, every `wal_sync_interval`, swaps every buffer for an
//!   empty one, encodes the events as one group, appends it to the open segment and
//!   `fdatasync`s, and merges the events into the [`Pending`] counts of that segment.
//! - **Rotation, exactly once**: the flusher's [`Wal::rotate`] writes a last group, closes the
//!   segment and takes its counts, so a batch holds exactly the closed segments. Its batch id is
//!   (this process's writer id, the last segment's number). Once the store took it,
//!   [`Wal::release`] lets the writer delete those segments.
//! - **Replay** ([`replay`]), at start-up before serving: each segment left behind is sent as
//!   one batch whose id is the segment's own (writer, number). A segment whose batch the store
//!   applied just before the crash is then refused by the store's batch id check, not counted
//!   twice: batches are sent in order, so every segment numbered up to the store's last applied
//!   batch from that writer is in the store.
//!
//! Segments stay on disk while the store is away (counts in memory are capped, the files are
//! not), and the directory is locked so that one gateway at a time uses it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::{KeyState, Pending};
use crate::store::usage_wal::{self, GroupEncoder, SegmentError, SegmentFile, SegmentId};
use crate::store::{BatchId, StoreError, Usage, UsageEvent};

/// Event buffers: threads pick one each, round-robin, so that request threads rarely share one.
pub const SHARDS: usize = 16;
/// The most events one buffer holds while the writer is behind (a disk that stalls): 16 × 256 Ki
/// × 40 B, about 170 MB, 20 s of 200 000 requests a second. Beyond it events are dropped and
/// counted in the log.
pub const MAX_EVENTS_PER_SHARD: usize = 1 << 18;

/// Why the log could not be opened or replayed.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The directory could not be created, locked or listed.
    #[error("usage log {dir}: {source}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A segment could not be read.
    #[error("usage log: {0}")]
    Segment(#[from] SegmentError),
    /// The store did not take a replayed segment; it stays on disk for the next start.
    #[error("usage log: replaying {segment} into the store: {source}")]
    Store {
        /// The segment's file name.
        segment: String,
        /// Why.
        source: StoreError,
    },
    /// The writer thread could not be started.
    #[error("usage log: cannot start the writer thread: {0}")]
    Thread(std::io::Error),
}

/// What [`replay`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Segments found and sent to the store.
    pub segments: usize,
    /// (key, minute) buckets sent.
    pub buckets: usize,
    /// Bytes of torn last groups skipped.
    pub torn_bytes: usize,
    /// Damaged segments moved aside.
    pub corrupt: usize,
}

/// The log: the event buffers, the segment being written and its writer thread.
pub struct Wal {
    shards: Box<[Shard]>,
    segment: Mutex<Segment>,
    dir: PathBuf,
    /// Random per process start: the segments' and the batches' writer id. A new one each start
    /// means numbers never repeat under one writer, with nothing to persist.
    writer: u64,
    sync_interval: Duration,
    /// Segments numbered up to this are in the store and may be deleted.
    released: AtomicU64,
    /// Events dropped because a buffer was full, since the writer last logged it.
    dropped: AtomicU64,
    stop: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Held while the log is open (the lock is the file's); let go by [`Wal::close`], so that a
    /// gateway restarted in the same process can open the directory again.
    lock: Mutex<Option<File>>,
}

/// One buffer, on its own cache lines so that two threads' pushes do not share one.
#[repr(align(128))]
struct Shard(Mutex<Vec<Event>>);

/// One usage event waiting for the writer. The key's state names the key and its account.
struct Event {
    cell: Arc<KeyState>,
    ms: i64,
    event: UsageEvent,
}

/// The writer's side, behind one lock shared by the writer thread and [`Wal::rotate`].
struct Segment {
    file: Option<SegmentFile>,
    next_seq: u64,
    encoder: GroupEncoder,
    /// The buffer swapped into a shard next (capacity kept from round to round).
    spare: Vec<Event>,
    /// Counts written since the last rotation, and the last segment number they are in.
    pending: Pending,
    last_seq: Option<u64>,
    /// Closed segments not yet deleted, oldest first.
    closed: Vec<u64>,
    /// Whether the last write failed (logged once per episode).
    failing: bool,
}

static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

// === impl Wal ===

impl Wal {
    /// Opens (creates and locks) the log in `dir`. Replay segments left there with [`replay`]
    /// before [`Wal::start`]; this log's own segments get a new writer id.
    pub fn open(dir: &Path, sync_interval: Duration) -> Result<Arc<Wal>, WalError> {
        let lock = usage_wal::lock_dir(dir).map_err(|source| WalError::Dir {
            dir: dir.to_owned(),
            source,
        })?;
        Ok(Arc::new(Wal {
            shards: (0..SHARDS).map(|_| Shard(Mutex::new(Vec::new()))).collect(),
            segment: Mutex::new(Segment {
                file: None,
                next_seq: 1,
                encoder: GroupEncoder::default(),
                spare: Vec::new(),
                pending: Pending::default(),
                last_seq: None,
                closed: Vec::new(),
                failing: false,
            }),
            dir: dir.to_owned(),
            writer: rand::random(),
            sync_interval,
            released: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            thread: Mutex::new(None),
            lock: Mutex::new(Some(lock)),
        }))
    }

    /// Starts the writer thread: a group every `sync_interval` until [`Wal::close`].
    pub fn start(self: &Arc<Self>) -> Result<(), WalError> {
        let wal = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("tollgate-usage-wal".to_owned())
            .spawn(move || wal.run())
            .map_err(WalError::Thread)?;
        *self.thread.lock() = Some(handle);
        Ok(())
    }

    /// This process's writer id (segments and batches).
    pub fn writer(&self) -> u64 {
        self.writer
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues one event of `cell`'s key (the request path).
    pub(super) fn push(&self, cell: &Arc<KeyState>, ms: i64, event: UsageEvent) {
        let shard = SHARD.with(|s| *s);
        let mut events = self.shards[shard].0.lock();
        if events.len() >= MAX_EVENTS_PER_SHARD {
            drop(events);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        events.push(Event {
            cell: Arc::clone(cell),
            ms,
            event,
        });
    }

    /// Writes what is buffered, closes the segment and takes the counts of every segment closed
    /// since the last rotation: (the last one's number, the counts); `None` when nothing was
    /// written. Blocks on the disk: call it off the async threads ([`Wal::rotate`]).
    pub fn rotate_blocking(&self) -> Option<(u64, Pending)> {
        let mut segment = self.segment.lock();
        self.write_group(&mut segment);
        if let Some(file) = segment.file.take() {
            segment.closed.push(file.id().seq);
        }
        segment.encoder.next_segment();
        let seq = segment.last_seq.take()?;
        Some((seq, std::mem::take(&mut segment.pending)))
    }

    /// The store has every segment numbered up to `seq`: the writer deletes them.
    pub fn release(&self, seq: u64) {
        self.released.fetch_max(seq, Ordering::SeqCst);
    }

    /// The batch id of counts whose last segment is `seq`.
    pub fn batch_id(&self, seq: u64) -> BatchId {
        BatchId {
            writer: self.writer,
            seq,
        }
    }

    /// Stops the writer thread after a last group, and deletes released segments. Call it after
    /// the flusher's last write.
    pub fn close(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            thread.thread().unpark();
            if thread.join().is_err() {
                tracing::error!("the usage log's writer thread panicked");
            }
        }
        let mut segment = self.segment.lock();
        self.write_group(&mut segment);
        self.delete_released(&mut segment);
        drop(segment);
        self.lock.lock().take();
    }

    fn run(&self) {
        let mut next = std::time::Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            next += self.sync_interval;
            let now = std::time::Instant::now();
            if next > now {
                std::thread::park_timeout(next - now);
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
            } else {
                // Behind (a slow disk): the next group starts now, not in a burst of catch-ups.
                next = now;
            }
            let mut segment = self.segment.lock();
            self.write_group(&mut segment);
            self.delete_released(&mut segment);
        }
    }

    /// Moves every buffered event into one group on disk and into the segment's counts.
    fn write_group(&self, segment: &mut Segment) {
        let Segment {
            encoder,
            spare,
            pending,
            ..
        } = segment;
        for shard in self.shards.iter() {
            std::mem::swap(&mut *shard.0.lock(), spare);
            for e in spare.drain(..) {
                encoder.push(&e.cell.key_id, &e.cell.account_id, e.ms, e.event);
                pending.add_event(&e.cell.key_id, &e.cell.account_id, e.ms, e.event);
            }
        }
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::error!(
                dropped,
                "the usage log fell behind (a slow disk?): {dropped} usage events were dropped"
            );
        }
        if segment.encoder.is_empty() {
            return;
        }
        if let Err(e) = self.append(segment) {
            // The segment may end in a part of this group: write the next one to a new segment.
            if let Some(file) = segment.file.take() {
                segment.closed.push(file.id().seq);
            }
            segment.encoder.next_segment();
            if !segment.failing {
                tracing::error!(
                    error = %e,
                    dir = %self.dir.display(),
                    "cannot write the usage log: counts are kept in memory and flushed, but a \
                     crash now would lose them"
                );
            }
            segment.failing = true;
            return;
        }
        if segment.failing {
            tracing::info!("the usage log is written again");
        }
        segment.failing = false;
        segment.encoder.next_group();
    }

    /// Appends the encoded group, opening the next segment first if none is open.
    fn append(&self, segment: &mut Segment) -> std::io::Result<()> {
        if segment.file.is_none() {
            let seq = segment.next_seq;
            segment.next_seq += 1;
            // Counts belong to this number even if the file cannot be made: batch ids stay
            // unique and ordered.
            segment.last_seq = Some(seq);
            let id = SegmentId {
                writer: self.writer,
                seq,
            };
            segment.file = Some(SegmentFile::create(&self.dir, id)?);
        }
        let Segment { file, encoder, .. } = segment;
        match file {
            Some(file) => file.append(encoder.frame()),
            None => Ok(()),
        }
    }

    fn delete_released(&self, segment: &mut Segment) {
        let released = self.released.load(Ordering::SeqCst);
        segment.closed.retain(|seq| {
            if *seq > released {
                return true;
            }
            let id = SegmentId {
                writer: self.writer,
                seq: *seq,
            };
            match usage_wal::remove(&self.dir, id) {
                Ok(()) => false,
                Err(e) => {
                    tracing::warn!(error = %e, segment = id.file_name(), "cannot delete a usage log segment; it is applied once, so a later replay changes nothing");
                    false
                }
            }
        });
    }
}

// === functions ===

/// Sends every segment left in `dir` to the store, one batch per segment with the segment's
/// id as its batch id, in order, deleting each once the store took it. A torn last group is
/// skipped; a damaged segment has its intact groups sent and is moved aside (`.corrupt`).
pub async fn replay(dir: &Path, store: &dyn Usage) -> Result<Replayed, WalError> {
    let mut replayed = Replayed::default();
    let dir_error = |source| WalError::Dir {
        dir: dir.to_owned(),
        source,
    };
    for id in usage_wal::segments(dir).map_err(dir_error)? {
        let mut pending = Pending::default();
        let read = usage_wal::read_segment(dir, id, |key_id, account_id, ms, event| {
            pending.add_event(&Arc::from(key_id), &Arc::from(account_id), ms, event);
        });
        let corrupt = match read {
            Ok(read) => {
                if read.torn_bytes > 0 {
                    tracing::warn!(
                        segment = id.file_name(),
                        bytes = read.torn_bytes,
                        "the usage log's last group was cut short by the crash; skipped"
                    );
                }
                replayed.torn_bytes += read.torn_bytes;
                None
            }
            Err(e @ SegmentError::Corrupt { .. }) => Some(e),
            Err(e) => return Err(e.into()),
        };
        let batch = pending.batch();
        if !batch.is_empty() {
            let batch_id = BatchId {
                writer: id.writer,
                seq: id.seq,
            };
            store
                .add_usage(batch_id, &batch)
                .await
                .map_err(|source| WalError::Store {
                    segment: id.file_name(),
                    source,
                })?;
        }
        replayed.segments += 1;
        replayed.buckets += batch.len();
        match corrupt {
            None => usage_wal::remove(dir, id).map_err(dir_error)?,
            Some(e) => {
                let aside = usage_wal::move_aside(dir, id).map_err(dir_error)?;
                replayed.corrupt += 1;
                tracing::error!(
                    error = %e,
                    moved_to = %aside.display(),
                    "a usage log segment is damaged: its intact groups were replayed, the file \
                     was moved aside"
                );
            }
        }
    }
    Ok(replayed)
}

#[cfg(test)]
pub(super) mod tests;
