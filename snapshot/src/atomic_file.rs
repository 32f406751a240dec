//! Replacing a file atomically: the new contents go to a temporary file beside it, which is
//! renamed over the target once complete, so a reader (or a crash) sees the old file, no file,
//! or all of the new one, never a torn mix.
//!
//! Durable by default: the temporary file is fsynced before the rename and the directory after
//! it, so a replaced file survives a power loss. Caches whose entries are checked on every read
//! can skip both ([`Options::durable`]).
//!
//! Temporary names are `.<name>.tmp-<pid>-<seq>`: unique per writer (two threads of a process
//! may replace the same file at once), hidden from listings of the directory, and recognisable by
//! [`sweep`] once their writer is dead.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// How a file is replaced. `Options::default()`: durable, mode from the umask.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    mode: Option<u32>,
    durable: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            mode: None,
            durable: true,
        }
    }
}

impl Options {
    /// The new file's permission bits, exactly (the umask does not apply).
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode);
        self
    }

    /// Whether to fsync the file and its directory (default yes).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Starts a replacement of `path`; write to the result, then [`AtomicFile::commit`].
    pub fn create(self, path: &Path) -> io::Result<AtomicFile> {
        let dir = parent_dir(path).to_path_buf();
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = dir.join(format!(
            "{}{}-{}",
            temp_prefix(&name.to_string_lossy()),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let mut open = OpenOptions::new();
        // create_new: never write through a link or into another writer's file.
        open.write(true).create_new(true);
        if let Some(mode) = self.mode {
            open.mode(mode);
        }
        let file = open.open(&tmp)?;
        let file = AtomicFile {
            file,
            tmp,
            path: path.to_path_buf(),
            dir,
            durable: self.durable,
            committed: false,
        };
        if let Some(mode) = self.mode {
            file.file
                .set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        Ok(file)
    }

    /// Replaces `path` with `bytes`.
    pub fn write(self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let mut f = self.create(path)?;
        f.write_all(bytes)?;
        f.commit()
    }
}

/// Replaces `path` with `bytes`, durably (see [`Options`] for other settings).
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    Options::default().write(path, bytes)
}

/// A replacement in progress. Dropped without [`commit`](Self::commit), it removes its temporary
/// file and leaves the target as it was.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
    durable: bool,
    committed: bool,
}

impl AtomicFile {
    /// The file being written (for writers that want a `File`, not only `Write`).
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Puts the written contents in place of the target.
    pub fn commit(mut self) -> io::Result<()> {
        self.file.flush()?;
        if self.durable {
            self.file.sync_all()?;
        }
        std::fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        if self.durable {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Removes temporary files that writers of `path` left when they died mid-write (their process
/// gone). Files of live writers stay.
pub fn sweep(path: &Path) {
    let Some(name) = path.file_name() else {
        return;
    };
    let prefix = temp_prefix(&name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(parent_dir(path)) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = n.strip_prefix(&prefix) else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = match pid {
            // SAFETY: signal 0 only checks that the process exists.
            Some(p) if p > 0 => unsafe { libc::kill(p, 0) == 0 },
            _ => false,
        };
        if !alive {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn temp_prefix(name: &str) -> String {
    format!(".{name}.tmp-")
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("atomic-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn replaces_the_contents_and_leaves_no_temporary() {
        let d = TempDir::new("replace");
        let p = d.0.join("f.json");
        write(&p, b"one").unwrap();
        write(&p, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two, longer");
        assert_eq!(d.names(), ["f.json"]);
    }

    #[test]
    fn an_uncommitted_replacement_leaves_the_old_file() {
        let d = TempDir::new("abandon");
        let p = d.0.join("f");
        write(&p, b"old").unwrap();
        let mut f = Options::default().create(&p).unwrap();
        f.write_all(b"half of the new").unwrap();
        // Before the commit, readers see the old contents.
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(d.names().len(), 2);
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(d.names(), ["f"]);
    }

    #[test]
    fn mode_is_exact_whatever_the_umask() {
        let d = TempDir::new("mode");
        for mode in [0o600, 0o755] {
            let p = d.0.join(format!("m{mode:o}"));
            Options::default().mode(mode).write(&p, b"x").unwrap();
            let got = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
            assert_eq!(got, mode);
        }
    }

    #[test]
    fn concurrent_writers_of_one_file_do_not_collide() {
        let d = TempDir::new("threads");
        let p = d.0.join("f");
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..20 {
                        write(p, &[i; 4096]).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), 4096);
        assert!(got.iter().all(|&b| b == got[0]), "a torn file");
        assert_eq!(d.names(), ["f"]);
    }

    #[test]
    fn sweep_removes_only_dead_writers_temporaries() {
        let d = TempDir::new("sweep");
        let p = d.0.join("f");
        let dead = d.0.join(".f.tmp-999999999-0");
        let live = d.0.join(format!(".f.tmp-{}-77", std::process::id()));
        let other = d.0.join(".g.tmp-999999999-0");
        for f in [&dead, &live, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        sweep(&p);
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(other.exists());
    }
}
