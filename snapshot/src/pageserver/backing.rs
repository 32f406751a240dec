//! A memory file that is filled while it is served: the page server of a snapshot whose memory
//! is still elsewhere (chunks on a remote) maps a sparse local file and, before any page of it
//! is copied into a VM, has the [`UnitSource`] deliver the verified bytes of the unit (chunk)
//! holding that page and writes them into the file. A unit the source cannot deliver fails the
//! fault that needed it, with the source's words: the VM stops, and is never handed a page of
//! the sparse file's zeros in its place.
//!
//! One fetch per unit however many sessions fault on it at once (the others wait for it), and a
//! background readahead walks the units a recorded working set needs, in the order it touched
//! them, so faults mostly find their unit there already.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::lock;
use super::sys::PAGE;

/// Where the bytes of a lazily filled memory file come from, one unit at a time.
pub trait UnitSource: Send + Sync {
    /// Bytes per unit: a multiple of the page size. The last unit may be shorter.
    fn unit_bytes(&self) -> u64;
    /// Whether unit `unit` holds data; one without is all zeros and is never fetched.
    fn has_data(&self, unit: u64) -> bool;
    /// The bytes of unit `unit`, already checked against what they must be (a digest): exactly
    /// `len` bytes. The error says which unit is missing and why, for the VM's error.
    fn fetch(&self, unit: u64, len: u64) -> Result<Vec<u8>, String>;
}

/// What a lazily filled memory file did, for statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct LazyInfo {
    pub units: u64,
    pub units_with_data: u64,
    /// Units delivered by the source and written into the file by this server.
    pub units_fetched: u64,
    /// Fetches that failed.
    pub failures: u64,
    pub last_error: Option<String>,
    /// Units the readahead was given (from the working set), and how many it has done.
    pub readahead_total: u64,
    pub readahead_done: u64,
}

pub(crate) struct LazyFill {
    source: Arc<dyn UnitSource>,
    file: File,
    file_len: u64,
    unit_bytes: u64,
    ready: Vec<AtomicBool>,
    /// Units being fetched now: another session needing one waits on `done`.
    busy: Mutex<Vec<bool>>,
    done: Condvar,
    fetched: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    readahead_total: AtomicU64,
    readahead_done: AtomicU64,
    readahead_threads: AtomicUsize,
    stop: AtomicBool,
}

impl LazyFill {
    /// `file` is the (sparse) memory file, open for writing, `file_len` bytes long.
    pub(crate) fn new(
        source: Arc<dyn UnitSource>,
        file: File,
        file_len: u64,
    ) -> std::io::Result<Self> {
        let unit_bytes = source.unit_bytes();
        if unit_bytes == 0 || !unit_bytes.is_multiple_of(PAGE) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("unit size {unit_bytes} is not a multiple of the page size"),
            ));
        }
        let units = file_len.div_ceil(unit_bytes);
        Ok(Self {
            source,
            file,
            file_len,
            unit_bytes,
            ready: (0..units).map(|_| AtomicBool::new(false)).collect(),
            busy: Mutex::new(vec![false; units as usize]),
            done: Condvar::new(),
            fetched: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
            readahead_total: AtomicU64::new(0),
            readahead_done: AtomicU64::new(0),
            readahead_threads: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        })
    }

    pub(crate) fn unit_pages(&self) -> u64 {
        self.unit_bytes / PAGE
    }

    fn units(&self) -> u64 {
        self.ready.len() as u64
    }

    /// Whether file page `page` may hold data (its unit does).
    pub(crate) fn page_has_data(&self, page: u64) -> bool {
        self.source.has_data(page / self.unit_pages())
    }

    /// Whether file pages `from..to` can be served without a fetch.
    pub(crate) fn ready(&self, from: u64, to: u64) -> bool {
        if from >= to {
            return true;
        }
        let up = self.unit_pages();
        (from / up..=(to - 1) / up).all(|u| {
            !self.source.has_data(u)
                || self
                    .ready
                    .get(u as usize)
                    .is_some_and(|r| r.load(Ordering::Acquire))
        })
    }

    /// Whether readahead threads are still fetching.
    pub(crate) fn readahead_running(&self) -> bool {
        self.readahead_threads.load(Ordering::Acquire) > 0
    }

    /// Makes file pages `from..to` readable in the file: fetches every unit of theirs not yet
    /// there, waiting for a fetch another thread has under way.
    pub(crate) fn ensure(&self, from: u64, to: u64) -> Result<(), String> {
        if from >= to {
            return Ok(());
        }
        let up = self.unit_pages();
        for u in from / up..=(to - 1) / up {
            self.ensure_unit(u)?;
        }
        Ok(())
    }

    fn ensure_unit(&self, u: u64) -> Result<(), String> {
        let Some(ready) = self.ready.get(u as usize) else {
            return Err(format!("unit {u} is past the end of the memory file"));
        };
        if ready.load(Ordering::Acquire) || !self.source.has_data(u) {
            return Ok(());
        }
        let mut busy = lock(&self.busy);
        loop {
            if ready.load(Ordering::Acquire) {
                return Ok(());
            }
            if !busy[u as usize] {
                busy[u as usize] = true;
                break;
            }
            busy = self.done.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        drop(busy);
        let off = u * self.unit_bytes;
        let len = self.unit_bytes.min(self.file_len - off);
        let result = self.source.fetch(u, len).and_then(|bytes| {
            if bytes.len() as u64 != len {
                return Err(format!("unit {u} came as {} bytes, not {len}", bytes.len()));
            }
            self.file
                .write_all_at(&bytes, off)
                .map_err(|e| format!("cannot write unit {u} into the memory file: {e}"))
        });
        let mut busy = lock(&self.busy);
        busy[u as usize] = false;
        match &result {
            Ok(()) => {
                ready.store(true, Ordering::Release);
                self.fetched.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                *lock(&self.last_error) = Some(e.clone());
            }
        }
        drop(busy);
        self.done.notify_all();
        result
    }

    /// Fetches `units` in this order on `threads` background threads, so faults find them
    /// there. Stops at the first failure (a fault on that unit reports it) or at [`stop`].
    pub(crate) fn readahead(self: &Arc<Self>, units: Vec<u64>, threads: usize) {
        let units: Vec<u64> = units
            .into_iter()
            .filter(|u| *u < self.units() && self.source.has_data(*u))
            .collect();
        if units.is_empty() {
            return;
        }
        self.readahead_total
            .store(units.len() as u64, Ordering::Relaxed);
        let units = Arc::new(units);
        let next = Arc::new(AtomicUsize::new(0));
        for _ in 0..threads.max(1) {
            let (me, units, next) = (self.clone(), units.clone(), next.clone());
            self.readahead_threads.fetch_add(1, Ordering::AcqRel);
            let spawned = std::thread::Builder::new()
                .name("pageserver-readahead".into())
                .spawn(move || {
                    me.readahead_loop(&units, &next);
                    me.readahead_threads.fetch_sub(1, Ordering::AcqRel);
                });
            if spawned.is_err() {
                self.readahead_threads.fetch_sub(1, Ordering::AcqRel);
                break;
            }
        }
    }

    fn readahead_loop(&self, units: &[u64], next: &AtomicUsize) {
        while !self.stop.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&u) = units.get(i) else { return };
            if let Err(e) = self.ensure_unit(u) {
                tracing::warn!("readahead stopped: {e}");
                self.stop.store(true, Ordering::Relaxed);
                return;
            }
            self.readahead_done.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends the readahead (each thread finishes the unit it is fetching).
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    pub(crate) fn info(&self) -> LazyInfo {
        LazyInfo {
            units: self.units(),
            units_with_data: (0..self.units())
                .filter(|u| self.source.has_data(*u))
                .count() as u64,
            units_fetched: self.fetched.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            last_error: lock(&self.last_error).clone(),
            readahead_total: self.readahead_total.load(Ordering::Relaxed),
            readahead_done: self.readahead_done.load(Ordering::Relaxed),
        }
    }
}

/// The units a working set needs, in the order its pages were first touched, each once.
pub(crate) fn units_in_order(pages: &[u32], unit_pages: u64) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    pages
        .iter()
        .map(|p| u64::from(*p) / unit_pages.max(1))
        .filter(|u| seen.insert(*u))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting {
        fetches: Mutex<Vec<u64>>,
    }

    impl UnitSource for Counting {
        fn unit_bytes(&self) -> u64 {
            2 * PAGE
        }
        fn has_data(&self, unit: u64) -> bool {
            unit != 1
        }
        fn fetch(&self, unit: u64, len: u64) -> Result<Vec<u8>, String> {
            lock(&self.fetches).push(unit);
            if unit == 3 {
                return Err("unit 3 is gone".into());
            }
            Ok(vec![unit as u8 + 1; len as usize])
        }
    }

    #[test]
    fn units_are_fetched_once_and_failures_are_reported() {
        let dir = std::env::temp_dir().join(format!("lazyfill-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("m");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        // Four full units and a last one of one page.
        let len = 9 * PAGE;
        f.set_len(len).unwrap();
        let src = Arc::new(Counting {
            fetches: Mutex::new(Vec::new()),
        });
        let lazy = LazyFill::new(src.clone(), f, len).unwrap();
        lazy.ensure(0, 1).unwrap();
        lazy.ensure(1, 4).unwrap();
        lazy.ensure(8, 9).unwrap();
        assert_eq!(*lock(&src.fetches), vec![0, 4], "unit 1 has no data");
        let e = lazy.ensure(5, 7).unwrap_err();
        assert!(e.contains("unit 3"), "{e}");
        let info = lazy.info();
        assert_eq!((info.units, info.units_fetched, info.failures), (5, 3, 1));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes[0], 1);
        assert_eq!(bytes[(8 * PAGE) as usize], 5);
        assert_eq!(bytes[(2 * PAGE) as usize], 0);
        assert_eq!(units_in_order(&[5, 0, 4, 1, 9], 2), vec![2, 0, 4]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
