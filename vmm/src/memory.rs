//! Guest RAM: its layout around the MMIO gap, allocation and registration with KVM.

use std::fs::File;
use std::path::Path;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::layout::{MAX_MEM_MIB, MMIO_GAP_END, MMIO_GAP_START};

/// The guest memory type used throughout the VMM.
pub use snapshot::GuestMemory;

const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be at least 1 MiB")]
    Zero,
    #[error("guest memory of {requested} MiB exceeds the limit of {limit} MiB")]
    TooLarge { requested: u64, limit: u64 },
    #[error("guest memory of {requested} MiB is more than this host's {host} MiB of RAM")]
    MoreThanHost { requested: u64, host: u64 },
    #[error("cannot allocate guest memory: {0}")]
    Allocate(#[source] vm_memory::mmap::FromRangesError),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} failed: {source}")]
    Register {
        slot: u32,
        source: kvm_ioctls::Error,
    },
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
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed: {source}")]
    DirtyLog {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

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

/// RAM ranges (guest address, length in bytes) for a guest of `mem_bytes`: everything below the
/// MMIO gap first, the rest from 4 GiB up.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if mem_bytes > MMIO_GAP_START {
        ranges.push((GuestAddress(MMIO_GAP_END), mem_bytes - MMIO_GAP_START));
    }
    ranges
}

/// Validates a requested size in MiB against our limit and the host's physical RAM.
pub fn check_size(mem_mib: u64) -> Result<u64, MemoryError> {
    if mem_mib == 0 {
        return Err(MemoryError::Zero);
    }
    if mem_mib > MAX_MEM_MIB {
        return Err(MemoryError::TooLarge {
            requested: mem_mib,
            limit: MAX_MEM_MIB,
        });
    }
    if let Some(host) = host_ram_mib() {
        if mem_mib > host {
            return Err(MemoryError::MoreThanHost {
                requested: mem_mib,
                host,
            });
        }
    }
    Ok(mem_mib * MIB)
}

fn host_ram_mib() -> Option<u64> {
    // SAFETY: sysinfo only writes into the struct we pass.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a properly sized struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    Some((info.totalram as u64).saturating_mul(info.mem_unit as u64) / MIB)
}

/// Allocates anonymous guest RAM of `mem_mib` MiB.
pub fn create(mem_mib: u64) -> Result<GuestMemory, MemoryError> {
    let mem = create_unadvised(mem_mib)?;
    // Transparent huge pages where the host offers them on request: a first touch then costs
    // one fault per 2 MiB instead of per 4 KiB (measured 3.7-8.9x slower boots without).
    for region in mem.iter() {
        if let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) {
            // SAFETY: advice on a mapping we own; failure only means no huge pages.
            unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        }
    }
    Ok(mem)
}

/// Anonymous guest RAM with no advice: for lazy restore, whose pages the page server places.
pub fn create_unadvised(mem_mib: u64) -> Result<GuestMemory, MemoryError> {
    let bytes = check_size(mem_mib)?;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(bytes)
        .into_iter()
        .map(|(a, l)| (a, l as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(MemoryError::Allocate)
}

/// Guest RAM from a memory file laid out as the regions of `ram_ranges` back to back.
pub fn restore(mem_mib: u64, path: &Path, mode: RestoreMode) -> Result<GuestMemory, MemoryError> {
    let bytes = check_size(mem_mib)?;
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
    match mode {
        RestoreMode::Eager => {
            let mem = create(mem_mib)?;
            read_into(&mem, &file, path)?;
            Ok(mem)
        }
        RestoreMode::PrivateMap => map_private(&file, path, bytes),
        RestoreMode::Hot => match hot_blocks(path, bytes) {
            None => {
                let mem = create(mem_mib)?;
                read_into(&mem, &file, path)?;
                Ok(mem)
            }
            Some(blocks) => {
                let mem = map_private(&file, path, bytes)?;
                read_hot(&mem, &file, path, &blocks)?;
                Ok(mem)
            }
        },
    }
}

/// The file's regions mapped copy-on-write.
fn map_private(file: &File, path: &Path, bytes: u64) -> Result<GuestMemory, MemoryError> {
    let file_err = |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    };
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (addr, len) in ram_ranges(bytes) {
        let map = MmapRegion::build(
            Some(FileOffset::new(file.try_clone().map_err(file_err)?, offset)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| MemoryError::Map {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        regions.push(
            GuestRegionMmap::new(map, addr).ok_or_else(|| MemoryError::Map {
                path: path.display().to_string(),
                reason: "region wraps the address space".into(),
            })?,
        );
        offset += len;
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryError::Map {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// A huge page: the unit the working set is brought back in.
const HOT_BLOCK: u64 = 2 << 20;

/// The file's 2 MiB blocks (by index, ascending) that hold a page of the working set recorded
/// beside `memory_file`; `None` when there is none, or it is unusable (it only steers what is
/// read first: the pages themselves come from the verified memory file either way).
fn hot_blocks(memory_file: &Path, bytes: u64) -> Option<Vec<u64>> {
    use snapshot::pageserver::workingset::{WorkingSet, FILE_NAME};
    let path = memory_file.with_file_name(FILE_NAME);
    match WorkingSet::load(&path, bytes) {
        Ok(Some(ws)) => {
            let mut blocks: Vec<u64> = ws
                .pages
                .iter()
                .map(|p| u64::from(*p) * 4096 / HOT_BLOCK)
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

/// Replaces the copy-on-write mapping under each run of hot blocks with fresh anonymous huge
/// pages and reads the file's data for them (as an eager restore does, in parallel).
fn read_hot(
    mem: &GuestMemory,
    file: &File,
    path: &Path,
    blocks: &[u64],
) -> Result<(), MemoryError> {
    let map_err = |reason: String| MemoryError::Map {
        path: path.display().to_string(),
        reason,
    };
    let mut windows = Vec::new();
    let mut file_off = 0u64;
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| map_err(e.to_string()))?;
        let (start, end) = (file_off, file_off + region.len());
        // Runs of consecutive blocks inside this region, clipped to it.
        let mut i = blocks.partition_point(|b| (b + 1) * HOT_BLOCK <= start);
        while i < blocks.len() && blocks[i] * HOT_BLOCK < end {
            let first = blocks[i];
            let mut last = first;
            while i + 1 < blocks.len() && blocks[i + 1] == last + 1 && (last + 1) * HOT_BLOCK < end
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
            // SAFETY: replaces part of this region's own mapping, which nothing has used yet
            // (the VM is not built, KVM does not know it); MAP_FIXED keeps the address, so the
            // region still covers exactly what it did, and unmaps it all when dropped.
            let p = unsafe {
                libc::mmap(
                    at.cast(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(map_err(format!(
                    "cannot map the working set: {}",
                    std::io::Error::last_os_error()
                )));
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

/// The file span one reader takes at a time: large enough that a read is a few big copies,
/// small enough that the readers share the file evenly.
const READ_WINDOW: u64 = 32 << 20;
/// Readers of one eager restore (bounded by the host's CPUs).
const MAX_READERS: usize = 4;

/// Reads a memory file (the regions of `mem` back to back) into fresh guest RAM: several
/// threads, each taking the next window of the file and copying only its data extents. The
/// file's holes are zero pages, which fresh anonymous memory already is, so they are neither
/// read nor allocated: a lightly used guest's restore reads little, and a huge page is only
/// allocated where data lands (or where the guest touches later).
fn read_into(mem: &GuestMemory, file: &File, path: &Path) -> Result<(), MemoryError> {
    // (host address, length, file offset) of every window, in file order.
    let mut windows = Vec::new();
    let mut file_off = 0u64;
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Map {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(READ_WINDOW);
            // SAFETY: `done + n <= len`, so the pointer stays inside this region's mapping.
            windows.push((
                Window(unsafe { host.add(done as usize) }),
                n,
                file_off + done,
            ));
            done += n;
        }
        file_off += len;
    }
    read_windows(&windows, file, path)
}

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

/// Registers every region of `mem` with KVM, slot numbers in region order.
pub fn register(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::Register {
                slot,
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
        let desc = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping stays alive as long as `mem`, which the VM holds for its lifetime.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

/// Turns KVM's dirty page log on for every slot (the same regions, registered again with the
/// flag). From then on `dirty_pages` reports the pages vCPUs wrote.
pub fn enable_dirty_log(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    register(vm, mem, kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)
}

/// Turns KVM's dirty page log off again (the regions registered without the flag): after a live
/// capture, so the guest stops paying a write-protection fault for each first write.
pub fn disable_dirty_log(vm: &VmFd, mem: &GuestMemory) -> Result<(), MemoryError> {
    register(vm, mem, 0)
}

/// The pages written since the last call, one bitmap (bit per 4 KiB page, as u64 words) per
/// region: KVM's log for vCPU writes ORed with vm-memory's for device writes. Both are cleared.
pub fn take_dirty(vm: &VmFd, mem: &GuestMemory) -> Result<Vec<Vec<u64>>, MemoryError> {
    let mut out = Vec::with_capacity(mem.num_regions());
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let mut bits = vm
            .get_dirty_log(slot, region.len() as usize)
            .map_err(|source| MemoryError::DirtyLog { slot, source })?;
        let devices = std::ops::Deref::deref(region).bitmap().get_and_reset();
        for (w, d) in bits.iter_mut().zip(devices) {
            *w |= d;
        }
        out.push(bits);
    }
    Ok(out)
}

/// Copies pages into guest memory from `overlays`, in order: each is (memory file, bitmap of the
/// pages it holds, one bit per page over the regions back to back). Used to apply diff snapshots
/// over their base.
pub fn apply_overlays(
    mem: &GuestMemory,
    overlays: &[(std::path::PathBuf, Vec<u64>)],
) -> Result<(), MemoryError> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = 4096;
    for (path, bits) in overlays {
        let err = |e: std::io::Error| MemoryError::File {
            path: path.display().to_string(),
            source: e,
        };
        let file = File::open(path).map_err(err)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut file_off = 0u64;
        let mut page_base = 0u64;
        for region in mem.iter() {
            let pages = region.len() / PAGE;
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
                while p < pages && bit(p) && (p - start) * PAGE < buf.len() as u64 {
                    p += 1;
                }
                let len = ((p - start) * PAGE) as usize;
                file.read_exact_at(&mut buf[..len], file_off + start * PAGE)
                    .map_err(err)?;
                mem.write_slice(&buf[..len], region.start_addr().unchecked_add(start * PAGE))
                    .map_err(|e| MemoryError::Map {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
            }
            file_off += region.len();
            page_base += pages;
        }
    }
    // Writing the overlays marked pages dirty for devices; they are part of the restored state.
    for region in mem.iter() {
        std::ops::Deref::deref(region).bitmap().reset();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_low_range() {
        assert_eq!(ram_ranges(256 * MIB), vec![(GuestAddress(0), 256 * MIB)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4096 * MIB);
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(MMIO_GAP_END), 4096 * MIB - MMIO_GAP_START)
            ]
        );
    }

    #[test]
    fn exactly_gap_start_has_no_high_range() {
        assert_eq!(ram_ranges(MMIO_GAP_START).len(), 1);
    }

    /// A sparse memory file crossing the MMIO gap, with data at window edges, inside holes and
    /// across the gap: the eager read (parallel, holes skipped) and the hot restore (a working
    /// set read into huge pages over a copy-on-write map) give exactly what the copy-on-write
    /// map of the same file shows.
    #[test]
    fn eager_and_hot_restores_match_the_file_across_holes_windows_and_the_gap() {
        use std::os::unix::fs::FileExt;
        let mib = MMIO_GAP_START / MIB + 64;
        let dir = std::env::temp_dir().join(format!("ma-eager-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        let file = File::create(&path).unwrap();
        file.set_len(mib * MIB).unwrap();
        let page = |n: u64| -> Vec<u8> { (0..4096u64).map(|i| (i ^ n) as u8 | 1).collect() };
        let offsets = [
            0,
            4096,
            READ_WINDOW - 4096,
            READ_WINDOW,
            7 * READ_WINDOW + 12 * 4096,
            MMIO_GAP_START - 4096,
            MMIO_GAP_START,
            mib * MIB - 4096,
        ];
        for (n, off) in offsets.iter().enumerate() {
            file.write_all_at(&page(n as u64), *off).unwrap();
        }
        // A run of data pages longer than a window, not window aligned.
        for p in 0..(READ_WINDOW / 4096 + 3) {
            file.write_all_at(&page(p + 100), 40 * READ_WINDOW + 5 * 4096 + p * 4096)
                .unwrap();
        }
        drop(file);

        // The working set: some written pages (not all: the others load on first touch), a
        // hole, and the last page.
        let hot = [
            4096,
            READ_WINDOW,
            MMIO_GAP_START,
            9 * READ_WINDOW,
            mib * MIB - 4096,
        ]
        .iter()
        .chain(&[40 * READ_WINDOW + 5 * 4096 + READ_WINDOW])
        .map(|o| (o / 4096) as u32)
        .collect();
        snapshot::pageserver::workingset::WorkingSet {
            memory_bytes: mib * MIB,
            chunk_bytes: 4096,
            adaptive: false,
            pages: hot,
        }
        .write_atomic(&dir.join(snapshot::pageserver::workingset::FILE_NAME))
        .unwrap();
        let mapped = restore(mib, &path, RestoreMode::PrivateMap).unwrap();
        for mode in [RestoreMode::Eager, RestoreMode::Hot] {
            let got = restore(mib, &path, mode).unwrap();
            compare(&got, &mapped, mib, &offsets, &page, mode);
            if mode == RestoreMode::Hot {
                // Hot blocks are anonymous memory now, a cold one is still the file's map.
                let host = |o: u64| got.get_host_address(GuestAddress(o)).unwrap() as u64;
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

    fn compare(
        got: &GuestMemory,
        mapped: &GuestMemory,
        mib: u64,
        offsets: &[u64],
        page: &dyn Fn(u64) -> Vec<u8>,
        mode: RestoreMode,
    ) {
        // File offset to guest address: the second range starts at 4 GiB.
        let ga = |o: u64| {
            if o < MMIO_GAP_START {
                GuestAddress(o)
            } else {
                GuestAddress(MMIO_GAP_END + (o - MMIO_GAP_START))
            }
        };
        for (n, off) in offsets.iter().enumerate() {
            let mut one = vec![0u8; 4096];
            got.read_slice(&mut one, ga(*off)).unwrap();
            assert!(
                one == page(n as u64),
                "{mode:?}: page at file offset {off:#x}"
            );
        }
        let mut a = vec![0u8; 8 << 20];
        let mut b = vec![0u8; 8 << 20];
        // Compare only what was written, and a page of hole on either side of it: reading
        // all 3 GiB of holes would fault in every page of both.
        let mut spans: Vec<(u64, u64)> = offsets.iter().map(|o| (*o, 4096)).collect();
        spans.push((40 * READ_WINDOW + 5 * 4096, READ_WINDOW + 3 * 4096));
        for (off, len) in spans {
            let from = off.saturating_sub(4096);
            let to = (off + len + 4096).min(mib * MIB);
            let mut at = from;
            while at < to {
                let n = ((to - at) as usize).min(a.len());
                let n = if at < MMIO_GAP_START {
                    n.min((MMIO_GAP_START - at) as usize)
                } else {
                    n
                };
                got.read_slice(&mut a[..n], ga(at)).unwrap();
                mapped.read_slice(&mut b[..n], ga(at)).unwrap();
                assert!(
                    a[..n] == b[..n],
                    "{mode:?} differs from the file at {at:#x}"
                );
                at += n as u64;
            }
        }
    }

    #[test]
    fn size_bounds() {
        assert!(matches!(check_size(0), Err(MemoryError::Zero)));
        assert!(matches!(
            check_size(MAX_MEM_MIB + 1),
            Err(MemoryError::TooLarge { .. })
        ));
        assert_eq!(check_size(1).unwrap(), MIB);
    }
}
