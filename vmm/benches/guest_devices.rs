//! Guest-level device benchmark: the virtio devices driven by the bare-metal test guest's
//! polling drivers (kernels/testguest, modes `vsock` and `blk`) in a real VM, side by side with
//! the host's own upper bound, in one run:
//!
//! * vsock: host client -> `vsock.sock` -> device -> guest echo (CPL3, polling) -> device ->
//!   client: throughput (MiB/s) and round-trip latency of 64-byte messages, against a plain
//!   Unix socket pair with an echo thread on the host;
//! * virtio-blk: sequential read of the whole image and sequential write (+ flush) with
//!   128 KiB requests, 8 in flight, timed by the guest with its TSC, against `dd` (bs=128k,
//!   the write with conv=fsync) on the same image file.
//!
//! Timing on shared machines is noisy: compare the columns of one run, not runs.
//!
//! Run: `cargo bench -p vmm --bench guest_devices` (needs /dev/kvm). Sizes:
//! `GUEST_BENCH_VSOCK_MIB` (default 64), `GUEST_BENCH_DISK_MIB` (default 256),
//! `GUEST_BENCH_ROUNDS` (default 2000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{boot_devices, field, scratch, testguest, vsock_connect, Output};
use vmm::devices::{BlockConfig, DeviceConfig, VsockConfig};
use vmm::GuestExit;

const MIB: f64 = 1024.0 * 1024.0;
const T: Duration = Duration::from_secs(300);

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn echo_throughput(s: &UnixStream, total: usize) -> f64 {
    s.set_nonblocking(true).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut buf = vec![0u8; 256 * 1024];
    let (mut sent, mut got) = (0usize, 0usize);
    let mut s = s;
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
    let r = total as f64 / MIB / t.elapsed().as_secs_f64();
    s.set_nonblocking(false).unwrap();
    r
}

/// Round trips of 64 bytes: (median, 99th percentile).
fn echo_latency(s: &UnixStream, rounds: u32) -> (Duration, Duration) {
    let mut s = s;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            s.write_all(&msg).unwrap();
            s.read_exact(&mut back).unwrap();
            t.elapsed()
        })
        .collect();
    times.sort_unstable();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}

struct Echo {
    mibps: f64,
    p50: Duration,
    p99: Duration,
}

/// Best of three throughput runs, then the latency rounds, on one connection.
fn measure_echo(s: &UnixStream, total: usize, rounds: u32) -> Echo {
    echo_throughput(s, total / 8); // warm-up
    let mibps = (0..3)
        .map(|_| echo_throughput(s, total))
        .fold(0.0, f64::max);
    let (p50, p99) = echo_latency(s, rounds);
    Echo { mibps, p50, p99 }
}

fn bench_vsock(kernel: &Path, dir: &Path, total: usize, rounds: u32) -> (Echo, Echo, String) {
    let uds = dir.join("vsock.sock");
    let (vm, out) = boot_devices(
        kernel,
        64,
        "mode=vsock vsock_port=5000",
        DeviceConfig {
            vsock: Some(VsockConfig {
                guest_cid: 3,
                uds_path: uds.clone(),
            }),
            ..Default::default()
        },
    );
    out.wait_line("testguest: vsock ready", T);
    let s = vsock_connect(&uds, 5000, T);
    let guest = measure_echo(&s, total, rounds);
    drop(s);
    out.wait_line("testguest: vsock closed", T);
    drop(vm);

    let (a, mut b) = UnixStream::pair().unwrap();
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
    let host = measure_echo(&a, total, rounds);
    drop(a);
    echo.join().unwrap();
    (guest, host, out.text())
}

struct Blk {
    read: f64,
    write: f64,
    dd_read: Option<f64>,
    dd_write: Option<f64>,
    guest_out: String,
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

fn guest_rate(out: &Output, what: &str) -> f64 {
    let l = out.wait_line(&format!("testguest: blk bench {what} "), Duration::ZERO);
    field(&l, "mibps")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{l}"))
}

fn bench_blk(kernel: &Path, dir: &Path, size_mib: u64) -> Blk {
    let img = dir.join("disk.img");
    // Data everywhere (no holes), the same bytes dd and the guest read.
    dd(&[
        "if=/dev/zero",
        &format!("of={}", img.display()),
        "bs=1M",
        &format!("count={size_mib}"),
    ])
    .expect("dd is needed to create the image");
    let (vm, out) = boot_devices(
        kernel,
        64,
        &format!("mode=blk blk_bench=1 blk_depth=8 blk_write_mib={size_mib}"),
        DeviceConfig {
            blocks: vec![BlockConfig {
                path: img.clone(),
                read_only: false,
                id: None,
            }],
            ..Default::default()
        },
    );
    let exit = vm.wait_timeout(Some(T));
    assert!(
        matches!(exit, Ok(Some(GuestExit::Reset))),
        "{exit:?}\n{}",
        out.text()
    );
    let read = guest_rate(&out, "read");
    let write = guest_rate(&out, "write");

    let mib = size_mib as f64;
    let dd_read =
        dd(&[&format!("if={}", img.display()), "of=/dev/null", "bs=128k"]).map(|t| mib / t);
    let dd_write = dd(&[
        "if=/dev/zero",
        &format!("of={}", img.display()),
        "bs=128k",
        &format!("count={}", size_mib * 8),
        "conv=notrunc,fsync",
    ])
    .map(|t| mib / t);
    Blk {
        read,
        write,
        dd_read,
        dd_write,
        guest_out: out.text(),
    }
}

/// The guest's last count of notifications (`kicks=` and `rescue_kicks=` fields).
fn kicks(guest_out: &str) -> String {
    guest_out
        .lines()
        .rev()
        .find_map(|l| {
            Some(format!(
                "kicks={} rescue_kicks={}",
                field(l, "kicks")?,
                field(l, "rescue_kicks")?
            ))
        })
        .unwrap_or_else(|| "kicks=?".into())
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        println!("guest_devices: skipped (no /dev/kvm)");
        return;
    }
    let vsock_mib = env_or("GUEST_BENCH_VSOCK_MIB", 64) as usize;
    let disk_mib = env_or("GUEST_BENCH_DISK_MIB", 256);
    let rounds = env_or("GUEST_BENCH_ROUNDS", 2000) as u32;
    let dir = scratch("guest-devices-bench");
    let kernel = testguest(&dir);

    let (guest, host, vsock_out) = bench_vsock(&kernel, &dir, vsock_mib << 20, rounds);
    let blk = bench_blk(&kernel, &dir, disk_mib);

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let opt = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1}"));
    let ratio = |a: f64, b: Option<f64>| b.map_or("n/a".to_string(), |b| format!("{:.2}", a / b));
    println!();
    println!("guest devices: test guest (1 vCPU, CPL3 polling drivers) vs the host, one run");
    println!(
        "{:<44} {:>12} {:>14} {:>8}",
        "", "microagent", "host bound", "ratio"
    );
    println!(
        "{:<44} {:>12.1} {:>14.1} {:>8}",
        format!("vsock echo throughput, {vsock_mib} MiB (MiB/s)"),
        guest.mibps,
        host.mibps,
        ratio(guest.mibps, Some(host.mibps))
    );
    println!(
        "{:<44} {:>12.1} {:>14.1} {:>8}",
        "vsock echo round trip 64 B, p50 (us)",
        us(guest.p50),
        us(host.p50),
        ratio(us(guest.p50), Some(us(host.p50)))
    );
    println!(
        "{:<44} {:>12.1} {:>14.1} {:>8}",
        "vsock echo round trip 64 B, p99 (us)",
        us(guest.p99),
        us(host.p99),
        ratio(us(guest.p99), Some(us(host.p99)))
    );
    println!(
        "{:<44} {:>12.1} {:>14} {:>8}",
        format!("virtio-blk seq read {disk_mib} MiB, 128K (MiB/s)"),
        blk.read,
        opt(blk.dd_read),
        ratio(blk.read, blk.dd_read)
    );
    println!(
        "{:<44} {:>12.1} {:>14} {:>8}",
        format!("virtio-blk seq write {disk_mib} MiB+flush (MiB/s)"),
        blk.write,
        opt(blk.dd_write),
        ratio(blk.write, blk.dd_write)
    );
    println!(
        "host bound: vsock = Unix socket pair + echo thread ({rounds} round trips); \
         blk = dd bs=128k on the same image (write: conv=fsync)"
    );
    println!(
        "guest notifications: vsock {}; blk {}",
        kicks(&vsock_out),
        kicks(&blk.guest_out)
    );
    let _ = std::fs::remove_dir_all(dir);
}
