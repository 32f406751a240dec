//! Device benchmark: the virtio devices driven through their real transport and event-loop
//! thread by a polling "driver" on the host (no guest yet), printed side by side with the host's
//! own upper bound, in one run:
//!
//! * vsock: host client -> `vsock.sock` -> device -> driver echo -> device -> client, throughput
//!   (MiB/s) and round-trip latency, against a plain Unix socket pair with an echo thread;
//! * virtio-blk: sequential read and write (MiB/s, 128 KiB requests, 8 in flight) of a raw image,
//!   against `dd` on the same file.
//!
//! Timing on shared machines is noisy: compare the columns of one run, not runs. The guest-level
//! version of this benchmark (through the test guest's drivers) comes with those drivers.
//!
//! Run: `cargo bench -p vmm --bench devices` (needs /dev/kvm for the irqfd/ioeventfd set-up).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::arch::layout::VIRTIO_MMIO_START;
use vmm::devices::bus::Bus;
use vmm::devices::{BlockConfig, DeviceConfig, DeviceManager, VsockConfig};
use vmm::memory::GuestMemory;

const MIB: f64 = 1024.0 * 1024.0;

/// The driver's side of one split queue, polling only.
struct DQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    avail_idx: u16,
    used_seen: u16,
}

impl DQueue {
    fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        mem.write_slice(
            &vec![0u8; (used + 6 + 8 * u64::from(size) - base) as usize],
            GuestAddress(base),
        )
        .unwrap();
        Self {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Publishes a chain; `None` when the table is full.
    fn push(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> Option<u16> {
        if self.free.len() < bufs.len() {
            return None;
        }
        let idx: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let last = i + 1 == bufs.len();
            let flags: u16 = if w { 2 } else { 0 } | if last { 0 } else { 1 };
            let next = if last { 0 } else { idx[i + 1] };
            let at = GuestAddress(self.desc + 16 * u64::from(idx[i]));
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        }
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(idx[0], GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(Ordering::Release);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        Some(idx[0])
    }

    /// The next used entry (head, len), returning its descriptors to the free list.
    fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        std::sync::atomic::fence(Ordering::Acquire);
        let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let head: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        // Walk the chain back onto the free list.
        let mut d = head as u16;
        loop {
            self.free.push(d);
            let at = self.desc + 16 * u64::from(d);
            let flags: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap();
            if flags & 1 == 0 {
                break;
            }
            d = mem.read_obj(GuestAddress(at + 14)).unwrap();
        }
        Some((head as u16, len))
    }
}

fn w32(bus: &Bus, addr: u64, v: u32) {
    bus.write(addr, &v.to_le_bytes());
}

fn r32(bus: &Bus, addr: u64) -> u32 {
    let mut d = [0u8; 4];
    bus.read(addr, &mut d);
    u32::from_le_bytes(d)
}

/// Feature negotiation and queue set-up of the device at `base`, like a Linux driver.
fn bring_up(bus: &Bus, base: u64, queues: &[&DQueue]) {
    w32(bus, base + 0x70, 1);
    w32(bus, base + 0x70, 3);
    w32(bus, base + 0x24, 1);
    w32(bus, base + 0x20, 1); // VIRTIO_F_VERSION_1 only
    w32(bus, base + 0x70, 11);
    assert_eq!(r32(bus, base + 0x70), 11, "FEATURES_OK refused");
    for (i, q) in queues.iter().enumerate() {
        w32(bus, base + 0x30, i as u32);
        w32(bus, base + 0x38, u32::from(q.size));
        for (reg, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
            w32(bus, base + reg, addr as u32);
            w32(bus, base + reg + 4, (addr >> 32) as u32);
        }
        w32(bus, base + 0x44, 1);
    }
    w32(bus, base + 0x70, 15);
    assert_eq!(r32(bus, base + 0x70), 15, "DRIVER_OK refused");
}

fn kick(bus: &Bus, base: u64, q: u32) {
    w32(bus, base + 0x50, q);
}

fn vm() -> Option<(kvm_ioctls::Kvm, kvm_ioctls::VmFd)> {
    let kvm = kvm_ioctls::Kvm::new().ok()?;
    let fd = kvm.create_vm().ok()?;
    fd.create_irq_chip().ok()?;
    Some((kvm, fd))
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-bench-{}-{name}", std::process::id()))
}

// ---------------------------------------------------------------------------------------------
// vsock

const HDR: usize = 44;
const PKT: u32 = 64 * 1024;

#[derive(Clone, Copy, Default)]
#[repr(C, packed)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}
// SAFETY: plain integers.
unsafe impl vm_memory::ByteValued for Hdr {}

/// The "guest": accepts the host's connection and echoes everything back, honouring credit.
fn vsock_echo_driver(mem: GuestMemory, bus: Bus, base: u64, stop: Arc<AtomicBool>) {
    let mut rx = DQueue::new(&mem, 0x1_0000, 128);
    let mut tx = DQueue::new(&mem, 0x2_0000, 128);
    let ev = DQueue::new(&mem, 0x3_0000, 16);
    bring_up(&bus, base, &[&rx, &tx, &ev]);
    let rx_buf = |h: u16| 0x100_0000 + u64::from(h) * 0x1_1000;
    let tx_buf = |h: u16| 0x200_0000 + u64::from(h) * 0x1_1000;
    let post_rx = |rx: &mut DQueue| {
        while !rx.free.is_empty() {
            let h = *rx.free.last().unwrap();
            rx.push(&mem, &[(rx_buf(h), HDR as u32 + PKT, true)]);
        }
    };
    post_rx(&mut rx);
    kick(&bus, base, 0);
    let mut fwd_cnt: u32 = 0; // bytes we consumed
    let mut tx_cnt: u32 = 0; // bytes we sent
    let (mut peer_alloc, mut peer_fwd) = (0u32, 0u32);
    let mut pending: std::collections::VecDeque<(Hdr, Vec<u8>)> = Default::default();
    let mut idle = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let mut work = false;
        while let Some((head, len)) = rx.pop_used(&mem) {
            work = true;
            let addr = rx_buf(head);
            let h: Hdr = mem.read_obj(GuestAddress(addr)).unwrap();
            peer_alloc = h.buf_alloc;
            peer_fwd = h.fwd_cnt;
            let mut reply = Hdr {
                src_cid: h.dst_cid,
                dst_cid: h.src_cid,
                src_port: h.dst_port,
                dst_port: h.src_port,
                type_: 1,
                buf_alloc: 4 << 20,
                ..Default::default()
            };
            match h.op {
                1 => {
                    reply.op = 2; // REQUEST -> RESPONSE
                    pending.push_back((reply, vec![]));
                }
                5 => {
                    let mut data = vec![0u8; len as usize - HDR];
                    mem.read_slice(&mut data, GuestAddress(addr + HDR as u64))
                        .unwrap();
                    fwd_cnt = fwd_cnt.wrapping_add(data.len() as u32);
                    reply.op = 5;
                    pending.push_back((reply, data));
                }
                7 => {
                    reply.op = 6;
                    pending.push_back((reply, vec![]));
                }
                _ => {}
            }
        }
        post_rx(&mut rx);
        while tx.pop_used(&mem).is_some() {}
        let mut sent = false;
        while let Some((h, data)) = pending.front() {
            let credit = peer_alloc.saturating_sub(tx_cnt.wrapping_sub(peer_fwd));
            if !data.is_empty() && (data.len() as u32) > credit {
                break;
            }
            let Some(&slot) = tx.free.last() else { break };
            let mut h = *h;
            h.len = data.len() as u32;
            h.fwd_cnt = fwd_cnt;
            let at = tx_buf(slot);
            mem.write_obj(h, GuestAddress(at)).unwrap();
            mem.write_slice(data, GuestAddress(at + HDR as u64))
                .unwrap();
            tx.push(&mem, &[(at, (HDR + data.len()) as u32, false)])
                .unwrap();
            tx_cnt = tx_cnt.wrapping_add(data.len() as u32);
            pending.pop_front();
            sent = true;
        }
        if sent {
            kick(&bus, base, 1);
            work = true;
        }
        if work {
            kick(&bus, base, 0);
            idle = 0;
        } else {
            idle += 1;
            if idle > 1000 {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

fn echo_throughput(s: &mut UnixStream, total: usize) -> f64 {
    s.set_nonblocking(true).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut buf = vec![0u8; 256 * 1024];
    let (mut sent, mut got) = (0usize, 0usize);
    let t = Instant::now();
    while got < total {
        if sent < total {
            match s.write(&chunk[..chunk.len().min(total - sent)]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        match s.read(&mut buf) {
            Ok(0) => panic!("closed"),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
    }
    total as f64 / MIB / t.elapsed().as_secs_f64()
}

fn echo_latency(s: &mut UnixStream, rounds: u32) -> Duration {
    s.set_nonblocking(false).unwrap();
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let t = Instant::now();
    for _ in 0..rounds {
        s.write_all(&msg).unwrap();
        s.read_exact(&mut back).unwrap();
    }
    t.elapsed() / rounds
}

fn bench_vsock(total: usize, rounds: u32) {
    let Some((_kvm, fd)) = vm() else {
        println!("vsock: skipped (no /dev/kvm)");
        return;
    };
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let sock = tmp("vsock.sock");
    let cfg = DeviceConfig {
        vsock: Some(VsockConfig {
            guest_cid: 3,
            uds_path: sock.clone(),
        }),
        ..Default::default()
    };
    let (tx, _rx) = channel();
    let dm = DeviceManager::new(&fd, &mem, Box::new(std::io::sink()), tx, &cfg).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let driver = {
        let (mem, bus, stop) = (mem.clone(), dm.mmio.clone(), stop.clone());
        std::thread::spawn(move || vsock_echo_driver(mem, bus, VIRTIO_MMIO_START, stop))
    };
    std::thread::sleep(Duration::from_millis(50));
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let mut ok = [0u8; 1];
    let mut line = Vec::new();
    while ok[0] != b'\n' {
        s.read_exact(&mut ok).unwrap();
        line.push(ok[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{:?}",
        String::from_utf8_lossy(&line)
    );
    let vs_tp = echo_throughput(&mut s, total);
    let vs_lat = echo_latency(&mut s, rounds);
    stop.store(true, Ordering::Relaxed);
    driver.join().unwrap();
    drop(dm);
    let _ = std::fs::remove_file(&sock);

    let (mut a, mut b) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match b.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let us_tp = echo_throughput(&mut a, total);
    let us_lat = echo_latency(&mut a, rounds);
    drop(a);
    echo.join().unwrap();

    println!(
        "\nvsock echo ({} MiB through, {rounds} round trips of 64 bytes)",
        total >> 20
    );
    println!("{:<34} {:>14} {:>16}", "", "MiB/s", "round trip (us)");
    println!(
        "{:<34} {:>14.1} {:>16.1}",
        "microagent vsock (host driver)",
        vs_tp,
        vs_lat.as_secs_f64() * 1e6
    );
    println!(
        "{:<34} {:>14.1} {:>16.1}",
        "Unix socket pair (upper bound)",
        us_tp,
        us_lat.as_secs_f64() * 1e6
    );
}

// ---------------------------------------------------------------------------------------------
// virtio-blk

const REQ: u32 = 128 * 1024;
const DEPTH: u16 = 8;

fn blk_pass(mem: &GuestMemory, bus: &Bus, q: &mut DQueue, sectors: u64, write: bool) -> f64 {
    let base = VIRTIO_MMIO_START;
    let per = u64::from(REQ) / 512;
    let total = sectors / per;
    let slot = |h: u16| 0x100_0000 + u64::from(h % DEPTH) * 0x2_2000;
    let (mut issued, mut done) = (0u64, 0u64);
    let mut heads = std::collections::HashMap::new();
    let mut free_slots: Vec<u64> = (0..DEPTH).map(slot).collect();
    let t = Instant::now();
    while done < total {
        let mut any = false;
        while issued < total && !free_slots.is_empty() {
            let at = free_slots.pop().unwrap();
            mem.write_obj(u32::from(write), GuestAddress(at)).unwrap();
            mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
            mem.write_obj(issued * per, GuestAddress(at + 8)).unwrap();
            let h = q
                .push(
                    mem,
                    &[
                        (at, 16, false),
                        (at + 0x1000, REQ, !write),
                        (at + 0x1000 + u64::from(REQ), 1, true),
                    ],
                )
                .unwrap();
            heads.insert(h, at);
            issued += 1;
            any = true;
        }
        if any {
            kick(bus, base, 0);
        }
        while let Some((h, _)) = q.pop_used(mem) {
            let at = heads.remove(&h).unwrap();
            let status: u8 = mem
                .read_obj(GuestAddress(at + 0x1000 + u64::from(REQ)))
                .unwrap();
            assert_eq!(status, 0, "request failed");
            free_slots.push(at);
            done += 1;
        }
    }
    if write {
        // FLUSH, like dd's conv=fsync.
        let at = slot(0);
        mem.write_obj(4u32, GuestAddress(at)).unwrap();
        q.push(
            mem,
            &[(at, 16, false), (at + 0x1000 + u64::from(REQ), 1, true)],
        )
        .unwrap();
        kick(bus, base, 0);
        while q.pop_used(mem).is_none() {
            std::hint::spin_loop();
        }
    }
    (total * u64::from(REQ)) as f64 / MIB / t.elapsed().as_secs_f64()
}

fn dd(args: &[&str]) -> Option<f64> {
    let t = Instant::now();
    let ok = std::process::Command::new("dd")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status()
        .ok()?
        .success();
    ok.then(|| t.elapsed().as_secs_f64())
}

fn bench_blk(size_mib: u64) {
    let Some((_kvm, fd)) = vm() else {
        println!("virtio-blk: skipped (no /dev/kvm)");
        return;
    };
    let img = tmp("disk.img");
    {
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(size_mib << 20).unwrap();
    }
    // Fill it once so both read paths read data, not holes.
    dd(&[
        "if=/dev/zero",
        &format!("of={}", img.display()),
        "bs=1M",
        &format!("count={size_mib}"),
        "conv=notrunc",
    ]);
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let cfg = DeviceConfig {
        blocks: vec![BlockConfig {
            path: img.clone(),
            read_only: false,
            id: None,
        }],
        ..Default::default()
    };
    let (tx, _rx) = channel();
    let dm = DeviceManager::new(&fd, &mem, Box::new(std::io::sink()), tx, &cfg).unwrap();
    let mut q = DQueue::new(&mem, 0x1_0000, 64);
    bring_up(&dm.mmio, VIRTIO_MMIO_START, &[&q]);
    let sectors = (size_mib << 20) / 512;
    let read = blk_pass(&mem, &dm.mmio, &mut q, sectors, false);
    let write = blk_pass(&mem, &dm.mmio, &mut q, sectors, true);
    drop(dm);

    let mib = size_mib as f64;
    let dd_read =
        dd(&[&format!("if={}", img.display()), "of=/dev/null", "bs=128k"]).map(|t| mib / t);
    let dd_write = dd(&[
        "if=/dev/zero",
        &format!("of={}", img.display()),
        "bs=128k",
        &format!("count={}", (size_mib << 20) / u64::from(REQ)),
        "conv=notrunc,fsync",
    ])
    .map(|t| mib / t);
    let _ = std::fs::remove_file(&img);
    let show = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
    println!("\nvirtio-blk sequential ({size_mib} MiB image, 128 KiB requests, {DEPTH} in flight)");
    println!("{:<34} {:>14} {:>14}", "", "read MiB/s", "write MiB/s");
    println!(
        "{:<34} {:>14.1} {:>14.1}",
        "microagent virtio-blk (host driver)", read, write
    );
    println!(
        "{:<34} {:>14} {:>14}",
        "dd on the same file (bs=128k)",
        show(dd_read),
        show(dd_write)
    );
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        println!("devices benchmark skipped: /dev/kvm is not available");
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let (mib, rounds, disk) = if quick {
        (16, 200, 32)
    } else {
        (256, 2000, 256)
    };
    println!("virtio devices, host-side driver (numbers are for comparison within this run)");
    bench_vsock(mib << 20, rounds);
    bench_blk(disk);
}
