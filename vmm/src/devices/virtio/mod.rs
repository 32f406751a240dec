//! Virtio devices on the virtio-mmio (version 2, "modern") transport.
//!
//! The transport ([`mmio::MmioTransport`]) owns the registers the driver programs and is generic
//! over the [`VirtioDevice`] trait; each device (blk, vsock, net, rng) only implements its own
//! side: features, config space, and what to do with its queues once the driver sets DRIVER_OK.
//!
//! Threads: the transport runs on the vCPU threads (MMIO exits), the devices' queue and backend
//! work on one event-loop thread ([`event_loop::EventLoop`]). Queue notifications reach the loop
//! through a KVM ioeventfd per queue, interrupts reach the guest through an irqfd, so a kick or an
//! interrupt costs no exit to this process.
//!
//! Device state is plain serde data (`*State` structs) so that a snapshot can capture it and a
//! restore can rebuild the live device from it plus what only the host can supply.
//!
//! # What a guest driver must do
//! * Find the devices: slot `i` is 4 KiB at `0xd000_0000 + i * 0x1000` with IRQ `5 + i`, in the
//!   order block devices (as configured), net, vsock, rng; the kernel command line carries one
//!   `virtio_mmio.device=4K@<base>:<irq>` word per slot.
//! * Speak virtio-mmio version 2 only: 32-bit aligned register accesses (config space: any
//!   width), accept VIRTIO_F_VERSION_1 (bit 32: DriverFeaturesSel=1, DriverFeatures=1) and no
//!   feature that was not offered, or FEATURES_OK stays clear.
//! * Configure and enable every queue of the device before DRIVER_OK (blk 1, net 2 = rx/tx plus
//!   the control queue with VIRTIO_NET_F_CTRL_VQ, vsock 3 = rx/tx/event, rng 1): size a power of two <= 256 (QueueNumMax), descriptor table
//!   16-byte, available ring 2-byte, used ring 4-byte aligned, all in guest RAM; otherwise the
//!   status reads back with DEVICE_NEEDS_RESET (0x40).
//! * Notify by writing the queue index (32 bits) to QueueNotify (0x50). A polling driver may
//!   ignore interrupts; INTERRUPT_STATUS bits stay set until acknowledged, which is harmless.
//! * EVENT_IDX and INDIRECT_DESC are offered but optional.

pub mod block;
pub mod chain;
pub mod common;
pub mod event_loop;
pub mod kind;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestMemory;

pub use common::VirtioCommon;
pub use mmio::{MmioTransport, MmioTransportState};

/// Feature bits every device offers (the transport refuses a driver that does not take
/// VIRTIO_F_VERSION_1: there is no legacy interface here).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// What every device here offers on top of its own feature bits.
pub const COMMON_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// Device type ids (virtio 1.x §5).
pub const TYPE_NET: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_NET;
pub const TYPE_BLOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
pub const TYPE_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
pub const TYPE_VSOCK: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

/// InterruptStatus bits.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Why a device could not start on the queues the driver gave it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device expects {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("device back end: {0}")]
    Backend(String),
}

/// The interrupt line of one virtio-mmio slot: the InterruptStatus register plus the irqfd that
/// raises the slot's IOAPIC pin (edge). Shared by the transport (which reads and acks the status)
/// and the device (which raises it).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            irqfd: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd KVM turns into an interrupt (registered with KVM_IRQFD by the manager).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // Fails only if the counter would overflow, which means the guest has plenty pending.
        let _ = self.irqfd.write(1);
    }

    /// The guest used a buffer: tell it.
    pub fn signal_used_queue(&self) {
        self.trigger(INT_VRING);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub(crate) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK: memory, the negotiated features, its
/// queues (validated against guest memory) and its interrupt line.
pub struct ActiveQueues {
    pub mem: GuestMemory,
    pub acked_features: u64,
    pub queues: Vec<Queue>,
    pub interrupt: Arc<Interrupt>,
}

impl ActiveQueues {
    /// Refuses an activation with other than the `expected` number of queues.
    pub fn check_count(&self, expected: usize) -> Result<(), ActivateError> {
        if self.queues.len() == expected {
            Ok(())
        } else {
            Err(ActivateError::QueueCount {
                expected,
                got: self.queues.len(),
            })
        }
    }
}

/// The device side of a virtio device, as the transport sees it. Features, queue eventfds,
/// activation and reset default to the device's [`VirtioCommon`]; a device overrides them only
/// for what it does beyond that.
pub trait VirtioDevice: Send {
    /// Virtio device type (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; their count is the device's number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many of the queues (the first ones) the driver must set up with `acked_features`:
    /// a queue that exists only for a feature the driver did not take (net's control queue)
    /// may stay unconfigured.
    fn queues_in_use(&self, _acked_features: u64) -> usize {
        self.queue_max_sizes().len()
    }
    /// The device-specific config space (none by default).
    fn config_space(&self) -> &[u8] {
        &[]
    }
    /// Reads the device-specific config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config_space(), offset, data)
    }
    /// Writes the device-specific config space; read-only fields ignore writes.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn common(&self) -> &VirtioCommon;
    fn common_mut(&mut self) -> &mut VirtioCommon;
    /// Every feature bit the device offers, `COMMON_FEATURES` included.
    fn avail_features(&self) -> u64 {
        self.common().avail_features
    }
    /// One eventfd per queue, signalled by the guest's QueueNotify (ioeventfd) and watched by the
    /// device in the event loop.
    fn queue_events(&self) -> &[EventFd] {
        let n = self.queue_max_sizes().len();
        let evts = &self.common().queue_evts;
        &evts[..n.min(evts.len())]
    }
    /// Starts the device on validated queues.
    fn activate(&mut self, active: ActiveQueues) -> Result<(), ActivateError> {
        let expected = self.queues_in_use(active.acked_features);
        self.common_mut().activate(active, expected)?;
        self.activated();
        Ok(())
    }
    /// Runs once the device has its queues. Requests queued before DRIVER_OK (or before the
    /// snapshot a device is restored from) would otherwise wait for the next kick: by default
    /// the first queue's handler runs at once.
    fn activated(&mut self) {
        self.common().kick(0);
    }
    /// The live queues while active (their indices are what a snapshot must capture).
    fn active_queues(&self) -> Option<&[Queue]> {
        self.common().active_queues()
    }
    /// Back to the pre-activation state: queues dropped, no further guest memory access.
    fn reset(&mut self) {
        self.common_mut().reset();
    }
}

/// A split virtqueue's registers and indices, as plain data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    pub fn of(q: &Queue) -> Self {
        q.state().into()
    }

    /// Rebuilds a queue; `None` when the saved values break the queue's invariants.
    pub fn to_queue(&self) -> Option<Queue> {
        let mut q = Queue::new(self.max_size).ok()?;
        if self.size != 0 {
            q.try_set_size(self.size).ok()?;
        }
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.used_ring))
            .ok()?;
        q.set_ready(self.ready);
        q.set_next_avail(self.next_avail);
        q.set_next_used(self.next_used);
        q.set_event_idx(self.event_idx);
        Some(q)
    }
}

/// Creates `n` non-blocking eventfds (one per queue).
pub(crate) fn queue_eventfds(n: usize) -> std::io::Result<Vec<EventFd>> {
    (0..n).map(|_| EventFd::new(EFD_NONBLOCK)).collect()
}

/// Copies `src` (a device's config space) at `offset` into `data`; out of range reads zero.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - offset);
    data[..n].copy_from_slice(&src[offset..offset + n]);
}

/// Outcome of draining one queue.
pub(crate) struct Drained {
    /// The device added used buffers and the driver wants to hear about it.
    pub notify: bool,
}

/// Pops every available chain of `queue` and hands it to `handle`, which returns the used length
/// (`None` leaves the chain un-popped, e.g. when the device cannot take it now). Notification
/// suppression (EVENT_IDX) is handled here: the guest is interrupted only when it asked to be.
///
/// A driver that publishes a bogus avail index (more chains than the queue holds) gets nothing
/// processed instead of a busy loop.
pub(crate) fn drain_queue<F>(queue: &mut Queue, mem: &GuestMemory, mut handle: F) -> Drained
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> Option<u32>,
{
    let mut used_any = false;
    // Drain until the ring stays empty with notifications on: a driver that adds work while we
    // drain sees notifications off and (rightly) does not kick, so stopping early would lose its
    // request. Only passes that find work but can pop nothing (a broken ring) end the loop.
    let mut fruitless = 0;
    loop {
        let _ = queue.disable_notification(mem);
        let mut popped = 0u32;
        let mut stalled = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match handle(chain) {
                Some(len) => {
                    popped += 1;
                    if queue.add_used(mem, head, len).is_ok() {
                        used_any = true;
                    }
                }
                None => {
                    use virtio_queue::QueueOwnedT;
                    queue.go_to_previous_position();
                    stalled = true;
                    break;
                }
            }
        }
        if stalled {
            // Leave notifications on so the driver kicks us when it adds buffers.
            let _ = queue.enable_notification(mem);
            break;
        }
        match queue.enable_notification(mem) {
            Ok(true) => {
                fruitless = if popped == 0 { fruitless + 1 } else { 0 };
                if fruitless > 2 {
                    break;
                }
            }
            _ => break,
        }
    }
    let notify = used_any && queue.needs_notification(mem).unwrap_or(true);
    Drained { notify }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A driver's view of a split queue for device tests.
    //!
    //! (virtio-queue 0.18's `MockSplitQueue` lays the used ring over the second half of the
    //! available ring: `SplitQueueRing::end()` counts ring elements as bytes. Fine for a few
    //! chains, wrong for more, so the layout here is our own.)
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use vm_memory::{Address, Bytes};

    pub struct TestQueue<'a> {
        mem: &'a GuestMemory,
        size: u16,
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
        next_desc: u16,
    }

    impl<'a> TestQueue<'a> {
        /// A queue of `size` entries laid out from `base` (needs 16*size + 6*size + 0x20 bytes).
        pub fn new(mem: &'a GuestMemory, base: u64, size: u16) -> Self {
            let desc = GuestAddress(base);
            let avail = desc.unchecked_add(16 * u64::from(size));
            let used = GuestAddress((avail.0 + 6 + 2 * u64::from(size) + 3) & !3);
            for (addr, len) in [
                (desc, 16 * usize::from(size)),
                (avail, 6 + 2 * usize::from(size)),
                (used, 6 + 8 * usize::from(size)),
            ] {
                mem.write_slice(&vec![0u8; len], addr).unwrap();
            }
            Self {
                mem,
                size,
                desc,
                avail,
                used,
                next_desc: 0,
            }
        }

        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.set_size(self.size);
            q.try_set_desc_table_address(self.desc).unwrap();
            q.try_set_avail_ring_address(self.avail).unwrap();
            q.try_set_used_ring_address(self.used).unwrap();
            q.set_ready(true);
            q
        }

        /// Publishes a chain of (address, length, device-writable) buffers; returns its head.
        pub fn push(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            let descs: Vec<RawDescriptor> = bufs
                .iter()
                .enumerate()
                .map(|(i, &(addr, len, w))| {
                    let idx = (head + i as u16) % self.size;
                    let last = i + 1 == bufs.len();
                    let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
                    if !last {
                        flags |= VRING_DESC_F_NEXT;
                    }
                    RawDescriptor::from(Descriptor::new(
                        addr,
                        len,
                        flags as u16,
                        if last { 0 } else { (idx + 1) % self.size },
                    ))
                })
                .collect();
            self.push_raw(&descs, head);
            self.next_desc = (head + bufs.len() as u16) % self.size;
            head
        }

        /// The descriptor index the next `push` starts at.
        pub fn next_head(&self) -> u16 {
            self.next_desc
        }

        /// Writes `descs` at table index `at` (wrapping) and publishes `at` as a chain head.
        pub fn push_raw(&mut self, descs: &[RawDescriptor], at: u16) {
            for (i, d) in descs.iter().enumerate() {
                let idx = (usize::from(at) + i) % usize::from(self.size);
                self.mem
                    .write_obj(*d, self.desc.unchecked_add(16 * idx as u64))
                    .unwrap();
            }
            let idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
            let slot = u64::from(idx % self.size);
            self.mem
                .write_obj(at, self.avail.unchecked_add(4 + 2 * slot))
                .unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), self.avail.unchecked_add(2))
                .unwrap();
        }

        /// Overwrites the available index (a driver lying about how many chains it published).
        pub fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx, self.avail.unchecked_add(2))
                .unwrap();
        }

        pub fn used_idx(&self) -> u16 {
            self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
        }

        /// The used-ring entry `i`: (descriptor head, length).
        pub fn used(&self, i: u16) -> (u32, u32) {
            let at = self.used.unchecked_add(4 + 8 * u64::from(i % self.size));
            (
                self.mem.read_obj(at).unwrap(),
                self.mem.read_obj(at.unchecked_add(4)).unwrap(),
            )
        }
    }
}
