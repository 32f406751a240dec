#![no_main]
//! The vsock packet parser on hostile queues: TX parsing and RX buffer checks never panic, and a
//! parsed packet's payload lies inside the chain and guest memory.

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::vsock::packet;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    common::with_chains(data, |mem, chain| {
        if let Ok(p) = packet::parse_tx(&chain, mem) {
            let total: u64 = p.payload.iter().map(|b| u64::from(b.len)).sum();
            if p.hdr.op == packet::OP_RW {
                assert_eq!(total, u64::from(p.hdr.len));
                assert!(p.hdr.len <= packet::MAX_PAYLOAD);
            } else {
                assert_eq!(total, 0);
            }
            for b in &p.payload {
                assert!(vm_memory::GuestMemoryBackend::check_range(
                    mem,
                    b.addr,
                    b.len as usize
                ));
            }
        }
        if let Ok(cap) = packet::rx_capacity(&chain) {
            assert!(cap <= u64::from(packet::MAX_PAYLOAD));
            let payload = packet::rx_payload_bufs(&chain);
            let total: u64 = payload.iter().map(|b| u64::from(b.len)).sum();
            assert!(total >= cap);
        }
    });
});
