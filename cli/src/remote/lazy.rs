//! Forks that start before the download ends.
//!
//! `create --from-snapshot REMOTE/NAME:TAG` on a host that has never seen the snapshot fetches
//! only what a VM needs before it can run: the manifest, the vCPU and device state, the rootfs
//! (whole: a disk has no page server; fetching it lazily is measured in the remote bench's rootfs
//! part and the README), and the working set recorded where the snapshot was used
//! (pushed beside the index, when there is one). Its `memory.bin` is a sparse file of the full
//! size, and a [`MARKER`] beside it says where the memory really is. The forks run with
//! `--memory uffd`: their page server fills `memory.bin` one 4 MiB chunk at a time, on first
//! touch ([`RemoteUnits`]), from the host's chunk cache or the remote, each chunk checked against
//! its digest before any byte of it reaches a VM; the working set's chunks are fetched in the
//! background at once, in the order the guest first touched them.
//!
//! A chunk that cannot be fetched (the remote gone, a chunk corrupt) fails the fault that
//! needed it: the VM stops with an error naming the chunk, never runs on with zeros.
//!
//! These snapshots live in their own cache root (`<state>/remote-cache/lazy/REMOTE`), apart
//! from the pulled ones, so nothing ever takes their sparse `memory.bin` for a complete one.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use snapshot::manifest::{MANIFEST, MEMORY};
use snapshot::pageserver::workingset::{self, WorkingSet};
use snapshot::pageserver::UnitSource;

use super::config::Remote;
use super::index::{self, Index, IndexFile};
use super::store::{PreparedStore, Store, StoreError};
use super::{
    cache_dir, cached_chunk, chunk_rel, fetch_index, io_err, staging_dir, write_cached,
    RemoteError, RemoteRef, Stats, CACHE_DIR,
};
use crate::exit::{Code, Failure};
use crate::output::Out;
use crate::workspace::Workspace;

/// In a lazily filled snapshot's directory: where its memory comes from.
pub const MARKER: &str = "remote-lazy.json";
const MARKER_VERSION: u32 = 1;
const MAX_MARKER_BYTES: u64 = index::MAX_INDEX_BYTES + 64 * 1024;
/// Parallel fetches of one page server (its sessions and its readahead).
const FETCH_THREADS: usize = 4;

/// Beside a snapshot's index on the remote: the working set recorded on the pushing host.
pub fn workingset_rel(name: &str, tag: &str) -> String {
    format!("snapshots/{name}/{tag}.workingset")
}

/// The largest working set object accepted for a memory file of `memory_bytes`: its header and
/// one 4-byte index per page, with room to spare.
fn max_workingset_bytes(memory_bytes: u64) -> u64 {
    (memory_bytes / 4096) * 4 + 4096
}

/// The state root holding the lazily filled snapshots of `remote`.
pub fn cache_root(root: &Path, remote: &str) -> PathBuf {
    root.join(CACHE_DIR).join("lazy").join(remote)
}

/// What a page server needs to fill `memory.bin`: the remote, the host's chunk cache, and the
/// memory file's chunks (from the index the snapshot was made from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub format_version: u32,
    pub remote: Remote,
    /// The host's chunk cache (`<state>/remote-cache/chunks`).
    pub cache: PathBuf,
    pub index: Index,
}

impl Marker {
    /// The marker of the snapshot in `dir`, `None` if it is an ordinary snapshot.
    pub fn load(dir: &Path) -> Result<Option<Marker>, Failure> {
        let p = dir.join(MARKER);
        let meta = match std::fs::metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad_marker(&p, e.to_string())),
        };
        if meta.len() > MAX_MARKER_BYTES {
            return Err(bad_marker(&p, format!("{} bytes", meta.len())));
        }
        let bytes = std::fs::read(&p).map_err(|e| bad_marker(&p, e.to_string()))?;
        let m: Marker =
            serde_json::from_slice(&bytes).map_err(|e| bad_marker(&p, e.to_string()))?;
        if m.format_version != MARKER_VERSION {
            return Err(bad_marker(
                &p,
                format!(
                    "format version {} (this build reads {MARKER_VERSION})",
                    m.format_version
                ),
            ));
        }
        m.index
            .validate(&m.index.name, &m.index.tag)
            .map_err(|e| bad_marker(&p, e.to_string()))?;
        if m.index.file(MEMORY).is_none() {
            return Err(bad_marker(&p, "no memory.bin in its index".into()));
        }
        Ok(Some(m))
    }

    fn memory(&self) -> &IndexFile {
        // Checked by `load` and by `materialize` before a marker is written.
        self.index.file(MEMORY).unwrap_or(&self.index.files[0])
    }
}

fn bad_marker(p: &Path, why: String) -> Failure {
    Failure::new(
        Code::SnapshotRefused,
        format!("{} is not valid: {why}", p.display()),
    )
}

/// Makes `r` ready to fork lazily under `lazy_root` (the caller holds the name's lock): reuses
/// the cached copy if it was made from the index the remote holds now. Returns `false` for a
/// diff (its memory is a chain of files: pulled whole instead).
pub(super) fn materialize(
    root: &Path,
    store: &Store,
    r: &RemoteRef,
    lazy_root: &Path,
    st: &mut Stats,
    out: Out,
) -> Result<bool, Failure> {
    let idx = store.block_on(fetch_index(store, &r.name, &r.tag))?;
    let Some(mem) = idx.file(MEMORY) else {
        return Err(Failure::new(
            Code::SnapshotRefused,
            format!("remote {}/{}:{}: no memory.bin", r.remote, r.name, r.tag),
        ));
    };
    let lazy_chunks = mem.chunks.iter().flatten().count() as u64;
    let existing = match Workspace::open(lazy_root, &r.name) {
        Ok(ws) => Some(ws),
        Err(f) if f.code == Code::NotFound => None,
        Err(f) => return Err(f),
    };
    if let Some(ws) = &existing {
        let dir = ws.snapshots_dir().join(&r.tag);
        if let Ok(snap) = snapshot::Snapshot::open(&dir) {
            let same = Marker::load(&dir)
                .ok()
                .flatten()
                .is_some_and(|m| m.index == idx);
            if same && verify_eager(&snap, false).is_ok() {
                st.chunks_lazy = lazy_chunks;
                return Ok(true);
            }
            // Stale (the remote's snapshot changed) or damaged: made again below. A page
            // server still serving the old one keeps its open files.
            let _ = snap.delete();
        }
    }
    // The manifest first: a diff goes the whole way.
    let label = format!("fetching {}:{}", r.name, r.tag);
    let eager_of = |names: &dyn Fn(&str) -> bool| -> Vec<(String, u64)> {
        let mut seen = std::collections::HashSet::new();
        let mut v = Vec::new();
        for f in idx.files.iter().filter(|f| names(&f.name)) {
            for (i, d) in f.chunks.iter().enumerate() {
                if let Some(d) = d {
                    if seen.insert(d.clone()) {
                        v.push((d.clone(), index::chunk_len(f.size, i as u64)));
                    }
                }
            }
        }
        v
    };
    let manifest_chunks = eager_of(&|n| n == MANIFEST);
    let manifest_n = manifest_chunks.len() as u64;
    super::fill_chunks(root, store, &label, manifest_chunks, st, out)?;

    let cache = cache_dir(root);
    let staging_root = staging_dir(root);
    std::fs::create_dir_all(&staging_root).map_err(io_err("cannot create", &staging_root))?;
    snapshot::capture::sweep_leftovers(&staging_root);
    let staging = staging_root.join(format!(
        "{}lazy-{}-{}-{}-{}",
        snapshot::capture::TMP_PREFIX,
        r.remote,
        r.name,
        r.tag,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(io_err("cannot create", &staging))?;
    let result = (|| {
        let manifest = idx.file(MANIFEST).ok_or_else(|| {
            Failure::new(
                Code::SnapshotRefused,
                "the index has no manifest".to_string(),
            )
        })?;
        super::assemble_file(&cache, store, manifest, &staging.join(MANIFEST))?;
        let staged = snapshot::Snapshot::open(&staging).map_err(crate::snapshot_failure)?;
        if staged.manifest.parent.is_some() {
            return Ok(None);
        }
        st.chunks_total += idx.total_chunks();
        st.chunks_zero += idx.zero_chunks();
        st.bytes_logical += idx.logical_bytes();
        st.chunks_lazy = lazy_chunks;
        // Then everything but the memory, which stays on the remote.
        let rest = eager_of(&|n| n != MANIFEST && n != MEMORY);
        st.chunks_distinct += manifest_n + rest.len() as u64;
        super::fill_chunks(root, store, &label, rest, st, out)?;
        for f in idx.files.iter().filter(|f| f.name != MANIFEST) {
            let p = staging.join(&f.name);
            if f.name == MEMORY {
                let file = File::create(&p).map_err(io_err("cannot create", &p))?;
                file.set_len(f.size).map_err(io_err("cannot size", &p))?;
            } else {
                // Names were checked by Index::validate: plain file names, no separators.
                super::assemble_file(&cache, store, f, &p)?;
            }
        }
        let ws_bytes = fetch_working_set(store, r, mem.size)?;
        if let Some(b) = ws_bytes {
            let p = staging.join(workingset::FILE_NAME);
            std::fs::write(&p, b).map_err(io_err("cannot write", &p))?;
        }
        let marker = Marker {
            format_version: MARKER_VERSION,
            remote: store.remote().clone(),
            cache: cache.clone(),
            index: idx.clone(),
        };
        let p = staging.join(MARKER);
        let json = serde_json::to_vec(&marker).unwrap_or_default();
        std::fs::write(&p, json).map_err(io_err("cannot write", &p))?;
        crate::testhooks::crash_point("lazy-assembled");
        let m = &staged.manifest;
        // The index and the manifest must agree on every file, and the manifest must name what
        // we asked for (the index cannot smuggle extra files into the snapshot).
        let listed: std::collections::HashSet<&str> =
            m.files.iter().map(|f| f.name.as_str()).collect();
        let indexed: std::collections::HashSet<&str> = idx
            .files
            .iter()
            .map(|f| f.name.as_str())
            .filter(|n| *n != MANIFEST)
            .collect();
        if m.tag != r.tag || listed != indexed {
            return Err(Failure::new(
                Code::SnapshotRefused,
                format!(
                    "remote {}:{}: the manifest does not match the index",
                    r.name, r.tag
                ),
            ));
        }
        verify_eager(&staged, true).map_err(crate::snapshot_failure)?;
        super::place(lazy_root, &r.name, &r.tag, &staging, m).map(Some)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    Ok(result?.is_some())
}

/// The working set pushed beside the index, if any and if it is one for this memory size (a
/// bad one is dropped: the first fork here records its own).
fn fetch_working_set(
    store: &Store,
    r: &RemoteRef,
    memory_bytes: u64,
) -> Result<Option<Vec<u8>>, Failure> {
    let key = store.key(&workingset_rel(&r.name, &r.tag));
    let got = store.block_on(store.get_bounded(&key, max_workingset_bytes(memory_bytes)));
    match got {
        Ok(b) => match WorkingSet::decode(&b, memory_bytes) {
            Ok(_) => Ok(Some(b)),
            Err(e) => {
                tracing::warn!(
                    "the remote's working set of {}:{} is not used: {e}",
                    r.name,
                    r.tag
                );
                Ok(None)
            }
        },
        Err(StoreError::Missing { .. }) | Err(StoreError::TooLarge { .. }) => Ok(None),
        Err(e) => Err(RemoteError::from(e).into()),
    }
}

/// Checks everything of a lazily filled snapshot that is on this host: the manifest, the
/// state's format and CRC, every file but the memory against its digest, and the memory file's
/// size (its chunks are checked as they come). A file whose verified stamp still matches is not
/// read again unless `recheck` (see `snapshot::stamp`): a cached rootfs is hashed once.
fn verify_eager(snap: &snapshot::Snapshot, recheck: bool) -> Result<(), snapshot::SnapshotError> {
    use snapshot::error::Refusal;
    use snapshot::stamp::{FileId, Stamps};
    snap.verify(&snapshot::VerifyOptions {
        kernel: None,
        contents: false,
        recheck: false,
    })?;
    let mut stamps = Stamps::load(&snap.dir);
    for f in snap.manifest.files.iter().filter(|f| f.name != MEMORY) {
        let p = snap.path(&f.name);
        let unreadable = |e: std::io::Error| {
            snapshot::SnapshotError::from(Refusal::MissingFile(format!("{}: {e}", f.name)))
        };
        let id = FileId::of(&std::fs::metadata(&p).map_err(unreadable)?);
        if !recheck && stamps.vouches(&f.name, &id, &f.digest) {
            continue;
        }
        let (actual, _) = snapshot::digest::file_digest(&p).map_err(unreadable)?;
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
    // A cache: without it the next fork hashes these files again.
    let _ = stamps.save(&snap.dir);
    snap.check_state()
}

/// The remote's chunks of a lazily filled `memory.bin`, for its page server: from the host's
/// chunk cache when there, else fetched (and kept there), always checked against the digest.
pub struct RemoteUnits {
    store: Store,
    cache: PathBuf,
    memory: IndexFile,
    /// Compressed bytes this server fetched from the remote.
    pub fetched_bytes: AtomicU64,
}

/// [`RemoteUnits`] before their I/O threads: made outside the page server's sandbox (the
/// credentials are read and the chunk cache created there), started inside it.
pub struct PreparedUnits {
    store: PreparedStore,
    cache: PathBuf,
    memory: IndexFile,
}

impl PreparedUnits {
    /// The host's chunk cache, which the sandbox must let the server write.
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    pub fn start(self) -> Result<RemoteUnits, Failure> {
        let store = self
            .store
            .start(Some(FETCH_THREADS))
            .map_err(|e| Failure::from(RemoteError::from(e)))?;
        Ok(RemoteUnits {
            store,
            cache: self.cache,
            memory: self.memory,
            fetched_bytes: AtomicU64::new(0),
        })
    }
}

impl RemoteUnits {
    /// Reads the credentials and creates the chunk cache; starts no thread.
    pub fn prepare(marker: &Marker) -> Result<PreparedUnits, Failure> {
        let store =
            Store::prepare(&marker.remote).map_err(|e| Failure::from(RemoteError::from(e)))?;
        std::fs::create_dir_all(&marker.cache)
            .map_err(|e| Failure::from(io_err("cannot create", &marker.cache)(e)))?;
        Ok(PreparedUnits {
            store,
            cache: marker.cache.clone(),
            memory: marker.memory().clone(),
        })
    }

    /// Size of the memory file these units make up.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.size
    }
}

impl UnitSource for RemoteUnits {
    fn unit_bytes(&self) -> u64 {
        index::CHUNK_SIZE
    }

    fn has_data(&self, unit: u64) -> bool {
        matches!(self.memory.chunks.get(unit as usize), Some(Some(_)))
    }

    fn fetch(&self, unit: u64, len: u64) -> Result<Vec<u8>, String> {
        let Some(Some(d)) = self.memory.chunks.get(unit as usize) else {
            return Err(format!("memory.bin chunk {unit} is not in the index"));
        };
        let start = unit * index::CHUNK_SIZE;
        let what = format!(
            "memory.bin chunk {unit} (bytes {start:#x}..{:#x}, sha256 {d})",
            start + len
        );
        if len != index::chunk_len(self.memory.size, unit) {
            return Err(format!("{what}: asked for {len} bytes"));
        }
        if let Some(b) = cached_chunk(&self.cache, d, len) {
            return Ok(b);
        }
        crate::testhooks::slow_point("lazy-chunk");
        let key = self.store.key(&chunk_rel(d));
        let z = self
            .store
            .block_on(self.store.get_bounded(&key, index::MAX_COMPRESSED))
            .map_err(|e| format!("{what} is missing: {e}"))?;
        let bytes =
            index::decode_chunk(d, &z, len).map_err(|e| format!("{what} is refused: {e}"))?;
        // Kept for the other forks and servers of this host; a chunk the cache cannot take is
        // fetched again next time, nothing worse.
        if let Err(e) = write_cached(&self.cache.join(d), &z) {
            tracing::warn!("cannot keep {what} in the cache: {e}");
        }
        super::cache::enforce(&self.cache, &[d.clone()].into());
        self.fetched_bytes
            .fetch_add(z.len() as u64, Ordering::Relaxed);
        tracing::debug!(chunk = unit, bytes = z.len(), "fetched {what}");
        Ok(bytes)
    }
}
