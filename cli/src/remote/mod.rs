//! Remotes: snapshots in S3-compatible object storage.
//!
//! `remote add|list|remove` keeps the list of remotes; `snapshot push` and `snapshot pull` move
//! snapshots as content-addressed chunks (see [`index`]); `create --from-snapshot
//! REMOTE/NAME:TAG` fetches all but the memory into the host's remote cache and forks from there,
//! the memory coming on first touch through the page server ([`lazy`]); with `--memory eager`,
//! or for a diff, it pulls the whole snapshot first.
//!
//! Crash safety, both ways: a push uploads chunks first and the index last, so a snapshot is on
//! a remote only when complete, and a push run again skips the chunks already there. A pull
//! keeps every chunk it verified in `<state>/remote-cache/chunks` (shared by all pulls and forks
//! on the host), assembles the files in a staging directory, verifies the snapshot as an import
//! does, and only then renames it into place; run again, it fetches only what it lacks.

pub mod cache;
pub mod config;
pub mod index;
pub mod lazy;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use futures_util::StreamExt;
use serde_json::json;

use crate::exit::{Code, Failure};
use crate::output::Out;
use crate::workspace::{self, Workspace};
use config::Remote;
use index::{ChunkError, Index, IndexFile, CHUNK_SIZE, INDEX_VERSION};
use store::{Store, StoreError, PARALLEL};

/// Under the state root: everything a host keeps of remotes.
pub const CACHE_DIR: &str = "remote-cache";

#[derive(Subcommand)]
pub enum RemoteCommand {
    /// Register a remote: `s3://BUCKET/PREFIX`. Credentials come from the environment
    /// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or the AWS shared
    /// credentials file (AWS_PROFILE, default `default`).
    Add(AddArgs),
    /// List the registered remotes.
    List,
    /// Forget a remote (nothing on the remote is deleted).
    Remove { name: String },
}

#[derive(Args)]
pub struct AddArgs {
    name: String,
    /// s3://BUCKET/PREFIX
    url: String,
    /// An S3-compatible endpoint (e.g. http://127.0.0.1:9000) instead of AWS.
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// The region (default: $AWS_REGION, else us-east-1).
    #[arg(long, value_name = "R")]
    region: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("remote {remote} has no snapshot {name}:{tag}")]
    NoSnapshot {
        remote: String,
        name: String,
        tag: String,
    },
    #[error("remote {remote}: the index of {name}:{tag} is refused: {source}")]
    Index {
        remote: String,
        name: String,
        tag: String,
        source: index::IndexError,
    },
    #[error("remote {remote}: {source}; nothing was imported")]
    Chunk { remote: String, source: ChunkError },
    #[error("remote {remote} already holds {name}:{tag} with different content")]
    Differs {
        remote: String,
        name: String,
        tag: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<RemoteError> for Failure {
    fn from(e: RemoteError) -> Failure {
        let code = match &e {
            RemoteError::Store(s) => match s {
                StoreError::Unreachable { .. } => Code::RemoteUnreachable,
                StoreError::Access { .. } | StoreError::NoBucket { .. } => Code::RemoteAccess,
                StoreError::Missing { .. } => Code::NotFound,
                StoreError::TooLarge { .. } => Code::SnapshotRefused,
                StoreError::Other { .. } => Code::Error,
            },
            RemoteError::NoSnapshot { .. } => Code::NotFound,
            RemoteError::Index { .. } | RemoteError::Chunk { .. } => Code::SnapshotRefused,
            RemoteError::Differs { .. } => Code::Conflict,
            RemoteError::Io { .. } => Code::Error,
        };
        Failure::new(code, e.to_string())
    }
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RemoteError {
    let path = path.to_path_buf();
    move |source| RemoteError::Io { what, path, source }
}

pub fn run(root: &Path, cmd: RemoteCommand, out: Out) -> Result<(), Failure> {
    match cmd {
        RemoteCommand::Add(a) => add(root, a, out),
        RemoteCommand::List => list(root, out),
        RemoteCommand::Remove { name } => remove(root, &name, out),
    }
}

fn add(root: &Path, a: AddArgs, out: Out) -> Result<(), Failure> {
    let usage = |e: config::ConfigError| Failure::new(Code::Usage, e.to_string());
    config::check_name(&a.name).map_err(usage)?;
    let (bucket, prefix) = config::parse_url(&a.url).map_err(usage)?;
    if let Some(e) = &a.endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(usage(config::ConfigError::Endpoint(e.clone())));
        }
    }
    let _lock = config::lock(root)?;
    let mut all = config::load(root)?;
    if all.iter().any(|r| r.name == a.name) {
        return Err(Failure::new(
            Code::Conflict,
            format!("remote {} already exists", a.name),
        ));
    }
    let r = Remote {
        name: a.name,
        bucket,
        prefix,
        endpoint: a.endpoint,
        region: a.region,
    };
    all.push(r.clone());
    config::save(root, &all)?;
    out.emit(
        format!("remote {} added ({})", r.name, r.url()),
        json!({"added": r}),
    );
    Ok(())
}

fn list(root: &Path, out: Out) -> Result<(), Failure> {
    let all = config::load(root)?;
    let mut human = format!("{:<16} {:<40} {}", "NAME", "URL", "ENDPOINT");
    for r in &all {
        human.push_str(&format!(
            "\n{:<16} {:<40} {}",
            r.name,
            r.url(),
            r.endpoint.as_deref().unwrap_or("-")
        ));
    }
    out.emit(human, json!({"remotes": all}));
    Ok(())
}

fn remove(root: &Path, name: &str, out: Out) -> Result<(), Failure> {
    let _lock = config::lock(root)?;
    let mut all = config::load(root)?;
    let before = all.len();
    all.retain(|r| r.name != name);
    if all.len() == before {
        return Err(Failure::new(Code::NotFound, format!("no remote {name}")));
    }
    config::save(root, &all)?;
    out.emit(format!("remote {name} removed"), json!({"removed": name}));
    Ok(())
}

/// `REMOTE/NAME:TAG`.
pub struct RemoteRef {
    pub remote: String,
    pub name: String,
    pub tag: String,
}

impl RemoteRef {
    pub fn parse(s: &str) -> Result<RemoteRef, Failure> {
        let bad = || Failure::new(Code::Usage, format!("want REMOTE/NAME:TAG, got {s:?}"));
        let (remote, rest) = s.split_once('/').ok_or_else(bad)?;
        let (name, tag) = rest.split_once(':').ok_or_else(bad)?;
        if config::check_name(remote).is_err()
            || crate::home::check_name(name).is_err()
            || !snapshot::manifest::is_safe_name(tag)
        {
            return Err(bad());
        }
        Ok(RemoteRef {
            remote: remote.to_string(),
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }

    /// Whether `s` names a remote snapshot rather than a local `NAME:TAG`.
    pub fn is_remote(s: &str) -> bool {
        s.split_once(':')
            .is_some_and(|(head, _)| head.contains('/'))
    }
}

fn index_rel(name: &str, tag: &str) -> String {
    format!("snapshots/{name}/{tag}.json")
}

fn chunk_rel(digest: &str) -> String {
    format!("chunks/{digest}")
}

/// What one push or pull moved, for the human line and `--json`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stats {
    /// Chunks over all files, zero ones included.
    pub chunks_total: u64,
    /// All-zero chunks: never stored, never fetched.
    pub chunks_zero: u64,
    /// Distinct non-zero chunks the snapshot needs.
    pub chunks_distinct: u64,
    /// Push: uploaded now. Pull: fetched from the remote now.
    pub chunks_transferred: u64,
    /// Push: already on the remote. Pull: already in the host's chunk cache.
    pub chunks_present: u64,
    /// Bytes sent or received (compressed).
    pub bytes_transferred: u64,
    /// Bytes of the snapshot's files.
    pub bytes_logical: u64,
    /// A fork straight from a remote: memory chunks left on the remote, for the page server to
    /// fetch when a fork first touches them.
    pub chunks_lazy: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.chunks_total += o.chunks_total;
        self.chunks_zero += o.chunks_zero;
        self.chunks_distinct += o.chunks_distinct;
        self.chunks_transferred += o.chunks_transferred;
        self.chunks_present += o.chunks_present;
        self.bytes_transferred += o.bytes_transferred;
        self.bytes_logical += o.bytes_logical;
        self.chunks_lazy += o.chunks_lazy;
    }
}

fn open_store(root: &Path, remote: &str) -> Result<Store, Failure> {
    let r = config::find(root, remote)?;
    Store::open(&r).map_err(|e| RemoteError::from(e).into())
}

// ---------------------------------------------------------------------------------------------
// push

pub fn push(root: &Path, name: &str, tag: &str, remote: &str, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, name)?;
    let snap = crate::commands::open_snapshot(&ws, tag)?;
    // A diff needs its parents on the remote too: push the chain, base first. Chunks they share
    // go once.
    let chain = snap.chain().map_err(crate::snapshot_failure)?;
    let store = open_store(root, remote)?;
    let mut total = Stats::default();
    let mut pushed = Vec::new();
    for s in &chain {
        let st = push_one(&store, name, s, out)?;
        total.add(&st);
        pushed.push(s.manifest.tag.clone());
    }
    out.emit(
        format!(
            "pushed {name}:{tag} to {remote}: {} of {} chunks uploaded ({}), {} already there, {} zero",
            total.chunks_transferred,
            total.chunks_distinct,
            crate::output::human_size(total.bytes_transferred),
            total.chunks_present,
            total.chunks_zero,
        ),
        json!({"remote": remote, "name": name, "tag": tag, "snapshots": pushed, "stats": total}),
    );
    Ok(())
}

/// Where a chunk's bytes are in the local snapshot.
struct Source {
    path: PathBuf,
    offset: u64,
    len: u64,
}

/// One chunk of a snapshot's file, which must still have the digest the index gives it: the
/// remote keys chunks by digest, and a file changed (or swapped for a link, see
/// `Snapshot::open_member`) since the index was made must not put other bytes under that name.
fn read_at(path: &Path, offset: u64, len: u64, digest: &str) -> Result<Vec<u8>, RemoteError> {
    let f = snapshot::untrusted::open(path).map_err(io_err("cannot open", path))?;
    let mut buf = vec![0u8; len.min(CHUNK_SIZE) as usize];
    f.read_exact_at(&mut buf, offset)
        .map_err(io_err("cannot read", path))?;
    if index::sha256_hex(&buf) != digest {
        return Err(io_err("changed while pushing", path)(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the chunk at {offset} no longer has digest {digest}"),
        )));
    }
    Ok(buf)
}

/// Cuts the snapshot's files into chunks: the index, and where each distinct chunk lives.
fn build_index(
    name: &str,
    snap: &snapshot::Snapshot,
) -> Result<(Index, HashMap<String, Source>), RemoteError> {
    let mut names = vec![snapshot::manifest::MANIFEST.to_string()];
    names.extend(snap.manifest.files.iter().map(|f| f.name.clone()));
    let mut files = Vec::new();
    let mut sources = HashMap::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for n in names {
        let p = snap.path(&n);
        let f = snap.open_member(&n).map_err(io_err("cannot open", &p))?;
        let size = f.metadata().map_err(io_err("cannot stat", &p))?.len();
        let mut chunks = Vec::new();
        for i in 0..index::chunk_count(size) {
            let len = index::chunk_len(size, i);
            let b = &mut buf[..len as usize];
            f.read_exact_at(b, i * CHUNK_SIZE)
                .map_err(io_err("cannot read", &p))?;
            if index::is_zero(b) {
                chunks.push(None);
                continue;
            }
            let d = index::sha256_hex(b);
            sources.entry(d.clone()).or_insert(Source {
                path: p.clone(),
                offset: i * CHUNK_SIZE,
                len,
            });
            chunks.push(Some(d));
        }
        files.push(IndexFile {
            name: n,
            size,
            chunks,
        });
    }
    Ok((
        Index {
            format_version: INDEX_VERSION,
            name: name.to_string(),
            tag: snap.manifest.tag.clone(),
            chunk_size: CHUNK_SIZE,
            files,
        },
        sources,
    ))
}

fn push_one(
    store: &Store,
    name: &str,
    snap: &snapshot::Snapshot,
    out: Out,
) -> Result<Stats, Failure> {
    let tag = snap.manifest.tag.clone();
    let remote = store.remote().name.clone();
    let (idx, sources) = build_index(name, snap)?;
    let mut st = Stats {
        chunks_total: idx.total_chunks(),
        chunks_zero: idx.zero_chunks(),
        chunks_distinct: sources.len() as u64,
        bytes_logical: idx.logical_bytes(),
        ..Default::default()
    };
    let index_key = store.key(&index_rel(name, &tag));
    // The working set recorded here (by forks served through the page server), if any: a host
    // forking from the remote prefetches what it names first. Advisory, so it may change
    // after the index is up (a push run again sends the latest).
    let working_set = recorded_working_set(snap);
    let ws_key = store.key(&lazy::workingset_rel(name, &tag));
    let result: Result<Stats, RemoteError> = store.block_on(async {
        match store.get_bounded(&index_key, index::MAX_INDEX_BYTES).await {
            Ok(bytes) => {
                // Pushed before (or by someone else): fine if it is the same snapshot.
                return match Index::parse(&bytes, name, &tag) {
                    Ok(there) if there == idx => {
                        st.chunks_present = st.chunks_distinct;
                        if let Some(w) = working_set {
                            store.put(&ws_key, w).await?;
                        }
                        Ok(st)
                    }
                    _ => Err(RemoteError::Differs {
                        remote: remote.clone(),
                        name: name.to_string(),
                        tag: tag.clone(),
                    }),
                };
            }
            Err(StoreError::Missing { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        // What the remote already has (from other snapshots, or a push that was interrupted).
        let mut heads = futures_util::stream::iter(sources.iter().map(|(d, src)| async move {
            let there = store.exists(&store.key(&chunk_rel(d))).await?;
            Ok::<_, RemoteError>((d, src, there))
        }))
        .buffer_unordered(PARALLEL * 2);
        let mut todo: Vec<(&String, &Source)> = Vec::new();
        while let Some(r) = heads.next().await {
            let (d, src, there) = r?;
            if !there {
                todo.push((d, src));
            }
        }
        drop(heads);
        st.chunks_present = st.chunks_distinct - todo.len() as u64;
        let todo_bytes: u64 = todo.iter().map(|(_, s)| s.len).sum();
        let mut done_bytes = 0u64;
        let mut uploads = futures_util::stream::iter(todo.into_iter().map(|(d, src)| async move {
            let raw = read_at(&src.path, src.offset, src.len, d)?;
            let z = index::encode_chunk(&raw).map_err(io_err("cannot compress", &src.path))?;
            let n = z.len() as u64;
            store.put(&store.key(&chunk_rel(d)), z).await?;
            Ok::<_, RemoteError>((src.len, n))
        }))
        .buffer_unordered(PARALLEL);
        while let Some(r) = uploads.next().await {
            let (raw, sent) = r?;
            st.chunks_transferred += 1;
            st.bytes_transferred += sent;
            done_bytes += raw;
            out.progress(&format!("pushing {name}:{tag}"), done_bytes, todo_bytes);
            crate::testhooks::crash_point(&format!("push-chunk-{}", st.chunks_transferred));
        }
        drop(uploads);
        if let Some(w) = working_set {
            store.put(&ws_key, w).await?;
        }
        // Last: only now does the snapshot exist on the remote.
        store.put(&index_key, idx.to_json()).await?;
        Ok(st)
    });
    result.map_err(Failure::from)
}

// ---------------------------------------------------------------------------------------------
// pull

pub fn pull(root: &Path, spec: &str, as_name: Option<String>, out: Out) -> Result<(), Failure> {
    let r = RemoteRef::parse(spec)?;
    let target = as_name.unwrap_or_else(|| r.name.clone());
    crate::home::check_name(&target)?;
    let store = open_store(root, &r.remote)?;
    let mut st = Stats::default();
    let snap = pull_into(
        root, &store, &r.name, &r.tag, root, &target, &mut st, 0, out,
    )?;
    out.emit(
        format!(
            "pulled {spec} into workspace {target}: {} chunks fetched ({}), {} from the cache, {} zero",
            st.chunks_transferred,
            crate::output::human_size(st.bytes_transferred),
            st.chunks_present,
            st.chunks_zero
        ),
        json!({"remote": r.remote, "name": r.name, "tag": r.tag, "workspace": target,
               "snapshot": snap.manifest.tag, "stats": st}),
    );
    Ok(())
}

fn cache_dir(root: &Path) -> PathBuf {
    root.join(CACHE_DIR).join("chunks")
}

fn staging_dir(root: &Path) -> PathBuf {
    root.join(CACHE_DIR).join("staging")
}

/// A cached chunk, verified again (the cache is on local disk, but a flipped bit there must not
/// reach a guest either); `None` when absent or damaged.
fn cached_chunk(cache: &Path, digest: &str, len: u64) -> Option<Vec<u8>> {
    let p = cache.join(digest);
    let meta = std::fs::metadata(&p).ok()?;
    if meta.len() > index::MAX_COMPRESSED {
        return None;
    }
    let z = std::fs::read(&p).ok()?;
    match index::decode_chunk(digest, &z, len) {
        Ok(b) => {
            cache::touch(&p);
            Some(b)
        }
        Err(_) => {
            let _ = std::fs::remove_file(&p);
            None
        }
    }
}

/// Puts a verified chunk into the cache under its final name by rename, without fsync: a chunk
/// the cache lost or tore in a crash fails its digest on the next read and is fetched again, so
/// durability buys nothing here and an fsync per chunk would cost most of a pull's time.
fn write_cached(p: &Path, z: &[u8]) -> Result<(), RemoteError> {
    snapshot::atomic_file::Options::default()
        .durable(false)
        .write(p, z)
        .map_err(io_err("cannot write", p))
}

async fn fetch_index(store: &Store, name: &str, tag: &str) -> Result<Index, RemoteError> {
    let key = store.key(&index_rel(name, tag));
    let bytes = match store.get_bounded(&key, index::MAX_INDEX_BYTES).await {
        Ok(b) => b,
        // (A missing bucket is a 404 too, but S3 says NoSuchBucket: classify told them apart.)
        Err(StoreError::Missing { remote, .. }) => {
            return Err(RemoteError::NoSnapshot {
                remote,
                name: name.to_string(),
                tag: tag.to_string(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    Index::parse(&bytes, name, tag).map_err(|source| RemoteError::Index {
        remote: store.remote().name.clone(),
        name: name.to_string(),
        tag: tag.to_string(),
        source,
    })
}

/// Makes every chunk of `idx` present and verified in the host's cache; counts what it fetched.
fn fill_cache(
    root: &Path,
    store: &Store,
    idx: &Index,
    st: &mut Stats,
    out: Out,
) -> Result<(), RemoteError> {
    let label = format!("pulling {}:{}", idx.name, idx.tag);
    fill_chunks(root, store, &label, idx.distinct_chunks(), st, out)
}

/// Makes `chunks` (digest, length) present and verified in the host's cache.
fn fill_chunks(
    root: &Path,
    store: &Store,
    label: &str,
    chunks: Vec<(String, u64)>,
    st: &mut Stats,
    out: Out,
) -> Result<(), RemoteError> {
    let cache = cache_dir(root);
    std::fs::create_dir_all(&cache).map_err(io_err("cannot create", &cache))?;
    let keep: HashSet<String> = chunks.iter().map(|(d, _)| d.clone()).collect();
    let mut todo = Vec::new();
    for (d, len) in chunks {
        if cached_chunk(&cache, &d, len).is_some() {
            st.chunks_present += 1;
        } else {
            todo.push((d, len));
        }
    }
    let todo_bytes: u64 = todo.iter().map(|(_, l)| l).sum();
    let remote = store.remote().name.clone();
    let cache_ref = &cache;
    store.block_on(async {
        let mut done_bytes = 0;
        let mut fetches = futures_util::stream::iter(todo.into_iter().map(|(d, len)| {
            let remote = remote.clone();
            async move {
                let z = store
                    .get_bounded(&store.key(&chunk_rel(&d)), index::MAX_COMPRESSED)
                    .await?;
                // Verified before it is kept: the cache holds only good chunks.
                index::decode_chunk(&d, &z, len)
                    .map_err(|source| RemoteError::Chunk { remote, source })?;
                let p = cache_ref.join(&d);
                write_cached(&p, &z)?;
                Ok::<_, RemoteError>((len, z.len() as u64))
            }
        }))
        .buffer_unordered(PARALLEL);
        while let Some(r) = fetches.next().await {
            let (raw, got) = r?;
            st.chunks_transferred += 1;
            st.bytes_transferred += got;
            done_bytes += raw;
            out.progress(label, done_bytes, todo_bytes);
            crate::testhooks::crash_point(&format!("pull-chunk-{}", st.chunks_transferred));
            crate::testhooks::slow_point("pull-chunk");
        }
        Ok::<_, RemoteError>(())
    })?;
    cache::enforce(&cache, &keep);
    Ok(())
}

/// A chunk from the cache, or fetched again (and checked, and kept) if another host process
/// evicted it meanwhile.
fn chunk_bytes(
    cache: &Path,
    store: &Store,
    digest: &str,
    len: u64,
) -> Result<Vec<u8>, RemoteError> {
    if let Some(b) = cached_chunk(cache, digest, len) {
        return Ok(b);
    }
    let z =
        store.block_on(store.get_bounded(&store.key(&chunk_rel(digest)), index::MAX_COMPRESSED))?;
    let b = index::decode_chunk(digest, &z, len).map_err(|source| RemoteError::Chunk {
        remote: store.remote().name.clone(),
        source,
    })?;
    write_cached(&cache.join(digest), &z)?;
    Ok(b)
}

/// Writes `f` from the cache into `path` (sparse: zero chunks stay holes).
fn assemble_file(
    cache: &Path,
    store: &Store,
    f: &IndexFile,
    path: &Path,
) -> Result<(), RemoteError> {
    let file = File::create(path).map_err(io_err("cannot create", path))?;
    file.set_len(f.size).map_err(io_err("cannot size", path))?;
    for (i, d) in f.chunks.iter().enumerate() {
        let Some(d) = d else { continue };
        let i = i as u64;
        let len = index::chunk_len(f.size, i);
        let bytes = chunk_bytes(cache, store, d, len)?;
        file.write_all_at(&bytes, i * CHUNK_SIZE)
            .map_err(io_err("cannot write", path))?;
    }
    file.sync_all().map_err(io_err("cannot fsync", path))
}

/// Pulls `name:tag` (and, for a diff, its missing parents) into workspace `dest` under
/// `dest_root` (the state root, or the remote cache for forks). Nothing is visible there until
/// the snapshot is complete and verified; a workspace made for it appears with it, or not at all.
#[allow(clippy::too_many_arguments)]
pub fn pull_into(
    root: &Path,
    store: &Store,
    name: &str,
    tag: &str,
    dest_root: &Path,
    dest: &str,
    st: &mut Stats,
    depth: usize,
    out: Out,
) -> Result<snapshot::Snapshot, Failure> {
    if depth > snapshot::manifest::MAX_CHAIN {
        return Err(Failure::new(
            Code::SnapshotRefused,
            format!("the parent chain of {name}:{tag} is too long or loops"),
        ));
    }
    let existing = match Workspace::open(dest_root, dest) {
        Ok(ws) => Some(ws),
        Err(f) if f.code == Code::NotFound => None,
        Err(f) => return Err(f),
    };
    if let Some(ws) = &existing {
        if ws.snapshots_dir().join(tag).exists() {
            return Err(Failure::new(
                Code::Conflict,
                format!("workspace {dest} already has a snapshot {tag}"),
            ));
        }
    }
    let idx = store.block_on(fetch_index(store, name, tag))?;
    st.chunks_total += idx.total_chunks();
    st.chunks_zero += idx.zero_chunks();
    st.chunks_distinct += idx.distinct_chunks().len() as u64;
    st.bytes_logical += idx.logical_bytes();
    fill_cache(root, store, &idx, st, out)?;

    let cache = cache_dir(root);
    let staging_root = staging_dir(root);
    std::fs::create_dir_all(&staging_root).map_err(io_err("cannot create", &staging_root))?;
    // Leftovers of pulls that were killed while assembling.
    snapshot::capture::sweep_leftovers(&staging_root);
    let staging = staging_root.join(format!(
        "{}pull-{dest}-{tag}-{}",
        snapshot::capture::TMP_PREFIX,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir(&staging).map_err(io_err("cannot create", &staging))?;
    let result = (|| {
        for f in &idx.files {
            // Names were checked by Index::validate: plain file names, no separators.
            assemble_file(&cache, store, f, &staging.join(&f.name))?;
        }
        crate::testhooks::crash_point("pull-assembled");
        let staged = snapshot::archive::verify_staged(&staging).map_err(crate::snapshot_failure)?;
        let m = &staged.manifest;
        // The index and the manifest inside it must agree on every file, and the manifest must
        // name what we asked for (the index cannot smuggle extra files into the snapshot).
        let listed: HashSet<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        let indexed: HashSet<&str> = idx
            .files
            .iter()
            .map(|f| f.name.as_str())
            .filter(|n| *n != snapshot::manifest::MANIFEST)
            .collect();
        if m.tag != tag || listed != indexed {
            return Err(Failure::new(
                Code::SnapshotRefused,
                format!("remote {name}:{tag}: the manifest does not match the index"),
            ));
        }
        if let Some(parent) = m.parent.clone() {
            let have = existing
                .as_ref()
                .is_some_and(|ws| ws.snapshots_dir().join(&parent).exists());
            if !have {
                // Parents first, into the same workspace (made by the parent's pull if new).
                pull_into(
                    root,
                    store,
                    name,
                    &parent,
                    dest_root,
                    dest,
                    st,
                    depth + 1,
                    out,
                )?;
            }
        }
        place(dest_root, dest, tag, &staging, m)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Moves a verified snapshot from `staging` into workspace `dest` under `dest_root` as `tag`,
/// making the workspace (from the manifest) if it does not exist yet.
fn place(
    dest_root: &Path,
    dest: &str,
    tag: &str,
    staging: &Path,
    m: &snapshot::Manifest,
) -> Result<snapshot::Snapshot, Failure> {
    let target_ws = match Workspace::open(dest_root, dest) {
        Ok(ws) => ws,
        Err(f) if f.code == Code::NotFound => {
            let staging = staging.to_path_buf();
            let tag_owned = tag.to_string();
            let ws =
                crate::commands::create_for_import_with(dest_root, dest, m, None, move |dir| {
                    let snaps = dir.join(workspace::SNAPSHOTS);
                    std::fs::create_dir_all(&snaps)
                        .and_then(|()| std::fs::rename(&staging, snaps.join(&tag_owned)))
                        .map_err(|e| {
                            Failure::new(Code::Error, format!("cannot place snapshot: {e}"))
                        })
                })?;
            return crate::commands::open_snapshot(&ws, tag);
        }
        Err(f) => return Err(f),
    };
    let _lock = target_ws.lock()?;
    let snaps = target_ws.snapshots_dir();
    let target = snaps.join(tag);
    if target.exists() {
        return Err(Failure::new(
            Code::Conflict,
            format!("workspace {dest} already has a snapshot {tag}"),
        ));
    }
    std::fs::create_dir_all(&snaps)
        .and_then(|()| std::fs::rename(staging, &target))
        .and_then(|()| File::open(&snaps)?.sync_all())
        .map_err(|e| Failure::new(Code::Error, format!("cannot place snapshot: {e}")))?;
    crate::commands::open_snapshot(&target_ws, tag)
}

// ---------------------------------------------------------------------------------------------
// forks from a remote

/// A remote snapshot made ready to fork on this host.
pub struct Materialized {
    /// The state root and workspace name of the cached copy.
    pub root: PathBuf,
    pub name: String,
    /// What was fetched now.
    pub stats: Stats,
    /// Its memory comes on first touch through its page server (see [`lazy`]): fork it with
    /// `--memory uffd`, and never read its `memory.bin` directly.
    pub lazy: bool,
}

/// For `create --from-snapshot REMOTE/NAME:TAG`: the snapshot in this host's remote cache, as
/// a workspace root and name to fork from. Unless `eager`, a full snapshot's memory stays on
/// the remote until a fork touches it ([`lazy`]); otherwise (and for a diff) it is pulled whole
/// first, or not at all when the cached copy is still what the remote holds.
pub fn materialize(
    root: &Path,
    spec: &str,
    eager: bool,
    out: Out,
) -> Result<Materialized, Failure> {
    let r = RemoteRef::parse(spec)?;
    let store = open_store(root, &r.remote)?;
    let mut st = Stats::default();
    if !eager {
        let lazy_root = lazy::cache_root(root, &r.remote);
        let _making = name_lock(&lazy_root, &r.name)?;
        if lazy::materialize(root, &store, &r, &lazy_root, &mut st, out)? {
            return Ok(Materialized {
                root: lazy_root,
                name: r.name,
                stats: st,
                lazy: true,
            });
        }
    }
    let cache_root = root.join(CACHE_DIR).join("snapshots").join(&r.remote);
    // Forks of one remote snapshot started at once on a fresh host: the first pulls it, the
    // others wait for that and fork from the cached copy (without the lock, the second found
    // the first's half-made workspace and failed with a conflict).
    let _pulling = name_lock(&cache_root, &r.name)?;
    if let Ok(ws) = Workspace::open(&cache_root, &r.name) {
        if let Ok(snap) = snapshot::Snapshot::open(&ws.snapshots_dir().join(&r.tag)) {
            // Cached: still what the remote holds? Its manifest is one chunk of the index.
            let idx = store.block_on(fetch_index(&store, &r.name, &r.tag))?;
            let here = std::fs::read(snap.path(snapshot::manifest::MANIFEST))
                .map(|b| index::sha256_hex(&b))
                .ok();
            let there = idx
                .file(snapshot::manifest::MANIFEST)
                .and_then(|f| f.chunks.first().cloned().flatten());
            if here.is_some() && here == there {
                return Ok(Materialized {
                    root: cache_root,
                    name: r.name,
                    stats: st,
                    lazy: false,
                });
            }
            let _ = snap.delete();
        }
    }
    pull_into(
        root,
        &store,
        &r.name,
        &r.tag,
        &cache_root,
        &r.name,
        &mut st,
        0,
        out,
    )?;
    Ok(Materialized {
        root: cache_root,
        name: r.name,
        stats: st,
        lazy: false,
    })
}

/// Serialises the making of one cached workspace (`name` under `cache_root`).
fn name_lock(cache_root: &Path, name: &str) -> Result<snapshot::file_lock::FileLock, Failure> {
    let locks = cache_root.join("locks");
    std::fs::create_dir_all(&locks).map_err(io_err("cannot create", &locks))?;
    snapshot::file_lock::FileLock::acquire(&locks.join(format!("{name}.lock")))
        .map_err(|e| Failure::new(Code::Error, e.to_string()))
}

/// The working set a page server recorded beside `snap`'s memory, to push: only a regular file
/// (the jailed page server and VMM write this directory, and root must not be led to upload a
/// host file through a link), bounded, and only if it decodes as a working set for this memory.
fn recorded_working_set(snap: &snapshot::Snapshot) -> Option<Vec<u8>> {
    use snapshot::pageserver::workingset::{WorkingSet, FILE_NAME};
    use std::io::Read;
    let memory_bytes = snap.manifest.file(snapshot::manifest::MEMORY)?.size;
    let mut bytes = Vec::new();
    snap.open_member(FILE_NAME)
        .ok()?
        .take(index::MAX_INDEX_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    (bytes.len() as u64 <= index::MAX_INDEX_BYTES
        && WorkingSet::decode(&bytes, memory_bytes).is_ok())
    .then_some(bytes)
}
