//! `workingset.bin`: the pages a restored guest touched first, in the order it touched them, kept
//! next to the snapshot so later restores can prefetch them.
//!
//! Layout (little endian):
//! `magic "MAWRKSET" | version u32 | page size u32 | memory bytes u64 | chunk bytes u64 |
//!  flags u32 | reserved u32 | count u64 | count x page index u32 | CRC32 u32`
//! (the CRC covers everything before it).
//!
//! Page indices are file pages of `memory.bin` (offset / 4096) that faulted, each at most once,
//! in the order they first faulted. `chunk bytes` and `flags` (bit 0: adaptive chunks) say how
//! the recording server served each fault; prefetch replays the same chunks.
//! The file is written atomically (temporary file, fsync, rename, fsync of the directory).

use std::path::{Path, PathBuf};

use super::sys::PAGE;

pub const FILE_NAME: &str = "workingset.bin";
pub const MAGIC: [u8; 8] = *b"MAWRKSET";
/// Bump on any incompatible change; loaders refuse other versions.
pub const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 4 + 8 + 8 + 4 + 4 + 8;
/// Flag: chunks grew with sequential faults (up to `chunk_bytes`) instead of being fixed.
pub const FLAG_ADAPTIVE: u32 = 1;
const TRAILER: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("working set file is truncated or has trailing bytes ({0} bytes)")]
    Length(usize),
    #[error("working set file has a wrong magic number")]
    BadMagic,
    #[error("working set format version {found} is not supported (this build reads {VERSION})")]
    UnknownVersion { found: u32 },
    #[error("working set CRC mismatch")]
    Crc,
    #[error("working set is for a {found}-byte memory file, this one has {expected} bytes")]
    MemorySize { found: u64, expected: u64 },
    #[error("working set page size {0} is not 4096")]
    PageSize(u32),
    #[error("working set chunk size {0} is not a power-of-two multiple of the page size")]
    Chunk(u64),
    #[error("working set has unknown flags {0:#x}")]
    Flags(u32),
    #[error("working set lists page {index}, past the memory file's {pages} pages")]
    BadIndex { index: u32, pages: u64 },
    #[error("working set lists page {0} twice")]
    Duplicate(u32),
}

/// File pages in first-touch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// Size of the memory file the indices refer to.
    pub memory_bytes: u64,
    /// The chunk served around each fault when it was recorded (the largest, if adaptive).
    pub chunk_bytes: u64,
    /// Chunks grew with sequential faults.
    pub adaptive: bool,
    pub pages: Vec<u32>,
}

fn valid_chunk(c: u64) -> bool {
    c >= PAGE && c.is_power_of_two()
}

impl WorkingSet {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.pages.len() * 4 + TRAILER);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(PAGE as u32).to_le_bytes());
        out.extend_from_slice(&self.memory_bytes.to_le_bytes());
        out.extend_from_slice(&self.chunk_bytes.to_le_bytes());
        let flags = if self.adaptive { FLAG_ADAPTIVE } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.pages {
            out.extend_from_slice(&p.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses `bytes`, refusing anything that does not describe pages of a memory file of
    /// exactly `memory_bytes` (each page at most once).
    pub fn decode(bytes: &[u8], memory_bytes: u64) -> Result<Self, WorkingSetError> {
        if bytes.len() < HEADER + TRAILER {
            return Err(WorkingSetError::Length(bytes.len()));
        }
        if bytes[..8] != MAGIC {
            return Err(WorkingSetError::BadMagic);
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(WorkingSetError::UnknownVersion { found: version });
        }
        let count = u64_at(40);
        let expect_len = count
            .checked_mul(4)
            .and_then(|n| n.checked_add((HEADER + TRAILER) as u64));
        if expect_len != Some(bytes.len() as u64) {
            return Err(WorkingSetError::Length(bytes.len()));
        }
        let crc_at = bytes.len() - TRAILER;
        if crc32fast::hash(&bytes[..crc_at]) != u32_at(crc_at) {
            return Err(WorkingSetError::Crc);
        }
        let page_size = u32_at(12);
        if u64::from(page_size) != PAGE {
            return Err(WorkingSetError::PageSize(page_size));
        }
        let found = u64_at(16);
        if found != memory_bytes {
            return Err(WorkingSetError::MemorySize {
                found,
                expected: memory_bytes,
            });
        }
        let chunk_bytes = u64_at(24);
        if !valid_chunk(chunk_bytes) {
            return Err(WorkingSetError::Chunk(chunk_bytes));
        }
        let flags = u32_at(32);
        if flags & !FLAG_ADAPTIVE != 0 || u32_at(36) != 0 {
            return Err(WorkingSetError::Flags(flags));
        }
        let pages_in_file = memory_bytes / PAGE;
        let mut seen = super::handler::Bitmap::new(pages_in_file);
        let mut pages = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let index = u32_at(HEADER + 4 * i);
            if u64::from(index) >= pages_in_file {
                return Err(WorkingSetError::BadIndex {
                    index,
                    pages: pages_in_file,
                });
            }
            if seen.test_and_set(u64::from(index)) {
                return Err(WorkingSetError::Duplicate(index));
            }
            pages.push(index);
        }
        Ok(Self {
            memory_bytes,
            chunk_bytes,
            adaptive: flags & FLAG_ADAPTIVE != 0,
            pages,
        })
    }

    /// Loads `path`; `Ok(None)` when it does not exist.
    pub fn load(path: &Path, memory_bytes: u64) -> Result<Option<Self>, WorkingSetError> {
        let io = |source| WorkingSetError::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = match std::fs::metadata(path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let max = (HEADER + TRAILER) as u64 + 4 * (memory_bytes / PAGE);
        if len > max {
            return Err(WorkingSetError::Length(len.min(usize::MAX as u64) as usize));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Self::decode(&bytes, memory_bytes).map(Some)
    }

    /// Writes `path` atomically: a reader sees the old file, no file, or all of the new one.
    pub fn write_atomic(&self, path: &Path) -> Result<(), WorkingSetError> {
        crate::atomic_file::write(path, &self.encode()).map_err(|source| WorkingSetError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Removes temporary files a writer of `path` left when it died mid-write (its process gone).
pub use crate::atomic_file::sweep as sweep_temporaries;

/// Records first touches: each file page once, in order.
#[derive(Debug)]
pub struct Recorder {
    seen: super::handler::Bitmap,
    pages: Vec<u32>,
    memory_bytes: u64,
    chunk_bytes: u64,
    adaptive: bool,
}

impl Recorder {
    pub fn new(memory_bytes: u64, chunk_bytes: u64, adaptive: bool) -> Self {
        Self {
            seen: super::handler::Bitmap::new(memory_bytes / PAGE),
            pages: Vec::new(),
            memory_bytes,
            chunk_bytes,
            adaptive,
        }
    }

    /// Notes a touch of file page `page`; later touches of the same page are ignored.
    pub fn touch(&mut self, page: u64) {
        if page < self.memory_bytes / PAGE
            && page <= u64::from(u32::MAX)
            && !self.seen.test_and_set(page)
        {
            self.pages.push(page as u32);
        }
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    pub fn finish(&self) -> WorkingSet {
        WorkingSet {
            memory_bytes: self.memory_bytes,
            chunk_bytes: self.chunk_bytes,
            adaptive: self.adaptive,
            pages: self.pages.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WorkingSet {
        WorkingSet {
            memory_bytes: 64 << 20,
            chunk_bytes: 65536,
            adaptive: true,
            pages: vec![5, 0, 16383, 77, 6],
        }
    }

    #[test]
    fn round_trip_and_every_corruption_is_refused() {
        let w = sample();
        let b = w.encode();
        assert_eq!(WorkingSet::decode(&b, 64 << 20).unwrap(), w);
        for n in 0..b.len() {
            assert!(WorkingSet::decode(&b[..n], 64 << 20).is_err(), "cut at {n}");
        }
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(WorkingSet::decode(&c, 64 << 20).is_err(), "flip at {i}");
        }
        assert!(matches!(
            WorkingSet::decode(&b, 32 << 20),
            Err(WorkingSetError::MemorySize { .. })
        ));
    }

    #[test]
    fn out_of_range_and_duplicate_pages_are_refused() {
        let mut w = sample();
        w.pages.push(16384);
        assert!(matches!(
            WorkingSet::decode(&w.encode(), 64 << 20),
            Err(WorkingSetError::BadIndex { index: 16384, .. })
        ));
        let mut w = sample();
        w.pages.push(77);
        assert!(matches!(
            WorkingSet::decode(&w.encode(), 64 << 20),
            Err(WorkingSetError::Duplicate(77))
        ));
        let mut w = sample();
        w.chunk_bytes = 3 * 4096;
        assert!(matches!(
            WorkingSet::decode(&w.encode(), 64 << 20),
            Err(WorkingSetError::Chunk(_))
        ));
    }

    #[test]
    fn recorder_keeps_first_touch_order_and_atomic_write() {
        let mut r = Recorder::new(1 << 20, 4096, false);
        for p in [3, 1, 3, 2, 1, 255, 256, 0] {
            r.touch(p);
        }
        let w = r.finish();
        assert_eq!(w.pages, vec![3, 1, 2, 255, 0]);
        let dir = std::env::temp_dir().join(format!("ws-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        assert!(WorkingSet::load(&path, 1 << 20).unwrap().is_none());
        w.write_atomic(&path).unwrap();
        assert_eq!(WorkingSet::load(&path, 1 << 20).unwrap().unwrap(), w);
        // A temporary left by a dead writer is swept; a live writer's is kept.
        let dead = dir.join(format!(".{FILE_NAME}.tmp-999999999-0"));
        let live = dir.join(format!(".{FILE_NAME}.tmp-{}-77", std::process::id()));
        std::fs::write(&dead, b"x").unwrap();
        std::fs::write(&live, b"x").unwrap();
        sweep_temporaries(&path);
        assert!(!dead.exists() && live.exists());
        std::fs::remove_file(&live).unwrap();
        // Overwrite in place; no temporary files left behind.
        r.touch(9);
        r.finish().write_atomic(&path).unwrap();
        assert_eq!(
            WorkingSet::load(&path, 1 << 20)
                .unwrap()
                .unwrap()
                .pages
                .len(),
            6
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
