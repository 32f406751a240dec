//! Shared set-up: the fuzz input becomes the first 64 KiB of a guest's memory, holding a split
//! queue of 16 entries (descriptor table at 0, available ring at 0x100, used ring at 0x200) and
//! whatever buffers the descriptors point at. Every chain the queue yields goes through
//! `chain::collect` and then the parser under test.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 64 * 1024;

pub fn with_chains(
    data: &[u8],
    mut f: impl FnMut(&GuestMemoryMmap<()>, vmm::devices::virtio::chain::Chain),
) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    for _ in 0..16 {
        let Some(c) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = c.head_index();
        if let Ok(chain) = vmm::devices::virtio::chain::collect(c, &mem, 256) {
            for b in chain.readable.iter().chain(&chain.writable) {
                assert!(vm_memory::GuestMemoryBackend::check_range(
                    &mem,
                    b.addr,
                    b.len as usize
                ));
            }
            f(&mem, chain);
        }
        let _ = q.add_used(&mem, head, 0);
    }
}
