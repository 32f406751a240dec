//! The page server: one per snapshot, serving its `memory.bin` to every VMM restored from it,
//! one thread per VMM session plus one accepting connections.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::backing::{self, LazyInfo, UnitSource};
use super::handler::{
    AfterRemove, AtomicCounters, End, MemoryFile, PrefetchPlan, Recording, Session, SessionConfig,
    SessionShared,
};
use super::lock;
use super::protocol::{Accept, Counters, Message, RefuseCode, MAX_FRAME};
use super::sys::{self, EventFd, Seqpacket, PAGE};
use super::workingset::{self, Recorder, WorkingSet};
use crate::open::Snapshot;

/// How a server serves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Bytes served around each fault (aligned, clipped to the region): a power of two, at least
    /// one page. With `adaptive_chunks`, the largest chunk.
    pub chunk_bytes: u64,
    /// Serve an isolated fault with its page alone, and grow the chunk (x4 per step, up to
    /// `chunk_bytes`, forward from the fault) while faults continue sequentially, like file
    /// read-ahead. Off: every fault gets the aligned `chunk_bytes` around it.
    pub adaptive_chunks: bool,
    /// Prefetch the snapshot's recorded working set into each new VMM.
    pub prefetch: bool,
    /// With no working set yet, record the first VMM's first touches and write them.
    pub record: bool,
    /// Write the recording after this long even if the first VMM is still running (`None`:
    /// only when it disconnects).
    pub record_for: Option<Duration>,
    /// Most pages one prefetch step places before the server looks for faults again.
    pub prefetch_step_bytes: u64,
    /// What a fault on a page the VMM dropped (balloon) is served with.
    pub after_remove: AfterRemove,
    /// Most VMMs served at once; more are refused as busy.
    pub max_clients: usize,
    /// How long a new connection may take to send its handshake.
    pub handshake_timeout: Duration,
}

/// Fetches in flight at once for a lazy memory file's readahead.
const READAHEAD_THREADS: usize = 4;

/// The largest chunk (adaptive chunks are the default): measured with
/// `cargo bench -p snapshot --bench uffd`, see the module docs.
pub const DEFAULT_CHUNK_BYTES: u64 = 256 << 10;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            adaptive_chunks: true,
            prefetch: true,
            record: true,
            record_for: Some(Duration::from_secs(30)),
            prefetch_step_bytes: 256 << 10,
            after_remove: AfterRemove::Zero,
            max_clients: 256,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot open memory file {path}: {source}")]
    Memory { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("another page server is already listening on {0}")]
    InUse(PathBuf),
    #[error("chunk size {0} is not a power of two of at least 4096 bytes")]
    Chunk(u64),
    #[error("cannot start the page server: {0}")]
    Start(io::Error),
}

/// The working set's state in this server.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkingSetInfo {
    pub path: Option<PathBuf>,
    /// Pages of the working set found at start (prefetched into new VMMs).
    pub loaded: Option<usize>,
    /// Why an existing working set file was not used (it is re-recorded).
    pub load_error: Option<String>,
    /// The session recording first touches.
    pub recording_client: Option<u64>,
    /// Pages written by this server.
    pub written: Option<usize>,
    pub write_error: Option<String>,
}

/// One live session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClientStats {
    pub id: u64,
    pub pid: Option<u32>,
    pub label: String,
    pub recording: bool,
    pub counters: Counters,
    pub prefetch_total: u64,
    pub prefetch_done: bool,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    /// All sessions, live and ended.
    pub totals: Counters,
    pub clients_active: usize,
    pub clients_total: u64,
    /// Handshakes refused.
    pub refused: u64,
    pub memory_bytes: u64,
    pub memory_data_pages: u64,
    pub working_set: WorkingSetInfo,
    /// Live sessions, by id.
    pub clients: Vec<ClientStats>,
    /// How recent sessions ended (newest last, at most 32).
    pub ended: Vec<String>,
    /// For a memory file filled while served: what was fetched.
    pub lazy: Option<LazyInfo>,
}

struct Shared {
    config: ServerConfig,
    mem: MemoryFile,
    stop: EventFd,
    ws_path: Option<PathBuf>,
    prefetch_set: Mutex<Option<Arc<PrefetchPlan>>>,
    recording_claimed: AtomicBool,
    ws_info: Mutex<WorkingSetInfo>,
    sessions: Mutex<HashMap<u64, Arc<SessionShared>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
    retired: Mutex<Counters>,
    clients_total: AtomicU64,
    refused: AtomicU64,
    ended: Mutex<Vec<String>>,
}

/// A running page server. Dropping it (or [`PageServer::shutdown`]) stops it: every VMM it
/// serves sees its socket close and must stop.
pub struct PageServer {
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
    socket_path: PathBuf,
}

impl PageServer {
    /// Serves `snapshot`'s memory on `socket`, keeping the working set next to it.
    pub fn for_snapshot(
        snapshot: &Snapshot,
        socket: &Path,
        config: ServerConfig,
    ) -> Result<Self, ServerError> {
        Self::start(
            &snapshot.memory_path(),
            Some(snapshot.path(workingset::FILE_NAME)),
            socket,
            config,
        )
    }

    /// Serves the memory file `memory` on `socket`; `working_set` is where the working set is
    /// loaded from and recorded to (`None`: neither).
    pub fn start(
        memory: &Path,
        working_set: Option<PathBuf>,
        socket: &Path,
        config: ServerConfig,
    ) -> Result<Self, ServerError> {
        let mem = MemoryFile::open(memory).map_err(|source| ServerError::Memory {
            path: memory.to_path_buf(),
            source,
        })?;
        Self::start_with(mem, working_set, socket, config)
    }

    /// Serves a memory file that `source` fills while it is served (see [`super::backing`]):
    /// `memory` is a sparse file of the full size, written by this server only. With a working
    /// set, the units it needs are fetched in the background at once, in first-touch order.
    pub fn start_lazy(
        memory: &Path,
        source: Arc<dyn UnitSource>,
        working_set: Option<PathBuf>,
        socket: &Path,
        config: ServerConfig,
    ) -> Result<Self, ServerError> {
        let mem = MemoryFile::open_lazy(memory, source).map_err(|source| ServerError::Memory {
            path: memory.to_path_buf(),
            source,
        })?;
        Self::start_with(mem, working_set, socket, config)
    }

    fn start_with(
        mem: MemoryFile,
        working_set: Option<PathBuf>,
        socket: &Path,
        config: ServerConfig,
    ) -> Result<Self, ServerError> {
        if config.chunk_bytes < PAGE || !config.chunk_bytes.is_power_of_two() {
            return Err(ServerError::Chunk(config.chunk_bytes));
        }
        let mut info = WorkingSetInfo {
            path: working_set.clone(),
            ..Default::default()
        };
        let mut prefetch_set = None;
        if let Some(p) = &working_set {
            workingset::sweep_temporaries(p);
            match WorkingSet::load(p, mem.len()) {
                Ok(Some(ws)) => {
                    info.loaded = Some(ws.pages.len());
                    if let Some(lazy) = mem.lazy() {
                        let order = backing::units_in_order(&ws.pages, lazy.unit_pages());
                        lazy.readahead(order, READAHEAD_THREADS);
                    }
                    prefetch_set = Some(Arc::new(PrefetchPlan::new(ws)));
                }
                Ok(None) => {}
                Err(e) => info.load_error = Some(e.to_string()),
            }
        }
        let listener = listen(socket)?;
        let shared = Arc::new(Shared {
            stop: EventFd::new().map_err(ServerError::Start)?,
            mem,
            ws_path: working_set,
            recording_claimed: AtomicBool::new(prefetch_set.is_some()),
            prefetch_set: Mutex::new(prefetch_set),
            ws_info: Mutex::new(info),
            sessions: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            retired: Mutex::new(Counters::default()),
            clients_total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            ended: Mutex::new(Vec::new()),
            config,
        });
        let s = shared.clone();
        let handle = std::thread::Builder::new()
            .name("pageserver-accept".into())
            .spawn(move || accept_loop(&s, listener))
            .map_err(ServerError::Start)?;
        Ok(Self {
            shared,
            listener: Some(handle),
            socket_path: socket.to_path_buf(),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub fn stats(&self) -> ServerStats {
        let sh = &self.shared;
        let mut totals = *lock(&sh.retired);
        let mut clients: Vec<ClientStats> = lock(&sh.sessions)
            .values()
            .map(|s| {
                let st = s.stats();
                totals.add(&st.counters);
                ClientStats {
                    id: s.id,
                    pid: s.pid,
                    label: s.label.clone(),
                    recording: s.recording,
                    counters: st.counters,
                    prefetch_total: st.prefetch_total,
                    prefetch_done: st.prefetch_done,
                    last_error: lock(&s.last_error).clone(),
                }
            })
            .collect();
        clients.sort_by_key(|c| c.id);
        ServerStats {
            totals,
            clients_active: clients.len(),
            clients_total: sh.clients_total.load(Ordering::Relaxed),
            refused: sh.refused.load(Ordering::Relaxed),
            memory_bytes: sh.mem.len(),
            memory_data_pages: sh.mem.data_pages(),
            working_set: lock(&sh.ws_info).clone(),
            clients,
            ended: lock(&sh.ended).clone(),
            lazy: sh.mem.lazy().map(|l| l.info()),
        }
    }

    /// Stops accepting, ends every session (their VMMs see the socket close) and waits for the
    /// threads. A recording in progress is written first.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.signal();
        if let Some(l) = self.shared.mem.lazy() {
            l.stop();
        }
        if let Some(h) = self.listener.take() {
            let _ = h.join();
        }
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        if self.listener.is_some() {
            self.stop();
        }
    }
}

/// Listens on `path`, replacing a stale socket left by a dead server but never a live one.
fn listen(path: &Path) -> Result<Seqpacket, ServerError> {
    let err = |source| ServerError::Listen {
        path: path.to_path_buf(),
        source,
    };
    match Seqpacket::listen(path) {
        Ok(l) => Ok(l),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => {
            use std::os::unix::fs::FileTypeExt;
            let is_socket = std::fs::symlink_metadata(path)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if !is_socket {
                return Err(err(e));
            }
            if Seqpacket::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(err)?;
            Seqpacket::listen(path).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

fn accept_loop(sh: &Arc<Shared>, listener: Seqpacket) {
    loop {
        let ready = match sys::poll_in(&[listener.fd(), sh.stop.fd()], -1) {
            Ok(r) => r,
            Err(_) => return,
        };
        if ready[1].readable {
            return;
        }
        if !ready[0].readable {
            continue;
        }
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(_) => continue,
        };
        let mut threads = lock(&sh.threads);
        threads.retain(|t| !t.is_finished());
        if threads.len() >= sh.config.max_clients {
            drop(threads);
            refuse(
                sh,
                &conn,
                RefuseCode::Busy,
                "the page server serves its maximum of VMMs",
            );
            continue;
        }
        let s = sh.clone();
        let spawned = std::thread::Builder::new()
            .name("pageserver-session".into())
            .spawn(move || session(&s, conn));
        if let Ok(h) = spawned {
            threads.push(h);
        }
    }
}

fn refuse(sh: &Shared, conn: &Seqpacket, code: RefuseCode, reason: &str) {
    tracing::warn!(?code, "refused a connection: {reason}");
    sh.refused.fetch_add(1, Ordering::Relaxed);
    let _ = conn.send(
        &Message::Refuse {
            code,
            reason: reason.to_string(),
        }
        .encode(),
        &[],
    );
}

fn note_end(sh: &Shared, s: &str) {
    tracing::info!("{s}");
    let mut e = lock(&sh.ended);
    if e.len() >= 32 {
        e.remove(0);
    }
    e.push(s.to_string());
}

/// The handshake, then the session until it ends.
fn session(sh: &Arc<Shared>, conn: Seqpacket) {
    // A VMM that stops reading its socket must not stall this thread (or the server's shutdown).
    let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
    let deadline = Instant::now() + sh.config.handshake_timeout;
    let ready = sys::poll_in(
        &[conn.fd(), sh.stop.fd()],
        deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .min(i32::MAX as u128) as i32,
    );
    match ready {
        Ok(r) if r[1].readable => return,
        Ok(r) if r[0].readable || r[0].hangup => {}
        _ => {
            sh.refused.fetch_add(1, Ordering::Relaxed);
            note_end(sh, "a connection sent no handshake in time");
            return;
        }
    }
    let mut buf = vec![0u8; MAX_FRAME + 1];
    let got = match conn.recv(&mut buf) {
        Ok(Some(g)) => g,
        _ => return,
    };
    if got.truncated {
        return refuse(
            sh,
            &conn,
            RefuseCode::TooLarge,
            "handshake larger than any valid one",
        );
    }
    let hello = match Message::decode(&buf[..got.len]) {
        Ok(Message::Hello(h)) => h,
        Ok(_) => return refuse(sh, &conn, RefuseCode::Unexpected, "expected a hello"),
        Err(e) => return refuse(sh, &conn, e.code(), &e.to_string()),
    };
    if got.fds.len() != 1 || got.fds_truncated {
        return refuse(
            sh,
            &conn,
            RefuseCode::NotUserfaultfd,
            &format!(
                "expected exactly one userfaultfd, got {} descriptors",
                got.fds.len()
            ),
        );
    }
    let mut fds = got.fds;
    let uffd = fds.remove(0);
    if !sys::is_uffd(uffd.as_fd()) {
        return refuse(
            sh,
            &conn,
            RefuseCode::NotUserfaultfd,
            "the descriptor is not a userfaultfd",
        );
    }
    // A userfaultfd before UFFDIO_API polls as an error.
    if sys::poll_in(&[uffd.as_fd()], 0).map_or(true, |r| r[0].hangup) {
        return refuse(
            sh,
            &conn,
            RefuseCode::NotUserfaultfd,
            "the userfaultfd is not initialised (no UFFDIO_API)",
        );
    }
    if hello.features & (sys::FEATURE_EVENT_FORK | sys::FEATURE_EVENT_REMAP) != 0 {
        return refuse(
            sh,
            &conn,
            RefuseCode::Unsupported,
            "fork and remap events cannot be followed: enable only remove/unmap events",
        );
    }
    if let Err(e) = hello.layout.validate(Some(sh.mem.len())) {
        return refuse(sh, &conn, e.code(), &e.to_string());
    }

    let id = sh.next_id.fetch_add(1, Ordering::Relaxed);
    let prefetch = if sh.config.prefetch {
        lock(&sh.prefetch_set).clone()
    } else {
        None
    };
    let recording = sh.config.record
        && sh.ws_path.is_some()
        && prefetch.is_none()
        && !sh.recording_claimed.swap(true, Ordering::SeqCst);
    let shared = Arc::new(SessionShared {
        id,
        pid: conn.peer_pid(),
        label: hello.label.clone(),
        recording,
        counters: AtomicCounters::default(),
        prefetch_total: AtomicU64::new(0),
        prefetch_done: AtomicBool::new(false),
        last_error: Mutex::new(None),
    });
    let accept = Accept {
        client_id: id,
        chunk_bytes: sh.config.chunk_bytes,
        prefetch_pages: prefetch.as_ref().map_or(0, |p| p.set.pages.len() as u64),
        recording,
    };
    // Visible in the statistics before the VMM learns it was accepted.
    sh.clients_total.fetch_add(1, Ordering::Relaxed);
    lock(&sh.sessions).insert(id, shared.clone());
    if recording {
        lock(&sh.ws_info).recording_client = Some(id);
    }
    if conn.send(&Message::Accept(accept).encode(), &[]).is_err() {
        lock(&sh.sessions).remove(&id);
        return;
    }
    tracing::debug!(
        client = id,
        label = %hello.label,
        pid = ?conn.peer_pid(),
        recording,
        prefetch_pages = prefetch.as_ref().map_or(0, |p| p.set.pages.len()),
        "session accepted"
    );

    let rec = recording.then(|| {
        let s = sh.clone();
        Recording {
            recorder: Recorder::new(
                sh.mem.len(),
                sh.config.chunk_bytes,
                sh.config.adaptive_chunks,
            ),
            deadline: sh.config.record_for.map(|d| Instant::now() + d),
            sink: Box::new(move |ws: Option<WorkingSet>| match ws {
                Some(ws) => write_working_set(&s, ws),
                None => {
                    // Nothing touched (a VMM that went away at once): let the next one record.
                    lock(&s.ws_info).recording_client = None;
                    s.recording_claimed.store(false, Ordering::SeqCst);
                }
            }),
        }
    });
    let cfg = SessionConfig {
        chunk_pages: sh.config.chunk_bytes / PAGE,
        adaptive: sh.config.adaptive_chunks,
        prefetch_step_pages: (sh.config.prefetch_step_bytes / PAGE).max(1),
        after_remove: sh.config.after_remove,
    };
    let end = Session::new(
        uffd,
        &conn,
        sh.stop.fd(),
        &sh.mem,
        hello.layout.regions,
        shared.clone(),
        cfg,
        rec,
        prefetch,
    )
    .run();
    if let End::Fatal(reason) = &end {
        let _ = conn.send(&Message::Fatal(reason.clone()).encode(), &[]);
    }
    conn.shutdown();
    lock(&sh.sessions).remove(&id);
    lock(&sh.retired).add(&shared.counters.snapshot());
    note_end(
        sh,
        &format!(
            "client {id} ({}): {}",
            if hello.label.is_empty() {
                "-"
            } else {
                &hello.label
            },
            match &end {
                End::ClientClosed => "disconnected".to_string(),
                End::ClientGone => "its process exited".to_string(),
                End::Stopped => "server stopped".to_string(),
                End::Fatal(r) => format!("failed: {r}"),
            }
        ),
    );
}

fn write_working_set(sh: &Shared, ws: WorkingSet) {
    let Some(path) = &sh.ws_path else { return };
    let n = ws.pages.len();
    match ws.write_atomic(path) {
        Ok(()) => {
            let mut info = lock(&sh.ws_info);
            info.written = Some(n);
            info.load_error = None;
            drop(info);
            if sh.config.prefetch {
                *lock(&sh.prefetch_set) = Some(Arc::new(PrefetchPlan::new(ws)));
            }
        }
        Err(e) => {
            tracing::warn!("cannot write the working set: {e}");
            lock(&sh.ws_info).write_error = Some(e.to_string());
        }
    }
}
