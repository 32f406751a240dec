//! One VMM's session: reads its userfaultfd, answers faults with chunks of the memory file,
//! follows remove/unmap events, prefetches a recorded working set when nothing else is pending,
//! and records first touches.
//!
//! Everything for one session runs on one thread, so fault handling has strict priority over
//! prefetch: a prefetch step (a bounded number of pages) runs only when a zero-timeout poll finds
//! no pending fault, event or socket message.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::backing::{LazyFill, UnitSource};
use super::protocol::{Counters, Message, Region, SessionStats, MAX_FRAME};
use super::sys::{self, Fill, Msg, Seqpacket, PAGE};
use super::workingset::{Recorder, WorkingSet};

/// A fixed-size bitmap.
#[derive(Debug, Clone)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
}

impl Bitmap {
    pub fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }
    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    pub fn set(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
        }
    }
    pub fn clear(&mut self, i: u64) {
        if i < self.len {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }
    /// Sets bit `i`; returns whether it was already set.
    pub fn test_and_set(&mut self, i: u64) -> bool {
        let was = self.get(i);
        self.set(i);
        was
    }
    pub fn set_range(&mut self, from: u64, to: u64) {
        for i in from..to.min(self.len) {
            self.set(i);
        }
    }
    pub fn clear_range(&mut self, from: u64, to: u64) {
        for i in from..to.min(self.len) {
            self.clear(i);
        }
    }
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// `memory.bin` mapped read-only once and shared by every session, with a bitmap of the pages
/// that hold data (the rest are holes: zero pages).
pub struct MemoryFile {
    ptr: *const u8,
    len: u64,
    data: Bitmap,
    /// One page of zeros (anonymous), a source for placing a zero page that will be written.
    zero: *const u8,
    /// Set when the file is filled while served: a page is copied only once its unit is there.
    lazy: Option<Arc<LazyFill>>,
}

// SAFETY: both mappings are read-only for the life of the struct; only raw pointers to them are
// handed to the kernel as copy sources.
unsafe impl Send for MemoryFile {}
// SAFETY: as above.
unsafe impl Sync for MemoryFile {}

impl MemoryFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Self::check_len(path, len)?;
        let data = data_pages(&file, len)?;
        Self::map(&file, len, data, None)
    }

    /// A memory file that `source` fills unit by unit as pages are needed: `path` is a sparse
    /// file of the full size (what is in it already is not trusted: every unit is fetched again
    /// by this server before it is served).
    pub(crate) fn open_lazy(path: &Path, source: Arc<dyn UnitSource>) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let len = file.metadata()?.len();
        Self::check_len(path, len)?;
        let lazy = LazyFill::new(source, file.try_clone()?, len)?;
        let mut data = Bitmap::new(len / PAGE);
        let up = lazy.unit_pages();
        for u in 0..(len / PAGE).div_ceil(up) {
            if lazy.page_has_data(u * up) {
                data.set_range(u * up, (u + 1) * up);
            }
        }
        Self::map(&file, len, data, Some(Arc::new(lazy)))
    }

    fn check_len(path: &Path, len: u64) -> io::Result<()> {
        if len == 0 || !len.is_multiple_of(PAGE) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is {len} bytes, not a whole number of pages",
                    path.display()
                ),
            ));
        }
        Ok(())
    }

    fn map(
        file: &std::fs::File,
        len: u64,
        data: Bitmap,
        lazy: Option<Arc<LazyFill>>,
    ) -> io::Result<Self> {
        // SAFETY: a fresh read-only shared mapping of the whole file; checked below. Writes
        // through the file (a lazy fill) show in it: both go through the same page cache.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh anonymous read-only page.
        let zero = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if zero == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping the mapping made above.
            unsafe { libc::munmap(ptr, len as usize) };
            return Err(e);
        }
        Ok(Self {
            ptr: ptr as *const u8,
            len,
            data,
            zero: zero as *const u8,
            lazy,
        })
    }

    pub(crate) fn lazy(&self) -> Option<&Arc<LazyFill>> {
        self.lazy.as_ref()
    }

    /// Makes file pages `from..to` readable from the mapping (a no-op unless lazy).
    fn ensure(&self, from: u64, to: u64) -> Result<(), String> {
        match &self.lazy {
            Some(l) => l.ensure(from, to),
            None => Ok(()),
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn pages(&self) -> u64 {
        self.len / PAGE
    }

    /// Pages that hold data (not holes).
    pub fn data_pages(&self) -> u64 {
        self.data.count()
    }

    fn is_data(&self, page: u64) -> bool {
        self.data.get(page)
    }

    fn page_ptr(&self, page: u64) -> *const u8 {
        debug_assert!(page < self.pages());
        // The offset is inside the mapping: callers pass pages of validated regions.
        self.ptr.wrapping_add((page * PAGE) as usize)
    }
}

impl Drop for MemoryFile {
    fn drop(&mut self) {
        if let Some(l) = &self.lazy {
            l.stop();
        }
        // SAFETY: unmapping exactly the mappings made in `open`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len as usize);
            libc::munmap(self.zero as *mut libc::c_void, PAGE as usize);
        }
    }
}

/// Pages holding data, from SEEK_DATA / SEEK_HOLE. A file system that cannot tell reports the
/// whole file as data, which is correct, only slower to serve.
fn data_pages(file: &std::fs::File, len: u64) -> io::Result<Bitmap> {
    let pages = len / PAGE;
    let mut map = Bitmap::new(pages);
    let fd = file.as_raw_fd();
    let mut off: i64 = 0;
    while (off as u64) < len {
        // SAFETY: lseek on our own fd.
        let start = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break,
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    map.set_range(0, pages);
                    break;
                }
                _ => return Err(e),
            }
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        let end = if end < 0 { len as i64 } else { end };
        map.set_range(start as u64 / PAGE, (end as u64).div_ceil(PAGE));
        if end <= start {
            break;
        }
        off = end;
    }
    Ok(map)
}

/// What a later fault on a page the VMM dropped (MADV_DONTNEED / MADV_REMOVE, e.g. a balloon)
/// is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterRemove {
    /// Zeros, as anonymous memory reads after MADV_DONTNEED (what an eager restore gives).
    #[default]
    Zero,
    /// The snapshot's contents again (what a MAP_PRIVATE restore gives).
    Reload,
}

/// Counters one session updates and the server reads.
#[derive(Debug, Default)]
pub struct AtomicCounters {
    faults: AtomicU64,
    pages_copied: AtomicU64,
    zero_pages: AtomicU64,
    prefetched_pages: AtomicU64,
    removed_pages: AtomicU64,
    already_present: AtomicU64,
    retries: AtomicU64,
}

fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl AtomicCounters {
    pub fn snapshot(&self) -> Counters {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counters {
            faults: l(&self.faults),
            pages_copied: l(&self.pages_copied),
            zero_pages: l(&self.zero_pages),
            prefetched_pages: l(&self.prefetched_pages),
            removed_pages: l(&self.removed_pages),
            already_present: l(&self.already_present),
            retries: l(&self.retries),
        }
    }
}

/// What the server knows about a session while it runs.
#[derive(Debug)]
pub struct SessionShared {
    pub id: u64,
    pub pid: Option<u32>,
    pub label: String,
    pub recording: bool,
    pub counters: AtomicCounters,
    pub prefetch_total: AtomicU64,
    pub prefetch_done: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

impl SessionShared {
    pub fn stats(&self) -> SessionStats {
        SessionStats {
            counters: self.counters.snapshot(),
            prefetch_total: self.prefetch_total.load(Ordering::Relaxed),
            prefetch_done: self.prefetch_done.load(Ordering::Relaxed),
        }
    }

    fn note_error(&self, e: String) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e);
        }
    }
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The VMM closed its socket or said goodbye.
    ClientClosed,
    /// The VMM's process is gone (ESRCH).
    ClientGone,
    /// The server is shutting down.
    Stopped,
    /// This VM cannot be served any more; the VMM is told why.
    Fatal(String),
}

pub struct SessionConfig {
    /// The chunk, or with `adaptive` the largest chunk.
    pub chunk_pages: u64,
    pub adaptive: bool,
    pub prefetch_step_pages: u64,
    pub after_remove: AfterRemove,
}

/// Sequential-fault detection for adaptive chunks, like file read-ahead: a fault that lands in
/// the window just past a recent chunk continues that stream and gets a window four times larger
/// (up to the maximum); any other fault starts a new stream with a single page. A few streams are
/// tracked, so vCPUs walking memory in parallel each keep theirs.
#[derive(Debug, Clone)]
pub struct Streams {
    next_page: [u64; 4],
    window: [u64; 4],
    slot: usize,
    max: u64,
}

impl Streams {
    pub fn new(max_pages: u64) -> Self {
        Self {
            next_page: [0; 4],
            window: [0; 4],
            slot: 0,
            max: max_pages.max(1),
        }
    }

    /// Pages to serve from file page `fp` on.
    pub fn window(&mut self, fp: u64) -> u64 {
        for i in 0..4 {
            let (next, w) = (self.next_page[i], self.window[i]);
            if w > 0 && fp >= next && fp < next + w {
                let grown = (w * 4).min(self.max);
                self.window[i] = grown;
                self.next_page[i] = fp + grown;
                return grown;
            }
        }
        let i = self.slot;
        self.slot = (i + 1) % 4;
        self.window[i] = 1;
        self.next_page[i] = fp + 1;
        1
    }
}

/// A working set ready to prefetch: the set and where each page sits in it.
#[derive(Debug)]
pub struct PrefetchPlan {
    pub set: WorkingSet,
    pos: std::collections::HashMap<u32, u32>,
}

impl PrefetchPlan {
    pub fn new(set: WorkingSet) -> Self {
        let pos = set
            .pages
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, i as u32))
            .collect();
        Self { set, pos }
    }

    fn position(&self, fp: u64) -> Option<usize> {
        u32::try_from(fp)
            .ok()
            .and_then(|p| self.pos.get(&p))
            .map(|i| *i as usize)
    }
}

/// Recording of first touches, handed to `sink` once (at the deadline or at the end; `None`
/// if nothing faulted).
pub struct Recording {
    pub recorder: Recorder,
    pub deadline: Option<Instant>,
    pub sink: Box<dyn FnOnce(Option<WorkingSet>) + Send>,
}

struct Prefetch {
    plan: Arc<PrefetchPlan>,
    /// The next entry to prefetch.
    next: usize,
    /// Where to go back to once the end is reached, after a fault made `next` jump ahead.
    resume: Option<usize>,
    chunk_pages: u64,
    /// Replays the recording server's adaptive chunks.
    streams: Option<Streams>,
}

/// A fault read from the uffd, stamped with the read that returned it.
#[derive(Debug, Clone, Copy)]
struct Fault {
    addr: u64,
    write: bool,
    stamp: u64,
}

/// A run of file pages filled after read number `stamp`: faults read no later than that on
/// those pages were woken by the fill itself.
struct Filled {
    from: u64,
    to: u64,
    stamp: u64,
}

enum RunEnd {
    Complete,
    NoMapping,
    Failed(i32),
}

pub struct Session<'a> {
    uffd: OwnedFd,
    sock: &'a Seqpacket,
    stop: BorrowedFd<'a>,
    mem: &'a MemoryFile,
    /// Sorted by host address.
    regions: Vec<Region>,
    /// Indices into `regions`, sorted by file offset.
    by_file: Vec<usize>,
    populated: Bitmap,
    removed: Bitmap,
    shared: Arc<SessionShared>,
    cfg: SessionConfig,
    recording: Option<Recording>,
    prefetch: Option<Prefetch>,
    streams: Streams,
    pending: VecDeque<Fault>,
    filled: Vec<Filled>,
    reads: u64,
    /// The prefetch's next page waits for its unit (lazy memory): poll instead of spinning.
    prefetch_waiting: bool,
}

impl<'a> Session<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        uffd: OwnedFd,
        sock: &'a Seqpacket,
        stop: BorrowedFd<'a>,
        mem: &'a MemoryFile,
        mut regions: Vec<Region>,
        shared: Arc<SessionShared>,
        cfg: SessionConfig,
        recording: Option<Recording>,
        prefetch: Option<Arc<PrefetchPlan>>,
    ) -> Self {
        regions.sort_by_key(|r| r.host_addr);
        let cfg_chunk = cfg.chunk_pages;
        let mut by_file: Vec<usize> = (0..regions.len()).collect();
        by_file.sort_by_key(|&i| regions[i].file_offset);
        let prefetch = prefetch.map(|plan| {
            shared
                .prefetch_total
                .store(plan.set.pages.len() as u64, Ordering::Relaxed);
            let chunk_pages = (plan.set.chunk_bytes / PAGE).max(1);
            Prefetch {
                streams: plan.set.adaptive.then(|| Streams::new(chunk_pages)),
                chunk_pages,
                plan,
                next: 0,
                resume: None,
            }
        });
        if prefetch.is_none() {
            shared.prefetch_done.store(true, Ordering::Relaxed);
        }
        Self {
            uffd,
            sock,
            stop,
            populated: Bitmap::new(mem.pages()),
            removed: Bitmap::new(mem.pages()),
            mem,
            regions,
            by_file,
            shared,
            cfg,
            recording,
            prefetch,
            streams: Streams::new(cfg_chunk),
            pending: VecDeque::new(),
            filled: Vec::new(),
            reads: 0,
            prefetch_waiting: false,
        }
    }

    /// Serves until the VMM leaves, the server stops, or the VM cannot be served.
    pub fn run(&mut self) -> End {
        let end = self.serve();
        self.flush_recording();
        end
    }

    fn serve(&mut self) -> End {
        loop {
            if let Err(e) = self.serve_pending() {
                return e;
            }
            let deadline = self.recording.as_ref().and_then(|r| r.deadline);
            if deadline.is_some_and(|d| Instant::now() >= d) {
                self.flush_recording();
            }
            let timeout = if self.prefetch.is_some() {
                if self.prefetch_waiting {
                    2
                } else {
                    0
                }
            } else if let Some(d) = self.recording.as_ref().and_then(|r| r.deadline) {
                let ms = d.saturating_duration_since(Instant::now()).as_millis();
                ms.clamp(1, i32::MAX as u128) as i32
            } else {
                -1
            };
            let ready = match sys::poll_in(&[self.uffd.as_fd(), self.sock.fd(), self.stop], timeout)
            {
                Ok(r) => r,
                Err(e) => return End::Fatal(format!("poll failed: {e}")),
            };
            if ready[2].readable {
                return End::Stopped;
            }
            let mut busy = false;
            if ready[0].readable {
                busy = true;
                if let Err(e) = self.read_uffd() {
                    return e;
                }
            } else if ready[0].hangup {
                return End::Fatal("the userfaultfd reported an error".into());
            }
            if ready[1].readable || ready[1].hangup {
                busy = true;
                if let Some(e) = self.read_socket() {
                    return e;
                }
            }
            if !busy && self.pending.is_empty() && self.prefetch.is_some() {
                if let Err(e) = self.prefetch_step() {
                    return e;
                }
            }
        }
    }

    fn flush_recording(&mut self) {
        if let Some(r) = self.recording.take() {
            let set = (!r.recorder.is_empty()).then(|| r.recorder.finish());
            (r.sink)(set);
        }
    }

    /// Reads every pending message: events are handled at once, faults queued.
    fn read_uffd(&mut self) -> Result<(), End> {
        let mut msgs = Vec::new();
        loop {
            let before = msgs.len();
            sys::read_msgs(self.uffd.as_fd(), 64, &mut msgs)
                .map_err(|e| End::Fatal(format!("reading the userfaultfd failed: {e}")))?;
            if msgs.len() - before < 64 {
                break;
            }
        }
        if msgs.is_empty() {
            return Ok(());
        }
        self.reads += 1;
        for m in msgs {
            match m {
                Msg::PageFault { address, flags } => self.pending.push_back(Fault {
                    addr: address,
                    write: flags & sys::PAGEFAULT_FLAG_WRITE != 0,
                    stamp: self.reads,
                }),
                Msg::Remove { start, end } => self.forget(start, end, true),
                Msg::Unmap { start, end } => self.forget(start, end, false),
                Msg::Remap { from, len, .. } => self.forget(from, from.saturating_add(len), false),
                Msg::Fork { ufd } => {
                    // The kernel installed the child's uffd in our table: never serve it.
                    // SAFETY: closing the descriptor the kernel just gave this process.
                    unsafe { libc::close(ufd as i32) };
                }
                Msg::Other(_) => {}
            }
        }
        Ok(())
    }

    /// `start..end` of the VMM's memory is no longer populated.
    fn forget(&mut self, start: u64, end: u64, removed: bool) {
        let start = start - start % PAGE;
        let end = end.div_ceil(PAGE).saturating_mul(PAGE);
        let mut n = 0;
        for r in &self.regions {
            let s = start.max(r.host_addr);
            let e = end.min(r.host_end());
            if s >= e {
                continue;
            }
            let base = r.file_offset / PAGE;
            let (a, b) = (
                base + (s - r.host_addr) / PAGE,
                base + (e - r.host_addr) / PAGE,
            );
            self.populated.clear_range(a, b);
            if removed {
                self.removed.set_range(a, b);
            }
            n += b - a;
        }
        bump(&self.shared.counters.removed_pages, n);
    }

    fn serve_pending(&mut self) -> Result<(), End> {
        while let Some(f) = self.pending.pop_front() {
            self.serve_fault(f)?;
        }
        self.filled.clear();
        Ok(())
    }

    fn region_of_host(&self, addr: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.host_end() <= addr);
        (i < self.regions.len() && self.regions[i].host_addr <= addr).then_some(i)
    }

    /// Region index and region-relative page of file page `fp`.
    fn region_of_file_page(&self, fp: u64) -> Option<(usize, u64)> {
        let off = fp * PAGE;
        let k = self
            .by_file
            .partition_point(|&i| self.regions[i].file_end() <= off);
        let i = *self.by_file.get(k)?;
        let r = &self.regions[i];
        (r.file_offset <= off).then(|| (i, (off - r.file_offset) / PAGE))
    }

    fn zero_kind(&self, fp: u64) -> bool {
        !self.mem.is_data(fp)
            || (self.cfg.after_remove == AfterRemove::Zero && self.removed.get(fp))
    }

    fn serve_fault(&mut self, f: Fault) -> Result<(), End> {
        bump(&self.shared.counters.faults, 1);
        let Some(ri) = self.region_of_host(f.addr) else {
            return Err(End::Fatal(format!(
                "fault at {:#x}, outside the memory layout this VMM sent",
                f.addr
            )));
        };
        let r = self.regions[ri];
        let p = (f.addr - r.host_addr) / PAGE;
        let fp = r.file_offset / PAGE + p;
        if let Some(rec) = self.recording.as_mut() {
            rec.recorder.touch(fp);
        }
        // Prefetch follows the guest: once it faults on an entry of the working set, prefetch
        // carries on from the entry after it (and comes back for the skipped ones at the end).
        if let Some(pf) = self.prefetch.as_mut() {
            if let Some(i) = pf.plan.position(fp).filter(|i| *i >= pf.next) {
                if i > pf.next && pf.resume.is_none() {
                    pf.resume = Some(pf.next);
                }
                pf.next = i + 1;
                if let Some(st) = pf.streams.as_mut() {
                    st.window(fp);
                }
            }
        }
        if self.populated.get(fp) {
            if self
                .filled
                .iter()
                .any(|x| x.stamp >= f.stamp && (x.from..x.to).contains(&fp))
            {
                // Filled (and its waiter woken) after this fault was read.
                return Ok(());
            }
            // The page may have gone without an event reaching us: fill it again; if it is
            // really there the fill reports EEXIST and wakes the waiter.
            self.populated.clear(fp);
        }
        let pages = r.len / PAGE;
        let (start, end) = if self.cfg.adaptive {
            (p, (p + self.streams.window(fp)).min(pages))
        } else {
            let start = p - p % self.cfg.chunk_pages;
            (start, (start + self.cfg.chunk_pages).min(pages))
        };
        let zero_write = f.write && self.zero_kind(fp);
        let first = if zero_write {
            // A write to a zero page: place a private zero-filled page at once rather than the
            // shared zero page, which the write would fault on again.
            self.place_zero_copy(ri, p)?
        } else {
            self.fill(ri, p, end, false)?
        };
        if !self.populated.get(fp) {
            match first {
                RunEnd::Failed(e) => {
                    return Err(End::Fatal(format!(
                        "cannot place the page at {:#x} (file offset {:#x}): {}",
                        f.addr,
                        fp * PAGE,
                        io::Error::from_raw_os_error(e)
                    )));
                }
                // The mapping is gone: wake the thread so it sees that for itself.
                RunEnd::NoMapping | RunEnd::Complete => {
                    let _ = sys::wake(self.uffd.as_fd(), r.host_addr + p * PAGE, PAGE);
                }
            }
        }
        if zero_write {
            self.fill(ri, p + 1, end, false)?;
        }
        self.fill(ri, start, p, false)?;
        Ok(())
    }

    fn place_zero_copy(&mut self, ri: usize, p: u64) -> Result<RunEnd, End> {
        let r = self.regions[ri];
        let fp = r.file_offset / PAGE + p;
        loop {
            // SAFETY: `zero` is a readable page of this process.
            let res = unsafe {
                sys::copy(
                    self.uffd.as_fd(),
                    r.host_addr + p * PAGE,
                    self.mem.zero,
                    PAGE,
                )
            };
            match res {
                Fill::Done | Fill::Partial(_) => {
                    self.mark(fp, fp + 1, true, false);
                    return Ok(RunEnd::Complete);
                }
                Fill::Exists => {
                    self.exists(r.host_addr + p * PAGE, fp);
                    return Ok(RunEnd::Complete);
                }
                Fill::Again => self.again()?,
                Fill::NoMapping => return Ok(RunEnd::NoMapping),
                Fill::NoProcess => return Err(End::ClientGone),
                Fill::Failed(e) => return Ok(RunEnd::Failed(e)),
            }
        }
    }

    fn exists(&mut self, addr: u64, fp: u64) {
        self.populated.set(fp);
        bump(&self.shared.counters.already_present, 1);
        let _ = sys::wake(self.uffd.as_fd(), addr, PAGE);
    }

    fn again(&mut self) -> Result<(), End> {
        bump(&self.shared.counters.retries, 1);
        // A remove/unmap is in progress: the VMM's thread waits for us to read its event.
        self.read_uffd()?;
        std::thread::yield_now();
        Ok(())
    }

    fn mark(&mut self, from: u64, to: u64, zero: bool, prefetch: bool) {
        self.populated.set_range(from, to);
        let n = to - from;
        let c = &self.shared.counters;
        bump(if zero { &c.zero_pages } else { &c.pages_copied }, n);
        if prefetch {
            bump(&c.prefetched_pages, n);
        }
        self.filled.push(Filled {
            from,
            to,
            stamp: self.reads,
        });
    }

    /// Fills region-relative pages `first..last` of region `ri` that are not yet populated, in
    /// runs of data pages (UFFDIO_COPY) and zero pages (UFFDIO_ZEROPAGE). Returns how the run
    /// holding `first` ended.
    fn fill(&mut self, ri: usize, first: u64, last: u64, prefetch: bool) -> Result<RunEnd, End> {
        let r = self.regions[ri];
        let base = r.file_offset / PAGE;
        let mut outcome = RunEnd::Complete;
        let mut p = first;
        let skip = |s: &Self, fp: u64| s.populated.get(fp) || (prefetch && s.removed.get(fp));
        while p < last {
            if skip(self, base + p) {
                p += 1;
                continue;
            }
            let zero = self.zero_kind(base + p);
            let mut q = p + 1;
            while q < last && !skip(self, base + q) && self.zero_kind(base + q) == zero {
                q += 1;
            }
            let end = self.fill_run(ri, p, q, zero, prefetch)?;
            if p == first {
                outcome = end;
            }
            p = q;
        }
        Ok(outcome)
    }

    fn fill_run(
        &mut self,
        ri: usize,
        mut p: u64,
        q: u64,
        zero: bool,
        prefetch: bool,
    ) -> Result<RunEnd, End> {
        let r = self.regions[ri];
        let base = r.file_offset / PAGE;
        if !zero {
            // Lazy memory: the pages' unit must be in the file (fetched and verified) first. A
            // unit that cannot be fetched fails the VM rather than serve what the file holds.
            if let Err(e) = self.mem.ensure(base + p, base + q) {
                self.shared.note_error(e.clone());
                if prefetch {
                    // Left unplaced: the VM fails only if it touches these pages (and its
                    // fault cannot fetch them either).
                    return Ok(RunEnd::Complete);
                }
                return Err(End::Fatal(e));
            }
        }
        while p < q {
            let dst = r.host_addr + p * PAGE;
            let len = (q - p) * PAGE;
            let res = if zero {
                sys::zeropage(self.uffd.as_fd(), dst, len)
            } else {
                // SAFETY: pages base+p..base+q are inside the file mapping: the layout was
                // validated against the file's length.
                unsafe { sys::copy(self.uffd.as_fd(), dst, self.mem.page_ptr(base + p), len) }
            };
            match res {
                Fill::Done => {
                    self.mark(base + p, base + q, zero, prefetch);
                    p = q;
                }
                Fill::Partial(n) if n >= PAGE => {
                    let k = (n / PAGE).min(q - p);
                    self.mark(base + p, base + p + k, zero, prefetch);
                    p += k;
                }
                Fill::Partial(_) | Fill::Again => self.again()?,
                Fill::Exists => {
                    self.exists(dst, base + p);
                    p += 1;
                }
                Fill::NoMapping => return Ok(RunEnd::NoMapping),
                Fill::NoProcess => return Err(End::ClientGone),
                Fill::Failed(e) => {
                    self.shared.note_error(format!(
                        "filling {len:#x} bytes at {dst:#x}: {}",
                        io::Error::from_raw_os_error(e)
                    ));
                    return Ok(RunEnd::Failed(e));
                }
            }
        }
        Ok(RunEnd::Complete)
    }

    /// One bounded step through the working set, in first-touch order, each page with the chunk
    /// around it as the recording server served it.
    fn prefetch_step(&mut self) -> Result<(), End> {
        let Some(mut pf) = self.prefetch.take() else {
            return Ok(());
        };
        let budget = self.cfg.prefetch_step_pages.max(1);
        let before = self
            .shared
            .counters
            .prefetched_pages
            .load(Ordering::Relaxed);
        let mut visited = 0;
        let len = pf.plan.set.pages.len();
        self.prefetch_waiting = false;
        while visited < 4 * budget {
            if pf.next >= len {
                match pf.resume.take() {
                    Some(r) => pf.next = r,
                    None => break,
                }
            }
            let fp = u64::from(pf.plan.set.pages[pf.next]);
            match self.prefetch_unit_ready(fp) {
                Ok(true) => {}
                Ok(false) => {
                    // Its unit is on its way (readahead): look for faults meanwhile.
                    self.prefetch_waiting = true;
                    break;
                }
                Err(e) => {
                    // Not this VM's failure unless it touches that page: then its fault
                    // fails with the same error. The prefetch ends here.
                    tracing::warn!(client = self.shared.id, "prefetch stopped: {e}");
                    self.shared.note_error(e);
                    self.shared.prefetch_done.store(true, Ordering::Relaxed);
                    return Ok(());
                }
            }
            pf.next += 1;
            visited += 1;
            if let Some((ri, p)) = self.region_of_file_page(fp) {
                let pages = self.regions[ri].len / PAGE;
                let (start, end) = match pf.streams.as_mut() {
                    Some(st) => (p, (p + st.window(fp)).min(pages)),
                    None => {
                        let start = p - p % pf.chunk_pages;
                        (start, (start + pf.chunk_pages).min(pages))
                    }
                };
                self.fill(ri, p, end, true)?;
                self.fill(ri, start, p, true)?;
            }
            let placed = self
                .shared
                .counters
                .prefetched_pages
                .load(Ordering::Relaxed)
                - before;
            if placed >= budget {
                break;
            }
        }
        if pf.next < len || pf.resume.is_some() {
            self.prefetch = Some(pf);
        } else {
            self.shared.prefetch_done.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// With lazy memory: whether the unit of file page `fp` is there. `false` while the
    /// readahead still works on it; once that has stopped, it is fetched here, and a unit that
    /// cannot be is an error.
    fn prefetch_unit_ready(&self, fp: u64) -> Result<bool, String> {
        let Some(lazy) = self.mem.lazy() else {
            return Ok(true);
        };
        if lazy.ready(fp, fp + 1) {
            return Ok(true);
        }
        if lazy.readahead_running() {
            return Ok(false);
        }
        lazy.ensure(fp, fp + 1).map(|()| true)
    }

    /// Handles one message from the VMM; `Some` ends the session.
    fn read_socket(&mut self) -> Option<End> {
        let mut buf = vec![0u8; MAX_FRAME + 1];
        let got = match self.sock.recv(&mut buf) {
            Ok(Some(g)) => g,
            Ok(None) => return Some(End::ClientClosed),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(_) => return Some(End::ClientClosed),
        };
        if got.truncated {
            return Some(End::Fatal("the VMM sent an oversized message".into()));
        }
        match Message::decode(&buf[..got.len]) {
            Ok(Message::StatsRequest) => {
                let reply = Message::Stats(self.shared.stats()).encode();
                if self.sock.send(&reply, &[]).is_err() {
                    return Some(End::ClientClosed);
                }
                None
            }
            Ok(Message::Bye) => Some(End::ClientClosed),
            Ok(m) => Some(End::Fatal(format!(
                "unexpected message from the VMM: {m:?}"
            ))),
            Err(e) => Some(End::Fatal(format!("bad message from the VMM: {e}"))),
        }
    }
}
