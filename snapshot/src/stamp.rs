//! Verified stamps: a file whose digest was checked (or written) on this host, and which has not
//! changed since, need not be read again before every restore.
//!
//! A stamp records the file's identity and change times (device, inode, size, mtime, ctime) with
//! the digest it was found to have. Any change through the filesystem moves ctime, which no
//! unprivileged program can set back, so a matching stamp means the bytes are the ones that were
//! hashed. That makes restore cost independent of memory size: the manifest and state are read
//! and checked in full (small), the memory file is not re-hashed. What a stamp cannot see is
//! corruption below the filesystem (a disk flipping a bit in place); `inspect --verify` and
//! `VerifyOptions::recheck` read everything again, and so does every path by which a file enters
//! the host (capture hashes what it writes, import and pull hash what they receive).
//!
//! Stamps live beside the manifest in `verified.json`, host-local: archives and remotes carry the
//! manifest's files only. A missing, unreadable or malformed stamp file only means "hash again".

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub const STAMPS: &str = "verified.json";
/// A stamp file larger than this is not ours: ignore it.
const MAX_STAMPS_BYTES: u64 = 64 << 10;

/// A file's identity and change times, as `stat` gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    id: FileId,
    digest: String,
}

/// The stamps of one snapshot directory, keyed by file name (or `kernel:` and a path).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Stamps {
    files: BTreeMap<String, Stamp>,
    #[serde(skip)]
    changed: bool,
}

impl Stamps {
    /// The stamps in `dir`; none when the file is missing or not one we wrote.
    pub fn load(dir: &Path) -> Self {
        let path = dir.join(STAMPS);
        let read = || -> Option<Self> {
            let meta = std::fs::metadata(&path).ok()?;
            if meta.len() > MAX_STAMPS_BYTES {
                return None;
            }
            serde_json::from_slice(&std::fs::read(&path).ok()?).ok()
        };
        read().unwrap_or_default()
    }

    /// Whether `key` was found to have `digest` and is, by its stat, still the same file.
    pub fn vouches(&self, key: &str, id: &FileId, digest: &str) -> bool {
        self.files
            .get(key)
            .is_some_and(|s| &s.id == id && s.digest == digest)
    }

    pub fn record(&mut self, key: &str, id: FileId, digest: &str) {
        let stamp = Stamp {
            id,
            digest: digest.to_string(),
        };
        if self.files.get(key) != Some(&stamp) {
            self.files.insert(key.to_string(), stamp);
            self.changed = true;
        }
    }

    /// Stamps every file of a snapshot just written with the digests its capture computed from
    /// the bytes it wrote, so the first restore after a capture does not read them all again.
    pub fn record_captured(dir: &Path, manifest: &crate::Manifest) {
        let mut stamps = Self::default();
        for f in &manifest.files {
            if let Ok(meta) = std::fs::metadata(dir.join(&f.name)) {
                stamps.record(&f.name, FileId::of(&meta), &f.digest);
            }
        }
        // A cache: without it the first restore hashes everything, as it always did.
        let _ = stamps.save(dir);
    }

    /// Writes the stamps if any changed (temporary file and rename, 0600). A failure is
    /// returned for the caller to ignore or report: stamps are a cache, never required.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        if !self.changed {
            return Ok(());
        }
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        // Not durable: a stamp lost in a crash costs one re-hash.
        crate::atomic_file::Options::default()
            .mode(0o600)
            .durable(false)
            .write(&dir.join(STAMPS), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary one, removed at the end.
    struct TempDir(std::path::PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("stamp-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_change_through_the_filesystem_voids_the_stamp() {
        let dir = TempDir::new("change");
        let p = dir.path().join("memory.bin");
        std::fs::write(&p, b"abcd").unwrap();
        let mut s = Stamps::default();
        s.record(
            "memory.bin",
            FileId::of(&std::fs::metadata(&p).unwrap()),
            "d1",
        );
        s.save(dir.path()).unwrap();
        let s = Stamps::load(dir.path());
        let id = FileId::of(&std::fs::metadata(&p).unwrap());
        assert!(s.vouches("memory.bin", &id, "d1"));
        assert!(!s.vouches("memory.bin", &id, "d2"), "another digest");
        assert!(!s.vouches("rootfs.ext4", &id, "d1"), "another file");

        // Same size, same mtime set back: ctime still moves.
        let before = std::fs::metadata(&p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.write_all_at(b"X", 1).unwrap();
            f.set_modified(before.modified().unwrap()).unwrap();
        }
        let id = FileId::of(&std::fs::metadata(&p).unwrap());
        assert!(!s.vouches("memory.bin", &id, "d1"));
    }

    #[test]
    fn a_malformed_or_oversized_stamp_file_is_no_stamps() {
        let dir = TempDir::new("malformed");
        std::fs::write(dir.path().join(STAMPS), b"{not json").unwrap();
        assert!(Stamps::load(dir.path()).files.is_empty());
        std::fs::write(dir.path().join(STAMPS), vec![b' '; 70 << 10]).unwrap();
        assert!(Stamps::load(dir.path()).files.is_empty());
    }
}
