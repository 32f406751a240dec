//! `memory.bin`: guest RAM, its regions back to back. Zero pages are left as holes, so the file
//! is sparse and restores read them back as zeros.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::digest::FileDigest;
use crate::faults;
use crate::pagedigest::{self, PageDigests};

pub const PAGE: usize = 4096;
const CHUNK: usize = 4 << 20;

/// What a memory write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryWritten {
    /// Logical size: all of guest RAM.
    pub size: u64,
    /// Bytes actually written (non-zero pages).
    pub data_bytes: u64,
    pub digest: String,
}

fn is_zero(page: &[u8]) -> bool {
    // 16 bytes at a time: the compiler turns this into wide compares.
    let mut chunks = page.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && chunks.remainder().iter().all(|b| *b == 0)
}

/// A chunk of guest memory a write has just read and written, handed on (to the secret scan)
/// instead of being read back from the file: the buffer, and the byte ranges of it that went to
/// the file with their file offsets.
pub struct Chunk {
    pub buf: Vec<u8>,
    /// (file offset, start, end): `buf[start..end]` is the file's bytes at that offset.
    pub runs: Vec<(u64, usize, usize)>,
}

/// Takes each [`Chunk`] once it is written and gives back a buffer for the next one.
pub type ChunkSink<'a> = &'a mut dyn FnMut(Chunk) -> Vec<u8>;

/// Writes all of `mem` to `file` (which must be empty), skipping zero pages; calls `progress`
/// with bytes done so far. Guest memory is hashed and written in place: the VM must stay
/// paused for the whole call.
pub fn write_memory<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    progress: impl FnMut(u64, u64),
) -> std::io::Result<MemoryWritten> {
    write_memory_to(mem, file, progress, None)
}

/// [`write_memory`], handing every chunk (with the non-zero runs written) to `sink`.
pub fn write_memory_to<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    progress: impl FnMut(u64, u64),
    sink: Option<ChunkSink<'_>>,
) -> std::io::Result<MemoryWritten> {
    write_full(mem, file, None, progress, sink).map(|(w, _)| w)
}

/// [`write_memory_to`], also hashing every page with [`pagedigest::digest_page`] under `seed`
/// in the same pass (what [`PageDigests::of_memory`] computes, without reading memory twice).
pub fn write_memory_digesting<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    seed: u64,
    progress: impl FnMut(u64, u64),
    sink: Option<ChunkSink<'_>>,
) -> std::io::Result<(MemoryWritten, PageDigests)> {
    let (written, pages) = write_full(mem, file, Some(seed), progress, sink)?;
    Ok((written, PageDigests { seed, pages }))
}

/// Chunks a full write has handed to its writer thread and not taken back: one being written,
/// one queued, while the next is hashed.
const IN_FLIGHT: usize = 2;

/// One chunk of guest memory on its way to the file.
struct Job<'m> {
    /// The chunk, in guest memory: the writes go straight from it.
    data: &'m [u8],
    /// (file offset, start, end), as in [`Chunk::runs`].
    runs: Vec<(u64, usize, usize)>,
    /// The file range the chunk covers.
    at: u64,
    /// Bytes of memory done once this chunk is written, for `progress`.
    done: u64,
    /// A copy of the chunk for the sink, when there is one.
    copy: Option<Vec<u8>>,
}

/// Writes a chunk's non-zero runs, then starts their writeback.
fn write_job(file: &File, job: &Job<'_>) -> std::io::Result<()> {
    for &(at, start, end) in &job.runs {
        let run = job
            .data
            .get(start..end)
            .ok_or_else(|| std::io::Error::other("a run outside its chunk"))?;
        file.write_all_at(run, at)?;
    }
    if !job.runs.is_empty() {
        start_writeback(file, job.at, job.data.len() as u64);
    }
    Ok(())
}

/// Starts writing a range of the page cache back to the disk without waiting for it, so the
/// device writes while the next chunks are hashed and written, and the caller's one fsync at the
/// end finds little left to do (it was a third of a capture: the kernel starts writeback on its
/// own only once a tenth of RAM is dirty).
pub(crate) fn start_writeback(file: &File, at: u64, len: u64) {
    let (Ok(at), Ok(len)) = (i64::try_from(at), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range on a descriptor we own, with no pointers; it only queues
    // writeback. A filesystem that cannot do it just loses the head start: the fsync that
    // follows every write still makes all of it durable, so the result is ignored.
    unsafe { libc::sync_file_range(file.as_raw_fd(), at, len, libc::SYNC_FILE_RANGE_WRITE) };
}

/// The runs of non-zero pages of `chunk` (whose first byte is at file offset `at`), coalesced.
pub(crate) fn nonzero_runs(chunk: &[u8], at: u64) -> Vec<(u64, usize, usize)> {
    let n = chunk.len();
    let mut runs = Vec::new();
    let mut page = 0;
    while page < n {
        if is_zero(&chunk[page..(page + PAGE).min(n)]) {
            page += PAGE;
            continue;
        }
        let start = page;
        while page < n && !is_zero(&chunk[page..(page + PAGE).min(n)]) {
            page += PAGE;
        }
        let end = page.min(n);
        runs.push((at + start as u64, start, end));
    }
    runs
}

/// `len` bytes of guest memory at `addr`, in place.
///
/// The caller's VM must stay paused while the bytes are borrowed: they are hashed, checked for
/// zeros and written as they are, and a change in between would make the digest disagree with
/// the file (which a restore then refuses).
fn guest_bytes<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
) -> std::io::Result<&[u8]> {
    let slice = mem
        .get_slice(addr, len)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if slice.len() != len {
        return Err(std::io::Error::other("guest memory ends inside a chunk"));
    }
    let ptr = slice.ptr_guard().as_ptr();
    // SAFETY: `get_slice` checked that `len` bytes at `addr` are mapped guest memory, in one
    // region of `mem`, which stays mapped as long as `mem` is borrowed (the returned lifetime);
    // any byte value is a valid u8. Nothing writes it meanwhile: captures run on a paused VM
    // (see above).
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// The error that stopped the writer thread, once it has stopped taking chunks.
fn writer_error(done: &mpsc::Receiver<std::io::Result<Job<'_>>>) -> std::io::Error {
    done.iter()
        .find_map(Result::err)
        .unwrap_or_else(|| std::io::Error::other("the memory writer thread stopped"))
}

/// The full write, in one pass over guest memory and with no copy of our own: this thread
/// hashes each chunk in place and finds its zero pages, while a writer thread writes the
/// chunk before it from guest memory into the page cache and starts its writeback. (Reading
/// guest memory three times, for the page digests, into a buffer and the kernel's copy, and
/// leaving all writeback to the final fsync, ran at 0.62x of `dd conv=fsync`.)
fn write_full<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    page_seed: Option<u64>,
    mut progress: impl FnMut(u64, u64),
    mut sink: Option<ChunkSink<'_>>,
) -> std::io::Result<(MemoryWritten, Vec<u128>)> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut digest = FileDigest::new();
    let mut pages = Vec::new();
    if page_seed.is_some() {
        pages.reserve(usize::try_from(total / PAGE as u64).unwrap_or(0));
    }
    let mut data_bytes = 0u64;
    let scanned = sink.is_some();
    std::thread::scope(|s| -> std::io::Result<()> {
        let (job_tx, job_rx) = mpsc::sync_channel::<Job<'_>>(IN_FLIGHT);
        let (done_tx, done_rx) = mpsc::channel::<std::io::Result<Job<'_>>>();
        s.spawn(move || {
            for job in job_rx {
                let r = write_job(file, &job).map(|()| job);
                let failed = r.is_err();
                if done_tx.send(r).is_err() || failed {
                    break;
                }
            }
        });
        // Takes back the oldest chunk once written (they come back in order): reports it and
        // hands its copy to the sink; returns a buffer for the next copy.
        let mut retire = || -> std::io::Result<Vec<u8>> {
            let job = match done_rx.recv() {
                Ok(r) => r?,
                Err(_) => return Err(writer_error(&done_rx)),
            };
            progress(job.done, total);
            let buf = match (sink.as_mut(), job.copy) {
                (Some(sink), Some(buf)) if !job.runs.is_empty() => sink(Chunk {
                    buf,
                    runs: job.runs,
                }),
                (_, buf) => buf.unwrap_or_default(),
            };
            faults::checkpoint();
            Ok(buf)
        };
        let mut in_flight = 0usize;
        let mut spare = Vec::new();
        let mut file_off = 0u64;
        for region in mem.iter() {
            let mut done = 0u64;
            while done < region.len() {
                if in_flight == IN_FLIGHT {
                    in_flight -= 1;
                    spare = retire()?;
                }
                let n = (region.len() - done).min(CHUNK as u64) as usize;
                let data = guest_bytes(mem, region.start_addr().unchecked_add(done), n)?;
                digest.update(data);
                if let Some(seed) = page_seed {
                    pages.extend(data.chunks(PAGE).map(|p| pagedigest::digest_page(seed, p)));
                }
                let at = file_off + done;
                let runs = nonzero_runs(data, at);
                data_bytes += runs.iter().map(|&(_, s, e)| (e - s) as u64).sum::<u64>();
                // The sink scans beside us, from a copy: the scan may run behind the writes.
                let copy = (scanned && !runs.is_empty()).then(|| {
                    let mut buf = std::mem::take(&mut spare);
                    buf.clear();
                    buf.extend_from_slice(data);
                    buf
                });
                done += n as u64;
                let job = Job {
                    data,
                    runs,
                    at,
                    done: file_off + done,
                    copy,
                };
                if job_tx.send(job).is_err() {
                    return Err(writer_error(&done_rx));
                }
                in_flight += 1;
            }
            file_off += region.len();
        }
        drop(job_tx);
        for _ in 0..in_flight {
            retire()?;
        }
        Ok(())
    })?;
    file.set_len(total)?;
    Ok((
        MemoryWritten {
            size: total,
            data_bytes,
            digest: digest.finish(),
        },
        pages,
    ))
}

/// Writes only the pages set in `dirty` (per region, a bit per page; zero pages included, as
/// data) into a sparse file the size of all of guest RAM. Returns the number of pages written.
pub fn write_dirty_memory<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    dirty: &[Vec<u64>],
    progress: impl FnMut(u64, u64),
) -> std::io::Result<u64> {
    write_dirty_memory_to(mem, file, dirty, progress, None)
}

/// [`write_dirty_memory`], handing the pages written to `sink`, several runs to a chunk.
pub fn write_dirty_memory_to<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    dirty: &[Vec<u64>],
    mut progress: impl FnMut(u64, u64),
    mut sink: Option<ChunkSink<'_>>,
) -> std::io::Result<u64> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut buf = vec![0u8; CHUNK];
    // Bytes of `buf` holding runs not yet handed to the sink, and those runs.
    let mut filled = 0usize;
    let mut runs = Vec::new();
    let mut file_off = 0u64;
    let mut pages_written = 0u64;
    for (region, bits) in mem
        .iter()
        .zip(dirty.iter().chain(std::iter::repeat(&Vec::new())))
    {
        let pages = region.len() / PAGE as u64;
        let set = |i: u64| {
            bits.get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        };
        let mut p = 0u64;
        while p < pages {
            if !set(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && set(p) && ((p - start) as usize) * PAGE < CHUNK - filled {
                p += 1;
            }
            let len = ((p - start) as usize) * PAGE;
            let addr = region.start_addr().unchecked_add(start * PAGE as u64);
            buf.resize(CHUNK, 0);
            let run = &mut buf[filled..filled + len];
            mem.read_slice(run, addr)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let at = file_off + start * PAGE as u64;
            file.write_all_at(run, at)?;
            pages_written += p - start;
            if let Some(sink) = sink.as_mut() {
                runs.push((at, filled, filled + len));
                filled += len;
                if filled == CHUNK {
                    buf = sink(Chunk {
                        buf: std::mem::take(&mut buf),
                        runs: std::mem::take(&mut runs),
                    });
                    filled = 0;
                }
            }
            faults::checkpoint();
        }
        file_off += region.len();
        progress(file_off, total);
    }
    if let Some(sink) = sink.as_mut() {
        if !runs.is_empty() {
            sink(Chunk { buf, runs });
        }
    }
    file.set_len(total)?;
    Ok(pages_written)
}

/// The dirty bitmaps of all regions as one little-endian byte string, a bit per page, regions
/// back to back (each region's pages start at the next bit after the previous region's).
pub fn encode_dirty<M: GuestMemoryBackend>(mem: &M, dirty: &[Vec<u64>]) -> Vec<u8> {
    let total_pages: u64 = mem.iter().map(|r| r.len() / PAGE as u64).sum();
    let mut words = vec![0u64; total_pages.div_ceil(64) as usize];
    let mut base = 0u64;
    for (region, bits) in mem.iter().zip(dirty) {
        let pages = region.len() / PAGE as u64;
        for i in 0..pages {
            if bits
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
            {
                let g = base + i;
                words[(g / 64) as usize] |= 1 << (g % 64);
            }
        }
        base += pages;
    }
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The inverse of `encode_dirty`: u64 words of a bit per page over all regions.
pub fn decode_dirty(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemory;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::GuestAddress;

    #[test]
    fn sparse_file_holds_exactly_the_guest_bytes() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 8 << 20),
            (GuestAddress(1 << 32), 4 << 20),
        ])
        .unwrap();
        mem.write_obj(0xdead_beefu64, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0xab; 3 * PAGE], GuestAddress(5 << 20))
            .unwrap();
        mem.write_obj(7u8, GuestAddress((1 << 32) + (4 << 20) - 1))
            .unwrap();
        let path = std::env::temp_dir().join(format!("snap-mem-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        let mut calls = 0;
        let w = write_memory(&mem, &f, |_, _| calls += 1).unwrap();
        assert_eq!(w.size, 12 << 20);
        assert_eq!(w.data_bytes, 5 * PAGE as u64);
        assert!(calls >= 3);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 12 << 20);
        assert_eq!(&bytes[0x1000..0x1008], &0xdead_beefu64.to_ne_bytes());
        assert!(bytes[(5 << 20)..(5 << 20) + 3 * PAGE]
            .iter()
            .all(|b| *b == 0xab));
        assert_eq!(bytes[(12 << 20) - 1], 7);
        assert_eq!(bytes.iter().filter(|b| **b != 0).count(), 4 + 3 * PAGE + 1);
        // Holes: far fewer blocks allocated than the logical size.
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(blocks < 1 << 20, "{blocks} bytes allocated");
        assert_eq!(crate::digest::file_digest(&path).unwrap().0, w.digest);
        std::fs::remove_file(path).unwrap();
    }

    /// Two regions, 9 MiB (a partial last chunk) and 4 MiB, with data in a few places.
    fn patterned() -> GuestMemory {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 9 << 20),
            (GuestAddress(1 << 32), 4 << 20),
        ])
        .unwrap();
        mem.write_slice(&[0x5a; 5 * PAGE], GuestAddress((4 << 20) - 2 * PAGE as u64))
            .unwrap();
        mem.write_obj(3u64, GuestAddress((9 << 20) - 8)).unwrap();
        mem.write_obj(9u8, GuestAddress(1 << 32)).unwrap();
        mem
    }

    #[test]
    fn one_pass_gives_the_page_digests_and_the_sink_the_file_bytes() {
        let mem = patterned();
        let path = std::env::temp_dir().join(format!("snap-mem-pass-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        let mut seen: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut sink = |c: Chunk| {
            for &(at, s, e) in &c.runs {
                seen.push((at, c.buf[s..e].to_vec()));
            }
            c.buf
        };
        let mut done = Vec::new();
        let (w, pages) =
            write_memory_digesting(&mem, &f, 77, |d, _| done.push(d), Some(&mut sink)).unwrap();
        assert_eq!(pages, PageDigests::of_memory(&mem, 77).unwrap());
        assert_eq!(w.data_bytes, 7 * PAGE as u64);
        // Progress in order, once per chunk: 3 in the first region, 1 in the second.
        assert_eq!(done, [4 << 20, 8 << 20, 9 << 20, 13 << 20]);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 13 << 20);
        let mut from_sink = vec![0u8; bytes.len()];
        for (at, run) in &seen {
            from_sink[*at as usize..*at as usize + run.len()].copy_from_slice(run);
        }
        assert!(
            from_sink == bytes,
            "the sink saw other bytes than the file holds"
        );
        assert_eq!(crate::digest::file_digest(&path).unwrap().0, w.digest);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_failing_write_is_returned_not_hung_on() {
        let mem = patterned();
        let path = std::env::temp_dir().join(format!("snap-mem-ro-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let read_only = File::open(&path).unwrap();
        let mut chunks = 0;
        let mut sink = |c: Chunk| {
            chunks += 1;
            c.buf
        };
        let e = write_memory_to(&mem, &read_only, |_, _| {}, Some(&mut sink)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        assert_eq!(chunks, 0, "a chunk that was not written went to the sink");
        std::fs::remove_file(path).unwrap();
    }
}
