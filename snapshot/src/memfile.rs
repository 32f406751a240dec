//! `memory.bin`: guest RAM, its regions back to back. Zero pages are left as holes, so the file
//! is sparse and restores read them back as zeros.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemory;

use crate::digest::FileDigest;
use crate::faults;

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
/// with bytes done so far.
pub fn write_memory(
    mem: &GuestMemory,
    file: &File,
    progress: impl FnMut(u64, u64),
) -> std::io::Result<MemoryWritten> {
    write_memory_to(mem, file, progress, None)
}

/// [`write_memory`], handing every chunk (with the non-zero runs written) to `sink`.
pub fn write_memory_to(
    mem: &GuestMemory,
    file: &File,
    mut progress: impl FnMut(u64, u64),
    mut sink: Option<ChunkSink<'_>>,
) -> std::io::Result<MemoryWritten> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut digest = FileDigest::new();
    let mut buf = vec![0u8; CHUNK];
    let mut file_off = 0u64;
    let mut data_bytes = 0u64;
    for region in mem.iter() {
        let mut done = 0u64;
        while done < region.len() {
            let n = (region.len() - done).min(CHUNK as u64) as usize;
            buf.resize(CHUNK, 0);
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, region.start_addr().unchecked_add(done))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            digest.update(chunk);
            let mut runs = Vec::new();
            // Coalesce runs of non-zero pages into single writes.
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
                let at = file_off + done + start as u64;
                file.write_all_at(&chunk[start..end], at)?;
                data_bytes += (end - start) as u64;
                runs.push((at, start, end));
            }
            if let Some(sink) = sink.as_mut() {
                if !runs.is_empty() {
                    buf = sink(Chunk {
                        buf: std::mem::take(&mut buf),
                        runs,
                    });
                }
            }
            done += n as u64;
            progress(file_off + done, total);
            faults::checkpoint();
        }
        file_off += region.len();
    }
    file.set_len(total)?;
    Ok(MemoryWritten {
        size: total,
        data_bytes,
        digest: digest.finish(),
    })
}

/// Writes only the pages set in `dirty` (per region, a bit per page; zero pages included, as
/// data) into a sparse file the size of all of guest RAM. Returns the number of pages written.
pub fn write_dirty_memory(
    mem: &GuestMemory,
    file: &File,
    dirty: &[Vec<u64>],
    progress: impl FnMut(u64, u64),
) -> std::io::Result<u64> {
    write_dirty_memory_to(mem, file, dirty, progress, None)
}

/// [`write_dirty_memory`], handing the pages written to `sink`, several runs to a chunk.
pub fn write_dirty_memory_to(
    mem: &GuestMemory,
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
pub fn encode_dirty(mem: &GuestMemory, dirty: &[Vec<u64>]) -> Vec<u8> {
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
}
