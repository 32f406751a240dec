//! The image cache: `<state root>/images/<alg>-<manifest digest hex>/{rootfs.ext4,image.json}`.
//!
//! An entry is built in `images/.build-<pid>-<n>/` and appears with one rename of its finished
//! `entry/` subdirectory, so a crash or a refused image never leaves a partial entry; build
//! directories of dead processes are swept when the cache is next opened. Reference updates,
//! commits and removals hold `images/.lock`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use snapshot::file_lock::{FileLock, LockError};

use super::digest::Digest;
use super::reference::SourceSpec;
use super::spec::RuntimeConfig;
use super::ImageError;

/// The version of `image.json`; an entry of another version is ignored (and rebuilt on pull).
pub const FORMAT: u32 = 1;
pub const IMAGE: &str = "rootfs.ext4";
pub const META: &str = "image.json";
const LOCK: &str = ".lock";
const BUILD_PREFIX: &str = ".build-";
const REMOVING_PREFIX: &str = ".rm-";

/// What the cache knows about an entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    /// The linux/amd64 manifest digest (for a docker archive, of the manifest it implies).
    pub digest: String,
    /// Names this entry answers to, newest first; a name belongs to one entry at a time.
    pub references: Vec<String>,
    pub config_digest: String,
    pub platform: String,
    pub layers: usize,
    /// The layers as transferred.
    pub compressed_bytes: u64,
    /// The unpacked files, agent and init included.
    pub content_bytes: u64,
    /// The ext4 image's size (sparse: free space takes no room on the host).
    pub image_bytes: u64,
    pub headroom_mib: u64,
    /// The guest agent baked in; a pull with another agent builds again.
    pub agent_sha256: String,
    pub created: String,
    /// The image's entrypoint, command, environment, working directory and user.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

pub struct Entry {
    pub dir: PathBuf,
    pub meta: Meta,
}

impl Entry {
    pub fn image_path(&self) -> PathBuf {
        self.dir.join(IMAGE)
    }
}

pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    snapshot::manifest::rfc3339(now)
}

fn key(d: &Digest) -> String {
    format!("{}-{}", d.algorithm_name(), d.hex)
}

pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// Opens (creating) `<root>/images` and sweeps what dead builds left.
    pub fn open(root: &Path) -> Result<Cache, ImageError> {
        let dir = root.join("images");
        std::fs::create_dir_all(&dir).map_err(ImageError::io("cannot create", &dir))?;
        let cache = Cache { dir };
        cache.sweep();
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<FileLock, ImageError> {
        FileLock::acquire(&self.dir.join(LOCK)).map_err(|e| match e {
            LockError::Open { path, source } => ImageError::Io {
                what: "cannot open",
                path,
                source,
            },
            LockError::Lock { path, source } => ImageError::Io {
                what: "cannot lock",
                path,
                source,
            },
        })
    }

    /// Removes build directories whose process is gone, and half-removed entries.
    fn sweep(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(BUILD_PREFIX)
                .or_else(|| name.strip_prefix(REMOVING_PREFIX))
                .or_else(|| name.strip_prefix(super::archive::SCRATCH_PREFIX))
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(pid) = pid {
                // SAFETY: signal 0 only probes whether the process exists.
                let alive = unsafe { libc::kill(pid, 0) } == 0
                    || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
                if !alive {
                    let _ = std::fs::remove_dir_all(e.path());
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    fn read_entry(dir: &Path) -> Option<Entry> {
        let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join(META)).ok()?).ok()?;
        if meta.format != FORMAT || !dir.join(IMAGE).is_file() {
            return None;
        }
        Some(Entry {
            dir: dir.to_path_buf(),
            meta,
        })
    }

    pub fn get(&self, d: &Digest) -> Option<Entry> {
        Self::read_entry(&self.dir.join(key(d)))
    }

    pub fn list(&self) -> Vec<Entry> {
        let mut v: Vec<Entry> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .filter_map(|e| Self::read_entry(&e.path()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort_by(|a, b| {
            b.meta
                .created
                .cmp(&a.meta.created)
                .then(a.meta.digest.cmp(&b.meta.digest))
        });
        v
    }

    pub fn find_reference(&self, name: &str) -> Option<Entry> {
        self.list()
            .into_iter()
            .find(|e| e.meta.references.iter().any(|r| r == name))
    }

    /// Starts a build in a private temporary directory.
    pub fn begin(&self) -> Result<Build, ImageError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = self.dir.join(format!(
            "{BUILD_PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        for d in [
            dir.clone(),
            dir.join("entry"),
            dir.join("blobs"),
            dir.join("rootfs"),
        ] {
            std::fs::create_dir(&d).map_err(ImageError::io("cannot create", &d))?;
        }
        Ok(Build {
            dir,
            cache_dir: self.dir.clone(),
            committed: false,
        })
    }

    fn write_meta(dir: &Path, meta: &Meta) -> Result<(), ImageError> {
        let p = dir.join(META);
        let mut bytes =
            serde_json::to_vec_pretty(meta).map_err(|e| ImageError::Malformed(e.to_string()))?;
        bytes.push(b'\n');
        snapshot::atomic_file::write(&p, &bytes).map_err(ImageError::io("cannot write", &p))
    }

    /// Gives `name` to the entry for `d` (taking it from any other entry).
    pub fn add_reference(&self, d: &Digest, name: &str) -> Result<Entry, ImageError> {
        let _lock = self.lock()?;
        for mut e in self.list() {
            if e.meta.digest != d.to_string() && e.meta.references.iter().any(|r| r == name) {
                e.meta.references.retain(|r| r != name);
                Self::write_meta(&e.dir, &e.meta)?;
            }
        }
        let mut e = self
            .get(d)
            .ok_or_else(|| ImageError::NotFound(format!("image {d} is not in the cache")))?;
        if e.meta.references.first().map(String::as_str) != Some(name) {
            e.meta.references.retain(|r| r != name);
            e.meta.references.insert(0, name.to_string());
            Self::write_meta(&e.dir, &e.meta)?;
        }
        Ok(e)
    }

    /// Removes the entry a reference, digest or digest prefix (12+ hex digits) names.
    pub fn remove(&self, sel: &str) -> Result<Meta, ImageError> {
        let _lock = self.lock()?;
        let entries = self.list();
        let canonical = match SourceSpec::parse(sel) {
            Ok(SourceSpec::Registry(r)) => Some(r.to_string()),
            _ => None,
        };
        let by_ref: Vec<&Entry> = entries
            .iter()
            .filter(|e| {
                e.meta
                    .references
                    .iter()
                    .any(|r| r == sel || Some(r) == canonical.as_ref())
            })
            .collect();
        let hex = sel.strip_prefix("sha256:").unwrap_or(sel);
        let by_digest: Vec<&Entry> =
            if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                entries
                    .iter()
                    .filter(|e| {
                        e.meta
                            .digest
                            .strip_prefix("sha256:")
                            .is_some_and(|h| h.starts_with(hex))
                    })
                    .collect()
            } else {
                Vec::new()
            };
        let chosen = match (by_ref.as_slice(), by_digest.as_slice()) {
            ([e], _) => *e,
            ([], [e]) => *e,
            ([], []) => return Err(ImageError::NotFound(format!("no cached image {sel}"))),
            _ => {
                return Err(ImageError::BadReference {
                    reference: sel.to_string(),
                    reason: "it matches more than one cached image; give the full digest".into(),
                })
            }
        };
        let doomed = self.dir.join(format!(
            "{REMOVING_PREFIX}{}-{}",
            std::process::id(),
            chosen.dir.file_name().unwrap_or_default().to_string_lossy()
        ));
        std::fs::rename(&chosen.dir, &doomed)
            .map_err(ImageError::io("cannot remove", &chosen.dir))?;
        std::fs::remove_dir_all(&doomed).map_err(ImageError::io("cannot remove", &doomed))?;
        Ok(chosen.meta.clone())
    }
}

/// A build in progress; removed on drop unless committed.
pub struct Build {
    dir: PathBuf,
    cache_dir: PathBuf,
    committed: bool,
}

impl Build {
    #[cfg(test)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blobs_dir(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    pub fn rootfs_dir(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    pub fn image_path(&self) -> PathBuf {
        self.dir.join("entry").join(IMAGE)
    }

    /// Frees the downloaded layers once they are unpacked.
    pub fn drop_blobs(&self) {
        let _ = std::fs::remove_dir_all(self.blobs_dir());
    }

    /// Writes the metadata and renames the entry into place (replacing an older build).
    pub fn commit(mut self, d: &Digest, meta: Meta) -> Result<Entry, ImageError> {
        let staged = self.dir.join("entry");
        Cache::write_meta(&staged, &meta)?;
        let _ = std::fs::remove_dir_all(self.rootfs_dir());
        let cache = Cache {
            dir: self.cache_dir.clone(),
        };
        let _lock = cache.lock()?;
        let dest = self.cache_dir.join(key(d));
        if dest.exists() {
            let old = self.cache_dir.join(format!(
                "{REMOVING_PREFIX}{}-{}",
                std::process::id(),
                key(d)
            ));
            std::fs::rename(&dest, &old).map_err(ImageError::io("cannot replace", &dest))?;
            let _ = std::fs::remove_dir_all(&old);
        }
        std::fs::rename(&staged, &dest).map_err(ImageError::io("cannot create", &dest))?;
        self.committed = true;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(Entry { dir: dest, meta })
    }
}

impl Drop for Build {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(d: &Digest, name: &str) -> Meta {
        Meta {
            format: FORMAT,
            digest: d.to_string(),
            references: vec![name.into()],
            config_digest: String::new(),
            platform: "linux/amd64".into(),
            layers: 1,
            compressed_bytes: 1,
            content_bytes: 1,
            image_bytes: 1,
            headroom_mib: 0,
            agent_sha256: String::new(),
            created: now_rfc3339(),
            runtime: RuntimeConfig::default(),
        }
    }

    fn commit(c: &Cache, d: &Digest, name: &str) {
        let b = c.begin().unwrap();
        std::fs::write(b.image_path(), b"ext4").unwrap();
        b.commit(d, meta(d, name)).unwrap();
    }

    #[test]
    fn entries_references_and_removal() {
        let root = std::env::temp_dir().join(format!("ma-cache-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let c = Cache::open(&root).unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        commit(&c, &a, "docker.io/library/x:1");
        commit(&c, &b, "docker.io/library/y:1");
        assert_eq!(c.list().len(), 2);
        // A tag moves: the old entry loses it.
        c.add_reference(&b, "docker.io/library/x:1").unwrap();
        assert!(c.get(&a).unwrap().meta.references.is_empty());
        assert_eq!(
            c.find_reference("docker.io/library/x:1")
                .unwrap()
                .meta
                .digest,
            b.to_string()
        );
        // Removal by short name, by digest prefix; unknown names are not found.
        assert!(matches!(c.remove("nope"), Err(ImageError::NotFound(_))));
        assert_eq!(c.remove("y:1").unwrap().digest, b.to_string());
        assert_eq!(c.remove(&a.hex[..12]).unwrap().digest, a.to_string());
        assert!(c.list().is_empty());
        // A dropped build leaves nothing; nothing but the lock file remains.
        let build = c.begin().unwrap();
        let dir = build.dir().to_path_buf();
        drop(build);
        assert!(!dir.exists());
        let left: Vec<_> = std::fs::read_dir(c.dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(LOCK)]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
