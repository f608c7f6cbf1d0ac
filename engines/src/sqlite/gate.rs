//! One writer at a time per database file, handed over rather than polled for.
//!
//! SQLite lets one connection write at a time; a connection that finds the write lock taken
//! runs its busy handler, which sleeps 1, 2, 5, 10 ... 100 ms between tries and so starts late
//! after the lock was freed, while every other waiter polls too. With two apis, two crawlers and
//! a publisher sharing a file, a crawl spent thousands of such sleeps (5,300 in a 4,400-page
//! run; BENCHMARKS.md). The gate queues a process's writers in order behind an async mutex
//! (waiting costs no thread), and the processes of a machine behind an exclusive `flock` on a
//! file beside the database, which the kernel hands to the next waiter the moment it is
//! released, and releases by itself when a process dies. A writer that does not go through the
//! gate (another tool, an older binary) still meets SQLite's own lock and busy handler, so the
//! gate adds order, never correctness.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tokio::sync::{Mutex, MutexGuard};

use crate::{EngineError, Result};

pub(crate) struct WriteGate {
    /// `<database>-writer`; `None` for a database without a file (in memory).
    path: Option<PathBuf>,
    /// The lock file's handle while nobody holds the gate (opened on first use, and again
    /// after a wait was abandoned mid-way).
    idle: Mutex<Option<File>>,
}

/// The gate, held: the in-process turn and the machine-wide lock. Dropping it releases both.
pub(crate) struct GateGuard<'a> {
    turn: MutexGuard<'a, Option<File>>,
    locked: Option<Flock<File>>,
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        if let Some(locked) = self.locked.take() {
            match locked.unlock() {
                Ok(file) => *self.turn = Some(file),
                // Dropping the lock closes the file, which releases it all the same.
                Err((locked, e)) => {
                    tracing::warn!(error = %e, "releasing a database's writer lock failed; closing it");
                    drop(locked);
                }
            }
        }
    }
}

impl WriteGate {
    /// The gate of the database file at `db` (`None`: in memory, no file to share).
    pub(crate) fn new(db: Option<&Path>) -> Self {
        let path = db.map(|db| {
            let mut name = db.as_os_str().to_owned();
            name.push("-writer");
            PathBuf::from(name)
        });
        Self {
            path,
            idle: Mutex::new(None),
        }
    }

    /// Wait for this process's turn, then for the machine's.
    pub(crate) async fn enter(&self) -> Result<GateGuard<'_>> {
        let mut turn = self.idle.lock().await;
        let Some(path) = &self.path else {
            return Ok(GateGuard { turn, locked: None });
        };
        let file = match turn.take() {
            Some(file) => file,
            None => open(path)?,
        };
        let locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((file, Errno::EWOULDBLOCK)) => {
                // Another process writes: wait on a blocking thread for the kernel's hand-over.
                // Abandoned mid-way (the caller gone), the lock is taken and dropped, released.
                tokio::task::spawn_blocking(move || Flock::lock(file, FlockArg::LockExclusive))
                    .await
                    .map_err(|e| lock_error(path, e))?
                    .map_err(|(_, e)| lock_error(path, e))?
            }
            Err((_, e)) => return Err(lock_error(path, e)),
        };
        Ok(GateGuard {
            turn,
            locked: Some(locked),
        })
    }
}

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| lock_error(path, e))
}

fn lock_error(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::Config(format!(
        "cannot take the writer lock {}: {e}",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Two gates on one file (as two processes have) let one holder in at a time, and the
    /// second enters as soon as the first leaves.
    #[tokio::test]
    async fn two_gates_on_one_file_take_turns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("store.db");
        let a = Arc::new(WriteGate::new(Some(&db)));
        let b = Arc::new(WriteGate::new(Some(&db)));
        let held = a.enter().await.expect("a enters");
        let inside = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (b, inside) = (b.clone(), inside.clone());
            tokio::spawn(async move {
                let _g = b.enter().await.expect("b enters");
                inside.store(true, Ordering::SeqCst);
            })
        };
        // b is waiting on the lock a holds.
        tokio::task::yield_now().await;
        assert!(
            !inside.load(Ordering::SeqCst),
            "b entered while a held the gate"
        );
        drop(held);
        waiter.await.expect("b's task");
        assert!(inside.load(Ordering::SeqCst));
        // And a enters again once b has left.
        drop(a.enter().await.expect("a enters again"));
    }

    #[tokio::test]
    async fn a_database_in_memory_has_a_gate_without_a_file() {
        let gate = WriteGate::new(None);
        let first = gate.enter().await.expect("enter");
        assert!(first.locked.is_none());
        drop(first);
        drop(gate.enter().await.expect("enter again"));
    }
}
