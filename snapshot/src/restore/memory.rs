//! Guest RAM for a restore, built by the engine and handed to the VM as vm-memory mappings:
//! read eagerly into fresh memory, mapped copy-on-write (with the working set read ahead), or
//! left empty for a page server to fill on first touch; diff snapshots copied over it, oldest
//! first.
//!
//! The VM says where its regions are ([`RegionLayout`], from its state); a memory file holds
//! them back to back. The VM wraps the mappings in its own guest memory type and keeps the
//! [`KeepAlive`] as long as it uses them.

use std::fs::File;
use std::path::Path;

use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use snapshot_boundary::{HostRegion, KeepAlive, RegionLayout, RestoredMemory};

use crate::pageserver::client::{Client, ClientOptions};
use crate::pageserver::protocol::{Layout, Region};

/// How guest RAM comes back from a memory file on restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// Read the file into fresh anonymous memory (huge pages where the host has them), with
    /// several threads, skipping its holes: the guest then runs without a fault per page.
    Eager,
    /// Map the file copy-on-write: pages load on first touch, and forks share the page cache.
    PrivateMap,
    /// Map the file copy-on-write, then read every 2 MiB block that holds a page of the
    /// recorded working set (`workingset.bin` beside the file, written by a lazy restore's page
    /// server) into huge pages before the vCPUs run: what the guest touched last time costs no
    /// fault, the rest loads on first touch. Eager when no working set was recorded.
    Hot,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory layout is unusable: {0}")]
    Layout(String),
    #[error("cannot allocate guest memory: {0}")]
    Allocate(#[source] std::io::Error),
    #[error("memory file {path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("memory file {path} holds {actual} bytes, the guest needs {expected}")]
    FileSize {
        path: String,
        actual: u64,
        expected: u64,
    },
    #[error("cannot map memory file {path}: {reason}")]
    Map { path: String, reason: String },
    #[error("cannot restore lazily: {0}")]
    PageServer(String),
    #[error(
        "lazy (userfaultfd) restore serves full snapshots only; restore a diff with mmap or eager"
    )]
    LazyDiff,
}

/// Exit status of a VMM process whose page server went away.
pub const EXIT_PAGE_SERVER_GONE: i32 = 70;

const PAGE: u64 = 4096;

/// Guest RAM the engine builds for a restore: one vm-memory mapping per region of the VM's
/// layout (with the dirty bitmap the VM tracks device writes in, `B`), and, for a lazy
/// restore, the page-server connection that fills first touches. Handed to the VM as the
/// boundary's [`RestoredMemory`] ([`GuestRam::into_restored`]), the connection inside its
/// opaque [`KeepAlive`].
#[derive(Debug)]
pub struct GuestRam<B> {
    ram: RestoredMemory<B>,
    page_server: Option<Client>,
}

impl<B: NewBitmap> GuestRam<B> {
    fn new(regions: Vec<(RegionLayout, MmapRegion<B>)>) -> Self {
        Self {
            ram: RestoredMemory::new(regions, KeepAlive::nothing()),
            page_server: None,
        }
    }

    /// The regions in layout order (which is the memory file's order).
    pub fn regions(&self) -> Vec<HostRegion> {
        self.ram.regions()
    }

    /// What the VM gets: the mappings, and the page-server connection as something to keep.
    pub fn into_restored(self) -> RestoredMemory<B> {
        match self.page_server {
            Some(client) => self.ram.keeping(KeepAlive::holding(client)),
            None => self.ram,
        }
    }

    /// Fresh anonymous memory for `layout`; huge pages where the host offers them on request
    /// with `advise` (a first touch then costs one fault per 2 MiB instead of per 4 KiB).
    pub fn anonymous(layout: &[RegionLayout], advise: bool) -> Result<Self, MemoryError> {
        check_layout(layout)?;
        let mut regions = Vec::with_capacity(layout.len());
        for l in layout {
            let m = map(l.len, None).map_err(MemoryError::Allocate)?;
            if advise {
                // SAFETY: advice on a mapping we own; failure only means no huge pages.
                unsafe { libc::madvise(m.as_ptr().cast(), m.size(), libc::MADV_HUGEPAGE) };
            }
            regions.push((*l, m));
        }
        Ok(Self::new(regions))
    }

    /// Guest RAM from a memory file laid out as `layout`'s regions back to back.
    pub fn from_file(
        layout: &[RegionLayout],
        path: &Path,
        mode: RestoreMode,
    ) -> Result<Self, MemoryError> {
        check_layout(layout)?;
        let bytes: u64 = layout.iter().map(|l| l.len).sum();
        let file_err = |source| MemoryError::File {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(path).map_err(file_err)?;
        let actual = file.metadata().map_err(file_err)?.len();
        if actual != bytes {
            return Err(MemoryError::FileSize {
                path: path.display().to_string(),
                actual,
                expected: bytes,
            });
        }
        let eager = |file: &File| {
            let mem = Self::anonymous(layout, true)?;
            mem.read_into(file, path)?;
            Ok(mem)
        };
        match mode {
            RestoreMode::Eager => eager(&file),
            RestoreMode::PrivateMap => Self::map_private(layout, &file, path),
            RestoreMode::Hot => match hot_blocks(path, bytes) {
                None => eager(&file),
                Some(blocks) => {
                    let mem = Self::map_private(layout, &file, path)?;
                    mem.read_hot(&file, path, &blocks)?;
                    Ok(mem)
                }
            },
        }
    }

    /// Fresh, untouched memory for `layout` whose every first touch the page server listening
    /// on `socket` fills (userfaultfd). A server that goes away later ends this process with
    /// [`EXIT_PAGE_SERVER_GONE`]: vCPUs blocked on a fault can never be joined.
    pub fn lazy(layout: &[RegionLayout], socket: &Path, label: &str) -> Result<Self, MemoryError> {
        // No huge-page advice: the page server places every page.
        let mut mem = Self::anonymous(layout, false)?;
        let client = Client::connect(
            socket,
            &mem.server_layout(),
            &ClientOptions::labelled(label),
        )
        .map_err(|e| MemoryError::PageServer(e.to_string()))?;
        client.watchdog().on_gone(|gone| {
            tracing::error!("the page server is gone ({gone}); stopping the VM");
            std::process::exit(EXIT_PAGE_SERVER_GONE);
        });
        mem.page_server = Some(client);
        Ok(mem)
    }

    /// The regions as the page server sees them: host and guest addresses, file offsets back to
    /// back.
    fn server_layout(&self) -> Layout {
        let mut file_offset = 0;
        let regions = self
            .regions()
            .into_iter()
            .map(|r| {
                let region = Region {
                    guest_addr: r.guest_addr,
                    host_addr: r.host_addr as u64,
                    len: r.len,
                    file_offset,
                };
                file_offset += r.len;
                region
            })
            .collect();
        Layout { regions }
    }

    /// The file's regions mapped copy-on-write.
    fn map_private(layout: &[RegionLayout], file: &File, path: &Path) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(layout.len());
        let mut offset = 0u64;
        for l in layout {
            let m = map(l.len, Some((file, offset))).map_err(|e| MemoryError::Map {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            regions.push((*l, m));
            offset += l.len;
        }
        Ok(Self::new(regions))
    }

    /// Reads a memory file (the regions back to back) into fresh memory: several threads,
    /// each taking the next window of the file and copying only its data extents. The file's
    /// holes are zero pages, which fresh anonymous memory already is, so they are neither read
    /// nor allocated: a lightly used guest's restore reads little, and a huge page is only
    /// allocated where data lands (or where the guest touches later).
    fn read_into(&self, file: &File, path: &Path) -> Result<(), MemoryError> {
        // (host address, length, file offset) of every window, in file order.
        let mut windows = Vec::new();
        let mut file_off = 0u64;
        for r in self.regions() {
            let mut done = 0u64;
            while done < r.len {
                let n = (r.len - done).min(READ_WINDOW);
                // SAFETY: `done + n <= len`, so the pointer stays inside this region's mapping.
                windows.push((
                    Window(unsafe { r.host_addr.add(done as usize) }),
                    n,
                    file_off + done,
                ));
                done += n;
            }
            file_off += r.len;
        }
        read_windows(&windows, file, path)
    }

    /// Replaces the copy-on-write mapping under each run of hot blocks with fresh anonymous
    /// huge pages and reads the file's data for them (as an eager restore does, in parallel).
    fn read_hot(&self, file: &File, path: &Path, blocks: &[u64]) -> Result<(), MemoryError> {
        let mut windows = Vec::new();
        let mut file_off = 0u64;
        for r in self.regions() {
            let host = r.host_addr;
            let (start, end) = (file_off, file_off + r.len);
            // Runs of consecutive blocks inside this region, clipped to it.
            let mut i = blocks.partition_point(|b| (b + 1) * HOT_BLOCK <= start);
            while i < blocks.len() && blocks[i] * HOT_BLOCK < end {
                let first = blocks[i];
                let mut last = first;
                while i + 1 < blocks.len()
                    && blocks[i + 1] == last + 1
                    && (last + 1) * HOT_BLOCK < end
                {
                    i += 1;
                    last = blocks[i];
                }
                i += 1;
                let from = (first * HOT_BLOCK).max(start);
                let to = ((last + 1) * HOT_BLOCK).min(end);
                // SAFETY: `start <= from < to <= end`, so the span lies inside this region's
                // mapping.
                let at = unsafe { host.add((from - start) as usize) };
                let len = (to - from) as usize;
                // SAFETY: replaces part of this region's own mapping, which nothing has used
                // yet (the VM is not built); MAP_FIXED keeps the address, so the region still
                // covers exactly what it did, and unmaps it all when dropped.
                let p = unsafe {
                    libc::mmap(
                        at.cast(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE
                            | libc::MAP_ANONYMOUS
                            | libc::MAP_FIXED
                            | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(MemoryError::Map {
                        path: path.display().to_string(),
                        reason: format!(
                            "cannot map the working set: {}",
                            std::io::Error::last_os_error()
                        ),
                    });
                }
                // SAFETY: advice on the mapping just made; failure only means no huge pages.
                unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
                let mut done = 0u64;
                while done < (to - from) {
                    let n = (to - from - done).min(READ_WINDOW);
                    // SAFETY: `done + n <= len`: inside the span mapped above.
                    windows.push((Window(unsafe { at.add(done as usize) }), n, from + done));
                    done += n;
                }
            }
            file_off = end;
        }
        read_windows(&windows, file, path)
    }

    /// Copies pages over this memory from `overlays`, in order: each is (memory file, bitmap of
    /// the pages it holds, one bit per page over the regions back to back). Applies diff
    /// snapshots over their base. Pages land through the host mappings, so no device dirty
    /// bitmap sees them: they are part of the restored state, not changes since.
    pub fn apply_overlays(
        &mut self,
        overlays: &[(std::path::PathBuf, Vec<u64>)],
    ) -> Result<(), MemoryError> {
        use std::os::unix::fs::FileExt;
        if !overlays.is_empty() && self.page_server.is_some() {
            return Err(MemoryError::LazyDiff);
        }
        let regions = self.regions();
        for (path, bits) in overlays {
            let err = |e: std::io::Error| MemoryError::File {
                path: path.display().to_string(),
                source: e,
            };
            let file = File::open(path).map_err(err)?;
            let mut file_off = 0u64;
            let mut page_base = 0u64;
            for r in &regions {
                let pages = r.len / PAGE;
                let mut p = 0u64;
                while p < pages {
                    let bit = |i: u64| {
                        let g = page_base + i;
                        bits.get((g / 64) as usize)
                            .is_some_and(|w| w & (1 << (g % 64)) != 0)
                    };
                    if !bit(p) {
                        p += 1;
                        continue;
                    }
                    let start = p;
                    while p < pages && bit(p) && (p - start) * PAGE < OVERLAY_RUN {
                        p += 1;
                    }
                    let len = ((p - start) * PAGE) as usize;
                    // SAFETY: pages `start..p` lie inside this region (`p <= pages`), which
                    // `self` maps privately and nothing else uses before the VM is built from
                    // it: this is the only reference to these bytes.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            r.host_addr.add((start * PAGE) as usize),
                            len,
                        )
                    };
                    file.read_exact_at(dst, file_off + start * PAGE)
                        .map_err(err)?;
                }
                file_off += r.len;
                page_base += pages;
            }
        }
        Ok(())
    }
}

/// A new private mapping of `len` bytes: of `file` from `offset` (copy-on-write), or anonymous.
fn map<B: NewBitmap>(len: u64, file: Option<(&File, u64)>) -> std::io::Result<MmapRegion<B>> {
    let len = usize::try_from(len).map_err(|_| std::io::Error::other("region too large"))?;
    let (flags, file) = match file {
        Some((f, off)) => (
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            Some(FileOffset::new(f.try_clone()?, off)),
        ),
        None => (
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            None,
        ),
    };
    MmapRegion::build(file, len, libc::PROT_READ | libc::PROT_WRITE, flags)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// Refuses a layout no memory file can describe: empty, unaligned or absurd regions.
fn check_layout(layout: &[RegionLayout]) -> Result<(), MemoryError> {
    if layout.is_empty() {
        return Err(MemoryError::Layout("no regions".into()));
    }
    let mut total = 0u64;
    for (i, l) in layout.iter().enumerate() {
        if l.len == 0 || l.len % PAGE != 0 || l.guest_addr % PAGE != 0 {
            return Err(MemoryError::Layout(format!(
                "region {i} ({:#x} bytes at {:#x}) is empty or not page aligned",
                l.len, l.guest_addr
            )));
        }
        total = total
            .checked_add(l.len)
            .filter(|t| usize::try_from(*t).is_ok())
            .ok_or_else(|| MemoryError::Layout("regions larger than the address space".into()))?;
    }
    Ok(())
}

/// The most one overlay read copies at a time.
const OVERLAY_RUN: u64 = 1 << 20;

/// A huge page: the unit the working set is brought back in.
const HOT_BLOCK: u64 = 2 << 20;

/// The file's 2 MiB blocks (by index, ascending) that hold a page of the working set recorded
/// beside `memory_file`; `None` when there is none, or it is unusable (it only steers what is
/// read first: the pages themselves come from the verified memory file either way).
fn hot_blocks(memory_file: &Path, bytes: u64) -> Option<Vec<u64>> {
    use crate::pageserver::workingset::{WorkingSet, FILE_NAME};
    let path = memory_file.with_file_name(FILE_NAME);
    match WorkingSet::load(&path, bytes) {
        Ok(Some(ws)) => {
            let mut blocks: Vec<u64> = ws
                .pages
                .iter()
                .map(|p| u64::from(*p) * PAGE / HOT_BLOCK)
                .collect();
            blocks.sort_unstable();
            blocks.dedup();
            Some(blocks)
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!("ignoring the working set {}: {e}", path.display());
            None
        }
    }
}

/// The file span one reader takes at a time: large enough that a read is a few big copies,
/// small enough that the readers share the file evenly.
const READ_WINDOW: u64 = 32 << 20;
/// Readers of one eager restore (bounded by the host's CPUs).
const MAX_READERS: usize = 4;

/// Reads each window's data extents (host address, length, file offset) on several threads.
fn read_windows(
    windows: &[(Window, u64, u64)],
    file: &File,
    path: &Path,
) -> Result<(), MemoryError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let readers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .clamp(1, MAX_READERS)
        .min(windows.len());
    let next = AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..readers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((host, len, off)) = windows.get(i) else {
                    return;
                };
                // SAFETY: each window is `len` bytes of guest RAM that this thread alone
                // touches (windows are disjoint and each is taken once), and nothing else uses
                // guest memory before the VM is built from it.
                let dst = unsafe { std::slice::from_raw_parts_mut(host.0, *len as usize) };
                if let Err(source) = read_data_extents(file, dst, *off) {
                    // Every reader stops at its next window.
                    next.store(windows.len(), Ordering::Relaxed);
                    failed
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(source);
                    return;
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(source) => Err(MemoryError::File {
            path: path.display().to_string(),
            source,
        }),
        None => Ok(()),
    }
}

/// A window's start in guest RAM, handed to one reader thread.
struct Window(*mut u8);
// SAFETY: a plain address into guest RAM; `read_windows` gives each window to one thread only.
unsafe impl Sync for Window {}

/// Copies the data extents of `file[off..off + dst.len()]` into `dst`, leaving what lies in
/// holes untouched. A file system without SEEK_DATA has no holes to skip: all of it is read.
fn read_data_extents(file: &File, dst: &mut [u8], off: u64) -> std::io::Result<()> {
    use rustix::fs::{seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let end = off + dst.len() as u64;
    let mut pos = off;
    while pos < end {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            // No data from here to the end of the file.
            Err(rustix::io::Errno::NXIO) => return Ok(()),
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => pos,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            return Ok(());
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(end),
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => end,
            Err(e) => return Err(e.into()),
        };
        let from = (data - off) as usize;
        let to = (hole - off) as usize;
        // `data >= pos >= off` and `hole <= end`: in bounds. A hole right at `data` would be an
        // empty extent: read at least a page so the loop always advances.
        let to = to.max((from + 4096).min(dst.len()));
        file.read_exact_at(&mut dst[from..to], data)?;
        pos = off + to as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    /// A VMM's MMIO gap below 4 GiB: the second region starts at 4 GiB, the file has no gap.
    const GAP_START: u64 = 0xc000_0000;
    const GAP_END: u64 = 0x1_0000_0000;

    type Mem = GuestRam<()>;

    /// `len` bytes at file offset `off` (the regions back to back), read through the mappings.
    fn read(mem: &Mem, off: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut file_off = 0;
        for r in mem.regions() {
            let (start, end) = (file_off, file_off + r.len);
            let mut at = off + out.len() as u64;
            while out.len() < len && at >= start && at < end {
                let n = (len - out.len()).min((end - at) as usize);
                // SAFETY: `at..at + n` lies inside this region's mapping, which `mem` keeps
                // mapped while borrowed; nothing writes it during the test.
                let bytes = unsafe {
                    std::slice::from_raw_parts(r.host_addr.add((at - start) as usize), n)
                };
                out.extend_from_slice(bytes);
                at += n as u64;
            }
            file_off = end;
        }
        assert_eq!(out.len(), len, "{off:#x}+{len:#x} is beyond the memory");
        out
    }

    /// A sparse memory file crossing the MMIO gap, with data at window edges, inside holes and
    /// across the gap: the eager read (parallel, holes skipped) and the hot restore (a working
    /// set read into huge pages over a copy-on-write map) give exactly what the copy-on-write
    /// map of the same file shows.
    #[test]
    fn eager_and_hot_restores_match_the_file_across_holes_windows_and_the_gap() {
        use std::os::unix::fs::FileExt;
        let bytes = GAP_START + 64 * MIB;
        let layout = [
            RegionLayout {
                guest_addr: 0,
                len: GAP_START,
            },
            RegionLayout {
                guest_addr: GAP_END,
                len: 64 * MIB,
            },
        ];
        let dir = std::env::temp_dir().join(format!("engine-eager-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        let file = File::create(&path).unwrap();
        file.set_len(bytes).unwrap();
        let page = |n: u64| -> Vec<u8> { (0..4096u64).map(|i| (i ^ n) as u8 | 1).collect() };
        let offsets = [
            0,
            4096,
            READ_WINDOW - 4096,
            READ_WINDOW,
            7 * READ_WINDOW + 12 * 4096,
            GAP_START - 4096,
            GAP_START,
            bytes - 4096,
        ];
        for (n, off) in offsets.iter().enumerate() {
            file.write_all_at(&page(n as u64), *off).unwrap();
        }
        // A run of data pages longer than a window, not window aligned.
        let run = 40 * READ_WINDOW + 5 * 4096;
        for p in 0..(READ_WINDOW / 4096 + 3) {
            file.write_all_at(&page(p + 100), run + p * 4096).unwrap();
        }
        drop(file);

        // The working set: some written pages (not all: the others load on first touch), a
        // hole, and the last page.
        let hot = [
            4096,
            READ_WINDOW,
            GAP_START,
            9 * READ_WINDOW,
            bytes - 4096,
            run + READ_WINDOW,
        ]
        .iter()
        .map(|o| (o / 4096) as u32)
        .collect();
        crate::pageserver::workingset::WorkingSet {
            memory_bytes: bytes,
            chunk_bytes: 4096,
            adaptive: false,
            pages: hot,
        }
        .write_atomic(&dir.join(crate::pageserver::workingset::FILE_NAME))
        .unwrap();
        let mapped = Mem::from_file(&layout, &path, RestoreMode::PrivateMap).unwrap();
        for mode in [RestoreMode::Eager, RestoreMode::Hot] {
            let got = Mem::from_file(&layout, &path, mode).unwrap();
            for (n, off) in offsets.iter().enumerate() {
                assert!(
                    read(&got, *off, 4096) == page(n as u64),
                    "{mode:?}: page at file offset {off:#x}"
                );
            }
            // Compare only what was written, and a page of hole on either side of it: reading
            // all 3 GiB of holes would fault in every page of both.
            let mut spans: Vec<(u64, u64)> = offsets.iter().map(|o| (*o, 4096)).collect();
            spans.push((run, READ_WINDOW + 3 * 4096));
            for (off, len) in spans {
                let from = off.saturating_sub(4096);
                let to = (off + len + 4096).min(bytes);
                let n = (to - from) as usize;
                assert!(
                    read(&got, from, n) == read(&mapped, from, n),
                    "{mode:?} differs from the file at {from:#x}"
                );
            }
            if mode == RestoreMode::Hot {
                // Hot blocks are anonymous memory now, a cold one is still the file's map.
                let host = |o: u64| {
                    let r = got.regions();
                    if o < GAP_START {
                        r[0].host_addr as u64 + o
                    } else {
                        r[1].host_addr as u64 + (o - GAP_START)
                    }
                };
                assert!(!maps_file_at(host(4096)), "a hot block is still the file");
                assert!(!maps_file_at(host(9 * READ_WINDOW + 4096)), "a hot hole");
                assert!(maps_file_at(host(7 * READ_WINDOW)), "a cold block was read");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Whether this process maps a file at host address `addr` (per /proc/self/maps).
    fn maps_file_at(addr: u64) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| {
                let (a, b) = l
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .split_once('-')
                    .unwrap();
                let (a, b) = (
                    u64::from_str_radix(a, 16).unwrap(),
                    u64::from_str_radix(b, 16).unwrap(),
                );
                (a..b).contains(&addr)
            })
            .unwrap_or_else(|| panic!("{addr:#x} is not mapped"));
        line.contains("memory.bin")
    }

    #[test]
    fn a_memory_file_of_another_size_or_a_bad_layout_is_refused() {
        let dir = std::env::temp_dir().join(format!("engine-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let one = |len| [RegionLayout { guest_addr: 0, len }];
        assert!(matches!(
            Mem::from_file(&one(4096), &path, RestoreMode::Eager),
            Err(MemoryError::FileSize {
                actual: 8192,
                expected: 4096,
                ..
            })
        ));
        for bad in [0, 100] {
            assert!(matches!(
                Mem::from_file(&one(bad), &path, RestoreMode::PrivateMap),
                Err(MemoryError::Layout(_))
            ));
        }
        assert!(matches!(
            Mem::from_file(&[], &path, RestoreMode::Eager),
            Err(MemoryError::Layout(_))
        ));
        Mem::from_file(&one(8192), &path, RestoreMode::Eager).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
