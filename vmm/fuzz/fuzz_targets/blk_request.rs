#![no_main]
//! The virtio-blk request parser on hostile queues: never panics, and an accepted request stays
//! inside the disk and inside guest memory, with its data in the right direction.

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::block::request::{self, Limits, RequestType, SECTOR_SIZE};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    // The last 8 bytes pick the disk size (in sectors).
    let capacity = data
        .len()
        .checked_sub(8)
        .map(|i| u64::from_le_bytes(data[i..].try_into().unwrap()))
        .unwrap_or(0);
    let limits = Limits {
        capacity,
        max_segments: 32,
        max_segment_sectors: u32::MAX >> 9,
    };
    common::with_chains(data, |mem, chain| {
        match request::parse(&chain, mem, &limits) {
            Ok(r) => {
                let total: u64 = r.data.iter().map(|b| u64::from(b.len)).sum();
                assert_eq!(total, r.data_len);
                match r.kind {
                    RequestType::In | RequestType::Out => {
                        assert!(r.data_len > 0 && r.data_len % SECTOR_SIZE == 0);
                        assert!(r.sector + r.data_len / SECTOR_SIZE <= capacity);
                        let pool = if r.kind == RequestType::In {
                            &chain.writable
                        } else {
                            &chain.readable
                        };
                        for b in &r.data {
                            assert!(pool.iter().any(|p| p.addr <= b.addr
                                && b.addr.0 + u64::from(b.len) <= p.addr.0 + u64::from(p.len)));
                        }
                    }
                    RequestType::Discard | RequestType::WriteZeroes => {
                        for s in &r.segments {
                            assert!(s.sector + u64::from(s.num_sectors) <= capacity);
                        }
                    }
                    _ => {}
                }
            }
            Err((Some(status), _)) => {
                assert!(vm_memory::GuestMemoryBackend::check_range(mem, status, 1));
            }
            Err((None, _)) => {}
        }
    });
});
