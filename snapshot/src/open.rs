//! Opening a snapshot for restore: the manifest, then every check that can refuse it, each with
//! a reason a script can act on.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::digest;
use crate::error::{io, Refusal, SnapshotError};
use crate::hostcpu::HostCpu;
use crate::manifest::{Manifest, ManifestError, MEMORY, ROOTFS, VMSTATE};
use crate::stamp::{FileId, Stamps};
use crate::vmstate;

/// A complete snapshot directory with a valid manifest.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// What `verify` checks beyond the manifest and file sizes.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions<'a> {
    /// The kernel the restored VM would claim to run: its sha256 must match.
    pub kernel: Option<&'a Path>,
    /// Compare every file's digest; a file whose verified stamp still matches (see `stamp`) is
    /// not read again.
    pub contents: bool,
    /// Read every file again even where a stamp vouches for it.
    pub recheck: bool,
}

impl Snapshot {
    /// Opens `dir`; refuses a missing or invalid manifest.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        if !dir.is_dir() {
            return Err(SnapshotError::NotFound(dir.display().to_string()));
        }
        let manifest = Manifest::load(dir).map_err(|e| match e {
            ManifestError::Missing => SnapshotError::NotFound(dir.display().to_string()),
            e => Refusal::Manifest(e).into(),
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Opens one of the snapshot's files (or its manifest) to read it whole: never through a
    /// link, only a regular file. A jailed VMM writes its snapshots; what reads them whole to
    /// send elsewhere (export, push) runs as root and must not be led to another host file.
    pub fn open_member(&self, name: &str) -> std::io::Result<std::fs::File> {
        crate::untrusted::open(&self.path(name))
    }

    pub fn memory_path(&self) -> PathBuf {
        self.path(MEMORY)
    }

    /// The rootfs copy, when the snapshot has one.
    pub fn rootfs_path(&self) -> Option<PathBuf> {
        self.manifest.file(ROOTFS).map(|_| self.path(ROOTFS))
    }

    /// Refuses the snapshot if the kernel, the CPU vendor, a file's size or (with `contents`) a
    /// file's digest differs from the manifest.
    pub fn verify(&self, opts: &VerifyOptions<'_>) -> Result<(), SnapshotError> {
        let host = HostCpu::current();
        if host.vendor != self.manifest.host_cpu.vendor {
            return Err(Refusal::CpuVendor {
                saved: self.manifest.host_cpu.vendor.clone(),
                host: host.vendor,
            }
            .into());
        }
        let mut stamps = Stamps::load(&self.dir);
        if let Some(kernel) = opts.kernel {
            let kernel_err = |source| SnapshotError::Kernel {
                path: kernel.to_path_buf(),
                source,
            };
            let key = format!("kernel:{}", kernel.display());
            let id = FileId::of(&std::fs::metadata(kernel).map_err(kernel_err)?);
            let expected = &self.manifest.kernel.sha256;
            let actual = if !opts.recheck && stamps.vouches(&key, &id, expected) {
                expected.clone()
            } else {
                let actual = digest::sha256_file(kernel).map_err(kernel_err)?;
                stamps.record(&key, id, &actual);
                actual
            };
            if actual != self.manifest.kernel.sha256 {
                return Err(Refusal::KernelMismatch {
                    path: kernel.display().to_string(),
                    expected: self.manifest.kernel.sha256.clone(),
                    actual,
                }
                .into());
            }
        }
        for f in &self.manifest.files {
            let p = self.path(&f.name);
            let meta = match std::fs::symlink_metadata(&p) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Refusal::MissingFile(f.name.clone()).into())
                }
                Err(e) => return Err(io("cannot stat", &p)(e)),
            };
            if !meta.is_file() {
                return Err(Refusal::NotRegular(f.name.clone()).into());
            }
            if meta.len() != f.size {
                return Err(Refusal::Size {
                    file: f.name.clone(),
                    expected: f.size,
                    actual: meta.len(),
                }
                .into());
            }
            let id = FileId::of(&meta);
            if opts.contents && (opts.recheck || !stamps.vouches(&f.name, &id, &f.digest)) {
                let (actual, _) = digest::file_digest(&p).map_err(io("cannot read", &p))?;
                if actual != f.digest {
                    return Err(Refusal::Digest {
                        file: f.name.clone(),
                        expected: f.digest.clone(),
                        actual,
                    }
                    .into());
                }
                stamps.record(&f.name, id, &f.digest);
            }
        }
        // A cache: a snapshot directory we cannot write to is verified in full next time.
        let _ = stamps.save(&self.dir);
        Ok(())
    }

    /// This snapshot and its ancestors, base (a full snapshot) first. Refuses a missing parent,
    /// a cycle, or a chain longer than `MAX_CHAIN`.
    pub fn chain(&self) -> Result<Vec<Snapshot>, SnapshotError> {
        let mut out = vec![self.clone()];
        while let Some(parent) = out.last().and_then(|s| s.manifest.parent.clone()) {
            if out.len() >= crate::manifest::MAX_CHAIN
                || out.iter().any(|s| s.manifest.tag == parent)
            {
                return Err(Refusal::Manifest(ManifestError::Invalid(format!(
                    "the parent chain of {} is too long or loops",
                    self.manifest.tag
                )))
                .into());
            }
            let dir = self.dir.parent().unwrap_or(Path::new(".")).join(&parent);
            let p = Snapshot::open(&dir).map_err(|e| match e {
                SnapshotError::NotFound(_) => {
                    Refusal::MissingFile(format!("parent snapshot {parent}")).into()
                }
                e => e,
            })?;
            out.push(p);
        }
        out.reverse();
        Ok(out)
    }

    /// For a diff: the pages its memory file holds (a bit per page over all of guest RAM).
    pub fn dirty_pages(&self) -> Result<Option<Vec<u64>>, SnapshotError> {
        if self.manifest.file(crate::manifest::DIRTY).is_none() {
            return Ok(None);
        }
        let p = self.path(crate::manifest::DIRTY);
        let bytes = std::fs::read(&p).map_err(io("cannot read", &p))?;
        Ok(Some(crate::memfile::decode_dirty(&bytes)))
    }

    /// Checks `vmstate.bin`'s magic, version and CRC without decoding it.
    pub fn check_state(&self) -> Result<(), SnapshotError> {
        let bytes = self.read_state()?;
        vmstate::validate(&bytes).map_err(|e| Refusal::State(e).into())
    }

    fn read_state(&self) -> Result<Vec<u8>, SnapshotError> {
        let p = self.path(VMSTATE);
        let max = vmstate::MAX_PAYLOAD + 64;
        let len = std::fs::metadata(&p).map_err(io("cannot stat", &p))?.len();
        if len > max {
            return Err(Refusal::State(vmstate::StateError::BadLength(len)).into());
        }
        std::fs::read(&p).map_err(io("cannot read", &p))
    }

    /// Decodes `vmstate.bin` (magic, version and CRC checked).
    pub fn load_state<S: DeserializeOwned>(&self) -> Result<S, SnapshotError> {
        let p = self.path(VMSTATE);
        let max = vmstate::MAX_PAYLOAD + 64;
        let len = std::fs::metadata(&p).map_err(io("cannot stat", &p))?.len();
        if len > max {
            return Err(Refusal::State(vmstate::StateError::BadLength(len)).into());
        }
        let bytes = std::fs::read(&p).map_err(io("cannot read", &p))?;
        vmstate::decode(&bytes).map_err(|e| Refusal::State(e).into())
    }
}

/// Every complete snapshot in `dir`, oldest first. Directories without a valid manifest
/// (leftovers, foreign files) are skipped.
pub fn list(dir: &Path) -> Vec<Snapshot> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Snapshot> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Snapshot::open(&e.path()).ok())
        .collect();
    out.sort_by(|a, b| {
        let key = |s: &Snapshot| {
            (
                s.manifest.created_unix,
                s.manifest.created_ns,
                s.manifest.tag.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    out
}

impl Snapshot {
    /// Points a diff at its renamed parent (the manifest is rewritten atomically).
    pub fn set_parent(&self, parent: &str) -> Result<(), SnapshotError> {
        let mut m = self.manifest.clone();
        m.parent = Some(parent.to_string());
        self.write_manifest(&m)
    }

    fn write_manifest(&self, m: &Manifest) -> Result<(), SnapshotError> {
        let path = self.path(crate::manifest::MANIFEST);
        crate::atomic_file::write(&path, &m.to_json()).map_err(io("cannot replace", &path))
    }

    /// Renames the snapshot and/or changes its note. The manifest is rewritten atomically
    /// (checksum included), then the directory is renamed.
    pub fn edit(
        &self,
        new_tag: Option<&str>,
        note: Option<Option<String>>,
    ) -> Result<Snapshot, SnapshotError> {
        let mut m = self.manifest.clone();
        let target = match new_tag {
            Some(t) if t != m.tag => {
                if !crate::manifest::is_safe_name(t) {
                    return Err(SnapshotError::InvalidTag(t.to_string()));
                }
                let parent = self.dir.parent().unwrap_or(Path::new("."));
                let target = parent.join(t);
                if target.exists() {
                    return Err(SnapshotError::Exists(t.to_string()));
                }
                m.tag = t.to_string();
                Some(target)
            }
            _ => None,
        };
        if let Some(n) = note {
            m.note = n;
        }
        self.write_manifest(&m)?;
        let dir = match target {
            Some(t) => {
                std::fs::rename(&self.dir, &t).map_err(io("cannot rename", &self.dir))?;
                t
            }
            None => self.dir.clone(),
        };
        if let Some(parent) = dir.parent() {
            crate::capture::fsync_dir(parent)?;
        }
        Ok(Snapshot { dir, manifest: m })
    }

    /// Deletes the snapshot: renamed aside first, so a half-deleted one never looks complete.
    pub fn delete(self) -> Result<(), SnapshotError> {
        let parent = self.dir.parent().unwrap_or(Path::new(".")).to_path_buf();
        let doomed = parent.join(format!(
            ".deleting-{}-{}",
            self.manifest.tag,
            std::process::id()
        ));
        std::fs::rename(&self.dir, &doomed).map_err(io("cannot delete", &self.dir))?;
        std::fs::remove_dir_all(&doomed).map_err(io("cannot delete", &doomed))
    }
}
