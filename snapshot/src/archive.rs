//! Portable snapshot archives: one tar stream compressed with zstd, `manifest.json` first, then
//! exactly the files the manifest lists. Import checks every entry against the manifest, writes
//! into a hidden directory, verifies every digest and the format version, and only then renames
//! the snapshot into place.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crate::digest::FileDigest;
use crate::error::{io, Refusal, SnapshotError};
use crate::manifest::{Manifest, ManifestError, MANIFEST};
use crate::open::{Snapshot, VerifyOptions};
use crate::stamp::{FileId, Stamps};

const ZSTD_LEVEL: i32 = 3;
/// A manifest entry larger than this is not a manifest.
const MAX_MANIFEST: u64 = 4 << 20;

/// Writes `snap` to `out` (created anew; written under a temporary name, renamed when complete).
pub fn export(snap: &Snapshot, out: &Path) -> Result<u64, SnapshotError> {
    let mut file = crate::atomic_file::Options::default()
        .create(out)
        .map_err(io("cannot create", out))?;
    let enc = zstd::Encoder::new(BufWriter::new(file.file()), ZSTD_LEVEL)
        .map_err(io("cannot compress", out))?;
    let mut tar = tar::Builder::new(enc);
    let mut names = vec![MANIFEST.to_string()];
    names.extend(snap.manifest.files.iter().map(|f| f.name.clone()));
    for name in &names {
        let p = snap.path(name);
        let mut f = snap.open_member(name).map_err(io("cannot read", &p))?;
        tar.append_file(name, &mut f)
            .map_err(io("cannot archive", &p))?;
    }
    let enc = tar.into_inner().map_err(io("cannot write", out))?;
    let mut w = enc.finish().map_err(io("cannot write", out))?;
    w.flush().map_err(io("cannot write", out))?;
    drop(w);
    file.commit().map_err(io("cannot rename into place", out))?;
    Ok(std::fs::metadata(out).map(|m| m.len()).unwrap_or(0))
}

fn refused(why: String) -> SnapshotError {
    Refusal::Manifest(ManifestError::Invalid(why)).into()
}

/// Reads the manifest at the head of an archive, without extracting anything.
pub fn read_manifest(archive: &Path) -> Result<Manifest, SnapshotError> {
    let file = File::open(archive).map_err(io("cannot open", archive))?;
    let dec = zstd::Decoder::new(BufReader::new(file)).map_err(io("cannot decompress", archive))?;
    let mut tar = tar::Archive::new(Ahead::spawn(dec).map_err(io("cannot decompress", archive))?);
    let mut entries = tar.entries().map_err(io("cannot read", archive))?;
    let mut first = entries
        .next()
        .ok_or_else(|| refused("empty archive".into()))?
        .map_err(io("cannot read", archive))?;
    manifest_entry(&mut first)
}

fn manifest_entry<R: Read>(e: &mut tar::Entry<'_, R>) -> Result<Manifest, SnapshotError> {
    let path = e
        .path()
        .map_err(|_| refused("an entry name is not valid".into()))?
        .into_owned();
    if path.as_os_str() != MANIFEST || !e.header().entry_type().is_file() {
        return Err(refused(format!(
            "the first entry is {}, not {MANIFEST}",
            path.display()
        )));
    }
    if e.size() > MAX_MANIFEST {
        return Err(refused(format!("{MANIFEST} of {} bytes", e.size())));
    }
    let mut bytes = Vec::new();
    e.read_to_end(&mut bytes)
        .map_err(|err| refused(format!("cannot read {MANIFEST}: {err}")))?;
    Manifest::parse(&bytes).map_err(|m| Refusal::Manifest(m).into())
}

/// Imports an archive into `snapshots_dir` under `tag` (default: the archive's tag). Nothing
/// becomes visible unless every file is present and matches its digest.
pub fn import(
    archive: &Path,
    snapshots_dir: &Path,
    tag: Option<&str>,
) -> Result<Snapshot, SnapshotError> {
    std::fs::create_dir_all(snapshots_dir).map_err(io("cannot create", snapshots_dir))?;
    let tmp = snapshots_dir.join(format!(
        "{}import-{}",
        crate::capture::TMP_PREFIX,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io("cannot create", &tmp))?;
    let result = extract_verified(archive, &tmp, snapshots_dir, tag);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Checks a snapshot assembled in a staging directory (by an import or a pull from a remote)
/// before it may become visible: a valid manifest, every file's size and digest, the state's
/// format and CRC.
pub fn verify_staged(dir: &Path) -> Result<Snapshot, SnapshotError> {
    staged(dir, true)
}

/// [`verify_staged`]; with `recheck` false, a file whose verified stamp (recorded from the bytes
/// as they were written) still matches is not hashed again.
fn staged(dir: &Path, recheck: bool) -> Result<Snapshot, SnapshotError> {
    let snap = Snapshot::open(dir)?;
    snap.verify(&VerifyOptions {
        kernel: None,
        contents: true,
        recheck,
    })?;
    // A disk snapshot has no state to check (the manifest already insists on it for the others).
    if snap.manifest.file(crate::manifest::VMSTATE).is_some() {
        snap.check_state()?;
    }
    Ok(snap)
}

fn extract_verified(
    archive: &Path,
    tmp: &Path,
    snapshots_dir: &Path,
    tag: Option<&str>,
) -> Result<Snapshot, SnapshotError> {
    let file = File::open(archive).map_err(io("cannot open", archive))?;
    let dec = zstd::Decoder::new(BufReader::new(file)).map_err(io("cannot decompress", archive))?;
    let mut tar = tar::Archive::new(Ahead::spawn(dec).map_err(io("cannot decompress", archive))?);
    let mut entries = tar.entries().map_err(io("cannot read", archive))?;
    let mut first = entries
        .next()
        .ok_or_else(|| refused("empty archive".into()))?
        .map_err(|e| refused(format!("cannot read the archive: {e}")))?;
    let manifest = manifest_entry(&mut first)?;
    std::fs::write(tmp.join(MANIFEST), manifest.to_json()).map_err(io("cannot write", tmp))?;
    let mut seen = std::collections::HashSet::new();
    let mut stamps = Stamps::default();
    for e in entries {
        let mut e = e.map_err(|err| refused(format!("the archive is damaged: {err}")))?;
        let name = e
            .path()
            .map_err(|_| refused("an entry name is not valid".into()))?
            .to_string_lossy()
            .into_owned();
        // Only plain files the manifest lists, once each, of the listed size: no paths, links
        // or devices can reach outside the import directory. A GNU sparse entry is a plain file
        // too (export writes memory.bin's holes as one): its holes cost nothing in the archive,
        // so what bounds its expansion is the listed size, as for any other entry, and the holes
        // stay holes on disk.
        let listed = manifest
            .file(&name)
            .ok_or_else(|| refused(format!("entry {name:?} is not listed in the manifest")))?;
        let kind = e.header().entry_type();
        let plain = kind.is_file() || kind == tar::EntryType::GNUSparse;
        if !plain || !seen.insert(name.clone()) {
            return Err(refused(format!(
                "entry {name:?} is not a single plain file"
            )));
        }
        if e.size() != listed.size {
            return Err(Refusal::Size {
                file: name,
                expected: listed.size,
                actual: e.size(),
            }
            .into());
        }
        let dst = tmp.join(&name);
        let out = File::create(&dst).map_err(io("cannot create", &dst))?;
        let (copied, digest) = copy_sparse(&mut e, &out).map_err(|err| match err {
            CopyError::Read(err) => refused(format!("{name} is truncated: {err}")),
            CopyError::Write(err) => io("cannot write", &dst)(err),
        })?;
        if copied != listed.size {
            return Err(refused(format!("{name} is truncated")));
        }
        // Hashed on the way in: a tampered file is refused here, and not read back to check.
        if digest != listed.digest {
            return Err(Refusal::Digest {
                file: name,
                expected: listed.digest.clone(),
                actual: digest,
            }
            .into());
        }
        out.sync_all().map_err(io("cannot fsync", &dst))?;
        let meta = out.metadata().map_err(io("cannot stat", &dst))?;
        stamps.record(&name, FileId::of(&meta), &digest);
    }
    // A cache: if it cannot be written, the check below hashes the files again.
    let _ = stamps.save(tmp);
    for f in &manifest.files {
        if !seen.contains(&f.name) {
            return Err(Refusal::MissingFile(f.name.clone()).into());
        }
    }
    let snap = staged(tmp, false)?;
    let tag = tag.unwrap_or(&manifest.tag).to_string();
    let target = snapshots_dir.join(&tag);
    if target.exists() {
        return Err(SnapshotError::Exists(tag));
    }
    let snap = if tag != manifest.tag {
        snap.edit(Some(&tag), None)?
    } else {
        snap
    };
    std::fs::rename(&snap.dir, &target).map_err(io("cannot rename into place", &target))?;
    crate::capture::fsync_dir(snapshots_dir)?;
    Snapshot::open(&target)
}

/// A reader that runs its source (the decompressor) on a thread of its own, a few buffers
/// ahead: decompression overlaps with hashing and writing, as in a `zstd -d | tar -x` pipe.
struct Ahead {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    at: usize,
}

impl Ahead {
    const CHUNK: usize = 1 << 20;
    const DEPTH: usize = 4;

    fn spawn(mut source: impl Read + Send + 'static) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel(Self::DEPTH);
        std::thread::Builder::new()
            .name("import-decompress".into())
            .spawn(move || loop {
                let mut buf = vec![0u8; Self::CHUNK];
                let n = match source.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                buf.truncate(n);
                // The reader is gone (the import stopped): so is the reason to go on.
                if tx.send(Ok(buf)).is_err() || n == 0 {
                    return;
                }
            })?;
        Ok(Self {
            rx,
            buf: Vec::new(),
            at: 0,
        })
    }
}

impl Read for Ahead {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buf.len() {
            // A closed channel after an end or an error: the end.
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    self.buf = buf;
                    self.at = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Copies `from` into the empty file `to`, leaving its zero pages as holes (a memory file is
/// mostly zeros, whether or not the archive entry was sparse). Returns the bytes copied and
/// their digest.
fn copy_sparse(from: &mut impl Read, to: &File) -> Result<(u64, String), CopyError> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut digest = FileDigest::new();
    let mut at = 0u64;
    loop {
        // Fill the buffer (a short read is not the end), so pages stay aligned to the file.
        let mut n = 0;
        while n < buf.len() {
            match from.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(CopyError::Read(e)),
            }
        }
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
        let runs = crate::memfile::nonzero_runs(&buf[..n], at);
        for (off, start, end) in &runs {
            to.write_all_at(&buf[*start..*end], *off)
                .map_err(CopyError::Write)?;
        }
        if !runs.is_empty() {
            // The disk writes while the next megabyte is decompressed: the fsync at the end
            // finds little left.
            crate::memfile::start_writeback(to, at, n as u64);
        }
        at += n as u64;
        if n < buf.len() {
            break;
        }
    }
    // A trailing hole is the file's length, not a write.
    to.set_len(at).map_err(CopyError::Write)?;
    Ok((at, digest.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::FileDigest;
    use crate::manifest::{FileEntry, Kind, MEMORY, ROOTFS, VMSTATE};

    struct Scratch(std::path::PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("archive-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn entry(name: &str, data: &[u8]) -> FileEntry {
        let mut d = FileDigest::new();
        d.update(data);
        FileEntry {
            name: name.into(),
            size: data.len() as u64,
            digest: d.finish(),
        }
    }

    fn regular(tar: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        tar.append_data(&mut h, name, data).unwrap();
    }

    /// Bytes `path` takes on disk.
    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    /// A manifest for a VM snapshot of `state` and a memory file of `size` bytes with `data`
    /// at `at` (zeros elsewhere).
    fn vm_manifest(state: &[u8], size: u64, at: u64, data: &[u8]) -> Manifest {
        // Zeros up to `at`, the data, zeros up to `size`.
        let mut memory = FileDigest::new();
        let zeros = vec![0u8; 1 << 20];
        let feed = |mut n: u64, d: &mut FileDigest| {
            while n > 0 {
                let k = n.min(zeros.len() as u64);
                d.update(&zeros[..k as usize]);
                n -= k;
            }
        };
        feed(at, &mut memory);
        memory.update(data);
        feed(size - at - data.len() as u64, &mut memory);
        let mut m = crate::manifest::tests::sample();
        m.host_cpu = crate::hostcpu::HostCpu::current();
        m.files = vec![
            entry(VMSTATE, state),
            FileEntry {
                name: MEMORY.into(),
                size,
                digest: memory.finish(),
            },
        ];
        m
    }

    /// A memory file with holes is exported as a GNU sparse entry (the tar crate's default)
    /// and imports again with its holes kept. The golden snapshots under tests/golden are such
    /// archives; an import that refused sparse entries refused every export of a real VM.
    #[test]
    fn a_sparse_memory_file_exports_and_imports_with_its_holes() {
        const SIZE: u64 = 16 << 20;
        let dir = Scratch::new("sparse-round-trip");
        let src = dir.0.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let state = crate::vmstate::encode(&1u32).unwrap();
        let page = [0x5au8; 4096];
        std::fs::write(src.join(VMSTATE), &state).unwrap();
        let mem = File::create(src.join(MEMORY)).unwrap();
        mem.set_len(SIZE).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&mem, &page, 8 << 20).unwrap();
        std::fs::write(
            src.join(MANIFEST),
            vm_manifest(&state, SIZE, 8 << 20, &page).to_json(),
        )
        .unwrap();
        let out = dir.0.join("vm.tar.zst");
        export(&Snapshot::open(&src).unwrap(), &out).unwrap();
        let raw = zstd::decode_all(&std::fs::read(&out).unwrap()[..]).unwrap();
        let mut tar = tar::Archive::new(&raw[..]);
        let kinds: Vec<_> = tar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().entry_type(),
                )
            })
            .collect();
        assert!(
            kinds.contains(&(MEMORY.to_string(), tar::EntryType::GNUSparse)),
            "{kinds:?}"
        );
        let snap = import(&out, &dir.0.join("snaps"), Some("back")).unwrap();
        let back = snap.path(MEMORY);
        assert_eq!(std::fs::metadata(&back).unwrap().len(), SIZE);
        assert!(allocated(&back) < 1 << 20, "{} bytes", allocated(&back));
        let bytes = std::fs::read(&back).unwrap();
        assert_eq!(&bytes[8 << 20..(8 << 20) + 4096], &page[..]);
        assert!(bytes[..8 << 20].iter().all(|b| *b == 0));
    }

    /// A sparse entry's holes cost nothing in the archive: a 3 KiB archive expands to as many
    /// zeros as its header claims. What bounds it is the manifest's listed size (as for any
    /// entry): one claiming more than the manifest lists is refused and leaves nothing, one
    /// claiming exactly that lands as holes, not as written zeros.
    #[test]
    fn a_sparse_entry_expands_only_to_its_listed_size_and_as_holes() {
        const SIZE: u64 = 16 << 20;
        let dir = Scratch::new("sparse");
        let state = crate::vmstate::encode(&1u32).unwrap();
        let archive = |listed: u64| {
            let m = vm_manifest(&state, listed, 0, &[]);
            let mut tar = tar::Builder::new(Vec::new());
            regular(&mut tar, MANIFEST, &m.to_json());
            regular(&mut tar, VMSTATE, &state);
            let mut h = tar::Header::new_gnu();
            h.set_path(MEMORY).unwrap();
            h.set_entry_type(tar::EntryType::GNUSparse);
            h.set_mode(0o644);
            h.set_size(0);
            let gnu = h.as_gnu_mut().unwrap();
            gnu.set_real_size(SIZE);
            // One hole up to SIZE, no data.
            gnu.sparse[0].set_offset(SIZE);
            gnu.sparse[0].set_length(0);
            h.set_cksum();
            tar.append(&h, &[][..]).unwrap();
            let archive = zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap();
            assert!(archive.len() < 4096, "{} bytes", archive.len());
            let path = dir.0.join(format!("sparse-{listed}.tar.zst"));
            std::fs::write(&path, &archive).unwrap();
            path
        };
        let snaps = dir.0.join("snaps");
        let err = import(&archive(SIZE / 2), &snaps, Some("more")).unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Refused {
                    refusal: Refusal::Size { .. }
                }
            ),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 0);
        let snap = import(&archive(SIZE), &snaps, Some("listed")).unwrap();
        assert_eq!(std::fs::metadata(snap.path(MEMORY)).unwrap().len(), SIZE);
        assert!(allocated(&snap.path(MEMORY)) < 1 << 20);
    }

    /// An entry whose bytes differ from the manifest's digest (same size, valid compression) is
    /// refused, naming the file, and nothing stays behind; the untouched archive imports, and
    /// its files carry verified stamps from the import's own hashing.
    #[test]
    fn a_tampered_entry_is_refused_and_a_good_import_is_stamped() {
        let dir = Scratch::new("tampered");
        let state = crate::vmstate::encode(&1u32).unwrap();
        let page = [0x11u8; 4096];
        let m = vm_manifest(&state, 3 * 4096, 4096, &page);
        let archive = |data: &[u8], name: &str| {
            let mut mem = vec![0u8; 3 * 4096];
            mem[4096..8192].copy_from_slice(data);
            let mut tar = tar::Builder::new(Vec::new());
            regular(&mut tar, MANIFEST, &m.to_json());
            regular(&mut tar, VMSTATE, &state);
            regular(&mut tar, MEMORY, &mem);
            let path = dir.0.join(name);
            std::fs::write(
                &path,
                zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap(),
            )
            .unwrap();
            path
        };
        let mut bad = page;
        bad[100] ^= 1;
        let snaps = dir.0.join("snaps");
        let err = import(&archive(&bad, "bad.tar.zst"), &snaps, Some("t")).unwrap_err();
        assert!(
            matches!(
                &err,
                SnapshotError::Refused {
                    refusal: Refusal::Digest { file, .. }
                } if file == MEMORY
            ),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(&snaps).unwrap().count(), 0);
        let snap = import(&archive(&page, "good.tar.zst"), &snaps, Some("t")).unwrap();
        let stamps = Stamps::load(&snap.dir);
        for f in &snap.manifest.files {
            let id = FileId::of(&std::fs::metadata(snap.path(&f.name)).unwrap());
            assert!(stamps.vouches(&f.name, &id, &f.digest), "{}", f.name);
        }
    }

    /// Seen writing the `archive_import` seeds: a disk snapshot (a rootfs, no VM state) was
    /// refused by every import for want of the `vmstate.bin` it does not have.
    #[test]
    fn a_disk_snapshot_exports_and_imports() {
        let dir = Scratch::new("disk");
        let src = dir.0.join("src");
        std::fs::create_dir_all(&src).unwrap();
        let rootfs = b"an ext4 image".to_vec();
        std::fs::write(src.join(ROOTFS), &rootfs).unwrap();
        let mut m = crate::manifest::tests::sample();
        m.kind = Kind::Disk;
        m.host_cpu = crate::hostcpu::HostCpu::current();
        m.files = vec![entry(ROOTFS, &rootfs)];
        std::fs::write(src.join(MANIFEST), m.to_json()).unwrap();
        let out = dir.0.join("disk.tar.zst");
        export(&Snapshot::open(&src).unwrap(), &out).unwrap();
        let snap = import(&out, &dir.0.join("snaps"), Some("back")).unwrap();
        assert_eq!(snap.manifest.kind, Kind::Disk);
        assert_eq!(std::fs::read(snap.path(ROOTFS)).unwrap(), rootfs);
    }
}
