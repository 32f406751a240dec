//! `mode=blk`: a polling virtio-blk driver at CPL3 (the first disk).
//!
//! Default: read sectors [0, N) (`blk_sectors=N`), checksum them with FNV-1a 64 over the bytes
//! in disk order, print the checksum, write it to sector N (layout below), flush, reset.
//! `blk_bench=1`: sequential read of the whole disk, then a sequential write of the first
//! `blk_write_mib` MiB followed by a flush, both with 128 KiB requests, `blk_depth` in flight,
//! timed with the TSC.
//!
//! Sector N after a checksum run (the rest of the sector is zero):
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | FNV-1a 64 of sectors [0, N), little endian |
//! | 8..16 | N, little endian |
//! | 16..32 | ASCII `testguest blksum` |

use core::fmt::Write as _;

use crate::cpu::{self, rdtsc};
use crate::virtio::{self, Device, Queue, DESC_F_NEXT, DESC_F_WRITE};
use crate::{alloc, fail, println};

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const S_OK: u8 = 0;

const SECTOR: u64 = 512;
/// Bytes per request.
pub const CHUNK: u64 = 128 * 1024;
const MAX_DEPTH: usize = 16;
const QUEUE_SIZE: u16 = 64;
pub const MARKER: &[u8; 16] = b"testguest blksum";

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

struct Blk {
    dev: Device,
    q: Queue,
    capacity: u64,
    /// Per slot: 16-byte request header, then the status byte (32 bytes per slot).
    meta: u64,
    /// Per slot: a CHUNK-sized data buffer.
    data: u64,
    depth: usize,
    stall: u64,
    timeout: u64,
}

impl Blk {
    fn open() -> Blk {
        let Some(mut dev) = virtio::find(virtio::TYPE_BLOCK, 0) else {
            fail(format_args!("mode=blk: no virtio-blk device"));
        };
        dev.negotiate(F_FLUSH | F_RO);
        let q = dev.setup_queue(0, QUEUE_SIZE);
        dev.driver_ok();
        let capacity = dev.config_u64(0);
        let depth = (crate::run().cfg.blk_depth as usize).clamp(1, MAX_DEPTH).min(q.size as usize / 3);
        let meta = alloc(32 * MAX_DEPTH as u64, 4096);
        let data = alloc(CHUNK * MAX_DEPTH as u64, 4096);
        Blk {
            dev,
            q,
            capacity,
            meta,
            data,
            depth,
            stall: virtio::ticks_ms(crate::run().cfg.rescue_ms),
            timeout: virtio::ticks_ms(20_000),
        }
    }

    fn status_ptr(&self, slot: usize) -> *mut u8 {
        (self.meta + 32 * slot as u64 + 16) as *mut u8
    }

    fn data_ptr(&self, slot: usize) -> *mut u8 {
        (self.data + CHUNK * slot as u64) as *mut u8
    }

    /// Publishes request `typ` at `sector` with `bytes` of data in slot `slot`'s buffer
    /// (descriptors 3*slot .. 3*slot+2: header, data, status).
    fn submit(&mut self, slot: usize, typ: u32, sector: u64, bytes: u32) {
        let hdr = self.meta + 32 * slot as u64;
        unsafe {
            (hdr as *mut u32).write_volatile(typ);
            ((hdr + 4) as *mut u32).write_volatile(0);
            ((hdr + 8) as *mut u64).write_volatile(sector);
            self.status_ptr(slot).write_volatile(0xff);
        }
        let d = 3 * slot as u16;
        if bytes == 0 {
            self.q.set_desc(d, hdr, 16, DESC_F_NEXT, d + 2);
        } else {
            self.q.set_desc(d, hdr, 16, DESC_F_NEXT, d + 1);
            let w = if typ == T_IN { DESC_F_WRITE } else { 0 };
            self.q.set_desc(d + 1, self.data_ptr(slot) as u64, bytes, DESC_F_NEXT | w, d + 2);
        }
        self.q.set_desc(d + 2, self.status_ptr(slot) as u64, 1, DESC_F_WRITE, 0);
        self.q.publish(d);
    }

    fn check(&self, slot: usize, what: &str, sector: u64) {
        let s = unsafe { self.status_ptr(slot).read_volatile() };
        if s != S_OK {
            fail(format_args!("blk {} at sector {} failed with status {}", what, sector, s));
        }
    }

    /// `typ` requests over sectors [start, end) in CHUNK pieces, `depth` in flight; `done` sees
    /// each request's buffer in sector order once it completed.
    fn sequential(&mut self, typ: u32, start: u64, end: u64, mut done: impl FnMut(&[u8])) {
        let per = CHUNK / SECTOR;
        let depth = self.depth;
        let mut completed = [false; MAX_DEPTH];
        let (mut submitted, mut retired) = (0u64, 0u64);
        let total = (end - start).div_ceil(per);
        let mut last = rdtsc();
        while retired < total {
            while submitted < total && submitted - retired < depth as u64 {
                let sector = start + submitted * per;
                let n = per.min(end - sector);
                self.submit((submitted % depth as u64) as usize, typ, sector, (n * SECTOR) as u32);
                submitted += 1;
            }
            self.q.kick();
            while let Some((head, _)) = self.q.pop_used() {
                completed[head as usize / 3] = true;
            }
            while retired < submitted && completed[(retired % depth as u64) as usize] {
                let slot = (retired % depth as u64) as usize;
                completed[slot] = false;
                let sector = start + retired * per;
                let n = per.min(end - sector);
                self.check(slot, if typ == T_IN { "read" } else { "write" }, sector);
                done(unsafe { core::slice::from_raw_parts(self.data_ptr(slot), (n * SECTOR) as usize) });
                retired += 1;
                last = rdtsc();
            }
            self.q.rescue(self.stall);
            if rdtsc().wrapping_sub(last) > self.timeout {
                fail(format_args!("blk: no request completed for 20 s ({} of {} done)", retired, total));
            }
        }
    }

    fn flush(&mut self) {
        if self.dev.features & F_FLUSH == 0 {
            return;
        }
        self.submit(0, T_FLUSH, 0, 0);
        self.q.kick();
        let t0 = rdtsc();
        loop {
            if self.q.pop_used().is_some() {
                break;
            }
            self.q.rescue(self.stall);
            if rdtsc().wrapping_sub(t0) > self.timeout {
                fail(format_args!("blk: flush did not complete in 20 s"));
            }
        }
        self.check(0, "flush", 0);
    }
}

pub fn run() -> ! {
    let cfg = &crate::run().cfg;
    let mut b = Blk::open();
    println!(
        "testguest: blk disk slot={} capacity={} features={:#x}",
        b.dev.slot, b.capacity, b.dev.features
    );
    if cfg.blk_bench {
        bench(&mut b);
    } else {
        checksum(&mut b, cfg.blk_sectors);
    }
    print_kicks();
    b.dev.reset();
    cpu::reset()
}

fn checksum(b: &mut Blk, n: u64) {
    if n.checked_add(1).is_none_or(|end| end > b.capacity) {
        fail(format_args!("blk_sectors={} needs a disk of more than {} sectors, it has {}", n, n, b.capacity));
    }
    if b.dev.features & F_RO != 0 {
        fail(format_args!("blk: the disk is read-only, cannot write the checksum"));
    }
    let mut h = FNV_OFFSET;
    b.sequential(T_IN, 0, n, |data| h = fnv1a(h, data));
    println!("testguest: blk read sectors={} sum={:#018x}", n, h);

    let p = b.data_ptr(0);
    unsafe {
        core::ptr::write_bytes(p, 0, SECTOR as usize);
        (p as *mut u64).write_unaligned(h);
        (p.add(8) as *mut u64).write_unaligned(n);
        core::ptr::copy_nonoverlapping(MARKER.as_ptr(), p.add(16), MARKER.len());
    }
    b.submit(0, T_OUT, n, SECTOR as u32);
    b.q.kick();
    let t0 = rdtsc();
    while b.q.pop_used().is_none() {
        b.q.rescue(b.stall);
        if rdtsc().wrapping_sub(t0) > b.timeout {
            fail(format_args!("blk: write of sector {} did not complete in 20 s", n));
        }
    }
    b.check(0, "write", n);
    b.flush();
    println!("testguest: blk wrote sector={}", n);
}

/// `<int>.<tenth>` MiB/s for `bytes` in `us` microseconds.
struct Rate(u64, u64);

impl core::fmt::Display for Rate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let (bytes, us) = (self.0 as u128, self.1 as u128);
        if us == 0 {
            return f.write_str("0.0");
        }
        let tenths = bytes * 10_000_000 / (us * 1_048_576);
        write!(f, "{}.{}", tenths / 10, tenths % 10)
    }
}

fn bench(b: &mut Blk) {
    let cfg = &crate::run().cfg;
    let bytes = b.capacity * SECTOR;
    let t0 = rdtsc();
    b.sequential(T_IN, 0, b.capacity, |_| {});
    let us = virtio::ticks_to_us(rdtsc() - t0);
    println!(
        "testguest: blk bench read bytes={} req={} depth={} us={} mibps={}",
        bytes, CHUNK, b.depth, us, Rate(bytes, us)
    );

    if b.dev.features & F_RO != 0 {
        fail(format_args!("blk: the disk is read-only, cannot run the write benchmark"));
    }
    let sectors = cfg.blk_write_mib.saturating_mul(2048).min(b.capacity);
    for slot in 0..MAX_DEPTH {
        let p = b.data_ptr(slot) as *mut u64;
        for i in 0..(CHUNK / 8) as usize {
            unsafe { p.add(i).write(0x5a5a_0000_0000_0000 | (slot as u64) << 32 | i as u64) };
        }
    }
    let t0 = rdtsc();
    b.sequential(T_OUT, 0, sectors, |_| {});
    b.flush();
    let us = virtio::ticks_to_us(rdtsc() - t0);
    let bytes = sectors * SECTOR;
    println!(
        "testguest: blk bench write bytes={} req={} depth={} us={} mibps={}",
        bytes, CHUNK, b.depth, us, Rate(bytes, us)
    );
}

/// `testguest: virtio kicks=<n> rescue_kicks=<n>`.
pub fn print_kicks() {
    use core::sync::atomic::Ordering;
    let mut l = crate::serial::Line::new();
    let _ = writeln!(
        l,
        "testguest: virtio kicks={} rescue_kicks={}",
        virtio::KICKS.load(Ordering::Relaxed),
        virtio::RESCUE_KICKS.load(Ordering::Relaxed)
    );
    crate::serial::emit(&l);
}
