//! An exclusive advisory lock (flock) on a lock file, held while the value lives: the kernel
//! drops it when the process dies, so a crashed holder never leaves it taken.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot lock {}: {source}", path.display())]
    Lock { path: PathBuf, source: io::Error },
}

/// An exclusive flock on a file (created if missing), released on drop.
#[derive(Debug)]
pub struct FileLock {
    file: File,
}

impl FileLock {
    /// Takes the lock, waiting while another holder has it.
    pub fn acquire(path: &Path) -> Result<FileLock, LockError> {
        Self::take(path, FlockOperation::LockExclusive)?.ok_or_else(|| LockError::Lock {
            path: path.to_path_buf(),
            source: io::ErrorKind::WouldBlock.into(),
        })
    }

    /// Takes the lock if it is free: `None` while another holder has it.
    pub fn try_acquire(path: &Path) -> Result<Option<FileLock>, LockError> {
        Self::take(path, FlockOperation::NonBlockingLockExclusive)
    }

    fn take(path: &Path, op: FlockOperation) -> Result<Option<FileLock>, LockError> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| LockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        match rustix::io::retry_on_intr(|| flock(&file, op)) {
            Ok(()) => Ok(Some(FileLock { file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(LockError::Lock {
                path: path.to_path_buf(),
                source: e.into(),
            }),
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Explicitly, not only by closing: a child forked meanwhile shares the open file
        // description and would otherwise keep the lock until it exits.
        let _ = flock(&self.file, FlockOperation::Unlock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("file-lock-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_held_lock_is_busy_until_dropped() {
        let p = path("busy");
        let held = FileLock::try_acquire(&p).unwrap().expect("a free lock");
        // A second open file description conflicts even within one process.
        assert!(FileLock::try_acquire(&p).unwrap().is_none());
        drop(held);
        let again = FileLock::try_acquire(&p).unwrap();
        assert!(again.is_some(), "released on drop");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_blocking_take_waits_for_the_holder() {
        let p = path("block");
        let held = FileLock::acquire(&p).unwrap();
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || {
                let l = FileLock::acquire(&p).unwrap();
                tx.send(()).unwrap();
                drop(l);
            })
        };
        // Still held: the waiter must not have it.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(held);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the waiter got the lock after it was released");
        waiter.join().unwrap();
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_missing_directory_is_an_open_error() {
        let p = path("nodir").join("sub").join("lock");
        assert!(matches!(FileLock::acquire(&p), Err(LockError::Open { .. })));
    }
}
