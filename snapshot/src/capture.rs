//! Capture: state first (in memory: a host that cannot save it fails before anything is written),
//! then every file into a temporary directory, fsynced, the manifest last, one rename into place.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::digest::{self, FileDigest};
use crate::error::{io, SnapshotError};
use crate::hostcpu::HostCpu;
use crate::manifest::{
    is_safe_name, rfc3339, FileEntry, KernelRef, Kind, Manifest, DIRTY, FORMAT_VERSION, MANIFEST,
    MEMORY, ROOTFS, VMSTATE,
};
use crate::pagedigest::{self, PageDigests};
use crate::residue::{Scanner, SecretScan};
use crate::{faults, memfile, rootfs, vmstate, SavedVm, Snapshottable};

pub const TMP_PREFIX: &str = ".tmp-";

/// What to capture besides the VM itself.
#[derive(Debug, Clone)]
pub struct CaptureRequest<'a> {
    /// The directory holding this workspace's snapshots; the snapshot becomes `<dir>/<tag>`.
    pub dir: &'a Path,
    pub tag: &'a str,
    pub kernel: &'a Path,
    pub cmdline: &'a str,
    pub rootfs: Option<&'a Path>,
    pub image: Option<&'a str>,
    pub workspace: Option<&'a str>,
    pub note: Option<&'a str>,
    /// Capture only the pages written since this snapshot (in `dir`) was taken: a diff.
    pub parent: Option<&'a str>,
    /// Scan every file for these delivered secrets before the snapshot becomes visible.
    pub secrets: Option<SecretCheck<'a>>,
}

/// The host-side scan for delivered secrets (see [`crate::residue`]).
#[derive(Debug, Clone, Copy)]
pub struct SecretCheck<'a> {
    pub scanner: &'a Scanner,
    /// Refuse ([`SnapshotError::SecretResidue`]) a capture that holds any, keeping nothing;
    /// otherwise the findings are recorded in the manifest.
    pub strict: bool,
}

/// Scans the files written into `tmp`, before the manifest: a refusal leaves nothing behind (the
/// caller's guard removes `tmp`).
fn check_secrets(
    check: Option<SecretCheck<'_>>,
    tmp: &Path,
    files: &[FileEntry],
) -> Result<Option<SecretScan>, SnapshotError> {
    let Some(check) = check else {
        return Ok(None);
    };
    let paths: Vec<(String, PathBuf)> = files
        .iter()
        .map(|f| (f.name.clone(), tmp.join(&f.name)))
        .collect();
    let list: Vec<(&str, &Path)> = paths
        .iter()
        .map(|(n, p)| (n.as_str(), p.as_path()))
        .collect();
    let report = check.scanner.scan_files(&list)?;
    if check.strict && report.has_residue() {
        return Err(SnapshotError::SecretResidue(Box::new(report)));
    }
    Ok(Some(report))
}

/// Progress of a long capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Memory { done: u64, total: u64 },
    Rootfs,
    Done,
}

/// Captures `vm` (which must be paused) as snapshot `req.tag`.
pub fn capture<V: Snapshottable>(
    vm: &V,
    req: &CaptureRequest<'_>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Manifest, SnapshotError> {
    if !is_safe_name(req.tag) {
        return Err(SnapshotError::InvalidTag(req.tag.to_string()));
    }
    let final_dir = req.dir.join(req.tag);
    if final_dir.exists() {
        return Err(SnapshotError::Exists(req.tag.to_string()));
    }
    let kernel_sha = digest::sha256_file(req.kernel).map_err(|source| SnapshotError::Kernel {
        path: req.kernel.to_path_buf(),
        source,
    })?;
    if let Some(r) = req.rootfs {
        std::fs::metadata(r).map_err(|source| SnapshotError::Rootfs {
            path: r.to_path_buf(),
            source,
        })?;
    }
    // A diff finds its pages by content: the parent's page digests (and their key).
    let parent_digests = match req.parent {
        Some(p) => {
            let parent = crate::open::Snapshot::open(&req.dir.join(p)).map_err(|e| match e {
                SnapshotError::NotFound(_) => SnapshotError::NotFound(format!(
                    "parent {p}: take a full snapshot to diff against"
                )),
                e => e,
            })?;
            if parent.manifest.file(pagedigest::FILE).is_none() {
                return Err(SnapshotError::ParentWithoutDigests(p.to_string()));
            }
            Some(
                PageDigests::read(&parent.dir.join(pagedigest::FILE))
                    .map_err(|e| SnapshotError::Save(Box::new(e)))?,
            )
        }
        None => None,
    };
    let SavedVm {
        state,
        vcpus,
        mem_mib,
        cpuid,
    } = vm.save().map_err(|e| SnapshotError::Save(Box::new(e)))?;
    let state_bytes = vmstate::encode(&state).map_err(SnapshotError::Encode)?;
    // From here on the pages written since the previous capture are ours: a failure gives
    // them back, so the next diff still has them.
    let dirty = vm
        .take_dirty()
        .map_err(|e| SnapshotError::Save(Box::new(e)))?;
    let seed = parent_digests
        .as_ref()
        .map_or_else(pagedigest::new_seed, |d| d.seed);
    let digests = PageDigests::of_memory(vm.guest_memory(), seed)
        .map_err(|e| SnapshotError::Save(Box::new(e)));
    // Without an armed dirty log (the normal case), a diff's pages are those whose content
    // changed since the parent; with one (a live capture), the log says it.
    let changed = match (&parent_digests, &dirty, &digests) {
        (Some(_), Some(d), _) => Some(d.clone()),
        (Some(parent), None, Ok(now)) => Some(now.changed_since(parent, vm.guest_memory())),
        _ => None,
    };
    let result = digests.and_then(|digests| {
        write_snapshot(
            vm,
            req,
            progress,
            &state_bytes,
            changed.as_deref(),
            &digests,
            (vcpus, mem_mib, cpuid),
            kernel_sha,
        )
    });
    if result.is_err() {
        if let Some(d) = dirty {
            vm.requeue_dirty(d);
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn write_snapshot<V: Snapshottable>(
    vm: &V,
    req: &CaptureRequest<'_>,
    progress: &mut dyn FnMut(Progress),
    state_bytes: &[u8],
    dirty: Option<&[Vec<u64>]>,
    digests: &PageDigests,
    (vcpus, mem_mib, cpuid): (u8, u64, Vec<crate::manifest::CpuidLeaf>),
    kernel_sha: String,
) -> Result<Manifest, SnapshotError> {
    let final_dir = req.dir.join(req.tag);

    std::fs::create_dir_all(req.dir).map_err(io("cannot create", req.dir))?;
    let tmp = req
        .dir
        .join(format!("{TMP_PREFIX}{}-{}", req.tag, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io("cannot create", &tmp))?;
    let guard = RemoveOnDrop(Some(tmp.clone()));
    faults::checkpoint();

    let mut files = Vec::new();
    let mut d = FileDigest::new();
    d.update(state_bytes);
    write_file(&tmp.join(VMSTATE), state_bytes)?;
    files.push(FileEntry {
        name: VMSTATE.into(),
        size: state_bytes.len() as u64,
        digest: d.finish(),
    });
    faults::checkpoint();

    let pages = digests.encode();
    let mut d = FileDigest::new();
    d.update(&pages);
    write_file(&tmp.join(pagedigest::FILE), &pages)?;
    files.push(FileEntry {
        name: pagedigest::FILE.into(),
        size: pages.len() as u64,
        digest: d.finish(),
    });

    let mem_path = tmp.join(MEMORY);
    let mem_file = create(&mem_path)?;
    match (req.parent, dirty) {
        (Some(_), Some(dirty)) => {
            memfile::write_dirty_memory(vm.guest_memory(), &mem_file, dirty, |done, total| {
                progress(Progress::Memory { done, total })
            })
            .map_err(io("cannot write", &mem_path))?;
            mem_file.sync_all().map_err(io("cannot fsync", &mem_path))?;
            let (digest, size) =
                digest::file_digest(&mem_path).map_err(io("cannot read", &mem_path))?;
            files.push(FileEntry {
                name: MEMORY.into(),
                size,
                digest,
            });
            let bits = memfile::encode_dirty(vm.guest_memory(), dirty);
            let mut d = FileDigest::new();
            d.update(&bits);
            write_file(&tmp.join(DIRTY), &bits)?;
            files.push(FileEntry {
                name: DIRTY.into(),
                size: bits.len() as u64,
                digest: d.finish(),
            });
        }
        _ => {
            let written = memfile::write_memory(vm.guest_memory(), &mem_file, |done, total| {
                progress(Progress::Memory { done, total })
            })
            .map_err(io("cannot write", &mem_path))?;
            mem_file.sync_all().map_err(io("cannot fsync", &mem_path))?;
            files.push(FileEntry {
                name: MEMORY.into(),
                size: written.size,
                digest: written.digest,
            });
        }
    }
    faults::checkpoint();

    if let Some(src) = req.rootfs {
        progress(Progress::Rootfs);
        let dst = tmp.join(ROOTFS);
        rootfs::copy_image(src, &dst).map_err(io("cannot copy rootfs to", &dst))?;
        File::open(&dst)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot fsync", &dst))?;
        let (digest, size) = digest::file_digest(&dst).map_err(io("cannot read", &dst))?;
        files.push(FileEntry {
            name: ROOTFS.into(),
            size,
            digest,
        });
        faults::checkpoint();
    }

    let secret_scan = check_secrets(req.secrets, &tmp, &files)?;

    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let now = since_epoch.as_secs();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        tag: req.tag.to_string(),
        kind: if req.parent.is_some() {
            Kind::Diff
        } else {
            Kind::Full
        },
        parent: req.parent.map(str::to_string),
        created: rfc3339(now),
        created_unix: now,
        created_ns: u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX),
        workspace: req.workspace.map(str::to_string),
        image: req.image.map(str::to_string),
        vcpus,
        mem_mib,
        kernel: KernelRef {
            path: req.kernel.display().to_string(),
            sha256: kernel_sha,
        },
        cmdline: req.cmdline.to_string(),
        host_cpu: HostCpu::current(),
        cpuid,
        files,
        note: req.note.map(str::to_string),
        secret_scan,
        checksum: String::new(),
    };
    write_file(&tmp.join(MANIFEST), &manifest.to_json())?;
    fsync_dir(&tmp)?;
    faults::checkpoint();

    std::fs::rename(&tmp, &final_dir).map_err(io("cannot rename into place", &final_dir))?;
    guard.disarm();
    fsync_dir(req.dir)?;
    faults::checkpoint();
    crate::stamp::Stamps::record_captured(&final_dir, &manifest);
    progress(Progress::Done);
    Ok(manifest)
}

fn create(path: &Path) -> Result<File, SnapshotError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("cannot create", path))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = create(path)?;
    f.write_all(bytes).map_err(io("cannot write", path))?;
    f.sync_all().map_err(io("cannot fsync", path))
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot fsync", dir))
}

/// Removes a half-written snapshot directory unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Removes directories left by captures or deletes whose process is gone (a crash or kill -9).
/// Returns how many were removed.
pub fn sweep_leftovers(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name
            .strip_prefix(TMP_PREFIX)
            .or_else(|| name.strip_prefix(".deleting-"))
        else {
            continue;
        };
        let pid = rest.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = match pid {
            // SAFETY: signal 0 only checks that the process exists.
            Some(p) if p > 0 => unsafe { libc::kill(p, 0) == 0 },
            _ => false,
        };
        if !alive && std::fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A disk-only snapshot of a halted workspace: its rootfs copy and a manifest, written the same
/// crash-safe way as a full capture.
pub fn capture_disk(
    req: &CaptureRequest<'_>,
    vcpus: u8,
    mem_mib: u64,
) -> Result<Manifest, SnapshotError> {
    if !is_safe_name(req.tag) {
        return Err(SnapshotError::InvalidTag(req.tag.to_string()));
    }
    let final_dir = req.dir.join(req.tag);
    if final_dir.exists() {
        return Err(SnapshotError::Exists(req.tag.to_string()));
    }
    let rootfs = req.rootfs.ok_or_else(|| SnapshotError::Rootfs {
        path: req.dir.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "the workspace has no rootfs"),
    })?;
    let kernel_sha = digest::sha256_file(req.kernel).map_err(|source| SnapshotError::Kernel {
        path: req.kernel.to_path_buf(),
        source,
    })?;
    std::fs::create_dir_all(req.dir).map_err(io("cannot create", req.dir))?;
    let tmp = req
        .dir
        .join(format!("{TMP_PREFIX}{}-{}", req.tag, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io("cannot create", &tmp))?;
    let guard = RemoveOnDrop(Some(tmp.clone()));
    let dst = tmp.join(ROOTFS);
    rootfs::copy_image(rootfs, &dst).map_err(io("cannot copy rootfs to", &dst))?;
    File::open(&dst)
        .and_then(|f| f.sync_all())
        .map_err(io("cannot fsync", &dst))?;
    let (digest, size) = digest::file_digest(&dst).map_err(io("cannot read", &dst))?;
    let files = vec![FileEntry {
        name: ROOTFS.into(),
        size,
        digest,
    }];
    let secret_scan = check_secrets(req.secrets, &tmp, &files)?;
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        tag: req.tag.to_string(),
        kind: Kind::Disk,
        parent: None,
        created: rfc3339(since_epoch.as_secs()),
        created_unix: since_epoch.as_secs(),
        created_ns: u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX),
        workspace: req.workspace.map(str::to_string),
        image: req.image.map(str::to_string),
        vcpus,
        mem_mib,
        kernel: KernelRef {
            path: req.kernel.display().to_string(),
            sha256: kernel_sha,
        },
        cmdline: req.cmdline.to_string(),
        host_cpu: HostCpu::current(),
        cpuid: Vec::new(),
        files,
        note: req.note.map(str::to_string),
        secret_scan,
        checksum: String::new(),
    };
    write_file(&tmp.join(MANIFEST), &manifest.to_json())?;
    fsync_dir(&tmp)?;
    std::fs::rename(&tmp, &final_dir).map_err(io("cannot rename into place", &final_dir))?;
    guard.disarm();
    fsync_dir(req.dir)?;
    crate::stamp::Stamps::record_captured(&final_dir, &manifest);
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::residue::SecretValue;
    use crate::{CpuidLeaf, GuestMemory};
    use vm_memory::{Bytes, GuestAddress};

    struct FakeVm(GuestMemory);

    impl Snapshottable for FakeVm {
        type State = Vec<u8>;
        type Error = std::io::Error;
        fn save(&self) -> Result<SavedVm<Vec<u8>>, std::io::Error> {
            Ok(SavedVm {
                state: vec![1; 64],
                vcpus: 1,
                mem_mib: 1,
                cpuid: Vec::<CpuidLeaf>::new(),
            })
        }
        fn guest_memory(&self) -> &GuestMemory {
            &self.0
        }
        fn take_dirty(&self) -> Result<Option<Vec<Vec<u64>>>, std::io::Error> {
            Ok(None)
        }
        fn requeue_dirty(&self, _: Vec<Vec<u64>>) {}
    }

    #[test]
    fn strict_refuses_a_capture_holding_a_secret_and_keeps_nothing() {
        let dir = std::env::temp_dir().join(format!("capture-secrets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("kernel");
        std::fs::write(&kernel, b"k").unwrap();
        let snaps = dir.join("snaps");
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(b"hunter2-but-longer", GuestAddress(0x3_0010))
            .unwrap();
        let vm = FakeVm(mem);
        let scanner = Scanner::new(&[SecretValue {
            name: "PASSWORD".into(),
            value: b"hunter2-but-longer\n".to_vec(),
        }])
        .unwrap();
        let req = |tag: &'static str, strict: bool| CaptureRequest {
            dir: &snaps,
            tag,
            kernel: &kernel,
            cmdline: "",
            rootfs: None,
            image: None,
            workspace: None,
            note: None,
            parent: None,
            secrets: Some(SecretCheck {
                scanner: &scanner,
                strict,
            }),
        };
        match capture(&vm, &req("strict", true), &mut |_| {}) {
            Err(SnapshotError::SecretResidue(scan)) => {
                assert_eq!(scan.found.len(), 1);
                assert_eq!(scan.found[0].name, "PASSWORD");
                assert_eq!(scan.found[0].pages, 1);
            }
            other => panic!("{other:?}"),
        }
        let left: Vec<_> = std::fs::read_dir(&snaps).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");

        let m = capture(&vm, &req("report", false), &mut |_| {}).unwrap();
        let scan = m.secret_scan.unwrap();
        assert_eq!(scan.found[0].name, "PASSWORD");
        assert_eq!(scan.found[0].files[0].file, MEMORY);
        let on_disk = std::fs::read(snaps.join("report").join(MANIFEST)).unwrap();
        assert!(!String::from_utf8_lossy(&on_disk).contains("hunter2"));
        assert!(String::from_utf8_lossy(&on_disk).contains("PASSWORD"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
