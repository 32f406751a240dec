//! `pages.bin`: a keyed digest of every guest page at the moment of a capture, so a later diff
//! snapshot finds the pages that changed by content instead of by KVM's dirty log.
//!
//! Why: an armed dirty log write-protects guest memory, and every first write after each arming
//! is a fault (on nested KVM a very expensive one; never free): a guest that touches most of its
//! memory ran seconds slower after every boot, restore, fork and capture. With page digests
//! nothing is armed; a diff costs one hashing pass over guest memory (xxh3, several GB/s).
//!
//! The digest is xxh3-128 keyed with a random seed that lives only in this host-side file (the
//! guest never sees it), so a guest cannot craft a page that collides with its previous content
//! to slip a change past a diff. A chain keeps its first capture's seed.
//!
//! Format: magic `MAPD`, version u32, seed u64, page count u64, then 16 bytes per page (LE).

use std::path::Path;

use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};
use xxhash_rust::xxh3::xxh3_128_with_seed;

use crate::memfile::PAGE;

pub const FILE: &str = "pages.bin";
const MAGIC: &[u8; 4] = b"MAPD";
const VERSION: u32 = 1;
const HEADER: usize = 24;
/// Larger than any guest we run (64 GiB): a bound on what a file may make us allocate.
const MAX_PAGES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PageDigestError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a page digest file: {why}")]
    Malformed { path: String, why: String },
    #[error("cannot read guest memory: {0}")]
    Memory(String),
}

/// The digests of every page of guest memory (all regions back to back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageDigests {
    pub seed: u64,
    pub pages: Vec<u128>,
}

/// A fresh seed from the kernel's CSPRNG.
pub fn new_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most the buffer's length into it.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // No entropy: still a valid digest, only without the key's protection.
        return 0x9e37_79b9_7f4a_7c15;
    }
    u64::from_le_bytes(b)
}

pub fn digest_page(seed: u64, page: &[u8]) -> u128 {
    xxh3_128_with_seed(page, seed)
}

impl PageDigests {
    /// Hashes every page of `mem` now.
    pub fn of_memory<M: GuestMemoryBackend>(mem: &M, seed: u64) -> Result<Self, PageDigestError> {
        let total: u64 = mem.iter().map(|r| r.len() / PAGE as u64).sum();
        let mut pages = Vec::with_capacity(total as usize);
        let mut buf = vec![0u8; 4 << 20];
        for region in mem.iter() {
            let mut done = 0u64;
            while done < region.len() {
                let n = (region.len() - done).min(buf.len() as u64) as usize;
                mem.read_slice(&mut buf[..n], region.start_addr().unchecked_add(done))
                    .map_err(|e| PageDigestError::Memory(e.to_string()))?;
                pages.extend(buf[..n].chunks(PAGE).map(|p| digest_page(seed, p)));
                done += n as u64;
            }
        }
        Ok(Self { seed, pages })
    }

    /// The pages whose digest differs from `parent`'s, as one bitmap per region (the form of
    /// KVM's dirty log). Pages beyond the parent's count are changed.
    pub fn changed_since<M: GuestMemoryBackend>(
        &self,
        parent: &PageDigests,
        mem: &M,
    ) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        let mut base = 0usize;
        for region in mem.iter() {
            let n = (region.len() / PAGE as u64) as usize;
            let mut bits = vec![0u64; n.div_ceil(64)];
            for i in 0..n {
                let g = base + i;
                if parent.pages.get(g) != self.pages.get(g) {
                    bits[i / 64] |= 1 << (i % 64);
                }
            }
            out.push(bits);
            base += n;
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER + self.pages.len() * 16);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.seed.to_le_bytes());
        b.extend_from_slice(&(self.pages.len() as u64).to_le_bytes());
        for p in &self.pages {
            b.extend_from_slice(&p.to_le_bytes());
        }
        b
    }

    /// Reads a file written by `encode`; every length is checked before it is trusted.
    pub fn read(path: &Path) -> Result<Self, PageDigestError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| PageDigestError::Io {
            path: name.clone(),
            source,
        })?;
        Self::decode(&bytes).map_err(|why| PageDigestError::Malformed { path: name, why })
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < HEADER || &b[..4] != MAGIC {
            return Err("bad magic or short header".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let version = u32_at(4);
        if version != VERSION {
            return Err(format!("version {version}, this build reads {VERSION}"));
        }
        let seed = u64_at(8);
        let count = u64_at(16);
        if count > MAX_PAGES || (b.len() - HEADER) as u64 != count * 16 {
            return Err(format!(
                "{count} pages declared, {} bytes of digests",
                b.len() - HEADER
            ));
        }
        let pages = b[HEADER..]
            .chunks_exact(16)
            .map(|c| {
                let mut w = [0u8; 16];
                w.copy_from_slice(c);
                u128::from_le_bytes(w)
            })
            .collect();
        Ok(Self { seed, pages })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemory;
    use vm_memory::GuestAddress;

    #[test]
    fn changed_pages_are_found_by_content_in_every_region() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 64 << 10),
        ])
        .unwrap();
        mem.write_slice(&[7u8; 100], GuestAddress(0x3000)).unwrap();
        let seed = new_seed();
        let before = PageDigests::of_memory(&mem, seed).unwrap();
        assert_eq!(before.pages.len(), 256 + 16);
        // Page 5 changes; page 3 is written with what it already held; region 2's page 1 changes.
        mem.write_obj(1u8, GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[7u8; 100], GuestAddress(0x3000)).unwrap();
        mem.write_obj(9u64, GuestAddress((1 << 32) + 0x1008))
            .unwrap();
        let after = PageDigests::of_memory(&mem, seed).unwrap();
        let bits = after.changed_since(&before, &mem);
        assert_eq!(bits.len(), 2);
        assert_eq!(bits[0][0], 1 << 5);
        assert!(bits[0][1..].iter().all(|w| *w == 0));
        assert_eq!(bits[1], vec![1 << 1]);
        // A different key gives different digests (the guest cannot know which).
        assert_ne!(
            PageDigests::of_memory(&mem, seed ^ 1).unwrap().pages,
            after.pages
        );
    }

    #[test]
    fn the_file_round_trips_and_hostile_files_are_refused() {
        let d = PageDigests {
            seed: 42,
            pages: vec![1, 2, u128::MAX],
        };
        let b = d.encode();
        assert_eq!(PageDigests::decode(&b).unwrap(), d);
        assert!(PageDigests::decode(&b[..b.len() - 1]).is_err());
        assert!(PageDigests::decode(&b[..10]).is_err());
        let mut huge = b.clone();
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(PageDigests::decode(&huge).is_err());
        let mut v2 = b.clone();
        v2[4] = 2;
        assert!(PageDigests::decode(&v2).unwrap_err().contains("version 2"));
    }
}
