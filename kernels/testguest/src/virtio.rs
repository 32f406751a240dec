//! A small polling virtio-mmio (version 2, modern) driver core, all at CPL3: probing the slots,
//! feature negotiation, split virtqueues in guest RAM, notification and polling of the used ring.
//! No interrupts: the IOAPIC pins stay masked and InterruptStatus is never acknowledged.
//!
//! Memory ordering (x86, TSO): the device is a host thread reading and writing the rings
//! concurrently. Stores become visible in program order, so publishing a descriptor before the
//! avail index only needs a compiler barrier; the only store->load ordering that matters (avail
//! index, then the used ring's NO_NOTIFY flag) gets a full fence.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, fence, AtomicU64, Ordering};

use crate::{alloc, fail};

/// Slot `i` of the VMM's virtio-mmio window (see vmm/src/devices/virtio/mod.rs).
pub const MMIO_BASE: u64 = 0xd000_0000;
pub const SLOT_SIZE: u64 = 0x1000;
const MAX_SLOTS: u64 = 64;

pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;

const MAGIC: u32 = 0x7472_6976; // "virt"

// Registers (virtio 1.x §4.2.2).
const R_MAGIC: u64 = 0x000;
const R_VERSION: u64 = 0x004;
const R_DEVICE_ID: u64 = 0x008;
const R_DEVICE_FEATURES: u64 = 0x010;
const R_DEVICE_FEATURES_SEL: u64 = 0x014;
const R_DRIVER_FEATURES: u64 = 0x020;
const R_DRIVER_FEATURES_SEL: u64 = 0x024;
const R_QUEUE_SEL: u64 = 0x030;
const R_QUEUE_NUM_MAX: u64 = 0x034;
const R_QUEUE_NUM: u64 = 0x038;
const R_QUEUE_READY: u64 = 0x044;
const R_QUEUE_NOTIFY: u64 = 0x050;
const R_STATUS: u64 = 0x070;
const R_QUEUE_DESC_LOW: u64 = 0x080;
const R_QUEUE_DESC_HIGH: u64 = 0x084;
const R_QUEUE_DRIVER_LOW: u64 = 0x090;
const R_QUEUE_DRIVER_HIGH: u64 = 0x094;
const R_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const R_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const R_CONFIG: u64 = 0x100;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;

pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const USED_F_NO_NOTIFY: u16 = 1;

/// Notifications written to QueueNotify, and how many of them were "rescue" kicks: a kick
/// sent although the device had said it needs none (NO_NOTIFY), because nothing moved for a
/// while (see `Queue::rescue`).
pub static KICKS: AtomicU64 = AtomicU64::new(0);
pub static RESCUE_KICKS: AtomicU64 = AtomicU64::new(0);

/// One virtio-mmio slot.
#[derive(Clone, Copy)]
pub struct Device {
    pub base: u64,
    pub slot: u64,
    /// Feature bits the device offers.
    pub offered: u64,
    /// Feature bits negotiated.
    pub features: u64,
}

fn rd(base: u64, off: u64) -> u32 {
    unsafe { read_volatile((base + off) as *const u32) }
}

fn wr(base: u64, off: u64, v: u32) {
    unsafe { write_volatile((base + off) as *mut u32, v) }
}

/// The `nth` (0-based) device of type `device_id`, scanning slots from 0 until one does not
/// answer with the magic value (unclaimed MMIO reads as all ones).
pub fn find(device_id: u32, nth: usize) -> Option<Device> {
    let mut seen = 0;
    for slot in 0..MAX_SLOTS {
        let base = MMIO_BASE + slot * SLOT_SIZE;
        if rd(base, R_MAGIC) != MAGIC {
            break;
        }
        let version = rd(base, R_VERSION);
        if version != 2 {
            fail(format_args!("virtio-mmio slot {} has version {}, not 2", slot, version));
        }
        if rd(base, R_DEVICE_ID) == device_id {
            if seen == nth {
                return Some(Device { base, slot, offered: 0, features: 0 });
            }
            seen += 1;
        }
    }
    None
}

impl Device {
    fn status(&self) -> u32 {
        rd(self.base, R_STATUS)
    }

    fn set_status(&self, v: u32) {
        wr(self.base, R_STATUS, v)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then accept `wanted & offered` (VERSION_1 is required) and
    /// set FEATURES_OK. Returns the negotiated features.
    pub fn negotiate(&mut self, wanted: u64) -> u64 {
        self.set_status(0);
        if self.status() != 0 {
            fail(format_args!("virtio slot {}: reset did not clear the status", self.slot));
        }
        self.set_status(S_ACKNOWLEDGE);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER);
        wr(self.base, R_DEVICE_FEATURES_SEL, 0);
        let lo = rd(self.base, R_DEVICE_FEATURES) as u64;
        wr(self.base, R_DEVICE_FEATURES_SEL, 1);
        let hi = rd(self.base, R_DEVICE_FEATURES) as u64;
        self.offered = hi << 32 | lo;
        if self.offered & F_VERSION_1 == 0 {
            fail(format_args!("virtio slot {} does not offer VERSION_1", self.slot));
        }
        let acked = self.offered & (wanted | F_VERSION_1);
        wr(self.base, R_DRIVER_FEATURES_SEL, 0);
        wr(self.base, R_DRIVER_FEATURES, acked as u32);
        wr(self.base, R_DRIVER_FEATURES_SEL, 1);
        wr(self.base, R_DRIVER_FEATURES, (acked >> 32) as u32);
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if self.status() & S_FEATURES_OK == 0 {
            fail(format_args!("virtio slot {}: features {:#x} refused", self.slot, acked));
        }
        self.features = acked;
        acked
    }

    /// Sets up queue `index` with at most `want` entries (a power of two) in fresh guest RAM.
    pub fn setup_queue(&self, index: u32, want: u16) -> Queue {
        wr(self.base, R_QUEUE_SEL, index);
        if rd(self.base, R_QUEUE_READY) != 0 {
            fail(format_args!("virtio slot {}: queue {} already live", self.slot, index));
        }
        let max = rd(self.base, R_QUEUE_NUM_MAX);
        if max == 0 {
            fail(format_args!("virtio slot {}: queue {} does not exist", self.slot, index));
        }
        let mut size = want as u32;
        while size > max {
            size /= 2;
        }
        let n = size as u64;
        // Descriptor table (16-byte aligned), available ring (2), used ring (4): one block.
        let avail_off = 16 * n;
        let used_off = (avail_off + 6 + 2 * n).next_multiple_of(4);
        let bytes = used_off + 6 + 8 * n;
        let mem = alloc(bytes, 4096);
        unsafe { core::ptr::write_bytes(mem as *mut u8, 0, bytes as usize) };
        let (desc, avail, used) = (mem, mem + avail_off, mem + used_off);
        wr(self.base, R_QUEUE_NUM, size);
        wr(self.base, R_QUEUE_DESC_LOW, desc as u32);
        wr(self.base, R_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        wr(self.base, R_QUEUE_DRIVER_LOW, avail as u32);
        wr(self.base, R_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        wr(self.base, R_QUEUE_DEVICE_LOW, used as u32);
        wr(self.base, R_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        wr(self.base, R_QUEUE_READY, 1);
        Queue {
            size: size as u16,
            index,
            desc,
            avail,
            used,
            notify: self.base + R_QUEUE_NOTIFY,
            avail_idx: 0,
            last_used: 0,
            published: false,
            suppressed: false,
            batch_start: 0,
            outstanding: 0,
            last_progress: crate::cpu::rdtsc(),
        }
    }

    /// DRIVER_OK; the device must not have flagged DEVICE_NEEDS_RESET.
    pub fn driver_ok(&self) {
        self.set_status(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let s = self.status();
        if s & S_NEEDS_RESET != 0 || s & S_DRIVER_OK == 0 {
            fail(format_args!("virtio slot {}: device refused DRIVER_OK (status {:#x})", self.slot, s));
        }
    }

    /// Writes 0 to the status register: the device drops its queues.
    pub fn reset(&self) {
        self.set_status(0);
    }

    pub fn config_u32(&self, off: u64) -> u32 {
        rd(self.base, R_CONFIG + off)
    }

    pub fn config_u64(&self, off: u64) -> u64 {
        // Two 32-bit halves; retry if the high half changed in between (config generation is
        // overkill for the fields we read, which never change while we run).
        loop {
            let hi = self.config_u32(off + 4);
            let lo = self.config_u32(off);
            if self.config_u32(off + 4) == hi {
                return (hi as u64) << 32 | lo as u64;
            }
        }
    }
}

/// A split virtqueue owned by the driver. Descriptors are managed by the caller (each user of
/// a queue keeps a fixed mapping of descriptor indices to its buffers).
pub struct Queue {
    pub size: u16,
    index: u32,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    /// Our copy of the available index (what we published).
    avail_idx: u16,
    /// The next used-ring entry to consume.
    last_used: u16,
    /// Something was published since the last kick.
    published: bool,
    /// The last kick was skipped (NO_NOTIFY) and no notification was sent since.
    suppressed: bool,
    /// The avail index at the last `kick_if_drained`.
    batch_start: u16,
    /// Chains published and not yet seen in the used ring.
    pub outstanding: u32,
    last_progress: u64,
}

impl Queue {
    /// Writes descriptor `i`.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * (i % self.size) as u64;
        unsafe {
            write_volatile(d as *mut u64, addr);
            write_volatile((d + 8) as *mut u32, len);
            write_volatile((d + 12) as *mut u16, flags);
            write_volatile((d + 14) as *mut u16, next);
        }
    }

    /// Puts the chain starting at descriptor `head` in the available ring.
    pub fn publish(&mut self, head: u16) {
        let slot = (self.avail_idx % self.size) as u64;
        unsafe { write_volatile((self.avail + 4 + 2 * slot) as *mut u16, head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The ring entry (and the descriptors before it) must be visible before the index.
        compiler_fence(Ordering::Release);
        unsafe { write_volatile((self.avail + 2) as *mut u16, self.avail_idx) };
        self.published = true;
        if self.outstanding == 0 {
            self.last_progress = crate::cpu::rdtsc();
        }
        self.outstanding += 1;
    }

    /// Notifies the device of what was published since the last kick, unless it said it does
    /// not need to hear (VRING_USED_F_NO_NOTIFY: it is processing the queue right now).
    pub fn kick(&mut self) {
        if !self.published {
            return;
        }
        self.published = false;
        // The avail index store must be globally visible before we read the device's flag.
        fence(Ordering::SeqCst);
        self.batch_start = self.avail_idx;
        let flags = unsafe { read_volatile((self.used) as *const u16) };
        if flags & USED_F_NO_NOTIFY == 0 {
            self.notify_now();
        } else {
            self.suppressed = true;
        }
    }

    /// For a queue of buffers the device fills when it has something (vsock RX): notify only
    /// if the device had used every buffer published before this batch, i.e. it may have
    /// found the ring empty and be waiting for a kick; otherwise it finds the new buffers
    /// itself. (Store avail index, fence, load used index; the device stores its used index,
    /// fences and reloads the avail index before it waits: one of the two sees the other.)
    pub fn kick_if_drained(&mut self) {
        if !self.published {
            return;
        }
        self.published = false;
        fence(Ordering::SeqCst);
        let used = unsafe { read_volatile((self.used + 2) as *const u16) };
        if used == self.batch_start {
            self.notify_now();
        } else {
            self.suppressed = true;
        }
        self.batch_start = self.avail_idx;
    }

    fn notify_now(&mut self) {
        self.suppressed = false;
        fence(Ordering::SeqCst);
        unsafe { write_volatile(self.notify as *mut u32, self.index) };
        KICKS.fetch_add(1, Ordering::Relaxed);
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        let v = unsafe { read_volatile((self.used + 2) as *const u16) };
        compiler_fence(Ordering::Acquire);
        v
    }

    /// The next used entry `(descriptor head, written length)`, if any before `limit` (a value
    /// of `used_idx()` read earlier).
    pub fn pop_used_upto(&mut self, limit: u16) -> Option<(u16, u32)> {
        if self.last_used == limit {
            return None;
        }
        let slot = (self.last_used % self.size) as u64;
        let e = self.used + 4 + 8 * slot;
        let (id, len) = unsafe { (read_volatile(e as *const u32), read_volatile((e + 4) as *const u32)) };
        self.last_used = self.last_used.wrapping_add(1);
        self.outstanding = self.outstanding.saturating_sub(1);
        self.last_progress = crate::cpu::rdtsc();
        Some((id as u16, len))
    }

    /// The used-ring index of the entry `pop_used` returns next.
    pub fn next_used(&self) -> u16 {
        self.last_used
    }

    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let limit = self.used_idx();
        self.pop_used_upto(limit)
    }

    /// Call while waiting for the device: when chains are outstanding, the last kick was
    /// skipped because the device had set NO_NOTIFY, and the used ring has not moved for
    /// `after` TSC ticks, notify after all. A device that loses that race (it re-enables
    /// notifications, misses the new avail index and goes to sleep) would otherwise leave a
    /// polling driver waiting forever. A device that is merely slow after a real kick is left
    /// alone.
    pub fn rescue(&mut self, after: u64) {
        if self.stalled(after) {
            RESCUE_KICKS.fetch_add(1, Ordering::Relaxed);
            self.notify_now();
        }
    }

    /// `rescue` for a queue the device fills on its own (`kick_if_drained`): there no progress
    /// is normal (nothing to deliver), so this is not counted as a rescue. It covers the one
    /// path where the device may go to sleep without a fenced re-check of the ring.
    pub fn keepalive(&mut self, after: u64) {
        if self.stalled(after) {
            self.notify_now();
        }
    }

    fn stalled(&mut self, after: u64) -> bool {
        if self.outstanding == 0 || !self.suppressed {
            return false;
        }
        let now = crate::cpu::rdtsc();
        if now.wrapping_sub(self.last_progress) > after {
            self.last_progress = now;
            return true;
        }
        false
    }
}

/// TSC ticks for `ms` milliseconds (a fixed fallback when the TSC was not calibrated).
pub fn ticks_ms(ms: u64) -> u64 {
    let per_ms = crate::run().tsc_per_ms;
    ms.saturating_mul(if per_ms != 0 { per_ms } else { 3_000_000 })
}

/// Microseconds in `ticks` (0 when the TSC was not calibrated).
pub fn ticks_to_us(ticks: u64) -> u64 {
    let per_ms = crate::run().tsc_per_ms;
    if per_ms == 0 {
        0
    } else {
        (ticks as u128 * 1000 / per_ms as u128) as u64
    }
}
