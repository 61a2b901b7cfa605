//! Group commit: concurrent writers share one fsync.
//!
//! redb has one writer at a time, and an fsync'd commit holds it for a few milliseconds. So a
//! write is queued as a job; the first writer to find no round running leads one: it takes every
//! queued job, runs each in its own transaction committed without durability
//! ([`Durability::None`]: visible to this process at once, not yet on disk), then commits one
//! empty transaction with [`Durability::Immediate`], which makes them all durable, and hands each
//! writer its result. Writers that queue during a round wait for it to end, and one of them leads
//! the next. Sixteen concurrent key creations thus share a couple of fsyncs instead of paying
//! thirty-two; a lone writer pays the one sync it paid before.
//!
//! A writer is told of success only once its change is durable, so a crash loses only changes
//! that no caller was told of. Readers may see a change a few milliseconds before it is durable;
//! if the machine crashes in between, the change is gone and its writer got no answer. If the
//! sync fails, every writer of the round gets the error. One job's failure (or panic) aborts
//! only its own transaction.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use parking_lot::{Condvar, Mutex, MutexGuard};
use redb::{Database, Durability, WriteTransaction};

use super::db_err;
use crate::store::StoreError;

/// The most jobs one round makes durable; later ones wait for the next round.
const ROUND_JOBS: usize = 256;

/// A queued write: runs its transaction, and gives back what delivers its result once the
/// round's sync is over (`Some` when the sync failed).
type Job = Box<dyn FnOnce(&Database) -> Finish + Send>;
type Finish = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// See the module documentation.
#[derive(Default)]
pub(super) struct GroupCommit {
    queue: Mutex<Queue>,
    /// Signalled at the end of every round.
    round_over: Condvar,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// A round is running.
    leading: bool,
    /// Rounds run so far (for tests).
    rounds: u64,
}

// === impl GroupCommit ===

impl GroupCommit {
    /// Runs `f` in one write transaction of the next round (see [`transaction`]), and returns
    /// its result once the change is durable.
    pub(super) fn write<T>(
        &self,
        db: &Database,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
    {
        self.job(db, move |db| transaction(db, f))
    }

    /// Runs `job` (which writes with [`transaction`], and may do more around it) in the next
    /// round, and returns its result once its change is durable.
    pub(super) fn job<T>(
        &self,
        db: &Database,
        job: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel::<Result<T, StoreError>>(1);
        let job: Job = Box::new(move |db| {
            let result = job(db);
            Box::new(move |sync_failed: Option<&StoreError>| {
                let result = match (result, sync_failed) {
                    (Ok(_), Some(e)) => Err(StoreError::Unavailable(format!(
                        "commit not made durable: {e}"
                    ))),
                    (result, _) => result,
                };
                // The writer waits for this; it cannot have gone.
                let _ = tx.send(result);
            })
        });
        let mut queue = self.queue.lock();
        queue.jobs.push(job);
        loop {
            match rx.try_recv() {
                Ok(result) => return result,
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(StoreError::Unavailable(
                        "a store write failed while running".into(),
                    ))
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if queue.leading {
                self.round_over.wait(&mut queue);
                continue;
            }
            queue.leading = true;
            let jobs = std::mem::take(&mut queue.jobs);
            MutexGuard::unlocked(&mut queue, || self.round(db, jobs));
            queue.leading = false;
            queue.rounds += 1;
            self.round_over.notify_all();
        }
    }

    /// One round: every job in its own non-durable transaction (with those queued while they
    /// ran, up to [`ROUND_JOBS`]), one durable sync, the results.
    fn round(&self, db: &Database, mut jobs: Vec<Job>) {
        let mut finishes: Vec<Finish> = Vec::with_capacity(jobs.len());
        loop {
            // A job that panics drops its sender: its writer gets an error, the others go on.
            finishes.extend(
                jobs.drain(..)
                    .filter_map(|job| std::panic::catch_unwind(AssertUnwindSafe(|| job(db))).ok()),
            );
            let mut queue = self.queue.lock();
            if queue.jobs.is_empty() || finishes.len() >= ROUND_JOBS {
                break;
            }
            jobs = std::mem::take(&mut queue.jobs);
        }
        let synced = sync(db);
        for finish in finishes {
            finish(synced.as_ref().err());
        }
    }
}

/// Runs `f` in one write transaction and commits it without durability if `f` succeeds (aborts
/// otherwise): for the jobs of [`GroupCommit::job`], whose round makes it durable.
pub(super) fn transaction<T>(
    db: &Database,
    f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut txn = db.begin_write().map_err(db_err)?;
    txn.set_durability(Durability::None);
    match f(&txn) {
        Ok(value) => {
            txn.commit().map_err(db_err)?;
            Ok(value)
        }
        Err(e) => {
            // The error being returned matters more than a failed abort; an uncommitted
            // transaction never becomes visible either way.
            let _ = txn.abort();
            Err(e)
        }
    }
}

/// A durable empty commit: everything committed before it reaches the disk.
fn sync(db: &Database) -> Result<(), StoreError> {
    let mut txn = db.begin_write().map_err(db_err)?;
    txn.set_durability(Durability::Immediate);
    txn.commit().map_err(db_err)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use redb::{ReadableTableMetadata, TableDefinition};

    use super::*;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn insert(txn: &WriteTransaction, k: u64) -> Result<(), StoreError> {
        let mut t = txn.open_table(T).map_err(db_err)?;
        t.insert(k, k).map_err(db_err)?;
        Ok(())
    }

    #[test]
    fn concurrent_writes_are_all_durable_after_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("g.db");
        {
            let db = Arc::new(Database::create(&path).expect("create"));
            let commits = Arc::new(GroupCommit::default());
            let threads: Vec<_> = (0..8u64)
                .map(|t| {
                    let (db, commits) = (Arc::clone(&db), Arc::clone(&commits));
                    std::thread::spawn(move || {
                        for i in 0..50 {
                            commits
                                .write(&db, move |txn| insert(txn, t * 1000 + i))
                                .expect("write");
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("writer thread");
            }
            // Eight writers at once share rounds: fewer rounds (syncs) than writes.
            let rounds = commits.queue.lock().rounds;
            assert!(rounds < 400, "{rounds} rounds for 400 writes");
        }
        let db = Database::create(&path).expect("reopen");
        let txn = db.begin_read().expect("read");
        let t = txn.open_table(T).expect("table");
        assert_eq!(t.len().expect("len"), 400);
        assert_eq!(t.get(7049).expect("get").map(|v| v.value()), Some(7049));
    }

    #[test]
    fn a_failed_or_panicking_write_is_rolled_back_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Database::create(dir.path().join("g.db")).expect("create");
        let commits = GroupCommit::default();
        commits.write(&db, |txn| insert(txn, 1)).expect("write");
        let failed = commits.write(&db, |txn| {
            insert(txn, 2)?;
            Err::<(), _>(StoreError::NameTaken)
        });
        assert!(matches!(failed, Err(StoreError::NameTaken)));
        let panicked = commits.write(&db, |txn| {
            insert(txn, 3)?;
            panic!("a bug in a job")
        });
        let panicked: Result<(), _> = panicked;
        assert!(matches!(panicked, Err(StoreError::Unavailable(_))));
        commits
            .write(&db, |txn| insert(txn, 4))
            .expect("a write after a panicked one");
        let txn = db.begin_read().expect("read");
        let t = txn.open_table(T).expect("table");
        assert_eq!(t.len().expect("len"), 2);
        assert!(t.get(2).expect("get").is_none());
        assert!(t.get(3).expect("get").is_none());
    }
}
